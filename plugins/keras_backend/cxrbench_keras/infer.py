"""Batched inference and class activation maps (eval mode, no gradients, checked uint8 images in).

Always the IEEE float32 function of the weights, whatever ``numerics.precision`` and ``numerics.tf32`` say: the
logits are what the ONNX export and the other backends are compared against. A mixed-precision model is read
through a float32 twin that gets the current weights at every call; TF32 is off inside.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from cxrbench.backend import NUM_CLASSES, CamResult
from cxrbench_keras.model import KerasDenseNet, build_network, preprocess
from cxrbench_keras.numerics import float32_policy, ieee_float32, oom_as_backend_error

#: The layer global average pooling consumes: the activation after the final BatchNorm and ReLU.
FEATURE_LAYER = "relu"


def _batched(function, images: np.ndarray, batch_size: int) -> list:
    return [function(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]


def float32_network(model: KerasDenseNet) -> keras.Model:
    """The model's network when it computes in float32 on one device, else a single-device float32 twin holding
    its current weights (a mixed-precision network, or a replicated one whose synchronised BatchNorm tf2onnx and
    plain inference must not see).

    The twin is built once per model (so the inference functions over it are traced once) and refreshed by
    assigning the weights, a copy that costs little next to inference.
    """
    if model.network.dtype_policy.name == "float32" and model.strategy.num_replicas_in_sync == 1:
        return model.network
    if "float32_twin" not in model.functions:
        with float32_policy():
            model.functions["float32_twin"] = build_network(
                model.block_config, model.image_size, None, synchronized=False
            )
    twin = model.functions["float32_twin"]
    twin.set_weights(model.network.get_weights())
    return twin


def _compiled(model: KerasDenseNet, name: str, function):
    """One tf.function per model and purpose, with a dynamic batch axis (one trace)."""
    if name not in model.functions:
        size = model.image_size
        model.functions[name] = tf.function(function, input_signature=[tf.TensorSpec((None, size, size), tf.uint8)])
    return model.functions[name]


def predict(model: KerasDenseNet, images: np.ndarray, settings) -> np.ndarray:
    """Logits (N, C) float32; with eval.tta_hflip the mean of each image's and its mirror's logits."""
    network = float32_network(model)

    def logits(batch):
        x = preprocess(batch)
        out = tf.cast(network(x, training=False), tf.float32)
        if settings.eval.tta_hflip:
            out = (out + tf.cast(network(x[:, :, ::-1], training=False), tf.float32)) / 2
        return out

    function = _compiled(model, f"predict_tta={settings.eval.tta_hflip}", logits)
    batch_size = settings.train.batch_size
    with ieee_float32(), oom_as_backend_error(batch_size, "predicting"):
        parts = [p.numpy() for p in _batched(function, images, batch_size)]
    return np.concatenate(parts).astype(np.float32) if parts else np.zeros((0, NUM_CLASSES), np.float32)


def cam(model: KerasDenseNet, images: np.ndarray, classes: list[int], batch_size: int) -> CamResult:
    """CAM of ``classes``: maps[n, j] = sum_k W[k, c_j] F[n, :, :, k] (NHWC features -> NCHW maps).

    Batched like prediction, so a few hundred boxed 224 px images never sit on the device at once.
    """
    network = float32_network(model)
    kernel, bias = network.get_layer("classifier").get_weights()
    columns = np.asarray(classes, dtype=np.int64)

    def features_and_logits(batch):
        key = f"cam_features:{id(network)}"
        if key not in model.functions:
            model.functions[key] = keras.Model(
                network.inputs, [network.get_layer(FEATURE_LAYER).output, network.outputs[0]]
            )
        features, logits = model.functions[key](preprocess(batch), training=False)
        maps = tf.einsum("nhwk,kc->nchw", tf.cast(features, tf.float32), tf.constant(kernel[:, columns], tf.float32))
        return maps.numpy(), tf.gather(tf.cast(logits, tf.float32), columns, axis=1).numpy()

    with ieee_float32(), oom_as_backend_error(batch_size, "computing CAMs"):
        maps, logits = zip(*_batched(features_and_logits, images, batch_size))
    return CamResult(maps=np.concatenate(maps), bias=bias[columns].astype(np.float32), logits=np.concatenate(logits))
