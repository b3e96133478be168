"""The Keras backend plugin: weights map, torchvision equivalence, training, inference, CAM, ONNX."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest

from helpers.backends import require

pytestmark = require("pytorch", "keras")

import cxrbench_keras  # noqa: F401  (sets KERAS_BACKEND before keras is imported below)
from cxrbench.backend import canonical, numerics_record
from cxrbench.backend.recorder import Recorder
from cxrbench.data.classes import NUM_CLASSES
from cxrbench.deploy import onnx_file
from cxrbench.errors import BackendError, TrainingDiverged, WeightsError, out_of_memory
from cxrbench.plugins import load_plugins

# torchvision segfaults when imported after tensorflow in this environment: torch goes first.
torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")
tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from cxrbench_keras import infer, loop, optim  # noqa: E402
from cxrbench_keras import model as keras_model
from cxrbench_keras import numerics as keras_numerics  # noqa: E402
from cxrbench_keras import weights as keras_weights
from helpers.keras_inputs import SIZE, TINY, make_data, make_settings, random_weights


def torch_densenet(weights, block_config=TINY):
    net = torchvision.models.DenseNet(
        growth_rate=32, block_config=block_config, num_init_features=64, bn_size=4, num_classes=NUM_CLASSES
    )
    missing, unexpected = net.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in weights.items()}, strict=False)
    assert not unexpected and all(k.endswith("num_batches_tracked") for k in missing)
    return net


def structured_images(n: int, seed: int = 0) -> np.ndarray:
    """Image-like uint8 inputs (smooth gradients and a blob), not just noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    images = []
    for _ in range(n):
        cy, cx = rng.integers(10, SIZE - 10, 2)
        blob = 200 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 60.0)
        images.append(np.clip(xx * 1.5 + blob + rng.normal(0, 5, (SIZE, SIZE)), 0, 255))
    return np.asarray(images, dtype=np.uint8)


@pytest.fixture(scope="module")
def shared_weights():
    return random_weights()


@pytest.fixture(scope="module")
def tiny(shared_weights):
    return keras_model.build(make_settings(), shared_weights)


# -- discovery ------------------------------------------------------------------------------------


def test_backend_info_imports_no_framework():
    code = (
        "import sys, cxrbench_keras as k; info = k.cxrbench_backend_info();"
        "assert info.name == 'keras' and info.onnx_layout == 'NHWC', info;"
        "heavy = [m for m in ('tensorflow', 'keras', 'torch') if m in sys.modules];"
        "assert not heavy, heavy; print(info.version)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == keras.__version__


def test_entry_point_selects_the_keras_backend():
    plugins = load_plugins(backend="keras")
    assert plugins.backends["keras"].plugin == "cxrbench_keras"
    assert [info.name for info in plugins.hook.cxrbench_backend_info() if info] == ["keras"]


# -- weights --------------------------------------------------------------------------------------


def test_layer_map_round_trip_is_exact(tiny, shared_weights):
    got = keras_weights.get_weights(tiny.network)
    assert list(got) == list(canonical.densenet_spec(TINY))  # every tensor, in torchvision's order
    assert all(np.array_equal(got[k], shared_weights[k]) for k in shared_weights)
    assert sum(v.size for v in got.values()) == sum(int(np.prod(w.shape)) for w in tiny.network.weights)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda w: w.pop("features.norm5.running_var"), "missing tensor 'features.norm5.running_var'"),
        (
            lambda w: w.update({"classifier.weight": np.zeros((14, 3), np.float32)}),
            "'classifier.weight' has shape (14, 3)",
        ),
    ],
)
def test_set_weights_names_the_bad_tensor(tiny, shared_weights, change, message):
    broken = dict(shared_weights)
    change(broken)
    with pytest.raises(WeightsError, match=message.replace("(", r"\(").replace(")", r"\)")):
        keras_weights.set_weights(tiny.network, broken, TINY)


