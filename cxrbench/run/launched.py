"""``python -m cxrbench.run.worker --launched``: one rank of a world that a framework's own launcher started.

torchrun, ``TF_CONFIG`` or Slurm (MultiWorkerMirroredStrategy), ``jax.distributed`` start the processes and form
the world; the backend joins it (``cxrbench_join_world``) and refuses a world of another size than the suite's. Then:

* every rank opens the data, builds the model and runs the stages up to training (the equivalence stage too, so
  the ranks reach training's first collective together); training is the collective stage;
* rank 0 writes the backend's folder; the other ranks write into a private temporary folder that is removed when
  they end, so the run folder holds every result once;
* after training every rank's record (host, GPU UUIDs, driver, launcher, communication library) and monitor
  samples reach rank 0 over the framework's collectives (``cxrbench_gather``): ``ranks.json`` and one
  ``monitor.jsonl`` with every machine's samples, each row carrying its host and rank;
* rank 0 alone runs the stages after training (evaluation, CAM, export) on its local model.

A rank that cannot join (wrong world size, no launcher environment) owns no status file yet: it prints its one-line
error after :data:`ERROR_MARK`, and whoever started the launcher records that line as the backend's error.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import tempfile
import traceback
from pathlib import Path
from typing import Any

from cxrbench.backend.world import World
from cxrbench.errors import BackendError, CxrError, StorageError
from cxrbench.files import read_json, write_json
from cxrbench.machine.env import gpu_inventory
from cxrbench.machine.monitor.sampler import Sampler
from cxrbench.plugins import load_plugins
from cxrbench.run import worker as worker_module
from cxrbench.run.folder import RANKS_JSON, STATUS_JSON
from cxrbench.run.store import ERROR_MARK, BackendStatus

#: Stages every rank runs (training is collective; equivalence keeps the ranks in step before it).
COLLECTIVE_STAGES = ("equivalence", "train")
AFTER_TRAINING = ("evaluate", "cam", "export")


def rank_record(world: World) -> dict[str, Any]:
    """This rank's machine: host, the GPUs it drives (UUIDs, from NVML), the driver, launcher and communication."""
    inventory = gpu_inventory()
    by_index = {device["index"]: device for device in inventory.get("devices", [])}
    gpus = [by_index[i] for i in world.gpu_indices if i in by_index]
    return {
        "rank": world.rank,
        "local_rank": world.local_rank,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "gpus": [{"index": g["index"], "name": g["name"], "uuid": g["uuid"]} for g in gpus],
        "driver": inventory.get("driver"),
        "launcher": world.launcher,
        "communication": world.communication,
    }


def join(hook, settings, backend: str) -> World:
    world = hook.cxrbench_join_world(settings=settings)
    if world is None:
        raise BackendError(f"backend {backend!r} cannot run as a launched rank (it implements no cxrbench_join_world)")
    return world


def _nvml_indices(world: World) -> list[int] | None:
    devices = gpu_inventory().get("devices", [])
    watched = [d["nvml_index"] for d in devices if d["index"] in world.gpu_indices]
    return watched or None


def _trains(status: BackendStatus, settings, selected: tuple[str, ...]) -> bool:
    """Whether this run of the world trains (and so needs every rank): the same answer on every rank."""
    return "train" in selected and "train" in settings.run.stages and not status.is_done("train")


def main(args: argparse.Namespace) -> int:
    folder = args.folder or args.run_dir / args.backend
    signal.signal(signal.SIGTERM, worker_module._raise_interrupted)
    worker_module._watch_parent(os.getppid())
    try:
        run_settings = worker_module._run_settings(args.run_dir)
        settings = worker_module._settings(run_settings, args.gpus, args.seed, args.set)
        plugins = load_plugins(args.plugin, backend=args.backend)
        world = join(plugins.hook, settings, args.backend)
    except BaseException as exc:
        if not isinstance(exc, CxrError):
            traceback.print_exc()
        print(f"{ERROR_MARK}{worker_module.one_line(exc)}", flush=True)
        return 1
    print(f"[{args.backend}] rank {world.rank} of {world.processes} ({world.launcher})", flush=True)
    if world.rank == 0:
        return _run_rank(args, folder, folder, world, plugins, settings, run_settings)
    private = Path(tempfile.mkdtemp(prefix=f"cxrbench-{args.backend}-rank{world.rank}-"))
    try:
        return _run_rank(args, folder, private, world, plugins, settings, run_settings)
    finally:
        shutil.rmtree(private, ignore_errors=True)


def _run_rank(args, folder: Path, own: Path, world: World, plugins, settings, run_settings) -> int:
    """One rank's stages in ``own`` (the backend's folder on rank 0, a private one elsewhere)."""
    status = BackendStatus(own, args.backend)
    if own != folder:  # every rank decides what to run from rank 0's record of what is done
        status.data["stages"] = dict((read_json(folder / STATUS_JSON) or {}).get("stages", {}))
    status.data["world"] = world.to_dict()
    status.start(os.getpid())
    selected = tuple(args.stages.split(","))
    labels = {"host": socket.gethostname(), "rank": world.rank}
    outcome, error, sampler = "completed", None, None
    try:
        worker = worker_module.Worker(args.run_dir, own, args.backend, plugins, settings, status, run_settings)
        sampler = Sampler(
            own if world.rank == 0 else None,
            args.backend,
            worker.recorder,
            args.monitor_interval,
            watch=_nvml_indices(world),
            labels=labels,
        ).start()
        collective = _trains(status, settings, selected)
        if collective or world.rank == 0:
            worker.open()
        if collective:
            worker.run_stages(selected, only=COLLECTIVE_STAGES)
            if world.rank != 0:
                sampler.halt()
            _gather(plugins.hook, world, sampler, folder)
        if world.rank == 0:
            worker.run_stages(selected, only=None if not collective else AFTER_TRAINING)
    except (worker_module.Interrupted, KeyboardInterrupt) as exc:
        outcome, error = "interrupted", str(exc) or "interrupted"
    except BaseException as exc:  # one line in status.json (rank 0) and in the log, the traceback in the log
        traceback.print_exc()
        outcome, error = "failed", worker_module.one_line(exc)
    finally:
        if sampler is not None:
            sampler.stop()
    if error:
        print(f"{ERROR_MARK}{error}", flush=True)
    print(f"[{args.backend}] rank {world.rank}: {outcome}", flush=True)
    with contextlib.suppress(StorageError):
        status.finish(outcome, error)
    return {"completed": 0, "interrupted": 130}.get(outcome, 1)


def _gather(hook, world: World, sampler: Sampler, folder: Path) -> None:
    """Every rank's record and (other ranks') monitor samples to rank 0: ``ranks.json`` and one monitor stream."""
    payload = {"record": rank_record(world), "samples": sampler.samples if world.rank != 0 else []}
    gathered = hook.cxrbench_gather(payload=payload)
    if gathered is None:
        raise BackendError("the backend joined a world but implements no cxrbench_gather")
    if world.rank != 0:
        return
    if len(gathered) != world.processes:
        raise BackendError(f"cxrbench_gather returned {len(gathered)} payloads for {world.processes} processes")
    write_json(folder / RANKS_JSON, [part["record"] for part in gathered])
    for part in gathered[1:]:
        sampler.add(part["samples"])
