"""The PyTorch backend plugin, checked against independent references (numpy, a bare torch loop, onnxruntime).

Models are densenet-tiny at 32 px unless a test needs DenseNet-121 itself (ImageNet weights). The
generic backend contract is also covered by the conformance kit: ``pytest --cxrbench-backend pytorch``.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import math
import subprocess
import sys
import urllib.error

import numpy as np
import pytest

from helpers.backends import require

pytestmark = require("pytorch")
import torch
import torch.nn.functional as F
import torchvision

import cxrbench_pytorch as backend
from cxrbench.backend import canonical, numerics_record
from cxrbench.backend.recorder import Recorder
from cxrbench.data.classes import NUM_CLASSES
from cxrbench.deploy import onnx_file
from cxrbench.errors import BackendError, TrainingDiverged, WeightsError
from cxrbench.errors import out_of_memory as core_out_of_memory
from cxrbench.testing.conformance import (
    assert_one_line,
    bce_with_logits,
    kit_settings,
    random_canonical,
    random_images,
    synthetic_data,
)
from cxrbench_pytorch import loop
from cxrbench_pytorch import weights as tv_weights

TINY = (1, 1, 1, 1)
DENSENET121 = (6, 12, 24, 16)
#: torchvision's file name for DenseNet121_Weights.IMAGENET1K_V1 in the hub cache.
IMAGENET_FILE = "densenet121-a639ec97.pth"


@pytest.fixture
def restore_torch_globals():
    """Tests that change process-wide torch switches put them back."""
    threads, benchmark = torch.get_num_threads(), torch.backends.cudnn.benchmark
    matmul, conv = torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision
    yield
    torch.set_num_threads(threads)
    torch.backends.cudnn.benchmark = benchmark
    torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = matmul, conv


def build(settings, weights=None):
    return backend.cxrbench_build_model(settings=settings, weights=weights)


def trained(settings, data, weights):
    model, recorder = build(settings, weights), Recorder()
    result = backend.cxrbench_train(model=model, data=data, settings=settings, recorder=recorder)
    return model, recorder, result


def same_weights(got, expected):
    assert list(got) == list(expected)
    for name in expected:
        assert got[name].dtype == np.float32, name
        assert np.array_equal(got[name], expected[name]), name


def old_style_state_dict(net):
    """A state_dict named like torchvision's released checkpoints (``denselayer1.norm.1``)."""
    rename = {f".{part}{i}.": f".{part}.{i}." for part in ("norm", "conv") for i in (1, 2)}
    state = {}
    for key, tensor in net.state_dict().items():
        if "denselayer" in key:
            for new, old in rename.items():
                key = key.replace(new, old)
        state[key] = tensor
    return state


# -- discovery ------------------------------------------------------------------------------------


