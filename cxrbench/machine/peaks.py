"""Datasheet peaks of known GPUs: the second ceiling beside the matmul rate the run measures itself.

Dense (no structured sparsity) tera-FLOP/s per GPU as NVML names it, by the precision the run's matrix products use:
``fp32`` (CUDA cores), ``tf32``, ``bf16`` and ``fp16`` (tensor cores). NVIDIA's datasheets print tensor-core figures
"with sparsity"; the dense figure is half of it, and that is what a dense DenseNet can reach. A GPU or a precision
not listed has no datasheet figure (``None``), never a guess; CPUs have none (their peak depends on the clock and
the vector units in use, so the measured ceiling stands alone).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Datasheet:
    model: str
    pattern: str  #: searched (case-insensitively) in NVML's device name
    tflops: dict[str, float]
    source: str


H100_H200 = "https://www.nvidia.com/en-us/data-center/h100/ and /h200/ (datasheet figures with sparsity, halved)"
A100 = "https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf"
V100 = "https://images.nvidia.com/content/technologies/volta/pdf/volta-v100-datasheet-update-us-1165301-r5.pdf"
K80 = "https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/tesla-product-literature/Tesla-K80-BoardSpec-07317-001-v05.pdf"

#: First match wins, so the more specific names come first.
DATASHEETS: tuple[Datasheet, ...] = (
    Datasheet("H200 NVL", r"H200 NVL", {"fp32": 60.0, "tf32": 417.5, "bf16": 835.5, "fp16": 835.5}, H100_H200),
    Datasheet("H200 SXM", r"H200", {"fp32": 67.0, "tf32": 494.5, "bf16": 989.5, "fp16": 989.5}, H100_H200),
    Datasheet("H100 NVL", r"H100 NVL", {"fp32": 60.0, "tf32": 417.5, "bf16": 835.5, "fp16": 835.5}, H100_H200),
    Datasheet("H100 PCIe", r"H100.*PCIe", {"fp32": 51.0, "tf32": 378.0, "bf16": 756.5, "fp16": 756.5}, H100_H200),
    Datasheet("H100 SXM", r"H100", {"fp32": 67.0, "tf32": 494.5, "bf16": 989.5, "fp16": 989.5}, H100_H200),
    Datasheet("A100", r"A100", {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0, "fp16": 312.0}, A100),
    Datasheet("V100S PCIe", r"V100S", {"fp32": 16.4, "fp16": 130.0}, V100),
    Datasheet("V100 PCIe", r"V100.*PCIE", {"fp32": 14.0, "fp16": 112.0}, V100),
    Datasheet("V100 SXM2", r"V100", {"fp32": 15.7, "fp16": 125.0}, V100),
    # NVML lists each of the board's two GK210 GPUs; the board's 8.73 TFLOPS (GPU Boost) is two of them.
    Datasheet("K80 (one GK210)", r"K80", {"fp32": 4.365}, K80),
)


def matmul_precision(precision: str, tf32: bool) -> str:
    """The datasheet column of a run: its precision, with fp32 on tensor cores when TF32 is allowed."""
    return "tf32" if precision == "fp32" and tf32 else precision


def datasheet_peak(gpu_name: str | None, precision: str) -> dict[str, Any] | None:
    """The datasheet's dense peak of ``gpu_name`` (NVML's name) for ``precision`` (a :func:`matmul_precision`
    column), with its source; None when the GPU or the precision is not in the table."""
    if not gpu_name:
        return None
    sheet = next((s for s in DATASHEETS if re.search(s.pattern, gpu_name, re.IGNORECASE)), None)
    if sheet is None or precision not in sheet.tflops:
        return None
    return {
        "flop_per_s": sheet.tflops[precision] * 1e12,
        "precision": precision,
        "model": sheet.model,
        "gpu": gpu_name,
        "source": sheet.source,
    }
