"""`cxrbench` as a child process, for the tests that fault a whole run (tests/test_faults_*.py).

A run is started, watched through its status files, disturbed (killed, interrupted, starved of disk) and finished;
every test then reads the exit status, the last line of stderr and the run folder.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from cxrbench.run.schema import validate

TESTS = Path(__file__).resolve().parents[1]


def start(*args: str) -> subprocess.Popen:
    """``python -m cxrbench ARGS`` with tests/ importable (``--plugin plugins_wrong.*`` lives there)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen(
        [sys.executable, "-m", "cxrbench", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def finish(process: subprocess.Popen, timeout: float = 240) -> tuple[int, str]:
    """Exit status and stderr, once the process ends."""
    _, err = process.communicate(timeout=timeout)
    return process.returncode, err


def read_status(path: Path) -> dict:
    """A backend's status.json, or {} while it does not exist or is being replaced."""
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def wait_until(
    status_path: Path, process: subprocess.Popen, condition: Callable[[dict], bool], timeout: float = 180
) -> dict:
    """The backend's status once ``condition`` holds for it; fails if the run ends first or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"run ended early: {process.communicate()[1]}"
        status = read_status(status_path)
        if condition(status):
            return status
        time.sleep(0.02)
    raise AssertionError(f"the run did not get there in {timeout:.0f} s ({status_path})")


def training(status: dict) -> bool:
    """The worker has started its first epoch."""
    return status.get("stage") == "train" and bool((status.get("progress") or {}).get("epoch"))


def last_line(err: str) -> str:
    """The last line of stderr, which must come without a traceback."""
    assert "Traceback" not in err, err
    return err.strip().splitlines()[-1]


def run_json(run_dir: Path) -> dict:
    """run.json, validated against the schema."""
    run = json.loads((run_dir / "run.json").read_text())
    validate(run, run_dir / "run.json")
    return run
