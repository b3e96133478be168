"""The model the core holds: the Flax DenseNet, its variables on the devices, and how it was initialised."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cxrbench.backend import Settings, Start, WeightsError, canonical, initial_weights
from cxrbench_jax import numerics
from cxrbench_jax import weights as flax_weights
from cxrbench_jax.network import DenseNet
from cxrbench_jax.weights import Variables

#: Side of the dummy input ``init`` traces; the variables do not depend on it.
INIT_SIZE = 32


@dataclass
class JaxModel:
    """What the core treats as the opaque model. ``variables`` live on ``devices`` (replicated)."""

    network: DenseNet
    variables: Variables
    devices: list[jax.Device]
    #: Jitted inference functions by purpose (traced once per input shape).
    functions: dict[str, Any] = field(default_factory=dict)

    @property
    def block_config(self) -> tuple[int, ...]:
        return self.network.block_config

    def put(self, variables: Variables) -> None:
        """Place host or device variables on the devices, replicated."""
        self.variables = jax.device_put(variables, numerics.replicated(self.devices))

    def host_variables(self) -> Variables:
        return jax.device_get(self.variables)


def build(settings: Settings, weights: dict[str, np.ndarray] | None) -> JaxModel:
    """The model for ``settings``: given canonical weights, or initialised by ``settings.model.init``."""
    canonical.check_image_size(settings.data.image_size)
    numerics.configure(settings)
    network = DenseNet(tuple(settings.model.block_config))
    variables = _initial_variables(settings, weights, network)
    devices = numerics.select_devices(settings)
    model = JaxModel(network, {}, devices)
    model.put(variables)
    return model


def _initial_variables(settings: Settings, weights: dict[str, np.ndarray] | None, network: DenseNet) -> Variables:
    """What the core resolved (:func:`cxrbench.backend.initial_weights.resolve`); JAX has no checkpoint format of
    its own, so canonical ``.npz`` is the only file type."""
    initial = initial_weights.resolve(settings, weights)
    if initial.start is Start.FRAMEWORK:
        return framework_init(network, settings.run.seed)
    if initial.start is Start.IMAGENET:
        raise WeightsError(
            "model.init = 'imagenet': the jax backend has no ImageNet weights "
            "(use 'shared', 'framework' or a weights file)"
        )
    return flax_weights.to_variables(initial.weights, network.block_config, origin=initial.origin)


def framework_init(network: DenseNet, seed: int) -> Variables:
    """Flax's own initialisers (LeCun normal convolutions), seeded by ``run.seed``, as host arrays."""
    dummy = jnp.zeros((1, INIT_SIZE, INIT_SIZE, 3), jnp.float32)
    variables = jax.jit(network.init)(jax.random.PRNGKey(seed), dummy)
    return jax.device_get({"params": variables["params"], "batch_stats": variables["batch_stats"]})
