"""``cxrbench serve`` as a hospital network would run it: tokens, TLS, batching under concurrency, backpressure,
metrics and logs without patient data. Real servers on 127.0.0.1 (uvicorn in a thread, or the ``serve`` command
in a subprocess), real HTTP clients; every wait is bounded.
"""

from __future__ import annotations

import json
import logging
import os
import re
import ssl
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from cxrbench.data.classes import CLASSES
from cxrbench.errors import CxrError
from helpers.deploy import (
    chest_like,
    dicom_file,
    free_port,
    png_bytes,
    reference_probabilities,
    running,
    self_signed_certificate,
    serve_command,
    tiny_export,
    wait_until,
)

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")
parser = pytest.importorskip("prometheus_client.parser")

from cxrbench.deploy import auth  # noqa: E402
from cxrbench.deploy.auth import TOKEN_ENV, Tokens, check_exposure, load_tokens  # noqa: E402
from cxrbench.deploy.model import ScoringModel  # noqa: E402
from cxrbench.deploy.serve import ServiceSettings, check_tls, create_app  # noqa: E402
from cxrbench.deploy.telemetry import LOGGER_NAME  # noqa: E402

OLD_TOKEN, NEW_TOKEN = "old-token-0123456789abcdef", "new-token-fedcba9876543210"
PATIENT = {"PatientName": "Zyxwvut^Recognisable", "PatientID": "PID-31415926", "PatientBirthDate": "19010203"}
UPLOAD_NAME = "upload-name-q8w7e6.dcm"
#: What the per-request log line of a scored picture holds: nothing else.
REQUEST_LOG_FIELDS = "time event request_id method endpoint status latency_ms upload_bytes image batch".split()


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    return tiny_export(tmp_path_factory.mktemp("model") / "model.onnx")


def _upload(client, content: bytes, name: str = "x.png", headers=None, **params):
    files = {"file": (name, content, "application/octet-stream")}
    return client.post("/predict", files=files, params=params, headers=headers)


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _metrics(client, token: str = NEW_TOKEN) -> dict[str, dict]:
    """/metrics parsed by prometheus_client's own parser: family name -> {(sample name, labels): value}."""
    response = client.get("/metrics", headers=_bearer(token))
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {
        family.name: {(s.name, tuple(sorted(s.labels.items()))): s.value for s in family.samples}
        for family in parser.text_string_to_metric_families(response.text)
    }


def _value(metrics: dict, family: str, sample: str | None = None, **labels) -> float:
    return metrics[family].get((sample or family, tuple(sorted(labels.items()))), 0.0)


class HeldModel(ScoringModel):
    """The first onnxruntime call waits until the test releases it; every call's batch size is recorded."""

    def __init__(self, path: Path):
        super().__init__(path)
        self.calls: list[int] = []
        self.entered, self.release = threading.Event(), threading.Event()

    def score(self, images, cam_classes=None):
        self.calls.append(len(images))
        if len(self.calls) == 1:
            self.entered.set()
            assert self.release.wait(timeout=60)
        return super().score(images, cam_classes)


