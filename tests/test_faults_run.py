"""Faults around a whole `cxrbench run`: a disk that fills up, killed processes, two runs into one folder,
a refused run, run.keep. (The fault-test family: tests/test_faults_in_process.py, this module,
tests/test_faults_workers.py; their shared child-process helpers: tests/helpers/cli_process.py.)

Each test runs `cxrbench run` as a subprocess with the example NumPy backend on a tiny DenseNet at 32 px
(seconds per run). Each asserts the exit status, a one-line message without a traceback, that no file
under a final name is partial, and that what was written before the fault is intact.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import psutil
import pytest

from cxrbench.deploy.onnx_file import check_model
from cxrbench.run import keep
from cxrbench.run.schema import validate
from helpers.cli_process import finish, last_line, read_status, start, training, wait_until
from helpers.tiny_run import TINY_RUN

TINY = ["--backend", "numpy", *TINY_RUN, "--monitor-interval", "0.2"]

pytestmark = [pytest.mark.slow, pytest.mark.backends("numpy")]


def _numpy_status(run_dir: Path) -> dict:
    return read_status(run_dir / "numpy" / "status.json")


def _wait_until(run_dir: Path, process, condition) -> dict:
    return wait_until(run_dir / "numpy" / "status.json", process, condition)


def _equivalence_done(status: dict) -> bool:
    return (status.get("stages") or {}).get("equivalence") == "done"


def _assert_no_partial_files(run_dir: Path) -> None:
    """Every file under a final name is whole: JSON parses, arrays load, ONNX passes the checker; no temporaries."""
    assert not [p for p in run_dir.rglob(".*") if p.is_file()], "temporary files were left behind"
    for path in run_dir.rglob("*"):
        if path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix in (".npz", ".npy"):
            np.load(path, allow_pickle=False)
        elif path.suffix == ".onnx":
            check_model(path)


def _fingerprints(paths: list[Path]) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in paths}


@contextmanager
def _tmpfs(folder: Path, size: str, options: str = ""):
    folder.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command here")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}{options}", "tmpfs", str(folder)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def _fill(folder: Path) -> Path:
    filler = folder / "filler"
    with open(filler, "wb") as handle:
        try:
            while True:
                handle.write(b"\0" * 65536)
                handle.flush()
        except OSError:
            pass
    return filler


def test_a_disk_that_fills_up_mid_run_is_one_line_keeps_results_and_resumes(tmp_path):
    with _tmpfs(tmp_path / "disk", "24m") as disk:
        run_dir = disk / "run"
        process = start("run", "--out", str(run_dir), "--epochs", "6", *TINY)
        _wait_until(run_dir, process, training)
        before = _fingerprints([run_dir / "shared_init.npz", run_dir / "numpy" / "equivalence.npz"])
        filler = _fill(disk)
        code, err = finish(process)

        assert code == 1, err
        line = last_line(err)
        assert line.startswith(f"cxrbench: error: {run_dir}/")
        assert (
            ": cannot write (no space left on the device: free space there or choose a folder on another disk); "
            f"results so far are kept: free space, then `cxrbench run --resume {run_dir}`" in line
        )
        _assert_no_partial_files(run_dir)
        assert _fingerprints(list(before)) == before

        filler.unlink()
        report = start("report", str(run_dir))
        assert finish(report)[0] == 0
        page = (run_dir / "index.html").read_text()
        assert "interrupted" in page  # run.json and status.json still say running: nobody holds the lock

        code, err = finish(start("run", "--resume", str(run_dir)))
        assert code == 0, err
        run = json.loads((run_dir / "run.json").read_text())
        validate(run)
        assert run["status"] == "completed" and run["backends"]["numpy"]["status"] == "completed"
        assert "[numpy] equivalence: already done, skipped" in (run_dir / "numpy" / "log.txt").read_text()
        assert _fingerprints(list(before)) == before
        _assert_no_partial_files(run_dir)


def test_a_read_only_run_folder_is_one_line_and_creates_nothing(tmp_path):
    with _tmpfs(tmp_path / "ro", "1m", ",ro") as read_only:
        code, err = finish(start("run", "--out", str(read_only / "run"), *TINY))
        assert code == 1
        expected = f"{read_only / 'run'}: cannot write (read-only file system: choose a writable folder)"
        assert last_line(err) == f"cxrbench: error: {expected}"
        assert list(read_only.iterdir()) == []


def test_a_refused_run_creates_no_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, err = finish(start("run", "--suite", "chestxray14", "--backend", "numpy"))
    assert code == 2
    assert last_line(err) == (
        "cxrbench: error: suite 'chestxray14': data.source = 'chestxray14' needs data.path (or --data DIR)"
    )
    code, err = finish(
        start(
            "run",
            "--suite",
            "chestxray14",
            "--backend",
            "numpy",
            "--data",
            str(tmp_path / "nowhere"),
            "--out",
            str(tmp_path / "run"),
        )
    )
    assert code == 2 and str(tmp_path / "nowhere") in last_line(err)
    assert list(tmp_path.iterdir()) == []


def test_a_killed_run_is_reported_interrupted_and_resumes_from_its_last_stage(tmp_path):
    run_dir = tmp_path / "run"
    process = start("run", "--out", str(run_dir), "--epochs", "6", *TINY)
    status = _wait_until(run_dir, process, _equivalence_done)
    os.kill(process.pid, signal.SIGKILL)  # the whole machine goes: the orchestrator and its worker at once
    os.kill(status["pid"], signal.SIGKILL)
    process.wait()
    while psutil.pid_exists(status["pid"]) and psutil.Process(status["pid"]).status() != psutil.STATUS_ZOMBIE:
        time.sleep(0.05)
    status = _numpy_status(run_dir)  # as the kill left it (the stage may have moved on since equivalence)
    assert status["status"] == "running"
    equivalence = _fingerprints([run_dir / "numpy" / "equivalence.npz"])

    code, err = finish(start("report", str(run_dir)))
    assert code == 0, err
    page = (run_dir / "index.html").read_text()
    assert "says running, but no cxrbench run holds" in page and "interrupted" in page

    # A kill in the middle of an atomic write leaves its temporary file (the one above sometimes does): one of the
    # backend's and one of the orchestrator's, as a SIGKILL leaves them.
    partial = [run_dir / "numpy" / ".history.json.k1113d.tmp.json", run_dir / ".run.json.k1113d.tmp.json"]
    for path in partial:
        path.write_text('{"epoch": ')
    code, err = finish(start("run", "--resume", str(run_dir)))
    assert code == 0, err
    assert "note: took over the lock" in err and "which is no longer running" in err
    for path in partial:
        assert f"note: removed {path}, a partial write its killed process left" in err
    assert (
        f"note: numpy was interrupted during stage {status['stage']} (process {status['pid']} is gone); "
        "resuming it from its last completed stage" in err
    )
    assert "[numpy] equivalence: already done, skipped" in (run_dir / "numpy" / "log.txt").read_text()
    run = json.loads((run_dir / "run.json").read_text())
    validate(run)
    assert run["status"] == "completed" and run["backends"]["numpy"]["status"] == "completed"
    assert _fingerprints(list(equivalence)) == equivalence  # written before the kill, not redone
    _assert_no_partial_files(run_dir)


def test_an_orphaned_worker_stops_itself_and_the_run_resumes(tmp_path):
    run_dir = tmp_path / "run"
    process = start("run", "--out", str(run_dir), "--epochs", "8", *TINY)
    status = _wait_until(run_dir, process, training)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()

    gone, alive = psutil.wait_procs([psutil.Process(status["pid"])], timeout=15)
    assert not alive, "the worker outlived its orchestrator"
    recorded = _numpy_status(run_dir)
    assert recorded["status"] == "interrupted"
    assert recorded["error"] == f"the cxrbench run that started this worker (pid {process.pid}) is gone"

    code, err = finish(start("run", "--resume", str(run_dir)), timeout=400)
    assert code == 0, err
    assert json.loads((run_dir / "run.json").read_text())["status"] == "completed"


def test_two_runs_into_one_folder_the_second_is_refused(tmp_path):
    run_dir = tmp_path / "run"
    first = start("run", "--out", str(run_dir), "--epochs", "4", *TINY)
    status = _wait_until(run_dir, first, training)

    code, err = finish(start("run", "--resume", str(run_dir)))
    assert code == 2
    refusal = f"cxrbench: error: {run_dir}: another cxrbench run is writing into this folder (pid {first.pid} on "
    assert last_line(err).startswith(refusal)
    code, err = finish(start("run", "--out", str(run_dir), *TINY))
    assert code == 2
    assert (
        last_line(err) == f"cxrbench: error: {run_dir}: already holds a run "
        f"(use --resume {run_dir} to finish it, or another --out)"
    )

    code, err = finish(first)
    assert code == 0, err
    assert _numpy_status(run_dir)["pid"] == status["pid"]  # nobody else wrote into the folder
    run = json.loads((run_dir / "run.json").read_text())
    assert run["status"] == "completed" and "resumed" not in run
    _assert_no_partial_files(run_dir)


def test_keep_values_and_the_folder_sizes_they_leave(tmp_path, capsys):
    sizes = {}
    for value in ("all", "results", "minimal"):
        run_dir = tmp_path / value
        code, err = finish(start("run", "--out", str(run_dir), "--set", f"run.keep={value}", *TINY))
        assert code == 0, err
        run = json.loads((run_dir / "run.json").read_text())
        validate(run)
        assert run["kept"]["keep"] == value
        sizes[value] = keep.folder_bytes(run_dir)
        assert f"run.keep = {value}: the folder keeps" in (run_dir / "index.html").read_text()
        onnx = sorted(p.name for p in run_dir.rglob("*.onnx"))
        assert onnx == {"all": ["init.onnx", "model.onnx"], "results": ["model.onnx"], "minimal": []}[value]
        assert (run_dir / "numpy" / "metrics.json").is_file() and (run_dir / "comparison.json").is_file()
    assert sizes["all"] > sizes["results"] > sizes["minimal"]
    with capsys.disabled():
        print(f"\nrun folder bytes by run.keep (densenet-tiny, 32 px, 120 images): {sizes}")
    shutil.rmtree(tmp_path / "all")


def test_a_run_that_fails_after_its_folder_exists_says_failed_with_its_error(tmp_path):
    data = tmp_path / "data"
    assert finish(start("data", "synth", "--out", str(data), "--images", "60", "--size", "64"))[0] == 0
    broken = sorted((data / "images").glob("*.png"))[7]
    broken.write_bytes(broken.read_bytes()[:100])  # an interrupted copy: found when the cache decodes it
    run_dir = tmp_path / "run"

    code, err = finish(start("run", "--out", str(run_dir), "--data", str(data), *TINY))

    assert code == 2
    line = last_line(err)
    assert line.startswith("cxrbench: error: ") and broken.name in line
    run = json.loads((run_dir / "run.json").read_text())
    validate(run)
    assert run["status"] == "failed" and run["error"] == line.removeprefix("cxrbench: error: ") and run["finished"]
    assert not (run_dir / "run.lock").exists()


def test_a_disk_too_small_for_the_weights_is_refused_before_writing_them(tmp_path):
    with _tmpfs(tmp_path / "small", "10m") as disk:
        run_dir = disk / "run"
        code, err = finish(start("run", "--out", str(run_dir), *TINY))

        assert code == 1
        line = last_line(err)
        assert line.startswith(f"cxrbench: error: {run_dir}: the weights file shared_init.npz needs ")
        assert " bytes are free there: free space or choose a folder on another disk; results so far are kept" in line
        assert sorted(p.name for p in run_dir.iterdir()) == ["run.json"]
        run = json.loads((run_dir / "run.json").read_text())
        assert run["status"] == "failed" and run["error"] in line
