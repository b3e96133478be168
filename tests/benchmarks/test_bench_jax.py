"""JAX backend speed: a train step, inference and compile time.

DenseNet-121, 64 px, batch 16, like the PyTorch and Keras benchmarks. XLA sizes its CPU thread pool itself (no
per-process switch as torch's set_num_threads), so on a shared runner these figures move with other load.

* ``test_bench_compile``: seconds to lower and compile the backend's train step (AOT), its own figure: XLA
  compiles before the first step, where PyTorch starts at once, and a per-step figure must not hide it. XLA's
  persistent compilation cache (``JAX_COMPILATION_CACHE_DIR``, which the test session sets) is off while it is
  timed, so the figure is a real compile; ``test_bench_train_step`` then times the step it compiled last (one
  module-scoped loop), and inference may load its program from that cache.
* the backend against a plain jitted loop is the shared harness-overhead benchmark (test_bench_overhead.py).

Timings go to ``extra_info``, never into assertions. Run:
``python -m pytest tests/benchmarks/test_bench_jax.py --benchmark-only -q``.
"""

from __future__ import annotations

from contextlib import contextmanager

import pytest

from helpers.backends import require

pytestmark = [require("jax"), pytest.mark.slow]

import jax
import jax.numpy as jnp
from jax.experimental.compilation_cache import compilation_cache

import cxrbench_jax as backend
from cxrbench.backend.canonical import init_canonical
from cxrbench.backend.recorder import Recorder
from cxrbench.data.classes import NUM_CLASSES
from cxrbench.testing.conformance import kit_settings, random_images, synthetic_data
from cxrbench_jax import loop

SIZE, BATCH, STEPS, ROUNDS = 64, 16, 2, 3
DENSENET121 = (6, 12, 24, 16)


@pytest.fixture(scope="module")
def weights():
    return init_canonical(DENSENET121, seed=0)


def settings_for(**dotted):
    return kit_settings(
        SIZE,
        **{
            "model.arch": "densenet121",
            "train.batch_size": BATCH,
            "train.max_steps": STEPS,
            "train.hflip": True,
            **dotted,
        },
    )


@pytest.fixture(scope="module")
def epoch_loop(weights) -> loop.JaxEpochLoop:
    """The backend's training loop, compiled once for the module: the compile benchmark's last compile is the step
    the train-step benchmark times (a DenseNet-121 compile is about 30 s on 2 CPU cores)."""
    settings = settings_for()
    model = backend.cxrbench_build_model(settings=settings, weights=weights)
    data = synthetic_data(SIZE, train=BATCH * STEPS, val=BATCH)
    return loop.JaxEpochLoop(model, data, settings, Recorder())


def first_batch(epoch_loop: loop.JaxEpochLoop):
    return epoch_loop.device_batch(next(iter(epoch_loop.data.batches("train", BATCH))))


@contextmanager
def persistent_cache_off():
    """XLA's persistent compilation cache set aside: what is compiled inside is compiled, never loaded from disk."""
    previous = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()  # the cache decides once per process whether it is used: ask again
    try:
        yield
    finally:
        jax.config.update("jax_enable_compilation_cache", previous)
        compilation_cache.reset_cache()


def test_bench_compile(benchmark, epoch_loop):
    images, labels = first_batch(epoch_loop)

    def compile_fresh():
        epoch_loop.compiled = None
        epoch_loop.step_fn = jax.jit(
            loop.make_train_step(epoch_loop.model.network, epoch_loop.optimizer), donate_argnums=0
        )
        epoch_loop.compile(images, labels, jnp.float32(1e-3))
        return epoch_loop.compile_s

    with persistent_cache_off():
        compile_s = benchmark.pedantic(compile_fresh, rounds=2, warmup_rounds=0)
    benchmark.extra_info.update(size_px=SIZE, batch=BATCH, compile_s=round(compile_s, 2), device=str(jax.devices()[0]))


def test_bench_train_step(benchmark, epoch_loop):
    images, labels = first_batch(epoch_loop)
    rate = jnp.float32(1e-3)
    step = epoch_loop.compile(images, labels, rate)  # already compiled when the compile benchmark ran first

    def one_step():
        epoch_loop.state, loss = step(epoch_loop.state, images, labels, rate)
        loss.block_until_ready()

    benchmark.pedantic(one_step, rounds=ROUNDS * STEPS, warmup_rounds=1)
    benchmark.extra_info.update(size_px=SIZE, batch=BATCH, images_per_s=round(BATCH / benchmark.stats.stats.mean, 1))


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
        size_px=SIZE, batch=BATCH, images_per_s=round(len(images) / benchmark.stats.stats.mean, 1)
    )