# ---- tokens -------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def guarded(model_path):
    """A service with two accepted tokens (the old one and its replacement, as during a rotation)."""
    app = create_app(ScoringModel(model_path), ServiceSettings(workers=2), Tokens([OLD_TOKEN, NEW_TOKEN]))
    with running(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        yield client


MISSING = "missing bearer token: send the header 'Authorization: Bearer <token>'"
GUARDED_PATHS = ["/model", "/ready", "/metrics", "/docs", "/openapi.json", "/no-such-path", "/predict"]


@pytest.mark.parametrize("path", GUARDED_PATHS)
def test_every_path_but_health_needs_an_accepted_token(guarded, path):
    method = "POST" if path == "/predict" else "GET"
    for headers, message in [
        ({}, MISSING),
        ({"Authorization": f"Basic {NEW_TOKEN}"}, MISSING),
        (_bearer("wrong-token-0123456789abcdef"), "invalid token"),
        (_bearer(NEW_TOKEN[:-1]), "invalid token"),
    ]:
        response = guarded.request(method, path, headers=headers)
        assert response.status_code == 401, (headers, response.text)
        assert response.json() == {"error": message}
        assert response.headers["www-authenticate"].startswith('Bearer realm="cxrbench"')
        assert NEW_TOKEN not in response.text
    assert guarded.get("/health").json() == {"status": "ok"}


def test_both_tokens_of_a_rotation_are_accepted_and_a_refused_upload_is_never_scored(guarded):
    picture = png_bytes(chest_like(1))
    before = _value(_metrics(guarded), "cxrbench_images_scored", "cxrbench_images_scored_total")
    for _ in range(3):
        assert _upload(guarded, picture).status_code == 401
        assert _upload(guarded, picture, headers=_bearer("x" * 20)).status_code == 401
    assert _value(_metrics(guarded), "cxrbench_images_scored", "cxrbench_images_scored_total") == before
    for token in (OLD_TOKEN, NEW_TOKEN):
        response = _upload(guarded, picture, headers=_bearer(token))
        assert response.status_code == 200, response.text
        assert set(response.json()["probabilities"]) == set(CLASSES)
    assert _value(_metrics(guarded), "cxrbench_images_scored", "cxrbench_images_scored_total") == before + 2


def test_bad_input_keeps_its_4xx_behind_the_token(guarded):
    response = _upload(guarded, b"plain text", headers=_bearer(NEW_TOKEN))
    assert response.status_code == 422
    assert response.json() == {"error": "x.png: not a PNG, JPEG or DICOM picture"}
    assert _upload(guarded, png_bytes(chest_like(2)), headers=_bearer(NEW_TOKEN), cam="gif").status_code == 400


def test_tokens_come_from_a_file_or_the_environment_never_both(tmp_path):
    path = tmp_path / "tokens"
    path.write_text(f"\n  {OLD_TOKEN}  \n\n{NEW_TOKEN}\n")
    assert load_tokens(path, environ={}) == [OLD_TOKEN, NEW_TOKEN]
    assert load_tokens(None, environ={TOKEN_ENV: NEW_TOKEN}) == [NEW_TOKEN]
    assert load_tokens(None, environ={}) == []
    with pytest.raises(CxrError, match="tokens given twice"):
        load_tokens(path, environ={TOKEN_ENV: NEW_TOKEN})
    bad = {
        "\n\n": "no token in it",
        "short\n": "token 1 is shorter than 16",
        f"{OLD_TOKEN}\nwith space inside it!!\n": "token 2 has characters other than printable ASCII",
    }
    for text, message in bad.items():
        path.write_text(text)
        with pytest.raises(CxrError, match=message) as caught:
            load_tokens(path, environ={})
        assert OLD_TOKEN not in str(caught.value) and "short" not in str(caught.value).replace("shorter", "")
    with pytest.raises(CxrError, match="cannot read the token file"):
        load_tokens(tmp_path / "missing", environ={})
    tokens = Tokens([OLD_TOKEN, NEW_TOKEN])
    assert tokens.accepts(OLD_TOKEN) and tokens.accepts(NEW_TOKEN)
    assert not tokens.accepts(OLD_TOKEN + "x") and not tokens.accepts("") and not tokens.accepts(OLD_TOKEN.upper())


def test_a_token_is_compared_with_every_accepted_one_in_constant_time(monkeypatch):
    """hmac.compare_digest on equal-length digests, for every accepted token, even after a match."""
    compared: list[tuple[int, int]] = []
    real = auth.hmac.compare_digest

    def counting(a, b):
        compared.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", counting)
    tokens = Tokens([OLD_TOKEN, NEW_TOKEN, "third-token-0123456789"])
    assert tokens.accepts(OLD_TOKEN)  # the first one matches ...
    assert compared == [(32, 32)] * 3  # ... and all three were compared, as SHA-256 digests


def test_a_network_address_without_a_token_is_refused_unless_insecure_is_said():
    open_to_all = Tokens()
    for host in ("127.0.0.1", "::1", "localhost"):
        check_exposure(host, open_to_all, insecure_no_auth=False)
    for host in ("0.0.0.0", "::", "192.0.2.1"):
        with pytest.raises(CxrError, match=f"--host {host} lets other machines in and no token is set"):
            check_exposure(host, open_to_all, insecure_no_auth=False)
        check_exposure(host, open_to_all, insecure_no_auth=True)
        check_exposure(host, Tokens([NEW_TOKEN]), insecure_no_auth=False)
    with pytest.raises(CxrError, match="contradict"):
        check_exposure("0.0.0.0", Tokens([NEW_TOKEN]), insecure_no_auth=True)


def test_the_serve_command_refuses_an_open_network_address_in_one_line(model_path):
    result = subprocess.run(
        [sys.executable, "-m", "cxrbench", "serve", str(model_path), "--host", "0.0.0.0", "--port", str(free_port())],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={k: v for k, v in os.environ.items() if k != TOKEN_ENV},
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cxrbench: error: --host 0.0.0.0 lets other machines in"), lines
    assert "--insecure-no-auth" in lines[0]


def test_tls_and_batching_options_are_checked_before_the_model_loads(tmp_path):
    cert, key = self_signed_certificate(tmp_path)
    assert check_tls(None, None) is False and check_tls(str(cert), str(key)) is True
    with pytest.raises(CxrError, match="--ssl-certfile and --ssl-keyfile go together"):
        check_tls(str(cert), None)
    with pytest.raises(CxrError, match="missing.pem: no such file"):
        check_tls(str(cert), str(tmp_path / "missing.pem"))
    other = tmp_path / "other"
    other.mkdir()
    _, other_key = self_signed_certificate(other)
    with pytest.raises(CxrError, match="not a usable certificate and key"):
        check_tls(str(cert), str(other_key))
    for wrong, message in [
        ({"max_batch": 0}, "--max-batch must be at least 1, got 0"),
        ({"max_queue": 0}, "--max-queue must be at least 1"),
        ({"max_batch_delay_ms": -1}, "--max-batch-delay-ms must be at least 0"),
        ({"workers": 0}, "--workers must be at least 1"),
    ]:
        with pytest.raises(CxrError, match=message):
            ServiceSettings(**wrong).check()


# ---- TLS, the log, patient data: the serve command itself -------------------------------------------------------


@pytest.fixture(scope="module")
def tls_server(model_path, tmp_path_factory):
    """``cxrbench serve`` over TLS (a self-signed certificate made here) with a token file; its log file."""
    folder = tmp_path_factory.mktemp("tls")
    cert, key = self_signed_certificate(folder)
    (folder / "tokens").write_text(f"{OLD_TOKEN}\n{NEW_TOKEN}\n")
    port, log = free_port(), folder / "serve.log"
    env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
    args = [str(model_path), "--port", str(port), "--token-file", str(folder / "tokens")]
    args += ["--ssl-certfile", str(cert), "--ssl-keyfile", str(key), "--max-pixels", "4000000"]
    with serve_command(args, log, env) as process:
        trusted = ssl.create_default_context(cafile=str(cert))
        with httpx.Client(base_url=f"https://127.0.0.1:{port}", verify=trusted, timeout=30) as client:
            up = wait_until(lambda: client.get("/health").status_code == 200, timeout=90)
            assert up, (process.poll(), log.read_text())
            yield client, port, log


def test_tls_with_a_self_signed_certificate(tls_server):
    client, port, _ = tls_server
    assert client.get("/ready", headers=_bearer(NEW_TOKEN)).json()["status"] == "ready"
    response = _upload(client, png_bytes(chest_like(3)), headers=_bearer(OLD_TOKEN))
    assert response.status_code == 200 and set(response.json()["probabilities"]) == set(CLASSES)
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):  # a client that does not trust it
        httpx.get(f"https://127.0.0.1:{port}/health", timeout=10)
    with pytest.raises(httpx.TransportError):  # plain HTTP to the TLS port gets no answer
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=10)


