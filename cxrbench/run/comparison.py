"""The cross-backend checks (equivalence, ONNX parity, agreement, ONNX Runtime benchmark) into ``comparison.json``,
computed by the parent from the workers' files.

Each check uses only what exists on disk, so a failed or interrupted backend drops out of the
checks it cannot take part in while the others still run.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np

from cxrbench.backend.initial_weights import same_start
from cxrbench.deploy.onnx_file import run_onnx
from cxrbench.deploy.ort_benchmark import benchmark
from cxrbench.files import load_npz, read_json, write_json
from cxrbench.metrics import equivalence as eq
from cxrbench.run.folder import (
    COMPARISON_JSON,
    EQUIVALENCE_BATCH,
    EQUIVALENCE_NPZ,
    INIT_ONNX,
    INIT_ONNX_JSON,
    MODEL_ONNX,
    ONNX_JSON,
    PREDICTIONS_NPZ,
    SCHEMA_VERSION,
)
from cxrbench.suite import Settings


def equivalence_section(run_dir: Path, backends: list[str], settings: Settings) -> dict[str, Any]:
    if not same_start(settings.model.init):
        return {
            "skipped": f"model.init = {settings.model.init!r}: the backends start from different weights, "
            "so equal functions are not expected (use init = 'shared' or a weights file to check)",
            "passed": None,
        }
    batch = np.load(run_dir / EQUIVALENCE_BATCH, allow_pickle=False)
    outputs, missing = {}, []
    for name in backends:
        folder = run_dir / name
        if not (folder / EQUIVALENCE_NPZ).is_file():
            missing.append(name)
            continue
        outputs[name] = load_npz(folder / EQUIVALENCE_NPZ)["logits"]
        init = read_json(folder / INIT_ONNX_JSON)
        if init and (folder / INIT_ONNX).is_file():
            outputs[f"{name}/onnx"] = run_onnx(folder / INIT_ONNX, batch, init["export"]["layout"])
    section = eq.equivalence_matrix(outputs, settings.run.equivalence_atol)
    section.update(images=int(len(batch)), missing=missing)
    return section


def parity_section(run_dir: Path, backends: list[str]) -> dict[str, Any]:
    parity = {}
    for name in backends:
        onnx_json = read_json(run_dir / name / ONNX_JSON)
        if onnx_json:
            parity[name] = onnx_json["parity_images"]
    return parity


def agreement_section(run_dir: Path, backends: list[str], settings: Settings) -> dict[str, Any]:
    """Every pair of backends compared on the same test images: a paired patient bootstrap per class and
    for the mean, Holm-adjusted across classes (image-level DeLong as a secondary figure)."""
    predictions = {
        n: load_npz(run_dir / n / PREDICTIONS_NPZ) for n in backends if (run_dir / n / PREDICTIONS_NPZ).is_file()
    }
    evaluation = settings.eval
    inference = {
        "rounds": evaluation.bootstrap_rounds,
        "confidence": evaluation.confidence,
        "seed": settings.run.seed,
        "min_positives": evaluation.min_positives,
    }
    pairs = []
    for a, b in itertools.combinations(predictions, 2):
        pa, pb = predictions[a], predictions[b]
        if not np.array_equal(pa["files"], pb["files"]) or not np.array_equal(pa["labels"], pb["labels"]):
            pairs.append({"a": a, "b": b, "error": f"{a} and {b} were evaluated on different test images"})
            continue
        pairs.append(eq.agreement(a, pa["logits"], b, pb["logits"], pa["labels"], pa.get("patients"), **inference))
    return {"pairs": pairs}


def onnxruntime_section(run_dir: Path, backends: list[str], settings: Settings, threads: int) -> dict[str, Any]:
    results = {}
    for name in backends:
        onnx_json = read_json(run_dir / name / ONNX_JSON)
        if onnx_json:
            results[name] = benchmark(
                run_dir / name / MODEL_ONNX,
                onnx_json["export"]["layout"],
                settings.data.image_size,
                threads,
                seed=settings.run.seed,
            )
    return results


def write_comparison(run_dir: Path, backends: list[str], settings: Settings, threads: int) -> dict[str, Any]:
    comparison = {
        "schema_version": SCHEMA_VERSION,
        "equivalence": equivalence_section(run_dir, backends, settings),
        "parity": parity_section(run_dir, backends),
        "agreement": agreement_section(run_dir, backends, settings),
        "onnxruntime": onnxruntime_section(run_dir, backends, settings, threads),
    }
    write_json(run_dir / COMPARISON_JSON, comparison)
    return comparison
