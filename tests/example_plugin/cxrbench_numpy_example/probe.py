"""Training, honestly but cheaply: a linear probe on frozen DenseNet features.

Back-propagating through a numpy DenseNet would be long and slow; the point of this backend is to
show the hooks. So only the classifier learns (binary cross-entropy on logits, Adam written out
below), while the features stay as initialised. The shared recipe
(:func:`cxrbench.backend.training.run_recipe`) still owns epochs, the plateau schedule, best weights, NaN
detection and timing, exactly as for a full backend.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits

from cxrbench.backend import (
    NUM_CLASSES,
    BackendError,
    Batch,
    EpochOutcome,
    IdiomaticLoop,
    PreparedData,
    Recorder,
    Settings,
    batch_images,
    numerics_record,
    scaled_learning_rate,
    steps_per_epoch,
    thread_budget,
    train_batches,
    train_epoch,
    validation_loss,
)
from cxrbench_numpy_example.network import classify, feature_map, pooled_features

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


def probe_gradients(
    weights: dict[str, np.ndarray], pooled: np.ndarray, labels: np.ndarray
) -> tuple[float, dict[str, np.ndarray]]:
    """Mean BCE of the classifier on pooled features, and its gradients."""
    logits = classify(weights, pooled)
    loss = float(bce_with_logits(logits, labels).mean())
    d_logits = (sigmoid(logits) - labels) / np.float32(labels.size)
    return loss, {"classifier.weight": d_logits.T @ pooled, "classifier.bias": d_logits.sum(axis=0)}


class LinearProbeLoop:
    """The :class:`cxrbench.backend.training.EpochLoop` of the numpy backend."""

    def __init__(self, model, data: PreparedData, settings: Settings, recorder: Recorder):
        self.model, self.data, self.settings, self.recorder = model, data, settings, recorder
        self.adam = Adam(settings, {k: model.weights[k] for k in TRAINED})

    def sync(self) -> None:
        """numpy computes synchronously: nothing is queued."""

    def _loss_and_grads(self, images: np.ndarray, labels: np.ndarray) -> tuple[float, dict[str, np.ndarray]]:
        weights = self.model.weights
        return probe_gradients(weights, pooled_features(weights, self.model.block_config, images), labels)

    def train_epoch(self, epoch: int, lr: float) -> EpochOutcome:
        """The core's helper runs the epoch (timing, progress, losses); this loop supplies one step."""

        def step(batch: Batch) -> float:
            loss, grads = self._loss_and_grads(batch.images, batch.labels)
            self.adam.step(self.model.weights, grads, lr)
            return loss

        return train_epoch(
            self.recorder,
            train_batches(self.data, self.settings, epoch),
            step,
            epoch=epoch,
            steps=steps_per_epoch(self.data, self.settings),
            sync=self.sync,
            images=batch_images,
        )

    def validate(self) -> float:
        """The core's validation loss: every image once, no shuffle, no flip; this loop supplies each batch's sum."""
        return validation_loss(self.recorder, self.data, self.settings, self._summed_loss, self.sync)

    def _summed_loss(self, batch: Batch) -> float:
        weights = self.model.weights
        logits = classify(weights, pooled_features(weights, self.model.block_config, batch.images))
        return float(bce_with_logits(logits, batch.labels).sum(dtype=np.float64))

    def snapshot(self) -> dict[str, np.ndarray]:
        return {k: self.model.weights[k].copy() for k in TRAINED}

    def restore(self, snapshot: dict[str, np.ndarray]) -> None:
        for name, value in snapshot.items():
            self.model.weights[name] = value.copy()


def describe(model, settings: Settings, layout: str) -> dict[str, Any]:
    """The core's numerics record: fp32 on one CPU, the BLAS threads read back (numpy's only thread pool)."""
    blas = [pool for pool in threadpool_info() if pool["user_api"] == "blas"]
    return numerics_record.build(
        "numpy",
        device="cpu",
        devices=["cpu"],
        world_size=1,
        nodes=1,
        data_parallel="none",
        batch_size_per_device=settings.train.batch_size,
        global_batch=settings.train.batch_size,
        learning_rate=scaled_learning_rate(settings, 1),
        lr_scaling=settings.train.lr_scaling,
        precision=settings.numerics.precision,
        compute_dtype=str(model.weights["classifier.weight"].dtype),
        loss_scaling=False,
        tf32=False,
        layout=layout,
        compile="eager",
        synchronized_batchnorm=False,
        batchnorm_sync="none",
        intra_op_threads=max((pool["num_threads"] for pool in blas), default=1),
        inter_op_threads=1,  # numpy runs one operation at a time
        thread_budget=thread_budget(settings.numerics),
        deterministic=True,  # no atomics, no autotuning: fixed threads give fixed numbers
        input_pipeline="plain iteration",
        versions={"numpy": np.__version__, **{pool["internal_api"]: pool["version"] for pool in blas}},
        framework={"trained": "classifier only (linear probe)"},
    )


def idiomatic_loop(settings: Settings, weights: dict[str, np.ndarray]) -> IdiomaticLoop:
    """The same probe as a numpy user writes it: normalised float arrays made in memory, forward, gradient, Adam;
    no batches from the core, no recorder. BLAS gets the core's thread budget, as in training."""
    if settings.numerics.precision != "fp32":
        raise BackendError(f"numerics.precision = {settings.numerics.precision!r}: numpy computes in fp32 only")
    threads = thread_budget(settings.numerics)["intra_op"]
    threadpool_limits(threads, user_api="blas")  # for the rest of this (benchmark) process
    block_config, train = settings.model.block_config, settings.train
    params = {name: np.array(value, dtype=np.float32) for name, value in weights.items()}
    adam = Adam(settings, {k: params[k] for k in TRAINED})
    rng = np.random.default_rng(settings.run.seed)
    size = settings.data.image_size
    batches = [
        (
            rng.standard_normal((train.batch_size, 3, size, size), dtype=np.float32),
            (rng.random((train.batch_size, NUM_CLASSES)) < 0.3).astype(np.float32),
        )
        for _ in range(4)
    ]
    steps = [0]

    def step() -> float:
        images, labels = batches[steps[0] % len(batches)]
        steps[0] += 1
        loss, grads = probe_gradients(params, feature_map(params, block_config, images).mean(axis=(2, 3)), labels)
        adam.step(params, grads, train.learning_rate)
        return loss

    return IdiomaticLoop(
        step=step,
        sync=lambda: None,
        description=f"numpy linear probe on DenseNet{tuple(block_config)} features, 4 in-memory batches, Adam",
        threads={"intra_op": threads, "inter_op": 1},
    )
