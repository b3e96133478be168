"""The conformance kit: the contract every cxrbench backend must meet, as ordinary pytest tests.

Run it with ``pytest --cxrbench-backend NAME`` (see :mod:`cxrbench.testing.pytest_plugin`). The
backend is reached exactly as a worker reaches it: through its own plugin manager
(:func:`cxrbench.plugins.load_plugins` with ``backend=NAME``), by hook calls only. Models are tiny
(``densenet-tiny``, 32 and 64 px) so the whole kit takes seconds to a minute on a CPU;
``--cxrbench-arch densenet121`` runs every test at full DenseNet-121 depth instead (same image sizes).

Tolerances: logits computed twice on the same weights agree within 1e-6 (bitwise on a CPU; a GPU
may pick kernels nondeterministically); the CAM identity holds within 1e-4; ONNX Runtime matches
``cxrbench_predict`` within atol 1e-4 / rtol 1e-3 (the float32 gate of ``export.atol/rtol``), and so does a
CAM computed from the export alone against ``cxrbench_cam``'s maps; two
backends on the same canonical weights agree within ``run.equivalence_atol`` (1e-4); the reference
backend computes its logits in a child process of its own (see :func:`reference_logits`).

Divergence is injected with an infinite learning rate: after the first Adam step every trained
weight is infinite or NaN, so the next loss (training or validation) is not finite, whatever the
framework. No other way works for every backend: labels cannot make BCE NaN, and a merely huge
learning rate stays finite for a backend that trains only a linear layer.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import math
import os
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cxrbench.backend import numerics_record
from cxrbench.backend.api import BackendInfo, CamResult, EpochRecord, ExportInfo, IdiomaticLoop
from cxrbench.backend.canonical import densenet_spec, init_canonical
from cxrbench.backend.profiling import INPUT_REGION, PEAK_FIRST_SIZE, PROFILE_REGION, PeakFlops
from cxrbench.backend.recorder import Recorder
from cxrbench.data.classes import NUM_CLASSES
from cxrbench.data.prepared import PreparedData
from cxrbench.deploy import onnx_file
from cxrbench.errors import BackendError, CxrError, DataError, TrainingDiverged, WeightsError
from cxrbench.metrics import step_profile
from cxrbench.metrics.operation_categories import Classifier, collect_rules
from cxrbench.plugins import FRAMEWORKS, Plugins, load_plugins, require_answer
from cxrbench.run.profiling import run_profiled_steps
from cxrbench.suite import Settings

SIZES = (32, 64)
DEFAULT_ARCH = "densenet-tiny"
REPEAT_ATOL = 1e-6
#: Steps of a backend's idiomatic loop in the kit (it cycles a few in-memory batches).
IDIOMATIC_STEPS = 8
CAM_ATOL = 1e-4
#: Frameworks whose import would make discovery slow (plus the backend's own framework).
HEAVY_MODULES = frozenset(FRAMEWORKS)


# -- helpers any test of a backend can use --------------------------------------------------------


def kit_settings(image_size: int = 32, **dotted: Any) -> Settings:
    """Small validated settings: :data:`DEFAULT_ARCH`, framework init, batch 4; ``dotted`` overrides."""
    base = {"model.arch": DEFAULT_ARCH, "model.init": "framework", "data.image_size": image_size, "train.batch_size": 4}
    return Settings().replace(**{**base, **dotted})


@dataclass(frozen=True)
class KitOptions:
    """What one kit session was asked for on the command line, handed to every kit test by the ``kit`` fixture.

    Passed explicitly rather than kept in module state, so a kit session run inside another (pytester) or beside
    other tests changes nothing for them.
    """

    arch: str = DEFAULT_ARCH  #: ``model.arch`` of every kit model (``--cxrbench-arch``)

    def settings(self, image_size: int = 32, **dotted: Any) -> Settings:
        """:func:`kit_settings` at this session's architecture."""
        return kit_settings(image_size, **{"model.arch": self.arch, **dotted})


def random_canonical(block_config: tuple[int, ...], seed: int) -> dict[str, np.ndarray]:
    """Seeded canonical weights with random BatchNorm affine parameters and statistics and a
    random classifier bias, so no layer is an identity and a wrongly mapped tensor shows."""
    rng = np.random.default_rng([seed, 1])
    weights = init_canonical(block_config, seed)
    for name, value in weights.items():
        is_norm_scale = name.endswith("running_var") or (name.endswith(".weight") and value.ndim == 1)
        if is_norm_scale:
            weights[name] = rng.uniform(0.5, 1.5, value.shape).astype(np.float32)
        elif name.endswith(("running_mean", "bias")):
            weights[name] = rng.normal(0.0, 0.2, value.shape).astype(np.float32)
    return weights


