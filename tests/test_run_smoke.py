"""The smoke suite end to end with both built-in backends: every stage, every file of the run folder contract."""

import json
import subprocess
import sys
import time

import numpy as np
import pytest

from cxrbench.data.classes import CLASSES
from cxrbench.run.folder import BACKEND_FILES, RUN_FILES
from cxrbench.run.schema import validate

BACKENDS = ("pytorch", "keras")
pytestmark = pytest.mark.backends(*BACKENDS)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("smoke") / "run"
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "cxrbench", "run", "--backend", "pytorch", "--backend", "keras", "--out", str(run_dir)],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    wall = time.monotonic() - start
    run = json.loads((run_dir / "run.json").read_text())
    stages = {name: run["backends"][name].get("stage_seconds") for name in BACKENDS}
    print(f"\nsmoke run with {', '.join(BACKENDS)}: wall time {wall:.1f} s; stage seconds {json.dumps(stages)}")
    print(result.stderr[-3000:])
    assert result.returncode == 0, result.stderr
    return run_dir, run


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
def test_the_profile_puts_both_backends_side_by_side(smoke_run):
    """The main job profiles both backends by default: categories that add up to each profiled step, the machine's
    share against a measured ceiling, and one explanation of keras against the baseline (its share is a measurement
    of the machine it ran on, so only its arithmetic is checked here)."""
    _, run = smoke_run
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
