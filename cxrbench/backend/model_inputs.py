"""The input contract of ``cxrbench_predict`` and ``cxrbench_cam``, checked the same way by every backend.

Images are ``uint8`` gray ``(N, S, S)`` with ``S = settings.data.image_size``, the size the model was
built for; CAM also needs at least one image and class indices into :data:`cxrbench.data.classes.CLASSES`.
Each backend calls these checks at the top of its hooks, so a caller that breaks the contract gets
one line naming the problem rather than a framework's traceback (or, worse, a silent cast).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cxrbench.backend.canonical import check_image_size
from cxrbench.data.classes import NUM_CLASSES
from cxrbench.errors import BackendError


def check_images(images: np.ndarray, image_size: int) -> np.ndarray:
    """``images`` as an array, or :class:`BackendError` unless it is ``uint8 (N, image_size, image_size)``."""
    array = np.asarray(images)
    square = array.ndim == 3 and array.shape[1] == array.shape[2]
    if square:
        check_image_size(array.shape[1])  # says why a small image cannot work at all
    if array.dtype != np.uint8 or not square or array.shape[1] != image_size:
        raise BackendError(
            f"images must be uint8 (N, S, S), got {array.dtype} {array.shape} (S = data.image_size = {image_size})"
        )
    return array


def check_cam_inputs(images: np.ndarray, classes: Sequence[int], image_size: int) -> tuple[np.ndarray, list[int]]:
    """The checked images (at least one) and class indices (at least one, each in ``0..NUM_CLASSES-1``)."""
    array = check_images(images, image_size)
    if len(array) == 0:
        raise BackendError("CAM needs at least one image, got none")
    chosen = [int(c) for c in classes]
    if not chosen or any(not 0 <= c < NUM_CLASSES for c in chosen):
        raise BackendError(f"CAM classes must be indices 0..{NUM_CLASSES - 1}, got {list(classes)!r}")
    return array, chosen
