"""The training recipe every backend shares: epochs, plateau schedule, best weights, reporting.

A backend supplies an :class:`EpochLoop` (how to run one epoch, validate, and copy weights in its
framework); :func:`run_recipe` owns everything the frameworks must do identically: the learning
rate schedule (ReduceLROnPlateau on validation loss), keeping the best-validation-loss weights,
NaN detection, timing with device synchronisation (whole phases, and the steady-state windows of
:mod:`cxrbench.backend.timing` when the loop wraps its batches with ``recorder.timed``), and the per-epoch record.

Two helpers carry the loop contract, so a loop writes only its framework's step:

* :func:`train_epoch` runs one epoch: the batches of :func:`train_batches` (or the framework's pipeline
  over them) timed by ``recorder.timed``, step progress, and the per-step losses kept as the step
  returned them (on the device) until one ``fetch`` after the last step.
* :func:`validation_loss` runs validation: per batch the summed binary cross-entropy (left on the
  device), reduced once to the mean per label; an empty validation split is a :class:`DataError`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from cxrbench.backend.api import EpochRecord
from cxrbench.backend.recorder import Recorder, Stopwatch
from cxrbench.backend.timing import WindowTimer, batch_images, summarise
from cxrbench.data.classes import NUM_CLASSES
from cxrbench.data.prepared import Batch, PreparedData
from cxrbench.errors import DataError, TrainingDiverged
from cxrbench.suite import Settings

#: Every backend's error for a validation split without images (the recipe picks the best epoch by its loss).
EMPTY_VALIDATION = "the validation split is empty: training needs validation images (raise data.val_fraction)"


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
        """Run one epoch at learning rate ``lr`` over the core's batches for ``epoch`` (:func:`train_epoch`)."""

    def validate(self) -> float:
        """Mean BCE per label over the validation split, eval mode, no gradients (:func:`validation_loss`)."""

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
        fields.update(
            first_step_s=train.first_step_s,
            steady_images_per_s=steady["images_per_s"],
            steady_images_per_s_interval=steady["interval"],
            windows=steady["windows"],
            steps_after_warmup=train.steps_after_warmup,
            train_window_list=[w.to_list() for w in train.windows],
        )
    if validate is not None:
        steady = summarise(validate.windows)
        fields.update(
            val_images_per_s=steady["images_per_s"],
            val_images_per_s_interval=steady["interval"],
            val_windows=steady["windows"],
            val_window_list=[w.to_list() for w in validate.windows],
        )
    return fields


def train_batches(
    data: PreparedData,
    settings: Settings,
    epoch: int,
    *,
    batch_size: int = 0,
    rank: int = 0,
    world: int = 1,
    loader_worker: int = 0,
    loader_workers: int = 1,
) -> Iterator[Batch]:
    """This rank's training batches of ``epoch``: the seeded order and flips, ``train.max_steps`` steps at most.

    ``batch_size`` defaults to ``train.batch_size``; a process feeding several replicas asks for theirs at once.
    """
    train = settings.train
    return data.batches(
        "train",
        batch_size or train.batch_size,
        epoch=epoch,
        seed=settings.run.seed,
        shuffle=True,
        hflip=train.hflip,
        max_steps=train.max_steps,
        rank=rank,
        world=world,
        loader_worker=loader_worker,
        loader_workers=loader_workers,
    )


def steps_per_epoch(data: PreparedData, settings: Settings, world: int = 1) -> int:
    """Training steps in every epoch on ``world`` ranks (for step progress)."""
    return data.num_batches("train", settings.train.batch_size, world, max_steps=settings.train.max_steps)


def train_epoch(
    recorder: Recorder,
    batches: Iterable,
    step: Callable[[Any], Any],
    *,
    epoch: int,
    steps: int,
    sync: Callable[[], None],
    images: int | Callable[[Any], int],
    fetch: Callable[[list[Any]], Any] = np.asarray,
) -> EpochOutcome:
    """Run ``step`` on every batch under the recorder's window timer, reporting progress without a host sync.

    ``step`` returns the step's mean loss as the framework holds it; the list of them goes to ``fetch``
    once, after the last step (one transfer from the device; several ranks average there). ``images`` is
    the images per step over all ranks, or a function of the batch.
    """
    timer = recorder.timed(batches, sync, images)
    losses = []
    for number, batch in enumerate(timer, start=1):
        losses.append(step(batch))
        recorder.step(epoch, number, steps)
    fetched = np.asarray(fetch(losses), dtype=np.float64) if losses else np.zeros(0)
    return EpochOutcome(fetched, timer.images, timer.data_wait_s)


def host_total(sums: list[Any], images: int) -> tuple[float, int]:
    """Add up per-batch summed losses that are host numbers (one process)."""
    return float(np.sum(np.asarray(sums, dtype=np.float64))), images


def validation_loss(
    recorder: Recorder,
    data: PreparedData,
    settings: Settings,
    summed_loss: Callable[[Batch], Any],
    sync: Callable[[], None],
    total: Callable[[list[Any], int], tuple[float, int]] = host_total,
    *,
    rank: int = 0,
    world: int = 1,
) -> float:
    """Mean binary cross-entropy per label over this rank's share of the validation split, every image once.

    ``summed_loss(batch)`` is the batch's loss summed over images and classes, left where the framework
    holds it; ``total(sums, images)`` brings the sums to the host once (several ranks: summed over all
    ranks, the image count too). An empty split is a :class:`DataError`, the same for every backend.
    """
    batches = data.batches("val", settings.train.batch_size, shuffle=False, drop_last=False, rank=rank, world=world)
    sums, images = [], 0
    for batch in recorder.timed(batches, sync, batch_images):
        sums.append(summed_loss(batch))
        images += len(batch.labels)
    return mean_per_label(*total(sums, images))


def mean_per_label(summed: float, images: int) -> float:
    """The summed loss of ``images`` images as a mean per label; no images is the empty-split error."""
    if not images:
        raise DataError(EMPTY_VALIDATION)
    return summed / (images * NUM_CLASSES)


def run_recipe(loop: EpochLoop, settings: Settings, recorder: Recorder, world: int = 1) -> dict[str, Any]:
    """Train for ``settings.train.epochs`` epochs and leave the best-validation-loss weights in place."""
    lr = scaled_learning_rate(settings, world)
    recorder.warmup_steps, recorder.window_steps = settings.train.warmup_steps, settings.train.window_steps
    recorder.trained_loop = loop
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