def test_batchnorm_uses_pytorch_constants(tiny):
    norms = [layer for layer in tiny.network.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert len(norms) == sum(1 for k in canonical.densenet_spec(TINY) if k.endswith("running_var"))
    assert {(n.epsilon, n.momentum, type(n).__name__) for n in norms} == {(1e-5, 0.9, "TorchBatchNorm")}


def test_zero_padding_before_max_pool_equals_torch_padding_after_relu():
    x = np.maximum(np.random.default_rng(0).normal(size=(2, 9, 9, 5)), 0).astype(np.float32)
    pooled = keras.layers.MaxPooling2D(3, strides=2)(keras.layers.ZeroPadding2D(1)(x)).numpy()
    reference = torch.nn.functional.max_pool2d(torch.from_numpy(x.transpose(0, 3, 1, 2)), 3, stride=2, padding=1)
    np.testing.assert_array_equal(pooled, reference.numpy().transpose(0, 2, 3, 1))


def test_eval_logits_match_torchvision(tiny, shared_weights):
    images = np.random.default_rng(5).integers(0, 256, (6, SIZE, SIZE), dtype=np.uint8)
    net = torch_densenet(shared_weights).eval()
    with torch.no_grad():
        expected = net(torch.from_numpy(onnx_file.normalise(images, "NCHW"))).numpy()
    got = infer.predict(tiny, images, make_settings())
    assert np.abs(got - expected).max() < 1e-4


def test_first_training_step_matches_torch(shared_weights):
    """Loss (train-mode BN) to 1e-4, running statistics to 1e-5, the Adam step almost everywhere."""
    settings = make_settings(**{"train.batch_size": 8})
    model = keras_model.build(settings, shared_weights)
    rng = np.random.default_rng(7)
    images = rng.integers(0, 256, (8, SIZE, SIZE), dtype=np.uint8)
    labels = (rng.random((8, NUM_CLASSES)) < 0.3).astype(np.float32)

    net = torch_densenet(shared_weights).train()
    adam = torch.optim.Adam(net.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-8)
    logits = net(torch.from_numpy(onnx_file.normalise(images, "NCHW")))
    expected_loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.from_numpy(labels))
    expected_loss.backward()
    adam.step()

    keras_loop = loop.KerasEpochLoop(model, None, settings, Recorder())
    keras_loop.optimizer.learning_rate.assign(1e-3)
    loss = float(keras_loop.train_step((tf.constant(images), tf.constant(labels))))
    assert abs(loss - expected_loss.item()) < 1e-4

    after = {k: v.detach().numpy() for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    got = keras_weights.get_weights(model.network)
    for name in got:
        if name.endswith(("running_mean", "running_var")):
            np.testing.assert_allclose(got[name], after[name], atol=1e-5, err_msg=name)
    # Adam's first step is lr * g / (|g| + eps): elements with gradients near eps may flip.
    differing = sum(int((np.abs(got[k] - after[k]) > 1e-6).sum()) for k in got)
    assert differing <= 1e-3 * sum(v.size for v in got.values())


def test_torch_adam_matches_torch_optim_adam_with_tiny_gradients_and_weight_decay():
    rng = np.random.default_rng(0)
    start = rng.normal(size=(50,)).astype(np.float32)
    grads = [rng.normal(scale=1e-7, size=(50,)).astype(np.float32) for _ in range(3)]
    variable = keras.Variable(start.copy())
    ours = optim.TorchAdam(1e-2, 0.9, 0.999, 1e-8, l2=0.1)
    for g in grads:
        ours.apply([g], [variable])
    reference = torch.nn.Parameter(torch.from_numpy(start.copy()))
    theirs = torch.optim.Adam([reference], lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
    for g in grads:
        reference.grad = torch.from_numpy(g)
        theirs.step()
    np.testing.assert_allclose(variable.numpy(), reference.detach().numpy(), rtol=0, atol=1e-6)


# -- building and initialising --------------------------------------------------------------------


def test_framework_init_is_seeded():
    first = keras_weights.get_weights(keras_model.build(make_settings()).network)
    again = keras_weights.get_weights(keras_model.build(make_settings()).network)
    other = keras_weights.get_weights(keras_model.build(make_settings(**{"run.seed": 1})).network)
    assert all(np.array_equal(first[k], again[k]) for k in first)
    assert not np.array_equal(first["features.conv0.weight"], other["features.conv0.weight"])


def test_shared_init_without_weights_is_the_cores_canonical_init():
    """As in the pytorch backend and the worker: "shared" is the core's seeded init, not an error."""
    model = keras_model.build(make_settings(**{"model.init": "shared", "run.seed": 9}))
    loaded = keras_weights.get_weights(model.network)
    expected = canonical.init_canonical(TINY, 9)
    assert loaded.keys() == expected.keys()
    assert all(np.array_equal(loaded[k], expected[k]) for k in expected)


def test_image_size_too_small_is_one_line():
    settings = make_settings()
    settings = dataclasses.replace(settings, data=dataclasses.replace(settings.data, image_size=16))
    with pytest.raises(BackendError, match="image size 16 px is too small"):
        keras_model.build(settings)


def test_weights_files_load(tmp_path, tiny, shared_weights):
    npz = canonical.save(shared_weights, tmp_path / "w.npz")
    tiny.network.save_weights(tmp_path / "w.weights.h5")
    tiny.network.save(tmp_path / "w.keras")
    for path in (npz, tmp_path / "w.weights.h5", tmp_path / "w.keras"):
        loaded = keras_weights.get_weights(keras_model.build(make_settings(**{"model.init": str(path)})).network)
        assert all(np.array_equal(loaded[k], shared_weights[k]) for k in shared_weights), path


@pytest.mark.filterwarnings("ignore:Skipping nested container:UserWarning")
def test_bad_weights_files_are_one_line_errors(tmp_path, shared_weights):
    small = keras_model.build(make_settings(**{"model.arch": "densenet-small"}))
    small.network.save_weights(tmp_path / "small.weights.h5")
    (tmp_path / "corrupt.weights.h5").write_bytes(b"not an hdf5 file")
    misshapen = dict(shared_weights, **{"features.conv0.weight": np.zeros((64, 3, 3, 3), np.float32)})
    canonical.save(misshapen, tmp_path / "misshapen.npz")
    cases = {
        "small.weights.h5": "small.weights.h5: does not match DenseNet",
        "corrupt.weights.h5": "corrupt.weights.h5: does not match DenseNet",
        "misshapen.npz": "misshapen.npz: tensor 'features.conv0.weight' has shape",
        "missing.npz": "missing.npz: weights file not found",
        "weights.pt": "weights.pt: unsupported weights file",
    }
    (tmp_path / "weights.pt").write_bytes(b"x")
    for name, message in cases.items():
        with pytest.raises(WeightsError) as error:
            keras_model.build(make_settings(**{"model.init": str(tmp_path / name)}))
        assert message in str(error.value) and "\n" not in str(error.value), str(error.value)


def _write_legacy_h5(backbone, path: Path) -> None:
    """Keras' legacy (keras.applications cache) HDF5 weights format, written independently."""
    import h5py

    with h5py.File(path, "w") as f:
        named = [layer for layer in backbone.layers if layer.weights]
        f.attrs["layer_names"] = [layer.name.encode() for layer in named]
        for layer in named:
            group = f.create_group(layer.name)
            names = [f"{layer.name}/{w.name}:0".encode() for w in layer.weights]
            group.attrs["weight_names"] = names
            for name, value in zip(names, layer.get_weights()):
                group.create_dataset(name.decode(), data=value)


@pytest.mark.slow
def test_imagenet_init_from_keras_cache(tmp_path, monkeypatch):
    settings = make_settings(**{"model.arch": "densenet121", "model.init": "imagenet", "data.image_size": 32})
    keras.utils.set_random_seed(42)
    reference = keras.applications.DenseNet121(include_top=False, weights=None, input_shape=(32, 32, 3), pooling="avg")
    (tmp_path / "models").mkdir()
    _write_legacy_h5(reference, tmp_path / "models" / keras_model.IMAGENET_FILE)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    built = keras_model.build(settings).network
    for layer in reference.layers:
        if layer.weights:
            for ours, theirs in zip(built.get_layer(layer.name).get_weights(), layer.get_weights()):
                np.testing.assert_array_equal(ours, theirs)
    fresh = keras_model.build(settings.replace(**{"run.seed": 1})).network
    assert not np.array_equal(
        built.get_layer("classifier").get_weights()[0], fresh.get_layer("classifier").get_weights()[0]
    )


def test_imagenet_unavailable_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    monkeypatch.setattr(keras_model, "IMAGENET_URL", (tmp_path / "offline" / "x.h5").as_uri())
    with pytest.raises(WeightsError, match="is not cached and cannot be downloaded"):
        keras_model.imagenet_file((6, 12, 24, 16))
    with pytest.raises(WeightsError, match="only for densenet121"):
        keras_model.build(make_settings(**{"model.init": "imagenet"}))


# -- inference, CAM, export -------------------------------------------------------------------------


def test_predict_is_batch_independent_and_tta_averages_mirrors(tiny):
    images = structured_images(7)
    whole = infer.predict(tiny, images, make_settings(**{"train.batch_size": 16}))
    batched = infer.predict(tiny, images, make_settings(**{"train.batch_size": 3}))
    np.testing.assert_allclose(batched, whole, atol=1e-5)
    mirrored = infer.predict(tiny, images[:, :, ::-1], make_settings())
    tta = infer.predict(tiny, images, make_settings(**{"eval.tta_hflip": True}))
    np.testing.assert_allclose(tta, (whole + mirrored) / 2, atol=1e-5)
    assert whole.dtype == np.float32 and whole.shape == (7, NUM_CLASSES)


def test_cam_identity(tiny):
    images = structured_images(3)
    classes = [0, 5, 13]
    result = cxrbench_keras.cxrbench_cam(model=tiny, images=images, classes=classes, settings=make_settings())
    assert result.maps.shape == (3, 3, SIZE // 32, SIZE // 32) and result.maps.dtype == np.float32
    np.testing.assert_allclose(result.maps.mean((2, 3)) + result.bias, result.logits, atol=1e-5)
    np.testing.assert_allclose(result.logits, infer.predict(tiny, images, make_settings())[:, classes], atol=1e-5)


def test_onnx_export_matches_keras(tmp_path, tiny):
    settings = make_settings()
    info = cxrbench_keras.cxrbench_export_onnx(model=tiny, path=tmp_path / "m.onnx", settings=settings)
    onnx_file.check_model(info.path)
    meta = onnx_file.read_metadata(info.path)
    assert (info.layout, meta["cxrbench.input_layout"], info.opset, info.output_name) == ("NHWC", "NHWC", 17, "logits")
    session = onnx_file.session(info.path)
    assert [i.name for i in session.get_inputs()] == [info.input_name]
    assert [o.name for o in session.get_outputs()] == [info.output_name, onnx_file.FEATURES_OUTPUT]
    noise = np.random.default_rng(1).integers(0, 256, (5, SIZE, SIZE), dtype=np.uint8)
    for images in (noise, structured_images(5), noise[:1], structured_images(1)):
        got = onnx_file.run_onnx(info.path, images, info.layout, batch_size=len(images), sess=session)
        stats = onnx_file.diff_stats(infer.predict(tiny, images, settings), got, atol=1e-4, rtol=1e-3)
        assert stats["passed"], stats


# -- training -------------------------------------------------------------------------------------


def test_train_hook_reports_epochs_and_numerics():
    settings = make_settings(**{"train.epochs": 2, "train.max_steps": 2, "train.batch_size": 4})
    model = keras_model.build(settings)
    recorder = Recorder()
    result = cxrbench_keras.cxrbench_train(model=model, data=make_data(), settings=settings, recorder=recorder)
    assert result["best_epoch"] in (1, 2) and np.isfinite(result["best_val_loss"])
    assert [r.epoch for r in recorder.history] == [1, 2] and [r.steps for r in recorder.history] == [2, 2]
    assert all(r.images == 8 and r.data_wait_s is not None and np.isfinite(r.train_loss) for r in recorder.history)
    numerics = result["numerics"]
    assert numerics["framework"]["dtype_policy"] == "float32" and numerics["tf32"] is False
    assert (numerics["world_size"], numerics["global_batch"], numerics["learning_rate"]) == (1, 4, 1e-3)
    assert list(numerics) == list(numerics_record.FIELDS)
    assert (numerics["data_parallel"], numerics["compute_dtype"], numerics["loss_scaling"]) == (
        "none",
        "float32",
        False,
    )
    assert numerics["intra_op_threads"] == tf.config.threading.get_intra_op_parallelism_threads()


def test_validation_loss_is_the_image_weighted_bce(tiny):
    data = make_data(n=30)
    settings = make_settings(**{"train.batch_size": 4})  # 10 val images: batches of 4, 4, 2
    keras_loop = loop.KerasEpochLoop(tiny, data, settings, Recorder())
    logits = infer.predict(tiny, data.split_images("val"), settings).astype(np.float64)
    labels = data.split_labels("val")
    expected = np.mean(np.maximum(logits, 0) - logits * labels + np.log1p(np.exp(-np.abs(logits))))
    assert abs(keras_loop.validate() - expected) < 1e-5


def test_snapshot_and_restore(tiny):
    keras_loop = loop.KerasEpochLoop(tiny, None, make_settings(), Recorder())
    saved = keras_loop.snapshot()
    before = keras_weights.get_weights(tiny.network)
    tiny.network.get_layer("conv1_bn").moving_variance.assign(np.full(64, 7.0, np.float32))
    keras_loop.restore(saved)
    after = keras_weights.get_weights(tiny.network)
    assert all(np.array_equal(after[k], before[k]) for k in before)


def test_nan_loss_names_epoch_and_step():
    settings = make_settings(**{"train.max_steps": 2, "train.batch_size": 4, "train.learning_rate": 1e30})
    model = keras_model.build(settings)
    with pytest.raises(TrainingDiverged, match=r"at epoch 1, step 2$"):
        cxrbench_keras.cxrbench_train(model=model, data=make_data(), settings=settings, recorder=Recorder())


def test_out_of_memory_names_the_batch_size(monkeypatch, tiny):
    def exhausted(self, epoch, lr):
        raise tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor with shape[8,64,32,32]")

    monkeypatch.setattr(loop.KerasEpochLoop, "train_epoch", exhausted)
    with pytest.raises(BackendError) as caught:
        cxrbench_keras.cxrbench_train(model=tiny, data=make_data(), settings=make_settings(), recorder=Recorder())
    assert str(caught.value) == str(out_of_memory(keras_numerics.device_name(), 8, "training"))


def test_bf16_policy_keeps_float32_logits_and_trains():
    settings = make_settings(**{"numerics.precision": "bf16", "train.max_steps": 1, "train.batch_size": 4})
    try:
        model = keras_model.build(settings)
        assert model.network.get_layer("conv1_conv").compute_dtype == "bfloat16"
        assert model.network.outputs[0].dtype == "float32"
        result = loop.train(model, make_data(), settings, Recorder())
        assert result["numerics"]["framework"]["dtype_policy"] == "mixed_bfloat16" and np.isfinite(
            result["best_val_loss"]
        )
        assert result["numerics"]["compute_dtype"] == "bfloat16"
    finally:
        keras.config.set_dtype_policy("float32")


@pytest.mark.parametrize(
    "dotted, message",
    [
        (
            {"numerics.precision": "fp16"},
            "numerics.precision = 'fp16' with 2 replicas: Keras' LossScaleOptimizer decides "
            "'finite' from replica 0 only",
        ),
        ({"numerics.jit_compile": True}, "numerics.jit_compile = true with 2 replicas: Keras disables XLA"),
    ],
)
def test_replicated_fp16_and_xla_are_refused_in_one_line(dotted, message):
    from cxrbench_keras.distributed import check_replicated_numerics

    numerics = make_settings(**dotted).numerics
    check_replicated_numerics(numerics, replicas=1)  # one device: both are fine
    with pytest.raises(BackendError, match=message):
        check_replicated_numerics(numerics, replicas=2)
    check_replicated_numerics(make_settings(**{"numerics.precision": "bf16"}).numerics, replicas=2)
