"""The framework-free parts of multi-node runs: the world-size refusal, BatchNorm scope, the gathered payloads, the
monitor rows another rank sends, a launched rank's one-line error, and the scaling table against 1 GPU and 1 node."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cxrbench.backend import (
    World,
    batchnorm_scope,
    decode_payloads,
    encode_payload,
    expected_replicas,
    node_groups,
    pad_payload,
    require_world_size,
)
from cxrbench.errors import BackendError
from cxrbench.files import write_json
from cxrbench.machine.monitor.gpu import GpuStatus
from cxrbench.machine.monitor.sampler import Sampler
from cxrbench.machine.monitor.summary import summarise
from cxrbench.run.folder import LOG_TXT, MONITOR_JSONL, THROUGHPUT_JSON, TRAIN_JSON
from cxrbench.run.scaling import scaling_table
from cxrbench.run.store import ERROR_MARK, BackendStatus, record_end
from cxrbench.suite import Settings


def settings(**dotted) -> Settings:
    return Settings().replace(**dotted)


def test_the_world_the_suite_asks_for_and_the_one_line_refusal():
    assert expected_replicas(settings(**{"run.nodes": 2, "run.gpus": 8})) == 16
    assert expected_replicas(settings(**{"run.nodes": 2, "run.gpus": 0})) == 2  # one CPU rank per machine
    require_world_size("torch", "torchrun", 16, settings(**{"run.nodes": 2, "run.gpus": 8}))
    with pytest.raises(BackendError) as error:
        require_world_size("jax", "jax.distributed.initialize (Slurm)", 8, settings(**{"run.nodes": 2, "run.gpus": 8}))
    assert str(error.value) == (
        "jax joined a world of 8 replica(s) through jax.distributed.initialize (Slurm), but the run asks for 16 "
        "(run.nodes = 2 x 8 GPU(s) per node): check the launcher's node and process counts"
    )


def test_batchnorm_scope_follows_the_setting_and_the_ranks_per_group():
    node = {"train.batchnorm_sync": "node", "run.nodes": 2}
    assert node_groups(settings(**node)) == 2 and node_groups(settings(**{"run.nodes": 2})) == 1
    assert batchnorm_scope(settings(**node), replicas=16) == "node"
    assert batchnorm_scope(settings(**node), replicas=2) == "none"  # one rank per machine: its own batch
    assert batchnorm_scope(settings(**{"run.nodes": 2}), replicas=2) == "global"
    assert batchnorm_scope(settings(), replicas=1) == "none"


def test_payloads_survive_padding_and_a_gather():
    payloads = [{"record": {"rank": 0}, "samples": []}, {"record": {"rank": 1, "host": "b"}, "samples": [{"t": 1.5}]}]
    encoded = [encode_payload(p) for p in payloads]
    longest = max(len(e) for e in encoded)
    rows = np.stack([pad_payload(e, longest) for e in encoded])  # what an all-gather returns on every rank
    assert decode_payloads(rows, [len(e) for e in encoded]) == payloads
    assert World(rank=1, processes=2, replicas=2, local_rank=0, launcher="x").to_dict()["gpu_indices"] == []


class Tags:
    phase_name, epoch = "train", 1


def test_another_ranks_rows_join_the_stream_and_the_summary_by_host(tmp_path):
    rank1 = Sampler(None, "pytorch", Tags(), gpu=(None, GpuStatus(False, "none")), labels={"host": "b", "rank": 1})
    rows = rank1.sample_once()
    assert not list(tmp_path.iterdir()) and {(r["host"], r["rank"]) for r in rows} == {("b", 1)}
    rank0 = Sampler(tmp_path, "pytorch", Tags(), gpu=(None, GpuStatus(False, "none")), labels={"host": "a", "rank": 0})
    rank0.add(rank0.sample_once() + rows)
    written = [json.loads(line) for line in (tmp_path / MONITOR_JSONL).read_text().splitlines()]
    assert [(r["host"], r["rank"], r["device"]) for r in written] == [("a", 0, "cpu"), ("b", 1, "cpu")]
    assert set(summarise(written, GpuStatus(False, "none"), 1.0)["phases"]["train"]) == {"cpu", "rank1@b:cpu"}


def test_a_launched_rank_that_never_joined_fails_with_the_line_it_printed(tmp_path):
    (tmp_path / LOG_TXT).write_text(f"Traceback ...\n{ERROR_MARK}torch joined a world of 1 replica(s) ...\nbye\n")
    status = record_end(tmp_path, "pytorch", returncode=1)
    assert status["status"] == "failed" and status["error"] == "torch joined a world of 1 replica(s) ..."
    assert BackendStatus(tmp_path, "pytorch").data["error"] == status["error"]


def test_scaling_efficiency_against_one_gpu_and_against_one_node(tmp_path):
    def point(folder, images_per_s, global_batch):
        folder.mkdir(parents=True)
        write_json(folder / THROUGHPUT_JSON, {"train_images_per_s": images_per_s})
        numerics = {"global_batch": global_batch, "learning_rate": 1e-3, "lr_scaling": "linear", "batchnorm_sync": "x"}
        write_json(folder / TRAIN_JSON, {"numerics": numerics})

    point(tmp_path / "b", 100.0, 16)  # 1 node x 1 GPU
    point(tmp_path / "b" / "gpus-8", 720.0, 128)  # 1 node x 8 GPUs
    point(tmp_path / "b" / "nodes-2", 190.0, 32)  # 2 nodes x 1 GPU (the first GPU count)
    table = scaling_table(tmp_path, ["b"], [1, 8], [1, 2])["b"]
    assert [(e["nodes"], e["gpus"], e["replicas"]) for e in table] == [(1, 1, 1), (1, 8, 8), (2, 1, 2)]
    assert table[1]["efficiency_vs_1_gpu"] == pytest.approx(0.9) and table[1]["efficiency"] == pytest.approx(0.9)
    assert table[2]["efficiency_vs_1_node"] == pytest.approx(0.95) and table[2]["efficiency"] is None
    assert table[2]["efficiency_vs_1_gpu"] == pytest.approx(0.95)  # here the one-node point is the one-GPU point
    assert table[0]["efficiency_vs_1_node"] is None and table[2]["global_batch"] == 32
