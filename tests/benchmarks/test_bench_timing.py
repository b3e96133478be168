"""The timing and noise-guard arithmetic must cost nothing next to a training step (tens of milliseconds).

Run: ``python -m pytest tests/benchmarks/test_bench_timing.py --benchmark-only -q``. The window
timer's per-step overhead (no synchronisation between edges), the summary of a long run's windows,
the bootstrap interval of a ratio, and the noise verdict over an hour of monitor samples.
"""

from __future__ import annotations

import numpy as np

from cxrbench.backend.timing import RATIO_ROUNDS, WindowTimer, ratio_interval, summarise
from cxrbench.machine.monitor import noise

STEPS = 10_000
#: A ChestX-ray14 epoch at batch 16 (78,468 training images) in windows of 5 steps.
WINDOWS = 78_468 // 16 // 5


def test_bench_window_timer_per_step(benchmark):
    def run() -> WindowTimer:
        timer = WindowTimer(range(STEPS), images=16, warmup_steps=5, window_steps=5)
        for _ in timer:
            pass
        return timer

    timer = benchmark(run)
    assert timer.steps == STEPS and len(timer.windows) == (STEPS - 5) // 5


def test_bench_summary_of_an_epochs_windows(benchmark):
    windows = [[5, 80, s] for s in np.random.default_rng(0).uniform(2.5, 3.5, WINDOWS)]
    summary = benchmark(summarise, windows)
    assert summary["steady"] and summary["windows"] == WINDOWS


def test_bench_ratio_interval(benchmark):
    rng = np.random.default_rng(0)
    low, high = benchmark(ratio_interval, 24 * rng.uniform(0.9, 1.1, 200), 26 * rng.uniform(0.9, 1.1, 200))
    assert low < 24 / 26 < high
    benchmark.extra_info["rounds"] = RATIO_ROUNDS  # one call: two bootstraps of this many medians


def test_bench_noise_verdict_over_an_hour_of_samples(benchmark):
    shares = np.random.default_rng(0).uniform(0, 0.1, 3600)
    samples = [{"phase": "train", "device": "cpu", "others_cpu_share": float(s), "load_1m": 1.0} for s in shares]
    verdicts = benchmark(noise.judge, samples)
    assert verdicts["train"]["samples"] == 3600 and not verdicts["train"]["disturbed"]
