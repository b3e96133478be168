"""The framework effect from seeds paired by seed: its interval against known variance components, Holm across
classes, no verdict below 3 seeds, and its calibration in a simulation of whole studies.

The simulation (:func:`simulated_study`) scores patients directly, no training: two backends of one model family
whose trained models differ by seed noise only (or by a stated true effect). Its generative model:

- a test set of 150 patients with 1-3 images each (1 + Binomial(2, 1/2)), 4 classes of prevalence 0.10, 0.15, 0.20,
  0.30; each patient has a disease state per class, which each of its images keeps with probability 0.85 (else
  redrawn): follow-up images mostly agree;
- an image difficulty shared by every model (half patient, half image: ICC 0.5), so two models' scores of one
  image correlate (0.6) as real models' do;
- model (backend f, seed s), class c: separation d' = base_c + effect[f = b] + g_fs + g_fsc, base 1.2-1.8 (AUROC
  0.80-0.90), seed effects g_fs ~ N(0, 0.20^2) for the whole model and g_fsc ~ N(0, 0.10^2) per class, correlated
  0.5 between the two backends of one seed (same initial weights and data order); score = d' * label + sqrt(0.6) *
  difficulty + sqrt(0.4) * noise, so a class's AUROC is Phi(d' / sqrt(2)) (binormal, equal variances).

Measured on it: one backend's mean AUROC has a seed SD of about 0.034 on a fixed test set (the smoke data's repeats
measured 0.0362) around a mean AUROC of 0.85 (CheXNet's 0.84).
"""

import math

import numpy as np
import pytest
from scipy import stats

from cxrbench.metrics.auroc import auroc
from cxrbench.metrics.framework_effect import (
    EFFECT,
    MIN_SEEDS,
    NO_EFFECT,
    auroc_effect,
    framework_effect,
    holm_levels,
    localisation_effect,
    seed_effect,
    shared_variance,
)
from cxrbench.metrics.inference import auroc_differences, compare_localisation, difference_test, holm

CLASSES = ["c0", "c1", "c2", "c3"]
PREVALENCE = np.array([0.10, 0.15, 0.20, 0.30])
BASE_SEPARATION = np.array([1.2, 1.4, 1.6, 1.8])
SEED_SD, CLASS_SEED_SD, SEED_CORRELATION = 0.20, 0.10, 0.5
IMAGE_CORRELATION, PATIENT_ICC, PATIENTS = 0.6, 0.5, 150
#: The simulated studies and their bootstrap rounds (the rounds only estimate the shared patient variance and the
#: single-seed test here; the run uses eval.bootstrap_rounds).
NULL_STUDIES, POWER_STUDIES, ROUNDS = 300, 80, 100
#: The stated true effect for the power: +0.30 in separation for backend b, every class.
TRUE_SEPARATION_EFFECT = 0.30


def simulated_study(rng, seeds: int, effect: float = 0.0):
    """Labels, patients, and per seed the two backends' scores ``(a, b)`` of one simulated study (module docstring)."""
    per_patient = 1 + rng.binomial(2, 0.5, PATIENTS)
    groups = np.repeat(np.arange(PATIENTS), per_patient)
    n, classes = groups.size, len(CLASSES)
    state = rng.random((PATIENTS, classes)) < PREVALENCE
    keep = rng.random((n, classes)) < 0.85
    labels = np.where(keep, state[groups], rng.random((n, classes)) < PREVALENCE).astype(np.int64)
    difficulty = math.sqrt(PATIENT_ICC) * rng.normal(size=(PATIENTS, classes))[groups]
    difficulty += math.sqrt(1 - PATIENT_ICC) * rng.normal(size=(n, classes))
    shared, own = math.sqrt(SEED_CORRELATION), math.sqrt(1 - SEED_CORRELATION)
    pairs = []
    for _ in range(seeds):
        seed_whole, seed_class = rng.normal(), rng.normal(size=classes)
        models = []
        for backend in range(2):
            separation = BASE_SEPARATION + (effect if backend == 1 else 0.0)
            separation = separation + SEED_SD * (shared * seed_whole + own * rng.normal())
            separation = separation + CLASS_SEED_SD * (shared * seed_class + own * rng.normal(size=classes))
            noise = rng.normal(size=(n, classes))
            models.append(separation * labels + math.sqrt(IMAGE_CORRELATION) * difficulty
                          + math.sqrt(1 - IMAGE_CORRELATION) * noise)  # fmt: skip
        pairs.append(tuple(models))
    return labels, groups, pairs


