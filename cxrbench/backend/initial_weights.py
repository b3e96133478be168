"""``model.init``, resolved once for every backend: what ``cxrbench_build_model`` starts from.

The core turns everything it can into canonical weights, checked against the architecture: weights
passed to the hook, ``"shared"`` (the seeded :func:`cxrbench.backend.canonical.init_canonical`, exactly what the
orchestrator writes to ``shared_init*.npz``) and canonical ``.npz`` files. What only the framework can
do comes back as a named case: ``"framework"`` (its own seeded initialiser), ``"imagenet"`` (its
ImageNet weights) and a file in the framework's own format, whose suffix the backend declares and
whose existence is checked here. So a missing file, a wrong suffix or a misshapen tensor reads the
same for every backend.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cxrbench.backend import canonical
from cxrbench.errors import WeightsError
from cxrbench.suite import Settings

#: The file type every backend reads: canonical weights (:func:`cxrbench.backend.canonical.save`).
CANONICAL_SUFFIX = ".npz"
#: The ``model.init`` values that are not file paths.
KEYWORDS = ("shared", "framework", "imagenet")


class Start(enum.Enum):
    """What the backend must do to initialise its model."""

    CANONICAL = "canonical"  #: load :attr:`InitialWeights.weights`
    FRAMEWORK = "framework"  #: keep the framework's own initialiser, seeded from ``settings.run.seed``
    IMAGENET = "imagenet"  #: load the framework's ImageNet weights (classifier freshly initialised)
    NATIVE_FILE = "native file"  #: load :attr:`InitialWeights.path`, a file in the framework's own format


@dataclass(frozen=True)
class InitialWeights:
    """The resolved ``model.init``; ``origin`` names where the weights come from, for error messages."""

    start: Start
    origin: str
    weights: Mapping[str, np.ndarray] | None = None
    path: Path | None = None


def resolve(
    settings: Settings, weights: Mapping[str, np.ndarray] | None, native_suffixes: Sequence[str] = ()
) -> InitialWeights:
    """What to start from: ``weights`` when given, else ``settings.model.init``.

    :param native_suffixes: the file endings the backend reads itself (``(".pt", ".pth")``); any
        other path than these and ``.npz`` is a one-line :class:`WeightsError` listing them.
    """
    block_config = settings.model.block_config
    if weights is not None:
        return _canonical(weights, block_config, "weights")
    init = settings.model.init
    if init == "shared":
        shared = canonical.init_canonical(block_config, settings.run.seed)
        return _canonical(shared, block_config, "model.init = 'shared'")
    if init in (Start.FRAMEWORK.value, Start.IMAGENET.value):
        return InitialWeights(Start(init), f"model.init = {init!r}")
    path = _weights_file(init, native_suffixes)
    if path.name.endswith(CANONICAL_SUFFIX):
        return _canonical(canonical.load(path), block_config, str(path))
    return InitialWeights(Start.NATIVE_FILE, str(path), path=path)


def same_start(init: str) -> bool:
    """Whether every backend starts from the same canonical weights (``"shared"`` or a ``.npz`` file, an imported
    checkpoint included), so their initial models must compute the same function (the run's equivalence check)."""
    return init == "shared" or init.endswith(CANONICAL_SUFFIX)


def _canonical(weights: Mapping[str, np.ndarray], block_config: tuple[int, ...], origin: str) -> InitialWeights:
    canonical.validate(weights, block_config, origin)
    return InitialWeights(Start.CANONICAL, origin, weights=weights)


def _weights_file(init: str, native_suffixes: Sequence[str]) -> Path:
    """``model.init`` as a path the backend can read, checked to exist."""
    path = Path(init)
    accepted = (CANONICAL_SUFFIX, *native_suffixes)
    if not path.name.endswith(tuple(accepted)):
        suffix = path.suffix or "(none)"
        raise WeightsError(
            f"{path}: unsupported weights file type {suffix!r} for model.init (this backend reads "
            f"{_alternatives(accepted)}; or use {_alternatives([repr(k) for k in KEYWORDS])})"
        )
    if not path.is_file():
        raise WeightsError(f"{path}: weights file not found (model.init)")
    return path


def _alternatives(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} or {items[-1]}"
