"""PyTorch's own training loop, the yardstick of the harness-overhead benchmark (``cxrbench_idiomatic_loop``).

What a PyTorch user writes without cxrbench: torchvision's DenseNet with 14 outputs, ``BCEWithLogitsLoss``,
``torch.optim.Adam`` with its defaults for the implementation, and normalised float tensors made in memory on the
device before the first step; ``torch.autocast`` (plus ``GradScaler`` for fp16) for mixed precision. The backend's
process-wide switches (thread budget, TF32, cuDNN autotuning) are applied as the backend applies them, so both
loops run under the same numerics.
"""

from __future__ import annotations

import numpy as np
import torch
import torchvision
from torch import nn

from cxrbench.backend import NUM_CLASSES, IdiomaticLoop, Settings
from cxrbench_pytorch import determinism, numerics

DENSENET121 = (6, 12, 24, 16)
#: Batches made in memory and cycled through, so consecutive steps see different data, as in training.
BATCHES = 4


def reference_densenet(block_config: tuple[int, ...]) -> torchvision.models.DenseNet:
    """``torchvision.models.densenet121(num_classes=14)``; the same class at the smaller test depths."""
    if tuple(block_config) == DENSENET121:
        return torchvision.models.densenet121(num_classes=NUM_CLASSES)
    return torchvision.models.DenseNet(block_config=tuple(block_config), num_classes=NUM_CLASSES)


def loop(settings: Settings, weights: dict[str, np.ndarray]) -> IdiomaticLoop:
    numerics.apply(settings.numerics)
    determinism.apply(settings.numerics)
    device = numerics.select_device(settings)
    layout = torch.channels_last if settings.numerics.channels_last else torch.contiguous_format
    net = reference_densenet(settings.model.block_config)
    net.load_state_dict({name: torch.from_numpy(np.array(value)) for name, value in weights.items()}, strict=False)
    net.to(device=device, memory_format=layout).train()
    model = torch.compile(net) if settings.numerics.compile else net
    train = settings.train
    optimizer = torch.optim.Adam(
        net.parameters(), lr=train.learning_rate, betas=(train.adam_beta1, train.adam_beta2), eps=train.adam_epsilon
    )
    criterion = nn.BCEWithLogitsLoss()
    precision = settings.numerics.precision
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    dtype = numerics.AUTOCAST_DTYPES[precision]
    generator = torch.Generator().manual_seed(settings.run.seed)
    size, batch = settings.data.image_size, train.batch_size
    batches = [
        (
            torch.randn(batch, 3, size, size, generator=generator).to(device, memory_format=layout),
            (torch.rand(batch, NUM_CLASSES, generator=generator) < 0.3).float().to(device),
        )
        for _ in range(BATCHES)
    ]
    steps = [0]

    def step() -> torch.Tensor:
        images, labels = batches[steps[0] % BATCHES]
        steps[0] += 1
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = criterion(model(images), labels)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        return loss.detach()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return IdiomaticLoop(
        step=step,
        sync=sync,
        description=(
            f"torchvision DenseNet{tuple(settings.model.block_config)} (num_classes=14), BCEWithLogitsLoss, "
            f"torch.optim.Adam, {BATCHES} batches of in-memory tensors on {device}, "
            f"{'torch.autocast ' + precision if dtype else 'fp32'}"
            f"{', torch.compile' if settings.numerics.compile else ''}"
        ),
        threads={"intra_op": torch.get_num_threads(), "inter_op": torch.get_num_interop_threads()},
    )
