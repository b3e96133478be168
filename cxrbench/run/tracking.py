"""Training curves for experiment trackers: one backend's per-epoch scalars, read back from the files its worker
wrote, handed to every plugin's ``cxrbench_record_scalars`` (TensorBoard built in, ``docs/tracking.md``).

Runs in the run's own process after a worker ends, so a tracker never slows or breaks a backend's measurements,
and a tracker that fails is a warning, never a failed run.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from cxrbench.errors import first_line
from cxrbench.files import read_json, read_jsonl
from cxrbench.run.folder import HISTORY_JSON, METRICS_JSON, MONITOR_JSONL

#: Monitor phases that belong to an epoch's training (validation runs inside the epoch too).
EPOCH_PHASES = ("train", "validate")


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
        return None
    return float(value)


def _monitor_by_epoch(folder: Path) -> dict[int, dict[str, Any]]:
    """Per epoch: the end time seen, mean GPU utilisation while training, peak GPU memory, host CPU and memory."""
    rows = [r for r in read_jsonl(folder / MONITOR_JSONL) if r.get("phase") in EPOCH_PHASES and r.get("epoch")]
    by_epoch: dict[int, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        found = by_epoch[int(row["epoch"])]
        found["t"].append(row.get("t"))
        gpu = str(row.get("device", "")).startswith("gpu")
        for field, key, phases in (
            ("util", "gpu_util" if gpu else None, ("train",)),
            ("mem_mib", "gpu_mem" if gpu else None, EPOCH_PHASES),
            ("cpu_percent", None if gpu else "cpu", ("train",)),
            ("rss_mib", None if gpu else "rss", EPOCH_PHASES),
        ):
            value = _number(row.get(field))
            if key and value is not None and row["phase"] in phases:
                found[key].append(value)
    out = {}
    for epoch, found in by_epoch.items():
        times = [t for t in found["t"] if _number(t) is not None]
        out[epoch] = {
            "wall_time": max(times) if times else None,
            "gpu/utilisation_percent": float(np.mean(found["gpu_util"])) if found["gpu_util"] else None,
            "gpu/memory_mib": max(found["gpu_mem"]) if found["gpu_mem"] else None,
            "host/cpu_percent": float(np.mean(found["cpu"])) if found["cpu"] else None,
            "host/rss_mib": max(found["rss"]) if found["rss"] else None,
        }
    return out


def epoch_scalars(folder: Path) -> list[dict[str, Any]]:
    """The ``records`` of :func:`cxrbench.hookspecs.cxrbench_record_scalars` for a backend's folder (empty when it
    trained no epoch)."""
    history = read_json(Path(folder) / HISTORY_JSON) or []
    monitor = _monitor_by_epoch(Path(folder))
    records = []
    for epoch in history:
        seen = monitor.get(int(epoch["epoch"]), {})
        train_time, wait = _number(epoch.get("train_time_s")), _number(epoch.get("data_wait_s"))
        scalars = {
            "loss/train": _number(epoch.get("train_loss")),
            "loss/validation": _number(epoch.get("val_loss")),
            "learning_rate": _number(epoch.get("lr")),
            "throughput/images_per_s": _number(epoch.get("images_per_s")),
            "throughput/steady_images_per_s": _number(epoch.get("steady_images_per_s")),
            "time/data_wait_share": wait / train_time if wait is not None and train_time else None,
            **{key: value for key, value in seen.items() if key != "wall_time"},
        }
        records.append(
            {
                "step": int(epoch["epoch"]),
                "wall_time": seen.get("wall_time"),
                "scalars": {tag: value for tag, value in scalars.items() if value is not None},
            }
        )
    auroc = (read_json(Path(folder) / METRICS_JSON) or {}).get("auroc") or {}
    if records and auroc:
        final = {f"auroc/{name}": _number(value) for name, value in (auroc.get("per_class") or {}).items()}
        final["auroc/mean"] = _number(auroc.get("mean"))
        records[-1]["scalars"].update({tag: value for tag, value in final.items() if value is not None})
    return records


def record(hook, run_dir: Path, backend: str, folder: Path) -> list[str]:
    """Hand one backend's curves to every tracker; returns the lines to show the user (notes and failures).

    Each implementation is called on its own (with the arguments it names, as pluggy would), so one that raises
    does not keep the others from recording.
    """
    records = epoch_scalars(folder)
    if not records:
        return []
    arguments = {"run_dir": Path(run_dir), "backend": backend, "records": records}
    lines = []
    for impl in reversed(hook.cxrbench_record_scalars.get_hookimpls()):  # pluggy's own order: last registered first
        try:
            note = impl.function(**{name: arguments[name] for name in impl.argnames})
        except Exception as exc:  # a tracker must never fail the run
            failure = first_line(exc, with_type=True)
            lines.append(f"warning: plugin {impl.plugin_name!r} failed to record {backend}'s curves: {failure}")
            continue
        if note:
            lines.append(f"note: {note}")
    return lines
