"""The Keras backend's training step against Keras' own ``train_on_batch``, in one process, windows alternated.

Why: ``cxrbench overhead`` compares fresh processes, as a user's runs are; but on a 2-core machine fresh processes of
the same loop differ by up to 1.6x (37-59 img/s), so a few rounds cannot find a cost of a few per cent. Here every
variant runs in the same process, same threads and same memory, window after window in alternating order, so
process-to-process differences cancel and what is left is the cost of the code. Variants:

  backend     the backend's compiled step (TorchBatchNorm, TorchAdam) on uint8 batches already on the device
  pipeline    the same step fed by the backend's own tf.data pipeline over prepared uint8 images, as in training
  keras_bn    the backend's step with Keras' own BatchNormalization training path (biased running variance)
  keras_adam  the backend's step with Keras' own Adam (epsilon before bias correction)
  idiomatic   the backend's cxrbench_idiomatic_loop: keras.applications.DenseNet121 with train_on_batch

    python tools/keras_step_ab.py --variants backend,pipeline,idiomatic --rounds 6

Prints each variant's median milliseconds per step, its range over windows and its speed against the first.
"""

from __future__ import annotations

import argparse
import statistics
import time
import types

import numpy as np

from cxrbench.backend import NUM_CLASSES, Recorder, canonical
from cxrbench.data.prepared import PreparedData
from cxrbench.suite import load_suite, parse_set_option

VARIANTS = ("backend", "pipeline", "keras_bn", "keras_adam", "idiomatic")
#: Images of the in-memory training split the pipeline variant reads (35 batches of the smoke suite's 16).
PIPELINE_IMAGES = 560


def backend_step(variant: str, settings, weights, batches, rng):
    """One training step of the Keras backend's loop, changed as ``variant`` says."""
    import keras

    from cxrbench_keras.distributed import train_dataset
    from cxrbench_keras.loop import KerasEpochLoop
    from cxrbench_keras.model import build

    model = build(settings, weights)
    if variant == "keras_bn":
        for layer in model.network.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.call = types.MethodType(keras.layers.BatchNormalization.call, layer)
    data = None
    if variant == "pipeline":
        n, size = PIPELINE_IMAGES, settings.data.image_size
        data = PreparedData.in_memory(
            rng.integers(0, 256, (n, size, size), dtype=np.uint8),
            (rng.random((n, NUM_CLASSES)) < 0.3).astype(np.uint8),
            np.array(["train"] * n),
            key="keras-step-ab",
        )
    loop = KerasEpochLoop(model, data, settings, Recorder())
    if variant == "keras_adam":
        train = settings.train
        loop.optimizer = keras.optimizers.Adam(
            train.learning_rate, beta_1=train.adam_beta1, beta_2=train.adam_beta2, epsilon=train.adam_epsilon
        )
        loop.optimizer.build(model.network.trainable_variables)
    if variant == "pipeline":
        state = {"batches": iter(()), "epoch": 0}

        def step():
            for batch in state["batches"]:
                return loop.train_step(batch)
            state["epoch"] += 1
            state["batches"] = iter(train_dataset(loop.strategy, data, settings, state["epoch"]))
            return loop.train_step(next(state["batches"]))

        return step
    count = iter(range(10**9))
    return lambda: loop.train_step(batches[next(count) % len(batches)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="backend,pipeline,keras_bn,keras_adam,idiomatic")
    parser.add_argument("--rounds", type=int, default=6, help="windows per variant, in alternating order")
    parser.add_argument("--steps", type=int, default=5, help="steps per window")
    parser.add_argument("--suite", default="smoke", help="network, image size, batch and numerics (default: smoke)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="any setting")
    args = parser.parse_args(argv)
    names = args.variants.split(",")
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}: choose from {', '.join(VARIANTS)}")

    settings = load_suite(args.suite).replace(**dict(parse_set_option(text) for text in args.set))
    from cxrbench_keras import determinism

    determinism.prepare_environment(settings.numerics)  # before TensorFlow's import, as in a worker
    import tensorflow as tf

    from cxrbench_keras import idiomatic

    determinism.apply(settings.numerics)
    weights = canonical.init_canonical(settings.model.block_config, seed=settings.run.seed)
    rng = np.random.default_rng(0)
    size, batch = settings.data.image_size, settings.train.batch_size
    batches = [
        (
            tf.constant(rng.integers(0, 256, (batch, size, size), dtype=np.uint8)),
            tf.constant((rng.random((batch, NUM_CLASSES)) < 0.3).astype(np.float32)),
        )
        for _ in range(4)
    ]
    steps = {
        name: idiomatic.loop(settings, weights).step
        if name == "idiomatic"
        else backend_step(name, settings, weights, batches, rng)
        for name in names
    }
    for step in steps.values():  # trace and warm up every variant before any window is timed
        for _ in range(3):
            step()
    times: dict[str, list[float]] = {name: [] for name in names}
    for window in range(args.rounds):
        for name in names if window % 2 == 0 else names[::-1]:
            tf.test.experimental.sync_devices()
            start = time.perf_counter()
            for _ in range(args.steps):
                loss = steps[name]()
            np.asarray(loss)
            tf.test.experimental.sync_devices()
            times[name].append(1000.0 * (time.perf_counter() - start) / args.steps)
    first = statistics.median(times[names[0]])
    for name in names:
        median = statistics.median(times[name])
        print(
            f"{name:11s} {median:7.1f} ms/step  [{min(times[name]):.1f}, {max(times[name]):.1f}]  "
            f"{first / median:.3f}x the speed of {names[0]}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
