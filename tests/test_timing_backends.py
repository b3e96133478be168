"""Each real backend, tiny and on the CPU, reports warm-up apart and steady-state windows through the recipe,
and records the same thread keys read back from its framework."""

from __future__ import annotations

import importlib

import pytest

from cxrbench.backend.recorder import Recorder
from cxrbench.machine.budget import thread_budget
from cxrbench.run.stages import training_throughput
from cxrbench.testing.conformance import kit_settings, synthetic_data


@pytest.mark.parametrize(
    "module",
    [
        pytest.param("cxrbench_pytorch", marks=pytest.mark.backends("pytorch")),
        pytest.param("cxrbench_keras", marks=pytest.mark.backends("keras")),
    ],
)
def test_tiny_backend_run_reports_first_step_and_steady_windows(module):
    backend = importlib.import_module(module)
    settings = kit_settings(
        32, **{"train.epochs": 1, "train.max_steps": 10, "train.warmup_steps": 2, "train.window_steps": 2}
    )
    data = synthetic_data(32, train=40, val=28)
    model, recorder = backend.cxrbench_build_model(settings=settings, weights=None), Recorder()
    result = backend.cxrbench_train(model=model, data=data, settings=settings, recorder=recorder)

    (record,) = recorder.history
    assert record.steps == 10 and record.first_step_s > 0 and record.windows == 4 and record.steps_after_warmup == 8
    low, high = record.steady_images_per_s_interval
    assert 0 < low <= record.steady_images_per_s <= high
    assert [w[:2] for w in record.train_window_list] == [[2, 8]] * 4
    assert record.val_windows == 3 and record.val_images_per_s > 0  # 7 batches: 1 warm-up step, 3 windows of 2
    throughput = training_throughput([r.to_dict() for r in recorder.history], settings)
    assert throughput["steady"]
    assert throughput["train_images_per_s"] == pytest.approx(record.steady_images_per_s, rel=1e-4)  # rounded windows
    numerics = result["numerics"]
    assert numerics["thread_budget"] == thread_budget(settings.numerics)
    assert isinstance(numerics["intra_op_threads"], int) and isinstance(numerics["inter_op_threads"], int)
