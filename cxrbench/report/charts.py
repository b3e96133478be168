"""Charts as inline SVG text, drawn with matplotlib's object API (no pyplot, no global backend).

Text stays text (``svg.fonttype = none``): no font files are embedded or downloaded, and the
browser draws it with its own sans-serif. Matplotlib escapes text it writes into SVG; labels are
additionally stripped of mathtext (``$``) so a class or backend name can never be parsed as markup
or as a formula. Long series are thinned so a report of a long run stays small.
"""

from __future__ import annotations

import hashlib
import io
import re
from collections.abc import Sequence
from typing import Any

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from sklearn.metrics import roc_curve

from cxrbench.metrics.operation_categories import CATEGORY_KEYS

#: Backends keep one colour across every chart of the report.
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")
MAX_POINTS = 600
_RC = {
    "svg.fonttype": "none",
    "svg.hashsalt": "cxrbench",
    "font.size": 9,
    "axes.spines.top": False,
    "axes.spines.right": False,
}
_PHASE_COLOURS = {"train": "#e8f1fb", "validate": "#fdf1e3", "predict": "#eaf6ea", "export": "#f3ecf8"}


def colour(index: int) -> str:
    return PALETTE[index % len(PALETTE)]


def plain(text: Any) -> str:
    """A label matplotlib shows literally: no mathtext, no legend-hiding leading underscore."""
    return str(text).replace("$", r"\$").lstrip("_") or "?"


def to_svg(fig: Figure) -> str:
    """The figure as an ``<svg>`` element (no XML prolog), ready to inline in HTML."""
    buffer = io.StringIO()
    with matplotlib.rc_context(_RC):
        fig.savefig(buffer, format="svg", metadata={"Date": None})
    text = buffer.getvalue()
    text = text[text.index("<svg") :]
    return _prefix_ids(text, "c" + hashlib.sha1(text.encode()).hexdigest()[:8])


def _figure(width: float, height: float) -> Figure:
    with matplotlib.rc_context(_RC):
        return Figure(figsize=(width, height), layout="constrained")