def test_no_patient_data_in_the_log_or_any_answer(tls_server, tmp_path):
    """A DICOM with a recognisable PatientName (and ID, birth date) is scored, with and without CAMs, broken and
    without pixels: neither the log nor any answer may contain them; the log has no upload file name and no
    token, and one JSON line per request, found by the request id each answer carries."""
    pytest.importorskip("pydicom")
    client, _, log = tls_server
    good = dicom_file(tmp_path / "a.dcm", chest_like(4), **PATIENT).read_bytes()
    assert PATIENT["PatientName"].encode() in good  # the test would prove nothing otherwise
    no_pixels = dicom_file(tmp_path / "b.dcm", chest_like(4), pixel_data=False, **PATIENT).read_bytes()
    auth = _bearer(NEW_TOKEN)
    answers = [
        _upload(client, good, UPLOAD_NAME, auth),
        _upload(client, good, UPLOAD_NAME, auth, cam="base64"),
        _upload(client, good, UPLOAD_NAME, auth, cam="png", **{"class": "Mass"}),
        _upload(client, good[: len(good) - 2000], UPLOAD_NAME, auth),  # truncated pixel data
        _upload(client, no_pixels, UPLOAD_NAME, auth),
        _upload(client, good, UPLOAD_NAME),  # no token
        client.get("/metrics", headers=auth),
        client.get("/model", headers=auth),
    ]
    assert [a.status_code for a in answers] == [200, 200, 200, 422, 422, 401, 200, 200]
    ids = [a.headers["x-request-id"] for a in answers]
    assert len(set(ids)) == len(ids)
    secrets = [v.encode() for v in PATIENT.values()] + [b"Zyxwvut", b"Recognisable", b"31415926"]
    for answer in answers:
        assert not [s for s in secrets if s in answer.content], answer.content[:200]
    assert wait_until(lambda: all(i in log.read_text() for i in ids), timeout=10), log.read_text()
    text = log.read_text()
    for forbidden in [*(s.decode() for s in secrets), UPLOAD_NAME, "upload-name", OLD_TOKEN, NEW_TOKEN]:
        assert forbidden not in text, forbidden
    lines = [json.loads(line) for line in text.splitlines()]  # every line is JSON: nothing else is written
    assert lines[0]["event"] == "start" and lines[0]["tokens"] == 2 and lines[0]["url"].startswith("https://")
    by_id = {line["request_id"]: line for line in lines if line["event"] == "request"}
    assert len([line for line in lines if line.get("request_id") in ids]) == len(ids)  # one line per request
    first = by_id[ids[0]]
    assert set(first) == set(REQUEST_LOG_FIELDS)
    assert (first["method"], first["endpoint"], first["status"]) == ("POST", "/predict", 200)
    assert first["image"] == {"height": 80, "width": 64}  # the decoded picture's size
    assert first["upload_bytes"] > len(good) and first["batch"] >= 1 and first["latency_ms"] > 0
    assert [by_id[i]["status"] for i in ids] == [a.status_code for a in answers]


