"""``--repeats N``: seed repeats of every backend, their folders, and the across-repeat summary.

Repeat ``i`` (1-based) uses seed ``run.seed + i - 1`` in every backend: shared initial weights made
from that seed and the data order of that seed (the data set and its split stay the run's). Repeat 1
is the normal run in ``RUN/<backend>/``; repeats 2..N live in ``RUN/<backend>/repeats/r<i>/``.

The summary is pure arithmetic over the per-repeat files (``metrics.json``, ``throughput.json``) so
it can be recomputed from a run folder at any time. Verdict rule: a two-sided Welch t-test on the
backends' per-repeat values, at :data:`ALPHA`, needing :data:`MIN_REPEATS` repeats per backend.
"""

from __future__ import annotations

import math
import statistics
from itertools import combinations
from pathlib import Path
from typing import Any

from scipy import stats as scipy_stats

from cxrbench.errors import CxrError
from cxrbench.files import read_json
from cxrbench.run.folder import METRICS_JSON, STATUS_JSON, THROUGHPUT_JSON, repeat_folder

#: Repeats per backend below which no verdict is given (a standard deviation from two values is a guess).
MIN_REPEATS = 3
#: Significance level of the Welch t-test between two backends' repeat values.
ALPHA = 0.05
RULE = (
    f"two-sided Welch t-test on the per-repeat values, difference 'exceeds' seed-to-seed variation "
    f"when p < {ALPHA}; no verdict with fewer than {MIN_REPEATS} repeats per backend"
)
#: Worker stages of repeats 2..N (no equivalence, CAM or export: those do not depend on the seed's spread).
REPEAT_STAGES = ("prepare-check", "train", "evaluate")


def check_count(count: int) -> int:
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise CxrError(f"--repeats {count!r}: must be a whole number >= 1")
    return count


def seed_of(base_seed: int, repeat: int) -> int:
    return base_seed + repeat - 1


# -- per repeat ------------------------------------------------------------------------------------


def _number(value: Any) -> float | None:
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    return float(value) if numeric and math.isfinite(value) else None


def repeat_figures(folder: Path, repeat: int, seed: int) -> dict[str, Any]:
    """One repeat's figures from its files; missing files or keys become None (stage not run, failed)."""
    status = read_json(folder / STATUS_JSON) or {}
    auroc = (read_json(folder / METRICS_JSON) or {}).get("auroc") or {}
    throughput = read_json(folder / THROUGHPUT_JSON) or {}
    interval = throughput.get("train_images_per_s_interval")
    return {
        "repeat": repeat,
        "seed": seed,
        "status": status.get("status", "pending"),
        "error": status.get("error"),
        "mean_auroc": _number(auroc.get("mean")),
        "per_class": {name: _number(value) for name, value in (auroc.get("per_class") or {}).items()},
        "train_images_per_s": _number(throughput.get("train_images_per_s")),
        "train_images_per_s_interval": list(interval)
        if isinstance(interval, (list, tuple)) and len(interval) == 2
        else None,
        "first_step_s": _number(throughput.get("first_step_s")),
        "disturbed": throughput.get("disturbed"),
    }


# -- across repeats --------------------------------------------------------------------------------


def spread(values: list[float | None]) -> dict[str, Any]:
    """Mean, sample SD (n-1), min and max of the known values; SD is None below two values."""
    known = [v for v in values if v is not None]
    if not known:
        return {"n": 0, "mean": None, "sd": None, "min": None, "max": None}
    return {
        "n": len(known),
        "mean": statistics.fmean(known),
        "sd": statistics.stdev(known) if len(known) > 1 else None,
        "min": min(known),
        "max": max(known),
    }


def speed_spread(values: list[float | None]) -> dict[str, Any]:
    """Median and [min, max] across repeats (with a handful of repeats the range is the honest interval)."""
    known = [v for v in values if v is not None]
    if not known:
        return {"n": 0, "median": None, "interval": None}
    return {"n": len(known), "median": statistics.median(known), "interval": [min(known), max(known)]}


