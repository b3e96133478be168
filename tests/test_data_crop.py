"""Lung-field cropping (cxrbench/data/crop.py): the classical finder against the phantom's own lung fields, a
segmentation network's route, boxes mapped into the crop, the cache key, the export's metadata, bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from cxrbench.data import cache, crop, nih, phantom
from cxrbench.data.index import Box
from cxrbench.errors import CxrError, DataError, SuiteError
from cxrbench.suite import Settings


def _phantom_images(count: int, seed: int):
    """Phantom pictures at several sizes with NIH-like labels, and each one's true lung-field box (pixels)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        size = (64, 128, 256)[i % 3]
        frame = (rng.uniform(-0.03, 0.03, size=2), rng.uniform(0.94, 1.06))
        labels = phantom._labels(rng, 1)[0]
        pixels, _ = phantom.render(rng, size, labels, ap=i % 2 == 0, frame=frame)
        out.append((pixels, [v * size for v in phantom.lung_fields_box(*frame)]))
    return out


def _overlap(box: crop.CropBox, truth) -> float:
    tx, ty, tw, th = truth
    ix = max(0.0, min(box.x + box.w, tx + tw) - max(box.x, tx))
    iy = max(0.0, min(box.y + box.h, ty + th) - max(box.y, ty))
    return ix * iy


def test_the_classical_finder_boxes_both_lung_fields_of_phantom_pictures():
    """The box covers the true lung-field box (the union of the two ellipses the phantom drew) and little else.

    Measured here on 3 x 60 pictures without margin: no fallback, median coverage 0.95 (the ellipses' soft edges
    are lighter than the threshold), 0.1 % of the picture outside the lungs kept, two pictures in 180 below 90 %
    coverage (one of them with one lung field only). The default margin (5 % per side) brings the coverage to
    about 1."""
    bare, margined = [], []
    for pixels, truth in _phantom_images(60, seed=11):
        for margin, found in ((0.0, bare), (0.05, margined)):
            box = crop.find_lungs(pixels, margin=margin)
            assert not box.fallback and box.method == "classical"
            inside = _overlap(box, truth)
            outside = (box.w * box.h - inside) / (pixels.size - truth[2] * truth[3])
            found.append((inside / (truth[2] * truth[3]), outside))
    bare, margined = np.asarray(bare), np.asarray(margined)
    assert np.median(bare[:, 0]) > 0.93 and np.mean(bare[:, 0] > 0.9) >= 0.95
    assert np.median(bare[:, 1]) < 0.02 and bare[:, 1].max() < 0.1  # what lies outside the lungs is cut away
    assert np.median(margined[:, 0]) > 0.99 and np.median(margined[:, 1]) < 0.4


def test_every_phantom_finding_is_centred_inside_the_lung_fields_box():
    x0 = min(cx - rx for cx, _, rx, _ in phantom.LUNG_FIELDS)
    x1 = max(cx + rx for cx, _, rx, _ in phantom.LUNG_FIELDS)
    y0 = min(cy - ry for _, cy, _, ry in phantom.LUNG_FIELDS)
    y1 = max(cy + ry for _, cy, _, ry in phantom.LUNG_FIELDS)
    for name, (cx, cy, *_rest) in phantom.FINDINGS.items():
        assert x0 < cx < x1 and y0 < cy < y1, name


def test_a_picture_without_lungs_falls_back_to_the_full_picture():
    flat = np.full((96, 80), 128, dtype=np.uint8)
    box = crop.find_lungs(flat, margin=0.05)
    assert box.fallback and (box.x, box.y, box.w, box.h) == (0, 0, 80, 96)
    assert np.array_equal(box.apply(flat), flat)


def test_otsu_splits_two_populations_between_them():
    values = np.concatenate([np.full(500, 40.0), np.full(300, 200.0)])
    assert 40 < crop.otsu_threshold(values) < 200


