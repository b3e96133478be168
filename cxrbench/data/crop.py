"""Lung-field cropping: one box per image, found once when the prepared cache is built, identical for every backend.

The study this project reproduces cropped each radiograph to its lungs before DenseNet-121 saw it. Two ways to find
the box, both returning the box in the picture's own pixels:

* the built-in **classical finder** (:func:`find_lungs`, numpy and scipy only): smooth, threshold at Otsu's level of
  the central part's histogram, open and fill the dark mask, drop what touches the border (air outside the body),
  keep the two largest dark regions whose centres lie in the central part (the lung fields) and box them;
* a user's **lung-segmentation network** (:class:`LungSegmenter`, ``data.crop_model = PATH.onnx``) run with
  onnxruntime: gray picture in, mask out; the box is the mask's bounding box.

Either way the box grows by ``margin`` (a fraction of its width and height on each side) and is clipped to the
picture. A picture where no plausible box is found keeps the full picture and is counted as a fallback. The crop is
then resized to the cache's size like any picture (:func:`cxrbench.data.images.resize_gray`), and the NIH boxes are
mapped into the crop's pixels (:func:`map_box`), so CAM localisation is scored exactly.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from cxrbench.data.index import Box
from cxrbench.errors import CxrError, DataError, SuiteError, first_line

#: Part of the prepared cache key for data.crop = "lungs" with the classical finder: bump it when its boxes change.
CLASSICAL_FINDER = "classical-lung-finder/v1"
BOXES_FILE = "crop_boxes.csv"
BOXES_HEADER = ("image", "x", "y", "w", "h", "method", "fallback")
METHODS = ("none", "lungs")

#: The classical finder works on a copy of this many pixels per side (fast, and the same scale for any input).
WORK_SIZE = 128
SMOOTH_SIGMA = 1.5  #: Gaussian smoothing in work pixels, against noise and rib texture
CENTRAL = 0.1  #: the central part: regions whose centre lies this far (fraction) from every edge
MIN_REGION = 0.01  #: a lung field covers at least this fraction of the picture
MIN_BOX = (0.3, 0.25)  #: a plausible box spans at least this fraction of the width and of the height


@dataclass(frozen=True)
class CropBox:
    """One picture's crop in its own pixels: ``x, y`` the top-left corner, ``w, h`` the size."""

    x: int
    y: int
    w: int
    h: int
    method: str  #: "classical", "onnx", or "full" (no crop asked)
    fallback: bool  #: no plausible box was found: the full picture

    def apply(self, gray: np.ndarray) -> np.ndarray:
        return gray[self.y : self.y + self.h, self.x : self.x + self.w]


def full_picture(gray: np.ndarray, method: str, fallback: bool) -> CropBox:
    return CropBox(0, 0, int(gray.shape[1]), int(gray.shape[0]), method, fallback)


@dataclass(frozen=True)
class CropSpec:
    """What ``data.crop``, ``data.crop_model`` and ``data.crop_margin`` ask for, checked."""

    method: str = "none"
    margin: float = 0.05
    model: str = ""  #: a lung-segmentation ONNX file; empty: the classical finder
    model_sha256: str = ""
    model_size: int = 0  #: the network's input side when its input shape does not say (data.crop_model_size)

    @property
    def active(self) -> bool:
        return self.method != "none"

    @property
    def finder(self) -> str:
        """``"none"``, ``"classical"`` or ``"onnx"``: the ``method`` column of crop_boxes.csv."""
        return "none" if not self.active else ("onnx" if self.model else "classical")

    def key(self) -> dict:
        """What of the crop changes the prepared pixels (part of the cache key; nothing for no crop)."""
        if not self.active:
            return {}
        finder = {"onnx_sha256": self.model_sha256, "model_size": self.model_size} if self.model else CLASSICAL_FINDER
        return {"crop": self.method, "finder": finder, "margin": self.margin}

    def describe(self) -> dict:
        """The record in run.json, the cache manifest and (as text) the export's metadata."""
        return {**asdict(self), "finder": self.finder}


