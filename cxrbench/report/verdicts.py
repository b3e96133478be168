"""The accuracy verdicts in words, each naming what it is about: the terminal summary, run.json ``verdicts`` and the
report all print these lines.

Two questions, never confused:

- **two trained models** (one training seed each) on this test set: the paired patient bootstrap of one seed's
  models (comparison.json ``agreement`` and ``localisation``). It can say the models differ; it cannot say the
  frameworks do, because training either again from another seed moves its score as much;
- **the framework**: the effect estimated from repeats paired by seed (run.json ``repeats.comparisons[].paired``,
  :mod:`cxrbench.metrics.framework_effect`), at least 3 paired seeds for a verdict.

A run without repeats ends with how to estimate the framework's effect (``--repeats``) and what that would cost,
from this run's own stage seconds.
"""

from __future__ import annotations

from typing import Any

from cxrbench.run.folder import REPEAT_STAGES

#: run.json ``verdicts.about``: the verdicts compare trained models, or the run has a framework verdict.
TRAINED_MODELS = "trained-models"
FRAMEWORK = "framework"
NOT_ESTIMABLE = "the framework's effect is not estimable from one seed"
SEE_PAIRED = "the framework's effect is judged from the repeats paired by seed, not from one seed"
#: Repeats suggested for estimating the framework's effect: 3 is the least that gives a verdict; 5 halves the
#: interval (t quantile 2.78 / sqrt(5) against 4.30 / sqrt(3) seed SDs).
SUGGESTED_REPEATS = 5


def models_scope(seed: int) -> str:
    """What a single-seed comparison is about, in the words every verdict line uses."""
    return f"two trained models, this test set, training seed {seed} fixed"


def _signed(value: float | None, digits: int) -> str:
    return "–" if value is None else f"{value:+.{digits}f}"


def _interval(interval: list[float] | None, digits: int) -> str:
    return "" if not interval else f" [{interval[0]:.{digits}f}, {interval[1]:.{digits}f}]"


def _p(value: float | None) -> str:
    if value is None:
        return "p –"
    return "p < 0.001" if value < 0.001 else f"p = {value:.3f}"


# -- two trained models (one seed) ---------------------------------------------------------------------


def _models_line(pair: dict, figure: str, primary: str, overall: dict | None, digits: int, ending: str, seed) -> str:
    """One pair of trained models: the overall difference with its interval and p, the classes that differ at the
    Holm-adjusted level, and what the verdict is about."""
    a, b = pair.get("a"), pair.get("b")
    head = f"{figure}, {a} vs {b} ({pair.get('about') or models_scope(seed)})"
    if pair.get("error"):
        return f"{head}: no comparison: {pair['error']}"
    if "classes_tested" not in pair:
        return f"{head}: image-level DeLong p-values only (comparison.json predates the patient bootstrap): no verdict"
    alpha = pair.get("alpha", 0.05)
    tested = pair["classes_tested"]
    differ = [name for name, test in (pair.get("per_class") or {}).items() if (test or {}).get("significant")]
    overall = overall or {}
    overall_p = overall.get("p_value")
    overall_text = (
        f"{primary} {a} - {b} {_signed(overall.get('difference'), digits)}"
        f"{_interval(overall.get('interval'), digits)} ({_p(overall_p)})"
    )
    classes = (
        f"{len(differ)} of {tested} classes at Holm-adjusted p < {alpha:g} ({', '.join(differ)})"
        if differ
        else f"no class at Holm-adjusted p < {alpha:g} ({tested} tested)"
    )
    word = "models differ" if differ or (overall_p is not None and overall_p < alpha) else "no difference shown"
    return f"{head}: {word}: {overall_text}; {classes}; {ending}"


def auroc_models_line(pair: dict, seed: int, ending: str = NOT_ESTIMABLE) -> str:
    """comparison.json's ``agreement`` pair as one line."""
    primary = f"mean AUROC over {pair.get('classes_tested')} classes"
    return _models_line(pair, "AUROC", primary, pair.get("mean"), 4, ending, seed)


def localisation_models_line(pair: dict, seed: int, ending: str = NOT_ESTIMABLE) -> str:
    """comparison.json's ``localisation`` pair as one line."""
    figure = f"IoBB accuracy at T = {pair.get('threshold', 0.5):g}"
    return _models_line(pair, figure, "overall", pair.get("overall"), 3, ending, seed)


# -- the framework (paired seeds) ------------------------------------------------------------------------


def _seeds(effect: dict) -> str:
    seeds = effect.get("seeds") or []
    listed = ", ".join(str(s) for s in seeds)
    return f"{len(seeds)} paired seed{'' if len(seeds) == 1 else 's'}" + (f": {listed}" if listed else "")


def _framework_line(direction: str, effect: dict, figure: str, digits: int) -> str:
    """The framework effect of one figure family: the primary figure with its interval, then the classes."""
    primary = effect["primary"]
    level = round(100 * effect.get("confidence", 0.95))
    head = (
        f"framework effect on {figure}, {direction} ({_seeds(effect)}; same seed, initial weights and data order "
        f"per pair; this test set's patients resampled)"
    )
    value = f"{_signed(primary.get('effect'), digits)}{_interval(primary.get('interval'), digits)}"
    if primary.get("interval"):
        value += f" ({level} % interval, t with {primary.get('df')} df)"
    if effect.get("no_verdict"):
        return f"{head}: {value}: no framework verdict: {effect['no_verdict']}"
    with_effect = effect.get("classes_with_effect") or []
    per_class = effect.get("per_class") or {}
    classes = (
        "; ".join(
            f"{name} {_signed(per_class[name]['effect'], digits)}"
            f"{_interval(per_class[name]['adjusted_interval'], digits)}"
            for name in with_effect
        )
        if with_effect
        else "none"
    )
    return (
        f"{head}: {value}: {primary.get('verdict')}; per class (Holm across {effect.get('classes_tested')} "
        f"classes, Holm-consistent intervals): {classes}"
    )


