"""ONNX helpers every backend shares: metadata, input preparation, onnxruntime parity.

onnx and onnxruntime are imported inside the functions, so ``import cxrbench`` stays light.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from cxrbench.classes import CLASS_ORDER_NAME, CLASSES, IMAGENET_MEAN, IMAGENET_STD
from cxrbench.errors import CxrError, first_line


def model_metadata(layout: str, image_size: int, backend: str) -> dict[str, str]:
    """The metadata properties that say exactly what an exported model expects and returns."""
    return {
        "cxrbench.backend": backend,
        "cxrbench.input_layout": layout,
        "cxrbench.input_dtype": "float32",
        "cxrbench.input_size": str(image_size),
        "cxrbench.input_channels": "3 (gray replicated)",
        "cxrbench.input_normalisation": "(x / 255 - mean) / std",
        "cxrbench.mean": json.dumps(list(IMAGENET_MEAN)),
        "cxrbench.std": json.dumps(list(IMAGENET_STD)),
        "cxrbench.output": "logits (apply a sigmoid for probabilities)",
        "cxrbench.class_order": CLASS_ORDER_NAME,
        "cxrbench.classes": json.dumps(list(CLASSES)),
    }


def stamp_metadata(path: str | Path, properties: dict[str, str]) -> None:
    """Add metadata properties to an ONNX file in place, keeping external data where it is."""
    import onnx

    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    existing = {p.key: p for p in model.metadata_props}
    for key, value in properties.items():
        if key in existing:
            existing[key].value = value
        else:
            entry = model.metadata_props.add()
            entry.key, entry.value = key, value
    onnx.save(model, str(path))


def read_metadata(path: str | Path) -> dict[str, str]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in model.metadata_props}


def check_model(path: str | Path) -> None:
    """Run ``onnx.checker`` (full check, including shape inference); raise a one-line error."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:  # onnx raises several exception types
        raise CxrError(f"{path}: onnx.checker rejected the model: {first_line(exc)}") from None


def normalise(images: np.ndarray, layout: str) -> np.ndarray:
    """uint8 gray ``(N, S, S)`` -> float32 normalised 3-channel input in ``layout`` (NCHW/NHWC)."""
    x = images.astype(np.float32) / 255.0
    mean = np.asarray(IMAGENET_MEAN, dtype=np.float32)
    std = np.asarray(IMAGENET_STD, dtype=np.float32)
    x = (x[..., None] - mean) / std  # (N, S, S, 3)
    x = x.astype(np.float32)
    if layout == "NCHW":
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    if layout == "NHWC":
        return np.ascontiguousarray(x)
    raise ValueError(f"unknown layout {layout!r}")


def session(path: str | Path, threads: int = 0):
    """An onnxruntime CPU session with fixed options (threads, full graph optimisation)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_onnx(path: str | Path, images: np.ndarray, layout: str, batch_size: int = 32, sess=None) -> np.ndarray:
    """Logits of an exported model for uint8 gray images, in batches."""
    sess = sess or session(path)
    name = sess.get_inputs()[0].name
    outputs = [sess.run(None, {name: normalise(images[i : i + batch_size], layout)})[0] for i in range(0, len(images), batch_size)]
    return np.concatenate(outputs).astype(np.float32)


def diff_stats(reference: np.ndarray, other: np.ndarray, atol: float, rtol: float) -> dict[str, Any]:
    """Max/mean/median absolute and relative differences, and the verdict.

    An element fails when ``|a - b| > atol + rtol * |a|`` (numpy's ``allclose`` rule).
    """
    reference = np.asarray(reference, dtype=np.float64)
    other = np.asarray(other, dtype=np.float64)
    if reference.shape != other.shape:
        return {"passed": False, "error": f"shape {other.shape} differs from {reference.shape}"}
    absolute = np.abs(reference - other)
    relative = absolute / np.maximum(np.abs(reference), 1e-12)
    failing = absolute > atol + rtol * np.abs(reference)
    return {
        "passed": bool(not failing.any()),
        "atol": atol,
        "rtol": rtol,
        "max_abs": float(absolute.max(initial=0.0)),
        "mean_abs": float(absolute.mean()) if absolute.size else 0.0,
        "median_abs": float(np.median(absolute)) if absolute.size else 0.0,
        "max_rel": float(relative.max(initial=0.0)),
        "mean_rel": float(relative.mean()) if relative.size else 0.0,
        "failing": int(failing.sum()),
        "compared": int(absolute.size),
    }
