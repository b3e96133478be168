"""The report's sections as plain data (lists and dicts) for the template.

Each builder takes a loaded :class:`~cxrbench.report.load.Run` and returns what its section shows;
missing pieces come back as ``None`` or empty, and the template says so in words. No HTML here:
the template escapes every string.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

from cxrbench.backend.numerics_record import FIELDS as NUMERICS_FIELDS
from cxrbench.errors import CxrError
from cxrbench.metrics import flops, step_profile
from cxrbench.report import charts, verdicts
from cxrbench.report import explain as explain_text
from cxrbench.report.cam_gallery import backend_tiles, gallery_rows
from cxrbench.report.figures import (
    disturbed_note,
    gpu_train_utilisation,
    headline_values,
    no_gpu_reason,
    ratio_sentences,
    repeat_sentences,
)
from cxrbench.report.load import BackendRun, Run, load_predictions, log_tail
from cxrbench.report.references import AUROC_REFERENCES, CHESTXRAY8_IOBB_05, CHESTXRAY8_THRESHOLD

FAILED = ("failed", "interrupted")
#: A numerics row's cell for a backend whose record lacks the key (a run from before the common schema).
NOT_RECORDED = "not recorded"
_METRIC_NAMES = {"iobb": "IoBB", "iou": "IoU"}


def backend_colours(run: Run) -> dict[str, str]:
    return {name: charts.colour(i) for i, name in enumerate(run.backends)}


def resolve_baseline(run: Run, requested: str | None) -> str | None:
    """--baseline, else run.json's baseline, else the first backend; a one-line error for an unknown name."""
    if requested is not None:
        if requested not in run.backends:
            raise CxrError(
                f"--baseline {requested!r}: no such backend in {run.path} (has: {', '.join(run.backends) or 'none'})"
            )
        return requested
    stated = run.meta.get("baseline")
    if stated in run.backends:
        return stated
    return next(iter(run.backends), None)


# -- summary --------------------------------------------------------------------------------------


def _equivalence_of(run: Run, name: str) -> dict[str, Any] | None:
    """Largest max |logit diff| between this backend (native or ONNX) and any other model, vs atol."""
    eq = run.comparison.get("equivalence") or {}
    labels, matrix = eq.get("labels") or [], eq.get("max_abs")
    if not matrix or name not in labels:
        return None
    mine = [i for i, label in enumerate(labels) if label in (name, f"{name}/onnx")]
    worst = max(
        (matrix[i][j] for i in mine for j in range(len(labels)) if j != i and matrix[i][j] is not None), default=None
    )
    if worst is None:
        return None
    return {"max_abs": worst, "atol": eq.get("atol"), "passed": eq.get("atol") is not None and worst <= eq["atol"]}


def _parity_of(run: Run, backend: BackendRun) -> dict[str, Any] | None:
    return (run.comparison.get("parity") or {}).get(backend.name) or (backend.get("onnx") or {}).get("parity_images")


def summary_rows(run: Run) -> list[dict[str, Any]]:
    rows = []
    for name, backend in run.backends.items():
        auroc = backend.get("auroc") or {}
        throughput = backend.get("throughput") or {}
        info = backend.get("info") or {}
        rows.append(
            {
                "name": name,
                "status": backend.status,
                "framework": " ".join(str(info[k]) for k in ("framework", "version") if info.get(k)),
                "mean_auroc": auroc.get("mean"),
                "ci": (auroc.get("ci") or {}).get("mean"),
                "values": headline_values(run, backend),
                "warmup_epoch_time_s": throughput.get("warmup_epoch_time_s"),
                "warmup_only": bool(throughput.get("warmup_only")),
                "train_interval": throughput.get("train_images_per_s_interval"),
                "predict_interval": throughput.get("predict_images_per_s_interval"),
                "no_steady_state": throughput.get("no_steady_state"),
                "disturbed": {phase: disturbed_note(throughput, phase) for phase in ("train", "validate", "predict")},
                "gpu": gpu_train_utilisation(backend),
                "no_gpu": no_gpu_reason(backend),
                "parity": _parity_of(run, backend),
                "equivalence": _equivalence_of(run, name),
            }
        )
    return rows