def welch(a: list[float], b: list[float]) -> float | None:
    """Two-sided Welch t-test p-value; identical constant samples give 1.0, distinct constants 0.0."""
    sd_a, sd_b = statistics.stdev(a), statistics.stdev(b)
    if sd_a == 0 and sd_b == 0:
        return 1.0 if statistics.fmean(a) == statistics.fmean(b) else 0.0
    return float(scipy_stats.ttest_ind(a, b, equal_var=False).pvalue)


def verdict(a: list[float | None], b: list[float | None]) -> dict[str, Any]:
    """The difference of means (b - a) against the within-backend spread, in words."""
    a, b = [v for v in a if v is not None], [v for v in b if v is not None]
    if not a or not b:
        return {"difference": None, "sd": None, "p_value": None, "verdict": None, "text": "no values to compare"}
    difference = statistics.fmean(b) - statistics.fmean(a)
    if min(len(a), len(b)) < MIN_REPEATS:
        return {
            "difference": difference,
            "sd": None,
            "p_value": None,
            "verdict": None,
            "text": f"the difference ({difference:+.4f}) has too few repeats for a verdict "
            f"({min(len(a), len(b))} per backend, need {MIN_REPEATS})",
        }
    sd = math.sqrt((statistics.variance(a) + statistics.variance(b)) / 2)
    p_value = welch(a, b)
    word = "exceeds" if p_value < ALPHA else "within"
    text = (
        f"the difference ({difference:+.4f}) {'exceeds' if word == 'exceeds' else 'is within'} "
        f"seed-to-seed variation (SD {sd:.4f}; Welch p = {p_value:.3g})"
    )
    return {"difference": difference, "sd": sd, "p_value": p_value, "verdict": word, "text": text}


def _completed(repeats: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in repeats if r["status"] == "completed"]


def backend_summary(repeats: list[dict[str, Any]], classes: list[str]) -> dict[str, Any]:
    """Per class and for the mean: spread across completed repeats; speed: median and range."""
    done = _completed(repeats)
    return {
        "completed": len(done),
        "mean_auroc": spread([r["mean_auroc"] for r in done]),
        "per_class": {name: spread([r["per_class"].get(name) for r in done]) for name in classes},
        "train_images_per_s": speed_spread([r["train_images_per_s"] for r in done]),
        "first_step_s": speed_spread([r["first_step_s"] for r in done]),
        "disturbed_repeats": [r["repeat"] for r in done if r["disturbed"]],
    }


def comparison(
    name_a: str, a: list[dict[str, Any]], name_b: str, b: list[dict[str, Any]], classes: list[str]
) -> dict[str, Any]:
    """Between two backends: per class and for the mean, the difference (b - a) and its verdict."""
    a, b = _completed(a), _completed(b)
    return {
        "a": name_a,
        "b": name_b,
        "mean_auroc": verdict([r["mean_auroc"] for r in a], [r["mean_auroc"] for r in b]),
        "per_class": {
            name: verdict([r["per_class"].get(name) for r in a], [r["per_class"].get(name) for r in b])
            for name in classes
        },
    }


def summarise(per_backend: dict[str, list[dict[str, Any]]], classes: list[str]) -> dict[str, Any]:
    """run.json's ``repeats`` section from each backend's per-repeat figures."""
    counts = {len(repeats) for repeats in per_backend.values()}
    return {
        "count": max(counts, default=0),
        "rule": RULE,
        "min_repeats": MIN_REPEATS,
        "alpha": ALPHA,
        "backends": {
            name: {"repeats": repeats, "summary": backend_summary(repeats, classes)}
            for name, repeats in per_backend.items()
        },
        "comparisons": [
            comparison(a, per_backend[a], b, per_backend[b], classes) for a, b in combinations(per_backend, 2)
        ],
    }


def collect(
    run_dir: Path, backends: list[str], count: int, base_seed: int, classes: list[str]
) -> dict[str, Any] | None:
    """The ``repeats`` section of a run with ``count`` repeats (None for a single run)."""
    if count < 2:
        return None
    per_backend = {
        name: [repeat_figures(repeat_folder(run_dir, name, i), i, seed_of(base_seed, i)) for i in range(1, count + 1)]
        for name in backends
    }
    return summarise(per_backend, classes)
