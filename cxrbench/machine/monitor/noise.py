"""The noise guard: was the machine busy with other work while a backend was being timed?

The sampler records, next to the worker's own CPU, the CPU the whole machine used on the cores this
process may run on, and (on a GPU) how many other processes hold the device. A timed phase is
*disturbed* when other processes used, on average over its samples, more than
:data:`OTHERS_CPU_SHARE_LIMIT` of those cores, or when any other process ran on the GPU. The
verdicts go into ``throughput.json`` (and so run.json), the report's summary and a warning at the
end of the run.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from cxrbench.files import read_json, write_json
from cxrbench.run.folder import THROUGHPUT_JSON

#: Share of the usable cores' CPU time others may use, on average over a timed phase, before the
#: phase's figures are marked disturbed: 0.15 is 30 % of one core on a 2-core machine, more than
#: a desktop's background load and less than one busy process.
OTHERS_CPU_SHARE_LIMIT = 0.15
#: The phases whose speed is reported (the monitor's phase tags).
TIMED_PHASES = ("train", "validate", "predict")


def others_cpu_share(system_percent: float, own_percent: float, cores: int) -> float:
    """Share (0-1) of ``cores`` used by other processes: the cores' busy time minus the worker tree's.

    ``system_percent`` is the summed percent of the usable cores (0 to 100 x cores), ``own_percent``
    the worker tree's psutil percent (100 = one core) over the same interval.
    """
    return float(min(max((system_percent - own_percent) / (100.0 * cores), 0.0), 1.0))


def _values(rows: list[dict[str, Any]], field: str) -> list[float]:
    return [float(r[field]) for r in rows if isinstance(r.get(field), (int, float))]


def judge(samples: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per timed phase: others' CPU share (mean, max), load average, other GPU processes, and the verdict."""
    verdicts = {}
    rows = list(samples)
    for phase in TIMED_PHASES:
        cpu = [r for r in rows if r.get("phase") == phase and r.get("device") == "cpu"]
        shares = _values(cpu, "others_cpu_share")
        if not shares:
            continue
        gpu_rows = [r for r in rows if r.get("phase") == phase and r.get("device") != "cpu"]
        gpu_others = _values(gpu_rows, "other_processes")
        mean = float(np.mean(shares))
        verdicts[phase] = {
            "others_cpu_share_mean": round(mean, 4),
            "others_cpu_share_max": round(float(np.max(shares)), 4),
            "load_1m_max": max(_values(cpu, "load_1m"), default=None),
            "gpu_other_processes_max": int(max(gpu_others)) if gpu_others else None,
            "samples": len(shares),
            "limit": OTHERS_CPU_SHARE_LIMIT,
            "disturbed": mean > OTHERS_CPU_SHARE_LIMIT or bool(gpu_others and max(gpu_others) > 0),
        }
    return verdicts


def record(folder: Path, verdicts: dict[str, dict[str, Any]]) -> None:
    """Merge this worker's verdicts into throughput.json; phases it did not time keep earlier verdicts."""
    path = Path(folder) / THROUGHPUT_JSON
    throughput = read_json(path)
    if throughput is None or not verdicts:
        return
    disturbance = {**(throughput.get("disturbance") or {}), **verdicts}
    throughput["disturbance"] = disturbance
    throughput["disturbed"] = any(v.get("disturbed") for v in disturbance.values())
    write_json(path, throughput)


def describe(verdict: dict[str, Any], limit: bool = True) -> str:
    """ "others used 42% of the CPU (limit 15%)", and/or other processes on the GPU."""
    parts = []
    if verdict.get("others_cpu_share_mean", 0) > verdict.get("limit", OTHERS_CPU_SHARE_LIMIT):
        bound = f" (limit {verdict['limit']:.0%})" if limit else ""
        parts.append(f"others used {verdict['others_cpu_share_mean']:.0%} of the CPU{bound}")
    if verdict.get("gpu_other_processes_max"):
        parts.append(f"{verdict['gpu_other_processes_max']} other process(es) on the GPU")
    return ", ".join(parts)


def warnings(backends: dict[str, dict[str, Any]]) -> list[str]:
    """One warning line per disturbed phase of every backend (from run.json's backend summaries)."""
    lines = []
    for name, result in backends.items():
        for phase, verdict in ((result.get("throughput") or {}).get("disturbance") or {}).items():
            if verdict.get("disturbed"):
                lines.append(f"warning: {name} speed measurement disturbed, {phase}: {describe(verdict)}")
    return lines
