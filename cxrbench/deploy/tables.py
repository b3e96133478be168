"""``cxrbench results RUN_DIR...``: one table of one or several runs (stacked, a ``run`` column) as CSV,
Markdown or JSON on stdout."""

from __future__ import annotations

import math
import sys

from cxrbench import results


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
    frame = results.stack([results.load(path) for path in args.run_dirs], args.table)
    sys.stdout.write(render(frame, args.format))
    return 0
