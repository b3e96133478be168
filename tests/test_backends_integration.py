"""Both built-in backends, end to end on the phantom data, through the hooks alone.

* One function in two frameworks: on identical canonical weights, PyTorch and Keras agree on
  eval-mode logits and on the first training step's loss to 1e-4.
* Each backend really learns: one epoch of DenseNet-121 at 64 px from the shared initial weights
  gives a mean AUROC far above chance, and its CAMs find the phantom's findings clearly better than
  a fixed centred box does on the same images.
"""

import numpy as np
import pytest

from cxrbench.backend import canonical as weights
from cxrbench.backend.recorder import Recorder
from cxrbench.data import cache, nih, phantom
from cxrbench.data.classes import CLASSES
from cxrbench.metrics.auroc import auroc_report
from cxrbench.metrics.localisation import cam_localisation, centred_box_baseline, localisation_accuracy, upsample
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
    one_step = settings.replace(**{"train.max_steps": 1, "train.epochs": 1})
    shared = weights.init_canonical(settings.model.block_config, seed=settings.run.seed)
    losses = {}
    for name in BACKENDS:
        hook = backend(name)
        model = hook.cxrbench_build_model(settings=one_step, weights=shared)
        recorder = Recorder()
        hook.cxrbench_train(model=model, data=data, settings=one_step, recorder=recorder)
        losses[name] = recorder.history[0].train_loss
    print(f"first-step loss: {losses}")
    assert abs(losses["pytorch"] - losses["keras"]) < TOLERANCE


def boxed_test_images(data):
    """Positions of the test images with boxes, their uint8 pixels, and the truth re-indexed to them."""
    truth = data.boxes("test")
    positions = sorted({position for position, _ in truth})
    local = {position: i for i, position in enumerate(positions)}
    images = data.split_images("test")[positions]
    return images, [(local[position], box) for position, box in truth]


@pytest.mark.slow
@pytest.mark.parametrize("name", BACKENDS)
def test_one_epoch_learns_and_localises(smoke, name):
    settings, data = smoke
    hook = backend(name)
    model = hook.cxrbench_build_model(
        settings=settings, weights=weights.init_canonical(settings.model.block_config, settings.run.seed)
    )
    recorder = Recorder()
    hook.cxrbench_train(model=model, data=data, settings=settings, recorder=recorder)

    logits = hook.cxrbench_predict(model=model, images=data.split_images("test"), settings=settings)
    report = auroc_report(data.split_labels("test"), logits, CLASSES, rounds=0)

    images, truth = boxed_test_images(data)
    classes = sorted({CLASSES.index(box.label) for _, box in truth})
    cams = hook.cxrbench_cam(model=model, images=images, classes=classes, settings=settings)
    maps = upsample(cams.maps, data.size)
    cam = cam_localisation(maps, truth, classes, threshold=settings.eval.cam_threshold)
    centred = localisation_accuracy(centred_box_baseline(truth, data.size), truth, metric="iobb")
    cam_accuracy = cam["iobb"]["overall"]["accuracy"]["0.5"]
    centred_accuracy = centred["overall"]["accuracy"]["0.5"]
    print(
        f"{name}: mean AUROC {report['mean']:.3f} over {len(report['mean_over'])} classes; "
        f"T(IoBB)=0.5 accuracy CAM {cam_accuracy:.3f} vs centred box {centred_accuracy:.3f} "
        f"on {len(truth)} boxes; epoch {recorder.history[0].train_time_s:.1f} s"
    )
    assert report["mean"] > 0.75
    # Keras training on CPU is not bit-reproducible (oneDNN's threaded reductions; op determinism
    # does not cure it), and one short epoch amplifies that: eight runs gave CAM accuracy
    # 0.173-0.236 for keras (pytorch: 0.307 every time) against 0.024 for the centred box. The
    # margin sits below that spread, and still asks for several times the baseline.
    assert cam_accuracy > centred_accuracy + 0.10
