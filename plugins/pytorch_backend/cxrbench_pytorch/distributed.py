"""Several devices: DistributedDataParallel, one process per device, started from ``cxrbench_train``.

The parent writes the model's weights to a temporary ``.npz``, spawns one process per rank (NCCL
on GPUs, gloo on CPUs), forwards rank 0's recorder events to its own recorder while they train,
and loads rank 0's final weights back into its model. Each rank trains on its slice of every
global batch (``data.batches(rank=r, world=w)``) with synchronised BatchNorm, so the ranks
together compute what one process computes on the concatenated batch.
"""

from __future__ import annotations

import contextlib
import inspect
import mmap
import os
import queue
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.multiprocessing as mp
from torch import nn
from torch.multiprocessing.spawn import ProcessException
from torch.nn.parallel import DistributedDataParallel

from cxrbench.backend import BackendError, CxrError, EpochRecord, PreparedData, Recorder, Settings, canonical
from cxrbench_pytorch import loop
from cxrbench_pytorch import weights as tv_weights
from cxrbench_pytorch.model import TorchModel, build

INITIAL, FINAL, RENDEZVOUS = "initial.npz", "final.npz", "rendezvous"
POLL_S = 0.2


class AllReduceBatchNorm2d(nn.BatchNorm2d):
    """Synchronised BatchNorm for CPU ranks (gloo).

    torch's ``nn.SyncBatchNorm`` refuses CPU tensors ("expected input tensor to be on GPU", torch
    2.14), so on the CPU the batch statistics are summed over the ranks with the functional
    ``all_reduce``, which has autograd (its backward all-reduces the gradients, as SyncBatchNorm's
    does). Two passes (mean, then centred squares) keep float32 accurate.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        x32 = x.float()
        dims, shape = (0, 2, 3), (1, -1, 1, 1)
        count = x32.new_tensor([x32.numel() // x32.shape[1]])
        sums = funcol.all_reduce(torch.cat([x32.sum(dims), count]), "sum", dist.group.WORLD)
        total = sums[-1]
        mean = sums[:-1] / total
        centred = x32 - mean.view(shape)
        var = funcol.all_reduce((centred * centred).sum(dims), "sum", dist.group.WORLD) / total
        with torch.no_grad():
            self.num_batches_tracked += 1
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(var * total / (total - 1), self.momentum)
        out = centred * torch.rsqrt(var + self.eps).view(shape) * self.weight.view(shape) + self.bias.view(shape)
        return out.to(x.dtype)


def synchronise_batchnorm(net: nn.Module, device_type: str) -> str:
    """Replace every BatchNorm by its synchronised form, in place; return what was used."""
    if device_type == "cuda":
        nn.SyncBatchNorm.convert_sync_batchnorm(net)  # DenseNet's BatchNorms are children, replaced in place
        return "torch.nn.SyncBatchNorm"
    for parent in list(net.modules()):
        for name, child in parent.named_children():
            if type(child) is nn.BatchNorm2d:
                synced = AllReduceBatchNorm2d(child.num_features, child.eps, child.momentum).to(child.weight.device)
                synced.load_state_dict(child.state_dict())
                setattr(parent, name, synced)
    return "AllReduceBatchNorm2d (gloo all-reduce of batch statistics)"


def train(
    model: TorchModel, data: PreparedData, settings: Settings, recorder: Recorder, world: int, device_type: str = "cuda"
) -> dict[str, Any]:
    """Train ``model`` with ``world`` processes on ``device_type`` ("cuda": one GPU each; "cpu": gloo)."""
    if device_type == "cuda" and torch.cuda.device_count() < world:
        raise BackendError(f"run.gpus = {world}, but torch sees {torch.cuda.device_count()} CUDA GPU(s)")
    with tempfile.TemporaryDirectory(prefix="cxrbench-ddp-") as tmp:
        folder = Path(tmp)
        canonical.save(tv_weights.get(model.net), folder / INITIAL)
        events = mp.get_context("spawn").Queue()
        args = (world, device_type, settings, _portable(data), str(folder), events)
        with _released(model):
            job = mp.spawn(_rank_main, args=args, nprocs=world, join=False)
            try:
                result = _follow(job, events, recorder)
            finally:
                _stop_ranks(job)
        tv_weights.put(model.net, canonical.load(folder / FINAL), model.block_config, "rank 0's final weights")
    return result


@contextlib.contextmanager
def _released(model: TorchModel):
    """The parent's copy of the model off the GPU while the ranks train, so rank 0's device holds only rank 0.

    The parent's CUDA context stays (torch cannot release it), but its weights and cached blocks go; the model
    is back on its device afterwards, whatever happened.
    """
    if model.device.type != "cuda":
        yield
        return
    model.net.to("cpu")
    torch.cuda.empty_cache()
    try:
        yield
    finally:
        model.net.to(model.device, memory_format=model.memory_format)


def _stop_ranks(job: mp.ProcessContext, grace_s: float = 5.0) -> None:
    """Terminate ranks still alive (an interrupt, a failed rank's peers in a collective), then kill stragglers."""
    alive = [process for process in job.processes if process.is_alive()]
    for process in alive:
        process.terminate()
    for process in alive:
        process.join(grace_s)
        if process.is_alive():
            process.kill()
            process.join()


def _follow(job: mp.ProcessContext, events, recorder: Recorder) -> dict[str, Any]:
    """Replay rank 0's events on ``recorder`` until every rank has exited; return or raise the outcome."""
    outcome: dict[str, Any] = {}
    with contextlib.ExitStack() as phase:
        done = False
        while not done:
            try:
                done = job.join(timeout=POLL_S)
            except ProcessException as exc:
                _drain(events, recorder, phase, outcome)
                raise outcome.get("error") or BackendError(f"a DDP rank failed: {_last_line(exc)}") from None
            _drain(events, recorder, phase, outcome)
    return outcome["result"]


def _drain(events, recorder: Recorder, phase: contextlib.ExitStack, outcome: dict[str, Any]) -> None:
    while True:
        try:
            kind, *payload = events.get_nowait()
        except queue.Empty:
            return
        if kind == "event":
            _replay(recorder, phase, *payload)
        elif kind == "error":
            outcome.setdefault("error", _rebuild_error(*payload))
        else:
            outcome["result"] = payload[0]


def _replay(recorder: Recorder, phase: contextlib.ExitStack, name: str, payload: dict[str, Any]) -> None:
    if name == "epoch_started":
        recorder.epoch_started(**payload)
    elif name == "step":
        recorder.step(**payload)
    elif name == "phase":  # the parent's phase lasts until the next one, like rank 0's
        phase.close()
        phase.enter_context(recorder.phase(payload["phase"]))
    elif name == "epoch_ended":
        recorder.epoch_ended(EpochRecord(**payload))


def _rank_main(rank: int, world: int, device_type: str, settings: Settings, data: tuple, folder: str, events) -> None:
    """One rank: join the group, train; rank 0 sends back the result, any rank its one-line error."""
    folder_path = Path(folder)
    if device_type == "cuda":
        torch.cuda.set_device(rank)
    elif not settings.numerics.intra_op_threads:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))  # as torchrun does: no oversubscription
    backend = "nccl" if device_type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=(folder_path / RENDEZVOUS).as_uri(), rank=rank, world_size=world)
    device = torch.device("cuda", rank) if device_type == "cuda" else torch.device("cpu")
    try:
        result = _train_rank(rank, world, device, settings, _reopen(data), folder_path, events, backend)
    except CxrError as exc:
        # Send the one-line error, then fail: the parent stops the other ranks, which may be
        # waiting in a collective this rank will never join.
        events.put(("error", type(exc), exc.args, vars(exc)))
        raise
    if rank == 0:
        events.put(("result", result))
    dist.destroy_process_group()


