"""The JAX backend plugin against independent references: the numpy example network, torchvision, a torch
training step, PyTorch's BatchNorm statistics, and one device against two (in a child process with two forced
CPU devices). The conformance kit (``pytest --cxrbench-backend jax``) checks the hook contract itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from helpers.backends import require

pytestmark = require("jax", "pytorch", "numpy")

import jax
import jax.numpy as jnp
import torch
import torchvision

import cxrbench_jax
from cxrbench.backend import canonical
from cxrbench.backend.recorder import Recorder
from cxrbench.data.classes import NUM_CLASSES
from cxrbench.deploy.onnx_file import normalise as host_normalise
from cxrbench.errors import BackendError, TrainingDiverged, UnsupportedSetting
from cxrbench.testing.conformance import (
    kit_settings,
    random_canonical,
    random_images,
    synthetic_data,
)
from cxrbench_jax import infer, loop, network
from cxrbench_jax import model as jax_model
from cxrbench_jax import numerics as jax_numerics
from cxrbench_numpy_example.network import classify, pooled_features

SIZE = 64
TINY = (1, 1, 1, 1)
#: Logits of two float32 implementations of one function (summation orders differ).
LOGIT_ATOL = 1e-4
#: The first step's loss in two frameworks.
LOSS_ATOL = 1e-5


def settings_for(**dotted):
    return kit_settings(SIZE, **{"train.batch_size": 8, **dotted})


def torch_densenet(weights, block_config=TINY) -> torch.nn.Module:
    net = torchvision.models.DenseNet(
        growth_rate=32, block_config=block_config, num_init_features=64, bn_size=4, num_classes=NUM_CLASSES
    )
    missing, unexpected = net.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in weights.items()}, strict=False)
    assert not unexpected and all(k.endswith("num_batches_tracked") for k in missing)
    return net


@pytest.fixture(scope="module")
def shared():
    return random_canonical(TINY, seed=21)


@pytest.fixture(scope="module")
def model(shared):
    return cxrbench_jax.cxrbench_build_model(settings=settings_for(), weights=shared)


def test_round_trip_is_exact_and_in_the_canonical_order(model, shared):
    got = cxrbench_jax.cxrbench_get_weights(model=model)
    assert list(got) == list(canonical.densenet_spec(TINY))
    for name, value in shared.items():
        assert got[name].dtype == np.float32 and got[name].flags.c_contiguous, name
        np.testing.assert_array_equal(got[name], value, err_msg=name)
    flax_count = sum(a.size for a in jax.tree.leaves(model.variables))
    assert flax_count == sum(v.size for v in shared.values()), "every Flax variable is a canonical tensor"


def test_logits_equal_the_numpy_example_and_torchvision(model, shared):
    images = random_images(5, SIZE, seed=4)
    ours = cxrbench_jax.cxrbench_predict(model=model, images=images, settings=settings_for())
    numpy_logits = classify(shared, pooled_features(shared, TINY, images))
    with torch.no_grad():
        torch_logits = torch_densenet(shared).eval()(torch.from_numpy(host_normalise(images, "NCHW"))).numpy()
    vs_numpy, vs_torch = np.abs(ours - numpy_logits).max(), np.abs(ours - torch_logits).max()
    print(f"max |logit difference|: jax vs numpy example {vs_numpy:.2e}, jax vs torchvision {vs_torch:.2e}")
    assert vs_numpy < LOGIT_ATOL and vs_torch < LOGIT_ATOL


def test_logits_equal_torchvision_with_several_layers_per_block():
    """densenet-small (two layers a block): the concatenations' channel growth that a one-layer block never has."""
    settings = settings_for(**{"model.arch": "densenet-small"})
    weights = random_canonical(settings.model.block_config, seed=22)
    images = random_images(3, SIZE, seed=5)
    ours = cxrbench_jax.cxrbench_predict(
        model=cxrbench_jax.cxrbench_build_model(settings=settings, weights=weights), images=images, settings=settings
    )
    with torch.no_grad():
        net = torch_densenet(weights, settings.model.block_config).eval()
        expected = net(torch.from_numpy(host_normalise(images, "NCHW"))).numpy()
    assert np.abs(ours - expected).max() < LOGIT_ATOL


def test_device_normalisation_equals_the_host_one():
    images = random_images(3, 32, seed=1)
    np.testing.assert_allclose(
        np.asarray(network.normalise(jnp.asarray(images))), host_normalise(images, "NHWC"), rtol=0, atol=1e-6
    )


