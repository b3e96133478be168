"""Where a training step's time goes: a profiler's events cut into categories that add up to the step's wall time.

Every instant of the profiled region (:data:`~cxrbench.backend.profiling.PROFILE_REGION`) is given to exactly one
category, so the categories add up to the region's wall time and two backends' steps can be subtracted category by
category:

1. On each lane (a thread, a GPU stream) spans nest; an instant belongs to the innermost span, whose *path* (the
   enclosing spans' labels and its own, ``/``-joined) the rule table classifies
   (:mod:`cxrbench.metrics.operation_categories`).
2. Across lanes, an instant when operations run (``kind = "op"``) is shared equally among the operations running
   then (two TensorFlow ops on two inter-op threads get half of it each);
3. else, when only host spans run, it is the input pipeline if the core's input annotation is among them, otherwise
   framework/host overhead (on a GPU: the CPU launching work while the device waits);
4. else (nothing recorded at all: Python between operations, the framework's bookkeeping) it is overhead too.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cxrbench.backend.profiling import INPUT_REGION, PROFILE_REGION, TraceEvent
from cxrbench.metrics.operation_categories import CATEGORY_KEYS, LABELS, NOT_OPERATIONS, Classifier

#: Operations listed per backend (by attributed time).
TOP_OPERATIONS = 10


@dataclass(frozen=True)
class Segment:
    """A stretch of one lane whose innermost span is ``event``."""

    start: float
    end: float
    event: int  #: index into the event list
    category: str
    kind: str
    path: str


def _lane_segments(events: Sequence[TraceEvent], order: list[int], classifier: Classifier) -> list[Segment]:
    """The exclusive stretches of one lane (spans sorted by start, outer before inner at equal starts)."""
    segments: list[Segment] = []
    stack: list[tuple[float, int, str]] = []  # (end, event index, path)
    cursor = 0.0

    def emit(until: float) -> None:
        end, index, path = stack[-1]
        if until > cursor:
            event = events[index]
            segments.append(Segment(cursor, until, index, classifier.category(path), event.kind, path))

    for index in order:
        event = events[index]
        while stack and stack[-1][0] <= event.start_us:
            emit(stack[-1][0])
            cursor = max(cursor, stack.pop()[0])
        if stack:
            emit(event.start_us)
        cursor = event.start_us
        end = min(event.end_us, stack[-1][0]) if stack else event.end_us  # a child never outlives its parent
        stack.append((end, index, f"{stack[-1][2]}/{event.label}" if stack else event.label))
    while stack:
        emit(stack[-1][0])
        cursor = max(cursor, stack.pop()[0])
    return segments


def _region(events: Sequence[TraceEvent]) -> tuple[float, float, bool]:
    """The profiled region's span (the core's annotation), else the span of all events (found = False)."""
    marks = [e for e in events if e.name == PROFILE_REGION]
    if marks:
        return min(e.start_us for e in marks), max(e.end_us for e in marks), True
    return min(e.start_us for e in events), max(e.end_us for e in events), False


def analyse(events: Sequence[TraceEvent], classifier: Classifier, steps: int) -> dict[str, Any]:
    """Milliseconds per step by category, the top operations and the unmapped ones, from one profiled region.

    :param events: the profiler's spans (any order); the region annotation among them bounds the analysis.
    :param steps: training steps inside the region.
    """
    if not events or steps < 1:
        raise ValueError("a profile needs events and at least one step")
    begin, finish, found = _region(events)
    inside = [i for i, e in enumerate(events) if e.name != PROFILE_REGION and e.end_us > begin and e.start_us < finish]
    lanes: dict[str, list[int]] = defaultdict(list)
    for i in inside:
        lanes[events[i].lane].append(i)
    segments = []
    for order in lanes.values():
        order.sort(key=lambda i: (events[i].start_us, -events[i].duration_us))
        segments += _lane_segments(events, order, classifier)
    totals, per_operation = _sweep(segments, events, begin, finish)
    wall_ms = (finish - begin) / 1000.0
    operations = _operations(per_operation, steps)
    categories = {key: totals.get(key, 0.0) / 1000.0 / steps for key in CATEGORY_KEYS}
    return {
        "steps": steps,
        "step_ms": wall_ms / steps,
        "categories_ms": categories,
        "operations_ms": sum(v for k, v in categories.items() if k not in NOT_OPERATIONS),
        "top_operations": operations[:TOP_OPERATIONS],
        "unmapped": [op for op in operations if op["category"] == "other"],
        "events": len(inside),
        "lanes": len(lanes),
        "region": "annotation" if found else "all events (no region annotation in the trace)",
    }


def innermost_paths(events: Sequence[TraceEvent]) -> dict[str, TraceEvent]:
    """Every distinct path an instant of the trace has (outside the region annotation), with an event it belongs
    to: what the category rules must place (tests/fixtures/operation_paths.json is made of these)."""
    lanes: dict[str, list[int]] = defaultdict(list)
    for i, event in enumerate(events):
        if event.name != PROFILE_REGION:
            lanes[event.lane].append(i)
    found: dict[str, TraceEvent] = {}
    for order in lanes.values():
        order.sort(key=lambda i: (events[i].start_us, -events[i].duration_us))
        for segment in _lane_segments(events, order, Classifier()):
            found.setdefault(segment.path, events[segment.event])
    return found


def _sweep(
    segments: list[Segment], events: Sequence[TraceEvent], begin: float, finish: float
) -> tuple[dict[str, float], dict[tuple[str, str], list]]:
    """Share every instant of [begin, finish) by the rules of the module docstring: microseconds per category, and
    per (operation name, category) the microseconds, the events seen and one path."""
    bounds: list[tuple[float, int, int]] = []  # (time, +1 start / -1 end, segment index)
    for i, s in enumerate(segments):
        start, end = max(s.start, begin), min(s.end, finish)
        if end > start:
            bounds += [(start, 1, i), (end, -1, i)]
    bounds.sort()
    share = [0.0] * len(segments)
    totals: dict[str, float] = defaultdict(float)
    active_ops: set[int] = set()
    waiting = 0  # host spans of the input pipeline now open
    now = begin
    for time, change, i in bounds:
        if time > now:
            if active_ops:
                part = (time - now) / len(active_ops)
                for j in active_ops:
                    share[j] += part
            else:
                totals["input" if waiting else "overhead"] += time - now
            now = time
        segment = segments[i]
        if segment.kind == "op":
            (active_ops.add if change > 0 else active_ops.discard)(i)
        elif segment.category == "input":
            waiting += change
    totals["overhead"] += max(finish - now, 0.0)
    per_operation: dict[tuple[str, str], list] = defaultdict(lambda: [0.0, set(), ""])
    for segment, micros in zip(segments, share):
        if micros:
            totals[segment.category] += micros
            entry = per_operation[(events[segment.event].name, segment.category)]
            entry[0] += micros
            entry[1].add(segment.event)
            entry[2] = entry[2] or segment.path
    return totals, per_operation


def _operations(per_operation: dict[tuple[str, str], list], steps: int) -> list[dict[str, Any]]:
    """Per (operation name, category): time and calls per step, and one path it was seen under."""
    rows = [
        {
            "name": name,
            "category": category,
            "ms_per_step": micros / 1000.0 / steps,
            "calls_per_step": len(seen) / steps,
            "path": path,
        }
        for (name, category), (micros, seen, path) in per_operation.items()
        if name != INPUT_REGION
    ]
    return sorted(rows, key=lambda row: -row["ms_per_step"])


# -- two backends ---------------------------------------------------------------------------------------------------

#: The categories must account for at least this share of a step-time difference (and at most its inverse).
EXPLAINED_ENOUGH = 0.8
#: Differences smaller than this share of the baseline's step are within what a few profiled steps can resolve.
NEGLIGIBLE_SHARE = 0.05


def global_batch(settings: dict[str, Any]) -> int:
    """Images per training step over every device, from a run's settings (as run.json stores them)."""
    return int(settings["train"]["batch_size"]) * max(1, int(settings["run"]["gpus"]))


