"""Suite files (TOML) -> validated, immutable settings.

A suite names every choice that changes what is measured: data, model, recipe, numerics, export
tolerances. Every key is validated; an error names the file, the key and what is allowed. The
resolved settings travel to every worker as JSON (``Settings.to_dict`` / ``Settings.from_dict``).
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from cxrbench.errors import SuiteError

#: DenseNet block configurations by architecture name; the small ones build fast in tests.
ARCHITECTURES: dict[str, tuple[int, ...]] = {
    "densenet121": (6, 12, 24, 16),
    "densenet-small": (2, 2, 2, 2),
    "densenet-tiny": (1, 1, 1, 1),
}


def _choice(*values):
    return {"choices": values}


@dataclass(frozen=True)
class DataSettings:
    source: str = field(default="phantom", metadata=_choice("phantom", "chestxray14"))
    #: Data set folder; empty means the embedded phantom data set in the user cache.
    path: str = ""
    image_size: int = field(default=64, metadata={"min": 32})
    split: str = field(default="official", metadata=_choice("official", "random-70-10-20"))
    val_fraction: float = field(default=0.1, metadata={"min": 0.01, "max": 0.5})
    #: Exclusion list: one image file name per line (e.g. the 1,224 poor-quality images).
    exclude: str = ""
    #: Phantom data set size and resolution (only for source = "phantom").
    phantom_images: int = field(default=720, metadata={"min": 20})
    phantom_size: int = field(default=128, metadata={"min": 32})
    #: Crop every picture to its lung fields before resizing (docs/preprocessing.md): "none" or "lungs".
    crop: str = field(default="none", metadata=_choice("none", "lungs"))
    #: A lung-segmentation ONNX file for crop = "lungs"; empty: the built-in classical lung finder.
    crop_model: str = ""
    #: The crop box grows by this fraction of its width and height on each side.
    crop_margin: float = field(default=0.05, metadata={"min": 0.0, "max": 0.5})
    #: The segmentation network's input side when neither its input shape nor its metadata says (0: not given).
    crop_model_size: int = field(default=0, metadata={"min": 0})


@dataclass(frozen=True)
class ModelSettings:
    arch: str = field(default="densenet121", metadata=_choice(*ARCHITECTURES))
    #: shared: canonical weights made once from the seed; framework: each framework's own seeded
    #: initialiser; imagenet: the framework's ImageNet weights; anything else: a weights file path.
    init: str = "shared"

    @property
    def block_config(self) -> tuple[int, ...]:
        return ARCHITECTURES[self.arch]


@dataclass(frozen=True)
class TrainSettings:
    epochs: int = field(default=1, metadata={"min": 1})
    batch_size: int = field(default=16, metadata={"min": 1})
    learning_rate: float = field(default=1e-3, metadata={"min": 0.0})
    #: How the learning rate grows with the number of GPUs (global batch = batch_size x GPUs).
    lr_scaling: str = field(default="linear", metadata=_choice("none", "linear", "sqrt"))
    #: Which ranks BatchNorm statistics are reduced over with several: "global" (every rank of every node) or
    #: "node" (the ranks of one machine: no BatchNorm traffic between machines; docs/multi-node.md).
    batchnorm_sync: str = field(default="global", metadata=_choice("global", "node"))
    adam_beta1: float = field(default=0.9, metadata={"min": 0.0, "max": 1.0})
    adam_beta2: float = field(default=0.999, metadata={"min": 0.0, "max": 1.0})
    #: Set equal in every framework (Keras defaults to 1e-7, torch to 1e-8).
    adam_epsilon: float = field(default=1e-8, metadata={"min": 0.0})
    weight_decay: float = field(default=0.0, metadata={"min": 0.0})
    #: ReduceLROnPlateau on validation loss: multiply by factor after `patience` epochs without improvement.
    plateau_factor: float = field(default=0.1, metadata={"min": 0.0, "max": 1.0})
    plateau_patience: int = field(default=0, metadata={"min": 0})
    hflip: bool = True
    #: Cap on optimisation steps per epoch (0: the whole training split).
    max_steps: int = field(default=0, metadata={"min": 0})
    #: Steps at the start of every epoch left out of the steady-state figure (tracing, compilation,
    #: autotuning, allocator and input pipeline warm-up). Must be below the steps of an epoch.
    warmup_steps: int = field(default=5, metadata={"min": 1})
    #: Steps per timing window after the warm-up: the device is synchronised only at window edges.
    window_steps: int = field(default=5, metadata={"min": 1})


@dataclass(frozen=True)
class NumericsSettings:
    precision: str = field(default="fp32", metadata=_choice("fp32", "bf16", "fp16"))
    channels_last: bool = False
    tf32: bool = False
    compile: bool = False
    jit_compile: bool = False
    cudnn_benchmark: bool = False
    memory_growth: bool = True
    #: CPU thread budget of every framework; 0: the core's default, the usable cores of this process
    #: (os.sched_getaffinity), the same for every backend (cxrbench.machine.budget).
    intra_op_threads: int = field(default=0, metadata={"min": 0})
    inter_op_threads: int = field(default=0, metadata={"min": 0})
    loader_workers: int = field(default=0, metadata={"min": 0})
    pin_memory: bool = True
    #: Ask each framework for run-to-run identical numbers where it can give them (slower; see docs/measurement.md).
    deterministic: bool = False


@dataclass(frozen=True)
class EvalSettings:
    bootstrap_rounds: int = field(default=1000, metadata={"min": 0})
    confidence: float = field(default=0.95, metadata={"min": 0.5, "max": 0.999})
    tta_hflip: bool = False
    #: Fewest positives (and negatives) a class needs for an interval or a test; below it the report says
    #: "too few positives (n)". At least 2: one positive makes every resample's AUROC 0, 1 or undefined.
    min_positives: int = field(default=5, metadata={"min": 2})
    #: Heat map to boxes (cxrbench/metrics/localisation.py): "relative" keeps the map >= cam_threshold x its
    #: range; "chestxray8" scales it to 0-255 and thresholds at the paper's fixed levels (60 and 180);
    #: "cam-largest" boxes the largest connected region above 20 % of the max (Zhou et al. 2016).
    cam_method: str = field(default="relative", metadata=_choice("relative", "chestxray8", "cam-largest"))
    #: Fraction of the map's range for cam_method = "relative".
    cam_threshold: float = field(default=0.5, metadata={"min": 0.0, "max": 1.0})
    cam_images: int = field(default=16, metadata={"min": 0})


@dataclass(frozen=True)
class ExportSettings:
    onnx: bool = True
    opset: int = field(default=17, metadata={"min": 17})
    atol: float = field(default=1e-4, metadata={"min": 0.0})
    rtol: float = field(default=1e-3, metadata={"min": 0.0})


@dataclass(frozen=True)
class RunSettings:
    seed: int = field(default=0, metadata={"min": 0})
    #: 0: one GPU when there is one, else the CPU. N >= 1: exactly N GPUs (refused if fewer exist).
    gpus: int = field(default=0, metadata={"min": 0})
    #: Machines one training run spans, each with ``gpus`` GPUs (or one CPU rank when ``gpus`` = 0); above 1 the
    #: ranks are started by each framework's own launcher (docs/multi-node.md), never by cxrbench.
    nodes: int = field(default=1, metadata={"min": 1})
    #: Launched JAX ranks: seconds without a heartbeat after which the coordination service counts a peer process
    #: as dead and stops the others (``jax.distributed.initialize(heartbeat_timeout_seconds=...)``; 100 is JAX's
    #: default). TensorFlow and torch ranks notice a dead peer's closed connection within seconds on their own.
    heartbeat_timeout_s: int = field(default=100, metadata={"min": 1})
    #: Tolerance (max abs logit difference) of the cross-backend equivalence check.
    equivalence_atol: float = field(default=1e-4, metadata={"min": 0.0})
    #: Stop after this stage: "train" skips evaluation, CAM and export (throughput suites).
    stages: tuple[str, ...] = ("train", "evaluate", "cam", "export")
    #: Large files a completed run keeps: all | results (drops init.onnx) | minimal (reports and metrics only).
    keep: str = field(default="results", metadata=_choice("all", "results", "minimal"))
    #: Seed repeats (``--repeats``): repeat i trains every backend again with seed ``seed + i - 1``.
    repeats: int = field(default=1, metadata={"min": 1})
    #: The harness-overhead benchmark after the workers: each backend's training path against its framework's
    #: idiomatic loop in this many alternating rounds of fresh processes (0: not measured; cxrbench.run.overhead).
    overhead_rounds: int = field(default=0, metadata={"min": 0})


@dataclass(frozen=True)
class ProfileSettings:
    """Where the time goes and how close to the machine's limit (docs/why-faster.md)."""

    #: After training, a few steady steps under the framework's own profiler, cut into operation categories.
    enabled: bool = True
    #: Profiled steps (the traces grow with them: a DenseNet-121 step is tens of thousands of events in PyTorch).
    steps: int = field(default=3, metadata={"min": 1})
    #: Steps run before the profiler starts (the input pipeline refills, caches warm up again after validation).
    warmup_steps: int = field(default=2, metadata={"min": 0})
    #: Measure the dense-matmul ceiling of the device (seconds) before training, for the model FLOPs utilisation.
    ceiling: bool = True


