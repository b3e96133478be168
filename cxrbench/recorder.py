"""The core's training recorder and timing helpers, shared by every backend.

Backends report through a :class:`Recorder` so that every framework's numbers mean the same
thing; :class:`Stopwatch` synchronises the device at both edges of a timed region, and
:class:`WaitTimer` measures how long a training loop waited for its input.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from cxrbench.api import EpochRecord

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

    def _emit(self, event: str, **payload: Any) -> None:
        for listener in self.listeners:
            listener(event, payload)

    def epoch_started(self, epoch: int, warmup: bool, steps: int | None = None) -> None:
        self.epoch = epoch
        self._emit("epoch_started", epoch=epoch, warmup=warmup, steps=steps)

    def step(self, epoch: int, step: int, steps: int | None = None) -> None:
        """Optional progress; never pass a device value that would force a synchronisation."""
        self._emit("step", epoch=epoch, step=step, steps=steps)

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


def _no_sync() -> None:
    return None


class Stopwatch:
    """Wall time of a region with the device synchronised at both edges (monotonic clock)."""

    def __init__(self, sync: Callable[[], None] = _no_sync):
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


class WaitTimer:
    """Wrap an iterator and add up the time spent waiting in ``next()``: the loop's data wait."""

    def __init__(self, iterable: Iterable):
        self._iterator = iter(iterable)
        self.seconds = 0.0

    def __iter__(self) -> Iterator:
        return self

    def __next__(self):
        start = time.perf_counter()
        try:
            return next(self._iterator)
        finally:
            self.seconds += time.perf_counter() - start