def random_images(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng([seed, 2]).integers(0, 256, (n, size, size), dtype=np.uint8)


def synthetic_data(size: int, train: int = 8, val: int = 8, seed: int = 0) -> PreparedData:
    """A prepared data set built in memory (random images and labels, one patient per image)."""
    n = train + val
    labels = np.random.default_rng([seed, 3]).random((n, NUM_CLASSES)) < 0.3
    split = np.array(["train"] * train + ["val"] * val)
    return PreparedData.in_memory(
        random_images(n, size, seed), labels, split, f"conformance-kit-{size}-{seed}", "conformance-kit"
    )


def bce_with_logits(logits: np.ndarray, labels: np.ndarray) -> float:
    """Mean binary cross-entropy over every element, computed in float64 as the independent reference."""
    z, y = np.asarray(logits, np.float64), np.asarray(labels, np.float64)
    return float(np.mean(np.maximum(z, 0) - z * y + np.log1p(np.exp(-np.abs(z)))))


def assert_one_line(error: BaseException) -> None:
    message = str(error)
    assert message and "\n" not in message, f"error message must be one line: {message!r}"


@dataclass
class Backend:
    """One backend behind its own plugin manager; every call must be answered."""

    name: str
    plugins: Plugins

    @property
    def info(self) -> BackendInfo:
        return self.plugins.backends[self.name]

    def call(self, hook: str, **kwargs: Any) -> Any:
        return require_answer(getattr(self.plugins.hook, hook)(**kwargs), hook, self.name)

    def build(self, settings: Settings, weights: dict[str, np.ndarray] | None = None) -> Any:
        return self.call("cxrbench_build_model", settings=settings, weights=weights)

    def weights(self, model: Any) -> dict[str, np.ndarray]:
        return self.call("cxrbench_get_weights", model=model)

    def predict(self, model: Any, images: np.ndarray, settings: Settings) -> np.ndarray:
        return self.call("cxrbench_predict", model=model, images=images, settings=settings)

    def cam(self, model: Any, images: np.ndarray, classes: list[int], settings: Settings) -> CamResult:
        return self.call("cxrbench_cam", model=model, images=images, classes=classes, settings=settings)


def open_backend(name: str, extra_modules: list[str]) -> Backend:
    return Backend(name, load_plugins(extra_modules, backend=name))


def equivalence_inputs(size: int, model_arch: str) -> tuple[Settings, dict[str, np.ndarray], np.ndarray]:
    """Settings, weights and images of the equivalence test at ``model_arch``: seeded, so every process makes the
    same."""
    settings = kit_settings(size, **{"model.arch": model_arch})
    return settings, random_canonical(settings.model.block_config, seed=10), random_images(4, size)


def reference_worker(name: str, extra_modules: list[str], out: str, model_arch: str) -> None:
    """Child-process side of the equivalence test: backend ``name``'s logits for every kit size, at ``model_arch``."""
    reference = open_backend(name, extra_modules)
    logits = {}
    for size in SIZES:
        settings, weights, images = equivalence_inputs(size, model_arch)
        logits[str(size)] = reference.predict(reference.build(settings, weights), images, settings)
    np.savez(out, **logits)


def logits_in_child_process(name: str, extra_modules: list[str], out: Path, model_arch: str) -> dict[int, np.ndarray]:
    """Run :func:`reference_worker` in a fresh Python and read back its logits by image size."""
    script = (
        "import json, sys\nfrom cxrbench.testing.conformance import reference_worker\n"
        "reference_worker(sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], sys.argv[4])\n"
    )
    command = [sys.executable, "-c", script, name, json.dumps(extra_modules), str(out), model_arch]
    done = subprocess.run(command, capture_output=True, text=True, env=child_env(), timeout=600)
    if done.returncode != 0:
        pytest.fail(
            f"reference backend {name!r} failed in its process (exit {done.returncode}): {done.stderr.strip()[-2000:]}"
        )
    with np.load(out) as npz:
        return {int(size): npz[size] for size in npz.files}


def child_env() -> dict[str, str]:
    """The environment of a child Python that must import what this one can (plugins on sys.path)."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}


# -- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def kit(pytestconfig: pytest.Config) -> KitOptions:
    """This session's :class:`KitOptions`, from the ``--cxrbench-*`` options."""
    return KitOptions(arch=pytestconfig.getoption("cxrbench_arch") or DEFAULT_ARCH)


@pytest.fixture(scope="session")
def backend(pytestconfig: pytest.Config) -> Backend:
    name = pytestconfig.getoption("cxrbench_backend")
    if name is None:
        pytest.skip("the conformance kit runs with --cxrbench-backend NAME")
    return open_backend(name, pytestconfig.getoption("cxrbench_plugin"))


@pytest.fixture(scope="session")
def reference_logits(
    pytestconfig: pytest.Config, kit: KitOptions, backend: Backend, tmp_path_factory
) -> tuple[str, dict[int, np.ndarray]]:
    """The reference backend's logits on :func:`equivalence_inputs`, computed in a child process.

    The reference is ``--cxrbench-reference``, or pytorch when installed. It runs in its own
    process, like every cxrbench worker: two frameworks in one process can crash outright
    (here, importing torch._dynamo after tensorflow segfaults) and fight over GPU memory.
    """
    extras = pytestconfig.getoption("cxrbench_plugin")
    name = pytestconfig.getoption("cxrbench_reference") or "pytorch"
    if name == backend.name:
        pytest.skip(
            f"the reference backend {name!r} is the backend under test (choose another with --cxrbench-reference)"
        )
    if name not in load_plugins(extras).backends:
        pytest.skip(f"no reference backend: {name!r} is not installed")
    out = tmp_path_factory.mktemp("reference") / "logits.npz"
    return name, logits_in_child_process(name, extras, out, kit.arch)


@pytest.fixture(scope="module", params=SIZES, ids=lambda s: f"{s}px")
def exported(request, kit: KitOptions, backend: Backend, tmp_path_factory) -> tuple[Settings, Any, ExportInfo]:
    """A model with random weights, exported once per image size."""
    settings = kit.settings(request.param)
    model = backend.build(settings, random_canonical(settings.model.block_config, seed=11))
    path = tmp_path_factory.mktemp(f"onnx-{request.param}") / "model.onnx"
    info = backend.call("cxrbench_export_onnx", model=model, path=str(path), settings=settings)
    return settings, model, info


# -- discovery ------------------------------------------------------------------------------------


def test_metric_plugins_take_patient_groups(kit: KitOptions, backend: Backend):
    """Every ``cxrbench_evaluate`` answer (the core's and any --cxrbench-plugin's) is a JSON-able dict or None
    when called with the patient of each row; the core's AUROC intervals then resample patients. A plugin
    without ``groups`` still works but is named (its intervals treat images as independent)."""
    from cxrbench.run.stages import independence_notes

    rng = np.random.default_rng(0)
    labels = (rng.random((40, NUM_CLASSES)) < 0.5).astype(np.uint8)
    scores, groups = rng.random((40, NUM_CLASSES)), np.repeat(np.arange(10), 4)
    caller = backend.plugins.hook.cxrbench_evaluate
    answers = caller(
        labels=labels,
        scores=scores,
        classes=[f"c{i}" for i in range(NUM_CLASSES)],
        groups=groups,
        settings=kit.settings(**{"eval.bootstrap_rounds": 20, "eval.min_positives": 2}),
    )
    for answer in answers:
        assert answer is None or isinstance(answer, dict), f"cxrbench_evaluate must return a dict or None: {answer!r}"
        json.dumps(answer, allow_nan=False)
    [core] = [a["auroc"] for a in answers if a and "auroc" in a]
    assert core["resampling"] == "patients" and core["patients"] == 10
    for note in independence_notes(caller):
        warnings.warn(note, stacklevel=1)


def test_dataset_is_the_cores(kit: KitOptions, backend: Backend, tmp_path: Path):
    """``cxrbench_dataset`` is the core's: no backend or extra plugin may answer first for its sources, or the
    backends would no longer train on the same images."""
    from cxrbench.data import nih, phantom

    root = phantom.synthesize(tmp_path / "phantom", images=phantom.MIN_IMAGES, size=phantom.MIN_SIZE, seed=0)
    settings = kit.settings(**{"data.source": "phantom", "data.path": str(root)})
    index = require_answer(backend.plugins.hook.cxrbench_dataset(settings=settings), "cxrbench_dataset", backend.name)
    expected = nih.read_index(
        root,
        split=settings.data.split,
        val_fraction=settings.data.val_fraction,
        seed=settings.run.seed,
        source="phantom",
    )
    assert index.files == expected.files and index.source == "phantom"
    np.testing.assert_array_equal(index.labels, expected.labels)
    np.testing.assert_array_equal(index.split, expected.split)


def test_report_sections_are_title_html_pairs(backend: Backend, tmp_path: Path):
    """Every ``cxrbench_report_sections`` answer (the backend's and any --cxrbench-plugin's) is None or a list
    of ``(title, html)`` string pairs, given the run folder's run.json as a dict plus its path."""
    run = {"schema_version": 1, "backends": {backend.name: {"status": "done"}}, "path": str(tmp_path)}
    for answer in backend.plugins.hook.cxrbench_report_sections(run=run):
        assert answer is None or isinstance(answer, list), f"must return a list or None: {answer!r}"
        for section in answer or ():
            assert isinstance(section, tuple) and len(section) == 2, section
            assert all(isinstance(part, str) for part in section), section


def test_record_scalars_answers_are_notes_or_none(backend: Backend, tmp_path: Path):
    """Every ``cxrbench_record_scalars`` answer (the built-in TensorBoard writer's, the backend's and any
    --cxrbench-plugin's) takes one backend's per-epoch records and returns None or one line for the user."""
    records = [
        {"step": 1, "wall_time": None, "scalars": {"loss/train": 0.7, "loss/validation": 0.69}},
        {"step": 2, "wall_time": 1.0e9, "scalars": {"loss/train": 0.6, "auroc/mean": 0.5}},
    ]
    for answer in backend.plugins.hook.cxrbench_record_scalars(run_dir=tmp_path, backend=backend.name, records=records):
        assert answer is None or (isinstance(answer, str) and "\n" not in answer), f"must be None or a line: {answer!r}"


def test_backend_info_describes_the_backend(backend: Backend):
    info = backend.info
    assert info.name == backend.name
    assert info.version == importlib.metadata.version(info.framework), (
        "version must come from the framework's package metadata"
    )
    assert info.onnx_layout in ("NCHW", "NHWC")


def test_backend_info_imports_no_framework(backend: Backend):
    """Discovery must stay cheap: importing the plugin and asking for its info loads no framework."""
    script = (
        "import importlib, json, sys\n"
        "import cxrbench.plugins\n"
        "before = set(sys.modules)\n"
        "importlib.import_module(sys.argv[1]).cxrbench_backend_info()\n"
        "print(json.dumps(sorted(set(sys.modules) - before)))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, backend.info.plugin],
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    new_roots = {name.partition(".")[0] for name in json.loads(done.stdout)}
    framework_roots = {
        m for m, dists in importlib.metadata.packages_distributions().items() if backend.info.framework in dists
    }
    assert not new_roots & (HEAVY_MODULES | framework_roots)


def test_devices_list_the_cpu_then_the_gpus_the_framework_sees(backend: Backend):
    devices = backend.call("cxrbench_devices")
    assert isinstance(devices, list) and devices and devices[0] == "cpu", devices
    assert all(isinstance(device, str) and device for device in devices), devices


# -- shapes and dtypes ----------------------------------------------------------------------------


@pytest.mark.parametrize("size", SIZES)
def test_predict_returns_float32_logits(kit: KitOptions, backend: Backend, size: int):
    settings = kit.settings(size)
    logits = backend.predict(backend.build(settings), random_images(3, size), settings)
    assert isinstance(logits, np.ndarray) and logits.dtype == np.float32
    assert logits.shape == (3, NUM_CLASSES)
    assert np.isfinite(logits).all()


def test_predict_is_independent_of_the_batch_size(kit: KitOptions, backend: Backend):
    settings = kit.settings(32)
    model = backend.build(settings)
    images = random_images(5, 32)
    whole = backend.predict(model, images, settings.replace(**{"train.batch_size": 8}))
    batched = backend.predict(model, images, settings.replace(**{"train.batch_size": 2}))
    np.testing.assert_allclose(batched, whole, rtol=0, atol=CAM_ATOL)


@pytest.mark.parametrize("size", SIZES)
def test_cam_shapes_and_dtypes(kit: KitOptions, backend: Backend, size: int):
    settings = kit.settings(size)
    model = backend.build(settings)
    classes = [13, 0, 5]
    cam = backend.cam(model, random_images(2, size), classes, settings)
    side = size // 32
    assert cam.maps.dtype == np.float32 and cam.maps.shape == (2, len(classes), side, side)
    assert cam.bias.dtype == np.float32 and cam.bias.shape == (len(classes),)
    assert cam.logits.dtype == np.float32 and cam.logits.shape == (2, len(classes))


def test_get_weights_has_the_canonical_layout(kit: KitOptions, backend: Backend):
    settings = kit.settings()
    weights = backend.weights(backend.build(settings))
    spec = densenet_spec(settings.model.block_config)
    assert set(weights) == set(spec)
    for name, shape in spec.items():
        assert isinstance(weights[name], np.ndarray) and weights[name].dtype == np.float32, name
        assert weights[name].shape == shape, name


# -- determinism ----------------------------------------------------------------------------------


def test_same_seed_gives_same_weights_and_logits(kit: KitOptions, backend: Backend):
    settings = kit.settings(**{"run.seed": 3})
    first, second = backend.build(settings), backend.build(settings)
    a, b = backend.weights(first), backend.weights(second)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    images = random_images(2, 32)
    np.testing.assert_allclose(
        backend.predict(first, images, settings), backend.predict(second, images, settings), rtol=0, atol=REPEAT_ATOL
    )


def test_different_seed_gives_different_weights(kit: KitOptions, backend: Backend):
    a = backend.weights(backend.build(kit.settings(**{"run.seed": 3})))
    b = backend.weights(backend.build(kit.settings(**{"run.seed": 4})))
    assert not np.array_equal(a["features.conv0.weight"], b["features.conv0.weight"]), "run.seed is ignored"


# -- canonical weights ----------------------------------------------------------------------------


def _assert_same_weights(got: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert set(got) == set(expected)
    for name, value in expected.items():
        assert got[name].dtype == np.float32, name
        np.testing.assert_array_equal(got[name], value, err_msg=f"tensor {name} changed in the round trip")


def test_weight_round_trip_is_bitwise(kit: KitOptions, backend: Backend):
    settings = kit.settings()
    weights = random_canonical(settings.model.block_config, seed=5)
    model = backend.build(settings)
    assert backend.call("cxrbench_set_weights", model=model, weights=weights) is True
    _assert_same_weights(backend.weights(model), weights)


def test_shared_init_without_weights_is_the_cores_canonical_init(kit: KitOptions, backend: Backend):
    """``model.init = "shared"`` and no weights: the core's seeded init, as the worker would pass it."""
    settings = kit.settings(**{"model.init": "shared", "run.seed": 9})
    _assert_same_weights(backend.weights(backend.build(settings)), init_canonical(settings.model.block_config, 9))


def test_build_with_weights_loads_them_exactly(kit: KitOptions, backend: Backend):
    settings = kit.settings()
    weights = random_canonical(settings.model.block_config, seed=6)
    _assert_same_weights(backend.weights(backend.build(settings, weights)), weights)


@pytest.mark.parametrize("tensor", ["features.conv0.weight", "features.norm5.running_var"])
@pytest.mark.parametrize("problem", ["missing", "misshapen"])
def test_set_weights_names_the_bad_tensor(kit: KitOptions, backend: Backend, tensor: str, problem: str):
    settings = kit.settings()
    weights = random_canonical(settings.model.block_config, seed=7)
    if problem == "missing":
        del weights[tensor]
    else:
        weights[tensor] = weights[tensor][:-1]
    model = backend.build(settings)
    with pytest.raises(WeightsError) as caught:
        backend.call("cxrbench_set_weights", model=model, weights=weights)
    assert tensor in str(caught.value)
    assert_one_line(caught.value)


# -- class activation maps ------------------------------------------------------------------------


@pytest.mark.parametrize("size", SIZES)
def test_cam_identity(kit: KitOptions, backend: Backend, size: int):
    """maps.mean((2, 3)) + bias equals the logits of cxrbench_predict, class by class."""
    settings = kit.settings(size)
    model = backend.build(settings, random_canonical(settings.model.block_config, seed=8))
    images = random_images(3, size)
    logits = backend.predict(model, images, settings)
    classes = [13, 2, 7]
    cam = backend.cam(model, images, classes, settings)
    np.testing.assert_allclose(cam.maps.mean(axis=(2, 3)) + cam.bias, logits[:, classes], rtol=0, atol=CAM_ATOL)
    np.testing.assert_allclose(cam.logits, logits[:, classes], rtol=0, atol=CAM_ATOL)
    every = backend.cam(model, images, list(range(NUM_CLASSES)), settings)
    np.testing.assert_allclose(
        cam.maps, every.maps[:, classes], rtol=0, atol=CAM_ATOL, err_msg="maps follow `classes` order"
    )


def test_tta_hflip_averages_the_mirror(kit: KitOptions, backend: Backend):
    settings = kit.settings()
    model = backend.build(settings, random_canonical(settings.model.block_config, seed=9))
    images = random_images(3, 32)
    plain = backend.predict(model, images, settings)
    mirrored = backend.predict(model, np.ascontiguousarray(images[:, :, ::-1]), settings)
    tta = backend.predict(model, images, settings.replace(**{"eval.tta_hflip": True}))
    np.testing.assert_allclose(tta, (plain + mirrored) / 2, rtol=0, atol=CAM_ATOL)


# -- ONNX export ----------------------------------------------------------------------------------


def test_onnx_export_passes_the_checker(exported):
    settings, _, info = exported
    onnx_file.check_model(info.path)
    assert info.opset == settings.export.opset
    assert info.seconds >= 0 and info.exporter


def test_onnx_metadata_says_what_the_model_expects(backend: Backend, exported):
    settings, _, info = exported
    assert info.layout == backend.info.onnx_layout
    expected = onnx_file.model_metadata(info.layout, settings.data.image_size, backend.name)
    stamped = onnx_file.read_metadata(info.path)
    for key, value in expected.items():
        assert stamped.get(key) == value, f"metadata {key}"
    sess = onnx_file.session(info.path)
    [model_input], [model_output, *_] = sess.get_inputs(), sess.get_outputs()
    assert (model_input.name, model_output.name) == (info.input_name, info.output_name)
    assert not isinstance(model_input.shape[0], int), f"batch axis must be dynamic, got {model_input.shape}"


@pytest.mark.parametrize("batch", [1, 3])
def test_onnx_runtime_matches_predict(backend: Backend, exported, batch: int):
    settings, model, info = exported
    images = random_images(batch, settings.data.image_size, seed=batch)
    native = backend.predict(model, images, settings)
    onnx_logits = onnx_file.run_onnx(info.path, images, info.layout)
    stats = onnx_file.diff_stats(native, onnx_logits, settings.export.atol, settings.export.rtol)
    assert stats["passed"], stats


def test_onnx_cam_matches_the_native_cam(backend: Backend, exported):
    """A CAM from the export alone (its ``features`` output and the classifier in its metadata, onnxruntime and
    numpy only) obeys the CAM identity against the export's own logits (within CAM_ATOL) and equals the backend's
    ``cxrbench_cam`` maps within the export gate (``export.atol`` / ``export.rtol``)."""
    settings, model, info = exported
    sess = onnx_file.session(info.path)
    assert [o.name for o in sess.get_outputs()] == [info.output_name, onnx_file.FEATURES_OUTPUT]
    images, classes = random_images(3, settings.data.image_size, seed=5), [13, 2, 7]
    logits, maps, bias = onnx_file.onnx_cam(info.path, images, info.layout, classes, sess=sess)
    np.testing.assert_allclose(maps.mean(axis=(2, 3)) + bias, logits[:, classes], rtol=0, atol=CAM_ATOL)
    identity = onnx_file.cam_identity(info.path, images, info.layout, CAM_ATOL, 0.0)
    assert identity["passed"], identity
    native = backend.cam(model, images, classes, settings)
    np.testing.assert_allclose(bias, native.bias, rtol=0, atol=0, err_msg="the bias travels bit-exact")
    stats = onnx_file.diff_stats(native.maps, maps, settings.export.atol, settings.export.rtol)
    assert stats["passed"], stats


# -- equivalence with a reference backend ---------------------------------------------------------


@pytest.mark.parametrize("size", SIZES)
def test_same_logits_as_the_reference_backend(kit: KitOptions, backend: Backend, reference_logits, size: int):
    reference, logits = reference_logits
    settings, weights, images = equivalence_inputs(size, kit.arch)
    ours = backend.predict(backend.build(settings, weights), images, settings)
    stats = onnx_file.diff_stats(logits[size], ours, settings.run.equivalence_atol, 0.0)
    assert stats["passed"], f"{backend.name} vs {reference}: {stats}"


# -- training -------------------------------------------------------------------------------------


def test_short_training_run_reports_and_keeps_the_best_weights(kit: KitOptions, backend: Backend):
    settings = kit.settings(**{"train.epochs": 2, "train.max_steps": 1})
    data = synthetic_data(32)
    model = backend.build(settings, random_canonical(settings.model.block_config, seed=12))
    before = backend.weights(model)
    events: list[tuple[str, dict]] = []
    recorder = Recorder([lambda event, payload: events.append((event, payload))])
    result = backend.call("cxrbench_train", model=model, data=data, settings=settings, recorder=recorder)

    history = recorder.history
    assert all(isinstance(r, EpochRecord) for r in history)
    assert [(r.epoch, r.warmup, r.steps, r.images) for r in history] == [(1, True, 1, 4), (2, False, 1, 4)]
    for r in history:
        assert all(math.isfinite(v) for v in (r.train_loss, r.val_loss, r.lr, r.images_per_s)), r
        assert r.train_time_s > 0 and r.val_time_s > 0 and r.lr > 0
    reported = [payload.get("phase", event) for event, payload in events if event != "step"]
    assert reported == ["epoch_started", "train", "validate", "epoch_ended"] * 2

    val_losses = [r.val_loss for r in history]
    assert result["best_epoch"] == 1 + int(np.argmin(val_losses))
    assert result["best_val_loss"] == pytest.approx(min(val_losses), rel=1e-6)
    numerics_record.check(backend.name, result.get("numerics"))  # the core's keys, nothing else
    assert history[result["best_epoch"] - 1].best

    after = backend.weights(model)
    assert all(np.isfinite(v).all() for v in after.values())
    assert any(not np.array_equal(before[k], after[k]) for k in before), "training changed no weight"
    kept = bce_with_logits(backend.predict(model, data.split_images("val"), settings), data.split_labels("val"))
    assert kept == pytest.approx(result["best_val_loss"], rel=1e-3), "the model must hold the best epoch's weights"


# -- explaining speed -----------------------------------------------------------------------------


def test_operation_rules_are_rules_the_cores_table_takes(backend: Backend):
    rules = collect_rules(backend.plugins.hook.cxrbench_operation_rules())
    assert Classifier(rules).category("cxrbench.input") == "input"  # the core's annotation comes first


def test_peak_flops_is_a_measured_matmul_rate_or_none(kit: KitOptions, backend: Backend):
    """The ceiling of the model FLOPs utilisation: measured through the core's timing policy, or ``None``."""
    peak = backend.plugins.hook.cxrbench_peak_flops(settings=kit.settings())
    if peak is None:
        return
    assert isinstance(peak, PeakFlops) and peak.flop_per_s > 0 and math.isfinite(peak.flop_per_s)
    assert peak.size >= PEAK_FIRST_SIZE and peak.repeats >= 3 and peak.how and peak.device


def test_profiler_traces_more_steps_of_the_trained_loop(kit: KitOptions, backend: Backend, tmp_path: Path):
    """After training, the core runs profiled steps of the loop ``run_recipe`` kept; the profiler's trace must hold
    the core's annotations and the operations, and the categories must add up to the profiled step."""
    settings = kit.settings(**{"train.max_steps": 3, "train.warmup_steps": 1})
    model = backend.build(settings)
    recorder = Recorder()
    backend.call("cxrbench_train", model=model, data=synthetic_data(32, train=16), settings=settings, recorder=recorder)
    assert recorder.trained_loop is not None, "cxrbench_train must run the core's run_recipe"
    profiler = backend.plugins.hook.cxrbench_profiler(loop=recorder.trained_loop, settings=settings, trace_dir=tmp_path)
    if profiler is None:
        return
    trace, steps = run_profiled_steps(recorder.trained_loop, recorder, profiler, 1, 2, settings.train.learning_rate)
    names = [event.name for event in trace.events]
    assert steps.profiled == 2 and names.count(PROFILE_REGION) == 1 and names.count(INPUT_REGION) == 2
    assert any(event.kind == "op" for event in trace.events), "the trace holds no operation"
    assert trace.profiler and all(Path(f).is_file() and Path(tmp_path) in Path(f).parents for f in trace.files)
    classifier = Classifier(collect_rules(backend.plugins.hook.cxrbench_operation_rules()))
    result = step_profile.analyse(trace.events, classifier, steps.profiled)
    assert sum(result["categories_ms"].values()) == pytest.approx(result["step_ms"], rel=1e-6)
    assert result["categories_ms"]["conv_forward"] > 0 and result["categories_ms"]["conv_backward"] > 0


def test_idiomatic_loop_runs(kit: KitOptions, backend: Backend):
    """Optional hook, the yardstick of the harness-overhead benchmark: when a backend answers it, the loop's steps
    give finite losses that change from step to step (batches and weights move), and it says what it runs."""
    settings = kit.settings()
    loop = backend.plugins.hook.cxrbench_idiomatic_loop(
        settings=settings, weights=random_canonical(settings.model.block_config, seed=21)
    )
    if loop is None:
        pytest.skip(f"backend {backend.name!r} implements no cxrbench_idiomatic_loop (optional)")
    assert isinstance(loop, IdiomaticLoop) and loop.description
    assert all(isinstance(n, int) and n > 0 for n in loop.threads.values()), loop.threads
    losses = [float(np.asarray(loop.step())) for _ in range(IDIOMATIC_STEPS)]
    loop.sync()
    assert all(math.isfinite(loss) and loss > 0 for loss in losses), losses
    assert len(set(losses)) > 1, f"every step gave the same loss {losses[0]}: nothing moves"


# -- bad input ------------------------------------------------------------------------------------


def test_image_too_small_is_a_backend_error(kit: KitOptions, backend: Backend):
    """Suites refuse sizes under 32 px; a backend driven directly must refuse them too."""
    settings = kit.settings()
    tiny = dataclasses.replace(settings, data=dataclasses.replace(settings.data, image_size=16))
    with pytest.raises(BackendError) as caught:
        backend.build(tiny)
    assert "16" in str(caught.value)
    assert_one_line(caught.value)


#: Images that break the hook contract (uint8 (N, 32, 32) for the kit's 32 px settings).
BAD_IMAGES = {
    "float32": np.zeros((2, 32, 32), np.float32),
    "no batch axis": np.zeros((32, 32), np.uint8),
    "channels": np.zeros((2, 32, 32, 3), np.uint8),
    "not square": np.zeros((2, 32, 64), np.uint8),
    "other size": np.zeros((2, 64, 64), np.uint8),
}


def _refused(call: Any, what: str) -> str:
    """The one-line message of the BackendError ``call()`` must raise."""
    try:
        call()
    except BackendError as error:
        assert_one_line(error)
        return str(error)
    pytest.fail(f"{what}: no BackendError")


def test_images_outside_the_contract_are_a_backend_error(kit: KitOptions, backend: Backend):
    """predict and CAM refuse what is not uint8 (N, S, S) at the settings' size (never cast it), CAM also no
    images and unknown classes; predict of no images is an empty (0, 14) float32 array."""
    settings = kit.settings()
    model = backend.build(settings)
    one = random_images(1, 32)
    for kind, images in BAD_IMAGES.items():
        for hook, call in (("predict", backend.predict), ("cam", lambda m, i, s: backend.cam(m, i, [0], s))):
            message = _refused(
                lambda call=call, images=images: call(model, images, settings), f"{hook} of {kind} images"
            )
            assert message.startswith("images must be uint8 (N, S, S), got ") and message.endswith("= 32)"), message
    assert "at least one image" in _refused(lambda: backend.cam(model, one[:0], [0], settings), "CAM of no images")
    for classes in ([NUM_CLASSES], [-1], []):
        message = _refused(
            lambda classes=classes: backend.cam(model, one, classes, settings), f"CAM of classes {classes}"
        )
        assert message.startswith("CAM classes must be indices"), message
    empty = backend.predict(model, one[:0], settings)
    assert empty.dtype == np.float32 and empty.shape == (0, NUM_CLASSES)


def _corrupt_file(path: Path, block_config: tuple[int, ...]) -> str:
    path.write_bytes(b"these bytes are not an npz archive")
    return path.name


def _no_file(path: Path, block_config: tuple[int, ...]) -> str:
    return path.name


def _incomplete_file(path: Path, block_config: tuple[int, ...]) -> str:
    weights = init_canonical(block_config, seed=0)
    del weights["classifier.bias"]
    np.savez(path, **weights)
    return "classifier.bias"


#: Ways a weights file can be bad -> a writer (path, block config) that returns what the error message must name.
BAD_WEIGHTS_FILES = {"corrupt": _corrupt_file, "missing": _no_file, "incomplete": _incomplete_file}


@pytest.mark.parametrize("kind", BAD_WEIGHTS_FILES)
def test_bad_weights_file_is_a_weights_error(kit: KitOptions, backend: Backend, tmp_path: Path, kind: str):
    path = tmp_path / f"{kind}.npz"
    named = BAD_WEIGHTS_FILES[kind](path, kit.settings().model.block_config)
    with pytest.raises(WeightsError) as caught:
        backend.build(kit.settings(**{"model.init": str(path)}))
    assert named in str(caught.value)
    assert_one_line(caught.value)


#: Every suffix a backend might import (``cxrbench.backend.checkpoints.READERS``) and the core's own.
CHECKPOINT_SUFFIXES = (".pth", ".pt", ".pth.tar", ".h5", ".keras", ".weights.h5", ".ckpt", ".msgpack", ".bin")


@pytest.mark.parametrize("suffix", CHECKPOINT_SUFFIXES)
def test_import_checkpoint_of_garbage_is_none_or_one_line(backend: Backend, tmp_path: Path, suffix: str):
    """``cxrbench_import_checkpoint`` (optional) answers ``None`` for a file not its kind and a one-line
    ``WeightsError`` naming a file of its kind that it cannot read; never another exception."""
    path = tmp_path / f"garbage{suffix}"
    path.write_bytes(b"these bytes are no checkpoint of any framework")
    try:
        answer = backend.plugins.hook.cxrbench_import_checkpoint(path=path, block_config=(1, 1, 1, 1))
    except WeightsError as error:
        assert path.name in str(error)
        assert_one_line(error)
    else:
        assert answer is None, f"{path.name}: garbage imported as {type(answer).__name__}"


#: What launchers set (torchrun, TF_CONFIG, Slurm, jax.distributed, Open MPI): cleared, so the kit joins no world.
LAUNCHER_ENVIRONMENT = (
    "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID", "TF_CONFIG",
    "SLURM_JOB_ID", "SLURM_PROCID", "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID",
    "OMPI_COMM_WORLD_SIZE",
)  # fmt: skip
MULTI_NODE_HOOKS = ("cxrbench_join_world", "cxrbench_gather", "cxrbench_node_launcher")


def test_multi_node_hooks_come_together(kit: KitOptions, backend: Backend):
    """The multi-node hooks are optional but all or none: a backend that joins a launcher's world gathers every
    rank's record to rank 0 over it and says how its ranks start on a machine (interpreter arguments, or none)."""
    hook = backend.plugins.hook
    present = {name: bool(getattr(hook, name).get_hookimpls()) for name in MULTI_NODE_HOOKS}
    assert len(set(present.values())) == 1, f"implement all of {', '.join(MULTI_NODE_HOOKS)} or none: {present}"
    if present["cxrbench_node_launcher"]:
        launcher = hook.cxrbench_node_launcher(settings=kit.settings(**{"run.nodes": 2, "run.gpus": 4}), head="n1")
        assert launcher is None or all(isinstance(argument, str) for argument in launcher), launcher


def test_joining_without_a_launcher_is_a_one_line_error(kit: KitOptions, backend: Backend, monkeypatch):
    """Outside any launcher's environment, joining a world of 2 is refused in one line, never a world of one."""
    if not backend.plugins.hook.cxrbench_join_world.get_hookimpls():
        pytest.skip(f"{backend.name} has no launched mode (cxrbench_join_world)")
    for name in LAUNCHER_ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(CxrError) as error:
        backend.plugins.hook.cxrbench_join_world(settings=kit.settings(**{"run.nodes": 2}))
    assert_one_line(error.value)


def test_non_finite_loss_raises_training_diverged(kit: KitOptions, backend: Backend):
    settings = kit.settings(**{"train.learning_rate": math.inf, "train.max_steps": 2})
    model = backend.build(settings, random_canonical(settings.model.block_config, seed=13))
    with pytest.raises(TrainingDiverged) as caught:
        backend.call("cxrbench_train", model=model, data=synthetic_data(32), settings=settings, recorder=Recorder())
    assert caught.value.epoch == 1
    assert_one_line(caught.value)


def test_empty_validation_split_is_the_cores_data_error(kit: KitOptions, backend: Backend):
    """The recipe picks the best epoch by validation loss: without validation images every backend stops alike."""
    settings = kit.settings(**{"train.max_steps": 1})
    model = backend.build(settings, random_canonical(settings.model.block_config, seed=14))
    with pytest.raises(DataError) as caught:
        backend.call(
            "cxrbench_train", model=model, data=synthetic_data(32, val=0), settings=settings, recorder=Recorder()
        )
    assert "data.val_fraction" in str(caught.value)
    assert_one_line(caught.value)
