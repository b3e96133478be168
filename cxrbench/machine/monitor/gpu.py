"""GPU readers: NVML (``nvidia-ml-py``) when it initialises, else GPUtil (which runs ``nvidia-smi``; optional: the
``cxrbench[gputil]`` extra, so a machine without it relies on NVML alone).

A reader watches only the GPUs the run uses (NVML indices from :mod:`cxrbench.machine.devices`) and returns one dict per
GPU with ``util`` (percent of time a kernel ran), ``mem_mib``, ``power_w``, ``temp_c`` and ``other_processes``
(compute processes outside the worker's tree, for the noise guard); a value the source cannot give is ``None``,
never 0. Every NVML call is guarded: a failed read (a MIG device refusing utilisation, a GPU fallen off the bus)
becomes ``None`` plus a ``read_error`` naming the call, and monitoring goes on. When neither source finds a GPU,
:func:`open_gpu_reader` says so and why, so results never show zeros that look like measurements.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from cxrbench.machine.devices import text

MIB = 2**20


class GpuReader(Protocol):
    source: str

    def read(self, own_pids: set[int] = frozenset()) -> list[dict[str, float | None]]: ...

    def close(self) -> None: ...


@dataclass
class GpuStatus:
    """What the monitor found, written into ``monitor.json``."""

    gpu_available: bool
    source: str  #: "nvml", "gputil" or "none"
    reason: str | None = None
    devices: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "gpu_available": self.gpu_available,
            "source": self.source,
            "reason": self.reason,
            "devices": self.devices,
        }


def _optional(read):
    """A reading some GPUs do not support (power on many consumer cards) becomes None."""
    try:
        return read()
    except Exception:  # pynvml raises NVMLError_NotSupported and relatives
        return None


class NvmlReader:
    source = "nvml"

    def __init__(self, pynvml, indices: Sequence[int]):
        self.nvml = pynvml
        self.indices = list(indices)
        self.handles = [_optional(lambda i=i: pynvml.nvmlDeviceGetHandleByIndex(i)) for i in self.indices]
        self.names = [
            _optional(lambda h=h: text(pynvml.nvmlDeviceGetName(h))) or f"GPU {i} (name unreadable)"
            for i, h in zip(self.indices, self.handles)
        ]

    def _others(self, handle, own_pids: set[int]) -> float | None:
        """Compute processes on the device that are not the worker's.

        In a container NVML reports host PIDs, which never match the worker's own: when none of the
        listed PIDs is the worker's, one of them is taken to be the worker.
        """
        processes = _optional(lambda: self.nvml.nvmlDeviceGetComputeRunningProcesses(handle))
        if processes is None:
            return None
        mine = sum(p.pid in own_pids for p in processes)
        return float(len(processes) - mine if mine else max(len(processes) - 1, 0))

    def _essential(self, handle, call: str, read) -> tuple[float | None, str | None]:
        """Utilisation and memory: a failure is recorded (``read_error``), never raised into the sampler thread."""
        if handle is None:
            return None, "nvmlDeviceGetHandleByIndex"
        try:
            return float(read(getattr(self.nvml, call)(handle))), None
        except Exception as exc:
            return None, f"{call}: {type(exc).__name__}"

    def _read_one(self, handle, own_pids: set[int]) -> dict[str, Any]:
        nvml = self.nvml
        util, util_error = self._essential(handle, "nvmlDeviceGetUtilizationRates", lambda rates: rates.gpu)
        memory, memory_error = self._essential(handle, "nvmlDeviceGetMemoryInfo", lambda info: info.used / MIB)
        row: dict[str, Any] = {
            "util": util,
            "mem_mib": memory,
            "power_w": _optional(lambda: nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0),
            "temp_c": _optional(lambda: float(nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU))),
            "other_processes": self._others(handle, own_pids) if handle is not None else None,
        }
        errors = [e for e in (util_error, memory_error) if e]
        if errors:
            row["read_error"] = "; ".join(dict.fromkeys(errors))
        return row

    def read(self, own_pids: set[int] = frozenset()) -> list[dict[str, Any]]:
        return [self._read_one(h, own_pids) for h in self.handles]

    def close(self) -> None:
        _optional(self.nvml.nvmlShutdown)


class GputilReader:
    """GPUtil parses ``nvidia-smi --query-gpu=...`` each call; it reports no power draw."""

    source = "gputil"

    def __init__(self, gputil, gpus, indices: Sequence[int]):
        self.gputil = gputil
        self.indices = list(indices)  # nvidia-smi's index is NVML's (PCI order)
        by_id = {g.id: g for g in gpus}
        self.names = [by_id[i].name if i in by_id else f"GPU {i} (not listed by nvidia-smi)" for i in self.indices]

    def read(self, own_pids: set[int] = frozenset()) -> list[dict[str, Any]]:
        try:
            by_id = {g.id: g for g in self.gputil.getGPUs()}
        except Exception as exc:  # nvidia-smi gone or unparsable this time: a gap, not the end of monitoring
            by_id, error = {}, f"nvidia-smi: {type(exc).__name__}"
        else:
            error = "nvidia-smi did not list this GPU"
        return [self._row(by_id.get(i), error) for i in self.indices]

    @staticmethod
    def _row(gpu, error: str) -> dict[str, Any]:
        if gpu is None:
            return {
                "util": None,
                "mem_mib": None,
                "power_w": None,
                "temp_c": None,
                "other_processes": None,
                "read_error": error,
            }
        return {
            "util": gpu.load * 100.0,
            "mem_mib": float(gpu.memoryUsed),
            "power_w": None,
            "temp_c": float(gpu.temperature),
            "other_processes": None,
        }

    def close(self) -> None:
        return None


def _watched(count: int, watch: Sequence[int] | None) -> list[int]:
    return list(range(count)) if watch is None else [i for i in watch if 0 <= i < count]


def _open_nvml(watch: Sequence[int] | None) -> tuple[NvmlReader | None, str]:
    try:
        import pynvml

        pynvml.nvmlInit()
        count = pynvml.nvmlDeviceGetCount()
    except Exception as exc:  # no library, no driver
        return None, f"NVML unavailable ({type(exc).__name__})"
    indices = _watched(count, watch)
    if indices:
        return NvmlReader(pynvml, indices), ""
    _optional(pynvml.nvmlShutdown)
    return None, "NVML found no GPU" if not count else f"none of NVML's {count} GPU(s) is used by this run"


def _open_gputil(watch: Sequence[int] | None) -> tuple[GputilReader | None, str]:
    try:
        import GPUtil
    except ImportError:
        return None, "GPUtil is not installed (the optional cxrbench[gputil] fallback)"
    try:
        gpus = GPUtil.getGPUs()
    except Exception as exc:  # nvidia-smi output GPUtil cannot parse
        return None, f"GPUtil failed ({type(exc).__name__}: {exc})"
    if not gpus:
        return None, "nvidia-smi reported no GPU"
    indices = _watched(max(g.id for g in gpus) + 1, watch)
    if indices:
        return GputilReader(GPUtil, gpus, indices), ""
    return None, f"none of nvidia-smi's {len(gpus)} GPU(s) is used by this run"


def open_gpu_reader(watch: Sequence[int] | None = None) -> tuple[GpuReader | None, GpuStatus]:
    """The best available reader of the GPUs ``watch`` names (NVML indices; None: every GPU) and the status to
    record (NVML first, then GPUtil). ``[]`` (the run uses no GPU) reads nothing and says so."""
    if watch is not None and not watch:
        return None, GpuStatus(False, "none", "no GPU: the run uses none (run.gpus and CUDA_VISIBLE_DEVICES)")
    reasons = []
    for opener in (_open_nvml, _open_gputil):
        reader, reason = opener(watch)
        if reader is not None:
            return reader, GpuStatus(True, reader.source, None, reader.names)
        reasons.append(reason)
    return None, GpuStatus(False, "none", "no GPU: " + "; ".join(reasons))
