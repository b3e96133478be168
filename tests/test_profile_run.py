"""The profile, the ceiling and the energy section end to end: a tiny real run of PyTorch (profiled) beside the
numpy example backend (no profiler, no ceiling: one line each, the run goes on), through run.json, the terminal
summary and the report."""

import json
import subprocess
import sys

import pytest

from cxrbench.run.schema import validate
from helpers.tiny_run import TINY_RUN

pytestmark = [pytest.mark.backends("pytorch", "numpy"), pytest.mark.slow]


@pytest.fixture(scope="module")
def profiled_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("profiled") / "run"
    result = subprocess.run(
        [sys.executable, "-m", "cxrbench", "run", "--backend", "pytorch", "--backend", "numpy", "--out", str(run_dir),
         *TINY_RUN, "--set", "train.max_steps=12", "--set", "train.warmup_steps=2", "--set", "train.window_steps=2",
         "--set", "profile.steps=2", "--set", "profile.warmup_steps=1"],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir, json.loads((run_dir / "run.json").read_text()), result.stderr


def test_the_profile_lands_in_run_json_with_categories_that_add_up_to_the_step(profiled_run):
    run_dir, run, _ = profiled_run
    validate(run, run_dir / "run.json")
    pytorch = run["backends"]["pytorch"]
    profile = pytorch["profile"]
    assert profile["status"] == "done" and profile["profiler"].startswith("torch.profiler")
    assert profile["steps"] == 2 and pytorch["stages"]["profile"] == "done" and pytorch["stage_seconds"]["profile"] > 0
    assert sum(profile["categories_ms"].values()) == pytest.approx(profile["step_ms"], rel=1e-6)
    for category in ("conv_forward", "conv_backward", "batch_norm", "optimizer"):
        assert profile["categories_ms"][category] > 0, category
    assert profile["categories_ms"]["other"] < 0.01 * profile["step_ms"]  # the table knows PyTorch's names
    assert len(profile["top_operations"]) == 10 and profile["steady_step_ms"] > 0
    (trace,) = profile["traces"]
    assert (run_dir / "pytorch" / trace["path"]).stat().st_size == trace["bytes"] > 0
    numpy_ = run["backends"]["numpy"]
    assert numpy_["status"] == "completed" and numpy_["profile"]["status"] == "skipped"
    section = run["profile_comparison"]
    assert section["baseline"] == "pytorch" and set(section["step_ms"]) == {"pytorch"}
    assert section["missing"] == {"numpy": numpy_["profile"]["reason"]} and section["pairs"] == []


def test_utilisation_and_energy_are_reported_or_say_why_not(profiled_run):
    _, run, stderr = profiled_run
    efficiency = run["backends"]["pytorch"]["efficiency"]
    measured = efficiency["ceiling"]["measured"]
    assert measured["how"] == "torch.matmul" and measured["flop_per_s"] > 0 and measured["size"] >= 512
    assert efficiency["achieved_flop_per_s"] == pytest.approx(
        efficiency["flops"]["training_flops"] * run["backends"]["pytorch"]["throughput"]["train_images_per_s"]
    )
    assert efficiency["fraction_of_measured"] == pytest.approx(
        efficiency["achieved_flop_per_s"] / measured["flop_per_s"]
    )
    numpy_ceiling = run["backends"]["numpy"]["efficiency"]["ceiling"]
    assert numpy_ceiling["measured"] is None and "cxrbench_peak_flops" in numpy_ceiling["reason"]
    energy = run["backends"]["pytorch"]["throughput"]["energy"]
    assert energy["source"] in ("rapl", "nvml", "none")
    assert energy["train"] is not None if energy["source"] != "none" else energy["reason"].startswith("unavailable: ")
    assert "where the time goes, ms per training step (profiled):" in stderr
    assert "pytorch reached" in stderr and "of the measured ceiling" in stderr
    assert "numpy: no profile: backend 'numpy' has no profiler" in stderr
    assert "cost of the profile + ceiling stages: pytorch " in stderr


def test_the_report_shows_the_chart_the_tables_and_the_missing_profile(profiled_run):
    run_dir, _, _ = profiled_run
    html = (run_dir / "index.html").read_text()
    for anchor in ('id="why"', 'id="category-table"', 'id="efficiency-table"', 'id="energy-table"'):
        assert anchor in html
    assert "where the time goes" in html and "numpy: no profile: backend" in html
    assert "pytorch.pt.trace.json.gz" in html
