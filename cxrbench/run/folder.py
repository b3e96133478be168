"""The run folder's format, defined once: its files, the run.json keys they feed, the schema version, its paths.

The orchestrator and its workers write a run folder; ``cxrbench report`` (and ``--resume``) read it. Both take
every file name, every per-backend file -> ``run.json`` key mapping and the schema version from here, and the
readers of a run's live state (is a backend's process still there, does a run still hold the folder's lock) live
here too, so that the report never imports the code that runs a benchmark. Framework-free, no I/O of its own
beyond reading status and lock state.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil

#: ``run.json`` ``schema_version`` (and ``comparison.json``'s); ``cxrbench/run/schema.json`` states the same value.
SCHEMA_VERSION = 1

# -- files at the top of the run folder ---------------------------------------------------------------
RUN_JSON = "run.json"
COMPARISON_JSON = "comparison.json"
INDEX_HTML = "index.html"
LOCK_FILE = "run.lock"
EQUIVALENCE_BATCH = "equivalence_batch.npy"
SHARED_INIT = "shared_init.npz"
#: Every seed's shared initial weights (``--repeats``: one file per seed, see :func:`shared_init_path`).
SHARED_INIT_FILES = "shared_init*.npz"
#: ``model.init = FILE`` (a framework's checkpoint), converted once to canonical weights for every backend.
IMPORTED_INIT = "imported_init.npz"
#: ``data.crop = "lungs"``: every picture's crop box (copied from the prepared cache, :mod:`cxrbench.data.crop`).
CROP_BOXES_CSV = "crop_boxes.csv"
#: Training curves for TensorBoard, one folder of event files per backend (``tensorboard --logdir RUN/tensorboard``).
TENSORBOARD_DIR = "tensorboard"
TENSORBOARD_EVENTS = f"{TENSORBOARD_DIR}/*/events.out.tfevents.*"
SWEEP_CSV = "sweep.csv"
SWEEP_DIR = "sweep"

# -- files in each backend's folder (``RUN/<backend>/``, and each repeat's or sweep point's folder) ------
STATUS_JSON = "status.json"
LOG_TXT = "log.txt"
HISTORY_JSON = "history.json"
TRAIN_JSON = "train.json"
WEIGHTS_NPZ = "weights_best.npz"
EQUIVALENCE_NPZ = "equivalence.npz"
INIT_ONNX = "init.onnx"
INIT_ONNX_JSON = "init_onnx.json"
PREDICTIONS_NPZ = "predictions.npz"
METRICS_JSON = "metrics.json"
LOCALISATION_JSON = "localisation.json"
CAMS_DIR = "cams"
CAMS_INDEX = f"{CAMS_DIR}/index.json"
CAMS_NPZ = "cams.npz"
MODEL_ONNX = "model.onnx"
ONNX_JSON = "onnx.json"
MONITOR_JSONL = "monitor.jsonl"
MONITOR_JSON = "monitor.json"
THROUGHPUT_JSON = "throughput.json"
#: The dense-matmul ceiling measured before training, the model FLOPs utilisation, the profile and its raw traces.
CEILING_JSON = "ceiling.json"
EFFICIENCY_JSON = "efficiency.json"
PROFILE_JSON = "profile.json"
PROFILE_DIR = "profile"
#: A multi-node world: every rank's host, GPUs (UUIDs), driver, launcher and communication library (rank order).
RANKS_JSON = "ranks.json"
REPEATS_DIR = "repeats"
#: Worker stages of repeats 2..N (``--repeats``): CAM too, so localisation is paired by seed like AUROC; no
#: equivalence or export, which check the implementation, not the seed's spread.
REPEAT_STAGES = ("prepare-check", "train", "evaluate", "cam")
#: The harness-overhead benchmark (``run.overhead_rounds``, ``cxrbench overhead``): the backend's summary, and its
#: processes' folders (``overhead/r<i>/backend/``: a worker's files; ``overhead/r<i>/idiomatic/``: IDIOMATIC_JSON).
OVERHEAD_JSON = "overhead.json"
OVERHEAD_DIR = "overhead"
IDIOMATIC_JSON = "idiomatic.json"

#: What a completed run with default settings (``run.keep = results``, one GPU count, no repeats or sweep) holds.
RUN_FILES = (RUN_JSON, COMPARISON_JSON, INDEX_HTML, EQUIVALENCE_BATCH, SHARED_INIT)
BACKEND_FILES = (
    STATUS_JSON,
    LOG_TXT,
    HISTORY_JSON,
    TRAIN_JSON,
    WEIGHTS_NPZ,
    EQUIVALENCE_NPZ,
    INIT_ONNX_JSON,
    PREDICTIONS_NPZ,
    METRICS_JSON,
    LOCALISATION_JSON,
    CAMS_INDEX,
    CAMS_NPZ,
    MODEL_ONNX,
    ONNX_JSON,
    MONITOR_JSONL,
    MONITOR_JSON,
    THROUGHPUT_JSON,
    CEILING_JSON,
    EFFICIENCY_JSON,
    PROFILE_JSON,
)


@dataclass(frozen=True)
class Feed:
    """One key of a backend's summary in ``run.json`` and the backend file it is merged from."""

    key: str
    file: str
    inner: str | None = None  #: only this key of the file's object
    omit: str | None = None  #: the file's object without this key
    empty: type | None = None  #: what a missing file gives (``list``: an empty list), else None

    def value(self, content: Any) -> Any:
        if content is None:
            return self.empty() if self.empty else None
        if self.inner is not None:
            return content.get(self.inner) if isinstance(content, dict) else None
        if self.omit is not None:
            return {k: v for k, v in content.items() if k != self.omit} if isinstance(content, dict) else None
        return content


