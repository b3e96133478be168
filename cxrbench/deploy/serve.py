"""``cxrbench serve``: an HTTP scoring service for one export (FastAPI + uvicorn, onnxruntime, no framework).

A request to ``/predict`` is admitted only while fewer than ``max_queue`` are in progress (otherwise 503 with
``Retry-After``, before its body is read), so memory stays bounded under any load. Its upload is decoded in a
bounded pool of threads, then its picture joins the dynamic batcher (:mod:`cxrbench.deploy.batching`), whose one
inference thread scores the pictures of concurrent requests together; the event loop only waits, so ``/health``
and ``/ready`` answer while pictures are scored. Bearer tokens guard every path but ``/health``
(:mod:`cxrbench.deploy.auth`); ``/metrics`` and the per-request log line are :mod:`cxrbench.deploy.telemetry`.
Every refusal is a JSON body ``{"error": "..."}``: 401 no or a wrong token, 411 no Content-Length, 413 too many
bytes or pixels, 400 no ``file`` field or a bad query, 422 not a decodable picture (non-image, truncated, DICOM
without pixel data), 503 the queue is full.
No ``from __future__ import annotations`` here: FastAPI reads the endpoints' annotations at definition.
"""

import asyncio
import base64
import contextlib
import dataclasses
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cxrbench.cam.files import overlay_png
from cxrbench.deploy import images
from cxrbench.deploy.auth import BearerAuth, Tokens, check_exposure, is_loopback, load_tokens
from cxrbench.deploy.batching import Batcher, QueueFull, Scored, Stopped
from cxrbench.deploy.limits import MAX_BATCH, MAX_BATCH_DELAY_MS, MAX_BYTES, MAX_PIXELS, MAX_QUEUE
from cxrbench.deploy.model import ScoringModel, sigmoid, top_classes
from cxrbench.deploy.telemetry import AccessLog, ServiceMetrics, configure_logging, log_event
from cxrbench.errors import CxrError, first_line
from cxrbench.machine.budget import usable_cores
from cxrbench.suite import EvalSettings

#: Room for the multipart envelope (boundaries, part headers) around the file's own bytes.
MULTIPART_SLACK = 16 * 1024
CAM_FORMATS = ("png", "base64")


@dataclass(frozen=True)
class ServiceSettings:
    """The service's limits and batching knobs (the ``serve`` command's options)."""

    max_bytes: int = MAX_BYTES
    max_pixels: int = MAX_PIXELS
    workers: int | None = None  #: decoding threads (default: the usable cores)
    max_batch: int = MAX_BATCH
    max_batch_delay_ms: float = MAX_BATCH_DELAY_MS
    max_queue: int = MAX_QUEUE

    def check(self) -> None:
        for name in ("max_bytes", "max_pixels", "max_batch", "max_queue"):
            if getattr(self, name) < 1:
                raise CxrError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.workers is not None and self.workers < 1:
            raise CxrError(f"--workers must be at least 1, got {self.workers}")
        if self.max_batch_delay_ms < 0:
            raise CxrError(f"--max-batch-delay-ms must be at least 0, got {self.max_batch_delay_ms}")


def _require_extra():
    try:
        import fastapi
        import prometheus_client  # noqa: F401  (/metrics)
        import python_multipart  # noqa: F401  (FastAPI's form parser)
        import uvicorn
    except ImportError:
        needs = "cxrbench serve needs FastAPI, uvicorn, python-multipart and prometheus-client"
        raise CxrError(f'{needs}: pip install -e ".[serve]"') from None
    return fastapi, uvicorn


