"""Published checkpoints in: files written in exactly the layouts people publish, imported to canonical weights,
then the same logits in every backend and equal to the original framework model's own output.

Layouts: a torchvision DenseNet state_dict (``torch.save(net.state_dict())``); the CheXNet reimplementation's
``model.pth.tar`` (``{"epoch", "state_dict", "optimizer"}``, DataParallel's ``module.densenet121.`` prefix, the
released key names ``norm.1``/``conv.2`` and a ``classifier.0`` Linear before a Sigmoid, in torch's legacy
serialisation as that file was written); a ``keras.applications`` DenseNet + ``Dense(14)`` saved as legacy ``.h5``,
``.keras`` and ``.weights.h5``. Models are densenet-tiny at 64 px with random weights and BatchNorm statistics.

Tolerances: backends on the imported weights agree within 1e-4 (``run.equivalence_atol``); against the original
model 1e-4 as well (Keras' own DenseNet uses BatchNorm epsilon 1.001e-5, cxrbench 1e-5: a difference far below it).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cxrbench.backend import canonical, checkpoints
from cxrbench.backend.initial_weights import same_start
from cxrbench.cli import main
from cxrbench.data.classes import NUM_CLASSES
from cxrbench.deploy.onnx_file import normalise
from cxrbench.errors import WeightsError
from cxrbench.files import sha256_of
from cxrbench.plugins import load_plugins
from cxrbench.run.folder import IMPORTED_INIT
from cxrbench.run.orchestrator import RunRequest, new_run
from cxrbench.suite import ARCHITECTURES
from cxrbench.testing.conformance import assert_one_line, kit_settings, open_backend, random_canonical, random_images

TINY = ARCHITECTURES["densenet-tiny"]
SIZE = 64
ATOL = 1e-4


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return random_images(3, SIZE, seed=5)


@pytest.fixture(scope="module")
def plugins():
    return load_plugins()


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x.astype(np.float64)))


# -- writers: each returns (path, the original model's own output on ``images``, "logits" or "probabilities") ---


def torch_densenet(block_config=TINY, classes=NUM_CLASSES, seed=0):
    import torch
    import torchvision

    torch.manual_seed(seed)
    net = torchvision.models.DenseNet(block_config=block_config, num_classes=classes)
    ranges = {"running_var": (0.5, 1.5), "running_mean": (-0.2, 0.2), "bias": (-0.2, 0.2)}
    with torch.no_grad():
        for name, tensor in net.state_dict().items():
            part = name.rsplit(".", 1)[-1]
            if part in ranges:
                tensor.uniform_(*ranges[part])
            elif "norm" in name and part == "weight":
                tensor.uniform_(0.8, 1.2)
    return net.eval()


def torch_output(net, images: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return net(torch.from_numpy(normalise(images, "NCHW"))).numpy()


def write_torchvision(folder: Path, images: np.ndarray):
    import torch

    net = torch_densenet()
    path = folder / "densenet.pth"
    torch.save(net.state_dict(), path)
    return path, torch_output(net, images), "logits"


def old_names(key: str) -> str:
    for part in ("norm", "relu", "conv"):
        for i in (1, 2):
            key = key.replace(f".{part}{i}.", f".{part}.{i}.") if "denselayer" in key else key
    return key


def write_chexnet(folder: Path, images: np.ndarray):
    """arnoweng/CheXNet's model: ``DenseNet121`` wrapping torchvision's net as ``self.densenet121`` with
    ``classifier = Sequential(Linear, Sigmoid)``, trained under ``nn.DataParallel``, saved with its optimizer."""
    import torch
    from torch import nn

    class DenseNet121(nn.Module):
        def __init__(self):
            super().__init__()
            self.densenet121 = torch_densenet(seed=1)
            features = self.densenet121.classifier.in_features
            linear = nn.Linear(features, NUM_CLASSES)
            self.densenet121.classifier = nn.Sequential(linear, nn.Sigmoid())

        def forward(self, x):
            return self.densenet121(x)

    model = nn.DataParallel(DenseNet121()).eval()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.zeros(1, 3, 32, 32)).sum().backward()
    optimizer.step()
    model.zero_grad()
    state = {old_names(key): value for key, value in model.state_dict().items()}
    assert "module.densenet121.classifier.0.weight" in state and any(".norm.1." in key for key in state)
    path = folder / "model.pth.tar"
    torch.save(
        {"epoch": 7, "state_dict": state, "best_loss": 0.12, "optimizer": optimizer.state_dict()},
        path,
        _use_new_zipfile_serialization=False,
    )
    return path, torch_output(model, images), "probabilities"


def keras_densenet(block_config=TINY, top="predictions", classes=NUM_CLASSES, seed=0):
    import keras
    from keras.src.applications.densenet import DenseNet

    base = DenseNet(
        blocks=list(block_config), include_top=False, weights=None, input_shape=(SIZE, SIZE, 3), pooling="avg"
    )
    model = keras.Model(base.inputs, keras.layers.Dense(classes, name=top)(base.outputs[0]))
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if layer.weights:
            values = [
                rng.uniform(0.5, 1.5, w.shape)
                if "variance" in w.name or "gamma" in w.name
                else rng.normal(0.0, 0.1, w.shape)
                for w in layer.weights
            ]
            layer.set_weights([v.astype(np.float32) for v in values])
    return model


def save_keras(network, path: Path) -> None:
    """Keras 3 writes ``.weights.h5`` with ``save_weights`` only; ``.keras`` and legacy ``.h5`` with ``save``."""
    if path.name.endswith(".weights.h5"):
        network.save_weights(path)
    else:
        network.save(path)


def write_keras(folder: Path, images: np.ndarray, suffix: str):
    model = keras_densenet()
    path = folder / f"densenet{suffix}"
    save_keras(model, path)
    return path, np.asarray(model(normalise(images, "NHWC"), training=False)), "logits"


WRITERS = {
    "torchvision.pth": (("pytorch",), write_torchvision),
    "chexnet.pth.tar": (("pytorch",), write_chexnet),
    "keras-legacy.h5": (("keras",), lambda folder, images: write_keras(folder, images, ".h5")),
    "keras.keras": (("keras",), lambda folder, images: write_keras(folder, images, ".keras")),
    "keras.weights.h5": (("keras",), lambda folder, images: write_keras(folder, images, ".weights.h5")),
}


# -- the same function in every backend ------------------------------------------------------------


@pytest.mark.backends("pytorch", "keras", "numpy")
@pytest.mark.parametrize("layout", WRITERS)
def test_imported_checkpoint_gives_the_originals_logits_in_every_backend(tmp_path, images, plugins, layout):
    path, original, kind = WRITERS[layout][1](tmp_path, images)
    weights = checkpoints.import_checkpoint(path, TINY, plugins)
    assert set(weights) == set(canonical.densenet_spec(TINY))
    settings = kit_settings(SIZE, **{"model.arch": "densenet-tiny"})
    logits = {}
    for name in ("pytorch", "keras", "numpy"):
        backend = open_backend(name, [])
        logits[name] = backend.predict(backend.build(settings, weights), images, settings)
    for name, got in logits.items():
        np.testing.assert_allclose(got, logits["pytorch"], atol=ATOL, rtol=0, err_msg=f"{name} vs pytorch")
        mine = sigmoid(got) if kind == "probabilities" else got
        np.testing.assert_allclose(mine, original, atol=ATOL, rtol=0, err_msg=f"{name} vs the original {layout}")


def save_keras_network(model, path: Path) -> None:
    save_keras(model.network, path)


def save_torch_network(model, path: Path) -> None:
    import torch

    torch.save(model.net.state_dict(), path)


#: Each backend's own files, written from its model object.
OWN_FILES = [
    pytest.param(name, suffix, save, id=f"{name}{suffix}", marks=pytest.mark.backends(name))
    for name, save, suffixes in (
        ("keras", save_keras_network, (".keras", ".weights.h5", ".h5")),
        ("pytorch", save_torch_network, (".pth",)),
    )
    for suffix in suffixes
]


@pytest.mark.parametrize(("name", "suffix", "save"), OWN_FILES)
def test_a_backends_own_files_import_bitwise(tmp_path, plugins, name, suffix, save):
    """What a backend writes itself comes back exactly: the weights it was built from, bit for bit."""
    settings = kit_settings(SIZE, **{"model.arch": "densenet-tiny"})
    weights = random_canonical(TINY, seed=21)
    path = tmp_path / f"own{suffix}"
    save(open_backend(name, []).build(settings, weights), path)
    got = checkpoints.import_checkpoint(path, TINY, plugins)
    assert got.keys() == weights.keys()
    for key, value in weights.items():
        np.testing.assert_array_equal(got[key], value, err_msg=key)


# -- bad checkpoints: one line each, naming the file -----------------------------------------------


def _save_state(path: Path, state) -> None:
    import torch

    torch.save(state, path)


def _unknown_keys(path: Path) -> str:
    import torch

    _save_state(path, {**torch_densenet().state_dict(), "fc.weight": torch.zeros(3)})
    return r"unknown tensor 'fc\.weight' \(1 not in a DenseNet's layout\)"


def _wrong_architecture(path: Path) -> str:
    _save_state(path, torch_densenet(block_config=(2, 2, 2, 2)).state_dict())
    return r"holds a DenseNet with blocks \(2, 2, 2, 2\) \(densenet-small\), not \(1, 1, 1, 1\) \(densenet-tiny\)"


def _imagenet_head(path: Path) -> str:
    _save_state(path, torch_densenet(classes=1000).state_dict())
    return r"its classifier has 1000 classes, not the 14 of ChestX-ray14"


def _truncated(path: Path) -> str:
    _save_state(path, torch_densenet().state_dict())
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return r"not a readable torch checkpoint"


class Pickled:
    """Any object a checkpoint might pickle: ``weights_only`` loading refuses it."""


def _arbitrary_object(path: Path) -> str:
    _save_state(path, {"state_dict": torch_densenet().state_dict(), "extra": Pickled()})
    return rf"refused: it pickles {__name__}\.Pickled, not only tensors and plain containers"


BAD_TORCH = {
    "unknown keys": _unknown_keys,
    "wrong architecture": _wrong_architecture,
    "1000-class head": _imagenet_head,
    "truncated": _truncated,
    "arbitrary object": _arbitrary_object,
}


def _keras_wrong_architecture(path: Path) -> str:
    keras_densenet(block_config=(2, 2, 2, 2)).save(path)
    return r"holds a DenseNet with blocks \(2, 2, 2, 2\)"


def _keras_two_heads(path: Path) -> str:
    import keras

    model = keras_densenet()
    keras.Model(model.inputs, keras.layers.Dense(14, name="extra")(model.outputs[0])).save(path)
    return r"unknown layer '(predictions|extra)' \(2 not in a keras\.applications DenseNet with one Dense top\)"


def _keras_truncated(path: Path) -> str:
    keras_densenet().save(path)
    path.write_bytes(path.read_bytes()[:4096])
    return r"not a readable HDF5 file"


def _keras_imagenet_head(path: Path) -> str:
    keras_densenet(classes=1000).save(path)
    return r"its classifier has 1000 classes"


BAD_KERAS = {
    "wrong architecture": _keras_wrong_architecture,
    "unknown keys": _keras_two_heads,
    "truncated": _keras_truncated,
    "1000-class head": _keras_imagenet_head,
}


#: Each bad file, written with the suffix of its framework, for the backend that must refuse it.
BAD_FILES = [
    pytest.param(writer, suffix, id=f"{backend} {kind}", marks=pytest.mark.backends(backend))
    for backend, suffix, writers in (("pytorch", ".pth", BAD_TORCH), ("keras", ".h5", BAD_KERAS))
    for kind, writer in writers.items()
]


@pytest.mark.parametrize(("writer", "suffix"), BAD_FILES)
def test_bad_checkpoint_is_one_line_naming_the_file(tmp_path, plugins, writer, suffix):
    path = tmp_path / f"bad{suffix}"
    pattern = writer(path)
    with pytest.raises(WeightsError, match=rf"^{tmp_path}/bad\{suffix}: .*{pattern}") as caught:
        checkpoints.import_checkpoint(path, TINY, plugins)
    assert_one_line(caught.value)


def test_a_file_no_backend_reads_names_what_to_install(tmp_path, plugins):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\0" * 16)
    with pytest.raises(WeightsError) as caught:
        checkpoints.import_checkpoint(path, TINY, plugins)
    assert str(caught.value) == (
        f"no installed backend reads {path} (suffix .bin): install cxrbench-pytorch for "
        f".pth/.pt/.pth.tar, cxrbench-keras for .h5/.keras"
    )
    with pytest.raises(WeightsError, match=r"missing\.pth: checkpoint file not found"):
        checkpoints.import_checkpoint(tmp_path / "missing.pth", TINY, plugins)


def test_every_backend_starts_alike_from_shared_or_a_weights_file():
    """The run's equivalence check runs then, an imported checkpoint (the run's imported_init.npz) included."""
    assert same_start("shared") and same_start(f"/runs/r/{IMPORTED_INIT}") and same_start("w.npz")
    assert not same_start("framework") and not same_start("imagenet") and not same_start("model.pth.tar")


def test_found_block_config_reads_the_layer_names():
    assert checkpoints.found_block_config(canonical.densenet_spec(ARCHITECTURES["densenet121"])) == (6, 12, 24, 16)
    assert checkpoints.found_block_config({"classifier.weight": 0}) == ()


# -- the command and the run -----------------------------------------------------------------------


@pytest.mark.backends("pytorch")
def test_weights_import_command_writes_canonical_npz(tmp_path, images, capsys):
    path, _, _ = write_chexnet(tmp_path, images)
    out = tmp_path / "w.npz"
    assert main(["weights", "import", str(path), "--out", str(out), "--arch", "densenet-tiny"]) == 0
    printed = capsys.readouterr().out
    count = len(canonical.densenet_spec(TINY))
    assert printed.startswith(f"{out}: {count} canonical tensors of densenet-tiny from {path} (sha256 ")
    written = canonical.load(out)
    canonical.validate(written, TINY)
    assert main(["weights", "import", str(path), "--out", str(tmp_path / "x.npz")]) == 2  # densenet121 by default
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "holds a DenseNet with blocks (1, 1, 1, 1) (densenet-tiny)" in error
    assert not (tmp_path / "x.npz").exists()


@pytest.mark.backends("pytorch", "numpy")
def test_run_converts_model_init_once_and_records_its_source(tmp_path, images):
    path, _, _ = write_torchvision(tmp_path, images)
    settings = kit_settings(
        32,
        **{
            "model.arch": "densenet-tiny",
            "model.init": str(path),
            "data.phantom_images": 40,
            "data.phantom_size": 32,
            "train.warmup_steps": 1,
        },
    )
    orchestrator = new_run(RunRequest(settings, backends=["numpy"], out=tmp_path / "run"))
    orchestrator.prepare()
    converted = tmp_path / "run" / IMPORTED_INIT
    assert orchestrator.settings.model.init == str(converted.absolute())
    record = orchestrator.run["init_checkpoint"]
    assert record == {
        "source": str(path),
        "sha256": sha256_of(path),
        "file": IMPORTED_INIT,
        "tensors": len(canonical.densenet_spec(TINY)),
    }
    expected = checkpoints.import_checkpoint(path, TINY, load_plugins())
    written = canonical.load(converted)
    for name, value in expected.items():
        np.testing.assert_array_equal(written[name], value, err_msg=name)


@pytest.mark.backends("numpy")
def test_run_refuses_a_bad_checkpoint_before_the_folder_exists(tmp_path):
    path = tmp_path / "w.bin"
    path.write_bytes(b"x")
    settings = kit_settings(32, **{"model.init": str(path)})
    with pytest.raises(WeightsError, match="no installed backend reads"):
        new_run(RunRequest(settings, backends=["numpy"], out=tmp_path / "run"))
    assert not (tmp_path / "run").exists()
