"""``cxrbench predict`` and the picture decoding behind it: PNG, JPEG, DICOM, folders, globs, CAM overlays.

Reference: onnxruntime called directly on the shared decoder's pixels (helpers.deploy.reference_probabilities);
probabilities agree within 1e-6 in JSON (float32 printed in full) and 5e-6 in CSV (6 significant digits).
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxrbench.cli import main
from cxrbench.data.classes import CLASSES
from cxrbench.deploy import images, onnx_file
from cxrbench.deploy.model import ScoringModel
from helpers.deploy import SIZE, chest_like, dicom_file, png_bytes, reference_probabilities, tiny_export

needs_pydicom = pytest.mark.skipif(
    importlib.util.find_spec("pydicom") is None, reason='DICOM tests need pydicom: pip install -e ".[dicom]"'
)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    return tiny_export(tmp_path_factory.mktemp("model") / "model.onnx")


@pytest.fixture
def pictures(tmp_path) -> list[Path]:
    folder = tmp_path / "pictures"
    folder.mkdir()
    files = []
    for i in range(3):
        files.append(folder / f"p{i}.png")
        files[-1].write_bytes(png_bytes(chest_like(i)))
    rgb = np.stack([chest_like(7), chest_like(8), chest_like(9)], axis=2)
    files.append(folder / "colour.jpg")
    files[-1].write_bytes(png_bytes(rgb, "JPEG"))
    return files


def _predict(capsys, *argv: str) -> tuple[int, str, str]:
    status = main(["predict", *map(str, argv)])
    out, err = capsys.readouterr()
    return status, out, err


def _csv_rows(text: str) -> tuple[list[str], list[str], np.ndarray]:
    rows = list(csv.reader(io.StringIO(text)))
    return rows[0], [r[0] for r in rows[1:]], np.array([[float(x) for x in r[1:]] for r in rows[1:]])


def test_csv_of_a_folder_matches_onnxruntime_on_the_same_pixels(model_path, pictures, capsys):
    status, out, _ = _predict(capsys, model_path, pictures[0].parent, "--batch-size", 3)
    header, files, probabilities = _csv_rows(out)
    assert status == 0 and header == ["file", *CLASSES]
    assert files == sorted(str(p) for p in pictures)
    expected = reference_probabilities(model_path, [Path(f) for f in files])
    np.testing.assert_allclose(probabilities, expected, rtol=0, atol=5e-6)
    assert len({tuple(row) for row in probabilities.round(4)}) == len(files), "different pictures, different scores"


def test_json_of_a_glob_and_a_file_keeps_the_order_given(model_path, pictures, capsys):
    folder = pictures[0].parent
    status, out, _ = _predict(capsys, model_path, pictures[3], str(folder / "p*.png"), "--format", "json")
    answer = json.loads(out)
    files = [Path(entry["file"]) for entry in answer]
    assert status == 0 and files == [pictures[3], *pictures[:3]]
    got = np.array([[entry["probabilities"][c] for c in CLASSES] for entry in answer])
    np.testing.assert_allclose(got, reference_probabilities(model_path, files), rtol=0, atol=1e-6)


def test_cam_overlays_for_top_k_and_asked_classes(model_path, pictures, tmp_path, capsys):
    cams = tmp_path / "cams"
    status, out, _ = _predict(capsys, model_path, *pictures[:2], "--format", "json", "--cam", cams, "--top-k", 2)
    answer = json.loads(out)
    assert status == 0
    for entry in answer:
        ranked = sorted(CLASSES, key=lambda c: -entry["probabilities"][c])
        assert [c["class"] for c in entry["cams"]] == ranked[:2]
        for cam in entry["cams"]:
            with Image.open(cam["file"]) as image:
                assert image.format == "PNG" and min(image.size) >= SIZE
            assert cam["boxes"] and all(len(box) == 4 and box[2] > 0 and box[3] > 0 for box in cam["boxes"])
    status, out, _ = _predict(
        capsys, model_path, pictures[0], "--format", "json", "--cam", cams, "--classes", "Mass", "Hernia"
    )
    assert [c["class"] for c in json.loads(out)[0]["cams"]] == ["Mass", "Hernia"]
    assert len(list(cams.glob("*.png"))) == 2 * 2 + 2


def test_cam_of_the_scoring_model_obeys_the_cam_identity(model_path, pictures):
    model = ScoringModel(model_path)
    from cxrbench.data.images import decode_gray, resize_gray

    pixels = np.stack([resize_gray(decode_gray(p), SIZE) for p in pictures])
    scores = model.score(pixels, list(range(len(CLASSES))))
    bias = onnx_file.decode_array(model.metadata, onnx_file.BIAS_KEY, "model")
    np.testing.assert_allclose(scores.maps.mean(axis=(2, 3)) + bias, scores.logits, rtol=0, atol=1e-4)


def test_sixteen_bit_png_is_scaled_by_its_full_range(tmp_path):
    wide = chest_like(3).astype(np.uint16) * 257  # 0..65535
    path = tmp_path / "wide.png"
    Image.fromarray(wide).save(path)
    np.testing.assert_array_equal(images.read(path), chest_like(3))


# -- DICOM ---------------------------------------------------------------------------------------------


@needs_pydicom
def test_dicom_monochrome2_eight_bit_uses_the_full_range(tmp_path):
    pixels = chest_like(4)
    got = images.read(dicom_file(tmp_path / "a.dcm", pixels))
    low, high = float(pixels.min()), float(pixels.max())
    np.testing.assert_array_equal(got, np.round((pixels - low) / (high - low) * 255).astype(np.uint8))


@needs_pydicom
def test_dicom_monochrome1_is_inverted(tmp_path):
    pixels = chest_like(5)
    plain = images.read(dicom_file(tmp_path / "m2.dcm", pixels))
    inverted = images.read(dicom_file(tmp_path / "m1.dcm", pixels, photometric="MONOCHROME1"))
    np.testing.assert_array_equal(inverted.astype(int), 255 - plain.astype(int))


def _linear_window(x: np.ndarray, centre: float, width: float) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2.1 written piecewise, output 0..255 (the independent reference)."""
    out = ((x - (centre - 0.5)) / (width - 1) + 0.5) * 255
    out = np.where(x <= centre - 0.5 - (width - 1) / 2, 0, out)
    out = np.where(x > centre - 0.5 + (width - 1) / 2, 255, out)
    return np.round(out).astype(np.uint8)


