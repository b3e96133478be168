"""JAX backend speed: a train step, inference, compile time, and the backend's overhead over a bare jitted loop.

DenseNet-121, 64 px, batch 16, like the PyTorch and Keras benchmarks. XLA sizes its CPU thread pool itself (no
per-process switch as torch's set_num_threads), so on a shared runner these figures move with other load.

* ``test_bench_compile``: seconds to lower and compile the backend's train step (AOT), its own figure: XLA
  compiles before the first step, where PyTorch starts at once, and a per-step figure must not hide it. XLA's
  persistent compilation cache (``JAX_COMPILATION_CACHE_DIR``, which the test session sets) is off while it is
  timed, so the figure is a real compile; the other benchmarks may load their compiled step from that cache.
* ``test_bench_epoch_against_a_bare_loop`` alternates a backend epoch (the core's batches from uint8 memory,
  on-device normalisation, per-step losses kept on the device, recorder calls) with a bare jitted loop of the same
  Flax model over normalised arrays already on the device, on the same weights, and records ``bare / backend``
  throughput (target >= 0.95) by wall time and by this process's CPU time. Both are compiled before timing.

Timings go to ``extra_info``, never into assertions. Run:
``python -m pytest tests/benchmarks/test_bench_jax.py --benchmark-only -q``.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import pytest

from helpers.backends import require

pytestmark = [require("jax"), pytest.mark.slow]

import jax
import jax.numpy as jnp
import optax
from jax.experimental.compilation_cache import compilation_cache

import cxrbench_jax as backend
from cxrbench.backend.canonical import init_canonical
from cxrbench.backend.recorder import Recorder
from cxrbench.data.classes import NUM_CLASSES
from cxrbench.deploy.onnx_file import normalise
from cxrbench.testing.conformance import kit_settings, random_images, synthetic_data
from cxrbench_jax import loop
from cxrbench_jax.network import DenseNet

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


def backend_loop(weights) -> loop.JaxEpochLoop:
    settings = settings_for()
    model = backend.cxrbench_build_model(settings=settings, weights=weights)
    data = synthetic_data(SIZE, train=BATCH * STEPS, val=BATCH)
    return loop.JaxEpochLoop(model, data, settings, Recorder())


def bare_epoch(weights):
    """The minimal Flax idiom on normalised arrays already on the device: the speed limit, compiled up front."""
    network = DenseNet(DENSENET121)
    variables = backend.cxrbench_build_model(settings=settings_for(), weights=weights).variables
    optimizer = optax.adam(1e-3)

    def step(params, batch_stats, opt_state, x, y):
        def loss_fn(params):
            logits, updated = network.apply(
                {"params": params, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"]
            )
            return optax.sigmoid_binary_cross_entropy(logits, y).mean(), updated["batch_stats"]

        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), batch_stats, opt_state, loss

    jitted = jax.jit(step, donate_argnums=(0, 1, 2))
    batches = [
        (
            jnp.asarray(normalise(random_images(BATCH, SIZE, seed=s), "NHWC")),
            jax.random.bernoulli(jax.random.PRNGKey(s), 0.3, (BATCH, NUM_CLASSES)).astype(jnp.float32),
        )
        for s in range(STEPS)
    ]
    params, batch_stats = jax.tree.map(jnp.copy, (variables["params"], variables["batch_stats"]))
    state = [params, batch_stats, optimizer.init(params)]
    compiled = jitted.lower(*state, *batches[0]).compile()

    def epoch():
        for x, y in batches:
            state[:] = compiled(*state, x, y)[:3]
        jax.block_until_ready(state)

    return epoch


def seconds(fn) -> tuple[float, float]:
    """Wall and CPU seconds of ``fn()``."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


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


def test_bench_compile(benchmark, weights):
    epoch_loop = backend_loop(weights)
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


def test_bench_train_step(benchmark, weights):
    epoch_loop = backend_loop(weights)
    images, labels = first_batch(epoch_loop)
    rate = jnp.float32(1e-3)
    step = epoch_loop.compile(images, labels, rate)

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


def test_bench_epoch_against_a_bare_loop(benchmark, weights):
    epoch_loop, bare = backend_loop(weights), bare_epoch(weights)
    timings: dict[str, list[tuple[float, float]]] = {"backend": [], "bare": []}

    def both():
        timings["backend"].append(seconds(lambda: epoch_loop.train_epoch(1, 1e-3)))
        timings["bare"].append(seconds(bare))

    benchmark.pedantic(both, rounds=ROUNDS, warmup_rounds=1)  # the warm-up round compiles the backend's step
    (backend_wall, backend_cpu), (bare_wall, bare_cpu) = (
        [min(t[i] for t in timings[side]) for i in (0, 1)] for side in ("backend", "bare")
    )
    benchmark.extra_info.update(
        size_px=SIZE,
        batch=BATCH,
        steps=STEPS,
        backend_images_per_s=round(BATCH * STEPS / backend_wall, 1),
        bare_images_per_s=round(BATCH * STEPS / bare_wall, 1),
        throughput_ratio_wall=round(bare_wall / backend_wall, 3),
        throughput_ratio_cpu=round(bare_cpu / backend_cpu, 3),
    )
