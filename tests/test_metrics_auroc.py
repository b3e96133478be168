"""AUROC, bootstrap intervals and DeLong's test against independent references (sklearn, O(n^2) loops, hand sums)."""

import json
import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from cxrbench.errors import CxrError, MetricsError
from cxrbench.metrics.auroc import auroc, auroc_report, bootstrap_aurocs, delong_per_class, delong_test

EXACT = 1e-12


def tied_data(seed, n=300, classes=4, prevalence=0.2):
    """Labels and coarsely rounded scores (many ties) with some signal."""
    rng = np.random.default_rng(seed)
    labels = (rng.random((n, classes)) < prevalence).astype(np.int64)
    scores = np.round(rng.random((n, classes)) + 0.4 * labels, 1)
    return labels, scores


# -- auroc ----------------------------------------------------------------------------------------


def test_auroc_hand_cases():
    assert auroc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == 0.75  # 3 of 4 pairs ordered
    assert auroc([0, 1], [0.5, 0.5]) == 0.5  # a tie counts one half
    assert auroc([1, 0, 1], [3, 2, 1]) == 0.5
    assert auroc([True, False], [-1e9, 1e9]) == 0.0


@pytest.mark.parametrize("seed", range(5))
def test_auroc_equals_sklearn_with_ties(seed):
    labels, scores = tied_data(seed)
    for c in range(labels.shape[1]):
        assert abs(auroc(labels[:, c], scores[:, c]) - roc_auc_score(labels[:, c], scores[:, c])) < EXACT


@pytest.mark.parametrize(
    "labels, scores, message",
    [
        ([1, 1, 1], [0.1, 0.2, 0.3], "undefined"),
        ([0, 1, 2], [0.1, 0.2, 0.3], "0 or 1"),
        ([0, 1], [0.1, np.nan], "finite"),
        ([0, 1], [0.1, 0.2, 0.3], "same non-empty"),
        ([], [], "same non-empty"),
    ],
)
def test_auroc_bad_input_is_one_line(labels, scores, message):
    with pytest.raises(MetricsError, match=message) as caught:
        auroc(labels, scores)
    assert isinstance(caught.value, CxrError) and "\n" not in str(caught.value)


# -- bootstrap ------------------------------------------------------------------------------------


def test_bootstrap_aurocs_equal_sklearn_on_each_resample():
    labels, scores = tied_data(1, n=40, prevalence=0.1)
    indices = np.random.default_rng(7).integers(0, 40, size=(30, 40))
    got = bootstrap_aurocs(labels, scores, indices)
    undefined = 0
    for r, rows in enumerate(indices):
        for c in range(labels.shape[1]):
            y, s = labels[rows, c], scores[rows, c]
            if y.min() == y.max():
                assert np.isnan(got[r, c])
                undefined += 1
            else:
                assert abs(got[r, c] - roc_auc_score(y, s)) < EXACT
    assert undefined > 0  # the single-valued resample case was exercised


def naive_interval(labels, scores, rounds, seed, confidence):
    """Independent bootstrap: explicit resamples (same seeded draws), sklearn, skip single-valued."""
    n, classes = labels.shape
    indices = np.random.default_rng(seed).integers(0, n, size=(rounds, n))
    values = np.full((rounds, classes), np.nan)
    for r, rows in enumerate(indices):
        for c in range(classes):
            if labels[rows, c].min() != labels[rows, c].max():
                values[r, c] = roc_auc_score(labels[rows, c], scores[rows, c])
    tail = 100 * (1 - confidence) / 2
    per_class = [np.percentile(v[np.isfinite(v)], [tail, 100 - tail]) for v in values.T]
    means = values.mean(axis=1)
    return per_class, np.percentile(means[np.isfinite(means)], [tail, 100 - tail]), np.isfinite(values).sum(axis=0)


def test_report_matches_naive_bootstrap():
    labels, scores = tied_data(3, n=60, classes=3, prevalence=0.12)  # 2, 8 and 7 positives
    report = auroc_report(labels, scores, ["a", "b", "c"], rounds=200, confidence=0.9, seed=11, min_positives=2)
    per_class, mean, valid = naive_interval(labels, scores, 200, 11, 0.9)
    for c, name in enumerate("abc"):
        assert np.allclose(report["ci"]["per_class"][name], per_class[c], rtol=0, atol=EXACT)
        assert report["valid_rounds"]["per_class"][name] == valid[c]
        assert abs(report["per_class"][name] - roc_auc_score(labels[:, c], scores[:, c])) < EXACT
    assert np.allclose(report["ci"]["mean"], mean, rtol=0, atol=EXACT)


