"""One CAM overlay: the run's PNGs and the report's tiles drawn from cams.npz show the same pixels."""

from __future__ import annotations

import base64
import io

import matplotlib
import numpy as np
from PIL import Image

from cxrbench.cam import files as cam_files
from cxrbench.cam.overlay import HEAT_WEIGHT, MIN_SIDE, PREDICTED_BOX, TRUE_BOX, jet, overlay
from cxrbench.data.classes import CLASSES
from cxrbench.data.index import Box
from cxrbench.files import load_npz, read_json, save_npz
from cxrbench.report.cam_gallery import backend_tiles
from cxrbench.report.load import BackendRun
from cxrbench.run import folder as run_folder

SIZE = 64


def _pixels(uri: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).convert("RGB"))


def _blob(cx: float, cy: float) -> np.ndarray:
    """A smooth 0-255 heat map whose values are whole numbers, so normalising it to 0-255 changes nothing."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    heat = np.round(255.0 * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * 7.0**2)))
    return (heat - heat.min()).astype(np.float32)


def test_jet_is_matplotlibs_jet_at_every_level():
    levels = np.arange(256)
    reference = matplotlib.colormaps["jet"](levels / 255.0)[:, :3]
    assert np.abs(jet(levels) - reference).max() < 1e-6


def test_an_overlay_pixel_is_the_stated_blend_and_boxes_have_their_colours():
    rng = np.random.default_rng(3)
    gray = rng.integers(0, 256, (SIZE, SIZE), dtype=np.uint8)
    heat = rng.integers(0, 256, (SIZE, SIZE)).astype(np.uint8)
    picture = np.asarray(overlay(gray, heat, [(10, 12, 20, 16)], [(40, 40, 10, 10)]))
    scale = -(-MIN_SIDE // SIZE)
    assert picture.shape == (SIZE * scale, SIZE * scale, 3)
    colours = matplotlib.colormaps["jet"](heat / 255.0)[..., :3] * 255.0
    expected = (1 - HEAT_WEIGHT) * gray[..., None] + HEAT_WEIGHT * colours
    inside = picture[30 * scale + 1, 30 * scale + 1]  # away from every box edge
    assert np.abs(inside.astype(float) - expected[30, 30]).max() <= 1.0
    assert tuple(picture[12 * scale, 15 * scale]) == TRUE_BOX  # top edge of the true box
    assert tuple(picture[40 * scale, 45 * scale]) == PREDICTED_BOX


def test_run_pngs_and_report_tiles_from_cams_npz_show_the_same_pixels(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, SIZE, SIZE), dtype=np.uint8)
    class_indices = [CLASSES.index("Mass"), CLASSES.index("Nodule")]
    maps = np.stack([np.stack([_blob(20, 24), _blob(44, 40)]), np.stack([_blob(32, 16), _blob(12, 50)])])
    truth = [
        (0, Box("a.png", "Mass", 14, 18, 12, 12, SIZE, SIZE)),
        (0, Box("a.png", "Nodule", 38, 34, 10, 12, SIZE, SIZE)),
        (1, Box("b.png", "Nodule", 6, 44, 12, 12, SIZE, SIZE)),
    ]
    run_side, report_side = tmp_path / "pngs" / "numpy", tmp_path / "npz" / "numpy"
    cam_files.write(run_side, images, maps, [5, 9], class_indices, truth, 0.5, ["a.png", "b.png"], "relative")

    # The report's fallback input: the run's cams.npz with the gray images and true boxes of its entries.
    entries = read_json(run_side / run_folder.CAMS_INDEX)
    local = {5: 0, 9: 1}
    boxes = [[k, *box] for k, entry in enumerate(entries) for box in entry["true_boxes"]]
    save_npz(
        report_side / run_folder.CAMS_NPZ,
        **load_npz(run_side / run_folder.CAMS_NPZ),
        images=np.stack([images[local[entry["position"]]] for entry in entries]),
        true_boxes=np.asarray(boxes, dtype=np.float64),
    )

    notes: list[str] = []
    from_pngs = backend_tiles(BackendRun("numpy", run_side, {}), 0.5, "relative", notes)
    drawn = backend_tiles(BackendRun("numpy", report_side, {}), 0.5, "relative", notes)
    assert not notes and len(from_pngs) == len(drawn) == len(entries) == 3
    assert [t.label for t in from_pngs] == [t.label for t in drawn] == ["Mass", "Nodule", "Nodule"]
    for png_tile, drawn_tile in zip(from_pngs, drawn):
        pixels = _pixels(png_tile.uri)
        assert pixels.shape == (MIN_SIDE, MIN_SIDE, 3)
        assert np.array_equal(pixels, _pixels(drawn_tile.uri))
        colours = {tuple(c) for c in pixels.reshape(-1, 3)}
        assert TRUE_BOX in colours and PREDICTED_BOX in colours
