"""Upsampling, heat map to boxes, IoU / IoBB and localisation accuracy on hand-made maps and boxes."""

import json

import numpy as np
import pytest

from cxrbench.data.classes import CLASSES
from cxrbench.data.index import Box
from cxrbench.errors import MetricsError
from cxrbench.metrics.localisation import (
    cam_localisation,
    centred_box_baseline,
    heatmap_to_boxes,
    iobb,
    iou,
    localisation_accuracy,
    upsample,
)

EXACT = 1e-12


def box(label, x, y, w, h, frame=64):
    return Box("img.png", label, x, y, w, h, frame, frame)


# -- upsample -------------------------------------------------------------------------------------


def test_upsample_hand_computed():
    # along each axis [a, b] -> [a, .75a + .25b, .25a + .75b, b], so out[i, j] = 2 f[i] + f[j]
    maps = np.array([[[[0.0, 1.0], [2.0, 3.0]]]])
    expected = [
        [0.0, 0.25, 0.75, 1.0],
        [0.5, 0.75, 1.25, 1.5],
        [1.5, 1.75, 2.25, 2.5],
        [2.0, 2.25, 2.75, 3.0],
    ]
    assert np.allclose(upsample(maps, 4)[0, 0], expected, rtol=0, atol=EXACT)
    assert np.allclose(upsample(np.full((1, 1, 1, 1), 7.0), 5), 7.0, rtol=0, atol=EXACT)


@pytest.mark.backends("pytorch")  # torch is the independent reference
@pytest.mark.parametrize("size", [3, 7, 13, 64])
def test_upsample_matches_torch(size):
    import torch

    maps = np.random.default_rng(size).normal(size=(2, 3, 7, 5)).astype(np.float32)
    reference = torch.nn.functional.interpolate(
        torch.from_numpy(maps), size=(size, size), mode="bilinear", align_corners=False
    )
    got = upsample(maps, size)
    assert got.shape == (2, 3, size, size) and got.dtype == np.float32
    assert np.abs(got - reference.numpy()).max() < 1e-5


@pytest.mark.parametrize(
    "maps, size", [(np.zeros((2, 2)), 4), (np.zeros((1, 1, 2, 2)), 0), (np.full((1, 1, 2, 2), np.nan), 4)]
)
def test_upsample_bad_input(maps, size):
    with pytest.raises(MetricsError, match="upsample"):
        upsample(maps, size)


# -- heatmap_to_boxes -----------------------------------------------------------------------------


def test_two_regions_largest_first_and_diagonal_joins():
    heatmap = np.zeros((8, 8))
    heatmap[0, 7] = 1.0  # 1 pixel, the first region in raster order
    heatmap[1:3, 1:4] = 1.0  # 6 pixels
    heatmap[3, 4] = 1.0  # touches (2, 3) only at a corner: 8-connectivity joins it
    heatmap[5:8, 6] = 0.9  # 3 pixels, above the threshold after normalisation
    assert heatmap_to_boxes(heatmap, 0.5) == [(1.0, 1.0, 4.0, 3.0), (6.0, 5.0, 1.0, 3.0), (7.0, 0.0, 1.0, 1.0)]


def test_threshold_is_relative_to_min_max_and_inclusive():
    heatmap = np.zeros((5, 5))
    heatmap[0, 0] = 1.0
    heatmap[4, 4] = 0.5  # normalises to exactly 127.5 = 0.5 * 255
    heatmap[2, 2] = 0.4
    assert heatmap_to_boxes(heatmap, 0.5) == [(0.0, 0.0, 1.0, 1.0), (4.0, 4.0, 1.0, 1.0)]
    assert len(heatmap_to_boxes(heatmap, 0.35)) == 3
    assert heatmap_to_boxes(heatmap, 0.6) == [(0.0, 0.0, 1.0, 1.0)]
    assert heatmap_to_boxes(-3.0 + 10.0 * heatmap, 0.5) == heatmap_to_boxes(heatmap, 0.5)  # logits, any scale


def test_flat_map_has_no_box_and_zero_threshold_takes_all():
    assert heatmap_to_boxes(np.full((6, 4), 2.5), 0.5) == []
    assert heatmap_to_boxes(np.full((6, 4), 2.5), 0.0) == []
    ramp = np.arange(24, dtype=float).reshape(6, 4)
    assert heatmap_to_boxes(ramp, 0.0) == [(0.0, 0.0, 4.0, 6.0)]


