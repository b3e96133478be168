"""The progress display on stderr, and the summary table at the end of a run.

On a terminal every backend has one line that is redrawn in place; otherwise (a log file, CI)
a plain line is printed whenever a backend's status, stage or epoch changes.
"""

from __future__ import annotations

import sys
from typing import Any, TextIO

from cxrbench.machine.monitor.noise import warnings
from cxrbench.metrics.equivalence import model_passes
from cxrbench.report import explain, verdicts
from cxrbench.report.figures import repeat_sentences, speed_sentences
from cxrbench.run.overhead import sentence as overhead_sentence


def status_line(name: str, status: dict[str, Any] | None, width: int = 10) -> str:
    """``pytorch    running  train  epoch 1/2  step 12/40`` from a status.json dict."""
    if not status:
        return f"{name:<{width}}  pending"
    parts = [f"{name:<{width}}", f"{status['status']:<11}"]
    if status["status"] == "running" and status.get("stage"):
        parts.append(f"{status['stage']:<13}")
        progress = status.get("progress") or {}
        if status["stage"] == "train" and progress.get("epoch"):
            parts.append(f"epoch {progress['epoch']}/{progress.get('epochs', '?')}")
            if progress.get("steps"):
                parts.append(f"step {progress.get('step', 0)}/{progress['steps']}")
            if progress.get("images_per_s"):
                parts.append(f"{progress['images_per_s']:.1f} img/s  ETA {_duration(progress.get('eta_s'))}")
    if status.get("error"):
        parts.append(status["error"])
    return "  ".join(parts).rstrip()


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}" if minutes >= 60 else f"{minutes}:{secs:02d}"


class StepRate:
    """Images/s and time left in an epoch from the recorder's timestamped step events (no device sync).

    The rate counts from the end of the first step, so tracing and compilation do not drag it down;
    it is the rate at which steps are issued, which a GPU queue can run ahead of by a few steps.
    """

    def __init__(self, images_per_step: int):
        self.images_per_step = images_per_step
        self.first: float | None = None

    def start_epoch(self) -> None:
        self.first = None

    def update(self, step: int, steps: int | None, t: float) -> dict[str, float]:
        if step <= 1 or self.first is None:
            self.first = t
            return {}
        per_step = (t - self.first) / (step - 1)
        if per_step <= 0:
            return {}
        return {
            "images_per_s": round(self.images_per_step / per_step, 2),
            "eta_s": round(per_step * (steps - step), 1) if steps else None,
        }


def _coarse(line: str) -> str:
    """A plain-mode line without its step counter, so steps alone do not print new lines."""
    return line.split("  step ")[0]


class Progress:
    def __init__(self, backends: list[str], stream: TextIO | None = None, tty: bool | None = None):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.width = max([len(b) for b in backends] + [7])
        self.lines = {name: status_line(name, None, self.width) for name in backends}
        self._printed: dict[str, str] = {}
        self._drawn = 0

    def update(self, name: str, status: dict[str, Any] | None) -> None:
        self.lines[name] = status_line(name, status, self.width)
        if self.tty:
            self._redraw()
        elif self._printed.get(name) != _coarse(self.lines[name]):
            self._printed[name] = _coarse(self.lines[name])
            print(self.lines[name], file=self.stream, flush=True)

    def _redraw(self) -> None:
        up = f"\x1b[{self._drawn}F" if self._drawn else ""
        body = "".join(f"\x1b[2K{line}\n" for line in self.lines.values())
        self.stream.write(up + body)
        self.stream.flush()
        self._drawn = len(self.lines)

    def message(self, text: str) -> None:
        """A line of its own above the live lines (which are drawn afresh below it)."""
        if self.tty and self._drawn:
            self.stream.write(f"\x1b[{self._drawn}F\x1b[J")
            self._drawn = 0
        print(text, file=self.stream, flush=True)
        if self.tty:
            self._redraw()


def _number(value: Any, fmt: str) -> str:
    return format(value, fmt) if isinstance(value, (int, float)) else "-"


def _verdict(value: bool | None) -> str:
    return {True: "pass", False: "FAIL", None: "-"}[value]


def summary_rows(run: dict[str, Any], comparison: dict[str, Any]) -> list[tuple[str, ...]]:
    matrix = comparison.get("equivalence", {})
    rows = []
    for name, result in run["backends"].items():
        auroc = (result.get("auroc") or {}).get("mean")
        throughput = result.get("throughput") or {}
        parity = comparison.get("parity", {}).get(name)
        equivalent = "skipped" if "skipped" in matrix else _verdict(model_passes(matrix, name))
        interval = throughput.get("train_images_per_s_interval")
        rows.append(
            (
                name,
                result["status"],
                _number(auroc, ".4f"),
                _number(throughput.get("train_images_per_s"), ".1f") + ("*" if throughput.get("disturbed") else ""),
                f"[{interval[0]:.1f}, {interval[1]:.1f}]" if interval else "-",
                _number(throughput.get("first_step_s"), ".1f"),
                _number(throughput.get("epoch_time_s"), ".1f"),
                _verdict(parity["passed"]) if parity else "-",
                equivalent,
            )
        )
    return rows


HEADER = (
    "backend",
    "status",
    "mean AUROC",
    "steady img/s",
    "[95 %]",
    "first step s",
    "epoch s",
    "ONNX parity",
    "equivalence",
)


def summary_table(run: dict[str, Any], comparison: dict[str, Any]) -> str:
    """The table; the accuracy verdicts, each naming what it is about (the framework's effect from paired seeds
    first, then the trained models of one seed, then how to estimate the framework's effect); the steady-state speed
    sentences (repeats, sweep and harness overhead when measured) and what explains them; the spread across repeats;
    a warning per disturbed measurement (* in the table)."""
    rows = [HEADER, *summary_rows(run, comparison)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADER))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines += verdicts.summary_lines(run, comparison)
    backends = run.get("backends") or {}
    baseline = run.get("baseline") if run.get("baseline") in backends else next(iter(backends), None)
    if baseline is not None:
        lines += speed_sentences({name: result.get("throughput") for name, result in backends.items()}, baseline)
    overhead = [overhead_sentence(name, result.get("harness_overhead")) for name, result in backends.items()]
    lines += repeat_sentences(run.get("repeats")) + sweep_lines(run.get("sweep")) + [o for o in overhead if o]
    lines += explain.summary_lines(run)
    return "\n".join(lines + warnings(backends))


def sweep_lines(section: dict[str, Any] | None) -> list[str]:
    """With ``--sweep``: one line per grid point and backend (steady img/s and interval, or why there is none)."""
    lines = []
    for c in (section or {}).get("cells") or []:
        figure, span = c.get("train_images_per_s"), c.get("train_images_per_s_interval")
        if figure is not None:
            value = f"{figure:.1f} img/s" + (f" [{span[0]:.1f}, {span[1]:.1f}]" if span else "")
            value += " (disturbed)" if c.get("disturbed") else ""
        else:
            value = c.get("error") or c.get("no_steady_state") or c.get("status", "pending")
        lines.append(f"sweep {c['point']}  {c['backend']}: {value}")
    return lines
