"""Ranks that each framework's own launcher starts, as two "nodes" on this machine (loopback only).

Two torchrun agents (c10d rendezvous on 127.0.0.1, gloo), two TensorFlow workers from ``TF_CONFIG``, two JAX
processes through ``jax.distributed`` with gloo CPU collectives: each run joins a world of 2, keeps identical
replicas (asserted by the framework's own spread or by construction of the data-parallel step), trains what one
process trains on the concatenated batch (weights compared with a single-process worker at twice the batch and the
linearly scaled learning rate), and writes its results once (rank 0's folder; the other rank's private folder is
gone). Killing one rank after its first epoch (a torchrun agent, a TensorFlow worker, a JAX process) makes the other
exit non-zero instead of hanging; a world of the wrong size is refused in one line. Every process runs under a time
limit; ports are picked by the OS (bind to port 0) for the launchers' own arguments.

These tests start several processes that use every core: they are marked ``serial`` (never beside another test).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cxrbench.backend import canonical
from cxrbench.run.folder import HISTORY_JSON, MONITOR_JSONL, RANKS_JSON, STATUS_JSON, TRAIN_JSON, WEIGHTS_NPZ
from cxrbench.run.orchestrator import RunRequest, new_run
from cxrbench.run.store import ERROR_MARK
from cxrbench.suite import apply_overrides, load_suite

pytestmark = pytest.mark.serial

#: Seconds any launched process may run before the test kills it and fails.
PROCESS_LIMIT_S = 240
#: Two steps: the first compiles or warms up, the second is timed (train.warmup_steps = 1). Beyond two steps this tiny
#: network at 32 px amplifies float32 reduction-order differences whatever the engine: DDP spawned on one machine
#: differed from one process by 3.7e-4 after 4 steps here, one process at 1 and 2 threads by 1e-6.
PER_RANK_BATCH, STEPS, LEARNING_RATE = 2, 2, 0.05
#: Weights after the steps, two ranks against one process: float32 reduction order differs (all-reduce vs one big
#: batch). Adam's epsilon of 1 makes each update close to lr x gradient, a smooth function of it: with 1e-8 an update
#: is lr x sign(gradient), and near-zero gradients would turn rounding into differences of size lr in any engine.
WEIGHTS_ATOL = 1e-5
TINY = {
    "model.arch": "densenet-tiny",
    "data.image_size": 32,
    "data.phantom_images": 120,
    "data.phantom_size": 64,
    "eval.bootstrap_rounds": 10,
    "eval.cam_images": 2,
    "train.batch_size": PER_RANK_BATCH,
    "train.learning_rate": LEARNING_RATE,
    "train.max_steps": STEPS,
    "train.warmup_steps": 1,
    "train.window_steps": 1,
    "train.adam_epsilon": 1.0,
    "run.seed": 3,
}


def free_port() -> int:
    """A port the OS has free now, for a launcher's own address argument (the launcher binds it, not cxrbench)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def prepare(run_dir: Path, backend: str, **overrides) -> Path:
    """``cxrbench run --prepare-only``: the run folder, its prepared data and shared weights, no worker."""
    settings = apply_overrides(load_suite("smoke"), {**TINY, "run.nodes": 2, **overrides})
    assert new_run(RunRequest(settings, [backend], out=run_dir, prepare_only=True)).execute() == 0
    return run_dir


def worker_args(run_dir: Path, backend: str, *extra: str) -> list[str]:
    return ["-m", "cxrbench.run.worker", "--run-dir", str(run_dir), "--backend", backend, *extra]


def start(command: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        command, stdout=open(log, "w"), stderr=subprocess.STDOUT, env={**os.environ, **env}, start_new_session=True
    )