#: No crop: the full pictures, as before cropping existed.
NO_CROP = CropSpec()


def spec_from_settings(data) -> CropSpec:
    """``settings.data`` -> :class:`CropSpec`; a model without ``crop = "lungs"`` or a missing model is one line."""
    from cxrbench.files import sha256_of

    if data.crop not in METHODS:
        raise SuiteError(f"data.crop = {data.crop!r}: must be one of {', '.join(METHODS)}")
    if data.crop == "none":
        if data.crop_model:
            raise SuiteError(f"data.crop_model = {data.crop_model!r} needs data.crop = 'lungs' (it is 'none')")
        return NO_CROP
    if not data.crop_model:
        return CropSpec(data.crop, data.crop_margin)
    path = Path(data.crop_model).expanduser().absolute()
    if not path.is_file():
        raise DataError(f"{path}: lung-segmentation model not found (data.crop_model)")
    return CropSpec(data.crop, data.crop_margin, str(path), sha256_of(path), data.crop_model_size)


def check(spec: CropSpec) -> None:
    """Refuse a crop model that is not a lung-segmentation network, before any work (one line naming the file)."""
    if spec.model:
        segmenter(spec).check()


# -- the classical finder ----------------------------------------------------------------------------------


def otsu_threshold(values: np.ndarray) -> float:
    """Otsu's threshold of ``uint8``-range values: the level that maximises the between-class variance."""
    histogram = np.bincount(np.clip(values, 0, 255).astype(np.int64).ravel(), minlength=256).astype(np.float64)
    levels = np.arange(256, dtype=np.float64)
    weight = np.cumsum(histogram)
    total = weight[-1]
    cumulative_mean = np.cumsum(histogram * levels)
    below, above = weight, total - weight
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_below = cumulative_mean / below
        mean_above = (cumulative_mean[-1] - cumulative_mean) / above
        between = below * above * (mean_below - mean_above) ** 2
    between[~np.isfinite(between)] = -1.0
    return float(np.argmax(between)) + 0.5  #: pixels <= the argmax level are "dark"


def lung_regions(gray: np.ndarray) -> np.ndarray:
    """Labels (0 = none, 1 and 2) of the two lung fields in a ``WORK_SIZE`` copy of ``gray``.

    The threshold is Otsu's level of the central part; when a bright finding or a marker takes that level (nothing
    dark is left apart from the border), Otsu's level of the darker class is tried once more.
    """
    from PIL import Image
    from scipy import ndimage

    work = np.asarray(Image.fromarray(gray).resize((WORK_SIZE, WORK_SIZE), Image.Resampling.BILINEAR), np.float64)
    smooth = ndimage.gaussian_filter(work, SMOOTH_SIGMA)
    edge = int(round(CENTRAL * WORK_SIZE))
    central = smooth[edge:-edge, edge:-edge]
    threshold = otsu_threshold(central)
    regions = _dark_regions(smooth < threshold, edge)
    if not regions.any():
        regions = _dark_regions(smooth < otsu_threshold(central[central < threshold]), edge)
    return regions


def _dark_regions(dark: np.ndarray, edge: int) -> np.ndarray:
    """The two largest dark regions, cleaned, that do not touch the border and are centred in the central part."""
    from scipy import ndimage

    dark = ndimage.binary_opening(dark, structure=np.ones((3, 3)), iterations=2)
    dark = ndimage.binary_fill_holes(dark)
    labels, count = ndimage.label(dark)
    if count == 0:
        return np.zeros_like(labels)
    touching = set(np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])).tolist())
    numbers = np.arange(1, count + 1)
    sizes = ndimage.sum(np.ones_like(labels), labels, index=numbers)
    centres = ndimage.center_of_mass(dark, labels, index=numbers)
    low, high = edge, WORK_SIZE - edge
    candidates = [
        (size, label)
        for label, size, (cy, cx) in zip(numbers.tolist(), sizes, centres)
        if label not in touching and size >= MIN_REGION * WORK_SIZE**2 and low <= cx <= high and low <= cy <= high
    ]
    out = np.zeros_like(labels)
    for number, (_, label) in enumerate(sorted(candidates, reverse=True)[:2], start=1):
        out[labels == label] = number
    return out


