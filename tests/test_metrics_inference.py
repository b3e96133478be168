"""Patient-clustered intervals and tests, Holm's adjustment, log-space p-values, against independent references.

References: explicit patient resampling with sklearn's AUROC (written here, not shared with the module), DeLong's
test of cxrbench.metrics.auroc (itself checked against an O(n^2) reference) on unclustered data, a hand-worked Holm
example, and a seeded simulation whose true AUROC is known in closed form.
"""

import json
import math

import numpy as np
import pytest
from scipy.stats import norm
from sklearn.metrics import roc_auc_score

from cxrbench.errors import MetricsError
from cxrbench.metrics.auroc import auroc_report, delong_test, log10_two_sided_p
from cxrbench.metrics.inference import compare_aurocs, compare_localisation, holm, holm_log10

EXACT = 1e-12


def clustered_data(seed, patients=40, per_patient=3, classes=2, signal=1.0):
    """Patient-level labels and a shared patient effect: images of one patient are strongly correlated."""
    rng = np.random.default_rng(seed)
    groups = np.repeat(rng.permutation(np.arange(1000, 1000 + patients)), per_patient)  # ids unsorted, not 0..G-1
    patient_labels = (rng.random((patients, classes)) < 0.35).astype(np.int64)
    labels = np.repeat(patient_labels, per_patient, axis=0)
    effect = np.repeat(rng.normal(0, 1, (patients, classes)), per_patient, axis=0)
    scores = signal * labels + effect + rng.normal(0, 0.3, labels.shape)
    return labels, scores, groups


def naive_cluster_bootstrap(labels, scores, groups, rounds, seed):
    """Independent reference: draw patients (the module's seeded draw), list their rows, sklearn per class."""
    ids = np.unique(groups)
    rows_of = [np.flatnonzero(groups == g) for g in ids]
    draws = np.random.default_rng(seed).integers(0, len(ids), size=(rounds, len(ids)))
    values = np.full((rounds, labels.shape[1]), np.nan)
    for r, drawn in enumerate(draws):
        rows = np.concatenate([rows_of[k] for k in drawn])
        for c in range(labels.shape[1]):
            if labels[rows, c].min() != labels[rows, c].max():
                values[r, c] = roc_auc_score(labels[rows, c], scores[rows, c])
    return values


def test_patient_bootstrap_equals_explicit_patient_resampling():
    labels, scores, groups = clustered_data(0)
    report = auroc_report(labels, scores, ["a", "b"], groups=groups, rounds=150, confidence=0.9, seed=4)
    values = naive_cluster_bootstrap(labels, scores, groups, 150, 4)
    for c, name in enumerate("ab"):
        valid = values[:, c][np.isfinite(values[:, c])]
        assert np.allclose(report["ci"]["per_class"][name], np.percentile(valid, [5, 95]), rtol=0, atol=EXACT)
        assert report["valid_rounds"]["per_class"][name] == valid.size
    assert report["resampling"] == "patients" and report["patients"] == 40 and report["n"] == 120
    assert report["positive_patients"] == {n: int(labels[::3, c].sum()) for c, n in enumerate("ab")}
    json.dumps(report, allow_nan=False)


def test_patient_bootstrap_is_wider_than_image_bootstrap_on_clustered_data():
    labels, scores, groups = clustered_data(1, patients=80, per_patient=6)
    by_patient = auroc_report(labels, scores, ["a", "b"], groups=groups, rounds=300, seed=0)["ci"]["per_class"]
    by_image = auroc_report(labels, scores, ["a", "b"], rounds=300, seed=0)["ci"]["per_class"]
    for name in "ab":
        assert by_patient[name][1] - by_patient[name][0] > 1.5 * (by_image[name][1] - by_image[name][0])


def test_clustered_interval_covers_near_nominal_where_image_level_does_not():
    """Seeded simulation, 60 data sets of 60 patients x 4 images, patient-level labels and a shared patient
    effect. True AUROC in closed form: P(pos > neg) for two different patients = Phi(delta / sqrt(2 (su^2 + se^2)))."""
    delta, su, se = 1.0, 1.0, 0.3
    truth = norm.cdf(delta / math.sqrt(2 * (su**2 + se**2)))
    covered = {"patients": 0, "images": 0}
    sets = 60
    for seed in range(sets):
        rng = np.random.default_rng(100 + seed)
        patient_labels = (rng.random(60) < 0.4).astype(np.int64)
        labels = np.repeat(patient_labels, 4)[:, None]
        scores = delta * labels + np.repeat(rng.normal(0, su, 60), 4)[:, None] + rng.normal(0, se, (240, 1))
        groups = np.repeat(np.arange(60), 4)
        for kind, g in (("patients", groups), ("images", None)):
            low, high = auroc_report(labels, scores, ["x"], groups=g, rounds=300, seed=seed)["ci"]["per_class"]["x"]
            covered[kind] += low <= truth <= high
    assert covered["patients"] / sets >= 0.85  # nominal 0.95; binomial sd over 60 sets about 0.03
    assert covered["images"] / sets <= 0.80  # standard error about half the true one


