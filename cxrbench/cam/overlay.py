"""The CAM overlay: a class's heat map over its gray chest X-ray, true boxes green, predicted boxes yellow.

One picture for the whole project: the PNGs a run writes into ``<backend>/cams/``, the tiles the report
draws from ``cams.npz`` and the CAMs ``cxrbench predict``/``serve`` return (:func:`cxrbench.cam.files.overlay_png`)
all come from :func:`overlay`, so they show the same pixels. Numpy and Pillow only: the
worker that draws the PNGs loads no plotting library (the jet colour map is matplotlib's, written out here).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from PIL import Image, ImageDraw

#: Overlays are scaled up (nearest neighbour) to at least this many pixels a side so 64 px images stay legible.
MIN_SIDE = 256
#: Share of the heat map's colour in each pixel (the rest is the gray image).
HEAT_WEIGHT = 0.4
TRUE_BOX, PREDICTED_BOX = (0, 255, 0), (255, 255, 0)
BOX_WIDTH = 2

#: matplotlib's "jet": per channel, (position, value) knots of a piecewise-linear ramp over 0-1.
_JET_KNOTS = {
    "red": ((0.0, 0.0), (0.35, 0.0), (0.66, 1.0), (0.89, 1.0), (1.0, 0.5)),
    "green": ((0.0, 0.0), (0.125, 0.0), (0.375, 1.0), (0.64, 1.0), (0.91, 0.0), (1.0, 0.0)),
    "blue": ((0.0, 0.5), (0.11, 1.0), (0.34, 1.0), (0.65, 0.0), (1.0, 0.0)),
}

Box = tuple[float, float, float, float]  #: (x, y, w, h) in pixels of the unscaled image


def to_uint8(heatmap: np.ndarray) -> np.ndarray:
    """Min-max normalise a heat map to 0-255 (a flat map becomes all zeros)."""
    low, high = float(heatmap.min()), float(heatmap.max())
    if high == low:
        return np.zeros(heatmap.shape, dtype=np.uint8)
    return np.round((heatmap - low) / (high - low) * 255.0).astype(np.uint8)


def jet(heat: np.ndarray) -> np.ndarray:
    """RGB in 0-1, shape ``heat.shape + (3,)``, of a 0-255 heat map under the jet colour map."""
    share = np.asarray(heat, dtype=np.float64) / 255.0
    channels = [np.interp(share, [k[0] for k in knots], [k[1] for k in knots]) for knots in _JET_KNOTS.values()]
    return np.stack(channels, axis=-1)


def overlay(
    gray: np.ndarray | None, heat: np.ndarray, true_boxes: Iterable[Box], predicted_boxes: Iterable[Box]
) -> Image.Image:
    """The overlay of the 0-255 ``heat`` map on the uint8 ``gray`` image (black when None), with its boxes."""
    coloured = jet(heat) * 255.0
    base = np.repeat(np.asarray(gray, dtype=np.float64)[..., None], 3, axis=2) if gray is not None else 0.0
    mixed = np.clip((1 - HEAT_WEIGHT) * base + HEAT_WEIGHT * coloured, 0, 255)
    blended = Image.fromarray(mixed.round().astype(np.uint8))
    height, width = heat.shape
    scale = max(1, -(-MIN_SIDE // height))
    canvas = blended.resize((width * scale, height * scale), Image.NEAREST)
    draw = ImageDraw.Draw(canvas)
    for boxes, colour in ((predicted_boxes, PREDICTED_BOX), (true_boxes, TRUE_BOX)):
        for x, y, w, h in boxes:
            left, top = x * scale, y * scale
            right, bottom = max(left, (x + w) * scale - 1), max(top, (y + h) * scale - 1)  # an empty box: one line
            draw.rectangle([left, top, right, bottom], outline=colour, width=BOX_WIDTH)
    return canvas
