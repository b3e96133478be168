"""Keras backend speed at 64 px: train step and inference.

CI runs densenet-small; set CXRBENCH_BENCH_ARCH=densenet121 for the full network. The backend against a plain
Keras loop is the shared harness-overhead benchmark (test_bench_overhead.py).
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest

from helpers.backends import require

pytestmark = require("pytorch", "keras")  # the reference loop is torch's

import cxrbench_keras  # noqa: F401  (sets KERAS_BACKEND)

pytest.importorskip("torchvision")  # must be imported before tensorflow in this environment (segfault otherwise)
tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")


from cxrbench.backend.recorder import Recorder  # noqa: E402
from cxrbench.data.classes import NUM_CLASSES  # noqa: E402
from cxrbench_keras import infer, loop  # noqa: E402
from cxrbench_keras import model as keras_model
from helpers.keras_inputs import make_data, make_settings

ARCH = os.environ.get("CXRBENCH_BENCH_ARCH", "densenet-small")
BATCH, STEPS = 16, 6


@pytest.fixture(scope="module")
def bench():
    settings = make_settings(
        **{"model.arch": ARCH, "train.batch_size": BATCH, "train.max_steps": STEPS, "train.hflip": True}
    )
    data = make_data(n=BATCH * STEPS * 3 // 2 + 8)
    model = keras_model.build(settings)
    return settings, data, model, loop.KerasEpochLoop(model, data, settings, Recorder())


def test_bench_train_step(benchmark, bench):
    settings, data, _, keras_loop = bench
    batch = next(iter(data.batches("train", BATCH, epoch=1)))
    args = ((tf.constant(batch.images), tf.constant(batch.labels)),)
    keras_loop.train_step(*args)  # trace and compile outside the timing
    loss = benchmark.pedantic(lambda: float(keras_loop.train_step(*args)), rounds=5, iterations=1)
    benchmark.extra_info.update(arch=ARCH, image_size=64, batch=BATCH, images_per_round=BATCH)
    assert np.isfinite(loss)


def test_bench_inference(benchmark, bench):
    settings, data, model, _ = bench
    images = data.images[:64]
    infer.predict(model, images, settings)
    logits = benchmark.pedantic(infer.predict, args=(model, images, settings), rounds=5, iterations=1)
    benchmark.extra_info.update(arch=ARCH, image_size=64, batch=BATCH, images_per_round=len(images))
    assert logits.shape == (64, NUM_CLASSES)