def test_too_few_positives_gets_no_interval_and_says_so():
    labels, scores, groups = clustered_data(2, patients=30)
    labels[:, 1] = 0
    labels[:4, 1] = 1  # 4 positive images
    report = auroc_report(labels, scores, ["a", "b"], groups=groups, rounds=50, min_positives=5)
    assert report["ci"]["per_class"]["b"] is None and report["no_interval"] == {"b": "too few positives (4)"}
    assert report["per_class"]["b"] is not None  # the point estimate stays
    flipped = auroc_report(1 - labels, scores, ["a", "b"], groups=groups, rounds=50, min_positives=5)
    assert flipped["no_interval"] == {"b": "too few negatives (4)"}


def test_one_positive_never_gets_a_zero_width_interval():
    labels = np.zeros((30, 1), dtype=int)
    labels[3] = 1
    scores = np.arange(30.0)[:, None] / 30 + labels  # the positive scores highest: every valid round gives 1.0
    report = auroc_report(labels, scores, ["rare"], rounds=100, min_positives=2)
    assert report["ci"]["per_class"]["rare"] is None
    assert report["no_interval"]["rare"] == "too few positives (1)"


# -- Holm and p-values ----------------------------------------------------------------------------


def test_holm_hand_worked():
    # sorted: d .005 x 4 = .02; a .01 x 3 = .03; c .03 x 2 = .06; b .04 x 1 = .04 -> max(.06, .04) = .06
    adjusted = holm({"a": 0.01, "b": 0.04, "c": 0.03, "d": 0.005, "untested": None})
    assert adjusted == pytest.approx({"a": 0.03, "b": 0.06, "c": 0.06, "d": 0.02, "untested": None}, abs=EXACT)
    assert holm({"a": 0.6, "b": 0.7}) == pytest.approx({"a": 1.0, "b": 1.0})  # capped at 1
    assert holm({"a": 0.0, "b": 0.5}) == {"a": 0.0, "b": 0.5}


def test_holm_in_log_space_keeps_tiny_p_values():
    adjusted = holm_log10({"a": -400.0, "b": -2.0})
    assert adjusted["a"] == pytest.approx(-400.0 + math.log10(2)) and adjusted["b"] == pytest.approx(-2.0)


def test_p_values_never_underflow():
    assert log10_two_sided_p(0.0) == pytest.approx(0.0, abs=EXACT)
    assert log10_two_sided_p(1.959963984540054) == pytest.approx(math.log10(0.05), abs=1e-9)
    # z = 40: 2 * phi(z) / z * (1 - 1/z^2 + 3/z^4), the asymptotic Mills ratio (relative error < 15/z^6)
    z = 40.0
    reference = (
        math.log(2) - z * z / 2 - 0.5 * math.log(2 * math.pi) - math.log(z) + math.log(1 - 1 / z**2 + 3 / z**4)
    ) / math.log(10)
    assert log10_two_sided_p(z) == pytest.approx(reference, abs=1e-6)
    assert log10_two_sided_p(z) < -300


def test_delong_separable_data_reports_log_p_below_underflow():
    rng = np.random.default_rng(3)
    labels = np.r_[np.ones(3000), np.zeros(3000)].astype(int)
    good = labels + rng.normal(0, 0.05, 6000)
    result = delong_test(labels, good, rng.random(6000))
    assert result["log10_p_value"] < -300 and result["p_value"] < 1e-300
    json.dumps(result, allow_nan=False)


# -- paired comparison ----------------------------------------------------------------------------


def test_paired_patient_bootstrap_equals_explicit_reference():
    labels, scores_a, groups = clustered_data(5, patients=50)
    scores_b = scores_a + np.random.default_rng(6).normal(0, 1.0, scores_a.shape)
    result = compare_aurocs(
        labels, scores_a, scores_b, ["a", "b"], groups=groups, rounds=120, seed=9, confidence=0.9, min_positives=2
    )
    diffs = naive_cluster_bootstrap(labels, scores_a, groups, 120, 9) - naive_cluster_bootstrap(
        labels, scores_b, groups, 120, 9
    )
    for c, name in enumerate("ab"):
        test, valid = result["per_class"][name], diffs[:, c][np.isfinite(diffs[:, c])]
        point = roc_auc_score(labels[:, c], scores_a[:, c]) - roc_auc_score(labels[:, c], scores_b[:, c])
        assert test["difference"] == pytest.approx(point, abs=EXACT)
        assert np.allclose(test["interval"], np.percentile(valid, [5, 95]), rtol=0, atol=EXACT)
        se = np.std(valid, ddof=1)
        assert test["se"] == pytest.approx(se, rel=1e-12)
        assert test["p_value"] == pytest.approx(2 * norm.sf(abs(point) / se), rel=1e-9)
    assert result["resampling"] == "patients" and result["classes_tested"] == 2
    json.dumps(result, allow_nan=False)


