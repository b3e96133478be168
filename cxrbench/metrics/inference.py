"""Comparing two trained models on the same test images: a paired patient bootstrap, Holm's correction.

The headline test resamples *patients* (both models' scores of a patient's images travel together,
so the pairing and the within-patient correlation are both kept) and reports, per class and for
the mean, the difference AUROC(a) - AUROC(b), its percentile interval and a two-sided Wald
p-value with the bootstrap standard error (computed in log space). DeLong's test, which counts
images as independent, is kept beside it as a labelled image-level figure. Localisation accuracy
(a true box found at IoBB > T) is compared the same way, box by box (:func:`compare_localisation`).

Across the classes tested the p-values are Holm-adjusted (Holm 1979, step-down), which controls
the family-wise error rate without assuming independence between classes.

What these tests are about: two *trained models*, each from one training seed, on this test set.
Whether the frameworks differ is another question, answered from seed repeats paired by seed
(:mod:`cxrbench.metrics.framework_effect`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from cxrbench.errors import MetricsError
from cxrbench.metrics.auroc import (
    _check_pair,
    _interval,
    _weighted_auroc,
    auroc,
    bootstrap_rounds,
    check_inference_settings,
    cluster_ids,
    delong_test,
    log10_two_sided_p,
    p_from_log10,
    too_few,
)

METHOD = (
    "paired patient bootstrap of AUROC(a) - AUROC(b); p: two-sided Wald test with the bootstrap "
    "standard error; Holm-adjusted across the classes tested"
)
IMAGE_LEVEL_METHOD = "DeLong et al. 1988 (images counted as independent: image-level, secondary)"


def holm_log10(log10_p: dict[str, float | None]) -> dict[str, float | None]:
    """Holm's step-down adjustment of the given log10 p-values (None entries are not tested).

    Sorted ascending, the i-th of m p-values becomes max over j <= i of min(1, (m - j + 1) p_(j)).
    Working in log10 keeps p-values far below float64's range ordered and exact.
    """
    tested = sorted((value, name) for name, value in log10_p.items() if value is not None)
    m = len(tested)
    adjusted: dict[str, float | None] = {name: None for name in log10_p}
    running = -math.inf
    for rank, (value, name) in enumerate(tested):
        running = max(running, min(0.0, value + math.log10(m - rank)))
        adjusted[name] = running
    return adjusted


def holm(p_values: dict[str, float | None]) -> dict[str, float | None]:
    """Holm-adjusted p-values (plain scale) of ``p_values``; zeros stay zero."""
    logs = {k: (None if p is None else (-math.inf if p == 0 else math.log10(p))) for k, p in p_values.items()}
    return {k: (None if v is None else (0.0 if v == -math.inf else 10.0**v)) for k, v in holm_log10(logs).items()}


def difference_test(point: float, boot: np.ndarray, confidence: float) -> dict:
    """Difference, percentile interval, bootstrap SE and Wald p-value (log10 and plain) of one figure."""
    valid = boot[np.isfinite(boot)]
    se = float(np.std(valid, ddof=1)) if valid.size > 1 else None
    if se:
        log10_p = log10_two_sided_p(point / se)
    elif se == 0.0:  # every round agrees: p = 1 when that agreement is "no difference", else no finite p
        log10_p = 0.0 if point == 0.0 else None
    else:
        log10_p = None
    return {
        "difference": point,
        "interval": _interval(valid, confidence),
        "se": se,
        "log10_p_value": log10_p,
        "p_value": p_from_log10(log10_p),
        "valid_rounds": int(valid.size),
    }


def _paired_bootstrap(labels, a, b, clusters, columns, rounds, seed) -> np.ndarray:
    """(rounds, len(columns)) bootstrap AUROC differences, both models on the same resampled patients."""
    parts = []
    for weights in bootstrap_rounds(clusters, rounds, seed):
        parts.append(
            np.stack(
                [
                    _weighted_auroc(labels[:, c], a[:, c], weights) - _weighted_auroc(labels[:, c], b[:, c], weights)
                    for c in columns
                ],
                axis=1,
            )
            if columns
            else np.empty((len(weights), 0))
        )
    return np.concatenate(parts) if parts else np.empty((0, len(columns)))


def auroc_differences(labels, a, b, clusters, columns, rounds: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """AUROC(a) - AUROC(b) of each of ``columns`` and of their mean (the last figure): the differences
    ``(len(columns) + 1,)`` and their paired patient bootstrap ``(rounds, len(columns) + 1)``. Inputs as checked by
    :func:`compare_aurocs` (0/1 labels, finite float scores, each column with both label values).

    The same ``clusters`` and ``seed`` give the same resampled patients in every round, whichever models are
    compared: :mod:`cxrbench.metrics.framework_effect` relies on it to line up the rounds of several seeds.
    """
    once = np.ones((1, labels.shape[0]), np.int64)  # every image counted once: the AUROC itself
    points = np.array(
        [
            _weighted_auroc(labels[:, c], a[:, c], once)[0] - _weighted_auroc(labels[:, c], b[:, c], once)[0]
            for c in columns
        ]
    )
    boot = _paired_bootstrap(labels, a, b, clusters, columns, rounds, seed)
    mean_point = float(points.mean()) if columns else math.nan
    mean_boot = boot.mean(axis=1) if columns else np.full(boot.shape[0], np.nan)
    return np.append(points, mean_point), np.column_stack([boot, mean_boot])


def add_holm(per_class: dict[str, dict], alpha: float) -> None:
    """``p_holm``, ``log10_p_holm`` and ``significant`` (Holm-adjusted p < alpha) for every tested class."""
    logs = {
        name: (r["log10_p_value"] if r["log10_p_value"] is not None else -math.inf) if r["tested"] else None
        for name, r in per_class.items()
    }
    for name, log10_adj in holm_log10(logs).items():
        if log10_adj is not None:
            p_adj = p_from_log10(log10_adj)
            per_class[name].update(
                log10_p_holm=None if log10_adj == -math.inf else log10_adj, p_holm=p_adj, significant=p_adj < alpha
            )


def _image_level_delong(labels_1d, a_1d, b_1d) -> dict:
    result = delong_test(labels_1d, a_1d, b_1d)
    return {"p_value": result["p_value"], "log10_p_value": result["log10_p_value"]}


def compare_aurocs(
    labels,
    scores_a,
    scores_b,
    classes: Sequence[str],
    *,
    groups=None,
    rounds: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    min_positives: int = 5,
    alpha: float = 0.05,
) -> dict:
    """Per class and for the mean: AUROC(a) - AUROC(b) with a paired (patient) bootstrap, JSON-able.

    A class is tested when it has at least ``min_positives`` positives and negatives; otherwise its
    entry says why ("too few positives (n)"). The mean averages the tested classes. ``p_holm`` is the
    Holm-adjusted p-value across the tested classes; ``significant`` compares it with ``alpha``.
    ``delong`` is the image-level DeLong p-value (secondary: it treats images as independent).
    """
    labels, a = _check_pair(labels, scores_a, 2, "compare_aurocs")
    _, b = _check_pair(labels, scores_b, 2, "compare_aurocs")
    names = [str(name) for name in classes]
    if len(names) != labels.shape[1]:
        raise MetricsError(f"compare_aurocs: {len(names)} class names for {labels.shape[1]} label columns")
    check_inference_settings(rounds, confidence, min_positives)
    clusters = cluster_ids(groups, labels.shape[0], "compare_aurocs")
    skipped = {c: reason for c in range(len(names)) if (reason := too_few(labels[:, c], min_positives))}
    tested = [c for c in range(len(names)) if c not in skipped]
    points, boot = auroc_differences(labels, a, b, clusters, tested, rounds, seed)
    per_class: dict[str, dict] = {}
    for c, name in enumerate(names):
        per_class[name] = {"tested": False, "note": skipped[c]} if c in skipped else None
    for j, c in enumerate(tested):
        per_class[names[c]] = {
            "tested": True,
            "auc_a": auroc(labels[:, c], a[:, c]),
            "auc_b": auroc(labels[:, c], b[:, c]),
            **difference_test(float(points[j]), boot[:, j], confidence),
            "delong": _image_level_delong(labels[:, c], a[:, c], b[:, c]),
        }
    add_holm(per_class, alpha)
    mean = difference_test(float(points[-1]), boot[:, -1], confidence) if tested else None
    return {
        "method": METHOD,
        "image_level_method": IMAGE_LEVEL_METHOD,
        "resampling": "images" if groups is None else "patients",
        "patients": None if groups is None else int(clusters.max()) + 1,
        "per_class": per_class,
        "mean": mean,
        "mean_over": [names[c] for c in tested],
        "classes_tested": len(tested),
        "alpha": alpha,
        "rounds": int(rounds),
        "confidence": float(confidence),
        "seed": int(seed),
        "min_positives": int(min_positives),
    }


# -- localisation -----------------------------------------------------------------------------------

LOCALISATION_METHOD = (
    "paired patient bootstrap of the share of true boxes found, a - b (a box is found when a predicted box's "
    "IoBB with it exceeds T); p: two-sided Wald test with the bootstrap standard error; Holm-adjusted across the "
    "classes tested"
)


def found_boxes(overlaps, threshold: float, n: int, what: str) -> np.ndarray:
    """Whether each of ``n`` true boxes was found: its best overlap exceeds ``threshold`` (strictly, ChestX-ray8)."""
    overlaps = np.asarray(overlaps, dtype=np.float64)
    if overlaps.shape != (n,) or not np.isfinite(overlaps).all():
        raise MetricsError(f"{what}: must be {n} finite overlaps (one per true box), got shape {overlaps.shape}")
    return overlaps > threshold


def found_differences(found_a, found_b, box_classes, columns, clusters, rounds: int, seed: int):
    """Share of true boxes found by a minus by b, for each class of ``columns`` and over every box (the last
    figure): the differences ``(len(columns) + 1,)`` and their paired patient bootstrap
    ``(rounds, len(columns) + 1)`` (NaN where a resample holds no box of a class).

    As for :func:`auroc_differences`, the same ``clusters`` and ``seed`` resample the same patients in every round.
    """
    masks = [np.asarray(box_classes) == name for name in columns] + [np.ones(len(box_classes), bool)]
    gap = np.asarray(found_a, np.float64) - np.asarray(found_b, np.float64)
    points = np.array([gap[m].mean() for m in masks])
    parts = []
    for weights in bootstrap_rounds(clusters, rounds, seed):
        with np.errstate(invalid="ignore", divide="ignore"):
            parts.append(np.column_stack([weights[:, m] @ gap[m] / weights[:, m].sum(axis=1) for m in masks]))
    return points, np.concatenate(parts) if parts else np.empty((0, len(masks)))


def compare_localisation(
    overlaps_a,
    overlaps_b,
    box_classes: Sequence[str],
    *,
    groups=None,
    threshold: float,
    rounds: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    min_boxes: int = 5,
    alpha: float = 0.05,
) -> dict:
    """Per class and over every box: the share of true boxes a finds minus the share b finds, JSON-able.

    ``overlaps_a[i]``/``overlaps_b[i]``: each model's best IoBB with true box i (found when > ``threshold``);
    boxes are the same for both models, in the same order, ``box_classes[i]`` their class and ``groups[i]`` the
    patient of their image (None: boxes taken as independent). A class with fewer than ``min_boxes`` boxes gets no test
    ("too few boxes (n)"); ``overall`` pools every box. ``p_holm`` is Holm-adjusted across the classes tested.
    """
    box_classes = [str(name) for name in box_classes]
    n = len(box_classes)
    if n == 0:
        raise MetricsError("compare_localisation: no true boxes to compare on")
    a = found_boxes(overlaps_a, threshold, n, "compare_localisation: overlaps_a")
    b = found_boxes(overlaps_b, threshold, n, "compare_localisation: overlaps_b")
    check_inference_settings(rounds, confidence, min_boxes)
    clusters = cluster_ids(groups, n, "compare_localisation")
    names = sorted(set(box_classes), key=box_classes.index)
    counts = {name: box_classes.count(name) for name in names}
    tested = [name for name in names if counts[name] >= min_boxes]
    points, boot = found_differences(a, b, box_classes, tested, clusters, rounds, seed)
    per_class: dict[str, dict] = {
        name: {"tested": False, "boxes": counts[name], "note": f"too few boxes ({counts[name]})"} for name in names
    }
    for j, name in enumerate(tested):
        mask = np.asarray(box_classes) == name
        per_class[name] = {
            "tested": True,
            "boxes": counts[name],
            "accuracy_a": float(a[mask].mean()),
            "accuracy_b": float(b[mask].mean()),
            **difference_test(float(points[j]), boot[:, j], confidence),
        }
    add_holm(per_class, alpha)
    return {
        "method": LOCALISATION_METHOD,
        "metric": "iobb",
        "threshold": float(threshold),
        "resampling": "images" if groups is None else "patients",
        "patients": None if groups is None else int(clusters.max()) + 1,
        "per_class": per_class,
        "overall": {
            "boxes": n,
            "accuracy_a": float(a.mean()),
            "accuracy_b": float(b.mean()),
            **difference_test(float(points[-1]), boot[:, -1], confidence),
        },
        "classes_tested": len(tested),
        "alpha": alpha,
        "rounds": int(rounds),
        "confidence": float(confidence),
        "seed": int(seed),
        "min_boxes": int(min_boxes),
    }
