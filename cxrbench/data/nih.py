"""Read an NIH ChestX-ray14 folder as distributed (or the phantom, which writes the same format).

Decisions:

* ``Data_Entry_2017_v2020.csv`` is preferred when both entry files are present: it is NIH's
  corrected revision. Columns are found by name, so the 2017 file's trailing comma (a 12th, empty
  column) and its absence in v2020 read the same.
* ``Finding Labels`` is split on ``|`` and every part must equal a name of
  :data:`~cxrbench.data.classes.CLASSES` or ``No Finding`` exactly (``Pleural Thickening`` with a space
  is an error, not a silently zeroed label).
* Images listed but found in no images folder are dropped with a warning and a note (``cxrbench
  data check`` lists them); the index records them in ``DataIndex.missing``.
* Exclusion list names unknown to the data set are a warning, not an error: the published list of
  1,224 poor-quality images names files of the full data set, and applying it to a subset (a
  sample, a partial download) is legitimate. A non-empty list of which *no* name matches is an
  error: that is the wrong file, not a subset.
"""

from __future__ import annotations

import csv
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cxrbench.data import splits
from cxrbench.data.classes import CLASSES, NO_FINDING
from cxrbench.data.images import png_size
from cxrbench.data.index import Box, DataIndex
from cxrbench.errors import DataError

ENTRY_FILES = ("Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv")  #: in order of preference
BOX_FILE = "BBox_List_2017.csv"
TRAIN_VAL_LIST = "train_val_list.txt"
TEST_LIST = "test_list.txt"
#: Every metadata file the index depends on (the prepared cache hashes those present).
METADATA_FILES = (*ENTRY_FILES, BOX_FILE, TRAIN_VAL_LIST, TEST_LIST)
REQUIRED_COLUMNS = ("Image Index", "Finding Labels", "Patient ID", "View Position")
#: NIH box coordinates refer to the 1024 x 1024 release of the images.
BOX_FRAME = 1024
#: NIH's box file spells Infiltration this way.
BOX_LABEL_ALIASES = {"Infiltrate": "Infiltration"}
_NIH_NAME = re.compile(r"^(\d{8})_\d{3}\.png$")


class DataWarning(UserWarning):
    """Something was dropped or looks inconsistent; the same text goes into ``DataIndex.notes``."""


@dataclass
class _Entries:
    files: list[str]
    labels: np.ndarray
    patients: np.ndarray
    views: list[str]