def test_image_level_delong_is_kept_as_secondary_on_unclustered_data():
    rng = np.random.default_rng(7)
    labels = (rng.random((200, 2)) < 0.3).astype(int)
    a, b = labels + rng.normal(0, 1, (200, 2)), labels + rng.normal(0, 1.2, (200, 2))
    result = compare_aurocs(labels, a, b, ["x", "y"], rounds=200)
    assert result["resampling"] == "images" and result["patients"] is None
    for c, name in enumerate("xy"):
        reference = delong_test(labels[:, c], a[:, c], b[:, c])
        assert result["per_class"][name]["delong"]["p_value"] == pytest.approx(reference["p_value"], rel=1e-12)
        # on independent images the bootstrap SE and DeLong's agree roughly
        assert result["per_class"][name]["se"] == pytest.approx(math.sqrt(reference["variance"]), rel=0.25)


def test_identical_models_do_not_differ_and_a_worse_one_does_after_holm():
    labels, scores, groups = clustered_data(8, patients=120, per_patient=2, classes=3, signal=2.0)
    same = compare_aurocs(labels, scores, scores, ["a", "b", "c"], groups=groups, rounds=100)
    for test in same["per_class"].values():
        assert test["difference"] == 0.0 and test["p_value"] == 1.0 and not test["significant"]
    noise = np.random.default_rng(1).random(scores.shape)
    worse = compare_aurocs(labels, scores, noise, ["a", "b", "c"], groups=groups, rounds=200)
    for test in worse["per_class"].values():
        assert test["p_holm"] >= test["p_value"] and test["significant"]
    assert worse["mean"]["interval"][0] > 0


def test_untestable_class_is_named_and_left_out_of_holm():
    labels, scores, groups = clustered_data(9, patients=40, classes=2)
    labels[:, 1] = 0
    labels[0, 1] = 1
    result = compare_aurocs(labels, scores, scores[::-1], ["a", "b"], groups=groups, rounds=50)
    assert result["per_class"]["b"] == {"tested": False, "note": "too few positives (1)"}
    assert result["classes_tested"] == 1 and result["mean_over"] == ["a"]
    assert result["per_class"]["a"]["p_holm"] == result["per_class"]["a"]["p_value"]  # one test: no adjustment


def test_compare_bad_input():
    labels, scores, groups = clustered_data(10)
    with pytest.raises(MetricsError, match="class names"):
        compare_aurocs(labels, scores, scores, ["a"])
    with pytest.raises(MetricsError, match="groups"):
        compare_aurocs(labels, scores, scores, ["a", "b"], groups=groups[:-1])
    with pytest.raises(MetricsError, match="min_positives"):
        compare_aurocs(labels, scores, scores, ["a", "b"], min_positives=1)


# -- localisation between two models ---------------------------------------------------------------


def test_localisation_comparison_equals_explicit_patient_resampling():
    """Share of boxes found (IoBB > T) by a minus by b, per class and overall, against drawing patients here."""
    rng = np.random.default_rng(12)
    box_classes = ["Mass"] * 30 + ["Nodule"] * 20 + ["Hernia"] * 3
    groups = rng.integers(100, 130, len(box_classes))  # several boxes per patient, ids not 0..G-1
    overlaps_a, overlaps_b = rng.random(len(box_classes)), rng.random(len(box_classes)) * 0.8
    overlaps_a[0] = 0.5  # exactly T: not found (strictly greater, as ChestX-ray8)
    result = compare_localisation(
        overlaps_a, overlaps_b, box_classes, groups=groups, threshold=0.5, rounds=80, seed=3, confidence=0.9
    )
    found_a, found_b = overlaps_a > 0.5, overlaps_b > 0.5
    ids = np.unique(groups)
    draws = np.random.default_rng(3).integers(0, len(ids), size=(80, len(ids)))
    for name in ("Mass", "Nodule", None):
        mask = np.ones(len(box_classes), bool) if name is None else np.array(box_classes) == name
        test = result["overall"] if name is None else result["per_class"][name]
        assert test["difference"] == pytest.approx(found_a[mask].mean() - found_b[mask].mean(), abs=EXACT)
        boot = []
        for drawn in draws:
            rows = np.concatenate([np.flatnonzero((groups == ids[k]) & mask) for k in drawn])
            boot.append(found_a[rows].mean() - found_b[rows].mean() if rows.size else np.nan)
        boot = np.array(boot)[np.isfinite(boot)]
        assert np.allclose(test["interval"], np.percentile(boot, [5, 95]), rtol=0, atol=EXACT)
        assert test["se"] == pytest.approx(np.std(boot, ddof=1), rel=1e-12)
    assert result["per_class"]["Hernia"] == {"tested": False, "boxes": 3, "note": "too few boxes (3)"}
    assert result["classes_tested"] == 2 and result["resampling"] == "patients" and result["patients"] == len(ids)
    assert result["per_class"]["Mass"]["p_holm"] >= result["per_class"]["Mass"]["p_value"]
    json.dumps(result, allow_nan=False)
    with pytest.raises(MetricsError, match="overlaps_b: must be 53 finite overlaps"):
        compare_localisation(overlaps_a, overlaps_b[:-1], box_classes, threshold=0.5)
