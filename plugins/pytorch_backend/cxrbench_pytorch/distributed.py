"""Several devices: DistributedDataParallel, one process per device.

On one machine the ranks are started from ``cxrbench_train``: the parent writes the model's weights to a
temporary ``.npz``, spawns one process per rank (NCCL on GPUs, gloo on CPUs), forwards rank 0's recorder events to
its own recorder while they train, and loads rank 0's final weights back into its model. Across machines torchrun
starts them (``python -m cxrbench.run.worker --launched``): each worker joins the world torchrun's c10d rendezvous
formed with ``init_process_group`` from the environment (:func:`join`) and trains in its own process
(:func:`train_launched`). Either way each rank trains on its slice of every global batch
(``data.batches(rank=r, world=w)``) with BatchNorm synchronised over every rank or over the ranks of one machine
(``train.batchnorm_sync``), so with "global" the ranks together compute what one process computes on the
concatenated batch.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
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

from cxrbench.backend import (
    BackendError,
    CxrError,
    EpochRecord,
    PreparedData,
    Recorder,
    Settings,
    World,
    canonical,
    decode_payloads,
    encode_payload,
    node_groups,
    pad_payload,
    require_world_size,
)
from cxrbench_pytorch import loop
from cxrbench_pytorch import weights as tv_weights
from cxrbench_pytorch.model import TorchModel, build

INITIAL, FINAL, RENDEZVOUS = "initial.npz", "final.npz", "rendezvous"
POLL_S = 0.2
#: How long a rank waits in a collective for a peer (torch's default is 10 min for NCCL, 30 for gloo): a peer that
#: died mid-step must end the others' run, not stall it for half an hour.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=5)
LAUNCHER = "torchrun (c10d rendezvous)"
#: What torchrun's agent sets for each rank, and ``init_process_group`` reads.
TORCHRUN_ENVIRONMENT = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class AllReduceBatchNorm2d(nn.BatchNorm2d):
    """Synchronised BatchNorm for CPU ranks (gloo).

    torch's ``nn.SyncBatchNorm`` refuses CPU tensors ("expected input tensor to be on GPU", torch
    2.14), so on the CPU the batch statistics are summed over the ranks with the functional
    ``all_reduce``, which has autograd (its backward all-reduces the gradients, as SyncBatchNorm's
    does). Two passes (mean, then centred squares) keep float32 accurate.
    """

    #: The ranks the statistics are summed over (every rank, or one machine's: ``train.batchnorm_sync``).
    group: Any = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        group = self.group or dist.group.WORLD
        x32 = x.float()
        dims, shape = (0, 2, 3), (1, -1, 1, 1)
        count = x32.new_tensor([x32.numel() // x32.shape[1]])
        sums = funcol.all_reduce(torch.cat([x32.sum(dims), count]), "sum", group)
        total = sums[-1]
        mean = sums[:-1] / total
        centred = x32 - mean.view(shape)
        var = funcol.all_reduce((centred * centred).sum(dims), "sum", group) / total
        with torch.no_grad():
            self.num_batches_tracked += 1
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(var * total / (total - 1), self.momentum)
        out = centred * torch.rsqrt(var + self.eps).view(shape) * self.weight.view(shape) + self.bias.view(shape)
        return out.to(x.dtype)


#: :func:`batchnorm_group`'s answer when each rank keeps its own statistics (one rank per group).
UNSYNCHRONISED = "unsynchronised"


def batchnorm_group(settings: Settings, world: int) -> Any:
    """The process group BatchNorm statistics are reduced over: every rank (None, "global"), the ranks of one
    machine (``dist.new_subgroups`` of the node's rank count: torchrun numbers a node's ranks consecutively), or
    :data:`UNSYNCHRONISED` when a machine runs one rank. Every rank must call it (making groups is collective)."""
    groups = node_groups(settings)
    if groups == 1:
        return None
    per_node = world // groups
    if per_node <= 1:
        return UNSYNCHRONISED
    group, _ = dist.new_subgroups(group_size=per_node)
    return group


def synchronise_batchnorm(net: nn.Module, device_type: str, group: Any = None) -> str:
    """Replace every BatchNorm by its form synchronised over ``group`` (None: every rank), in place; return what
    was used."""
    if group is UNSYNCHRONISED:
        return "torch.nn.BatchNorm2d (one rank per node: statistics of each rank's batch)"
    scope = "every rank" if group is None else "the ranks of one node"
    if device_type == "cuda":
        nn.SyncBatchNorm.convert_sync_batchnorm(net, process_group=group)  # DenseNet's BatchNorms are children
        return f"torch.nn.SyncBatchNorm over {scope}"
    for parent in list(net.modules()):
        for name, child in parent.named_children():
            if type(child) is nn.BatchNorm2d:
                synced = AllReduceBatchNorm2d(child.num_features, child.eps, child.momentum).to(child.weight.device)
                synced.load_state_dict(child.state_dict())
                synced.group = group
                setattr(parent, name, synced)
    return f"AllReduceBatchNorm2d (gloo all-reduce of batch statistics over {scope})"


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


# -- ranks torchrun started (python -m cxrbench.run.worker --launched) ----------------------------------------


def join(settings: Settings) -> World:
    """Join the world torchrun formed: ``init_process_group`` reads RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT
    from the environment its agent set; a world of another size than the suite's is refused in one line."""
    missing = [name for name in TORCHRUN_ENVIRONMENT if name not in os.environ]
    if missing:
        raise BackendError(
            f"the pytorch backend joins the world torchrun forms, but {', '.join(missing)} is not set: start the "
            "worker with torchrun (docs/multi-node.md)"
        )
    cuda = settings.run.gpus > 0
    local_rank = int(os.environ["LOCAL_RANK"])
    if cuda:
        if torch.cuda.device_count() <= local_rank:
            raise BackendError(f"local rank {local_rank} has no GPU: torch sees {torch.cuda.device_count()}")
        torch.cuda.set_device(local_rank)
    backend = "nccl" if cuda else "gloo"
    dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT)
    atexit.register(leave)
    launcher = LAUNCHER if "TORCHELASTIC_RUN_ID" in os.environ else "the environment (init_method env://)"
    require_world_size("torch", launcher, dist.get_world_size(), settings)
    return World(
        rank=dist.get_rank(),
        processes=dist.get_world_size(),
        replicas=dist.get_world_size(),
        local_rank=local_rank,
        launcher=launcher,
        communication={backend: _library_version(backend)},
        gpu_indices=(local_rank,) if cuda else (),
    )