def summary(run: Run, baseline: str | None) -> dict[str, Any]:
    ratios = ratio_sentences(run, baseline) if baseline else []
    stated = run.meta.get("verdicts") or verdicts.build(run.meta, run.comparison) or {}
    return {
        "rows": summary_rows(run),
        "baseline": baseline,
        "verdicts": stated.get("lines") or [],
        "verdict_scope": stated.get("scope"),
        "how_to_estimate": stated.get("how_to_estimate"),
        "ratios": ratios + repeat_sentences(run.meta.get("repeats")),
    }


# -- accuracy -------------------------------------------------------------------------------------


def _agreement_pairs(run: Run) -> list[dict]:
    return [p for p in ((run.comparison.get("agreement") or {}).get("pairs") or []) if p.get("a") and p.get("b")]


def _interval_cell(report: dict, name: str | None) -> dict[str, Any]:
    """One backend's AUROC cell: value, interval with its valid rounds, or why there is no interval."""
    per_class = report.get("per_class") or {}
    ci, rounds = report.get("ci") or {}, report.get("valid_rounds") or {}
    if name is None:
        return {"value": report.get("mean"), "ci": ci.get("mean"), "rounds": rounds.get("mean"), "note": None}
    return {
        "value": per_class.get(name),
        "ci": (ci.get("per_class") or {}).get(name),
        "rounds": (rounds.get("per_class") or {}).get(name),
        "note": (report.get("no_interval") or {}).get(name),
    }


def _pair_cell(test: dict | None) -> dict[str, Any]:
    """One backend pair's comparison cell (older comparison.json files hold DeLong's p only)."""
    test = test or {}
    return {
        "difference": test.get("difference"),
        "interval": test.get("interval"),
        "rounds": test.get("valid_rounds"),
        "p": test.get("p_value"),
        "p_holm": test.get("p_holm"),
        "significant": test.get("significant"),
        "delong": (test.get("delong") or {}).get("p_value"),
        "note": test.get("note"),
    }


def _run_seed(run: Run) -> int:
    return ((run.meta.get("settings") or {}).get("run") or {}).get("seed", 0)


def _models_ending(run: Run) -> str:
    """How a single-seed verdict line ends: the framework's effect is not estimable, or is judged from repeats."""
    return verdicts.SEE_PAIRED if run.meta.get("repeats") else verdicts.NOT_ESTIMABLE


def auroc_table(run: Run) -> dict[str, Any]:
    """Per class: each backend's AUROC and interval, each backend pair's paired-bootstrap difference with raw and
    Holm-adjusted p (DeLong's image-level p beside it), the published references; a verdict per pair."""
    pairs = _agreement_pairs(run)
    reports = {name: b.get("auroc") or {} for name, b in run.backends.items()}
    rows = []
    for name in run.classes:
        rows.append(
            {
                "class": name,
                "backends": {b: _interval_cell(r, name) for b, r in reports.items()},
                "pairs": [_pair_cell((p.get("per_class") or {}).get(name)) for p in pairs],
                "references": [ref.per_class.get(name) for ref in AUROC_REFERENCES],
                "positives": next((r["positives"].get(name) for r in reports.values() if r.get("positives")), None),
            }
        )
    first = next((r for r in reports.values() if r), {})
    return {
        "rows": rows,
        "mean": {b: _interval_cell(r, None) for b, r in reports.items()},
        "mean_pairs": [_pair_cell(p.get("mean")) for p in pairs],
        "undefined": {b: r.get("undefined") for b, r in reports.items() if r.get("undefined")},
        "pairs": [f"{p['a']} vs {p['b']}" for p in pairs],
        "verdicts": [verdicts.auroc_models_line(p, _run_seed(run), _models_ending(run)) for p in pairs],
        "pair_method": "paired image bootstrap (no patient ids: images taken as independent)"
        if any(p.get("resampling") == "images" for p in pairs)
        else "paired patient bootstrap",
        "correlations": [(f"{p['a']} vs {p['b']}", p.get("score_correlation") or {}) for p in pairs],
        "references": AUROC_REFERENCES,
        "confidence": first.get("confidence"),
        "n": first.get("n"),
        "patients": first.get("patients"),
        "resampling": first.get("resampling"),
        "min_positives": first.get("min_positives"),
        "independence_notes": sorted(
            {note for b in run.backends.values() for note in ((b.get("metrics") or {}).get("independence_notes") or [])}
        ),
    }