STAGES = ("train", "evaluate", "cam", "export")

_SECTIONS = {
    "data": DataSettings,
    "model": ModelSettings,
    "train": TrainSettings,
    "numerics": NumericsSettings,
    "eval": EvalSettings,
    "export": ExportSettings,
    "run": RunSettings,
    "profile": ProfileSettings,
}


@dataclass(frozen=True)
class Settings:
    name: str = "custom"
    description: str = ""
    data: DataSettings = DataSettings()
    model: ModelSettings = ModelSettings()
    train: TrainSettings = TrainSettings()
    numerics: NumericsSettings = NumericsSettings()
    eval: EvalSettings = EvalSettings()
    export: ExportSettings = ExportSettings()
    run: RunSettings = RunSettings()
    profile: ProfileSettings = ProfileSettings()

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["run"]["stages"] = list(self.run.stages)
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any], origin: str = "<settings>") -> Settings:
        return _build(raw, origin)

    def replace(self, **dotted: Any) -> Settings:
        """Return a copy with ``section.key`` values changed (validated like a suite file)."""
        raw = self.to_dict()
        for key, value in dotted.items():
            section, _, name = key.partition(".")
            if not isinstance(raw.get(section), dict):
                raise SuiteError(f"<override>: unknown key {key!r} (sections: {', '.join(_SECTIONS)})")
            raw[section][name] = value
        return _build(raw, "<override>")


