"""``--repeats N``: seed repeats of every backend, their folders, and the across-repeat summary.

Repeat ``i`` (1-based) uses seed ``run.seed + i - 1`` in every backend: shared initial weights made
from that seed and the data order of that seed (the data set and its split stay the run's). Repeat 1
is the normal run in ``RUN/<backend>/``; repeats 2..N live in ``RUN/<backend>/repeats/r<i>/``.

The summary is arithmetic over the per-repeat files (``metrics.json``, ``throughput.json``,
``predictions.npz``, ``localisation.json``) so it can be recomputed from a run folder at any time.

The verdict that leads is the framework's effect from the repeats *paired by seed*: repeat i of two backends shares
its seed, initial weights and data order, so their paired patient-bootstrap difference on the test set is taken per
seed and combined across seeds (:mod:`cxrbench.metrics.framework_effect`); a seed where either backend's repeat did
not complete is excluded and named. Beside it, secondary: a two-sided Welch t-test on the backends' unpaired
per-repeat values, at :data:`ALPHA`, needing :data:`MIN_REPEATS` repeats per backend.
"""

from __future__ import annotations

import math
import statistics
from functools import partial
from itertools import combinations
from pathlib import Path
from typing import Any

from scipy import stats as scipy_stats

from cxrbench.errors import CxrError
from cxrbench.files import load_npz, read_json
from cxrbench.metrics.framework_effect import auroc_effect, localisation_effect
from cxrbench.metrics.localisation import COMPARED_AT
from cxrbench.run.comparison import box_overlaps, same_boxes, same_test_images
from cxrbench.run.folder import (
    METRICS_JSON,
    PREDICTIONS_NPZ,
    STATUS_JSON,
    THROUGHPUT_JSON,
    repeat_folder,
)
from cxrbench.suite import EvalSettings

#: Repeats per backend below which no verdict is given (a standard deviation from two values is a guess).
MIN_REPEATS = 3
#: Significance level of the Welch t-test between two backends' repeat values.
ALPHA = 0.05
RULE = (
    f"secondary, unpaired: two-sided Welch t-test on the per-repeat values, difference 'exceeds' seed-to-seed "
    f"variation when p < {ALPHA}; no verdict with fewer than {MIN_REPEATS} repeats per backend"
)


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
    """The difference of means (a - b, like every between-backend figure) against the within-backend spread."""
    a, b = [v for v in a if v is not None], [v for v in b if v is not None]
    if not a or not b:
        return {"difference": None, "sd": None, "p_value": None, "verdict": None, "text": "no values to compare"}
    difference = statistics.fmean(a) - statistics.fmean(b)
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
    """Between two backends: per class and for the mean, the difference (a - b) and its verdict."""
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


# -- paired by seed ---------------------------------------------------------------------------------


def _not_completed(name: str, figures: dict[str, Any]) -> str:
    return f"{name} repeat {figures['repeat']} {figures['status']}" + (
        f" ({figures['error']})" if figures.get("error") else ""
    )


def pair_seeds(
    name_a: str, a: list[dict[str, Any]], name_b: str, b: list[dict[str, Any]]
) -> tuple[list[dict[str, int]], list[dict[str, Any]]]:
    """Repeat i of ``a`` with repeat i of ``b`` (the same seed, initial weights and data order): ``paired`` lists the
    seeds where both completed; ``excluded`` every other seed, with the reason in words."""
    b_by_repeat = {r["repeat"]: r for r in b}
    paired, excluded = [], []
    for ra in a:
        rb = b_by_repeat.get(ra["repeat"])
        reasons = [_not_completed(name_a, ra)] if ra["status"] != "completed" else []
        if rb is None:
            reasons.append(f"{name_b} has no repeat {ra['repeat']}")
        elif rb["status"] != "completed":
            reasons.append(_not_completed(name_b, rb))
        entry = {"repeat": ra["repeat"], "seed": ra["seed"]}
        if reasons:
            excluded.append({**entry, "reason": "; ".join(reasons)})
        else:
            paired.append(entry)
    return paired, excluded


def _load_predictions(run_dir: Path, name: str, repeat: int) -> dict[str, Any] | None:
    path = repeat_folder(run_dir, name, repeat) / PREDICTIONS_NPZ
    return load_npz(path) if path.is_file() else None


