"""The prepared cache: every image decoded once into one memory-mapped ``uint8 (N, S, S)`` array.

Layout: ``<cache_dir>/<key>/images.npy`` plus ``manifest.json``. The key is a sha256 over
everything the pixels and rows depend on: the file list with each image's size and mtime, the
content of the metadata files, the exclusion list's effect, the image size, the preprocessing
version and the crop (``data.crop``: method, margin, the finder's version or the network's sha256).
With a crop, ``crop_boxes.csv`` beside the array holds every picture's box (:mod:`cxrbench.data.crop`). A build
writes into a unique temporary folder (workers fill row chunks straight into the memmap), fsyncs, writes the
manifest last, then renames the folder into place in one atomic step: an interrupted build or a concurrent one never
leaves a folder that loads as valid.

The manifest carries a sha256 of every 1 MiB block of ``images.npy``, computed at build time.
Every open verifies a sample of blocks (all of them for a cache of up to ``SAMPLE_BLOCKS`` MiB,
like the smoke suite's); every block is verified by ``cxrbench data verify`` and whenever an
image is newer than the manifest. A mismatch discards the cache and rebuilds it from the images,
which are its only input, saying why on stderr.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cxrbench.data import crop, images
from cxrbench.data.crop import NO_CROP, CropBox, CropSpec
from cxrbench.data.index import DataIndex
from cxrbench.data.nih import METADATA_FILES
from cxrbench.data.prepared import PreparedData
from cxrbench.errors import DataError, StorageError, is_storage_fault, storage_error
from cxrbench.files import sha256_of

#: 2: the manifest carries per-block checksums (format-1 caches get a new key and are rebuilt once).
CACHE_FORMAT = 2
#: Checksummed block size, and how many blocks every open verifies (the first, the last and random others).
CHECKSUM_BLOCK = 1 << 20
SAMPLE_BLOCKS = 32
#: Below this many images per worker, starting processes costs more than it saves (measured here).
IMAGES_PER_WORKER = 500
IMAGES_FILE, MANIFEST_FILE = "images.npy", "manifest.json"


def cache_root() -> Path:
    """``$CXRBENCH_CACHE`` or ``~/.cache/cxrbench``: the phantom data set and prepared arrays live here."""
    return Path(os.environ.get("CXRBENCH_CACHE") or Path.home() / ".cache" / "cxrbench")


def prepare(
    index: DataIndex,
    size: int,
    *,
    crop_spec: CropSpec = NO_CROP,
    cache_dir: Path | None = None,
    workers: int | None = None,
    progress: bool = False,
) -> PreparedData:
    """The index's images at ``size x size``, from the cache or built into it (in parallel) first.

    ``crop_spec`` crops every picture before it is resized (its boxes land in ``crop_boxes.csv`` beside the array);
    ``workers`` defaults to :func:`default_workers`; ``progress`` draws a progress line on stderr.
    """
    if len(index) == 0:
        raise DataError(f"{index.root}: no images to prepare")
    if size < 1:
        raise DataError(f"image size {size}: must be positive")
    cache_dir = Path(cache_dir) if cache_dir else cache_root() / "prepared"
    key, newest = _key_and_newest(index, size, crop_spec)
    folder = cache_dir / key
    if is_valid(folder, key, len(index), size):
        try:
            full = _manifest_mtime_ns(folder) < newest
            problem = check_contents(folder, full=full)
        except FileNotFoundError:  # another process discarded it meanwhile: rebuilt below
            full, problem = False, None
        if problem:
            why = " (an image is newer than the manifest, so every block was checked)" if full else ""
            print(f"note: prepared cache {folder}: {problem}{why}: rebuilding it from the images", file=sys.stderr)
            _discard(folder)
    if not is_valid(folder, key, len(index), size):
        _build(index, size, crop_spec, folder, workers or default_workers(len(index)), progress)
    boxes = crop.read_boxes_csv(folder / crop.BOXES_FILE) if crop_spec.active else None
    return PreparedData(index, np.load(folder / IMAGES_FILE, mmap_mode="r"), key, boxes)


@dataclass(frozen=True)
class Verified:
    ok: bool
    message: str


def verify(
    index: DataIndex,
    size: int,
    *,
    crop_spec: CropSpec = NO_CROP,
    cache_dir: Path | None = None,
    rebuild: bool = True,
) -> Verified:
    """Check every block of the index's prepared cache; a mismatch rebuilds it (or only removes it)."""
    cache_dir = Path(cache_dir) if cache_dir else cache_root() / "prepared"
    key, _ = _key_and_newest(index, size, crop_spec)
    folder = cache_dir / key
    if not is_valid(folder, key, len(index), size):
        raise DataError(f"{folder}: no prepared cache of this data set at {size} px (cxrbench data prepare makes one)")
    problem = check_contents(folder, full=True)
    if problem is None:
        blocks = len(_read_manifest(folder)["checksum"]["blocks"])
        return Verified(True, f"{folder}: all {blocks} blocks match the checksum written when it was built")
    _discard(folder)
    if not rebuild:
        return Verified(False, f"{folder}: {problem}: removed it (cxrbench data prepare or the next run rebuilds it)")
    _build(index, size, crop_spec, folder, default_workers(len(index)), progress=False)
    return Verified(False, f"{folder}: {problem}: rebuilt it from the images")