def steady_step_ms(throughput: dict[str, Any] | None, global_batch: int) -> float | None:
    """Milliseconds per training step in the timed (unprofiled) steady state: global batch / steady images/s."""
    rate = (throughput or {}).get("train_images_per_s")
    return 1000.0 * global_batch / rate if rate else None


def explain(
    name: str,
    profile: dict[str, Any],
    steady_ms: float,
    base_name: str,
    base_profile: dict[str, Any],
    base_steady_ms: float,
    ratio_interval: Sequence[float] | None = None,
    disturbed: Sequence[str] = (),
) -> dict[str, Any]:
    """How much of the steady-state step-time difference between two backends the categories explain.

    The difference to explain is the *timed* one (steady state, no profiler): ``delta = steady - base_steady``. The
    profiles give each category's difference; the named categories (all but ``other``) explain ``explained =
    sum of their differences``, and ``share = explained / delta``. What is missing is the unmapped operations'
    difference plus the gap between the profiled and the timed difference (the profiler's own cost, or a machine
    that changed between the two measurements). The categories explain the difference when the share lies in
    [0.8, 1.25]; a difference below 5 % of the baseline's step, or one whose speed-ratio interval includes 1, has
    nothing material to explain. ``disturbed`` names the backends whose timed training the noise guard marked:
    the sentence then says the machine was busy.
    """
    delta = steady_ms - base_steady_ms
    mine, theirs = profile["categories_ms"], base_profile["categories_ms"]
    by_category = {key: mine.get(key, 0.0) - theirs.get(key, 0.0) for key in CATEGORY_KEYS}
    explained = sum(v for k, v in by_category.items() if k != "other")
    profiled_delta = profile["step_ms"] - base_profile["step_ms"]
    share = explained / delta if delta else None
    negligible = abs(delta) < NEGLIGIBLE_SHARE * base_steady_ms or (
        ratio_interval is not None and ratio_interval[0] <= 1.0 <= ratio_interval[1]
    )
    enough = share is not None and EXPLAINED_ENOUGH <= share <= 1.0 / EXPLAINED_ENOUGH
    result = {
        "backend": name,
        "baseline": base_name,
        "steady_step_ms": steady_ms,
        "baseline_steady_step_ms": base_steady_ms,
        "delta_ms": delta,
        "profiled_delta_ms": profiled_delta,
        "by_category_ms": by_category,
        "explained_ms": explained,
        "share_explained": share,
        "missing": {"unmapped_ms": by_category["other"], "profiled_vs_timed_ms": profiled_delta - delta},
        "negligible": negligible,
        "explained_enough": enough,
        "disturbed": list(disturbed),
    }
    result["sentence"] = explanation_sentence(result)
    return result


