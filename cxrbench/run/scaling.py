"""``--gpus``: a GPU count or a sweep (``1,2,4``), the refusal when the machine has fewer, and the
scaling table (images/s, efficiency, utilisation per GPU) of a sweep."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from cxrbench.data.prepared import count_batches
from cxrbench.errors import CxrError
from cxrbench.files import read_json
from cxrbench.run.folder import MONITOR_JSON, THROUGHPUT_JSON, gpus_folder
from cxrbench.suite import Settings


def parse_gpus(text: str | None) -> list[int] | None:
    """``"1,2,4"`` -> ``[1, 2, 4]``; ``None`` (not given) -> None: the suite's ``run.gpus`` applies."""
    if text is None:
        return None
    try:
        counts = [int(part) for part in text.split(",")]
    except ValueError:
        raise CxrError(f"--gpus {text!r}: expected a count or a comma-separated sweep such as 1,2,4") from None
    if any(n < 1 for n in counts) or len(set(counts)) != len(counts):
        raise CxrError(f"--gpus {text!r}: counts must be distinct whole numbers >= 1")
    return sorted(counts)


def check_available(counts: list[int], inventory: dict[str, Any]) -> None:
    """Refuse, before any work, a count larger than the GPUs this machine has."""
    wanted, have = max(counts), inventory.get("count", 0)
    if wanted > have:
        why = f" ({inventory['reason']})" if inventory.get("reason") else ""
        if inventory.get("hidden"):
            why += f" ({inventory['hidden']} more hidden by CUDA_VISIBLE_DEVICES={inventory['cuda_visible_devices']!r})"
        raise CxrError(f"--gpus {','.join(map(str, counts))}: asked for {wanted} GPUs but this machine has {have}{why}")


def steps_per_epoch(train_images: int, batch_size: int, gpus: int, max_steps: int) -> int:
    return count_batches(train_images, batch_size, gpus, max_steps=max_steps)


def size_for_counts(settings: Settings, train_images: int, total_images: int, counts: list[int]) -> Settings:
    """Settings whose data gives every GPU count of a sweep the same steps per epoch (``train.max_steps``).

    A fixed image count would give 40/21/10/5 steps at 1/2/4/8 GPUs, and fixed costs (warm-up, the epoch's edges)
    would then decide the larger counts. The phantom data set is grown until the largest count runs
    ``train.max_steps`` full steps; real data that is too small is refused, naming what to change. Without
    ``train.max_steps`` an epoch is the whole training split at every count (a fixed image count, as asked).
    """
    train, largest = settings.train, max(counts)
    if len(counts) < 2 or not train.max_steps:
        return settings
    if steps_per_epoch(train_images, train.batch_size, largest, train.max_steps) == train.max_steps:
        return settings
    needed = train.max_steps * train.batch_size * largest
    if settings.data.source != "phantom":
        have = steps_per_epoch(train_images, train.batch_size, largest, train.max_steps)
        raise CxrError(
            f"--gpus {','.join(map(str, counts))}: at {largest} GPUs an epoch has {have} steps of "
            f"{train.batch_size}x{largest} images, fewer than train.max_steps = {train.max_steps}; equal steps per "
            f"epoch need {needed} training images (the data has {train_images}): lower train.max_steps or "
            "train.batch_size, or use fewer GPUs"
        )
    return grow_phantom(settings, needed, train_images, total_images)


def grow_phantom(settings: Settings, needed: int, train_images: int, total_images: int) -> Settings:
    """Phantom settings whose training split holds about ``needed`` images (the splits keep their proportions)."""
    share = train_images / total_images
    grown = math.ceil(needed / share * 1.02)  # 2 % head room: splits are drawn by patient
    return settings.replace(**{"data.phantom_images": max(grown, settings.data.phantom_images + 1)})


def _train_gpu_util(monitor: dict[str, Any] | None) -> dict[str, Any]:
    devices = ((monitor or {}).get("phases") or {}).get("train", {})
    return {
        device: fields["util"] for device, fields in devices.items() if device.startswith("gpu") and "util" in fields
    }


def scaling_table(run_dir: Path, backends: list[str], counts: list[int]) -> dict[str, list[dict[str, Any]]] | None:
    """Images/s per count; efficiency = throughput at N / (N / N0 x throughput at N0), N0 the smallest count."""
    if len(counts) < 2:
        return None
    table = {}
    for name in backends:
        entries = []
        for n in counts:
            folder = gpus_folder(run_dir, name, n, counts[0])
            throughput = (read_json(folder / THROUGHPUT_JSON) or {}).get("train_images_per_s")
            utilisation = _train_gpu_util(read_json(folder / MONITOR_JSON))
            entries.append({"gpus": n, "images_per_s": throughput, "gpu_util": utilisation})
        base = entries[0]["images_per_s"]
        for entry in entries:
            measured = entry["images_per_s"] is not None and base
            entry["efficiency"] = entry["images_per_s"] / (entry["gpus"] / counts[0] * base) if measured else None
        table[name] = entries
    return table
