"""The GPUs a run uses, resolved once and the way CUDA resolves them, so that the ``--gpus`` check, the monitor and
the report all mean the same devices.

NVML numbers GPUs in PCI bus order and ignores ``CUDA_VISIBLE_DEVICES``; CUDA numbers them fastest first unless
``CUDA_DEVICE_ORDER=PCI_BUS_ID``. Workers run with that order (:data:`WORKER_ENV`), so a worker's CUDA device ``i``
is entry ``i`` of :func:`visible` over NVML's list, and a 1-GPU run on an 8-GPU node watches one GPU, not eight.
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

#: Set in every worker's environment: CUDA then numbers GPUs as NVML does.
WORKER_ENV = {"CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
VISIBLE_VARIABLE = "CUDA_VISIBLE_DEVICES"


@dataclass(frozen=True)
class Gpu:
    """One physical GPU as NVML (or, without NVML, the device nodes) lists it."""

    nvml_index: int  #: position in PCI bus order
    name: str
    uuid: str | None = None  #: "GPU-..." (None when NVML could not say)
    memory_total_mib: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _entry_matches(entry: str, gpu: Gpu) -> bool:
    if entry.isdigit():
        return int(entry) == gpu.nvml_index
    return gpu.uuid is not None and gpu.uuid.startswith(entry if entry.startswith("GPU-") else f"GPU-{entry}")


def visible(gpus: Sequence[Gpu], spec: str | None) -> list[Gpu]:
    """The GPUs CUDA shows for ``CUDA_VISIBLE_DEVICES=spec``, in CUDA's order (the order of ``spec``).

    ``None`` (unset) shows every GPU; ``""`` none. Entries are PCI-order indices or UUIDs (``GPU-...``, a unique
    prefix is enough). As in CUDA, the list ends at the first entry that names no GPU, names several, or repeats
    one (so ``0,abc,1`` shows only GPU 0); MIG instance UUIDs (``MIG-...``) are not resolved and end the list too.
    """
    if spec is None:
        return list(gpus)
    shown: list[Gpu] = []
    for entry in (part.strip() for part in spec.split(",")):
        matches = [gpu for gpu in gpus if entry and _entry_matches(entry, gpu)]
        if len(matches) != 1 or matches[0] in shown:
            break
        shown.append(matches[0])
    return shown


def used_by_run(shown: Sequence[Gpu], requested: int) -> list[Gpu]:
    """The GPUs ``run.gpus = requested`` trains on: 0 means the first visible GPU if there is one, N the first N."""
    return list(shown[: max(requested, 1)])


def text(value: Any) -> str:
    """An NVML string as ``str`` (older pynvml releases return bytes)."""
    return value.decode() if isinstance(value, bytes) else str(value)


def guarded(read, default=None):
    try:
        return read()
    except Exception:  # pynvml raises NVMLError_* subclasses, MIG devices refuse some queries
        return default


def nvml_gpus(nvml) -> list[Gpu]:
    """Every GPU NVML lists (after ``nvmlInit``), each field read on its own so one refusal costs only that field."""
    gpus = []
    for index in range(nvml.nvmlDeviceGetCount()):
        handle = guarded(lambda index=index: nvml.nvmlDeviceGetHandleByIndex(index))
        if handle is None:
            gpus.append(Gpu(index, "unreadable GPU (NVML refused its handle)"))
            continue
        memory = guarded(lambda handle=handle: nvml.nvmlDeviceGetMemoryInfo(handle).total // 2**20)
        gpus.append(
            Gpu(
                nvml_index=index,
                name=guarded(lambda handle=handle: text(nvml.nvmlDeviceGetName(handle)), "unknown GPU"),
                uuid=guarded(lambda handle=handle: text(nvml.nvmlDeviceGetUUID(handle))),
                memory_total_mib=memory,
            )
        )
    return gpus


def device_node_gpus(pattern: str = "/dev/nvidia[0-9]*") -> list[Gpu]:
    """Without NVML (a container with CUDA but no NVML library), the driver's device nodes still count the GPUs."""
    names = (re.fullmatch(r"nvidia(\d+)", os.path.basename(path)) for path in glob.glob(pattern))
    return [Gpu(n, "NVIDIA GPU (device node; NVML unavailable)") for n in sorted(int(m[1]) for m in names if m)]


def visible_spec() -> str | None:
    return os.environ.get(VISIBLE_VARIABLE)
