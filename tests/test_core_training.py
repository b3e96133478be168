"""The shared recipe: plateau schedule like torch's ReduceLROnPlateau, best weights kept, NaN named."""

import math

import numpy as np
import pytest

from cxrbench.backend.recorder import Recorder
from cxrbench.backend.timing import WaitTimer
from cxrbench.backend.training import (
    EMPTY_VALIDATION,
    EpochOutcome,
    Plateau,
    first_non_finite,
    run_recipe,
    scaled_learning_rate,
    steps_per_epoch,
    train_batches,
    train_epoch,
    validation_loss,
)
from cxrbench.data.classes import NUM_CLASSES
from cxrbench.data.prepared import PreparedData
from cxrbench.errors import DataError, TrainingDiverged
from cxrbench.suite import Settings


class ScriptedLoop:
    """An EpochLoop whose validation losses and per-step losses follow a script."""

    def __init__(self, val_losses, step_losses=None):
        self.val_losses = list(val_losses)
        self.step_losses = step_losses or {}
        self.weights = 0  # the "weights" are the epoch that produced them
        self.lrs = []
        self.syncs = 0

    def sync(self):
        self.syncs += 1

    def train_epoch(self, epoch, lr):
        self.lrs.append(lr)
        self.weights = epoch
        return EpochOutcome(np.asarray(self.step_losses.get(epoch, [0.5, 0.4])), images=32, data_wait_s=0.01)

    def validate(self):
        return self.val_losses[self.weights - 1]

    def snapshot(self):
        return self.weights

    def restore(self, snapshot):
        self.weights = snapshot


def settings(**changes):
    return Settings().replace(**changes)


@pytest.mark.backends("pytorch")  # torch is the independent reference
def test_plateau_matches_torch_reduce_lr_on_plateau():
    import torch

    values = [1.0, 0.9, 0.95, 0.95, 0.85, 0.85, 0.85, 0.84999, 0.5]
    for patience in (0, 1, 2):
        param = torch.nn.Parameter(torch.zeros(1))
        optimizer = torch.optim.SGD([param], lr=1e-3)
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.1, patience=patience)
        ours = Plateau(1e-3, factor=0.1, patience=patience)
        for value in values:
            scheduler.step(value)
            assert ours.step(value) == pytest.approx(optimizer.param_groups[0]["lr"], rel=1e-12)


def test_recipe_keeps_best_weights_and_lowers_lr_on_plateau():
    loop = ScriptedLoop(val_losses=[0.6, 0.5, 0.7, 0.8])
    recorder = Recorder()
    result = run_recipe(loop, settings(**{"train.epochs": 4, "train.plateau_patience": 0}), recorder)
    assert result["best_epoch"] == 2 and result["best_val_loss"] == 0.5
    assert loop.weights == 2  # restored
    assert loop.lrs == pytest.approx([1e-3, 1e-3, 1e-3, 1e-4])
    assert [r.best for r in recorder.history] == [True, True, False, False]
    assert [r.warmup for r in recorder.history] == [True, False, False, False]
    first = recorder.history[0]
    assert first.images == 32 and first.steps == 2 and first.train_loss == pytest.approx(0.45)
    assert first.images_per_s == pytest.approx(32 / first.train_time_s)
    assert loop.syncs == 4 * 4  # both edges of the train and the validation region, every epoch


def test_recipe_names_epoch_and_step_of_a_nan_and_keeps_best_weights():
    loop = ScriptedLoop(val_losses=[0.6, 0.5], step_losses={2: [0.4, 0.3, math.nan, math.nan]})
    recorder = Recorder()
    with pytest.raises(TrainingDiverged, match="loss is nan at epoch 2, step 3"):
        run_recipe(loop, settings(**{"train.epochs": 2}), recorder)
    assert loop.weights == 1 and len(recorder.history) == 1


def test_learning_rate_scaling_rules():
    assert scaled_learning_rate(settings(**{"train.lr_scaling": "linear"}), 4) == pytest.approx(4e-3)
    assert scaled_learning_rate(settings(**{"train.lr_scaling": "sqrt"}), 4) == pytest.approx(2e-3)
    assert scaled_learning_rate(settings(**{"train.lr_scaling": "none"}), 4) == pytest.approx(1e-3)


def test_first_non_finite_and_wait_timer():
    assert first_non_finite(np.array([1.0, np.inf])) == 2
    assert first_non_finite(np.array([1.0, 2.0])) is None
    timer = WaitTimer(iter([1, 2, 3]))
    assert list(timer) == [1, 2, 3] and timer.seconds >= 0


