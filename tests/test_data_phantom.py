"""The phantom data set: NIH's exact format, NIH-like labels, visible findings inside their boxes, determinism."""

from __future__ import annotations

import hashlib
import re

import numpy as np
import pytest

from cxrbench.data import nih, phantom
from cxrbench.data.classes import CLASSES
from cxrbench.data.images import decode_gray
from cxrbench.errors import DataError


@pytest.fixture(scope="module")
def phantom_root(tmp_path_factory):
    return phantom.synthesize(tmp_path_factory.mktemp("phantom") / "data", images=600, size=48, seed=7)


@pytest.fixture(scope="module")
def index(phantom_root):
    return nih.read_index(phantom_root, seed=7)


def folder_digest(root) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def test_writes_nih_headers_and_names(phantom_root, index):
    assert (phantom_root / "Data_Entry_2017.csv").read_text().splitlines()[0] == (
        "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
        "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],"
    )
    assert (phantom_root / "BBox_List_2017.csv").read_text().splitlines()[
        0
    ] == "Image Index,Finding Label,Bbox [x,y,w,h],,,"
    assert index.notes == [] and len(index) == 600
    for name, patient in zip(index.files, index.patients):
        assert re.fullmatch(r"\d{8}_\d{3}\.png", name) and int(name[:8]) == patient
    per_patient = np.bincount(np.unique(index.patients, return_inverse=True)[1])
    assert per_patient.max() > 1 and per_patient.mean() > 1.5
    assert set(index.views) == {"PA", "AP"}


def test_age_and_gender_belong_to_the_patient(phantom_root):
    rows = [line.split(",") for line in (phantom_root / "Data_Entry_2017.csv").read_text().splitlines()[1:]]
    by_patient: dict[str, list[tuple[int, int, str]]] = {}
    for row in rows:
        by_patient.setdefault(row[3], []).append((int(row[2]), int(row[4]), row[5]))
    for visits in by_patient.values():
        visits.sort()
        assert len({gender for _, _, gender in visits}) == 1
        ages = [age for _, age, _ in visits]
        assert ages == sorted(ages) and ages[-1] - ages[0] <= 30


def test_lists_are_patient_disjoint_with_about_a_fifth_in_test(phantom_root, index):
    train_val = set(nih.read_name_list(phantom_root / "train_val_list.txt"))
    test = set(nih.read_name_list(phantom_root / "test_list.txt"))
    assert not train_val & test and train_val | test == set(index.files)
    patient = dict(zip(index.files, index.patients))
    assert not {patient[n] for n in train_val} & {patient[n] for n in test}
    assert 0.17 <= len(test) / 600 <= 0.28


def test_label_prevalence_is_nih_like_and_every_split_has_every_class(index):
    counts = dict(zip(CLASSES, index.labels.sum(axis=0)))
    assert 0.4 <= (index.labels.sum(axis=1) == 0).mean() <= 0.6
    common = min(counts[c] for c in ("Infiltration", "Effusion", "Atelectasis"))
    assert common > max(counts[c] for c in CLASSES if c not in ("Infiltration", "Effusion", "Atelectasis"))
    assert 0 < counts["Hernia"] <= np.median(list(counts.values())) and common > 1.5 * counts["Hernia"]
    # The published test list is stratified; validation is carved out by a hash of the patient id (issue 10:
    # splits that do not move), which cannot promise every rare class in 10 % of 480 images.
    for split in ("train", "test"):
        assert index.labels[index.rows(split)].sum(axis=0).min() >= 1, split
    pairs = index.labels.T.astype(int) @ index.labels.astype(int)
    assert pairs[CLASSES.index("Effusion"), CLASSES.index("Atelectasis")] > 0


def test_every_finding_of_every_test_image_has_its_box(index):
    boxed = {(b.image, b.label) for b in index.boxes}
    test_rows = index.rows("test")
    expected = {(index.files[r], CLASSES[c]) for r in test_rows for c in np.flatnonzero(index.labels[r])}
    assert boxed == expected and len(index.boxes) == len(expected)
    assert all((b.frame_w, b.frame_h) == (48, 48) for b in index.boxes)


def test_findings_are_inside_their_boxes(index):
    """Mean gray in a positive finding's box differs from the same box in images without that class."""
    pixels = {f: decode_gray(p).astype(float) for f, p in zip(index.files, index.paths)}
    row_of = index.row_of()
    for c, name in enumerate(CLASSES):
        boxes = [b for b in index.boxes if b.label == name]
        negatives = [pixels[f] for f, lab in zip(index.files, index.labels) if not lab[c]][:60]
        sign = np.sign(phantom.FINDINGS[name][4])
        contrast = []
        for b in boxes:
            y0, y1, x0, x1 = int(b.y), int(np.ceil(b.y + b.h)), int(b.x), int(np.ceil(b.x + b.w))
            inside = pixels[b.image][y0:y1, x0:x1].mean()
            baseline = np.mean([n[y0:y1, x0:x1].mean() for n in negatives])
            contrast.append(sign * (inside - baseline))
            assert index.labels[row_of[b.image], c] == 1
        assert np.mean(contrast) > 10, (name, contrast)  # gray levels (of 255)


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    a = phantom.synthesize(tmp_path / "a", images=40, size=32, seed=1)
    b = phantom.synthesize(tmp_path / "b", images=40, size=32, seed=1)
    c = phantom.synthesize(tmp_path / "c", images=40, size=32, seed=2)
    assert folder_digest(a) == folder_digest(b) != folder_digest(c)


def test_rejects_bad_settings(tmp_path):
    with pytest.raises(DataError, match="phantom images = 5"):
        phantom.synthesize(tmp_path / "x", images=5, size=32, seed=0)
    with pytest.raises(DataError, match="phantom size = 16"):
        phantom.synthesize(tmp_path / "x", images=40, size=16, seed=0)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "something.txt").write_text("mine")
    with pytest.raises(DataError, match="full: exists and is not an empty folder"):
        phantom.synthesize(tmp_path / "full", images=40, size=32, seed=0)


def test_default_data_set_is_built_once_in_the_user_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CXRBENCH_CACHE", str(tmp_path / "cache"))
    first = phantom.ensure_default(images=30, size=32, seed=0)
    assert first.parent == tmp_path / "cache" and "phantom" in first.name
    assert len(nih.read_index(first)) == 30

    def must_not_run(*args, **kwargs):
        raise AssertionError("regenerated")

    monkeypatch.setattr(phantom, "synthesize", must_not_run)
    assert phantom.ensure_default(images=30, size=32, seed=0) == first
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [first.name]  # no temporary leftovers
