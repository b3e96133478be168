"""One numerics record for every backend: the same keys, so the report lines the backends up key by key.

``cxrbench_train`` returns ``"numerics": {...}``: what was really in force while the backend trained.
Every backend fills every key of :data:`FIELDS`, reading each value back from its framework where the
framework holds it (thread pools, TF32, the dtype policy, determinism), never copying the setting that
asked for it. Anything only one framework has goes under :data:`FRAMEWORK` as a dict of its own.
:func:`build` makes a record and :func:`check` refuses one with a missing or unknown key; the core
checks every record it receives (the train stage) and the conformance kit checks every backend's.
``docs/devices-and-numerics.md`` lists the same keys (a test keeps the two equal).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cxrbench.errors import BackendError

#: Sub-key for what only one framework has (e.g. torch's cuDNN flags, Keras' dtype policy name).
FRAMEWORK = "framework"

#: Every top-level key of the record -> what it means. The order is the report's row order.
FIELDS: dict[str, str] = {
    "device": "the device rank 0 trains on, as the framework names it (with the GPU's model where it has one)",
    "devices": "every device training runs on, one entry per rank or replica",
    "world_size": "data-parallel ranks or replicas, as the framework counts them",
    "nodes": "machines the ranks or replicas run on (run.nodes; above 1 started by the framework's launcher)",
    "data_parallel": "the data-parallel engine (e.g. DistributedDataParallel, MirroredStrategy); 'none' on one device",
    "batch_size_per_device": "images per step on each rank or replica (train.batch_size)",
    "global_batch": "images per optimizer step over all ranks",
    "learning_rate": "the first epoch's learning rate after scaling for the ranks (train.lr_scaling)",
    "lr_scaling": "the learning-rate scaling rule for several ranks (train.lr_scaling)",
    "precision": "numerics.precision in force: fp32, bf16 or fp16",
    "compute_dtype": "the dtype the layers compute in (autocast dtype, dtype policy), read back",
    "loss_scaling": "whether the loss is scaled against fp16 underflow (fp16 only), read back from the optimizer",
    "tf32": "whether float32 matmuls and convolutions may run in TF32 on the GPU, read back",
    "layout": "the activations' memory layout (NCHW, NHWC)",
    "compile": "how the training step runs: eager, torch.compile, tf.function, tf.function + XLA",
    "synchronized_batchnorm": "whether BatchNorm statistics are computed over the global batch (several ranks)",
    "batchnorm_sync": "the ranks BatchNorm statistics are reduced over: global, node (one machine's) or none",
    "intra_op_threads": "threads one op may use on the CPU, read back from the framework",
    "inter_op_threads": "threads running independent ops at once on the CPU, read back from the framework",
    "thread_budget": "the core's CPU thread budget for this process (cxrbench.machine.budget): intra_op and inter_op",
    "deterministic": "whether the framework's deterministic mode is in force, read back (numerics.deterministic)",
    "input_pipeline": "how the core's batches reach the device (plain iteration, DataLoader, tf.data)",
    "versions": "the framework's and its runtime libraries' versions",
    FRAMEWORK: "framework-specific values, under this one key",
}


def build(backend: str, framework: Mapping[str, Any], **fields: Any) -> dict[str, Any]:
    """A checked record, its keys in :data:`FIELDS` order, ``framework`` under :data:`FRAMEWORK`."""
    record = check(backend, {**fields, FRAMEWORK: dict(framework)})
    return {key: record[key] for key in FIELDS}


def check(backend: str, record: Any) -> dict[str, Any]:
    """``record`` when it has exactly the schema's top-level keys; else a one-line error naming the key."""
    if not isinstance(record, Mapping):
        raise BackendError(f"backend {backend!r}: the numerics record is {type(record).__name__}, not a dict")
    missing = [key for key in FIELDS if key not in record]
    if missing:
        raise BackendError(
            f"backend {backend!r}: the numerics record lacks the key {missing[0]!r} "
            "(docs/devices-and-numerics.md lists every key)"
        )
    unknown = [key for key in record if key not in FIELDS]
    if unknown:
        raise BackendError(
            f"backend {backend!r}: the numerics record has the unknown key {unknown[0]!r} "
            f"(framework-specific values go under {FRAMEWORK!r})"
        )
    if not isinstance(record[FRAMEWORK], Mapping):
        raise BackendError(f"backend {backend!r}: the numerics record's {FRAMEWORK!r} is not a dict")
    return dict(record)
