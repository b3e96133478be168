"""cxrbench backends --check: each backend asked in a process of its own which devices its framework sees."""

from __future__ import annotations

import json
import sys

import pytest

from cxrbench.cli import main
from cxrbench.machine.framework_devices import check_backend

#: A stand-in for nvidia-ml-py in the checked process: NVML shows it one GPU.
FAKE_PYNVML = """
class _Memory:
    total = 80 * 2**30
def nvmlInit(): pass
def nvmlShutdown(): pass
def nvmlDeviceGetCount(): return 1
def nvmlDeviceGetHandleByIndex(i): return i
def nvmlDeviceGetName(h): return "NVIDIA H200"
def nvmlDeviceGetUUID(h): return "GPU-0000"
def nvmlDeviceGetMemoryInfo(h): return _Memory()
def nvmlSystemGetDriverVersion(): return "580.1"
def nvmlSystemGetCudaDriverVersion(): return 13000
"""


@pytest.mark.backends("numpy")
def test_a_backend_that_sees_what_nvml_shows_is_ok(capsys):
    row = check_backend("numpy")
    assert row["ok"] and row["devices"] == ["cpu"] and row["gpus"] == 0 and row["verdict"] == "ok"
    assert row["python"] == sys.executable


@pytest.mark.backends("numpy")
def test_a_framework_blind_to_a_gpu_nvml_shows_is_named(tmp_path, monkeypatch, capsys):
    (tmp_path / "pynvml.py").write_text(FAKE_PYNVML)
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}:{':'.join(sys.path)}")  # the checked process imports the fake
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)

    code = main(["backends", "--check", "--json"])

    rows = {row["backend"]: row for row in json.loads(capsys.readouterr().out)["checks"]}
    numpy_row = rows["numpy"]
    assert code == 1 and not numpy_row["ok"] and numpy_row["nvml_gpus"] == 1
    assert numpy_row["verdict"].startswith("sees 0 of the 1 GPU(s) NVML shows: its CUDA libraries did not load here")


def test_an_interpreter_without_the_backend_is_one_row_not_a_crash(tmp_path):
    row = check_backend("nosuch")
    assert not row["ok"] and row["verdict"].startswith("failed to import: ")
    assert "unknown backend 'nosuch'" in row["verdict"] or "not installed" in row["verdict"]
