"""The GPUs a run uses: CUDA_VISIBLE_DEVICES resolved as CUDA does, and only those watched, with guarded reads.

No GPU here: a fake pynvml with eight GPUs in PCI order stands in for NVML.
"""

from __future__ import annotations

import sys
import types

import pytest

from cxrbench.errors import BackendError, CxrError
from cxrbench.machine import devices, env
from cxrbench.machine.monitor.gpu import open_gpu_reader
from cxrbench.machine.monitor.sampler import Sampler
from cxrbench.machine.monitor.summary import summarise
from cxrbench.run.scaling import check_available

EIGHT = [devices.Gpu(i, "NVIDIA H100", f"GPU-{i}aaa{i}-uuid", 81559) for i in range(8)]


class _FakeNvml(types.ModuleType):
    """Eight GPUs; utilisation of the GPUs in ``failing`` raises, as a MIG device or a lost GPU does."""

    NVML_TEMPERATURE_GPU = 0

    class NVMLError_NotSupported(Exception):
        pass

    def __init__(self, count: int = 8, failing: frozenset[int] = frozenset()):
        super().__init__("pynvml")
        self.count, self.failing = count, failing

    def nvmlInit(self):
        return None

    def nvmlShutdown(self):
        return None

    def nvmlDeviceGetCount(self):
        return self.count

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetName(self, handle):
        return b"NVIDIA H100"

    def nvmlDeviceGetUUID(self, handle):
        return EIGHT[handle].uuid

    def nvmlDeviceGetUtilizationRates(self, handle):
        if handle in self.failing:
            raise self.NVMLError_NotSupported()
        return types.SimpleNamespace(gpu=10 * handle, memory=0)

    def nvmlDeviceGetMemoryInfo(self, handle):
        return types.SimpleNamespace(used=handle * 2**30, total=81559 * 2**20)

    def nvmlDeviceGetPowerUsage(self, handle):
        return 300_000

    def nvmlDeviceGetTemperature(self, handle, sensor):
        return 50

    def nvmlDeviceGetComputeRunningProcesses(self, handle):
        return []

    def nvmlSystemGetDriverVersion(self):
        return b"580.1"

    def nvmlSystemGetCudaDriverVersion(self):
        return 13000


@pytest.mark.parametrize(
    "spec, expected",
    [
        (None, list(range(8))),
        ("", []),
        ("3", [3]),
        ("5,2", [5, 2]),  # CUDA's order is the variable's order
        ("GPU-6aaa6-uuid", [6]),
        ("GPU-1aaa", [1]),  # a unique prefix is enough
        ("6aaa6", [6]),  # UUIDs may leave out "GPU-"
        ("0,abc,1", [0]),  # the list ends at the first entry that names no GPU
        ("0,9", [0]),
        ("1,1", [1]),  # or repeats one
        ("MIG-4f1c", []),  # MIG instances are not resolved
    ],
)
def test_visible_resolves_cuda_visible_devices_like_cuda(spec, expected):
    assert [gpu.nvml_index for gpu in devices.visible(EIGHT, spec)] == expected


def test_run_uses_the_first_visible_gpus():
    shown = devices.visible(EIGHT, "6,4,2")
    assert [g.nvml_index for g in devices.used_by_run(shown, 0)] == [6]  # run.gpus = 0: the first GPU if any
    assert [g.nvml_index for g in devices.used_by_run(shown, 2)] == [6, 4]
    assert devices.used_by_run([], 0) == []


