"""Model FLOPs of a DenseNet, counted once from the canonical network, and the share of the machine a backend reached.

The rule, stated once and used everywhere (report, run.json, docs/why-faster.md):

* **Unit.** FLOPs = floating-point operations; one multiply-add (MAC) is 2 FLOPs. timm lists DenseNet-121 at
  "2.9 GMACs" and torchvision at "2.83 GFLOPS" (counting a MAC as one); here that is about 5.7 GFLOPs per 224 px image.
* **Counted.** The multiply-adds of every convolution and of the classifier (``C_out x C_in x kH x kW`` per output
  position; the classifier ``classes x features``). BatchNorm, activations, pooling, concatenation and the
  optimizer are not counted: they are memory-bound, and BatchNorm with ReLU, the largest of them, adds about 1.4 % to
  the FLOPs (:func:`uncounted_flops`), so counting them would only flatter the utilisation.
* **Training.** One training image costs forward + backward = 3 x forward: the backward pass computes the gradient
  of each product with respect to its input and to its weights, each as costly as the forward product (the first
  convolution needs no input gradient, so the true count is slightly lower; the convention is PaLM's and MLPerf's).
* **Model FLOPs utilisation (MFU).** Achieved model FLOP/s = training FLOPs per image x steady training images/s;
  its fraction of a ceiling: the dense-matmul rate measured on the same device by the same framework at the start
  of the run, and, for known GPUs, the datasheet's peak (:mod:`cxrbench.machine.peaks`).
"""

from __future__ import annotations

from typing import Any

from cxrbench.backend.canonical import BN_SIZE, GROWTH_RATE, INIT_FEATURES
from cxrbench.data.classes import NUM_CLASSES

FLOPS_PER_MAC = 2
#: Forward + backward, the backward counted as twice the forward.
TRAINING_PASSES = 3
RULE = (
    "FLOPs = 2 x multiply-adds of the convolutions and the classifier (BatchNorm, activations, pooling and the "
    "optimizer not counted); one training image = forward + backward = 3 x forward"
)


def _conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def densenet_layers(block_config: tuple[int, ...], image_size: int, num_classes: int = NUM_CLASSES) -> list[dict]:
    """Every multiply-add layer of the DenseNet-BC at ``image_size``: name, output side, channels in and out, kernel,
    and multiply-adds per image. The strides and paddings are torchvision's (7x7/2 stem with a 3x3/2 max pool,
    1x1 and 3x3 convolutions in the dense layers, 1x1 convolution and 2x2/2 average pool in the transitions)."""
    layers = []

    def conv(name: str, side: int, c_in: int, c_out: int, kernel: int) -> None:
        layers.append(
            {"name": name, "side": side, "in": c_in, "out": c_out, "kernel": kernel,
             "macs": side * side * c_out * c_in * kernel * kernel}
        )  # fmt: skip

    side = _conv_out(image_size, 7, 2, 3)
    conv("features.conv0", side, 3, INIT_FEATURES, 7)
    side = _conv_out(side, 3, 2, 1)  # pool0
    channels = INIT_FEATURES
    for b, count in enumerate(block_config, start=1):
        for k in range(1, count + 1):
            prefix = f"features.denseblock{b}.denselayer{k}"
            conv(f"{prefix}.conv1", side, channels + (k - 1) * GROWTH_RATE, BN_SIZE * GROWTH_RATE, 1)
            conv(f"{prefix}.conv2", side, BN_SIZE * GROWTH_RATE, GROWTH_RATE, 3)
        channels += count * GROWTH_RATE
        if b != len(block_config):
            conv(f"features.transition{b}.conv", side, channels, channels // 2, 1)
            channels //= 2
            side = _conv_out(side, 2, 2, 0)  # average pool
    layers.append(
        {"name": "classifier", "side": 1, "in": channels, "out": num_classes, "kernel": 1,
         "macs": channels * num_classes}
    )  # fmt: skip
    return layers


def forward_macs(block_config: tuple[int, ...], image_size: int) -> int:
    """Multiply-adds of one image's forward pass."""
    return sum(layer["macs"] for layer in densenet_layers(block_config, image_size))


def uncounted_flops(block_config: tuple[int, ...], image_size: int) -> int:
    """An estimate of what the rule leaves out, per forward image: BatchNorm (normalise and scale: 4 FLOPs per
    element) and ReLU (1) on every BatchNorm's input, as sized by the network: about 1.4 % of the counted FLOPs."""
    elements = 0
    side = _conv_out(_conv_out(image_size, 7, 2, 3), 3, 2, 1)
    channels = INIT_FEATURES
    elements += _conv_out(image_size, 7, 2, 3) ** 2 * INIT_FEATURES  # norm0
    for b, count in enumerate(block_config, start=1):
        for k in range(1, count + 1):
            elements += side * side * (channels + (k - 1) * GROWTH_RATE)  # norm1
            elements += side * side * BN_SIZE * GROWTH_RATE  # norm2
        channels += count * GROWTH_RATE
        elements += side * side * channels  # transition norm or norm5
        if b != len(block_config):
            channels //= 2
            side //= 2
    return 5 * elements


def model_flops(block_config: tuple[int, ...], image_size: int) -> dict[str, Any]:
    """FLOPs per image, forward and training, with the unit and the rule they follow."""
    macs = forward_macs(block_config, image_size)
    forward = FLOPS_PER_MAC * macs
    return {
        "forward_macs": macs,
        "forward_flops": forward,
        "training_flops": TRAINING_PASSES * forward,
        "not_counted_forward_flops": uncounted_flops(block_config, image_size),
        "image_size": image_size,
        "unit": "FLOP per image",
        "rule": RULE,
    }


def efficiency(
    flops: dict[str, Any],
    train_images_per_s: float | None,
    ceiling: dict[str, Any] | None,
    devices: int = 1,
) -> dict[str, Any]:
    """Achieved model FLOP/s of training and its fraction of the measured and the datasheet ceilings.

    :param ceiling: ``{"measured": PeakFlops.to_dict() or None, "datasheet": machine.peaks.datasheet_peak() or None,
        "reason": ...}`` for one device; with several devices the ceilings are per device and are multiplied.
    """
    ceiling = ceiling or {}
    achieved = flops["training_flops"] * train_images_per_s if train_images_per_s else None

    def fraction(peak_per_device: float | None) -> float | None:
        return achieved / (peak_per_device * devices) if achieved and peak_per_device else None

    measured = ceiling.get("measured") or {}
    datasheet = ceiling.get("datasheet") or {}
    return {
        "flops": flops,
        "train_images_per_s": train_images_per_s,
        "achieved_flop_per_s": achieved,
        "devices": devices,
        "ceiling": ceiling or None,
        "fraction_of_measured": fraction(measured.get("flop_per_s")),
        "fraction_of_datasheet": fraction(datasheet.get("flop_per_s")),
    }
