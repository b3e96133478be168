"""The report's CAM gallery: the same test images and classes for every backend, side by side, as inline PNGs.

A backend's worker normally writes annotated PNGs (``cams/`` + ``cams/index.json``: a list of
``{"file", "image", "position", "class"}``). When it wrote only ``cams.npz`` (``positions``,
``classes`` (indices into CLASSES), ``maps`` uint8 0-255; optional ``images`` uint8 gray and ``true_boxes`` rows of
``(k, x, y, w, h)``), the gallery draws the picture itself with the run's own overlay
(:func:`cxrbench.cam.overlay.overlay`) and the boxes the run's ``eval.cam_method`` predicts.
"""

from __future__ import annotations

import base64
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from cxrbench.cam.overlay import overlay
from cxrbench.data.classes import CLASSES
from cxrbench.files import load_npz
from cxrbench.report.load import BackendRun
from cxrbench.run.folder import CAMS_DIR, CAMS_INDEX, CAMS_NPZ

#: Larger PNGs are shrunk before embedding, so the report stays small whatever the image size.
MAX_SIDE = 256


@dataclass(frozen=True)
class Tile:
    image: str  #: test image file name (or position when the name is unknown)
    label: str  #: class name
    uri: str  #: data: URI of the PNG


def png_uri(image: Image.Image) -> str:
    """A data: URI of ``image`` as PNG, shrunk to :data:`MAX_SIDE` when larger."""
    if max(image.size) > MAX_SIDE:
        image = image.copy()
        image.thumbnail((MAX_SIDE, MAX_SIDE))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _tiles_from_pngs(folder: Path, notes: list[str]) -> list[Tile] | None:
    index_path = folder / CAMS_INDEX
    if not index_path.is_file():
        return None
    try:
        entries = json.loads(index_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        notes.append(f"{index_path}: not valid JSON ({exc})")
        return None
    tiles = []
    for entry in entries if isinstance(entries, list) else []:
        path = folder / CAMS_DIR / Path(str(entry.get("file", ""))).name
        try:
            with Image.open(path) as image:
                uri = png_uri(image.convert("RGB"))
        except (OSError, ValueError) as exc:
            notes.append(f"{path}: unreadable CAM image ({type(exc).__name__})")
            continue
        tiles.append(Tile(str(entry.get("image", entry.get("position", "?"))), str(entry.get("class", "?")), uri))
    return tiles


def _class_name(value) -> str:
    """cams.npz stores classes as indices into CLASSES (or as names)."""
    return CLASSES[int(value)] if np.issubdtype(np.asarray(value).dtype, np.integer) else str(value)


def _tiles_from_npz(folder: Path, threshold: float, method: str, notes: list[str]) -> list[Tile] | None:
    from cxrbench.metrics.localisation import heatmap_to_boxes

    path = folder / CAMS_NPZ
    if not path.is_file():
        return None
    try:
        arrays = load_npz(path)
        positions, classes, maps = arrays["positions"], arrays["classes"], arrays["maps"]
    except (OSError, KeyError, ValueError) as exc:
        notes.append(f"{path}: unreadable ({type(exc).__name__}: {exc})")
        return None
    images = arrays.get("images")
    true_boxes = arrays.get("true_boxes", np.zeros((0, 5)))
    tiles = []
    for k in range(len(maps)):
        truth = [tuple(row[1:]) for row in true_boxes if int(row[0]) == k]
        predicted = heatmap_to_boxes(maps[k], threshold, method)
        image = overlay(images[k] if images is not None else None, maps[k], truth, predicted)
        tiles.append(Tile(str(positions[k]), _class_name(classes[k]), png_uri(image)))
    return tiles


def backend_tiles(backend: BackendRun, threshold: float, method: str, notes: list[str]) -> list[Tile]:
    """A backend's gallery: its annotated PNGs, else drawn from cams.npz (boxes by ``eval.cam_method``
    ``method`` at ``eval.cam_threshold`` ``threshold``), else nothing."""
    tiles = _tiles_from_pngs(backend.folder, notes)
    if tiles is None:
        tiles = _tiles_from_npz(backend.folder, threshold, method, notes)
    return tiles or []


def gallery_rows(tiles: dict[str, list[Tile]]) -> list[tuple[str, str, dict[str, Tile]]]:
    """(image, class, {backend: tile}) rows in first-seen order: same image and class on one row."""
    rows: dict[tuple[str, str], dict[str, Tile]] = {}
    for backend, backend_tiles_ in tiles.items():
        for tile in backend_tiles_:
            rows.setdefault((tile.image, tile.label), {})[backend] = tile
    return [(image, label, cells) for (image, label), cells in rows.items()]
