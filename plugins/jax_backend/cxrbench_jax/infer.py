"""Prediction and class activation maps: eval mode, jitted, batched, always the IEEE float32 function (matmuls
and convolutions at ``numerics.INFERENCE_PRECISION`` whatever ``numerics.tf32`` says; the precision is part of
JAX's trace context, so these functions never reuse a TF32 trace).

Every batch is padded to one fixed size (``batch_size`` per device x devices) so each function compiles once:
a short last batch would otherwise cost a second XLA compilation. Padding rows are cut from the result; in eval
mode BatchNorm uses its running statistics, so they cannot change the real rows.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from cxrbench.backend import NUM_CLASSES, CamResult
from cxrbench_jax import numerics
from cxrbench_jax.model import JaxModel
from cxrbench_jax.network import normalise


def pad_rows(array: np.ndarray, rows: int) -> np.ndarray:
    """``array`` with zero rows appended up to ``rows``."""
    missing = rows - len(array)
    return np.concatenate([array, np.zeros((missing, *array.shape[1:]), array.dtype)]) if missing else array


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
    """Logits (N, 14) of checked images; with ``tta_hflip`` the mean of the logits of each image and its mirror."""
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
    with _inference(model, batch_size, "predicting"):
        for batch, real in padded_batches(model, images, batch_size):
            parts.append(np.asarray(function(model.variables, batch))[:real])
    return np.concatenate(parts).astype(np.float32) if parts else np.zeros((0, NUM_CLASSES), np.float32)


def cam(model: JaxModel, images: np.ndarray, classes: list[int], batch_size: int) -> CamResult:
    """CAM = classifier rows x (final BatchNorm -> ReLU features), NCHW maps, with the logits of the same pass,
    for checked images and class indices."""
    network = model.network

    def make():
        def maps_and_logits(variables, batch, columns):
            features, logits = network.apply(variables, normalise(batch), with_features=True)
            kernel = variables["params"]["classifier"]["kernel"][:, columns]  # (K, C)
            return jnp.einsum("nhwk,kc->nchw", features, kernel), logits[:, columns]

        return maps_and_logits

    function = _function(model, "cam", make)
    columns = jnp.asarray(classes)
    maps, logits = [], []
    with _inference(model, batch_size, "computing CAMs"):
        for batch, real in padded_batches(model, images, batch_size):
            batch_maps, batch_logits = function(model.variables, batch, columns)
            maps.append(np.asarray(batch_maps)[:real])
            logits.append(np.asarray(batch_logits)[:real])
    bias = np.asarray(model.variables["params"]["classifier"]["bias"])[classes]
    return CamResult(
        maps=np.concatenate(maps).astype(np.float32),
        bias=bias.astype(np.float32),
        logits=np.concatenate(logits).astype(np.float32),
    )


@contextlib.contextmanager
def _inference(model: JaxModel, batch_size: int, doing: str) -> Iterator[None]:
    """IEEE float32 matmuls and the core's out-of-memory message around an inference loop."""
    with (
        jax.default_matmul_precision(numerics.INFERENCE_PRECISION),
        numerics.oom_as_backend_error(model.devices[0], batch_size, doing),
    ):
        yield
