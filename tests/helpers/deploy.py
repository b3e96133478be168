"""A tiny real export (the core's ONNX graph on seeded canonical weights), pictures to score, a real server on
127.0.0.1 and a self-signed certificate, for the deploy tests.

No backend is needed: :mod:`cxrbench.backend.onnx_graph` writes the canonical network, stamped like every export.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import ipaddress
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from cxrbench.backend.onnx_graph import write_onnx
from cxrbench.data.images import decode_gray, resize_gray
from cxrbench.deploy import onnx_file
from cxrbench.testing.conformance import kit_settings, random_canonical

SIZE = 64  #: densenet-tiny gives a 2 x 2 feature map here, so CAMs have boxes


def tiny_export(path: Path, size: int = SIZE, seed: int = 3) -> Path:
    settings = kit_settings(size)
    weights = random_canonical(settings.model.block_config, seed)
    write_onnx(weights, settings.model.block_config, size, settings.export.opset, path)
    onnx_file.stamp_metadata(path, onnx_file.model_metadata("NCHW", size, "numpy"))
    return path


def png_bytes(pixels: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def chest_like(seed: int, height: int = 80, width: int = 64) -> np.ndarray:
    """A gray picture with structure (a bright band, a dark blob) so CAMs and probabilities differ per picture."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
    base = 90 + 110 * np.exp(-((xx - rng.uniform(0.3, 0.7)) ** 2) / 0.01) - 60 * np.exp(-((yy - 0.5) ** 2) / 0.02)
    return np.clip(base + rng.normal(0, 12, (height, width)), 0, 255).astype(np.uint8)


def reference_probabilities(model_path: Path, files: list[Path], size: int = SIZE) -> np.ndarray:
    """Sigmoid of onnxruntime called directly on the shared decoder's pixels: the independent reference."""
    pixels = np.stack([resize_gray(decode_gray(f), size) for f in files])
    sess = onnx_file.session(model_path)
    logits = sess.run(["logits"], {"input": onnx_file.normalise(pixels, "NCHW")})[0].astype(np.float64)
    return 1.0 / (1.0 + np.exp(-logits))


def dicom_file(
    path: Path, pixels: np.ndarray, photometric: str = "MONOCHROME2", pixel_data: bool = True, **tags
) -> Path:
    """A DICOM file (Secondary Capture, explicit VR little endian) written with pydicom, ``tags`` set as given."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID = "DX", "test"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PixelRepresentation = 1, photometric, 0
    bits = pixels.dtype.itemsize * 8
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits, bits, bits - 1
    for key, value in tags.items():
        setattr(ds, key, value)
    if pixel_data:
        ds.PixelData = pixels.tobytes()
    ds.save_as(str(path), enforce_file_format=True)
    return path


@contextlib.contextmanager
def running(app, **config) -> Iterator[str]:
    """``app`` served by uvicorn on 127.0.0.1 (a free port from the OS, in a thread): its base URL; stopped and
    joined after. ``config``: more ``uvicorn.Config`` options (``ssl_certfile``...)."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    instance = uvicorn.Server(uvicorn.Config(app, log_level="warning", **config))
    thread = threading.Thread(target=instance.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not instance.started and time.monotonic() < deadline and thread.is_alive():
        time.sleep(0.05)
    assert instance.started, "the server did not start"
    scheme = "https" if config.get("ssl_certfile") else "http"
    try:
        yield f"{scheme}://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        instance.should_exit = True
        thread.join(timeout=30)
        sock.close()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def serve_command(args: list[str], log: Path, env: dict[str, str] | None = None) -> Iterator[subprocess.Popen]:
    """``cxrbench serve ARGS`` in a subprocess, stdout and stderr into ``log``; terminated and waited for after."""
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "cxrbench", "serve", *args], stdout=out, stderr=out, env=env)
    try:
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)


def wait_until(probe, timeout: float = 60.0, interval: float = 0.1):
    """``probe()``'s first truthy answer within ``timeout`` seconds (exceptions count as not yet); None after."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            answer = probe()
            if answer:
                return answer
        time.sleep(interval)
    return None


def self_signed_certificate(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and localhost signed by its own key (the cryptography package): (cert, key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cxrbench test")])
    now = datetime.datetime.now(datetime.UTC)
    public = key.public_key()
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = Path(folder) / "cert.pem", Path(folder) / "key.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path
