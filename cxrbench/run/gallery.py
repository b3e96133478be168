"""CAM gallery images: the gray image, the class's heat map, the true box(es) and the predicted boxes.

Drawn with Pillow (no plotting library in the worker); each (image, class) becomes one PNG in
``cams/``, listed in ``cams/index.json``; the normalised maps go to ``cams.npz``.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from cxrbench.classes import CLASSES
from cxrbench.run.store import save_npz, write_json, write_with

#: Gallery PNGs are scaled up to at least this many pixels a side so 64 px images stay legible.
MIN_SIDE = 256
TRUE_COLOUR, PREDICTED_COLOUR = (0, 255, 0), (255, 255, 0)


def to_uint8(heatmap: np.ndarray) -> np.ndarray:
    """Min-max normalise a heat map to 0-255 (a flat map becomes all zeros)."""
    low, high = float(heatmap.min()), float(heatmap.max())
    if high == low:
        return np.zeros(heatmap.shape, dtype=np.uint8)
    return np.round((heatmap - low) / (high - low) * 255.0).astype(np.uint8)


def overlay(image: np.ndarray, heat: np.ndarray, true_boxes, predicted_boxes) -> Image.Image:
    """Gray image with the heat map blended in red/blue, true boxes green, predicted boxes yellow."""
    gray = image.astype(np.float32)[..., None].repeat(3, axis=2)
    h = heat.astype(np.float32)[..., None] / 255.0
    colour = np.concatenate([h, np.zeros_like(h), 1.0 - h], axis=2) * 255.0
    blended = Image.fromarray(np.clip(0.6 * gray + 0.4 * colour, 0, 255).astype(np.uint8))
    scale = max(1, -(-MIN_SIDE // image.shape[0]))
    canvas = blended.resize((image.shape[1] * scale, image.shape[0] * scale), Image.NEAREST)
    draw = ImageDraw.Draw(canvas)
    for boxes, colour_rgb in ((predicted_boxes, PREDICTED_COLOUR), (true_boxes, TRUE_COLOUR)):
        for x, y, w, h_ in boxes:
            draw.rectangle([x * scale, y * scale, (x + w) * scale - 1, (y + h_) * scale - 1], outline=colour_rgb, width=2)
    return canvas


def write(folder: Path, images, maps, positions, class_indices, truth_local, threshold, files,
          method: str = "relative") -> None:
    """One PNG per (shown image, class of one of its boxes)."""
    from cxrbench.metrics.localisation import heatmap_to_boxes

    out = Path(folder) / "cams"
    out.mkdir(parents=True, exist_ok=True)
    column = {c: j for j, c in enumerate(class_indices)}
    entries, kept_positions, kept_classes, kept_maps = [], [], [], []
    for i, (position, name) in enumerate(zip(positions, files)):
        labels = sorted({box.label for pos, box in truth_local if pos == i}, key=CLASSES.index)
        for label in labels:
            c = CLASSES.index(label)
            heat = to_uint8(maps[i, column[c]])
            true_boxes = [(b.x, b.y, b.w, b.h) for pos, b in truth_local if pos == i and b.label == label]
            predicted = heatmap_to_boxes(maps[i, column[c]], threshold, method)
            png = f"{i:03d}_{label}.png"
            write_with(out / png, partial(overlay(images[i], heat, true_boxes, predicted).save, format="PNG"))
            entries.append({"file": png, "image": name, "position": int(position), "class": label,
                            "true_boxes": true_boxes, "predicted_boxes": predicted})
            kept_positions.append(position)
            kept_classes.append(c)
            kept_maps.append(heat)
    write_json(out / "index.json", entries)
    size = images.shape[1] if len(images) else 0
    save_npz(Path(folder) / "cams.npz", positions=np.asarray(kept_positions, dtype=np.int64),
             classes=np.asarray(kept_classes, dtype=np.int64),
             maps=np.asarray(kept_maps, dtype=np.uint8).reshape(-1, size, size))
