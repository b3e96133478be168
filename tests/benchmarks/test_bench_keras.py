"""Keras backend speed at 64 px: train step, inference, and the backend's overhead over a bare loop.

CI runs densenet-small; set CXRBENCH_BENCH_ARCH=densenet121 for the full network. The overhead
benchmark times the backend's epoch (core batches -> tf.data -> distributed train step, per-step
losses kept on the device) against a bare ``model.fit`` of the same network, batch and threads
on in-memory tensors and records ``backend_over_bare`` in extra_info.
"""

from __future__ import annotations

import os
import time

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


def _bare_fit(settings, data):
    """The same network and batch through a bare ``model.fit`` on in-memory tensors.

    The images are normalised once, up front, so the bare side does strictly less work per step
    than the backend (which normalises uint8 on the device every step).
    """
    network = keras_model.build(settings).network
    network.compile(optimizer=keras.optimizers.Adam(1e-3), loss=keras.losses.BinaryCrossentropy(from_logits=True))
    images = keras_model.preprocess(tf.constant(data.split_images("train")[: BATCH * STEPS]))
    labels = tf.constant(data.split_labels("train")[: BATCH * STEPS])

    def epoch():
        return network.fit(images, labels, batch_size=BATCH, epochs=1, shuffle=False, verbose=0).history["loss"][-1]

    return epoch


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


def test_bench_backend_over_bare_loop(benchmark, bench):
    settings, data, _, keras_loop = bench
    bare = _bare_fit(settings, data)
    bare()
    keras_loop.train_epoch(1, 1e-3)  # both traced and warm before timing
    seconds = {"backend": [], "bare": []}

    def timed(name, run):
        start = time.perf_counter()
        run()
        seconds[name].append(time.perf_counter() - start)

    def round_pair():  # alternate, so load from other processes hits both alike
        timed("backend", lambda: keras_loop.train_epoch(2, 1e-3).losses)
        timed("bare", bare)

    benchmark.pedantic(round_pair, rounds=3, iterations=1)
    images = BATCH * STEPS
    backend_rate = images / float(np.median(seconds["backend"]))
    bare_rate = images / float(np.median(seconds["bare"]))
    benchmark.extra_info.update(
        arch=ARCH,
        image_size=64,
        batch=BATCH,
        steps=STEPS,
        backend_images_per_s=backend_rate,
        bare_images_per_s=bare_rate,
        backend_over_bare=backend_rate / bare_rate,
    )
    assert len(seconds["backend"]) == len(seconds["bare"]) == 3
