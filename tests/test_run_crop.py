"""A whole run with data.crop = "lungs" (the example NumPy backend, the tiny run): crop_boxes.csv beside run.json,
localisation scored against the NIH boxes mapped into the crops, the export's crop in its metadata, ``cxrbench
predict`` on the raw pictures reproducing the run's predictions and AUROC, and the TensorBoard curves."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import types

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from cxrbench.data import nih
from cxrbench.data.classes import CLASSES
from cxrbench.files import read_jsonl
from cxrbench.run.folder import MONITOR_JSONL
from cxrbench.run.tracking import EPOCH_PHASES
from helpers.tiny_run import TINY_RUN

pytestmark = pytest.mark.backends("numpy")
EPOCHS = 2


@pytest.fixture(scope="module")
def crop_run(tmp_path_factory):
    """About a minute on 2 loaded cores (data, two epochs, export): shared by every test here."""
    run_dir = tmp_path_factory.mktemp("crop") / "run"
    command = [sys.executable, "-m", "cxrbench", "run", "--backend", "numpy", *TINY_RUN, "--epochs", str(EPOCHS)]
    command += ["--set", "data.crop=lungs", "--monitor-interval", "0.2", "--out", str(run_dir)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir, json.loads((run_dir / "run.json").read_text())


def _crop_boxes(run_dir) -> dict[str, tuple[int, int, int, int]]:
    with open(run_dir / "crop_boxes.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["image", "x", "y", "w", "h", "method", "fallback"]
    return {r["image"]: tuple(int(r[k]) for k in "xywh") for r in rows}


@pytest.mark.slow
def test_the_run_records_the_crop_and_copies_its_boxes(crop_run):
    run_dir, run = crop_run
    boxes = _crop_boxes(run_dir)
    index = nih.read_index(run["data"]["root"], seed=0)
    assert set(boxes) == set(index.files)
    record = run["data"]["crop"]
    assert (record["method"], record["finder"], record["margin"]) == ("lungs", "classical", 0.05)
    assert record["images"] == len(index) and record["fallbacks"] <= 0.05 * len(index)
    side = run["settings"]["data"]["phantom_size"]
    assert all(w < side and h < side for _, _, w, h in boxes.values())  # cropped, not whole pictures


@pytest.mark.slow
def test_localisation_is_scored_against_the_boxes_mapped_into_the_crops(crop_run):
    """Each CAM gallery entry's true boxes equal the NIH box mapped by hand: clipped to the crop, shifted by its
    corner, scaled by the prepared size over the crop's size."""
    run_dir, run = crop_run
    crops, size = _crop_boxes(run_dir), run["data"]["size"]
    index = nih.read_index(run["data"]["root"], seed=0)
    localisation = json.loads((run_dir / "numpy" / "localisation.json").read_text())
    kept, clipped, outside = 0, 0, 0
    expected: dict[tuple[str, str], list] = {}
    for box in (b for b in index.boxes if b.image in set(np.asarray(index.files)[index.rows("test")])):
        x, y, w, h = crops[box.image]
        x0, y0 = max(box.x, x), max(box.y, y)
        x1, y1 = min(box.x + box.w, x + w), min(box.y + box.h, y + h)
        if x1 <= x0 or y1 <= y0:
            outside += 1
            continue
        kept += 1
        clipped += (x0, y0, x1, y1) != (box.x, box.y, box.x + box.w, box.y + box.h)
        fx, fy = size / w, size / h
        mapped = [(x0 - x) * fx, (y0 - y) * fy, (x1 - x0) * fx, (y1 - y0) * fy]
        expected.setdefault((box.image, box.label), []).append(mapped)
    assert localisation["crop_boxes"] == {"boxes": kept, "clipped": clipped, "outside": outside}
    assert localisation["iobb"]["overall"]["boxes"] == kept == run["data"]["boxes_test"]
    gallery = json.loads((run_dir / "numpy" / "cams" / "index.json").read_text())
    assert gallery
    for entry in gallery:
        np.testing.assert_allclose(entry["true_boxes"], expected[(entry["image"], entry["class"])], rtol=1e-6)


@pytest.mark.slow
def test_predict_crops_raw_pictures_as_trained_and_reproduces_the_runs_auroc(crop_run):
    run_dir, run = crop_run
    metadata = json.loads((run_dir / "numpy" / "onnx.json").read_text())["metadata"]
    assert json.loads(metadata["cxrbench.crop"])["method"] == "lungs"
    predictions = np.load(run_dir / "numpy" / "predictions.npz")
    root = run["data"]["root"]
    pictures = [f"{root}/images/{name}" for name in predictions["files"]]
    result = subprocess.run(
        [sys.executable, "-m", "cxrbench", "predict", str(run_dir), "--backend", "numpy", *pictures],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    rows = list(csv.reader(result.stdout.splitlines()))
    assert rows[0] == ["file", *CLASSES] and [r[0] for r in rows[1:]] == pictures
    scored = np.array([[float(v) for v in r[1:]] for r in rows[1:]])
    run_probabilities = 1.0 / (1.0 + np.exp(-predictions["logits"].astype(np.float64)))
    np.testing.assert_allclose(scored, run_probabilities, atol=1e-4)  # the export's parity gate, on raw pictures
    labels = predictions["labels"]
    defined = [c for c in range(len(CLASSES)) if 0 < labels[:, c].sum() < len(labels)]
    mean = np.mean([roc_auc_score(labels[:, c], scored[:, c]) for c in defined])
    assert mean == pytest.approx(run["backends"]["numpy"]["auroc"]["mean"], abs=1e-3)


@pytest.mark.slow
def test_the_backends_curves_read_back_with_tensorboards_reader(crop_run):
    pytest.importorskip("tensorboard", reason='needs the tensorboard package: pip install -e ".[tensorboard]"')
    sys.modules.setdefault("tensorboard.compat.notf", types.ModuleType("tensorboard.compat.notf"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, run = crop_run
    reader = EventAccumulator(str(run_dir / "tensorboard" / "numpy"))
    reader.Reload()
    tags = set(reader.Tags()["scalars"])
    per_epoch = {"loss/train", "loss/validation", "learning_rate", "throughput/images_per_s"}
    assert per_epoch <= tags
    assert {f"auroc/{c}" for c in CLASSES if c in run["backends"]["numpy"]["auroc"]["per_class"]}
    for tag in per_epoch:
        assert [e.step for e in reader.Scalars(tag)] == list(range(1, EPOCHS + 1)), tag
    # Host memory for exactly the epochs the monitor sampled (every 0.2 s here): a numpy epoch can be shorter than
    # that, so an epoch may have none, and the tag may be missing when no epoch had one; never a made-up value.
    samples = read_jsonl(run_dir / "numpy" / MONITOR_JSONL)
    sampled = {int(r["epoch"]) for r in samples if r.get("phase") in EPOCH_PHASES and r.get("epoch") and "rss_mib" in r}
    written = {e.step for e in reader.Scalars("host/rss_mib")} if "host/rss_mib" in tags else set()
    assert written == sampled
    history = run["backends"]["numpy"]["history"]
    assert [e.value for e in reader.Scalars("loss/validation")] == pytest.approx([h["val_loss"] for h in history])
    assert [(e.step, e.value) for e in reader.Scalars("auroc/mean")] == [
        (EPOCHS, pytest.approx(run["backends"]["numpy"]["auroc"]["mean"]))
    ]
