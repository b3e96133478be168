"""The monitor: summaries, the NVML and GPUtil readers (with stand-ins), the sampler thread."""

import json
import os
import stat
import sys
import time
import types

import numpy as np
import pytest

from cxrbench.machine.monitor.gpu import GpuStatus, open_gpu_reader
from cxrbench.machine.monitor.sampler import Sampler
from cxrbench.machine.monitor.summary import summarise

NO_GPU = GpuStatus(False, "none", "no GPU: test")


def test_summaries_per_phase_and_device_match_numpy():
    rng = np.random.default_rng(0)
    train_util, validate_util = rng.uniform(0, 100, 40), rng.uniform(0, 100, 7)
    samples = [{"phase": "train", "device": "gpu0", "util": u, "power_w": None} for u in train_util]
    samples += [{"phase": "validate", "device": "gpu0", "util": u, "power_w": None} for u in validate_util]
    samples += [{"phase": "train", "device": "cpu", "cpu_percent": 150.0, "rss_mib": 900.0}]

    summary = summarise(samples, GpuStatus(True, "gputil", None, ["V100"]), 1.0)

    train = summary["phases"]["train"]["gpu0"]["util"]
    assert train["mean"] == pytest.approx(train_util.mean())
    assert train["p50"] == pytest.approx(np.median(train_util))
    assert train["p95"] == pytest.approx(np.percentile(train_util, 95))
    assert train["n"] == 40
    assert summary["phases"]["validate"]["gpu0"]["util"]["n"] == 7
    assert "power_w" not in summary["phases"]["train"]["gpu0"]  # never reported: not a zero
    assert summary["phases"]["train"]["cpu"]["rss_mib"]["mean"] == 900.0
    assert summary["samples"] == 48 and summary["source"] == "gputil"


def _no_nvml(monkeypatch):
    broken = types.ModuleType("pynvml")

    def fail():
        raise OSError("NVML Shared Library Not Found")

    broken.nvmlInit = fail
    monkeypatch.setitem(sys.modules, "pynvml", broken)


#: The exact query GPUtil 1.4.0 runs; the stand-in answers only this, as nvidia-smi would.
GPUTIL_QUERY = (
    "--query-gpu=index,uuid,utilization.gpu,memory.total,memory.used,memory.free,driver_version,name,"
    "gpu_serial,display_active,display_mode,temperature.gpu"
)
GPUTIL_CSV = (
    "0, GPU-8a3e7c1d-0000-1111-2222-333344445555, 37, 16160, 5021, 11139, 535.104.05, Tesla V100-SXM2-16GB, 0323717000001, Disabled, Enabled, 45\n"  # noqa: E501 (nvidia-smi's line as it prints it)
    "1, GPU-8a3e7c1d-0000-1111-2222-333344446666, 91, 16160, 15800, 360, 535.104.05, Tesla V100-SXM2-16GB, 0323717000002, Disabled, Enabled, 71\n"  # noqa: E501
)


def _fake_nvidia_smi(tmp_path, monkeypatch):
    script = tmp_path / "bin" / "nvidia-smi"
    script.parent.mkdir()
    script.write_text(
        "#!/bin/sh\n"
        f'if [ "$1" = "{GPUTIL_QUERY}" ] && [ "$2" = "--format=csv,noheader,nounits" ]; then\n'
        f"cat <<'CSV'\n{GPUTIL_CSV}CSV\nelse echo \"unexpected arguments: $*\" >&2; exit 6; fi\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{script.parent}{os.pathsep}{os.environ['PATH']}")


def test_gputil_path_reads_the_nvidia_smi_stand_in(tmp_path, monkeypatch):
    _no_nvml(monkeypatch)
    _fake_nvidia_smi(tmp_path, monkeypatch)

    reader, status = open_gpu_reader()

    assert status.gpu_available and status.source == "gputil"
    assert status.devices == ["Tesla V100-SXM2-16GB"] * 2
    readings = reader.read()
    assert readings[0] == {
        "util": pytest.approx(37.0),
        "mem_mib": 5021.0,
        "power_w": None,
        "temp_c": 45.0,
        "other_processes": None,
    }
    assert readings[1]["util"] == pytest.approx(91.0) and readings[1]["mem_mib"] == 15800.0


