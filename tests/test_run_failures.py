"""The run survives its backends: a killed worker, Ctrl-C, and a backend that computes the wrong function.

Each test runs `cxrbench run` as a subprocess on a tiny DenseNet at 32 px: the point is the
orchestration, not the model.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from cxrbench.run.schema import validate
from helpers.tiny_run import TINY_RUN

TESTS = Path(__file__).resolve().parent
TINY = [*TINY_RUN, "--monitor-interval", "0.2"]


def _start(*args) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen(
        [sys.executable, "-m", "cxrbench", "run", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(process: subprocess.Popen, timeout=240) -> tuple[int, str]:
    _, err = process.communicate(timeout=timeout)
    return process.returncode, err


def _wait_for_training(status_path: Path, process: subprocess.Popen, timeout=180) -> dict:
    """status.json once the worker has started its first epoch."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"run ended before training started: {process.communicate()[1]}"
        try:
            status = json.loads(status_path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            status = {}
        if status.get("stage") == "train" and (status.get("progress") or {}).get("epoch"):
            return status
        time.sleep(0.05)
    raise AssertionError("training did not start in time")


def _run_json(run_dir: Path) -> dict:
    run = json.loads((run_dir / "run.json").read_text())
    validate(run, run_dir / "run.json")
    return run


@pytest.mark.slow
@pytest.mark.backends("pytorch", "numpy")
def test_a_killed_worker_is_failed_the_others_survive_and_resume_completes_it(tmp_path):
    run_dir = tmp_path / "run"
    process = _start("--backend", "pytorch", "--backend", "numpy", "--out", str(run_dir), "--epochs", "4", *TINY)
    status = _wait_for_training(run_dir / "pytorch" / "status.json", process)
    os.kill(status["pid"], signal.SIGKILL)
    code, err = _finish(process)

    assert code == 1, err
    run = _run_json(run_dir)
    pytorch, numpy_ = run["backends"]["pytorch"], run["backends"]["numpy"]
    assert pytorch["status"] == "failed"
    assert pytorch["error"] == "worker killed by signal SIGKILL during stage train"
    assert pytorch["stages"]["train"] == "failed" and pytorch["stages"]["equivalence"] == "done"
    assert numpy_["status"] == "completed" and numpy_["auroc"]["mean"] is not None
    assert (run_dir / "numpy" / "model.onnx").is_file() and (run_dir / "index.html").is_file()
    assert "SIGKILL" in (run_dir / "index.html").read_text()
    assert "worker killed by signal SIGKILL" in err
    numpy_started = json.loads((run_dir / "numpy" / "status.json").read_text())["started"]

    code, err = _finish(_start("--resume", str(run_dir)))

    assert code == 0, err
    run = _run_json(run_dir)
    assert run["backends"]["pytorch"]["status"] == "completed"
    assert [r["epoch"] for r in run["backends"]["pytorch"]["history"]] == [
        1,
        2,
        3,
        4,
    ]  # restarted from the initial weights
    assert "[pytorch] equivalence: already done, skipped" in (run_dir / "pytorch" / "log.txt").read_text()
    assert json.loads((run_dir / "numpy" / "status.json").read_text())["started"] == numpy_started  # not rerun
    assert len(run["resumed"]) == 1
    comparison = json.loads((run_dir / "comparison.json").read_text())
    assert comparison["equivalence"]["passed"] and set(comparison["parity"]) == {"pytorch", "numpy"}


@pytest.mark.slow
@pytest.mark.backends("pytorch", "numpy")
def test_ctrl_c_stops_the_workers_and_writes_what_finished(tmp_path):
    run_dir = tmp_path / "run"
    process = _start("--backend", "pytorch", "--backend", "numpy", "--out", str(run_dir), "--epochs", "4", *TINY)
    status = _wait_for_training(run_dir / "pytorch" / "status.json", process)
    process.send_signal(signal.SIGINT)
    code, err = _finish(process, timeout=60)

    assert code == 130, err
    run = _run_json(run_dir)
    assert run["status"] == "interrupted" and run["finished"]
    assert run["backends"]["pytorch"]["status"] == "interrupted"
    assert run["backends"]["pytorch"]["stages"]["train"] == "interrupted"
    assert run["backends"]["numpy"]["status"] == "pending"
    assert not psutil.pid_exists(status["pid"]) or psutil.Process(status["pid"]).status() == psutil.STATUS_ZOMBIE
    assert (run_dir / "index.html").is_file() and (run_dir / "comparison.json").is_file()


@pytest.mark.slow
@pytest.mark.backends("pytorch", "numpy")
def test_a_backend_with_a_wrong_layer_fails_the_equivalence_check(tmp_path):
    run_dir = tmp_path / "run"
    code, err = _finish(
        _start(
            "--backend",
            "pytorch",
            "--backend",
            "pytorch-wrong-bn",
            "--plugin",
            "plugins_wrong.wrong_bn",
            "--out",
            str(run_dir),
            "--set",
            "run.stages=[]",
            *TINY,
        )
    )

    assert code == 1, err
    equivalence = json.loads((run_dir / "comparison.json").read_text())["equivalence"]
    assert equivalence["passed"] is False
    assert equivalence["labels"] == ["pytorch", "pytorch/onnx", "pytorch-wrong-bn", "pytorch-wrong-bn/onnx"]
    first = equivalence["failures"][0]
    assert first.startswith("pytorch-wrong-bn computes a different function from pytorch: max |logit diff| ")
    difference = float(first.split("max |logit diff| ")[1].split(" > ")[0])
    assert difference > 100 * equivalence["atol"]
    # each model agrees with its own ONNX export: the difference is the layer, not the export
    labels, matrix = equivalence["labels"], equivalence["max_abs"]
    assert matrix[labels.index("pytorch")][labels.index("pytorch/onnx")] <= 1e-4
    assert matrix[labels.index("pytorch-wrong-bn")][labels.index("pytorch-wrong-bn/onnx")] <= 1e-4
    assert f"equivalence FAILED: {first}" in err
    assert _run_json(run_dir)["backends"]["pytorch-wrong-bn"]["status"] == "completed"
