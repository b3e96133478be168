"""The harness overhead: each backend's training path against its framework's own idiomatic loop.

A speed verdict between frameworks is only about the frameworks if each backend trains about as fast as the loop
its framework's users write without cxrbench. This module measures that, per backend, in fresh processes that
alternate, round after round:

* **backend**: the run's worker (``python -m cxrbench.run.worker``, stages ``prepare-check,train``), exactly as
  the main job runs it: the backend's hooks, its input pipeline from the prepared cache, the core's recorder and
  window timer, the monitor; one epoch of ``steps`` steps;
* **idiomatic**: :mod:`cxrbench.run.overhead_side`, the framework's loop from the backend's
  ``cxrbench_idiomatic_loop`` hook (torchvision + ``torch.optim.Adam``, ``keras.applications`` +
  ``train_on_batch``, a plain ``jax.jit`` step), timed by the same window timer with the same warm-up and windows.

Both start from the same canonical weights, at the same network size, image size, batch, precision, device and
thread budget. Each process gives its steady images/s (the median of its windows after the warm-up); the rounds
alternate the order (backend first, then idiomatic first, ...), so a slow drift of the machine's load hits both
sides alike. The ratio is backend / idiomatic: the median over rounds of each side, its interval the seeded
bootstrap over both sides' windows (the same statistic as the run's "keras 0.93x pytorch" sentence), beside the
range of the per-round ratios. Other processes' CPU use during each process (the machine's busy time on this
process's cores minus the child's own CPU time) marks a loaded measurement, as the run's noise guard does.
"""

from __future__ import annotations

import os
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from scipy import stats

from cxrbench.backend import timing
from cxrbench.data.prepared import count_batches
from cxrbench.errors import SuiteError
from cxrbench.files import read_json, write_json
from cxrbench.machine.budget import usable_cores
from cxrbench.machine.monitor.noise import OTHERS_CPU_SHARE_LIMIT, others_cpu_share
from cxrbench.run.child import start_process, stop_process
from cxrbench.run.folder import (
    IDIOMATIC_JSON,
    LOG_TXT,
    OVERHEAD_DIR,
    OVERHEAD_JSON,
    RUN_JSON,
    STATUS_JSON,
    THROUGHPUT_JSON,
    TRAIN_JSON,
    WEIGHTS_NPZ,
)
from cxrbench.suite import Settings

#: The goal each backend is held to: at least this share of its framework's idiomatic loop's speed.
TARGET = 0.95
#: Steady windows per process by default (after the warm-up); at least timing.MIN_WINDOWS are needed.
WINDOWS = 5
SIDES = ("backend", "idiomatic")
#: The worker stages of the backend side (the sweep's: open the cache, train).
BACKEND_STAGES = "prepare-check,train"


def default_steps(settings: Settings) -> int:
    """Training steps per process: the warm-up, then :data:`WINDOWS` windows."""
    return settings.train.warmup_steps + WINDOWS * settings.train.window_steps


def check_steps(settings: Settings, steps: int, train_images: int, origin: str = "--steps") -> None:
    """Refuse, before any process starts, a step count that leaves fewer than timing.MIN_WINDOWS steady windows,
    or more steps than the training split has batches."""
    train = settings.train
    needed = train.warmup_steps + timing.MIN_WINDOWS * train.window_steps
    if steps < needed:
        raise SuiteError(
            f"{origin} = {steps}: the harness-overhead benchmark needs at least {needed} steps "
            f"(train.warmup_steps = {train.warmup_steps} + {timing.MIN_WINDOWS} windows of train.window_steps = "
            f"{train.window_steps})"
        )
    have = count_batches(train_images, train.batch_size, 1, max_steps=steps)
    if have < steps:
        raise SuiteError(
            f"{origin} = {steps}: the training split has {train_images} images, {have} steps of "
            f"{train.batch_size}; use a larger data set or fewer steps"
        )


@dataclass
class Measurement:
    """What to measure for one backend, and where its processes read and write."""

    run_dir: Path  #: holds run.json (settings, data key) and the shared initial weights, as for a worker
    folder: Path  #: the backend's folder: overhead.json, and every process's files under overhead/
    backend: str
    rounds: int
    steps: int
    python: str = sys.executable  #: the backend's interpreter (its own environment, ``--python``)
    plugins: list[str] = field(default_factory=list)
    monitor_interval: float = 1.0
    gpus: int = 0  #: 0: the CPU, or the first GPU if any; 1: one GPU (the idiomatic loops use one device)


