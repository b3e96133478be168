"""``cxrbench predict``: score pictures with an export, framework-free, in batches; a table out, CAMs optional.

A picture that cannot be read is named on stderr and skipped (the others are still scored and printed);
the exit status then says that something was skipped.
"""

from __future__ import annotations

import csv
import glob
import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from cxrbench.cam.files import overlay_png
from cxrbench.deploy import images
from cxrbench.deploy.model import ScoringModel, top_classes
from cxrbench.errors import CxrError
from cxrbench.suite import EvalSettings

SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom")
PROGRESS_AFTER = 2  #: batches before a progress line is worth printing


@dataclass
class Row:
    file: str
    probabilities: np.ndarray
    cams: list[dict[str, Any]] = field(default_factory=list)


def expand(inputs: list[str]) -> list[Path]:
    """Files, folders (their pictures, sorted) and globs, in the order given; an empty match is an error."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if any(ch in item for ch in "*?["):
            found = sorted(Path(p) for p in glob.glob(item, recursive=True) if Path(p).is_file())
        elif path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in SUFFIXES)
        elif path.is_file():
            found = [path]
        else:
            raise CxrError(f"{item}: no such file or folder")
        if not found:
            raise CxrError(f"{item}: no pictures ({', '.join(SUFFIXES)}) found")
        files.extend(found)
    return files


def _batches(
    model: ScoringModel, files: list[Path], batch_size: int, max_pixels: int, skipped: list[str]
) -> Iterator[tuple[list[Path], np.ndarray]]:
    """Decoded pictures prepared for ``model`` (cropped as trained, resized) ``batch_size`` at a time; unreadable
    ones recorded in ``skipped``."""
    for start in range(0, len(files), batch_size):
        names, pixels = [], []
        for path in files[start : start + batch_size]:
            try:
                pixels.append(model.prepare(images.read(path, max_pixels)))
                names.append(path)
            except images.ImageError as exc:
                skipped.append(str(exc))
                print(f"cxrbench: skipped {exc}", file=sys.stderr)
        if names:
            yield names, np.stack(pixels)


class Progress:
    """One self-overwriting line on stderr: pictures done, of how many, and the rate so far."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled, self.done, self.start = total, enabled, 0, time.perf_counter()

    def advance(self, n: int) -> None:
        self.done += n
        if self.enabled:
            rate = self.done / max(time.perf_counter() - self.start, 1e-9)
            print(f"\rscored {self.done}/{self.total} pictures ({rate:.1f} img/s)", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.enabled:
            print(file=sys.stderr)


def score_files(
    model: ScoringModel,
    files: list[Path],
    batch_size: int,
    max_pixels: int,
    cam_dir: Path | None,
    cam_classes: list[int] | None,
    top_k: int,
) -> tuple[list[Row], list[str]]:
    """Every readable file's probabilities (and overlays written to ``cam_dir``), and the skipped files' messages."""
    skipped: list[str] = []
    rows: list[Row] = []
    progress = Progress(len(files), enabled=len(files) > PROGRESS_AFTER * batch_size)
    if cam_dir is not None:
        cam_dir.mkdir(parents=True, exist_ok=True)
    for names, pixels in _batches(model, files, batch_size, max_pixels, skipped):
        scores = model.score(pixels, list(range(len(model.classes))) if cam_dir is not None else None)
        for i, (path, probabilities) in enumerate(zip(names, scores.probabilities)):
            row = Row(str(path), probabilities)
            if cam_dir is not None:
                chosen = cam_classes if cam_classes is not None else top_classes(probabilities, top_k)
                row.cams = [
                    _write_cam(cam_dir, len(rows), path, pixels[i], scores.maps[i, c], model.classes[c]) for c in chosen
                ]
            rows.append(row)
        progress.advance(len(names))
    progress.close()
    return rows, skipped


def _write_cam(folder: Path, position: int, path: Path, image: np.ndarray, cam_map: np.ndarray, label: str) -> dict:
    png, boxes = overlay_png(image, cam_map, EvalSettings.cam_method, EvalSettings.cam_threshold)
    out = folder / f"{position:05d}_{path.stem}_{label}.png"
    out.write_bytes(png)
    return {"class": label, "file": str(out), "boxes": boxes}


def write_table(rows: list[Row], classes: list[str], fmt: str, out: TextIO) -> None:
    """CSV (``file`` then one probability column per class) or JSON (a list of objects)."""
    if fmt == "json":
        json.dump([_as_json(row, classes) for row in rows], out, indent=2)
        out.write("\n")
        return
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["file", *classes])
    for row in rows:
        writer.writerow([row.file, *(f"{p:.6g}" for p in row.probabilities)])


def _as_json(row: Row, classes: list[str]) -> dict[str, Any]:
    entry: dict[str, Any] = {"file": row.file, "probabilities": dict(zip(classes, map(float, row.probabilities)))}
    if row.cams:
        entry["cams"] = row.cams
    return entry


def run(args) -> int:
    """The ``predict`` command: table on stdout, skipped pictures on stderr; 2 when any was skipped."""
    from cxrbench.deploy.model import load_model

    if args.batch_size < 1 or args.top_k < 1:
        raise CxrError(f"--batch-size and --top-k must be at least 1, got {args.batch_size} and {args.top_k}")
    model = load_model(args)
    cam_classes = model.class_indices(args.classes) if args.classes else None
    files = expand(args.images)
    rows, skipped = score_files(
        model, files, args.batch_size, args.max_pixels, Path(args.cam) if args.cam else None, cam_classes, args.top_k
    )
    write_table(rows, model.classes, args.format, sys.stdout)
    return 2 if skipped else 0
