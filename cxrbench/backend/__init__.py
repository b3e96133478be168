"""The one module a backend author imports: everything a cxrbench backend plugin needs from the core.

A backend (PyTorch, Keras, JAX, the numpy example, a third party's) imports from here and from nothing else in
``cxrbench`` (tests may use :mod:`cxrbench.testing` too); a test fails when a plugin of this repository does. The
names in ``__all__`` are the stable surface; the submodules behind them may move. The map, in the order a
backend meets it (docs/api.md documents every name):

hooks
    :data:`hookimpl` marks a hook implementation; the contracts are in :mod:`cxrbench.hookspecs`.
settings
    :class:`Settings` (a validated suite), :class:`NumericsSettings`, :data:`ARCHITECTURES` (``model.arch`` ->
    DenseNet block configuration).
classes and pixels
    :data:`CLASSES` (CheXNet order), :data:`NUM_CLASSES`, :data:`IMAGENET_MEAN`, :data:`IMAGENET_STD`.
what hooks return
    :class:`BackendInfo`, :class:`EpochRecord`, :class:`CamResult`, :class:`ExportInfo`, :class:`IdiomaticLoop`
    (the framework's own loop, for the harness-overhead benchmark); :func:`distribution_version` for
    ``BackendInfo.versions``.
data
    :class:`PreparedData` (the prepared cache's splits and batch order) and the :class:`Batch` it yields.
training
    :func:`run_recipe` (plateau schedule, best weights, NaN detection) around a backend's
    :class:`EpochOutcome`-returning epoch loop, built from :func:`train_batches`, :func:`train_epoch`,
    :func:`validation_loss`, :func:`steps_per_epoch` and :func:`scaled_learning_rate`; the :class:`Recorder`
    every backend reports to; :func:`batch_images`.
weights
    :mod:`canonical` (the torchvision-layout weights every framework converts to and from),
    :mod:`initial_weights` (``model.init`` resolved once, for every backend alike: :class:`Start`,
    :class:`InitialWeights`), :func:`check_densenet` (a foreign checkpoint's tensors, named in one line).
inputs, devices, numerics
    :func:`check_images` and :func:`check_cam_inputs` (the input contract of predict and CAM),
    :func:`thread_budget` (the CPU threads every backend gets), :func:`require_framework_gpus` (a framework blind
    to its GPUs stops in one line), :mod:`numerics_record` (the one schema of the numerics record).
export
    :func:`model_metadata`, :func:`cam_metadata`, :func:`stamp_metadata` and :data:`FEATURES_OUTPUT` (what every
    ONNX export carries), :func:`normalise` (the export's input), and :func:`write_onnx` with :data:`INPUT` and
    :data:`OUTPUT` for a backend without an ONNX exporter of its own.
explaining speed
    :class:`Profiler`, :class:`ProfileTrace` and :class:`TraceEvent` (what ``cxrbench_profiler`` gives the core),
    :data:`PROFILE_REGION` and :data:`INPUT_REGION` (the annotations the core puts into every trace),
    :func:`chrome_trace_events` (a Chrome/Perfetto JSON trace's spans), :class:`OperationRule` and
    :func:`category_rules` (``cxrbench_operation_rules``), :func:`measure_matmul_peak` and :class:`PeakFlops`
    (``cxrbench_peak_flops``).
errors
    :class:`CxrError` and the kinds a backend raises (:class:`BackendError`, :class:`UnsupportedSetting` for a
    setting it refuses by design, :class:`WeightsError`, :class:`DataError`), :func:`first_line`,
    :func:`out_of_memory` and :func:`out_of_memory_as_error` (the one out-of-memory message).

The names load on first use (PEP 562), so importing this module costs nothing and no core module it points to
can form an import cycle with it.
"""

from __future__ import annotations

import importlib
from typing import Any

