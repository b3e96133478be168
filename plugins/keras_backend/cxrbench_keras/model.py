"""The Keras DenseNet: keras.applications' network with PyTorch's BatchNorm numerics and a logit head.

The exported network takes float32 ImageNet-normalised NHWC input; the uint8 -> float
preprocessing (:func:`preprocess`) runs on the device inside the compiled train/predict functions,
outside the network, so ONNX export gets the bare network.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from keras import layers, ops

from cxrbench.backend import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    NUM_CLASSES,
    Start,
    WeightsError,
    canonical,
    first_line,
    initial_weights,
)
from cxrbench_keras import weights as keras_weights
from cxrbench_keras.numerics import configure_runtime

DENSENET121 = (6, 12, 24, 16)
#: Keras' own cache entry for the ImageNet DenseNet-121 without its top (name, URL and md5 as in
#: keras.applications.densenet).
IMAGENET_FILE = "densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5"
IMAGENET_URL = f"https://storage.googleapis.com/tensorflow/keras-applications/densenet/{IMAGENET_FILE}"
IMAGENET_MD5 = "30ee3e1110167f948a6b9946edeeb738"
#: Weight files this backend reads itself (``model.init``): Keras' own formats. The core reads ``.npz``.
NATIVE_SUFFIXES = (".keras", ".weights.h5")
#: PyTorch's BatchNorm: epsilon 1e-5, momentum 0.1 (= 0.9 in Keras' convention).
BN_EPSILON, BN_MOMENTUM = 1e-5, 0.9

_MEAN = np.asarray(IMAGENET_MEAN, dtype=np.float32)
_STD = np.asarray(IMAGENET_STD, dtype=np.float32)


@keras.saving.register_keras_serializable(package="cxrbench")
class TorchBatchNorm(layers.BatchNormalization):
    """BatchNormalization whose running variance is updated with the unbiased batch variance, as
    in PyTorch (Keras uses the biased one), so both frameworks keep the same running statistics."""

    def call(self, inputs, training=None, mask=None):
        if not (training and self.trainable) or mask is not None:
            return super().call(inputs, training=training, mask=mask)
        x = ops.cast(inputs, keras.backend.result_type(inputs.dtype, "float32"))
        mean, variance = self._moments(x, None)
        count = float(np.prod([x.shape[a] for a in self._reduction_axes])) * self._replicas()
        unbiased = variance * (count / max(count - 1.0, 1.0))
        self.moving_mean.assign(self.moving_mean * self.momentum + mean * (1.0 - self.momentum))
        self.moving_variance.assign(self.moving_variance * self.momentum + unbiased * (1.0 - self.momentum))
        gamma, beta = ops.cast(self.gamma, x.dtype), ops.cast(self.beta, x.dtype)
        out = ops.batch_normalization(x, mean, variance, axis=self.axis, offset=beta, scale=gamma, epsilon=self.epsilon)
        return ops.cast(out, self.compute_dtype)

    def _replicas(self) -> int:
        """Replicas whose batches the synchronized statistics cover."""
        context = tf.distribute.get_replica_context()
        return context.num_replicas_in_sync if self.synchronized and context is not None else 1


@dataclass
class KerasDenseNet:
    """The backend's model object (opaque to the core)."""

    network: keras.Model  #: normalised NHWC float32 -> logits
    strategy: tf.distribute.Strategy
    block_config: tuple[int, ...]
    image_size: int
    #: Compiled inference functions, traced once per purpose (see infer.py).
    functions: dict = field(default_factory=dict)


def preprocess(images):
    """uint8 gray (N, S, S) -> float32 ImageNet-normalised (N, S, S, 3), like checks.onnx.normalise."""
    x = tf.cast(images, tf.float32)[..., None] / 255.0
    return (x - _MEAN) / _STD


