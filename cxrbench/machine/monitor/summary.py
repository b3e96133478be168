"""Per-phase, per-device summaries (mean, p50, p95) of monitor samples."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import numpy as np

from cxrbench.machine.monitor.gpu import GpuStatus

FIELDS = (
    "util",
    "mem_mib",
    "power_w",
    "temp_c",
    "cpu_percent",
    "rss_mib",
    "system_cpu_percent",
    "others_cpu_share",
    "load_1m",
    "other_processes",
)


def statistics(values: list[float]) -> dict[str, float | int]:
    data = np.asarray(values, dtype=np.float64)
    return {
        "mean": float(data.mean()),
        "p50": float(np.percentile(data, 50)),
        "p95": float(np.percentile(data, 95)),
        "n": int(data.size),
    }


def device_key(row: dict[str, Any]) -> str:
    """The summary's name for a sample's device: ``gpu0`` for this process (rank 0), ``rank1@host:gpu0`` for a row
    another rank of a multi-node world sent (its host and rank ride on every row)."""
    rank = row.get("rank")
    return row["device"] if not rank else f"rank{rank}@{row.get('host')}:{row['device']}"


def summarise(samples: Iterable[dict[str, Any]], status: GpuStatus, interval_s: float) -> dict[str, Any]:
    """``{"phases": {phase: {device: {field: stats}}}}`` plus the GPU status.

    Fields a device never reported (``None``: GPU fields on the CPU row, power under GPUtil) are
    left out rather than summarised as zeros.
    """
    grouped: dict[str, dict[str, dict[str, list[float]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    read_errors: dict[str, int] = defaultdict(int)
    count = 0
    for row in samples:
        count += 1
        if row.get("read_error"):
            read_errors[device_key(row)] += 1
        for name in FIELDS:
            if row.get(name) is not None:
                grouped[row["phase"]][device_key(row)][name].append(row[name])
    phases = {
        phase: {
            device: {name: statistics(values) for name, values in fields.items()} for device, fields in devices.items()
        }
        for phase, devices in grouped.items()
    }
    summary = {**status.to_dict(), "interval_s": interval_s, "samples": count, "phases": phases}
    if read_errors:
        summary["gpu_read_errors"] = dict(read_errors)  #: samples per device whose utilisation or memory read failed
    return summary
