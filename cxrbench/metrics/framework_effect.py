"""The framework's effect, from seed repeats paired by seed, with an interval that carries seed and patient noise.

A comparison of two trained models (:mod:`cxrbench.metrics.inference`) is about those two models: train either
again from another seed and its AUROC moves by a few hundredths, as much as frameworks are thought to differ.
Repeat i of every backend trains from seed ``run.seed + i - 1``: the same initial weights and the same data order.
So repeat i of A and repeat i of B are a pair, and their difference on the test set, d_s for seed s (the AUROC of
a class, the mean AUROC, an IoBB accuracy), is what the framework changes under what that seed fixes.

The model of one figure over S paired seeds::

    d_s = delta + a + u_s + e_s
    delta  the framework effect (what is estimated),
    u_s    what seed s does to the difference                          (seed-to-seed variation, variance su2),
    a      what this test set's patients do to every seed's difference  (shared by all seeds, variance sa2),
    e_s    the part of patient sampling particular to seed s's models  (variance se2).

The estimate is D = mean(d_s), with Var(D) = sa2 + (su2 + se2) / S.

- The spread of the d_s (sample variance s2) estimates su2 + se2: both change from seed to seed.
- sa2 never shows in that spread, because every seed is scored on the same test set. It is the covariance of two
  seeds' differences over resamples of the patients: each seed's paired patient bootstrap is drawn with the same
  bootstrap seed, so round r resamples the same patients for every seed, and sa2 is estimated as the mean over
  pairs of seeds of the covariance of their bootstrap differences (negative estimates count as 0).

Interval: D +- t(S - 1) * sqrt(s2 / S + sa2). With no shared component it is the textbook t interval on the per-seed
differences; with one it is wider. The degrees of freedom stay the seeds' (S - 1): sa2 is estimated from the same few
seeds, and Welch-Satterthwaite degrees of freedom that treat it as known narrowed the interval below the seed-only t
interval whenever a chance positive estimate came out (too many class verdicts in the calibration simulation). The
price: conservative when the shared patient component dominates (a test set small against the seed noise).

Why not a two-level bootstrap (seeds, then patients): with the 3 to 5 seeds a benchmark can afford, resampling seeds
has a handful of distinct outcomes and its percentile interval lacks the t quantile's widening (4.30 standard errors
at 3 seeds, 2.78 at 5, against the bootstrap's < 1.96): in the calibration simulation of
``tests/test_metrics_framework_effect.py`` it declares a framework effect in far more than 5 % of studies that have
none (docs/statistics.md quotes the rates).

Classes are one family: their p-values are Holm-adjusted, and each class's interval is Holm-consistent: the class
at step k of Holm's order (ascending raw p, m classes) gets the level 1 - alpha / (m - k + 1) of its step, and the
classes from the step where Holm stops onwards get the level of that step. Such an interval excludes 0 exactly when
the Holm-adjusted p < alpha, so the verdict "framework effect" (adjusted interval excludes 0) is Holm's decision.
The intervals match the decisions; only the widest level, 1 - alpha / m (Bonferroni's), guarantees simultaneous
coverage. The mean AUROC (overall IoBB accuracy) is the one primary figure, at the plain level. alpha is
1 - ``confidence``. With fewer than :data:`MIN_SEEDS` paired seeds the figures are given without a verdict.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import stats

from cxrbench.errors import MetricsError
from cxrbench.metrics.auroc import _check_pair, check_inference_settings, cluster_ids, p_from_log10, too_few
from cxrbench.metrics.inference import (
    add_holm,
    auroc_differences,
    difference_test,
    found_boxes,
    found_differences,
    holm,
)

#: Paired seeds below which no framework verdict is given (two differences give one degree of freedom).
MIN_SEEDS = 3
METHOD = (
    "framework effect = mean over paired seeds of the paired difference (repeat i of both backends: same seed, "
    "initial weights and data order); interval: t with (seeds - 1) df on the seed-to-seed variance / seeds plus the "
    "patient-sampling variance shared by all seeds (mean cross-seed covariance of the paired patient bootstrap, the "
    "same resampled patients for every seed)"
)
EFFECT = "framework effect"
NO_EFFECT = "no framework effect shown"
ADJUSTMENT = (
    "classes: Holm across the classes tested, Holm-consistent intervals (the level of each class's step in Holm's "
    "order; excluded 0 exactly when the Holm-adjusted p < alpha); the mean: the plain level"
)


def shared_variance(boots: np.ndarray) -> float | None:
    """Mean covariance between two seeds' bootstrap differences over the rounds every seed has (``boots`` (S, R),
    round r the same resampled patients for every seed): the patient-sampling variance all seeds share."""
    valid = boots[:, np.isfinite(boots).all(axis=0)]
    seeds = valid.shape[0]
    if seeds < 2 or valid.shape[1] < 2:
        return None
    covariance = np.cov(valid)
    return float((covariance.sum() - np.trace(covariance)) / (seeds * (seeds - 1)))


def _interval(effect: float, se: float, df: int, level: float) -> list[float]:
    quantile = stats.t.ppf(0.5 + level / 2.0, df)
    return [effect - quantile * se, effect + quantile * se]


def _log10_p(effect: float, se: float, df: int) -> float | None:
    """log10 of the two-sided t p-value (log space: never 0); None when se = 0 and the effect is not 0."""
    if se == 0.0:
        return 0.0 if effect == 0.0 else None
    return float((math.log(2.0) + stats.t.logsf(abs(effect) / se, df)) / math.log(10.0))


def seed_effect(points: np.ndarray, boots: np.ndarray, confidence: float) -> dict[str, Any]:
    """One figure over paired seeds: ``points`` (S,) the per-seed differences, ``boots`` (S, R) their paired patient
    bootstrap with the same resampled patients in round r for every seed. JSON-able."""
    points = np.asarray(points, dtype=np.float64)
    seeds = points.size
    result: dict[str, Any] = {
        "effect": float(points.mean()) if seeds else None,
        "per_seed": [float(v) for v in points],
        "seed_sd": float(points.std(ddof=1)) if seeds > 1 else None,
        "shared_variance": None,
        "se": None,
        "df": None,
        "interval": None,
        "log10_p_value": None,
        "p_value": None,
    }
    if seeds < 2:
        return result
    shared = shared_variance(np.asarray(boots, dtype=np.float64))
    se = math.sqrt(float(points.var(ddof=1)) / seeds + max(shared or 0.0, 0.0))
    df = seeds - 1
    log10_p = _log10_p(result["effect"], se, df)
    result.update(
        shared_variance=shared,
        se=se,
        df=df,
        interval=_interval(result["effect"], se, df, confidence),
        log10_p_value=log10_p,
        p_value=0.0 if log10_p is None else p_from_log10(log10_p),
    )
    return result


def holm_levels(p_values: dict[str, float], alpha: float) -> dict[str, float]:
    """Each class's Holm-consistent interval level: 1 - alpha / (m - k + 1) at step k of Holm's order, and from the
    step where Holm stops (the first p not below its step's alpha) that step's level for every later class."""
    ordered = sorted(p_values.items(), key=lambda item: item[1])
    m, stopped = len(ordered), None
    levels = {}
    for k, (name, p) in enumerate(ordered):
        step = alpha / (m - k)
        if stopped is None and not p < step:
            stopped = step
        levels[name] = 1.0 - (step if stopped is None else stopped)
    return levels


def _excludes_zero(interval: list[float] | None) -> bool:
    return interval is not None and (interval[0] > 0.0 or interval[1] < 0.0)


def framework_effect(
    points: np.ndarray,
    boots: np.ndarray,
    names: Sequence[str],
    seeds: Sequence[int],
    *,
    primary: str,
    confidence: float = 0.95,
) -> dict[str, Any]:
    """The framework effect of every figure: ``points`` (S, K) per-seed differences of the K figures ``names``
    (``primary``, the mean or overall figure, among them; the others the classes), ``boots`` (S, R, K) their paired
    patient bootstraps, round r the same resampled patients for every seed; ``seeds`` the S paired seeds.

    Each figure: effect, per-seed differences, seed SD, shared (patient) variance, se, df, interval, p; the classes
    add the Holm-adjusted p, the Holm-consistent level and interval; every figure a ``verdict``:
    :data:`EFFECT` when its (adjusted) interval excludes 0, else :data:`NO_EFFECT`, None below :data:`MIN_SEEDS`.
    """
    points, boots = np.asarray(points, dtype=np.float64), np.asarray(boots, dtype=np.float64)
    alpha = 1.0 - confidence
    figures = {name: seed_effect(points[:, k], boots[:, :, k], confidence) for k, name in enumerate(names)}
    enough = len(seeds) >= MIN_SEEDS
    classes = [name for name in names if name != primary]
    family = {name: figures[name]["p_value"] for name in classes if figures[name]["p_value"] is not None}
    levels, adjusted = holm_levels(family, alpha), holm(family)
    for name in classes:
        figure, level = figures[name], levels.get(name)
        figure.update(
            p_holm=adjusted.get(name),
            adjusted_level=level,
            adjusted_interval=None if level is None else _interval(figure["effect"], figure["se"], figure["df"], level),
        )
    for name, figure in figures.items():
        interval = figure["interval"] if name == primary else figure["adjusted_interval"]
        if not enough or interval is None:
            figure["verdict"] = None
        else:
            figure["verdict"] = EFFECT if _excludes_zero(interval) else NO_EFFECT
    return {
        "method": METHOD,
        "adjustment": ADJUSTMENT,
        "seeds": [int(s) for s in seeds],
        "paired_seeds": len(seeds),
        "min_seeds": MIN_SEEDS,
        "confidence": float(confidence),
        "alpha": alpha,
        "no_verdict": None
        if enough
        else f"{len(seeds)} paired seed(s), at least {MIN_SEEDS} needed for a framework verdict (--repeats 3 or more)",
        "primary": {"name": primary, **figures[primary]},
        "per_class": {name: figures[name] for name in classes},
        "classes_tested": len(classes),
        "classes_with_effect": [name for name in classes if figures[name]["verdict"] == EFFECT],
    }


def _seed_models(seed: int, points: np.ndarray, boot: np.ndarray, names, primary: str, confidence: float) -> dict:
    """One seed's two trained models compared (the single-seed test), compactly: the primary figure's difference
    test, and each class's difference, interval and Holm-adjusted p."""
    classes = {
        name: {"tested": True, **difference_test(float(points[k]), boot[:, k], confidence)}
        for k, name in enumerate(names)
        if name != primary
    }
    add_holm(classes, 1.0 - confidence)
    keep = ("difference", "interval", "p_holm", "significant")
    return {
        "seed": int(seed),
        primary: difference_test(float(points[names.index(primary)]), boot[:, names.index(primary)], confidence),
        "per_class": {name: {key: test[key] for key in keep} for name, test in classes.items()},
    }


def _over_seeds(per_seed: list[tuple[np.ndarray, np.ndarray]], names: list[str], primary: str, seeds, confidence):
    points = np.stack([p for p, _ in per_seed]) if per_seed else np.empty((0, len(names)))
    boots = np.stack([b for _, b in per_seed]) if per_seed else np.empty((0, 0, len(names)))
    result = framework_effect(points, boots, names, seeds, primary=primary, confidence=confidence)
    result["seed_models"] = [
        _seed_models(seed, p, b, names, primary, confidence) for seed, (p, b) in zip(seeds, per_seed)
    ]
    return result


def auroc_effect(
    labels,
    pairs: Sequence[tuple[Any, Any]],
    classes: Sequence[str],
    seeds: Sequence[int],
    *,
    groups=None,
    rounds: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    min_positives: int = 5,
) -> dict[str, Any]:
    """The framework effect on AUROC (first - second of each pair): ``pairs[s]`` the two backends' scores
    of seed ``seeds[s]`` on the same test images (``labels``, ``groups`` the patients), per class tested and for
    the mean. Every seed's bootstrap uses ``seed``, so round r resamples the same patients for every seed."""
    scores = [[_check_pair(labels, s, 2, "auroc_effect")[1] for s in pair] for pair in pairs]
    labels = np.asarray(labels).astype(np.int64)
    names = [str(name) for name in classes]
    if len(names) != labels.shape[1]:
        raise MetricsError(f"auroc_effect: {len(names)} class names for {labels.shape[1]} label columns")
    check_inference_settings(rounds, confidence, min_positives)
    clusters = cluster_ids(groups, labels.shape[0], "auroc_effect")
    untested = {name: reason for c, name in enumerate(names) if (reason := too_few(labels[:, c], min_positives))}
    tested = [c for c, name in enumerate(names) if name not in untested]
    per_seed = [auroc_differences(labels, a, b, clusters, tested, rounds, seed) for a, b in scores]
    result = _over_seeds(per_seed, [names[c] for c in tested] + ["mean"], "mean", seeds, confidence)
    return {**result, "figure": "AUROC", "untested": untested, "rounds": int(rounds), "resampling": _resampling(groups)}


def localisation_effect(
    pairs: Sequence[tuple[Any, Any]],
    box_classes: Sequence[str],
    seeds: Sequence[int],
    *,
    threshold: float,
    groups=None,
    rounds: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    min_boxes: int = 5,
) -> dict[str, Any]:
    """The framework effect on localisation accuracy (share of true boxes found at IoBB > ``threshold``):
    ``pairs[s]`` the two backends' best IoBB per true box for seed ``seeds[s]`` (the same boxes in the same order),
    per class with at least ``min_boxes`` boxes and over every box (``overall``)."""
    box_classes = [str(name) for name in box_classes]
    check_inference_settings(rounds, confidence, min_boxes)
    clusters = cluster_ids(groups, len(box_classes), "localisation_effect")
    names = sorted(set(box_classes), key=box_classes.index)
    untested = {n: f"too few boxes ({box_classes.count(n)})" for n in names if box_classes.count(n) < min_boxes}
    tested = [name for name in names if name not in untested]
    n = len(box_classes)
    per_seed = [
        found_differences(
            found_boxes(a, threshold, n, "localisation_effect: overlaps"),
            found_boxes(b, threshold, n, "localisation_effect: overlaps"),
            box_classes,
            tested,
            clusters,
            rounds,
            seed,
        )
        for a, b in pairs
    ]
    result = _over_seeds(per_seed, tested + ["overall"], "overall", seeds, confidence)
    return {
        **result,
        "figure": f"IoBB accuracy (T = {threshold:g})",
        "threshold": float(threshold),
        "boxes": n,
        "untested": untested,
        "rounds": int(rounds),
        "resampling": _resampling(groups),
    }


def _resampling(groups) -> str:
    return "images" if groups is None else "patients"
