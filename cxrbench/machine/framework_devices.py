"""``cxrbench backends --check``: each backend imported in a process (and environment) of its own, asked which
devices its framework sees, and judged against the GPUs NVML shows that process.

A framework that sees fewer GPUs than it was given did not load its CUDA libraries (TensorFlow built for CUDA 12
next to torch's CUDA 13 in one environment is the common case); a run would stop on it, this says so up front.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

#: Runs in the backend's interpreter: its devices, and the visible GPUs NVML shows that process.
_PROBE = (
    "import json, sys\n"
    "from cxrbench.machine.env import gpu_inventory\n"
    "from cxrbench.plugins import load_plugins\n"
    "devices = load_plugins(backend=sys.argv[1]).hook.cxrbench_devices()\n"
    "print(json.dumps({'devices': devices, 'nvml_gpus': gpu_inventory()['count']}))\n"
)
PROBE_TIMEOUT_S = 300.0


def check_backend(name: str, python: str = sys.executable) -> dict[str, Any]:
    """One backend's row: the interpreter, what its framework sees, NVML's count and the verdict."""
    row: dict[str, Any] = {"backend": name, "python": python}
    try:
        done = subprocess.run(
            [python, "-c", _PROBE, name],
            capture_output=True,
            text=True,
            timeout=PROBE_TIMEOUT_S,
            env={**os.environ, "CUDA_DEVICE_ORDER": "PCI_BUS_ID"},
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {**row, "ok": False, "verdict": f"could not run: {type(exc).__name__}: {exc}".splitlines()[0]}
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {**row, "ok": False, "verdict": f"failed to import: {last}"}
    found = json.loads(done.stdout.strip().splitlines()[-1])
    if found["devices"] is None:
        return {
            **row,
            "ok": True,
            "devices": None,
            "nvml_gpus": found["nvml_gpus"],
            "verdict": "the backend does not list its devices (cxrbench_devices)",
        }
    gpus = len(found["devices"]) - 1  # "cpu" first
    row.update(devices=found["devices"], gpus=gpus, nvml_gpus=found["nvml_gpus"])
    if gpus < found["nvml_gpus"]:
        return {
            **row,
            "ok": False,
            "verdict": f"sees {gpus} of the {found['nvml_gpus']} GPU(s) NVML shows: its CUDA "
            "libraries did not load here; give it its own environment (--python)",
        }
    return {**row, "ok": True, "verdict": "ok"}


def check_all(names: list[str], pythons: dict[str, str]) -> list[dict[str, Any]]:
    """A row per backend: the installed ones here, and those named with ``--python`` in their environments."""
    return [check_backend(name, pythons.get(name, sys.executable)) for name in dict.fromkeys([*names, *pythons])]
