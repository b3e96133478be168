"""Patient-disjoint splits: NIH's official lists with a validation carve-out, or a seeded 70/10/20.

Patients, never images, are assigned to splits (an image-level split leaks patients between train
and test, a classic mistake). Each patient's split is a fixed function of its id and the seed: a
hash of both, read as a number in [0, 1), falls into the split's share of that interval. So a
patient's split never depends on which *other* images are excluded or missing, and an exclusion list
cannot move a patient between train and validation.

Trade-off: stratifying by each patient's rarest class and meeting the fractions exactly (as
:func:`stratified_patients` still does to make the phantom's published test list) both need the other
patients (ranks within a stratum, class rarity counted over the data set), which is what made splits
move. Fractions are now met in expectation (binomial spread: a validation share of 10 % +- 0.2 % of
NIH's 28,000 train_val patients) and a rare class is no longer guaranteed a patient in every split;
an AUROC left undefined by that is reported as undefined. Only when a split would be empty does a
fallback move one patient into it (the one whose hash lies nearest that split's share), so tiny data
sets still get every split.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

SPLIT_METHODS = ("official", "random-70-10-20")
RANDOM_FRACTIONS = {"train": 0.7, "val": 0.1, "test": 0.2}


@dataclass
class SplitResult:
    split: np.ndarray  #: str (N,): "train", "val", "test", or "" for rows in no split (dropped)
    notes: list[str] = field(default_factory=list)


def random_split(patients: np.ndarray, seed: int) -> SplitResult:
    """CheXNet's random patient-disjoint 70/10/20 split (theirs was never published; this one is seeded)."""
    return SplitResult(assign_patients(patients, RANDOM_FRACTIONS, seed))


def official_split(
    files: list[str],
    patients: np.ndarray,
    train_val: set[str],
    test: set[str],
    val_fraction: float,
    seed: int,
) -> SplitResult:
    """Test from ``test_list.txt``; validation carved out of ``train_val_list.txt`` by patient.

    NIH's lists are patient-disjoint. If a patient appears in both anyway, its train_val images
    are dropped (the official test set stays intact) and a note says so.
    """
    names = np.asarray(files, dtype=object)
    in_test = np.fromiter((n in test for n in names), bool, len(names))
    in_tv = np.fromiter((n in train_val for n in names), bool, len(names)) & ~in_test
    leaking = in_tv & np.isin(patients, patients[in_test])
    notes = []
    if leaking.any():
        notes.append(
            f"{len(np.unique(patients[leaking]))} patients appear in both train_val_list.txt and test_list.txt: "
            f"dropped their {int(leaking.sum())} train_val images to keep the splits patient-disjoint"
        )
    unlisted = ~(in_test | in_tv)
    if unlisted.any():
        notes.append(f"{int(unlisted.sum())} images are in neither train_val_list.txt nor test_list.txt: dropped")
    split = np.full(len(names), "", dtype=object)
    split[in_test] = "test"
    keep = in_tv & ~leaking
    split[keep] = assign_patients(patients[keep], {"train": 1 - val_fraction, "val": val_fraction}, seed)
    return SplitResult(split.astype(str), notes)


def assign_patients(patients: np.ndarray, fractions: dict[str, float], seed: int) -> np.ndarray:
    """Split name per row, every patient's rows in one split, the split a function of (patient id, seed) alone
    (not stratified by class: that would make it depend on other patients, see the module docstring)."""
    names = list(fractions)
    unique, row_patient = np.unique(patients, return_inverse=True)
    position = patient_hash(unique, seed)
    edges = np.cumsum([fractions[n] for n in names])
    edges = edges / edges[-1]
    patient_split = np.minimum(np.searchsorted(edges, position, side="right"), len(names) - 1)
    _fill_empty_splits(patient_split, position, edges)
    return np.asarray(names, dtype=object)[patient_split[row_patient.reshape(-1)]].astype(str)


def patient_hash(patient_ids: np.ndarray, seed: int) -> np.ndarray:
    """A number in [0, 1) per patient id from BLAKE2b of (seed, id): stable across runs, machines and data subsets."""

    def one(patient) -> float:
        digest = hashlib.blake2b(f"{seed}:{patient}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big") / 2.0**64

    return np.fromiter((one(p) for p in patient_ids), dtype=np.float64, count=len(patient_ids))


