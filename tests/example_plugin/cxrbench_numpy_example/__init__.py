"""cxrbench's example backend: DenseNet in plain numpy, to show every hook a backend implements.

Install with ``pip install -e tests/example_plugin``; the entry point ``numpy`` in the group
``cxrbench`` makes it appear in ``cxrbench backends`` and lets ``pytest --cxrbench-backend numpy``
run the conformance kit against it.

What it is: an eval-mode DenseNet-BC that computes the same function as torchvision's on the same
canonical weights, exports a hand-built ONNX graph, and trains **only its classifier** (a linear
probe on frozen features; see :mod:`cxrbench_numpy_example.probe`). It is documentation by example,
not a fast or complete backend.
"""

from __future__ import annotations

import importlib.metadata
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cxrbench.backend import (
    BackendError,
    BackendInfo,
    CamResult,
    ExportInfo,
    Start,
    UnsupportedSetting,
    WeightsError,
    canonical,
    check_cam_inputs,
    check_images,
    hookimpl,
    initial_weights,
)

NAME = "numpy"
LAYOUT = "NCHW"
#: The framework initialiser uses its own random stream, so "framework" differs from "shared".
FRAMEWORK_INIT_STREAM = 0x6E70


@dataclass
class NumpyDenseNet:
    """The model object the core treats as opaque: canonical weights plus the block configuration."""

    block_config: tuple[int, ...]
    weights: dict[str, np.ndarray]


@hookimpl
def cxrbench_backend_info():
    return BackendInfo(
        name=NAME,
        framework="numpy",
        version=importlib.metadata.version("numpy"),
        onnx_layout=LAYOUT,
        extra={
            "training": "linear probe: only the classifier is trained, the features stay frozen",
            "precision": "fp32 on the CPU only",
        },
    )


@hookimpl
def cxrbench_devices():
    return ["cpu"]  # numpy computes on the CPU only


def _initial_weights(settings, weights) -> tuple[dict[str, np.ndarray], str]:
    """What the core resolved (:func:`cxrbench.backend.initial_weights.resolve`), plus this backend's own cases."""
    initial = initial_weights.resolve(settings, weights)  # no file format of its own: canonical .npz only
    if initial.start is Start.FRAMEWORK:
        seed = int(np.random.SeedSequence([settings.run.seed, FRAMEWORK_INIT_STREAM]).generate_state(1)[0])
        return canonical.init_canonical(settings.model.block_config, seed), initial.origin
    if initial.start is Start.IMAGENET:
        raise WeightsError(
            "model.init = 'imagenet': the numpy backend has no ImageNet weights "
            "(use 'shared', 'framework' or a weights file)"
        )
    return initial.weights, initial.origin


@hookimpl
def cxrbench_build_model(settings, weights):
    if settings.numerics.precision != "fp32":
        raise UnsupportedSetting(
            f"numerics.precision = {settings.numerics.precision!r}: the numpy backend computes in fp32 only"
        )
    canonical.check_image_size(settings.data.image_size)
    model = NumpyDenseNet(settings.model.block_config, {})
    _load(model, *_initial_weights(settings, weights))
    return model


def _load(model: NumpyDenseNet, weights, origin: str) -> None:
    canonical.validate(weights, model.block_config, origin)
    model.weights = {
        name: np.array(weights[name], dtype=np.float32) for name in canonical.densenet_spec(model.block_config)
    }


@hookimpl
def cxrbench_get_weights(model):
    return {name: value.copy() for name, value in model.weights.items()}


@hookimpl
def cxrbench_set_weights(model, weights):
    _load(model, weights, "weights")
    return True


@hookimpl
def cxrbench_train(model, data, settings, recorder):
    from threadpoolctl import threadpool_limits

    from cxrbench.backend import run_recipe, thread_budget
    from cxrbench_numpy_example.probe import LinearProbeLoop, describe

    if settings.run.gpus:
        raise BackendError(f"run.gpus = {settings.run.gpus}: the numpy backend computes on the CPU only (use 0)")
    # The core's thread budget for BLAS, numpy's only thread pool; a diverging loss is caught by the recipe
    # (TrainingDiverged), so numpy's warnings would only repeat it.
    with threadpool_limits(thread_budget(settings.numerics)["intra_op"], user_api="blas"):
        with np.errstate(over="ignore", invalid="ignore"):
            result = run_recipe(LinearProbeLoop(model, data, settings, recorder), settings, recorder)
        return {**result, "numerics": describe(model, settings, LAYOUT)}


@hookimpl
def cxrbench_idiomatic_loop(settings, weights):
    from cxrbench_numpy_example.probe import idiomatic_loop

    return idiomatic_loop(settings, weights)


def _logits(model: NumpyDenseNet, images: np.ndarray, batch_size: int) -> np.ndarray:
    from cxrbench_numpy_example.network import classify, pooled_features

    chunks = [
        classify(model.weights, pooled_features(model.weights, model.block_config, images[i : i + batch_size]))
        for i in range(0, len(images), batch_size)
    ]
    return np.concatenate(chunks) if chunks else np.zeros((0, model.weights["classifier.bias"].size), np.float32)


@hookimpl
def cxrbench_predict(model, images, settings):
    images = check_images(images, settings.data.image_size)
    batch = settings.train.batch_size
    logits = _logits(model, images, batch)
    if settings.eval.tta_hflip:
        logits = (logits + _logits(model, images[:, :, ::-1], batch)) / np.float32(2)
    return logits


@hookimpl
def cxrbench_cam(model, images, classes, settings):
    from cxrbench_numpy_example.network import feature_map, prepare

    images, classes = check_cam_inputs(images, classes, settings.data.image_size)
    features = feature_map(model.weights, model.block_config, prepare(images))
    weight = model.weights["classifier.weight"][classes]
    bias = model.weights["classifier.bias"][classes]
    maps = np.einsum("nkhw,ck->nchw", features, weight).astype(np.float32)
    logits = (features.mean(axis=(2, 3)) @ weight.T + bias).astype(np.float32)
    return CamResult(maps=maps, bias=bias, logits=logits)


@hookimpl
def cxrbench_export_onnx(model, path, settings):
    from cxrbench.backend import INPUT, OUTPUT, model_metadata, stamp_metadata, write_onnx

    start = time.perf_counter()
    size, opset = settings.data.image_size, settings.export.opset
    write_onnx(model.weights, model.block_config, size, opset, Path(path), producer="cxrbench_numpy_example")
    stamp_metadata(path, model_metadata(LAYOUT, size, NAME))
    return ExportInfo(
        path=str(path),
        layout=LAYOUT,
        opset=opset,
        input_name=INPUT,
        output_name=OUTPUT,
        seconds=time.perf_counter() - start,
        exporter="onnx.helper graph from canonical weights (cxrbench.backend.onnx_graph)",
    )
