"""The run folder on disk: atomic JSON and array writes, per-backend status files.

Every file is written to a temporary sibling and renamed over its target (``os.replace``), so a
reader (the parent, a resumed run, the report) never sees half a file, even when a worker is
killed mid-write.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from cxrbench.errors import CxrError, StorageError, is_storage_fault, storage_error

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


def write_with(path: Path, write) -> Path:
    """Call ``write(file_object)`` on a temporary file beside ``path``, then rename it over ``path``.

    A reader (the parent, a browser, another tool) never sees half a file.
    """
    with atomic_output(path) as tmp:
        with open(tmp, "wb") as handle:
            write(handle)
    return Path(path)


@contextlib.contextmanager
def atomic_output(path: Path, check=None) -> Iterator[Path]:
    """A temporary name beside ``path`` for a writer that needs a path (an exporter, ``np.savez``).

    When the block ends, ``check(tmp)`` (if given) must pass, then the file is renamed over
    ``path``; on any failure the temporary file and whatever the writer left beside it under the
    temporary name are removed, so a final name only ever holds a complete file. Out-of-space and
    permission errors become one :class:`StorageError` line naming ``path``.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{path.suffix}")
        os.close(fd)
    except OSError as exc:
        raise (storage_error(exc, path.parent) if is_storage_fault(exc) else exc) from None
    tmp = Path(name)
    try:
        yield tmp
        if check is not None:
            check(tmp)
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except OSError as exc:
        _remove_temporaries(tmp)
        raise (storage_error(exc, path) if is_storage_fault(exc) else exc) from None
    except BaseException:
        _remove_temporaries(tmp)
        raise


def _remove_temporaries(tmp: Path) -> None:
    """The temporary file and any sibling a writer derived from its name (external data, side files)."""
    for leftover in tmp.parent.glob(f"{tmp.name}*"):
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


#: Head room kept free beyond a write's own size (file-system metadata, the JSON files around it).
SPACE_MARGIN_BYTES = 16 << 20


def require_space(folder: Path, needed: int, what: str) -> None:
    """Refuse a big write before it starts when ``folder``'s disk has less than ``needed`` bytes free."""
    folder = Path(folder)
    existing = next((p for p in (folder, *folder.parents) if p.exists()), Path("."))
    free, total = shutil.disk_usage(existing).free, needed + SPACE_MARGIN_BYTES
    if free < total:
        raise StorageError(f"{folder}: {what} needs {total:,} bytes ({total / 2**20:.0f} MiB) but only {free:,} bytes "
                           "are free there: free space or choose a folder on another disk")


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def write_text(path: Path, text: str) -> Path:
    return write_with(path, lambda handle: handle.write(text.encode("utf-8")))


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
    return write_with(path, lambda handle: np.savez(handle, **arrays))


def save_npy(path: Path, array: np.ndarray) -> Path:
    return write_with(path, lambda handle: np.save(handle, array))


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
        self.data.update(status="running", pid=pid, host=socket.gethostname(), started=now_iso(), finished=None,
                         error=None)
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


# -- stale state ---------------------------------------------------------------------------------


def _started_epoch(started: str | None) -> float | None:
    try:
        return datetime.strptime(started, "%Y-%m-%dT%H:%M:%S%z").timestamp() if started else None
    except (TypeError, ValueError):
        return None


def process_gone(pid: int | None, host: str | None, started: str | None) -> bool:
    """True when the process recorded as ``pid`` on ``host`` at ``started`` no longer runs.

    A pid reused by a newer process counts as gone; a process on another host cannot be seen from
    here and counts as alive (the run folder may be shared over the network).
    """
    if not pid or (host and host != socket.gethostname()):
        return False
    try:
        created = psutil.Process(int(pid)).create_time()
    except (psutil.NoSuchProcess, psutil.ZombieProcess, ValueError):
        return True
    except psutil.Error:
        return False
    began = _started_epoch(started)
    return began is not None and created > began + 2.0  # recorded start times have 1 s resolution


def current_status(status: dict[str, Any]) -> str:
    """A status.json's status as it stands now: ``running`` whose process is gone is ``interrupted``."""
    if status.get("status") == "running" and process_gone(status.get("pid"), status.get("host"), status.get("started")):
        return "interrupted"
    return str(status.get("status") or "pending")


# -- the run folder's lock -----------------------------------------------------------------------

LOCK_FILE = "run.lock"
#: How long a new run waits for a lock whose recorded owner is gone (its orphaned worker stopping).
LOCK_WAIT_S = 20.0


class RunLock:
    """An exclusive ``flock`` on ``RUN/run.lock`` (pid, host, start time inside), held while the run writes.

    The kernel drops the lock when its last holder dies, so a crashed run never blocks the next
    one; the file it leaves only names the previous owner (taken over with a note). Workers
    inherit the descriptor, so the folder stays locked while any process of the run still writes.
    """

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_FILE
        self.fd: int | None = None

    def acquire(self) -> str | None:
        """Take the lock; a one-line :class:`CxrError` when another run holds it. Returns a note on a takeover."""
        deadline = time.monotonic() + LOCK_WAIT_S
        while True:
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = _read_lock(fd)
                os.close(fd)
                gone = process_gone(owner.get("pid"), owner.get("host"), owner.get("started"))
                if gone and time.monotonic() < deadline:
                    time.sleep(0.2)  # its owner is dead: a worker it left is finishing its last write
                    continue
                raise CxrError(_held_message(self.path, owner, gone)) from None
            except OSError as exc:  # a file system without flock: run unlocked rather than not at all
                self.fd = fd
                return f"cannot lock {self.path} ({exc.strerror}): a second run into this folder would not be refused"
            if os.fstat(fd).st_ino == _inode(self.path):
                break
            os.close(fd)  # the file was replaced while we waited for it: lock the current one
        self.fd = fd
        previous = _read_lock(fd)
        _write_lock(fd)
        if previous.get("pid") and previous.get("pid") != os.getpid():
            return (f"took over the lock {self.path} left by pid {previous.get('pid')} on {previous.get('host')} "
                    f"(started {previous.get('started')}), which is no longer running")
        return None

    def _open(self) -> int:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            return os.open(self.path, os.O_RDWR | os.O_CREAT, _FILE_MODE)
        except OSError as exc:
            raise (storage_error(exc, self.path) if is_storage_fault(exc) else exc) from None

    def release(self) -> None:
        """Remove the file, then drop the lock (a waiter that opened the old file retries on the new one)."""
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()
        os.close(self.fd)
        self.fd = None


def _held_message(path: Path, owner: dict[str, Any], gone: bool) -> str:
    who = f"pid {owner.get('pid')} on {owner.get('host')}, since {owner.get('started')}"
    if gone:
        return (f"{path.parent}: a worker of the run that held it ({who}, now gone) is still writing; "
                f"stop it or try again when it has ended")
    return (f"{path.parent}: another cxrbench run is writing into this folder ({who}); "
            "wait for it to end or use another --out")


def _inode(path: Path) -> int | None:
    try:
        return path.stat().st_ino
    except FileNotFoundError:
        return None


def _read_lock(fd: int) -> dict[str, Any]:
    try:
        data = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_lock(fd: int) -> None:
    """Our pid, host and start time; best effort: a full disk must not stop the lock from working."""
    owner = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": now_iso()}).encode()
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
        os.pwrite(fd, owner, 0)


def run_is_active(run_dir: Path) -> bool:
    """Whether some process holds ``run_dir``'s lock (a run still writing into it)."""
    path = Path(run_dir) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
