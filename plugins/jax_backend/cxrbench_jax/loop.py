"""Training: a jitted step under the core's ``run_recipe``.

The step is one XLA program: on-device normalisation, train-mode forward, BCE on logits averaged over the
classes, gradients, PyTorch's Adam (L2 weight decay added to the gradient, epsilon after bias correction: what
optax's ``add_decayed_weights`` + ``scale_by_adam`` compute) and the BatchNorm statistics update. The training
state is donated to the step, so XLA updates the weights in place. With several devices the global batch
(``batch_size`` x devices, the ranks' batches of the core concatenated) is sharded over them and the weights are
replicated: the step computes exactly what one device computes on the concatenated batch. In a world of several
processes (:mod:`cxrbench_jax.world`) the mesh spans every process's devices and each process feeds its own slice of
the global batch; with ``train.batchnorm_sync = "node"`` BatchNorm reduces within each machine's slice.
"""

from __future__ import annotations

import time
from contextlib import AbstractContextManager
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cxrbench.backend import (
    Batch,
    EpochOutcome,
    PreparedData,
    Recorder,
    Settings,
    node_groups,
    run_recipe,
    scaled_learning_rate,
    steps_per_epoch,
    train_batches,
    train_epoch,
    validation_loss,
)
from cxrbench_jax import numerics, world
from cxrbench_jax.infer import pad_rows
from cxrbench_jax.model import JaxModel
from cxrbench_jax.network import DenseNet, normalise


class TrainState(NamedTuple):
    params: Any
    batch_stats: Any
    opt_state: Any


def bce_with_logits(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Element-wise BCE on logits in torch's overflow-free form: max(z, 0) - z y + log1p(exp(-|z|))."""
    return jnp.maximum(logits, 0) - logits * labels + jnp.log1p(jnp.exp(-jnp.abs(logits)))


def torch_adam(settings: Settings) -> optax.GradientTransformation:
    """torch.optim.Adam's direction (the learning rate is applied by the step, so it can change per epoch)."""
    train = settings.train
    return optax.chain(
        optax.add_decayed_weights(train.weight_decay),
        optax.scale_by_adam(b1=train.adam_beta1, b2=train.adam_beta2, eps=train.adam_epsilon),
    )


def make_train_step(network: DenseNet, optimizer: optax.GradientTransformation):
    """The pure step ``(state, uint8 images, labels, lr) -> (state, loss)``."""

    def loss_fn(params, batch_stats, images, labels):
        logits, updated = network.apply(
            {"params": params, "batch_stats": batch_stats}, normalise(images), train=True, mutable=["batch_stats"]
        )
        return bce_with_logits(logits, labels).mean(), updated["batch_stats"]

    def step(state: TrainState, images: jax.Array, labels: jax.Array, lr: jax.Array) -> tuple[TrainState, jax.Array]:
        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, state.batch_stats, images, labels
        )
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = jax.tree.map(lambda p, u: p - lr * u, state.params, updates)
        return TrainState(params, batch_stats, opt_state), loss

    return step


def make_val_step(network: DenseNet):
    """``(variables, images, labels, mask) -> BCE summed over images and classes``, padding rows masked."""

    def val_step(variables, images, labels, mask):
        per_image = bce_with_logits(network.apply(variables, normalise(images)), labels).sum(axis=1)
        return jnp.sum(per_image * mask)

    return val_step