# ---- batching, backpressure, readiness, metrics, failures: uvicorn in a thread ----------------------------------


def test_concurrent_requests_are_scored_in_one_call_and_each_gets_its_own_answer(model_path, tmp_path):
    """The first call is held until 7 more pictures wait; they then go in ONE onnxruntime call (the batch-size
    histogram says so), CAM requests among them, and every answer equals onnxruntime on that picture alone."""
    model = HeldModel(model_path)
    settings = ServiceSettings(workers=2, max_batch=16, max_batch_delay_ms=20)
    paths = [tmp_path / f"{k}.png" for k in range(8)]
    for k, path in enumerate(paths):
        path.write_bytes(png_bytes(chest_like(20 + k)))
    with running(create_app(model, settings, Tokens([NEW_TOKEN]))) as url, httpx.Client(base_url=url, timeout=60) as c:
        with ThreadPoolExecutor(8) as pool:
            first = pool.submit(_upload, c, paths[0].read_bytes(), "0.png", _bearer(NEW_TOKEN))
            assert model.entered.wait(timeout=30)
            cams = [{}, {"cam": "base64"}] * 4
            rest = [
                pool.submit(_upload, c, paths[k].read_bytes(), f"{k}.png", _bearer(NEW_TOKEN), **cams[k])
                for k in range(1, 8)
            ]
            waiting = wait_until(lambda: _value(_metrics(c), "cxrbench_batch_queue_depth") == 7, timeout=30)
            model.release.set()
            assert waiting, "7 pictures never waited together"
            answers = [first.result(timeout=60)] + [f.result(timeout=60) for f in rest]
        assert [a.status_code for a in answers] == [200] * 8
        metrics = _metrics(c)
    assert model.calls == [1, 7]
    assert _value(metrics, "cxrbench_batch_size", "cxrbench_batch_size_count") == 2
    assert _value(metrics, "cxrbench_batch_size", "cxrbench_batch_size_sum") == 8
    assert _value(metrics, "cxrbench_batch_size", "cxrbench_batch_size_bucket", le="4.0") == 1  # one batch > 4
    expected = reference_probabilities(model_path, paths)
    for k, answer in enumerate(answers):
        got = [answer.json()["probabilities"][name] for name in CLASSES]
        np.testing.assert_allclose(got, expected[k], rtol=0, atol=1e-6)
        assert ("cam" in answer.json()) == bool(cams[k])
        if cams[k]:
            assert answer.json()["cam"]["class"] == CLASSES[int(np.argmax(expected[k]))]


