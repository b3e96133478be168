"""The model the core holds: torchvision's DenseNet, its device, and on-device input preparation."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torchvision.models import DenseNet

from cxrbench import weights as canonical
from cxrbench.classes import IMAGENET_MEAN, IMAGENET_STD, NUM_CLASSES
from cxrbench.errors import BackendError
from cxrbench.suite import Settings
from cxrbench_pytorch import determinism, numerics
from cxrbench_pytorch import weights as tv_weights


class Normalise(nn.Module):
    """uint8 gray (N, S, S) -> float32 ImageNet-normalised (N, 3, S, S), on the input's device.

    It sits in front of the DenseNet rather than inside it, so that uint8 crosses to the device
    (4x less traffic than float) and the ONNX export takes the already-normalised float input.
    """

    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        gray = images.unsqueeze(1).to(torch.float32).div_(255.0)
        return (gray - self.mean) / self.std  # broadcasting replicates gray to 3 channels


@dataclass
class TorchModel:
    """What the core treats as the opaque model."""

    net: DenseNet
    normalise: Normalise
    device: torch.device
    settings: Settings

    @property
    def block_config(self) -> tuple[int, ...]:
        return self.settings.model.block_config

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.settings.numerics.channels_last else torch.contiguous_format

    def inputs(self, images: torch.Tensor) -> torch.Tensor:
        """Host uint8 images -> normalised network input on the device (copy overlaps when pinned)."""
        x = self.normalise(images.to(self.device, non_blocking=True))
        return x.contiguous(memory_format=self.memory_format)


def new_densenet(block_config: tuple[int, ...], seed: int) -> DenseNet:
    """torchvision's DenseNet-BC with its own initialiser, seeded without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return DenseNet(growth_rate=32, block_config=block_config, num_init_features=64, bn_size=4, num_classes=NUM_CLASSES)


def build(settings: Settings, weights: dict[str, np.ndarray] | None, device: torch.device | None = None) -> TorchModel:
    """The model for ``settings``: given weights, or initialised by ``settings.model.init``.

    ``device`` defaults to the one ``run.gpus`` selects; a distributed rank names its own.
    """
    canonical.check_image_size(settings.data.image_size)
    device = device or numerics.select_device(settings)
    numerics.apply(settings.numerics)
    determinism.apply(settings.numerics)
    net = new_densenet(settings.model.block_config, settings.run.seed)
    initial, origin = (weights, "weights") if weights is not None else _initial_weights(settings, net)
    if initial is not None:
        tv_weights.put(net, initial, settings.model.block_config, origin)
    model = TorchModel(net, Normalise().to(device), device, settings)
    net.to(device=device, memory_format=model.memory_format)
    return model


def _initial_weights(settings: Settings, net: DenseNet) -> tuple[dict[str, np.ndarray] | None, str]:
    """Weights for ``model.init`` (None: keep torchvision's seeded initialiser) and where they came from."""
    init, block_config = settings.model.init, settings.model.block_config
    if init == "framework":
        return None, init
    if init == "shared":
        return canonical.init_canonical(block_config, settings.run.seed), "shared weights"
    if init == "imagenet":
        fresh = {k: v for k, v in tv_weights.get(net).items() if k.startswith("classifier.")}
        return tv_weights.imagenet(block_config, fresh), "torchvision ImageNet weights"
    return tv_weights.read_file(Path(init)), init


def host_images(images: np.ndarray) -> torch.Tensor:
    """Check the hooks' image contract and wrap the array for torch without copying when possible."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1] != images.shape[2]:
        raise BackendError(f"images must be uint8 (N, S, S), got {images.dtype} {images.shape}")
    canonical.check_image_size(images.shape[1])
    if not (images.flags.writeable and images.flags.c_contiguous):
        images = np.array(images)  # torch refuses read-only (memory-mapped) arrays
    return torch.from_numpy(images)
