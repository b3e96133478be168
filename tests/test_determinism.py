"""numerics.deterministic: each backend applies its switches, reads them back for the record, and refuses conflicts.

Whether runs are then bit-identical is a property of whole training runs (two processes, compared loss by loss);
that was measured by hand for the report of issue 10, not here (it takes minutes per run on a CPU).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from cxrbench.errors import BackendError
from cxrbench.suite import Settings
from helpers.backends import require

pytestmark = require("pytorch")
import torch  # noqa: E402

from cxrbench_pytorch import determinism as torch_determinism  # noqa: E402


def numerics(**dotted):
    return Settings().replace(**{f"numerics.{k}": v for k, v in dotted.items()}).numerics


@pytest.fixture
def restore_torch():
    before = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic
    yield
    torch.use_deterministic_algorithms(before[0])
    torch.backends.cudnn.deterministic = before[1]


def test_torch_switches_on_and_off_and_reads_them_back(restore_torch, monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    torch_determinism.apply(numerics(deterministic=True))
    assert torch_determinism.describe() == {
        "deterministic_algorithms": True,
        "cudnn_deterministic": True,
        "cublas_workspace_config": ":4096:8",
    }
    torch_determinism.apply(numerics(deterministic=False))
    described = torch_determinism.describe()
    assert described["deterministic_algorithms"] is False and described["cudnn_deterministic"] is False


def test_torch_refuses_deterministic_with_cudnn_autotuning(restore_torch):
    with pytest.raises(BackendError, match="numerics.deterministic .* numerics.cudnn_benchmark") as caught:
        torch_determinism.apply(numerics(deterministic=True, cudnn_benchmark=True))
    assert "\n" not in str(caught.value)


@pytest.mark.backends("keras")
def test_keras_sets_onednn_off_only_before_tensorflow_is_imported(monkeypatch):
    from cxrbench_keras import determinism

    monkeypatch.delenv(determinism.ONEDNN_VARIABLE, raising=False)
    monkeypatch.setitem(sys.modules, "tensorflow", sys.modules.get("tensorflow") or object())
    determinism.prepare_environment(numerics(deterministic=True))
    assert determinism.ONEDNN_VARIABLE not in os.environ  # too late: TensorFlow already read it
    monkeypatch.delitem(sys.modules, "tensorflow")
    determinism.prepare_environment(numerics(deterministic=False))
    assert determinism.ONEDNN_VARIABLE not in os.environ
    determinism.prepare_environment(numerics(deterministic=True))
    assert os.environ[determinism.ONEDNN_VARIABLE] == "0"


@pytest.mark.backends("keras")
def test_keras_worker_records_what_tensorflow_ran_with():
    """A fresh process, as a worker: the build hook's order sets oneDNN off before TensorFlow loads, and the
    runtime pins both thread pools to the core's budget (the thread count changes Keras' numbers on CPUs)."""
    code = (
        "from cxrbench.suite import Settings\n"
        "from cxrbench_keras import determinism\n"
        "s = Settings().replace(**{'numerics.deterministic': True})\n"
        "determinism.prepare_environment(s.numerics)\n"
        "import tensorflow\n"
        "from cxrbench_keras.numerics import configure_runtime\n"
        "configure_runtime(s)\n"
        "determinism.apply(s.numerics)\n"
        "print(determinism.describe())\n"
        "print('pinned', tensorflow.config.threading.get_intra_op_parallelism_threads(),"
        " tensorflow.config.threading.get_inter_op_parallelism_threads())\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TF_ENABLE_ONEDNN_OPTS"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "'op_determinism': True" in out.stdout and "'onednn_opts': 'off'" in out.stdout
    cpus = len(os.sched_getaffinity(0))
    assert f"pinned {cpus} {cpus}" in out.stdout  # set explicitly, not TensorFlow's 0 = "default"
