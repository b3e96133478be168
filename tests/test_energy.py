"""Energy counters read at the timing windows' edges: NVML on GPUs, powercap (RAPL) on CPUs, unavailable with the
reason otherwise; the windows carry their joules into throughput.json. Fakes only: no GPU or RAPL needed."""

import types

import pytest

from cxrbench.backend.timing import Window, WindowTimer
from cxrbench.machine import energy


def powercap(tmp_path, packages):
    """A powercap tree: ``packages`` = {name: (energy_uj, max_energy_range_uj)}, plus a sub-domain per package."""
    root = tmp_path / "powercap"
    for i, (name, (value, wrap)) in enumerate(packages.items()):
        package = root / f"intel-rapl:{i}"
        (package / f"intel-rapl:{i}:0").mkdir(parents=True)  # the core sub-domain: part of the package, not counted
        (package / f"intel-rapl:{i}:0" / "energy_uj").write_text("5\n")
        (package / "name").write_text(f"{name}\n")
        (package / "energy_uj").write_text(f"{value}\n")
        (package / "max_energy_range_uj").write_text(f"{wrap}\n")
    return root


def test_rapl_sums_the_packages_and_unwraps_each_counter(tmp_path):
    root = powercap(tmp_path, {"package-0": (1_000_000, 10_000_000), "package-1": (9_000_000, 10_000_000)})
    meter = energy.open_energy_meter(None, root=root)
    assert meter.source == "rapl" and "package-0, package-1" in meter.covers
    assert meter.read() == 0.0  # the first reading is the origin
    (root / "intel-rapl:0" / "energy_uj").write_text("3500000")  # +2.5 J
    (root / "intel-rapl:1" / "energy_uj").write_text("500000")  # wrapped: +1.5 J
    assert meter.read() == pytest.approx(4.0)


def test_rapl_unreadable_or_absent_is_unavailable_with_the_reason(tmp_path, monkeypatch):
    root = powercap(tmp_path, {"package-0": (1, 10)})
    real_read = type(root).read_text

    def refuse(path, *args, **kwargs):
        if path.name == "energy_uj":
            raise PermissionError(13, "Permission denied")
        return real_read(path, *args, **kwargs)

    monkeypatch.setattr(type(root), "read_text", refuse)
    meter = energy.open_energy_meter([], root=root)
    assert meter.read() is None and "readable by root only" in meter.reason and "energy_uj" in meter.reason
    monkeypatch.undo()
    absent = energy.open_energy_meter(None, root=tmp_path / "none")
    assert absent.source == "none" and "no RAPL package counters" in absent.reason


class FakeNvml:
    """pynvml's energy calls over two GPUs; the counter is millijoules since the driver loaded."""

    class NVMLError_NotSupported(Exception):
        pass

    def __init__(self, supported=True):
        self.supported = supported
        self.millijoules = {0: 5_000_000, 1: 7_000_000}

    def nvmlInit(self):
        pass

    def nvmlDeviceGetHandleByIndex(self, index):
        return index

    def nvmlDeviceGetName(self, handle):
        return b"NVIDIA H200"

    def nvmlDeviceGetTotalEnergyConsumption(self, handle):
        if not self.supported:
            raise self.NVMLError_NotSupported()
        return self.millijoules[handle]


def test_nvml_reads_the_total_energy_of_the_runs_gpus_in_joules():
    nvml = FakeNvml()
    meter = energy.open_energy_meter([0, 1], pynvml=nvml)
    assert meter.source == "nvml" and "NVIDIA H200, NVIDIA H200" in meter.covers
    first = meter.read()
    nvml.millijoules[0] += 1500
    nvml.millijoules[1] += 500
    assert meter.read() - first == pytest.approx(2.0)


def test_a_gpu_without_an_energy_counter_or_without_nvml_says_so():
    old = energy.open_energy_meter([0], pynvml=FakeNvml(supported=False))
    assert old.read() is None and "no energy counter on NVIDIA H200" in old.reason and "Volta" in old.reason
    broken = types.SimpleNamespace(nvmlInit=lambda: (_ for _ in ()).throw(OSError("no driver")))
    assert "NVML did not open" in energy.open_energy_meter([0], pynvml=broken).reason


def test_windows_carry_the_joules_between_their_edges_and_the_phase_figure_adds_them_up():
    ticks = iter(range(100))
    joules = iter([10.0, 14.0, 20.0, 21.0])  # read at the warm-up edge and at each window's end
    timer = WindowTimer(
        range(7), images=8, warmup_steps=1, window_steps=2, clock=lambda: next(ticks), energy=lambda: next(joules)
    )
    list(timer)
    assert [w.joules for w in timer.windows] == [4.0, 6.0, 1.0]
    rows = [w.to_list() for w in timer.windows]
    assert all(len(row) == 4 for row in rows)
    figure = energy.phase_energy(rows)
    assert figure["joules"] == 11.0 and figure["images"] == 48 and figure["joules_per_image"] == pytest.approx(11 / 48)
    assert energy.phase_energy([Window(2, 16, 1.0).to_list()]) is None  # no counter: no figure, never a guess