def thin(x: np.ndarray, y: np.ndarray, max_points: int = MAX_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """Keep at most ``max_points`` evenly spaced points, always the first and the last."""
    if len(x) <= max_points:
        return x, y
    keep = np.unique(np.linspace(0, len(x) - 1, max_points).round().astype(int))
    return x[keep], y[keep]


# -- ROC ------------------------------------------------------------------------------------------


def roc_chart(
    curves: dict[str, tuple[np.ndarray, np.ndarray]], classes: Sequence[str], colours: dict[str, str]
) -> str | None:
    """Small multiples, one per class, one curve per backend: ``curves[name] = (labels, scores)``."""
    with matplotlib.rc_context(_RC):
        columns = 4
        rows = -(-len(classes) // columns)
        fig = _figure(10, 2.4 * rows)
        axes = fig.subplots(rows, columns, sharex=True, sharey=True, squeeze=False).ravel()
        for c, (ax, name) in enumerate(zip(axes, classes)):
            ax.plot([0, 1], [0, 1], color="#bbbbbb", lw=0.8, ls=":")
            for backend, (labels, scores) in curves.items():
                column = labels[:, c]
                if 0 < column.sum() < column.size:
                    fpr, tpr, _ = roc_curve(column, scores[:, c])
                    ax.plot(*thin(fpr, tpr), color=colours[backend], lw=1.2, label=plain(backend))
            ax.set_title(plain(name), fontsize=9)
            ax.set_aspect("equal")
        for ax in axes[len(classes) :]:
            ax.set_visible(False)
        fig.supxlabel("false positive rate")
        fig.supylabel("true positive rate")
        axes[0].legend(loc="lower right", fontsize=7, frameon=False)
        return to_svg(fig)


# -- training curves ------------------------------------------------------------------------------


def _series(history: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(r["epoch"], r[key]) for r in history if isinstance(r.get(key), (int, float))]
    return [p[0] for p in points], [p[1] for p in points]


def training_chart(histories: dict[str, list[dict]], colours: dict[str, str]) -> str | None:
    """Loss per epoch (train solid, validation dashed) beside the learning rate (log scale)."""
    if not any(histories.values()):
        return None
    with matplotlib.rc_context(_RC):
        fig = _figure(10, 3)
        loss_ax, lr_ax = fig.subplots(1, 2)
        for backend, history in histories.items():
            for key, style in (("train_loss", "-"), ("val_loss", "--")):
                epochs, values = _series(history, key)
                loss_ax.plot(
                    epochs,
                    values,
                    style,
                    marker="o",
                    ms=3,
                    color=colours[backend],
                    label=f"{plain(backend)} {key.split('_')[0]}",
                )
            epochs, values = _series(history, "lr")
            lr_ax.step(epochs, values, where="mid", marker="o", ms=3, color=colours[backend], label=plain(backend))
        loss_ax.set(title="loss per epoch", xlabel="epoch", ylabel="binary cross-entropy")
        lr_ax.set(title="learning rate", xlabel="epoch", yscale="log")
        _whole_epochs(loss_ax, lr_ax)
        for ax in (loss_ax, lr_ax):
            ax.legend(fontsize=7, frameon=False)
        return to_svg(fig)


def _whole_epochs(*axes) -> None:
    """Epochs are whole numbers: no 0.96 ... 1.04 ticks when a run has one epoch.

    One tick is enough (``min_n_ticks=1``: otherwise the locator falls back to fractions when the
    range holds a single integer), and a single epoch gets a range one epoch wide around it.
    """
    for ax in axes:
        low, high = ax.get_xlim()
        if high - low < 1:
            middle = (low + high) / 2
            ax.set_xlim(middle - 0.5, middle + 0.5)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))


def _speed_series(ax, history: list[dict], colour: str, label: str) -> None:
    """Steady-state images/s per epoch with its window interval; the whole-epoch average dotted beside it."""
    epochs = [r["epoch"] for r in history]
    ax.plot(epochs, [r["images_per_s"] for r in history], ":", marker=".", color=colour, label=f"{label} whole epoch")
    steady = [r for r in history if isinstance(r.get("steady_images_per_s"), (int, float))]
    if steady:
        middle = np.array([r["steady_images_per_s"] for r in steady])
        low, high = (
            np.array([(r.get("steady_images_per_s_interval") or [m, m])[i] for r, m in zip(steady, middle)])
            for i in (0, 1)
        )
        ax.errorbar(
            [r["epoch"] for r in steady],
            middle,
            yerr=[middle - low, high - middle],
            marker="o",
            ms=3,
            capsize=3,
            color=colour,
            label=f"{label} steady",
        )


def epoch_time_chart(histories: dict[str, list[dict]], colours: dict[str, str]) -> str | None:
    """Per epoch and backend: data wait, the rest of training, validation (stacked); images/s beside.

    The warm-up epoch is hatched: it includes compilation and autotuning.
    """
    if not any(histories.values()):
        return None
    with matplotlib.rc_context(_RC):
        fig = _figure(10, 3)
        time_ax, speed_ax = fig.subplots(1, 2)
        width = 0.8 / max(len(histories), 1)
        for i, (backend, history) in enumerate(histories.items()):
            epochs = np.array([r["epoch"] for r in history], dtype=float) + (i - (len(histories) - 1) / 2) * width
            wait = np.array([r.get("data_wait_s") or 0.0 for r in history])
            train = np.array([r["train_time_s"] for r in history]) - wait
            val = np.array([r["val_time_s"] for r in history])
            hatch = ["//" if r.get("warmup") else "" for r in history]
            base = colours[backend]
            time_ax.bar(epochs, wait, width, color=base, alpha=0.35, hatch=hatch, label=f"{plain(backend)} data wait")
            time_ax.bar(epochs, train, width, bottom=wait, color=base, hatch=hatch, label=f"{plain(backend)} train")
            time_ax.bar(
                epochs,
                val,
                width,
                bottom=wait + train,
                color=base,
                alpha=0.6,
                hatch=hatch,
                label=f"{plain(backend)} validation",
                edgecolor="white",
            )
            _speed_series(speed_ax, history, base, plain(backend))
        time_ax.set(title="time per epoch (hatched: warm-up)", xlabel="epoch", ylabel="seconds")
        speed_ax.set(title="training throughput (steady state, 95 % of windows)", xlabel="epoch", ylabel="images/s")
        _whole_epochs(time_ax, speed_ax)
        speed_ax.set_ylim(bottom=0)
        for ax in (time_ax, speed_ax):
            ax.legend(fontsize=7, frameon=False)
        return to_svg(fig)


