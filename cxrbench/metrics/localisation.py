"""Class activation maps against boxes: upsampling, heat map to boxes, IoU / IoBB, localisation accuracy.

Scoring is ChestX-ray8's (Wang et al. 2017): a ground-truth box is found at T when a
predicted box for the same image and class has IoU > T or IoBB > T (strictly greater). Three named
ways turn a heat map into boxes (:data:`CAM_METHODS`): ``relative`` (this project's fraction of
the map's range), ``chestxray8`` (the paper's fixed levels on a 0-255 map) and ``cam-largest``
(the CAM paper's, Zhou et al. 2016). Boxes are ``(x, y, w, h)`` in pixels, (x, y) the top-left
corner, pixel i covering [i, i + 1).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from cxrbench.data.classes import CLASSES
from cxrbench.errors import MetricsError

THRESHOLDS = (0.1, 0.25, 0.5, 0.75, 0.9)
#: T(IoBB) at which two models' (or two frameworks') localisation accuracies are compared: the report's headline.
COMPARED_AT = 0.5
#: ChestX-ray8's levels on the 0-255 map: "normalized to [0, 255] and then thresholded by {60, 180} individually".
CHESTXRAY8_LEVELS = (60, 180)
#: Zhou et al. 2016: "segment the regions of which the value is above 20% of the max value of the CAM".
CAM_FRACTION_OF_MAX = 0.2

BoxTuple = tuple[float, float, float, float]


# -- upsampling -----------------------------------------------------------------------------------


def _bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) interpolation weights along one axis, torch's align_corners=False rule.

    Source coordinate (i + 0.5) * n_in / n_out - 0.5, clamped at 0; the far neighbour is
    clamped to the last pixel.
    """
    source = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0)
    near = np.minimum(np.floor(source).astype(np.int64), n_in - 1)
    far = np.minimum(near + 1, n_in - 1)
    frac = source - near
    weights = np.zeros((n_out, n_in))
    rows = np.arange(n_out)
    np.add.at(weights, (rows, near), 1.0 - frac)
    np.add.at(weights, (rows, far), frac)
    return weights


def upsample(maps, size: int) -> np.ndarray:
    """Bilinear resize of ``(N, C, h, w)`` maps to ``(N, C, size, size)`` (same as torch's
    ``F.interpolate(mode="bilinear", align_corners=False)``), as two small matrix products."""
    maps = np.asarray(maps)
    if maps.ndim != 4 or not np.issubdtype(maps.dtype, np.floating) or not np.isfinite(maps).all():
        raise MetricsError(f"upsample: maps must be a finite float (N, C, h, w) array, got {maps.dtype} {maps.shape}")
    if not isinstance(size, (int, np.integer)) or size < 1:
        raise MetricsError(f"upsample: size must be a positive whole number, got {size!r}")
    rows = _bilinear_matrix(maps.shape[2], size)
    cols = _bilinear_matrix(maps.shape[3], size)
    return np.einsum("yh,nchw,xw->ncyx", rows, maps, cols, optimize=True).astype(maps.dtype)


# -- heat map to boxes ----------------------------------------------------------------------------


def _check_heatmap(heatmap) -> np.ndarray:
    heatmap = np.asarray(heatmap, dtype=np.float64)
    if heatmap.ndim != 2 or not np.isfinite(heatmap).all():
        raise MetricsError(f"heatmap_to_boxes: heat map must be a finite 2-D array, got shape {heatmap.shape}")
    return heatmap


def _region_boxes(mask: np.ndarray) -> list[BoxTuple]:
    """Boxes around the 8-connected regions of ``mask``, largest region (pixel count) first."""
    regions, count = ndimage.label(mask, structure=np.ones((3, 3)))
    sizes = np.bincount(regions.ravel(), minlength=count + 1)[1:]
    slices = ndimage.find_objects(regions)
    return [_slice_box(*slices[k]) for k in np.argsort(-sizes, kind="stable")]


def relative_boxes(heatmap, threshold: float = 0.5) -> list[BoxTuple]:
    """This project's relative threshold: boxes around the regions where the min-max normalised map is
    >= ``threshold`` of its range (``eval.cam_threshold``); a flat map carries no location, so no box.

    Not a published recipe: it adapts ChestX-ray8's idea to maps of any scale with one knob.
    """
    heatmap = _check_heatmap(heatmap)
    if not 0.0 <= threshold <= 1.0:
        raise MetricsError(f"heatmap_to_boxes: threshold must lie in [0, 1], got {threshold!r}")
    low, high = heatmap.min(), heatmap.max()
    if high == low:
        return []
    return _region_boxes((heatmap - low) / (high - low) >= threshold)


