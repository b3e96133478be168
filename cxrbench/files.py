"""Atomic file I/O for everything cxrbench writes: the run folder, the prepared cache, weights, the report.

Every file is written to a temporary sibling and renamed over its target (``os.replace``), so a
reader (the parent, a resumed run, the report) never sees half a file, even when a writer is
killed mid-write. Framework-free and below every other module: it knows files, not runs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from cxrbench.errors import CxrError, StorageError, is_storage_fault, storage_error


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


#: What ``open()`` would have given: mkstemp makes files private, but results are for reading.
FILE_MODE = 0o666 & ~_umask()


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
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except OSError as exc:
        _remove_temporaries(tmp)
        raise (storage_error(exc, path) if is_storage_fault(exc) else exc) from None
    except BaseException:
        _remove_temporaries(tmp)
        raise


def remove_orphaned_temporaries(folder: Path, recursive: bool = True) -> list[Path]:
    """Remove what :func:`atomic_output` left under ``folder`` when its writer was killed mid-write (SIGKILL or a lost
    machine: no ``finally`` ran), and return it. Only for a folder no live process writes into any more."""
    found = sorted((folder.rglob if recursive else folder.glob)(".*.tmp*"))
    _delete(found)
    return found


def _remove_temporaries(tmp: Path) -> None:
    """The temporary file and any sibling a writer derived from its name (external data, side files)."""
    _delete(tmp.parent.glob(f"{tmp.name}*"))


def _delete(paths) -> None:
    for leftover in paths:
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
        raise StorageError(
            f"{folder}: {what} needs {total:,} bytes ({total / 2**20:.0f} MiB) but only {free:,} bytes "
            "are free there: free space or choose a folder on another disk"
        )


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


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a JSON-lines file (empty when absent); a torn last line (a killed writer) is skipped."""
    path = Path(path)
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if path.is_file() else []:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def sha256_of(path: Path) -> str:
    """A file's SHA-256, read in blocks of 1 MiB (a whole data set or checkpoint never sits in memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
