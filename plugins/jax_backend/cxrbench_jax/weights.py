"""Canonical weights <-> the Flax variables of :class:`cxrbench_jax.network.DenseNet`.

A rename plus two transposes, both exact: conv kernels O,I,H,W <-> H,W,I,O and the classifier out,in <-> in,out.
BatchNorm weight/bias are the ``params`` scale/bias; running mean/var are the ``batch_stats`` mean/var.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from cxrbench.backend import canonical
from cxrbench_jax.network import module_name

Variables = dict[str, dict[str, dict[str, Any]]]  #: {"params": {...}, "batch_stats": {...}}

#: canonical BatchNorm part -> (Flax collection, variable)
BN_PARTS = {
    "weight": ("params", "scale"),
    "bias": ("params", "bias"),
    "running_mean": ("batch_stats", "mean"),
    "running_var": ("batch_stats", "var"),
}


def _place(name: str, shape: tuple[int, ...]) -> tuple[str, str, str, tuple[int, ...] | None]:
    """(collection, module, variable, transpose) of a canonical tensor."""
    prefix, part = name.rsplit(".", 1)
    module = module_name(prefix)
    if len(shape) == 4:
        return "params", module, "kernel", (2, 3, 1, 0)
    if prefix == "classifier":
        return "params", module, "kernel" if part == "weight" else "bias", (1, 0) if part == "weight" else None
    collection, variable = BN_PARTS[part]
    return collection, module, variable, None


def to_variables(
    weights: Mapping[str, np.ndarray], block_config: tuple[int, ...], origin: str = "weights"
) -> Variables:
    """Validated canonical weights as host Flax variables (float32 copies, never aliasing the input)."""
    canonical.validate(weights, block_config, origin)
    variables: Variables = {"params": {}, "batch_stats": {}}
    for name, shape in canonical.densenet_spec(block_config).items():
        collection, module, variable, axes = _place(name, shape)
        value = _copy(np.asarray(weights[name], dtype=np.float32), axes)
        variables[collection].setdefault(module, {})[variable] = value
    return variables


def from_variables(variables: Variables, block_config: tuple[int, ...]) -> dict[str, np.ndarray]:
    """Flax variables (device or host arrays) as canonical float32 arrays in the spec's order."""
    out = {}
    for name, shape in canonical.densenet_spec(block_config).items():
        collection, module, variable, axes = _place(name, shape)
        value = np.asarray(variables[collection][module][variable], dtype=np.float32)
        out[name] = _copy(value, tuple(int(a) for a in np.argsort(axes)) if axes else None)
    return out


def _copy(value: np.ndarray, axes: tuple[int, ...] | None) -> np.ndarray:
    """A C-contiguous float32 copy, transposed by ``axes``: never a view of a buffer XLA may donate or reuse."""
    return np.array(value.transpose(axes) if axes else value, dtype=np.float32, order="C", copy=True)
