"""CAM pictures with the boxes they predict: a backend's CAM files (one overlay PNG per (shown test image, class of
one of its boxes) in ``cams/``, listed in ``cams/index.json``, and the normalised 0-255 maps in ``cams.npz``), and a
scored picture's overlay as PNG bytes for ``cxrbench predict`` and ``serve``.

The pictures come from :func:`cxrbench.cam.overlay.overlay`, the one the report uses too.
"""

from __future__ import annotations

import io
from functools import partial
from pathlib import Path

import numpy as np

from cxrbench.cam.overlay import overlay, to_uint8
from cxrbench.data.classes import CLASSES
from cxrbench.files import save_npz, write_json, write_with
from cxrbench.run.folder import CAMS_DIR, CAMS_INDEX, CAMS_NPZ


def write(
    folder: Path, images, maps, positions, class_indices, truth_local, threshold, files, method: str = "relative"
) -> None:
    """One PNG per (shown image, class of one of its boxes)."""
    from cxrbench.metrics.localisation import heatmap_to_boxes

    out = Path(folder) / CAMS_DIR
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
            entries.append(
                {
                    "file": png,
                    "image": name,
                    "position": int(position),
                    "class": label,
                    "true_boxes": true_boxes,
                    "predicted_boxes": predicted,
                }
            )
            kept_positions.append(position)
            kept_classes.append(c)
            kept_maps.append(heat)
    write_json(Path(folder) / CAMS_INDEX, entries)
    size = images.shape[1] if len(images) else 0
    save_npz(
        Path(folder) / CAMS_NPZ,
        positions=np.asarray(kept_positions, dtype=np.int64),
        classes=np.asarray(kept_classes, dtype=np.int64),
        maps=np.asarray(kept_maps, dtype=np.uint8).reshape(-1, size, size),
    )


def overlay_png(
    image: np.ndarray, cam_map: np.ndarray, method: str, threshold: float
) -> tuple[bytes, list[list[float]]]:
    """A scored picture's overlay as PNG bytes, and the boxes ``[x, y, w, h]`` the run's recipe predicts.

    ``image`` is uint8 ``(S, S)``, ``cam_map`` one class's map ``(h, w)``: upsampled to ``S`` (bilinear, like the
    run's localisation stage) and turned into boxes by ``method``/``threshold`` (``eval.cam_method``/
    ``eval.cam_threshold``), so a served CAM looks exactly like the benchmark's.
    """
    from cxrbench.metrics.localisation import heatmap_to_boxes, upsample

    heat = upsample(cam_map[None, None].astype(np.float32), image.shape[0])[0, 0]
    boxes = [list(map(float, box)) for box in heatmap_to_boxes(heat, threshold, method)]
    buffer = io.BytesIO()
    overlay(image, to_uint8(heat), [], boxes).save(buffer, format="PNG")
    return buffer.getvalue(), boxes
