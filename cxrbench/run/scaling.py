"""``--gpus`` and ``--nodes``: a count or a sweep (``1,2,4``), the refusal when the machine has fewer GPUs, and the
scaling table (images/s, efficiency against 1 GPU and against 1 node, utilisation per GPU, and the global batch,
learning rate and BatchNorm mode each point trained with) of a sweep."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from cxrbench.data.prepared import count_batches
from cxrbench.errors import CxrError
from cxrbench.files import read_json
from cxrbench.run.folder import MONITOR_JSON, THROUGHPUT_JSON, TRAIN_JSON, gpus_folder, nodes_folder
from cxrbench.suite import Settings


def parse_gpus(text: str | None, option: str = "--gpus") -> list[int] | None:
    """``"1,2,4"`` -> ``[1, 2, 4]``; ``None`` (not given) -> None: the suite's ``run.gpus`` (``run.nodes``) applies."""
    if text is None:
        return None
    try:
        counts = [int(part) for part in text.split(",")]
    except ValueError:
        raise CxrError(f"{option} {text!r}: expected a count or a comma-separated sweep such as 1,2,4") from None
    if any(n < 1 for n in counts) or len(set(counts)) != len(counts):
        raise CxrError(f"{option} {text!r}: counts must be distinct whole numbers >= 1")
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
        device: fields["util"]
        for device, fields in devices.items()
        if device.rsplit(":", 1)[-1].startswith("gpu") and "util" in fields
    }


#: What each point of the table trained with, from its numerics record (train.json).
RECORDED = ("global_batch", "learning_rate", "lr_scaling", "batchnorm_sync")


def _entry(folder: Path, nodes: int, gpus: int) -> dict[str, Any]:
    numerics = (read_json(folder / TRAIN_JSON) or {}).get("numerics") or {}
    return {
        "nodes": nodes,
        "gpus": gpus,
        "replicas": nodes * max(1, gpus),
        "images_per_s": (read_json(folder / THROUGHPUT_JSON) or {}).get("train_images_per_s"),
        "gpu_util": _train_gpu_util(read_json(folder / MONITOR_JSON)),
        **{key: numerics.get(key) for key in RECORDED},
    }


def _efficiency(entry: dict[str, Any], base: dict[str, Any] | None) -> float | None:
    """Throughput against ``base`` scaled by the replicas: 1.0 is perfect linear scaling."""
    if not base or not base["images_per_s"] or entry["images_per_s"] is None:
        return None
    return entry["images_per_s"] / (entry["replicas"] / base["replicas"] * base["images_per_s"])


def scaling_table(
    run_dir: Path, backends: list[str], counts: list[int], node_counts: list[int] | None = None
) -> dict[str, list[dict[str, Any]]] | None:
    """Images/s per point of ``--gpus`` (on the first node count) and of ``--nodes`` (at the first GPU count).

    ``efficiency``: against the smallest GPU count, N / N0 x its throughput; ``efficiency_vs_1_gpu``: against the
    point with one replica, when the sweep has it; ``efficiency_vs_1_node``: a multi-node point against the
    single-node point at the same GPUs per node, when the sweep has it.
    """
    node_counts = node_counts or [1]
    if len(counts) < 2 and len(node_counts) < 2:
        return None
    table = {}
    for name in backends:
        entries = [_entry(gpus_folder(run_dir, name, n, counts[0]), node_counts[0], n) for n in counts]
        entries += [_entry(nodes_folder(run_dir, name, m, node_counts[0]), m, counts[0]) for m in node_counts[1:]]
        one_gpu = next((e for e in entries if e["replicas"] == 1), None)
        one_node = entries[0] if node_counts[0] == 1 else None
        for entry in entries:
            entry["efficiency"] = _efficiency(entry, entries[0]) if entry["nodes"] == node_counts[0] else None
            entry["efficiency_vs_1_gpu"] = _efficiency(entry, one_gpu)
            entry["efficiency_vs_1_node"] = _efficiency(entry, one_node) if entry["nodes"] > 1 else None
        table[name] = entries
    return table