@dataclass
class Process:
    """One fresh process's wall time and how busy the rest of the machine was meanwhile."""

    returncode: int
    seconds: float
    others_cpu_share: float


def run_process(command: list[str], log: Path) -> Process:
    """Run ``command`` to its end, output to ``log``; Ctrl-C stops it (SIGTERM, then SIGKILL) and propagates."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(usable_cores()))
    busy_before = _busy_seconds(cores)
    children_before = _children_cpu_seconds()
    start = time.perf_counter()
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a", encoding="utf-8") as out:
        process = start_process(command, out)
        try:
            returncode = process.wait()
        except KeyboardInterrupt:
            stop_process(process)
            raise
    seconds = time.perf_counter() - start
    own = _children_cpu_seconds() - children_before
    busy = _busy_seconds(cores) - busy_before
    share = others_cpu_share(100.0 * busy / seconds, 100.0 * own / seconds, len(cores)) if seconds > 0 else 0.0
    return Process(returncode, seconds, share)


def _busy_seconds(cores: list[int]) -> float:
    """CPU seconds the machine spent busy on ``cores`` since boot."""
    times = psutil.cpu_times(percpu=True)
    return sum(times[c].user + times[c].system + getattr(times[c], "nice", 0.0) for c in cores if c < len(times))


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# -- the two sides ----------------------------------------------------------------------------------------------


def side_command(m: Measurement, side: str, folder: Path) -> list[str]:
    """The command of one side's process, writing into ``folder``."""
    plugins = [arg for module in m.plugins for arg in ("--plugin", module)]
    common = ["--run-dir", str(m.run_dir), "--backend", m.backend, "--gpus", str(m.gpus), *plugins]
    if side == "backend":
        return [
            m.python,
            "-u",
            "-m",
            "cxrbench.run.worker",
            *common,
            "--folder",
            str(folder),
            "--stages",
            BACKEND_STAGES,
            "--monitor-interval",
            str(m.monitor_interval),
            "--set",
            "train.epochs=1",
            "--set",
            f"train.max_steps={m.steps}",
        ]
    return [
        m.python,
        "-u",
        "-m",
        "cxrbench.run.overhead_side",
        *common,
        "--folder",
        str(folder),
        "--steps",
        str(m.steps),
    ]


def side_result(side: str, folder: Path) -> dict[str, Any]:
    """What a finished process left in ``folder``: its steady figure, window rates, first step and threads."""
    if side == "idiomatic":
        found = read_json(folder / IDIOMATIC_JSON) or {}
        rates = [float(r) for r in timing.window_rates(found.get("windows") or [])]
        figures = _figures(
            found.get("status"), found.get("error"), rates, found.get("first_step_s"), found.get("threads")
        )
        return {**figures, "pid": found.get("pid"), "description": found.get("description")}
    status = read_json(folder / STATUS_JSON) or {}
    throughput = read_json(folder / THROUGHPUT_JSON) or {}
    numerics = (read_json(folder / TRAIN_JSON) or {}).get("numerics") or {}
    threads = {"intra_op": numerics.get("intra_op_threads"), "inter_op": numerics.get("inter_op_threads")}
    rates = (throughput.get("window_rates") or {}).get("train") or []
    (folder / WEIGHTS_NPZ).unlink(missing_ok=True)  # 4 bytes a parameter, and of no use here
    figures = _figures(status.get("status"), status.get("error"), rates, throughput.get("first_step_s"), threads)
    return {**figures, "pid": status.get("pid")}


def _figures(status, error, rates: list[float], first_step_s, threads) -> dict[str, Any]:
    """A side's result; its figure is the median window rate, as for a run (None below timing.MIN_WINDOWS)."""
    return {
        "status": status or "failed",
        "error": error,
        "images_per_s": statistics.median(rates) if len(rates) >= timing.MIN_WINDOWS else None,
        "window_rates": [round(r, 4) for r in rates],
        "first_step_s": first_step_s,
        "threads": {k: v for k, v in (threads or {}).items() if v is not None},
    }


