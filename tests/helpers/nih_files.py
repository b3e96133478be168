"""Write small NIH ChestX-ray14-format folders for tests, in every format variant NIH has shipped.

The writer knows nothing of cxrbench's reader: it writes the files as NIH distributes them, so
tests can compare what the reader returns with what was written.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

ENTRY_COLUMNS = (
    "Image Index",
    "Finding Labels",
    "Follow-up #",
    "Patient ID",
    "Patient Age",
    "Patient Gender",
    "View Position",
    "OriginalImage[Width",
    "Height]",
    "OriginalImagePixelSpacing[x",
    "y]",
)
BOX_HEADER = "Image Index,Finding Label,Bbox [x,y,w,h],,,"


@dataclass(frozen=True)
class Entry:
    name: str
    labels: str  #: the ``Finding Labels`` text, e.g. "Effusion|Mass" or "No Finding"
    patient: int
    view: str = "PA"
    mode: str = "L"  #: PNG mode written: L, RGB, RGBA, P or I;16


def entries(patients: int, per_patient: int, label_cycle: Sequence[str]) -> list[Entry]:
    """``patients x per_patient`` entries named ``PPPPPPPP_FFF.png``, labels taken in turn from the cycle."""
    out = []
    for p in range(1, patients + 1):
        for f in range(per_patient):
            out.append(Entry(f"{p:08d}_{f:03d}.png", label_cycle[len(out) % len(label_cycle)], p))
    return out


def gray_pattern(name: str, size: int) -> np.ndarray:
    """The 8-bit gray content written for ``name``: a gradient plus a per-file offset."""
    offset = sum(name.encode()) % 50
    ramp = np.add.outer(np.arange(size), 2 * np.arange(size)) % 200
    return (ramp + offset).astype(np.uint8)


def write_png(path: Path, gray: np.ndarray, mode: str) -> None:
    """``gray`` stored as ``mode``; every mode decodes back to ``gray`` exactly."""
    if mode == "L":
        image = Image.fromarray(gray)
    elif mode in ("RGB", "RGBA"):
        channels = [gray] * 3 + ([np.full_like(gray, 255)] if mode == "RGBA" else [])
        image = Image.fromarray(np.stack(channels, axis=-1))
    elif mode == "P":
        # Reversed palette: index i shows gray 255 - i, so only a decoder that applies it gets ``gray``.
        image = Image.frombytes("P", gray.shape[::-1], (255 - gray).tobytes())
        image.putpalette([v for i in range(256) for v in (255 - i,) * 3])
    elif mode == "I;16":
        image = Image.fromarray(gray.astype(np.uint16) * 257)
    else:
        raise ValueError(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")


def write_dataset(
    root: Path,
    items: Iterable[Entry],
    *,
    variant: str = "2017",
    test_patients: Iterable[int] = (),
    boxes: Iterable[tuple] = (),
    layout: str = "flat",
    size: int = 32,
    drop_columns: Iterable[str] = (),
    not_written: Iterable[str] = (),
) -> Path:
    """An NIH-format folder.

    ``variant`` "2017" writes ``Data_Entry_2017.csv`` with its trailing comma, "v2020" the
    revision without. ``layout`` "flat" puts images in ``images/``, "nested" alternates
    ``images_001/images/`` and ``images_002/images/``. ``boxes`` are ``(name, label, x, y, w, h)``
    in the 1024 frame, written under NIH's 9-field header. ``not_written`` names images listed but
    absent on disk.
    """
    items = list(items)
    root.mkdir(parents=True, exist_ok=True)
    _write_entries(root, items, variant, size, set(drop_columns))
    test_patients = set(test_patients)
    (root / "train_val_list.txt").write_text("".join(f"{e.name}\n" for e in items if e.patient not in test_patients))
    (root / "test_list.txt").write_text("".join(f"{e.name}\n" for e in items if e.patient in test_patients))
    box_lines = [BOX_HEADER] + [",".join(str(v) for v in box) for box in boxes]
    (root / "BBox_List_2017.csv").write_text("\n".join(box_lines) + "\n")
    skipped = set(not_written)
    for i, e in enumerate(items):
        if e.name not in skipped:
            write_png(image_path(root, i, e.name, layout), gray_pattern(e.name, size), e.mode)
    return root


def image_path(root: Path, i: int, name: str, layout: str) -> Path:
    folder = root / "images" if layout == "flat" else root / f"images_{1 + i % 2:03d}" / "images"
    return folder / name


def _write_entries(root: Path, items: list[Entry], variant: str, size: int, drop: set[str]) -> None:
    keep = [i for i, c in enumerate(ENTRY_COLUMNS) if c not in drop]
    trailing = "," if variant == "2017" else ""
    lines = [",".join(ENTRY_COLUMNS[i] for i in keep) + trailing]
    for f, e in enumerate(items):
        row = (e.name, e.labels, str(f % 3), str(e.patient), "45", "F", e.view, "2500", "2048", "0.143", "0.143")
        lines.append(",".join(row[i] for i in keep) + trailing)
    name = "Data_Entry_2017.csv" if variant == "2017" else "Data_Entry_2017_v2020.csv"
    (root / name).write_text("\n".join(lines) + "\n")


def truncate(path: Path, keep: float = 0.5) -> None:
    """Cut a file to a fraction of its bytes, as an interrupted download would."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