def test_report_undefined_class_is_reported_not_faked():
    labels, scores = tied_data(4, n=80, classes=3)
    labels[:, 1] = 0  # no positive in the test set
    report = auroc_report(labels, scores, ["A", "B", "C"], rounds=50, seed=0)
    json.dumps(report, allow_nan=False)
    assert report["per_class"]["B"] is None
    assert report["undefined"] == ["B"] and report["mean_over"] == ["A", "C"]
    assert report["ci"]["per_class"]["B"] is None and report["valid_rounds"]["per_class"]["B"] == 0
    assert report["mean"] == pytest.approx((report["per_class"]["A"] + report["per_class"]["C"]) / 2, abs=EXACT)
    assert report["positives"]["B"] == 0 and report["n"] == 80 and report["rounds"] == 50


def test_report_rare_class_skips_single_valued_rounds():
    labels, scores = tied_data(5, n=50, classes=2)
    labels[:, 0] = 0
    labels[17, 0] = 1  # one positive: absent from about (49/50)^50 = 36 % of resamples
    report = auroc_report(labels, scores, ["rare", "common"], rounds=400, seed=2)
    valid = report["valid_rounds"]
    assert 0.5 * 400 < valid["per_class"]["rare"] < 0.8 * 400
    assert valid["per_class"]["common"] == 400
    assert valid["mean"] == valid["per_class"]["rare"]  # the mean needs every averaged class
    # contract change (issue 10): one positive never gets an interval (it used to, often [1.0, 1.0])
    assert report["ci"]["per_class"]["rare"] is None
    assert report["no_interval"] == {"rare": "too few positives (1)"}
    low, high = report["ci"]["mean"]
    assert 0.0 <= low <= high <= 1.0


def test_report_is_seeded_and_brackets_the_estimate():
    labels, scores = tied_data(6, n=200, classes=3)
    names = ["x", "y", "z"]
    first = auroc_report(labels, scores, names, rounds=300, seed=1)
    assert first == auroc_report(labels, scores, names, rounds=300, seed=1)
    assert first["ci"] != auroc_report(labels, scores, names, rounds=300, seed=2)["ci"]
    low, high = first["ci"]["mean"]
    assert low < first["mean"] < high
    wider = auroc_report(labels, scores, names, rounds=300, seed=1, confidence=0.99)["ci"]["mean"]
    assert wider[0] <= low and wider[1] >= high


def test_report_without_rounds_has_no_intervals():
    labels, scores = tied_data(7, n=30, classes=2)
    report = auroc_report(labels, scores, ["a", "b"], rounds=0)
    assert report["ci"] == {"mean": None, "per_class": {"a": None, "b": None}}
    assert report["valid_rounds"]["mean"] == 0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"rounds": -1}, "bootstrap_rounds"),
        ({"rounds": 2.5}, "bootstrap_rounds"),
        ({"confidence": 1.0}, "confidence"),
        ({"min_positives": 1}, "min_positives"),
        ({"groups": [1, 2, 3]}, "groups"),
        ({"classes": ["only one"]}, "2 label columns"),
    ],
)
def test_report_bad_settings(kwargs, message):
    labels, scores = tied_data(8, n=20, classes=2)
    arguments = {"classes": ["a", "b"], **kwargs}
    classes = arguments.pop("classes")
    with pytest.raises(MetricsError, match=message):
        auroc_report(labels, scores, classes, **arguments)


# -- DeLong ---------------------------------------------------------------------------------------


def delong_by_pairs(labels, scores_a, scores_b):
    """DeLong & Clarke-Pearson 1988 written out: explicit pairwise placements, explicit covariance sums."""
    labels = list(labels)
    models = [list(scores_a), list(scores_b)]
    pos = [i for i, y in enumerate(labels) if y == 1]
    neg = [j for j, y in enumerate(labels) if y == 0]
    m, n = len(pos), len(neg)

    def psi(x, y):
        return 1.0 if x > y else 0.5 if x == y else 0.0

    v10 = [[sum(psi(s[i], s[j]) for j in neg) / n for i in pos] for s in models]
    v01 = [[sum(psi(s[i], s[j]) for i in pos) / m for j in neg] for s in models]
    aucs = [sum(v) / m for v in v10]

    def covariance(v, count):
        means = [sum(row) / count for row in v]
        return [
            [sum((v[r][k] - means[r]) * (v[q][k] - means[q]) for k in range(count)) / (count - 1) for q in range(2)]
            for r in range(2)
        ]

    s10, s01 = covariance(v10, m), covariance(v01, n)
    cov = [[s10[r][q] / m + s01[r][q] / n for q in range(2)] for r in range(2)]
    variance = cov[0][0] + cov[1][1] - 2 * cov[0][1]
    z = (aucs[0] - aucs[1]) / math.sqrt(variance)
    return aucs, cov, variance, z, math.erfc(abs(z) / math.sqrt(2))


