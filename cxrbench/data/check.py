"""``cxrbench data check``: what a data set holds, what is wrong with it, and whether it is usable."""

from __future__ import annotations

from collections import Counter
from itertools import combinations

import numpy as np

from cxrbench.data.cache import ProgressReport, default_workers, run_parallel
from cxrbench.data.images import decode_gray
from cxrbench.data.index import SPLITS, DataIndex
from cxrbench.errors import DataError

_EXAMPLES = 20  #: file names listed per problem; the counts are always complete


def summarize(
    index: DataIndex, *, verify_images: bool = True, workers: int | None = None, progress: bool = False
) -> dict:
    """Counts per class, view, box label and split, patient overlaps, and problems (JSON-able).

    ``verify_images`` decodes every image (in parallel over ``workers`` processes) and lists the
    unreadable ones; without it, ``unreadable`` is ``None`` (not checked).
    """
    labels = index.labels.astype(bool)
    splits = {name: index.rows(name) for name in SPLITS}
    return {
        "source": index.source,
        "root": str(index.root),
        "images": len(index),
        "patients": len(np.unique(index.patients)),
        "classes": list(index.classes),
        "positives": {c: int(n) for c, n in zip(index.classes, labels.sum(axis=0))},
        "no_finding": int((~labels.any(axis=1)).sum()),
        "views": dict(sorted(Counter(index.views).items())),
        "boxes": {c: n for c in index.classes if (n := sum(b.label == c for b in index.boxes))},
        "boxed_images": len({b.image for b in index.boxes}),
        "splits": {
            name: {"images": len(rows), "patients": len(np.unique(index.patients[rows]))}
            for name, rows in splits.items()
        },
        "overlaps": {
            f"{a}/{b}": len(np.intersect1d(index.patients[splits[a]], index.patients[splits[b]]))
            for a, b in combinations(SPLITS, 2)
        },
        "missing": {"count": len(index.missing), "files": index.missing[:_EXAMPLES]},
        "unreadable": _unreadable(index, workers, progress) if verify_images else None,
        "excluded": len(index.excluded),
        "notes": list(index.notes),
    }


def is_usable(summary: dict) -> bool:
    """Trainable as is: images, every split non-empty, splits patient-disjoint, every image readable.

    Unreadable images count too: the prepared cache would stop at the first one.
    """
    unreadable = summary["unreadable"]["count"] if summary["unreadable"] else 0
    return (
        summary["images"] > 0
        and all(s["images"] > 0 for s in summary["splits"].values())
        and not any(summary["overlaps"].values())
        and unreadable == 0
    )


def format_summary(summary: dict) -> str:
    """The summary as text for a terminal."""
    lines = [
        f"data set   {summary['source']} at {summary['root']}",
        f"images     {summary['images']} from {summary['patients']} patients",
        f"No Finding {summary['no_finding']}",
        "views      " + ", ".join(f"{v} {n}" for v, n in summary["views"].items()),
        "splits     "
        + ", ".join(f"{s} {v['images']} images / {v['patients']} patients" for s, v in summary["splits"].items()),
        "overlaps   " + ", ".join(f"{pair} {n} patients" for pair, n in summary["overlaps"].items()),
        "positives:",
        *(f"  {c:<20} {n:>7}" for c, n in summary["positives"].items()),
        f"boxes      {sum(summary['boxes'].values())} on {summary['boxed_images']} images",
        *(f"  {c:<20} {n:>7}" for c, n in summary["boxes"].items()),
        f"excluded   {summary['excluded']}",
        _problem_line("missing", summary["missing"]),
        _problem_line("unreadable", summary["unreadable"]),
        *(f"note: {note}" for note in summary["notes"]),
        "usable     " + ("yes" if is_usable(summary) else "NO"),
    ]
    return "\n".join(lines)


def _problem_line(what: str, problem: dict | None) -> str:
    if problem is None:
        return f"{what:<10} not checked"
    shown = [f if isinstance(f, str) else f"{f['file']} ({f['error']})" for f in problem["files"]]
    more = f" (first {len(shown)})" if problem["count"] > len(shown) else ""
    return f"{what:<10} {problem['count']}" + (f"{more}: " + "; ".join(shown) if shown else "")


def _unreadable(index: DataIndex, workers: int | None, progress: bool) -> dict:
    report = ProgressReport(len(index), "verifying images") if progress else None
    found: list[dict] = []
    step = 64
    jobs = [(index.paths[i : i + step],) for i in range(0, len(index), step)]

    def collect(result: tuple[int, list[dict]]) -> None:
        found.extend(result[1])
        if report:
            report.advance(result[0])

    run_parallel(_check_files, jobs, workers or default_workers(len(index)), collect)
    if report:
        report.finish()
    found.sort(key=lambda p: p["file"])
    return {"count": len(found), "files": found[:_EXAMPLES]}


def _check_files(paths: list) -> tuple[int, list[dict]]:
    """Decode each file: how many were checked and the problems found (runs in a worker)."""
    problems = []
    for path in paths:
        try:
            decode_gray(path)
        except DataError as e:
            problems.append({"file": path.name, "error": str(e).removeprefix(f"{path}: ")})
    return len(paths), problems