@pytest.mark.parametrize(
    "heatmap, threshold", [(np.zeros((2, 2, 2)), 0.5), (np.array([[0.0, np.inf]]), 0.5), (np.eye(3), 1.5)]
)
def test_heatmap_bad_input(heatmap, threshold):
    with pytest.raises(MetricsError, match="heatmap_to_boxes"):
        heatmap_to_boxes(heatmap, threshold)


# -- iou / iobb -----------------------------------------------------------------------------------


def test_small_prediction_inside_big_truth_passes_iobb_fails_iou():
    truth, predicted = (0, 0, 10, 10), (2, 2, 4, 4)
    assert iobb(truth, predicted) == 1.0
    assert iou(truth, predicted) == 0.16


def test_big_prediction_around_small_truth_fails_both():
    # The reverse geometry: IoBB does not reward an oversized box; IoBB = IoU = 16 / 100 here.
    truth, predicted = (2, 2, 4, 4), (0, 0, 10, 10)
    assert iobb(truth, predicted) == 0.16 and iou(truth, predicted) == 0.16


def test_iou_never_exceeds_iobb():
    # union >= predicted area, so no box pair passes IoU at T and fails IoBB at T
    rng = np.random.default_rng(0)
    for a, b in rng.uniform(0, 10, size=(500, 2, 4)):
        assert iou(a, b) <= iobb(a, b) + EXACT


def test_overlap_hand_cases():
    assert iou((0, 0, 4, 2), (2, 0, 4, 2)) == pytest.approx(4 / 12, abs=EXACT)
    assert iou((0, 0, 4, 2), (2, 0, 4, 2)) == iou((2, 0, 4, 2), (0, 0, 4, 2))
    assert iobb((0, 0, 4, 2), (2, 0, 4, 2)) == 0.5
    assert iou((0, 0, 2, 2), (2, 0, 2, 2)) == 0.0  # touching edges do not overlap
    assert iobb((0, 0, 2, 2), (1, 1, 0, 0)) == 0.0  # an empty predicted box covers nothing
    assert iou(box("Mass", 0, 0, 4, 4), (0, 0, 4, 4)) == 1.0
    with pytest.raises(MetricsError, match="width and height"):
        iou((0, 0, -1, 2), (0, 0, 1, 1))


# -- localisation_accuracy ------------------------------------------------------------------------

TRUTH = [
    (0, box("Atelectasis", 0, 0, 10, 10)),
    (0, box("Mass", 20, 20, 10, 10)),
    (1, box("Atelectasis", 0, 0, 20, 20)),
]
PREDICTED = {
    (0, "Atelectasis"): [(2, 2, 4, 4), (50, 50, 5, 5)],  # inside (IoBB 1, IoU .16) and a far false positive
    (0, "Mass"): [(20, 20, 10, 20)],  # IoBB = IoU = 100 / 200
    (1, "Atelectasis"): [],
    (2, "Nodule"): [(0, 0, 1, 1)],  # no truth for this image and class: not evaluated, but counted
}


def test_accuracy_iobb_hand_computed():
    result = localisation_accuracy(PREDICTED, TRUTH, metric="iobb")
    json.dumps(result, allow_nan=False)
    atelectasis, mass, overall = result["per_class"]["Atelectasis"], result["per_class"]["Mass"], result["overall"]
    assert atelectasis["accuracy"] == {"0.1": 0.5, "0.25": 0.5, "0.5": 0.5, "0.75": 0.5, "0.9": 0.5}
    assert atelectasis["avg_fp"] == {"0.1": 0.5, "0.25": 0.5, "0.5": 0.5, "0.75": 0.5, "0.9": 0.5}
    assert (atelectasis["boxes"], atelectasis["images"], atelectasis["predicted"]) == (2, 2, 2)
    # IoBB exactly 0.5 is not found at T = 0.5: ChestX-ray8 counts IoBB > T (contract change, issue 10)
    assert mass["accuracy"] == {"0.1": 1.0, "0.25": 1.0, "0.5": 0.0, "0.75": 0.0, "0.9": 0.0}
    assert mass["avg_fp"] == {"0.1": 0.0, "0.25": 0.0, "0.5": 1.0, "0.75": 1.0, "0.9": 1.0}
    assert overall["accuracy"] == pytest.approx(
        {"0.1": 2 / 3, "0.25": 2 / 3, "0.5": 1 / 3, "0.75": 1 / 3, "0.9": 1 / 3}
    )
    assert overall["avg_fp"] == {"0.1": 0.5, "0.25": 0.5, "0.5": 1.0, "0.75": 1.0, "0.9": 1.0}
    assert (overall["boxes"], overall["images"], overall["predicted"]) == (3, 2, 3)
    assert result["unevaluated_predictions"] == 1 and result["thresholds"] == [0.1, 0.25, 0.5, 0.75, 0.9]


