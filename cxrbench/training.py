"""The training recipe every backend shares: epochs, plateau schedule, best weights, reporting.

A backend supplies an :class:`EpochLoop` (how to run one epoch, validate, and copy weights in its
framework); :func:`run_recipe` owns everything the frameworks must do identically: the learning
rate schedule (ReduceLROnPlateau on validation loss), keeping the best-validation-loss weights,
NaN detection, timing with device synchronisation (whole phases, and the steady-state windows of
:mod:`cxrbench.timing` when the loop wraps its batches with ``recorder.timed``), and the per-epoch record.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from cxrbench.api import EpochRecord
from cxrbench.errors import TrainingDiverged
from cxrbench.recorder import Recorder, Stopwatch
from cxrbench.suite import Settings
from cxrbench.timing import WindowTimer, summarise


@dataclass
class EpochOutcome:
    """What one training epoch returns to the recipe."""

    losses: np.ndarray  #: per-step training loss (fetched from the device once, after the epoch)
    images: int  #: images processed over all ranks
    data_wait_s: float | None  #: time spent waiting for input, None if the framework hides it


class EpochLoop(Protocol):
    def sync(self) -> None:
        """Block until the device has finished queued work (no-op on the CPU)."""

    def train_epoch(self, epoch: int, lr: float) -> EpochOutcome:
        """Run one epoch at learning rate ``lr`` over the core's batches for ``epoch``."""

    def validate(self) -> float:
        """Mean validation loss over the validation split (eval mode, no gradients)."""

    def snapshot(self) -> Any:
        """A copy of the current weights that :meth:`restore` can load back."""

    def restore(self, snapshot: Any) -> None: ...


def scaled_learning_rate(settings: Settings, world: int) -> float:
    """The suite's learning-rate scaling rule for a global batch of ``batch_size * world``."""
    base = settings.train.learning_rate
    rule = settings.train.lr_scaling
    if rule == "linear":
        return base * world
    if rule == "sqrt":
        return base * math.sqrt(world)
    return base


class Plateau:
    """ReduceLROnPlateau(mode="min") with PyTorch's defaults: relative threshold 1e-4, no cooldown."""

    def __init__(self, lr: float, factor: float, patience: int, threshold: float = 1e-4):
        self.lr, self.factor, self.patience, self.threshold = lr, factor, patience, threshold
        self.best = math.inf
        self.bad_epochs = 0

    def step(self, value: float) -> float:
        if value < self.best * (1.0 - self.threshold):
            self.best, self.bad_epochs = value, 0
        else:
            self.bad_epochs += 1
            if self.bad_epochs > self.patience:
                self.lr *= self.factor
                self.bad_epochs = 0
        return self.lr


def first_non_finite(losses: np.ndarray) -> int | None:
    """1-based step of the first NaN/inf loss, or None."""
    bad = np.flatnonzero(~np.isfinite(np.asarray(losses, dtype=np.float64)))
    return int(bad[0]) + 1 if bad.size else None


def window_fields(train: WindowTimer | None, validate: WindowTimer | None) -> dict[str, Any]:
    """The EpochRecord's warm-up and steady-state figures from the phase timers (empty when not timed)."""
    fields: dict[str, Any] = {}
    if train is not None:
        steady = summarise(train.windows)
        fields.update(first_step_s=train.first_step_s, steady_images_per_s=steady["images_per_s"],
                      steady_images_per_s_interval=steady["interval"], windows=steady["windows"],
                      steps_after_warmup=train.steps_after_warmup,
                      train_window_list=[w.to_list() for w in train.windows])
    if validate is not None:
        steady = summarise(validate.windows)
        fields.update(val_images_per_s=steady["images_per_s"], val_images_per_s_interval=steady["interval"],
                      val_windows=steady["windows"], val_window_list=[w.to_list() for w in validate.windows])
    return fields


def run_recipe(loop: EpochLoop, settings: Settings, recorder: Recorder, world: int = 1) -> dict[str, Any]:
    """Train for ``settings.train.epochs`` epochs and leave the best-validation-loss weights in place."""
    lr = scaled_learning_rate(settings, world)
    recorder.warmup_steps, recorder.window_steps = settings.train.warmup_steps, settings.train.window_steps
    plateau = Plateau(lr, settings.train.plateau_factor, settings.train.plateau_patience)
    best_loss, best_epoch, best_weights = math.inf, 0, None
    for epoch in range(1, settings.train.epochs + 1):
        recorder.epoch_started(epoch, warmup=epoch == 1)
        train_watch, val_watch = Stopwatch(loop.sync), Stopwatch(loop.sync)
        with recorder.phase("train"), train_watch.region():
            outcome = loop.train_epoch(epoch, lr)
        train_timer = recorder.take_timer("train")
        bad_step = first_non_finite(outcome.losses)
        if bad_step is not None:
            if best_weights is not None:
                loop.restore(best_weights)
            raise TrainingDiverged(epoch, bad_step, float(outcome.losses[bad_step - 1]))
        with recorder.phase("validate"), val_watch.region():
            val_loss = loop.validate()
        val_timer = recorder.take_timer("validate")
        if not math.isfinite(val_loss):
            if best_weights is not None:
                loop.restore(best_weights)
            raise TrainingDiverged(epoch, len(outcome.losses), val_loss)
        is_best = val_loss < best_loss
        if is_best:
            best_loss, best_epoch, best_weights = val_loss, epoch, loop.snapshot()
        recorder.epoch_ended(
            EpochRecord(
                epoch=epoch,
                warmup=epoch == 1,
                train_loss=float(np.mean(outcome.losses)) if len(outcome.losses) else math.nan,
                val_loss=float(val_loss),
                train_time_s=train_watch.seconds,
                val_time_s=val_watch.seconds,
                data_wait_s=outcome.data_wait_s,
                images=outcome.images,
                images_per_s=outcome.images / train_watch.seconds if train_watch.seconds else 0.0,
                lr=lr,
                steps=len(outcome.losses),
                best=is_best,
                **window_fields(train_timer, val_timer),
            )
        )
        lr = plateau.step(val_loss)
    if best_weights is not None and best_epoch != settings.train.epochs:
        loop.restore(best_weights)
    return {"best_epoch": best_epoch, "best_val_loss": best_loss, "final_lr": lr}
