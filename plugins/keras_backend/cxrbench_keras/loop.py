"""The Keras EpochLoop for cxrbench.backend.training.run_recipe: a compiled custom train step over tf.data.

Per-step losses stay on the device (the tensors each step returns are collected in a list) and are
fetched in one transfer after the epoch, so NaN detection costs no per-step host synchronisation.
``data_wait_s`` is the time the Python loop spent in ``next()`` on the prefetched tf.data iterator:
how long the step loop waited for input that was not ready. The core's window timer
(``recorder.timed``) synchronises the device only at its window edges.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from cxrbench.backend import (
    NUM_CLASSES,
    EpochOutcome,
    Recorder,
    run_recipe,
    scaled_learning_rate,
    steps_per_epoch,
    train_epoch,
    validation_loss,
)
from cxrbench_keras.distributed import check_replicated_numerics, is_chief, joined, train_dataset
from cxrbench_keras.model import KerasDenseNet, preprocess
from cxrbench_keras.numerics import describe, oom_as_backend_error, peak_memory
from cxrbench_keras.optim import make_optimizer


def bce_sum(labels, logits):
    """Summed binary cross-entropy on float32 logits (torch's BCEWithLogitsLoss before its mean)."""
    return tf.reduce_sum(tf.nn.sigmoid_cross_entropy_with_logits(labels=labels, logits=tf.cast(logits, tf.float32)))


def sync_local_devices(devices) -> None:
    """``tf.test.experimental.sync_devices`` for this worker's own devices: in a multi-worker cluster that function
    also addresses the other workers' devices, which TensorFlow's eager context refuses. (Eager execution is
    synchronous here, so the op returns once the device has finished.)"""
    for device in devices:
        with tf.device(device):
            tf.raw_ops.SyncDevice()


def device_total(sums: list[tf.Tensor], images: int) -> tuple[float, int]:
    """The per-batch summed losses added on the device and fetched once."""
    return (float(tf.add_n(sums).numpy()) if sums else 0.0), images


class KerasEpochLoop:
    """One training epoch, validation and weight snapshots for run_recipe, in any tf.distribute strategy."""

    def __init__(self, model: KerasDenseNet, data, settings, recorder: Recorder):
        self.model, self.data, self.settings, self.recorder = model, data, settings, recorder
        self.strategy = model.strategy
        self.replicas = self.strategy.num_replicas_in_sync
        check_replicated_numerics(settings.numerics, self.replicas)
        self.global_batch = settings.train.batch_size * self.replicas
        with self.strategy.scope():
            self.optimizer = make_optimizer(settings)
            self.optimizer.build(model.network.trainable_variables)
        jit = settings.numerics.jit_compile
        self._replica_step = tf.function(self._replica_step_fn, jit_compile=jit)
        self.train_step = tf.function(self._train_step_fn)
        size = model.image_size
        self._val_loss_sum = tf.function(
            lambda images, labels: bce_sum(labels, model.network(preprocess(images), training=False)),
            input_signature=[
                tf.TensorSpec((None, size, size), tf.uint8),
                tf.TensorSpec((None, NUM_CLASSES), tf.float32),
            ],
            jit_compile=jit,
        )

    def _replica_step_fn(self, images, labels):
        network = self.model.network
        with tf.GradientTape() as tape:
            logits = network(preprocess(images), training=True)
            loss = bce_sum(labels, logits) / (self.global_batch * NUM_CLASSES)
            scaled = self.optimizer.scale_loss(loss)
        gradients = tape.gradient(scaled, network.trainable_variables)
        self.optimizer.apply(gradients, network.trainable_variables)
        return loss

    def _train_step_fn(self, batch):
        per_replica = self.strategy.run(self._replica_step, args=batch)
        return self.strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

    def sync(self) -> None:
        if joined():
            sync_local_devices(self.strategy.extended.worker_devices)
        else:
            tf.test.experimental.sync_devices()

    def train_epoch(self, epoch: int, lr: float) -> EpochOutcome:
        self.optimizer.learning_rate.assign(lr)
        dataset = train_dataset(self.strategy, self.data, self.settings, epoch)
        steps = steps_per_epoch(self.data, self.settings, self.replicas)
        return train_epoch(
            self.recorder,
            dataset,
            self.train_step,
            epoch=epoch,
            steps=steps,
            sync=self.sync,
            images=self.global_batch,
            fetch=lambda losses: tf.stack(losses).numpy(),
        )

    def validate(self) -> float:
        return validation_loss(
            self.recorder,
            self.data,
            self.settings,
            lambda batch: self._val_loss_sum(batch.images, batch.labels),
            self.sync,
            device_total,
        )

    def snapshot(self) -> list[np.ndarray]:
        return self.model.network.get_weights()

    def restore(self, snapshot: list[np.ndarray]) -> None:
        self.model.network.set_weights(snapshot)


def train(model: KerasDenseNet, data, settings, recorder: Recorder) -> dict:
    """run_recipe with the Keras loop; rank 0 reports (every launched worker, to its own worker); the core's
    numerics record is returned."""
    reporter = recorder if is_chief(model.strategy) or joined() else Recorder()
    loop = KerasEpochLoop(model, data, settings, reporter)
    with oom_as_backend_error(settings.train.batch_size, "training"), peak_memory() as peak:
        result = run_recipe(loop, settings, reporter, world=loop.replicas)
    learning_rate = scaled_learning_rate(settings, loop.replicas)
    return {
        **result,
        "numerics": describe(settings, model.network, model.strategy, loop.optimizer, learning_rate),
        "peak_memory": peak,
    }