@needs_pydicom
def test_dicom_sixteen_bit_applies_rescale_and_the_voi_window(tmp_path):
    stored = (np.random.default_rng(6).integers(0, 4096, (40, 48))).astype(np.uint16)
    path = dicom_file(
        tmp_path / "ct.dcm",
        stored,
        RescaleSlope="2",
        RescaleIntercept="-1024",
        WindowCenter=["1500", "40"],
        WindowWidth=["3000", "400"],
    )
    values = stored.astype(np.float64) * 2 - 1024
    np.testing.assert_array_equal(images.read(path), _linear_window(values, 1500.0, 3000.0))
    import pydicom

    read = pydicom.dcmread(path)
    assert (read.BitsStored, read.pixel_array.dtype) == (16, np.uint16)


@needs_pydicom
def test_dicom_is_scored_like_the_same_pixels_as_png(model_path, tmp_path, capsys):
    pixels = chest_like(2)
    png = tmp_path / "same.png"
    png.write_bytes(png_bytes(np.round((pixels - pixels.min()) / np.ptp(pixels) * 255).astype(np.uint8)))
    status, out, _ = _predict(capsys, model_path, dicom_file(tmp_path / "same.dcm", pixels), png, "--format", "json")
    first, second = json.loads(out)
    assert status == 0 and first["probabilities"] == second["probabilities"]