def test_boxes_map_into_the_cropped_picture_clipped_and_counted():
    crop_box = crop.CropBox(100, 50, 400, 200, "classical", False)
    inside = crop.map_box(Box("a.png", "Mass", 150, 100, 100, 50, 1024, 1024), crop_box, 64)
    assert not inside.clipped and inside.box is not None
    assert (inside.box.x, inside.box.y, inside.box.w, inside.box.h) == (8.0, 16.0, 16.0, 16.0)
    assert (inside.box.frame_w, inside.box.frame_h) == (64, 64)
    cut = crop.map_box(Box("a.png", "Mass", 450, 200, 100, 100, 1024, 1024), crop_box, 64)
    assert cut.clipped and (cut.box.x, cut.box.y, cut.box.w, cut.box.h) == (56.0, 48.0, 8.0, 16.0)
    gone = crop.map_box(Box("a.png", "Mass", 600, 10, 50, 30, 1024, 1024), crop_box, 64)
    assert gone.clipped and gone.box is None


def test_the_cache_key_changes_with_the_crop_and_the_crop_model(tmp_path):
    root = phantom.synthesize(tmp_path / "data", images=24, size=64, seed=1)
    index = nih.read_index(root)
    plain = cache.cache_key(index, 32)
    lungs = crop.CropSpec("lungs", 0.05)
    assert cache.cache_key(index, 32, crop.CropSpec()) == plain  # no crop: the key caches had before
    assert cache.cache_key(index, 32, lungs) not in (plain, cache.cache_key(index, 32, crop.CropSpec("lungs", 0.1)))
    model = _threshold_model(tmp_path / "seg.onnx")
    networked = crop.spec_from_settings(_data(crop="lungs", crop_model=str(model)))
    assert cache.cache_key(index, 32, networked) != cache.cache_key(index, 32, lungs)
    model.write_bytes(model.read_bytes() + b"\0")  # another file under the same name
    assert cache.cache_key(index, 32, crop.spec_from_settings(_data(crop="lungs", crop_model=str(model)))) != (
        cache.cache_key(index, 32, networked)
    )


def test_a_cropped_cache_holds_the_crops_and_writes_crop_boxes_csv(tmp_path):
    root = phantom.synthesize(tmp_path / "data", images=24, size=96, seed=2)
    index = nih.read_index(root)
    spec = crop.CropSpec("lungs", 0.05)
    prepared = cache.prepare(index, 32, crop_spec=spec, cache_dir=tmp_path / "cache", workers=1)
    folder = tmp_path / "cache" / prepared.key
    rows = (folder / crop.BOXES_FILE).read_text().splitlines()
    assert rows[0] == "image,x,y,w,h,method,fallback" and len(rows) == len(index) + 1
    assert prepared.crop_boxes == crop.read_boxes_csv(folder / crop.BOXES_FILE)
    from cxrbench.data.images import decode_gray, resize_gray

    for row in (0, 7, 23):
        box = prepared.crop_boxes[index.files[row]]
        assert box.w < 96 and box.h < 96  # cropped, not the full picture
        expected = resize_gray(decode_gray(index.paths[row])[box.y : box.y + box.h, box.x : box.x + box.w], 32)
        assert np.array_equal(prepared.images[row], expected)
    assert json.loads((folder / "manifest.json").read_text())["crop"]["fallbacks"] == 0
    boxes, counts = prepared.mapped_boxes("test")
    assert counts["boxes"] == len(boxes) > 0 and counts["boxes"] + counts["outside"] == len(index.boxes)


def test_crop_settings_travel_in_the_export_metadata_and_back(tmp_path):
    spec = crop.CropSpec("lungs", 0.07)
    metadata = crop.crop_metadata(spec)
    assert crop.spec_from_metadata(metadata, "m.onnx") == spec
    assert crop.spec_from_metadata({}, "old.onnx") == crop.CropSpec()  # an export made before cropping existed
    model = _threshold_model(tmp_path / "seg.onnx")
    networked = crop.spec_from_settings(_data(crop="lungs", crop_model=str(model), crop_margin=0.1))
    moved = tmp_path / "elsewhere.onnx"
    moved.write_bytes(model.read_bytes())
    back = crop.spec_from_metadata(crop.crop_metadata(networked), "m.onnx", crop_model=str(moved))
    assert (back.method, back.margin, back.model) == ("lungs", 0.1, str(moved))
    assert back.model_sha256 == networked.model_sha256
    model.unlink()
    with pytest.raises(CxrError, match="not there: pass it with --crop-model PATH"):
        crop.spec_from_metadata(crop.crop_metadata(networked), "m.onnx")
    moved.write_bytes(b"another model")
    with pytest.raises(CxrError, match="sha256 differs"):
        crop.spec_from_metadata(crop.crop_metadata(networked), "m.onnx", crop_model=str(moved))
    with pytest.raises(CxrError, match="m.onnx: metadata 'cxrbench.crop' is malformed"):
        crop.spec_from_metadata({crop.CROP_KEY: "{"}, "m.onnx")