def roc_svg(run: Run) -> str | None:
    curves = {}
    for name, backend in run.backends.items():
        loaded = load_predictions(backend)
        if loaded is not None and loaded[0].ndim == 2 and loaded[0].shape == loaded[1].shape:
            curves[name] = loaded
    if not curves:
        return None
    classes = run.classes[: next(iter(curves.values()))[0].shape[1]]
    return charts.roc_chart(curves, classes, backend_colours(run))


# -- speed ----------------------------------------------------------------------------------------


def histories(run: Run) -> dict[str, list[dict]]:
    return {
        name: [r for r in (b.get("history") or []) if isinstance(r, dict) and "epoch" in r]
        for name, b in run.backends.items()
    }


def _stats(values: list[float]) -> dict[str, float]:
    return {"mean": float(np.mean(values)), "p95": float(np.percentile(values, 95)), "n": len(values)}


def utilisation_table(run: Run, samples: dict[str, list[dict]]) -> list[dict[str, Any]]:
    """Mean and p95 per backend, phase and device, from the raw samples (GPU util, CPU percent)."""
    rows = []
    for name, rows_ in samples.items():
        groups: dict[tuple[str, str], list[float]] = {}
        for s in rows_:
            device = str(s.get("device", ""))
            field = "util" if device.startswith("gpu") else "cpu_percent"
            if isinstance(s.get(field), (int, float)):
                groups.setdefault((str(s.get("phase", "")), device), []).append(float(s[field]))
        rows += [
            {"backend": name, "phase": phase, "device": device, **_stats(values)}
            for (phase, device), values in sorted(groups.items())
        ]
    return rows


def speed(run: Run) -> dict[str, Any]:
    history = histories(run)
    colours = backend_colours(run)
    samples = {name: b.monitor_samples for name, b in run.backends.items()}
    scaling = run.meta.get("scaling") or None
    return {
        "histories": history,
        "training_svg": charts.training_chart(history, colours),
        "epoch_svg": charts.epoch_time_chart(history, colours),
        "utilisation_svg": charts.utilisation_chart(samples),
        "utilisation": utilisation_table(run, samples),
        "no_gpu": {name: no_gpu_reason(b) for name, b in run.backends.items() if gpu_train_utilisation(b) is None},
        "scaling": scaling,
        "scaling_svg": charts.scaling_chart(scaling, colours) if scaling else None,
    }


# -- where the time goes, the share of the machine, energy ------------------------------------------------------


def explain(run: Run) -> dict[str, Any]:
    """The "Why faster" section: categories per step (chart and table), the explanations against the baseline, each
    backend's top operations and raw traces, the model FLOPs utilisation and the energy per image."""
    summaries = {name: b.summary for name, b in run.backends.items()}
    comparison = run.meta.get("profile_comparison")
    if comparison is None and run.meta.get("settings"):  # a run.json written before the profile existed
        comparison = step_profile.compare(
            summaries, run.meta.get("baseline"), step_profile.global_batch(run.meta["settings"])
        )
    comparison = comparison or {}
    names, rows = explain_text.category_rows(comparison)
    steps = comparison.get("step_ms") or {}
    profiles = {name: run.backends[name].get("profile") or {} for name in names if name in run.backends}
    return {
        "svg": charts.category_chart(names, rows),
        "backends": names,
        "rows": [
            {**row, "share": {n: (row["ms"].get(n) or 0.0) / steps[n] if steps.get(n) else None for n in names}}
            for row in rows
        ],
        "step_ms": steps,
        "steady_step_ms": comparison.get("steady_step_ms") or {},
        "profiles": profiles,
        "pairs": comparison.get("pairs") or [],
        "missing": comparison.get("missing") or {},
        "rule": flops.RULE,
        "efficiency": [
            {
                "name": name,
                **(b.get("efficiency") or {}),
                "sentence": explain_text.efficiency_sentence(name, b.get("efficiency")),
            }
            for name, b in run.backends.items()
            if b.get("efficiency")
        ],
        "energy": [
            {"name": name, **((b.get("throughput") or {}).get("energy") or {})}
            for name, b in run.backends.items()
            if b.get("throughput")
        ],
    }


# -- repeats and sweeps ---------------------------------------------------------------------------


