"""Comparing two models' AUROCs on the same test images: a paired patient bootstrap, Holm's correction.

The headline test resamples *patients* (both models' scores of a patient's images travel together,
so the pairing and the within-patient correlation are both kept) and reports, per class and for
the mean, the difference AUROC(a) - AUROC(b), its percentile interval and a two-sided Wald
p-value with the bootstrap standard error (computed in log space). DeLong's test, which counts
images as independent, is kept beside it as a labelled image-level figure.

Across the classes tested the p-values are Holm-adjusted (Holm 1979, step-down), which controls
the family-wise error rate without assuming independence between classes.
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


def _difference_test(point: float, boot: np.ndarray, confidence: float) -> dict:
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


def _add_holm(per_class: dict[str, dict], alpha: float) -> None:
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
    boot = _paired_bootstrap(labels, a, b, clusters, tested, rounds, seed)
    per_class: dict[str, dict] = {}
    for c, name in enumerate(names):
        per_class[name] = {"tested": False, "note": skipped[c]} if c in skipped else None
    for j, c in enumerate(tested):
        auc_a, auc_b = auroc(labels[:, c], a[:, c]), auroc(labels[:, c], b[:, c])
        per_class[names[c]] = {
            "tested": True,
            "auc_a": auc_a,
            "auc_b": auc_b,
            **_difference_test(auc_a - auc_b, boot[:, j], confidence),
            "delong": _image_level_delong(labels[:, c], a[:, c], b[:, c]),
        }
    _add_holm(per_class, alpha)
    mean = None
    if tested:
        point = float(np.mean([per_class[names[c]]["difference"] for c in tested]))
        mean = _difference_test(point, boot.mean(axis=1), confidence)
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