def test_backend_info_reads_versions_without_importing_torch():
    script = (
        "import sys, cxrbench_pytorch\n"
        "info = cxrbench_pytorch.cxrbench_backend_info()\n"
        "assert 'torch' not in sys.modules and 'torchvision' not in sys.modules, 'framework imported'\n"
        "print(info.name, info.framework, info.version, info.onnx_layout)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["pytorch", "torch", importlib.metadata.version("torch"), "NCHW"]


# -- model and weights ----------------------------------------------------------------------------


def test_densenet121_has_exactly_the_canonical_layout():
    model = build(kit_settings(64, **{"model.arch": "densenet121"}))
    weights = backend.cxrbench_get_weights(model=model)
    assert {k: v.shape for k, v in weights.items()} == canonical.densenet_spec(DENSENET121)
    assert isinstance(model.net, torchvision.models.DenseNet)
    norms = [m for m in model.net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert {(m.eps, m.momentum) for m in norms} == {(1e-5, 0.1)}


def test_framework_init_is_seeded_without_touching_the_global_rng():
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    first = backend.cxrbench_get_weights(model=build(kit_settings(**{"run.seed": 4})))
    again = backend.cxrbench_get_weights(model=build(kit_settings(**{"run.seed": 4})))
    other = backend.cxrbench_get_weights(model=build(kit_settings(**{"run.seed": 5})))
    assert torch.equal(torch.rand(3), expected_draw)
    same_weights(again, first)
    assert not np.array_equal(other["features.conv0.weight"], first["features.conv0.weight"])


def test_shared_init_is_the_cores_canonical_init():
    model = build(kit_settings(**{"model.init": "shared", "run.seed": 9}))
    same_weights(backend.cxrbench_get_weights(model=model), canonical.init_canonical(TINY, 9))


@pytest.mark.parametrize("channels_last", [False, True])
def test_weight_round_trip_is_bitwise(channels_last):
    model = build(kit_settings(**{"numerics.channels_last": channels_last}))
    weights = random_canonical(TINY, seed=2)
    assert backend.cxrbench_set_weights(model=model, weights=weights) is True
    same_weights(backend.cxrbench_get_weights(model=model), weights)
    if channels_last:
        assert model.net.features.conv0.weight.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("problem", ["missing", "misshapen"])
def test_set_weights_names_the_bad_tensor(problem):
    weights = random_canonical(TINY, seed=2)
    if problem == "missing":
        del weights["features.norm5.running_var"]
    else:
        weights["features.norm5.running_var"] = np.ones(3, np.float32)
    with pytest.raises(WeightsError, match=r"features\.norm5\.running_var") as error:
        backend.cxrbench_set_weights(model=build(kit_settings()), weights=weights)
    assert_one_line(error.value)


def test_npz_and_state_dict_files_load_exactly(tmp_path):
    weights = random_canonical(TINY, seed=3)
    npz = canonical.save(weights, tmp_path / "w.npz")
    net = torchvision.models.DenseNet(block_config=TINY, num_classes=NUM_CLASSES)
    tv_weights.put(net, weights, TINY)
    pt = tmp_path / "w.pt"
    torch.save(old_style_state_dict(net), pt)  # with num_batches_tracked and the released key names
    for path in (npz, pt):
        model = build(kit_settings(**{"model.init": str(path)}))
        same_weights(backend.cxrbench_get_weights(model=model), weights)


def _mismatched(path):
    torch.save(torchvision.models.DenseNet(block_config=(2, 2, 2, 2), num_classes=NUM_CLASSES).state_dict(), path)
    return r"w\.pt: tensor 'features\.transition1\.norm\.weight' has shape \(128,\), expected \(96,\)"


def _corrupt(path):
    path.write_bytes(b"PK\x03\x04 this is not a zip archive")
    return r"w\.pt: not a readable torch state_dict"


def _not_a_state_dict(path):
    torch.save([torch.zeros(1)], path)
    return r"w\.pt: expected a state_dict"


def _wrong_suffix(path):
    path = path.with_suffix(".bin")
    path.write_bytes(b"")
    return r"w\.bin: unsupported weights file type '\.bin' for model\.init \(this backend reads \.npz, \.pt or \.pth;"


@pytest.mark.parametrize("make", [_mismatched, _corrupt, _not_a_state_dict, _wrong_suffix])
def test_bad_weights_file_is_a_one_line_weights_error(tmp_path, make):
    path = tmp_path / "w.pt"
    pattern = make(path)
    if not path.exists():
        path = path.with_suffix(".bin")
    with pytest.raises(WeightsError, match=pattern) as error:
        build(kit_settings(**{"model.init": str(path)}))
    assert_one_line(error.value)


def test_imagenet_init_reads_torchvisions_hub_cache(tmp_path, monkeypatch):
    """A file in the cache is used as is: torch checks the hash only when it downloads."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    source = torchvision.models.DenseNet(block_config=DENSENET121)  # 1000 ImageNet classes
    with torch.no_grad():
        for tensor in source.state_dict().values():
            if tensor.is_floating_point():
                tensor.uniform_(-1, 1)
    checkpoints = tmp_path / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save(old_style_state_dict(source), checkpoints / IMAGENET_FILE)
    settings = kit_settings(64, **{"model.arch": "densenet121", "model.init": "imagenet", "run.seed": 6})
    got = backend.cxrbench_get_weights(model=build(settings))
    expected = tv_weights.get(source)
    for name in canonical.densenet_spec(DENSENET121):
        if not name.startswith("classifier."):
            assert np.array_equal(got[name], expected[name]), name
    fresh = backend.cxrbench_get_weights(model=build(settings.replace(**{"model.init": "framework"})))
    same_weights(
        {k: got[k] for k in fresh if k.startswith("classifier.")},
        {k: fresh[k] for k in fresh if k.startswith("classifier.")},
    )


def test_imagenet_init_without_network_is_a_one_line_weights_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def no_network(url, *args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    settings = kit_settings(64, **{"model.arch": "densenet121", "model.init": "imagenet"})
    with pytest.raises(WeightsError, match=r"model\.init = 'imagenet': cannot get .*name resolution") as error:
        build(settings)
    assert_one_line(error.value)


def test_imagenet_init_needs_densenet121():
    with pytest.raises(WeightsError, match=r"only for model\.arch = 'densenet121'"):
        build(kit_settings(**{"model.init": "imagenet"}))


def test_too_small_images_are_refused_before_building():
    settings = kit_settings()
    tiny_images = dataclasses.replace(settings, data=dataclasses.replace(settings.data, image_size=16))
    with pytest.raises(BackendError, match=r"image size 16 px is too small .*data\.image_size") as error:
        build(tiny_images)
    assert_one_line(error.value)
    with pytest.raises(BackendError, match="16 px is too small"):
        backend.cxrbench_predict(model=build(settings), images=random_images(2, 16), settings=settings)


def test_more_gpus_than_present_is_refused():
    present = torch.cuda.device_count()
    with pytest.raises(BackendError, match=rf"run\.gpus = {present + 1}, but torch sees {present}"):
        build(kit_settings(**{"run.gpus": present + 1}))


# -- input preparation ----------------------------------------------------------------------------


def test_on_device_normalisation_equals_the_cores_reference():
    images = random_images(5, 32, seed=4)
    model = build(kit_settings())
    got = model.inputs(torch.from_numpy(images)).cpu().numpy()
    np.testing.assert_array_equal(got, onnx_file.normalise(images, "NCHW"))


class CountingReads(np.ndarray):
    """The prepared images, counting the reads a batch's assembly makes."""

    reads = 0

    def __getitem__(self, key):
        type(self).reads += 1
        return super().__getitem__(key)


def test_loader_workers_yield_the_cores_batches_in_order_each_reading_only_its_own():
    data = synthetic_data(32, train=10, val=2)

    def make(**shard):
        return data.batches("train", 2, epoch=3, seed=1, shuffle=True, hflip=True, **shard)

    expected = [(b.images, b.labels) for b in make()]
    data.images = np.asarray(data.images).view(CountingReads)
    second = list(make(loader_worker=1, loader_workers=2))
    data.images = np.asarray(data.images)
    assert CountingReads.reads == 2  # steps 2 and 4 of 5: no image of the other worker's steps is read
    assert [b.labels.tolist() for b in second] == [labels.tolist() for _, labels in expected[1::2]]

    got = list(loop.input_pipeline(make, workers=2, pin=False))
    assert len(got) == len(expected) == 5  # odd: the workers end unevenly
    for (images, labels), (want_images, want_labels) in zip(got, expected):
        np.testing.assert_array_equal(images.numpy(), want_images)
        np.testing.assert_array_equal(labels.numpy(), want_labels)


# -- training -------------------------------------------------------------------------------------


def reference_training(settings, data, weights):
    """One epoch with a bare torchvision loop: numpy normalisation, Adam, mean BCE-with-logits."""
    net = torchvision.models.DenseNet(block_config=TINY, num_classes=NUM_CLASSES)
    net.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()}, strict=False)
    t = settings.train
    optimizer = torch.optim.Adam(
        net.parameters(),
        lr=t.learning_rate,
        betas=(t.adam_beta1, t.adam_beta2),
        eps=t.adam_epsilon,
        weight_decay=t.weight_decay,
    )
    net.train()
    losses = []
    for batch in data.batches(
        "train", t.batch_size, epoch=1, seed=settings.run.seed, shuffle=True, hflip=t.hflip, max_steps=t.max_steps
    ):
        loss = F.binary_cross_entropy_with_logits(
            net(torch.from_numpy(onnx_file.normalise(batch.images, "NCHW"))), torch.from_numpy(batch.labels)
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    net.eval()
    with torch.no_grad():
        val_logits = net(torch.from_numpy(onnx_file.normalise(data.split_images("val"), "NCHW"))).numpy()
    return tv_weights.get(net), losses, bce_with_logits(val_logits, data.split_labels("val"))


def test_one_epoch_equals_a_bare_torch_loop():
    """Non-default betas and weight decay must reach Adam. A large Adam epsilon keeps the update a
    smooth function of the gradient: with 1e-8, Adam's first step is lr * sign(g), which turns
    float rounding on near-zero BatchNorm gradients (~1e-9 here) into differences of size lr."""
    settings = kit_settings(
        32,
        **{
            "train.epochs": 1,
            "train.max_steps": 3,
            "train.adam_beta1": 0.8,
            "train.adam_beta2": 0.99,
            "train.adam_epsilon": 1e-3,
            "train.weight_decay": 1e-2,
            "run.seed": 7,
        },
    )
    data, weights = synthetic_data(32, train=12, val=6, seed=1), random_canonical(TINY, seed=8)
    model, recorder, result = trained(settings, data, weights)
    expected_weights, losses, val_loss = reference_training(settings, data, weights)
    got = backend.cxrbench_get_weights(model=model)
    worst = max(float(np.abs(got[k] - expected_weights[k]).max()) for k in got)
    assert worst < 1e-5
    (record,) = recorder.history
    assert (record.steps, record.images, record.warmup, record.best) == (3, 12, True, True)
    assert record.train_loss == pytest.approx(np.mean(losses), abs=1e-6)
    assert record.val_loss == pytest.approx(val_loss, abs=1e-5)
    assert result["best_epoch"] == 1 and result["best_val_loss"] == record.val_loss


def test_training_reports_numerics_and_keeps_the_best_weights():
    settings = kit_settings(
        32, **{"train.epochs": 2, "train.max_steps": 2, "train.learning_rate": 0.05, "numerics.loader_workers": 1}
    )
    data = synthetic_data(32, train=8, val=6, seed=2)
    model, recorder, result = trained(settings, data, random_canonical(TINY, seed=1))
    assert [r.epoch for r in recorder.history] == [1, 2]
    best = min(recorder.history, key=lambda r: r.val_loss)
    assert result["best_epoch"] == best.epoch
    logits = backend.cxrbench_predict(model=model, images=data.split_images("val"), settings=settings)
    assert bce_with_logits(logits, data.split_labels("val")) == pytest.approx(result["best_val_loss"], rel=1e-6)
    numerics = result["numerics"]
    assert numerics["device"] == "cpu" and numerics["world_size"] == 1 and numerics["global_batch"] == 4
    assert numerics["learning_rate"] == 0.05 and numerics["precision"] == "fp32"
    assert numerics["input_pipeline"] == "DataLoader(workers=1, pin_memory=False)"
    assert numerics["framework"]["adam"] == "for-loop"  # fused only on CUDA
    assert numerics["intra_op_threads"] == torch.get_num_threads()
    assert list(numerics) == list(numerics_record.FIELDS)
    assert (numerics["devices"], numerics["data_parallel"], numerics["synchronized_batchnorm"]) == (
        ["cpu"],
        "none",
        False,
    )


def test_snapshot_and_restore_are_exact_copies():
    settings = kit_settings()
    model = build(settings, random_canonical(TINY, seed=1))
    epoch_loop = loop.TorchEpochLoop(model, synthetic_data(32), settings, Recorder(), model.net)
    before = backend.cxrbench_get_weights(model=model)
    snapshot = epoch_loop.snapshot()
    backend.cxrbench_set_weights(model=model, weights=random_canonical(TINY, seed=2))
    epoch_loop.restore(snapshot)
    same_weights(backend.cxrbench_get_weights(model=model), before)


def test_infinite_learning_rate_diverges_at_the_second_step():
    settings = kit_settings(32, **{"train.learning_rate": math.inf, "train.max_steps": 2})
    with pytest.raises(TrainingDiverged, match=r"loss is nan at epoch 1, step 2") as error:
        trained(settings, synthetic_data(32), random_canonical(TINY, seed=1))
    assert (error.value.epoch, error.value.step) == (1, 2)
    assert_one_line(error.value)


def test_out_of_memory_is_a_one_line_error_naming_the_batch_size(monkeypatch):
    settings = kit_settings(32, **{"train.max_steps": 1})
    model = build(settings)

    def out_of_memory(*args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 15.77 GiB total)")

    monkeypatch.setattr(model.net, "forward", out_of_memory)
    recorder = Recorder()
    with pytest.raises(
        BackendError, match=r"out of memory on cpu while training at batch size 4 \(train\.batch_size\)"
    ) as error:
        backend.cxrbench_train(model=model, data=synthetic_data(32), settings=settings, recorder=recorder)
    assert str(error.value) == str(core_out_of_memory("cpu", 4, "training"))  # the core's message, word for word
    assert_one_line(error.value)
    with pytest.raises(BackendError, match="while predicting at batch size 4"):
        backend.cxrbench_predict(model=model, images=random_images(2, 32), settings=settings)


# -- numerics -------------------------------------------------------------------------------------


def first_step_loss(settings, weights):
    _, recorder, result = trained(settings.replace(**{"train.max_steps": 1}), synthetic_data(32, seed=5), weights)
    return recorder.history[0].train_loss, result["numerics"]


@pytest.mark.parametrize("precision, dtype", [("bf16", "bfloat16"), ("fp16", "float16")])
def test_reduced_precision_is_really_in_force(precision, dtype):
    weights = random_canonical(TINY, seed=3)
    fp32_loss, _ = first_step_loss(kit_settings(32), weights)
    loss, numerics = first_step_loss(kit_settings(32, **{"numerics.precision": precision}), weights)
    assert 0 < abs(loss - fp32_loss) < 0.05  # autocast changed the arithmetic, not the function
    assert numerics["compute_dtype"] == numerics["framework"]["autocast_dtype"] == dtype
    assert numerics["loss_scaling"] == (precision == "fp16")


def test_channels_last_computes_the_same_function():
    weights = random_canonical(TINY, seed=3)
    contiguous_loss, _ = first_step_loss(kit_settings(32), weights)
    loss, numerics = first_step_loss(kit_settings(32, **{"numerics.channels_last": True}), weights)
    assert loss == pytest.approx(contiguous_loss, abs=1e-5)
    assert numerics["layout"] == "NHWC (torch.channels_last)"


def test_thread_and_tf32_switches_are_applied_and_read_back(restore_torch_globals):
    settings = kit_settings(
        32,
        **{
            "numerics.intra_op_threads": 1,
            "numerics.tf32": True,
            "numerics.cudnn_benchmark": True,
            "train.max_steps": 1,
        },
    )
    _, _, result = trained(settings, synthetic_data(32), None)
    assert torch.get_num_threads() == 1
    assert torch.backends.cuda.matmul.fp32_precision == "tf32" and torch.backends.cudnn.benchmark
    numerics = result["numerics"]
    framework = numerics["framework"]
    assert (
        numerics["intra_op_threads"],
        numerics["tf32"],
        framework["matmul_fp32_precision"],
        framework["cudnn_conv_fp32_precision"],
        framework["cudnn_benchmark"],
    ) == (1, True, "tf32", "tf32", True)


# -- prediction and CAM ---------------------------------------------------------------------------


def eager_logits(model, images):
    with torch.no_grad():
        return model.net.eval()(torch.from_numpy(onnx_file.normalise(images, "NCHW"))).numpy()


def test_predict_batches_and_tta_match_eager_references():
    settings = kit_settings(32, **{"train.batch_size": 3})
    model = build(settings, random_canonical(TINY, seed=4))
    images = random_images(7, 32, seed=6)
    logits = backend.cxrbench_predict(model=model, images=images, settings=settings)
    assert logits.dtype == np.float32 and logits.shape == (7, NUM_CLASSES)
    np.testing.assert_allclose(logits, eager_logits(model, images), atol=1e-5)
    tta = backend.cxrbench_predict(model=model, images=images, settings=settings.replace(**{"eval.tta_hflip": True}))
    mirrored = eager_logits(model, np.ascontiguousarray(images[:, :, ::-1]))
    np.testing.assert_allclose(tta, (eager_logits(model, images) + mirrored) / 2, atol=1e-5)


def test_predict_accepts_read_only_memory_mapped_images(tmp_path):
    settings = kit_settings(32)
    images = random_images(3, 32)
    np.save(tmp_path / "images.npy", images)
    mapped = np.load(tmp_path / "images.npy", mmap_mode="r")
    model = build(settings)
    np.testing.assert_array_equal(
        backend.cxrbench_predict(model=model, images=mapped, settings=settings),
        backend.cxrbench_predict(model=model, images=images, settings=settings),
    )


def test_predict_refuses_images_that_break_the_contract():
    settings = kit_settings(32)
    with pytest.raises(BackendError, match=r"images must be uint8 \(N, S, S\), got float32"):
        backend.cxrbench_predict(model=build(settings), images=np.zeros((2, 32, 32), np.float32), settings=settings)


def test_cam_matches_features_taken_from_the_real_forward():
    """The reference CAM uses the features torchvision's own forward computes (captured by a hook,
    ReLU applied in numpy) and the classifier weights from the canonical dict."""
    model = build(kit_settings(64), random_canonical(TINY, seed=5))
    images, classes = random_images(3, 64, seed=7), [2, 0, 13]
    captured = {}
    hook = model.net.features.register_forward_hook(lambda module, args, out: captured.update(features=out.clone()))
    forward_logits = eager_logits(model, images)
    hook.remove()
    result = backend.cxrbench_cam(model=model, images=images, classes=classes, settings=kit_settings(64))
    weights = backend.cxrbench_get_weights(model=model)
    features = np.maximum(captured["features"].numpy(), 0)
    expected = np.einsum("nkhw,ck->nchw", features, weights["classifier.weight"][classes])
    assert result.maps.shape == (3, 3, 2, 2) and result.maps.dtype == np.float32
    np.testing.assert_allclose(result.maps, expected, atol=1e-5)
    np.testing.assert_array_equal(result.bias, weights["classifier.bias"][classes])
    np.testing.assert_allclose(result.maps.mean((2, 3)) + result.bias, forward_logits[:, classes], atol=1e-5)
    np.testing.assert_allclose(result.logits, forward_logits[:, classes], atol=1e-5)


def test_cam_refuses_unknown_classes():
    with pytest.raises(BackendError, match=r"CAM classes must be indices 0\.\.13, got \[14\]"):
        backend.cxrbench_cam(
            model=build(kit_settings()), images=random_images(1, 32), classes=[14], settings=kit_settings()
        )


# -- ONNX -----------------------------------------------------------------------------------------


def test_onnx_export_matches_eager_torch(tmp_path, record_property):
    settings = kit_settings(64, **{"export.opset": 18})
    model = build(settings, random_canonical(TINY, seed=6))
    info = backend.cxrbench_export_onnx(model=model, path=str(tmp_path / "out" / "model.onnx"), settings=settings)
    assert (info.layout, info.opset, info.input_name, info.output_name) == ("NCHW", 18, "input", "logits")
    assert info.exporter == "torch.onnx (dynamo=False)" and info.seconds > 0
    onnx_file.check_model(info.path)
    classifier = onnx_file.cam_metadata(
        model.net.classifier.weight.detach().numpy(), model.net.classifier.bias.detach().numpy(), "NCHW"
    )
    assert onnx_file.read_metadata(info.path) == {**onnx_file.model_metadata("NCHW", 64, "pytorch"), **classifier}
    session = onnx_file.session(info.path, threads=1)
    atol, rtol = settings.export.atol, settings.export.rtol
    for batch in (1, 5):  # the batch axis is dynamic
        images = random_images(batch, 64, seed=batch)
        stats = onnx_file.diff_stats(
            backend.cxrbench_predict(model=model, images=images, settings=settings),
            onnx_file.run_onnx(info.path, images, "NCHW", sess=session),
            atol,
            rtol,
        )
        record_property(f"onnx_vs_predict_uint8_batch{batch}", stats)
        assert stats["passed"], stats
        noise = np.random.default_rng(batch).normal(size=(batch, 3, 64, 64)).astype(np.float32)
        with torch.no_grad():
            eager = model.net.eval()(torch.from_numpy(noise)).numpy()
        stats = onnx_file.diff_stats(eager, session.run(None, {"input": noise})[0], atol, rtol)
        record_property(f"onnx_vs_eager_random_batch{batch}", stats)
        assert stats["passed"], stats
