"""ONNX export of the DenseNet alone: float32 NCHW ImageNet-normalised input -> logits and the CAM features."""

from __future__ import annotations

import copy
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from cxrbench.backend import FEATURES_OUTPUT, ExportInfo, Settings, cam_metadata, model_metadata, stamp_metadata
from cxrbench_pytorch.model import TorchModel

INPUT_NAME, OUTPUT_NAME, LAYOUT = "input", "logits", "NCHW"
#: The TorchScript-based exporter: about 1 s for DenseNet-121 against about 12 s for the dynamo
#: exporter, which may also write external data files and freeze the batch axis to the example's.
EXPORTER = "torch.onnx (dynamo=False)"


class LogitsAndFeatures(nn.Module):
    """torchvision's DenseNet forward, also returning the feature map its pooling consumes (for CAMs)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = F.relu(self.net.features(x))
        return self.net.classifier(torch.flatten(F.adaptive_avg_pool2d(features, (1, 1)), 1)), features


def export_onnx(model: TorchModel, path: str | Path, settings: Settings) -> ExportInfo:
    """Write the network (without the uint8 preprocessing) to ``path`` and stamp cxrbench's metadata."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A float32, contiguous CPU copy: the export never depends on the training device or layout.
    net = copy.deepcopy(model.net).to(device="cpu", dtype=torch.float32, memory_format=torch.contiguous_format).eval()
    size = settings.data.image_size
    example = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(settings.run.seed))
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the legacy exporter is chosen deliberately
        torch.onnx.export(
            LogitsAndFeatures(net),
            (example,),
            str(path),
            dynamo=False,
            opset_version=settings.export.opset,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME, FEATURES_OUTPUT],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}, FEATURES_OUTPUT: {0: "batch"}},
        )
    seconds = time.perf_counter() - start
    classifier = cam_metadata(net.classifier.weight.detach().numpy(), net.classifier.bias.detach().numpy(), LAYOUT)
    stamp_metadata(path, {**model_metadata(LAYOUT, size, "pytorch"), **classifier})
    return ExportInfo(
        path=str(path),
        layout=LAYOUT,
        opset=settings.export.opset,
        input_name=INPUT_NAME,
        output_name=OUTPUT_NAME,
        seconds=seconds,
        exporter=EXPORTER,
    )
