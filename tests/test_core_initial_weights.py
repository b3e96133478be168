"""model.init resolution and the hook input contract: the core's policies, tested without any framework."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cxrbench.backend import canonical
from cxrbench.backend.initial_weights import InitialWeights, Start, resolve
from cxrbench.backend.model_inputs import check_cam_inputs, check_images
from cxrbench.data.classes import NUM_CLASSES
from cxrbench.errors import BackendError, WeightsError
from cxrbench.run import worker
from cxrbench.run.orchestrator import RunRequest, new_run
from cxrbench.suite import Settings

TINY = (1, 1, 1, 1)
TORCH_SUFFIXES = (".pt", ".pth")
KERAS_SUFFIXES = (".keras", ".weights.h5")


def settings_for(init: str, seed: int = 0) -> Settings:
    return Settings().replace(
        **{"model.arch": "densenet-tiny", "model.init": init, "run.seed": seed, "data.image_size": 32}
    )


def assert_same(got, expected) -> None:
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)


def refused(error_type: type[Exception], call, *args) -> str:
    """The one-line message of the error ``call(*args)`` must raise."""
    with pytest.raises(error_type) as caught:
        call(*args)
    message = str(caught.value)
    assert message and "\n" not in message, message
    return message


# -- resolution table -------------------------------------------------------------------------------


@pytest.mark.parametrize("init", ["shared", "framework", "imagenet", "missing.npz", "w.bin"])
def test_given_weights_win_over_every_init(init):
    weights = canonical.init_canonical(TINY, 5)
    initial = resolve(settings_for(init), weights, TORCH_SUFFIXES)
    assert initial == InitialWeights(Start.CANONICAL, "weights", weights=weights)


def test_given_weights_are_checked_against_the_architecture():
    weights = canonical.init_canonical((2, 2, 2, 2), 0)
    message = refused(WeightsError, resolve, settings_for("shared"), weights)
    assert message.startswith("weights: tensor 'features.transition1.norm.weight' has shape (128,), expected (96,)")


@pytest.mark.parametrize("seed", [0, 7])
def test_shared_is_the_seeded_canonical_init(seed):
    initial = resolve(settings_for("shared", seed), None)
    assert (initial.start, initial.origin, initial.path) == (Start.CANONICAL, "model.init = 'shared'", None)
    assert_same(initial.weights, canonical.init_canonical(TINY, seed))


@pytest.mark.parametrize("init", ["framework", "imagenet"])
def test_framework_cases_are_left_to_the_backend(init):
    assert resolve(settings_for(init), None, TORCH_SUFFIXES) == InitialWeights(Start(init), f"model.init = {init!r}")


def test_npz_file_is_read_by_the_core_for_every_backend(tmp_path):
    weights = canonical.init_canonical(TINY, 3)
    path = canonical.save(weights, tmp_path / "w.npz")
    for suffixes in ((), TORCH_SUFFIXES, KERAS_SUFFIXES):
        initial = resolve(settings_for(str(path)), None, suffixes)
        assert (initial.start, initial.origin, initial.path) == (Start.CANONICAL, str(path), None)
        assert_same(initial.weights, weights)


@pytest.mark.parametrize("tensor", ["features.conv0.weight", "classifier.bias"])
def test_npz_with_a_wrong_shape_names_the_file_and_the_tensor(tmp_path, tensor):
    weights = canonical.init_canonical(TINY, 3)
    weights[tensor] = weights[tensor][:-1]
    path = canonical.save(weights, tmp_path / "bent.npz")
    message = refused(WeightsError, resolve, settings_for(str(path)), None)
    assert message.startswith(f"{path}: tensor {tensor!r} has shape")


@pytest.mark.parametrize(
    ("name", "suffixes"),
    [
        ("w.pt", TORCH_SUFFIXES),
        ("w.pth", TORCH_SUFFIXES),
        ("w.keras", KERAS_SUFFIXES),
        ("w.weights.h5", KERAS_SUFFIXES),
    ],
)
def test_native_file_is_handed_to_the_backend(tmp_path, name, suffixes):
    path = tmp_path / name
    path.write_bytes(b"the backend reads this")
    assert resolve(settings_for(str(path)), None, suffixes) == InitialWeights(Start.NATIVE_FILE, str(path), path=path)


@pytest.mark.parametrize("name", ["w.npz", "w.pt"])
def test_missing_file_is_one_line_naming_it(tmp_path, name):
    path = tmp_path / name
    assert (
        refused(WeightsError, resolve, settings_for(str(path)), None, TORCH_SUFFIXES)
        == f"{path}: weights file not found (model.init)"
    )


@pytest.mark.parametrize(
    ("name", "suffixes", "accepted"),
    [
        ("w.pt", (), ".npz"),
        ("w.h5", KERAS_SUFFIXES, ".npz, .keras or .weights.h5"),
        ("w.keras", TORCH_SUFFIXES, ".npz, .pt or .pth"),
        ("sharde", TORCH_SUFFIXES, ".npz, .pt or .pth"),
    ],
)
def test_unsupported_suffix_names_the_file_and_what_the_backend_reads(tmp_path, name, suffixes, accepted):
    path = tmp_path / name
    path.write_bytes(b"")
    suffix = repr(Path(name).suffix) if Path(name).suffix else "'(none)'"
    assert refused(WeightsError, resolve, settings_for(str(path)), None, suffixes) == (
        f"{path}: unsupported weights file type {suffix} for model.init (this backend reads {accepted}; "
        "or use 'shared', 'framework' or 'imagenet')"
    )


# -- "shared" is what the worker passes ------------------------------------------------------------


class RecordingHook:
    """The one hook ``worker.build_model`` calls, recording the weights it passes."""

    def __init__(self):
        self.weights = None

    def cxrbench_build_model(self, settings, weights):
        self.weights = weights
        return "model"


@pytest.mark.backends("numpy")
def test_shared_equals_the_run_folders_shared_init_files(tmp_path):
    """The orchestrator writes shared_init*.npz, one per repeat seed; the worker passes them to the backend.
    For every seed that is exactly what the core resolves for init = "shared" without weights."""
    settings = settings_for("shared", seed=4).replace(
        **{
            "run.repeats": 2,
            "data.phantom_images": 40,
            "data.phantom_size": 32,
            "train.batch_size": 4,
            "train.warmup_steps": 1,
        }
    )
    orchestrator = new_run(RunRequest(settings, backends=["numpy"], out=tmp_path / "run"))
    orchestrator.prepare()
    for seed in orchestrator.seeds():
        hook = RecordingHook()
        worker.build_model(hook, settings.replace(**{"run.seed": seed}), tmp_path / "run", "numpy", settings.run.seed)
        assert_same(hook.weights, resolve(settings.replace(**{"run.seed": seed}), None).weights)
    assert orchestrator.seeds() == [4, 5]


# -- the input contract ----------------------------------------------------------------------------


def test_images_of_the_contract_pass_unchanged():
    images = np.zeros((3, 32, 32), np.uint8)
    assert check_images(images, 32) is images
    assert check_images(images[:0], 32).shape == (0, 32, 32)
    checked, classes = check_cam_inputs(images, (np.int64(13), 0), 32)
    assert checked is images and classes == [13, 0] and all(type(c) is int for c in classes)


@pytest.mark.parametrize(
    ("images", "got"),
    [
        (np.zeros((2, 32, 32), np.float32), "float32 (2, 32, 32)"),
        (np.zeros((32, 32), np.uint8), "uint8 (32, 32)"),
        (np.zeros((2, 32, 32, 3), np.uint8), "uint8 (2, 32, 32, 3)"),
        (np.zeros((2, 32, 64), np.uint8), "uint8 (2, 32, 64)"),
        (np.zeros((2, 64, 64), np.uint8), "uint8 (2, 64, 64)"),
        ([[[0] * 32] * 32], "int64 (1, 32, 32)"),
    ],
)
def test_images_outside_the_contract_are_one_line(images, got):
    expected = f"images must be uint8 (N, S, S), got {got} (S = data.image_size = 32)"
    assert refused(BackendError, check_images, images, 32) == expected
    assert refused(BackendError, check_cam_inputs, images, [0], 32) == expected


def test_images_too_small_for_densenet_say_why():
    message = refused(BackendError, check_images, np.zeros((1, 16, 16), np.uint8), 32)
    assert message.startswith("image size 16 px is too small for DenseNet")


@pytest.mark.parametrize(
    ("count", "classes", "expected"),
    [
        (0, [0], "CAM needs at least one image, got none"),
        (1, [], f"CAM classes must be indices 0..{NUM_CLASSES - 1}, got []"),
        (1, [NUM_CLASSES], f"CAM classes must be indices 0..{NUM_CLASSES - 1}, got [{NUM_CLASSES}]"),
        (1, [2, -1], f"CAM classes must be indices 0..{NUM_CLASSES - 1}, got [2, -1]"),
    ],
)
def test_cam_inputs_need_images_and_known_classes(count, classes, expected):
    assert refused(BackendError, check_cam_inputs, np.zeros((count, 32, 32), np.uint8), classes, 32) == expected
