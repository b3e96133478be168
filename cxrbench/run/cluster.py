"""``cxrbench run --executor slurm|local``: the run's cells as jobs that submitit submits, watches and reports.

A cell is the set of workers that must share hardware: every backend at the first GPU count, at each further count,
in each repeat, at each sweep point (:meth:`cxrbench.run.orchestrator.Orchestrator.cells`). Each cell is one job
that runs its backends one after another, so the backends of a cell always meet the same machine(s). Cells of one
shape (machines, GPUs per machine) form one Slurm job array, ``--array-parallelism`` of them at a time; every job
asks for whole machines (``--exclusive``) and ``--job-time-min``. submitit writes the batch script, submits, and
learns from Slurm's accounting how each job ended; its logs and pickles live in the run folder's ``jobs/`` (on a
file system every machine shares). ``--executor local`` is submitit's local executor, for development: every cell
at once as a process on this machine (it has no concurrency cap).

After the jobs end the run merges, checks and reports as it does without an executor. A job that was cancelled,
ran out of time or failed leaves its unfinished backends ``failed`` with the job's state and their own last error;
``--resume`` submits again only the cells that did not complete.

A cell over several machines (``run.nodes`` > 1) runs one task per machine; each task starts its backend's ranks
with the backend's own launcher (``cxrbench_node_launcher``: torchrun for PyTorch; the worker itself for Keras,
whose MultiWorkerMirroredStrategy reads Slurm's environment, and JAX, whose ``jax.distributed`` does) and the worker
in ``--launched`` mode; the head machine's name comes from submitit's job environment.
"""

from __future__ import annotations

import importlib.util
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from cxrbench.errors import CxrError
from cxrbench.files import read_json
from cxrbench.run.child import worker_env
from cxrbench.run.folder import LOG_TXT, RUN_JSON, now_iso
from cxrbench.run.store import BackendStatus, record_end

EXECUTORS = ("slurm", "local")
#: submitit's folder for each job's batch script, pickles and logs, in the run folder.
JOBS_DIR = "jobs"
#: File systems that live in one machine's memory: a run folder there is never shared with other machines.
MEMORY_FILE_SYSTEMS = ("tmpfs", "ramfs")
POLL_S = 2.0
DEFAULT_JOB_TIME_MIN = 240


@dataclass(frozen=True)
class WorkerCall:
    """One backend's worker in a cell: ``python -u -m cxrbench.run.worker *args`` writing into ``folder``."""

    backend: str
    folder: str
    python: str
    args: tuple[str, ...]


@dataclass(frozen=True)
class Cell:
    name: str
    calls: tuple[WorkerCall, ...]
    nodes: int
    gpus: int

    def complete(self) -> bool:
        return all(_status(call)["status"] == "completed" for call in self.calls)


def _status(call: WorkerCall) -> dict[str, Any]:
    return BackendStatus(Path(call.folder), call.backend).data


# -- before anything is written -------------------------------------------------------------------------------


def executor_record(kind: str, array_parallelism: int | None, job_time_min: int | None, slurm: list[str]) -> dict:
    """run.json's ``executor``: what ``--resume`` submits with again."""
    if kind not in EXECUTORS:
        raise CxrError(f"--executor {kind!r}: expected one of {', '.join(EXECUTORS)}")
    if array_parallelism is not None and array_parallelism < 1:
        raise CxrError(f"--array-parallelism {array_parallelism}: must be a whole number >= 1")
    if job_time_min is not None and job_time_min < 1:
        raise CxrError(f"--job-time-min {job_time_min}: must be a whole number of minutes >= 1")
    parameters = {}
    for text in slurm:
        key, sep, value = text.partition("=")
        if not sep or not key.strip():
            raise CxrError(f"--slurm {text!r}: expected KEY=VALUE (a submitit Slurm parameter, e.g. partition=gpu)")
        parameters[key.strip()] = int(value) if value.strip().isdigit() else value.strip()
    return {
        "kind": kind,
        "array_parallelism": array_parallelism,
        "job_time_min": job_time_min or DEFAULT_JOB_TIME_MIN,
        "slurm": parameters,
        "jobs": {},
    }