def _fill_empty_splits(patient_split: np.ndarray, position: np.ndarray, edges: np.ndarray) -> None:
    """Give a split with no patient the patient of the largest split whose hash lies nearest its share
    (tiny data sets only; the one case where a patient's split depends on the others)."""
    splits = len(edges)
    centres = (np.r_[0.0, edges[:-1]] + edges) / 2
    for empty in range(splits):
        sizes = np.bincount(patient_split, minlength=splits)
        if sizes[empty] == 0 and sizes.max() > 1:
            donors = np.flatnonzero(patient_split == sizes.argmax())
            patient_split[donors[np.argmin(np.abs(position[donors] - centres[empty]))]] = empty


def stratified_patients(patients: np.ndarray, labels: np.ndarray, fractions: dict[str, float], seed: int) -> np.ndarray:
    """Split name per row, every patient's rows in one split, stratified by the patient's rarest class.

    For *making* a data set's published lists (the phantom's test list, as NIH publishes one): it meets the
    fractions exactly and spreads rare classes, but a patient's split depends on every other patient, so the
    benchmark's own splits use :func:`assign_patients` instead.
    """
    names = list(fractions)
    weights = np.array([fractions[n] for n in names], dtype=float)
    unique, row_patient = np.unique(patients, return_inverse=True)
    strata = _rarest_class(row_patient, labels, len(unique))
    rng = np.random.default_rng(seed)
    groups = [np.flatnonzero(strata == s) for s in np.unique(strata)]
    groups.sort(key=len)  # rare strata first; the largest absorbs the rounding
    patient_split = np.empty(len(unique), dtype=np.int64)
    assigned = np.zeros(len(names))
    for i, members in enumerate(groups):
        members = rng.permutation(members)
        if i < len(groups) - 1:
            counts = _apportion(len(members), weights, at_least_one=True)
        else:  # the largest stratum brings the totals to the fractions
            counts = _apportion(len(members), np.clip(weights * len(unique) - assigned, 0, None), at_least_one=False)
        patient_split[members] = np.repeat(np.arange(len(names)), counts)
        assigned += counts
    _fill_empty_strata(rng, patient_split, len(names))
    return np.asarray(names, dtype=object)[patient_split[row_patient]].astype(str)


def _fill_empty_strata(rng: np.random.Generator, patient_split: np.ndarray, splits: int) -> None:
    """Give a split with no patient one from the largest split, when that one can spare it."""
    for empty in range(splits):
        sizes = np.bincount(patient_split, minlength=splits)
        if sizes[empty] == 0 and sizes.max() > 1:
            patient_split[rng.choice(np.flatnonzero(patient_split == sizes.argmax()))] = empty


def _rarest_class(row_patient: np.ndarray, labels: np.ndarray, n_patients: int) -> np.ndarray:
    """Per patient: the index of its rarest positive class (by patients), or -1 without findings."""
    patient_labels = np.zeros((n_patients, labels.shape[1]), dtype=bool)
    np.logical_or.at(patient_labels, row_patient, labels.astype(bool))
    patients_per_class = patient_labels.sum(axis=0)
    rarity = np.where(patient_labels, patients_per_class, np.iinfo(np.int64).max)
    return np.where(patient_labels.any(axis=1), rarity.argmin(axis=1), -1)


def _apportion(n: int, weights: np.ndarray, at_least_one: bool) -> np.ndarray:
    """Split ``n`` into counts proportional to ``weights`` (largest remainder).

    ``at_least_one`` gives every share one member when ``n`` allows, taken from the largest share.
    """
    if n == 0:
        return np.zeros(len(weights), dtype=np.int64)
    total = weights.sum()
    exact = n * (weights / total if total > 0 else np.full(len(weights), 1 / len(weights)))
    counts = np.floor(exact).astype(np.int64)
    counts[np.argsort(counts - exact, kind="stable")[: n - counts.sum()]] += 1
    if at_least_one and n >= len(weights):
        for empty in np.flatnonzero(counts == 0):
            counts[counts.argmax()] -= 1
            counts[empty] += 1
    return counts
