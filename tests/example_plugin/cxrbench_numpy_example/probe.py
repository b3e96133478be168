"""Training, honestly but cheaply: a linear probe on frozen DenseNet features.

Back-propagating through a numpy DenseNet would be long and slow; the point of this backend is to
show the hooks. So only the classifier learns (binary cross-entropy on logits, Adam written out
below), while the features stay as initialised. The shared recipe
(:func:`cxrbench.training.run_recipe`) still owns epochs, the plateau schedule, best weights, NaN
detection and timing, exactly as for a full backend.
"""

from __future__ import annotations

import numpy as np

from cxrbench.data.prepared import PreparedData
from cxrbench.recorder import Recorder
from cxrbench.suite import Settings
from cxrbench.timing import batch_images
from cxrbench.training import EpochOutcome

from cxrbench_numpy_example.network import classify, pooled_features

TRAINED = ("classifier.weight", "classifier.bias")


def bce_with_logits(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Element-wise binary cross-entropy on logits, in the overflow-free form."""
    return np.maximum(logits, 0) - logits * labels + np.log1p(np.exp(-np.abs(logits)))


def sigmoid(x: np.ndarray) -> np.ndarray:
    return np.exp(-np.logaddexp(0, -x))


class Adam:
    """PyTorch's Adam (L2 weight decay added to the gradient), over named float32 arrays."""

    def __init__(self, settings: Settings, params: dict[str, np.ndarray]):
        train = settings.train
        self.beta1, self.beta2 = np.float32(train.adam_beta1), np.float32(train.adam_beta2)
        self.epsilon, self.decay = np.float32(train.adam_epsilon), np.float32(train.weight_decay)
        self.m = {k: np.zeros_like(v) for k, v in params.items()}
        self.v = {k: np.zeros_like(v) for k, v in params.items()}
        self.t = 0

    def step(self, params: dict[str, np.ndarray], grads: dict[str, np.ndarray], lr: float) -> None:
        self.t += 1
        for name, grad in grads.items():
            grad = grad + self.decay * params[name]
            self.m[name] = self.beta1 * self.m[name] + (1 - self.beta1) * grad
            self.v[name] = self.beta2 * self.v[name] + (1 - self.beta2) * grad * grad
            m_hat = self.m[name] / (1 - self.beta1**self.t)
            v_hat = self.v[name] / (1 - self.beta2**self.t)
            params[name] -= np.float32(lr) * m_hat / (np.sqrt(v_hat) + self.epsilon)


class LinearProbeLoop:
    """The :class:`cxrbench.training.EpochLoop` of the numpy backend."""

    def __init__(self, model, data: PreparedData, settings: Settings, recorder: Recorder):
        self.model, self.data, self.settings, self.recorder = model, data, settings, recorder
        self.adam = Adam(settings, {k: model.weights[k] for k in TRAINED})

    def sync(self) -> None:
        """numpy computes synchronously: nothing is queued."""

    def _loss_and_grads(self, images: np.ndarray, labels: np.ndarray) -> tuple[float, dict[str, np.ndarray]]:
        weights = self.model.weights
        pooled = pooled_features(weights, self.model.block_config, images)
        logits = classify(weights, pooled)
        loss = float(bce_with_logits(logits, labels).mean())
        d_logits = (sigmoid(logits) - labels) / np.float32(labels.size)
        return loss, {"classifier.weight": d_logits.T @ pooled, "classifier.bias": d_logits.sum(axis=0)}

    def train_epoch(self, epoch: int, lr: float) -> EpochOutcome:
        train = self.settings.train
        batches = self.recorder.timed(
            self.data.batches(
                "train", train.batch_size, epoch=epoch, seed=self.settings.run.seed,
                hflip=train.hflip, max_steps=train.max_steps,
            ),
            self.sync,
            batch_images,
        )
        losses, images = [], 0
        for batch in batches:
            loss, grads = self._loss_and_grads(batch.images, batch.labels)
            self.adam.step(self.model.weights, grads, lr)
            losses.append(loss)
            images += len(batch.images)
        return EpochOutcome(np.asarray(losses, dtype=np.float32), images, batches.data_wait_s)

    def validate(self) -> float:
        """Mean loss over every element of the validation split (no shuffle, no flip, no batch left out)."""
        total, count = 0.0, 0
        batches = self.data.batches("val", self.settings.train.batch_size, shuffle=False, drop_last=False)
        for batch in self.recorder.timed(batches, self.sync, batch_images):
            logits = classify(self.model.weights, pooled_features(self.model.weights, self.model.block_config, batch.images))
            total += float(bce_with_logits(logits, batch.labels).sum(dtype=np.float64))
            count += batch.labels.size
        return total / count

    def snapshot(self) -> dict[str, np.ndarray]:
        return {k: self.model.weights[k].copy() for k in TRAINED}

    def restore(self, snapshot: dict[str, np.ndarray]) -> None:
        for name, value in snapshot.items():
            self.model.weights[name] = value.copy()
