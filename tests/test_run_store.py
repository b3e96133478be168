"""Atomic file I/O (cxrbench.files), status bookkeeping (cxrbench.run.store) and run.json's schema."""

import copy
import json
import os

import numpy as np
import pytest

from cxrbench import files
from cxrbench.errors import CxrError
from cxrbench.run import store
from cxrbench.run.schema import validate


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "run.json"
    files.write_json(path, {"a": 1})

    with pytest.raises(TypeError):
        files.write_json(path, {"a": object()})  # not serialisable: fails mid-way

    assert json.loads(path.read_text()) == {"a": 1}
    assert os.listdir(tmp_path) == ["run.json"]


def test_arrays_round_trip_and_non_finite_floats_become_null(tmp_path):
    files.save_npz(tmp_path / "p.npz", logits=np.arange(6, dtype=np.float32).reshape(2, 3))
    assert files.load_npz(tmp_path / "p.npz")["logits"].tolist() == [[0, 1, 2], [3, 4, 5]]

    files.write_json(tmp_path / "m.json", {"auc": float("nan"), "values": [1.0, float("inf")], "n": np.int64(3)})
    assert json.loads((tmp_path / "m.json").read_text()) == {"auc": None, "values": [1.0, None], "n": 3}


def test_corrupt_json_is_a_one_line_error_naming_the_file(tmp_path):
    (tmp_path / "status.json").write_text("{not json")
    with pytest.raises(CxrError, match=r"status\.json: not valid JSON"):
        files.read_json(tmp_path / "status.json")
    assert files.read_json(tmp_path / "missing.json", default=[]) == []


def test_status_marks_the_running_stage_with_the_outcome(tmp_path):
    status = store.BackendStatus(tmp_path, "keras")
    status.start(pid=123)
    status.set_stage("equivalence", store.DONE, 1.5)
    status.set_stage("train", "running")
    status.finish("failed", "worker killed by signal SIGKILL during stage train")

    saved = files.read_json(tmp_path / "status.json")
    assert saved["status"] == "failed" and saved["pid"] == 123
    assert saved["stages"] == {"equivalence": "done", "train": "failed"}
    assert saved["stage_seconds"] == {"equivalence": 1.5}
    reopened = store.BackendStatus(tmp_path, "keras")
    assert reopened.is_done("equivalence") and not reopened.is_done("train")


def _minimal_run() -> dict:
    epoch = {
        "epoch": 1,
        "warmup": True,
        "train_loss": 0.7,
        "val_loss": 0.6,
        "train_time_s": 2.0,
        "val_time_s": 0.5,
        "data_wait_s": None,
        "images": 64,
        "images_per_s": 32.0,
        "lr": 1e-3,
        "steps": 4,
        "best": True,
    }
    return {
        "schema_version": 1,
        "cxrbench_version": "0.1.0",
        "suite": "smoke",
        "settings": {
            "data": {},
            "model": {},
            "train": {},
            "numerics": {},
            "eval": {},
            "export": {},
            "run": {"seed": 0, "gpus": 0, "equivalence_atol": 1e-4, "stages": ["train"]},
        },
        "environment": {"os": "Linux", "python": "3.11", "packages": {}, "gpu": {}},
        "created": "2025-01-01T00:00:00",
        "finished": None,
        "argv": ["run"],
        "baseline": "pytorch",
        "data": {
            "source": "phantom",
            "root": "/d",
            "key": "abc",
            "size": 64,
            "splits": {"train": 5, "val": 2, "test": 3},
            "classes": ["Atelectasis"],
            "class_order": "chexnet",
        },
        "backends": {
            "pytorch": {
                "status": "completed",
                "error": None,
                "log": "pytorch/log.txt",
                "history": [epoch],
                "auroc": {"per_class": {}, "mean": 0.8},
                "gpu": {"gpu_available": False, "source": "none", "reason": "no GPU"},
            }
        },
        "scaling": None,
    }


def test_a_complete_run_json_validates():
    validate(_minimal_run())


@pytest.mark.parametrize(
    "path, value, field",
    [
        (("backends", "pytorch", "status"), "done", "backends.pytorch.status"),
        (("data", "splits", "test"), -1, "data.splits.test"),
        (("backends", "pytorch", "history", 0, "warmup"), "yes", "backends.pytorch.history.0.warmup"),
        (("backends", "pytorch", "gpu", "source"), "nvidia", "backends.pytorch.gpu.source"),
        (("schema_version",), 2, "schema_version"),
    ],
)
def test_a_broken_run_json_names_the_field(path, value, field):
    run = copy.deepcopy(_minimal_run())
    target = run
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(CxrError) as error:
        validate(run, "run.json")
    assert str(error.value).startswith(f"run.json: {field}: ")


def test_a_missing_field_is_named():
    run = _minimal_run()
    del run["data"]["key"]
    with pytest.raises(CxrError, match=r"^run\.json: data: 'key' is a required property"):
        validate(run)
