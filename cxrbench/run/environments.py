"""Per-backend Python environments: a backend's worker may run in an interpreter of its own.

Frameworks whose CUDA stacks conflict cannot share one environment: TensorFlow 2.21 is built for CUDA 12 and
cuDNN 9, torch 2.14 brings CUDA 13 libraries into the same ``nvidia/*/lib`` folders, and in a shared environment
TensorFlow quietly sees no GPU. With ``--python keras=/opt/venvs/keras/bin/python`` the keras worker runs in that
interpreter (the core and the backend installed there); the parent asks it which backends it has before any work.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

from cxrbench import __version__
from cxrbench.backend.api import BackendInfo
from cxrbench.errors import BackendError, CxrError, first_line

#: What the parent runs in a backend's interpreter: the core's version and the backends that load there.
_PROBE = (
    "import dataclasses, json, cxrbench\n"
    "from cxrbench.plugins import load_plugins\n"
    "plugins = load_plugins()\n"
    "print(json.dumps({'cxrbench': cxrbench.__version__,\n"
    "                  'backends': {n: dataclasses.asdict(i) for n, i in plugins.backends.items()},\n"
    "                  'failures': [str(f) for f in plugins.failures]}))\n"
)
PROBE_TIMEOUT_S = 180.0


def parse_python_options(texts: list[str]) -> dict[str, str]:
    """``["keras=/opt/tf/bin/python"]`` -> ``{"keras": "/opt/tf/bin/python"}``, each interpreter checked to run."""
    pythons: dict[str, str] = {}
    for text in texts:
        name, sep, path = text.partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not name or not path:
            raise CxrError(f"--python {text!r}: expected BACKEND=PATH, e.g. keras=/opt/venvs/keras/bin/python")
        if name in pythons:
            raise CxrError(f"--python {name}: given twice ({pythons[name]} and {path})")
        if not (Path(path).is_file() and os.access(path, os.X_OK)):
            raise CxrError(f"--python {name}={path}: no executable Python interpreter there")
        pythons[name] = path
    return pythons


def probe(python: str) -> dict[str, Any]:
    """The core version and the backends an interpreter's environment has (the parent's view of that worker)."""
    try:
        done = subprocess.run(
            [python, "-c", _PROBE],
            capture_output=True,
            text=True,
            timeout=PROBE_TIMEOUT_S,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise CxrError(f"--python {python}: cannot run it ({first_line(exc)})") from None
    if done.returncode != 0:
        error = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise CxrError(
            f"--python {python}: cannot import cxrbench there ({error}); install the core in that "
            f"environment too: {python} -m pip install -e <cxrbench checkout>"
        )
    return json.loads(done.stdout.strip().splitlines()[-1])


def backend_info(name: str, python: str) -> BackendInfo:
    """The backend ``name`` as the environment of ``python`` has it; one line when it is not installed there."""
    found = probe(python)
    if found["backends"].get(name) is None:
        installed = ", ".join(found["backends"]) or "none"
        broken = "".join(f"; {failure}" for failure in found["failures"])
        raise BackendError(
            f"--python {name}={python}: backend {name!r} is not installed in that environment "
            f"(installed there: {installed}){broken}"
        )
    if found["cxrbench"] != __version__:
        raise BackendError(
            f"--python {name}={python}: that environment has cxrbench {found['cxrbench']}, this one "
            f"{__version__}: install the same checkout in both"
        )
    return BackendInfo(**found["backends"][name])