def _seed_pairs(seeds, names, load, same, key, missing_what, differs_what, excluded):
    """Each paired seed's ``key`` of the two backends ``names``, as ``load(name, repeat)`` gives them; a seed where
    either is missing, or not measured on the same items as the two backends and the first kept seed (``same``), is
    moved to ``excluded``, saying why. Returns the kept seeds, their pairs and the first kept seed's record."""
    kept, pairs, reference = [], [], None
    for entry in seeds:
        a, b = (load(name, entry["repeat"]) for name in names)
        missing = [name for name, found in zip(names, (a, b)) if found is None]
        if missing:
            reason = "; ".join(f"{name} repeat {entry['repeat']} has no {missing_what}" for name in missing)
        elif not same(a, b) or (reference is not None and not same(reference, a)):
            reason = f"repeat {entry['repeat']} was not {differs_what}"
        else:
            reference = reference if reference is not None else a
            kept.append(entry)
            pairs.append((a[key], b[key]))
            continue
        excluded.append({**entry, "reason": reason})
    return kept, pairs, reference


def _auroc_pairs(run_dir, name_a, name_b, seeds, excluded):
    """Each paired seed's logits of a and of b on the test images (seeds without them, or on other images, out)."""
    return _seed_pairs(
        seeds, (name_a, name_b), partial(_load_predictions, run_dir), same_test_images, "logits", PREDICTIONS_NPZ,
        "evaluated on the same test images", excluded,
    )  # fmt: skip


def _localisation_pairs(run_dir, name_a, name_b, seeds, excluded):
    """Each paired seed's best IoBB per true box of a and of b; seeds without a per-box record (CAM stage not run)
    or scored on other boxes are moved to ``excluded``."""

    def load(name, repeat):
        return box_overlaps(repeat_folder(run_dir, name, repeat))

    return _seed_pairs(
        seeds, (name_a, name_b), load, same_boxes, "iobb", "per-box localisation",
        "scored on the same true boxes", excluded,
    )  # fmt: skip


def paired_comparison(
    run_dir: Path,
    name_a: str,
    a: list[dict[str, Any]],
    name_b: str,
    b: list[dict[str, Any]],
    classes: list[str],
    evaluation: EvalSettings,
    bootstrap_seed: int,
) -> dict[str, Any]:
    """The framework effect of a - b from the seeds both completed: AUROC per class and for the mean, and IoBB
    accuracy at :data:`~cxrbench.metrics.localisation.COMPARED_AT` per class and overall (None without files)."""
    seeds, excluded = pair_seeds(name_a, a, name_b, b)
    inference = {
        "rounds": evaluation.bootstrap_rounds,
        "confidence": evaluation.confidence,
        "seed": bootstrap_seed,
    }
    auroc_excluded, localisation_excluded = list(excluded), list(excluded)
    auroc_seeds, auroc_pairs, test = _auroc_pairs(run_dir, name_a, name_b, seeds, auroc_excluded)
    box_seeds, box_pairs, boxes = _localisation_pairs(run_dir, name_a, name_b, seeds, localisation_excluded)
    return {
        "direction": f"{name_a} - {name_b}",
        "auroc": auroc_effect(
            test["labels"],
            auroc_pairs,
            classes,
            [e["seed"] for e in auroc_seeds],
            groups=test.get("patients"),
            min_positives=evaluation.min_positives,
            **inference,
        )
        if auroc_pairs
        else None,
        "auroc_excluded": sorted(auroc_excluded, key=lambda e: e["repeat"]),
        "localisation": localisation_effect(
            box_pairs,
            boxes["class"],
            [e["seed"] for e in box_seeds],
            threshold=COMPARED_AT,
            groups=boxes["patients"],
            min_boxes=evaluation.min_positives,
            **inference,
        )
        if box_pairs
        else None,
        "localisation_excluded": sorted(localisation_excluded, key=lambda e: e["repeat"]),
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
    run_dir: Path,
    backends: list[str],
    count: int,
    base_seed: int,
    classes: list[str],
    evaluation: EvalSettings | None = None,
) -> dict[str, Any] | None:
    """The ``repeats`` section of a run with ``count`` repeats (None for a single run): the unpaired summary, and
    for every pair of backends the framework effect paired by seed (``paired``), bootstrapped with ``evaluation``'s
    settings and the run's seed ``base_seed``."""
    if count < 2:
        return None
    per_backend = {
        name: [repeat_figures(repeat_folder(run_dir, name, i), i, seed_of(base_seed, i)) for i in range(1, count + 1)]
        for name in backends
    }
    section = summarise(per_backend, classes)
    for pair in section["comparisons"]:
        pair["paired"] = paired_comparison(
            run_dir,
            pair["a"],
            per_backend[pair["a"]],
            pair["b"],
            per_backend[pair["b"]],
            classes,
            evaluation or EvalSettings(),
            base_seed,
        )
    return section
