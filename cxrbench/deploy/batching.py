"""Dynamic batching for ``cxrbench serve``: pictures of concurrent requests scored together in ONE onnxruntime call.

A request's decoded picture waits in a bounded queue. One inference thread takes the oldest, gathers more until
``max_batch`` pictures or until the oldest has waited ``max_delay_s`` (NVIDIA Triton's ``max_queue_delay``,
TorchServe's ``max_batch_delay``), scores them in one call and hands each caller its own row. It stops waiting
early when nothing is queued and the service says no other picture is on its way (``arriving``), so a lone client
never pays the delay. A single inference
thread means batches never fight over the cores: onnxruntime's intra-op pool uses all of them within each call.
When any picture of a batch wants a CAM the call also returns the feature map (the export's ``features`` output),
and every such picture gets its maps; the others only their logits.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np

from cxrbench.deploy.model import ScoringModel

#: Weight of the newest batch in the running estimate of seconds per picture (for ``Retry-After``).
_RATE_SMOOTHING = 0.2
#: ``Retry-After`` stays within these seconds: at least one (HTTP's unit), at most a minute.
RETRY_AFTER_RANGE = (1, 60)


class QueueFull(Exception):
    """The queue holds ``capacity`` pictures already: the caller answers 503."""


class Stopped(Exception):
    """The batcher stopped before this picture was scored."""


@dataclass
class Scored:
    """One picture's answer: its logits ``(C,)``, the CAMs of every class ``(C, h, w)`` when asked for, and the
    size of the batch it was scored in."""

    logits: np.ndarray
    maps: np.ndarray | None
    batch_size: int


@dataclass
class _Pending:
    pixels: np.ndarray
    cam: bool
    future: Future
    arrived: float


#: Called after each batch with its size and the seconds onnxruntime took (the service's metrics).
BatchObserver = Callable[[int, float], None]


class Batcher:
    """One inference thread in front of a :class:`ScoringModel`; :meth:`submit` from any thread."""

    def __init__(
        self,
        model: ScoringModel,
        max_batch: int,
        max_delay_s: float,
        capacity: int,
        observe: BatchObserver | None = None,
        arriving: Callable[[], int] | None = None,
    ):
        if max_batch < 1 or capacity < 1 or max_delay_s < 0:
            raise ValueError(f"max_batch {max_batch}, capacity {capacity} must be >= 1, max_delay_s {max_delay_s} >= 0")
        self.model, self.max_batch, self.max_delay_s, self.capacity = model, max_batch, max_delay_s, capacity
        self._observe = observe
        self._arriving = arriving or (lambda: 1)  # without a hint, always wait the delay out
        self._queue: queue.Queue[_Pending | None] = queue.Queue(maxsize=capacity)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._seconds_per_picture: float | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def depth(self) -> int:
        """Pictures waiting for a batch (not those being scored)."""
        return self._queue.qsize()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="cxrbench-inference", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the batch in progress, fail the pictures still waiting (:class:`Stopped`), join the thread."""
        if self._thread is None:
            return
        self._stopping = True  # no new pictures from here on
        while True:
            self._drain()
            try:
                self._queue.put_nowait(None)  # the sentinel: the inference thread ends after its batch
                break
            except queue.Full:  # a picture submitted just before the flag was seen
                continue
        self._thread.join(timeout)
        self._drain()
        self._thread = None

    def submit(self, pixels: np.ndarray, cam: bool) -> Future:
        """Queue one model-sized ``uint8`` picture; a future of its :class:`Scored`. :class:`QueueFull` when full."""
        if self._stopping or not self.running:
            raise Stopped("the inference thread is not running")
        pending = _Pending(pixels, cam, Future(), time.monotonic())
        try:
            self._queue.put_nowait(pending)
        except queue.Full:
            raise QueueFull(f"{self.capacity} pictures are already waiting") from None
        return pending.future

    def retry_after_s(self, waiting: int) -> int:
        """Whole seconds until ``waiting`` pictures are likely scored, from the recent rate (for ``Retry-After``)."""
        per_picture = self._seconds_per_picture or 0.0
        low, high = RETRY_AFTER_RANGE
        return int(min(max(math.ceil(waiting * per_picture), low), high))

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch, stop = self._gather(first)
            if batch:
                self._score(batch)
            if stop:
                return

    def _gather(self, first: _Pending) -> tuple[list[_Pending], bool]:
        """``first`` and whatever arrives before it has waited ``max_delay_s``, up to ``max_batch``, while more may
        come; cancelled requests (their client went away) are dropped. Also says whether the stop sentinel came."""
        batch = [first] if first.future.set_running_or_notify_cancel() else []
        deadline = first.arrived + self.max_delay_s
        while len(batch) < self.max_batch:
            if self._queue.empty() and self._arriving() <= 0:
                break
            try:
                wait = deadline - time.monotonic()
                item = self._queue.get(timeout=wait) if wait > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                return batch, True
            if item.future.set_running_or_notify_cancel():
                batch.append(item)
        return batch, False

    def _score(self, batch: list[_Pending]) -> None:
        want_cam = any(p.cam for p in batch)
        start = time.perf_counter()
        try:
            scores = self.model.score(
                np.stack([p.pixels for p in batch]), list(range(len(self.model.classes))) if want_cam else None
            )
        except Exception as exc:  # onnxruntime's own errors: every caller of the batch gets it
            for p in batch:
                p.future.set_exception(exc)
            return
        elapsed = time.perf_counter() - start
        for i, p in enumerate(batch):
            p.future.set_result(Scored(scores.logits[i], scores.maps[i] if p.cam else None, len(batch)))
        per_picture = elapsed / len(batch)
        previous = self._seconds_per_picture
        self._seconds_per_picture = (
            per_picture if previous is None else (1 - _RATE_SMOOTHING) * previous + _RATE_SMOOTHING * per_picture
        )
        if self._observe is not None:
            self._observe(len(batch), elapsed)

    def _drain(self) -> None:
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not None and item.future.set_running_or_notify_cancel():
                item.future.set_exception(Stopped("the service is stopping"))