class Refused(Exception):
    """A request the service answers with an error status and a JSON body."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.headers = status, headers


def preprocess(model: ScoringModel, data: bytes, name: str, max_pixels: int) -> tuple[np.ndarray, tuple[int, int]]:
    """An upload's bytes -> the model-sized ``uint8`` gray picture scoring takes (the one preprocessing path of the
    service, the same as ``cxrbench predict``'s), and the decoded picture's ``(height, width)``."""
    try:
        gray = images.decode(data, name, max_pixels)
    except images.ImageError as exc:
        raise Refused(413 if isinstance(exc, images.TooManyPixels) else 422, str(exc)) from None
    return model.prepare(gray), gray.shape


def answer_for(
    model: ScoringModel, name: str, pixels: np.ndarray, scored: Scored, cam_format: str | None, cam_class: str | None
) -> dict[str, Any] | bytes:
    """One picture's probabilities as a JSON-able dict, with its CAM overlay for ``cam=base64``, or the overlay's
    PNG bytes for ``cam=png`` (drawing the overlay runs in a thread)."""
    probabilities = sigmoid(scored.logits)
    answer: dict[str, Any] = {"file": name, "probabilities": dict(zip(model.classes, map(float, probabilities)))}
    if cam_format is None:
        return answer
    chosen = model.classes.index(cam_class) if cam_class else top_classes(probabilities, 1)[0]
    png, boxes = overlay_png(pixels, scored.maps[chosen], EvalSettings.cam_method, EvalSettings.cam_threshold)
    if cam_format == "png":
        return png
    answer["cam"] = {"class": model.classes[chosen], "boxes": boxes, "png_base64": base64.b64encode(png).decode()}
    return answer


def _check_query(model: ScoringModel, cam_format: str | None, cam_class: str | None) -> None:
    if cam_format is not None and cam_format not in CAM_FORMATS:
        raise Refused(400, f"cam={cam_format!r}: must be one of {', '.join(CAM_FORMATS)}")
    if cam_class is not None and cam_class not in model.classes:
        raise Refused(400, f"class={cam_class!r}: not one of the model's classes ({', '.join(model.classes)})")
    if cam_format is not None and not model.has_cam:
        raise Refused(400, "this export has no CAM output (exported by an older cxrbench)")


@contextlib.asynccontextmanager
async def _upload_part(request, max_bytes: int):
    """The ``file`` part of a multipart request (spooled by the parser, not yet read into memory), refusing
    oversized bodies before parsing them; its temporary file is closed on exit."""
    length = request.headers.get("content-length")
    if length is None or not length.isdigit():
        raise Refused(411, "the request needs a Content-Length header")
    if int(length) > max_bytes + MULTIPART_SLACK:
        raise Refused(413, f"request of {length} bytes is more than the limit of {max_bytes} (--max-bytes)")
    try:
        form = await request.form(max_files=1, max_fields=8)
    except Exception as exc:  # starlette's multipart errors (and a non-multipart body)
        raise Refused(400, f"not a multipart/form-data upload ({first_line(exc)})") from None
    try:
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise Refused(400, "no picture: send it as the multipart field 'file'")
        name = upload.filename or "upload"
        if upload.size is not None and upload.size > max_bytes:
            raise Refused(413, f"{name}: {upload.size} bytes is more than the limit of {max_bytes} (--max-bytes)")
        yield upload, name
    finally:
        await form.close()


class Admission:
    """``/predict`` requests in progress (reading, decoding, waiting for a batch, scored): at most ``limit``; of
    them ``preparing`` are not yet with the batcher. Changed only on the event loop, so plain counters are exact
    (the inference thread only reads ``preparing``)."""

    def __init__(self, limit: int, retry_after_s):
        self.limit, self.in_flight, self.preparing, self._retry_after_s = limit, 0, 0, retry_after_s

    @property
    def full(self) -> bool:
        return self.in_flight >= self.limit

    @contextlib.contextmanager
    def admit(self):
        """One request in progress, or :class:`Refused` 503 with ``Retry-After`` when ``limit`` are."""
        if self.full:
            retry = self._retry_after_s(self.in_flight)
            message = f"busy: {self.in_flight} requests in progress (--max-queue {self.limit}); retry in {retry} s"
            raise Refused(503, message, {"Retry-After": str(retry)})
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1

    @contextlib.contextmanager
    def on_the_way(self):
        """An admitted request reading and decoding its upload: the batcher may wait for its picture."""
        self.preparing += 1
        try:
            yield
        finally:
            self.preparing -= 1


def create_app(model: ScoringModel, settings: ServiceSettings | None = None, tokens: Tokens | None = None):
    """The ASGI application around one loaded model. Without tokens it answers anyone (the ``serve`` command
    allows that on a loopback address only)."""
    settings = settings or ServiceSettings()
    tokens = tokens or Tokens()
    settings.check()
    fastapi, _ = _require_extra()
    import anyio
    from fastapi.responses import JSONResponse, Response

    metrics = ServiceMetrics(settings.max_batch)
    admission = Admission(settings.max_queue, lambda waiting: batcher.retry_after_s(waiting))
    batcher = Batcher(
        model,
        settings.max_batch,
        settings.max_batch_delay_ms / 1000,
        settings.max_queue,
        observe=metrics.observe_batch,
        arriving=lambda: admission.preparing,
    )
    metrics.watch(lambda: admission.in_flight, settings.max_queue, lambda: batcher.depth)
    limiter = anyio.CapacityLimiter(settings.workers or usable_cores())

    @contextlib.asynccontextmanager
    async def lifespan(app):
        batcher.start()
        try:
            yield
        finally:
            await anyio.to_thread.run_sync(batcher.stop)

    app = fastapi.FastAPI(
        title="cxrbench", description="Chest X-ray scoring with a cxrbench ONNX export", lifespan=lifespan
    )

    @app.exception_handler(Refused)
    async def refused(request, exc: Refused):
        return JSONResponse({"error": str(exc)}, status_code=exc.status, headers=exc.headers)

    @app.get("/health")
    async def health() -> dict[str, str]:
        """Liveness: the process answers (no token needed)."""
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        """Readiness: the model is loaded, its inference thread runs and the queue has room."""
        status = "stopped" if not batcher.running else "full" if admission.full else "ready"
        body = {"status": status, "queue_depth": admission.in_flight, "queue_capacity": admission.limit}
        return JSONResponse(body, status_code=200 if status == "ready" else 503)

    @app.get("/model")
    async def describe() -> dict[str, Any]:
        return model.describe()

    @app.get("/metrics")
    async def exposition():
        content, content_type = metrics.exposition()
        return Response(content, media_type=content_type)

    @app.post("/predict")
    async def predict(
        request: fastapi.Request, cam: str | None = None, cls: str | None = fastapi.Query(None, alias="class")
    ):
        _check_query(model, cam, cls)
        with admission.admit():
            with admission.on_the_way():
                async with _upload_part(request, settings.max_bytes) as (upload, name):
                    pixels, shape = await anyio.to_thread.run_sync(_read_and_preprocess, upload, name, limiter=limiter)
            request.state.image = {"height": shape[0], "width": shape[1]}
            try:  # no longer "on the way" first: the batcher never waits for a picture already queued
                pending = batcher.submit(pixels, cam is not None)
            except (QueueFull, Stopped) as exc:
                raise Refused(503, f"not scored: {exc}", {"Retry-After": str(batcher.retry_after_s(1))}) from None
            scored = await asyncio.wrap_future(pending)
            request.state.batch = scored.batch_size
            if cam is None:
                return answer_for(model, name, pixels, scored, None, None)
            answer = await anyio.to_thread.run_sync(answer_for, model, name, pixels, scored, cam, cls, limiter=limiter)
        return Response(answer, media_type="image/png") if isinstance(answer, bytes) else answer

    def _read_and_preprocess(upload, name: str) -> tuple[np.ndarray, tuple[int, int]]:
        """In a decoding thread: the upload's bytes are in memory only here, at most ``workers`` at once."""
        upload.file.seek(0)
        data = upload.file.read(settings.max_bytes + 1)
        if len(data) > settings.max_bytes:
            raise Refused(413, f"{name}: more than the limit of {settings.max_bytes} bytes (--max-bytes)")
        return preprocess(model, data, name, settings.max_pixels)

    endpoints = {route.path for route in app.routes}
    app.add_middleware(BearerAuth, tokens=tokens)
    app.add_middleware(AccessLog, metrics=metrics, endpoints=endpoints)  # outermost: sees and logs the 401s too
    return app


