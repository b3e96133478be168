"""A DenseNet-BC forward pass in plain numpy, eval mode, on canonical weights.

The canonical weight dict (torchvision's ``state_dict`` names and layouts) *is* the model: every
layer below reads its tensors by name, so there is nothing to convert and a get/set round trip is
trivially exact. Everything is float32, like the frameworks' default precision.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from cxrbench.backend import canonical, normalise

Weights = Mapping[str, np.ndarray]


def conv2d(x: np.ndarray, kernel: np.ndarray, stride: int = 1, pad: int = 0) -> np.ndarray:
    """Cross-correlation like ``torch.nn.Conv2d(bias=False)``: im2col by a strided view, then one matmul."""
    if pad:
        x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    kh, kw = kernel.shape[2:]
    windows = sliding_window_view(x, (kh, kw), axis=(2, 3))[:, :, ::stride, ::stride]  # N,C,H,W,kh,kw
    out = np.tensordot(windows, kernel, axes=([1, 4, 5], [1, 2, 3]))  # N,H,W,O
    return np.ascontiguousarray(out.transpose(0, 3, 1, 2))


def batch_norm(x: np.ndarray, weights: Weights, prefix: str) -> np.ndarray:
    """Eval-mode BatchNorm with the running statistics."""
    scale = weights[f"{prefix}.weight"] / np.sqrt(weights[f"{prefix}.running_var"] + np.float32(canonical.BN_EPSILON))
    shift = weights[f"{prefix}.bias"] - weights[f"{prefix}.running_mean"] * scale
    return x * scale[:, None, None] + shift[:, None, None]


def relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, np.float32(0))


def max_pool_3x3_s2(x: np.ndarray) -> np.ndarray:
    """``MaxPool2d(3, stride=2, padding=1)``: padding never wins the max."""
    x = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=-np.inf)
    return sliding_window_view(x, (3, 3), axis=(2, 3))[:, :, ::2, ::2].max(axis=(4, 5))


def avg_pool_2x2(x: np.ndarray) -> np.ndarray:
    """``AvgPool2d(2, stride=2)``: an odd last row or column is dropped (floor mode)."""
    n, c, h, w = x.shape
    x = x[:, :, : h - h % 2, : w - w % 2]
    return x.reshape(n, c, h // 2, 2, w // 2, 2).mean(axis=(3, 5))


def dense_layer(x: np.ndarray, weights: Weights, prefix: str) -> np.ndarray:
    """BN-ReLU-conv1x1-BN-ReLU-conv3x3, its new channels appended after the input's."""
    y = conv2d(relu(batch_norm(x, weights, f"{prefix}.norm1")), weights[f"{prefix}.conv1.weight"])
    y = conv2d(relu(batch_norm(y, weights, f"{prefix}.norm2")), weights[f"{prefix}.conv2.weight"], pad=1)
    return np.concatenate([x, y], axis=1)


def transition(x: np.ndarray, weights: Weights, prefix: str) -> np.ndarray:
    y = conv2d(relu(batch_norm(x, weights, f"{prefix}.norm")), weights[f"{prefix}.conv.weight"])
    return avg_pool_2x2(y)


def feature_map(weights: Weights, block_config: tuple[int, ...], x: np.ndarray) -> np.ndarray:
    """The final feature map F (after the last BatchNorm *and* ReLU) for normalised NCHW input."""
    x = conv2d(x, weights["features.conv0.weight"], stride=2, pad=3)
    x = max_pool_3x3_s2(relu(batch_norm(x, weights, "features.norm0")))
    for b, layers in enumerate(block_config, start=1):
        for k in range(1, layers + 1):
            x = dense_layer(x, weights, f"features.denseblock{b}.denselayer{k}")
        if b != len(block_config):
            x = transition(x, weights, f"features.transition{b}")
    return relu(batch_norm(x, weights, "features.norm5")).astype(np.float32)


def prepare(images: np.ndarray) -> np.ndarray:
    """uint8 gray ``(N, S, S)`` -> normalised float32 NCHW, refusing sizes DenseNet cannot take."""
    canonical.check_image_size(int(images.shape[-1]))
    return normalise(images, "NCHW")


def pooled_features(weights: Weights, block_config: tuple[int, ...], images: np.ndarray) -> np.ndarray:
    """Global-average-pooled features ``(N, C)``: the classifier's input."""
    return feature_map(weights, block_config, prepare(images)).mean(axis=(2, 3))


def classify(weights: Weights, pooled: np.ndarray) -> np.ndarray:
    return (pooled @ weights["classifier.weight"].T + weights["classifier.bias"]).astype(np.float32)