def repeats(run: Run) -> dict[str, Any] | None:
    """``--repeats``: per class and for the mean, each backend's mean +- SD, and each pair's difference and verdict."""
    section = run.meta.get("repeats") or None
    if not section:
        return None
    backends = section.get("backends") or {}
    pairs = section.get("comparisons") or []

    def row(label: str, spreads: dict[str, dict], verdicts: list[dict]) -> dict[str, Any]:
        return {"label": label, "backends": spreads, "verdicts": verdicts}

    rows = [
        row(
            "mean",
            {b: (v.get("summary") or {}).get("mean_auroc") or {} for b, v in backends.items()},
            [p.get("mean_auroc") or {} for p in pairs],
        )
    ]
    for name in run.classes:
        spreads = {b: ((v.get("summary") or {}).get("per_class") or {}).get(name) or {} for b, v in backends.items()}
        rows.append(row(name, spreads, [(p.get("per_class") or {}).get(name) or {} for p in pairs]))
    return {
        "count": section.get("count"),
        "rule": section.get("rule"),
        "backends": list(backends),
        "pairs": [f"{p.get('a')} - {p.get('b')}" for p in pairs],
        "rows": rows,
        "paired": [paired_table(p) for p in pairs],
        "paired_lines": verdicts.framework_lines(section),
        "speed": {b: (v.get("summary") or {}) for b, v in backends.items()},
        "per_repeat": [{"backend": b, **r} for b, v in backends.items() for r in v.get("repeats") or []],
    }


def _effect_row(label: str, figure: dict, primary: bool) -> dict[str, Any]:
    """One row of a framework-effect table: the effect, the interval the verdict uses, each seed's difference."""
    return {
        "label": label,
        "effect": figure.get("effect"),
        "interval": figure.get("interval") if primary else figure.get("adjusted_interval"),
        "level": None if primary else figure.get("adjusted_level"),
        "per_seed": figure.get("per_seed") or [],
        "seed_sd": figure.get("seed_sd"),
        "shared_sd": math.sqrt(figure["shared_variance"]) if (figure.get("shared_variance") or 0) > 0 else 0.0,
        "p": figure.get("p_value"),
        "p_holm": figure.get("p_holm"),
        "verdict": figure.get("verdict"),
    }


def paired_table(pair: dict) -> dict[str, Any]:
    """A backend pair's framework effect, paired by seed, as tables: AUROC (the mean, then the classes) and IoBB
    accuracy (overall, then the classes), with the seeds each used and the ones left out."""
    paired = pair.get("paired") or {}
    tables = []
    for key, figure in (("auroc", "AUROC"), ("localisation", "IoBB accuracy")):
        effect = paired.get(key)
        if not effect:
            continue
        primary = effect.get("primary") or {}
        rows = [_effect_row(f"{primary.get('name')}", primary, True)]
        rows += [_effect_row(name, f, False) for name, f in (effect.get("per_class") or {}).items()]
        tables.append(
            {
                "figure": effect.get("figure") or figure,
                "seeds": effect.get("seeds") or [],
                "confidence": effect.get("confidence"),
                "no_verdict": effect.get("no_verdict"),
                "rows": rows,
                "untested": effect.get("untested") or {},
                "excluded": paired.get(f"{key}_excluded") or [],
            }
        )
    return {"direction": paired.get("direction") or f"{pair.get('a')} - {pair.get('b')}", "tables": tables}


def sweep(run: Run) -> dict[str, Any] | None:
    """``--sweep``: one row per grid point and backend, and the chart."""
    from cxrbench.report.sweep_chart import sweep_chart

    section = run.meta.get("sweep") or None
    if not section or section.get("cells") is None:
        return None
    return {
        "columns": section.get("keys") or [],
        "cells": section["cells"],
        "svg": sweep_chart(section, backend_colours(run)),
    }


# -- localisation ---------------------------------------------------------------------------------


def _iobb(localisation: dict | None) -> dict | None:
    return (localisation or {}).get("iobb")


def _centred(localisation: dict | None) -> dict | None:
    """The centred-box baseline, stored either as one IoBB result or as {"iobb": ..., "iou": ...}."""
    centred = (localisation or {}).get("centred_box") or None
    if centred and "per_class" not in centred:
        centred = centred.get("iobb")
    return centred