def test_accuracy_iou_hand_computed():
    result = localisation_accuracy(PREDICTED, TRUTH, metric="iou")
    atelectasis, overall = result["per_class"]["Atelectasis"], result["overall"]
    assert atelectasis["accuracy"] == {"0.1": 0.5, "0.25": 0.0, "0.5": 0.0, "0.75": 0.0, "0.9": 0.0}
    assert atelectasis["avg_fp"] == {"0.1": 0.5, "0.25": 1.0, "0.5": 1.0, "0.75": 1.0, "0.9": 1.0}
    assert overall["accuracy"] == pytest.approx({"0.1": 2 / 3, "0.25": 1 / 3, "0.5": 0.0, "0.75": 0.0, "0.9": 0.0})
    assert overall["avg_fp"] == {"0.1": 0.5, "0.25": 1.0, "0.5": 1.5, "0.75": 1.5, "0.9": 1.5}


def test_accuracy_bad_settings():
    with pytest.raises(MetricsError, match="metric"):
        localisation_accuracy(PREDICTED, TRUTH, metric="dice")
    with pytest.raises(MetricsError, match="thresholds"):
        localisation_accuracy(PREDICTED, TRUTH, thresholds=(0.0, 0.5))


def test_centred_box_baseline():
    truth = [(0, box("Cardiomegaly", 16, 16, 32, 32)), (1, box("Nodule", 0, 0, 10, 10)), (1, box("Nodule", 2, 2, 4, 4))]
    baseline = centred_box_baseline(truth, 64)
    assert baseline == {(0, "Cardiomegaly"): [(16.0, 16.0, 32.0, 32.0)], (1, "Nodule"): [(16.0, 16.0, 32.0, 32.0)]}
    result = localisation_accuracy(baseline, truth, metric="iobb", thresholds=(0.5,))
    assert result["per_class"]["Cardiomegaly"]["accuracy"] == {"0.5": 1.0}
    assert result["per_class"]["Nodule"]["accuracy"] == {"0.5": 0.0}
    assert result["per_class"]["Nodule"]["avg_fp"] == {"0.5": 1.0}
    with pytest.raises(MetricsError, match="fraction"):
        centred_box_baseline(truth, 64, fraction=1.5)


# -- cam_localisation -----------------------------------------------------------------------------


def test_one_hot_cell_upsampled_boxes_that_cell():
    # cell (1, 1) of a 4x4 map covers pixels 4..7 of 16; bilinear weights along an axis are
    # .125 .375 .625 .875 .875 .625 .375 .125 at pixels 2..9, so at half the peak (.875^2) the
    # products .875 * .625 and .625^2 stay in and .875 * .375 drops out: exactly pixels 4..7.
    coarse = np.zeros((1, 2, 4, 4), np.float32)
    coarse[0, 0, 1, 1] = 3.0  # Atelectasis (class index 0)
    coarse[0, 1, 3, 3] = 1.0  # Mass (class index 4)
    truth = [(0, box("Atelectasis", 4, 4, 4, 4, 16)), (0, box("Mass", 0, 0, 4, 4, 16))]
    result = cam_localisation(upsample(coarse, 16), iter(truth), [0, 4], threshold=0.5)
    assert result["threshold"] == 0.5
    assert result["iou"]["per_class"]["Atelectasis"]["accuracy"]["0.9"] == 1.0
    assert result["iobb"]["per_class"]["Mass"]["accuracy"]["0.1"] == 0.0
    assert result["iobb"]["per_class"]["Mass"]["avg_fp"]["0.1"] == 1.0
    assert result["iou"]["overall"]["boxes"] == 2