class _FakeNvml(types.ModuleType):
    """pynvml's API surface the reader uses; device 1 does not support power readings."""

    NVML_TEMPERATURE_GPU = 0

    class NVMLError_NotSupported(Exception):
        pass

    def __init__(self):
        super().__init__("pynvml")
        self.shutdown_calls = 0

    def nvmlInit(self):
        return None

    def nvmlShutdown(self):
        self.shutdown_calls += 1

    def nvmlDeviceGetCount(self):
        return 2

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetName(self, handle):
        return b"NVIDIA A100-SXM4-40GB"

    def nvmlDeviceGetUtilizationRates(self, handle):
        return types.SimpleNamespace(gpu=[64, 12][handle], memory=30)

    def nvmlDeviceGetMemoryInfo(self, handle):
        return types.SimpleNamespace(used=[2**30, 3 * 2**29][handle], total=40 * 2**30)

    def nvmlDeviceGetPowerUsage(self, handle):
        if handle == 1:
            raise self.NVMLError_NotSupported()
        return 251_500  # milliwatts

    def nvmlDeviceGetTemperature(self, handle, sensor):
        return [55, 60][handle]

    def nvmlDeviceGetComputeRunningProcesses(self, handle):
        """Device 0 runs the worker (pid 100) and one stranger (pid 7); device 1 cannot say."""
        if handle == 1:
            raise self.NVMLError_NotSupported()
        return [types.SimpleNamespace(pid=100, usedGpuMemory=1), types.SimpleNamespace(pid=7, usedGpuMemory=1)]


def test_nvml_path_with_a_fake_pynvml(monkeypatch):
    fake = _FakeNvml()
    monkeypatch.setitem(sys.modules, "pynvml", fake)

    reader, status = open_gpu_reader()

    assert status.to_dict() == {
        "gpu_available": True,
        "source": "nvml",
        "reason": None,
        "devices": ["NVIDIA A100-SXM4-40GB"] * 2,
    }
    assert reader.read({100}) == [
        {"util": 64.0, "mem_mib": 1024.0, "power_w": 251.5, "temp_c": 55.0, "other_processes": 1.0},
        {"util": 12.0, "mem_mib": 1536.0, "power_w": None, "temp_c": 60.0, "other_processes": None},
    ]
    # In a container NVML lists host PIDs: none is the worker's, so one of the two is taken to be it.
    assert reader.read({555})[0]["other_processes"] == 1.0
    reader.close()
    assert fake.shutdown_calls == 1


def test_no_gpu_is_said_plainly(tmp_path, monkeypatch):
    _no_nvml(monkeypatch)
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi at all

    reader, status = open_gpu_reader()

    assert reader is None
    assert status.gpu_available is False and status.source == "none"
    assert "NVML unavailable (OSError)" in status.reason and "nvidia-smi reported no GPU" in status.reason


def test_gputil_is_optional_and_its_absence_is_named(monkeypatch):
    _no_nvml(monkeypatch)
    monkeypatch.setitem(sys.modules, "GPUtil", None)  # not installed (as on the GPU check's machine): ImportError

    reader, status = open_gpu_reader()

    assert reader is None and status.source == "none"
    assert "GPUtil is not installed (the optional cxrbench[gputil] fallback)" in status.reason


class _Tags:
    phase_name, epoch = "idle", 0


class _StubReader:
    source = "nvml"

    def read(self, own_pids=frozenset()):
        return [{"util": 50.0, "mem_mib": 100.0, "power_w": 80.0, "temp_c": 40.0}]

    def close(self):
        pass


def test_sampler_tags_rows_with_phase_and_epoch_and_writes_the_summary(tmp_path):
    tags = _Tags()
    sampler = Sampler(
        tmp_path, "pytorch", tags, interval_s=0.02, gpu=(_StubReader(), GpuStatus(True, "nvml", None, ["x"]))
    ).start()
    for phase, epoch in (("train", 1), ("validate", 1)):
        tags.phase_name, tags.epoch = phase, epoch
        _wait_for(lambda phase=phase: any(r["phase"] == phase for r in sampler.samples))
    summary = sampler.stop()

    rows = [json.loads(line) for line in (tmp_path / "monitor.jsonl").read_text().splitlines()]
    assert rows and set(rows[0]) == {
        "t",
        "backend",
        "phase",
        "epoch",
        "device",
        "util",
        "mem_mib",
        "power_w",
        "temp_c",
        "cpu_percent",
        "rss_mib",
        "system_cpu_percent",
        "others_cpu_share",
        "load_1m",
        "other_processes",
    }
    assert {(r["phase"], r["epoch"]) for r in rows} >= {("train", 1), ("validate", 1)}
    assert {r["device"] for r in rows} == {"cpu", "gpu0"}
    assert all(r["rss_mib"] > 0 for r in rows if r["device"] == "cpu")
    assert summary["phases"]["train"]["gpu0"]["power_w"]["mean"] == 80.0
    assert json.loads((tmp_path / "monitor.json").read_text())["samples"] == len(rows)


def _wait_for(condition, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "monitor took no sample in time"
        time.sleep(0.01)
