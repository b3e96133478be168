"""Model FLOPs counted once from the canonical network, checked against the published figures and (with torch)
against torch's own FLOP counter; the datasheet table; the measured ceiling's timing policy; the utilisation."""

import pytest

from cxrbench.backend.profiling import PEAK_MIN_CALL_S, measure_matmul_peak
from cxrbench.machine.peaks import datasheet_peak, matmul_precision
from cxrbench.metrics import flops

DENSENET121 = (6, 12, 24, 16)


def test_densenet121_at_224_px_is_the_published_2_83_g_multiply_adds():
    counted = flops.model_flops(DENSENET121, 224)
    # torchvision lists "2.83 GFLOPS" (multiply-adds), timm "2.9 GMACs" (rounded): 5.67 GFLOPs at 2 per MAC
    assert counted["forward_macs"] == pytest.approx(2.83e9, rel=0.002)
    assert counted["forward_flops"] == 2 * counted["forward_macs"]
    assert counted["training_flops"] == 3 * counted["forward_flops"] == pytest.approx(17.0e9, rel=0.002)
    assert counted["unit"] == "FLOP per image" and "3 x forward" in counted["rule"]
    # what the rule leaves out (BatchNorm and ReLU) is about 1.4 %, as the module says
    assert counted["not_counted_forward_flops"] / counted["forward_flops"] == pytest.approx(0.014, abs=0.001)
    assert flops.forward_macs(DENSENET121, 64) == pytest.approx(counted["forward_macs"] * (64 / 224) ** 2, rel=0.02)


@pytest.mark.backends("pytorch")  # torch's own FLOP counter is the independent reference (CI's full stage)
@pytest.mark.parametrize("arch, size", [(DENSENET121, 224), ((2, 2, 2, 2), 96)])
def test_the_count_matches_torchs_flop_counter_forward_and_backward(arch, size):
    import torch
    import torchvision
    from torch.utils.flop_counter import FlopCounterMode

    net = torchvision.models.DenseNet(growth_rate=32, block_config=arch, num_init_features=64, num_classes=14)
    net.to("meta")  # shapes only: torch counts without computing
    counter = FlopCounterMode(display=False)
    with counter:
        out = net(torch.zeros(1, 3, size, size, device="meta"))
    forward = counter.get_total_flops()
    with counter:
        out.sum().backward()
    backward = counter.get_total_flops()
    counted = flops.model_flops(arch, size)
    assert forward == pytest.approx(counted["forward_flops"], rel=1e-6)  # convolutions and the classifier only
    # the rule's backward = 2 x forward; torch's count is lower by exactly the first convolution's input gradient,
    # which nothing needs (2.1 % at 224 px)
    first = flops.densenet_layers(arch, size)[0]
    assert first["name"] == "features.conv0"
    assert backward == 2 * counted["forward_flops"] - flops.FLOPS_PER_MAC * first["macs"]


def test_utilisation_is_achieved_training_flops_over_the_ceilings_times_devices():
    counted = flops.model_flops(DENSENET121, 64)
    ceiling = {"measured": {"flop_per_s": 1e11}, "datasheet": {"flop_per_s": 4e11}}
    result = flops.efficiency(counted, 50.0, ceiling, devices=2)
    assert result["achieved_flop_per_s"] == pytest.approx(counted["training_flops"] * 50.0)
    assert result["fraction_of_measured"] == pytest.approx(counted["training_flops"] * 50.0 / 2e11)
    assert result["fraction_of_datasheet"] == pytest.approx(counted["training_flops"] * 50.0 / 8e11)
    none = flops.efficiency(counted, None, None)
    assert none["achieved_flop_per_s"] is None and none["fraction_of_measured"] is None and none["ceiling"] is None


def test_datasheet_peaks_by_nvml_name_and_precision_with_their_source():
    h200 = datasheet_peak("NVIDIA H200", "bf16")
    assert h200["flop_per_s"] == 989.5e12 and h200["model"] == "H200 SXM" and h200["source"].startswith("https://")
    assert datasheet_peak("NVIDIA H200 NVL", "bf16")["flop_per_s"] == 835.5e12
    assert datasheet_peak("NVIDIA H100 80GB HBM3", "tf32")["flop_per_s"] == 494.5e12
    assert datasheet_peak("NVIDIA H100 PCIe", "fp32")["flop_per_s"] == 51e12
    assert datasheet_peak("NVIDIA A100-SXM4-80GB", "fp32")["flop_per_s"] == 19.5e12
    assert datasheet_peak("Tesla V100-PCIE-16GB", "fp16")["flop_per_s"] == 112e12
    assert datasheet_peak("Tesla V100-SXM2-16GB", "bf16") is None  # Volta has no bf16 tensor cores
    assert datasheet_peak("Tesla K80", "fp32")["flop_per_s"] == 4.365e12
    assert datasheet_peak("NVIDIA GeForce RTX 3090", "bf16") is None and datasheet_peak(None, "fp32") is None
    assert (matmul_precision("fp32", True), matmul_precision("fp32", False), matmul_precision("bf16", True)) == (
        "tf32",
        "fp32",
        "bf16",
    )


def test_the_ceiling_grows_the_matrix_until_a_call_is_long_enough_then_keeps_the_best_call():
    clock = [0.0]
    rate = 1e9  # a fake device at 1 GFLOP/s, one slow call per size

    def make(size):
        calls = []

        def call():
            calls.append(size)
            clock[0] += 2 * size**3 / rate * (3 if len(calls) == 2 else 1)

        return call

    peak = measure_matmul_peak(
        make, lambda: None, dtype="float32", device="fake", how="fake", budget_s=5.0, clock=lambda: clock[0]
    )
    assert 2 * peak.size**3 / rate >= PEAK_MIN_CALL_S > 2 * (peak.size // 2) ** 3 / rate
    assert peak.flop_per_s == pytest.approx(rate) and peak.repeats > 3 and peak.seconds >= 5.0
