"""Steady-state timing shared by every backend: warm-up apart, windows of steps, medians with their spread.

A :class:`WindowTimer` wraps a loop's batch iterator (training, validation, or the core's prediction
chunks). It synchronises the device only at window edges: the end of the first step (time to first
step: tracing, compilation, autotuning, loader start), the end of the warm-up, then every
``window_steps`` steps. Between edges the loop runs unsynchronised, so timing never adds a per-step
host synchronisation. The data wait is measured inside (a :class:`WaitTimer`),
the edges outside, so synchronisation time never counts as waiting for data.

A figure is *steady* only with at least :data:`MIN_WINDOWS` windows after the warm-up: its value is
the median images/s over the windows, its spread the central 95 % of the window rates.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from cxrbench.errors import SuiteError

#: Windows needed after the warm-up before a median and an interval are reported.
MIN_WINDOWS = 3
#: Central share of the window rates reported as the spread (2.5th to 97.5th percentile).
INTERVAL = 0.95
#: Bootstrap rounds and seed for the interval of a ratio between two backends' medians.
RATIO_ROUNDS = 2000
RATIO_SEED = 0
#: Validation and prediction warm up in one step: their first call traces/compiles the forward pass.
INFERENCE_WARMUP_STEPS = 1


def no_sync() -> None:
    return None


class WaitTimer:
    """Wrap an iterator and add up the time spent waiting in ``next()``: the loop's data wait."""

    def __init__(self, iterable: Iterable, clock: Callable[[], float] = time.perf_counter):
        self._iterator = iter(iterable)
        self.clock = clock
        self.seconds = 0.0

    def __iter__(self) -> Iterator:
        return self

    def __next__(self):
        start = self.clock()
        try:
            return next(self._iterator)
        finally:
            self.seconds += self.clock() - start


@dataclass(frozen=True)
class Window:
    """Steps between two synchronised edges, the images they processed, the seconds they took, and the joules the
    run's energy counter (:mod:`cxrbench.machine.energy`) counted between the edges (None when it has none)."""

    steps: int
    images: int
    seconds: float
    joules: float | None = None

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else float("nan")

    def to_list(self) -> list[float]:
        row = [self.steps, self.images, round(self.seconds, 6)]
        return row if self.joules is None else [*row, round(self.joules, 6)]


def batch_images(batch: Any) -> int:
    """Images in one of the core's :class:`~cxrbench.data.prepared.Batch` objects."""
    return len(batch.images)


class WindowTimer:
    """Wrap a batch iterator; record time to the first step and windows of steps after the warm-up.

    A step is complete (issued) when the loop asks for the next batch. ``images`` is the images per
    step, or a function of the batch for splits whose last batch is short. ``energy`` (joules since any origin, or
    None) is read at the same synchronised edges as the clock, so each window carries its own joules.
    """

    def __init__(
        self,
        iterable: Iterable,
        sync: Callable[[], None] = no_sync,
        images: int | Callable[[Any], int] = 1,
        warmup_steps: int = 1,
        window_steps: int = 5,
        clock: Callable[[], float] = time.perf_counter,
        energy: Callable[[], float | None] | None = None,
    ):
        self.waits = WaitTimer(iterable, clock)
        self.energy = energy or (lambda: None)
        self.sync, self.clock = sync, clock
        self.count = images if callable(images) else (lambda batch, n=images: n)
        self.warmup_steps, self.window_steps = max(1, warmup_steps), max(1, window_steps)
        self.start = clock()
        self.steps = 0
        self.first_step_s: float | None = None
        self.windows: list[Window] = []
        self._images = 0
        self._pending: int | None = None  # images of the batch handed out and not yet counted
        self._edge = (0, 0, self.start, None)  # steps, images, time, joules at the last edge after the warm-up

    @property
    def data_wait_s(self) -> float:
        return self.waits.seconds

    @property
    def images(self) -> int:
        """Images of the steps completed so far (all of them once the iterator is exhausted)."""
        return self._images

    @property
    def steps_after_warmup(self) -> int:
        return max(0, self.steps - self.warmup_steps)

    def __iter__(self) -> Iterator:
        return self

    def __next__(self):
        if self._pending is not None:
            self._step_done(self._pending)
            self._pending = None
        try:
            batch = next(self.waits)
        except StopIteration:
            self._close_tail()
            raise
        self._pending = self.count(batch)
        return batch

    def _step_done(self, images: int) -> None:
        self.steps += 1
        self._images += images
        if self.steps == 1 or self.steps == self.warmup_steps:
            now = self._synced_now()
            if self.steps == 1:
                self.first_step_s = now - self.start
            if self.steps == self.warmup_steps:
                self._edge = (self.steps, self._images, now, self.energy())
        elif self.steps > self.warmup_steps and (self.steps - self.warmup_steps) % self.window_steps == 0:
            self._close_window(self._synced_now())

    def _synced_now(self) -> float:
        self.sync()
        return self.clock()

    def _close_window(self, now: float) -> None:
        steps, images, then, joules_then = self._edge
        joules = self.energy()
        used = joules - joules_then if joules is not None and joules_then is not None else None
        self.windows.append(Window(self.steps - steps, self._images - images, now - then, used))
        self._edge = (self.steps, self._images, now, joules)

    def _close_tail(self) -> None:
        """A last window shorter than half a window is dropped from the rates (its time stays in the epoch)."""
        tail = self.steps - self._edge[0]
        if self.steps > self.warmup_steps and tail and 2 * tail >= self.window_steps:
            self._close_window(self._synced_now())


