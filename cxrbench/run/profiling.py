"""The worker's explaining stages: the matmul ceiling before training, the profile after it, and the model FLOPs
utilisation that joins them to the steady-state speed. Framework-free: the backend answers through hooks.

The profile re-enters the backend's own epoch loop (the one ``run_recipe`` kept on the recorder), so the profiled
steps are exactly the timed training path, already compiled, with its own input pipeline; the recorder hands the
loop a :class:`ProfiledSteps` instead of a window timer. The timed training has finished by then, so its figures
never include the profiler's cost; the trained weights are restored afterwards.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from cxrbench.backend.profiling import INPUT_REGION, PROFILE_REGION, Profiler, ProfileTrace
from cxrbench.errors import CxrError, first_line
from cxrbench.files import read_json
from cxrbench.machine.env import run_gpus
from cxrbench.machine.peaks import datasheet_peak, matmul_precision
from cxrbench.metrics import flops, step_profile
from cxrbench.metrics.operation_categories import Classifier, collect_rules
from cxrbench.run.folder import CEILING_JSON, PROFILE_DIR, THROUGHPUT_JSON


class ProfiledSteps:
    """The batches of one more epoch: ``warmup`` steps as usual, then ``steps`` steps under the profiler inside
    the region annotation (each wait for a batch inside :data:`INPUT_REGION`), the device synchronised at the
    region's two edges only, then the end of the epoch. A step is complete when the loop asks for the next batch,
    as in the window timer."""

    def __init__(self, profiler: Profiler, warmup: int, steps: int, clock: Callable[[], float] = time.perf_counter):
        self.profiler, self.warmup, self.steps, self.clock = profiler, warmup, steps, clock
        self.issued = 0
        self.profiled = 0
        self.started = False
        self.wall_s: float | None = None
        self.images = 0  #: what a window timer reports to the loop (the profile stage discards the epoch's outcome)
        self.data_wait_s = None
        self._batches: Iterable = iter(())
        self._sync: Callable[[], None] = lambda: None
        self._region: AbstractContextManager[Any] | None = None
        self._began = 0.0

    def attach(self, batches: Iterable, sync: Callable[[], None]) -> ProfiledSteps:
        """What :meth:`cxrbench.backend.recorder.Recorder.redirected` calls with the loop's batches."""
        self._batches, self._sync = iter(batches), sync
        return self

    def __iter__(self) -> ProfiledSteps:
        return self

    def __next__(self):
        if self.issued == self.warmup and not self.started:
            self._sync()
            self.profiler.start()
            self.started = True
            self._region = self.profiler.annotate(PROFILE_REGION)
            self._region.__enter__()
            self._began = self.clock()
        if self._region is not None and self.issued - self.warmup >= self.steps:
            self.close()
            raise StopIteration
        try:
            if self._region is not None:
                with self.profiler.annotate(INPUT_REGION):
                    batch = next(self._batches)
            else:
                batch = next(self._batches)
        except StopIteration:
            self.close()
            raise
        self.issued += 1
        return batch

    def close(self) -> None:
        """End the region after the device has finished the last profiled step (safe to call twice)."""
        if self._region is None:
            return
        region, self._region = self._region, None
        try:
            self._sync()
            self.wall_s = self.clock() - self._began
            self.profiled = self.issued - self.warmup
        finally:
            region.__exit__(None, None, None)


def _skipped(status: str, reason: str) -> dict[str, Any]:
    return {"status": status, "reason": reason}


def profile(ctx) -> dict[str, Any]:
    """The profile stage's record (profile.json): categories per step, top operations, traces, or why there is none.

    A profiler that is unavailable or fails costs the run nothing but this section: its one line is the record's
    ``reason``. The trained weights are restored whatever happens.
    """
    options = ctx.settings.profile
    loop = ctx.recorder.trained_loop
    if loop is None:
        return _skipped(
            "skipped",
            "no training loop in this process to profile (training ran in other processes, did not use the core's "
            "run_recipe, or finished in an earlier run that is being resumed)",
        )
    trace_dir = Path(ctx.folder) / PROFILE_DIR
    trace_dir.mkdir(parents=True, exist_ok=True)
    try:
        profiler = ctx.hook.cxrbench_profiler(loop=loop, settings=ctx.settings, trace_dir=trace_dir)
    except Exception as exc:  # the framework's profiler is missing or refuses: one line, the run goes on
        profiler, refusal = None, _skipped("unavailable", _one_line(exc))
    else:
        refusal = _skipped("skipped", f"backend {ctx.backend!r} has no profiler (it implements no cxrbench_profiler)")
    if profiler is None:
        if not any(trace_dir.iterdir()):
            trace_dir.rmdir()
        return refusal
    start = time.perf_counter()
    trained = ctx.call("cxrbench_get_weights", model=ctx.model)
    try:
        trace, steps = run_profiled_steps(
            loop, ctx.recorder, profiler, options.warmup_steps, options.steps, ctx.settings.train.learning_rate
        )
        return _record(ctx, trace, steps, time.perf_counter() - start)
    except Exception as exc:  # a profiler (or a trace) that breaks: the run goes on without this section
        return _skipped("failed", _one_line(exc))
    finally:
        ctx.call("cxrbench_set_weights", model=ctx.model, weights=trained)