def measure(m: Measurement, say: Callable[[str], None] = lambda text: print(text, file=sys.stderr)) -> dict[str, Any]:
    """Alternate the two sides for ``m.rounds`` rounds; write and return the backend's overhead.json."""
    rounds = []
    for number in range(1, m.rounds + 1):
        order = SIDES if number % 2 else SIDES[::-1]
        entry: dict[str, Any] = {"round": number, "order": list(order)}
        for side in order:
            folder = m.folder / OVERHEAD_DIR / f"r{number}" / side
            process = run_process(side_command(m, side, folder), folder / LOG_TXT)
            result = side_result(side, folder)
            if result["status"] == "completed" and process.returncode:
                result.update(status="failed", error=f"exited with code {process.returncode}")
            if result["status"] != "completed" and not result["error"]:
                result["error"] = f"exited with code {process.returncode} without a result; see its {LOG_TXT}"
            result.update(
                process_s=round(process.seconds, 2),
                others_cpu_share=round(process.others_cpu_share, 4),
                log=(folder / LOG_TXT).relative_to(m.folder).as_posix(),
            )
            entry[side] = result
            say(f"overhead {m.backend} round {number}/{m.rounds} {side}: {describe_side(result)}")
        if all(entry[side]["images_per_s"] for side in SIDES):
            entry["ratio"] = entry["backend"]["images_per_s"] / entry["idiomatic"]["images_per_s"]
        rounds.append(entry)
        if any(entry[side]["status"] != "completed" for side in SIDES):
            break  # a side that fails once fails every round: say so now
    summary = {**summarise(m.backend, rounds), "conditions": conditions(m, rounds)}
    write_json(m.folder / OVERHEAD_JSON, summary)
    return summary


