"""Pictures a user brings (PNG, JPEG, DICOM; a file or an upload's bytes) -> ``uint8`` gray, size checked first.

PNG and JPEG go through the benchmark's own decoder (:func:`cxrbench.data.images.decode_gray`: colour
via luma, 16-bit scaled by its full range), so a scored picture is preprocessed exactly like the
training images. DICOM (pydicom, an optional extra) is windowed to 8 bits the way a viewer shows it:
Modality LUT (RescaleSlope/Intercept), then the first VOI window (WindowCenter/Width, DICOM's linear
function) or, without one, the full range of the stored values; MONOCHROME1 is inverted.
Dimensions are checked from the header before any pixel is decoded, so a 20000 x 20000 picture
costs nothing.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from cxrbench.data.images import decode_gray
from cxrbench.deploy.limits import MAX_PIXELS
from cxrbench.errors import CxrError, DataError, first_line

_DICOM_MAGIC_OFFSET = 128


class ImageError(DataError):
    """A picture cannot be scored: not decodable, truncated, too large, no pixel data."""


class TooManyPixels(ImageError):
    """A picture larger than the pixel limit (HTTP 413 in the service)."""


class _Named(io.BytesIO):
    """Bytes that print as the picture's name, so the shared decoder's messages name the file."""

    def __init__(self, data: bytes, name: str):
        super().__init__(data)
        self.label = name

    def __str__(self) -> str:
        return self.label


def is_dicom(data: bytes) -> bool:
    return data[_DICOM_MAGIC_OFFSET : _DICOM_MAGIC_OFFSET + 4] == b"DICM"


def decode(data: bytes, name: str, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """A picture's bytes as ``uint8`` gray ``(H, W)``; :class:`ImageError` naming ``name`` otherwise."""
    if not data:
        raise ImageError(f"{name}: empty file")
    if is_dicom(data):
        return _dicom_gray(data, name, max_pixels)
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not a PNG, JPEG or DICOM picture") from None
    except Image.DecompressionBombError as exc:  # Pillow's own limit, far above ours, refused before ours is asked
        limit = f"more pixels than the limit of {max_pixels} (--max-pixels)"
        raise TooManyPixels(f"{name}: {limit}: {first_line(exc)}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"{name}: unreadable picture header ({first_line(exc, with_type=True)})") from None
    _check_pixels(name, width, height, max_pixels)
    try:
        return decode_gray(_Named(data, name))
    except DataError as exc:
        raise ImageError(str(exc)) from None


def read(path: Path, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ImageError(f"{path}: cannot read ({exc.strerror})") from None
    return decode(data, str(path), max_pixels)


def _check_pixels(name: str, width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise TooManyPixels(f"{name}: {width} x {height} pixels is more than the limit of {max_pixels} (--max-pixels)")


def _pydicom():
    try:
        import pydicom
    except ImportError:
        raise CxrError('DICOM input needs pydicom: pip install -e ".[dicom]"') from None
    return pydicom


def _dicom_gray(data: bytes, name: str, max_pixels: int) -> np.ndarray:
    pydicom = _pydicom()
    try:
        ds = pydicom.dcmread(io.BytesIO(data))
    except Exception as exc:  # pydicom raises InvalidDicomError, EOFError, struct.error, ...
        raise ImageError(f"{name}: unreadable DICOM ({first_line(exc, with_type=True)})") from None
    if "PixelData" not in ds:
        raise ImageError(f"{name}: DICOM without pixel data (no PixelData element)")
    _check_pixels(name, int(ds.get("Columns", 0)), int(ds.get("Rows", 0)), max_pixels)
    try:
        pixels = np.asarray(ds.pixel_array, dtype=np.float64)
    except Exception as exc:  # truncated data, compressed without a decoder, inconsistent tags
        raise ImageError(f"{name}: DICOM pixel data cannot be decoded ({first_line(exc, with_type=True)})") from None
    if pixels.ndim != 2:
        raise ImageError(f"{name}: DICOM pixel data of shape {pixels.shape}: only one gray frame can be scored")
    return dicom_to_gray8(pixels, ds)


def dicom_to_gray8(pixels: np.ndarray, ds) -> np.ndarray:
    """Stored values -> modality values (slope, intercept) -> VOI window or full range -> 0..255, inverted if
    MONOCHROME1 (where the smallest value is white)."""
    values = pixels * float(ds.get("RescaleSlope", 1.0)) + float(ds.get("RescaleIntercept", 0.0))
    if "WindowCenter" in ds and "WindowWidth" in ds:
        centre, width = _first(ds.WindowCenter), max(_first(ds.WindowWidth), 1.0)
        # DICOM PS3.3 C.11.2.1.2.1, the linear function, scaled to 0..1.
        scaled = np.clip((values - (centre - 0.5)) / max(width - 1.0, 1.0) + 0.5, 0.0, 1.0)
    else:
        low, high = float(values.min()), float(values.max())
        scaled = (values - low) / (high - low) if high > low else np.zeros_like(values)
    if str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip() == "MONOCHROME1":
        scaled = 1.0 - scaled
    return np.round(scaled * 255.0).astype(np.uint8)


def _first(value) -> float:
    """WindowCenter/Width may hold several windows; the first is the one the modality recommends."""
    return float(np.atleast_1d(np.asarray(value, dtype=np.float64))[0])
