"""Canonical (torchvision-named) weights <-> keras.applications DenseNet layers.

Keras names its layers ``conv{b}_block{k}_0_bn`` etc.; torchvision names the same tensors
``features.denseblock{b-1}.denselayer{k}.norm1``. Conv kernels are (H, W, I, O) in Keras and
(O, I, H, W) in torch; Dense kernels are (in, out) in Keras and (out, in) in torch. Transposes are
exact, so a get/set round trip is bitwise.
"""

from __future__ import annotations

import re

import numpy as np

from cxrbench.backend import canonical

#: Keras layer name pattern -> (canonical prefix template, kind); groups are Keras' 1-based numbers.
_PATTERNS = (
    (r"conv1_conv", "features.conv0", "conv"),
    (r"conv1_bn", "features.norm0", "bn"),
    (r"conv(\d+)_block(\d+)_0_bn", "features.denseblock{b}.denselayer{k}.norm1", "bn"),
    (r"conv(\d+)_block(\d+)_1_conv", "features.denseblock{b}.denselayer{k}.conv1", "conv"),
    (r"conv(\d+)_block(\d+)_1_bn", "features.denseblock{b}.denselayer{k}.norm2", "bn"),
    (r"conv(\d+)_block(\d+)_2_conv", "features.denseblock{b}.denselayer{k}.conv2", "conv"),
    (r"pool(\d+)_bn", "features.transition{b}.norm", "bn"),
    (r"pool(\d+)_conv", "features.transition{b}.conv", "conv"),
    (r"bn", "features.norm5", "bn"),
    (r"classifier", "classifier", "dense"),
)
#: Keras' dense blocks and transitions are numbered from 2 (conv2, pool2); torchvision's from 1.
_KERAS_OFFSET = 1


def canonical_prefix(layer_name: str) -> tuple[str, str] | None:
    """``(torchvision module name, kind)`` of a Keras layer, or None for a name not in the map."""
    for pattern, template, kind in _PATTERNS:
        match = re.fullmatch(pattern, layer_name)
        if match:
            numbers = [int(g) for g in match.groups()]
            b = numbers[0] - _KERAS_OFFSET if numbers else None
            k = numbers[1] if len(numbers) > 1 else None
            return template.format(b=b, k=k), kind
    return None


def to_canonical(kind: str, arrays: list[np.ndarray]) -> dict[str, np.ndarray]:
    if kind == "conv":
        return {"weight": arrays[0].transpose(3, 2, 0, 1)}
    if kind == "dense":
        return {"weight": arrays[0].T, "bias": arrays[1]}
    return dict(zip(canonical.BN_PARTS, arrays))  # gamma, beta, moving_mean, moving_variance


def from_canonical(kind: str, prefix: str, weights) -> list[np.ndarray]:
    if kind == "conv":
        return [weights[f"{prefix}.weight"].transpose(2, 3, 1, 0)]
    if kind == "dense":
        return [weights[f"{prefix}.weight"].T, weights[f"{prefix}.bias"]]
    return [weights[f"{prefix}.{part}"] for part in canonical.BN_PARTS]


def _mapped_layers(network):
    """``(layer, canonical prefix, kind)`` for every layer that holds weights."""
    for layer in network.layers:
        if not layer.weights:
            continue
        mapped = canonical_prefix(layer.name)
        if mapped is None:
            raise ValueError(f"Keras layer {layer.name!r} has weights but no canonical name")
        yield layer, *mapped


def get_weights(network) -> dict[str, np.ndarray]:
    """The network's weights as a canonical dict (float32, torchvision order and layout)."""
    out: dict[str, np.ndarray] = {}
    for layer, prefix, kind in _mapped_layers(network):
        for part, value in to_canonical(kind, layer.get_weights()).items():
            out[f"{prefix}.{part}"] = np.ascontiguousarray(value, dtype=np.float32)
    return out


def set_weights(network, weights, block_config: tuple[int, ...], origin: str = "weights") -> None:
    """Load a canonical dict; a missing or misshapen tensor raises WeightsError naming it."""
    canonical.validate(weights, block_config, origin)
    for layer, prefix, kind in _mapped_layers(network):
        layer.set_weights([np.asarray(a, dtype=np.float32) for a in from_canonical(kind, prefix, weights)])
