"""Steady-state timing: window edges, warm-up apart, the summary arithmetic, the recipe's records, bad input.

A fake clock drives every timer here, so no assertion depends on how fast this machine is.
"""

from __future__ import annotations

import types

import numpy as np
import pytest

from cxrbench.backend.recorder import Recorder
from cxrbench.backend.timing import (
    MIN_WINDOWS,
    Window,
    WindowTimer,
    batch_images,
    check_warmup,
    ratio_interval,
    summarise,
    timed_calls,
)
from cxrbench.backend.training import EpochOutcome, run_recipe
from cxrbench.errors import SuiteError
from cxrbench.run.progress import StepRate, status_line
from cxrbench.run.stages import training_throughput
from cxrbench.suite import Settings


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


def _run(timer: WindowTimer, clock: Clock, first_s: float, step_s: float) -> None:
    for step, _ in enumerate(timer, start=1):
        clock.advance(first_s if step == 1 else step_s)


def _fetching(clock: Clock, n: int, wait_s: float):
    for i in range(n):
        clock.advance(wait_s)
        yield i


def test_edges_are_first_step_warmup_end_and_every_window():
    clock, synced_at = Clock(), []

    def sync():
        synced_at.append(timer.steps)
        clock.advance(2.0)  # a device drain: counted in the windows, never as data wait

    timer = WindowTimer(_fetching(clock, 14, 0.5), sync, images=16, warmup_steps=4, window_steps=3, clock=clock)
    _run(timer, clock, first_s=10.0, step_s=1.0)

    assert synced_at == [1, 4, 7, 10, 13]  # the 1-step tail after step 13 is dropped, without a sync
    assert timer.first_step_s == pytest.approx(12.5)  # data wait of step 1 + its work + the drain at its end
    assert timer.windows == [Window(3, 48, 3 * 1.5 + 2.0)] * 3
    assert timer.data_wait_s == pytest.approx(14 * 0.5)
    assert timer.steps_after_warmup == 10


def test_a_tail_of_at_least_half_a_window_counts():
    clock = Clock()
    timer = WindowTimer(range(15), images=8, warmup_steps=4, window_steps=3, clock=clock)
    _run(timer, clock, first_s=5.0, step_s=0.5)
    assert [w.steps for w in timer.windows] == [3, 3, 3, 2]
    assert all(w.images_per_s == pytest.approx(16.0) for w in timer.windows)


def test_batch_sizes_from_the_batches():
    clock = Clock()
    batches = [types.SimpleNamespace(images=np.zeros(n)) for n in (4, 4, 4, 4, 2)]
    timer = WindowTimer(batches, images=batch_images, warmup_steps=1, window_steps=2, clock=clock)
    _run(timer, clock, first_s=1.0, step_s=1.0)
    assert timer.windows == [Window(2, 8, 2.0), Window(2, 6, 2.0)]


def test_summary_is_the_median_and_central_95_percent_of_window_rates():
    rates = np.array([20.0, 22.0, 25.0, 24.0, 30.0, 21.0, 23.0])
    windows = [[5, r * 2.0, 2.0] for r in rates]
    summary = summarise(windows)
    assert summary["images_per_s"] == pytest.approx(float(np.median(rates)))
    assert summary["interval"] == pytest.approx([float(np.quantile(rates, 0.025)), float(np.quantile(rates, 0.975))])
    assert summary["iqr"] == pytest.approx([float(np.quantile(rates, 0.25)), float(np.quantile(rates, 0.75))])
    assert summary["windows"] == 7 and summary["steady"]


def test_too_few_windows_are_not_steady():
    summary = summarise([Window(5, 80, 4.0)] * (MIN_WINDOWS - 1))
    assert summary == {"images_per_s": None, "interval": None, "iqr": None, "windows": MIN_WINDOWS - 1, "steady": False}


def test_ratio_interval_is_seeded_and_brackets_the_ratio_of_medians():
    rng = np.random.default_rng(1)
    fast, slow = 26.0 * rng.uniform(0.95, 1.05, 12), 24.0 * rng.uniform(0.95, 1.05, 9)
    low, high = ratio_interval(slow, fast)
    assert low <= np.median(slow) / np.median(fast) <= high < 1.0
    assert ratio_interval(slow, fast) == [low, high]
    assert ratio_interval(slow[:2], fast) is None


def test_timed_calls_time_each_call_after_the_first_and_keep_the_order():
    calls = []

    def predict(chunk):
        calls.append(len(chunk))
        return chunk[:, None].astype(np.float32) * 2

    images = np.arange(37)
    out, timer = timed_calls(predict, images, 8)
    assert np.array_equal(out[:, 0], images * 2) and calls == [8, 8, 8, 8, 5]
    assert [w.images for w in timer.windows] == [8, 8, 8, 5]


def test_warmup_longer_than_an_epoch_is_a_one_line_error_naming_the_option():
    check_warmup(5, 6)
    with pytest.raises(SuiteError, match=r"^train.warmup_steps = 6 leaves no step to time: an epoch has 6") as info:
        check_warmup(6, 6)
    assert "\n" not in str(info.value)