def test_cam_localisation_needs_a_map_for_every_truth():
    cams = np.random.default_rng(0).random((1, 1, 8, 8))
    with pytest.raises(MetricsError, match="class 'Mass'"):
        cam_localisation(cams, [(0, box("Mass", 0, 0, 2, 2, 8))], [0])
    with pytest.raises(MetricsError, match="image 3"):
        cam_localisation(cams, [(3, box("Atelectasis", 0, 0, 2, 2, 8))], [0])


# -- the three named heat-map-to-box methods ------------------------------------------------------


def test_found_means_strictly_greater_than_t_at_the_boundary():
    truth = [(0, box("Mass", 0, 0, 4, 4))]
    half = {(0, "Mass"): [(0, 0, 4, 8)]}  # IoBB = IoU = 16 / 32 = 0.5 exactly
    for metric in ("iobb", "iou"):
        result = localisation_accuracy(half, truth, metric=metric, thresholds=(0.5, 0.4999))
        assert result["overall"]["accuracy"] == {"0.5": 0.0, "0.4999": 1.0}
        assert result["overall"]["avg_fp"] == {"0.5": 1.0, "0.4999": 0.0}


def test_chestxray8_boxes_threshold_the_0_255_map_at_60_and_180():
    heatmap = np.zeros((8, 8))
    heatmap[1:3, 1:3] = 70.0 / 255  # above 60, below 180 after scaling (max 1.0 -> 255)
    heatmap[5:7, 4:8] = 1.0  # above both
    heatmap[0, 7] = 59.0 / 255  # below 60: never boxed
    assert heatmap_to_boxes(heatmap, method="chestxray8") == [
        (4.0, 5.0, 4.0, 2.0),
        (1.0, 1.0, 2.0, 2.0),  # level 60: largest region first
        (4.0, 5.0, 4.0, 2.0),  # level 180
    ]
    assert heatmap_to_boxes(3.0 * heatmap - 7.0, method="chestxray8") == heatmap_to_boxes(heatmap, method="chestxray8")
    assert heatmap_to_boxes(np.full((4, 4), 0.3), method="chestxray8") == []


def test_chestxray8_levels_are_whole_0_255_values():
    heatmap = np.array([[0.0, 60.0 / 255 - 1e-4, 1.0]])  # 59.97 rounds to the 8-bit level 60
    assert heatmap_to_boxes(heatmap, method="chestxray8")[0] == (1.0, 0.0, 2.0, 1.0)


def test_cam_largest_keeps_the_largest_region_above_20_percent_of_the_max():
    heatmap = np.zeros((8, 8))
    heatmap[0:2, 0:2] = 10.0  # the max, small region
    heatmap[4:8, 3:8] = 2.5  # above 2.0 = 20 % of the max, larger region
    heatmap[0, 6] = 2.0  # exactly 20 %: not above
    assert heatmap_to_boxes(heatmap, method="cam-largest") == [(3.0, 4.0, 5.0, 4.0)]
    # not min-max normalised: an offset that lifts the background above 20 % of the max joins everything
    assert heatmap_to_boxes(heatmap + 5.0, method="cam-largest") == [(0.0, 0.0, 8.0, 8.0)]
    assert heatmap_to_boxes(-np.ones((4, 4)), method="cam-largest") == []


def test_relative_is_the_default_and_unknown_methods_are_refused():
    heatmap = np.random.default_rng(0).random((6, 6))
    assert heatmap_to_boxes(heatmap, 0.5) == heatmap_to_boxes(heatmap, 0.5, method="relative")
    with pytest.raises(MetricsError, match="eval.cam_method"):
        heatmap_to_boxes(heatmap, method="gradcam")


def test_cam_localisation_records_the_method():
    maps = np.zeros((1, 1, 8, 8), dtype=np.float32)
    maps[0, 0, 2:4, 2:4] = 1.0
    result = cam_localisation(maps, [(0, box("Mass", 2, 2, 2, 2, 8))], [CLASSES.index("Mass")], method="chestxray8")
    assert result["method"] == "chestxray8" and "Wang et al. 2017" in result["method_description"]
    assert result["iobb"]["overall"]["accuracy"]["0.9"] == 1.0