#: Each public name -> the module that defines it (a name that is itself a submodule maps to ``None``).
_SOURCES: dict[str, str | None] = {
    # hooks
    "hookimpl": "cxrbench.hookspecs",
    # settings
    "Settings": "cxrbench.suite",
    "NumericsSettings": "cxrbench.suite",
    "ARCHITECTURES": "cxrbench.suite",
    # classes and pixels
    "CLASSES": "cxrbench.data.classes",
    "NUM_CLASSES": "cxrbench.data.classes",
    "IMAGENET_MEAN": "cxrbench.data.classes",
    "IMAGENET_STD": "cxrbench.data.classes",
    # what hooks return
    "BackendInfo": "cxrbench.backend.api",
    "EpochRecord": "cxrbench.backend.api",
    "CamResult": "cxrbench.backend.api",
    "ExportInfo": "cxrbench.backend.api",
    "IdiomaticLoop": "cxrbench.backend.api",
    "distribution_version": "cxrbench.backend.api",
    # data
    "PreparedData": "cxrbench.data.prepared",
    "Batch": "cxrbench.data.prepared",
    # training
    "run_recipe": "cxrbench.backend.training",
    "EpochOutcome": "cxrbench.backend.training",
    "train_batches": "cxrbench.backend.training",
    "train_epoch": "cxrbench.backend.training",
    "validation_loss": "cxrbench.backend.training",
    "steps_per_epoch": "cxrbench.backend.training",
    "scaled_learning_rate": "cxrbench.backend.training",
    "Recorder": "cxrbench.backend.recorder",
    "batch_images": "cxrbench.backend.timing",
    # weights
    "canonical": None,
    "initial_weights": None,
    "Start": "cxrbench.backend.initial_weights",
    "InitialWeights": "cxrbench.backend.initial_weights",
    "check_densenet": "cxrbench.backend.checkpoints",
    # inputs, devices, numerics
    "check_images": "cxrbench.backend.model_inputs",
    "check_cam_inputs": "cxrbench.backend.model_inputs",
    "thread_budget": "cxrbench.machine.budget",
    "require_framework_gpus": "cxrbench.machine.env",
    "numerics_record": None,
    # several machines
    "World": "cxrbench.backend.world",
    "require_world_size": "cxrbench.backend.world",
    "expected_replicas": "cxrbench.backend.world",
    "node_groups": "cxrbench.backend.world",
    "batchnorm_scope": "cxrbench.backend.world",
    "encode_payload": "cxrbench.backend.world",
    "decode_payloads": "cxrbench.backend.world",
    "pad_payload": "cxrbench.backend.world",
    # export
    "model_metadata": "cxrbench.deploy.onnx_file",
    "cam_metadata": "cxrbench.deploy.onnx_file",
    "stamp_metadata": "cxrbench.deploy.onnx_file",
    "FEATURES_OUTPUT": "cxrbench.deploy.onnx_file",
    "normalise": "cxrbench.deploy.onnx_file",
    "write_onnx": "cxrbench.backend.onnx_graph",
    "INPUT": "cxrbench.backend.onnx_graph",
    "OUTPUT": "cxrbench.backend.onnx_graph",
    # explaining speed
    "Profiler": "cxrbench.backend.profiling",
    "ProfileTrace": "cxrbench.backend.profiling",
    "TraceEvent": "cxrbench.backend.profiling",
    "PROFILE_REGION": "cxrbench.backend.profiling",
    "INPUT_REGION": "cxrbench.backend.profiling",
    "chrome_trace_events": "cxrbench.backend.profiling",
    "OperationRule": "cxrbench.metrics.operation_categories",
    "category_rules": "cxrbench.metrics.operation_categories",
    "measure_matmul_peak": "cxrbench.backend.profiling",
    "PeakFlops": "cxrbench.backend.profiling",
    # errors
    "CxrError": "cxrbench.errors",
    "BackendError": "cxrbench.errors",
    "UnsupportedSetting": "cxrbench.errors",
    "WeightsError": "cxrbench.errors",
    "DataError": "cxrbench.errors",
    "first_line": "cxrbench.errors",
    "out_of_memory": "cxrbench.errors",
    "out_of_memory_as_error": "cxrbench.errors",
}

__all__ = list(_SOURCES)


def __getattr__(name: str) -> Any:
    if name not in _SOURCES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    source = _SOURCES[name]
    value = (
        importlib.import_module(f"{__name__}.{name}")
        if source is None
        else getattr(importlib.import_module(source), name)
    )
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