def check_executor(executor: dict[str, Any], run_dir: Path, nodes: int) -> None:
    """Refuse, in one line, what cannot work: no submitit, no ``sbatch``, a folder the machines cannot share."""
    kind = executor["kind"]
    if importlib.util.find_spec("submitit") is None:
        raise CxrError(f"--executor {kind} needs submitit: pip install -e '.[cluster]'")
    if kind == "local":
        if nodes > 1:
            raise CxrError(f"--executor local runs cells on this machine: run.nodes = {nodes} needs --executor slurm")
        if executor["slurm"] or executor["array_parallelism"]:
            raise CxrError(
                "--slurm and --array-parallelism apply to --executor slurm (the local executor runs every cell at once)"
            )
        return
    if shutil.which("sbatch") is None:
        raise CxrError(
            "--executor slurm: sbatch is not on PATH: run cxrbench where Slurm's commands are (a login node)"
        )
    file_system = file_system_type(run_dir)
    if file_system in MEMORY_FILE_SYSTEMS:
        raise CxrError(
            f"{run_dir}: on {file_system}, a file system in this machine's memory that no other machine sees: "
            "put --out on a file system the cluster's machines share"
        )


def file_system_type(path: Path) -> str | None:
    """The type of the file system ``path`` (or its nearest existing parent) is on, from the mount table."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    resolved = str(path.resolve())
    mounts = [
        p
        for p in psutil.disk_partitions(all=True)
        if resolved == p.mountpoint or resolved.startswith(p.mountpoint.rstrip("/") + "/")
    ]
    return max(mounts, key=lambda p: len(p.mountpoint)).fstype if mounts else None


# -- the run's side: submit, watch, settle -----------------------------------------------------------------


def run_cells(
    run_dir: Path, cells: list[Cell], executor: dict[str, Any], save_run: Callable[[], None], progress
) -> None:
    """Submit every cell not yet complete, wait for the jobs, and settle how each ended."""
    todo = [cell for cell in cells if not cell.complete()]
    for cell in cells:
        for call in cell.calls:
            progress.update(call.backend, _status(call))
    if not todo:
        return
    jobs = _submit(run_dir, todo, executor)
    for cell, job in jobs:
        executor["jobs"].setdefault(cell.name, []).append(str(job.job_id))
    save_run()
    progress.message(
        f"submitted {len(jobs)} cell(s) to {executor['kind']}: jobs {', '.join(str(job.job_id) for _, job in jobs)}"
    )
    try:
        while not all(job.done() for _, job in jobs):
            for cell, _ in jobs:
                for call in cell.calls:
                    progress.update(call.backend, _status(call))
            time.sleep(POLL_S)
    except KeyboardInterrupt:
        for _, job in jobs:
            job.cancel(check=False)
        raise
    for cell, job in jobs:
        settle(cell, executor["kind"], str(job.job_id), final_state(job, executor["kind"]), job.exception() is None)
        for call in cell.calls:
            progress.update(call.backend, _status(call))


def _submit(run_dir: Path, cells: list[Cell], executor: dict[str, Any]) -> list[tuple[Cell, Any]]:
    """One job array per shape of cell (machines, GPUs per machine)."""
    import submitit

    jobs = []
    for shape in dict.fromkeys((cell.nodes, cell.gpus) for cell in cells):
        group = [cell for cell in cells if (cell.nodes, cell.gpus) == shape]
        runner = submitit.AutoExecutor(folder=Path(run_dir) / JOBS_DIR / "%j", cluster=executor["kind"])
        runner.update_parameters(**_parameters(run_dir, executor, *shape))
        with runner.batch():
            submitted = [runner.submit(run_cell, Path(run_dir), cell) for cell in group]
        jobs += list(zip(group, submitted))
    return jobs


def _parameters(run_dir: Path, executor: dict[str, Any], nodes: int, gpus: int) -> dict[str, Any]:
    parameters: dict[str, Any] = {
        "name": f"cxrbench-{Path(run_dir).name}",
        "timeout_min": executor["job_time_min"],
        "nodes": nodes,
        "tasks_per_node": 1,  # one task per machine: it starts that machine's ranks through the backend's launcher
    }
    if gpus:
        parameters["gpus_per_node"] = gpus
    if executor["kind"] == "slurm":
        parameters["slurm_exclusive"] = True  # whole machines: nothing else shares a cell's hardware
        if executor["array_parallelism"]:
            parameters["slurm_array_parallelism"] = executor["array_parallelism"]
        parameters.update({f"slurm_{key}": value for key, value in executor["slurm"].items()})
    return parameters


def final_state(job, kind: str) -> str:
    """The scheduler's last word on a finished job: Slurm's accounting asked again rather than cached (the local
    executor reads its process)."""
    return job.watcher.get_state(job.job_id, mode="force") if kind == "slurm" else job.state


def settle(cell: Cell, kind: str, job_id: str, state: str, normal: bool) -> None:
    """A backend the job left unfinished is failed, with the job's state and its own last error. ``normal``: the
    job's function returned (a backend may still have failed on its own, with its own error)."""
    for call in cell.calls:
        status = BackendStatus(Path(call.folder), call.backend)
        current = status.data["status"]
        if current == "completed" or (current == "failed" and normal):
            continue
        own = status.data.get("error")
        why = f"{kind} job {job_id} ended {state}" + ("" if normal else f" before {call.backend} completed")
        Path(call.folder).mkdir(parents=True, exist_ok=True)
        status.finish("failed", f"{why}: {own}" if own else why)


