"""AUROC per class with patient-clustered bootstrap intervals, and DeLong's test for two correlated AUROCs.

Everything is rank-based (Mann-Whitney), so probabilities and logits give the same numbers.
A class whose test labels hold a single value has no AUROC: it is reported as ``None`` and
listed, never replaced by 0.5 or dropped without a word.

Images of one patient are correlated (follow-up images), so intervals resample *patients*
(cluster bootstrap, Davison & Hinkley 1997, sec. 3.8) whenever the patient of each image is
known; resampling images would make the intervals too narrow. A class with fewer than
``min_positives`` positives or negatives gets no interval (a percentile interval from a handful
of positives is not one), and p-values are computed in log space so they never underflow to 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy.stats import norm, rankdata
from sklearn.metrics import roc_auc_score

from cxrbench.errors import MetricsError

#: Bootstrap rounds are drawn in chunks of about this many (round, image) cells, to bound memory.
_CHUNK_CELLS = 4_000_000


# -- input checks ---------------------------------------------------------------------------------


def _check_labels(labels: np.ndarray, what: str) -> np.ndarray:
    """Labels as int64 0/1; anything else is a caller's mistake worth one clear line."""
    if labels.size and not np.isin(labels, (0, 1)).all():
        raise MetricsError(f"{what}: labels must be 0 or 1, found {np.unique(labels)[:5].tolist()}")
    return labels.astype(np.int64)


def _check_scores(scores: np.ndarray, what: str) -> np.ndarray:
    if not np.issubdtype(scores.dtype, np.number) or not np.isfinite(scores).all():
        raise MetricsError(f"{what}: scores must be finite numbers (NaN, infinity or non-numeric found)")
    return scores.astype(np.float64)


