"""``numerics.deterministic`` for PyTorch: run-to-run identical numbers where torch can give them.

torch.use_deterministic_algorithms makes every op either deterministic or an error (never a silent
nondeterministic kernel); cuDNN is held to deterministic algorithms without autotuning; cuBLAS needs a
fixed workspace (CUBLAS_WORKSPACE_CONFIG, read when cuBLAS starts, so it is set here, before any GPU
work of the worker). On a CPU, torch's fp32 kernels are already deterministic for a fixed thread count.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from cxrbench.backend import BackendError, NumericsSettings

#: cuBLAS' documented deterministic workspace setting.
CUBLAS_WORKSPACE = ":4096:8"


def apply(numerics: NumericsSettings) -> None:
    """Switch determinism on or off for this process (after numerics.apply, which sets cudnn.benchmark)."""
    if numerics.deterministic and numerics.cudnn_benchmark:
        raise BackendError(
            "numerics.deterministic = true and numerics.cudnn_benchmark = true exclude each other: "
            "autotuning picks kernels by timing; switch one off"
        )
    if numerics.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(numerics.deterministic)
    torch.backends.cudnn.deterministic = numerics.deterministic


def describe() -> dict[str, Any]:
    """What is in force, read back from torch, for the numerics record."""
    return {
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "cudnn_deterministic": torch.backends.cudnn.deterministic,
        "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
    }
