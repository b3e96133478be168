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
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cxrbench.budget import thread_budget
from cxrbench.errors import BackendError, first_line
from cxrbench.suite import Settings

AXIS = "data"
#: XLA's switch for run-to-run identical GPU reductions (read when the GPU client starts).
DETERMINISTIC_FLAG = "--xla_gpu_deterministic_ops=true"


def configure(settings: Settings) -> None:
    """Refuse what this backend cannot do; set XLA's switches before its GPU client starts (they are read then).

    * ``numerics.tf32 = false`` (the default) pins float32 matmuls and convolutions to full float32: XLA's
      default precision on recent NVIDIA GPUs is TF32, which alone breaks the 1e-4 cross-backend equivalence.
    * ``numerics.memory_growth`` maps to ``XLA_PYTHON_CLIENT_PREALLOCATE=false``: JAX otherwise reserves 75 % of
      the GPU's memory at start, which the monitor would report as used.
    * ``numerics.deterministic`` adds ``--xla_gpu_deterministic_ops=true`` to ``XLA_FLAGS``.
    """
    numerics = settings.numerics
    if numerics.precision != "fp32":
        raise BackendError(f"numerics.precision = {numerics.precision!r}: the jax backend computes in fp32 only")
    jax.config.update("jax_default_matmul_precision", "tensorfloat32" if numerics.tf32 else "highest")
    if numerics.memory_growth:
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    flags = os.environ.get("XLA_FLAGS", "")
    if numerics.deterministic and DETERMINISTIC_FLAG not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {DETERMINISTIC_FLAG}".strip()


def select_devices(settings: Settings) -> list[jax.Device]:
    """run.gpus = N > 1: exactly N GPUs; N = 1: one GPU; 0: the first GPU, else every local CPU device
    (one unless XLA was told to force more)."""
    wanted = settings.run.gpus
    gpus = _gpus()
    if wanted > len(gpus):
        raise BackendError(
            f"run.gpus = {wanted}, but jax sees {len(gpus)} GPU(s) (install jax[cuda12] for NVIDIA GPUs)"
        )
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
def out_of_memory_as_error(batch_size: int, doing: str):
    """XLA's RESOURCE_EXHAUSTED as a one-line error naming the batch size."""
    try:
        yield
    except jax.errors.JaxRuntimeError as exc:
        if "RESOURCE_EXHAUSTED" not in str(exc):
            raise
        raise BackendError(
            f"out of device memory while {doing} at batch size {batch_size} (train.batch_size): "
            f"lower the batch size or the image size ({first_line(exc)})"
        ) from None


def device_name(device: jax.Device) -> str:
    return f"{device.platform}:{device.id} ({device.device_kind})"


def describe(settings: Settings, devices: list[jax.Device], learning_rate: float, **extra: Any) -> dict[str, Any]:
    """Every numerics and speed setting in force, with pytorch's key names where they mean the same."""
    world = len(devices)
    return {
        "device": device_name(devices[0]),
        "devices": [device_name(d) for d in devices],
        "world_size": world,
        "batch_size_per_device": settings.train.batch_size,
        "global_batch": settings.train.batch_size * world,
        "learning_rate": learning_rate,
        "lr_scaling": settings.train.lr_scaling,
        "precision": settings.numerics.precision,
        "tf32": settings.numerics.tf32,
        "matmul_precision": str(jax.config.jax_default_matmul_precision or "default"),
        "gpu_preallocate": os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE", "true") != "false",
        "deterministic": settings.numerics.deterministic,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "data_parallel": "jax.sharding (GSPMD): batch sharded, weights replicated" if world > 1 else "none",
        "thread_budget": thread_budget(settings.numerics),
        "threads_applied": False,  # XLA sizes its CPU pool itself; recorded, not claimed
        "jax": jax.__version__,
        "jaxlib": importlib.metadata.version("jaxlib"),
        "flax": importlib.metadata.version("flax"),
        "optax": importlib.metadata.version("optax"),
        **extra,
    }
