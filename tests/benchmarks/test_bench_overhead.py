"""Each backend's training path against its framework's idiomatic loop: the harness-overhead benchmark.

One harness for every backend (:mod:`cxrbench.run.overhead`, the ``cxrbench overhead`` command): alternating fresh
processes, the backend's worker against the framework's own loop (torchvision + ``torch.optim.Adam``,
``keras.applications`` + ``train_on_batch``, a plain ``jax.jit`` step, the numpy example's probe), 3 rounds, the
same network, image size, batch and threads on both sides. CI runs it small (DenseNet-tiny, 32 px, batch 4, 12
steps a process: about 10-60 s a backend on 2 cores, mostly framework start-up) to prove the harness end to end
and keep the ratios in the benchmark JSON's ``extra_info``; timings are never asserted. The real figure is the
command at the main job's size (docs/speed.md)::

    cxrbench overhead --backend pytorch --backend keras --backend jax --rounds 3
"""

from __future__ import annotations

import pytest

from cxrbench import cli
from cxrbench.files import read_json
from cxrbench.run import overhead
from cxrbench.run.folder import OVERHEAD_JSON
from helpers.tiny_run import TINY_RUN

pytestmark = pytest.mark.slow

ROUNDS = 3
SMALL = [*TINY_RUN, "--set", "train.warmup_steps=2", "--set", "train.window_steps=2"]


@pytest.mark.parametrize(
    "backend", [pytest.param(name, marks=pytest.mark.backends(name)) for name in ("pytorch", "keras", "jax", "numpy")]
)
def test_bench_backend_against_its_frameworks_idiomatic_loop(benchmark, backend, tmp_path, capsys):
    out = tmp_path / "overhead"
    arguments = ["overhead", "--backend", backend, "--rounds", str(ROUNDS), "--out", str(out), *SMALL]
    status = benchmark.pedantic(cli.main, args=(arguments,), rounds=1, iterations=1)
    summary = read_json(out / OVERHEAD_JSON)["backends"][backend]
    with capsys.disabled():
        print(f"\n{overhead.sentence(backend, summary)}")
    assert status == 0, summary.get("error")
    assert len(summary["rounds"]) == ROUNDS and summary["conditions"]["arch"] == "densenet-tiny"
    assert summary["equal_threads"] is not False, summary["threads"]  # the same thread budget on both sides
    benchmark.extra_info.update(
        {
            key: summary[key]
            for key in (
                "ratio",
                "ratio_interval",
                "round_ratios",
                "backend_images_per_s",
                "idiomatic_images_per_s",
                "others_cpu_share_max",
                "loaded",
                "conditions",
            )
        }
    )
