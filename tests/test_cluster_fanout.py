"""Cells fanned out through submitit: a real one-node Slurm (``.ci/slurm.sh`` starts it; the test says why it skips
when Slurm does not answer), submitit's local executor, and the one-line refusals.

With Slurm: a 2x2 sweep of the numpy and PyTorch backends goes out as one job array of five cells (the main cell and
four sweep points), one at a time (``--array-parallelism 1``); the running first cell is cancelled with ``scancel``
and shows as failed, naming the job's state, while the other cells complete; ``--resume`` submits that cell alone and
the run completes and reports.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from cxrbench.cli import main
from cxrbench.run import cluster
from cxrbench.run.folder import LOG_TXT, RUN_JSON, STATUS_JSON
from helpers.tiny_run import TINY_RUN

#: Seconds a whole fan-out may take before the test stops it and fails.
RUN_LIMIT_S = 600
SWEEP = ["--sweep", "train.batch_size=2,4", "--sweep", "train.learning_rate=0.001,0.002"]
SPEED_ONLY = [*TINY_RUN, "--max-steps", "3", "--set", "train.warmup_steps=1", "--set", "train.window_steps=1",
              "--set", 'run.stages=["train"]', "--set", "run.keep=minimal"]  # fmt: skip
POINTS = (
    "train.batch_size-2__train.learning_rate-0.001",
    "train.batch_size-2__train.learning_rate-0.002",
    "train.batch_size-4__train.learning_rate-0.001",
    "train.batch_size-4__train.learning_rate-0.002",
)


def cxrbench(*args: str, wait: bool = True, env: dict[str, str] | None = None):
    command = [sys.executable, "-m", "cxrbench", "run", *args]
    env = {**os.environ, **(env or {})}
    if not wait:
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    return subprocess.run(command, capture_output=True, text=True, timeout=RUN_LIMIT_S, env=env)


def slurm_answers() -> str | None:
    """Why Slurm cannot take jobs here, or None when it can (sinfo shows a node up and accounting answers)."""
    if shutil.which("sbatch") is None:
        return "no sbatch on PATH: start Slurm with `bash .ci/slurm.sh` (as root)"
    try:
        state = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=10).stdout
        accounting = subprocess.run(["sacct", "-n"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"Slurm does not answer ({exc}): `bash .ci/slurm.sh`"
    if not any(s.strip() in ("idle", "mix", "alloc") for s in state.splitlines()):
        return f"no Slurm node is up (sinfo: {state.strip() or 'nothing'}): `bash .ci/slurm.sh`"
    if accounting.returncode != 0:
        return f"Slurm has no job accounting, which submitit reads ({accounting.stdout.strip()}): `bash .ci/slurm.sh`"
    return None


def cell_status(run: dict, point: str, backend: str) -> dict:
    return next(c for c in run["sweep"]["cells"] if c["point"] == point and c["backend"] == backend)


def job_of(folder: Path) -> str:
    """The job a worker ran in, from the line the job wrote at the top of its log."""
    (line,) = [line for line in (folder / LOG_TXT).read_text().splitlines() if line.startswith("=== cxrbench worker")]
    return line.rsplit(" in job ", 1)[1]


@pytest.mark.serial
@pytest.mark.slurm
@pytest.mark.backends("numpy", "pytorch")
def test_a_sweep_as_a_slurm_job_array_cancel_and_resume(tmp_path):
    reason = slurm_answers()
    if reason:
        pytest.skip(reason)
    out = tmp_path / "run"
    args = ["--executor", "slurm", "--array-parallelism", "1", "--job-time-min", "10", "--out", str(out)]
    # Workers wait before training while the hold file exists (tests/helpers/hold_training.py), so the job is
    # cancelled while its first backend surely runs; Slurm's jobs inherit this environment.
    hold = tmp_path / "hold"
    hold.touch()
    tests = str(Path(__file__).parent)
    env = {"CXRBENCH_TEST_HOLD": str(hold), "PYTHONPATH": os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")])}
    started = time.monotonic()
    backends = ["--backend", "numpy", "--backend", "pytorch", "--plugin", "helpers.hold_training"]
    process = cxrbench(*args, *backends, *SPEED_ONLY, *SWEEP, wait=False, env=env)
    deadline = time.monotonic() + 120
    while not ((out / RUN_JSON).exists() and json.loads((out / RUN_JSON).read_text())["executor"]["jobs"]):
        assert process.poll() is None and time.monotonic() < deadline, process.stdout.read() if process.poll() else ""
        time.sleep(0.5)
    jobs = json.loads((out / RUN_JSON).read_text())["executor"]["jobs"]
    assert list(jobs) == ["main", *(f"sweep-{p}" for p in POINTS)]  # one job per cell, one array
    assert len({job.split("_")[0] for [job] in jobs.values()}) == 1
    # Cancel the first cell's job while it runs (one cell at a time: the others wait behind it). A pending array
    # task cancelled before it starts leaves no accounting record in Slurm 22.05, so submitit could not see it end.
    (cancelled,) = jobs["main"]
    status = out / "numpy" / STATUS_JSON
    while not (status.exists() and json.loads(status.read_text())["status"] == "running"):
        assert process.poll() is None and time.monotonic() < deadline + RUN_LIMIT_S, "the first cell never started"
        time.sleep(0.5)
    subprocess.run(["scancel", cancelled], check=True, timeout=30)
    # The hold stays until the cancel has reached the held worker (scancel returns before Slurm signals the job):
    # released at once, the tiny training could end first and the cell would complete despite the cancel.
    worker = json.loads(status.read_text())["pid"]
    while json.loads(status.read_text())["status"] == "running" and psutil.pid_exists(worker):
        assert time.monotonic() < deadline + RUN_LIMIT_S, "the cancel never reached the first cell's worker"
        time.sleep(0.2)
    hold.unlink()  # the other cells train at once
    output, _ = process.communicate(timeout=RUN_LIMIT_S)
    print(f"first submission: {time.monotonic() - started:.0f} s\n{output[-1500:]}")
    assert process.returncode == 1, output[-3000:]

    run = json.loads((out / RUN_JSON).read_text())
    for backend in ("numpy", "pytorch"):
        failed = run["backends"][backend]
        assert failed["status"] == "failed" and f"slurm job {cancelled} ended CANCELLED" in failed["error"]
        for point in POINTS:
            assert cell_status(run, point, backend)["status"] == "completed"
    for point in POINTS:  # the backends of a cell ran in its one job, one after the other
        folders = [out / "sweep" / point / backend for backend in ("numpy", "pytorch")]
        assert job_of(folders[0]) == job_of(folders[1])
        first, second = (json.loads((f / STATUS_JSON).read_text()) for f in folders)
        assert first["finished"] <= second["started"]

    resumed = cxrbench("--resume", str(out), env=env)
    print(f"resume: {resumed.stderr[-800:]}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    run = json.loads((out / RUN_JSON).read_text())
    assert {cell: len(ids) for cell, ids in run["executor"]["jobs"].items()} == {
        "main": 2,  # only the cancelled cell went out again
        **{f"sweep-{p}": 1 for p in POINTS},
    }
    assert all(c["status"] == "completed" for c in run["sweep"]["cells"])
    assert run["status"] == "completed" and (out / "index.html").is_file() and (out / "sweep.csv").is_file()


@pytest.mark.serial
@pytest.mark.backends("numpy")
def test_submitits_local_executor_runs_every_cell_and_merges(tmp_path):
    out = tmp_path / "run"
    done = cxrbench("--executor", "local", "--out", str(out), "--backend", "numpy", *SPEED_ONLY, *SWEEP)
    assert done.returncode == 0, done.stderr[-3000:]
    run = json.loads((out / RUN_JSON).read_text())
    assert run["executor"]["kind"] == "local" and len(run["executor"]["jobs"]) == 5
    assert [c["status"] for c in run["sweep"]["cells"]] == ["completed"] * 4
    assert all(c["first_step_s"] is not None for c in run["sweep"]["cells"])  # each cell trained, timed
    assert (out / "index.html").is_file()


# -- one-line refusals, before anything is written ---------------------------------------------------------


def refused(capsys, tmp_path, *args: str) -> str:
    out = tmp_path / "refused"
    assert main(["run", "--out", str(out), "--backend", "numpy", *TINY_RUN, *args]) == 2
    assert not out.exists()
    (line,) = capsys.readouterr().err.strip().splitlines()
    return line


@pytest.mark.backends("numpy")
def test_several_machines_without_an_executor_are_refused(capsys, tmp_path):
    line = refused(capsys, tmp_path, "--set", "run.nodes=2")
    assert "run.nodes = 2: ranks on several machines start through --executor slurm" in line


@pytest.mark.backends("numpy")
def test_executor_slurm_without_sbatch_is_refused(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here
    line = refused(capsys, tmp_path, "--executor", "slurm")
    assert line.endswith(
        "--executor slurm: sbatch is not on PATH: run cxrbench where Slurm's commands are (a login node)"
    )


@pytest.mark.backends("numpy")
def test_executor_without_submitit_is_refused(capsys, tmp_path, monkeypatch):
    real = cluster.importlib.util.find_spec
    monkeypatch.setattr(
        cluster.importlib.util, "find_spec", lambda name, *a: None if name == "submitit" else real(name, *a)
    )
    line = refused(capsys, tmp_path, "--executor", "local")
    assert line.endswith("--executor local needs submitit: pip install -e '.[cluster]'")


@pytest.mark.backends("numpy")
def test_executor_local_over_several_machines_is_refused(capsys, tmp_path):
    line = refused(capsys, tmp_path, "--executor", "local", "--set", "run.nodes=2")
    assert line.endswith("--executor local runs cells on this machine: run.nodes = 2 needs --executor slurm")


def test_a_run_folder_in_memory_is_refused_for_slurm(tmp_path, monkeypatch):
    if cluster.file_system_type(Path("/dev/shm")) != "tmpfs":
        pytest.skip("/dev/shm is not a tmpfs here")
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "sbatch").write_text("#!/bin/sh\nexit 1\n")  # present on PATH, never called
    (fake / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{os.environ['PATH']}")
    executor = cluster.executor_record("slurm", None, None, [])
    with pytest.raises(cluster.CxrError, match=r"^/dev/shm/run: on tmpfs, a file system in this machine's memory"):
        cluster.check_executor(executor, Path("/dev/shm/run"), nodes=1)


def test_executor_options_are_checked():
    with pytest.raises(cluster.CxrError, match="--array-parallelism 0: must be a whole number >= 1"):
        cluster.executor_record("slurm", 0, None, [])
    with pytest.raises(cluster.CxrError, match="--slurm 'partition': expected KEY=VALUE"):
        cluster.executor_record("slurm", None, None, ["partition"])
    record = cluster.executor_record("slurm", 4, 30, ["partition=gpu", "cpus_per_task=64"])
    parameters = cluster._parameters(Path("/shared/run"), record, nodes=2, gpus=8)
    assert parameters == {
        "name": "cxrbench-run",
        "timeout_min": 30,
        "nodes": 2,
        "tasks_per_node": 1,
        "gpus_per_node": 8,
        "slurm_exclusive": True,
        "slurm_array_parallelism": 4,
        "slurm_partition": "gpu",
        "slurm_cpus_per_task": 64,
    }
