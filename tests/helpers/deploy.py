"""A tiny real export (the core's ONNX graph on seeded canonical weights) and pictures to score, for the deploy tests.

No backend is needed: :mod:`cxrbench.backend.onnx_graph` writes the canonical network, stamped like every export.
"""

from __future__ import annotations

import io
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
