"""The run folder on disk: atomic JSON and array writes, per-backend status files.

Every file is written to a temporary sibling and renamed over its target (``os.replace``), so a
reader (the parent, a resumed run, the report) never sees half a file, even when a worker is
killed mid-write.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from cxrbench.errors import CxrError

SCHEMA_VERSION = 1
#: Worker stages in the order they run; ``prepare-check`` reopens the parent's prepared cache.
WORKER_STAGES = ("prepare-check", "equivalence", "train", "evaluate", "cam", "export")
DONE = "done"


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


#: What ``open()`` would have given: mkstemp makes files private, but results are for reading.
_FILE_MODE = 0o666 & ~_umask()


def _atomic(path: Path, write) -> Path:
    """Call ``write(file_object)`` on a temporary file beside ``path``, then rename it over ``path``.

    A reader (the parent, a browser, another tool) never sees half a file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def write_text(path: Path, text: str) -> Path:
    return _atomic(path, lambda handle: handle.write(text.encode("utf-8")))


def write_json(path: Path, data: Any) -> Path:
    """Write ``data`` as indented JSON, atomically (NaN is written as null: JSON has no NaN)."""
    return write_text(path, json.dumps(_finite(data), indent=2, default=_json_default, allow_nan=False))


def _finite(value: Any) -> Any:
    """Replace non-finite floats by None so the files stay strict JSON."""
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def read_json(path: Path, default: Any = None) -> Any:
    """Read a JSON file; ``default`` when it does not exist, a one-line error when it is corrupt."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return default
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CxrError(f"{path}: not valid JSON ({exc})") from None


def save_npz(path: Path, **arrays: np.ndarray) -> Path:
    return _atomic(path, lambda handle: np.savez(handle, **arrays))


def save_npy(path: Path, array: np.ndarray) -> Path:
    return _atomic(path, lambda handle: np.save(handle, array))


def load_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


class BackendStatus:
    """A backend folder's ``status.json``: overall status, per-stage state and live progress."""

    def __init__(self, folder: Path, backend: str):
        self.path = Path(folder) / "status.json"
        self.data = read_json(self.path) or {
            "backend": backend,
            "status": "pending",
            "stages": {},
            "stage_seconds": {},
            "error": None,
            "pid": None,
            "started": None,
            "finished": None,
        }
        self._last_write = 0.0

    def save(self) -> None:
        write_json(self.path, self.data)
        self._last_write = time.monotonic()

    def is_done(self, stage: str) -> bool:
        return self.data["stages"].get(stage) == DONE

    def start(self, pid: int) -> None:
        self.data.update(status="running", pid=pid, started=now_iso(), finished=None, error=None)
        self.save()

    def set_stage(self, stage: str, state: str, seconds: float | None = None) -> None:
        self.data["stages"][stage] = state
        self.data["stage"] = stage
        if seconds is not None:
            self.data["stage_seconds"][stage] = round(seconds, 3)
        self.save()

    def progress(self, throttle_s: float = 0.5, **fields: Any) -> None:
        """Live progress (epoch, step...), written at most every ``throttle_s`` seconds."""
        self.data.setdefault("progress", {}).update(fields)
        if time.monotonic() - self._last_write >= throttle_s:
            self.save()

    def finish(self, status: str, error: str | None = None) -> None:
        """Record the outcome; a stage left running takes the outcome (failed, interrupted)."""
        stage = self.data.get("stage")
        if status != "completed" and stage and self.data["stages"].get(stage) == "running":
            self.data["stages"][stage] = status
        self.data.update(status=status, error=error, finished=now_iso())
        self.save()
