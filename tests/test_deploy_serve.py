"""``cxrbench serve`` scoring: a real uvicorn server on 127.0.0.1 (a free port, in a thread), a real HTTP client
(httpx). Security, batching, backpressure, metrics and logs: test_deploy_serve_operations.py.

Probabilities are compared with onnxruntime called directly on the same pixels (atol 1e-6). The load test
asserts correctness only and prints p50/p99 latency and throughput (no timing assertion: speed numbers belong
in run outputs, and the machine running the tests may be busy).
"""

from __future__ import annotations

import base64
import io
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxrbench.data.classes import CLASSES
from helpers.deploy import (
    SIZE,
    chest_like,
    dicom_file,
    free_port,
    png_bytes,
    reference_probabilities,
    running,
    serve_command,
    tiny_export,
    wait_until,
)

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

from cxrbench.deploy.model import ScoringModel  # noqa: E402
from cxrbench.deploy.serve import ServiceSettings, create_app  # noqa: E402

MAX_BYTES = 200_000
CLIENTS, REQUESTS = 8, 10


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    return tiny_export(tmp_path_factory.mktemp("model") / "model.onnx")


@pytest.fixture(scope="module")
def server(model_path):
    settings = ServiceSettings(max_bytes=MAX_BYTES, max_pixels=4_000_000, workers=2)
    with running(create_app(ScoringModel(model_path), settings)) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server, timeout=30) as c:
        yield c


def _upload(client, content: bytes, name: str = "x.png", **params):
    return client.post("/predict", files={"file": (name, content, "application/octet-stream")}, params=params)


def test_health_and_model(client, model_path):
    assert client.get("/health").json() == {"status": "ok"}
    described = client.get("/model").json()
    assert described["input"] == {"name": "input", "size": SIZE, "layout": "NCHW"}
    assert described["outputs"] == ["logits", "features"] and described["classes"] == list(CLASSES)
    assert described["metadata"]["cxrbench.backend"] == "numpy"
    assert "cxrbench.classifier_weight" not in described["metadata"]


def test_predict_matches_onnxruntime_on_the_same_pixels(client, tmp_path, model_path):
    path = tmp_path / "a.png"
    path.write_bytes(png_bytes(chest_like(1)))
    response = _upload(client, path.read_bytes(), "a.png")
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["file"] == "a.png"
    got = np.array([answer["probabilities"][c] for c in CLASSES])
    np.testing.assert_allclose(got, reference_probabilities(model_path, [path])[0], rtol=0, atol=1e-6)


def test_cam_as_png_and_as_base64(client):
    content = png_bytes(chest_like(2))
    png = _upload(client, content, cam="png")
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    with Image.open(io.BytesIO(png.content)) as image:
        assert image.format == "PNG" and min(image.size) >= SIZE
    answer = _upload(client, content, cam="base64", **{"class": "Mass"}).json()
    assert answer["cam"]["class"] == "Mass" and answer["cam"]["boxes"]
    with Image.open(io.BytesIO(base64.b64decode(answer["cam"]["png_base64"]))) as image:
        assert image.format == "PNG"
    top = _upload(client, content, cam="base64").json()
    assert top["cam"]["class"] == max(CLASSES, key=lambda c: top["probabilities"][c])


@pytest.mark.parametrize(
    ("make", "status", "message"),
    [
        (lambda c: _upload(c, b"plain text, not a picture"), 422, "x.png: not a PNG, JPEG or DICOM picture"),
        (lambda c: _upload(c, png_bytes(chest_like(0))[:300]), 422, "x.png: unreadable image"),
        (lambda c: _upload(c, png_bytes(np.zeros((2100, 2100), np.uint8))), 413, "2100 x 2100 pixels is more than"),
        (lambda c: _upload(c, b"\0" * (MAX_BYTES + 20_000)), 413, f"is more than the limit of {MAX_BYTES}"),
        (lambda c: c.post("/predict", files={"other": ("x.png", b"abc")}), 400, "no picture: send it as"),
        (lambda c: c.post("/predict", content=b"raw", headers={"content-type": "image/png"}), 400, "no picture"),
        (lambda c: _upload(c, png_bytes(chest_like(0)), cam="jpeg"), 400, "cam='jpeg': must be one of png, base64"),
        (lambda c: _upload(c, png_bytes(chest_like(0)), cam="png", **{"class": "Flu"}), 400, "class='Flu': not one"),
    ],
    ids=[
        "non-image",
        "truncated",
        "huge-dimensions",
        "too-many-bytes",
        "no-file-field",
        "not-multipart",
        "bad-cam",
        "bad-class",
    ],
)
def test_bad_uploads_get_4xx_json_and_the_server_keeps_serving(client, make, status, message):
    response = make(client)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]
    assert _upload(client, png_bytes(chest_like(3))).status_code == 200


