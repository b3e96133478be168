"""Two built-in backends on the smoke suite's phantom data, through the hooks alone: one function in two frameworks.

On identical canonical weights PyTorch and Keras agree to 1e-4 on eval-mode logits at full DenseNet-121 depth, and
on the first training step's loss (on-device preprocessing, training-mode BatchNorm, the loss) at the tiny
DenseNet's depth, whose layers are the same kinds: at full depth that step costs two minutes of tracing and
validation for nothing more. (That each really learns in one epoch, with CAMs that beat a centred box, is read from
the session's smoke run: tests/test_run_smoke.py.)
"""

import numpy as np
import pytest

from cxrbench.backend import canonical as weights
from cxrbench.backend.recorder import Recorder
from cxrbench.data import cache, nih, phantom
from cxrbench.data.classes import CLASSES
from cxrbench.plugins import load_plugins
from cxrbench.suite import load_suite

BACKENDS = ("pytorch", "keras")
pytestmark = pytest.mark.backends(*BACKENDS)
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """The smoke suite's data: the phantom data set prepared at 64 px."""
    settings = load_suite("smoke")
    root = phantom.synthesize(
        tmp_path_factory.mktemp("phantom"), settings.data.phantom_images, settings.data.phantom_size, settings.run.seed
    )
    index = nih.read_index(root, seed=settings.run.seed)
    data = cache.prepare(index, settings.data.image_size, cache_dir=tmp_path_factory.mktemp("prepared"))
    return settings, data


def backend(name):
    return load_plugins(backend=name).hook


def random_bn_statistics(canonical, seed):
    """Shared weights with non-trivial BatchNorm statistics, so eval mode exercises them."""
    rng = np.random.default_rng(seed)
    out = dict(canonical)
    for key, value in canonical.items():
        if key.endswith("running_mean"):
            out[key] = rng.normal(0, 0.1, value.shape).astype(np.float32)
        elif key.endswith("running_var"):
            out[key] = rng.uniform(0.5, 1.5, value.shape).astype(np.float32)
        elif key.endswith(".bias") and "norm" in key:
            out[key] = rng.normal(0, 0.1, value.shape).astype(np.float32)
    return out


def test_pytorch_and_keras_compute_the_same_function(smoke):
    settings, data = smoke
    shared = random_bn_statistics(weights.init_canonical(settings.model.block_config, seed=1), seed=2)
    images = data.split_images("test")[:8]
    logits = {}
    for name in BACKENDS:
        hook = backend(name)
        model = hook.cxrbench_build_model(settings=settings, weights=shared)
        logits[name] = hook.cxrbench_predict(model=model, images=images, settings=settings)
    difference = np.abs(logits["pytorch"] - logits["keras"]).max()
    print(f"max |logit difference| pytorch vs keras: {difference:.2e}")
    assert logits["pytorch"].shape == (8, len(CLASSES))
    assert difference < TOLERANCE


def test_first_training_step_loss_agrees(smoke):
    settings, data = smoke
    one_step = settings.replace(**{"model.arch": "densenet-tiny", "train.max_steps": 1, "train.epochs": 1})
    shared = weights.init_canonical(one_step.model.block_config, seed=settings.run.seed)
    losses = {}
    for name in BACKENDS:
        hook = backend(name)
        model = hook.cxrbench_build_model(settings=one_step, weights=shared)
        recorder = Recorder()
        hook.cxrbench_train(model=model, data=data, settings=one_step, recorder=recorder)
        losses[name] = recorder.history[0].train_loss
    print(f"first-step loss: {losses}")
    assert abs(losses["pytorch"] - losses["keras"]) < TOLERANCE