def test_recorder_phase_and_events():
    events = []
    recorder = Recorder([lambda name, payload: events.append((name, payload))])
    with recorder.phase("train"):
        assert recorder.phase_name == "train"
    assert recorder.phase_name == "idle"
    assert events == [("phase", {"phase": "train", "epoch": 0})]


# -- the loop helpers -------------------------------------------------------------------------------


def prepared(train: int, val: int, size: int = 8) -> PreparedData:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (train + val, size, size), dtype=np.uint8)
    labels = rng.random((train + val, NUM_CLASSES)) < 0.3
    return PreparedData.in_memory(images, labels, np.array(["train"] * train + ["val"] * val), "helpers")


def test_train_batches_follow_the_settings():
    data = prepared(train=10, val=2)
    config = settings(**{"train.batch_size": 3, "train.max_steps": 2, "train.hflip": True, "run.seed": 4})
    ours = list(train_batches(data, config, epoch=2))
    direct = list(data.batches("train", 3, epoch=2, seed=4, shuffle=True, hflip=True, max_steps=2))
    assert len(ours) == steps_per_epoch(data, config) == 2
    assert all(
        np.array_equal(a.images, b.images) and np.array_equal(a.positions, b.positions) for a, b in zip(ours, direct)
    )
    assert [len(b.positions) for b in train_batches(data, config, 1, batch_size=2, rank=1, world=2)] == [2, 2]


def test_train_epoch_times_reports_progress_and_fetches_the_losses_once():
    events, fetched = [], []
    recorder = Recorder([lambda name, payload: events.append((name, payload))])
    recorder.warmup_steps, recorder.window_steps = 1, 1

    def fetch(losses):
        fetched.append(list(losses))
        return losses

    with recorder.phase("train"):
        outcome = train_epoch(
            recorder, [3, 1, 2], lambda batch: batch / 10, epoch=5, steps=3, sync=lambda: None, images=4, fetch=fetch
        )
    assert fetched == [[0.3, 0.1, 0.2]]  # one fetch, after the last step
    np.testing.assert_array_equal(outcome.losses, [0.3, 0.1, 0.2])
    assert outcome.losses.dtype == np.float64 and outcome.images == 12 and outcome.data_wait_s >= 0
    assert [(p["epoch"], p["step"], p["steps"]) for name, p in events if name == "step"] == [
        (5, 1, 3),
        (5, 2, 3),
        (5, 3, 3),
    ]
    timer = recorder.take_timer("train")
    assert timer.steps == 3 and len(timer.windows) == 2  # the loop's batches went through the window timer


def test_train_epoch_without_batches_is_an_empty_outcome():
    outcome = train_epoch(
        Recorder(), [], lambda batch: 1 / 0, epoch=1, steps=0, sync=lambda: None, images=4, fetch=lambda losses: 1 / 0
    )
    assert outcome.losses.shape == (0,) and outcome.images == 0


def test_validation_loss_is_the_mean_per_label_over_every_image():
    data = prepared(train=4, val=7)
    config = settings(**{"train.batch_size": 3})  # batches of 3, 3, 1: the short one counts too
    logits = np.random.default_rng(1).normal(size=(7, NUM_CLASSES))
    seen = []

    def summed(batch):
        seen.append(len(batch.positions))
        z, y = logits[batch.positions], batch.labels
        return float((np.maximum(z, 0) - z * y + np.log1p(np.exp(-np.abs(z)))).sum())

    y = data.split_labels("val").astype(np.float64)
    expected = np.mean(np.maximum(logits, 0) - logits * y + np.log1p(np.exp(-np.abs(logits))))
    assert validation_loss(Recorder(), data, config, summed, lambda: None) == pytest.approx(expected, rel=1e-12)
    assert seen == [3, 3, 1]


def test_validation_loss_reduces_once_through_total():
    data = prepared(train=4, val=5)
    calls = []

    def total(sums, images):  # a framework's reduction: here as if another rank had 5 more images
        calls.append((list(sums), images))
        return 2 * float(sum(sums)), 2 * images

    loss = validation_loss(
        Recorder(), data, settings(**{"train.batch_size": 2}), lambda batch: 1.0, lambda: None, total
    )
    assert calls == [([1.0, 1.0, 1.0], 5)] and loss == pytest.approx(6.0 / (10 * NUM_CLASSES))


def test_empty_validation_split_is_a_data_error_naming_the_setting():
    with pytest.raises(DataError, match=r"data\.val_fraction") as caught:
        validation_loss(Recorder(), prepared(train=4, val=0), settings(), lambda batch: 1 / 0, lambda: None)
    assert str(caught.value) == EMPTY_VALIDATION
