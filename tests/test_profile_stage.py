"""The worker's profile and ceiling stages with a fake backend: the steps they run, the weights they restore, and a
profiler that is missing or breaks costing the run one line, never the run."""

import contextlib
import json
import time

import numpy as np
import pytest

from cxrbench.backend.profiling import INPUT_REGION, PROFILE_REGION, PeakFlops, ProfileTrace, TraceEvent
from cxrbench.backend.recorder import Recorder
from cxrbench.backend.training import EpochOutcome
from cxrbench.errors import BackendError
from cxrbench.run import stages
from cxrbench.run.worker import Interrupted
from cxrbench.suite import Settings

STEPS_PER_EPOCH = 8


class FakeLoop:
    """An epoch loop in the core's shape: batches through ``recorder.timed``, one weight change per step."""

    def __init__(self, backend, recorder):
        self.backend, self.recorder = backend, recorder
        self.syncs = 0

    def sync(self):
        self.syncs += 1

    def train_epoch(self, epoch, lr):
        batches = self.recorder.timed(range(STEPS_PER_EPOCH), self.sync, 4)
        for _ in batches:
            time.sleep(0.002)
            self.backend.weights["w"] = self.backend.weights["w"] + 1.0
            self.backend.steps_run += 1
            self.recorder.step(epoch, 1, STEPS_PER_EPOCH)
        return EpochOutcome(np.zeros(0), batches.images, batches.data_wait_s)


class FakeProfiler:
    """Records its annotations with the real clock and adds one convolution per step between the input waits."""

    def __init__(self, fail_on_stop=False):
        self.fail_on_stop = fail_on_stop
        self.spans, self.started, self.stopped = [], 0, 0

    def start(self):
        self.started += 1

    @contextlib.contextmanager
    def annotate(self, name):
        begin = time.perf_counter() * 1e6
        yield
        self.spans.append(TraceEvent(name, begin, time.perf_counter() * 1e6 - begin, "python", "host"))

    def stop(self):
        self.stopped += 1
        if self.fail_on_stop:
            raise RuntimeError("the trace buffer overflowed")
        waits = sorted((s for s in self.spans if s.name == INPUT_REGION), key=lambda s: s.start_us)
        ops = [
            TraceEvent("Conv2D", a.end_us, 0.8 * (b.start_us - a.end_us), "compute")
            for a, b in zip(waits, waits[1:] + [next(s for s in self.spans if s.name == PROFILE_REGION)])
        ]
        return ProfileTrace(events=[*self.spans, *ops], files=[], profiler="fake profiler 1.0")


class FakeBackend:
    """The hooks the stages call, as a worker's hook relay would answer them."""

    def __init__(self, profiler=None, refuse=None, peak=None):
        self.weights = {"w": np.zeros(3, dtype=np.float32)}
        self.steps_run = 0
        self.profiler, self.refuse, self.peak = profiler, refuse, peak
        self.set_calls = []

    def cxrbench_profiler(self, loop, settings, trace_dir):
        if self.refuse:
            raise self.refuse
        return self.profiler

    def cxrbench_operation_rules(self):
        return [None]

    def cxrbench_get_weights(self, model):
        return {k: v.copy() for k, v in self.weights.items()}

    def cxrbench_set_weights(self, model, weights):
        self.set_calls.append(weights)
        self.weights = {k: v.copy() for k, v in weights.items()}
        return True

    def cxrbench_peak_flops(self, settings):
        if isinstance(self.peak, BaseException):
            raise self.peak
        return self.peak


def context(tmp_path, backend, trained=True):
    heard = []
    recorder = Recorder([lambda event, payload: heard.append(event)])
    if trained:
        recorder.trained_loop = FakeLoop(backend, recorder)
    settings = Settings().replace(**{"profile.steps": 3, "profile.warmup_steps": 2})
    ctx = stages.StageContext(folder=tmp_path, backend="fake", hook=backend, settings=settings, recorder=recorder)
    return ctx, heard


def profile_json(tmp_path):
    return json.loads((tmp_path / "profile.json").read_text())


def test_the_profile_runs_warm_up_then_profiled_steps_of_the_trained_loop_and_restores_the_weights(tmp_path):
    profiler = FakeProfiler()
    backend = FakeBackend(profiler)
    ctx, heard = context(tmp_path, backend)
    stages.profile(ctx)
    record = profile_json(tmp_path)
    assert record["status"] == "done" and record["profiler"] == "fake profiler 1.0"
    assert backend.steps_run == 5 and record["steps"] == 3 and record["warmup_steps"] == 2  # then the epoch ends
    assert (profiler.started, profiler.stopped) == (1, 1)
    assert [s.name for s in profiler.spans].count(PROFILE_REGION) == 1
    assert [s.name for s in profiler.spans].count(INPUT_REGION) == 3
    assert ctx.recorder.trained_loop.syncs == 2  # the region's two edges only
    assert np.array_equal(backend.weights["w"], np.zeros(3))  # the trained weights are back
    assert heard == []  # no progress or history from the profiled epoch
    categories = record["categories_ms"]
    assert sum(categories.values()) == pytest.approx(record["step_ms"], rel=1e-9)
    assert categories["conv_forward"] > 0 and categories["input"] > 0
    assert record["wall_step_ms"] == pytest.approx(record["step_ms"], rel=0.05)
    assert record["steady_step_ms"] is None and record["seconds"] > 0


