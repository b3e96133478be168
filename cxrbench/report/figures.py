"""Headline figures of a backend, and how two backends compare, in words a reader takes in at a glance.

The summary section and the run-to-run comparison both read these, so a number means the same
thing everywhere in the report.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

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
    Headline("train_images_per_s", "train images/s", "img/s", True),
    Headline("epoch_time_s", "epoch time", "s", False),
    Headline("predict_images_per_s", "predict images/s", "img/s", True),
    Headline("gpu_util_mean", "GPU utilisation (train, mean)", "%", True),
    Headline("onnx_latency_ms_p50", "ONNX Runtime latency b1 p50", "ms", False),
    Headline("onnx_throughput_b32", "ONNX Runtime throughput b32", "img/s", True),
)
HEADLINE_BY_KEY = {f.key: f for f in HEADLINES}


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value) else None


def gpu_train_utilisation(backend: BackendRun) -> dict[str, float] | None:
    """Mean and p95 GPU utilisation over the training phase, from the raw monitor samples.

    None when no GPU sample exists: the report then says "no GPU" instead of showing zeros.
    """
    utils = [
        float(s["util"])
        for s in backend.monitor_samples
        if s.get("phase") == "train" and str(s.get("device", "")).startswith("gpu") and _number(s.get("util")) is not None
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


def headline_values(run: Run, backend: BackendRun) -> dict[str, float | None]:
    """Every :data:`HEADLINES` figure of one backend (None where not measured)."""
    throughput = backend.get("throughput") or {}
    ort = (run.comparison.get("onnxruntime") or {}).get(backend.name) or {}
    gpu = gpu_train_utilisation(backend)
    return {
        "mean_auroc": _number((backend.get("auroc") or {}).get("mean")),
        "train_images_per_s": _number(throughput.get("train_images_per_s")),
        "epoch_time_s": _number(throughput.get("epoch_time_s")),
        "predict_images_per_s": _number(throughput.get("predict_images_per_s")),
        "gpu_util_mean": gpu["mean"] if gpu else None,
        "onnx_latency_ms_p50": _number((ort.get("latency_ms_b1") or {}).get("p50")),
        "onnx_throughput_b32": _number(ort.get("throughput_b32_images_per_s")),
    }


def speed_ratio(name: str, baseline: str, value: float | None, base: float | None, figure: Headline, what: str) -> str | None:
    """"keras is 1.6x slower than pytorch in training (18.3 vs 29.9 img/s)"; None if not comparable."""
    if value is None or base is None or value <= 0 or base <= 0:
        return None
    better = value > base if figure.higher_is_better else value < base
    ratio = max(value, base) / min(value, base)
    if ratio < 1.005:
        return f"{name} is as fast as {baseline} {what} ({format_number(value)} vs {format_number(base)} {figure.unit})"
    word = "faster" if better else "slower"
    return f"{name} is {ratio:.2f}x {word} than {baseline} {what} ({format_number(value)} vs {format_number(base)} {figure.unit})"


_RATIO_FIGURES = (
    ("train_images_per_s", "in training"),
    ("predict_images_per_s", "at prediction"),
    ("onnx_latency_ms_p50", "in ONNX Runtime at batch 1"),
)


def ratio_sentences(run: Run, baseline: str) -> list[str]:
    """One sentence per (backend, speed figure) against the baseline backend."""
    if baseline not in run.backends:
        return []
    base = headline_values(run, run.backends[baseline])
    sentences = []
    for name, backend in run.backends.items():
        if name == baseline:
            continue
        values = headline_values(run, backend)
        for key, what in _RATIO_FIGURES:
            sentence = speed_ratio(name, baseline, values[key], base[key], HEADLINE_BY_KEY[key], what)
            if sentence:
                sentences.append(sentence)
    return sentences


def format_number(value: Any, digits: int = 3) -> str:
    """Numbers with ``digits`` significant figures, "–" for missing ones."""
    number = _number(value)
    if number is None:
        return "–"
    if number != 0 and (abs(number) >= 1e5 or abs(number) < 1e-3):
        return f"{number:.{max(digits - 1, 0)}e}"
    return f"{number:.{digits}g}" if abs(number) < 10 ** digits else f"{number:.0f}"