def true_mean_auroc_effect(effect: float) -> float:
    """E over seeds of Phi((base + g) / sqrt(2)) is Phi(base / sqrt(2 + var(g))): the effect on the mean AUROC."""
    spread = math.sqrt(2 + SEED_SD**2 + CLASS_SEED_SD**2)
    return float(
        np.mean(stats.norm.cdf((BASE_SEPARATION + effect) / spread) - stats.norm.cdf(BASE_SEPARATION / spread))
    )


def two_level_bootstrap_interval(boots: np.ndarray, rng, confidence: float = 0.95) -> list[float]:
    """The rejected alternative: resample seeds (with replacement), then take that round's resampled patients."""
    seeds, rounds = boots.shape
    drawn = rng.integers(0, seeds, size=(rounds, seeds))
    values = boots[drawn, np.arange(rounds)[:, None]].mean(axis=1)
    tail = 100 * (1 - confidence) / 2
    return list(np.percentile(values, [tail, 100 - tail]))


def run_studies(count: int, seeds: int, effect: float, seed: int) -> dict[str, int]:
    """Verdicts over ``count`` simulated studies: the framework verdict on the mean and on any class, the
    single-seed paired bootstrap's "models differ" on the mean (seed 1's pair), the two-level bootstrap's."""
    rng = np.random.default_rng(seed)
    counts = {"framework": 0, "any_class": 0, "single_seed": 0, "two_level": 0}
    for study in range(count):
        labels, groups, pairs = simulated_study(rng, seeds, effect)
        per_seed = [auroc_differences(labels, b, a, groups, range(len(CLASSES)), ROUNDS, study) for a, b in pairs]
        points, boots = np.stack([p for p, _ in per_seed]), np.stack([b for _, b in per_seed])
        result = framework_effect(points, boots, [*CLASSES, "mean"], list(range(seeds)), primary="mean")
        counts["framework"] += result["primary"]["verdict"] == EFFECT
        counts["any_class"] += bool(result["classes_with_effect"])
        counts["single_seed"] += difference_test(points[0, -1], boots[0, :, -1], 0.95)["p_value"] < 0.05
        low, high = two_level_bootstrap_interval(boots[:, :, -1], rng)
        counts["two_level"] += low > 0 or high < 0
    return counts


def clopper_pearson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    tail = (1 - level) / 2
    low = stats.beta.ppf(tail, k, n - k + 1) if k else 0.0
    high = stats.beta.ppf(1 - tail, k + 1, n - k) if k < n else 1.0
    return float(low), float(high)


# -- calibration --------------------------------------------------------------------------------------


def test_simulation_is_realistic_seed_sd_and_auroc():
    """The simulated models vary by seed as much as measured (SD 0.0362 of mean AUROC on the smoke data)."""
    rng = np.random.default_rng(11)
    labels, _, pairs = simulated_study(rng, 40)
    means = np.array([np.mean([auroc(labels[:, c], a[:, c]) for c in range(len(CLASSES))]) for a, _ in pairs])
    assert 0.025 < means.std(ddof=1) < 0.05 and 0.8 < means.mean() < 0.9


def test_framework_verdict_is_calibrated_where_the_single_seed_test_is_not():
    """The slowest test here (about 12 s of CPU): 380 simulated studies are what tells a 5 % rate from 10 %.

    No true effect, 3 paired seeds (the fewest with a verdict): the framework verdict on the mean AUROC must fire in
    about 5 % of studies (inside the central 99 % of Binomial(300, 0.05): 6 to 25 studies), Holm's family of classes
    no more often; the single-seed paired bootstrap ("models differ") fires far more often, which is why its verdict
    must never be read as the framework's. The two-level bootstrap (seeds, then patients) over-fires too. With a true
    effect of +0.30 in separation (about +0.043 mean AUROC) and 5 seeds the verdict has useful power.
    """
    null = run_studies(NULL_STUDIES, MIN_SEEDS, 0.0, seed=2026)
    low, high = stats.binom.ppf([0.005, 0.995], NULL_STUDIES, 0.05)
    power = run_studies(POWER_STUDIES, 5, TRUE_SEPARATION_EFFECT, seed=2027)
    rates = {key: (k / NULL_STUDIES, *clopper_pearson(k, NULL_STUDIES)) for key, k in null.items()}
    print(  # the numbers docs/statistics.md quotes (pytest -s)
        {key: f"{r:.3f} [{lo:.3f}, {hi:.3f}]" for key, (r, lo, hi) in rates.items()},
        f"power {power['framework'] / POWER_STUDIES:.2f} {clopper_pearson(power['framework'], POWER_STUDIES)}",
        f"true effect {true_mean_auroc_effect(TRUE_SEPARATION_EFFECT):+.4f}",
    )
    assert low <= null["framework"] <= high
    assert null["any_class"] <= high
    assert clopper_pearson(null["single_seed"], NULL_STUDIES)[0] > 0.2  # at least 4x the nominal rate
    assert null["two_level"] > high
    assert power["framework"] / POWER_STUDIES > 0.4
    assert true_mean_auroc_effect(TRUE_SEPARATION_EFFECT) == pytest.approx(0.043, abs=0.001)


