"""Data-layer benchmarks: building the prepared cache (all cores vs one worker) and serving batches.

Run: ``python -m pytest tests/benchmarks/test_bench_data.py --benchmark-only -q``. Rates go into
``extra_info``; the reference is DenseNet-121 training on these CPUs at about 30 images/s at
64 px (measured on 2 cores), which the batch pipeline must outpace many times over.
"""

from __future__ import annotations

import itertools
import os

import pytest

from cxrbench.data import cache, nih, phantom

IMAGES, SOURCE_SIZE, SIZE, BATCH = 300, 256, 64, 16
TRAINING_IMAGES_PER_S = 30.0  #: DenseNet-121 train step, 64 px, batch 16, 2 CPU cores (measured)


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    root = phantom.synthesize(tmp_path_factory.mktemp("bench") / "phantom", IMAGES, SOURCE_SIZE, seed=0)
    return nih.read_index(root)


@pytest.mark.parametrize("workers", [os.cpu_count(), 1], ids=["all-cores", "one-worker"])
def test_bench_cache_build(benchmark, index, tmp_path, workers):
    fresh = (tmp_path / str(i) for i in itertools.count())

    def setup():
        return (index, SIZE), {"cache_dir": next(fresh), "workers": workers}

    prepared = benchmark.pedantic(cache.prepare, setup=setup, rounds=3, iterations=1)
    assert prepared.images.shape == (IMAGES, SIZE, SIZE)
    benchmark.extra_info.update(workers=workers, images=IMAGES, source_px=SOURCE_SIZE, size_px=SIZE)
    benchmark.extra_info["images_per_s"] = round(IMAGES / benchmark.stats.stats.mean, 1)


def test_bench_batches(benchmark, index, tmp_path):
    prepared = cache.prepare(index, SIZE, cache_dir=tmp_path, workers=1)
    epochs = itertools.count(1)

    def one_epoch():
        return sum(len(b.positions) for b in prepared.batches("train", BATCH, epoch=next(epochs), hflip=True))

    images = benchmark(one_epoch)
    batches = images // BATCH
    seconds = benchmark.stats.stats.mean
    benchmark.extra_info.update(
        batch=BATCH,
        size_px=SIZE,
        batches_per_epoch=batches,
        batches_per_s=round(batches / seconds, 1),
        images_per_s=round(images / seconds, 1),
        times_densenet121_cpu_training=round(images / seconds / TRAINING_IMAGES_PER_S, 1),
    )