def find_lungs(gray: np.ndarray, margin: float) -> CropBox:
    """The classical finder's box around both lung fields (plus ``margin``), or the full picture as a fallback."""
    regions = lung_regions(gray)
    if not regions.any():
        return full_picture(gray, "classical", fallback=True)
    rows, cols = np.flatnonzero(regions.any(axis=1)), np.flatnonzero(regions.any(axis=0))
    scale_y, scale_x = gray.shape[0] / WORK_SIZE, gray.shape[1] / WORK_SIZE
    box = (cols[0] * scale_x, rows[0] * scale_y, (cols[-1] + 1) * scale_x, (rows[-1] + 1) * scale_y)
    return _box_with_margin(gray, box, margin, "classical")


def _box_with_margin(gray: np.ndarray, box: tuple[float, float, float, float], margin: float, method: str) -> CropBox:
    """``(x0, y0, x1, y1)`` grown by ``margin`` on each side, in whole pixels inside the picture; implausibly small
    boxes fall back to the full picture."""
    height, width = gray.shape
    x0, y0, x1, y1 = box
    if (x1 - x0) < MIN_BOX[0] * width or (y1 - y0) < MIN_BOX[1] * height:
        return full_picture(gray, method, fallback=True)
    dx, dy = margin * (x1 - x0), margin * (y1 - y0)
    left, top = max(0, int(np.floor(x0 - dx))), max(0, int(np.floor(y0 - dy)))
    right, bottom = min(width, int(np.ceil(x1 + dx))), min(height, int(np.ceil(y1 + dy)))
    return CropBox(left, top, right - left, bottom - top, method, False)


# -- a lung-segmentation network (ONNX) ------------------------------------------------------------------------

#: Metadata a segmentation export may carry: its input side and the normalisation ``(x / 255 - mean) / std``.
MASK_SIZE_KEY, MASK_MEAN_KEY, MASK_STD_KEY = "cxrbench.mask_input_size", "cxrbench.mask_mean", "cxrbench.mask_std"


