"""The CPU thread budget every backend gets, resolved once here so that frameworks compete on equal terms.

Left to themselves the frameworks size their pools differently (PyTorch from the cores it sees,
TensorFlow from its own defaults), and neither respects a CPU affinity mask everywhere, which
oversubscribes a container limited to fewer cores than the host has. The default is the usable
cores of this process for both the intra-op and the inter-op pool; ``numerics.intra_op_threads``
and ``numerics.inter_op_threads`` override it for every backend alike. Each backend applies the
budget in its numerics module and records what its framework actually runs.
"""

from __future__ import annotations

import os
from typing import Any


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def thread_budget(numerics: Any, processes: int = 1) -> dict[str, int]:
    """Intra-op and inter-op threads per process; ``processes`` > 1 (CPU data parallelism) splits the cores."""
    share = max(1, usable_cores() // max(1, processes))
    return {"intra_op": numerics.intra_op_threads or share, "inter_op": numerics.inter_op_threads or share}
