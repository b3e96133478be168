"""``numerics.deterministic`` for TensorFlow/Keras: the switches TensorFlow offers for run-to-run identical numbers.

Two switches, in two moments, and thread counts that every run pins already:

* ``TF_ENABLE_ONEDNN_OPTS=0`` is read once, when TensorFlow is imported, so :func:`prepare_environment`
  runs before the first TensorFlow import of the worker (in the build hook); when TensorFlow is already
  loaded (a second model in one process, a test session) it cannot apply, and :func:`describe` says
  which setting is really in force.
* op determinism (``enable_op_determinism``): every op either runs a deterministic kernel or raises
  instead of running a nondeterministic one; it also seeds nothing by itself (the model is seeded).
* fixed thread counts: Keras' numbers on a CPU change with the thread count (the kernels split their
  reductions by thread), so every run pins both pools to the core's thread budget (:mod:`cxrbench.machine.budget`,
  applied in :mod:`cxrbench_keras.numerics`) and the numerics record reads them back.

None of this is a guarantee on a CPU: measured on 2 cores (smoke data, 20 steps), 4 of 5 default runs
gave identical weights, and two deterministic runs still differed from each other while training at
0.38x the speed. The setting is recorded with the result; ``--repeats`` measures the spread.

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


def apply(numerics) -> None:
    """Op determinism on or off for this process (TensorFlow's switch is process-wide)."""
    from tensorflow.python.framework import config

    if numerics.deterministic:
        config.enable_op_determinism()
    else:
        config.disable_op_determinism()


def op_determinism() -> bool:
    """Whether TensorFlow's op determinism is in force, read back."""
    from tensorflow.python.framework import config

    return config.is_op_determinism_enabled()


def describe() -> dict[str, Any]:
    """What is in force, for the numerics record: op determinism read back, oneDNN as TensorFlow saw it."""
    onednn = os.environ.get(ONEDNN_VARIABLE)
    return {
        "op_determinism": op_determinism(),
        "onednn_opts": "off" if onednn == "0" else "on (TensorFlow's default)" if onednn is None else onednn,
    }