def localisation(run: Run) -> dict[str, Any] | None:
    """Accuracy at T(IoBB)=0.5 per class (backends, centred box, ChestX-ray8), and by threshold."""
    found = {name: b.get("localisation") for name, b in run.backends.items() if _iobb(b.get("localisation"))}
    if not found:
        return None
    first = next(iter(found.values()))
    classes = [c for c in run.classes if any(c in (_iobb(loc).get("per_class") or {}) for loc in found.values())]
    at = CHESTXRAY8_THRESHOLD

    def row(label: str, result: dict | None, kind: str) -> dict[str, Any]:
        per_class = (result or {}).get("per_class") or {}
        return {
            "label": label,
            "kind": kind,
            "cells": [((per_class.get(c) or {}).get("accuracy") or {}).get(at) for c in classes],
            "overall": (((result or {}).get("overall") or {}).get("accuracy") or {}).get(at),
        }

    rows = [row(name, _iobb(loc), "backend") for name, loc in found.items()]
    rows.append(row("centred box", _centred(first), "baseline"))
    rows.append(
        {
            "label": CHESTXRAY8_IOBB_05.name,
            "kind": "reference",
            "cells": [CHESTXRAY8_IOBB_05.per_class.get(c) for c in classes],
            "overall": None,
        }
    )
    thresholds = [f"{t:g}" for t in _iobb(first).get("thresholds") or []]
    by_threshold = []
    for name, loc in found.items():
        for metric in _METRIC_NAMES:
            overall = (loc.get(metric) or {}).get("overall") or {}
            if overall:
                by_threshold.append(
                    {
                        "label": f"{name} ({_METRIC_NAMES[metric]})",
                        "accuracy": overall.get("accuracy") or {},
                        "avg_fp": overall.get("avg_fp") or {},
                        "boxes": overall.get("boxes"),
                    }
                )
    centred = (_centred(first) or {}).get("overall") or {}
    if centred:
        by_threshold.append(
            {
                "label": "centred box (IoBB)",
                "accuracy": centred.get("accuracy") or {},
                "avg_fp": centred.get("avg_fp") or {},
                "boxes": centred.get("boxes"),
            }
        )
    return {
        "classes": classes,
        "rows": rows,
        "pairs": localisation_pairs(run),
        "thresholds": thresholds,
        "by_threshold": by_threshold,
        "threshold": first.get("threshold"),
        "at": at,
        "method": first.get("method"),
        "method_description": first.get("method_description"),
    }


def localisation_pairs(run: Run) -> list[dict[str, Any]]:
    """Each backend pair's box-by-box comparison at T(IoBB) = 0.5 (comparison.json ``localisation``): the overall
    and per-class differences with interval and Holm-adjusted p, and the verdict line naming what it is about."""
    pairs = []
    for pair in (run.comparison.get("localisation") or {}).get("pairs") or []:
        per_class = pair.get("per_class") or {}
        pairs.append(
            {
                "label": f"{pair.get('a')} - {pair.get('b')}",
                "overall": _pair_cell(pair.get("overall")),
                "cells": {name: _pair_cell(test) for name, test in per_class.items()},
                "verdict": verdicts.localisation_models_line(pair, _run_seed(run), _models_ending(run)),
                "resampling": pair.get("resampling"),
            }
        )
    return pairs


def localisation_skipped(run: Run) -> dict[str, str]:
    """Backends whose CAM stage ran but had nothing to score, with the reason it gave."""
    return {
        name: str(b.get("localisation")["skipped"])
        for name, b in run.backends.items()
        if isinstance(b.get("localisation"), dict) and b.get("localisation").get("skipped")
    }


def gallery(run: Run) -> dict[str, Any]:
    evaluation = (run.meta.get("settings") or {}).get("eval") or {}
    threshold, method = evaluation.get("cam_threshold", 0.5), evaluation.get("cam_method", "relative")
    tiles = {name: backend_tiles(b, threshold, method, run.notes) for name, b in run.backends.items()}
    return {"backends": list(tiles), "rows": gallery_rows(tiles)}


# -- ONNX -----------------------------------------------------------------------------------------


def heat_colour(value: float | None) -> str:
    """Cell colour by log10 of the max abs difference: green at 1e-9 and below, red at 1 and above."""
    if value is None:
        return "#eeeeee"
    level = math.log10(max(float(value), 1e-12))
    share = min(max((level + 9.0) / 9.0, 0.0), 1.0)
    return f"hsl({120 * (1 - share):.0f}, 70%, {88 - 18 * share:.0f}%)"


