"""Keras checkpoints of ``keras.applications`` DenseNets with a 14-way Dense top -> canonical weights.

Three layouts, all read as ``layer name -> {variable name: array}`` and renamed with the backend's one name map
(:func:`cxrbench_keras.weights.canonical_prefix`); the top may be named anything: the one Dense layer outside the
map is the classifier.

* legacy HDF5 (``model.save("m.h5")`` or Keras 2's ``save_weights("m.h5")``): read with h5py alone, by the layer
  names the file keeps, nothing deserialised;
* ``.keras`` archives: ``keras.saving.load_model`` with ``safe_mode=True`` (no code from the file runs), whatever
  the nesting (a functional model or a Sequential around the DenseNet);
* Keras 3 ``.weights.h5``: its variables are stored by position, not layer name, so they are loaded into the
  layout that writes them (this backend's network, or keras.applications' DenseNet + ``Dense(14)``).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from cxrbench.backend import NUM_CLASSES, WeightsError, check_densenet, first_line
from cxrbench_keras.weights import canonical_prefix, to_canonical

#: Variable names of each kind of layer, in the order :func:`cxrbench_keras.weights.to_canonical` takes them.
_VARIABLES = {
    "bn": ("gamma", "beta", "moving_mean", "moving_variance"),
    "conv": ("kernel",),
    "dense": ("kernel", "bias"),
}
#: The legacy HDF5 root group of a whole saved model (a weights-only file has the layers at its root).
_LEGACY_ROOT = "model_weights"

Layers = dict[str, dict[str, np.ndarray]]


def import_checkpoint(path: Path, block_config: tuple[int, ...]) -> dict[str, np.ndarray]:
    """Canonical weights of a Keras DenseNet checkpoint, checked against ``block_config``."""
    layers = _read_layers(path, block_config)
    weights: dict[str, np.ndarray] = {}
    for prefix, kind, variables in _mapped(layers, path):
        missing = [name for name in _VARIABLES[kind] if name not in variables]
        if missing:
            raise WeightsError(f"{path}: layer for {prefix!r} lacks the variable {missing[0]!r}")
        arrays = [variables[name] for name in _VARIABLES[kind]]
        for part, value in to_canonical(kind, arrays).items():
            weights[f"{prefix}.{part}"] = np.ascontiguousarray(value, dtype=np.float32)
    check_densenet(weights, block_config, str(path))
    return weights


def _read_layers(path: Path, block_config: tuple[int, ...]) -> Layers:
    if path.name.endswith(".keras"):
        return _keras_archive(path)
    import h5py

    try:
        with h5py.File(path, "r") as handle:
            if _LEGACY_ROOT in handle or "layer_names" in handle.attrs:
                return _legacy_h5(handle)
    except OSError as exc:  # h5py: not an HDF5 file, truncated
        raise WeightsError(f"{path}: not a readable HDF5 file ({first_line(exc)})") from None
    return _keras3_weights(path, block_config)


def _legacy_h5(handle) -> Layers:
    """Datasets ``[model_weights/][nested model/]layer[/layer]/variable`` by the layer that holds them."""
    import h5py

    root = handle[_LEGACY_ROOT] if _LEGACY_ROOT in handle else handle
    layers: Layers = {}

    def visit(name: str, item) -> None:
        if isinstance(item, h5py.Dataset):
            parts = name.split("/")
            layers.setdefault(parts[-2], {})[parts[-1].split(":")[0]] = np.asarray(item)

    root.visititems(visit)
    return layers


def _keras_archive(path: Path) -> Layers:
    import keras

    from cxrbench_keras import model as _registers_torch_batch_norm  # noqa: F401  (this backend's own archives)

    try:
        loaded = keras.saving.load_model(path, compile=False, safe_mode=True)
    except Exception as exc:  # zipfile, h5py and Keras raise many types for a corrupt or foreign archive
        raise WeightsError(f"{path}: not a loadable Keras archive ({first_line(exc)})") from None
    return _model_layers(loaded)


def _keras3_weights(path: Path, block_config: tuple[int, ...]) -> Layers:
    """Keras 3 stores a ``.weights.h5`` by layer position: try the two layouts that write DenseNet checkpoints."""
    problems = []
    for candidate in _candidate_networks(block_config):
        try:
            with warnings.catch_warnings():  # a functional model's weightless inner containers are not in the file
                warnings.filterwarnings("ignore", message="Skipping nested container at '_operations_by_depth")
                candidate.load_weights(str(path))
        except Exception as exc:  # Keras raises ValueError and others for a file of another layout
            problems.append(first_line(exc))
            continue
        return _model_layers(candidate)
    raise WeightsError(
        f"{path}: does not match a keras.applications DenseNet{tuple(block_config)} with a "
        f"Dense({NUM_CLASSES}) top ({problems[-1]})"
    )


def _candidate_networks(block_config: tuple[int, ...]) -> Iterator:
    import keras

    from cxrbench_keras.model import _backbone, build_network

    yield build_network(block_config, 32, None, synchronized=False)
    backbone = _backbone(block_config, 32, None)
    yield keras.Model(backbone.inputs, keras.layers.Dense(NUM_CLASSES)(backbone.outputs[0]))


def _model_layers(network) -> Layers:
    """Every layer with weights, nested models flattened, by its name."""
    layers: Layers = {}
    for layer in network.layers:
        if hasattr(layer, "layers") and layer.weights:
            layers.update(_model_layers(layer))
        elif layer.weights:
            layers[layer.name] = {v.name.split("/")[-1].split(":")[0]: np.asarray(v.numpy()) for v in layer.weights}
    return layers


def _mapped(layers: Layers, path: Path) -> Iterator[tuple[str, str, dict[str, np.ndarray]]]:
    """``(canonical prefix, kind, variables)``; the one Dense layer outside the name map is the classifier."""
    unmapped = [name for name in layers if canonical_prefix(name) is None]
    dense = [name for name in unmapped if set(layers[name]) == set(_VARIABLES["dense"])]
    others = [name for name in unmapped if name not in dense]
    if others or len(dense) > 1:
        names = others or dense
        raise WeightsError(
            f"{path}: unknown layer {names[0]!r} ({len(names)} not in a keras.applications DenseNet with one Dense top)"
        )
    for name, variables in layers.items():
        prefix, kind = canonical_prefix(name) or ("classifier", "dense")
        yield prefix, kind, variables
