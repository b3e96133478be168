"""PyTorch backend speed: a train step and inference.

DenseNet-121, 64 px, batch 16, one intra-op thread: on a shared 2-core runner, OpenMP threads that other
processes crowd out spin, and 2-thread steps took 3.7-12 s where one thread took 1.2 s (measured here under
load). Idle, these CPUs give about 30 img/s per train step and 105 img/s inference. The backend against a plain
PyTorch loop is the shared harness-overhead benchmark (test_bench_overhead.py). Timings go to ``extra_info``,
never into assertions.

Run: ``python -m pytest tests/benchmarks/test_bench_pytorch.py --benchmark-only -q``.
"""

from __future__ import annotations

import pytest

from helpers.backends import require

pytestmark = [require("pytorch"), pytest.mark.slow]

import torch  # noqa: E402

import cxrbench_pytorch as backend
from cxrbench.backend.canonical import init_canonical
from cxrbench.backend.recorder import Recorder
from cxrbench.data.classes import NUM_CLASSES
from cxrbench.testing.conformance import kit_settings, random_images, synthetic_data
from cxrbench_pytorch import loop

SIZE, BATCH, STEPS, ROUNDS, THREADS = 64, 16, 2, 3, 1
DENSENET121 = (6, 12, 24, 16)


@pytest.fixture(scope="module")
def weights():
    threads = torch.get_num_threads()
    yield init_canonical(DENSENET121, seed=0)
    torch.set_num_threads(threads)


def settings_for(**dotted):
    return kit_settings(
        SIZE,
        **{
            "model.arch": "densenet121",
            "train.batch_size": BATCH,
            "train.max_steps": STEPS,
            "train.hflip": True,
            "numerics.intra_op_threads": THREADS,
            **dotted,
        },
    )


def backend_loop(weights, loader_workers: int) -> loop.TorchEpochLoop:
    settings = settings_for(**{"numerics.loader_workers": loader_workers})
    model = backend.cxrbench_build_model(settings=settings, weights=weights)
    data = synthetic_data(SIZE, train=BATCH * STEPS, val=BATCH)
    return loop.TorchEpochLoop(model, data, settings, Recorder(), model.net)


def test_bench_train_step(benchmark, weights):
    epoch_loop = backend_loop(weights, loader_workers=0)
    batch = next(epoch_loop.data.batches("train", BATCH))
    images, labels = torch.from_numpy(batch.images), torch.from_numpy(batch.labels)
    epoch_loop.model.net.train()
    benchmark.pedantic(epoch_loop._step, args=(images, labels), rounds=ROUNDS * STEPS, warmup_rounds=1)
    benchmark.extra_info.update(
        size_px=SIZE,
        batch=BATCH,
        threads=torch.get_num_threads(),
        images_per_s=round(BATCH / benchmark.stats.stats.mean, 1),
    )


def test_bench_inference(benchmark, weights):
    settings = settings_for()
    model = backend.cxrbench_build_model(settings=settings, weights=weights)
    images = random_images(4 * BATCH, SIZE)
    logits = benchmark.pedantic(
        backend.cxrbench_predict,
        kwargs={"model": model, "images": images, "settings": settings},
        rounds=ROUNDS,
        warmup_rounds=1,
    )
    assert logits.shape == (len(images), NUM_CLASSES)
    benchmark.extra_info.update(
        size_px=SIZE,
        batch=BATCH,
        threads=torch.get_num_threads(),
        images_per_s=round(len(images) / benchmark.stats.stats.mean, 1),
    )
