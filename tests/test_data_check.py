"""``data check``: the summary's counts equal those computed independently from the written fixture."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest

from cxrbench.data import check, nih
from cxrbench.data.classes import CLASSES
from helpers.nih_files import Entry, entries, truncate, write_dataset

LABELS = ("No Finding", "Effusion|Atelectasis", "Hernia", "No Finding", "Infiltration|Mass|Nodule")
TEST_PATIENTS = (2, 6, 9)


@pytest.fixture
def fixture(tmp_path):
    items = [
        Entry(e.name, e.labels, e.patient, view="AP" if i % 3 == 0 else "PA")
        for i, e in enumerate(entries(12, 3, LABELS))
    ]
    missing = [items[4].name]
    excluded = [items[13].name, items[20].name]
    boxes = [
        (items[3].name, "Effusion", 10, 20, 30, 40),
        (items[3].name, "Infiltrate", 1, 2, 3, 4),
        (items[15].name, "Mass", 5, 5, 5, 5),
    ]
    root = write_dataset(tmp_path / "nih", items, test_patients=TEST_PATIENTS, boxes=boxes, not_written=missing)
    exclude = tmp_path / "exclude.txt"
    exclude.write_text("\n".join(excluded) + "\n")
    with pytest.warns(nih.DataWarning):
        index = nih.read_index(root, exclude=exclude)
    kept = [e for e in items if e.name not in missing + excluded]
    return index, kept, missing, excluded, boxes


def test_counts_match_the_fixture(fixture):
    index, kept, missing, excluded, boxes = fixture
    summary = check.summarize(index, workers=1)
    json.dumps(summary)
    parts = [e.labels.split("|") for e in kept]
    assert summary["images"] == len(kept)
    assert summary["patients"] == len({e.patient for e in kept})
    assert summary["positives"] == {c: sum(c in p for p in parts) for c in CLASSES}
    assert summary["no_finding"] == sum(p == ["No Finding"] for p in parts)
    assert summary["views"] == dict(Counter(e.view for e in kept))
    kept_names = {e.name for e in kept}
    box_labels = Counter(nih.BOX_LABEL_ALIASES.get(b[1], b[1]) for b in boxes if b[0] in kept_names)
    assert summary["boxes"] == dict(box_labels) and summary["boxed_images"] == len(
        {b[0] for b in boxes if b[0] in kept_names}
    )
    test = [e for e in kept if e.patient in TEST_PATIENTS]
    assert summary["splits"]["test"] == {"images": len(test), "patients": len({e.patient for e in test})}
    assert sum(s["images"] for s in summary["splits"].values()) == len(kept)
    assert summary["overlaps"] == {"train/val": 0, "train/test": 0, "val/test": 0}
    assert summary["missing"] == {"count": 1, "files": missing}
    assert summary["excluded"] == len(excluded)
    assert summary["unreadable"] == {"count": 0, "files": []}
    assert check.is_usable(summary)


def test_unreadable_images_are_listed_and_make_it_unusable(fixture):
    index = fixture[0]
    truncate(index.paths[5])
    summary = check.summarize(index, workers=2)
    assert summary["unreadable"]["count"] == 1
    assert summary["unreadable"]["files"][0]["file"] == index.files[5]
    assert not check.is_usable(summary)
    assert f"unreadable 1: {index.files[5]} (unreadable image" in check.format_summary(summary)
    assert check.summarize(index, verify_images=False)["unreadable"] is None


def test_overlapping_or_empty_splits_are_unusable(fixture):
    index = fixture[0]
    leaked = index.split.copy()
    leaked[np.flatnonzero(index.patients == index.patients[index.rows("test")[0]])[0]] = "train"
    summary = check.summarize(replace(index, split=leaked), verify_images=False)
    assert summary["overlaps"]["train/test"] == 1 and not check.is_usable(summary)
    no_val = np.where(index.split == "val", "train", index.split)
    assert not check.is_usable(check.summarize(replace(index, split=no_val), verify_images=False))


def test_format_summary_shows_the_numbers(fixture):
    index = fixture[0]
    summary = check.summarize(index, verify_images=False)
    text = check.format_summary(summary)
    assert f"images     {summary['images']} from {summary['patients']} patients" in text
    assert "missing    1: " + fixture[2][0] in text
    assert "unreadable not checked" in text and "usable     yes" in text
    assert all(f"note: {n}" in text for n in summary["notes"])
