"""ONNX helpers every backend shares: metadata, input preparation, onnxruntime parity.

onnx and onnxruntime are imported inside the functions, so ``import cxrbench`` stays light.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cxrbench.data.classes import CLASS_ORDER_NAME, CLASSES, IMAGENET_MEAN, IMAGENET_STD
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


#: The export's second output: the final feature map after the last BatchNorm and ReLU, in the input's layout.
FEATURES_OUTPUT = "features"
WEIGHT_KEY, BIAS_KEY = "cxrbench.classifier_weight", "cxrbench.classifier_bias"


def cam_metadata(weight: np.ndarray, bias: np.ndarray, layout: str) -> dict[str, str]:
    """What a CAM needs besides the features: the classifier ``(classes, K)`` and bias, bit-exact float32."""
    return {
        "cxrbench.features_output": FEATURES_OUTPUT,
        "cxrbench.features_layout": layout,
        "cxrbench.cam": "maps[c] = sum_k weight[c, k] * features[k]; spatial mean + bias[c] = logit c",
        WEIGHT_KEY: encode_array(weight),
        BIAS_KEY: encode_array(bias),
    }


def encode_array(array: np.ndarray) -> str:
    """A float32 array as JSON text (shape + little-endian base64): metadata values are strings."""
    data = np.ascontiguousarray(array, dtype="<f4")
    return json.dumps({"dtype": "<f4", "shape": list(data.shape), "base64": base64.b64encode(data.tobytes()).decode()})


def decode_array(metadata: Mapping[str, str], key: str, where: str) -> np.ndarray:
    """The array :func:`encode_array` wrote under ``key``; a one-line error naming ``where`` otherwise."""
    if key not in metadata:
        raise CxrError(f"{where}: no metadata {key!r} (exported by an older cxrbench, or not by cxrbench)")
    try:
        entry = json.loads(metadata[key])
        data = np.frombuffer(base64.b64decode(entry["base64"]), dtype=entry["dtype"])
        return data.reshape(entry["shape"]).astype(np.float32)
    except (ValueError, KeyError, TypeError) as exc:
        raise CxrError(f"{where}: metadata {key!r} is malformed ({first_line(exc)})") from None


def cam_from_features(features: np.ndarray, layout: str, weight: np.ndarray, classes: Sequence[int]) -> np.ndarray:
    """Class activation maps ``(N, len(classes), h, w)`` from the export's feature output and the classifier."""
    spec = "nkhw,ck->nchw" if layout == "NCHW" else "nhwk,ck->nchw"
    return np.einsum(spec, features, weight[list(classes)]).astype(np.float32)


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


def normalise(
    images: np.ndarray, layout: str, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> np.ndarray:
    """uint8 gray ``(N, S, S)`` -> float32 normalised 3-channel input in ``layout`` (NCHW/NHWC)."""
    x = images.astype(np.float32) / 255.0
    mean = np.asarray(mean, dtype=np.float32)
    std = np.asarray(std, dtype=np.float32)
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
    return run_onnx_outputs(path, images, layout, batch_size, sess)[0]


def run_onnx_outputs(
    path: str | Path, images: np.ndarray, layout: str, batch_size: int = 32, sess=None, features: bool = False
) -> tuple[np.ndarray, np.ndarray | None]:
    """``(logits, features or None)`` for uint8 gray images, in batches; features only when asked for."""
    sess = sess or session(path)
    name = sess.get_inputs()[0].name
    wanted = [sess.get_outputs()[0].name] + ([FEATURES_OUTPUT] if features else [])
    parts = [
        sess.run(wanted, {name: normalise(images[i : i + batch_size], layout)})
        for i in range(0, len(images), batch_size)
    ]
    logits = np.concatenate([p[0] for p in parts]).astype(np.float32)
    return logits, (np.concatenate([p[1] for p in parts]).astype(np.float32) if features else None)


def onnx_cam(path: str | Path, images: np.ndarray, layout: str, classes: Sequence[int], sess=None):
    """``(logits, maps, bias)`` from the export alone: its two outputs and the classifier in its metadata."""
    sess = sess or session(path)
    metadata = sess.get_modelmeta().custom_metadata_map
    weight, bias = decode_array(metadata, WEIGHT_KEY, str(path)), decode_array(metadata, BIAS_KEY, str(path))
    logits, features = run_onnx_outputs(path, images, layout, sess=sess, features=True)
    feature_layout = metadata.get("cxrbench.features_layout", layout)
    return logits, cam_from_features(features, feature_layout, weight, classes), bias[list(classes)]


def cam_identity(path: str | Path, images: np.ndarray, layout: str, atol: float, rtol: float) -> dict[str, Any]:
    """The CAM identity on the export: each map's spatial mean plus the bias against the export's own logit."""
    classes = list(range(len(CLASSES)))
    logits, maps, bias = onnx_cam(path, images, layout, classes)
    return diff_stats(logits, maps.mean(axis=(2, 3)) + bias, atol, rtol)


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