def test_delong_hand_computed():
    # V10a = [1, .5], V10b = [1, 0], V01a = [.5, 1], V01b = [.5, .5]  ->  S = [[.125, .125], [.125, .25]]
    result = delong_test([1, 1, 0, 0], [0.9, 0.6, 0.7, 0.1], [0.8, 0.3, 0.5, 0.4])
    assert result["auc_a"] == 0.75 and result["auc_b"] == 0.5 and result["difference"] == 0.25
    assert np.allclose(result["covariance"], [[0.125, 0.125], [0.125, 0.25]], rtol=0, atol=EXACT)
    assert result["variance"] == pytest.approx(0.125, abs=EXACT)
    assert result["z"] == pytest.approx(1 / math.sqrt(2), abs=EXACT)
    assert result["p_value"] == pytest.approx(math.erfc(0.5), abs=EXACT)  # 0.4795...


@pytest.mark.parametrize("seed", range(3))
def test_delong_equals_pairwise_reference(seed):
    rng = np.random.default_rng(seed)
    labels = np.array([1] * 6 + [0] * 9)
    rng.shuffle(labels)
    scores_a = np.round(rng.random(15) + 0.3 * labels, 1)  # ties within and across classes
    scores_b = np.round(0.5 * scores_a + 0.5 * rng.random(15), 1)
    aucs, cov, variance, z, p = delong_by_pairs(labels, scores_a, scores_b)
    result = delong_test(labels, scores_a, scores_b)
    assert result["auc_a"] == pytest.approx(aucs[0], abs=EXACT) and result["auc_b"] == pytest.approx(aucs[1], abs=EXACT)
    assert result["auc_a"] == pytest.approx(roc_auc_score(labels, scores_a), abs=EXACT)
    assert np.allclose(result["covariance"], cov, rtol=0, atol=EXACT)
    assert result["variance"] == pytest.approx(variance, abs=EXACT)
    assert result["z"] == pytest.approx(z, abs=1e-9) and result["p_value"] == pytest.approx(p, abs=1e-9)


def test_delong_identical_scores_give_no_difference():
    labels, scores = tied_data(9, n=50, classes=1)
    result = delong_test(labels[:, 0], scores[:, 0], scores[:, 0])
    assert result["variance"] == 0.0 and result["z"] == 0.0 and result["p_value"] == 1.0
    json.dumps(result, allow_nan=False)


def test_delong_zero_variance_with_a_difference():
    # a separates perfectly, b ties everything: both have constant placements, so the variance is 0
    result = delong_test([1, 1, 0, 0], [4, 3, 2, 1], [1, 1, 1, 1])
    assert result["difference"] == 0.5 and result["variance"] == 0.0
    assert result["z"] is None and result["p_value"] == 0.0


def test_delong_separates_good_from_random_and_not_equals():
    rng = np.random.default_rng(10)
    labels = (rng.random(300) < 0.3).astype(int)
    good = labels + rng.normal(0, 0.7, 300)
    assert delong_test(labels, good, rng.random(300))["p_value"] < 1e-6
    p_values = [
        delong_test(labels, labels + rng.normal(0, 1, 300), labels + rng.normal(0, 1, 300))["p_value"]
        for _ in range(200)
    ]
    rejected = np.mean(np.array(p_values) < 0.05)
    assert 0.01 < rejected < 0.10  # close to the nominal 5 % when both models are equally good


def test_delong_needs_two_of_each_label():
    with pytest.raises(MetricsError, match="2 positives and 2 negatives"):
        delong_test([1, 0, 0, 0], [0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1])


def test_delong_per_class():
    labels, scores = tied_data(11, n=60, classes=3)
    other = np.round(np.random.default_rng(12).random((60, 3)), 1)
    labels[:, 1] = 0
    labels[:, 2] = 0
    labels[5, 2] = 1  # one positive: AUROC exists, DeLong's covariance does not
    result = delong_per_class(labels, scores, other, ["a", "b", "c"])
    assert result["b"] is None and result["c"] is None
    assert result["a"] == delong_test(labels[:, 0], scores[:, 0], other[:, 0])
    with pytest.raises(MetricsError, match="class names"):
        delong_per_class(labels, scores, other, ["a", "b"])
