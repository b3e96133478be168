"""A process target that only waits: a stand-in for a DDP rank blocked in a collective."""

import time


def wait(rank: int, seconds: float) -> None:
    time.sleep(seconds)