# -- utilisation over time ------------------------------------------------------------------------


def _bucket(t: np.ndarray, v: np.ndarray, max_points: int = MAX_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """Average into at most ``max_points`` time buckets: a long run's samples stay readable and small."""
    if len(t) <= max_points:
        return t, v
    edges = np.linspace(t[0], t[-1], max_points + 1)
    which = np.clip(np.searchsorted(edges, t, side="right") - 1, 0, max_points - 1)
    counts = np.bincount(which, minlength=max_points)
    filled = counts > 0
    mean_t = np.bincount(which, t, minlength=max_points)[filled] / counts[filled]
    mean_v = np.bincount(which, v, minlength=max_points)[filled] / counts[filled]
    return mean_t, mean_v


def _phase_spans(times: np.ndarray, phases: list[str]) -> list[tuple[float, float, str]]:
    spans, start = [], 0
    for i in range(1, len(phases) + 1):
        if i == len(phases) or phases[i] != phases[start]:
            spans.append((times[start], times[i - 1], phases[start]))
            start = i
    return spans


def _device_series(samples: list[dict], t0: float, gpu: bool) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per device (GPUs' ``util`` or the CPU's ``cpu_percent``): (seconds since start, percent)."""
    series: dict[str, list[tuple[float, float]]] = {}
    for s in samples:
        device = str(s.get("device", ""))
        value = s.get("util" if gpu else "cpu_percent")
        if device.startswith("gpu") == gpu and isinstance(value, (int, float)):
            series.setdefault(device, []).append((s["t"] - t0, float(value)))
    return {k: _bucket(*map(np.asarray, zip(*sorted(v)))) for k, v in series.items()}


def _shade_phases(ax, times: np.ndarray, phases: list[str], label: bool) -> None:
    """Shade each phase; name it above the plot where it is wide enough for the name to fit."""
    total = max(float(times[-1] - times[0]), 1e-9)
    for start, end, phase in _phase_spans(times, phases):
        ax.axvspan(start, end, color=_PHASE_COLOURS.get(phase, "#f4f4f4"), lw=0)
        if label and (end - start) >= 0.08 * total:
            ax.text(
                (start + end) / 2,
                1.0,
                plain(phase),
                ha="center",
                va="bottom",
                fontsize=7,
                color="#666666",
                transform=ax.get_xaxis_transform(),
            )


def utilisation_chart(samples: dict[str, list[dict]]) -> str | None:
    """GPU utilisation (top row, when any GPU was sampled) and process-tree CPU percent (bottom row)
    over time, one column per backend side by side, phases shaded."""
    samples = {k: sorted(v, key=lambda s: s["t"]) for k, v in samples.items() if v}
    if not samples:
        return None
    kinds = (
        [True, False]
        if any(str(s.get("device", "")).startswith("gpu") for v in samples.values() for s in v)
        else [False]
    )
    with matplotlib.rc_context(_RC):
        fig = _figure(5 * len(samples), 2.4 * len(kinds))
        grid = fig.subplots(len(kinds), len(samples), sharex="col", squeeze=False)
        for column, (backend, rows) in enumerate(samples.items()):
            t0 = rows[0]["t"]
            times = np.array([s["t"] - t0 for s in rows])
            phases = [str(s.get("phase", "")) for s in rows]
            for row, gpu in enumerate(kinds):
                ax = grid[row, column]
                _shade_phases(ax, times, phases, label=row == 0)
                series = _device_series(rows, t0, gpu)
                for i, (device, (t, v)) in enumerate(series.items()):
                    ax.plot(t, v, lw=1, color=colour(i), label=plain(device))
                top = max([110.0] + [float(v.max()) * 1.05 for _, v in series.values() if len(v)])
                ax.set_ylim(0, top)
                ax.set_ylabel("GPU util %" if gpu else "CPU % (100 = 1 core)")
                if series:
                    ax.legend(fontsize=7, frameon=False, loc="lower right")
            grid[0, column].set_title(plain(backend), pad=12)
            grid[-1, column].set_xlabel("seconds since start")
        return to_svg(fig)


# -- scaling --------------------------------------------------------------------------------------


def scaling_chart(scaling: dict[str, list[dict]], colours: dict[str, str]) -> str | None:
    """Images/s against GPU count per backend, with the ideal linear line from 1 GPU."""
    if not scaling:
        return None
    with matplotlib.rc_context(_RC):
        fig = _figure(6, 3.2)
        ax = fig.subplots()
        for backend, points in scaling.items():
            points = sorted(points, key=lambda p: p["gpus"])
            gpus = [p["gpus"] for p in points]
            ax.plot(
                gpus,
                [p["images_per_s"] for p in points],
                marker="o",
                color=colours.get(backend, "#333333"),
                label=plain(backend),
            )
            one = next((p["images_per_s"] for p in points if p["gpus"] == 1), None)
            if one:
                ax.plot(gpus, [one * g for g in gpus], ls=":", color=colours.get(backend, "#333333"), lw=0.8)
        ax.set(title="scaling (dotted: ideal)", xlabel="GPUs", ylabel="training images/s")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend(fontsize=7, frameon=False)
        return to_svg(fig)


# -- where the time goes ---------------------------------------------------------------------------

#: One colour per operation category, in the order of CATEGORY_KEYS (the backends' palette is for backends).
CATEGORY_COLOURS = (
    "#4e79a7", "#a0cbe8", "#f28e2b", "#ffbe7d", "#59a14f", "#8cd17d",
    "#b6992d", "#f1ce63", "#499894", "#86bcb6", "#e15759", "#bab0ac",
)  # fmt: skip


def category_chart(backends: Sequence[str], rows: Sequence[dict[str, Any]]) -> str | None:
    """A stacked horizontal bar per backend: milliseconds per training step by operation category
    (``rows``: ``{"label", "ms": {backend: value}}`` in the categories' order)."""
    if not backends or not rows:
        return None
    with matplotlib.rc_context(_RC):
        fig = _figure(8, 1.2 + 0.45 * len(backends))
        ax = fig.subplots()
        left = np.zeros(len(backends))
        for row in rows:
            values = np.array([row["ms"].get(name) or 0.0 for name in backends])
            ax.barh(
                [plain(name) for name in backends],
                values,
                left=left,
                color=CATEGORY_COLOURS[CATEGORY_KEYS.index(row["key"]) % len(CATEGORY_COLOURS)],
                label=plain(row["label"]),
            )
            left += values
        ax.invert_yaxis()
        ax.set(xlabel="ms per training step (profiled)", title="where the time goes")
        ax.legend(fontsize=7, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        return to_svg(fig)


def _prefix_ids(svg: str, prefix: str) -> str:
    """Prefix every id and reference so the report's inline SVGs never share an id."""
    return re.sub(r'(id="|url\(#|href="#)', lambda m: f"{m.group(1)}{prefix}-", svg)
