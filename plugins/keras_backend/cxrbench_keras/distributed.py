"""tf.distribute for several GPUs, and the core's batches split across replicas exactly as its ranks.

Replica ``r`` of ``R`` (all workers together) gets slice ``r`` of every global batch of
``batch_size * R`` images: the same images as the core's rank ``r`` of world ``R``. Each worker
reads its slice with ``data.batches(batch_size * local_replicas, rank=worker, world=workers)`` and
feeds consecutive per-replica slices to its replicas in order (tf.data round-robin over devices).
"""

from __future__ import annotations

import json
import os

import tensorflow as tf

from cxrbench.backend import NUM_CLASSES, BackendError, train_batches


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
    """Default strategy for one device; Mirrored (one machine) or MultiWorkerMirrored (TF_CONFIG)."""
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
