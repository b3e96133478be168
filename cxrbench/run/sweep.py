"""``--sweep KEY=V1,V2`` (repeatable): the speed part of every backend over a grid of settings.

Every grid point runs the worker stages ``prepare-check`` and ``train`` in ``RUN/sweep/<point>/<backend>/``
with the point's overrides (worker ``--set key=value``). Keys and values are validated with the
suite's own rules before any work starts. A point a backend refuses by design (it raised
:class:`~cxrbench.errors.UnsupportedSetting`, e.g. bf16 in an fp32-only backend) is a ``refused`` cell, one that
breaks a ``failed`` cell; neither fails the sweep. The table (backend x point -> steady img/s, first-step s, peak
memory) goes to run.json (``sweep``) and ``sweep.csv``.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import re
from pathlib import Path
from typing import Any

from cxrbench.errors import CxrError, SuiteError
from cxrbench.files import read_json, read_jsonl, write_text
from cxrbench.run.folder import MONITOR_JSONL, STATUS_JSON, SWEEP_CSV, THROUGHPUT_JSON, sweep_folder
from cxrbench.suite import Settings, apply_overrides, parse_set_option

#: Sections a sweep may not vary: they change the data set, the initial weights or the run itself.
FIXED_SECTIONS = {
    "data": "it changes the prepared data set (run one suite per value; data.crop: docs/preprocessing.md)",
    "model": "it changes the shared initial weights (run one suite per value)",
    "run": "use --repeats for seeds and --gpus for GPU counts",
    "profile": "a sweep point runs the speed stages only, without the profile",
}
SWEEP_STAGES = ("prepare-check", "train")
CSV_COLUMNS = (
    "point",
    "backend",
    "status",
    "train_images_per_s",
    "interval_low",
    "interval_high",
    "first_step_s",
    "peak_memory_mib",
    "memory_source",
    "framework_peak_memory_mib",
    "disturbed",
    "no_steady_state",
    "error",
)


def _parse_one(text: str, settings: Settings) -> tuple[str, list[Any]]:
    key, sep, values = text.partition("=")
    key = key.strip()
    if not sep or "." not in key or not values.strip():
        raise CxrError(f"--sweep {text!r}: expected section.key=value1,value2")
    section = key.partition(".")[0]
    if section in FIXED_SECTIONS:
        raise CxrError(f"--sweep {key}: cannot be swept, {FIXED_SECTIONS[section]}")
    parsed = [parse_set_option(f"{key}={value.strip()}")[1] for value in values.split(",")]
    for value in parsed:
        try:
            apply_overrides(settings, {key: value})
        except SuiteError as exc:
            raise CxrError(f"--sweep {key}: {str(exc).removeprefix('<override>: ')}") from None
    if len({json.dumps(v) for v in parsed}) != len(parsed):
        raise CxrError(f"--sweep {key}: a value is given twice ({values.strip()})")
    return key, parsed


def parse_grid(texts: list[str], settings: Settings) -> dict[str, list[Any]]:
    """``["numerics.precision=fp32,bf16", ...]`` -> ``{key: [values]}``, every value validated."""
    grid: dict[str, list[Any]] = {}
    for text in texts:
        key, values = _parse_one(text, settings)
        if key in grid:
            raise CxrError(f"--sweep {key}: given twice (list every value in one --sweep)")
        grid[key] = values
    return grid


def _text(value: Any) -> str:
    return json.dumps(value) if not isinstance(value, str) else value


def point_name(overrides: dict[str, Any]) -> str:
    """A folder name such as ``numerics.precision-bf16__train.batch_size-64`` (safe characters only)."""
    return "__".join(re.sub(r"[^A-Za-z0-9._-]", "_", f"{key}-{_text(value)}") for key, value in overrides.items())


def points(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination, the first key varying slowest: ``[{"name": ..., "overrides": {...}}]``."""
    if not grid:
        return []
    combos = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    return [{"name": point_name(combo), "overrides": combo} for combo in combos]


def set_options(overrides: dict[str, Any]) -> list[str]:
    """The worker's ``--set key=value`` arguments (values as TOML, read back by parse_set_option)."""
    options = []
    for key, value in overrides.items():
        options += ["--set", f"{key}={json.dumps(value)}"]
    return options


# -- the table -------------------------------------------------------------------------------------


def peak_memory(folder: Path) -> tuple[float | None, str | None]:
    """The largest memory sample while training: the GPUs' memory when sampled, else the worker's RSS."""
    rows = [r for r in read_jsonl(folder / MONITOR_JSONL) if r.get("phase") in ("train", "validate")]
    gpu = [
        r["mem_mib"]
        for r in rows
        if str(r.get("device", "")).startswith("gpu") and isinstance(r.get("mem_mib"), (int, float))
    ]
    if gpu:
        return float(max(gpu)), "gpu"
    rss = [r["rss_mib"] for r in rows if r.get("device") == "cpu" and isinstance(r.get("rss_mib"), (int, float))]
    return (float(max(rss)), "rss") if rss else (None, None)


def cell(folder: Path, point: dict[str, Any], backend: str) -> dict[str, Any]:
    status = read_json(folder / STATUS_JSON) or {}
    throughput = read_json(folder / THROUGHPUT_JSON) or {}
    memory, source = peak_memory(folder)
    return {
        "point": point["name"],
        "overrides": point["overrides"],
        "backend": backend,
        "status": "refused" if status.get("refused") else status.get("status", "pending"),
        "error": status.get("error"),
        "train_images_per_s": throughput.get("train_images_per_s"),
        "train_images_per_s_interval": throughput.get("train_images_per_s_interval"),
        "first_step_s": throughput.get("first_step_s"),
        "peak_memory_mib": memory,
        "memory_source": source,
        "framework_peak_memory_mib": throughput.get("framework_peak_memory_mib"),
        "disturbed": throughput.get("disturbed"),
        "no_steady_state": throughput.get("no_steady_state"),
    }


def table(run_dir: Path, backends: list[str], grid: dict[str, list[Any]]) -> dict[str, Any]:
    """run.json's ``sweep`` section: the grid and one cell per (point, backend)."""
    cells = [cell(sweep_folder(run_dir, p["name"], name), p, name) for p in points(grid) for name in backends]
    return {"grid": grid, "keys": list(grid), "points": [p["name"] for p in points(grid)], "cells": cells}


def to_csv(section: dict[str, Any]) -> str:
    """``sweep.csv``: one row per cell, the swept keys as leading columns."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([*section["keys"], *CSV_COLUMNS])
    for c in section["cells"]:
        low, high = c["train_images_per_s_interval"] or (None, None)
        values = {**c, "interval_low": low, "interval_high": high}
        swept = [_text(c["overrides"][k]) for k in section["keys"]]
        writer.writerow(swept + ["" if values[k] is None else _text(values[k]) for k in CSV_COLUMNS])
    return buffer.getvalue()


def write_csv(run_dir: Path, section: dict[str, Any]) -> Path:
    return write_text(Path(run_dir) / SWEEP_CSV, to_csv(section))
