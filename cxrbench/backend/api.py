"""Plain data types that cross the hook boundary. Framework-free: numpy and the standard library only."""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np


def distribution_version(name: str) -> str:
    """An installed distribution's version for :class:`BackendInfo`, read from package metadata (no import), or
    ``"not installed"``: discovery still lists a backend whose framework is missing, and building a model then
    says what to install."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


@dataclass(frozen=True, kw_only=True)
class BackendInfo:
    """What ``cxrbench backends`` lists. Building one must not import the framework.

    Keyword-only: ``plugin`` sits between the fields a backend fills, so a positional call would
    silently misplace them; ``BackendInfo("x", "numpy", "1.0", "NCHW")`` is a ``TypeError`` instead.
    """

    name: str  #: the ``--backend`` name, e.g. ``"pytorch"``
    framework: str  #: the framework's distribution name, e.g. ``"torch"``
    version: str  #: the framework's version, read from package metadata
    plugin: str = ""  #: the plugin module that answered (filled in by the core)
    #: Input layout of the exported ONNX model ("NCHW" or "NHWC").
    onnx_layout: str = "NCHW"
    extra: dict[str, str] = field(default_factory=dict)


@dataclass
class EpochRecord:
    """One epoch as reported to the :class:`~cxrbench.backend.recorder.Recorder`. Times are seconds."""

    epoch: int  #: 1-based
    warmup: bool  #: the first epoch: includes compilation, cuDNN autotuning and cache warm-up
    train_loss: float
    val_loss: float
    train_time_s: float  #: synchronised wall time of the training loop (data wait included)
    val_time_s: float
    data_wait_s: float | None  #: time the training loop waited for input; None if not observable
    images: int  #: training images processed (all ranks)
    images_per_s: float  #: images / train_time_s
    lr: float  #: learning rate used during this epoch
    steps: int
    best: bool = False  #: validation loss is the best so far (these weights are kept)
    #: Seconds from the start of the epoch's training to the end of its first step (None: not timed).
    first_step_s: float | None = None
    #: Median images/s over the windows after train.warmup_steps, and the central 95 % of the window rates;
    #: None unless the epoch has cxrbench.backend.timing.MIN_WINDOWS windows (see ``windows``).
    steady_images_per_s: float | None = None
    steady_images_per_s_interval: list[float] | None = None
    windows: int = 0
    steps_after_warmup: int = 0
    #: The same for validation (warm-up: its first step).
    val_images_per_s: float | None = None
    val_images_per_s_interval: list[float] | None = None
    val_windows: int = 0
    #: Raw windows ``[steps, images, seconds]`` of training and validation, pooled over epochs by the core.
    train_window_list: list[list[float]] = field(default_factory=list)
    val_window_list: list[list[float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, kw_only=True)
class CamResult:
    """Class activation maps at the feature map's resolution, before any upsampling.

    ``maps[n, j]`` is ``sum_k w[c_j, k] * F[n, k]`` with F the final feature map after the last
    BatchNorm and ReLU, so ``maps[n, j].mean() + bias[j]`` equals the logit of class ``c_j``.
    The core upsamples them to the input size (:func:`cxrbench.metrics.localisation.upsample`).
    """

    maps: np.ndarray  #: float32 (N, len(classes), h, w)
    bias: np.ndarray  #: float32 (len(classes),)
    logits: np.ndarray  #: float32 (N, len(classes)), computed in the same forward pass


@dataclass(frozen=True, kw_only=True)
class ExportInfo:
    """Where and how a backend wrote its ONNX model."""

    path: str
    layout: str  #: "NCHW" or "NHWC" (float32, ImageNet-normalised, 3 channels)
    opset: int
    input_name: str
    output_name: str
    seconds: float
    exporter: str  #: e.g. "torch.onnx (dynamo=False)" or "keras model.export"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, kw_only=True)
class IdiomaticLoop:
    """The framework's own idiomatic training step, what its users write without cxrbench: the yardstick the
    harness-overhead benchmark (:mod:`cxrbench.run.overhead`) holds the backend's training path to.

    The core times ``step`` with the same window timer, warm-up and windows as the backend's epoch, so the two
    figures differ only by what the backend adds (its input pipeline, its step, the recorder).
    """

    step: Callable[[], Any]  #: one training step on in-memory data prepared beforehand; returns its loss
    sync: Callable[[], None]  #: block until queued device work is done (nothing to do where steps are synchronous)
    description: str  #: what runs, in words: network, optimiser, loss, API, data
    #: The thread pools in force, read back from the framework (``intra_op``, ``inter_op``); empty where the
    #: framework sizes them itself.
    threads: dict[str, int] = field(default_factory=dict)
