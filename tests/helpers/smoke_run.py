"""The smoke suite end to end, run once per test session: the `smoke_run` fixture (tests/conftest.py) behind it.

Every test that reads a whole real run's results (run.json, the backends' files, comparison.json) reads this one
run instead of training its own: it is the longest thing the tests do (a few minutes on 2 CPU cores).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

#: The backends the smoke run trains; a test using the fixture needs them (conftest.py marks it so).
SMOKE_BACKENDS = ("pytorch", "keras")


class SmokeRun(NamedTuple):
    folder: Path  #: the run folder
    run: dict  #: its run.json


def run_smoke_suite(out: Path) -> SmokeRun:
    """`cxrbench run` of the smoke suite with :data:`SMOKE_BACKENDS` into ``out``; fails the caller if it fails."""
    start = time.monotonic()
    command = [sys.executable, "-m", "cxrbench", "run", "--out", str(out)]
    for name in SMOKE_BACKENDS:
        command += ["--backend", name]
    result = subprocess.run(command, capture_output=True, text=True, timeout=1800)  # a guard against a hang
    wall = time.monotonic() - start
    assert result.returncode == 0, result.stderr[-5000:]
    run = json.loads((out / "run.json").read_text())
    stages = {name: run["backends"][name].get("stage_seconds") for name in SMOKE_BACKENDS}
    print(f"\nsmoke run with {', '.join(SMOKE_BACKENDS)}: wall time {wall:.1f} s; stage seconds {json.dumps(stages)}")
    print(result.stderr[-3000:])
    return SmokeRun(out, run)
