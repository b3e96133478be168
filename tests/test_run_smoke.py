"""The smoke suite end to end with two built-in backends: every stage, every file of the run folder contract, and each
backend really learns (one epoch of DenseNet-121 at 64 px, from the shared initial weights). The run itself is the
session's ``smoke_run`` fixture (tests/helpers/smoke_run.py), which any other test reading a whole run shares."""

import json

import numpy as np
import pytest

from cxrbench.data.classes import CLASSES
from cxrbench.run.folder import BACKEND_FILES, RUN_FILES
from cxrbench.run.schema import validate
from helpers.smoke_run import SMOKE_BACKENDS

BACKENDS = SMOKE_BACKENDS


@pytest.mark.slow
def test_both_backends_complete_with_accuracy_and_localisation(smoke_run):
    run_dir, run = smoke_run
    validate(run, run_dir / "run.json")
    assert run["status"] == "completed" and run["suite"] == "smoke"
    for name in BACKENDS:
        backend = run["backends"][name]
        assert backend["status"] == "completed", backend["error"]
        assert set(backend["auroc"]["per_class"]) == set(CLASSES)
        assert 0.0 <= backend["auroc"]["mean"] <= 1.0
        for metric in ("iobb", "iou", "centred_box"):
            assert backend["localisation"][metric]["overall"]["boxes"] > 0
        assert backend["throughput"]["train_images_per_s"] > 0 and backend["throughput"]["predict_images_per_s"] > 0
        assert backend["gpu"]["gpu_available"] or backend["gpu"]["reason"]
        predictions = np.load(run_dir / name / "predictions.npz")
        assert predictions["logits"].shape == (run["data"]["splits"]["test"], len(CLASSES))


@pytest.mark.slow
def test_equivalence_and_onnx_parity_pass(smoke_run):
    run_dir, _ = smoke_run
    comparison = json.loads((run_dir / "comparison.json").read_text())
    equivalence = comparison["equivalence"]
    assert equivalence["labels"] == ["pytorch", "pytorch/onnx", "keras", "keras/onnx"]
    assert equivalence["passed"], equivalence["failures"]
    assert max(max(row) for row in equivalence["max_abs"]) <= equivalence["atol"]
    for name in BACKENDS:
        assert comparison["parity"][name]["passed"], comparison["parity"][name]
        onnx_json = json.loads((run_dir / name / "onnx.json").read_text())
        assert onnx_json["parity_random"]["passed"] and onnx_json["metadata"]["cxrbench.class_order"] == "chexnet"
        timing = comparison["onnxruntime"][name]
        assert timing["latency_ms_b1"]["p95"] >= timing["latency_ms_b1"]["p50"] > 0
        assert timing["session_options"]["graph_optimization_level"] == "ORT_ENABLE_ALL"
    (pair,) = comparison["agreement"]["pairs"]
    assert (pair["a"], pair["b"]) == BACKENDS and -1.0 <= pair["score_correlation"]["pearson"] <= 1.0


@pytest.mark.slow
def test_every_file_of_the_contract_exists(smoke_run):
    run_dir, _ = smoke_run
    missing = [f for f in RUN_FILES if not (run_dir / f).is_file()]
    missing += [f"{name}/{f}" for name in BACKENDS for f in BACKEND_FILES if not (run_dir / name / f).is_file()]
    assert not missing
    for name in BACKENDS:
        gallery = json.loads((run_dir / name / "cams" / "index.json").read_text())
        assert gallery and all((run_dir / name / "cams" / entry["file"]).is_file() for entry in gallery)
        cams = np.load(run_dir / name / "cams.npz")
        assert cams["maps"].dtype == np.uint8 and len(cams["maps"]) == len(gallery)


@pytest.mark.slow
@pytest.mark.parametrize("name", BACKENDS)
def test_one_epoch_learns_and_localises(smoke_run, name):
    """One epoch from the shared initial weights gives a mean AUROC far above chance on the test split, and CAMs
    that find the phantom's findings clearly better than a fixed centred box on the same images and boxes."""
    backend = smoke_run.run["backends"][name]
    localisation = json.loads((smoke_run.folder / name / "localisation.json").read_text())
    cam_accuracy = localisation["iobb"]["overall"]["accuracy"]["0.5"]
    centred_accuracy = localisation["centred_box"]["overall"]["accuracy"]["0.5"]
    print(
        f"{name}: mean AUROC {backend['auroc']['mean']:.3f}; T(IoBB)=0.5 accuracy CAM {cam_accuracy:.3f} vs "
        f"centred box {centred_accuracy:.3f} on {localisation['images']} images"
    )
    assert backend["history"][-1]["epoch"] == 1 and smoke_run.run["settings"]["model"]["init"] == "shared"
    assert backend["auroc"]["mean"] > 0.75
    # Keras training on CPU is not bit-reproducible (oneDNN's threaded reductions; op determinism
    # does not cure it), and one short epoch amplifies that: eight runs gave CAM accuracy
    # 0.173-0.236 for keras (pytorch: 0.307 every time) against 0.024 for the centred box. The
    # margin sits below that spread, and still asks for several times the baseline.
    assert cam_accuracy > centred_accuracy + 0.10


@pytest.mark.slow
def test_the_profile_puts_both_backends_side_by_side(smoke_run):
    """The main job profiles both backends by default: categories that add up to each profiled step, the machine's
    share against a measured ceiling, and one explanation of keras against the baseline (its share is a measurement
    of the machine it ran on, so only its arithmetic is checked here)."""
    run = smoke_run.run
    section = run["profile_comparison"]
    assert set(section["step_ms"]) == set(BACKENDS) and section["missing"] == {}
    for name in BACKENDS:
        backend = run["backends"][name]
        profile = backend["profile"]
        assert profile["status"] == "done" and backend["stages"]["profile"] == "done"
        assert sum(profile["categories_ms"].values()) == pytest.approx(profile["step_ms"], rel=1e-6)
        assert profile["categories_ms"]["other"] < 0.02 * profile["step_ms"], profile["unmapped"]
        assert backend["efficiency"]["fraction_of_measured"] > 0
    (pair,) = section["pairs"]
    assert (pair["backend"], pair["baseline"]) == ("keras", "pytorch") and pair["sentence"]
    named = sum(v for k, v in pair["by_category_ms"].items() if k != "other")
    assert pair["explained_ms"] == pytest.approx(named)