def test_dicom_uploads_are_scored_and_one_without_pixels_is_refused(client, tmp_path):
    pytest.importorskip("pydicom")
    good = dicom_file(tmp_path / "a.dcm", chest_like(4)).read_bytes()
    assert set(_upload(client, good, "a.dcm").json()["probabilities"]) == set(CLASSES)
    empty = _upload(client, dicom_file(tmp_path / "b.dcm", chest_like(4), pixel_data=False).read_bytes(), "b.dcm")
    assert empty.status_code == 422
    assert empty.json() == {"error": "b.dcm: DICOM without pixel data (no PixelData element)"}


class BlockingModel(ScoringModel):
    """Scoring waits until the test lets it go: a request in flight for as long as the test wants."""

    def __init__(self, path: Path):
        super().__init__(path)
        self.entered, self.release = threading.Event(), threading.Event()

    def score(self, images, cam_classes=None):
        self.entered.set()
        assert self.release.wait(timeout=60)
        return super().score(images, cam_classes)


def test_inference_never_blocks_the_event_loop(model_path):
    """While a picture is being scored, /health and /model still answer (inference runs in a worker thread)."""
    model = BlockingModel(model_path)
    with (
        running(create_app(model, ServiceSettings(workers=1))) as url,
        httpx.Client(base_url=url, timeout=10) as client,
    ):
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(_upload, client, png_bytes(chest_like(5)))
            assert model.entered.wait(timeout=30)
            assert client.get("/health").json() == {"status": "ok"}
            assert client.get("/model").status_code == 200
            assert not pending.done()
            model.release.set()
            assert pending.result().status_code == 200


def test_bounded_load_has_no_error(client, server, capsys):
    """CLIENTS concurrent clients x REQUESTS each; every answer right; latency and throughput printed."""
    pictures = [png_bytes(chest_like(10 + k)) for k in range(CLIENTS)]
    expected = [_upload(client, p).json()["probabilities"] for p in pictures]

    def one_client(k: int) -> list[float]:
        latencies = []
        with httpx.Client(base_url=server, timeout=60) as own:
            for _ in range(REQUESTS):
                start = time.perf_counter()
                response = _upload(own, pictures[k])
                latencies.append(time.perf_counter() - start)
                assert response.status_code == 200, response.text
                got = response.json()["probabilities"]  # scored in batches of any composition: equal to rounding
                np.testing.assert_allclose([got[c] for c in CLASSES], [expected[k][c] for c in CLASSES], atol=1e-6)
        return latencies

    start = time.perf_counter()
    with ThreadPoolExecutor(CLIENTS) as pool:
        latencies = np.concatenate(list(pool.map(one_client, range(CLIENTS)))) * 1000
    elapsed = time.perf_counter() - start
    with capsys.disabled():
        print(
            f"\nserve load: {CLIENTS} clients x {REQUESTS} requests ({SIZE} px densenet-tiny): "
            f"p50 {np.percentile(latencies, 50):.1f} ms, p99 {np.percentile(latencies, 99):.1f} ms, "
            f"{len(latencies) / elapsed:.1f} req/s"
        )
    assert len(latencies) == CLIENTS * REQUESTS


def test_serve_command_starts_and_answers(model_path, tmp_path):
    """The CLI itself, in a subprocess: the model loads once and /health answers on the port asked for."""
    port = free_port()
    with serve_command([str(model_path), "--port", str(port)], tmp_path / "serve.log") as process:
        answer = wait_until(lambda: httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).json())
        assert answer == {"status": "ok"}, (process.poll(), (tmp_path / "serve.log").read_text())


def test_serve_without_metadata_is_one_line(tmp_path):
    plain = tmp_path / "plain.onnx"
    plain.write_bytes(b"not onnx")
    result = subprocess.run(
        [sys.executable, "-m", "cxrbench", "serve", str(plain)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 2
    assert result.stderr.strip().startswith(f"cxrbench: error: {plain}: not a loadable ONNX model")
    assert len(result.stderr.strip().splitlines()) == 1
