"""The core's training recorder and timing helpers, shared by every backend.

Backends report through a :class:`Recorder` so that every framework's numbers mean the same
thing; :class:`Stopwatch` synchronises the device at both edges of a timed region, and
:meth:`Recorder.timed` wraps a loop's batches in a :class:`~cxrbench.backend.timing.WindowTimer` (warm-up,
steady-state windows, data wait).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from typing import Any

from cxrbench.backend.api import EpochRecord
from cxrbench.backend.timing import INFERENCE_WARMUP_STEPS, WindowTimer, no_sync

Listener = Callable[[str, dict[str, Any]], None]


class Recorder:
    """Collects epoch records and tells listeners (progress display, monitor, result files).

    ``phase`` and ``epoch`` are read by the background monitor to tag its samples.
    """

    def __init__(self, listeners: Iterable[Listener] = ()):
        self.listeners = list(listeners)
        self.history: list[EpochRecord] = []
        self.phase_name = "idle"
        self.epoch = 0
        self.warmup_steps, self.window_steps = 1, 5  #: set by the training recipe from the settings
        self.clock: Callable[[], float] = time.perf_counter  #: the timers' clock (tests drive a fake one)
        #: The run's energy counter (joules, or None), read at the timers' synchronised edges.
        self.energy: Callable[[], float | None] | None = None
        #: The EpochLoop ``run_recipe`` ran last: the profile stage runs a few more of its steps.
        self.trained_loop: Any = None
        self._timers: dict[str, WindowTimer] = {}
        self._redirect: Callable[[Iterable, Callable[[], None]], Iterable] | None = None

    def _emit(self, event: str, **payload: Any) -> None:
        for listener in self.listeners:
            listener(event, payload)

    def epoch_started(self, epoch: int, warmup: bool, steps: int | None = None) -> None:
        self.epoch = epoch
        self._emit("epoch_started", epoch=epoch, warmup=warmup, steps=steps)

    def step(self, epoch: int, step: int, steps: int | None = None, t: float | None = None) -> None:
        """Optional progress; never pass a device value that would force a synchronisation.

        ``t`` (wall clock, default now) lets a replayed event from another process keep its time.
        """
        self._emit("step", epoch=epoch, step=step, steps=steps, t=time.time() if t is None else t)

    def timed(self, batches: Iterable, sync: Callable[[], None], images: int | Callable[[Any], int]) -> WindowTimer:
        """Wrap the current phase's batches in a window timer; the recipe collects it with :meth:`take_timer`.

        Training warms up over ``warmup_steps``; validation and prediction over their first step.
        """
        if self._redirect is not None:
            return self._redirect(batches, sync)
        warmup = self.warmup_steps if self.phase_name == "train" else INFERENCE_WARMUP_STEPS
        timer = WindowTimer(batches, sync, images, warmup, self.window_steps, self.clock, self.energy)
        self._timers[self.phase_name] = timer
        return timer

    @contextmanager
    def redirected(self, wrap: Callable[[Iterable, Callable[[], None]], Iterable]):
        """Run a loop outside the timed phases (the profile stage): :meth:`timed` hands the loop's batches and sync
        to ``wrap`` (which returns the iterable the loop runs, with ``images`` and ``data_wait_s`` like a timer's),
        and the listeners hear nothing, so no progress or history is recorded."""
        listeners, self.listeners, self._redirect = self.listeners, [], wrap
        try:
            yield
        finally:
            self.listeners, self._redirect = listeners, None

    def take_timer(self, phase: str) -> WindowTimer | None:
        """The timer a loop made during ``phase`` (None when the loop did not time its batches)."""
        return self._timers.pop(phase, None)

    @contextmanager
    def phase(self, name: str):
        """Tag the enclosed work (``train``, ``validate``, ``predict``, ``export``) for the monitor."""
        previous, self.phase_name = self.phase_name, name
        self._emit("phase", phase=name, epoch=self.epoch)
        try:
            yield
        finally:
            self.phase_name = previous

    def epoch_ended(self, record: EpochRecord) -> None:
        self.history.append(record)
        self._emit("epoch_ended", **record.to_dict())


class Stopwatch:
    """Wall time of a region with the device synchronised at both edges (monotonic clock)."""

    def __init__(self, sync: Callable[[], None] = no_sync):
        self.sync = sync
        self.seconds = 0.0

    @contextmanager
    def region(self):
        self.sync()
        start = time.perf_counter()
        try:
            yield self
        finally:
            self.sync()
            self.seconds = time.perf_counter() - start
