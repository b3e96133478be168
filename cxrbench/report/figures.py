"""Headline figures of a backend, and how two backends compare, in words a reader takes in at a glance.

The summary section and the run-to-run comparison both read these, so a number means the same
thing everywhere in the report.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from cxrbench.backend import timing
from cxrbench.machine.monitor import noise
from cxrbench.report.load import BackendRun, Run


@dataclass(frozen=True)
class Headline:
    """A headline number: how to label it and which direction is better."""

    key: str
    label: str
    unit: str
    higher_is_better: bool | None  #: None: neither direction is better in itself


HEADLINES = (
    Headline("mean_auroc", "mean AUROC", "", True),
    Headline("localisation_iobb_05", "CAM localisation (IoBB > 0.5)", "", True),
    Headline("train_images_per_s", "train images/s", "img/s", True),
    Headline("first_step_s", "time to first step", "s", False),
    Headline("epoch_time_s", "epoch time", "s", False),
    Headline("validate_images_per_s", "validation images/s", "img/s", True),
    Headline("predict_images_per_s", "predict images/s", "img/s", True),
    Headline("gpu_util_mean", "GPU utilisation (train, mean)", "%", True),
    Headline("onnx_latency_ms_p50", "ONNX Runtime latency b1 p50", "ms", False),
    Headline("onnx_throughput_b32", "ONNX Runtime throughput b32", "img/s", True),
)
HEADLINE_BY_KEY = {f.key: f for f in HEADLINES}


def _number(value: Any) -> float | None:
    return (
        float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value) else None
    )


def gpu_train_utilisation(backend: BackendRun) -> dict[str, float] | None:
    """Mean and p95 GPU utilisation over the training phase, from the raw monitor samples.

    None when no GPU sample exists: the report then says "no GPU" instead of showing zeros.
    """
    utils = [
        float(s["util"])
        for s in backend.monitor_samples
        if s.get("phase") == "train"
        and str(s.get("device", "")).startswith("gpu")
        and _number(s.get("util")) is not None
    ]
    if not utils:
        return None
    return {"mean": float(np.mean(utils)), "p95": float(np.percentile(utils, 95)), "samples": len(utils)}


def no_gpu_reason(backend: BackendRun) -> str:
    """Why there are no GPU figures, in the monitor's own words."""
    monitor = backend.get("gpu") or {}
    if monitor.get("gpu_available") is False:
        reason = str(monitor.get("reason") or "none found")
        return reason if reason.lower().startswith("no gpu") else f"no GPU ({reason})"
    return "no GPU samples recorded"


def localisation_accuracy(backend: BackendRun, threshold: str = "0.5") -> Any:
    """The share of boxes found by the CAM at IoBB > ``threshold`` over every class (localisation.json)."""
    iobb = (backend.get("localisation") or {}).get("iobb") or {}
    return ((iobb.get("overall") or {}).get("accuracy") or {}).get(threshold)


def headline_values(run: Run, backend: BackendRun) -> dict[str, float | None]:
    """Every :data:`HEADLINES` figure of one backend (None where not measured)."""
    throughput = backend.get("throughput") or {}
    ort = (run.comparison.get("onnxruntime") or {}).get(backend.name) or {}
    gpu = gpu_train_utilisation(backend)
    return {
        "mean_auroc": _number((backend.get("auroc") or {}).get("mean")),
        "localisation_iobb_05": _number(localisation_accuracy(backend)),
        "train_images_per_s": _number(throughput.get("train_images_per_s")),
        "first_step_s": _number(throughput.get("first_step_s")),
        "epoch_time_s": _number(throughput.get("epoch_time_s")),
        "validate_images_per_s": _number(throughput.get("validate_images_per_s")),
        "predict_images_per_s": _number(throughput.get("predict_images_per_s")),
        "gpu_util_mean": gpu["mean"] if gpu else None,
        "onnx_latency_ms_p50": _number((ort.get("latency_ms_b1") or {}).get("p50")),
        "onnx_throughput_b32": _number(ort.get("throughput_b32_images_per_s")),
    }


def speed_ratio(
    name: str, baseline: str, value: float | None, base: float | None, figure: Headline, what: str
) -> str | None:
    """ "keras is 1.6x slower than pytorch in training (18.3 vs 29.9 img/s)"; None if not comparable."""
    if value is None or base is None or value <= 0 or base <= 0:
        return None
    better = value > base if figure.higher_is_better else value < base
    ratio = max(value, base) / min(value, base)
    if ratio < 1.005:
        return f"{name} is as fast as {baseline} {what} ({format_number(value)} vs {format_number(base)} {figure.unit})"
    word = "faster" if better else "slower"
    figures = f"{format_number(value)} vs {format_number(base)} {figure.unit}"
    return f"{name} is {ratio:.2f}x {word} than {baseline} {what} ({figures})"


#: Steady-state figures compared between backends: (phase, throughput.json key, words).
STEADY_RATIOS = (("train", "train_images_per_s", "in training"), ("predict", "predict_images_per_s", "at prediction"))


def disturbed_note(throughput: dict[str, Any], phase: str) -> str:
    """ " (disturbed: others used 42% of the CPU)" when the noise guard flagged ``phase``, else ""."""
    verdict = (throughput.get("disturbance") or {}).get(phase) or {}
    return f" (disturbed: {noise.describe(verdict, limit=False)})" if verdict.get("disturbed") else ""