def run_profiled_steps(
    loop, recorder, profiler: Profiler, warmup: int, steps: int, learning_rate: float
) -> tuple[ProfileTrace, ProfiledSteps]:
    """One more epoch of ``loop``: ``warmup`` steps, then ``steps`` steps under ``profiler``, which is stopped
    whatever happens. The epoch's learning rate is the last one trained with (``learning_rate`` before any)."""
    counted = ProfiledSteps(profiler, warmup, steps)
    history = recorder.history
    trace: ProfileTrace | None = None
    try:
        with recorder.redirected(counted.attach):
            loop.train_epoch(len(history) + 1, history[-1].lr if history else learning_rate)
        counted.close()
        trace = profiler.stop()
    finally:
        if counted.started and trace is None:
            _stop_quietly(profiler)
    return trace, counted


def _one_line(exc: BaseException) -> str:
    return first_line(exc) if isinstance(exc, CxrError) else first_line(exc, with_type=True)


def _stop_quietly(profiler: Profiler) -> None:
    try:
        profiler.stop()
    except Exception:  # already failing: the first error is the one reported
        pass


def _record(ctx, trace: ProfileTrace, steps: ProfiledSteps, seconds: float) -> dict[str, Any]:
    options = ctx.settings.profile
    if steps.profiled < 1:
        return _skipped(
            "unavailable",
            f"no step left to profile: the epoch ended within profile.warmup_steps = {options.warmup_steps}",
        )
    if not any(event.kind == "op" for event in trace.events):  # all would be overhead: say so instead
        return _skipped("unavailable", f"{trace.profiler or 'the profiler'} recorded no operation of the model")
    classifier = Classifier(collect_rules(ctx.hook.cxrbench_operation_rules()))
    analysis = step_profile.analyse(trace.events, classifier, steps.profiled)
    batch = step_profile.global_batch(ctx.settings.to_dict())
    steady = step_profile.steady_step_ms(read_json(Path(ctx.folder) / THROUGHPUT_JSON), batch)
    return {
        "status": "done",
        "reason": None,
        "profiler": trace.profiler,
        "warmup_steps": options.warmup_steps,
        **analysis,
        "wall_step_ms": 1000.0 * steps.wall_s / steps.profiled if steps.wall_s else None,
        "steady_step_ms": steady,
        "profiler_inflation": analysis["step_ms"] / steady if steady else None,
        "traces": [
            {"path": Path(f).relative_to(ctx.folder).as_posix(), "bytes": Path(f).stat().st_size}
            for f in trace.files
            if Path(f).is_file()
        ],
        "notes": list(trace.notes),
        "seconds": seconds,
    }


# -- the ceiling and the utilisation ----------------------------------------------------------------------------


def ceiling(ctx) -> dict[str, Any]:
    """ceiling.json: the backend's measured dense-matmul rate on the run's device and, for a known GPU, the
    datasheet peak in the same precision; each with the reason when missing."""
    numerics = ctx.settings.numerics
    precision = matmul_precision(numerics.precision, numerics.tf32)
    gpus = run_gpus(ctx.settings.run.gpus) or []
    names = [gpu.name for gpu in gpus]
    datasheet = datasheet_peak(names[0], precision) if names else None
    reason = None
    try:
        measured = ctx.hook.cxrbench_peak_flops(settings=ctx.settings)
    except Exception as exc:  # no ceiling costs the run only the fraction
        measured, reason = None, _one_line(exc)
    if measured is None and reason is None:
        reason = f"backend {ctx.backend!r} does not measure a ceiling (it does not implement cxrbench_peak_flops)"
    return {
        "measured": measured.to_dict() if measured is not None else None,
        "datasheet": datasheet,
        "precision": precision,
        "devices": names or ["cpu"],
        "reason": reason,
        "datasheet_reason": None
        if datasheet
        else ("no datasheet figure for CPUs" if not names else f"{names[0]} at {precision} is not in the table"),
    }


def efficiency(ctx, throughput: dict[str, Any]) -> dict[str, Any]:
    """efficiency.json: model FLOPs per image, achieved FLOP/s of training and its share of the ceilings."""
    settings = ctx.settings
    counted = flops.model_flops(settings.model.block_config, settings.data.image_size)
    return flops.efficiency(
        counted,
        throughput.get("train_images_per_s"),
        read_json(Path(ctx.folder) / CEILING_JSON),
        max(1, settings.run.gpus),
    )