class LongFirstStep:
    """A framework-free EpochLoop: step 1 takes 100 s (tracing), the others 0.5 s, on a fake clock."""

    def __init__(self, recorder: Recorder, clock: Clock, steps: int = 12, batch: int = 8):
        self.recorder, self.clock, self.steps, self.batch = recorder, clock, steps, batch

    def sync(self) -> None:
        pass

    def train_epoch(self, epoch: int, lr: float) -> EpochOutcome:
        batches = self.recorder.timed(range(self.steps), self.sync, self.batch)
        for step, _ in enumerate(batches, start=1):
            self.clock.advance(100.0 if step == 1 else 0.5)
        return EpochOutcome(np.full(self.steps, 0.5), self.steps * self.batch, batches.data_wait_s)

    def validate(self) -> float:
        for _ in self.recorder.timed([types.SimpleNamespace(images=np.zeros(4))] * 7, self.sync, batch_images):
            self.clock.advance(0.25)
        return 0.4

    def snapshot(self):
        return None

    def restore(self, snapshot) -> None:
        pass


def test_one_epoch_run_with_a_long_first_step_reports_warmup_apart_and_a_steady_figure():
    settings = Settings().replace(**{"train.epochs": 1, "train.warmup_steps": 2, "train.window_steps": 2})
    clock, recorder = Clock(), Recorder()
    recorder.clock = clock
    run_recipe(LongFirstStep(recorder, clock), settings, recorder)

    (record,) = recorder.history
    assert record.first_step_s == 100.0
    assert record.steady_images_per_s == pytest.approx(16.0) and record.windows == 5
    assert record.steady_images_per_s_interval == pytest.approx([16.0, 16.0])
    assert record.val_images_per_s == pytest.approx(16.0) and record.val_windows == 3
    throughput = training_throughput([r.to_dict() for r in recorder.history], settings)
    assert throughput["first_step_s"] == 100.0 and throughput["steady"]
    assert throughput["train_images_per_s"] == pytest.approx(16.0)
    assert throughput["warmup_epoch_time_s"] == record.train_time_s  # the whole epoch stays available


def test_a_run_too_short_for_a_steady_state_says_so():
    settings = Settings().replace(**{"train.epochs": 1, "train.warmup_steps": 5, "train.window_steps": 5})
    clock, recorder = Clock(), Recorder()
    recorder.clock = clock
    run_recipe(LongFirstStep(recorder, clock, steps=8), settings, recorder)
    throughput = training_throughput([r.to_dict() for r in recorder.history], settings)
    assert throughput["train_images_per_s"] is None and not throughput["steady"]
    assert throughput["no_steady_state"].startswith("no steady state: 3 steps after warm-up (train.warmup_steps = 5)")
    assert throughput["first_step_s"] == 100.0


def test_live_progress_rate_and_eta_from_timestamped_steps():
    rate = StepRate(images_per_step=16)
    assert rate.update(1, 11, t=1000.0) == {}  # the first step (tracing) sets the origin
    update = rate.update(3, 11, t=1001.0)
    assert update == {"images_per_s": 32.0, "eta_s": 4.0}
    line = status_line(
        "keras",
        {
            "status": "running",
            "stage": "train",
            "progress": {"epoch": 1, "epochs": 2, "step": 3, "steps": 11, **update},
        },
    )
    assert line.endswith("epoch 1/2  step 3/11  32.0 img/s  ETA 0:04")


@pytest.mark.backends("numpy")
def test_cli_refuses_a_warmup_longer_than_an_epoch_before_training(tmp_path, capsys):
    from cxrbench.cli import main

    out = tmp_path / "run"
    code = main(
        ["run", "--backend", "numpy", "--set", "train.max_steps=4", "--set", "train.warmup_steps=4", "--out", str(out)]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].endswith(
        "train.warmup_steps = 4 leaves no step to time: an epoch has 4 training step(s) "
        "(lower train.warmup_steps or raise train.max_steps)"
    )
    assert not out.exists()  # refused before the run folder is made


def test_one_epoch_charts_have_whole_number_epoch_axes(monkeypatch):
    """The loss, learning-rate, epoch-time and throughput charts of a one-epoch run show the tick 1 only."""
    import matplotlib.figure

    from cxrbench.report import charts

    record = {
        "epoch": 1,
        "warmup": True,
        "train_loss": 0.6,
        "val_loss": 0.5,
        "train_time_s": 20.0,
        "val_time_s": 2.0,
        "data_wait_s": 0.5,
        "images": 480,
        "images_per_s": 24.0,
        "lr": 1e-3,
        "steps": 30,
        "steady_images_per_s": 26.0,
        "steady_images_per_s_interval": [25.0, 27.5],
    }
    ticks = {}
    save = matplotlib.figure.Figure.savefig

    def spy(figure, *args, **kwargs):
        for ax in figure.axes:
            low, high = ax.get_xlim()
            ticks[ax.get_title()] = [float(t) for t in ax.get_xticks() if low <= t <= high]
        return save(figure, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", spy)
    colours = {"pytorch": "#1f77b4", "keras": "#d62728"}
    assert charts.training_chart({"pytorch": [record]}, colours)
    assert charts.epoch_time_chart({"pytorch": [record], "keras": [record]}, colours)
    assert len(ticks) == 4 and all(visible == [1.0] for visible in ticks.values()), ticks