# -- a lung-segmentation network ---------------------------------------------------------------------------------


def _data(**given):
    return Settings().replace(**{f"data.{k}": v for k, v in given.items()}).data


def _save(path, nodes, inputs, outputs, metadata=None):
    graph = helper.make_graph(nodes, "g", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    for key, value in (metadata or {}).items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(path))
    return path


def _threshold_model(path, size: int | None = 48):
    """A real (if simple) segmentation network: mask = sigmoid(40 * (0.5 - x)), dark pixels are "lung"."""
    shape = [1, 1, size, size] if size else ["n", 1, "h", "w"]
    nodes = [
        helper.make_node("Constant", [], ["half"], value=helper.make_tensor("h", TensorProto.FLOAT, [], [0.5])),
        helper.make_node("Constant", [], ["gain"], value=helper.make_tensor("g", TensorProto.FLOAT, [], [40.0])),
        helper.make_node("Sub", ["half", "x"], ["d"]),
        helper.make_node("Mul", ["d", "gain"], ["z"]),
        helper.make_node("Sigmoid", ["z"], ["mask"]),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)
    y = helper.make_tensor_value_info("mask", TensorProto.FLOAT, shape)
    return _save(path, nodes, [x], [y], None if size else {crop.MASK_SIZE_KEY: "48"})


def _classifier_model(path):
    """Not a segmentation model: (1, 1, 48, 48) in, 14 logits out."""
    weights = helper.make_tensor("w", TensorProto.FLOAT, [48 * 48, 14], np.zeros(48 * 48 * 14, np.float32).tolist())
    nodes = [
        helper.make_node("Flatten", ["x"], ["flat"]),
        helper.make_node("Constant", [], ["wc"], value=weights),
        helper.make_node("MatMul", ["flat", "wc"], ["logits"]),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 48, 48])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 14])
    return _save(path, nodes, [x], [y])


def _dark_rectangle() -> np.ndarray:
    picture = np.full((200, 300), 230, dtype=np.uint8)
    picture[50:150, 60:240] = 20  # the "lungs" the network finds: x 60..240, y 50..150
    return picture


@pytest.mark.parametrize("static", [True, False])
def test_a_segmentation_network_gives_its_masks_bounding_box_plus_the_margin(tmp_path, static):
    model = _threshold_model(tmp_path / "seg.onnx", size=48 if static else None)
    spec = crop.spec_from_settings(_data(crop="lungs", crop_model=str(model), crop_margin=0.1))
    crop.check(spec)
    box = crop.find_box(_dark_rectangle(), spec)
    assert box.method == "onnx" and not box.fallback
    # The mask at 48 px resolves the rectangle to within one mask pixel (300/48 = 6.25 px wide, 200/48 = 4.2 high);
    # then 10 % of the box on each side.
    assert abs(box.x - (60 - 18)) <= 7 and abs(box.x + box.w - (240 + 18)) <= 7
    assert abs(box.y - (50 - 10)) <= 5 and abs(box.y + box.h - (150 + 10)) <= 5
    assert crop.find_box(np.full((200, 300), 230, np.uint8), spec).fallback  # an empty mask: the full picture


def test_bad_crop_models_are_one_line_each(tmp_path):
    missing = tmp_path / "nowhere.onnx"
    with pytest.raises(DataError) as caught:
        crop.spec_from_settings(_data(crop="lungs", crop_model=str(missing)))
    assert str(caught.value) == f"{missing}: lung-segmentation model not found (data.crop_model)"
    classifier = crop.spec_from_settings(_data(crop="lungs", crop_model=str(_classifier_model(tmp_path / "c.onnx"))))
    with pytest.raises(DataError) as caught:
        crop.check(classifier)
    message = str(caught.value)
    assert message.startswith(f"{tmp_path / 'c.onnx'}: not a lung-segmentation model: its output has shape [1, 14]")
    assert "\n" not in message
    garbage = tmp_path / "g.onnx"
    garbage.write_bytes(b"not onnx")
    with pytest.raises(DataError, match=r"g\.onnx: not a loadable ONNX model"):
        crop.check(crop.spec_from_settings(_data(crop="lungs", crop_model=str(garbage))))
    with pytest.raises(SuiteError, match="needs data.crop = 'lungs'"):
        crop.spec_from_settings(_data(crop_model=str(garbage)))