def _read_manifest(folder: Path) -> dict:
    return json.loads((folder / MANIFEST_FILE).read_text())


def _manifest_mtime_ns(folder: Path) -> int:
    return (folder / MANIFEST_FILE).stat().st_mtime_ns


def check_contents(folder: Path, full: bool) -> str | None:
    """Compare blocks of ``images.npy`` with the manifest's checksum: all of them, or a random sample.

    Returns the first mismatch as a reason, None when every compared block matches.
    """
    checksum = _read_manifest(folder)["checksum"]
    npy = folder / IMAGES_FILE
    actual = npy.stat().st_size
    if actual != checksum["bytes"]:
        return f"{IMAGES_FILE} is {actual} bytes, its checksum was made over {checksum['bytes']}"
    count, block = len(checksum["blocks"]), checksum["block_bytes"]
    blocks = range(count) if full or count <= SAMPLE_BLOCKS else _sample(count)
    with open(npy, "rb") as handle:
        for number in blocks:
            handle.seek(number * block)
            if hashlib.sha256(handle.read(block)).hexdigest() != checksum["blocks"][number]:
                return (
                    f"block {number + 1} of {count} of {IMAGES_FILE} does not match its checksum (the file was altered)"
                )
    return None


def _sample(count: int) -> list[int]:
    """The first and last block and random others: a different sample each open covers the file over time."""
    return sorted({0, count - 1, *random.sample(range(1, count - 1), SAMPLE_BLOCKS - 2)})


def _checksum(npy: Path) -> dict:
    digests = []
    with open(npy, "rb") as handle:
        for block in iter(lambda: handle.read(CHECKSUM_BLOCK), b""):
            digests.append(hashlib.sha256(block).hexdigest())
    return {"algorithm": "sha256", "block_bytes": CHECKSUM_BLOCK, "bytes": npy.stat().st_size, "blocks": digests}


def _discard(folder: Path) -> None:
    """Move a corrupt cache aside atomically and delete it (readers that mapped it keep their pages)."""
    aside = Path(tempfile.mkdtemp(prefix=f".{folder.name[:16]}.", suffix=".corrupt", dir=folder.parent))
    try:
        os.rename(folder, aside / folder.name)
    except FileNotFoundError:
        pass  # another process discarded it first
    shutil.rmtree(aside, ignore_errors=True)