def equivalence(run: Run) -> dict[str, Any] | None:
    eq = run.comparison.get("equivalence")
    if not eq:
        return None
    means = eq.get("mean_abs") or []

    def mean_at(i: int, j: int) -> float | None:
        return means[i][j] if i < len(means) and j < len(means[i]) else None

    cells = [
        [{"value": v, "colour": heat_colour(v), "mean": mean_at(i, j)} for j, v in enumerate(row)]
        for i, row in enumerate(eq.get("max_abs") or [])
    ]
    labels = eq.get("labels") or []
    return {
        "labels": labels,
        "cells": cells,
        "atol": eq.get("atol"),
        "passed": eq.get("passed"),
        "failures": eq.get("failures") or [],
        "skipped": eq.get("skipped"),
    }


def onnx(run: Run) -> dict[str, Any]:
    rows = []
    for name, backend in run.backends.items():
        info = backend.get("onnx") or {}
        rows.append(
            {
                "name": name,
                "export": info.get("export"),
                "parity_images": _parity_of(run, backend),
                "parity_random": info.get("parity_random"),
                "ort": (run.comparison.get("onnxruntime") or {}).get(name),
            }
        )
    options = next((r["ort"]["session_options"] for r in rows if (r["ort"] or {}).get("session_options")), None)
    return {"equivalence": equivalence(run), "backends": rows, "session_options": options}


# -- environment and failures ---------------------------------------------------------------------


def _grouped_settings(settings: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Settings by section (numerics first: they change the numbers), scalars under "suite"."""
    from cxrbench.report.run_comparison import flatten

    groups = {"suite": {k: v for k, v in settings.items() if not isinstance(v, dict)}}
    groups.update({k: flatten(v) for k, v in settings.items() if isinstance(v, dict)})
    return dict(sorted(groups.items(), key=lambda item: item[0] != "numerics"))


def numerics_table(records: dict[str, Any]) -> dict[str, Any] | None:
    """The backends' numerics records side by side: a row per key in the core's schema order, a column per backend.

    Every backend fills the same keys (:mod:`cxrbench.backend.numerics_record`); only the ``framework`` extras and
    ``versions`` differ, and a key a backend lacks says so (older runs recorded other keys).
    """
    from cxrbench.report.run_comparison import flatten

    flat = {name: flatten(record) for name, record in records.items() if record}
    if not flat:
        return None
    order = list(NUMERICS_FIELDS)
    keys = sorted(
        dict.fromkeys(key for record in flat.values() for key in record),
        key=lambda key: order.index(key.split(".")[0]) if key.split(".")[0] in order else len(order),
    )
    rows = [
        {
            "key": key,
            "values": [record.get(key, NOT_RECORDED) for record in flat.values()],
            "same": len({json.dumps(record.get(key, NOT_RECORDED), default=str) for record in flat.values()}) == 1,
        }
        for key in keys
    ]
    return {"backends": list(flat), "rows": rows}


def environment(run: Run) -> dict[str, Any]:
    from cxrbench.report.run_comparison import flatten

    env = dict(run.meta.get("environment") or {})
    packages = env.pop("packages", {}) or {}
    settings = _grouped_settings(run.meta.get("settings") or {})
    return {
        "facts": flatten(env),
        "packages": packages,
        "settings": settings,
        "numerics": numerics_table({name: (b.get("train") or {}).get("numerics") for name, b in run.backends.items()}),
        "info": {name: b.get("info") for name, b in run.backends.items() if b.get("info")},
    }


def failures(run: Run) -> list[dict[str, Any]]:
    """Backends that failed or were interrupted, with their error and the tail of their log."""
    return [
        {"name": name, "status": b.status, "error": b.error, "log": log_tail(b)}
        for name, b in run.backends.items()
        if b.status in FAILED
    ]


def kept(run: Run) -> str | None:
    """What the run folder kept under ``run.keep`` (run.json ``kept``), as one sentence."""
    info = run.meta.get("kept")
    if not info:
        return None
    removed = info.get("removed") or []
    sentence = f"run.keep = {info.get('keep')}: the folder keeps {info.get('kept_bytes', 0) / 2**20:.1f} MiB"
    if removed:
        mib = info.get("removed_bytes", 0) / 2**20
        sentence += f"; removed {len(removed)} files ({mib:.1f} MiB): {', '.join(removed)}"
    return sentence + (f" ({info['note']})" if info.get("note") else "")


def pending(run: Run) -> list[str]:
    return [name for name, b in run.backends.items() if b.status not in FAILED + ("completed",)]
