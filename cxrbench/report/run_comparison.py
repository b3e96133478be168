"""Run-to-run comparison: what changed between runs, and how every headline figure moved.

The first run is the reference. Settings, environment (package versions, hardware) and backend
versions are compared as flattened dotted keys; headline figures (:data:`HEADLINES`) are compared
per backend and a change is flagged by evidence, strongest first (``HeadlineChange.basis``):

* mean AUROC, both runs with predictions of the same test images: a paired patient bootstrap of the
  difference (:func:`cxrbench.metrics.inference.compare_aurocs`); flagged when its interval excludes 0;
* a figure with an interval in both runs (AUROC's bootstrap interval, the ``*_interval`` of the speed
  figures in throughput.json): flagged when the intervals do not overlap;
* a speed figure of a backend whose throughput.json says ``disturbed: true`` in either run is
  "disturbed" (the machine was busy) and not judged;
* otherwise, with nothing to judge by, the relative change against a threshold (``--threshold``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from cxrbench.files import load_npz
from cxrbench.report.figures import HEADLINES, Headline, headline_values
from cxrbench.report.load import BackendRun, Run
from cxrbench.run.folder import PREDICTIONS_NPZ

DEFAULT_THRESHOLD_PCT = 5.0


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}, "c": [1, 2]}`` -> ``{"a.b": 1, "c": [1, 2]}`` (lists stay whole values)."""
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for key, inner in value.items():
            out.update(flatten(inner, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


@dataclass(frozen=True)
class Change:
    key: str
    before: Any  #: ``None`` with ``added`` when the key is new
    after: Any
    kind: str  #: "changed", "added" or "removed"


def dict_diff(before: dict, after: dict) -> list[Change]:
    """Every flattened key whose value differs, sorted by key."""
    a, b = flatten(before), flatten(after)
    changes = []
    for key in sorted(set(a) | set(b)):
        if key not in b:
            changes.append(Change(key, a[key], None, "removed"))
        elif key not in a:
            changes.append(Change(key, None, b[key], "added"))
        elif a[key] != b[key]:
            changes.append(Change(key, a[key], b[key], "changed"))
    return changes


def comparable_facts(run: Run) -> dict[str, Any]:
    """What may explain a difference: settings, environment, data, and each backend's versions
    (not the times a run started or finished, which always differ)."""
    meta = run.meta
    return {
        "settings": meta.get("settings") or {},
        "environment": meta.get("environment") or {},
        "data": {k: v for k, v in (meta.get("data") or {}).items() if k not in ("root",)},
        "suite": meta.get("suite"),
        "cxrbench_version": meta.get("cxrbench_version"),
        "backends": {name: (b.get("info") or {}) for name, b in run.backends.items()},
    }


#: Headline key -> where its interval lives: ("auroc", None) is auroc.ci.mean; else a throughput.json key.
INTERVAL_KEYS = {
    "mean_auroc": ("auroc", None),
    "train_images_per_s": ("throughput", "train_images_per_s_interval"),
    "predict_images_per_s": ("throughput", "predict_images_per_s_interval"),
}
#: Figures a busy machine distorts (every one but accuracy and localisation).
SPEED_KEYS = frozenset(f.key for f in HEADLINES) - {"mean_auroc", "localisation_iobb_05"}


@dataclass(frozen=True)
class HeadlineChange:
    backend: str
    figure: Headline
    before: float | None
    after: float | None
    before_interval: list[float] | None = None
    after_interval: list[float] | None = None
    disturbed: bool = False  #: either run's throughput.json says this backend's timing was disturbed
    paired: dict | None = None  #: paired bootstrap of the mean AUROC difference (after - before), same test images

    @property
    def relative_pct(self) -> float | None:
        if self.before is None or self.after is None or self.before == 0:
            return None
        return 100.0 * (self.after - self.before) / abs(self.before)

    @property
    def basis(self) -> str:
        """What the verdict rests on: "paired bootstrap", "intervals", "disturbed", "threshold" or "missing"."""
        if self.before is None or self.after is None:
            return "missing"
        if self.paired and self.paired.get("interval"):
            return "paired bootstrap"
        if self.disturbed and self.figure.key in SPEED_KEYS:
            return "disturbed"
        if self.before_interval and self.after_interval:
            return "intervals"
        return "threshold"

    def _direction(self, up: bool) -> str:
        if self.figure.higher_is_better is None:
            return "changed"
        return "better" if up == self.figure.higher_is_better else "worse"

    def verdict(self, threshold_pct: float) -> str:
        """ "better", "worse", "changed" (no better direction), "within" (no evidence of a change), "disturbed"
        (a busy machine: not judged), "missing" in one run, or "n/a" (a zero reference, no interval)."""
        basis = self.basis
        if basis in ("missing", "disturbed"):
            return basis
        if basis == "paired bootstrap":
            low, high = self.paired["interval"]
            return "within" if low <= 0.0 <= high else self._direction(low > 0.0)
        if basis == "intervals":
            (b_low, b_high), (a_low, a_high) = self.before_interval, self.after_interval
            return "within" if a_low <= b_high and b_low <= a_high else self._direction(a_low > b_high)
        pct = self.relative_pct
        if pct is None:
            return "n/a"
        return "within" if abs(pct) <= threshold_pct else self._direction(pct > 0)


@dataclass(frozen=True)
class RunComparison:
    reference: str
    other: str
    changes: list[Change]
    figures: list[HeadlineChange]
    threshold_pct: float

    @property
    def flagged(self) -> list[HeadlineChange]:
        return [f for f in self.figures if f.verdict(self.threshold_pct) in ("better", "worse", "changed", "disturbed")]


def _interval(backend: BackendRun | None, key: str) -> list[float] | None:
    if backend is None or key not in INTERVAL_KEYS:
        return None
    source, inner = INTERVAL_KEYS[key]
    section = backend.get(source) or {}
    value = (section.get("ci") or {}).get("mean") if inner is None else section.get(inner)
    ok = isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, (int, float)) for v in value)
    return [float(v) for v in value] if ok else None


