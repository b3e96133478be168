"""Several machines: one process per machine in the world ``jax.distributed.initialize()`` forms.

``jax.distributed`` finds its coordinator, the process count and this process's id itself under Slurm, Open MPI and
Kubernetes; elsewhere it reads ``JAX_COORDINATOR_ADDRESS``, and this backend passes ``JAX_NUM_PROCESSES`` and
``JAX_PROCESS_ID`` when they are set (jax takes those as arguments only). On CPUs the processes' collectives run over
gloo (``jax_cpu_collectives_implementation``). Training runs on a mesh over every process's devices (each process
feeds its slice of the global batch); prediction, CAMs and export stay on the process's own devices.
"""

from __future__ import annotations

import importlib.metadata
import os

import jax
import numpy as np
from jax.experimental import multihost_utils

from cxrbench.backend import (
    BackendError,
    Settings,
    World,
    decode_payloads,
    encode_payload,
    first_line,
    pad_payload,
    require_world_size,
)

#: Collectives between CPU processes (jaxlib's CPU client); GPUs use XLA's NCCL collectives.
CPU_COLLECTIVES = "gloo"


def _launcher() -> str:
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return "jax.distributed.initialize (JAX_COORDINATOR_ADDRESS)"
    for variable, name in (("SLURM_JOB_ID", "Slurm"), ("OMPI_COMM_WORLD_SIZE", "Open MPI")):
        if variable in os.environ:
            return f"jax.distributed.initialize ({name})"
    return "jax.distributed.initialize"


def join(settings: Settings) -> World:
    """``jax.distributed.initialize()`` before any other JAX call; a world of another size is refused."""
    jax.config.update("jax_cpu_collectives_implementation", CPU_COLLECTIVES)
    arguments = {
        name: int(os.environ[variable])
        for name, variable in (("num_processes", "JAX_NUM_PROCESSES"), ("process_id", "JAX_PROCESS_ID"))
        if variable in os.environ
    }
    arguments["heartbeat_timeout_seconds"] = settings.run.heartbeat_timeout_s
    if settings.run.gpus:  # one process per machine drives all its GPUs (Slurm's default would be one per task)
        arguments["local_device_ids"] = list(range(settings.run.gpus))
    launcher = _launcher()
    try:
        jax.distributed.initialize(**arguments)
    except (ValueError, RuntimeError) as exc:
        raise BackendError(f"{launcher} failed: {first_line(exc)} (docs/multi-node.md)") from None
    require_world_size("jax", launcher, jax.device_count(), settings)
    gpu = jax.local_devices()[0].platform == "gpu"
    library = "NCCL (XLA)" if gpu else f"{CPU_COLLECTIVES} (jax_cpu_collectives_implementation)"
    return World(
        rank=jax.process_index(),
        processes=jax.process_count(),
        replicas=jax.device_count(),
        local_rank=0,
        launcher=launcher,
        communication={"xla collectives": f"{library}, jaxlib {importlib.metadata.version('jaxlib')}"},
        gpu_indices=tuple(range(jax.local_device_count())) if gpu else (),
    )


def joined() -> bool:
    return jax.process_count() > 1


def training_devices(local: list[jax.Device]) -> list[jax.Device]:
    """The devices training shards the global batch over: every process's in a launched world, in process
    order (each process's devices then hold a contiguous slice: the core's rank slice of that process)."""
    if not joined():
        return local
    return sorted(jax.devices(), key=lambda d: (d.process_index, d.id))


def gather(payload) -> list:
    """Every process's payload on process 0 (``process_allgather`` of lengths, then of the padded bytes), then
    leave the world, so process 0 goes on alone."""
    mine = encode_payload(payload)
    lengths = np.asarray(multihost_utils.process_allgather(np.array([len(mine)], np.int32)))[:, 0]
    rows = np.asarray(multihost_utils.process_allgather(pad_payload(mine, int(lengths.max()))))
    rank = jax.process_index()
    jax.distributed.shutdown()
    return [] if rank else decode_payloads(rows, lengths)