def _type_name(kind: type) -> str:
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(kind, str(kind))


def _check_value(origin: str, key: str, f: dataclasses.Field, kind: Any, value: Any) -> Any:
    if typing.get_origin(kind) is tuple:
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise SuiteError(f"{origin}: {key} must be a list of strings, got {value!r}")
        unknown = [v for v in value if v not in STAGES]
        if unknown:
            raise SuiteError(f"{origin}: {key} has unknown stage {unknown[0]!r} (allowed: {', '.join(STAGES)})")
        return tuple(value)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if kind is bool or isinstance(value, bool):
        if not isinstance(value, bool) or kind is not bool:
            raise SuiteError(f"{origin}: {key} must be {_type_name(kind)}, got {value!r}")
    elif not isinstance(value, kind):
        raise SuiteError(f"{origin}: {key} must be {_type_name(kind)}, got {value!r}")
    meta = f.metadata
    if "choices" in meta and value not in meta["choices"]:
        raise SuiteError(
            f"{origin}: {key} = {value!r} is not allowed (allowed: {', '.join(map(str, meta['choices']))})"
        )
    if "min" in meta and value < meta["min"]:
        raise SuiteError(f"{origin}: {key} = {value!r} is below the minimum {meta['min']}")
    if "max" in meta and value > meta["max"]:
        raise SuiteError(f"{origin}: {key} = {value!r} is above the maximum {meta['max']}")
    return value


def _build(raw: dict[str, Any], origin: str) -> Settings:
    top: dict[str, Any] = {}
    for key, value in raw.items():
        if key in ("name", "description"):
            if not isinstance(value, str):
                raise SuiteError(f"{origin}: {key} must be a string, got {value!r}")
            top[key] = value
            continue
        section_cls = _SECTIONS.get(key)
        if section_cls is None:
            allowed = ", ".join(["name", "description", *_SECTIONS])
            raise SuiteError(f"{origin}: unknown key {key!r} (allowed: {allowed})")
        if not isinstance(value, dict):
            raise SuiteError(f"{origin}: [{key}] must be a table")
        known = {f.name: f for f in fields(section_cls)}
        hints = typing.get_type_hints(section_cls)
        values = {}
        for name, item in value.items():
            if name not in known:
                raise SuiteError(f"{origin}: unknown key '{key}.{name}' (allowed in [{key}]: {', '.join(known)})")
            values[name] = _check_value(origin, f"{key}.{name}", known[name], hints[name], item)
        top[key] = section_cls(**values)
    return Settings(**top)


def suites_dir() -> Path:
    """The folder of built-in suites: ``$CXRBENCH_SUITES`` or ``suites/`` beside the package."""
    env = os.environ.get("CXRBENCH_SUITES")
    return Path(env) if env else Path(__file__).resolve().parent.parent / "suites"


def available_suites() -> list[str]:
    return sorted(p.stem for p in suites_dir().glob("*.toml"))


def load_suite(name_or_path: str) -> Settings:
    """Load a suite by name (``smoke``) or path (``my/suite.toml``) and validate every key."""
    path = Path(name_or_path)
    if not path.suffix:
        path = suites_dir() / f"{name_or_path}.toml"
        if not path.is_file():
            raise SuiteError(f"unknown suite {name_or_path!r} (available: {', '.join(available_suites())})")
    if not path.is_file():
        raise SuiteError(f"{path}: suite file not found")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise SuiteError(f"{path}: not valid TOML: {exc}") from None
    raw.setdefault("name", path.stem)
    return _build(raw, str(path))


#: Command-line overrides for the common keys: option name -> dotted setting.
COMMON_OVERRIDES = {
    "epochs": "train.epochs",
    "image_size": "data.image_size",
    "batch_size": "train.batch_size",
    "seed": "run.seed",
    "data": "data.path",
    "max_steps": "train.max_steps",
    "arch": "model.arch",
    "init": "model.init",
    "precision": "numerics.precision",
}


def apply_overrides(settings: Settings, overrides: dict[str, Any]) -> Settings:
    """Apply ``{dotted_key: value}`` overrides, skipping ``None`` (option not given)."""
    given = {k: v for k, v in overrides.items() if v is not None}
    return settings.replace(**given) if given else settings


def parse_set_option(text: str) -> tuple[str, Any]:
    """Parse ``--set section.key=value`` (value read as TOML, falling back to a plain string)."""
    key, sep, value = text.partition("=")
    if not sep or "." not in key:
        raise SuiteError(f"--set {text!r}: expected section.key=value")
    try:
        parsed = tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value
    return key.strip(), parsed
