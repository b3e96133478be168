"""tf.distribute for several GPUs or machines, and the core's batches split across replicas exactly as its ranks.

Replica ``r`` of ``R`` (all workers together) gets slice ``r`` of every global batch of
``batch_size * R`` images: the same images as the core's rank ``r`` of world ``R``. Each worker
reads its slice with ``data.batches(batch_size * local_replicas, rank=worker, world=workers)`` and
feeds consecutive per-replica slices to its replicas in order (tf.data round-robin over devices).

Several machines: each worker process (``python -m cxrbench.run.worker --launched``, one per machine) joins a
``MultiWorkerMirroredStrategy`` whose cluster comes from ``TF_CONFIG`` (set by the user or a Kubernetes training
operator) or from Slurm's environment (``SlurmClusterResolver``); TensorFlow's collective ops do the rest.
"""

from __future__ import annotations

import json
import os

import numpy as np
import tensorflow as tf

from cxrbench.backend import (
    NUM_CLASSES,
    BackendError,
    World,
    decode_payloads,
    encode_payload,
    expected_replicas,
    pad_payload,
    require_world_size,
    train_batches,
)

#: The strategy this process joined (a launched worker; created before any other TensorFlow op, as TF requires)
#: and this process's place in it.
_JOINED: dict[str, object] = {}
#: Collective implementation left to TensorFlow (AUTO: NCCL between GPUs, RING over gRPC on CPUs).
COMMUNICATION = "CommunicationImplementation.AUTO (NCCL on GPUs, RING on CPUs)"


def check_replicated_numerics(numerics, replicas: int) -> None:
    """Refuse what Keras 3.15 gets wrong under a multi-replica strategy instead of training wrongly.

    fp16: ``LossScaleOptimizer`` decides "finite" from replica 0's gradients only, so a step another replica saw
    overflow is applied (NaN weights; with XLA a hang). XLA: ``jit_compile`` of a replicated step takes a path
    Keras itself disables for distribution strategies. bf16 without XLA needs neither and is the way.
    """
    if replicas <= 1:
        return
    if numerics.precision == "fp16":
        raise BackendError(
            f"numerics.precision = 'fp16' with {replicas} replicas: Keras' LossScaleOptimizer decides "
            "'finite' from replica 0 only (NaN weights or a hang); use bf16 or one GPU"
        )
    if numerics.jit_compile:
        raise BackendError(
            f"numerics.jit_compile = true with {replicas} replicas: Keras disables XLA for "
            "distribution strategies; set it to false or use one GPU"
        )


def make_strategy(settings) -> tf.distribute.Strategy:
    """The joined multi-worker strategy (a launched worker); else the default strategy for one device, Mirrored
    (one machine) or MultiWorkerMirrored (TF_CONFIG)."""
    if _JOINED:
        return _JOINED["strategy"]
    if settings.run.gpus <= 1:
        return tf.distribute.get_strategy()
    check_replicated_numerics(settings.numerics, settings.run.gpus)
    if _tf_config_workers() > 1:
        return tf.distribute.MultiWorkerMirroredStrategy()
    gpus = tf.config.get_visible_devices("GPU")
    return tf.distribute.MirroredStrategy([f"/gpu:{i}" for i in range(len(gpus))])


def _tf_config_workers() -> int:
    cluster = json.loads(os.environ.get("TF_CONFIG") or "{}").get("cluster", {})
    return len(cluster.get("worker", [])) + len(cluster.get("chief", []))


def join(settings) -> World:
    """Join the MultiWorkerMirroredStrategy cluster ``TF_CONFIG`` or Slurm describes; refuse another size."""
    if os.environ.get("TF_CONFIG"):
        resolver, launcher = tf.distribute.cluster_resolver.TFConfigClusterResolver(), "TF_CONFIG"
    elif "SLURM_PROCID" in os.environ:
        resolver, launcher = tf.distribute.cluster_resolver.SlurmClusterResolver(), "SlurmClusterResolver"
    else:
        raise BackendError(
            "the keras backend joins a MultiWorkerMirroredStrategy cluster from TF_CONFIG or Slurm, and neither is "
            "set (docs/multi-node.md)"
        )
    if settings.train.batchnorm_sync == "node" and settings.run.nodes > 1:
        raise BackendError(
            "train.batchnorm_sync = 'node': Keras' synchronized BatchNormalization reduces over every replica of "
            "the strategy and tf.distribute has no per-machine group; use 'global'"
        )
    check_replicated_numerics(settings.numerics, expected_replicas(settings))
    strategy = tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=resolver)
    launcher = f"MultiWorkerMirroredStrategy ({launcher})"
    require_world_size("TensorFlow", launcher, strategy.num_replicas_in_sync, settings)
    cluster = resolver.cluster_spec().as_dict()
    order = [(kind, i) for kind in ("chief", "worker") for i in range(len(cluster.get(kind, [])))]
    world = World(
        rank=order.index((resolver.task_type, resolver.task_id)),
        processes=len(order),
        replicas=strategy.num_replicas_in_sync,
        local_rank=0,  # one worker process per machine, driving all its GPUs
        launcher=launcher,
        communication={"tensorflow collective ops": f"{COMMUNICATION}, TensorFlow {tf.__version__}"},
        gpu_indices=tuple(range(len(tf.config.get_visible_devices("GPU")))),
    )
    _JOINED.update(strategy=strategy, world=world)
    return world


def joined() -> bool:
    return bool(_JOINED)


def gather(payload) -> list:
    """Every worker's payload on worker 0 (rank 0) with the strategy's all-gather; each worker's first replica
    carries its bytes (as int32: collectives move no uint8), padded to the longest."""
    strategy, world = _JOINED["strategy"], _JOINED["world"]
    per_worker = world.replicas // world.processes
    mine = encode_payload(payload)

    def all_gather(row: np.ndarray) -> np.ndarray:
        def value(context: tf.distribute.experimental.ValueContext):
            first = context.replica_id_in_sync_group % per_worker == 0
            return tf.constant((row if first else np.zeros_like(row))[None].astype(np.int32))

        values = strategy.experimental_distribute_values_from_function(value)
        return strategy.gather(values, axis=0).numpy()[::per_worker]

    lengths = all_gather(np.array([len(mine)]))[:, 0]
    rows = all_gather(pad_payload(mine, int(lengths.max())))
    return [] if world.rank else decode_payloads(rows.astype(np.uint8), lengths)


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Whether this process reports (rank 0): the chief in multi-worker training, else always."""
    return strategy.extended.should_checkpoint


def train_dataset(strategy, data, settings, epoch: int):
    """The epoch's training batches as a distributed dataset of per-replica ``(uint8, float32)``."""
    batch_size, size = settings.train.batch_size, data.size
    signature = (
        tf.TensorSpec((batch_size, size, size), tf.uint8),
        tf.TensorSpec((batch_size, NUM_CLASSES), tf.float32),
    )

    def per_worker(context: tf.distribute.InputContext):
        local = context.num_replicas_in_sync // context.num_input_pipelines

        def replica_batches():
            for batch in train_batches(
                data,
                settings,
                epoch,
                batch_size=batch_size * local,
                rank=context.input_pipeline_id,
                world=context.num_input_pipelines,
            ):
                for j in range(local):
                    part = slice(j * batch_size, (j + 1) * batch_size)
                    yield batch.images[part], batch.labels[part]

        dataset = tf.data.Dataset.from_generator(replica_batches, output_signature=signature)
        return dataset.prefetch(tf.data.AUTOTUNE)

    return strategy.distribute_datasets_from_function(per_worker)