def default_workers(images: int) -> int:
    """All cores for real data sets; fewer (down to this process alone) for small ones."""
    return max(1, min(os.cpu_count() or 1, images // IMAGES_PER_WORKER))


def cache_key(index: DataIndex, size: int, crop_spec: CropSpec = NO_CROP) -> str:
    """sha256 over every input of the prepared array; any change gives a new key."""
    return _key_and_newest(index, size, crop_spec)[0]


def _key_and_newest(index: DataIndex, size: int, crop_spec: CropSpec) -> tuple[str, int]:
    """The cache key, and the newest image modification time (ns) seen while computing it.

    No crop adds nothing to the key, so caches built before cropping existed keep theirs.
    """
    digest = hashlib.sha256()
    _update(
        digest,
        {
            "format": CACHE_FORMAT,
            "preprocessing": images.PREPROCESSING,
            "size": size,
            "source": index.source,
            **crop_spec.key(),
        },
    )
    newest = 0
    for name, path in zip(index.files, index.paths):
        stat = _stat(path)
        _update(digest, [name, stat.st_size, stat.st_mtime_ns])
        newest = max(newest, stat.st_mtime_ns)
    for name in METADATA_FILES:
        if (index.root / name).is_file():
            _update(digest, [name, sha256_of(index.root / name)])
    _update(digest, {"excluded": sorted(index.excluded)})
    return digest.hexdigest(), newest


def _update(digest, value) -> None:
    digest.update(json.dumps(value, sort_keys=True).encode() + b"\n")


def _stat(path: Path) -> os.stat_result:
    try:
        return path.stat()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None


def is_valid(folder: Path, key: str, count: int, size: int) -> bool:
    """A complete build for this key: manifest present and matching, array of the right shape."""
    try:
        manifest = json.loads((folder / MANIFEST_FILE).read_text())
        array = np.load(folder / IMAGES_FILE, mmap_mode="r")
    except (OSError, ValueError):
        return False
    expected = {"key": key, "count": count, "size": size, "complete": True, "format": CACHE_FORMAT}
    matches = "checksum" in manifest and all(manifest.get(k) == v for k, v in expected.items())
    return matches and array.shape == (count, size, size) and array.dtype == np.uint8


def _build(index: DataIndex, size: int, crop_spec: CropSpec, folder: Path, workers: int, progress: bool) -> None:
    """Build, refusing early when the disk lacks the space; a full or read-only disk is one line naming the folder."""
    from cxrbench.files import require_space

    try:
        require_space(folder.parent, len(index) * size * size + CHECKSUM_BLOCK, "the prepared cache")
        folder.parent.mkdir(parents=True, exist_ok=True)
        _build_into(index, size, crop_spec, folder, workers, progress)
    except StorageError as exc:
        raise StorageError(f"{exc} (the cache folder is $CXRBENCH_CACHE/prepared, or --cache)") from None
    except OSError as exc:
        if not is_storage_fault(exc):
            raise
        raise StorageError(
            f"{storage_error(exc, folder.parent)} (the cache folder is $CXRBENCH_CACHE/prepared, or --cache)"
        ) from None


def _build_into(index: DataIndex, size: int, crop_spec: CropSpec, folder: Path, workers: int, progress: bool) -> None:
    building = Path(tempfile.mkdtemp(prefix=f".{folder.name[:16]}.", dir=folder.parent))
    try:
        started = time.monotonic()
        array = np.lib.format.open_memmap(
            building / IMAGES_FILE, mode="w+", dtype=np.uint8, shape=(len(index), size, size)
        )
        del array  # created at full size; every worker opens it itself
        _allocate(building / IMAGES_FILE)
        report = ProgressReport(len(index), "preparing images" + (" (lung crop)" if crop_spec.active else ""))
        boxes: dict[int, CropBox] = {}

        def advance(done: tuple[int, dict[int, CropBox]]) -> None:
            boxes.update(done[1])
            if progress:
                report.advance(done[0])

        jobs = [
            (building / IMAGES_FILE, start, paths, size, crop_spec) for start, paths in _chunks(index.paths, workers)
        ]
        run_parallel(_fill_rows, jobs, workers, advance)
        _fsync(building / IMAGES_FILE)
        crop_record = None
        if crop_spec.active:
            ordered = [boxes[row] for row in range(len(index))]
            (building / crop.BOXES_FILE).write_text(crop.boxes_csv(index.files, ordered), encoding="utf-8")
            crop_record = {**crop_spec.describe(), "fallbacks": sum(box.fallback for box in ordered)}
        _write_manifest(building, index, size, folder.name, workers, time.monotonic() - started, crop_record)
        _fsync(building)
        _publish(building, folder, lambda: is_valid(folder, folder.name, len(index), size))
        _fsync(folder.parent)
        if progress:
            report.finish()
    finally:
        shutil.rmtree(building, ignore_errors=True)


def _allocate(npy: Path) -> None:
    """Reserve the array's blocks now: a full disk is an OSError here, not a SIGBUS in a worker writing the memmap."""
    fd = os.open(npy, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    finally:
        os.close(fd)


def _chunks(paths: list[Path], workers: int) -> list[tuple[int, list[Path]]]:
    """Row chunks small enough to balance the workers and report progress, large enough to be cheap."""
    step = max(8, min(256, len(paths) // (workers * 8) or 1))
    return [(start, paths[start : start + step]) for start in range(0, len(paths), step)]


def _fill_rows(
    npy: Path, start: int, paths: list[Path], size: int, crop_spec: CropSpec
) -> tuple[int, dict[int, CropBox]]:
    """Decode (and crop) a chunk of images straight into rows ``start...`` of the memmap (runs in a worker).

    Returns the number of rows and, with a crop, each row's box.
    """
    array = np.load(npy, mmap_mode="r+")
    boxes = {}
    for offset, path in enumerate(paths):
        if crop_spec.active:
            gray, boxes[start + offset] = crop.crop_gray(images.decode_gray(path), crop_spec)
            array[start + offset] = images.resize_gray(gray, size)
        else:
            array[start + offset] = images.load_gray(path, size)
    array.flush()
    return len(paths), boxes


def run_parallel(function: Callable[..., object], jobs: Iterable[tuple], workers: int, advance: Callable) -> None:
    """Run ``function(*job)`` for every job over ``workers`` processes (in this one for 1).

    The first failure cancels the rest and is raised as is (a :class:`DataError` names its file).
    ``advance`` receives each job's return value, in completion order (progress, results).
    """
    jobs = list(jobs)
    if workers <= 1:
        for job in jobs:
            advance(function(*job))
        return
    with ProcessPoolExecutor(
        max_workers=min(workers, len(jobs)), mp_context=_context(), initializer=_leave_ctrl_c_to_parent
    ) as pool:
        pending = {pool.submit(function, *job) for job in jobs}
        try:
            while pending:
                done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                for future in done:
                    if future.exception() is not None:
                        raise future.exception()
                    advance(future.result())
        except BaseException:  # a failed job or Ctrl-C: drop the queued jobs, wait only for the running ones
            pool.shutdown(cancel_futures=True)
            raise


def _leave_ctrl_c_to_parent() -> None:
    """Ctrl-C reaches the whole process group: the parent cancels the pool; workers print nothing."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _context():
    """forkserver: safe when the caller's process already runs threads (forking those is not)."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])  # workers fork with numpy and Pillow already imported
    return context


def _write_manifest(
    building: Path, index: DataIndex, size: int, key: str, workers: int, seconds: float, crop_record: dict | None
) -> None:
    manifest = {
        "format": CACHE_FORMAT,
        "key": key,
        "count": len(index),
        "size": size,
        "dtype": "uint8",
        "preprocessing": images.PREPROCESSING,
        "source": index.source,
        "crop": crop_record,
        "root": str(index.root),
        "files_sha256": hashlib.sha256("\n".join(index.files).encode()).hexdigest(),
        "workers": workers,
        "build_seconds": round(seconds, 3),
        "checksum": _checksum(building / IMAGES_FILE),
        "complete": True,  # written last: a manifest without it is never loaded
    }
    path = building / MANIFEST_FILE
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    _fsync(path)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _publish(building: Path, folder: Path, is_current: Callable[[], bool]) -> None:
    """Rename the finished build into place; keep a concurrent build's if it got there first."""
    try:
        os.rename(building, folder)
        return
    except OSError:
        if is_current():
            return
    stale = folder.with_name(f"{building.name}.stale")  # an invalid leftover: move it aside atomically
    os.rename(folder, stale)
    os.rename(building, folder)
    shutil.rmtree(stale, ignore_errors=True)


class ProgressReport:
    """A plain-text progress line on stderr, redrawn at most twice a second."""

    def __init__(self, total: int, what: str):
        self.total, self.what, self.done = total, what, 0
        self.started = self.shown = time.monotonic()

    def advance(self, count: int) -> None:
        self.done += count
        if time.monotonic() - self.shown >= 0.5:
            self._show("\r")

    def finish(self) -> None:
        self._show("\r")
        sys.stderr.write("\n")

    def _show(self, prefix: str) -> None:
        self.shown = time.monotonic()
        rate = self.done / max(self.shown - self.started, 1e-9)
        sys.stderr.write(
            f"{prefix}{self.what}: {self.done}/{self.total} ({100 * self.done / self.total:.0f}%, {rate:.0f}/s)"
        )
        sys.stderr.flush()
