"""Run-to-run comparison: what changed between runs, and how every headline figure moved.

The first run is the reference. Settings, environment (package versions, hardware) and backend
versions are compared as flattened dotted keys; headline figures (:data:`HEADLINES`) are compared
per backend, and a relative change beyond the threshold is flagged as better or worse.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cxrbench.report.figures import HEADLINES, Headline, headline_values
from cxrbench.report.load import Run

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


@dataclass(frozen=True)
class HeadlineChange:
    backend: str
    figure: Headline
    before: float | None
    after: float | None

    @property
    def relative_pct(self) -> float | None:
        if self.before is None or self.after is None or self.before == 0:
            return None
        return 100.0 * (self.after - self.before) / abs(self.before)

    def verdict(self, threshold_pct: float) -> str:
        """"better", "worse", "changed" (no better direction), "within" the threshold, "missing" in
        one run, or "n/a" (a zero reference)."""
        if self.before is None or self.after is None:
            return "missing"
        pct = self.relative_pct
        if pct is None:
            return "n/a"
        if abs(pct) <= threshold_pct:
            return "within"
        if self.figure.higher_is_better is None:
            return "changed"
        return "better" if (pct > 0) == self.figure.higher_is_better else "worse"


@dataclass(frozen=True)
class RunComparison:
    reference: str
    other: str
    changes: list[Change]
    figures: list[HeadlineChange]
    threshold_pct: float

    @property
    def flagged(self) -> list[HeadlineChange]:
        return [f for f in self.figures if f.verdict(self.threshold_pct) in ("better", "worse", "changed")]


def compare_runs(reference: Run, other: Run, threshold_pct: float = DEFAULT_THRESHOLD_PCT) -> RunComparison:
    """Differences of ``other`` against ``reference``, for every backend either run has."""
    changes = dict_diff(comparable_facts(reference), comparable_facts(other))
    figures = []
    for name in list(reference.backends) + [n for n in other.backends if n not in reference.backends]:
        before = headline_values(reference, reference.backends[name]) if name in reference.backends else {}
        after = headline_values(other, other.backends[name]) if name in other.backends else {}
        figures += [HeadlineChange(name, f, before.get(f.key), after.get(f.key)) for f in HEADLINES]
    return RunComparison(reference.name, other.name, changes, figures, threshold_pct)