class LungSegmenter:
    """A user's lung-segmentation ONNX model: one gray picture in (``(N, 1, H, W)``, ``(N, H, W, 1)`` or
    ``(N, H, W)``), a mask of the same layout out (one channel of probabilities or logits, or several channels
    of class scores with background first).

    The input side comes from the input's static shape, else the metadata ``cxrbench.mask_input_size``, else
    ``data.crop_model_size``; the normalisation from ``cxrbench.mask_mean``/``cxrbench.mask_std`` (default
    ``x / 255``).
    """

    def __init__(self, path: str, size: int = 0):
        from cxrbench.deploy import onnx_file

        self.path = path
        try:
            self.session = onnx_file.session(path, threads=1)
        except Exception as exc:  # onnxruntime raises its own types for unreadable models
            raise DataError(f"{path}: not a loadable ONNX model ({first_line(exc)}) (data.crop_model)") from None
        metadata = dict(self.session.get_modelmeta().custom_metadata_map)
        model_input = self.session.get_inputs()[0]
        self.input_name, self.input_shape = model_input.name, list(model_input.shape)
        self.channels_first = len(self.input_shape) == 4 and self.input_shape[1] == 1
        if len(self.input_shape) not in (3, 4) or (len(self.input_shape) == 4 and 1 not in self.input_shape[1::2]):
            raise DataError(self._not_segmentation(f"its input {self.input_name!r} has shape {self.input_shape}"))
        spatial = self.input_shape[2:] if self.channels_first else self.input_shape[1:3]
        static = spatial[0] if all(isinstance(s, int) and s > 0 for s in spatial) else 0
        self.size = int(static or metadata.get(MASK_SIZE_KEY) or size or 0)
        if self.size < 1:
            raise DataError(
                f"{path}: its input size is not fixed and neither the metadata {MASK_SIZE_KEY!r} nor "
                "data.crop_model_size gives it"
            )
        self.mean = float(metadata.get(MASK_MEAN_KEY, 0.0))
        self.std = float(metadata.get(MASK_STD_KEY, 1.0))

    def _not_segmentation(self, why: str) -> str:
        return f"{self.path}: not a lung-segmentation model: {why} (expected a gray picture in and a mask out)"

    def _input(self, gray: np.ndarray) -> np.ndarray:
        from cxrbench.data.images import resize_gray

        x = (resize_gray(gray, self.size).astype(np.float32) / 255.0 - self.mean) / self.std
        if len(self.input_shape) == 3:
            return x[None]
        return x[None, None] if self.channels_first else x[None, ..., None]

    def mask(self, gray: np.ndarray) -> np.ndarray:
        """The boolean lung mask at the network's size."""
        try:
            output = np.asarray(self.session.run(None, {self.input_name: self._input(gray)})[0])
        except Exception as exc:
            raise DataError(f"{self.path}: failed on a picture ({first_line(exc)}) (data.crop_model)") from None
        return self._to_mask(output)

    def _to_mask(self, output: np.ndarray) -> np.ndarray:
        shape = list(output.shape)
        if output.ndim == 3 and output.shape[0] == 1:
            scores = output[0][None]
        elif output.ndim == 4 and output.shape[0] == 1 and (self.channels_first or len(self.input_shape) == 3):
            scores = output[0]
        elif output.ndim == 4 and output.shape[0] == 1:
            scores = np.moveaxis(output[0], -1, 0)
        else:
            raise DataError(self._not_segmentation(f"its output has shape {shape}, not a mask"))
        if scores.shape[1] < 8 or scores.shape[2] < 8 or scores.shape[0] > 8:
            raise DataError(self._not_segmentation(f"its output has shape {shape}, not a mask"))
        if scores.shape[0] > 1:
            return scores.argmax(axis=0) > 0
        probabilities = scores.min() >= 0.0 and scores.max() <= 1.0
        return scores[0] > (0.5 if probabilities else 0.0)

    def check(self) -> None:
        """Run once on a blank picture: a wrong output is refused now, not halfway through a cache build."""
        self.mask(np.zeros((self.size, self.size), dtype=np.uint8))

    def find(self, gray: np.ndarray, margin: float) -> CropBox:
        mask = self.mask(gray)
        if not mask.any():
            return full_picture(gray, "onnx", fallback=True)
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        scale_y, scale_x = gray.shape[0] / mask.shape[0], gray.shape[1] / mask.shape[1]
        box = (cols[0] * scale_x, rows[0] * scale_y, (cols[-1] + 1) * scale_x, (rows[-1] + 1) * scale_y)
        return _box_with_margin(gray, box, margin, "onnx")


_SEGMENTERS: dict[tuple[str, str], LungSegmenter] = {}


def segmenter(spec: CropSpec) -> LungSegmenter:
    """The spec's network, loaded once per process (cache-building workers call this for every picture)."""
    key = (spec.model, spec.model_sha256)
    if key not in _SEGMENTERS:
        _SEGMENTERS[key] = LungSegmenter(spec.model, spec.model_size)
    return _SEGMENTERS[key]


def find_box(gray: np.ndarray, spec: CropSpec) -> CropBox:
    """The crop of one decoded picture as ``spec`` asks (the full picture for no crop)."""
    if not spec.active:
        return full_picture(gray, "full", fallback=False)
    if spec.model:
        return segmenter(spec).find(gray, spec.margin)
    return find_lungs(gray, spec.margin)


def crop_gray(gray: np.ndarray, spec: CropSpec) -> tuple[np.ndarray, CropBox]:
    box = find_box(gray, spec)
    return box.apply(gray), box


