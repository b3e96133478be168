"""tf.distribute in the Keras backend, on CPU with two logical devices (in a subprocess, because the
logical device split must happen before TensorFlow initialises and must not leak into other tests).

After one step, the replicas hold identical weights, equal to one device trained on the concatenated
batch within atol 1e-5 (float32 reduction order differs between all-reduce and one big batch), and
replica r trained on exactly the core's rank-r slice of the global batch.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from cxrbench.testing.conformance import child_env
from helpers.backends import require

pytestmark = require("keras")

BODY = textwrap.dedent(
    """
    import os
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
    from helpers.keras_inputs import make_data, make_settings, random_weights
    import numpy as np
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

    from cxrbench.backend.recorder import Recorder
    from cxrbench_keras import distributed, loop, model as keras_model, weights as keras_weights

    data, weights = make_data(n=48), random_weights()
    per_replica = 4
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    # Adam's first step is lr * g / (|g| + eps): a larger eps keeps it smooth where g is near 0,
    # so float32 reduction-order noise in the gradients cannot flip an update's sign.
    common = {"train.max_steps": 1, "train.adam_epsilon": 1e-3}
    settings = make_settings(**{"train.batch_size": per_replica, **common})

    # The replicas receive the core's rank slices of the global batch, in rank order.
    first = next(iter(distributed.train_dataset(strategy, data, settings, epoch=1)))
    for rank, images in enumerate(strategy.experimental_local_results(first[0])):
        expected = next(data.batches("train", per_replica, epoch=1, seed=0, shuffle=True, hflip=True,
                                     rank=rank, world=2))
        assert np.array_equal(images.numpy(), expected.images), rank

    two = keras_model.build(settings, weights, strategy=strategy)
    assert all(l.synchronized for l in two.network.layers if isinstance(l, keras_model.TorchBatchNorm))
    outcome = loop.KerasEpochLoop(two, data, settings, Recorder()).train_epoch(1, 1e-3)
    assert outcome.images == 2 * per_replica and len(outcome.losses) == 1

    for variable in two.network.weights:
        values = [v.numpy() for v in strategy.experimental_local_results(variable.value)]
        assert len(values) == 2 and np.array_equal(values[0], values[1]), variable.path

    one_settings = make_settings(**{"train.batch_size": 2 * per_replica, **common})
    one = keras_model.build(one_settings, weights, strategy=tf.distribute.get_strategy())
    single = loop.KerasEpochLoop(one, data, one_settings, Recorder()).train_epoch(1, 1e-3)
    assert abs(float(single.losses[0]) - float(outcome.losses[0])) < 1e-6, (single.losses, outcome.losses)

    got, expected = keras_weights.get_weights(two.network), keras_weights.get_weights(one.network)
    worst = max((float(np.abs(got[k] - expected[k]).max()), k) for k in got)
    assert worst[0] < 1e-5, worst
    print("max abs weight difference", worst)

    # Inference and export read a single-device twin: no synchronised BatchNorm, the replicated weights.
    from cxrbench_keras import infer
    twin = infer.float32_network(two)
    assert twin is not two.network
    assert not any(l.synchronized for l in twin.layers if isinstance(l, keras_model.TorchBatchNorm))
    assert all(np.array_equal(a, b) for a, b in zip(twin.get_weights(), two.network.get_weights()))
    """
)


@pytest.mark.slow
def test_two_replicas_equal_one_device_on_the_concatenated_batch():
    result = subprocess.run([sys.executable, "-c", BODY], capture_output=True, text=True, timeout=600, env=child_env())
    assert result.returncode == 0, result.stderr[-3000:]
    assert "max abs weight difference" in result.stdout
