"""Numerics and runtime options for TensorFlow/Keras: applied once, before TF initialises, and recorded.

Threads and GPU memory growth can only be set before TensorFlow creates its runtime; when it already
exists (a second model in the same process) the values in force are read back and recorded instead,
so the result never claims a setting that was not applied.
"""

from __future__ import annotations

from contextlib import contextmanager

import keras
import tensorflow as tf

from cxrbench.budget import thread_budget
from cxrbench.errors import BackendError

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
    wanted = settings.run.gpus or min(len(gpus), 1)
    if wanted > len(gpus):
        raise BackendError(f"run.gpus = {settings.run.gpus} but TensorFlow sees {len(gpus)} GPU(s)")
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


def describe(settings, strategy, global_batch: int, learning_rate: float) -> dict:
    """Every numerics/speed setting actually in force, for the result record."""
    gpus = tf.config.get_visible_devices("GPU")
    return {
        "precision": settings.numerics.precision,
        "dtype_policy": keras.config.dtype_policy().name,
        "loss_scaling": settings.numerics.precision == "fp16",
        "tf32": tf.config.experimental.tensor_float_32_execution_enabled(),
        "jit_compile": settings.numerics.jit_compile,
        "graph": "tf.function",
        "layout": "NHWC (channels_last is Keras' native layout)",
        "memory_growth": [tf.config.experimental.get_memory_growth(g) for g in gpus],
        "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
        "inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads(),
        "thread_budget": thread_budget(settings.numerics),
        "input_pipeline": "tf.data.Dataset.from_generator(PreparedData.batches) + prefetch(AUTOTUNE)",
        "devices": [d.name for d in gpus] or ["/cpu:0"],
        "strategy": type(strategy).__name__,
        "world_size": strategy.num_replicas_in_sync,
        "synchronized_batchnorm": strategy.num_replicas_in_sync > 1,
        "per_replica_batch": settings.train.batch_size,
        "global_batch": global_batch,
        "learning_rate": learning_rate,
        "optimizer": "Adam, PyTorch update rule (eps outside the bias-corrected sqrt, L2 weight decay)",
        "batchnorm": "epsilon 1e-5, momentum 0.9 (PyTorch 0.1), unbiased running variance",
    }


@contextmanager
def float32_policy():
    """Build float32 layers whatever the global policy (ONNX export needs a float32 network)."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("float32")
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


@contextmanager
def oom_as_backend_error(batch_size: int, what: str):
    """Turn TensorFlow's out-of-memory error into a one-line error naming the batch size."""
    try:
        yield
    except tf.errors.ResourceExhaustedError as exc:
        first = (exc.message or "").strip().splitlines()[:1]
        raise BackendError(
            f"out of device memory while {what} at batch size {batch_size} (train.batch_size): "
            f"lower the batch size or the image size ({first[0] if first else 'ResourceExhaustedError'})"
        ) from None
