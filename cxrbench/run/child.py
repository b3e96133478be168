"""Stopping a child process the run started (a worker, a side of the harness-overhead benchmark): politely first,
so a worker records "interrupted", then for good."""

from __future__ import annotations

import subprocess

#: Seconds a child gets to finish after SIGTERM before SIGKILL.
STOP_GRACE_S = 15.0


def stop_process(process: subprocess.Popen) -> None:
    """SIGTERM (a worker records "interrupted"), then SIGKILL after a grace period."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