def test_a_full_queue_answers_503_with_retry_after_and_ready_says_so(model_path):
    model = HeldModel(model_path)
    settings = ServiceSettings(workers=2, max_batch=4, max_batch_delay_ms=0, max_queue=2)
    picture = png_bytes(chest_like(6))
    with running(create_app(model, settings)) as url, httpx.Client(base_url=url, timeout=60) as client:
        assert client.get("/ready").json() == {"status": "ready", "queue_depth": 0, "queue_capacity": 2}
        with ThreadPoolExecutor(2) as pool:
            held = [pool.submit(_upload, client, picture)]
            assert model.entered.wait(timeout=30)
            held.append(pool.submit(_upload, client, picture))
            full = wait_until(lambda: client.get("/ready").status_code == 503, timeout=30)
            try:
                assert full, "the queue never filled"
                ready = client.get("/ready")
                assert ready.json() == {"status": "full", "queue_depth": 2, "queue_capacity": 2}
                refused = [_upload(client, picture) for _ in range(3)]
                assert client.get("/health").json() == {"status": "ok"}  # alive, just busy
            finally:
                model.release.set()
            assert [f.result(timeout=60).status_code for f in held] == [200, 200]
        for response in refused:
            assert response.status_code == 503
            assert response.json()["error"].startswith("busy: 2 requests in progress (--max-queue 2); retry in")
            assert 1 <= int(response.headers["retry-after"]) <= 60
        assert wait_until(lambda: client.get("/ready").status_code == 200, timeout=30)
        assert _upload(client, picture).status_code == 200
        metrics = _metrics(client)
    assert _value(metrics, "cxrbench_requests", "cxrbench_requests_total", endpoint="/predict", status="503") == 3
    assert _value(metrics, "cxrbench_requests", "cxrbench_requests_total", endpoint="/predict", status="200") == 3
    assert _value(metrics, "cxrbench_queue_capacity") == 2 and _value(metrics, "cxrbench_queue_depth") == 0


def test_metrics_count_requests_latency_batches_and_images(model_path):
    app = create_app(ScoringModel(model_path), ServiceSettings(workers=2, max_batch=8))
    with running(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        for k in range(3):
            assert _upload(client, png_bytes(chest_like(30 + k))).status_code == 200
        assert _upload(client, b"not a picture").status_code == 422
        client.get("/nowhere/patient-name")
        metrics = _metrics(client)
    requests = "cxrbench_requests_total"
    assert _value(metrics, "cxrbench_requests", requests, endpoint="/predict", status="200") == 3
    assert _value(metrics, "cxrbench_requests", requests, endpoint="/predict", status="422") == 1
    assert _value(metrics, "cxrbench_requests", requests, endpoint="other", status="404") == 1
    latency = "cxrbench_request_duration_seconds"
    assert _value(metrics, latency, f"{latency}_count", endpoint="/predict") == 4
    assert _value(metrics, latency, f"{latency}_bucket", endpoint="/predict", le="+Inf") == 4
    assert _value(metrics, "cxrbench_images_scored", "cxrbench_images_scored_total") == 3
    assert _value(metrics, "cxrbench_batch_size", "cxrbench_batch_size_sum") == 3
    assert _value(metrics, "cxrbench_batch_size", "cxrbench_batch_size_bucket", le="8.0") >= 1
    assert _value(metrics, "cxrbench_inference_duration_seconds", "cxrbench_inference_duration_seconds_count") >= 1
    assert _value(metrics, "cxrbench_queue_capacity") == 64
    assert not any("patient-name" in str(key) for family in metrics.values() for key in family)


class FailingModel(ScoringModel):
    def score(self, images, cam_classes=None):
        raise RuntimeError(f"failed on {PATIENT['PatientName']}")  # a message that must reach no one


def test_an_unexpected_failure_is_a_500_with_a_request_id_and_logged_by_type_only(model_path, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER_NAME)
    with running(create_app(FailingModel(model_path))) as url, httpx.Client(base_url=url, timeout=30) as client:
        response = _upload(client, png_bytes(chest_like(7)))
        assert client.get("/health").status_code == 200
    request_id = response.headers["x-request-id"]
    assert response.status_code == 500 and response.json() == {"error": f"internal error (request {request_id})"}
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == LOGGER_NAME]
    failed = next(line for line in lines if line.get("request_id") == request_id)
    assert (failed["status"], failed["error"]) == (500, "RuntimeError")
    assert re.fullmatch(r"test_deploy_serve_operations\.py:\d+", failed["where"])  # the raising frame, no message
    assert PATIENT["PatientName"] not in caplog.text
