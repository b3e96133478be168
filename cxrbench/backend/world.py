"""A world of ranks that a framework's own launcher started (torchrun, TF_CONFIG or Slurm, jax.distributed).

cxrbench starts no rank, chooses no address and runs no rendezvous: the launcher does, and the backend joins what
it formed (:func:`cxrbench.hookspecs.cxrbench_join_world`). What every backend shares lives here: the replica count
the suite asks for, the one-line refusal of any other (a rendezvous that silently forms worlds of one is the classic
failure), and the byte encoding with which rank 0 gathers every rank's record over the framework's collectives
(:func:`cxrbench.hookspecs.cxrbench_gather`), so only rank 0 writes the run folder.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from cxrbench.errors import BackendError
from cxrbench.suite import Settings


@dataclass(frozen=True, kw_only=True)
class World:
    """One process's place in the world it joined."""

    rank: int  #: this process's rank; rank 0 writes the run folder
    processes: int  #: processes in the world
    replicas: int  #: data-parallel replicas (devices) over every process
    local_rank: int  #: rank among the processes of this machine
    launcher: str  #: how the world was formed, e.g. "torchrun (c10d rendezvous)"
    #: The communication library and its version, e.g. {"gloo": "torch 2.14.1"} or {"nccl": "2.27.5"}.
    communication: dict[str, str] = field(default_factory=dict)
    #: Node-local CUDA indices of the GPUs this process drives (what its monitor watches); empty on the CPU.
    gpu_indices: tuple[int, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["gpu_indices"] = list(self.gpu_indices)
        return out


def expected_replicas(settings: Settings) -> int:
    """Replicas the suite asks for: ``run.nodes`` machines x ``run.gpus`` GPUs each (one CPU rank when 0)."""
    return settings.run.nodes * max(1, settings.run.gpus)


def require_world_size(framework: str, launcher: str, replicas: int, settings: Settings) -> None:
    """Refuse, in one line, a world of another size than the suite asked for."""
    wanted = expected_replicas(settings)
    if replicas != wanted:
        per_node = f"{settings.run.gpus} GPU(s)" if settings.run.gpus else "1 CPU rank"
        raise BackendError(
            f"{framework} joined a world of {replicas} replica(s) through {launcher}, but the run asks for {wanted} "
            f"(run.nodes = {settings.run.nodes} x {per_node} per node): check the launcher's node and process counts"
        )


def node_groups(settings: Settings) -> int:
    """How many groups BatchNorm statistics are reduced within: 1 ("global"), else one per node ("node")."""
    return settings.run.nodes if settings.train.batchnorm_sync == "node" else 1


def batchnorm_scope(settings: Settings, replicas: int) -> str:
    """The numerics record's ``batchnorm_sync``: "none" on one replica or one replica per group, else the setting."""
    if replicas <= 1 or replicas // node_groups(settings) <= 1:
        return "none"
    return settings.train.batchnorm_sync


def encode_payload(payload: Any) -> np.ndarray:
    """A JSON-able payload as uint8 bytes, for a framework's collective (which moves arrays, not objects)."""
    return np.frombuffer(json.dumps(payload).encode(), dtype=np.uint8)


def decode_payloads(rows: np.ndarray, lengths: np.ndarray) -> list[Any]:
    """The payloads of a gathered ``(ranks, longest)`` uint8 array whose row ``r`` holds ``lengths[r]`` bytes."""
    return [json.loads(bytes(row[: int(n)]).decode()) for row, n in zip(np.asarray(rows), np.asarray(lengths))]


def pad_payload(payload: np.ndarray, longest: int) -> np.ndarray:
    """``payload`` zero-padded to ``longest`` bytes: collectives need one shape on every rank."""
    out = np.zeros(longest, dtype=np.uint8)
    out[: len(payload)] = payload
    return out
