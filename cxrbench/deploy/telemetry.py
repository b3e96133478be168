"""What an operator of ``cxrbench serve`` sees: Prometheus metrics and one structured log line per request.

The log line (JSON, logger ``cxrbench.serve``) carries the time, a request id (also sent back as
``X-Request-ID``), the method, the endpoint, the status, the latency, the upload's size in bytes, the decoded
picture's height and width and the size of the batch it was scored in. Nothing a client chose goes into it: no
file name, no query string, no path outside the service's own endpoints (those count as ``other``), no DICOM
tag, no pixel, no header (so never a token). Unexpected errors are logged by type and place, not by message
(messages can quote file names).
"""

from __future__ import annotations

import json
import logging
import sys
import time
import traceback
import uuid
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

LOGGER_NAME = "cxrbench.serve"
#: Request latency buckets (seconds): a 64 px model answers in milliseconds, DenseNet-121 on 2 cores in seconds.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
INFERENCE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
#: What endpoints outside the application's routes are counted and logged as.
OTHER_ENDPOINT = "other"
#: Keys the request handlers may leave in the request's state for the log line.
STATE_FIELDS = ("image", "batch")


def batch_buckets(max_batch: int) -> tuple[float, ...]:
    """Powers of two up to ``max_batch``, and ``max_batch`` itself (histogram upper bounds)."""
    bounds = {max_batch}
    size = 1
    while size < max_batch:
        bounds.add(size)
        size *= 2
    return tuple(float(b) for b in sorted(bounds))


class ServiceMetrics:
    """The service's Prometheus metrics, in a registry of their own (one per application)."""

    def __init__(self, max_batch: int):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        known = {"registry": self.registry}
        self.requests = Counter(
            "cxrbench_requests", "HTTP requests answered, by endpoint and status code", ["endpoint", "status"], **known
        )
        self.latency = Histogram(
            "cxrbench_request_duration_seconds",
            "Seconds from a request's arrival to its answer, by endpoint",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            **known,
        )
        self.batch_size = Histogram(
            "cxrbench_batch_size", "Pictures scored per onnxruntime call", buckets=batch_buckets(max_batch), **known
        )
        self.inference = Histogram(
            "cxrbench_inference_duration_seconds", "Seconds per onnxruntime call", buckets=INFERENCE_BUCKETS, **known
        )
        self.images = Counter("cxrbench_images_scored", "Pictures scored", **known)
        self.queue_depth = Gauge("cxrbench_queue_depth", "Scoring requests admitted and not yet answered", **known)
        self.queue_capacity = Gauge(
            "cxrbench_queue_capacity", "Scoring requests admitted at most (--max-queue); more get 503", **known
        )
        self.batch_queue = Gauge(
            "cxrbench_batch_queue_depth", "Decoded pictures waiting for the inference thread", **known
        )

    def watch(self, queue_depth: Callable[[], float], capacity: int, batch_queue: Callable[[], float]) -> None:
        """Read the gauges from the live objects at each scrape."""
        self.queue_depth.set_function(queue_depth)
        self.queue_capacity.set(capacity)
        self.batch_queue.set_function(batch_queue)

    def observe_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.inference.observe(seconds)
        self.images.inc(size)

    def exposition(self) -> tuple[bytes, str]:
        """The Prometheus text format and its content type."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def configure_logging(stream=None) -> logging.Logger:
    """The service's logger writes its JSON lines, one per record, to ``stream`` (stderr)."""
    logger = logging.getLogger(LOGGER_NAME)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return logger


def log_event(event: str, **fields: Any) -> None:
    """One JSON line: the UTC time, the event, the fields."""
    line = {"time": datetime.now(UTC).isoformat(timespec="milliseconds"), "event": event, **fields}
    logging.getLogger(LOGGER_NAME).info(json.dumps(line, separators=(",", ":")))


class AccessLog:
    """ASGI middleware (outermost of the service's own): a request id, the metrics, one log line per request, and
    a 500 JSON answer naming the request id when the application fails unexpectedly."""

    def __init__(self, app, metrics: ServiceMetrics, endpoints: Iterable[str]):
        self.app, self.metrics, self.endpoints = app, metrics, frozenset(endpoints)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        request_id = uuid.uuid4().hex
        endpoint = scope["path"] if scope["path"] in self.endpoints else OTHER_ENDPOINT
        state = scope.setdefault("state", {})
        status: list[int] = []
        error: dict[str, str] = {}

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                status.append(message["status"])
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", request_id.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception as exc:  # a bug or an onnxruntime failure: logged by type and place, answered 500
            error = {"error": type(exc).__name__, "where": _where(exc)}
            if not status:
                from starlette.responses import JSONResponse

                answer = JSONResponse({"error": f"internal error (request {request_id})"}, status_code=500)
                await answer(scope, receive, send_with_id)
        code = status[0] if status else 500
        seconds = time.perf_counter() - start
        self.metrics.requests.labels(endpoint, str(code)).inc()
        self.metrics.latency.labels(endpoint).observe(seconds)
        log_event(
            "request",
            request_id=request_id,
            method=scope["method"],
            endpoint=endpoint,
            status=code,
            latency_ms=round(seconds * 1000, 2),
            upload_bytes=_content_length(scope),
            **{key: state[key] for key in STATE_FIELDS if key in state},
            **error,
        )


def _content_length(scope) -> int | None:
    value = dict(scope["headers"]).get(b"content-length", b"")
    return int(value) if value.isdigit() else None


def _where(exc: BaseException) -> str:
    """The innermost frame of an exception as ``file.py:line``."""
    frames = traceback.extract_tb(exc.__traceback__)
    return f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "?"