def _ms(value: float) -> str:
    return f"{abs(value):.1f} ms" if abs(value) >= 0.95 else f"{abs(value):.2f} ms"


def explanation_sentence(result: dict[str, Any]) -> str:
    """ "Of keras' extra 12.0 ms per step (steady state: 45.1 vs 33.1 ms), 9.0 ms is batch norm, ..." with the
    share explained, or why there is nothing to explain, or what is missing."""
    name, base, delta = result["backend"], result["baseline"], result["delta_ms"]
    timed = f"steady state: {result['steady_step_ms']:.1f} vs {result['baseline_steady_step_ms']:.1f} ms per step"
    if result["negligible"]:
        return f"{name} and {base} take the same time per step within the measurement ({timed}): nothing to explain"
    sign = 1.0 if delta > 0 else -1.0
    parts = sorted(
        ((k, v) for k, v in result["by_category_ms"].items() if k != "other" and v * sign > 0),
        key=lambda kv: -abs(kv[1]),
    )
    shown, running = [], 0.0
    for key, value in parts:
        shown.append(f"{_ms(value)} {LABELS[key]}")
        running += value
        if len(shown) >= 4 or running / delta >= EXPLAINED_ENOUGH:
            break
    offsets = sorted(
        ((k, v) for k, v in result["by_category_ms"].items() if k != "other" and v * sign < 0),
        key=lambda kv: -abs(kv[1]),
    )[:2]
    what = "extra" if delta > 0 else "saved"
    text = f"of {name}'s {what} {_ms(delta)} per step against {base} ({timed}), " + (
        ", ".join(shown) if shown else "no category"
    )
    if offsets:
        text += "; offset by " + ", ".join(f"{_ms(v)} {LABELS[k]}" for k, v in offsets)
    share = result["share_explained"]
    text += f": the categories explain {100 * share:.0f} %" if share is not None else ""
    if not result["explained_enough"]:
        unmapped, gap = result["missing"]["unmapped_ms"], result["missing"]["profiled_vs_timed_ms"]
        text += (
            f" (missing: {unmapped:+.1f} ms in unmapped operations, {gap:+.1f} ms between the profiled and the "
            "timed difference)"
        )
    if result.get("disturbed"):
        text += (
            f" (measured while the machine was busy: {', '.join(result['disturbed'])} disturbed; rerun on a quiet "
            "machine before relying on it)"
        )
    return text[0].upper() + text[1:]


