"""Prepared images plus the core's batch order: what every backend trains and evaluates on.

The per-epoch sample order and the horizontal-flip decisions are derived from the seed alone, so
every backend, every rank and every later run sees the same batches. Flips are applied here, on
the host, to the uint8 images; backends normalise on their device.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cxrbench.data.crop import CropBox, map_box
from cxrbench.data.index import Box, DataIndex

#: Streams of the seeded generator, so order and flips never share random numbers.
_ORDER_STREAM, _FLIP_STREAM = 1, 2


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """Positions ``0..n-1`` in the order epoch ``epoch`` (1-based) visits them."""
    if not shuffle:
        return np.arange(n)
    return np.random.default_rng([seed, epoch, _ORDER_STREAM]).permutation(n)


def flip_decisions(n: int, seed: int, epoch: int, probability: float = 0.5) -> np.ndarray:
    """Whether position ``i`` is mirrored left-right in epoch ``epoch``."""
    return np.random.default_rng([seed, epoch, _FLIP_STREAM]).random(n) < probability


def count_batches(n: int, batch_size: int, world: int = 1, drop_last: bool = True, max_steps: int = 0) -> int:
    """Steps an epoch over ``n`` images takes at ``batch_size`` per rank on ``world`` ranks."""
    global_batch = batch_size * world
    steps = n // global_batch if drop_last else -(-n // global_batch)
    return min(steps, max_steps) if max_steps else steps


@dataclass(frozen=True)
class Batch:
    images: np.ndarray  #: uint8 (B, S, S), flips applied
    labels: np.ndarray  #: float32 (B, C)
    positions: np.ndarray  #: positions within the split (for tracing and tests)


@dataclass
class PreparedData:
    """A data index with its decoded images (a memory-mapped uint8 array from the cache)."""

    index: DataIndex
    images: np.ndarray  #: uint8 (N, S, S), rows aligned with ``index``
    key: str  #: the cache key (changes when any input changes)
    #: ``data.crop``: each picture's crop in its own pixels, by file name (None: the full pictures)
    crop_boxes: dict[str, CropBox] | None = None

    @classmethod
    def in_memory(
        cls, images: np.ndarray, labels: np.ndarray, split: np.ndarray, key: str, source: str = "in-memory"
    ) -> PreparedData:
        """Prepared data from arrays (one patient per image): for tests and for plugins' own checks."""
        n = len(images)
        files = [f"{i + 1:08d}_000.png" for i in range(n)]
        index = DataIndex(
            root=Path(f"<{source}>"),
            source=source,
            files=files,
            paths=[Path(f) for f in files],
            labels=np.asarray(labels, dtype=np.uint8),
            patients=np.arange(1, n + 1, dtype=np.int64),
            views=["PA"] * n,
            split=np.asarray(split),
        )
        return cls(index=index, images=images, key=key)

    @property
    def size(self) -> int:
        return int(self.images.shape[1])

    def rows(self, split: str) -> np.ndarray:
        return self.index.rows(split)

    def split_images(self, split: str) -> np.ndarray:
        return self.images[self.rows(split)]

    def split_labels(self, split: str) -> np.ndarray:
        return self.index.labels[self.rows(split)].astype(np.float32)

    def num_batches(
        self, split: str, batch_size: int, world: int = 1, drop_last: bool = True, max_steps: int = 0
    ) -> int:
        return count_batches(len(self.rows(split)), batch_size, world, drop_last, max_steps)

    def batches(
        self,
        split: str,
        batch_size: int,
        *,
        epoch: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        hflip: bool = False,
        rank: int = 0,
        world: int = 1,
        drop_last: bool = True,
        max_steps: int = 0,
        loader_worker: int = 0,
        loader_workers: int = 1,
    ) -> Iterator[Batch]:
        """Yield this rank's batches of one epoch.

        The global batch is ``batch_size * world``; rank ``r`` takes slice ``r`` of every global
        batch, so the ranks' batches concatenated are exactly the single-process batch of size
        ``batch_size * world``. Training uses ``drop_last`` so every rank takes the same number of
        equal-sized steps. Loader worker ``w`` of ``loader_workers`` assembles only steps ``w, w + W, ...``
        and reads no image of the others (a DataLoader collects its workers round-robin: the order is kept).
        """
        rows = self.rows(split)
        labels = self.index.labels
        order = epoch_order(len(rows), seed, epoch, shuffle)
        flips = flip_decisions(len(rows), seed, epoch) if hflip else np.zeros(len(rows), dtype=bool)
        global_batch = batch_size * world
        for step in range(
            loader_worker, self.num_batches(split, batch_size, world, drop_last, max_steps), loader_workers
        ):
            chunk = order[step * global_batch : (step + 1) * global_batch]
            mine = chunk[rank * batch_size : (rank + 1) * batch_size]
            if len(mine) == 0:
                continue
            take = rows[mine]
            sort = np.argsort(take)  # memory-mapped reads are fastest in file order
            images = np.empty((len(take), self.size, self.size), dtype=np.uint8)
            images[sort] = self.images[take[sort]]
            flip = flips[mine]
            images[flip] = images[flip, :, ::-1]
            yield Batch(images, labels[take].astype(np.float32), mine)

    def boxes(self, split: str = "test") -> list[tuple[int, Box]]:
        """``(position within split, box in prepared-image pixels)`` for the split's boxed images."""
        return self.mapped_boxes(split)[0]

    def mapped_boxes(self, split: str = "test") -> tuple[list[tuple[int, Box]], dict[str, int]]:
        """:meth:`boxes`, and how the crop treated them: ``{"boxes", "clipped", "outside"}`` (a box the crop cut is
        clipped to it; one entirely outside the crop is left out)."""
        rows = self.rows(split)
        position = {int(r): i for i, r in enumerate(rows)}
        row_of = self.index.row_of()
        out, clipped, outside = [], 0, 0
        for box in self.index.boxes:
            row = row_of.get(box.image)
            if row is None or row not in position:
                continue
            if self.crop_boxes is None:
                out.append((position[row], box.resized(self.size)))
                continue
            mapped = map_box(box, self.crop_boxes[box.image], self.size)
            clipped += mapped.clipped and mapped.box is not None
            outside += mapped.box is None
            if mapped.box is not None:
                out.append((position[row], mapped.box))
        return out, {"boxes": len(out), "clipped": int(clipped), "outside": int(outside)}
