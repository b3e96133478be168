"""The cross-backend checks (equivalence, ONNX parity, agreement of AUROC and of localisation, ONNX Runtime benchmark)
into ``comparison.json``, computed by the parent from the workers' files.

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
from cxrbench.metrics.inference import compare_localisation
from cxrbench.metrics.localisation import COMPARED_AT
from cxrbench.report.verdicts import models_scope
from cxrbench.run.folder import (
    COMPARISON_JSON,
    EQUIVALENCE_BATCH,
    EQUIVALENCE_NPZ,
    INIT_ONNX,
    INIT_ONNX_JSON,
    LOCALISATION_JSON,
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


def _inference(settings: Settings) -> dict[str, Any]:
    """The bootstrap settings of every between-backend test: rounds, confidence, min_positives, and the run's seed
    as the bootstrap's (so every comparison of a run resamples the same patients)."""
    evaluation = settings.eval
    return {
        "rounds": evaluation.bootstrap_rounds,
        "confidence": evaluation.confidence,
        "seed": settings.run.seed,
        "min_positives": evaluation.min_positives,
    }


def same_test_images(a: dict, b: dict) -> bool:
    return np.array_equal(a["files"], b["files"]) and np.array_equal(a["labels"], b["labels"])


def agreement_section(run_dir: Path, backends: list[str], settings: Settings) -> dict[str, Any]:
    """Every pair of backends compared on the same test images: a paired patient bootstrap per class and
    for the mean, Holm-adjusted across classes (image-level DeLong as a secondary figure). Each pair says what it
    is about (``about``): two trained models of one training seed, not the frameworks."""
    predictions = {
        n: load_npz(run_dir / n / PREDICTIONS_NPZ) for n in backends if (run_dir / n / PREDICTIONS_NPZ).is_file()
    }
    pairs = []
    for a, b in itertools.combinations(predictions, 2):
        pa, pb = predictions[a], predictions[b]
        if not same_test_images(pa, pb):
            pairs.append({"a": a, "b": b, "error": f"{a} and {b} were evaluated on different test images"})
            continue
        result = eq.agreement(
            a, pa["logits"], b, pb["logits"], pa["labels"], pa.get("patients"), **_inference(settings)
        )
        pairs.append({**result, "about": models_scope(settings.run.seed)})
    return {"pairs": pairs}


def box_overlaps(folder: Path) -> dict[str, Any] | None:
    """A backend folder's per-box localisation record (localisation.json ``boxes``: each true box's test position,
    class and best IoBB) with the patient of each box's image from predictions.npz (None when unknown); None
    when the CAM stage left no per-box record."""
    boxes = (read_json(folder / LOCALISATION_JSON) or {}).get("boxes")
    if not boxes or not boxes.get("position"):
        return None
    predictions = load_npz(folder / PREDICTIONS_NPZ) if (folder / PREDICTIONS_NPZ).is_file() else None
    patients = (predictions or {}).get("patients")
    positions = np.asarray(boxes["position"], dtype=np.int64)
    return {
        "position": positions,
        "class": list(boxes["class"]),
        "iobb": np.asarray(boxes["iobb"], dtype=np.float64),
        "patients": None if patients is None else np.asarray(patients)[positions],
    }


def same_boxes(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return np.array_equal(a["position"], b["position"]) and a["class"] == b["class"]


def localisation_section(run_dir: Path, backends: list[str], settings: Settings) -> dict[str, Any]:
    """Every pair of backends compared box by box: the share of true boxes found at IoBB > T, per class and
    overall, by a paired patient bootstrap, Holm-adjusted across classes; about two trained models, like the
    AUROC agreement."""
    records = {name: found for name in backends if (found := box_overlaps(run_dir / name)) is not None}
    inference = _inference(settings)
    pairs = []
    for a, b in itertools.combinations(records, 2):
        ra, rb = records[a], records[b]
        if not same_boxes(ra, rb):
            pairs.append({"a": a, "b": b, "error": f"{a} and {b} were scored on different true boxes"})
            continue
        result = compare_localisation(
            ra["iobb"],
            rb["iobb"],
            ra["class"],
            groups=ra["patients"],
            threshold=COMPARED_AT,
            rounds=inference["rounds"],
            confidence=inference["confidence"],
            seed=inference["seed"],
            min_boxes=inference["min_positives"],
        )
        pairs.append({"a": a, "b": b, **result, "about": models_scope(settings.run.seed)})
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
        "localisation": localisation_section(run_dir, backends, settings),
        "onnxruntime": onnxruntime_section(run_dir, backends, settings, threads),
    }
    write_json(run_dir / COMPARISON_JSON, comparison)
    return comparison
