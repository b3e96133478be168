"""``run.keep``: which large files a completed run keeps.

- ``all``: everything (initial-model ONNX exports, weights, the equivalence batch).
- ``results`` (default): drops each backend's ``init.onnx`` once the equivalence check has used
  it; keeps one copy of the shared initial weights, the trained weights and ``model.onnx``. Nothing
  that cost training time is lost, and the dropped exports are remade from the seed.
- ``minimal``: the reports, metrics, predictions and CAMs only (about 1 MB, whatever the model): the profile's raw
  traces go too (its numbers stay in ``profile.json``).

Files are removed only when every backend completed: an unfinished run keeps all it needs for
``--resume``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cxrbench.run.folder import EQUIVALENCE_BATCH, INIT_ONNX, PROFILE_DIR, SHARED_INIT_FILES, WEIGHTS_NPZ

#: Glob patterns (relative to the run folder) each value removes.
REMOVED = {
    "all": (),
    "results": (f"**/{INIT_ONNX}",),
    "minimal": ("**/*.onnx", f"**/{WEIGHTS_NPZ}", SHARED_INIT_FILES, EQUIVALENCE_BATCH, f"*/{PROFILE_DIR}/**/*"),
}


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def prune(run_dir: Path, keep: str, complete: bool) -> dict[str, Any]:
    """Remove what ``keep`` does not keep (only from a complete run) and say what was kept, for run.json."""
    removed: list[str] = []
    removed_bytes = 0
    if complete:
        for pattern in REMOVED[keep]:
            for path in sorted(Path(run_dir).glob(pattern)):
                if path.is_file():
                    removed_bytes += path.stat().st_size
                    path.unlink()
                    removed.append(path.relative_to(run_dir).as_posix())
    note = None if complete else "nothing removed: the run is not complete, so it keeps everything --resume needs"
    return {
        "keep": keep,
        "removed": removed,
        "removed_bytes": removed_bytes,
        "kept_bytes": folder_bytes(run_dir),
        "note": note,
    }