# -- the interval on synthetic components --------------------------------------------------------------


def synthetic_figure(rng, seeds, delta, shared_sd, seed_sd, own_sd, rounds=400):
    """One figure's per-seed differences and aligned bootstrap with known variance components: d_s = delta + a +
    u_s + e_s (a shared by all seeds); the bootstrap rows vary a (the same draw for every seed) and e_s."""
    a = rng.normal(0, shared_sd)
    points = delta + a + rng.normal(0, seed_sd, seeds) + rng.normal(0, own_sd, seeds)
    boots = points[:, None] + rng.normal(0, shared_sd, rounds)[None, :] + rng.normal(0, own_sd, (seeds, rounds))
    return points, boots


@pytest.mark.parametrize("shared_sd", [0.0, 0.02])
def test_interval_covers_the_effect_with_seed_and_patient_components(shared_sd):
    """Coverage over 1,000 synthetic studies of 4 seeds: without a shared patient component, inside the central 99 %
    of Binomial(1000, 0.95); with a large one, at least that (conservative: the interval keeps the seeds' S - 1
    degrees of freedom), while the t interval on the per-seed differences alone undercovers (it cannot see it)."""
    rng = np.random.default_rng(5)
    studies, seeds, delta = 1000, 4, 0.01
    covered = plain_covered = 0
    estimates = []
    for _ in range(studies):
        points, boots = synthetic_figure(rng, seeds, delta, shared_sd, seed_sd=0.02, own_sd=0.01)
        result = seed_effect(points, boots, 0.95)
        covered += result["interval"][0] <= delta <= result["interval"][1]
        half = stats.t.ppf(0.975, seeds - 1) * points.std(ddof=1) / math.sqrt(seeds)
        plain_covered += abs(points.mean() - delta) <= half
        estimates.append(result["shared_variance"])
    low, high = stats.binom.ppf([0.005, 0.995], studies, 0.95)
    assert np.mean(estimates) == pytest.approx(shared_sd**2, abs=2e-5)  # the shared component, recovered
    if shared_sd:
        assert covered >= low and plain_covered < low  # what the shared term is for
    else:
        assert low <= covered <= high


def test_shared_variance_is_the_mean_cross_seed_covariance_over_common_rounds():
    boots = np.array([[1.0, 2.0, 3.0, np.nan], [2.0, 4.0, 7.0, 1.0], [0.0, 0.0, 3.0, 5.0]])
    valid = boots[:, :3]
    cov = np.cov(valid)
    expected = (cov[0, 1] + cov[0, 2] + cov[1, 2]) / 3
    assert shared_variance(boots) == pytest.approx(expected, rel=1e-12)
    assert shared_variance(boots[:1]) is None


def test_interval_is_the_t_interval_with_seeds_minus_one_df():
    points = np.array([0.01, 0.03, 0.02])
    result = seed_effect(points, np.zeros((3, 10)), 0.95)  # no shared patient variance
    half = stats.t.ppf(0.975, 2) * points.std(ddof=1) / math.sqrt(3)
    assert result["interval"] == pytest.approx([0.02 - half, 0.02 + half], rel=1e-12)
    assert result["df"] == 2 and result["p_value"] == pytest.approx(stats.ttest_1samp(points, 0).pvalue, rel=1e-9)


# -- Holm across classes -----------------------------------------------------------------------------


