"""Devices and numerics: which device, which precision, which speed switches, and a record of them.

Every switch that changes the numbers or the speed is applied in one place (:func:`apply`) and read
back from torch in :func:`describe`, so the result records what was really in force rather than
what was asked for.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from cxrbench.backend import (
    BackendError,
    NumericsSettings,
    Settings,
    batchnorm_scope,
    numerics_record,
    out_of_memory_as_error,
    require_framework_gpus,
    thread_budget,
)
from cxrbench_pytorch import determinism

AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def select_device(settings: Settings) -> torch.device:
    """run.gpus = 0: the first GPU when there is one, else the CPU; N >= 1: exactly N GPUs must exist. A GPU this
    process was given but torch cannot see is an error, never a quiet fall back to the CPU."""
    available = torch.cuda.device_count()
    require_framework_gpus("torch", available, settings.run.gpus)
    # A rank torchrun started has chosen its GPU (torch.cuda.set_device); otherwise that is GPU 0.
    return torch.device("cuda", torch.cuda.current_device()) if available else torch.device("cpu")


def _processes() -> int:
    """Ranks sharing this machine's cores: the ranks torchrun started here, else the process group's size once one
    is initialised (ranks spawned on this machine)."""
    if "LOCAL_WORLD_SIZE" in os.environ:
        return int(os.environ["LOCAL_WORLD_SIZE"])
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def apply(numerics: NumericsSettings) -> None:
    """Set torch's process-wide switches: the core's thread budget, TF32 and cuDNN autotuning."""
    budget = thread_budget(numerics, _processes())
    torch.set_num_threads(budget["intra_op"])
    _set_interop_threads(budget["inter_op"], requested=bool(numerics.inter_op_threads))
    # The fp32_precision API only: torch 2.9+ refuses to mix it with the legacy allow_tf32 flags.
    precision = "tf32" if numerics.tf32 else "ieee"
    torch.backends.cuda.matmul.fp32_precision = precision
    torch.backends.cudnn.conv.fp32_precision = precision
    torch.backends.cudnn.benchmark = numerics.cudnn_benchmark


def _set_interop_threads(threads: int, requested: bool) -> None:
    """torch allows this once, before any inter-op work: fail clearly when a requested count comes too late.

    The default budget is best effort (a second model in one process): ``describe`` records what runs.
    """
    if torch.get_num_interop_threads() == threads:
        return
    try:
        torch.set_num_interop_threads(threads)
    except RuntimeError:
        if not requested:
            return
        raise BackendError(
            f"numerics.inter_op_threads = {threads} cannot be applied: torch's inter-op pool already runs "
            f"{torch.get_num_interop_threads()} threads in this process (set it before any torch work)"
        ) from None


@contextlib.contextmanager
def ieee_float32():
    """IEEE float32 matmuls and convolutions inside, whatever ``numerics.tf32`` set; the previous state after.

    Prediction, CAMs and the equivalence and ONNX checks promise the float32 function of the weights: with TF32
    left on (process-wide) they would differ by ~1e-3 on Ampere and newer GPUs. One API (fp32_precision) only.
    """
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    previous = matmul.fp32_precision, conv.fp32_precision
    matmul.fp32_precision = conv.fp32_precision = "ieee"
    try:
        yield
    finally:
        matmul.fp32_precision, conv.fp32_precision = previous


def autocast(device: torch.device, precision: str):
    """The autocast region for ``precision``; fp32 runs without autocast."""
    dtype = AUTOCAST_DTYPES[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """Loss scaling for fp16 only (bf16 has fp32's range and needs none)."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def oom_as_backend_error(device: torch.device, batch_size: int, doing: str):
    """torch's out-of-memory exception as the core's one-line error naming the batch size."""
    return out_of_memory_as_error(torch.OutOfMemoryError, device_name(device), batch_size, doing)


@contextlib.contextmanager
def peak_memory(device: torch.device):
    """The framework's own peak allocation on ``device`` over the block (NVML's figure adds its caches and context),
    filled into the yielded dict; empty on the CPU."""
    found: dict[str, Any] = {}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    yield found
    if device.type == "cuda":
        found.update(mib=torch.cuda.max_memory_allocated(device) / 2**20, source="torch.cuda.max_memory_allocated")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def describe(
    settings: Settings,
    net: nn.Module,
    device: torch.device,
    world: int,
    learning_rate: float,
    *,
    scaler: torch.amp.GradScaler,
    compiled: bool,
    loader: str,
    optimizer: torch.optim.Optimizer,
    data_parallel: str = "none",
    batchnorm: str = "torch.nn.BatchNorm2d",
) -> dict[str, Any]:
    """The core's numerics record of a training run, read back from torch where torch holds it."""
    numerics = settings.numerics
    dtype = AUTOCAST_DTYPES[numerics.precision]
    cudnn = torch.backends.cudnn
    scope = batchnorm_scope(settings, world)
    synchronized = scope == "global" and not any(type(module) is nn.BatchNorm2d for module in net.modules())
    per_node = max(1, world // settings.run.nodes)  # a node's ranks drive its GPUs 0..per_node-1
    devices = (
        [device_name(torch.device(device.type, rank % per_node)) for rank in range(world)]
        if device.type == "cuda"
        else [device_name(device)] * world
    )
    return numerics_record.build(
        "pytorch",
        device=device_name(device),
        devices=devices,
        world_size=world,
        nodes=settings.run.nodes,
        data_parallel=data_parallel,
        batch_size_per_device=settings.train.batch_size,
        global_batch=settings.train.batch_size * world,
        learning_rate=learning_rate,
        lr_scaling=settings.train.lr_scaling,
        precision=numerics.precision,
        compute_dtype=str(dtype or torch.get_default_dtype()).removeprefix("torch."),
        loss_scaling=scaler.is_enabled(),
        tf32=torch.backends.cuda.matmul.fp32_precision == "tf32",
        layout="NHWC (torch.channels_last)" if numerics.channels_last else "NCHW",
        compile="torch.compile" if compiled else "eager",
        synchronized_batchnorm=synchronized,
        batchnorm_sync=scope,
        intra_op_threads=torch.get_num_threads(),
        inter_op_threads=torch.get_num_interop_threads(),
        thread_budget=thread_budget(numerics, world),
        deterministic=torch.are_deterministic_algorithms_enabled(),
        input_pipeline=loader,
        versions={
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "cudnn": cudnn.version() if cudnn.is_available() else None,
        },
        framework={
            "autocast_dtype": str(dtype).removeprefix("torch.") if dtype else None,
            "matmul_fp32_precision": torch.backends.cuda.matmul.fp32_precision,
            "cudnn_conv_fp32_precision": cudnn.conv.fp32_precision,
            "cudnn_benchmark": cudnn.benchmark,
            "batchnorm": batchnorm,
            "adam": "fused" if optimizer.defaults.get("fused") else "foreach" if device.type == "cuda" else "for-loop",
            **determinism.describe(),
        },
    )
