"""Read a run folder (its files and run.json keys as :mod:`cxrbench.run.folder` defines them) into one tolerant
structure.

``run.json`` is required; everything else is optional. A missing or unreadable optional file
becomes a note the report shows, never a crash, so a failed backend or a stage not run still
gives a useful page. Backend summaries come from ``run.json`` and, where it lacks them (a run
still in progress, a parent that died), from the backend's own files.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from cxrbench.data.classes import CLASSES
from cxrbench.errors import CxrError
from cxrbench.files import load_npz, read_json, read_jsonl
from cxrbench.run.folder import (
    BACKEND_FEEDS,
    COMPARISON_JSON,
    LOCK_FILE,
    LOG_TXT,
    MONITOR_JSONL,
    PREDICTIONS_NPZ,
    RUN_JSON,
    SCHEMA_VERSION,
    STATUS_JSON,
    backend_results,
    current_status,
    run_is_active,
)

LOG_TAIL_LINES = 40


@dataclass
class BackendRun:
    """One backend's results; any summary may be ``None`` when its stage did not run."""

    name: str
    folder: Path
    summary: dict[str, Any]

    @property
    def status(self) -> str:
        return str(self.summary.get("status") or "pending")

    @property
    def error(self) -> str | None:
        return self.summary.get("error")

    def get(self, key: str) -> Any:
        return self.summary.get(key)

    @cached_property
    def monitor_samples(self) -> list[dict[str, Any]]:
        """monitor.jsonl, read once: several sections summarise it."""
        return load_monitor_samples(self)


@dataclass
class Run:
    """A run folder: ``run.json``, ``comparison.json`` and the backends, in run.json order."""

    path: Path
    meta: dict[str, Any]
    comparison: dict[str, Any]
    backends: dict[str, BackendRun]
    notes: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def classes(self) -> list[str]:
        return [str(c) for c in (self.meta.get("data") or {}).get("classes") or CLASSES]


def read_optional_json(path: Path, notes: list[str]) -> Any:
    """A JSON file's content, or ``None`` (with a note when the file exists but is unreadable)."""
    if not path.is_file():
        return None
    try:
        return read_json(path)
    except CxrError as exc:
        notes.append(str(exc))
        return None


def _backend_names(run_dir: Path, meta: dict) -> list[str]:
    """run.json's order first, then any backend folder the parent never merged (it has status.json)."""
    names = [str(n) for n in (meta.get("backends") or {})]
    extra = sorted(p.name for p in run_dir.iterdir() if (p / STATUS_JSON).is_file() and p.name not in names)
    return names + extra


def _load_backend(run_dir: Path, name: str, merged: dict, notes: list[str]) -> BackendRun:
    folder = run_dir / name
    summary = dict(merged)
    status = read_optional_json(folder / STATUS_JSON, notes) or {}
    if summary.get("status") in (None, "pending") and status.get("status"):
        summary["status"] = current_status(status)  # not merged yet: the worker's own record is fresher
    if summary.get("error") is None and status.get("error") is not None:
        summary["error"] = status["error"]
    missing = [feed.key for feed in BACKEND_FEEDS if summary.get(feed.key) is None]
    summary.update(backend_results(folder, lambda path: read_optional_json(path, notes), missing))
    return BackendRun(name, folder, summary)


def load_run(run_dir: Path) -> Run:
    """Read a run folder; a one-line :class:`CxrError` when it is not one."""
    run_dir = Path(run_dir)
    run_json = run_dir / RUN_JSON
    if not run_json.is_file():
        raise CxrError(f"{run_json}: not found (is {run_dir} a cxrbench run folder?)")
    meta = read_json(run_json)
    if not isinstance(meta, dict) or meta.get("schema_version") != SCHEMA_VERSION:
        found = meta.get("schema_version") if isinstance(meta, dict) else type(meta).__name__
        raise CxrError(f"{run_json}: schema_version must be {SCHEMA_VERSION}, found {found!r}")
    notes: list[str] = []
    if meta.get("status") == "running" and not run_is_active(run_dir):
        meta["status"] = "interrupted"  # no process holds the run's lock: it was killed before recording an outcome
        notes.append(f"{run_json}: says running, but no cxrbench run holds {run_dir / LOCK_FILE}: interrupted")
    comparison = read_optional_json(run_dir / COMPARISON_JSON, notes) or {}
    merged = meta.get("backends") or {}
    backends = {
        name: _load_backend(run_dir, name, merged.get(name) or {}, notes) for name in _backend_names(run_dir, meta)
    }
    return Run(run_dir, meta, comparison, backends, notes)


def load_predictions(backend: BackendRun) -> tuple[np.ndarray, np.ndarray] | None:
    """(labels, logits) of the test split from predictions.npz, or None when absent or unreadable."""
    path = backend.folder / PREDICTIONS_NPZ
    if not path.is_file():
        return None
    try:
        arrays = load_npz(path)
        return arrays["labels"], arrays["logits"]
    except (OSError, KeyError, ValueError):
        return None


def load_monitor_samples(backend: BackendRun) -> list[dict[str, Any]]:
    """monitor.jsonl samples; a torn last line (a killed worker) is skipped."""
    samples = read_jsonl(backend.folder / MONITOR_JSONL)
    return [sample for sample in samples if isinstance(sample.get("t"), (int, float))]


def log_tail(backend: BackendRun, lines: int = LOG_TAIL_LINES) -> list[str] | None:
    """The last ``lines`` lines of ``<backend>/log.txt`` (read as a stream: logs can be large)."""
    path = backend.folder / LOG_TXT
    if not path.is_file():
        return None
    with path.open(encoding="utf-8", errors="replace") as handle:
        return [line.rstrip("\n") for line in deque(handle, maxlen=lines)]
