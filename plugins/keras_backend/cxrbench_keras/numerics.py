"""Numerics and runtime options for TensorFlow/Keras: applied once, before TF initialises, and recorded.

Threads and GPU memory growth can only be set before TensorFlow creates its runtime; when it already
exists (a second model in the same process) the values in force are read back and recorded instead,
so the result never claims a setting that was not applied.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any

import keras
import tensorflow as tf

from cxrbench.backend import numerics_record, out_of_memory_as_error, require_framework_gpus, thread_budget
from cxrbench_keras import determinism

#: settings.numerics.precision -> Keras dtype policy.
POLICIES = {"fp32": "float32", "bf16": "mixed_bfloat16", "fp16": "mixed_float16"}


def configure_runtime(settings) -> None:
    """Apply the core's thread budget, GPU visibility, memory growth, TF32 and the precision policy."""
    numerics = settings.numerics
    threading = tf.config.threading
    budget = thread_budget(numerics)
    _try_before_init(threading.set_intra_op_parallelism_threads, budget["intra_op"])
    _try_before_init(threading.set_inter_op_parallelism_threads, budget["inter_op"])
    gpus = tf.config.list_physical_devices("GPU")
    require_framework_gpus("TensorFlow", len(gpus), settings.run.gpus)  # never a quiet fall back to the CPU
    wanted = settings.run.gpus or min(len(gpus), 1)
    _try_before_init(tf.config.set_visible_devices, gpus[:wanted], "GPU")
    for gpu in gpus[:wanted]:
        _try_before_init(tf.config.experimental.set_memory_growth, gpu, numerics.memory_growth)
    tf.config.experimental.enable_tensor_float_32_execution(numerics.tf32)
    keras.config.set_dtype_policy(POLICIES[numerics.precision])


def _try_before_init(setter, *args) -> None:
    """Call a setter that TF refuses once its runtime exists (``describe`` records what holds)."""
    try:
        setter(*args)
    except RuntimeError:
        pass


def describe(settings, network: keras.Model, strategy, optimizer, learning_rate: float) -> dict[str, Any]:
    """The core's numerics record of a training run, read back from TensorFlow and Keras where they hold it."""
    numerics, replicas = settings.numerics, strategy.num_replicas_in_sync
    policy = keras.config.dtype_policy()
    default = isinstance(strategy, type(tf.distribute.get_strategy()))
    batchnorms = [layer for layer in network.layers if isinstance(layer, keras.layers.BatchNormalization)]
    gpus = tf.config.get_visible_devices("GPU")
    synchronized = bool(batchnorms) and all(layer.synchronized for layer in batchnorms)
    return numerics_record.build(
        "keras",
        device=device_name(),
        devices=[device_name()] if default else list(strategy.extended.worker_devices),
        world_size=replicas,
        nodes=settings.run.nodes,
        data_parallel="none" if default else type(strategy).__name__,
        batch_size_per_device=settings.train.batch_size,
        global_batch=settings.train.batch_size * replicas,
        learning_rate=learning_rate,
        lr_scaling=settings.train.lr_scaling,
        precision=numerics.precision,
        compute_dtype=policy.compute_dtype,
        loss_scaling=isinstance(optimizer, keras.optimizers.LossScaleOptimizer),
        tf32=tf.config.experimental.tensor_float_32_execution_enabled(),
        layout="NHWC",
        compile="tf.function + XLA (jit_compile)" if numerics.jit_compile else "tf.function",
        synchronized_batchnorm=synchronized,
        batchnorm_sync="global" if synchronized else "none",
        intra_op_threads=tf.config.threading.get_intra_op_parallelism_threads(),
        inter_op_threads=tf.config.threading.get_inter_op_parallelism_threads(),
        thread_budget=thread_budget(numerics),
        deterministic=determinism.op_determinism(),
        input_pipeline="tf.data.Dataset.from_generator(PreparedData.batches) + prefetch(AUTOTUNE)",
        versions={"tensorflow": tf.__version__, "keras": keras.__version__},
        framework={
            "dtype_policy": policy.name,
            "memory_growth": [tf.config.experimental.get_memory_growth(gpu) for gpu in gpus],
            "strategy": type(strategy).__name__,
            "optimizer": "Adam, PyTorch update rule (eps outside the bias-corrected sqrt, L2 weight decay)",
            "batchnorm": "epsilon 1e-5, momentum 0.9 (PyTorch 0.1), unbiased running variance",
            **determinism.describe(),
        },
    )


def device_name() -> str:
    """The device a single replica runs on: the first visible GPU (with its model), else the CPU."""
    gpus = tf.config.get_visible_devices("GPU")
    if not gpus:
        return tf.config.list_logical_devices("CPU")[0].name
    model = tf.config.experimental.get_device_details(gpus[0]).get("device_name")
    return f"{tf.config.list_logical_devices('GPU')[0].name} ({model})" if model else gpus[0].name


@contextmanager
def peak_memory():
    """TensorFlow's own peak allocation over the block, the largest over the visible GPUs (NVML's figure adds the
    allocator's reserve), filled into the yielded dict; empty without a GPU."""
    found: dict = {}
    gpus = [f"GPU:{i}" for i in range(len(tf.config.get_visible_devices("GPU")))]
    for gpu in gpus:
        tf.config.experimental.reset_memory_stats(gpu)
    yield found
    if gpus:
        peak = max(tf.config.experimental.get_memory_info(gpu)["peak"] for gpu in gpus)
        found.update(mib=peak / 2**20, source="tf.config.experimental.get_memory_info (peak)")


@contextmanager
def ieee_float32():
    """No TF32 inside, whatever ``numerics.tf32`` set (TensorFlow's switch is process-wide); restored after."""
    previous = tf.config.experimental.tensor_float_32_execution_enabled()
    tf.config.experimental.enable_tensor_float_32_execution(False)
    try:
        yield
    finally:
        tf.config.experimental.enable_tensor_float_32_execution(previous)


@contextmanager
def float32_policy():
    """Build float32 layers whatever the global policy (ONNX export needs a float32 network)."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("float32")
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def oom_as_backend_error(batch_size: int, doing: str):
    """TensorFlow's out-of-memory exception as the core's one-line error naming the batch size."""
    return out_of_memory_as_error(tf.errors.ResourceExhaustedError, device_name(), batch_size, doing)