def _check_pair(labels, scores, ndim: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Labels and scores of the same ``ndim``-dimensional, non-empty shape."""
    labels, scores = np.asarray(labels), np.asarray(scores)
    if labels.ndim != ndim or labels.shape != scores.shape or labels.shape[0] == 0:
        raise MetricsError(
            f"{what}: labels {labels.shape} and scores {scores.shape} must be the same non-empty {ndim}-D shape"
        )
    return _check_labels(labels, what), _check_scores(scores, what)


def _is_defined(labels_1d: np.ndarray) -> bool:
    """AUROC needs at least one positive and one negative."""
    return 0 < labels_1d.sum() < labels_1d.size


# -- AUROC ----------------------------------------------------------------------------------------


def _weighted_auroc(labels: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Mann-Whitney AUROC for each row of ``weights`` (R, N): image i counted ``weights[r, i]`` times.

    A bootstrap resample is exactly such a weighting, so one sort of the scores serves every
    round. Ties count one half (midranks). Integer arithmetic until the final division;
    NaN where a row has no positive or no negative.
    """
    order = np.argsort(scores, kind="stable")
    sorted_scores = scores[order]
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    w = weights[:, order].astype(np.int64)
    w_pos = w * labels[order]
    if starts.size == scores.size:  # no tied scores: every group is one image
        pos, neg = w_pos, w - w_pos
    else:
        pos = np.add.reduceat(w_pos, starts, axis=1)  # (R, groups of tied scores)
        neg = np.add.reduceat(w - w_pos, starts, axis=1)
    neg_below = np.cumsum(neg, axis=1) - neg
    twice_u = (pos * (2 * neg_below + neg)).sum(axis=1)
    pairs = pos.sum(axis=1) * neg.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(pairs > 0, twice_u / (2.0 * pairs), np.nan)


def auroc(labels_1d, scores_1d) -> float:
    """Area under the ROC curve of one class (ties count one half; equals sklearn's)."""
    labels, scores = _check_pair(labels_1d, scores_1d, 1, "auroc")
    if not _is_defined(labels):
        raise MetricsError(f"auroc: undefined, all {labels.size} labels are {int(labels[0])}")
    return float(_weighted_auroc(labels, scores, np.ones((1, labels.size), np.int64))[0])


def _resample_counts(indices: np.ndarray, n: int) -> np.ndarray:
    """(R, n) counts of how often each image appears in each resample of ``indices`` (R, n)."""
    rounds = indices.shape[0]
    flat = (indices + n * np.arange(rounds)[:, None]).ravel()
    return np.bincount(flat, minlength=rounds * n).reshape(rounds, n)


def bootstrap_aurocs(labels: np.ndarray, scores: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """AUROC of every class on every resample: ``indices`` (R, N) rows of image numbers -> (R, C).

    NaN where a resample holds a single label value for that class.
    """
    counts = _resample_counts(np.asarray(indices), labels.shape[0])
    return np.stack([_weighted_auroc(labels[:, c], scores[:, c], counts) for c in range(labels.shape[1])], axis=1)


def cluster_ids(groups, n: int, what: str) -> np.ndarray:
    """Cluster number (0..G-1) of each of ``n`` rows; ``None`` makes every row its own cluster."""
    if groups is None:
        return np.arange(n)
    groups = np.asarray(groups)
    if groups.shape != (n,):
        raise MetricsError(f"{what}: groups (patient ids) must be one per row, got shape {groups.shape} for {n} rows")
    return np.unique(groups, return_inverse=True)[1].reshape(n)


def resample_weights(rng: np.random.Generator, clusters: np.ndarray, rounds: int) -> np.ndarray:
    """(rounds, N) times each row is drawn when whole clusters are resampled with replacement.

    With one row per cluster this is the ordinary image bootstrap (the same seeded draws).
    """
    count = int(clusters.max()) + 1
    drawn = _resample_counts(rng.integers(0, count, size=(rounds, count)), count)
    return drawn[:, clusters]


def bootstrap_rounds(clusters: np.ndarray, rounds: int, seed: int):
    """Seeded cluster-resampling weights in chunks of about ``_CHUNK_CELLS`` cells (bounded memory)."""
    rng = np.random.default_rng(seed)
    chunk = max(1, _CHUNK_CELLS // max(clusters.size, 1))
    for start in range(0, rounds, chunk):
        yield resample_weights(rng, clusters, min(chunk, rounds - start))


def _bootstrap(labels: np.ndarray, scores: np.ndarray, clusters: np.ndarray, rounds: int, seed: int) -> np.ndarray:
    """``rounds`` seeded resamples of the clusters (with replacement) -> (rounds, C) AUROCs."""
    parts = [
        np.stack([_weighted_auroc(labels[:, c], scores[:, c], w) for c in range(labels.shape[1])], axis=1)
        for w in bootstrap_rounds(clusters, rounds, seed)
    ]
    return np.concatenate(parts) if parts else np.empty((0, labels.shape[1]))


def _interval(values: np.ndarray, confidence: float) -> list[float] | None:
    """Percentile interval of the valid (finite) bootstrap values; None if there are none."""
    values = values[np.isfinite(values)]
    if values.size == 0:
        return None
    tail = 100.0 * (1.0 - confidence) / 2.0
    low, high = np.percentile(values, [tail, 100.0 - tail])
    return [float(low), float(high)]


def check_inference_settings(rounds, confidence, min_positives) -> None:
    """The bootstrap settings every interval and test here shares, each error naming its setting."""
    if not isinstance(rounds, (int, np.integer)) or rounds < 0:
        raise MetricsError(f"eval.bootstrap_rounds: must be a whole number >= 0, got {rounds!r}")
    if not 0.0 < confidence < 1.0:
        raise MetricsError(f"eval.confidence: must lie strictly between 0 and 1, got {confidence!r}")
    if not isinstance(min_positives, (int, np.integer)) or min_positives < 2:
        raise MetricsError(
            f"eval.min_positives: must be a whole number >= 2 (one positive gives a degenerate interval), "
            f"got {min_positives!r}"
        )


def _check_report_settings(labels, scores, classes, rounds, confidence, min_positives) -> tuple[np.ndarray, np.ndarray]:
    labels, scores = _check_pair(labels, scores, 2, "auroc_report")
    if len(classes) != labels.shape[1]:
        raise MetricsError(f"auroc_report: {len(classes)} class names for {labels.shape[1]} label columns")
    check_inference_settings(rounds, confidence, min_positives)
    return labels, scores


def too_few(labels_1d: np.ndarray, min_positives: int) -> str | None:
    """Why a class gets no interval or test ("too few positives (n)"), or None when it gets one."""
    positives = int(labels_1d.sum())
    negatives = labels_1d.size - positives
    if positives < min_positives:
        return f"too few positives ({positives})"
    if negatives < min_positives:
        return f"too few negatives ({negatives})"
    return None


def auroc_report(
    labels,
    scores,
    classes: Sequence[str],
    *,
    groups=None,
    rounds: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    min_positives: int = 5,
) -> dict:
    """Per-class and mean AUROC with seeded bootstrap percentile intervals, JSON-able.

    ``groups`` holds the patient of each row: rounds then resample patients (``resampling`` says
    which). The mean averages the defined classes only and says which (``mean_over``). A round
    counts for a class only when that class has both label values in the resample, and for the
    mean only when every class of ``mean_over`` does; ``valid_rounds`` gives the counts. A class
    with fewer than ``min_positives`` positives or negatives gets no interval and a reason in
    ``no_interval`` (the mean, pooling every class's cases, keeps its interval).
    """
    labels, scores = _check_report_settings(labels, scores, classes, rounds, confidence, min_positives)
    clusters = cluster_ids(groups, labels.shape[0], "auroc_report")
    names = [str(name) for name in classes]
    defined = [c for c in range(len(names)) if _is_defined(labels[:, c])]
    per_class = {name: None for name in names}
    for c in defined:
        per_class[names[c]] = float(roc_auc_score(labels[:, c], scores[:, c]))
    mean = float(np.mean([per_class[names[c]] for c in defined])) if defined else None
    no_interval = {name: reason for c, name in enumerate(names) if (reason := too_few(labels[:, c], min_positives))}

    boot = _bootstrap(labels, scores, clusters, rounds, seed)
    boot_mean = boot[:, defined].mean(axis=1) if defined else np.full(rounds, np.nan)
    return {
        "per_class": per_class,
        "mean": mean,
        "mean_over": [names[c] for c in defined],
        "undefined": [name for c, name in enumerate(names) if c not in defined],
        "ci": {
            "mean": _interval(boot_mean, confidence),
            "per_class": {
                name: None if name in no_interval else _interval(boot[:, c], confidence) for c, name in enumerate(names)
            },
        },
        "no_interval": no_interval,
        "valid_rounds": {
            "mean": int(np.isfinite(boot_mean).sum()),
            "per_class": {name: int(np.isfinite(boot[:, c]).sum()) for c, name in enumerate(names)},
        },
        "rounds": int(rounds),
        "confidence": float(confidence),
        "seed": int(seed),
        "min_positives": int(min_positives),
        "resampling": "images" if groups is None else "patients",
        "patients": None if groups is None else int(clusters.max()) + 1 if clusters.size else 0,
        "positives": {name: int(labels[:, c].sum()) for c, name in enumerate(names)},
        "positive_patients": {name: int(np.unique(clusters[labels[:, c] == 1]).size) for c, name in enumerate(names)},
        "n": int(labels.shape[0]),
    }


# -- DeLong ---------------------------------------------------------------------------------------


def _placements(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Structural components by midranks (Sun & Xu 2014) for the K score rows of ``scores`` (K, N).

    ``v10[k, i]``: fraction of negatives below positive i (ties one half);
    ``v01[k, j]``: fraction of positives above negative j.
    """
    x, y = scores[:, labels == 1], scores[:, labels == 0]
    m, n = x.shape[1], y.shape[1]
    tz = rankdata(np.concatenate([x, y], axis=1), method="average", axis=1)
    v10 = (tz[:, :m] - rankdata(x, method="average", axis=1)) / n
    v01 = 1.0 - (tz[:, m:] - rankdata(y, method="average", axis=1)) / m
    return v10, v01


def log10_two_sided_p(z: float) -> float:
    """log10 of the two-sided normal p-value, from ``norm.logsf`` so that it never underflows (z = 40 -> -349)."""
    return float((math.log(2.0) + norm.logsf(abs(z))) / math.log(10.0))


def p_from_log10(log10_p: float | None) -> float | None:
    """The p-value itself (0.0 once below float64's range: read ``log10_p_value`` then)."""
    return None if log10_p is None else float(min(1.0, 10.0**log10_p))


def _z_and_p(difference: float, variance: float) -> tuple[float | None, float | None]:
    """Two-sided normal test as (z, log10 p); a zero variance gives z = 0, p = 1 for no difference,
    else z = None and no finite log10 p (p = 0)."""
    if variance > 0.0:
        z = difference / math.sqrt(variance)
        return z, log10_two_sided_p(z)
    return (0.0, 0.0) if difference == 0.0 else (None, None)


def delong_test(labels_1d, scores_a, scores_b) -> dict:
    """DeLong et al. (1988) test of two correlated AUROCs measured on the same images.

    Needs at least two positives and two negatives (the covariances divide by m - 1 and n - 1).
    Images are taken as independent: on data with several images per patient this is an
    image-level figure only (:mod:`cxrbench.metrics.inference` has the patient-clustered test).
    ``covariance`` is S10/m + S01/n for the pair (a, b); ``variance`` is that of auc_a - auc_b.
    """
    labels, a = _check_pair(labels_1d, scores_a, 1, "delong_test")
    _, b = _check_pair(labels_1d, scores_b, 1, "delong_test")
    m = int(labels.sum())
    n = labels.size - m
    if m < 2 or n < 2:
        raise MetricsError(f"delong_test: needs at least 2 positives and 2 negatives, got {m} and {n}")
    v10, v01 = _placements(labels, np.stack([a, b]))
    covariance = np.cov(v10) / m + np.cov(v01) / n
    variance = float(np.var(v10[0] - v10[1], ddof=1) / m + np.var(v01[0] - v01[1], ddof=1) / n)
    auc_a, auc_b = v10.mean(axis=1)
    z, log10_p = _z_and_p(float(auc_a - auc_b), variance)
    return {
        "auc_a": float(auc_a),
        "auc_b": float(auc_b),
        "difference": float(auc_a - auc_b),
        "variance": variance,
        "covariance": covariance.tolist(),
        "z": z,
        "p_value": 0.0 if log10_p is None else p_from_log10(log10_p),
        "log10_p_value": log10_p,
        "positives": m,
        "negatives": n,
    }


def delong_per_class(labels, scores_a, scores_b, classes: Sequence[str]) -> dict:
    """:func:`delong_test` per class; None where a class has fewer than 2 positives or 2 negatives."""
    labels, a = _check_pair(labels, scores_a, 2, "delong_per_class")
    _, b = _check_pair(labels, scores_b, 2, "delong_per_class")
    if len(classes) != labels.shape[1]:
        raise MetricsError(f"delong_per_class: {len(classes)} class names for {labels.shape[1]} label columns")
    result = {}
    for c, name in enumerate(classes):
        positives = int(labels[:, c].sum())
        testable = min(positives, labels.shape[0] - positives) >= 2
        result[str(name)] = delong_test(labels[:, c], a[:, c], b[:, c]) if testable else None
    return result
