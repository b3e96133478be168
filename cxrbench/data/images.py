"""Decode any NIH-style PNG to 8-bit gray and resize it: the one preprocessing every backend shares.

NIH ChestX-ray14 is mostly 8-bit gray, but about 519 files are RGBA and other copies of the data
set contain 16-bit or palette PNGs. Every mode is reduced to ``uint8`` gray here, so the prepared
cache (and every framework) sees identical pixels. Resizing uses Pillow's BILINEAR filter, which
widens its kernel with the reduction factor (an antialiasing, area-aware reduction, like
torchvision's ``Resize`` on PIL images), from the full decoded image.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
from PIL import Image

from cxrbench.errors import DataError

#: Part of the prepared cache key: change it whenever decoding or resizing changes its output.
PREPROCESSING = "gray8(L/RGB/RGBA/P/16-bit scaled)+pil-bilinear-reduce/v1"

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: PNG modes Pillow converts to "L" correctly by itself (colour via ITU-R 601-2 luma, alpha dropped).
_CONVERTIBLE = {"1", "L", "LA", "P", "PA", "RGB", "RGBA"}
#: Modes holding more than 8 bits: scaled by their full range, since Pillow's convert("L") clips at 255.
_WIDE_MAX = {"I;16": 65535, "I;16B": 65535, "I;16L": 65535, "I": 65535}


def png_size(path: Path) -> tuple[int, int]:
    """``(width, height)`` from the PNG header alone (cheap: boxes need only the frame size)."""
    try:
        with open(path, "rb") as f:
            head = f.read(24)
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    if len(head) < 24 or head[:8] != _PNG_SIGNATURE or head[12:16] != b"IHDR":
        raise DataError(f"{path}: not a PNG file (bad header)")
    return struct.unpack(">II", head[16:24])


def decode_gray(path: Path) -> np.ndarray:
    """The image as ``uint8`` gray ``(H, W)``, whatever its PNG colour type and bit depth.

    A truncated or corrupt file raises :class:`DataError` naming it (never a Pillow traceback).
    """
    try:
        with Image.open(path) as image:
            image.load()
            return _to_gray8(image, path)
    except DataError:
        raise
    except (OSError, SyntaxError, ValueError, struct.error, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: unreadable image ({type(e).__name__}: {e})") from None


def _to_gray8(image: Image.Image, path: Path) -> np.ndarray:
    if image.mode in _CONVERTIBLE:
        return np.asarray(image.convert("L"), dtype=np.uint8)
    if image.mode in _WIDE_MAX:
        wide = np.asarray(image).astype(np.int64).clip(0, _WIDE_MAX[image.mode])
        # Round to nearest: 0 -> 0, full scale -> 255, proportional in between.
        return ((wide * 255 + _WIDE_MAX[image.mode] // 2) // _WIDE_MAX[image.mode]).astype(np.uint8)
    raise DataError(f"{path}: unsupported image mode {image.mode!r}")


def resize_gray(gray: np.ndarray, size: int) -> np.ndarray:
    """``size x size`` ``uint8`` image (aspect not preserved: boxes scale x and y separately)."""
    if gray.shape == (size, size):
        return gray
    resized = Image.fromarray(gray).resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.uint8)


def load_gray(path: Path, size: int) -> np.ndarray:
    """Decode and resize one file: the cache's per-image work."""
    return resize_gray(decode_gray(path), size)
