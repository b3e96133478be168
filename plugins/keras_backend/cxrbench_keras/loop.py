"""The Keras EpochLoop for cxrbench.training.run_recipe: a compiled custom train step over tf.data.

Per-step losses stay on the device (the tensors each step returns are collected in a list) and are
fetched in one transfer after the epoch, so NaN detection costs no per-step host synchronisation.
``data_wait_s`` is the time the Python loop spent in ``next()`` on the prefetched tf.data iterator:
how long the step loop waited for input that was not ready. The core's window timer
(``recorder.timed``) synchronises the device only at its window edges.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from cxrbench.classes import NUM_CLASSES
from cxrbench.recorder import Recorder
from cxrbench.timing import batch_images
from cxrbench.training import EpochOutcome, run_recipe, scaled_learning_rate

from cxrbench_keras.distributed import is_chief, steps_per_epoch, train_dataset
from cxrbench_keras.model import KerasDenseNet, preprocess
from cxrbench_keras.numerics import describe, oom_as_backend_error
from cxrbench_keras.optim import make_optimizer


def bce_sum(labels, logits):
    """Summed binary cross-entropy on float32 logits (torch's BCEWithLogitsLoss before its mean)."""
    return tf.reduce_sum(tf.nn.sigmoid_cross_entropy_with_logits(labels=labels, logits=tf.cast(logits, tf.float32)))


class KerasEpochLoop:
    """One training epoch, validation and weight snapshots for run_recipe, in any tf.distribute strategy."""

    def __init__(self, model: KerasDenseNet, data, settings, recorder: Recorder):
        self.model, self.data, self.settings, self.recorder = model, data, settings, recorder
        self.strategy = model.strategy
        self.replicas = self.strategy.num_replicas_in_sync
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
            input_signature=[tf.TensorSpec((None, size, size), tf.uint8), tf.TensorSpec((None, NUM_CLASSES), tf.float32)],
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
        tf.test.experimental.sync_devices()

    def train_epoch(self, epoch: int, lr: float) -> EpochOutcome:
        self.optimizer.learning_rate.assign(lr)
        steps = steps_per_epoch(self.strategy, self.data, self.settings)
        dataset = train_dataset(self.strategy, self.data, self.settings, epoch)
        batches = self.recorder.timed(dataset, self.sync, self.global_batch)
        losses = []
        for step, batch in enumerate(batches, start=1):
            losses.append(self.train_step(batch))
            self.recorder.step(epoch, step, steps)
        fetched = tf.stack(losses).numpy() if losses else np.zeros(0, dtype=np.float32)
        return EpochOutcome(fetched, images=len(losses) * self.global_batch, data_wait_s=batches.data_wait_s)

    def validate(self) -> float:
        sums, count = [], 0
        batches = self.data.batches("val", self.settings.train.batch_size, shuffle=False, drop_last=False)
        for batch in self.recorder.timed(batches, self.sync, batch_images):
            sums.append(self._val_loss_sum(batch.images, batch.labels))
            count += len(batch.images)
        return float(tf.add_n(sums).numpy()) / (count * NUM_CLASSES) if count else float("nan")

    def snapshot(self) -> list[np.ndarray]:
        return self.model.network.get_weights()

    def restore(self, snapshot: list[np.ndarray]) -> None:
        self.model.network.set_weights(snapshot)


def train(model: KerasDenseNet, data, settings, recorder: Recorder) -> dict:
    """run_recipe with the Keras loop; rank 0 reports; the numerics in force are returned."""
    reporter = recorder if is_chief(model.strategy) else Recorder()
    loop = KerasEpochLoop(model, data, settings, reporter)
    with oom_as_backend_error(settings.train.batch_size, "training"):
        result = run_recipe(loop, settings, reporter, world=loop.replicas)
    learning_rate = scaled_learning_rate(settings, loop.replicas)
    return {**result, "numerics": describe(settings, model.strategy, loop.global_batch, learning_rate)}