def check_tls(certfile: str | None, keyfile: str | None) -> bool:
    """Whether TLS is on; a missing half, an unreadable file or a key that does not fit is one line."""
    if certfile is None and keyfile is None:
        return False
    if certfile is None or keyfile is None:
        raise CxrError("--ssl-certfile and --ssl-keyfile go together: give both")
    for path in (certfile, keyfile):
        if not Path(path).is_file():
            raise CxrError(f"{path}: no such file")
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(certfile, keyfile)
    except (ssl.SSLError, OSError) as exc:
        raise CxrError(f"{certfile}, {keyfile}: not a usable certificate and key ({first_line(exc)})") from None
    return True


def run(args) -> int:
    """The ``serve`` command: check the security settings, load the model once, then serve until interrupted."""
    from cxrbench.deploy.model import load_model

    settings = ServiceSettings(
        args.max_bytes, args.max_pixels, args.workers, args.max_batch, args.max_batch_delay_ms, args.max_queue
    )
    settings.check()
    tokens = Tokens(load_tokens(args.token_file))
    check_exposure(args.host, tokens, args.insecure_no_auth)
    tls = check_tls(args.ssl_certfile, args.ssl_keyfile)
    _, uvicorn = _require_extra()
    model = load_model(args)
    model.score(np.zeros((settings.max_batch, model.size, model.size), dtype=np.uint8))  # warm up at a full batch
    app = create_app(model, settings, tokens)
    configure_logging()
    log_event(
        "start",
        url=f"{'https' if tls else 'http'}://{f'[{args.host}]' if ':' in args.host else args.host}:{args.port}",
        model=str(model.path),
        backend=model.metadata.get("cxrbench.backend"),
        tokens=len(tokens),
        loopback_only=is_loopback(args.host),
        **dataclasses.asdict(settings),
    )
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level="warning",
        access_log=False,  # the service's own line replaces it: uvicorn's names the client and the query string
        ssl_certfile=args.ssl_certfile,
        ssl_keyfile=args.ssl_keyfile,
    )
    return 0