def test_holm_levels_follow_the_step_down_and_stop_where_holm_stops():
    levels = holm_levels({"a": 0.001, "b": 0.02, "c": 0.03, "d": 0.2}, 0.05)
    # steps: a 0.001 < 0.05/4 (reject), b 0.02 >= 0.05/3 (stop): b, c, d all at step 2's level
    assert levels == pytest.approx({"a": 1 - 0.05 / 4, "b": 1 - 0.05 / 3, "c": 1 - 0.05 / 3, "d": 1 - 0.05 / 3})
    assert holm_levels({"a": 0.001, "b": 0.01}, 0.05) == pytest.approx({"a": 0.975, "b": 0.95})


def test_class_verdicts_are_holm_decisions_and_their_intervals_agree():
    """Per-seed differences built so that class t-tests (2 df) give chosen raw p-values: one class passes its raw
    test but not Holm's; the verdict follows Holm, and its adjusted interval includes 0."""
    rng = np.random.default_rng(3)
    seeds, sd = 3, 0.01
    base = rng.normal(0, 1, seeds)
    base = (base - base.mean()) / base.std(ddof=1) * sd  # mean 0, SD exactly sd
    targets = {"strong": 1e-4, "raw_only": 0.03, "none": 0.5}
    points = {n: base + stats.t.isf(p / 2, seeds - 1) * sd / math.sqrt(seeds) for n, p in targets.items()}
    names = [*targets, "mean"]
    matrix = np.column_stack([points[n] for n in targets] + [np.mean([points[n] for n in targets], axis=0)])
    result = framework_effect(matrix, np.zeros((seeds, 50, len(names))), names, [0, 1, 2], primary="mean")
    per_class = result["per_class"]
    raw = {n: per_class[n]["p_value"] for n in targets}
    assert raw == pytest.approx(targets, rel=1e-6)
    assert {n: per_class[n]["p_holm"] for n in targets} == pytest.approx(holm(raw))
    assert per_class["strong"]["verdict"] == EFFECT and per_class["raw_only"]["verdict"] == NO_EFFECT
    assert per_class["raw_only"]["interval"][0] > 0  # excludes 0 at the plain level ...
    assert per_class["raw_only"]["adjusted_interval"][0] < 0  # ... not at Holm's
    for test in per_class.values():
        adjusted = test["adjusted_interval"]
        assert (adjusted[0] > 0 or adjusted[1] < 0) == (test["p_holm"] < 0.05)
    assert result["classes_with_effect"] == ["strong"] and result["primary"]["verdict"] == EFFECT


def test_fewer_than_three_seeds_give_figures_but_no_verdict_and_say_why():
    rng = np.random.default_rng(4)
    labels, groups, pairs = simulated_study(rng, 2)
    result = auroc_effect(labels, [(b, a) for a, b in pairs], CLASSES, [7, 8], groups=groups, rounds=50, seed=1)
    assert result["primary"]["effect"] is not None and result["primary"]["interval"] is not None
    assert result["primary"]["verdict"] is None and all(c["verdict"] is None for c in result["per_class"].values())
    assert result["no_verdict"] == "2 paired seed(s), at least 3 needed for a framework verdict (--repeats 3 or more)"
    assert [m["seed"] for m in result["seed_models"]] == [7, 8]
    first = auroc(labels[:, 0], pairs[0][1][:, 0]) - auroc(labels[:, 0], pairs[0][0][:, 0])
    assert result["per_class"]["c0"]["per_seed"][0] == pytest.approx(first, abs=1e-12)


def test_localisation_effect_pairs_boxes_seed_by_seed():
    rng = np.random.default_rng(8)
    box_classes = ["Mass"] * 12 + ["Nodule"] * 12 + ["Hernia"] * 2
    groups = np.arange(26) // 2
    pairs = [(rng.random(26), rng.random(26)) for _ in range(3)]
    result = localisation_effect(pairs, box_classes, [0, 1, 2], threshold=0.5, groups=groups, rounds=60, seed=3)
    for s, (a, b) in enumerate(pairs):
        single = compare_localisation(a, b, box_classes, groups=groups, threshold=0.5, rounds=60, seed=3)
        assert result["primary"]["per_seed"][s] == pytest.approx(single["overall"]["difference"], abs=1e-12)
        assert result["per_class"]["Mass"]["per_seed"][s] == pytest.approx(
            single["per_class"]["Mass"]["difference"], abs=1e-12
        )
    assert result["untested"] == {"Hernia": "too few boxes (2)"} and result["classes_tested"] == 2
    assert result["primary"]["name"] == "overall" and result["figure"] == "IoBB accuracy (T = 0.5)"
