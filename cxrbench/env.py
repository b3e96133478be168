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

PACKAGES = (
    "cxrbench", "numpy", "scipy", "scikit-learn", "pillow", "pluggy", "torch", "torchvision", "tensorflow",
    "keras", "tf2onnx", "onnx", "onnxruntime", "onnxscript", "nvidia-ml-py", "gputil", "jinja2", "matplotlib",
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
    """GPUs through NVML: names, memory, driver and CUDA driver version; says plainly when none."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception as exc:  # no driver, no library, no GPU
        return {"available": False, "count": 0, "devices": [], "reason": f"NVML unavailable: {type(exc).__name__}"}
    try:
        count = pynvml.nvmlDeviceGetCount()
        devices = []
        for i in range(count):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(handle)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            devices.append({"index": i, "name": name if isinstance(name, str) else name.decode(), "memory_total_mib": memory.total // 2**20})
        driver = pynvml.nvmlSystemGetDriverVersion()
        cuda = pynvml.nvmlSystemGetCudaDriverVersion()
        return {
            "available": count > 0,
            "count": count,
            "devices": devices,
            "driver": driver if isinstance(driver, str) else driver.decode(),
            "cuda_driver": f"{cuda // 1000}.{cuda % 1000 // 10}",
        }
    finally:
        pynvml.nvmlShutdown()


def git_commit(path: Path | None = None) -> str | None:
    root = path or Path(cxrbench.__file__).resolve().parent.parent
    try:
        result = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
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
        "env": {k: os.environ[k] for k in ("CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS", "KERAS_BACKEND", "TF_ENABLE_ONEDNN_OPTS") if k in os.environ},
    }