def test_data_prepare_crops_and_names_the_folder_and_refuses_a_classifier(tmp_path):
    root = phantom.synthesize(tmp_path / "data", images=24, size=64, seed=3)
    base = [sys.executable, "-m", "cxrbench", "data", "prepare", "--data", str(root), "--size", "32"]
    base += ["--cache", str(tmp_path / "cache"), "--quiet", "--workers", "1"]
    result = subprocess.run([*base, "--crop", "lungs"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    folder = result.stdout.strip().splitlines()[-1]
    assert (tmp_path / "cache").as_posix() in folder and f"{folder}/crop_boxes.csv" in result.stdout
    assert len(open(f"{folder}/crop_boxes.csv").read().splitlines()) == 25
    bad = _classifier_model(tmp_path / "c.onnx")
    result = subprocess.run([*base, "--crop", "lungs", "--crop-model", str(bad)], capture_output=True, text=True)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "not a lung-segmentation model" in result.stderr


def test_the_phantom_keeps_every_finding_mostly_inside_the_crop(tmp_path):
    """No finding's box is cut away by the lung crop, and each keeps most of its area (measured here: Effusion, at
    the costophrenic angle, keeps the least, about 0.7; the mean over all boxes is about 0.93)."""
    root = phantom.synthesize(tmp_path / "data", images=240, size=96, seed=5)
    index = nih.read_index(root)
    prepared = cache.prepare(index, 32, crop_spec=crop.CropSpec("lungs", 0.05), cache_dir=tmp_path / "c", workers=1)
    boxes, counts = prepared.mapped_boxes("test")
    assert counts["outside"] == 0 and counts["boxes"] == len(boxes) == len(index.boxes)
    kept = [_overlap(prepared.crop_boxes[b.image], (b.x, b.y, b.w, b.h)) / (b.w * b.h) for b in index.boxes]
    assert min(kept) > 0.6 and np.mean(kept) > 0.85
    assert counts["clipped"] == sum(k < 1 - 1e-9 for k in kept)


def test_a_network_crops_the_cache_and_its_method_is_recorded(tmp_path):
    root = phantom.synthesize(tmp_path / "data", images=24, size=64, seed=4)
    index = nih.read_index(root)
    spec = crop.spec_from_settings(_data(crop="lungs", crop_model=str(_threshold_model(tmp_path / "seg.onnx"))))
    prepared = cache.prepare(index, 32, crop_spec=spec, cache_dir=tmp_path / "cache", workers=2)
    assert {box.method for box in prepared.crop_boxes.values()} == {"onnx"}
    from cxrbench.data.images import decode_gray, resize_gray

    box = prepared.crop_boxes[index.files[5]]
    expected = resize_gray(decode_gray(index.paths[5])[box.y : box.y + box.h, box.x : box.x + box.w], 32)
    assert np.array_equal(prepared.images[5], expected)


def test_the_scoring_model_prepares_pictures_as_the_training_pictures_were(tmp_path):
    """predict and serve share ScoringModel.prepare: an export stamped with a crop crops before resizing."""
    from cxrbench.deploy import onnx_file
    from cxrbench.deploy.model import ScoringModel
    from helpers.deploy import SIZE, chest_like, tiny_export

    picture = _phantom_images(1, seed=3)[0][0]
    plain = ScoringModel(tiny_export(tmp_path / "plain.onnx"))
    assert not plain.crop.active and np.array_equal(plain.prepare(picture), resize(picture, SIZE))
    path = tiny_export(tmp_path / "cropped.onnx")
    onnx_file.stamp_metadata(path, crop.crop_metadata(crop.CropSpec("lungs", 0.05)))
    cropped = ScoringModel(path)
    box = crop.find_lungs(picture, 0.05)
    assert cropped.crop == crop.CropSpec("lungs", 0.05) and not box.fallback
    assert np.array_equal(cropped.prepare(picture), resize(box.apply(picture), SIZE))
    assert cropped.prepare(chest_like(1)).shape == (SIZE, SIZE)


def resize(gray, size):
    from cxrbench.data.images import resize_gray

    return resize_gray(gray, size)