@needs_pydicom
def test_dicom_without_pixel_data_is_one_line_naming_the_file(model_path, tmp_path, capsys):
    path = dicom_file(tmp_path / "empty.dcm", chest_like(1), pixel_data=False)
    status, out, err = _predict(capsys, model_path, path)
    assert status == 2 and out.strip() == ",".join(["file", *CLASSES])
    assert err.strip() == f"cxrbench: skipped {path}: DICOM without pixel data (no PixelData element)"


@needs_pydicom
def test_dicom_without_pydicom_names_the_extra(model_path, tmp_path, monkeypatch, capsys):
    path = dicom_file(tmp_path / "a.dcm", chest_like(1))
    monkeypatch.setitem(sys.modules, "pydicom", None)
    status, _, err = _predict(capsys, model_path, path)
    assert (status, err.strip()) == (2, 'cxrbench: error: DICOM input needs pydicom: pip install -e ".[dicom]"')


# -- bad input -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"this is not a picture", "not a PNG, JPEG or DICOM picture"),
        (png_bytes(chest_like(0))[:200], "unreadable image"),
        (b"", "empty file"),
    ],
    ids=["text", "truncated", "empty"],
)
def test_unreadable_picture_is_skipped_with_one_line_and_others_are_scored(
    model_path, pictures, tmp_path, capsys, content, message
):
    bad = tmp_path / "bad.png"
    bad.write_bytes(content)
    status, out, err = _predict(capsys, model_path, pictures[0], bad)
    lines = err.strip().splitlines()
    assert status == 2 and len(lines) == 1 and lines[0].startswith(f"cxrbench: skipped {bad}: {message}")
    assert [row[0] for row in csv.reader(io.StringIO(out))][1:] == [str(pictures[0])]


def test_too_many_pixels_is_refused_from_the_header(model_path, tmp_path, capsys):
    huge = tmp_path / "huge.png"
    Image.new("L", (20000, 20000)).save(huge)  # 400 M pixels, a few hundred kB compressed
    status, _, err = _predict(capsys, model_path, huge)
    assert status == 2
    assert err.startswith(f"cxrbench: skipped {huge}: more pixels than the limit of 50000000 (--max-pixels): ")
    assert "400000000 pixels" in err
    small = tmp_path / "small.png"
    Image.new("L", (20, 30)).save(small)
    status, _, err = _predict(capsys, model_path, small, "--max-pixels", 599)
    assert status == 2 and f"{small}: 20 x 30 pixels is more than the limit of 599 (--max-pixels)" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["{model}", "{missing}"], "error: {missing}: no such file or folder"),
        (["{model}", "{folder}/*.bmp"], "error: {folder}/*.bmp: no pictures"),
        (["{model}", "{picture}", "--classes", "Flu"], "error: --classes: unknown class 'Flu'"),
        (["{plain}", "{picture}"], "error: {plain}: not a cxrbench export (no metadata 'cxrbench.input_size')"),
        (["{folder}", "{picture}"], "error: {folder}/run.json: not found"),
        (["{model}", "{picture}", "--batch-size", "0"], "error: --batch-size and --top-k must be at least 1"),
    ],
    ids=["missing-file", "empty-glob", "unknown-class", "no-metadata", "not-a-run-folder", "batch-size"],
)
def test_bad_arguments_are_one_line(model_path, pictures, tmp_path, capsys, argv, message):
    import onnx

    plain = tmp_path / "plain.onnx"
    proto = onnx.load(str(model_path))
    del proto.metadata_props[:]
    onnx.save(proto, str(plain))
    names = {
        "model": model_path,
        "missing": tmp_path / "nope.png",
        "folder": pictures[0].parent,
        "picture": pictures[0],
        "plain": plain,
    }
    status, _, err = _predict(capsys, *[a.format(**names) for a in argv])
    assert status == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith("cxrbench: " + message.format(**names)), err