# -- the job's side: one task per machine -------------------------------------------------------------------

#: How a worker stopped by a signal ends: its own "interrupted" status (130), or killed outright.
STOPPED_CODES = (130, -signal.SIGTERM, -signal.SIGKILL)


def run_cell(run_dir: Path, cell: Cell) -> dict[str, str]:
    """The job: every backend of the cell, one after another, on this job's machine(s). Task 0 records how each
    worker ended; on several machines every task starts its machine's ranks through the backend's launcher."""
    import submitit

    environment = submitit.JobEnvironment()
    first_task = environment.global_rank == 0
    outcome = {}
    for call in cell.calls:
        folder = Path(call.folder)
        if _status(call)["status"] == "completed":
            continue
        folder.mkdir(parents=True, exist_ok=True)
        command = [call.python, "-u", *_launcher(run_dir, cell, call, environment.hostnames[0])]
        command += ["-m", "cxrbench.run.worker", *call.args, *(["--launched"] if cell.nodes > 1 else [])]
        env = worker_env()
        if first_task:
            with open(folder / LOG_TXT, "a", encoding="utf-8") as log:
                log.write(f"=== cxrbench worker {call.backend} started {now_iso()} in job {environment.job_id}\n")
                log.flush()
                code = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT, env=env)
            outcome[call.backend] = record_end(folder, call.backend, code)["status"]
        else:  # the other machines' output goes to this task's own submitit log
            code = subprocess.call(command, stdout=sys.stdout, stderr=subprocess.STDOUT, env=env)
        if code in STOPPED_CODES:
            # Slurm is ending the job (scancel, time limit, preemption): submitit lets this task live on after the
            # SIGTERM that stopped the worker, but no backend may start on machines being taken away.
            break
    return outcome


def _launcher(run_dir: Path, cell: Cell, call: WorkerCall, head: str) -> list[str]:
    """The backend's own launcher for a cell over several machines (none on one machine)."""
    if cell.nodes <= 1:
        return []
    from cxrbench.plugins import load_plugins
    from cxrbench.suite import Settings

    run = read_json(Path(run_dir) / RUN_JSON)
    settings = Settings.from_dict(run["settings"], str(Path(run_dir) / RUN_JSON)).replace(**{"run.gpus": cell.gpus})
    hook = load_plugins(run.get("plugins", []), backend=call.backend).hook
    launcher = hook.cxrbench_node_launcher(settings=settings, head=head)
    if launcher is None:
        raise CxrError(f"backend {call.backend!r} cannot span machines (it implements no cxrbench_node_launcher)")
    return list(launcher)