def _train_rank(
    rank: int,
    world: int,
    device: torch.device,
    settings: Settings,
    data: PreparedData,
    folder: Path,
    events,
    backend: str,
) -> dict[str, Any]:
    model = build(settings, canonical.load(folder / INITIAL), device)
    batchnorm = synchronise_batchnorm(model.net, device.type)
    ddp = DistributedDataParallel(
        model.net, device_ids=[device.index] if device.type == "cuda" else None, **no_forward_buffer_sync()
    )
    forward = [lambda event, payload: events.put(("event", event, payload))] if rank == 0 else []
    result = loop.train(
        model,
        data,
        settings,
        Recorder(forward),
        rank=rank,
        world=world,
        train_net=ddp,
        batchnorm=batchnorm,
        data_parallel=f"DistributedDataParallel ({backend})",
    )
    result["max_abs_weight_diff_between_ranks"] = _weight_spread(model.net)
    if rank == 0:
        canonical.save(tv_weights.get(model.net), folder / FINAL)
    return result


def no_forward_buffer_sync() -> dict[str, bool]:
    """DDP's switch that stops it copying rank 0's buffers to every rank before each forward (the synchronised
    BatchNorms keep the ranks' statistics equal), in the spelling the installed torch accepts: ``forward_sync_buffers``
    since torch 2.13, ``broadcast_buffers`` before (deprecated since; torch 2.11 has only that one)."""
    accepted = inspect.signature(DistributedDataParallel).parameters
    return {"forward_sync_buffers" if "forward_sync_buffers" in accepted else "broadcast_buffers": False}


def _weight_spread(net: nn.Module) -> float:
    """Largest difference between any rank's weights and rank 0's: 0 when DDP kept them in step."""
    mine = torch.cat([t.detach().float().flatten() for t in net.state_dict().values()])
    reference = mine.clone()
    dist.broadcast(reference, src=0)
    spread = (mine - reference).abs().max()
    dist.all_reduce(spread, op=dist.ReduceOp.MAX)
    return float(spread)


def _portable(data: PreparedData) -> tuple:
    """``data`` for pickling to the ranks: a whole memory-mapped image file travels as its path."""
    images = data.images
    if isinstance(images, np.memmap) and isinstance(images.base, mmap.mmap) and images.flags.c_contiguous:
        mapped = (images.filename, images.offset, images.shape, images.dtype.str)
        return replace(data, images=np.empty((0, 0, 0), np.uint8)), mapped
    return data, None


def _reopen(portable: tuple) -> PreparedData:
    data, mapped = portable
    if mapped is None:
        return data
    filename, offset, shape, dtype = mapped
    return replace(data, images=np.memmap(filename, dtype=dtype, mode="r", offset=offset, shape=shape))


def _rebuild_error(cls: type[CxrError], args: tuple, attributes: dict[str, Any]) -> CxrError:
    """Recreate a rank's error without calling its ``__init__`` (TrainingDiverged's takes other arguments)."""
    error = cls.__new__(cls)
    Exception.__init__(error, *args)
    error.__dict__.update(attributes)
    return error


def _last_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__