def conditions(m: Measurement, rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """What both sides ran: the run's network, image size, batch, precision and timing, and the idiomatic loop."""
    settings = Settings.from_dict(read_json(m.run_dir / RUN_JSON)["settings"], str(m.run_dir / RUN_JSON))
    idiomatic = next((r["idiomatic"].get("description") for r in rounds if r["idiomatic"].get("description")), None)
    return {
        "arch": settings.model.arch,
        "image_size": settings.data.image_size,
        "batch_size": settings.train.batch_size,
        "precision": settings.numerics.precision,
        "gpus": m.gpus,
        "steps": m.steps,
        "warmup_steps": settings.train.warmup_steps,
        "window_steps": settings.train.window_steps,
        "rounds": m.rounds,
        "idiomatic": idiomatic,
    }


def describe_side(result: dict[str, Any]) -> str:
    if result["status"] != "completed":
        return f"{result['status']}: {result['error']}"
    figure = result["images_per_s"]
    first = result.get("first_step_s")
    text = f"{figure:.1f} img/s" if figure else "no steady state"
    return text + (f" (first step {first:.1f} s)" if isinstance(first, (int, float)) else "")


# -- the summary ----------------------------------------------------------------------------------------------


def summarise(backend: str, rounds: list[dict[str, Any]], target: float = TARGET) -> dict[str, Any]:
    """The backend's overhead.json: per side the median and range over rounds, the ratio, its intervals, a verdict
    (``meets_target`` True or False only when the whole interval is on one side of ``target``)."""
    failed = next((r[s] for r in rounds for s in SIDES if r[s]["status"] != "completed"), None)
    measured = [r for r in rounds if "ratio" in r]
    summary: dict[str, Any] = {
        "backend": backend,
        "status": "completed" if measured and failed is None else "failed",
        "error": None,
        "target": target,
        "rounds": rounds,
        "others_cpu_share_max": max((r[s]["others_cpu_share"] for r in rounds for s in SIDES if s in r), default=None),
    }
    summary["loaded"] = (summary["others_cpu_share_max"] or 0.0) > OTHERS_CPU_SHARE_LIMIT
    if summary["status"] == "failed":
        why = failed["error"] if failed else "no round gave a steady figure on both sides (raise the steps)"
        summary["error"] = why
        return summary
    for side in SIDES:
        figures = [r[side]["images_per_s"] for r in measured]
        summary[f"{side}_images_per_s"] = statistics.median(figures)
        summary[f"{side}_range"] = [min(figures), max(figures)]
    ratios = [r["ratio"] for r in measured]
    interval = round_ratio_interval(ratios)
    summary.update(
        ratio=float(np.exp(np.mean(np.log(ratios)))),
        ratio_interval=interval,
        round_ratios=ratios,
        round_ratio_range=[min(ratios), max(ratios)],
        meets_target=verdict(interval, target),
        threads={side: measured[0][side]["threads"] for side in SIDES},
    )
    summary["equal_threads"] = _same_threads(summary["threads"])
    return summary


def round_ratio_interval(ratios: list[float], level: float = 0.95) -> list[float] | None:
    """The t interval of the geometric mean of the rounds' ratios (None below two rounds).

    Each round is one back-to-back pair of fresh processes, and fresh processes differ from each other far more than
    the windows of one process do (37-59 img/s for the same loop on a quiet 2-core machine), so the rounds, not the
    windows, are the samples: a bootstrap over pooled windows would call such a difference decided after 3 rounds."""
    if len(ratios) < 2:
        return None
    logs = np.log(np.asarray(ratios, dtype=np.float64))
    half = stats.t.ppf(0.5 + level / 2.0, len(logs) - 1) * logs.std(ddof=1) / np.sqrt(len(logs))
    return [float(np.exp(logs.mean() - half)), float(np.exp(logs.mean() + half))]


def verdict(interval: list[float] | None, target: float) -> bool | None:
    """True when the whole interval is at or above ``target``, False when it is below, None when it straddles it."""
    if interval is None:
        return None
    return True if interval[0] >= target else False if interval[1] < target else None


def _same_threads(threads: dict[str, dict[str, int]]) -> bool | None:
    """Whether both sides ran the same thread pools (None where a framework does not say)."""
    backend, idiomatic = threads["backend"], threads["idiomatic"]
    shared = set(backend) & set(idiomatic)
    return None if not shared else all(backend[k] == idiomatic[k] for k in shared)


def sentence(backend: str, summary: dict[str, Any] | None) -> str | None:
    """``keras: 0.97x its framework's idiomatic loop [0.93, 1.01] ...``, or why there is no figure."""
    if not summary:
        return None
    if summary.get("status") != "completed":
        return f"{backend}: no harness-overhead figure: {summary.get('error') or summary.get('status')}"
    interval = summary.get("ratio_interval")
    span = f" [{interval[0]:.2f}, {interval[1]:.2f}]" if interval else ""
    verdict = {True: "meets", False: "below", None: "undecided against"}[summary.get("meets_target")]
    loaded = (
        f"; loaded: other processes used up to {summary['others_cpu_share_max']:.0%} of the CPU"
        if summary.get("loaded")
        else ""
    )
    return (
        f"{backend}: {summary['ratio']:.2f}x its framework's idiomatic loop{span} "
        f"({len(summary['round_ratios'])} rounds, steady {summary['backend_images_per_s']:.1f} vs "
        f"{summary['idiomatic_images_per_s']:.1f} img/s): {verdict} the {summary['target']:.2f} target{loaded}"
    )


def table(summaries: dict[str, dict[str, Any]]) -> str:
    """One row per backend: both sides' medians and ranges, the ratio with its intervals, the verdict."""
    header = ("backend", "backend img/s", "idiomatic img/s", "ratio", "[95 %]", "rounds", "target", "machine")
    rows = [header]
    for name, s in summaries.items():
        if s.get("status") != "completed":
            rows.append((name, "-", "-", "-", "-", "-", s.get("error") or "failed", "-"))
            continue
        rows.append(
            (
                name,
                _with_range(s["backend_images_per_s"], s["backend_range"]),
                _with_range(s["idiomatic_images_per_s"], s["idiomatic_range"]),
                f"{s['ratio']:.3f}",
                "[{:.3f}, {:.3f}]".format(*s["ratio_interval"]) if s.get("ratio_interval") else "-",
                "{} in [{:.3f}, {:.3f}]".format(len(s["round_ratios"]), *s["round_ratio_range"]),
                {True: "meets", False: "below", None: "undecided"}[s["meets_target"]] + f" {s['target']:.2f}",
                f"loaded ({s['others_cpu_share_max']:.0%})" if s.get("loaded") else "quiet",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def _with_range(value: float, span: list[float]) -> str:
    return f"{value:.1f} ({span[0]:.1f}-{span[1]:.1f})"
