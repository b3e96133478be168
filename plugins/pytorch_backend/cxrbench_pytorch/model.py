"""The model the core holds: torchvision's DenseNet, its device, and on-device input preparation."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torchvision.models import DenseNet

from cxrbench.backend import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    NUM_CLASSES,
    InitialWeights,
    Settings,
    Start,
    canonical,
    initial_weights,
)
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
        return DenseNet(
            growth_rate=32, block_config=block_config, num_init_features=64, bn_size=4, num_classes=NUM_CLASSES
        )


def build(settings: Settings, weights: dict[str, np.ndarray] | None, device: torch.device | None = None) -> TorchModel:
    """The model for ``settings``, started as :func:`cxrbench.backend.initial_weights.resolve` says.

    ``device`` defaults to the one ``run.gpus`` selects; a distributed rank names its own.
    """
    canonical.check_image_size(settings.data.image_size)
    initial = initial_weights.resolve(settings, weights, tv_weights.NATIVE_SUFFIXES)
    device = device or numerics.select_device(settings)
    numerics.apply(settings.numerics)
    determinism.apply(settings.numerics)
    net = new_densenet(settings.model.block_config, settings.run.seed)
    loaded = _weights_to_load(initial, net, settings.model.block_config)
    if loaded is not None:
        tv_weights.put(net, loaded, settings.model.block_config, initial.origin)
    model = TorchModel(net, Normalise().to(device), device, settings)
    net.to(device=device, memory_format=model.memory_format)
    return model


def _weights_to_load(
    initial: InitialWeights, net: DenseNet, block_config: tuple[int, ...]
) -> Mapping[str, np.ndarray] | None:
    """The canonical weights to load into ``net`` (None: keep torchvision's seeded initialiser)."""
    if initial.start is Start.IMAGENET:
        fresh = {k: v for k, v in tv_weights.get(net).items() if k.startswith("classifier.")}
        return tv_weights.imagenet(block_config, fresh)
    if initial.start is Start.NATIVE_FILE:
        return tv_weights.read_state_dict(initial.path)
    return initial.weights


def host_images(images: np.ndarray) -> torch.Tensor:
    """Checked images (:mod:`cxrbench.backend.model_inputs`) as a tensor, without copying when possible."""
    if not (images.flags.writeable and images.flags.c_contiguous):
        images = np.array(images)  # torch refuses read-only (memory-mapped) arrays
    return torch.from_numpy(images)
