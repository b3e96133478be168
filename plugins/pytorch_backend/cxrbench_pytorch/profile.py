"""torch.profiler for the core's profile stage, and the dense-matmul ceiling of the run's device.

The trace is torch.profiler's Chrome trace, kept gzipped as ``pytorch.pt.trace.json.gz`` (Perfetto and
TensorBoard's PyTorch profiler open it). On the CPU the ATen operators are the work (``kind="op"``); on a GPU the
kernels and copies on the CUDA streams are, each carrying the path of the CPU operators that launched it (matched
by the trace's ``External id``), while the CPU operators become host spans: time the GPU waits for them is launch
overhead.
"""

from __future__ import annotations

import gzip
import shutil
import tempfile
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, record_function

from cxrbench.backend import (
    PeakFlops,
    ProfileTrace,
    Settings,
    TraceEvent,
    chrome_trace_events,
    distribution_version,
    measure_matmul_peak,
)
from cxrbench_pytorch import numerics

TRACE_FILE = "pytorch.pt.trace.json.gz"
#: Chrome-trace categories of the work on a GPU.
DEVICE_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
#: ... and on the CPU thread (user annotations: the core's, and ``Optimizer.step#Adam.step``).
CPU_CATEGORIES = ("cpu_op", "user_annotation")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class TorchProfiler:
    def __init__(self, device: torch.device, trace_dir: Path):
        self.device, self.trace_dir = device, Path(trace_dir)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        self.profile = torch.profiler.profile(activities=activities)

    def start(self) -> None:
        self.profile.start()

    def annotate(self, name: str):
        return record_function(name)

    def stop(self) -> ProfileTrace:
        self.profile.stop()
        self.trace_dir.mkdir(parents=True, exist_ok=True)
        path = self.trace_dir / TRACE_FILE
        with tempfile.TemporaryDirectory(dir=self.trace_dir) as scratch:
            raw = Path(scratch) / "trace.json"
            self.profile.export_chrome_trace(str(raw))
            with open(raw, "rb") as source, gzip.open(path, "wb", compresslevel=6) as target:
                shutil.copyfileobj(source, target)
        return ProfileTrace(
            events=trace_events(chrome_trace_events(path), gpu=self.device.type == "cuda"),
            files=[path],
            profiler=f"torch.profiler (torch {distribution_version('torch')})",
        )


def trace_events(raw, gpu: bool) -> list[TraceEvent]:
    """torch.profiler's spans as the core's events: CPU operators (ops on the CPU, host spans on a GPU run) and,
    on a GPU, the device's kernels and copies with their launching operators' path as scope."""
    events, launched = [], {}
    kernels = []
    for event in raw:
        category = event.get("cat")
        if category in CPU_CATEGORIES:
            is_annotation = category == "user_annotation" and str(event["name"]).startswith("cxrbench.")
            events.append(
                TraceEvent(
                    name=event["name"],
                    start_us=float(event["ts"]),
                    duration_us=float(event["dur"]),
                    lane=event["thread"],
                    kind="host" if gpu or is_annotation else "op",
                )
            )
            external = (event.get("args") or {}).get("External id")
            if external is not None:
                launched[external] = len(events) - 1
        elif gpu and category in DEVICE_CATEGORIES:
            kernels.append(event)
    if kernels:
        paths = operator_paths(events)
        for event in kernels:
            owner = launched.get((event.get("args") or {}).get("External id"))
            events.append(
                TraceEvent(
                    name=event["name"],
                    start_us=float(event["ts"]),
                    duration_us=float(event["dur"]),
                    lane=f"{event['thread']} (device)",
                    scope=paths[owner] if owner is not None else "",
                )
            )
    return events


def operator_paths(events: list[TraceEvent]) -> list[str]:
    """Each event's path of enclosing operators on its thread (outermost first, the core's annotations left out)."""
    paths = [""] * len(events)
    by_lane: dict[str, list[int]] = {}
    for i, event in enumerate(events):
        by_lane.setdefault(event.lane, []).append(i)
    for order in by_lane.values():
        order.sort(key=lambda i: (events[i].start_us, -events[i].duration_us))
        stack: list[int] = []
        for i in order:
            while stack and events[stack[-1]].end_us <= events[i].start_us:
                stack.pop()
            own = "" if events[i].name.startswith("cxrbench.") else events[i].name
            outer = paths[stack[-1]] if stack else ""
            paths[i] = "/".join(part for part in (outer, own) if part)
            stack.append(i)
    return paths


def peak_flops(settings: Settings) -> PeakFlops:
    """torch.matmul of two square matrices in the run's precision on its device (TF32 as numerics.tf32 set it)."""
    device = numerics.select_device(settings)
    dtype = DTYPES[settings.numerics.precision]

    def make(size: int):
        a = torch.randn(size, size, device=device, dtype=dtype)
        b = torch.randn(size, size, device=device, dtype=dtype)
        return lambda: torch.matmul(a, b)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return measure_matmul_peak(
        make, sync, dtype=str(dtype).removeprefix("torch."), device=numerics.device_name(device), how="torch.matmul"
    )
