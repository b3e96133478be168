"""A test plugin (``--plugin helpers.hold_training``): while the file named by ``CXRBENCH_TEST_HOLD`` exists, every
worker waits before it trains (at most ``HOLD_LIMIT_S``). The fan-out test cancels a Slurm job while its first
backend surely runs, however fast the tiny training is, then removes the file to let the other cells go."""

import os
import time
from pathlib import Path

from cxrbench.hookspecs import hookimpl

HOLD_LIMIT_S = 300


@hookimpl(wrapper=True)
def cxrbench_train(model, data, settings, recorder):
    hold = os.environ.get("CXRBENCH_TEST_HOLD")
    deadline = time.monotonic() + HOLD_LIMIT_S
    while hold and Path(hold).exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    return (yield)