def read_index(
    root: Path,
    *,
    split: str = "official",
    val_fraction: float = 0.1,
    seed: int = 0,
    exclude: Path | None = None,
    source: str = "chestxray14",
) -> DataIndex:
    """Index an NIH-format folder: labels, patients, views, a patient-disjoint split and boxes."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: data set folder not found")
    if split not in splits.SPLIT_METHODS:
        raise DataError(f"data.split = {split!r}: expected one of {', '.join(splits.SPLIT_METHODS)}")
    notes: list[str] = []
    entries = _sorted(read_entries(_entry_file(root)))
    _note_patient_prefixes(entries, notes)
    keep = np.ones(len(entries.files), dtype=bool)
    excluded = _apply_exclusions(exclude, entries.files, keep, notes) if exclude else []
    found = find_images(root)
    missing = [f for f, k in zip(entries.files, keep) if k and f not in found]
    if missing:
        _note(notes, f"{len(missing)} images listed in the entry file were found in no images folder: dropped")
    keep &= np.fromiter((f in found for f in entries.files), bool, len(entries.files))
    kept = _subset(entries, keep)
    result = _split(root, kept, split, val_fraction, seed)
    for note in result.notes:
        _note(notes, note)
    final = _subset(kept, result.split != "")
    split_of = result.split[result.split != ""]
    _check_splits(root, split, split_of)
    return DataIndex(
        root=root,
        source=source,
        files=final.files,
        paths=[found[f] for f in final.files],
        labels=final.labels,
        patients=final.patients,
        views=final.views,
        split=split_of,
        boxes=_read_boxes_for(root, found, set(final.files), notes),
        notes=notes,
        missing=missing,
        excluded=excluded,
    )


def _note(notes: list[str], text: str) -> None:
    notes.append(text)
    warnings.warn(text, DataWarning, stacklevel=3)


def _entry_file(root: Path) -> Path:
    for name in ENTRY_FILES:
        if (root / name).is_file():
            return root / name
    raise DataError(f"{root}: no {' or '.join(ENTRY_FILES)} found")


def read_entries(path: Path) -> _Entries:
    """Parse the entry CSV: columns by name, labels matched exactly, one row per image."""
    with _open_csv(path) as f:
        rows = csv.reader(f)
        header = [h.strip() for h in next(rows, [])]
        column = {name: header.index(name) for name in REQUIRED_COLUMNS if name in header}
        for name in REQUIRED_COLUMNS:
            if name not in column:
                raise DataError(f"{path}: missing column {name!r}")
        width = max(column.values()) + 1
        files, labels, patients, views, seen = [], [], [], [], set()
        for line, row in enumerate(rows, start=2):
            if not any(cell.strip() for cell in row):
                continue
            if len(row) < width:
                raise DataError(f"{path}, line {line}: {len(row)} fields, expected at least {width}")
            name = row[column["Image Index"]].strip()
            if name in seen:
                raise DataError(f"{path}, line {line}: image {name!r} listed twice")
            seen.add(name)
            files.append(name)
            labels.append(parse_labels(row[column["Finding Labels"]], path, line))
            patients.append(_parse_patient(row[column["Patient ID"]], path, line))
            views.append(row[column["View Position"]].strip())
    if not files:
        raise DataError(f"{path}: no images listed")
    return _Entries(files, np.array(labels, dtype=np.uint8), np.array(patients, dtype=np.int64), views)


def _open_csv(path: Path):
    try:
        return open(path, newline="", encoding="utf-8-sig")
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None


def parse_labels(text: str, path: Path, line: int) -> list[int]:
    """``Finding Labels`` -> 0/1 per class; exact names only, ``No Finding`` alone."""
    parts = [p.strip() for p in text.split("|")]
    vector = [0] * len(CLASSES)
    if parts == [NO_FINDING]:
        return vector
    for label in parts:
        if label not in CLASSES:
            hint = " (cannot be combined with findings)" if label == NO_FINDING else ""
            raise DataError(f"{path}, line {line}: unknown label {label!r}{hint}")
        vector[CLASSES.index(label)] = 1
    return vector


def _parse_patient(text: str, path: Path, line: int) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise DataError(f"{path}, line {line}: Patient ID {text!r} is not a number") from None


def _sorted(entries: _Entries) -> _Entries:
    return _subset(entries, np.argsort(np.asarray(entries.files, dtype=object), kind="stable"))


def _subset(entries: _Entries, rows: np.ndarray) -> _Entries:
    """The rows selected by a boolean mask or an index array, in that order."""
    rows = np.flatnonzero(rows) if rows.dtype == bool else rows
    return _Entries(
        [entries.files[i] for i in rows], entries.labels[rows], entries.patients[rows], [entries.views[i] for i in rows]
    )


def _note_patient_prefixes(entries: _Entries, notes: list[str]) -> None:
    """NIH names are ``PPPPPPPP_FFF.png`` with P the patient id; the ``Patient ID`` column wins."""
    mismatched = [
        f
        for f, p in zip(entries.files, entries.patients)
        if (m := _NIH_NAME.match(f)) is not None and int(m.group(1)) != p
    ]
    if mismatched:
        _note(
            notes,
            f"{len(mismatched)} images have a file-name prefix other than their Patient ID (e.g. {mismatched[0]}); "
            "the Patient ID column is used",
        )


def read_name_list(path: Path) -> list[str]:
    """One file name per line; blank lines and ``#`` comments ignored."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    names = (line.strip() for line in text.splitlines())
    return [n for n in names if n and not n.startswith("#")]


def _apply_exclusions(path: Path, files: list[str], keep: np.ndarray, notes: list[str]) -> list[str]:
    """Clear ``keep`` for excluded rows; return the excluded names that were in the data set."""
    names = set(read_name_list(path))
    hits = [i for i, f in enumerate(files) if f in names]
    if names and not hits:
        raise DataError(f"{path}: none of its {len(names)} names is an image of this data set (wrong exclusion list?)")
    keep[hits] = False
    unknown = len(names) - len(hits)
    if unknown:
        _note(notes, f"{path.name}: {unknown} of {len(names)} excluded names are not in this data set (ignored)")
    notes.append(f"excluded {len(hits)} images listed in {path.name}")
    return [files[i] for i in hits]


