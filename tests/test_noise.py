"""The noise guard: recorded samples through the verdict arithmetic, and a real CPU hog started here."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from cxrbench.files import write_json
from cxrbench.machine.budget import thread_budget, usable_cores
from cxrbench.machine.monitor import noise
from cxrbench.machine.monitor.gpu import GpuStatus
from cxrbench.machine.monitor.sampler import Sampler
from cxrbench.run.progress import summary_table
from cxrbench.suite import Settings


def _cpu_row(phase: str, share: float, load: float = 1.0) -> dict:
    return {"phase": phase, "device": "cpu", "others_cpu_share": share, "load_1m": load}


def test_others_share_is_the_usable_cores_busy_time_minus_the_workers():
    assert noise.others_cpu_share(system_percent=200.0, own_percent=65.0, cores=2) == pytest.approx(0.675)
    assert noise.others_cpu_share(system_percent=90.0, own_percent=100.0, cores=2) == 0.0  # sampling skew
    assert noise.others_cpu_share(system_percent=800.0, own_percent=0.0, cores=4) == 1.0


def test_a_quiet_measurement_is_not_disturbed():
    quiet = [_cpu_row("train", s) for s in (0.02, 0.05, 0.04, 0.30, 0.03)] + [_cpu_row("predict", 0.01)]
    verdicts = noise.judge(quiet)
    assert set(verdicts) == {"train", "predict"}  # validate had no sample: no verdict
    assert verdicts["train"]["others_cpu_share_mean"] == pytest.approx(0.088)
    assert verdicts["train"]["others_cpu_share_max"] == pytest.approx(0.30)
    assert not any(v["disturbed"] for v in verdicts.values())


def test_a_busy_phase_or_another_gpu_process_is_disturbed():
    rows = [_cpu_row("train", 0.5)] * 3 + [_cpu_row("validate", 0.0)]
    rows += [{"phase": "validate", "device": "gpu0", "other_processes": 1.0}]
    verdicts = noise.judge(rows + [_cpu_row("export", 0.9)])
    assert verdicts["train"]["disturbed"] and verdicts["validate"]["disturbed"]
    assert "export" not in verdicts  # not a timed phase
    assert noise.describe(verdicts["train"]) == "others used 50% of the CPU (limit 15%)"
    assert noise.describe(verdicts["validate"]) == "1 other process(es) on the GPU"


def test_verdicts_merge_into_throughput_json_and_reach_the_end_of_run_warning(tmp_path):
    write_json(
        tmp_path / "throughput.json",
        {
            "train_images_per_s": 20.0,
            "disturbed": False,
            "disturbance": {"train": {"disturbed": True, "others_cpu_share_mean": 0.4, "limit": 0.15}},
        },
    )
    noise.record(tmp_path, noise.judge([_cpu_row("predict", 0.0)]))  # a resumed worker that only predicted
    throughput = json.loads((tmp_path / "throughput.json").read_text())
    assert set(throughput["disturbance"]) == {"train", "predict"} and throughput["disturbed"]
    run = {"backends": {"pytorch": {"status": "completed", "auroc": None, "throughput": throughput}}}
    lines = summary_table(run, {}).splitlines()
    assert "20.0*" in lines[1]
    assert lines[-1] == "warning: pytorch speed measurement disturbed, train: others used 40% of the CPU (limit 15%)"


class _Train:
    phase_name, epoch = "train", 1


@pytest.mark.serial  # the noise guard, and a hog on every core
def test_a_cpu_hog_on_every_core_marks_the_measurement_disturbed(tmp_path):
    """A busy process per usable core, outside the measured worker's process tree (a sleeper here)."""
    write_json(tmp_path / "throughput.json", {"train_images_per_s": 20.0, "disturbed": False, "disturbance": {}})
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(usable_cores())]
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        sampler = Sampler(
            tmp_path,
            "pytorch",
            _Train(),
            interval_s=0.25,
            pid=worker.pid,
            gpu=(None, GpuStatus(False, "none", "no GPU: test")),
        ).start()
        deadline = time.monotonic() + 30
        while sum(r["device"] == "cpu" for r in sampler.samples) < 6 and time.monotonic() < deadline:
            time.sleep(0.05)
        sampler.stop()
    finally:
        for process in (*hogs, worker):
            process.kill()
            process.wait()
    throughput = json.loads((tmp_path / "throughput.json").read_text())
    assert throughput["disturbance"]["train"]["samples"] >= 6
    assert throughput["disturbed"] is True and throughput["disturbance"]["train"]["disturbed"] is True


def test_every_backend_gets_the_same_thread_budget_from_the_usable_cores():
    numerics = Settings().numerics
    cores = usable_cores()
    assert thread_budget(numerics) == {"intra_op": cores, "inter_op": cores}
    assert thread_budget(numerics, processes=2) == {"intra_op": max(1, cores // 2), "inter_op": max(1, cores // 2)}
    chosen = Settings().replace(**{"numerics.intra_op_threads": 3, "numerics.inter_op_threads": 1}).numerics
    assert thread_budget(chosen) == {"intra_op": 3, "inter_op": 1}
