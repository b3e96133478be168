"""What a backend's profiler gives the core: operations as timed events, and the matmul ceiling of its device.

The profile stage (:mod:`cxrbench.run.profiling`) runs a few more steps of the backend's own training loop under
the framework's own profiler (``cxrbench_profiler``); the backend turns the framework's trace into
:class:`TraceEvent` rows and the core maps them to common categories (:mod:`cxrbench.metrics.operation_categories`),
so every framework's time is cut the same way. Shared here so no backend writes it twice: the two annotation names
the core puts into every trace, a reader of Chrome/Perfetto JSON traces (torch.profiler and jax.profiler write
them), and the timing of the dense-matmul ceiling (``cxrbench_peak_flops``).
"""

from __future__ import annotations

import gzip
import json
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

#: The annotation around the profiled steps: its span in the trace is the wall time the categories divide.
PROFILE_REGION = "cxrbench.profile"
#: The annotation around each wait for the next batch inside the region: the input pipeline as the loop sees it.
INPUT_REGION = "cxrbench.input"


@dataclass(frozen=True, slots=True)
class TraceEvent:
    """One timed span of a trace, in the trace's own clock (microseconds).

    ``lane`` is where it ran (a thread, a GPU stream): spans on one lane nest, spans on different lanes may overlap.
    ``kind`` is ``"op"`` for the work of the model (an operation on the CPU, a kernel on a GPU) and ``"host"`` for
    host-side spans that only explain time when no operation runs (the core's annotations, a GPU's launching CPU
    operations). ``scope`` is the framework's path of the operation when it has one (TensorFlow's node name, XLA's
    ``op_name`` metadata, a GPU kernel's launching operators), searched by the category rules with the names of the
    enclosing spans; ``name`` is what the operation is (an op type, an ATen operator, an HLO instruction kind) and
    what the top-operations table groups by.
    """

    name: str
    start_us: float
    duration_us: float
    lane: str
    kind: Literal["op", "host"] = "op"
    scope: str = ""

    @property
    def end_us(self) -> float:
        return self.start_us + self.duration_us

    @property
    def label(self) -> str:
        """This span's part of a path: its scope, then its name."""
        return f"{self.scope}/{self.name}" if self.scope else self.name


@dataclass(frozen=True)
class ProfileTrace:
    """What a profiler hands back when stopped: its events, the raw trace files it wrote, and what it was."""

    events: list[TraceEvent]
    files: list[Path] = field(default_factory=list)  #: the raw traces (Perfetto / TensorBoard), under ``trace_dir``
    profiler: str = ""  #: e.g. ``"torch.profiler (torch 2.14.1)"``
    notes: list[str] = field(default_factory=list)  #: anything the reader of the numbers must know


class Profiler(Protocol):
    """A framework's profiler as ``cxrbench_profiler`` returns it; the core calls ``start``, ``annotate`` around the
    region and every input wait, then ``stop`` once."""

    def start(self) -> None: ...

    def annotate(self, name: str) -> AbstractContextManager[Any]:
        """A named span on the calling thread, recorded in the trace (``torch.profiler.record_function``,
        ``tf.profiler.experimental.Trace``, ``jax.profiler.TraceAnnotation``)."""

    def stop(self) -> ProfileTrace: ...


def chrome_trace_events(path: Path) -> Iterator[dict[str, Any]]:
    """The complete spans (``"ph": "X"``) of a Chrome/Perfetto JSON trace (``.json`` or ``.json.gz``), each with its
    thread's name under ``"thread"`` (from the trace's ``thread_name`` metadata; the thread id when unnamed)."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as handle:
        trace = json.load(handle)
    events = trace.get("traceEvents", []) if isinstance(trace, dict) else trace
    names = {
        (e.get("pid"), e.get("tid")): str((e.get("args") or {}).get("name"))
        for e in events
        if e.get("ph") == "M" and e.get("name") == "thread_name"
    }
    for event in events:
        if event.get("ph") == "X" and "dur" in event:
            key = (event.get("pid"), event.get("tid"))
            yield {**event, "thread": names.get(key, f"{event.get('pid')}/{event.get('tid')}")}


@dataclass(frozen=True)
class PeakFlops:
    """The best rate of a dense ``n x n`` by ``n x n`` matrix product (``2 n^3`` FLOPs) on the run's device."""

    flop_per_s: float
    size: int
    dtype: str
    device: str
    repeats: int
    seconds: float  #: the whole measurement, warm-up and sizing included
    how: str  #: the framework call timed, e.g. ``"torch.matmul"``

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


#: A matmul is timed once the best of a few calls takes at least this long (shorter ones measure launch and timer
#: overhead); the side starts here and doubles.
PEAK_MIN_CALL_S = 0.05
PEAK_FIRST_SIZE = 512
PEAK_SIZING_CALLS = 3
#: The largest side tried (fp32: 1 GiB per matrix), and the time the whole measurement may take.
PEAK_MAX_SIZE = 16384
PEAK_BUDGET_S = 1.5


def measure_matmul_peak(
    make: Callable[[int], Callable[[], Any]],
    sync: Callable[[], None],
    *,
    dtype: str,
    device: str,
    how: str,
    budget_s: float = PEAK_BUDGET_S,
    clock: Callable[[], float] = time.perf_counter,
) -> PeakFlops:
    """The ceiling every backend measures the same way: ``make(n)`` allocates two ``n x n`` matrices in the
    framework and returns a call that multiplies them (asynchronously where the framework is); ``sync`` waits for
    the device. The side doubles from 512 until the best of three calls takes :data:`PEAK_MIN_CALL_S` (so the
    product is large enough to reach the device's rate), then the call repeats until ``budget_s`` has passed; the
    best call is the ceiling (interference only ever slows a call down)."""
    begin = clock()
    size = PEAK_FIRST_SIZE

    def timed(call: Callable[[], Any]) -> float:
        start = clock()
        call()
        sync()
        return clock() - start

    while True:
        call = make(size)
        timed(call)  # warm-up: allocation, kernel selection, compilation
        best = min(timed(call) for _ in range(PEAK_SIZING_CALLS))
        if best >= PEAK_MIN_CALL_S or size * 2 > PEAK_MAX_SIZE:
            break
        size *= 2
    repeats = PEAK_SIZING_CALLS
    while clock() - begin < budget_s:
        best = min(best, timed(call))
        repeats += 1
    return PeakFlops(
        flop_per_s=2.0 * size**3 / best,
        size=size,
        dtype=dtype,
        device=device,
        repeats=repeats,
        seconds=clock() - begin,
        how=how,
    )
