"""The data set index: one row per image, labels in the CheXNet class order, patient, split, boxes."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cxrbench.data.classes import CLASSES

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Box:
    """A radiologist's (or the phantom's) box, in pixels of the image as stored on disk.

    ``x, y`` is the top-left corner, ``w, h`` the size: NIH's ``Bbox [x,y,w,h]``, scaled from
    the 1024-pixel frame to the file's actual ``frame_w x frame_h`` pixels.
    """

    image: str
    label: str  #: a name from CLASSES (``Infiltrate`` already mapped to ``Infiltration``)
    x: float
    y: float
    w: float
    h: float
    frame_w: int  #: width of the image file the box refers to
    frame_h: int

    def resized(self, size: int) -> Box:
        """The same box on the image resized to ``size x size`` (the prepared cache)."""
        fx, fy = size / self.frame_w, size / self.frame_h
        return Box(self.image, self.label, self.x * fx, self.y * fy, self.w * fx, self.h * fy, size, size)


@dataclass
class DataIndex:
    """Everything known about a data set before any pixel is decoded.

    Rows are sorted by file name, so the same folder always gives the same index.
    """

    root: Path
    source: str  #: "chestxray14", "phantom", or a plugin's name
    files: list[str]  #: ``Image Index`` file names
    paths: list[Path]  #: where each file was found (flat ``images/`` or ``images_0XX/images/``)
    labels: np.ndarray  #: uint8 (N, len(CLASSES)); all zero means No Finding
    patients: np.ndarray  #: int64 (N,)
    views: list[str]  #: "PA" / "AP"
    split: np.ndarray  #: str (N,), one of SPLITS, patient-disjoint
    boxes: list[Box] = field(default_factory=list)
    classes: tuple[str, ...] = CLASSES
    #: Notes for the user (e.g. "excluded 12 images listed in quality.txt").
    notes: list[str] = field(default_factory=list)
    #: Files listed in the metadata but found in no images folder (dropped from the rows).
    missing: list[str] = field(default_factory=list)
    #: Files dropped by the exclusion list.
    excluded: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.files)

    def rows(self, split: str) -> np.ndarray:
        """Row numbers of a split, in index order."""
        return np.flatnonzero(self.split == split)

    def row_of(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.files)}