def _library_version(backend: str) -> str:
    if backend == "nccl":
        return ".".join(map(str, torch.cuda.nccl.version()))
    return f"gloo as built into torch {torch.__version__}"


def joined() -> bool:
    """Whether this process is a rank of a launched world (training then needs no spawned ranks)."""
    return dist.is_available() and dist.is_initialized()


def leave() -> None:
    if joined():
        dist.destroy_process_group()


def gather(payload: Any) -> list[Any]:
    """Every rank's payload on rank 0 (lengths, then the zero-padded bytes, each one ``all_gather`` on the group's
    device), then leave the world: rank 0 goes on alone."""
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    mine = torch.from_numpy(encode_payload(payload).copy()).to(device)
    lengths = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world)]
    dist.all_gather(lengths, torch.tensor([mine.numel()], dtype=torch.int64, device=device))
    longest = int(max(int(n) for n in lengths))
    rows = [torch.zeros(longest, dtype=torch.uint8, device=device) for _ in range(world)]
    dist.all_gather(rows, torch.from_numpy(pad_payload(mine.cpu().numpy(), longest)).to(device))
    leave()
    if rank != 0:
        return []
    return decode_payloads(torch.stack(rows).cpu().numpy(), torch.cat(lengths).cpu().numpy())


class _Replay:
    """The events queue of a spawned rank, replayed at once on this process's recorder (a launched rank)."""

    def __init__(self, recorder: Recorder):
        self.recorder, self.phase = recorder, contextlib.ExitStack()

    def put(self, item: tuple) -> None:
        kind, *payload = item
        if kind == "event":
            _replay(self.recorder, self.phase, *payload)


def train_launched(model: TorchModel, data: PreparedData, settings: Settings, recorder: Recorder) -> dict[str, Any]:
    """Train as one rank of the joined world; every rank reports to its own recorder (its monitor's phases), and
    rank 0's model receives the trained weights (the stages after training run there)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    with tempfile.TemporaryDirectory(prefix="cxrbench-ddp-") as tmp:
        folder = Path(tmp)
        canonical.save(tv_weights.get(model.net), folder / INITIAL)
        replay = _Replay(recorder)
        with _released(model), replay.phase:
            result = _train_rank(
                rank, world, model.device, settings, data, folder, replay, dist.get_backend(), every_rank_reports=True
            )
        if rank == 0:
            tv_weights.put(model.net, canonical.load(folder / FINAL), model.block_config, "rank 0's final weights")
    return result


# -- ranks spawned on this machine ---------------------------------------------------------------------------


def _rank_main(rank: int, world: int, device_type: str, settings: Settings, data: tuple, folder: str, events) -> None:
    """One rank: join the group, train; rank 0 sends back the result, any rank its one-line error."""
    folder_path = Path(folder)
    if device_type == "cuda":
        torch.cuda.set_device(rank)
    elif not settings.numerics.intra_op_threads:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))  # as torchrun does: no oversubscription
    backend = "nccl" if device_type == "cuda" else "gloo"
    dist.init_process_group(
        backend,
        init_method=(folder_path / RENDEZVOUS).as_uri(),
        rank=rank,
        world_size=world,
        timeout=COLLECTIVE_TIMEOUT,
    )
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
    every_rank_reports: bool = False,
) -> dict[str, Any]:
    model = build(settings, canonical.load(folder / INITIAL), device)
    batchnorm = synchronise_batchnorm(model.net, device.type, batchnorm_group(settings, world))
    ddp = DistributedDataParallel(
        model.net, device_ids=[device.index] if device.type == "cuda" else None, **no_forward_buffer_sync()
    )
    reports = rank == 0 or every_rank_reports
    forward = [lambda event, payload: events.put(("event", event, payload))] if reports else []
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
    result["max_abs_weight_diff_between_ranks"] = _spread(t for _, t in model.net.named_parameters())
    # BatchNorm's running statistics: 0 with "global" synchronisation, a node's own with "node".
    result["max_abs_buffer_diff_between_ranks"] = _spread(t for _, t in model.net.named_buffers())
    if rank == 0:
        canonical.save(tv_weights.get(model.net), folder / FINAL)
    return result


def no_forward_buffer_sync() -> dict[str, bool]:
    """DDP's switch that stops it copying rank 0's buffers to every rank before each forward (the synchronised
    BatchNorms keep the ranks' statistics equal), in the spelling the installed torch accepts: ``forward_sync_buffers``
    since torch 2.13, ``broadcast_buffers`` before (deprecated since; torch 2.11 has only that one)."""
    accepted = inspect.signature(DistributedDataParallel).parameters
    return {"forward_sync_buffers" if "forward_sync_buffers" in accepted else "broadcast_buffers": False}


def _spread(tensors) -> float:
    """Largest difference between any rank's tensors and rank 0's: 0 when DDP kept them in step."""
    mine = torch.cat([t.detach().float().flatten() for t in tensors])
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
