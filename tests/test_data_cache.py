"""The prepared cache: exact pixels, reuse, keys, atomic and concurrent builds; batches served from it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from cxrbench.data import cache, images, nih
from cxrbench.errors import DataError
from helpers.nih_files import Entry, entries, image_path, truncate, write_dataset

LABELS = ("No Finding", "Effusion", "Mass|Nodule", "Atelectasis")


def make_root(tmp_path, size=40, modes=("L", "RGBA", "I;16", "P", "RGB")):
    items = [
        Entry(e.name, e.labels, e.patient, mode=modes[i % len(modes)]) for i, e in enumerate(entries(16, 3, LABELS))
    ]
    return write_dataset(tmp_path / "nih", items, test_patients=(2, 7, 11, 15), size=size)


def independent_gray(path, size):
    """Reference decode: Pillow alone, 16-bit scaled by 257 (the fixture's encoding)."""
    with Image.open(path) as image:
        if image.mode == "I;16":
            gray = Image.fromarray((np.asarray(image) // 257).astype(np.uint8))
        else:
            gray = image.convert("L")
        return np.asarray(gray.resize((size, size), Image.Resampling.BILINEAR))


def test_builds_exact_pixels_into_a_reopenable_memmap(tmp_path):
    index = nih.read_index(make_root(tmp_path))
    prepared = cache.prepare(index, 24, cache_dir=tmp_path / "cache", workers=2)
    assert prepared.images.shape == (len(index), 24, 24) and prepared.images.dtype == np.uint8
    for row, path in enumerate(index.paths):
        assert np.array_equal(prepared.images[row], independent_gray(path, 24)), path.name
    folder = tmp_path / "cache" / prepared.key
    reopened = np.load(folder / "images.npy", mmap_mode="r")
    assert np.array_equal(reopened, prepared.images)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["complete"] and manifest["count"] == len(index) and manifest["size"] == 24
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [prepared.key]  # no temporary leftovers


def test_second_prepare_does_not_decode(tmp_path, monkeypatch):
    index = nih.read_index(make_root(tmp_path))
    first = cache.prepare(index, 16, cache_dir=tmp_path / "cache", workers=1)

    def must_not_decode(*args):
        raise AssertionError("decoded again")

    monkeypatch.setattr(images, "load_gray", must_not_decode)
    second = cache.prepare(nih.read_index(index.root), 16, cache_dir=tmp_path / "cache", workers=1)
    assert second.key == first.key and np.array_equal(second.images, first.images)


def test_key_changes_with_every_input(tmp_path):
    root = make_root(tmp_path)
    base = cache.cache_key(nih.read_index(root), 32)
    assert cache.cache_key(nih.read_index(root), 32) == base
    assert cache.cache_key(nih.read_index(root), 48) != base
    exclude = tmp_path / "exclude.txt"
    exclude.write_text("00000001_000.png\n")
    assert cache.cache_key(nih.read_index(root, exclude=exclude), 32) != base
    os.utime(image_path(root, 0, "00000001_000.png", "flat"), ns=(1, 1))
    touched = cache.cache_key(nih.read_index(root), 32)
    assert touched != base
    with open(root / "BBox_List_2017.csv", "a") as f:
        f.write("00000002_000.png,Mass,1,2,3,4\n")
    assert cache.cache_key(nih.read_index(root), 32) != touched


def test_corrupt_file_mid_build_leaves_nothing_valid(tmp_path):
    root = make_root(tmp_path)
    index = nih.read_index(root)
    bad = index.paths[len(index) // 2]
    truncate(bad)
    with pytest.raises(DataError, match=rf"{bad.name}: unreadable image"):
        cache.prepare(index, 16, cache_dir=tmp_path / "cache", workers=2)
    left = list((tmp_path / "cache").iterdir())
    assert left == [], left
    assert not cache.is_valid(
        tmp_path / "cache" / cache.cache_key(index, 16), cache.cache_key(index, 16), len(index), 16
    )


def test_invalid_leftover_under_the_key_is_replaced(tmp_path):
    index = nih.read_index(make_root(tmp_path))
    key = cache.cache_key(index, 16)
    stale = tmp_path / "cache" / key
    stale.mkdir(parents=True)
    (stale / "manifest.json").write_text(json.dumps({"key": key, "complete": False}))
    prepared = cache.prepare(index, 16, cache_dir=tmp_path / "cache", workers=1)
    assert cache.is_valid(stale, key, len(index), 16) and prepared.images.shape == (len(index), 16, 16)


def test_two_processes_preparing_the_same_key(tmp_path):
    root = make_root(tmp_path, size=96)
    script = textwrap.dedent(
        f"""
        from pathlib import Path
        from cxrbench.data import cache, nih
        p = cache.prepare(nih.read_index(Path({str(root)!r})), 32, cache_dir=Path({str(tmp_path / "cache")!r}),
                          workers=1)
        print(p.key, int(p.images.astype('int64').sum()))
        """
    )
    runs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [r.communicate(timeout=120)[0].split() for r in runs]
    assert all(r.returncode == 0 for r in runs)
    assert outputs[0] == outputs[1]
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [outputs[0][0]]
    prepared = cache.prepare(nih.read_index(root), 32, cache_dir=tmp_path / "cache", workers=1)
    assert int(prepared.images.astype("int64").sum()) == int(outputs[0][1])


def test_default_cache_dir_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("CXRBENCH_CACHE", str(tmp_path / "mine"))
    prepared = cache.prepare(nih.read_index(make_root(tmp_path)), 16, workers=1)
    assert (tmp_path / "mine" / "prepared" / prepared.key / "images.npy").is_file()


@pytest.fixture
def prepared(tmp_path):
    return cache.prepare(nih.read_index(make_root(tmp_path)), 16, cache_dir=tmp_path / "cache", workers=1)


def test_batches_are_deterministic_per_epoch_with_exact_flips(prepared):
    def epoch(number, seed=0):
        return list(prepared.batches("train", 4, epoch=number, seed=seed, hflip=True))

    first = epoch(1)
    assert len(first) == len(prepared.rows("train")) // 4
    assert all(
        np.array_equal(a.images, b.images) and (a.positions == b.positions).all() for a, b in zip(first, epoch(1))
    )
    assert any((a.positions != b.positions).any() for a, b in zip(first, epoch(2)))
    train = prepared.split_images("train")
    flipped = 0
    for batch in first:
        for image, position in zip(batch.images, batch.positions):
            original = train[position]
            assert np.array_equal(image, original) or np.array_equal(image, original[:, ::-1])
            flipped += not np.array_equal(image, original)
        assert np.array_equal(batch.labels, prepared.split_labels("train")[batch.positions])
    assert 0 < flipped < sum(len(b.positions) for b in first)


def test_rank_shards_concatenate_to_the_single_process_batch(prepared):
    single = list(prepared.batches("train", 6, epoch=3, seed=1, hflip=True))
    ranks = [list(prepared.batches("train", 3, epoch=3, seed=1, hflip=True, rank=r, world=2)) for r in range(2)]
    assert len(single) == len(ranks[0]) == len(ranks[1]) > 0
    for whole, a, b in zip(single, *ranks):
        assert np.array_equal(whole.images, np.concatenate([a.images, b.images]))
        assert np.array_equal(whole.positions, np.concatenate([a.positions, b.positions]))
