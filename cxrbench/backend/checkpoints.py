"""Published checkpoints in: a framework's own weights file -> canonical weights, through the backend that reads it.

Only the framework that wrote a checkpoint can read it (a torch pickle, a Keras HDF5 file), so every installed
plugin is asked through ``cxrbench_import_checkpoint`` and the first that knows the file answers. What is the
same for every framework lives here: the file must exist, ``.npz`` is the core's own, an unknown file names the
backend to install, and :func:`check_densenet` turns a wrong architecture, a foreign head or stray tensors into
one line naming the file. A run converts ``model.init = FILE`` once, before any worker, in a child process of its
own (:func:`import_in_child`), so every backend starts from the same canonical ``.npz`` (:func:`record` says which).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from cxrbench.backend import canonical
from cxrbench.backend.initial_weights import CANONICAL_SUFFIX, KEYWORDS
from cxrbench.data.classes import NUM_CLASSES
from cxrbench.errors import WeightsError
from cxrbench.files import sha256_of
from cxrbench.suite import ARCHITECTURES

#: The distribution that reads each kind of file: the hint when no installed plugin knows one.
READERS = {"cxrbench-pytorch": (".pth", ".pt", ".pth.tar"), "cxrbench-keras": (".h5", ".keras")}
#: Every name of the canonical DenseNet layout, whatever the block configuration.
_DENSENET_NAME = re.compile(
    r"features\.(?:conv0\.weight|(?:norm0|norm5|transition\d+\.norm|denseblock\d+\.denselayer\d+\.norm[12])\."
    r"(?:weight|bias|running_mean|running_var)|transition\d+\.conv\.weight|denseblock\d+\.denselayer\d+\.conv[12]"
    r"\.weight)|classifier\.(?:weight|bias)"
)
_LAYER = re.compile(r"features\.denseblock(\d+)\.denselayer(\d+)\.")
#: How ``cxrbench`` prints a one-line error (:func:`cxrbench.cli.main`).
_CLI_ERROR = "cxrbench: error: "


def import_checkpoint(path: str | Path, block_config: tuple[int, ...], plugins: Any) -> dict[str, np.ndarray]:
    """Canonical float32 weights of the DenseNet ``block_config`` from ``path``, read by whichever plugin knows it.

    :param plugins: a :class:`cxrbench.plugins.Plugins` (or anything with ``hook``); ``.npz`` needs none.
    :raises WeightsError: one line naming the file: missing, of a kind no installed plugin reads, or not a
        DenseNet of ``block_config`` with the 14-class head.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: checkpoint file not found")
    if path.name.endswith(CANONICAL_SUFFIX):
        weights = canonical.load(path)
    else:
        weights = plugins.hook.cxrbench_import_checkpoint(path=path, block_config=tuple(block_config))
        if weights is None:
            raise WeightsError(no_reader_message(path))
    check_densenet(weights, block_config, str(path))
    return {name: np.ascontiguousarray(value, dtype=np.float32) for name, value in weights.items()}


def import_in_child(path: str | Path, arch: str, plugin_modules: list[str]) -> dict[str, np.ndarray]:
    """:func:`import_checkpoint` in a child Python (``cxrbench weights import``), GPUs hidden from it.

    A run's parent holds no framework: TensorFlow would take every GPU's memory for the parent's whole life, and
    two frameworks in one process can crash. The child's one-line error is raised here as the same error.
    """
    from cxrbench.machine.devices import VISIBLE_VARIABLE

    with tempfile.TemporaryDirectory(prefix="cxrbench-import-") as folder:
        out = Path(folder) / "imported.npz"
        command = [sys.executable, "-m", "cxrbench", "weights", "import", str(path), "--out", str(out), "--arch", arch]
        for module in plugin_modules:
            command += ["--plugin", module]
        done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, VISIBLE_VARIABLE: ""})
        if done.returncode != 0:
            lines = done.stderr.strip().splitlines() or [f"exit status {done.returncode}"]
            raise WeightsError(lines[-1].removeprefix(_CLI_ERROR))
        return canonical.load(out)


def no_reader_message(path: Path) -> str:
    """What to install for a file no plugin knows."""
    suffix = "".join(path.suffixes[-2:]) or "(none)"
    hints = ", ".join(f"{dist} for {'/'.join(suffixes)}" for dist, suffixes in READERS.items())
    return f"no installed backend reads {path} (suffix {suffix}): install {hints}"


def check_densenet(weights: Mapping[str, Any], block_config: tuple[int, ...], origin: str) -> None:
    """Refuse, in one line, a checkpoint that is not the DenseNet ``block_config`` with the 14-class head.

    Checked in the order that names the cause rather than its first symptom: names that are no DenseNet tensor,
    then the architecture the layer names reveal, then the head, then every shape
    (:func:`cxrbench.backend.canonical.validate`).
    """
    unknown = sorted(name for name in weights if not _DENSENET_NAME.fullmatch(name))
    if unknown:
        raise WeightsError(f"{origin}: unknown tensor {unknown[0]!r} ({len(unknown)} not in a DenseNet's layout)")
    found = found_block_config(weights)
    if found != tuple(block_config):
        raise WeightsError(
            f"{origin}: holds a DenseNet with blocks {found}{_arch_name(found)}, not "
            f"{tuple(block_config)}{_arch_name(block_config)}: choose the matching model.arch / --arch"
        )
    head = tuple(np.shape(weights.get("classifier.weight", ())))
    if len(head) == 2 and head[0] != NUM_CLASSES:
        raise WeightsError(
            f"{origin}: its classifier has {head[0]} classes, not the {NUM_CLASSES} of ChestX-ray14 "
            f"(an ImageNet head?): import a checkpoint with a {NUM_CLASSES}-way head"
        )
    canonical.validate(weights, block_config, origin)


def found_block_config(weights: Mapping[str, Any]) -> tuple[int, ...]:
    """The layers per dense block that the tensor names say (``(6, 12, 24, 16)`` for DenseNet-121)."""
    layers: dict[int, int] = {}
    for name in weights:
        match = _LAYER.match(name)
        if match:
            block, layer = int(match.group(1)), int(match.group(2))
            layers[block] = max(layers.get(block, 0), layer)
    return tuple(layers.get(block, 0) for block in range(1, max(layers, default=0) + 1))


def _arch_name(block_config: tuple[int, ...]) -> str:
    names = [name for name, config in ARCHITECTURES.items() if config == tuple(block_config)]
    return f" ({names[0]})" if names else ""


def is_foreign(init: str) -> bool:
    """Whether ``model.init`` names a checkpoint a run converts first: a file path, not ``.npz`` or a keyword."""
    return init not in KEYWORDS and not init.endswith(CANONICAL_SUFFIX)


def record(source: Path, converted: str, weights: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """``run.json``'s ``init_checkpoint``: where the run's initial weights came from."""
    return {"source": str(source), "sha256": sha256_of(source), "file": converted, "tensors": len(weights)}