def timed_calls(
    function: Callable[[np.ndarray], np.ndarray],
    images: np.ndarray,
    chunk: int,
    energy: Callable[[], float | None] | None = None,
) -> tuple[np.ndarray, WindowTimer]:
    """``function`` over ``images`` in chunks of ``chunk``; each call after the first is one window.

    Each call returns a host numpy array, which is the synchronisation, so a window per call adds
    none; the first call (tracing, compilation) is the warm-up.
    """
    chunks = (images[i : i + chunk] for i in range(0, len(images), max(1, chunk)))
    timer = WindowTimer(chunks, images=len, warmup_steps=INFERENCE_WARMUP_STEPS, window_steps=1, energy=energy)
    parts = [function(part) for part in timer]
    return (np.concatenate(parts) if parts else function(images)), timer


# -- summaries -------------------------------------------------------------------------------------


def window_rates(windows: Iterable[Sequence[float] | Window]) -> np.ndarray:
    """Images/s of each window, given as :class:`Window` or ``[steps, images, seconds(, joules)]``."""
    rows = [(w.images, w.seconds) if isinstance(w, Window) else (w[1], w[2]) for w in windows]
    return np.asarray([images / seconds for images, seconds in rows if seconds > 0], dtype=np.float64)


def _interval(rates: np.ndarray) -> list[float]:
    tail = (1.0 - INTERVAL) / 2 * 100
    return [float(np.percentile(rates, tail)), float(np.percentile(rates, 100 - tail))]


def summarise(windows: Iterable[Sequence[float] | Window]) -> dict[str, Any]:
    """Median images/s over windows, its 95 % interval and IQR; values only when steady (>= MIN_WINDOWS)."""
    rates = window_rates(windows)
    steady = len(rates) >= MIN_WINDOWS
    return {
        "images_per_s": float(np.median(rates)) if steady else None,
        "interval": _interval(rates) if steady else None,
        "iqr": [float(np.percentile(rates, 25)), float(np.percentile(rates, 75))] if steady else None,
        "windows": int(len(rates)),
        "steady": steady,
    }


def no_steady_reason(
    steps_after_warmup: int, windows: int, warmup_steps: int, window_steps: int, timed: bool = True
) -> str:
    """Why a run has no steady-state figure, in the words the summary prints."""
    if not timed:
        return "no steady state: the backend's loop does not time its batches (recorder.timed)"
    return (
        f"no steady state: {steps_after_warmup} steps after warm-up (train.warmup_steps = {warmup_steps}) "
        f"make {windows} window(s) of {window_steps} steps (train.window_steps), {MIN_WINDOWS} needed"
    )


def ratio_interval(
    value_rates: Sequence[float], base_rates: Sequence[float], rounds: int = RATIO_ROUNDS, seed: int = RATIO_SEED
) -> list[float] | None:
    """95 % bootstrap interval of median(value) / median(base), resampling both backends' windows (seeded)."""
    value, base = np.asarray(value_rates, dtype=np.float64), np.asarray(base_rates, dtype=np.float64)
    if len(value) < MIN_WINDOWS or len(base) < MIN_WINDOWS:
        return None
    rng = np.random.default_rng(seed)
    value_medians = np.median(rng.choice(value, (rounds, len(value))), axis=1)
    base_medians = np.median(rng.choice(base, (rounds, len(base))), axis=1)
    return _interval(value_medians / base_medians)


def check_warmup(warmup_steps: int, steps_per_epoch: int) -> None:
    """A warm-up that leaves no step of an epoch to time is a settings error, found before training."""
    if warmup_steps >= steps_per_epoch:
        raise SuiteError(
            f"train.warmup_steps = {warmup_steps} leaves no step to time: an epoch has {steps_per_epoch} training "
            "step(s) (lower train.warmup_steps or raise train.max_steps)"
        )