def _disturbed(backend: BackendRun | None) -> bool:
    return bool(((backend.get("throughput") if backend else None) or {}).get("disturbed"))


def _test_predictions(backend: BackendRun) -> dict[str, np.ndarray] | None:
    try:
        return load_npz(backend.folder / PREDICTIONS_NPZ)
    except (OSError, ValueError):
        return None


def paired_mean_difference(reference: Run, before: BackendRun, after: BackendRun) -> dict | None:
    """Mean AUROC difference (after - before) by a paired patient bootstrap on the test images both runs
    predicted, with the reference run's bootstrap settings; None when the runs did not predict the same images."""
    from cxrbench.data.classes import CLASSES
    from cxrbench.errors import MetricsError
    from cxrbench.metrics.inference import compare_aurocs

    a, b = _test_predictions(after), _test_predictions(before)
    if not a or not b or any(k not in a or k not in b for k in ("labels", "logits", "files")):
        return None
    if not np.array_equal(a["files"], b["files"]) or not np.array_equal(a["labels"], b["labels"]):
        return None
    evaluation = (reference.meta.get("settings") or {}).get("eval") or {}
    try:
        result = compare_aurocs(
            a["labels"],
            a["logits"],
            b["logits"],
            CLASSES,
            groups=a.get("patients"),
            rounds=int(evaluation.get("bootstrap_rounds", 1000)),
            confidence=float(evaluation.get("confidence", 0.95)),
            min_positives=int(evaluation.get("min_positives", 5)),
        )
    except MetricsError:
        return None
    return result["mean"]


def compare_runs(reference: Run, other: Run, threshold_pct: float = DEFAULT_THRESHOLD_PCT) -> RunComparison:
    """Differences of ``other`` against ``reference``, for every backend either run has."""
    changes = dict_diff(comparable_facts(reference), comparable_facts(other))
    figures = []
    for name in list(reference.backends) + [n for n in other.backends if n not in reference.backends]:
        old, new = reference.backends.get(name), other.backends.get(name)
        before = headline_values(reference, old) if old else {}
        after = headline_values(other, new) if new else {}
        paired = paired_mean_difference(reference, old, new) if old and new else None
        disturbed = _disturbed(old) or _disturbed(new)
        figures += [
            HeadlineChange(
                name,
                f,
                before.get(f.key),
                after.get(f.key),
                _interval(old, f.key),
                _interval(new, f.key),
                disturbed,
                paired if f.key == "mean_auroc" else None,
            )
            for f in HEADLINES
        ]
    return RunComparison(reference.name, other.name, changes, figures, threshold_pct)
