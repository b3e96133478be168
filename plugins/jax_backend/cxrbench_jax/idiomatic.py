"""JAX's own training loop, the yardstick of the harness-overhead benchmark (``cxrbench_idiomatic_loop``).

JAX has no canonical DenseNet, so the network is the backend's Flax module; the loop around it is what a JAX user
writes: one ``jax.jit`` step (forward in train mode, ``optax.sigmoid_binary_cross_entropy``, ``jax.value_and_grad``,
``optax.adam``) with the training state donated, over normalised arrays placed on the device before the first step.
The backend's XLA switches (:func:`cxrbench_jax.numerics.configure`) and its training matmul precision apply.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
import optax

from cxrbench.backend import NUM_CLASSES, IdiomaticLoop, Settings
from cxrbench_jax import numerics
from cxrbench_jax import weights as flax_weights
from cxrbench_jax.network import DenseNet

#: Batches made in memory and cycled through, so consecutive steps see different data, as in training.
BATCHES = 4


def make_step(network: DenseNet, optimizer: optax.GradientTransformation):
    def loss_fn(params, batch_stats, images, labels):
        logits, updated = network.apply(
            {"params": params, "batch_stats": batch_stats}, images, train=True, mutable=["batch_stats"]
        )
        return optax.sigmoid_binary_cross_entropy(logits, labels).mean(), updated["batch_stats"]

    def step(state: tuple[Any, Any, Any], images: jax.Array, labels: jax.Array):
        params, batch_stats, opt_state = state
        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch_stats, images, labels)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), batch_stats, opt_state), loss

    return step


def loop(settings: Settings, weights: dict[str, np.ndarray]) -> IdiomaticLoop:
    numerics.configure(settings)
    device = numerics.select_devices(settings)[0]
    network = DenseNet(tuple(settings.model.block_config))
    variables = jax.device_put(flax_weights.to_variables(weights, network.block_config), device)
    train = settings.train
    optimizer = optax.adam(train.learning_rate, b1=train.adam_beta1, b2=train.adam_beta2, eps=train.adam_epsilon)
    state = [(variables["params"], variables["batch_stats"], optimizer.init(variables["params"]))]
    rng = np.random.default_rng(settings.run.seed)
    size, batch = settings.data.image_size, train.batch_size
    batches = [
        (
            jax.device_put(rng.standard_normal((batch, size, size, 3), dtype=np.float32), device),
            jax.device_put((rng.random((batch, NUM_CLASSES)) < 0.3).astype(np.float32), device),
        )
        for _ in range(BATCHES)
    ]
    jitted = jax.jit(make_step(network, optimizer), donate_argnums=0)
    precision = numerics.training_precision(settings)
    steps = [0]

    def step() -> jax.Array:
        images, labels = batches[steps[0] % BATCHES]
        steps[0] += 1
        with jax.default_matmul_precision(precision):
            state[0], loss = jitted(state[0], images, labels)
        return loss

    return IdiomaticLoop(
        step=step,
        sync=lambda: jax.block_until_ready(state[0]),
        description=(
            f"the backend's Flax DenseNet{tuple(settings.model.block_config)}, one jax.jit step "
            f"(optax.sigmoid_binary_cross_entropy, jax.value_and_grad, optax.adam, state donated) over {BATCHES} "
            f"in-memory batches on {device}, matmul precision {precision}"
        ),
    )