def chestxray8_boxes(heatmap) -> list[BoxTuple]:
    """ChestX-ray8 (Wang et al. 2017, "Bounding Box Generation"): "The intensities in heatmaps are
    first normalized to [0, 255] and then thresholded by {60, 180} individually. Finally, B-Boxes are
    generated to cover the isolated regions in the resulting binary maps."

    The map is min-max scaled and rounded to whole 0-255 levels (an 8-bit image); a pixel is kept at a level
    when it is >= that level. The boxes of both levels are returned (level 60's first), each level's largest
    region first. A flat map gives no box.
    """
    heatmap = _check_heatmap(heatmap)
    low, high = heatmap.min(), heatmap.max()
    if high == low:
        return []
    levels = np.rint((heatmap - low) / (high - low) * 255.0)
    return [box for level in CHESTXRAY8_LEVELS for box in _region_boxes(levels >= level)]


def cam_largest_box(heatmap) -> list[BoxTuple]:
    """CAM (Zhou et al. 2016, weakly-supervised object localisation): "we first segment the regions of which
    the value is above 20% of the max value of the CAM. Then we take the bounding box that covers the largest
    connected component".

    Strictly above 20 % of the maximum of the map as it is (not min-max normalised); one box or none
    (a map whose maximum is not positive has no region above a fraction of it).
    """
    heatmap = _check_heatmap(heatmap)
    peak = heatmap.max()
    if peak <= 0:
        return []
    return _region_boxes(heatmap > CAM_FRACTION_OF_MAX * peak)[:1]


CAM_METHODS = {
    "relative": "relative threshold: map min-max normalised, kept >= cam_threshold of its range, every region boxed",
    "chestxray8": "ChestX-ray8 (Wang et al. 2017): map scaled to 0-255, thresholded at 60 and at 180, "
    "every region boxed",
    "cam-largest": "CAM (Zhou et al. 2016): kept above 20 % of the map's max, the largest connected region boxed",
}


def heatmap_to_boxes(heatmap, threshold: float = 0.5, method: str = "relative") -> list[BoxTuple]:
    """Predicted boxes of one heat map by the named ``method`` (see :data:`CAM_METHODS`);
    ``threshold`` is used by ``relative`` only."""
    if method == "relative":
        return relative_boxes(heatmap, threshold)
    if method == "chestxray8":
        return chestxray8_boxes(heatmap)
    if method == "cam-largest":
        return cam_largest_box(heatmap)
    raise MetricsError(f"eval.cam_method: expected one of {', '.join(CAM_METHODS)}, got {method!r}")


def _slice_box(rows: slice, cols: slice) -> BoxTuple:
    return (float(cols.start), float(rows.start), float(cols.stop - cols.start), float(rows.stop - rows.start))


# -- box overlap ----------------------------------------------------------------------------------


def _as_box(box: Any) -> BoxTuple:
    """An ``(x, y, w, h)`` tuple from a tuple or a Box-like object, sizes non-negative."""
    x, y, w, h = (box.x, box.y, box.w, box.h) if hasattr(box, "w") else box
    if not (w >= 0 and h >= 0):
        raise MetricsError(f"box {box!r}: width and height must be >= 0")
    return float(x), float(y), float(w), float(h)


def _intersection(a: BoxTuple, b: BoxTuple) -> float:
    width = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    height = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    return max(width, 0.0) * max(height, 0.0)


def iou(a, b) -> float:
    """Intersection over union of two boxes (0 when both are empty)."""
    a, b = _as_box(a), _as_box(b)
    inter = _intersection(a, b)
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union if union > 0 else 0.0


def iobb(gt, pred) -> float:
    """Intersection over the area of the PREDICTED box (ChestX-ray8's IoBB; 0 for an empty box)."""
    gt, pred = _as_box(gt), _as_box(pred)
    area = pred[2] * pred[3]
    return _intersection(gt, pred) / area if area > 0 else 0.0


_OVERLAPS = {"iobb": iobb, "iou": iou}


# -- localisation accuracy ------------------------------------------------------------------------


def _check_thresholds(thresholds: Sequence[float]) -> tuple[float, ...]:
    thresholds = tuple(float(t) for t in thresholds)
    if not thresholds or not all(0.0 < t <= 1.0 for t in thresholds):
        raise MetricsError(f"localisation thresholds must lie in (0, 1], got {list(thresholds)}")
    return thresholds


def _group_truth(truth: Iterable[tuple[int, Any]]) -> dict[tuple[int, str], list[BoxTuple]]:
    """Ground-truth boxes keyed by (image position, class name)."""
    grouped = defaultdict(list)
    for pos, box in truth:
        grouped[(int(pos), box.label)].append(_as_box(box))
    return dict(grouped)


def _summary(truth_best: list[float], pred_best: list[float], images: int, thresholds) -> dict:
    """Accuracy and average false positives per image at each threshold, from best overlaps.

    Found means overlap > T, strictly (ChestX-ray8); a predicted box not exceeding T is a false positive.
    """
    truth_best, pred_best = np.asarray(truth_best), np.asarray(pred_best)
    return {
        "accuracy": {f"{t:g}": float((truth_best > t).mean()) for t in thresholds},
        "avg_fp": {f"{t:g}": float((pred_best <= t).sum() / images) for t in thresholds},
        "boxes": int(truth_best.size),
        "images": int(images),
        "predicted": int(pred_best.size),
    }


