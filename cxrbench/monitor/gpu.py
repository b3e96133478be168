"""GPU readers: NVML (``nvidia-ml-py``) when it initialises, else GPUtil (which runs ``nvidia-smi``).

A reader returns one dict per GPU with ``util`` (percent of time a kernel ran), ``mem_mib``,
``power_w``, ``temp_c`` and ``other_processes`` (compute processes outside the worker's tree, for the
noise guard); a value the source cannot give is ``None``, never 0. When neither
source finds a GPU, :func:`open_gpu_reader` says so and why, so results never show zeros that
look like measurements.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

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
        return {"gpu_available": self.gpu_available, "source": self.source, "reason": self.reason, "devices": self.devices}


def _optional(read):
    """A reading some GPUs do not support (power on many consumer cards) becomes None."""
    try:
        return read()
    except Exception:  # pynvml raises NVMLError_NotSupported and relatives
        return None


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class NvmlReader:
    source = "nvml"

    def __init__(self, pynvml, count: int):
        self.nvml = pynvml
        self.handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
        self.names = [_text(pynvml.nvmlDeviceGetName(h)) for h in self.handles]

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

    def read(self, own_pids: set[int] = frozenset()) -> list[dict[str, float | None]]:
        nvml = self.nvml
        return [
            {
                "util": float(nvml.nvmlDeviceGetUtilizationRates(h).gpu),
                "mem_mib": nvml.nvmlDeviceGetMemoryInfo(h).used / MIB,
                "power_w": _optional(lambda h=h: nvml.nvmlDeviceGetPowerUsage(h) / 1000.0),
                "temp_c": _optional(lambda h=h: float(nvml.nvmlDeviceGetTemperature(h, nvml.NVML_TEMPERATURE_GPU))),
                "other_processes": self._others(h, own_pids),
            }
            for h in self.handles
        ]

    def close(self) -> None:
        self.nvml.nvmlShutdown()


class GputilReader:
    """GPUtil parses ``nvidia-smi --query-gpu=...`` each call; it reports no power draw."""

    source = "gputil"

    def __init__(self, gputil, gpus):
        self.gputil = gputil
        self.names = [g.name for g in gpus]

    def read(self, own_pids: set[int] = frozenset()) -> list[dict[str, float | None]]:
        return [
            {"util": g.load * 100.0, "mem_mib": float(g.memoryUsed), "power_w": None, "temp_c": float(g.temperature),
             "other_processes": None}
            for g in self.gputil.getGPUs()
        ]

    def close(self) -> None:
        return None


def _open_nvml() -> tuple[NvmlReader | None, str]:
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception as exc:  # no library, no driver
        return None, f"NVML unavailable ({type(exc).__name__})"
    count = pynvml.nvmlDeviceGetCount()
    if count:
        return NvmlReader(pynvml, count), ""
    pynvml.nvmlShutdown()
    return None, "NVML found no GPU"


def _open_gputil() -> tuple[GputilReader | None, str]:
    try:
        import GPUtil

        gpus = GPUtil.getGPUs()
    except Exception as exc:  # nvidia-smi output GPUtil cannot parse
        return None, f"GPUtil failed ({type(exc).__name__}: {exc})"
    if gpus:
        return GputilReader(GPUtil, gpus), ""
    return None, "nvidia-smi reported no GPU"


def open_gpu_reader() -> tuple[GpuReader | None, GpuStatus]:
    """The best available reader and the status to record (NVML first, then GPUtil)."""
    reasons = []
    for opener in (_open_nvml, _open_gputil):
        reader, reason = opener()
        if reader is not None:
            return reader, GpuStatus(True, reader.source, None, reader.names)
        reasons.append(reason)
    return None, GpuStatus(False, "none", "no GPU: " + "; ".join(reasons))
