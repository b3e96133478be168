"""Why one backend is faster, in words and tables: where the time goes, the share of the machine, energy per image.

One set of sentences for the report and the end-of-run summary, from run.json's backend summaries (``profile``,
``efficiency``, ``throughput.energy``) and ``profile_comparison`` (:func:`cxrbench.metrics.step_profile.compare`).
"""

from __future__ import annotations

from typing import Any

from cxrbench.metrics.operation_categories import LABELS

_PREFIXES = ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"))


def flop_rate(value: float | None, unit: str = "FLOP/s") -> str:
    """``4.1e10`` -> ``41.0 GFLOP/s``."""
    if value is None:
        return "–"
    scale, prefix = next(((s, p) for s, p in _PREFIXES if abs(value) >= s), (1.0, ""))
    return f"{value / scale:.3g} {prefix}{unit}"


def _percent(value: float | None) -> str:
    return f"{100 * value:.1f} %" if value is not None else "–"


def efficiency_sentence(name: str, efficiency: dict[str, Any] | None) -> str | None:
    """The share of the machine in one sentence: "pytorch reached 41.0 GFLOP/s of model FLOPs in training (1.39
    GFLOP per image x 29.5 img/s): 39.0 % of the measured ceiling (105 GFLOP/s, torch.matmul float32 2048^2 on
    cpu)"."""
    if not efficiency:
        return None
    flops = efficiency.get("flops") or {}
    achieved = efficiency.get("achieved_flop_per_s")
    per_image = flop_rate(flops.get("training_flops"), "FLOP")
    if achieved is None:
        return f"{name}: {per_image} per training image; no achieved rate (no steady training figure)"
    text = (
        f"{name} reached {flop_rate(achieved)} of model FLOPs in training ({per_image} per image x "
        f"{efficiency['train_images_per_s']:.1f} img/s)"
    )
    ceiling = efficiency.get("ceiling") or {}
    measured, datasheet = ceiling.get("measured"), ceiling.get("datasheet")
    if measured:
        text += (
            f": {_percent(efficiency.get('fraction_of_measured'))} of the measured ceiling "
            f"({flop_rate(measured['flop_per_s'])}, {measured['how']} {measured['dtype']} {measured['size']}^2 on "
            f"{measured['device']})"
        )
    else:
        text += f"; no measured ceiling ({ceiling.get('reason') or 'not measured'})"
    if datasheet:
        text += (
            f", {_percent(efficiency.get('fraction_of_datasheet'))} of the {datasheet['model']} datasheet's "
            f"{flop_rate(datasheet['flop_per_s'])} ({datasheet['precision']})"
        )
    return text


def energy_sentence(name: str, energy: dict[str, Any] | None) -> str:
    """Joules per training and inference image, or why there are none."""
    energy = energy or {}
    parts = [
        f"{(energy.get(phase) or {}).get('joules_per_image'):.3g} J per {label} image"
        for phase, label in (("train", "training"), ("predict", "inference"))
        if (energy.get(phase) or {}).get("joules_per_image") is not None
    ]
    if not parts:
        return f"{name} energy: {energy.get('reason') or 'not measured'}"
    return f"{name} energy: {', '.join(parts)} ({energy.get('covers')}; steady windows only)"


def category_rows(comparison: dict[str, Any] | None) -> tuple[list[str], list[dict[str, Any]]]:
    """(backends, rows) of the ms-per-step table: one row per category with a value somewhere, then the step."""
    comparison = comparison or {}
    backends = list(comparison.get("step_ms") or {})
    rows = [
        row
        for row in comparison.get("categories") or []
        if any((row["ms"].get(name) or 0.0) > 0.0 for name in backends)
    ]
    return backends, rows


def summary_lines(run: dict[str, Any]) -> list[str]:
    """The end-of-run summary's part: the category table, the explanations, the machine share and energy."""
    comparison = run.get("profile_comparison") or {}
    backends, rows = category_rows(comparison)
    lines = []
    if backends:
        width = max(len(LABELS[key]) for key in LABELS) + 2
        lines.append("where the time goes, ms per training step (profiled):")
        lines.append("".ljust(width) + "".join(name.rjust(12) for name in backends))
        for row in rows:
            lines.append(row["label"].ljust(width) + "".join(f"{row['ms'].get(n) or 0.0:12.1f}" for n in backends))
        for label, key in (("step (profiled)", "step_ms"), ("step (timed, steady)", "steady_step_ms")):
            values = comparison.get(key) or {}
            lines.append(
                label.ljust(width)
                + "".join(f"{values[n]:12.1f}" if values.get(n) is not None else "–".rjust(12) for n in backends)
            )
        lines += [pair["sentence"] for pair in comparison.get("pairs") or []]
    lines += [f"{name}: no profile: {reason}" for name, reason in (comparison.get("missing") or {}).items()]
    costs = [
        f"{name} {seconds.get('profile', 0.0):.1f} s + {seconds.get('ceiling', 0.0):.1f} s"
        for name, summary in (run.get("backends") or {}).items()
        if (seconds := summary.get("stage_seconds") or {}).keys() & {"profile", "ceiling"}
    ]
    if costs:
        lines.append("cost of the profile + ceiling stages: " + ", ".join(costs))
    for name, summary in (run.get("backends") or {}).items():
        sentence = efficiency_sentence(name, summary.get("efficiency"))
        if sentence:
            lines.append(sentence)
        energy = (summary.get("throughput") or {}).get("energy")
        if energy is not None:
            lines.append(energy_sentence(name, energy))
    return lines