def truth_overlaps(predicted: dict, truth, metric: str = "iobb") -> list[float]:
    """Each ground-truth box's best overlap with a predicted box of its image and class, in ``truth``'s order
    (0 when none was predicted): the per-box record two models are compared on, box by box."""
    if metric not in _OVERLAPS:
        raise MetricsError(f"localisation metric must be one of {sorted(_OVERLAPS)}, got {metric!r}")
    overlap = _OVERLAPS[metric]
    return [
        max((overlap(_as_box(box), _as_box(p)) for p in predicted.get((int(pos), box.label), [])), default=0.0)
        for pos, box in truth
    ]


def localisation_accuracy(
    predicted: dict, truth, *, metric: str = "iobb", thresholds: Sequence[float] = THRESHOLDS
) -> dict:
    """Per class and overall localisation accuracy and average false positives per image.

    ``predicted[(image_pos, class_name)]`` lists boxes; ``truth`` lists ``(image_pos, box)`` with
    ``box.label, .x, .y, .w, .h``. Only (image, class) pairs with a ground-truth box are evaluated
    (ChestX-ray8's protocol); boxes predicted for other pairs are counted in
    ``unevaluated_predictions``. A truth box is found at T when any predicted box exceeds T (strictly,
    as ChestX-ray8 defines it); a predicted box is a false positive at T when no truth box of its image
    and class overlaps it by more than T. Per class, ``images`` counts the images with that class's box;
    overall, the distinct images.
    """
    if metric not in _OVERLAPS:
        raise MetricsError(f"localisation metric must be one of {sorted(_OVERLAPS)}, got {metric!r}")
    overlap, thresholds = _OVERLAPS[metric], _check_thresholds(thresholds)
    truth = list(truth)
    truth_by_key = _group_truth(truth)
    truth_best, pred_best = defaultdict(list), defaultdict(list)
    for (_, box), best in zip(truth, truth_overlaps(predicted, truth, metric)):
        truth_best[box.label].append(best)
    for (pos, label), gts in truth_by_key.items():
        pred_best[label] += [max(overlap(g, _as_box(p)) for g in gts) for p in predicted.get((pos, label), [])]
    images = defaultdict(set)
    for pos, label in truth_by_key:
        images[label].add(pos)
    per_class = {
        label: _summary(truth_best[label], pred_best[label], len(images[label]), thresholds) for label in sorted(images)
    }
    overall = _summary(
        sum(truth_best.values(), []), sum(pred_best.values(), []), len({pos for pos, _ in truth_by_key}), thresholds
    )
    return {
        "metric": metric,
        "thresholds": list(thresholds),
        "per_class": per_class,
        "overall": overall,
        "unevaluated_predictions": sum(len(v) for k, v in predicted.items() if k not in truth_by_key),
    }


def centred_box_baseline(truth, size: int, fraction: float = 0.5) -> dict[tuple[int, str], list[BoxTuple]]:
    """One centred square box (side ``fraction * size``) for every ground-truth (image, class):
    the score a model must beat to show its maps know where to look."""
    if not 0.0 < fraction <= 1.0 or size <= 0:
        raise MetricsError(f"centred_box_baseline: need size > 0 and 0 < fraction <= 1, got {size!r}, {fraction!r}")
    side = fraction * size
    corner = (size - side) / 2.0
    return {key: [(corner, corner, side, side)] for key in _group_truth(truth)}


def cam_localisation(
    cams_upsampled, truth, class_indices: Sequence[int], threshold: float = 0.5, method: str = "relative"
) -> dict:
    """Boxes from each (image, class) heat map by ``method`` (:func:`heatmap_to_boxes`), scored with IoBB and IoU.

    ``cams_upsampled[pos, j]`` is the map of ``CLASSES[class_indices[j]]`` at the truth boxes' frame. ``boxes``
    keeps every truth box's test position, class and best IoBB and IoU, in ``truth``'s order, so that two models
    (or two seeds) can be compared box by box (:func:`cxrbench.metrics.inference.compare_localisation`).
    """
    cams, truth = np.asarray(cams_upsampled), list(truth)
    if cams.ndim != 4 or cams.shape[1] != len(class_indices):
        raise MetricsError(f"cam_localisation: maps {cams.shape} must be (N, {len(class_indices)}, H, W)")
    column = {CLASSES[c]: j for j, c in enumerate(class_indices)}
    predicted = {}
    for pos, label in _group_truth(truth):
        if label not in column or not 0 <= pos < cams.shape[0]:
            raise MetricsError(f"cam_localisation: no heat map for image {pos}, class {label!r}")
        predicted[(pos, label)] = heatmap_to_boxes(cams[pos, column[label]], threshold, method)
    return {
        "method": method,
        "method_description": CAM_METHODS[method],
        "threshold": float(threshold),
        "iobb": localisation_accuracy(predicted, truth, metric="iobb"),
        "iou": localisation_accuracy(predicted, truth, metric="iou"),
        "boxes": {
            "position": [int(pos) for pos, _ in truth],
            "class": [box.label for _, box in truth],
            **{metric: truth_overlaps(predicted, truth, metric) for metric in _OVERLAPS},
        },
    }
