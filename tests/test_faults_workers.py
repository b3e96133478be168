"""Faults of a run's framework workers: a killed worker, Ctrl-C, a backend that computes the wrong function.

Each test runs `cxrbench run` as a subprocess on a tiny DenseNet at 32 px: the point is the
orchestration, not the model.
"""

import json
import os
import signal

import psutil
import pytest

from helpers.cli_process import finish, run_json, start, training, wait_until
from helpers.tiny_run import TINY_RUN

TINY = [*TINY_RUN, "--monitor-interval", "0.2"]


@pytest.mark.slow
@pytest.mark.backends("pytorch", "numpy")
def test_a_killed_worker_is_failed_the_others_survive_and_resume_completes_it(tmp_path):
    run_dir = tmp_path / "run"
    process = start("run", "--backend", "pytorch", "--backend", "numpy", "--out", str(run_dir), "--epochs", "4", *TINY)
    status = wait_until(run_dir / "pytorch" / "status.json", process, training)
    os.kill(status["pid"], signal.SIGKILL)
    code, err = finish(process)

    assert code == 1, err
    run = run_json(run_dir)
    pytorch, numpy_ = run["backends"]["pytorch"], run["backends"]["numpy"]
    assert pytorch["status"] == "failed"
    assert pytorch["error"] == "worker killed by signal SIGKILL during stage train"
    assert pytorch["stages"]["train"] == "failed" and pytorch["stages"]["equivalence"] == "done"
    assert numpy_["status"] == "completed" and numpy_["auroc"]["mean"] is not None
    assert (run_dir / "numpy" / "model.onnx").is_file() and (run_dir / "index.html").is_file()
    assert "SIGKILL" in (run_dir / "index.html").read_text()
    assert "worker killed by signal SIGKILL" in err
    numpy_started = json.loads((run_dir / "numpy" / "status.json").read_text())["started"]

    code, err = finish(start("run", "--resume", str(run_dir)))

    assert code == 0, err
    run = run_json(run_dir)
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
    process = start("run", "--backend", "pytorch", "--backend", "numpy", "--out", str(run_dir), "--epochs", "4", *TINY)
    status = wait_until(run_dir / "pytorch" / "status.json", process, training)
    process.send_signal(signal.SIGINT)
    code, err = finish(process, timeout=60)

    assert code == 130, err
    run = run_json(run_dir)
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
    code, err = finish(
        start(
            "run",
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
    assert run_json(run_dir)["backends"]["pytorch-wrong-bn"]["status"] == "completed"