class JaxEpochLoop:
    """One epoch of the jitted step, validation, and weight snapshots, for ``run_recipe``."""

    def __init__(self, model: JaxModel, data: PreparedData, settings: Settings, recorder: Recorder):
        self.model, self.data, self.settings, self.recorder = model, data, settings, recorder
        self.devices = world.training_devices(model.devices)
        self.world = len(self.devices)
        self.global_batch = settings.train.batch_size * self.world
        self.batch_sharding = numerics.batch_sharding(self.devices)
        self.optimizer = torch_adam(settings)
        # A copy: the step donates its state, and the model's own arrays must survive a failed epoch.
        params, batch_stats = self.replicated((model.variables["params"], model.variables["batch_stats"]))
        self.state = TrainState(params, batch_stats, jax.jit(self.optimizer.init)(params))
        network = model.network.clone(bn_groups=node_groups(settings))
        self.step_fn = jax.jit(make_train_step(network, self.optimizer), donate_argnums=0)
        self.val_fn = jax.jit(make_val_step(model.network))
        self.compiled: Any = None
        self.compile_s: float | None = None

    def sync(self) -> None:
        jax.block_until_ready(self.state)

    def variables(self) -> dict[str, Any]:
        return {"params": self.state.params, "batch_stats": self.state.batch_stats}

    def compile(self, images: jax.Array, labels: jax.Array, lr: jax.Array):
        """Compile the step ahead of time once, so the compile time is a figure of its own."""
        if self.compiled is None:
            start = time.perf_counter()
            self.compiled = self.step_fn.lower(self.state, images, labels, lr).compile()
            self.compile_s = time.perf_counter() - start
        return self.compiled

    def replicated(self, tree: Any) -> Any:
        """A copy of ``tree`` on every training device (the mesh of every process in a launched world)."""
        if not world.joined():
            return jax.tree.map(jnp.copy, tree)
        return jax.device_put(jax.device_get(tree), numerics.replicated(self.devices))

    def device_batch(self, batch: Batch) -> tuple[jax.Array, jax.Array]:
        """This process's slice of the global batch, on its devices of the training mesh."""
        if world.joined():
            rows = (self.global_batch,)
            return tuple(
                jax.make_array_from_process_local_data(self.batch_sharding, a, rows + a.shape[1:])
                for a in (batch.images, batch.labels)
            )
        return jax.device_put(batch.images, self.batch_sharding), jax.device_put(batch.labels, self.batch_sharding)

    def global_copy(self, array: np.ndarray) -> jax.Array:
        """The same host array on every process, sharded over the training mesh (validation batches)."""
        if not world.joined():
            return jax.device_put(array, self.batch_sharding)
        return jax.make_array_from_callback(array.shape, self.batch_sharding, lambda index: array[index])

    def train_epoch(self, epoch: int, lr: float) -> EpochOutcome:
        """The core's global batches (the ranks' batches concatenated, so any device count sees the images one
        device would), one compiled step each; the losses stay on the device until the epoch ends. Each process
        of a launched world reads the core's rank slice of its own devices only."""
        settings = self.settings
        processes, local = jax.process_count(), self.world // jax.process_count()
        batches = train_batches(
            self.data,
            settings,
            epoch,
            batch_size=settings.train.batch_size * local,
            rank=jax.process_index(),
            world=processes,
        )
        rate = jnp.float32(lr)

        def step(batch: Batch) -> jax.Array:
            images, labels = self.device_batch(batch)
            self.state, loss = self.compile(images, labels, rate)(self.state, images, labels, rate)
            return loss

        with self.out_of_memory("training"):
            return train_epoch(
                self.recorder,
                batches,
                step,
                epoch=epoch,
                sync=self.sync,
                images=self.global_batch,
                steps=steps_per_epoch(self.data, settings, self.world),
                fetch=fetch_stacked,
            )

    def validate(self) -> float:
        """The core's validation loss; every batch padded to one compiled shape that the devices divide."""
        variables = self.variables()
        rows = -(-self.settings.train.batch_size // self.world) * self.world

        def summed_loss(batch: Batch) -> jax.Array:
            mask = (np.arange(rows) < len(batch.images)).astype(np.float32)
            padded = (pad_rows(batch.images, rows), pad_rows(batch.labels, rows), mask)
            return self.val_fn(variables, *(self.global_copy(a) for a in padded))

        with self.out_of_memory("validating"):
            return validation_loss(self.recorder, self.data, self.settings, summed_loss, self.sync, device_total)

    def out_of_memory(self, doing: str) -> AbstractContextManager[None]:
        return numerics.oom_as_backend_error(self.model.devices[0], self.settings.train.batch_size, doing)

    def snapshot(self) -> dict[str, Any]:
        """Host copies: the device buffers are donated to the next step."""
        return jax.tree.map(lambda a: np.array(a, copy=True), self.variables())

    def restore(self, snapshot: dict[str, Any]) -> None:
        placed = jax.device_put(snapshot, numerics.replicated(self.devices))
        self.state = self.state._replace(params=placed["params"], batch_stats=placed["batch_stats"])


def fetch_stacked(values: list[jax.Array]) -> np.ndarray:
    """Device scalars as one host array, in one transfer."""
    return np.asarray(jnp.stack(values), dtype=np.float64)


def device_total(sums: list[jax.Array], images: int) -> tuple[float, int]:
    """The validation batches' summed losses, added up on the host after one transfer."""
    return float(fetch_stacked(sums).sum()) if sums else 0.0, images


def train(model: JaxModel, data: PreparedData, settings: Settings, recorder: Recorder) -> dict[str, Any]:
    """Run the core's recipe at the training matmul precision; the model keeps the best weights; return the result
    and the core's numerics record."""
    loop = JaxEpochLoop(model, data, settings, recorder)
    with jax.default_matmul_precision(numerics.training_precision(settings)):
        try:
            result = run_recipe(loop, settings, recorder, world=loop.world)
        finally:
            if not any(a.is_deleted() for a in jax.tree.leaves(loop.variables())):
                if world.joined():  # back to this process's devices: the stages after training run here alone
                    model.put(jax.device_get(loop.variables()))
                else:
                    model.variables = loop.variables()
        in_force = numerics.describe(
            settings,
            loop.devices,
            scaled_learning_rate(settings, loop.world),
            model.variables,
            compile_s=loop.compile_s,
            jit="jax.jit, AOT-compiled step, donated state",
        )
    return {**result, "numerics": in_force, "peak_memory": numerics.peak_memory(model.devices[0])}
