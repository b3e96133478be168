"""Devices and numerics for JAX: which devices, the data-parallel mesh, out-of-memory errors, and the record.

Data parallelism is one ``jax.sharding.Mesh`` over the local devices with the batch axis sharded and the weights
replicated: XLA partitions the jitted step (GSPMD), so BatchNorm statistics and gradients are reduced over the
global batch and every replica keeps identical weights. It is used with ``run.gpus > 1``, and on a CPU when
several host devices are forced (``XLA_FLAGS=--xla_force_host_platform_device_count=N``).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
from collections.abc import Iterator
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cxrbench.backend import (
    Settings,
    UnsupportedSetting,
    batchnorm_scope,
    numerics_record,
    out_of_memory,
    require_framework_gpus,
    thread_budget,
)

AXIS = "data"
#: XLA's switch for run-to-run identical GPU reductions (read when the GPU client starts).
DETERMINISTIC_FLAG = "--xla_gpu_deterministic_ops=true"
#: Prediction and CAMs compute the IEEE float32 function whatever ``numerics.tf32`` says (devices-and-numerics.md).
INFERENCE_PRECISION = "highest"
#: Precisions under which XLA keeps float32 matmuls and convolutions in float32 on GPUs.
IEEE_PRECISIONS = ("highest", "float32")


def configure(settings: Settings) -> None:
    """Refuse what this backend cannot do; set XLA's switches before its GPU client starts (they are read then).

    * ``numerics.memory_growth`` maps to ``XLA_PYTHON_CLIENT_PREALLOCATE=false``: JAX otherwise reserves 75 % of
      the GPU's memory at start, which the monitor would report as used.
    * ``numerics.deterministic`` adds ``--xla_gpu_deterministic_ops=true`` to ``XLA_FLAGS``.

    ``numerics.tf32`` is no global switch here: :func:`training_precision` is in force while training, and
    :data:`INFERENCE_PRECISION` around prediction and CAMs.
    """
    numerics = settings.numerics
    if numerics.precision != "fp32":
        raise UnsupportedSetting(f"numerics.precision = {numerics.precision!r}: the jax backend computes in fp32 only")
    for option in ("intra_op_threads", "inter_op_threads"):
        if getattr(numerics, option):  # 0: the core's budget, which XLA's own sizing matches on a dedicated machine
            raise UnsupportedSetting(
                f"numerics.{option} = {getattr(numerics, option)}: XLA sizes its CPU thread pools "
                "itself and jax offers no setting for them; leave it at 0"
            )
    if numerics.memory_growth:
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    flags = os.environ.get("XLA_FLAGS", "")
    if numerics.deterministic and DETERMINISTIC_FLAG not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {DETERMINISTIC_FLAG}".strip()


def training_precision(settings: Settings) -> str:
    """``jax.default_matmul_precision`` for training: TF32 only when ``numerics.tf32`` asks for it (XLA's default
    on recent NVIDIA GPUs is TF32, which alone breaks the 1e-4 cross-backend equivalence)."""
    return "tensorfloat32" if settings.numerics.tf32 else INFERENCE_PRECISION


def matmul_precision() -> str:
    """The matmul precision in force now, read back from JAX's config."""
    return str(jax.config.jax_default_matmul_precision or "default")


def select_devices(settings: Settings) -> list[jax.Device]:
    """run.gpus = N > 1: exactly N GPUs; N = 1: one GPU; 0: the first GPU, else every local CPU device
    (one unless XLA was told to force more)."""
    wanted = settings.run.gpus
    gpus = _gpus()
    require_framework_gpus("jax", len(gpus), wanted)  # a GPU given but unseen (CPU-only jaxlib) stops here
    if wanted:
        return gpus[:wanted]
    return gpus[:1] if gpus else jax.local_devices(backend="cpu")


def _gpus() -> list[jax.Device]:
    try:
        return jax.local_devices(backend="gpu")
    except RuntimeError:  # no GPU platform in this jaxlib
        return []


