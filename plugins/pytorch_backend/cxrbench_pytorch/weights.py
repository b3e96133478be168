"""Canonical weights <-> torchvision DenseNet, weight files, and torchvision's ImageNet weights.

The canonical layout *is* torchvision's state_dict without ``num_batches_tracked``, so converting
is copying tensors by name; all checking is the core's :func:`cxrbench.backend.canonical.validate`.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cxrbench.backend import ARCHITECTURES, WeightsError, canonical, first_line

#: torchvision's released DenseNet checkpoints still use the old names ``denselayer1.norm.1``
#: (dots are no longer allowed in module names); the same pattern torchvision itself rewrites.
_OLD_LAYER_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)
_NOT_A_WEIGHT = "num_batches_tracked"
#: Weight files this backend reads itself (``model.init``): torch state_dicts. The core reads ``.npz``.
NATIVE_SUFFIXES = (".pt", ".pth")
#: ``nn.DataParallel``'s ``module.`` and CheXNet's wrapper attribute ``densenet121.`` before torchvision's names.
_CHECKPOINT_PREFIX = re.compile(r"^(?:module\.)?(?:densenet121\.)?")
#: What ``torch.load(weights_only=True)`` names when a file pickles an object it does not allow.
_REFUSED_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+)")
#: CheXNet's head is ``nn.Sequential(nn.Linear, nn.Sigmoid)``: its Linear is ``classifier.0``.
_CLASSIFIER_IN_SEQUENTIAL = re.compile(r"^classifier\.0\.")


def get(net: nn.Module) -> dict[str, np.ndarray]:
    """The network's weights as canonical float32 arrays (copies, C-contiguous)."""
    return {name: _array(tensor) for name, tensor in net.state_dict().items() if not name.endswith(_NOT_A_WEIGHT)}


def _array(tensor: torch.Tensor) -> np.ndarray:
    """A float32, C-contiguous copy that never aliases the tensor's memory."""
    return np.array(tensor.detach().cpu().float().numpy(), dtype=np.float32, order="C")


def put(
    net: nn.Module, weights: Mapping[str, np.ndarray], block_config: tuple[int, ...], origin: str = "weights"
) -> None:
    """Copy canonical weights into ``net`` in place (keeping its device and memory format)."""
    canonical.validate(weights, block_config, origin)
    state = net.state_dict()
    with torch.no_grad():
        for name, value in weights.items():
            state[name].copy_(torch.from_numpy(np.asarray(value, dtype=np.float32)))


def from_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """A torchvision state_dict (old or new key names) as canonical arrays, unchecked."""
    out = {}
    for key, tensor in state.items():
        if key.endswith(_NOT_A_WEIGHT):
            continue
        out[_OLD_LAYER_KEY.sub(r"\1\2", key)] = _array(tensor)
    return out


def read_state_dict(path: Path) -> dict[str, np.ndarray]:
    """A torch state_dict file (:data:`NATIVE_SUFFIXES`) as canonical arrays, read without unpickling objects."""
    return from_state_dict(_tensors(_load(path, "torch state_dict"), path))


def _load(path: Path, what: str) -> object:
    """``torch.load`` with ``weights_only``: tensors and plain containers only, never arbitrary objects."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        refused = _REFUSED_GLOBAL.search(str(exc))
        if refused:
            raise WeightsError(
                f"{path}: refused: it pickles {refused.group(1)}, not only tensors and plain containers "
                f"(if you trust it, load it in PyTorch and torch.save its state_dict)"
            ) from None
        raise WeightsError(f"{path}: not a readable {what} ({first_line(exc, with_type=True)})") from None
    except Exception as exc:  # the unpickler fails on garbage in many ways (IndexError, KeyError, EOFError, ...)
        raise WeightsError(f"{path}: not a readable {what} ({first_line(exc, with_type=True)})") from None


def _tensors(state: object, path: Path) -> Mapping[str, torch.Tensor]:
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path}: expected a state_dict (tensor names -> tensors), found {type(state).__name__}")
    return state


def import_checkpoint(path: Path, block_config: tuple[int, ...]) -> dict[str, np.ndarray]:
    """A torchvision DenseNet state_dict, or a training checkpoint holding one under ``"state_dict"`` (CheXNet's
    ``model.pth.tar``: ``module.densenet121.`` prefixes, the released key names, ``classifier.0`` before a Sigmoid),
    as canonical weights checked against ``block_config``."""
    from cxrbench.backend import check_densenet

    content = _load(path, "torch checkpoint")
    if isinstance(content, Mapping) and isinstance(content.get("state_dict"), Mapping):
        content = content["state_dict"]
    state = {_CHECKPOINT_PREFIX.sub("", key): value for key, value in _tensors(content, path).items()}
    weights = {
        _CLASSIFIER_IN_SEQUENTIAL.sub("classifier.", key): value for key, value in from_state_dict(state).items()
    }
    check_densenet(weights, block_config, str(path))
    return weights


def imagenet(block_config: tuple[int, ...], classifier: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """torchvision's ImageNet DenseNet-121 features with the given fresh 14-way classifier.

    Comes from the torch hub cache (``$TORCH_HOME/hub/checkpoints``) or the network. torch only
    checks the file's hash when it downloads it, not when it finds it in the cache.
    """
    if tuple(block_config) != ARCHITECTURES["densenet121"]:
        raise WeightsError(
            "model.init = 'imagenet': torchvision has ImageNet weights only for model.arch = 'densenet121'"
        )
    from torchvision.models import DenseNet121_Weights

    source = DenseNet121_Weights.IMAGENET1K_V1
    try:
        state = source.get_state_dict(progress=False, check_hash=True, weights_only=True)
    except (OSError, RuntimeError, pickle.UnpicklingError) as exc:  # URLError is an OSError
        raise WeightsError(
            f"model.init = 'imagenet': cannot get {source} from {source.url} "
            f"(cache {torch.hub.get_dir()}/checkpoints): {first_line(exc, with_type=True)}"
        ) from None
    features = {k: v for k, v in from_state_dict(state).items() if not k.startswith("classifier.")}
    return {**features, **classifier}
