"""Environment capture: everything that can change a measurement, recorded once per run.

Framework versions come from package metadata, so capturing them imports no framework; GPU facts
come from NVML (``nvidia-ml-py``) when it loads. CUDA/cuDNN versions as the frameworks see them
are added by the backends' workers (``cxrbench_train`` returns its numerics).
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil

import cxrbench
from cxrbench.errors import BackendError
from cxrbench.machine import devices
from cxrbench.plugins import FIRST_PARTY_BACKENDS, FRAMEWORKS

#: The libraries a measurement depends on, besides the first-party backends and their frameworks.
_LIBRARIES = (
    "numpy",
    "scipy",
    "scikit-learn",
    "pillow",
    "pluggy",
    "onnx",
    "onnxruntime",
    "onnxscript",
    "nvidia-ml-py",
    "gputil",
    "jinja2",
    "matplotlib",
)
#: Every distribution whose version the environment capture records.
PACKAGES = (
    "cxrbench",
    *(b.distribution for b in FIRST_PARTY_BACKENDS.values() if not b.example),
    *_LIBRARIES,
    *FRAMEWORKS,
)


def package_versions(names=PACKAGES) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_inventory() -> dict[str, Any]:
    """The GPUs this process can use (``CUDA_VISIBLE_DEVICES`` applied, PCI order), and the machine's driver.

    ``count`` and ``devices`` are the visible GPUs only (``index`` is the CUDA index a worker sees, ``nvml_index``
    the physical one); ``hidden`` counts the others. Without NVML the driver's device nodes still count GPUs, so a
    container with CUDA but no NVML is not refused ``--gpus N``.
    """
    spec = devices.visible_spec()
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception as exc:  # no driver, no library, no GPU
        return _inventory(devices.device_node_gpus(), spec, reason=f"NVML unavailable: {type(exc).__name__}")
    try:
        driver = devices.guarded(lambda: devices.text(pynvml.nvmlSystemGetDriverVersion()))
        cuda = devices.guarded(pynvml.nvmlSystemGetCudaDriverVersion)
        return _inventory(
            devices.nvml_gpus(pynvml),
            spec,
            source="nvml",
            driver=driver,
            cuda_driver=f"{cuda // 1000}.{cuda % 1000 // 10}" if cuda else None,
        )
    except Exception as exc:  # NVML initialised but cannot even count: say so, never crash the caller
        return _inventory([], spec, reason=f"NVML failed: {type(exc).__name__}: {exc}")
    finally:
        devices.guarded(pynvml.nvmlShutdown)


def run_gpus(requested: int) -> list[devices.Gpu] | None:
    """The GPUs ``run.gpus = requested`` uses here, or None when this machine shows no GPU at all."""
    inventory = gpu_inventory()
    if not inventory["devices"] and not inventory["hidden"]:
        return None
    shown = [devices.Gpu(d["nvml_index"], d["name"], d["uuid"], d["memory_total_mib"]) for d in inventory["devices"]]
    return devices.used_by_run(shown, requested)


def run_gpu_indices(requested: int) -> list[int] | None:
    """NVML indices of the GPUs ``run.gpus = requested`` uses here: what a worker's monitor watches.

    None when this machine shows no GPU at all, so the monitor's reader says why (no driver, no NVML).
    """
    gpus = run_gpus(requested)
    return None if gpus is None else [gpu.nvml_index for gpu in gpus]


def require_framework_gpus(framework: str, sees: int, requested: int) -> None:
    """Refuse a framework that sees fewer GPUs than the run needs, naming the cause; never fall back to the CPU.

    ``requested`` is ``run.gpus`` (0: the first GPU when there is one). The GPUs NVML shows this process are what it
    was given: a framework that sees fewer did not load its CUDA libraries (TensorFlow built for CUDA 12 next to
    torch's CUDA 13 in one environment is the common case), and training would quietly run on the CPU.
    """
    inventory = gpu_inventory()
    visible = inventory["count"]
    needed = requested or min(visible, 1)
    if sees >= needed:
        return
    if visible >= needed:
        names = ", ".join(dict.fromkeys(d["name"] for d in inventory["devices"]))
        raise BackendError(
            f"{framework} sees {sees} GPU(s) but this process may use {visible} ({names}): its CUDA libraries did not "
            "load in this environment; give this backend its own environment (cxrbench run --python BACKEND=PATH), "
            "or hide the GPUs (CUDA_VISIBLE_DEVICES=) to run on the CPU on purpose"
        )
    raise BackendError(f"run.gpus = {requested}, but {framework} sees {sees} GPU(s)")


def _inventory(
    every: list[devices.Gpu], spec: str | None, source: str = "device nodes", reason: str | None = None, **driver: Any
) -> dict[str, Any]:
    shown = devices.visible(every, spec)
    inventory = {
        "available": bool(shown),
        "count": len(shown),
        "devices": [{"index": i, **gpu.to_dict()} for i, gpu in enumerate(shown)],
        "hidden": len(every) - len(shown),
        "cuda_visible_devices": spec,
        "source": source if every else "none",
        **driver,
    }
    if reason and not shown:
        inventory["reason"] = reason
    elif reason:
        inventory["note"] = reason
    return inventory


def git_commit(path: Path | None = None) -> str | None:
    root = path or Path(cxrbench.__file__).resolve().parent.parent
    try:
        result = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if result.returncode != 0:
        return None
    dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain"], capture_output=True, text=True, timeout=5)
    return result.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def capture() -> dict[str, Any]:
    """The run's environment, as JSON-able data: OS, CPU, Python, package versions, GPUs, git commit."""
    memory = psutil.virtual_memory()
    return {
        "os": platform.platform(),
        "python": sys.version.split()[0],
        "cpu": cpu_model(),
        "cpu_count_logical": psutil.cpu_count(logical=True),
        "cpu_count_physical": psutil.cpu_count(logical=False),
        "memory_total_gib": round(memory.total / 2**30, 1),
        "packages": package_versions(),
        "gpu": gpu_inventory(),
        "git_commit": git_commit(),
        "env": {
            k: os.environ[k]
            for k in ("CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS", "KERAS_BACKEND", "TF_ENABLE_ONEDNN_OPTS")
            if k in os.environ
        },
    }
