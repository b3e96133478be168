"""The shared recipe: plateau schedule like torch's ReduceLROnPlateau, best weights kept, NaN named."""

import math

import numpy as np
import pytest

from cxrbench.errors import TrainingDiverged
from cxrbench.recorder import Recorder, WaitTimer
from cxrbench.suite import Settings
from cxrbench.training import EpochOutcome, Plateau, first_non_finite, run_recipe, scaled_learning_rate


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


def test_plateau_matches_torch_reduce_lr_on_plateau():
    torch = pytest.importorskip("torch")
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
