"""``cxrbench serve``: an HTTP scoring service for one export (FastAPI + uvicorn, onnxruntime, no framework).

The model is loaded once and shared. Decoding and inference run in worker threads bounded by a
capacity limiter (onnxruntime's ``run`` is thread-safe), never on the event loop, so ``/health``
answers while pictures are scored. Every refusal is a 4xx JSON body ``{"error": "..."}``:
411 no Content-Length, 413 too many bytes or pixels, 400 no ``file`` field or a bad query,
422 not a decodable picture (non-image, truncated, DICOM without pixel data).
No ``from __future__ import annotations`` here: FastAPI reads the endpoints' annotations at definition.
"""

import base64
import os
from typing import Any

import numpy as np

from cxrbench.cam.files import overlay_png
from cxrbench.deploy import images
from cxrbench.deploy.cli import MAX_BYTES, MAX_PIXELS
from cxrbench.deploy.model import ScoringModel, top_classes
from cxrbench.errors import CxrError
from cxrbench.suite import EvalSettings

#: Room for the multipart envelope (boundaries, part headers) around the file's own bytes.
MULTIPART_SLACK = 16 * 1024
CAM_FORMATS = ("png", "base64")


def _require_extra():
    try:
        import fastapi
        import python_multipart  # noqa: F401  (FastAPI's form parser)
        import uvicorn
    except ImportError:
        needs = "cxrbench serve needs FastAPI, uvicorn and python-multipart"
        raise CxrError(f'{needs}: pip install -e ".[serve]"') from None
    return fastapi, uvicorn


class Refused(Exception):
    """A request the service answers with a 4xx JSON error."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def score_upload(
    model: ScoringModel, data: bytes, name: str, max_pixels: int, cam_format: str | None, cam_class: str | None
) -> dict[str, Any] | bytes:
    """One picture's probabilities as JSON-able dict, or the overlay PNG bytes for ``cam=png`` (runs in a thread)."""
    try:
        pixels = model.prepare(images.decode(data, name, max_pixels))
    except images.ImageError as exc:
        raise Refused(413 if isinstance(exc, images.TooManyPixels) else 422, str(exc)) from None
    scores = model.score(pixels[None], None if cam_format is None else list(range(len(model.classes))))
    probabilities = scores.probabilities[0]
    answer: dict[str, Any] = {"file": name, "probabilities": dict(zip(model.classes, map(float, probabilities)))}
    if cam_format is None:
        return answer
    chosen = model.classes.index(cam_class) if cam_class else top_classes(probabilities, 1)[0]
    png, boxes = overlay_png(pixels, scores.maps[0, chosen], EvalSettings.cam_method, EvalSettings.cam_threshold)
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


async def _read_upload(request, max_bytes: int) -> tuple[bytes, str]:
    """The ``file`` part of a multipart request, refusing oversized bodies before parsing them."""
    length = request.headers.get("content-length")
    if length is None or not length.isdigit():
        raise Refused(411, "the request needs a Content-Length header")
    if int(length) > max_bytes + MULTIPART_SLACK:
        raise Refused(413, f"request of {length} bytes is more than the limit of {max_bytes} (--max-bytes)")
    try:
        form = await request.form(max_files=1, max_fields=8)
    except Exception as exc:  # starlette's multipart errors (and a non-multipart body)
        raise Refused(400, f"not a multipart/form-data upload ({exc})") from None
    upload = form.get("file")
    if upload is None or isinstance(upload, str):
        raise Refused(400, "no picture: send it as the multipart field 'file'")
    data = await upload.read()
    if len(data) > max_bytes:
        raise Refused(413, f"{upload.filename}: {len(data)} bytes is more than the limit of {max_bytes} (--max-bytes)")
    return data, upload.filename or "upload"


def create_app(
    model: ScoringModel, max_bytes: int = MAX_BYTES, max_pixels: int = MAX_PIXELS, workers: int | None = None
):
    """The ASGI application around one loaded model; ``workers`` bounds concurrent decoding + inference."""
    fastapi, _ = _require_extra()
    import anyio
    from fastapi.responses import JSONResponse, Response

    app = fastapi.FastAPI(title="cxrbench", description="Chest X-ray scoring with a cxrbench ONNX export")
    limiter = anyio.CapacityLimiter(workers or os.cpu_count() or 1)

    @app.exception_handler(Refused)
    async def refused(request, exc: Refused):
        return JSONResponse({"error": str(exc)}, status_code=exc.status)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/model")
    async def describe() -> dict[str, Any]:
        return model.describe()

    @app.post("/predict")
    async def predict(
        request: fastapi.Request, cam: str | None = None, cls: str | None = fastapi.Query(None, alias="class")
    ):
        _check_query(model, cam, cls)
        data, name = await _read_upload(request, max_bytes)
        answer = await anyio.to_thread.run_sync(score_upload, model, data, name, max_pixels, cam, cls, limiter=limiter)
        return Response(answer, media_type="image/png") if isinstance(answer, bytes) else answer

    return app


def run(args) -> int:
    """The ``serve`` command: load the model once, then serve until interrupted."""
    from cxrbench.deploy.model import load_model

    _, uvicorn = _require_extra()
    if args.max_bytes < 1 or args.max_pixels < 1:
        raise CxrError(f"--max-bytes and --max-pixels must be at least 1, got {args.max_bytes} and {args.max_pixels}")
    model = load_model(args)
    app = create_app(model, args.max_bytes, args.max_pixels, args.workers)
    model.score(np.zeros((1, model.size, model.size), dtype=np.uint8))  # warm up before the first request
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
