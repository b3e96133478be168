"""The phantom data set: NIH ChestX-ray14's exact on-disk format, filled with synthetic chest images.

Every positive label draws a visible, localised finding at a class-specific place of a chest-like
background (body, two darker lung fields with rib texture, mediastinum, heart, diaphragm, noise),
every finding centred inside the box of the two lung fields (:data:`LUNG_FIELDS`, so a lung crop keeps it),
so that a from-scratch DenseNet learns it in one short epoch at 64 px and CAM can find it; the
true box of every finding of every test image goes into ``BBox_List_2017.csv``. To keep it from
being trivial, the whole anatomy shifts and scales per image, findings jitter in place, size and
contrast, faint distractor blobs appear anywhere, and gain, offset and noise vary.

Labels follow NIH's prevalence ranking and typical co-occurrences, except that rare classes are
lifted to :data:`RARE_FLOOR` of all findings: NIH's 0.2 % Hernia would leave a 600-image data set
without a single positive in validation or test, and AUROC undefined. The same seed always
writes the same bytes.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from cxrbench.data import splits
from cxrbench.data.cache import ProgressReport, cache_root
from cxrbench.data.classes import CLASSES, NO_FINDING
from cxrbench.data.nih import BOX_FILE, BOX_FRAME, BOX_LABEL_ALIASES, TEST_LIST, TRAIN_VAL_LIST
from cxrbench.errors import DataError

#: Part of the default data set's folder name: bump it whenever the output changes.
GENERATOR_VERSION = 4
ENTRY_FILE = "Data_Entry_2017.csv"  #: the 2017 variant, with its trailing comma
ENTRY_HEADER = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
    "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],"
)
BOX_HEADER = "Image Index,Finding Label,Bbox [x,y,w,h],,,"
MIN_IMAGES, MIN_SIZE = 20, 32

#: Finding per class: centre x, y and spread sx, sy (fractions of the chest frame), amplitude
#: (fraction of full scale; negative = darker, like air). The box spans +- BOX_SIGMAS spreads, so
#: most boxes are NIH-sized: a quarter to over a third of the image side (Nodule stays small).
#: Findings sit towards the periphery, as most NIH boxes do, and frequent co-occurring pairs share a
#: side (compressive Atelectasis next to Effusion, Pneumonia next to Infiltration): training flips
#: images left-right, so only the heart's side tells a model which lung it is looking at, and a pair
#: split across the two sides would let one finding's map point at the other's lung.
FINDINGS: dict[str, tuple[float, float, float, float, float]] = {
    "Atelectasis": (0.68, 0.70, 0.090, 0.055, 0.45),  # right lower lung above the effusion, flat band
    "Cardiomegaly": (0.54, 0.64, 0.110, 0.085, 0.36),  # over the heart, large
    "Effusion": (0.80, 0.82, 0.085, 0.065, 0.42),  # right costophrenic angle
    "Infiltration": (0.75, 0.34, 0.095, 0.095, 0.40),  # right upper/mid lung, large
    "Mass": (0.22, 0.28, 0.075, 0.075, 0.45),  # left upper lung
    "Nodule": (0.68, 0.26, 0.022, 0.022, 0.55),  # right upper lung, small and bright
    "Pneumonia": (0.80, 0.40, 0.070, 0.095, 0.40),  # right mid-lung, lateral, tall
    "Pneumothorax": (0.20, 0.20, 0.090, 0.070, -0.30),  # left apex, dark
    "Consolidation": (0.22, 0.72, 0.080, 0.080, 0.42),  # left lower lung
    "Edema": (0.50, 0.44, 0.110, 0.060, 0.38),  # perihilar, wide
    "Emphysema": (0.28, 0.52, 0.075, 0.050, -0.35),  # left mid-lung, below the pneumothorax, dark
    "Fibrosis": (0.30, 0.20, 0.070, 0.080, 0.40),  # left upper zone, tall
    "Pleural_Thickening": (0.13, 0.45, 0.025, 0.120, 0.40),  # left chest wall, thin
    "Hernia": (0.50, 0.84, 0.080, 0.035, 0.40),  # at the diaphragm, behind the heart
}
#: Label counts of NIH's Data_Entry_2017_v2020.csv, the prevalence ranking the phantom follows.
#: The two lung fields: centre x, y and radii (fractions of the chest frame), darker than the body around them,
#: which separates them from the air outside the body.
LUNG_FIELDS = ((0.29, 0.48, 0.20, 0.40), (0.71, 0.48, 0.20, 0.40))
NIH_COUNTS = dict(zip(CLASSES, (11559, 2776, 13317, 19894, 5782, 6331, 1431, 5302, 4667, 2303, 2516, 1686, 3385, 227)))
RARE_FLOOR = 0.035  #: minimum share of all findings per class
NO_FINDING_SHARE = 0.5
FINDINGS_PER_IMAGE = {1: 0.55, 2: 0.30, 3: 0.15}  #: for abnormal images
#: Pairs that co-occur more often than chance (weight multiplier for the second finding).
CO_OCCURRENCE = {
    ("Effusion", "Atelectasis"): 4.0,
    ("Effusion", "Infiltration"): 3.0,
    ("Infiltration", "Atelectasis"): 3.0,
    ("Mass", "Nodule"): 4.0,
    ("Edema", "Effusion"): 4.0,
    ("Cardiomegaly", "Effusion"): 4.0,
    ("Pneumonia", "Infiltration"): 4.0,
    ("Consolidation", "Infiltration"): 3.0,
    ("Emphysema", "Pneumothorax"): 4.0,
    ("Fibrosis", "Pleural_Thickening"): 4.0,
}
PERSISTENCE = 0.5
TEST_SHARE = 0.22
AP_SHARE = 0.4
BOX_SIGMAS = 2.0  #: a finding's box spans its centre +- this many spreads
_BOX_SPELLING = {ours: nih for nih, ours in BOX_LABEL_ALIASES.items()}


def synthesize(out: Path, images: int, size: int, seed: int, *, progress: bool = False) -> Path:
    """Write a phantom data set of ``images`` PNGs of ``size x size`` pixels into ``out``.

    ``progress`` draws a progress line on stderr (the CLI's ``data synth``).
    """
    out = Path(out)
    _validate(out, images, size)
    rng = np.random.default_rng(seed)
    patients, follow_ups = _patients(rng, images)
    labels = _persist(rng, _labels(rng, images), follow_ups)
    views = np.where(rng.random(images) < AP_SHARE, "AP", "PA")
    names = [f"{p:08d}_{f:03d}.png" for p, f in zip(patients, follow_ups)]
    shares = {"train_val": 1 - TEST_SHARE, "test": TEST_SHARE}
    test = splits.stratified_patients(patients, labels, shares, seed) == "test"
    (out / "images").mkdir(parents=True, exist_ok=True)
    boxes = []
    report = ProgressReport(images, "writing phantom images") if progress else None
    for i, name in enumerate(names):
        pixels, found = render(rng, size, labels[i], views[i] == "AP")
        Image.fromarray(pixels).save(out / "images" / name, format="PNG")
        if test[i]:
            boxes += [(name, label, box) for label, box in found]
        if report:
            report.advance(1)
    _write_entries(out, rng, names, labels, patients, follow_ups, views, size)
    _write_boxes(out, boxes)
    _write_list(out / TRAIN_VAL_LIST, [n for n, t in zip(names, test) if not t])
    _write_list(out / TEST_LIST, [n for n, t in zip(names, test) if t])
    if report:
        report.finish()
    return out


def ensure_default(images: int, size: int, seed: int) -> Path:
    """The embedded default data set, generated once into the user cache and reused afterwards.

    Built in a temporary folder and renamed into place, so a crash or a concurrent run never
    leaves a half-written data set under the final name.
    """
    target = cache_root() / f"phantom-v{GENERATOR_VERSION}-{images}-{size}-{seed}"
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        synthesize(building, images, size, seed)
        os.rename(building, target)
    except OSError:
        if not target.is_dir():  # another process finishing first is fine; anything else is not
            raise
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return target


def _validate(out: Path, images: int, size: int) -> None:
    if images < MIN_IMAGES:
        raise DataError(f"phantom images = {images}: at least {MIN_IMAGES} needed so every split has patients")
    if size < MIN_SIZE:
        raise DataError(f"phantom size = {size}: at least {MIN_SIZE} pixels needed")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"{out}: exists and is not an empty folder")


def _patients(rng: np.random.Generator, images: int) -> tuple[np.ndarray, np.ndarray]:
    """Patient id and follow-up number per image: 1-8 follow-ups per patient (NIH averages 3.6)."""
    per_patient = np.minimum(rng.geometric(0.35, size=images), 8)
    per_patient = per_patient[: np.searchsorted(np.cumsum(per_patient), images) + 1]
    patients = np.repeat(np.arange(1, len(per_patient) + 1), per_patient)[:images]
    follow_ups = np.concatenate([np.arange(n) for n in per_patient])[:images]
    return patients, follow_ups


def _class_weights() -> np.ndarray:
    share = np.array([NIH_COUNTS[c] for c in CLASSES], dtype=float)
    share = np.maximum(share / share.sum(), RARE_FLOOR)
    return share / share.sum()


def _pair_boost() -> np.ndarray:
    boost = np.ones((len(CLASSES), len(CLASSES)))
    for (a, b), factor in CO_OCCURRENCE.items():
        i, j = CLASSES.index(a), CLASSES.index(b)
        boost[i, j] = boost[j, i] = factor
    return boost


def _labels(rng: np.random.Generator, images: int) -> np.ndarray:
    """uint8 (N, C): half No Finding, the rest 1-3 findings drawn with co-occurrence boosts."""
    weights, boost = _class_weights(), _pair_boost()
    counts = rng.choice(list(FINDINGS_PER_IMAGE), size=images, p=list(FINDINGS_PER_IMAGE.values()))
    abnormal = rng.random(images) >= NO_FINDING_SHARE
    labels = np.zeros((images, len(CLASSES)), dtype=np.uint8)
    for i in np.flatnonzero(abnormal):
        w = weights.copy()
        for _ in range(counts[i]):
            c = rng.choice(len(CLASSES), p=w / w.sum())
            labels[i, c] = 1
            w = w * boost[c]
            w[labels[i] == 1] = 0
    return labels


def _persist(rng: np.random.Generator, labels: np.ndarray, follow_ups: np.ndarray) -> np.ndarray:
    """A follow-up repeats its predecessor's findings with probability :data:`PERSISTENCE` (chronic disease)."""
    labels = labels.copy()
    repeat = (follow_ups > 0) & (rng.random(len(labels)) < PERSISTENCE)
    for i in np.flatnonzero(repeat):  # in order, so a chain of repeats carries the first image's findings
        labels[i] = labels[i - 1]
    return labels


def render(
    rng: np.random.Generator, size: int, labels: np.ndarray, ap: bool, frame: tuple | None = None
) -> tuple[np.ndarray, list]:
    """One image (uint8) and its findings' boxes ``[(label, (x, y, w, h) in the 1024 frame)]``.

    ``frame``: the anatomy's ``(shift, scale)`` (drawn from ``rng`` when not given), e.g. to compare a lung finder
    with :func:`lung_fields_box` of the same frame.
    """
    shift, scale = frame if frame is not None else (rng.uniform(-0.03, 0.03, size=2), rng.uniform(0.94, 1.06))
    grid = (np.arange(size) + 0.5) / size
    u = (grid[None, :] - 0.5 - shift[0]) / scale + 0.5  # chest-frame coordinates of each pixel
    v = (grid[:, None] - 0.5 - shift[1]) / scale + 0.5
    image = _anatomy(rng, u, v, ap)
    lungs = np.clip(sum(_ellipse(u, v, *field) for field in LUNG_FIELDS), 0.0, 1.0)
    boxes = []
    for c in np.flatnonzero(labels):
        cx, cy, sx, sy, amplitude = _jittered(rng, FINDINGS[CLASSES[c]])
        blob = _blob(u, v, cx, cy, sx, sy, amplitude)
        image += blob * lungs if amplitude < 0 else blob  # air (dark) findings stay in the lungs, not the chest wall
        boxes.append((CLASSES[c], _box(cx, cy, sx, sy, shift, scale)))
    for _ in range(rng.integers(0, 3)):  # faint distractors anywhere: not every bright spot is a finding
        cx, cy = rng.uniform(0.1, 0.9, size=2)
        image += _blob(u, v, cx, cy, *rng.uniform(0.015, 0.04, size=2), rng.uniform(-0.1, 0.12))
    image = image * rng.uniform(0.9, 1.1) + rng.uniform(-0.05, 0.05)
    image += rng.normal(0.0, 0.035, size=image.shape)
    return (np.clip(image, 0.0, 1.0) * 255 + 0.5).astype(np.uint8), boxes


def _jittered(rng: np.random.Generator, finding: tuple) -> tuple[float, ...]:
    cx, cy, sx, sy, amplitude = finding
    grow = rng.uniform(0.8, 1.25)
    dx, dy = rng.uniform(-0.03, 0.03, size=2)
    return cx + dx, cy + dy, sx * grow, sy * grow, amplitude * rng.uniform(0.75, 1.25)


def _blob(u, v, cx, cy, sx, sy, amplitude) -> np.ndarray:
    return amplitude * np.exp(-0.5 * (((u - cx) / sx) ** 2 + ((v - cy) / sy) ** 2))


def _ellipse(u, v, cx, cy, rx, ry, softness=0.08) -> np.ndarray:
    """A soft-edged ellipse mask in [0, 1]."""
    r = np.sqrt(((u - cx) / rx) ** 2 + ((v - cy) / ry) ** 2)
    return np.clip((1.0 - r) / softness, 0.0, 1.0)


def _anatomy(rng: np.random.Generator, u: np.ndarray, v: np.ndarray, ap: bool) -> np.ndarray:
    """Body, lungs with ribs, mediastinum, heart and diaphragm; AP views magnify the heart."""
    body = 0.42 * _ellipse(u, v, 0.5, 0.52, 0.52, 0.62)
    lungs = sum(_ellipse(u, v, *field) for field in LUNG_FIELDS)
    ribs = 0.05 * np.sin(2 * np.pi * (7.5 * v + 2.5 * (u - 0.5) ** 2 + rng.uniform()))
    mediastinum = 0.14 * _ellipse(u, v, 0.5, 0.45, 0.07, 0.42)
    heart_size = 1.12 if ap else 1.0
    heart = 0.12 * _ellipse(u, v, 0.54, 0.66, 0.12 * heart_size, 0.10 * heart_size)
    diaphragm = 0.10 * _ellipse(u, v, 0.5, 0.95, 0.42, 0.12)
    return 0.06 + body + lungs * (ribs - 0.2) + mediastinum + heart + diaphragm


def lung_fields_box(shift, scale) -> tuple[float, float, float, float]:
    """The box around both lung fields of an image drawn in ``(shift, scale)``: ``(x, y, w, h)``, image fractions."""
    to_image = lambda p, d: (p - 0.5) * scale + 0.5 + d  # noqa: E731
    x0 = to_image(min(cx - rx for cx, _, rx, _ in LUNG_FIELDS), shift[0])
    x1 = to_image(max(cx + rx for cx, _, rx, _ in LUNG_FIELDS), shift[0])
    y0 = to_image(min(cy - ry for _, cy, _, ry in LUNG_FIELDS), shift[1])
    y1 = to_image(max(cy + ry for _, cy, _, ry in LUNG_FIELDS), shift[1])
    return x0, y0, x1 - x0, y1 - y0


def _box(cx, cy, sx, sy, shift, scale) -> tuple[float, float, float, float]:
    """The finding's box in image coordinates of the 1024 frame, clipped to the image."""
    to_image = lambda p, d: (p - 0.5) * scale + 0.5 + d  # noqa: E731
    x0, x1 = (np.clip(to_image(cx + k * BOX_SIGMAS * sx, shift[0]), 0, 1) for k in (-1, 1))
    y0, y1 = (np.clip(to_image(cy + k * BOX_SIGMAS * sy, shift[1]), 0, 1) for k in (-1, 1))
    return tuple(float(t) * BOX_FRAME for t in (x0, y0, x1 - x0, y1 - y0))


def _write_entries(out, rng, names, labels, patients, follow_ups, views, size) -> None:
    ids, patient = np.unique(patients, return_inverse=True)  # age and gender belong to the patient
    ages = rng.integers(18, 86, size=len(ids))[patient] + follow_ups // 4  # follow-ups span a few years
    genders = np.where(rng.random(len(ids)) < 0.56, "M", "F")[patient]
    spacing = 0.143 * BOX_FRAME / size
    lines = [ENTRY_HEADER]
    for i, name in enumerate(names):
        found = "|".join(CLASSES[c] for c in np.flatnonzero(labels[i])) or NO_FINDING
        lines.append(
            f"{name},{found},{follow_ups[i]},{patients[i]},{ages[i]},{genders[i]},{views[i]},"
            f"{size},{size},{spacing:.3f},{spacing:.3f},"
        )
    (out / ENTRY_FILE).write_text("\n".join(lines) + "\n", encoding="utf-8")


def _write_boxes(out: Path, boxes: list) -> None:
    """NIH's box file: 6-field rows under the 9-field header, ``Infiltrate`` as NIH spells it."""
    lines = [BOX_HEADER]
    for name, label, (x, y, w, h) in boxes:
        lines.append(f"{name},{_BOX_SPELLING.get(label, label)},{x:.6f},{y:.6f},{w:.6f},{h:.6f}")
    (out / BOX_FILE).write_text("\n".join(lines) + "\n", encoding="utf-8")


def _write_list(path: Path, names: list[str]) -> None:
    path.write_text("".join(f"{n}\n" for n in names), encoding="utf-8")
