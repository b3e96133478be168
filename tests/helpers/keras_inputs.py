"""Small seeded inputs of the Keras backend's tests, its replica test and its benchmark (no framework imported).

A 64 px tiny DenseNet's settings, a synthetic data set a network can learn (a bright square marks the first label)
and canonical weights whose BatchNorm parameters and statistics are not the identity.
"""

from __future__ import annotations

import numpy as np

from cxrbench.backend import canonical
from cxrbench.data.classes import NUM_CLASSES
from cxrbench.data.prepared import PreparedData
from cxrbench.suite import Settings

SIZE = 64
TINY = (1, 1, 1, 1)


def make_settings(**overrides) -> Settings:
    base = {"data.image_size": SIZE, "model.arch": "densenet-tiny", "model.init": "framework", "train.batch_size": 8}
    return Settings().replace(**{**base, **overrides})


def make_data(n: int = 48, size: int = SIZE, seed: int = 0) -> PreparedData:
    """Synthetic prepared data: a bright square whose position depends on the first label."""
    rng = np.random.default_rng(seed)
    labels = (rng.random((n, NUM_CLASSES)) < 0.3).astype(np.uint8)
    images = rng.integers(0, 60, (n, size, size), dtype=np.uint8)
    images[labels[:, 0] == 1, 8:24, 8:24] = 220
    split = np.array(["train"] * (n * 2 // 3) + ["val"] * (n - n * 2 // 3))
    return PreparedData.in_memory(images, labels, split, key="test")


def random_weights(block_config=TINY, seed: int = 3) -> dict[str, np.ndarray]:
    """Canonical weights with non-trivial BatchNorm parameters and statistics."""
    rng = np.random.default_rng(seed)
    weights = canonical.init_canonical(block_config, seed)
    for name, value in weights.items():
        if ".norm" in name:
            if name.endswith((".weight", ".running_var")):
                weights[name] = rng.uniform(0.5, 1.5, value.shape).astype(np.float32)
            else:
                weights[name] = rng.normal(0.0, 0.1, value.shape).astype(np.float32)
    return weights