def mesh(devices: list[jax.Device]) -> Mesh:
    return Mesh(devices, (AXIS,))


def batch_sharding(devices: list[jax.Device]) -> NamedSharding:
    """The leading (batch) axis split over the devices."""
    return NamedSharding(mesh(devices), PartitionSpec(AXIS))


def replicated(devices: list[jax.Device]) -> NamedSharding:
    return NamedSharding(mesh(devices), PartitionSpec())


@contextlib.contextmanager
def oom_as_backend_error(device: jax.Device, batch_size: int, doing: str) -> Iterator[None]:
    """XLA's RESOURCE_EXHAUSTED as the core's one-line out-of-memory error. JAX has no exception type of its own
    for it (:func:`cxrbench.backend.out_of_memory_as_error` needs one), so the status code in the message decides."""
    try:
        yield
    except jax.errors.JaxRuntimeError as exc:
        if "RESOURCE_EXHAUSTED" not in str(exc):
            raise
        raise out_of_memory(device_name(device), batch_size, doing) from None


def peak_memory(device: jax.Device) -> dict[str, Any]:
    """XLA's allocator peak on ``device`` since the process started (it offers no reset; a worker process trains once,
    so this is training's peak unless an earlier stage needed more), empty where the device keeps no statistics
    (the CPU): the training hook's optional ``peak_memory``."""
    stats = device.memory_stats() or {}
    if "peak_bytes_in_use" not in stats:
        return {}
    return {"mib": stats["peak_bytes_in_use"] / 2**20, "source": "jax Device.memory_stats() peak_bytes_in_use"}


def device_name(device: jax.Device) -> str:
    return f"{device.platform}:{device.id} ({device.device_kind})"


def describe(
    settings: Settings, devices: list[jax.Device], learning_rate: float, variables: Any, **framework: Any
) -> dict[str, Any]:
    """The core's numerics record of a training run (call it inside the training precision: it is read back).

    XLA sizes its CPU thread pools itself from the schedulable CPUs; it exposes no setting, so the record gives
    the intra-op pool's size as XLA computes it, no inter-op count, and ``threads_applied = False``.
    """
    world = len(devices)
    precision = matmul_precision()
    dtypes = sorted({str(leaf.dtype) for leaf in jax.tree.leaves(variables["params"])})
    return numerics_record.build(
        "jax",
        device=device_name(devices[0]),
        devices=[device_name(d) for d in devices],
        world_size=world,
        nodes=settings.run.nodes,
        data_parallel="jax.sharding (GSPMD): batch sharded, weights replicated" if world > 1 else "none",
        batch_size_per_device=settings.train.batch_size,
        global_batch=settings.train.batch_size * world,
        learning_rate=learning_rate,
        lr_scaling=settings.train.lr_scaling,
        precision=settings.numerics.precision,
        compute_dtype=", ".join(dtypes),
        loss_scaling=False,  # fp32 only: nothing to scale
        tf32=precision not in IEEE_PRECISIONS,
        layout="NHWC",
        compile="jax.jit (XLA)",
        # the sharded step reduces the statistics over the global batch, or over each machine's part of it
        synchronized_batchnorm=batchnorm_scope(settings, world) == "global",
        batchnorm_sync=batchnorm_scope(settings, world),
        intra_op_threads=len(os.sched_getaffinity(0)),
        inter_op_threads=None,
        thread_budget=thread_budget(settings.numerics),
        deterministic=DETERMINISTIC_FLAG in os.environ.get("XLA_FLAGS", ""),
        input_pipeline="plain iteration (jax.device_put)",
        versions={name: importlib.metadata.version(name) for name in ("jax", "jaxlib", "flax", "optax")},
        framework={
            "matmul_precision": precision,
            "gpu_preallocate": os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE", "true") != "false",
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "threads_applied": False,
            **framework,
        },
    )
