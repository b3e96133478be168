"""A cxrbench ONNX export as a scoring model: onnxruntime and numpy only, no training framework.

Everything the model needs to score a picture comes from the export's own metadata (input size, layout,
normalisation, class names, the lung crop its training pictures had) and its two outputs (logits and the CAM feature
map, with the classifier in the metadata), so an export scores the same way on a machine that never saw the backend.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cxrbench.data import crop
from cxrbench.data.images import resize_gray
from cxrbench.deploy import onnx_file
from cxrbench.errors import CxrError, first_line

#: Metadata every cxrbench export carries and scoring cannot do without.
REQUIRED_KEYS = ("cxrbench.input_size", "cxrbench.input_layout", "cxrbench.mean", "cxrbench.std", "cxrbench.classes")
#: Metadata too large or too internal to show as the model's description.
HIDDEN_KEYS = (onnx_file.WEIGHT_KEY, onnx_file.BIAS_KEY)


def sigmoid(logits: np.ndarray) -> np.ndarray:
    return (1.0 / (1.0 + np.exp(-logits.astype(np.float64)))).astype(np.float32)


@dataclass
class Scores:
    """One batch's answer: logits ``(N, C)`` and, when asked for, CAMs ``(N, len(classes), h, w)``."""

    logits: np.ndarray
    maps: np.ndarray | None = None

    @property
    def probabilities(self) -> np.ndarray:
        return sigmoid(self.logits)


class ScoringModel:
    """One ONNX session, loaded once and shared: onnxruntime's ``run`` may be called from several threads."""

    def __init__(self, path: Path, threads: int = 0, crop_model: str | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise CxrError(f"{self.path}: model file not found")
        try:
            self.session = onnx_file.session(self.path, threads)
        except Exception as exc:  # onnxruntime raises its own exception types for unreadable models
            raise CxrError(f"{self.path}: not a loadable ONNX model ({first_line(exc)})") from None
        self.metadata: dict[str, str] = dict(self.session.get_modelmeta().custom_metadata_map)
        missing = [key for key in REQUIRED_KEYS if key not in self.metadata]
        if missing:
            raise CxrError(
                f"{self.path}: not a cxrbench export (no metadata {missing[0]!r}); export it with cxrbench run"
            )
        self.size = int(self.metadata["cxrbench.input_size"])
        self.layout = self.metadata["cxrbench.input_layout"]
        self.mean, self.std = json.loads(self.metadata["cxrbench.mean"]), json.loads(self.metadata["cxrbench.std"])
        self.classes: list[str] = json.loads(self.metadata["cxrbench.classes"])
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]
        weight = onnx_file.WEIGHT_KEY
        self.cam_weight = onnx_file.decode_array(self.metadata, weight, str(self.path)) if self.has_cam else None
        #: The crop of the training pictures (``cxrbench.crop``; ``crop_model``: where its network is here).
        self.crop = crop.spec_from_metadata(self.metadata, str(self.path), crop_model)
        crop.check(self.crop)

    def prepare(self, gray: np.ndarray) -> np.ndarray:
        """A decoded picture as the training pictures were prepared: cropped as they were, resized to the input."""
        if self.crop.active:
            gray, _ = crop.crop_gray(gray, self.crop)
        return resize_gray(gray, self.size)

    @property
    def has_cam(self) -> bool:
        return onnx_file.FEATURES_OUTPUT in self.output_names and onnx_file.WEIGHT_KEY in self.metadata

    def class_indices(self, names: list[str]) -> list[int]:
        unknown = [n for n in names if n not in self.classes]
        if unknown:
            raise CxrError(f"--classes: unknown class {unknown[0]!r} (the model's classes: {', '.join(self.classes)})")
        return [self.classes.index(n) for n in names]

    def score(self, images: np.ndarray, cam_classes: list[int] | None = None) -> Scores:
        """Logits of uint8 gray ``(N, S, S)`` images and, with ``cam_classes``, their CAMs (one onnxruntime call)."""
        if cam_classes is not None and not self.has_cam:
            raise CxrError(
                f"{self.path}: this export has no '{onnx_file.FEATURES_OUTPUT}' output for CAMs "
                "(exported by an older cxrbench); export it again"
            )
        x = onnx_file.normalise(images, self.layout, self.mean, self.std)
        wanted = self.output_names[:1] + ([onnx_file.FEATURES_OUTPUT] if cam_classes is not None else [])
        outputs = self.session.run(wanted, {self.input_name: x})
        logits = np.asarray(outputs[0], dtype=np.float32)
        if cam_classes is None:
            return Scores(logits)
        layout = self.metadata.get("cxrbench.features_layout", self.layout)
        return Scores(logits, onnx_file.cam_from_features(outputs[1], layout, self.cam_weight, cam_classes))

    def describe(self) -> dict[str, Any]:
        """What ``GET /model`` answers: the metadata (without the classifier arrays), inputs and outputs."""
        return {
            "path": str(self.path),
            "input": {"name": self.input_name, "size": self.size, "layout": self.layout},
            "outputs": self.output_names,
            "classes": self.classes,
            "metadata": {k: v for k, v in self.metadata.items() if k not in HIDDEN_KEYS},
        }


def load_model(args) -> ScoringModel:
    """The model ``predict`` and ``serve`` name: an export or a run folder's (``--backend``), ``--crop-model``."""
    return ScoringModel(resolve_model(args.model, args.backend), crop_model=args.crop_model)


def resolve_model(source: str | Path, backend: str | None) -> Path:
    """An ONNX file as given, or the export of ``backend`` in a run folder (read through the report's reader)."""
    source = Path(source)
    if not source.is_dir():
        return source
    from cxrbench.report.load import load_run

    run = load_run(source)
    if backend is None:
        if len(run.backends) != 1:
            raise CxrError(
                f"{source}: a run folder with backends {', '.join(run.backends) or 'none'}: choose one with --backend"
            )
        backend = next(iter(run.backends))
    if backend not in run.backends:
        has = ", ".join(run.backends) or "none"
        raise CxrError(f"--backend {backend}: not in the run folder {source} (it has {has})")
    export = (run.backends[backend].get("onnx") or {}).get("export") or {}
    if not export.get("path"):
        raise CxrError(f"{source}: backend {backend!r} has no ONNX export (its export stage did not finish)")
    return run.backends[backend].folder / Path(export["path"]).name


def top_classes(probabilities: np.ndarray, k: int) -> list[int]:
    """The ``k`` most probable classes of one picture, most probable first (ties by class order)."""
    return [int(c) for c in np.argsort(-probabilities, kind="stable")[:k]]
