"""The ``--sweep`` chart: steady training images/s per grid point, one bar per backend, the
interval over timing windows as error bars. Drawn like every other chart (cxrbench.report.charts)."""

from __future__ import annotations

from typing import Any

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from cxrbench.report.charts import plain, to_svg


def _error_bar(cell: dict[str, Any]) -> tuple[float, float]:
    """Distances from the figure down and up to the interval's ends (0 when there is no interval)."""
    value, interval = cell.get("train_images_per_s"), cell.get("train_images_per_s_interval")
    if value is None or not interval or None in interval:
        return 0.0, 0.0
    return max(value - interval[0], 0.0), max(interval[1] - value, 0.0)


def sweep_chart(section: dict[str, Any] | None, colours: dict[str, str]) -> str | None:
    """Grouped bars; a failed or unmeasured cell has no bar (the table says why)."""
    cells = [c for c in (section or {}).get("cells") or [] if c.get("train_images_per_s") is not None]
    if not cells:
        return None
    points = list(section.get("points") or dict.fromkeys(c["point"] for c in cells))
    backends = list(dict.fromkeys(c["backend"] for c in section["cells"]))
    width = 0.8 / max(len(backends), 1)
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "cxrbench", "font.size": 9}):
        fig = Figure(figsize=(max(6.0, 1.1 * len(points)), 3.4), layout="constrained")
        ax = fig.subplots()
        for i, backend in enumerate(backends):
            mine = {c["point"]: c for c in cells if c["backend"] == backend}
            xs = [points.index(p) + (i - (len(backends) - 1) / 2) * width for p in mine]
            errors = np.array([_error_bar(c) for c in mine.values()]).T.reshape(2, -1)
            ax.bar(
                xs,
                [c["train_images_per_s"] for c in mine.values()],
                width,
                yerr=errors,
                capsize=3,
                color=colours.get(backend, "#333333"),
                label=plain(backend),
            )
        ax.set_xticks(range(len(points)), [plain(p.replace("__", "\n")) for p in points], fontsize=7)
        ax.set(title="sweep: steady training images/s (bars: interval over windows)", ylabel="training images/s")
        ax.legend(fontsize=7, frameon=False)
        return to_svg(fig)