def test_running_variance_is_unbiased_with_pytorchs_momentum():
    x = np.random.default_rng(0).normal(2.0, 3.0, (4, 5, 5, 6)).astype(np.float32)
    norm = network.TorchBatchNorm(6)
    variables = norm.init(jax.random.PRNGKey(0), jnp.asarray(x), train=False)
    _, updated = norm.apply(variables, jnp.asarray(x), train=True, mutable=["batch_stats"])
    reference = torch.nn.BatchNorm2d(6).train()  # eps 1e-5, momentum 0.1
    reference(torch.from_numpy(x.transpose(0, 3, 1, 2)))
    stats = updated["batch_stats"]
    np.testing.assert_allclose(np.asarray(stats["var"]), reference.running_var.numpy(), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(stats["mean"]), reference.running_mean.numpy(), rtol=1e-6, atol=1e-7)
    unbiased = 0.9 + 0.1 * x.reshape(-1, 6).var(axis=0, ddof=1)
    np.testing.assert_allclose(np.asarray(stats["var"]), unbiased, rtol=1e-5)


def test_first_training_step_equals_a_torch_step(shared):
    """Loss within 1e-5, BatchNorm statistics within 1e-5, Adam with L2 weight decay almost everywhere."""
    settings = settings_for(**{"train.weight_decay": 1e-4})
    ours = cxrbench_jax.cxrbench_build_model(settings=settings, weights=shared)
    rng = np.random.default_rng(7)
    images = rng.integers(0, 256, (8, SIZE, SIZE), dtype=np.uint8)
    labels = (rng.random((8, NUM_CLASSES)) < 0.3).astype(np.float32)

    net = torch_densenet(shared).train()
    adam = torch.optim.Adam(net.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-4)
    torch_logits = net(torch.from_numpy(host_normalise(images, "NCHW")))
    expected = torch.nn.functional.binary_cross_entropy_with_logits(torch_logits, torch.from_numpy(labels))
    expected.backward()
    adam.step()

    epoch_loop = loop.JaxEpochLoop(ours, None, settings, Recorder())
    epoch_loop.state, loss = epoch_loop.step_fn(
        epoch_loop.state, jnp.asarray(images), jnp.asarray(labels), jnp.float32(1e-3)
    )
    print(f"first-step loss: jax {float(loss):.8f}, torch {expected.item():.8f}")
    assert abs(float(loss) - expected.item()) < LOSS_ATOL

    ours.variables = epoch_loop.variables()
    got = cxrbench_jax.cxrbench_get_weights(model=ours)
    after = {k: v.detach().numpy() for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    for name in got:
        if name.endswith(("running_mean", "running_var")):
            np.testing.assert_allclose(got[name], after[name], rtol=0, atol=1e-5, err_msg=name)
    # Adam's first step is lr * g / (|g| + eps): elements whose gradient is near eps may differ.
    differing = sum(int((np.abs(got[k] - after[k]) > 1e-6).sum()) for k in got)
    assert differing <= 1e-3 * sum(v.size for v in got.values())


@pytest.mark.parametrize("scale", [1e-7, 1e-2], ids=["gradients-near-eps", "ordinary-gradients"])
def test_adam_equals_torch_optim_adam_with_weight_decay(scale):
    rng = np.random.default_rng(0)
    start = rng.normal(size=(50,)).astype(np.float32)
    grads = [rng.normal(scale=scale, size=(50,)).astype(np.float32) for _ in range(5)]
    optimizer = loop.torch_adam(settings_for(**{"train.weight_decay": 0.1}))
    ours = jnp.asarray(start)
    state = optimizer.init(ours)
    for g in grads:
        direction, state = optimizer.update(jnp.asarray(g), state, ours)
        ours = ours - jnp.float32(1e-2) * direction
    reference = torch.nn.Parameter(torch.from_numpy(start.copy()))
    theirs = torch.optim.Adam([reference], lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
    for g in grads:
        reference.grad = torch.from_numpy(g)
        theirs.step()
    np.testing.assert_allclose(np.asarray(ours), reference.detach().numpy(), rtol=0, atol=1e-6)


def test_train_hook_reports_epochs_numerics_and_keeps_best_weights(shared):
    settings = settings_for(**{"train.epochs": 2, "train.max_steps": 2, "train.batch_size": 4})
    model = cxrbench_jax.cxrbench_build_model(settings=settings, weights=shared)
    recorder = Recorder()
    data = synthetic_data(SIZE, train=8, val=6)
    result = cxrbench_jax.cxrbench_train(model=model, data=data, settings=settings, recorder=recorder)
    assert [(r.epoch, r.steps, r.images) for r in recorder.history] == [(1, 2, 8), (2, 2, 8)]
    numerics = result["numerics"]
    assert (numerics["world_size"], numerics["global_batch"], numerics["precision"]) == (1, 4, "fp32")
    assert numerics["framework"]["compile_s"] > 0 and numerics["versions"]["jax"] == jax.__version__
    assert numerics["framework"]["matmul_precision"] == "highest" and not numerics["tf32"]  # no TF32 on GPUs
    logits = cxrbench_jax.cxrbench_predict(model=model, images=data.split_images("val"), settings=settings)
    z, y = logits.astype(np.float64), data.split_labels("val")
    kept = np.mean(np.maximum(z, 0) - z * y + np.log1p(np.exp(-np.abs(z))))
    assert kept == pytest.approx(result["best_val_loss"], rel=1e-5)


def test_tf32_is_for_training_only_inference_traces_ieee_float32(monkeypatch, shared):
    """numerics.tf32 = true: the training step traces at TF32 precision and says so; prediction and CAMs trace at
    "highest" (IEEE float32) even when called inside a TF32 context."""
    settings = settings_for(**{"numerics.tf32": True, "train.max_steps": 1, "train.batch_size": 4})
    model = cxrbench_jax.cxrbench_build_model(settings=settings, weights=shared)
    traced = []

    def recording(images):
        traced.append(jax.config.jax_default_matmul_precision)
        return network.normalise(images)

    monkeypatch.setattr(loop, "normalise", recording)
    numerics = cxrbench_jax.cxrbench_train(
        model=model, data=synthetic_data(SIZE, train=4, val=4), settings=settings, recorder=Recorder()
    )["numerics"]
    assert numerics["tf32"] and numerics["framework"]["matmul_precision"] == "tensorfloat32"
    assert set(traced) == {"tensorfloat32"}  # the train and validation steps
    traced.clear()
    monkeypatch.setattr(infer, "normalise", recording)
    images = random_images(2, SIZE, seed=3)
    with jax.default_matmul_precision("tensorfloat32"):
        cxrbench_jax.cxrbench_predict(model=model, images=images, settings=settings)
        cxrbench_jax.cxrbench_cam(model=model, images=images, classes=[0], settings=settings)
    assert traced == ["highest", "highest"]


def test_nan_loss_names_epoch_and_step(shared):
    settings = settings_for(**{"train.max_steps": 2, "train.batch_size": 4, "train.learning_rate": 1e30})
    model = cxrbench_jax.cxrbench_build_model(settings=settings, weights=shared)
    with pytest.raises(TrainingDiverged, match=r"at epoch 1, step 2$"):
        cxrbench_jax.cxrbench_train(model=model, data=synthetic_data(SIZE), settings=settings, recorder=Recorder())


def test_out_of_memory_names_the_batch_size(monkeypatch, model):
    def exhausted(*args, **kwargs):
        raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.2GiB")

    monkeypatch.setattr(loop.JaxEpochLoop, "compile", lambda self, *a: exhausted)
    with pytest.raises(BackendError, match="out of memory on cpu:0 .* while training at batch size 8 ") as caught:
        cxrbench_jax.cxrbench_train(
            model=model, data=synthetic_data(SIZE, train=16), settings=settings_for(), recorder=Recorder()
        )
    assert "\n" not in str(caught.value)


def test_refusals_are_one_line(monkeypatch):
    with pytest.raises(UnsupportedSetting, match="fp32 only"):  # by design: a sweep shows it as refused
        jax_model.build(settings_for(**{"numerics.precision": "bf16"}), None)
    with pytest.raises(BackendError, match="run.gpus = 2, but jax sees 0 GPU"):
        jax_model.build(settings_for(**{"run.gpus": 2}), None)
    monkeypatch.setattr(cxrbench_jax.importlib.util, "find_spec", lambda name: None if name == "flax" else object())
    with pytest.raises(BackendError, match=r"needs flax: pip install -e plugins/jax_backend"):
        cxrbench_jax.cxrbench_build_model(settings=settings_for(), weights=None)


TWO_DEVICES = textwrap.dedent(
    """
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    import cxrbench_jax
    from cxrbench.backend.recorder import Recorder
    from cxrbench.testing.conformance import kit_settings, random_canonical, synthetic_data
    from cxrbench_jax import loop

    assert len(jax.devices()) == 2, jax.devices()
    weights = random_canonical((1, 1, 1, 1), seed=3)
    data = synthetic_data(32, train=8, val=4)

    def one_epoch(batch_size, devices):
        dotted = {"train.batch_size": batch_size, "train.max_steps": 1, "train.lr_scaling": "none"}
        settings = kit_settings(32, **dotted)
        model = cxrbench_jax.cxrbench_build_model(settings=settings, weights=weights)
        model.devices = model.devices[:devices]
        model.put(model.host_variables())
        epoch_loop = loop.JaxEpochLoop(model, data, settings, Recorder())
        outcome = epoch_loop.train_epoch(1, 1e-3)
        return epoch_loop, outcome

    sharded, sharded_outcome = one_epoch(4, 2)
    single, single_outcome = one_epoch(8, 1)
    leaves = jax.tree.leaves(sharded.state)
    replicas_identical = all(
        np.array_equal(np.asarray(a.addressable_shards[0].data), np.asarray(a.addressable_shards[1].data))
        for a in leaves)
    on_two = all(len(a.sharding.device_set) == 2 for a in leaves)

    def max_diff(a, b):
        pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b))
        return max(float(np.abs(np.asarray(x) - np.asarray(y)).max()) for x, y in pairs)

    # After one step Adam's first moment is (1 - beta1) * gradient: the gradients themselves are compared.
    mu = [epoch_loop.state.opt_state[1].mu for epoch_loop in (sharded, single)]
    gradient_scale = max(float(np.abs(np.asarray(g)).max()) for g in jax.tree.leaves(mu[1])) / 0.1
    print(json.dumps({"replicas_identical": replicas_identical, "on_two_devices": on_two,
                      "images": [sharded_outcome.images, single_outcome.images],
                      "loss_diff": float(np.abs(sharded_outcome.losses - single_outcome.losses).max()),
                      "gradient_diff": max_diff(*mu) / 0.1, "gradient_scale": gradient_scale,
                      "batch_stats_diff": max_diff(sharded.state.batch_stats, single.state.batch_stats),
                      "val_diff": abs(sharded.validate() - single.validate())}))
    """
)


def test_two_devices_equal_one_device_on_the_concatenated_batch():
    """Two forced CPU devices with batch 4 each against one device with batch 8, one step from the same weights:
    the replicas hold bitwise identical state, and loss, gradients, BatchNorm statistics and the validation loss
    equal one device's within float32 reduction-order noise. (Weights after Adam's first step are not compared
    elementwise: lr * g / (|g| + eps) turns noise in near-zero gradients into differences of up to lr.)"""
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
        "PYTHONPATH": os.pathsep.join(p for p in sys.path if p),
    }
    command = [sys.executable, "-c", TWO_DEVICES]
    done = subprocess.run(command, check=False, capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(result)
    assert result["replicas_identical"] and result["on_two_devices"]
    assert result["images"] == [8, 8]
    assert result["loss_diff"] < 1e-6
    assert result["gradient_diff"] < 1e-5 * result["gradient_scale"]
    assert result["batch_stats_diff"] < 1e-5 and result["val_diff"] < 1e-5


def test_peak_memory_is_the_allocator_peak_where_the_device_keeps_one():
    class Device:
        def __init__(self, stats):
            self.stats = stats

        def memory_stats(self):
            return self.stats

    assert jax_numerics.peak_memory(jax.devices("cpu")[0]) == {}  # XLA's CPU client keeps no allocator statistics
    assert jax_numerics.peak_memory(Device(None)) == {}
    peak = jax_numerics.peak_memory(Device({"bytes_in_use": 2**20, "peak_bytes_in_use": 3 * 2**20}))
    assert peak == {"mib": 3.0, "source": "jax Device.memory_stats() peak_bytes_in_use"}


def test_batchnorm_groups_normalise_each_machines_part_alone():
    """``train.batchnorm_sync = "node"``: with two groups each half of the batch is normalised with its own
    statistics (what each machine computes alone), and the running statistics follow the first half (rank 0's)."""
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 3, 3, 5)) * 2.0 + 1.0
    grouped, one = network.TorchBatchNorm(5, groups=2), network.TorchBatchNorm(5)
    variables = one.init(jax.random.PRNGKey(1), x, train=False)
    out, updated = grouped.apply(variables, x, train=True, mutable=["batch_stats"])
    halves = [one.apply(variables, part, train=True, mutable=["batch_stats"]) for part in (x[:2], x[2:])]
    np.testing.assert_allclose(out, jnp.concatenate([h[0] for h in halves]), atol=1e-6)
    for name in ("mean", "var"):
        np.testing.assert_allclose(updated["batch_stats"][name], halves[0][1]["batch_stats"][name], atol=1e-6)
