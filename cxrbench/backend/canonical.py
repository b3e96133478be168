"""Canonical DenseNet weights: the framework-neutral currency between backends.

Weights travel as a dict of float32 numpy arrays named and laid out exactly like torchvision's
``densenet121`` state_dict (conv kernels O,I,H,W; linear weight out,in; BatchNorm weight, bias,
running_mean, running_var; ``num_batches_tracked`` is not a weight and is left out). The core
knows the layout from the block configuration alone, so it can make shared initial weights from a
seed, validate what a backend returns, and store weights without importing any framework.
"""

from __future__ import annotations

import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from cxrbench.data.classes import NUM_CLASSES
from cxrbench.errors import WeightsError

GROWTH_RATE = 32
BN_SIZE = 4
INIT_FEATURES = 64
BN_PARTS = ("weight", "bias", "running_mean", "running_var")
#: BatchNorm epsilon of every backend (PyTorch's default; Keras is set to it).
BN_EPSILON = 1e-5


def densenet_spec(block_config: tuple[int, ...], num_classes: int = NUM_CLASSES) -> dict[str, tuple[int, ...]]:
    """Ordered ``name -> shape`` of every canonical tensor of a DenseNet-BC (growth 32, bottleneck 4)."""
    spec: dict[str, tuple[int, ...]] = {}

    def norm(prefix: str, channels: int) -> None:
        for part in BN_PARTS:
            spec[f"{prefix}.{part}"] = (channels,)

    spec["features.conv0.weight"] = (INIT_FEATURES, 3, 7, 7)
    norm("features.norm0", INIT_FEATURES)
    channels = INIT_FEATURES
    for b, layers in enumerate(block_config, start=1):
        for k in range(1, layers + 1):
            prefix = f"features.denseblock{b}.denselayer{k}"
            c_in = channels + (k - 1) * GROWTH_RATE
            norm(f"{prefix}.norm1", c_in)
            spec[f"{prefix}.conv1.weight"] = (BN_SIZE * GROWTH_RATE, c_in, 1, 1)
            norm(f"{prefix}.norm2", BN_SIZE * GROWTH_RATE)
            spec[f"{prefix}.conv2.weight"] = (GROWTH_RATE, BN_SIZE * GROWTH_RATE, 3, 3)
        channels += layers * GROWTH_RATE
        if b != len(block_config):
            norm(f"features.transition{b}.norm", channels)
            spec[f"features.transition{b}.conv.weight"] = (channels // 2, channels, 1, 1)
            channels //= 2
    norm("features.norm5", channels)
    spec["classifier.weight"] = (num_classes, channels)
    spec["classifier.bias"] = (num_classes,)
    return spec


def feature_channels(block_config: tuple[int, ...]) -> int:
    """Channels of the final feature map (1024 for DenseNet-121)."""
    return densenet_spec(block_config)["features.norm5.weight"][0]


def init_canonical(block_config: tuple[int, ...], seed: int) -> dict[str, np.ndarray]:
    """Seeded initial weights with torchvision's scheme, identical on every machine.

    Convolutions: Kaiming normal (fan-in, gain sqrt 2); BatchNorm: weight 1, bias 0, mean 0, var 1;
    classifier: PyTorch's default ``Linear`` init (uniform +-1/sqrt(fan_in)) and zero bias.
    """
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for name, shape in densenet_spec(block_config).items():
        if name == "classifier.weight":
            bound = 1.0 / np.sqrt(shape[1])
            value = rng.uniform(-bound, bound, size=shape)
        elif name.endswith(".weight") and len(shape) == 4:
            fan_in = shape[1] * shape[2] * shape[3]
            value = rng.normal(0.0, np.sqrt(2.0 / fan_in), size=shape)
        elif name.endswith((".weight", ".running_var")):
            value = np.ones(shape)
        else:
            value = np.zeros(shape)
        out[name] = value.astype(np.float32)
    return out


def validate(weights: Mapping[str, np.ndarray], block_config: tuple[int, ...], origin: str = "weights") -> None:
    """Raise :class:`WeightsError` naming the first missing, unexpected or misshapen tensor."""
    spec = densenet_spec(block_config)
    for name, shape in spec.items():
        if name not in weights:
            raise WeightsError(f"{origin}: missing tensor {name!r} (expected shape {shape})")
        got = tuple(np.shape(weights[name]))
        if got != shape:
            raise WeightsError(f"{origin}: tensor {name!r} has shape {got}, expected {shape}")
    extra = sorted(set(weights) - set(spec))
    if extra:
        raise WeightsError(f"{origin}: unexpected tensor {extra[0]!r} ({len(extra)} not in the canonical layout)")


def nbytes(block_config: tuple[int, ...]) -> int:
    """Bytes of the canonical float32 weights: the size of a checkpoint or an ONNX export, before writing one."""
    return 4 * sum(int(np.prod(shape)) for shape in densenet_spec(block_config).values())


def save(weights: Mapping[str, np.ndarray], path: str | Path) -> Path:
    """Write canonical weights to ``.npz``: refused early when the disk cannot take them, then written atomically
    (a unique temporary file beside ``path``, renamed over it), so ``path`` never holds half a checkpoint."""
    from cxrbench.files import require_space, save_npz

    arrays = {k: np.asarray(v, dtype=np.float32) for k, v in weights.items()}
    path = Path(path)
    require_space(path.parent, sum(a.nbytes for a in arrays.values()), f"the weights file {path.name}")
    return save_npz(path, **arrays)


def load(path: str | Path) -> dict[str, np.ndarray]:
    """Read canonical weights from ``.npz`` without unpickling anything."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except FileNotFoundError:
        raise WeightsError(f"{path}: weights file not found") from None
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise WeightsError(f"{path}: not a readable .npz weights file ({exc})") from None


#: DenseNet downsamples by 32 (stride-2 stem, max pool, three transitions).
DOWNSAMPLING = 32


def check_image_size(image_size: int) -> int:
    """Return the final feature map's side, or raise if the network cannot take ``image_size``."""
    from cxrbench.errors import BackendError

    if image_size < DOWNSAMPLING:
        raise BackendError(
            f"image size {image_size} px is too small for DenseNet: it downsamples by {DOWNSAMPLING}, "
            f"so images must be at least {DOWNSAMPLING} px (data.image_size)"
        )
    return image_size // DOWNSAMPLING