#: run.json ``backends.<name>.<key>`` <- file in the backend's folder (status, error and stages come from status.json).
BACKEND_FEEDS = (
    Feed("history", HISTORY_JSON, empty=list),
    Feed("train", TRAIN_JSON),
    Feed("auroc", METRICS_JSON, inner="auroc"),
    Feed("metrics", METRICS_JSON, omit="auroc", empty=dict),
    Feed("localisation", LOCALISATION_JSON),
    Feed("throughput", THROUGHPUT_JSON),
    Feed("gpu", MONITOR_JSON),
    Feed("onnx", ONNX_JSON),
    Feed("efficiency", EFFICIENCY_JSON),
    Feed("profile", PROFILE_JSON),
    Feed("ranks", RANKS_JSON),
    Feed("harness_overhead", OVERHEAD_JSON),
)


def backend_results(folder: Path, read: Callable[[Path], Any], keys: Collection[str] | None = None) -> dict[str, Any]:
    """The results part of a backend's run.json summary, from its files (each read once, by ``read``, which decides
    what a corrupt file becomes); ``keys`` limits it to those run.json keys."""
    contents: dict[str, Any] = {}
    results = {}
    for feed in BACKEND_FEEDS:
        if keys is None or feed.key in keys:
            if feed.file not in contents:
                contents[feed.file] = read(Path(folder) / feed.file)
            results[feed.key] = feed.value(contents[feed.file])
    return results


# -- paths ----------------------------------------------------------------------------------------------


def log_of(backend: str) -> str:
    """The backend's log, relative to the run folder (run.json ``backends.<name>.log``)."""
    return f"{backend}/{LOG_TXT}"


def repeat_folder(run_dir: Path, backend: str, repeat: int) -> Path:
    """``--repeats``: repeat 1 is the backend's own folder, repeat i its ``repeats/r<i>/``."""
    return Path(run_dir) / backend if repeat == 1 else Path(run_dir) / backend / REPEATS_DIR / f"r{repeat}"


def gpus_folder(run_dir: Path, backend: str, gpus: int, first: int) -> Path:
    """``--gpus 1,2,4``: the first count's results live in ``<backend>/``, further counts in ``<backend>/gpus-<N>/``."""
    return Path(run_dir) / backend if gpus == first else Path(run_dir) / backend / f"gpus-{gpus}"


def nodes_folder(run_dir: Path, backend: str, nodes: int, first: int) -> Path:
    """``--nodes 1,2,4``: the first count in ``<backend>/``, further counts in ``<backend>/nodes-<N>/``."""
    return Path(run_dir) / backend if nodes == first else Path(run_dir) / backend / f"nodes-{nodes}"


def sweep_folder(run_dir: Path, point: str, backend: str) -> Path:
    """``--sweep``: a grid point's speed stages of one backend."""
    return Path(run_dir) / SWEEP_DIR / point / backend


def shared_init_path(run_dir: Path, seed: int, base_seed: int) -> Path:
    """One shared-initial-weights file per seed; the run's own seed keeps the historical name."""
    return Path(run_dir) / (SHARED_INIT if seed == base_seed else f"shared_init-seed{seed}.npz")


# -- live state: timestamps, processes, the lock -----------------------------------------------------------

_TIME_FORMAT = "%Y-%m-%dT%H:%M:%S%z"


def now_iso() -> str:
    """The run folder's timestamps (created, finished, a process's start), in local time with its offset."""
    return time.strftime(_TIME_FORMAT)


def _started_epoch(started: str | None) -> float | None:
    try:
        return datetime.strptime(started, _TIME_FORMAT).timestamp() if started else None
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
