"""Energy counters read at the timing windows' edges: joules per training and per inference image.

Two sources, both cumulative hardware counters, read where the device is synchronised (the window timer's edges,
:mod:`cxrbench.backend.timing`), so a phase's energy is a difference of two readings, never an estimate from
sampled power:

* **GPU runs:** NVML's ``nvmlDeviceGetTotalEnergyConsumption`` (millijoules since the driver loaded; Volta and
  newer), summed over the GPUs the run uses. It covers the GPU boards only, not the CPU or the rest of the machine.
* **CPU runs:** Linux powercap (RAPL) ``/sys/class/powercap/intel-rapl:N/energy_uj`` of every CPU package
  (microjoules, wrapping at ``max_energy_range_uj``; the kernel's ``intel_rapl`` driver serves AMD CPUs too). It
  covers whole packages: every process on them, not only the benchmark, so it is only fair on a quiet machine.
  Since Linux 5.10 (CVE-2020-8694) the counters are readable by root only.

Otherwise the reading is *unavailable* and says why; nothing is ever guessed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

POWERCAP = Path("/sys/class/powercap")


class EnergyMeter:
    """A cumulative joule counter: ``read()`` gives joules since an arbitrary origin, or None (the reason is in
    ``reason``). ``describe()`` says what it covers, for throughput.json."""

    source = "none"
    covers = ""

    def __init__(self, reason: str | None = None):
        self.reason = reason

    def read(self) -> float | None:
        return None

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "covers": self.covers or None, "reason": self.reason}


class NvmlEnergy(EnergyMeter):
    source = "nvml"

    def __init__(self, pynvml, handles: list, names: list[str]):
        super().__init__()
        self.nvml, self.handles = pynvml, handles
        self.covers = f"GPU board energy (NVML total energy counter) of {', '.join(names)}"

    def read(self) -> float | None:
        try:
            return sum(self.nvml.nvmlDeviceGetTotalEnergyConsumption(h) for h in self.handles) / 1000.0
        except Exception as exc:  # a GPU fallen off the bus: a gap, not a crash of the timed loop
            self.reason = f"nvmlDeviceGetTotalEnergyConsumption failed: {type(exc).__name__}"
            return None


class RaplEnergy(EnergyMeter):
    """Packages' counters, each unwrapped: a reading below the previous one wrapped at ``max_energy_range_uj``."""

    source = "rapl"

    def __init__(self, domains: list[tuple[Path, int, str]]):
        super().__init__()
        self.domains = domains  # (energy_uj file, max_energy_range_uj, name)
        self.covers = (
            f"CPU package energy (Linux powercap RAPL: {', '.join(name for _, _, name in domains)}), every process on "
            "the packages"
        )
        self._last: list[int | None] = [None] * len(domains)
        self._total_uj = 0

    def read(self) -> float | None:
        try:
            values = [int(path.read_text().strip()) for path, _, _ in self.domains]
        except (OSError, ValueError) as exc:
            self.reason = f"reading the RAPL counters failed: {exc}"
            return None
        for i, (value, (_, wrap, _)) in enumerate(zip(values, self.domains)):
            last = self._last[i]
            if last is not None:
                self._total_uj += value - last if value >= last else value + wrap - last
            self._last[i] = value
        return self._total_uj / 1e6


def open_nvml_energy(indices: Sequence[int], pynvml=None) -> EnergyMeter:
    """NVML's energy counter of the GPUs at NVML ``indices``, or why not."""
    try:
        if pynvml is None:
            import pynvml
        pynvml.nvmlInit()
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in indices]
        names = []
        for handle in handles:
            name = pynvml.nvmlDeviceGetName(handle)
            names.append(name.decode() if isinstance(name, bytes) else str(name))
    except Exception as exc:  # no library, no driver, a vanished GPU
        return EnergyMeter(f"unavailable: NVML did not open the run's GPUs ({type(exc).__name__})")
    try:
        for handle in handles:
            pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)
    except Exception as exc:  # NVMLError_NotSupported before Volta
        return EnergyMeter(
            f"unavailable: NVML has no energy counter on {', '.join(names)} ({type(exc).__name__}; "
            "Volta or newer needed)"
        )
    return NvmlEnergy(pynvml, handles, names)


def open_rapl_energy(root: Path = POWERCAP) -> EnergyMeter:
    """The powercap (RAPL) package counters under ``root``, or why not (absent, or readable by root only)."""
    packages = sorted(p for p in root.glob("intel-rapl:*") if p.name.count(":") == 1) if root.is_dir() else []
    if not packages:
        return EnergyMeter(f"unavailable: no RAPL package counters under {root} (no powercap driver)")
    domains = []
    for package in packages:
        try:
            int((package / "energy_uj").read_text().strip())
            wrap = int((package / "max_energy_range_uj").read_text().strip())
            name = (package / "name").read_text().strip() if (package / "name").is_file() else package.name
        except PermissionError:
            return EnergyMeter(
                f"unavailable: {package / 'energy_uj'} is readable by root only (Linux >= 5.10, CVE-2020-8694)"
            )
        except (OSError, ValueError) as exc:
            return EnergyMeter(f"unavailable: {package} is not a readable RAPL counter ({exc})")
        domains.append((package / "energy_uj", wrap, name))
    return RaplEnergy(domains)


def open_energy_meter(gpu_indices: Sequence[int] | None, root: Path = POWERCAP, pynvml=None) -> EnergyMeter:
    """The run's meter: NVML for the run's GPUs when it uses any, else the CPU packages' RAPL counters."""
    if gpu_indices:
        return open_nvml_energy(gpu_indices, pynvml)
    return open_rapl_energy(root)


def phase_energy(windows: Sequence[Sequence[float]]) -> dict[str, Any] | None:
    """Joules, images and seconds over the windows that carry an energy reading (``[steps, images, seconds,
    joules]``), with joules per image and mean watts; None when no window does."""
    metered = [w for w in windows if len(w) > 3 and w[3] is not None]
    if not metered:
        return None
    joules = float(sum(w[3] for w in metered))
    images = int(sum(w[1] for w in metered))
    seconds = float(sum(w[2] for w in metered))
    return {
        "joules": joules,
        "images": images,
        "seconds": seconds,
        "joules_per_image": joules / images if images else None,
        "mean_watts": joules / seconds if seconds > 0 else None,
        "windows": len(metered),
    }
