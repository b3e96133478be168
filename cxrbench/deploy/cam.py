"""A scored picture's class activation map as an overlay PNG with the predicted boxes.

The one place deploy draws: the heat map is upsampled to the model's input size (bilinear, like the
run's localisation stage), turned into boxes by the run's own recipe and drawn by the one CAM overlay
(:mod:`cxrbench.cam_overlay`), so a served CAM looks exactly like the benchmark's.
"""

from __future__ import annotations

import io

import numpy as np

from cxrbench.suite import EvalSettings

DEFAULT_METHOD, DEFAULT_THRESHOLD = EvalSettings.cam_method, EvalSettings.cam_threshold


def overlay(
    image: np.ndarray, cam_map: np.ndarray, method: str = DEFAULT_METHOD, threshold: float = DEFAULT_THRESHOLD
) -> tuple[bytes, list[list[float]]]:
    """PNG bytes of ``image`` (uint8 ``(S, S)``) under one class's map ``(h, w)``, and the boxes ``[x, y, w, h]``."""
    from cxrbench.cam_overlay import overlay as draw
    from cxrbench.cam_overlay import to_uint8
    from cxrbench.metrics.localisation import heatmap_to_boxes, upsample

    heat = upsample(cam_map[None, None].astype(np.float32), image.shape[0])[0, 0]
    boxes = [list(map(float, box)) for box in heatmap_to_boxes(heat, threshold, method)]
    buffer = io.BytesIO()
    draw(image, to_uint8(heat), [], boxes).save(buffer, format="PNG")
    return buffer.getvalue(), boxes


def top_classes(probabilities: np.ndarray, k: int) -> list[int]:
    """The ``k`` most probable classes of one picture, most probable first (ties by class order)."""
    return [int(c) for c in np.argsort(-probabilities, kind="stable")[:k]]