def explain_all(backends: dict[str, dict[str, Any]], baseline: str) -> list[dict[str, Any]]:
    """Each backend against the baseline, where both have a profile and a steady step time.

    :param backends: name -> ``{"profile": analyse()'s result, "steady_step_ms": ..., "ratio_interval": ...,
        "disturbed": whether the noise guard marked its timed training}``.
    """
    base = backends.get(baseline) or {}
    if not base.get("profile") or not base.get("steady_step_ms"):
        return []
    return [
        explain(
            name,
            entry["profile"],
            entry["steady_step_ms"],
            baseline,
            base["profile"],
            base["steady_step_ms"],
            entry.get("ratio_interval"),
            [n for n in (baseline, name) if backends[n].get("disturbed")],
        )
        for name, entry in backends.items()
        if name != baseline and entry.get("profile") and entry.get("steady_step_ms")
    ]


def category_table(profiles: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of (category, label, ms per step of each backend) for the report and the summary."""
    return [
        {"key": key, "label": LABELS[key], "ms": {name: p["categories_ms"].get(key) for name, p in profiles.items()}}
        for key in CATEGORY_KEYS
    ]


def compare(backends: dict[str, dict[str, Any]], baseline: str | None, global_batch: int) -> dict[str, Any]:
    """run.json's ``profile_comparison``: the category table of every profiled backend and each backend's
    explanation against the baseline, from the backends' summaries (``profile`` and ``throughput``).

    :param global_batch: images per training step (batch size x devices), to turn steady images/s into ms per step.
    """
    from cxrbench.backend.timing import ratio_interval

    def rates(name: str) -> list[float]:
        throughput = (backends.get(name) or {}).get("throughput") or {}
        return (throughput.get("window_rates") or {}).get("train") or []

    entries, missing = {}, {}
    for name, summary in backends.items():
        profile = summary.get("profile") or {}
        if profile.get("status") != "done":
            missing[name] = profile.get("reason") or "no profile (the profile stage did not run)"
            continue
        steady = steady_step_ms(summary.get("throughput"), global_batch)
        interval = ratio_interval(rates(name), rates(baseline)) if baseline else None
        # images/s ratio -> step-time ratio: both contain 1 or neither
        disturbed = bool(
            (((summary.get("throughput") or {}).get("disturbance") or {}).get("train") or {}).get("disturbed")
        )
        entries[name] = {
            "profile": profile,
            "steady_step_ms": steady,
            "ratio_interval": interval,
            "disturbed": disturbed,
        }
    return {
        "baseline": baseline,
        "categories": category_table({name: entry["profile"] for name, entry in entries.items()}),
        "step_ms": {name: entry["profile"]["step_ms"] for name, entry in entries.items()},
        "steady_step_ms": {name: entry["steady_step_ms"] for name, entry in entries.items()},
        "pairs": explain_all(entries, baseline) if baseline in entries else [],
        "missing": missing,
    }
