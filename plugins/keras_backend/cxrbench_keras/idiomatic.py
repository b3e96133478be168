"""Keras' own training loop, the yardstick of the harness-overhead benchmark (``cxrbench_idiomatic_loop``).

What a Keras user writes without cxrbench: ``keras.applications.DenseNet121(weights=None, classes=14,
classifier_activation=None)`` with Keras' own layers (its BatchNormalization included), compiled with ``Adam`` and
``BinaryCrossentropy(from_logits=True)``, trained with ``train_on_batch`` on normalised tensors made in memory.

Why ``train_on_batch`` rather than ``fit``: the core times both loops step by step with the same window timer,
and ``train_on_batch`` is Keras' public one-step API over the same compiled train function ``fit`` runs
(``steps_per_execution=1``); ``fit`` on in-memory data would add its data adapter and callbacks, not remove work.
``jit_compile`` follows ``numerics.jit_compile`` as in the backend (Keras' ``"auto"`` would pick XLA on a GPU for
one loop only). The backend's runtime configuration (thread budget, precision policy, GPU visibility and memory
growth) is applied first, so both loops run under the same numerics.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from cxrbench.backend import NUM_CLASSES, IdiomaticLoop, Settings
from cxrbench_keras.model import DENSENET121
from cxrbench_keras.numerics import configure_runtime, device_name
from cxrbench_keras.weights import canonical_prefix, from_canonical

#: Batches made in memory and cycled through, so consecutive steps see different data, as in training.
BATCHES = 4


def reference_densenet(block_config: tuple[int, ...], image_size: int) -> keras.Model:
    """``keras.applications.DenseNet121`` with a 14-way logit top; the same builder at the smaller test depths."""
    from keras.src.applications.densenet import DenseNet  # not exported publicly in Keras 3

    kwargs = dict(
        weights=None, classes=NUM_CLASSES, classifier_activation=None, input_shape=(image_size, image_size, 3)
    )
    if tuple(block_config) == DENSENET121:
        return keras.applications.DenseNet121(**kwargs)
    return DenseNet(blocks=list(block_config), **kwargs)


def load_canonical(network: keras.Model, weights: dict[str, np.ndarray]) -> None:
    """The canonical weights into Keras' own DenseNet: its top (``predictions``) is the classifier."""
    for layer in network.layers:
        if layer.weights:
            prefix, kind = canonical_prefix(layer.name) or ("classifier", "dense")
            layer.set_weights(from_canonical(kind, prefix, weights))


def loop(settings: Settings, weights: dict[str, np.ndarray]) -> IdiomaticLoop:
    configure_runtime(settings)
    size, batch, train = settings.data.image_size, settings.train.batch_size, settings.train
    network = reference_densenet(settings.model.block_config, size)
    load_canonical(network, weights)
    network.compile(
        optimizer=keras.optimizers.Adam(
            train.learning_rate, beta_1=train.adam_beta1, beta_2=train.adam_beta2, epsilon=train.adam_epsilon
        ),
        loss=keras.losses.BinaryCrossentropy(from_logits=True),
        jit_compile=settings.numerics.jit_compile,
    )
    rng = np.random.default_rng(settings.run.seed)
    batches = [
        (
            tf.constant(rng.standard_normal((batch, size, size, 3), dtype=np.float32)),
            tf.constant((rng.random((batch, NUM_CLASSES)) < 0.3).astype(np.float32)),
        )
        for _ in range(BATCHES)
    ]
    steps = [0]

    def step():
        images, labels = batches[steps[0] % BATCHES]
        steps[0] += 1
        return network.train_on_batch(images, labels)

    return IdiomaticLoop(
        step=step,
        sync=tf.test.experimental.sync_devices,
        description=(
            f"keras.applications DenseNet{tuple(settings.model.block_config)} (classes=14, logits), "
            f"compile(Adam, BinaryCrossentropy(from_logits=True), jit_compile={settings.numerics.jit_compile}), "
            f"train_on_batch over {BATCHES} in-memory batches on {device_name()}, "
            f"dtype policy {keras.config.dtype_policy().name}"
        ),
        threads={
            "intra_op": tf.config.threading.get_intra_op_parallelism_threads(),
            "inter_op": tf.config.threading.get_inter_op_parallelism_threads(),
        },
    )
