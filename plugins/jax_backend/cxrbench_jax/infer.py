"""Prediction and class activation maps: eval mode, jitted, batched, always float32.

Every batch is padded to one fixed size (``batch_size`` per device x devices) so each function compiles once:
a short last batch would otherwise cost a second XLA compilation. Padding rows are cut from the result; in eval
mode BatchNorm uses its running statistics, so they cannot change the real rows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cxrbench.api import CamResult
from cxrbench.classes import NUM_CLASSES
from cxrbench.errors import BackendError
from cxrbench.weights import check_image_size
from cxrbench_jax import numerics
from cxrbench_jax.model import JaxModel
from cxrbench_jax.network import normalise


def pad_rows(array: np.ndarray, rows: int) -> np.ndarray:
    """``array`` with zero rows appended up to ``rows``."""
    missing = rows - len(array)
    return np.concatenate([array, np.zeros((missing, *array.shape[1:]), array.dtype)]) if missing else array


def host_images(images: np.ndarray) -> np.ndarray:
    """Check the hooks' image contract: uint8 ``(N, S, S)`` with S a size DenseNet can take."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1] != images.shape[2]:
        raise BackendError(f"images must be uint8 (N, S, S), got {images.dtype} {images.shape}")
    check_image_size(images.shape[1])
    return images


def padded_batches(model: JaxModel, images: np.ndarray, batch_size: int) -> Iterator[tuple[jax.Array, int]]:
    """Device batches of ``batch_size`` images per device, sharded over the model's devices, and the real count."""
    rows = batch_size * len(model.devices)
    sharding = numerics.batch_sharding(model.devices)
    for start in range(0, len(images), rows):
        chunk = images[start : start + rows]
        yield jax.device_put(pad_rows(chunk, rows), sharding), len(chunk)


def _function(model: JaxModel, name: str, make: Callable[[], Callable]) -> Callable:
    if name not in model.functions:
        model.functions[name] = jax.jit(make())
    return model.functions[name]


def predict(model: JaxModel, images: np.ndarray, batch_size: int, tta_hflip: bool) -> np.ndarray:
    """Logits (N, 14); with ``tta_hflip`` the mean of the logits of each image and its mirror."""
    network = model.network

    def make():
        def logits(variables, batch):
            x = normalise(batch)
            out = network.apply(variables, x)
            if tta_hflip:
                out = (out + network.apply(variables, x[:, :, ::-1])) / 2
            return out

        return logits

    function = _function(model, f"predict_tta={tta_hflip}", make)
    parts = []
    with numerics.out_of_memory_as_error(batch_size, "predicting"):
        for batch, real in padded_batches(model, host_images(images), batch_size):
            parts.append(np.asarray(function(model.variables, batch))[:real])
    return np.concatenate(parts).astype(np.float32) if parts else np.zeros((0, NUM_CLASSES), np.float32)


def cam(model: JaxModel, images: np.ndarray, classes: Sequence[int]) -> CamResult:
    """CAM = classifier rows x (final BatchNorm -> ReLU features), NCHW maps, with the logits of the same pass."""
    chosen = _class_indices(classes)
    images = host_images(images)
    if len(images) == 0:
        raise BackendError("CAM needs at least one image, got none")
    network = model.network

    def make():
        def maps_and_logits(variables, batch, columns):
            features, logits = network.apply(variables, normalise(batch), with_features=True)
            kernel = variables["params"]["classifier"]["kernel"][:, columns]  # (K, C)
            return jnp.einsum("nhwk,kc->nchw", features, kernel), logits[:, columns]

        return maps_and_logits

    function = _function(model, "cam", make)
    columns = jnp.asarray(chosen)
    maps, logits = [], []
    with numerics.out_of_memory_as_error(model.batch_size, "computing CAMs"):
        for batch, real in padded_batches(model, images, model.batch_size):
            batch_maps, batch_logits = function(model.variables, batch, columns)
            maps.append(np.asarray(batch_maps)[:real])
            logits.append(np.asarray(batch_logits)[:real])
    bias = np.asarray(model.variables["params"]["classifier"]["bias"])[chosen]
    return CamResult(maps=np.concatenate(maps).astype(np.float32), bias=bias.astype(np.float32),
                     logits=np.concatenate(logits).astype(np.float32))


def _class_indices(classes: Sequence[int]) -> list[int]:
    chosen = [int(c) for c in classes]
    bad = [c for c in chosen if not 0 <= c < NUM_CLASSES]
    if bad or not chosen:
        raise BackendError(f"CAM classes must be indices 0..{NUM_CLASSES - 1}, got {list(classes)!r}")
    return chosen
