"""The child processes a run starts (workers, the sides of the harness-overhead benchmark): their environment, how
they start, and how they stop: politely first, so a worker records "interrupted", then for good."""

from __future__ import annotations

import os
import subprocess
from typing import IO, Any

from cxrbench.machine import devices

#: Seconds a child gets to finish after SIGTERM before SIGKILL.
STOP_GRACE_S = 15.0


def worker_env() -> dict[str, str]:
    """This process's environment with the workers' device order, output unbuffered (a log shows a crash's last
    line)."""
    return {**os.environ, **devices.WORKER_ENV, "PYTHONUNBUFFERED": "1"}


def start_process(command: list[str], output: IO[str], **popen: Any) -> subprocess.Popen:
    """``command`` with stdout and stderr to ``output``, unbuffered, in the workers' environment and in a session of its
    own: a Ctrl-C at the terminal reaches the run, which then stops the child with :func:`stop_process`."""
    return subprocess.Popen(
        command, stdout=output, stderr=subprocess.STDOUT, start_new_session=True, env=worker_env(), **popen
    )


def stop_process(process: subprocess.Popen) -> None:
    """SIGTERM (a worker records "interrupted"), then SIGKILL after a grace period."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
