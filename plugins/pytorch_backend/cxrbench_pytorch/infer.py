"""Prediction and class activation maps: eval mode, no autograd, batched, always float32.

Inference ignores ``numerics.precision`` and ``numerics.tf32`` on purpose: its logits are what the ONNX export
and the other backend are compared against, so they must be the IEEE float32 function of the weights.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import numpy as np
import torch
import torch.nn.functional as F

from cxrbench.backend import NUM_CLASSES, CamResult
from cxrbench_pytorch import numerics
from cxrbench_pytorch.model import TorchModel, host_images

T = TypeVar("T")


def _batched(
    model: TorchModel, images: np.ndarray, batch_size: int, doing: str, fn: Callable[[torch.Tensor], T]
) -> list[T]:
    """``fn`` of each normalised device batch, in eval and inference mode, out-of-memory translated."""
    host = host_images(images)
    model.net.eval()
    with (
        torch.inference_mode(),
        numerics.ieee_float32(),
        numerics.oom_as_backend_error(model.device, batch_size, doing),
    ):
        return [fn(model.inputs(host[start : start + batch_size])) for start in range(0, len(host), batch_size)]


def predict(model: TorchModel, images: np.ndarray, batch_size: int, tta_hflip: bool) -> np.ndarray:
    """Logits (N, 14); with ``tta_hflip`` the mean of the logits of each image and its mirror."""

    def logits(x: torch.Tensor) -> torch.Tensor:
        out = model.net(x)
        if tta_hflip:
            out = (out + model.net(x.flip(-1))) / 2
        return out.float().cpu()

    out = _batched(model, images, batch_size, "predicting", logits)
    return torch.cat(out).numpy() if out else np.zeros((0, NUM_CLASSES), dtype=np.float32)


def cam(model: TorchModel, images: np.ndarray, chosen: Sequence[int], batch_size: int) -> CamResult:
    """CAM = classifier weights x (final BatchNorm -> ReLU features), with the logits of the same pass."""
    weight = model.net.classifier.weight[chosen]  # (C, K)
    bias = model.net.classifier.bias[chosen]

    def maps_and_logits(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = F.relu(model.net.features(x))  # torchvision's forward applies this ReLU too
        maps = torch.einsum("nkhw,ck->nchw", features, weight)
        return maps.float().cpu(), model.net.classifier(features.mean((2, 3)))[:, chosen].float().cpu()

    maps, logits = zip(*_batched(model, images, batch_size, "computing CAMs", maps_and_logits))
    return CamResult(
        maps=torch.cat(maps).numpy(),
        bias=bias.detach().float().cpu().numpy(),
        logits=torch.cat(logits).numpy(),
    )