def build(settings, weights=None, strategy=None) -> KerasDenseNet:
    """Build (under ``strategy``'s scope) and initialise the model as the hook contract says."""
    canonical.check_image_size(settings.data.image_size)
    initial = initial_weights.resolve(settings, weights, NATIVE_SUFFIXES)
    configure_runtime(settings)
    if strategy is None:
        from cxrbench_keras.distributed import make_strategy

        strategy = make_strategy(settings)
    block_config = settings.model.block_config
    keras.utils.set_random_seed(settings.run.seed)
    backbone_file = imagenet_file(block_config) if initial.start is Start.IMAGENET else None
    with strategy.scope():
        network = build_network(
            block_config, settings.data.image_size, backbone_file, strategy.num_replicas_in_sync > 1
        )
    model = KerasDenseNet(network, strategy, block_config, settings.data.image_size)
    if initial.start is Start.CANONICAL:
        keras_weights.set_weights(network, initial.weights, block_config, initial.origin)
    elif initial.start is Start.NATIVE_FILE:
        load_native_file(model, initial.path)
    return model


def build_network(block_config, image_size: int, backbone_file: str | None, synchronized: bool) -> keras.Model:
    backbone = _backbone(block_config, image_size, backbone_file)
    aligned = keras.models.clone_model(backbone, clone_function=lambda layer: _aligned_layer(layer, synchronized))
    aligned.set_weights(backbone.get_weights())
    logits = layers.Dense(NUM_CLASSES, dtype="float32", name="classifier")(aligned.outputs[0])
    return keras.Model(aligned.inputs, logits, name=f"densenet_{'_'.join(map(str, block_config))}")


def _backbone(block_config, image_size: int, weights_file: str | None) -> keras.Model:
    """keras.applications' DenseNet without its top, global-average pooled, optionally loaded."""
    from keras.src.applications.densenet import DenseNet  # not exported publicly in Keras 3

    kwargs = dict(include_top=False, weights=None, input_shape=(image_size, image_size, 3), pooling="avg")
    if tuple(block_config) == DENSENET121:
        backbone = keras.applications.DenseNet121(**kwargs)
    else:
        backbone = DenseNet(blocks=list(block_config), **kwargs)
    if weights_file is not None:
        try:
            backbone.load_weights(weights_file)  # what keras.applications does with weights="imagenet"
        except Exception as exc:  # h5py and Keras raise many types for corrupt or mismatched files
            raise WeightsError(
                f"{weights_file}: cannot load into DenseNet{tuple(block_config)}: {first_line(exc)}"
            ) from None
    return backbone


def _aligned_layer(layer, synchronized: bool):
    """A fresh copy of ``layer``; BatchNorm layers become TorchBatchNorm with PyTorch's constants."""
    config = layer.get_config()
    if isinstance(layer, layers.BatchNormalization):
        config.update(epsilon=BN_EPSILON, momentum=BN_MOMENTUM, synchronized=synchronized)
        return TorchBatchNorm.from_config(config)
    return layer.__class__.from_config(config)


def imagenet_file(block_config) -> str:
    """Keras' cached ImageNet weights file (downloaded into the cache when missing and reachable)."""
    if tuple(block_config) != DENSENET121:
        raise WeightsError(
            f"model.init = 'imagenet': Keras has ImageNet weights only for densenet121, not {tuple(block_config)}"
        )
    cache = Path(os.environ.get("KERAS_HOME") or Path.home() / ".keras")
    cached = cache / "models" / IMAGENET_FILE
    if cached.is_file():
        return str(cached)
    try:
        return keras.utils.get_file(
            IMAGENET_FILE, IMAGENET_URL, cache_subdir="models", cache_dir=str(cache), file_hash=IMAGENET_MD5
        )
    except Exception as exc:  # get_file raises bare Exception for network failures
        raise WeightsError(
            f"model.init = 'imagenet': {cached} is not cached and cannot be downloaded ({first_line(exc)})"
        ) from None


def load_native_file(model: KerasDenseNet, path: Path) -> None:
    """Load a ``.keras`` or ``.weights.h5`` file (:data:`NATIVE_SUFFIXES`): weights only, nothing deserialised."""
    try:
        model.network.load_weights(str(path))
    except Exception as exc:  # h5py/zipfile/Keras raise many types for corrupt or mismatched files
        raise WeightsError(f"{path}: does not match DenseNet{model.block_config}: {first_line(exc)}") from None
