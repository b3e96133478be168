"""Training: a torch :class:`~cxrbench.backend.training.EpochLoop` under the core's ``run_recipe``.

The same loop serves one process and each rank of several (:mod:`cxrbench_pytorch.distributed`):
with ``world > 1`` it reads its shard of the core's batches and averages per-step losses and the
validation loss over the ranks, so every rank takes the same schedule decisions.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from cxrbench.backend import (
    Batch,
    EpochOutcome,
    PreparedData,
    Recorder,
    Settings,
    run_recipe,
    scaled_learning_rate,
    steps_per_epoch,
    train_batches,
    train_epoch,
    validation_loss,
)
from cxrbench_pytorch import numerics
from cxrbench_pytorch.model import TorchModel


class CoreBatches(IterableDataset):
    """The core's batches of one epoch as tensors, in the core's order.

    With several loader workers, worker ``w`` of ``W`` asks the core for steps ``w, w + W, ...`` only
    (it reads no image of the others); the DataLoader collects from its workers round-robin, which
    restores the core's order. ``make_batches(loader_worker=, loader_workers=)`` makes the iterator.
    """

    def __init__(self, make_batches: Callable[..., Iterable[Batch]]):
        self.make_batches = make_batches

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        worker = get_worker_info()
        shard = {"loader_worker": worker.id, "loader_workers": worker.num_workers} if worker is not None else {}
        for batch in self.make_batches(**shard):
            yield torch.from_numpy(batch.images), torch.from_numpy(batch.labels)


def uses_dataloader(workers: int, pin: bool) -> bool:
    """A DataLoader only when it has work to do (worker processes, pinned memory): on CPUs its
    per-epoch worker start made short epochs slower than plain iteration (tests/benchmarks)."""
    return bool(workers or pin)


def pipeline_name(workers: int, pin: bool) -> str:
    return f"DataLoader(workers={workers}, pin_memory={pin})" if uses_dataloader(workers, pin) else "plain iteration"


def input_pipeline(make_batches: Callable[..., Iterable[Batch]], workers: int, pin: bool) -> Iterable:
    dataset = CoreBatches(make_batches)
    if not uses_dataloader(workers, pin):
        return dataset
    return DataLoader(dataset, batch_size=None, num_workers=workers, pin_memory=pin)


class TorchEpochLoop:
    """One epoch of Adam on BCE-with-logits, validation, and weight snapshots, for ``run_recipe``."""

    def __init__(
        self,
        model: TorchModel,
        data: PreparedData,
        settings: Settings,
        recorder: Recorder,
        train_net: nn.Module,
        rank: int = 0,
        world: int = 1,
    ):
        self.model, self.data, self.settings, self.recorder = model, data, settings, recorder
        self.train_net, self.rank, self.world = train_net, rank, world
        train = settings.train
        # Fused on CUDA: one kernel per step, and with fp16 GradScaler's inf check stays on the device (the
        # unfused path calls .item() every step, a host sync that would understate fp16's speed).
        self.optimizer = torch.optim.Adam(
            model.net.parameters(),
            lr=train.learning_rate,
            betas=(train.adam_beta1, train.adam_beta2),
            eps=train.adam_epsilon,
            weight_decay=train.weight_decay,
            fused=model.device.type == "cuda" or None,
        )
        self.scaler = numerics.grad_scaler(model.device, settings.numerics.precision)
        self.autocast = functools.partial(numerics.autocast, model.device, settings.numerics.precision)
        self.pin = settings.numerics.pin_memory and model.device.type == "cuda"
        self.loader_name = pipeline_name(settings.numerics.loader_workers, self.pin)

    def sync(self) -> None:
        if self.model.device.type == "cuda":
            torch.cuda.synchronize(self.model.device)

    def train_epoch(self, epoch: int, lr: float) -> EpochOutcome:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.net.train()
        batch_size = self.settings.train.batch_size
        make = functools.partial(train_batches, self.data, self.settings, epoch, rank=self.rank, world=self.world)
        batches = input_pipeline(make, self.settings.numerics.loader_workers, self.pin)
        with numerics.oom_as_backend_error(self.model.device, batch_size, "training"):
            return train_epoch(
                self.recorder,
                batches,
                lambda pair: self._step(*pair),
                epoch=epoch,
                steps=steps_per_epoch(self.data, self.settings, self.world),
                sync=self.sync,
                images=batch_size * self.world,
                fetch=self._mean_over_ranks,
            )

    def _step(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = self.model.inputs(images)
        y = labels.to(self.model.device, non_blocking=True)
        with self.autocast():
            loss = F.binary_cross_entropy_with_logits(self.train_net(x).float(), y)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss.detach()

    def _mean_over_ranks(self, losses: list[torch.Tensor]) -> np.ndarray:
        """Per-step losses of the global batch, fetched from the device once per epoch."""
        stacked = torch.stack(losses)
        if self.world > 1:
            dist.all_reduce(stacked)
            stacked /= self.world
        return stacked.cpu().numpy()

    def validate(self) -> float:
        """The core's validation loss over this rank's shard, summed over the ranks."""
        net = self.model.net  # never the DDP wrapper: ranks may run different numbers of batches here
        net.eval()
        with (
            torch.inference_mode(),
            numerics.oom_as_backend_error(self.model.device, self.settings.train.batch_size, "validating"),
        ):
            return validation_loss(
                self.recorder,
                self.data,
                self.settings,
                self._summed_loss,
                self.sync,
                self._total_over_ranks,
                rank=self.rank,
                world=self.world,
            )

    def _summed_loss(self, batch: Batch) -> torch.Tensor:
        with self.autocast():
            logits = self.model.net(self.model.inputs(torch.from_numpy(batch.images)))
        labels = torch.from_numpy(batch.labels).to(self.model.device, non_blocking=True)
        return F.binary_cross_entropy_with_logits(logits.float(), labels, reduction="sum").double()

    def _total_over_ranks(self, sums: list[torch.Tensor], images: int) -> tuple[float, int]:
        """The summed loss and image count over every rank, in one transfer from the device."""
        summed = torch.stack(sums).sum() if sums else torch.zeros((), dtype=torch.float64, device=self.model.device)
        total = torch.stack([summed, summed.new_tensor(images)])
        if self.world > 1:
            dist.all_reduce(total)
        summed_all, images_all = total.tolist()
        return summed_all, int(images_all)

    def snapshot(self) -> dict[str, torch.Tensor]:
        return {name: tensor.detach().clone() for name, tensor in self.model.net.state_dict().items()}

    def restore(self, snapshot: dict[str, torch.Tensor]) -> None:
        self.model.net.load_state_dict(snapshot)


def train(
    model: TorchModel,
    data: PreparedData,
    settings: Settings,
    recorder: Recorder,
    *,
    rank: int = 0,
    world: int = 1,
    train_net: nn.Module | None = None,
    **record: str,
) -> dict[str, Any]:
    """Run the core's recipe; return its result plus the core's numerics record (``record``: DDP's part of it)."""
    net = train_net if train_net is not None else model.net
    if settings.numerics.compile:
        net = torch.compile(net)
    loop = TorchEpochLoop(model, data, settings, recorder, net, rank, world)
    with numerics.peak_memory(model.device) as peak:
        result = run_recipe(loop, settings, recorder, world=world)
    in_force = numerics.describe(
        settings,
        model.net,
        model.device,
        world,
        scaled_learning_rate(settings, world),
        scaler=loop.scaler,
        compiled=settings.numerics.compile,
        loader=loop.loader_name,
        optimizer=loop.optimizer,
        **record,
    )
    return {**result, "numerics": in_force, "peak_memory": peak}