def find_images(root: Path) -> dict[str, Path]:
    """File name -> path, from a flat ``images/`` folder and/or ``images_0XX/images/`` folders."""
    folders = [root / "images"] + sorted(p / "images" for p in root.glob("images_*") if p.is_dir())
    found: dict[str, Path] = {}
    for folder in folders:
        if not folder.is_dir():
            continue
        with os.scandir(folder) as it:
            for entry in it:
                if entry.name.endswith(".png") and entry.name not in found:
                    found[entry.name] = Path(entry.path)
    return found


def _split(root: Path, entries: _Entries, method: str, val_fraction: float, seed: int) -> splits.SplitResult:
    if method == "random-70-10-20":
        return splits.random_split(entries.patients, seed)
    lists = [root / TRAIN_VAL_LIST, root / TEST_LIST]
    for path in lists:
        if not path.is_file():
            raise DataError(f"{path}: not found (needed by data.split = 'official')")
    train_val, test = (set(read_name_list(p)) for p in lists)
    return splits.official_split(entries.files, entries.patients, train_val, test, val_fraction, seed)


def _check_splits(root: Path, method: str, split: np.ndarray) -> None:
    for name in ("train", "val", "test"):
        if not (split == name).any():
            raise DataError(
                f"{root}: split {name!r} is empty (data.split = {method!r}, after exclusions and missing files)"
            )


def _read_boxes_for(root: Path, found: dict[str, Path], kept: set[str], notes: list[str]) -> list[Box]:
    path = root / BOX_FILE
    if not path.is_file():
        return []
    raw = read_box_file(path)
    boxes = [b for b in raw if b[0] in kept]
    if len(boxes) < len(raw):
        notes.append(f"{BOX_FILE}: {len(raw) - len(boxes)} boxes refer to images not in the index (ignored)")
    frames = {name: png_size(found[name]) for name in {b[0] for b in boxes}}
    scaled = (_in_frame(box, *frames[box[0]]) for box in boxes)
    return sorted(scaled, key=lambda b: (b.image, CLASSES.index(b.label)))


def _in_frame(box: tuple, frame_w: int, frame_h: int) -> Box:
    """A 1024-frame box scaled to the pixels of the file it refers to."""
    name, label, x, y, w, h = box
    fx, fy = frame_w / BOX_FRAME, frame_h / BOX_FRAME
    return Box(name, label, x * fx, y * fy, w * fx, h * fy, frame_w, frame_h)


def read_box_file(path: Path) -> list[tuple[str, str, float, float, float, float]]:
    """``BBox_List_2017.csv`` rows in the 1024 frame; ``Infiltrate`` mapped to ``Infiltration``.

    The header (``Image Index,Finding Label,Bbox [x,y,w,h],,,``) splits into more fields than the
    6-field rows, so rows are read by position and trailing empty fields are ignored.
    """
    with _open_csv(path) as f:
        rows = csv.reader(f)
        header = [h.strip() for h in next(rows, [])]
        if header[:2] != ["Image Index", "Finding Label"] or len(header) < 3 or not header[2].startswith("Bbox"):
            raise DataError(
                f"{path}: unexpected header {','.join(header)!r}, "
                "expected 'Image Index,Finding Label,Bbox [x,y,w,h],,,'"
            )
        out = []
        for line, row in enumerate(rows, start=2):
            fields = [cell.strip() for cell in row]
            while fields and not fields[-1]:
                fields.pop()
            if not fields:
                continue
            if len(fields) != 6:
                raise DataError(f"{path}, line {line}: {len(fields)} fields, expected 6 (image, label, x, y, w, h)")
            label = BOX_LABEL_ALIASES.get(fields[1], fields[1])
            if label not in CLASSES:
                raise DataError(f"{path}, line {line}: unknown label {fields[1]!r}")
            out.append((fields[0], label, *_floats(fields[2:], path, line)))
    return out


def _floats(cells: list[str], path: Path, line: int) -> list[float]:
    try:
        return [float(c) for c in cells]
    except ValueError:
        raise DataError(f"{path}, line {line}: box coordinates {cells} are not numbers") from None
