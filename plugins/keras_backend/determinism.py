"""``numerics.deterministic`` for TensorFlow/Keras: run-to-run identical numbers where TensorFlow can give them.

Two switches, in two moments:

* ``TF_ENABLE_ONEDNN_OPTS=0`` is read once, when TensorFlow is imported, so :func:`prepare_environment`
  runs before the first TensorFlow import of the worker (in the build hook); when TensorFlow is already
  loaded (a second model in one process, a test session) it cannot apply, and :func:`describe` says
  which setting is really in force.
* op determinism (``enable_op_determinism``): every op either runs a deterministic kernel or raises
  instead of running a nondeterministic one; it also seeds nothing by itself (the model is seeded).
* fixed thread counts: measured on a 2-core CPU (issue 10), Keras training is bit-identical run to run at
  one thread count, with oneDNN on or off, but its numbers change with the count (the kernels split their
  reductions by thread). TensorFlow's default count is the number of CPUs the process may use, which
  differs between machines, containers and CPU affinities; so the counts are pinned (to
  ``numerics.intra_op_threads`` / ``inter_op_threads``, else to that CPU count) and recorded.

This module imports no TensorFlow at import time, so :func:`prepare_environment` can run first.
"""

from __future__ import annotations

import os
import sys
from typing import Any

ONEDNN_VARIABLE = "TF_ENABLE_ONEDNN_OPTS"


def prepare_environment(numerics) -> None:
    """Turn oneDNN's custom ops off for a deterministic run, if TensorFlow has not been imported yet."""
    if numerics.deterministic and "tensorflow" not in sys.modules:
        os.environ[ONEDNN_VARIABLE] = "0"


def schedulable_cpus() -> int:
    """The CPUs this process may run on: TensorFlow's default thread count."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def apply(numerics) -> None:
    """Op determinism on or off for this process (TensorFlow's switch is process-wide); deterministic runs
    also pin both thread pools, which TensorFlow allows only before its runtime starts (later, the counts
    in force are what :func:`describe` records)."""
    import tensorflow as tf
    from tensorflow.python.framework import config

    if not numerics.deterministic:
        config.disable_op_determinism()
        return
    config.enable_op_determinism()
    threading = tf.config.threading
    for setter, count in ((threading.set_intra_op_parallelism_threads, numerics.intra_op_threads),
                          (threading.set_inter_op_parallelism_threads, numerics.inter_op_threads)):
        try:
            setter(count or schedulable_cpus())
        except RuntimeError:
            pass


def describe(numerics) -> dict[str, Any]:
    """What is in force, for the numerics record: op determinism read back, oneDNN as TensorFlow saw it."""
    import tensorflow as tf
    from tensorflow.python.framework import config

    onednn = os.environ.get(ONEDNN_VARIABLE)
    threading = tf.config.threading
    return {
        "deterministic": numerics.deterministic,
        "op_determinism": config.is_op_determinism_enabled(),
        "onednn_opts": "off" if onednn == "0" else "on (TensorFlow's default)" if onednn is None else onednn,
        "threads_in_force": {"intra_op": threading.get_intra_op_parallelism_threads() or schedulable_cpus(),
                             "inter_op": threading.get_inter_op_parallelism_threads() or schedulable_cpus()},
    }
