"""jax.profiler for the core's profile stage, and the dense-matmul ceiling of the run's device.

``jax.profiler`` writes an XPlane file and a Perfetto trace (``profile/plugins/profile/<time>/``: open
``perfetto_trace.json.gz`` in https://ui.perfetto.dev, or the folder in TensorBoard). jax's own reader
(``jax.profiler.ProfileData``) gives every executed HLO instruction as a span naming it (``hlo_op``); the compiled
step's HLO text (``loop.compiled.as_text()``) gives each instruction's ``op_name``, the path of the JAX operation
it came from, which the category rules read. On the CPU the instructions run on XLA's threads; on a GPU on its
streams, and the host's spans are launches.
"""

from __future__ import annotations

import re
from pathlib import Path

import jax
import jax.numpy as jnp

from cxrbench.backend import (
    BackendError,
    PeakFlops,
    ProfileTrace,
    TraceEvent,
    distribution_version,
    measure_matmul_peak,
)
from cxrbench_jax import numerics

#: ``%name = ... metadata={op_name="..." ...}`` in HLO text.
HLO_METADATA = re.compile(r'^\s*(?:ROOT )?%?([\w.\-]+) = .*?metadata=\{op_name="((?:[^"\\]|\\.)*)"', re.MULTILINE)
#: ``multiply_add_fusion.89`` -> ``multiply_add_fusion``: the instruction's kind, what the top operations group by.
NUMBERED = re.compile(r"\.\d+$")
TRACE_FILES = ("*.xplane.pb", "perfetto_trace.json.gz")


def op_names(hlo_text: str) -> dict[str, str]:
    """HLO instruction name -> its ``op_name`` metadata."""
    return {name: path.replace('\\"', '"') for name, path in HLO_METADATA.findall(hlo_text)}


class JaxProfiler:
    def __init__(self, trace_dir: Path, hlo_text: str):
        self.trace_dir = Path(trace_dir)
        self.paths = op_names(hlo_text)

    def start(self) -> None:
        options = jax.profiler.ProfileOptions()
        options.python_tracer_level = 0  # the Python tracer's spans would bury the operations in overhead
        jax.profiler.start_trace(self.trace_dir, create_perfetto_trace=True, profiler_options=options)

    def annotate(self, name: str):
        return jax.profiler.TraceAnnotation(name)

    def stop(self) -> ProfileTrace:
        jax.profiler.stop_trace()
        folders = sorted(self.trace_dir.glob("plugins/profile/*"), key=lambda p: p.stat().st_mtime)
        files = [f for pattern in TRACE_FILES for f in folders[-1].glob(pattern)] if folders else []
        xplanes = [f for f in files if f.suffix == ".pb"]
        if not xplanes:
            raise BackendError(f"jax.profiler wrote no .xplane.pb under {self.trace_dir}")
        planes = jax.profiler.ProfileData.from_file(str(xplanes[0])).planes
        for extra in set(folders[-1].iterdir()) - set(files):  # jax's second JSON copy of the same trace
            extra.unlink()
        return ProfileTrace(
            events=trace_events(planes, self.paths),
            files=files,
            profiler=f"jax.profiler (jax {distribution_version('jax')})",
        )


def trace_events(planes, paths: dict[str, str]) -> list[TraceEvent]:
    """Every executed HLO instruction (a span with an ``hlo_op`` stat) and the core's annotations."""
    planes = list(planes)
    on_device = any(plane.name.startswith("/device:") for plane in planes)
    events = []
    for plane in planes:
        device = plane.name.startswith("/device:")
        if not device and plane.name != "/host:CPU":
            continue
        for line in plane.lines:
            lane = f"{plane.name} {line.name}"
            for event in line.events:
                start, duration = event.start_ns / 1000.0, event.duration_ns / 1000.0
                if event.name.startswith("cxrbench."):
                    events.append(TraceEvent(event.name, start, duration, lane, "host"))
                    continue
                instruction = dict(event.stats).get("hlo_op")
                if instruction:
                    kind = "op" if device or not on_device else "host"
                    name = NUMBERED.sub("", str(instruction))
                    events.append(TraceEvent(name, start, duration, lane, kind, paths.get(str(instruction), "")))
    return events


def profiler(loop, trace_dir: Path) -> JaxProfiler:
    return JaxProfiler(trace_dir, loop.compiled.as_text() if loop.compiled is not None else "")


def peak_flops(settings) -> PeakFlops:
    """A jitted jnp.matmul of two square float32 matrices on the run's first device, at the training matmul
    precision (TF32 only as numerics.tf32 allows)."""
    device = numerics.select_devices(settings)[0]
    matmul = jax.jit(jnp.matmul)
    last: dict[str, jax.Array] = {}

    def make(size: int):
        key_a, key_b = jax.random.split(jax.random.key(0))
        a = jax.device_put(jax.random.normal(key_a, (size, size), jnp.float32), device)
        b = jax.device_put(jax.random.normal(key_b, (size, size), jnp.float32), device)

        def call() -> None:
            with jax.default_matmul_precision(numerics.training_precision(settings)):
                last["product"] = matmul(a, b)

        return call

    def sync() -> None:
        if "product" in last:
            last["product"].block_until_ready()

    return measure_matmul_peak(
        make, sync, dtype="float32", device=numerics.device_name(device), how="jax.jit(jnp.matmul)"
    )