def _no_steady(name: str, throughput: dict[str, Any], phase: str, what: str) -> str:
    if phase == "train" and throughput.get("no_steady_state"):
        return f"{name} {what}: {throughput['no_steady_state']}"
    windows = ((throughput.get("phases") or {}).get(phase) or {}).get("windows", 0)
    return f"{name} {what}: no steady state ({windows} timing window(s), {timing.MIN_WINDOWS} needed)"


def steady_ratio(
    name: str, baseline: str, value: dict[str, Any], base: dict[str, Any], phase: str, key: str, what: str
) -> str | None:
    """ "keras 0.93x pytorch in training [0.88, 0.97] (steady state, one process each, 24.1 vs 25.9 img/s)", or why
    there is none (no steady state; a measurement the noise guard marked disturbed).

    The interval is a seeded bootstrap over both backends' window rates
    (:func:`cxrbench.backend.timing.ratio_interval`): the spread of two processes' windows, not of fresh processes,
    which differ more (the sentence says so; the repeats give the spread across processes).
    """
    if key not in value or key not in base:  # not measured (stage not run): nothing to say
        return None
    if value.get(key) is None or base.get(key) is None:
        missing = [(n, t) for n, t in ((name, value), (baseline, base)) if t.get(key) is None]
        return "; ".join(_no_steady(n, t, phase, what) for n, t in missing)
    busy = [
        f"{n} {note.strip(' ()')}" for n, t in ((name, value), (baseline, base)) if (note := disturbed_note(t, phase))
    ]
    if busy:  # a busy machine decides a ratio as much as the frameworks do: no verdict from it
        return (
            f"no speed verdict {what}: the machine was busy while it was timed ({'; '.join(busy)}); "
            f"{name} {format_number(value[key])} vs {baseline} {format_number(base[key])} img/s, rerun on a quiet "
            "machine"
        )
    interval = timing.ratio_interval(
        (value.get("window_rates") or {}).get(phase) or [], (base.get("window_rates") or {}).get(phase) or []
    )
    spread = f" [{interval[0]:.2f}, {interval[1]:.2f}]" if interval else ""
    return (
        f"{name} {value[key] / base[key]:.2f}x {baseline} {what}{spread} (steady state, one process each, "
        f"{format_number(value[key])} vs {format_number(base[key])} img/s)"
    )


def first_step_sentence(name: str, baseline: str, value: dict[str, Any], base: dict[str, Any]) -> str | None:
    """ "keras spends 104 s before its first step, pytorch 1.2 s" (tracing, compilation, loader start)."""
    mine, theirs = _number(value.get("first_step_s")), _number(base.get("first_step_s"))
    if mine is None or theirs is None:
        return None
    return f"{name} spends {format_number(mine)} s before its first step, {baseline} {format_number(theirs)} s"


def speed_sentences(throughputs: dict[str, dict[str, Any] | None], baseline: str) -> list[str]:
    """Every backend against the baseline: steady-state ratios with their interval, and the warm-up."""
    base = throughputs.get(baseline) or {}
    sentences = []
    for name, throughput in throughputs.items():
        if name == baseline or not throughput or not base:
            continue
        for phase, key, what in STEADY_RATIOS:
            sentences.append(steady_ratio(name, baseline, throughput, base, phase, key, what))
        sentences.append(first_step_sentence(name, baseline, throughput, base))
    return [s for s in sentences if s]


def ratio_sentences(run: Run, baseline: str) -> list[str]:
    """Steady-state speed sentences against the baseline, then ONNX Runtime latency at batch 1."""
    if baseline not in run.backends:
        return []
    sentences = speed_sentences({name: b.get("throughput") for name, b in run.backends.items()}, baseline)
    base = headline_values(run, run.backends[baseline])
    figure = HEADLINE_BY_KEY["onnx_latency_ms_p50"]
    for name, backend in run.backends.items():
        if name != baseline:
            value = headline_values(run, backend)[figure.key]
            sentence = speed_ratio(name, baseline, value, base[figure.key], figure, "in ONNX Runtime at batch 1")
            sentences += [sentence] if sentence else []
    return sentences


def _fixed(value: Any, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def repeat_sentences(section: dict[str, Any] | None) -> list[str]:
    """With ``--repeats``: each backend's mean AUROC and speed across seeds, and the secondary, unpaired Welch
    verdict on their difference (the paired framework effect leads: :mod:`cxrbench.report.verdicts`)."""
    if not section:
        return []
    lines = []
    for name, result in (section.get("backends") or {}).items():
        auroc, speed = result["summary"]["mean_auroc"], result["summary"]["train_images_per_s"]
        span = speed.get("interval")
        lines.append(
            f"{name} over {auroc['n']} seed(s): mean AUROC {_fixed(auroc['mean'], 4)} (SD "
            f"{_fixed(auroc['sd'], 4)}), steady img/s median {_fixed(speed.get('median'), 1)}"
            + (f" [{span[0]:.1f}, {span[1]:.1f}] across seeds" if span else "")
        )
    for pair in section.get("comparisons") or []:
        lines.append(f"mean AUROC {pair['a']} - {pair['b']}, unpaired Welch (secondary): {pair['mean_auroc']['text']}")
    return lines


def format_number(value: Any, digits: int = 3) -> str:
    """Numbers with ``digits`` significant figures, "–" for missing ones."""
    number = _number(value)
    if number is None:
        return "–"
    if number != 0 and (abs(number) >= 1e5 or abs(number) < 1e-3):
        return f"{number:.{max(digits - 1, 0)}e}"
    return f"{number:.{digits}g}" if abs(number) < 10**digits else f"{number:.0f}"
