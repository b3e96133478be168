"""The background sampler: every ``interval_s`` one CPU/memory row and one row per GPU the run uses.

The CPU row also carries the whole machine's view for the noise guard (:mod:`cxrbench.machine.monitor.noise`):
the busy percent of the cores this process may use, the share of them other processes used, and the
1-minute load average; GPU rows count other processes on the device (NVML).

Rows are tagged with the backend and with the recorder's current phase and epoch, appended to
``monitor.jsonl`` as they are taken (so a killed worker keeps its samples), and summarised per
phase and device into ``monitor.json`` when the sampler stops. In a multi-node world every row also carries its
``host`` and ``rank`` (``labels``); the ranks other than 0 sample into memory only (no folder) and their rows
reach rank 0's sampler through :meth:`Sampler.add`, so one ``monitor.jsonl`` holds every machine's samples.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import psutil

from cxrbench.files import write_json
from cxrbench.machine.budget import usable_cores
from cxrbench.machine.monitor import noise
from cxrbench.machine.monitor.gpu import GpuReader, GpuStatus, open_gpu_reader
from cxrbench.machine.monitor.summary import FIELDS, summarise
from cxrbench.run.folder import MONITOR_JSON, MONITOR_JSONL

MIB = 2**20


class PhaseSource(Protocol):
    """What the sampler reads to tag a row: a :class:`cxrbench.backend.recorder.Recorder` fits."""

    phase_name: str
    epoch: int


class ProcessTree:
    """CPU percent and resident memory of a process and all its children."""

    def __init__(self, pid: int):
        self.root = psutil.Process(pid)
        self._known: dict[int, psutil.Process] = {}

    def _processes(self) -> list[psutil.Process]:
        try:
            current = [self.root, *self.root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []
        # psutil's cpu_percent compares with the previous call on the SAME object: keep them.
        self._known = {p.pid: self._known.get(p.pid, p) for p in current}
        return list(self._known.values())

    @property
    def pids(self) -> set[int]:
        return set(self._known)

    def read(self) -> dict[str, float]:
        cpu = rss = 0.0
        for process in self._processes():
            try:
                cpu += process.cpu_percent(interval=None)
                rss += process.memory_info().rss
            except psutil.NoSuchProcess:
                continue
        return {"cpu_percent": cpu, "rss_mib": rss / MIB}


class MachineCpu:
    """Busy percent summed over the usable cores (100 = one core), and the load average."""

    def __init__(self):
        self.cores = usable_cores()
        self._indices = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None

    def read(self) -> dict[str, float]:
        per_cpu = psutil.cpu_percent(interval=None, percpu=True)
        chosen = [per_cpu[i] for i in self._indices if i < len(per_cpu)] if self._indices else per_cpu
        return {"system_cpu_percent": float(sum(chosen)), "load_1m": float(os.getloadavg()[0])}


class Sampler:
    """A daemon thread writing tagged samples; ``stop()`` writes and returns the summary."""

    def __init__(
        self,
        folder: Path | None,
        backend: str,
        tags: PhaseSource,
        interval_s: float = 1.0,
        pid: int | None = None,
        gpu: tuple[GpuReader | None, GpuStatus] | None = None,
        watch: Sequence[int] | None = None,
        labels: dict[str, Any] | None = None,
    ):
        self.folder = Path(folder) if folder is not None else None  #: None: samples stay in memory
        self.backend, self.tags, self.interval_s = backend, tags, interval_s
        self.labels = dict(labels or {})
        self.tree = ProcessTree(pid or psutil.Process().pid)
        self.machine = MachineCpu()
        self.gpu, self.status = gpu or open_gpu_reader(watch)
        self.samples: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="cxrbench-monitor", daemon=True)
        self._writing = threading.Lock()

    def start(self) -> Sampler:
        self.tree.read()  # the first cpu_percent of a process (and of the machine) is always 0: prime it
        self.machine.read()
        self._thread.start()
        return self

    def _row(self, t: float, device: str, values: dict[str, Any]) -> dict[str, Any]:
        row = {
            "t": round(t, 3),
            "backend": self.backend,
            "phase": self.tags.phase_name,
            "epoch": self.tags.epoch,
            "device": device,
        }
        row.update(self.labels)
        row.update({k: None for k in FIELDS})
        row.update(values)
        return row

    def sample_once(self) -> list[dict[str, Any]]:
        t = time.time()
        own, machine = self.tree.read(), self.machine.read()
        share = noise.others_cpu_share(machine["system_cpu_percent"], own["cpu_percent"], self.machine.cores)
        rows = [self._row(t, "cpu", {**own, **machine, "others_cpu_share": share})]
        if self.gpu is not None:
            rows += [self._row(t, f"gpu{i}", values) for i, values in enumerate(self.gpu.read(self.tree.pids))]
        return rows

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.add(self.sample_once())

    def add(self, rows: list[dict[str, Any]]) -> None:
        """Keep ``rows`` (this process's, or another rank's) and append them to ``monitor.jsonl``."""
        with self._writing:
            self.samples += rows
            if self.folder is not None:
                with open(self.folder / MONITOR_JSONL, "a", encoding="utf-8") as out:
                    out.write("".join(json.dumps(r) + "\n" for r in rows))

    def halt(self) -> None:
        """Stop sampling (idempotent); the samples stay."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        if self.gpu is not None:
            self.gpu.close()
            self.gpu = None

    def stop(self) -> dict[str, Any]:
        self.halt()
        summary = summarise(self.samples, self.status, self.interval_s)
        summary["disturbance"] = noise.judge(self.samples)
        if self.folder is not None:
            write_json(self.folder / MONITOR_JSON, summary)
            noise.record(self.folder, summary["disturbance"])
        return summary