def test_inventory_counts_only_visible_gpus_and_names_the_hidden(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", _FakeNvml())
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")

    inventory = env.gpu_inventory()

    assert inventory["count"] == 1 and inventory["hidden"] == 7 and inventory["source"] == "nvml"
    assert inventory["devices"] == [
        {"index": 0, "nvml_index": 3, "name": "NVIDIA H100", "uuid": "GPU-3aaa3-uuid", "memory_total_mib": 81559}
    ]
    assert inventory["driver"] == "580.1" and inventory["cuda_driver"] == "13.0"
    assert env.run_gpu_indices(0) == [3]
    with pytest.raises(
        CxrError,
        match=r"asked for 2 GPUs but this machine has 1 \(7 more hidden by "
        r"CUDA_VISIBLE_DEVICES='3'\)",
    ):
        check_available([1, 2], inventory)


def test_without_nvml_the_device_nodes_count_gpus(tmp_path):
    for name in ("nvidia0", "nvidia1", "nvidiactl", "nvidia-uvm"):
        (tmp_path / name).touch()

    found = devices.device_node_gpus(str(tmp_path / "nvidia[0-9]*"))

    assert [gpu.nvml_index for gpu in found] == [0, 1]
    assert [g.nvml_index for g in devices.visible(found, "1")] == [1]


def test_monitor_watches_only_the_run_gpus(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", _FakeNvml())

    reader, status = open_gpu_reader(watch=[3])

    assert status.devices == ["NVIDIA H100"]
    (row,) = reader.read()
    assert row["util"] == 30.0 and row["mem_mib"] == 3 * 1024.0  # GPU 3's figures, not an average of eight


def test_run_on_no_gpu_reads_nothing_and_says_so(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", _FakeNvml())

    reader, status = open_gpu_reader(watch=[])

    assert reader is None and not status.gpu_available and "uses none" in status.reason


def test_a_failed_nvml_read_is_recorded_and_monitoring_goes_on(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", _FakeNvml(failing=frozenset({2})))
    tags = types.SimpleNamespace(phase_name="train", epoch=1)
    sampler = Sampler(tmp_path, "pytorch", tags, interval_s=0.01, watch=[1, 2])

    rows = sampler.sample_once() + sampler.sample_once()  # what the sampler thread appends, twice
    summary = summarise(rows, sampler.status, 0.01)

    gpu1, gpu2 = [r for r in rows[:3] if r["device"] != "cpu"]
    assert gpu1["util"] == 10.0 and "read_error" not in gpu1
    assert gpu2["util"] is None and gpu2["mem_mib"] == 2048.0
    assert gpu2["read_error"] == "nvmlDeviceGetUtilizationRates: NVMLError_NotSupported"
    assert summary["gpu_read_errors"] == {"gpu1": 2}
    assert summary["phases"]["train"]["gpu0"]["util"]["mean"] == 10.0


@pytest.mark.parametrize(
    "sees, requested, message",
    [
        (0, 0, r"^torch sees 0 GPU\(s\) but this process may use 1 \(NVIDIA H100\): its CUDA libraries did not load"),
        (1, 2, r"^torch sees 1 GPU\(s\) but this process may use 2 \(NVIDIA H100\)"),
        (0, 4, r"^run.gpus = 4, but torch sees 0 GPU\(s\)$"),
    ],
)
def test_a_framework_blind_to_the_gpus_it_was_given_is_refused_not_sent_to_the_cpu(
    monkeypatch, sees, requested, message
):
    monkeypatch.setitem(sys.modules, "pynvml", _FakeNvml())
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3" if requested < 2 else "3,4")
    with pytest.raises(BackendError, match=message):
        env.require_framework_gpus("torch", sees, requested)
    env.require_framework_gpus("torch", sees=2, requested=requested if requested <= 2 else 2)  # enough: no error


def test_no_gpu_given_means_the_cpu_is_fine(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", _FakeNvml())
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    env.require_framework_gpus("TensorFlow", sees=0, requested=0)


@pytest.mark.backends("pytorch", "keras")
def test_both_backends_refuse_a_gpu_given_but_unseen(monkeypatch):
    from cxrbench.suite import Settings
    from cxrbench_keras.numerics import configure_runtime
    from cxrbench_pytorch.numerics import select_device

    monkeypatch.setitem(sys.modules, "pynvml", _FakeNvml())
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")  # NVML shows this process one GPU; neither framework sees it
    with pytest.raises(BackendError, match=r"^torch sees 0 GPU\(s\) but this process may use 1"):
        select_device(Settings())
    with pytest.raises(BackendError, match=r"^TensorFlow sees 0 GPU\(s\) but this process may use 1"):
        configure_runtime(Settings())
