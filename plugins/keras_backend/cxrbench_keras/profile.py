"""TensorFlow's profiler for the core's profile stage, and the dense-matmul ceiling of the run's device.

``tf.profiler.experimental`` writes an XPlane file (``profile/plugins/profile/<time>/<host>.xplane.pb``, which
TensorBoard's profile plugin opens: ``tensorboard --logdir <run>/keras/profile``). Its host plane holds TensorFlow's
operations as ``node_name:OpType`` spans on the executor's threads and the core's annotations on the Python thread;
a GPU's planes hold the kernels, each naming the operation that launched it (``tf_op``). On a GPU run the host's
operation spans become host spans (the launches) and the kernels are the work.
"""

from __future__ import annotations

from pathlib import Path

import tensorflow as tf

from cxrbench.backend import (
    BackendError,
    PeakFlops,
    ProfileTrace,
    TraceEvent,
    distribution_version,
    measure_matmul_peak,
)
from cxrbench_keras.numerics import device_name

HOST_PLANE = "/host:CPU"
GPU_PLANE = "/device:GPU:"
#: tf.data's threads: the input pipeline producing batches ahead, beside the step (time the step waits for it is
#: the core's input annotation on the Python thread).
INPUT_THREADS = "tf_data"
DTYPES = {"fp32": tf.float32, "bf16": tf.bfloat16, "fp16": tf.float16}


def _xplane():
    try:
        from tensorflow.tsl.profiler.protobuf import xplane_pb2
    except ImportError:
        raise BackendError(
            "TensorFlow's profiler cannot be read here: tensorflow.tsl.profiler.protobuf.xplane_pb2 is missing "
            f"(tensorflow {distribution_version('tensorflow')})"
        ) from None
    return xplane_pb2


class TensorFlowProfiler:
    def __init__(self, trace_dir: Path):
        self.trace_dir = Path(trace_dir)
        self.xplane_pb2 = _xplane()  # refused before the steps run when the trace could not be read
        self.gpu = bool(tf.config.get_visible_devices("GPU"))

    def start(self) -> None:
        options = tf.profiler.experimental.ProfilerOptions(host_tracer_level=2, python_tracer_level=0)
        try:
            tf.profiler.experimental.start(str(self.trace_dir), options=options)
        except tf.errors.AlreadyExistsError:
            raise BackendError("TensorFlow's profiler is already running in this process (another session)") from None

    def annotate(self, name: str):
        return tf.profiler.experimental.Trace(name)

    def stop(self) -> ProfileTrace:
        tf.profiler.experimental.stop()
        found = sorted(self.trace_dir.glob("plugins/profile/*/*.xplane.pb"), key=lambda p: p.stat().st_mtime)
        if not found:
            raise BackendError(f"TensorFlow's profiler wrote no .xplane.pb under {self.trace_dir}")
        space = self.xplane_pb2.XSpace()
        space.ParseFromString(found[-1].read_bytes())
        return ProfileTrace(
            events=xplane_events(space, self.gpu),
            files=[found[-1]],
            profiler=f"tf.profiler.experimental (tensorflow {distribution_version('tensorflow')})",
        )


def _tf_op(metadata) -> tuple[str, str] | None:
    """``(node path, op type)`` of a TensorFlow operation's span (named ``path:Type``, displayed as ``Type``)."""
    path, _, kind = metadata.name.rpartition(":")
    return (path, kind) if path and kind and kind == metadata.display_name else None


def _stat_text(event, metadata, stat_metadata, wanted: str) -> str | None:
    for stat in [*event.stats, *metadata.stats]:
        if stat_metadata[stat.metadata_id].name == wanted:
            if stat.HasField("str_value"):
                return stat.str_value
            if stat.HasField("ref_value"):
                return stat_metadata[stat.ref_value].name
    return None


def xplane_events(space, gpu: bool) -> list[TraceEvent]:
    """The core's events from an XSpace: TensorFlow operations and the core's annotations on the host, and on a GPU
    the kernels of its streams with their launching operation's node path as scope."""
    events = []
    for plane in space.planes:
        host = plane.name == HOST_PLANE
        if not host and not plane.name.startswith(GPU_PLANE):
            continue
        for line in plane.lines:
            if not host and not line.name.startswith("Stream"):
                continue
            lane, origin_ps = f"{plane.name} {line.name}", line.timestamp_ns * 1000
            for event in line.events:
                metadata = plane.event_metadata[event.metadata_id]
                start_us, duration_us = (origin_ps + event.offset_ps) / 1e6, event.duration_ps / 1e6
                if not host:
                    launched = _stat_text(event, metadata, plane.stat_metadata, "tf_op") or ""
                    scope = launched.rpartition(":")[0] or launched
                    name = metadata.display_name or metadata.name
                    events.append(TraceEvent(name, start_us, duration_us, lane, "op", scope))
                elif metadata.name.startswith("cxrbench."):
                    events.append(TraceEvent(metadata.name, start_us, duration_us, lane, "host"))
                elif (operation := _tf_op(metadata)) is not None:
                    scope, kind = operation
                    background = gpu or line.name.startswith(INPUT_THREADS)  # launches, or tf.data's own work
                    events.append(TraceEvent(kind, start_us, duration_us, lane, "host" if background else "op", scope))
    return events


def peak_flops(settings) -> PeakFlops:
    """tf.linalg.matmul of two square matrices in the run's precision on the replica's device (TF32 as
    numerics.tf32 set it)."""
    dtype = DTYPES[settings.numerics.precision]
    where = "/GPU:0" if tf.config.get_visible_devices("GPU") else "/CPU:0"

    def make(size: int):
        with tf.device(where):
            a = tf.random.normal((size, size), dtype=dtype)
            b = tf.random.normal((size, size), dtype=dtype)

        def call():
            with tf.device(where):
                return tf.linalg.matmul(a, b)

        return call

    return measure_matmul_peak(
        make, tf.test.experimental.sync_devices, dtype=dtype.name, device=device_name(), how="tf.linalg.matmul"
    )
