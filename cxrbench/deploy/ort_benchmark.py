"""onnxruntime latency and throughput of exported models, every model under identical SessionOptions.

Warm-up runs are excluded from the timings; inputs are seeded noise in the model's own layout
(timing does not depend on pixel values). Thread counts and the graph optimisation level are fixed
and recorded, since they change the numbers more than the model does.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from cxrbench.deploy.onnx_file import normalise, session


def session_options_dict(sess) -> dict[str, Any]:
    options = sess.get_session_options()
    return {
        "intra_op_num_threads": options.intra_op_num_threads,
        "inter_op_num_threads": options.inter_op_num_threads,
        "graph_optimization_level": str(options.graph_optimization_level).rsplit(".", 1)[-1],
        "execution_mode": str(options.execution_mode).rsplit(".", 1)[-1],
        "providers": sess.get_providers(),
    }


def _timed_runs(sess, feed: dict[str, np.ndarray], warmup: int, runs: int) -> np.ndarray:
    for _ in range(warmup):
        sess.run(None, feed)
    times = np.empty(runs)
    for i in range(runs):
        start = time.perf_counter()
        sess.run(None, feed)
        times[i] = time.perf_counter() - start
    return times


def benchmark(
    path: str | Path,
    layout: str,
    image_size: int,
    threads: int,
    *,
    warmup: int = 3,
    runs_b1: int = 20,
    runs_b32: int = 5,
    seed: int = 0,
) -> dict[str, Any]:
    """Latency p50/p95 at batch 1 and throughput at batch 32 of one ONNX model on the CPU."""
    sess = session(path, threads)
    name = sess.get_inputs()[0].name
    rng = np.random.default_rng(seed)
    one = normalise(rng.integers(0, 256, (1, image_size, image_size), dtype=np.uint8), layout)
    many = normalise(rng.integers(0, 256, (32, image_size, image_size), dtype=np.uint8), layout)
    latency = _timed_runs(sess, {name: one}, warmup, runs_b1) * 1000.0
    batch_times = _timed_runs(sess, {name: many}, warmup, runs_b32)
    return {
        "latency_ms_b1": {"p50": float(np.percentile(latency, 50)), "p95": float(np.percentile(latency, 95))},
        "throughput_b32_images_per_s": float(32 * runs_b32 / batch_times.sum()),
        "session_options": session_options_dict(sess),
        "warmup_runs": warmup,
        "runs": {"b1": runs_b1, "b32": runs_b32},
    }