def finish(processes: list[subprocess.Popen], logs: list[Path], limit_s: float = PROCESS_LIMIT_S) -> list[int]:
    """Every process's exit status; any still running at the limit is killed (with its group) and fails the test."""
    deadline = time.monotonic() + limit_s
    codes = []
    for process, log in zip(processes, logs):
        try:
            codes.append(process.wait(timeout=max(1.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            for other in processes:
                with_group(other, signal.SIGKILL)
            pytest.fail(f"{log.name} still running after {limit_s} s:\n{log.read_text()[-3000:]}")
    return codes


def with_group(process: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        pass
    process.wait()


def torchrun(port: int, nodes: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nodes), "--nproc-per-node", "1",
            "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--max-restarts", "0"]  # fmt: skip


def launch_pair(tmp_path: Path, commands: list[list[str]], envs: list[dict[str, str]]) -> list[int]:
    private = tmp_path / "rank-tmp"  # where the ranks other than 0 keep their private folder (must end empty)
    private.mkdir()
    logs = [tmp_path / f"rank-launch-{i}.log" for i in range(len(commands))]
    processes = [start(c, log, {"TMPDIR": str(private), **e}) for c, log, e in zip(commands, logs, envs)]
    codes = finish(processes, logs)
    assert codes == [0] * len(commands), "\n".join(log.read_text()[-3000:] for log in logs)
    assert list(private.glob("cxrbench-*")) == []  # the other rank's private folder is gone
    return codes


def single_process(run_dir: Path, backend: str, tmp_path: Path) -> Path:
    """The same training in one process on the concatenated batch (2 x batch, learning rate scaled as 2 ranks)."""
    folder = run_dir / "single-process"
    sets = ["--set", "run.nodes=1", "--set", f"train.batch_size={2 * PER_RANK_BATCH}",
            "--set", f"train.learning_rate={2 * LEARNING_RATE}"]  # fmt: skip
    log = tmp_path / "single.log"
    command = [sys.executable, *worker_args(run_dir, backend, "--folder", str(folder), "--stages", "train", *sets)]
    (code,) = finish([start(command, log, {})], [log])
    assert code == 0, log.read_text()[-3000:]
    return folder


def check_written_once(run_dir: Path, backend: str, launcher: str, library: str) -> dict:
    """Rank 0's results, once: one history, one status (rank 0), both ranks' records and monitor samples."""
    folder = run_dir / backend
    status = json.loads((folder / STATUS_JSON).read_text())
    assert status["status"] == "completed" and status["world"]["rank"] == 0 and status["world"]["processes"] == 2
    (record,) = json.loads((folder / HISTORY_JSON).read_text())
    assert (record["steps"], record["images"]) == (STEPS, 2 * PER_RANK_BATCH * STEPS)
    ranks = json.loads((folder / RANKS_JSON).read_text())
    assert [r["rank"] for r in ranks] == [0, 1] and {r["launcher"] for r in ranks} == {launcher}
    assert all(r["host"] == socket.gethostname() and library in json.dumps(r["communication"]) for r in ranks)
    assert len({r["pid"] for r in ranks}) == 2
    samples = [json.loads(line) for line in (folder / MONITOR_JSONL).read_text().splitlines()]
    assert {row["rank"] for row in samples} == {0, 1} and all(row["host"] for row in samples)
    numerics = json.loads((folder / TRAIN_JSON).read_text())["numerics"]
    assert (numerics["world_size"], numerics["nodes"], numerics["global_batch"]) == (2, 2, 2 * PER_RANK_BATCH)
    assert numerics["learning_rate"] == pytest.approx(2 * LEARNING_RATE)  # linear scaling, recorded
    assert numerics["batchnorm_sync"] == "global" and numerics["synchronized_batchnorm"]
    return json.loads((folder / TRAIN_JSON).read_text())


def check_equal_to_single_process(run_dir: Path, backend: str, tmp_path: Path) -> float:
    reference = single_process(run_dir, backend, tmp_path)
    got = canonical.load(run_dir / backend / WEIGHTS_NPZ)
    expected = canonical.load(reference / WEIGHTS_NPZ)
    initial = canonical.load(run_dir / "shared_init.npz")
    assert np.abs(got["features.conv0.weight"] - initial["features.conv0.weight"]).max() > 1e-4  # it trained
    worst = max(float(np.abs(got[name] - expected[name]).max()) for name in expected)
    assert worst < WEIGHTS_ATOL, worst
    (two,), (one,) = (json.loads((f / HISTORY_JSON).read_text()) for f in (run_dir / backend, reference))
    assert two["train_loss"] == pytest.approx(one["train_loss"], abs=1e-6)
    assert two["val_loss"] == pytest.approx(one["val_loss"], abs=1e-6)
    return worst


@pytest.mark.backends("pytorch")
def test_two_torchrun_agents_train_as_one_process_on_the_concatenated_batch(tmp_path):
    run_dir = prepare(tmp_path / "run", "pytorch")
    port = free_port()
    command = [*torchrun(port), *worker_args(run_dir, "pytorch", "--launched")]
    launch_pair(tmp_path, [command, command], [{}, {}])

    train = check_written_once(run_dir, "pytorch", "torchrun (c10d rendezvous)", "gloo")
    assert train["max_abs_weight_diff_between_ranks"] == 0.0 and train["max_abs_buffer_diff_between_ranks"] == 0.0
    assert train["numerics"]["data_parallel"] == "DistributedDataParallel (gloo)"
    for name in ("metrics.json", "model.onnx", "localisation.json"):  # the stages after training, on rank 0
        assert (run_dir / "pytorch" / name).is_file()
    check_equal_to_single_process(run_dir, "pytorch", tmp_path)

    # The documented last step: --resume merges the launched backend's folder and writes the report.
    done = subprocess.run(
        [sys.executable, "-m", "cxrbench", "run", "--resume", str(run_dir)],
        capture_output=True,
        text=True,
        timeout=PROCESS_LIMIT_S,
    )
    run = json.loads((run_dir / "run.json").read_text())
    assert run["backends"]["pytorch"]["status"] == "completed", done.stderr[-2000:]
    assert [r["rank"] for r in run["backends"]["pytorch"]["ranks"]] == [0, 1]
    assert (run_dir / "index.html").is_file()


@pytest.mark.backends("keras")
def test_two_tensorflow_workers_from_tf_config_train_as_one_process(tmp_path):
    run_dir = prepare(tmp_path / "run", "keras")
    workers = [f"127.0.0.1:{free_port()}" for _ in range(2)]
    command = [sys.executable, *worker_args(run_dir, "keras", "--launched", "--stages", "train")]
    envs = [
        {"TF_CONFIG": json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": i}})}
        for i in range(2)
    ]
    launch_pair(tmp_path, [command, command], envs)

    train = check_written_once(run_dir, "keras", "MultiWorkerMirroredStrategy (TF_CONFIG)", "collective")
    assert train["numerics"]["data_parallel"] == "CollectiveAllReduceStrategy"  # MultiWorkerMirroredStrategy's class
    # Identical replicas by construction: one MirroredVariable per weight, updated by the strategy's all-reduce.
    check_equal_to_single_process(run_dir, "keras", tmp_path)


@pytest.mark.backends("jax")
def test_two_jax_processes_with_gloo_collectives_train_as_one_process(tmp_path):
    run_dir = prepare(tmp_path / "run", "jax")
    coordinator = f"127.0.0.1:{free_port()}"
    command = [sys.executable, *worker_args(run_dir, "jax", "--launched", "--stages", "train")]
    envs = [
        {"JAX_COORDINATOR_ADDRESS": coordinator, "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(i)} for i in (0, 1)
    ]
    launch_pair(tmp_path, [command, command], envs)

    train = check_written_once(run_dir, "jax", "jax.distributed.initialize (JAX_COORDINATOR_ADDRESS)", "gloo")
    # Identical replicas by construction: the weights are one array replicated over the mesh of both processes.
    assert len(train["numerics"]["devices"]) == 2
    check_equal_to_single_process(run_dir, "jax", tmp_path)


def kill_one_and_wait_for_the_other(tmp_path: Path, backend: str, commands, envs, limit_s: float) -> int:
    """Start two ranks training for long, SIGKILL the second's process once the first epoch has ended (rank 0's
    status says epoch 2: collectives have run), and return the first's exit status (the test fails if it is still
    running after ``limit_s``). Not "step 2": that lasts from an epoch's end to the next epoch's start, a few
    milliseconds that a poll every half second would mostly miss (the kill would land after training)."""
    run_dir = tmp_path / "run"
    logs = [tmp_path / f"rank-{i}.log" for i in range(2)]
    ranks = [start(command, log, env) for command, log, env in zip(commands, logs, envs)]
    status = run_dir / backend / STATUS_JSON
    deadline = time.monotonic() + PROCESS_LIMIT_S
    while (json.loads(status.read_text()).get("progress") or {}).get("epoch", 0) < 2 if status.exists() else True:
        assert time.monotonic() < deadline and all(r.poll() is None for r in ranks), logs[0].read_text()[-2000:]
        time.sleep(0.5)
    ranks[1].kill()  # the process only: a torchrun agent's rank notices its parent is gone and stops
    ranks[1].wait()
    started = time.monotonic()
    (code,) = finish(ranks[:1], logs[:1], limit_s=limit_s)
    print(f"{backend}: the surviving rank exited with {code} {time.monotonic() - started:.1f} s after the kill")
    with_group(ranks[1], signal.SIGKILL)  # nothing may be left of the killed process's group either
    assert code != 0, logs[0].read_text()[-2000:]
    return code


LONG = {"train.epochs": 100}


@pytest.mark.backends("pytorch")
def test_killing_one_torchrun_agent_ends_the_other_instead_of_hanging(tmp_path):
    run_dir = prepare(tmp_path / "run", "pytorch", **LONG)
    command = [*torchrun(free_port()), *worker_args(run_dir, "pytorch", "--launched", "--stages", "train")]
    kill_one_and_wait_for_the_other(tmp_path, "pytorch", [command, command], [{}, {}], limit_s=120)


@pytest.mark.slow
@pytest.mark.backends("jax")
def test_killing_one_jax_process_ends_the_other_instead_of_hanging(tmp_path):
    """The coordination service notices the dead process (no heartbeat for run.heartbeat_timeout_s) and aborts the
    other (exit 134 here; JAX's default of 100 s would keep the test waiting that long)."""
    run_dir = prepare(tmp_path / "run", "jax", **LONG, **{"run.heartbeat_timeout_s": 10})
    command = [sys.executable, *worker_args(run_dir, "jax", "--launched", "--stages", "train")]
    coordinator = f"127.0.0.1:{free_port()}"
    envs = [
        {"JAX_COORDINATOR_ADDRESS": coordinator, "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(rank)}
        for rank in (0, 1)
    ]
    kill_one_and_wait_for_the_other(tmp_path, "jax", [command, command], envs, limit_s=60)  # JAX's default: 100 s
    assert "heartbeat timeout" in (tmp_path / "rank-0.log").read_text()


@pytest.mark.slow
@pytest.mark.backends("keras")
def test_killing_one_tensorflow_worker_ends_the_other_instead_of_hanging(tmp_path):
    """The survivor's next collective fails (UnavailableError), recorded as the backend's one-line error."""
    run_dir = prepare(tmp_path / "run", "keras", **LONG)
    command = [sys.executable, *worker_args(run_dir, "keras", "--launched", "--stages", "train")]
    workers = [f"127.0.0.1:{free_port()}" for _ in range(2)]
    envs = [
        {"TF_CONFIG": json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": i}})}
        for i in range(2)
    ]
    kill_one_and_wait_for_the_other(tmp_path, "keras", [command, command], envs, limit_s=200)
    status = json.loads((run_dir / "keras" / STATUS_JSON).read_text())
    assert status["status"] == "failed" and status["error"]


@pytest.mark.backends("pytorch")
def test_a_world_of_one_is_refused_in_one_line(tmp_path):
    run_dir = prepare(tmp_path / "run", "pytorch")  # the suite asks for 2 nodes; torchrun forms a world of 1
    log = tmp_path / "agent.log"
    command = [*torchrun(free_port(), nodes=1), *worker_args(run_dir, "pytorch", "--launched")]
    (code,) = finish([start(command, log, {})], [log])
    assert code != 0
    errors = [line.split(ERROR_MARK, 1)[1] for line in log.read_text().splitlines() if ERROR_MARK in line]
    assert errors == [
        "torch joined a world of 1 replica(s) through torchrun (c10d rendezvous), but the run asks for 2 "
        "(run.nodes = 2 x 1 CPU rank per node): check the launcher's node and process counts"
    ]
    assert not (run_dir / "pytorch" / STATUS_JSON).exists()  # nothing written: the rank never knew it was rank 0