def _excluded_lines(direction: str, excluded: list[dict], what: str) -> list[str]:
    return [f"{what} {direction}: seed {e['seed']} (repeat {e['repeat']}) excluded: {e['reason']}" for e in excluded]


def framework_lines(section: dict | None) -> list[str]:
    """Every backend pair of run.json's ``repeats``: the framework effect on AUROC and on IoBB accuracy, and the
    seeds left out of each pairing (with why)."""
    lines = []
    for pair in (section or {}).get("comparisons") or []:
        paired = pair.get("paired") or {}
        direction = paired.get("direction") or f"{pair.get('a')} - {pair.get('b')}"
        if paired.get("auroc"):
            figure = f"mean AUROC over {paired['auroc']['classes_tested']} classes"
            lines.append(_framework_line(direction, paired["auroc"], figure, 4))
        else:
            lines.append(f"framework effect on mean AUROC, {direction}: no paired seed with predictions")
        lines += _excluded_lines(direction, paired.get("auroc_excluded") or [], "AUROC")
        if paired.get("localisation"):
            effect = paired["localisation"]
            figure = f"IoBB accuracy (overall, T = {effect.get('threshold', 0.5):g})"
            lines.append(_framework_line(direction, effect, figure, 3))
            lines += _excluded_lines(direction, paired.get("localisation_excluded") or [], "IoBB accuracy")
    return lines


# -- how to estimate the framework's effect -------------------------------------------------------------


def repeat_seconds(backends: dict[str, Any]) -> dict[str, float]:
    """Each backend's seconds of the stages a further repeat runs, as this run measured them (stage_seconds)."""
    seconds = {}
    for name, backend in backends.items():
        measured = (backend or {}).get("stage_seconds") or {}
        if measured.get("train") is not None:
            seconds[name] = float(sum(measured.get(stage) or 0.0 for stage in REPEAT_STAGES))
    return seconds


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def estimate_line(run: dict[str, Any]) -> str | None:
    """How to estimate the framework's effect from a run without repeats, and the time it would take, from this
    run's stage seconds (None with fewer than two backends, or with repeats)."""
    backends = run.get("backends") or {}
    if len(backends) < 2 or run.get("repeats"):
        return None
    seconds = repeat_seconds(backends)
    more = SUGGESTED_REPEATS - 1
    text = (
        f"to estimate the framework's effect, rerun the same command with --repeats {SUGGESTED_REPEATS} "
        f"(at least 3): repeats paired by seed"
    )
    if len(seconds) < len(backends):
        return text + " (no time estimate: a backend has no training time in this run)"
    per_repeat = sum(seconds.values())
    parts = " + ".join(f"{name} {value:.0f} s" for name, value in seconds.items())
    return (
        f"{text}; about {_duration(more * per_repeat)} more: {more} more repeats x {per_repeat:.0f} s ({parts}: this "
        f"run's {' + '.join(REPEAT_STAGES)} stage seconds; worker start-up not counted)"
    )


# -- run.json ``verdicts`` -------------------------------------------------------------------------------


def _has_framework_verdict(section: dict | None) -> bool:
    """Whether some backend pair has enough paired seeds for a framework verdict on AUROC."""
    effects = [((p.get("paired") or {}).get("auroc")) for p in (section or {}).get("comparisons") or []]
    return any(effect and effect.get("no_verdict") is None for effect in effects)


def build(run: dict[str, Any], comparison: dict[str, Any]) -> dict[str, Any] | None:
    """run.json's ``verdicts``: what the accuracy verdicts are about (``about``, ``scope``), the seeds behind them,
    every verdict line (the framework's first when there are repeats) and how to estimate the framework's effect;
    None with fewer than two backends."""
    if len(run.get("backends") or {}) < 2:
        return None
    seed = ((run.get("settings") or {}).get("run") or {}).get("seed", 0)
    section = run.get("repeats")
    ending = SEE_PAIRED if section else NOT_ESTIMABLE
    models = [auroc_models_line(p, seed, ending) for p in ((comparison.get("agreement") or {}).get("pairs") or [])]
    models += [
        localisation_models_line(p, seed, ending) for p in ((comparison.get("localisation") or {}).get("pairs") or [])
    ]
    framework = _has_framework_verdict(section)
    seeds = sorted({r["seed"] for b in ((section or {}).get("backends") or {}).values() for r in b["repeats"]})
    if framework:
        scope = (
            "the framework's effect, from repeats paired by seed (same seed, initial weights and data order per "
            "pair), with intervals carrying seed-to-seed and patient variation"
        )
    elif section:
        scope = f"{models_scope(seed)}: fewer than 3 paired seeds, so no framework verdict"
    else:
        scope = f"{models_scope(seed)}: whether these models differ; {NOT_ESTIMABLE}"
    return {
        "about": FRAMEWORK if framework else TRAINED_MODELS,
        "scope": scope,
        "seeds": seeds or [seed],
        "lines": framework_lines(section) + models,
        "how_to_estimate": estimate_line(run),
    }


def summary_lines(run: dict[str, Any], comparison: dict[str, Any]) -> list[str]:
    """The verdict lines and the how-to-estimate line, as run.json holds them (built afresh for an older run)."""
    stated = run.get("verdicts") or build(run, comparison)
    if not stated:
        return []
    return list(stated.get("lines") or []) + ([stated["how_to_estimate"]] if stated.get("how_to_estimate") else [])