@pytest.mark.parametrize(
    "backend, status, reason",
    [
        (
            FakeBackend(refuse=BackendError("torch.profiler is unavailable here: no kineto")),
            "unavailable",
            "torch.profiler is unavailable here: no kineto",
        ),
        (FakeBackend(profiler=None), "skipped", "backend 'fake' has no profiler (it implements no cxrbench_profiler)"),
    ],
)
def test_a_backend_without_a_working_profiler_is_one_line_and_the_stage_completes(
    tmp_path, capsys, backend, status, reason
):
    ctx, _ = context(tmp_path, backend)
    stages.profile(ctx)  # no exception: the run goes on
    assert profile_json(tmp_path) == {"status": status, "reason": reason}
    assert capsys.readouterr().out == f"[fake] profile {status}: {reason}\n"
    assert not (tmp_path / "profile").exists() and backend.steps_run == 0


def test_a_profiler_that_breaks_mid_way_fails_the_section_only_and_the_weights_come_back(tmp_path):
    backend = FakeBackend(FakeProfiler(fail_on_stop=True))
    ctx, _ = context(tmp_path, backend)
    stages.profile(ctx)
    assert profile_json(tmp_path) == {"status": "failed", "reason": "RuntimeError: the trace buffer overflowed"}
    assert backend.steps_run == 5 and np.array_equal(backend.weights["w"], np.zeros(3))


def test_without_the_trained_loop_or_steps_left_there_is_no_profile_and_it_says_why(tmp_path):
    ctx, _ = context(tmp_path, FakeBackend(FakeProfiler()), trained=False)
    stages.profile(ctx)
    assert profile_json(tmp_path)["status"] == "skipped" and "resumed" in profile_json(tmp_path)["reason"]
    ctx, _ = context(tmp_path, FakeBackend(FakeProfiler()))
    ctx.settings = ctx.settings.replace(**{"profile.warmup_steps": STEPS_PER_EPOCH})
    stages.profile(ctx)
    assert profile_json(tmp_path) == {
        "status": "unavailable",
        "reason": f"no step left to profile: the epoch ended within profile.warmup_steps = {STEPS_PER_EPOCH}",
    }


def test_the_ceiling_stage_records_the_measured_rate_or_why_not(tmp_path):
    peak = PeakFlops(2.0e11, 2048, "float32", "cpu", 12, 1.5, "fake.matmul")
    ctx, _ = context(tmp_path, FakeBackend(peak=peak))
    stages.ceiling(ctx)
    ceiling = json.loads((tmp_path / "ceiling.json").read_text())
    assert ceiling["measured"] == peak.to_dict() and ceiling["precision"] == "fp32" and ceiling["reason"] is None
    ctx, _ = context(tmp_path, FakeBackend(peak=BackendError("no device")))
    stages.ceiling(ctx)
    ceiling = json.loads((tmp_path / "ceiling.json").read_text())
    assert ceiling["measured"] is None and ceiling["reason"] == "no device"


@pytest.mark.parametrize(
    "stage, backend",
    [
        ("ceiling", FakeBackend(peak=Interrupted("stopped by signal SIGTERM"))),
        ("profile", FakeBackend(FakeProfiler(), refuse=Interrupted("stopped by signal SIGTERM"))),
    ],
)
def test_a_stop_request_inside_a_best_effort_stage_stops_the_worker(tmp_path, stage, backend):
    """The worker's SIGTERM handler raises Interrupted wherever its main thread is. The stages that turn a failure
    into a missing figure must let it through: swallowed, a cancelled Slurm job's worker trained on."""
    ctx, _ = context(tmp_path, backend)
    with pytest.raises(Interrupted):
        getattr(stages, stage)(ctx)


def test_a_trace_without_any_operation_is_no_profile_rather_than_all_overhead(tmp_path):
    class Blind(FakeProfiler):
        def stop(self):
            return ProfileTrace(events=list(self.spans), files=[], profiler="blind 1.0")

    ctx, _ = context(tmp_path, FakeBackend(Blind()))
    stages.profile(ctx)
    assert profile_json(tmp_path) == {"status": "unavailable", "reason": "blind 1.0 recorded no operation of the model"}