# -- boxes on the cropped pictures -------------------------------------------------------------------------------


@dataclass(frozen=True)
class MappedBox:
    box: Box | None  #: in the prepared picture's pixels; None when the crop cut it away entirely
    clipped: bool  #: part of it lay outside the crop


def map_box(box: Box, crop: CropBox, size: int) -> MappedBox:
    """An NIH box (in the stored picture's pixels) on the cropped picture resized to ``size x size``."""
    x0, y0 = max(box.x, crop.x), max(box.y, crop.y)
    x1, y1 = min(box.x + box.w, crop.x + crop.w), min(box.y + box.h, crop.y + crop.h)
    if x1 <= x0 or y1 <= y0:
        return MappedBox(None, True)
    clipped = (x0, y0, x1, y1) != (box.x, box.y, box.x + box.w, box.y + box.h)
    fx, fy = size / crop.w, size / crop.h
    x, y, w, h = (x0 - crop.x) * fx, (y0 - crop.y) * fy, (x1 - x0) * fx, (y1 - y0) * fy
    return MappedBox(Box(box.image, box.label, x, y, w, h, size, size), clipped)


# -- crop_boxes.csv --------------------------------------------------------------------------------------------


def boxes_csv(files: list[str], boxes: list[CropBox]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(BOXES_HEADER)
    for name, box in zip(files, boxes):
        writer.writerow([name, box.x, box.y, box.w, box.h, box.method, int(box.fallback)])
    return out.getvalue()


def read_boxes_csv(path: Path) -> dict[str, CropBox]:
    """``crop_boxes.csv`` -> ``{image: CropBox}``; a malformed file is one line naming it."""
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            rows = list(csv.reader(handle))
        if not rows or tuple(rows[0]) != BOXES_HEADER:
            raise ValueError(f"header is not {','.join(BOXES_HEADER)}")
        return {r[0]: CropBox(int(r[1]), int(r[2]), int(r[3]), int(r[4]), r[5], bool(int(r[6]))) for r in rows[1:] if r}
    except (OSError, ValueError, IndexError) as exc:
        raise DataError(f"{path}: unreadable crop boxes ({first_line(exc)})") from None


# -- the export's metadata -----------------------------------------------------------------------------------------

CROP_KEY = "cxrbench.crop"


def crop_metadata(spec: CropSpec) -> dict[str, str]:
    """What ``cxrbench predict``/``serve`` need to crop a picture as the model's training pictures were."""
    return {CROP_KEY: json.dumps(spec.describe(), sort_keys=True)}


def spec_from_metadata(metadata: dict[str, str], where: str, crop_model: str | None = None) -> CropSpec:
    """The crop an export was trained with (no key: none, as for exports made before cropping existed).

    A network's crop needs the same network (``--crop-model``, else the path recorded at training time), checked
    by its sha256.
    """
    from cxrbench.files import sha256_of

    if CROP_KEY not in metadata:
        return CropSpec()
    try:
        recorded = json.loads(metadata[CROP_KEY])
        spec = CropSpec(
            recorded["method"],
            float(recorded["margin"]),
            recorded.get("model", ""),
            recorded.get("model_sha256", ""),
            int(recorded.get("model_size", 0)),
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise CxrError(f"{where}: metadata {CROP_KEY!r} is malformed ({first_line(exc)})") from None
    if not spec.model:
        return spec
    path = Path(crop_model or spec.model)
    if not path.is_file():
        raise CxrError(
            f"{where}: trained on crops by the lung-segmentation model {spec.model} (sha256 {spec.model_sha256[:16]}), "
            "which is not there: pass it with --crop-model PATH"
        )
    if sha256_of(path) != spec.model_sha256:
        raise CxrError(f"{path}: not the lung-segmentation model {where} was trained with (sha256 differs)")
    return CropSpec(spec.method, spec.margin, str(path), spec.model_sha256, spec.model_size)
