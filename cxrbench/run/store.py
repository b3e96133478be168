"""The run's live state on disk: each backend's ``status.json`` and the run folder's lock.

Both are written through :mod:`cxrbench.files` (atomically) under the names :mod:`cxrbench.run.folder`
defines; the readers of this state (is a process gone, is the folder locked) live there too, for the report.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

from cxrbench.errors import CxrError, is_storage_fault, storage_error
from cxrbench.files import FILE_MODE, read_json, write_json
from cxrbench.run.folder import LOCK_FILE, LOG_TXT, STATUS_JSON, log_of, now_iso, process_gone

#: Worker stages in the order they run; ``prepare-check`` reopens the parent's prepared cache.
WORKER_STAGES = ("prepare-check", "equivalence", "ceiling", "train", "profile", "evaluate", "cam", "export")
DONE = "done"


class BackendStatus:
    """A backend folder's ``status.json``: overall status, per-stage state and live progress."""

    def __init__(self, folder: Path, backend: str):
        self.path = Path(folder) / STATUS_JSON
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
        self.data.update(
            status="running", pid=pid, host=socket.gethostname(), started=now_iso(), finished=None, error=None
        )
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

    def finish(self, status: str, error: str | None = None, refused: bool = False) -> None:
        """Record the outcome; a stage left running takes the outcome (failed, interrupted). ``refused``: the backend
        refused a setting by design (:class:`~cxrbench.errors.UnsupportedSetting`), which a sweep shows as such."""
        stage = self.data.get("stage")
        if status != "completed" and stage and self.data["stages"].get(stage) == "running":
            self.data["stages"][stage] = status
        self.data.update(status=status, error=error, refused=refused, finished=now_iso())
        self.save()


def record_end(folder: Path, name: str, returncode: int | None, interrupted: bool = False) -> dict[str, Any]:
    """A worker that died without recording its outcome is marked here, naming the signal; a launched rank that
    never joined its world (nothing written) fails with the one line it printed. Returns the status."""
    status = BackendStatus(folder, name)
    if status.data["status"] == "pending" and returncode:
        error = launched_error(Path(folder) / LOG_TXT) or f"exited with code {returncode}; see {log_of(name)}"
        status.finish("failed", error)
    elif status.data["status"] == "running":
        stage = status.data.get("stage") or "start-up"
        if interrupted:
            status.finish("interrupted", f"stopped by Ctrl-C during stage {stage}")
        elif returncode is not None and returncode < 0:
            status.finish("failed", f"worker killed by signal {signal.Signals(-returncode).name} during stage {stage}")
        else:
            status.finish("failed", f"worker exited with code {returncode} during stage {stage}; see {log_of(name)}")
    return status.data


#: The prefix of a launched rank's one-line error in its log (it owns no status file before it knows its rank).
ERROR_MARK = "cxrbench-error: "


def launched_error(log: Path) -> str | None:
    """The last one-line error a launched rank printed after :data:`ERROR_MARK`, if any."""
    try:
        lines = log.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return None
    found = [line.split(ERROR_MARK, 1)[1] for line in lines if ERROR_MARK in line]
    return found[-1] if found else None


# -- the run folder's lock -----------------------------------------------------------------------

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
            return (
                f"took over the lock {self.path} left by pid {previous.get('pid')} on {previous.get('host')} "
                f"(started {previous.get('started')}), which is no longer running"
            )
        return None

    def _open(self) -> int:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            return os.open(self.path, os.O_RDWR | os.O_CREAT, FILE_MODE)
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
        return (
            f"{path.parent}: a worker of the run that held it ({who}, now gone) is still writing; "
            f"stop it or try again when it has ended"
        )
    return (
        f"{path.parent}: another cxrbench run is writing into this folder ({who}); "
        "wait for it to end or use another --out"
    )


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
