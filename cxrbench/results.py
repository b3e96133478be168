"""A run's results as pandas tables: ``cxrbench.results.load(RUN_DIR)``, and the ``cxrbench results`` command.

The run folder is read through the report's reader (:func:`cxrbench.report.load.load_run`), so the tables
and the HTML report always agree and no file name is known here. Every table is long ("tidy"): one row
per backend and class / epoch / phase / threshold, ready to pivot, filter or stack with other runs.
pandas is an optional extra (``pip install -e ".[results]"``): the benchmark itself never needs it.

Example::

    import cxrbench.results
    r = cxrbench.results.load("runs/2026-12-02")
    r.auroc.pivot(index="class", columns="backend", values="auroc")
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cxrbench.errors import CxrError

TABLES = ("auroc", "history", "throughput", "utilisation", "localisation")
#: The mean over classes appears in the AUROC table as this pseudo-class.
MEAN_ROW = "(mean)"
#: History fields that are lists of windows, not one value per epoch.
_HISTORY_LISTS = ("train_window_list", "val_window_list", "steady_images_per_s_interval", "val_images_per_s_interval")


def _pandas():
    try:
        import pandas
    except ImportError:
        raise CxrError('cxrbench.results needs pandas: pip install -e ".[results]"') from None
    return pandas


@dataclass
class Results:
    """One run's tables (pandas DataFrames); ``run`` is the run folder as given, also a column of every table."""

    run: str
    auroc: Any  #: backend, class, auroc, ci_low, ci_high, positives, no_interval
    history: Any  #: backend, epoch, warmup, train_loss, val_loss, lr, images_per_s, ... (history.json's fields)
    throughput: Any  #: backend, phase (train / validate / predict), images_per_s, ci_low, ci_high, windows, steady
    utilisation: Any  #: backend, phase, device, mean, p95, n (GPU util % or CPU percent)
    localisation: Any  #: backend, metric (iobb / iou), class (or "(overall)"), threshold, accuracy, avg_fp, boxes

    def table(self, name: str):
        if name not in TABLES:
            raise CxrError(f"--table {name}: unknown table (one of {', '.join(TABLES)})")
        return getattr(self, name)


def _interval(value) -> tuple[float | None, float | None]:
    return (value[0], value[1]) if isinstance(value, (list, tuple)) and len(value) == 2 else (None, None)


def _auroc_rows(name: str, report: dict) -> list[dict[str, Any]]:
    ci = report.get("ci") or {}
    per_class_ci = ci.get("per_class") or {}
    positives, no_interval = report.get("positives") or {}, report.get("no_interval") or {}
    rows = []
    for cls, value in (report.get("per_class") or {}).items():
        low, high = _interval(per_class_ci.get(cls))
        rows.append(
            {
                "backend": name,
                "class": cls,
                "auroc": value,
                "ci_low": low,
                "ci_high": high,
                "positives": positives.get(cls),
                "no_interval": no_interval.get(cls),
            }
        )
    low, high = _interval(ci.get("mean"))
    rows.append(
        {
            "backend": name,
            "class": MEAN_ROW,
            "auroc": report.get("mean"),
            "ci_low": low,
            "ci_high": high,
            "positives": None,
            "no_interval": None,
        }
    )
    return rows


def _history_rows(name: str, history: list) -> list[dict[str, Any]]:
    return [
        {"backend": name, **{k: v for k, v in record.items() if k not in _HISTORY_LISTS}}
        for record in history
        if isinstance(record, dict)
    ]


def _throughput_rows(name: str, throughput: dict) -> list[dict[str, Any]]:
    rows = []
    for phase, entry in (throughput.get("phases") or {}).items():
        low, high = _interval(entry.get("interval"))
        rows.append(
            {
                "backend": name,
                "phase": phase,
                "images_per_s": entry.get("images_per_s"),
                "ci_low": low,
                "ci_high": high,
                "windows": entry.get("windows"),
                "steady": entry.get("steady"),
            }
        )
    return rows


def _localisation_rows(name: str, localisation: dict) -> list[dict[str, Any]]:
    rows = []
    for metric in ("iobb", "iou"):
        result = localisation.get(metric) or {}
        groups = {**(result.get("per_class") or {}), "(overall)": result.get("overall") or {}}
        for cls, entry in groups.items():
            for threshold, accuracy in (entry.get("accuracy") or {}).items():
                rows.append(
                    {
                        "backend": name,
                        "metric": metric,
                        "class": cls,
                        "threshold": float(threshold),
                        "accuracy": accuracy,
                        "avg_fp": (entry.get("avg_fp") or {}).get(threshold),
                        "boxes": entry.get("boxes"),
                    }
                )
    return rows


def _frame(pandas, run: str, rows: list[dict[str, Any]], columns: list[str]):
    frame = pandas.DataFrame(rows, columns=None if rows else columns)
    frame.insert(0, "run", run)
    return frame


def load(run_dir: str | Path) -> Results:
    """The tables of one run folder; a backend whose stage did not run simply has no rows in that table."""
    from cxrbench.report.load import load_run
    from cxrbench.report.sections import utilisation_table

    pandas = _pandas()
    run = load_run(Path(run_dir))
    tables: dict[str, list] = {t: [] for t in TABLES}
    for name, backend in run.backends.items():
        tables["auroc"] += _auroc_rows(name, backend.get("auroc") or {})
        tables["history"] += _history_rows(name, backend.get("history") or [])
        tables["throughput"] += _throughput_rows(name, backend.get("throughput") or {})
        tables["localisation"] += _localisation_rows(name, backend.get("localisation") or {})
    tables["utilisation"] = utilisation_table(run, {name: b.monitor_samples for name, b in run.backends.items()})
    columns = {
        "auroc": ["backend", "class", "auroc"],
        "history": ["backend", "epoch"],
        "throughput": ["backend", "phase", "images_per_s"],
        "utilisation": ["backend", "phase", "device"],
        "localisation": ["backend", "metric", "class", "threshold", "accuracy"],
    }
    frames = {t: _frame(pandas, str(run_dir), rows, columns[t]) for t, rows in tables.items()}
    return Results(run=str(run_dir), **frames)


def stack(results: list[Results], table: str):
    """One table of several runs, one under the other (the ``run`` column tells them apart)."""
    pandas = _pandas()
    return pandas.concat([r.table(table) for r in results], ignore_index=True)


# -- cxrbench results RUN_DIR...: one table of one or several runs (stacked, a run column) as CSV, Markdown or JSON
def render(frame, fmt: str) -> str:
    """The table as text; Markdown is written here (pandas' ``to_markdown`` needs the tabulate package)."""
    if fmt == "csv":
        return frame.to_csv(index=False)
    if fmt == "json":
        return frame.to_json(orient="records", indent=2, double_precision=15) + "\n"  # pandas' default: 10 digits
    cells = [[_cell(v) for v in row] for row in frame.itertuples(index=False)]
    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + "---|" * len(frame.columns)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in cells]) + "\n"


def _cell(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    text = f"{value:.4g}" if isinstance(value, float) else str(value)
    return text.replace("|", "\\|")


def run(args) -> int:
    frame = stack([load(path) for path in args.run_dirs], args.table)
    sys.stdout.write(render(frame, args.format))
    return 0
