"""The conformance kit (``pytest --cxrbench-backend NAME``) and its example numpy backend.

The kit must pass the example backend, fail backends that break one contract each, and stay out
of the way of ordinary pytest runs. The numpy backend is checked against independent references:
torchvision's DenseNet for the forward pass and ``torch.optim.Adam`` for the probe's training step.
"""

import importlib.util
import textwrap

import numpy as np
import pytest

from cxrbench.plugins import load_plugins
from cxrbench.testing import conformance
from cxrbench.testing.conformance import kit_settings, random_canonical, random_images, synthetic_data

pytest_plugins = ["pytester"]

KIT_TESTS = {name for name in dir(conformance) if name.startswith("test_")}
REFERENCE_TESTS = {f"test_same_logits_as_the_reference_backend[{size}]" for size in conformance.SIZES}


@pytest.fixture(scope="module")
def numpy_backend():
    return load_plugins(backend="numpy")


def _names(reports) -> set[str]:
    return {report.nodeid.rpartition("::")[2] for report in reports}


@pytest.mark.backends("numpy")
def test_the_session_is_the_whole_kit_and_nothing_else_from_any_directory(pytester):
    """No paths given, run in an empty folder: the session collects every kit test and nothing else. (That the
    example backend passes the whole kit is CI's own kit run, ``pytest --cxrbench-backend numpy``.)"""
    recorder = pytester.inline_run("--cxrbench-backend", "numpy", "--collect-only", "-p", "no:cacheprovider")
    names = {call.item.name for call in recorder.getcalls("pytest_itemcollected")}
    assert {name.partition("[")[0] for name in names} == KIT_TESTS, "every kit test, and nothing else"
    assert REFERENCE_TESTS <= names


def test_plugin_is_inert_without_the_option(pytester):
    pytester.makepyfile(
        test_plain="""
        import sys

        def test_nothing_heavy_was_imported():
            heavy = {"torch", "tensorflow", "keras", "cxrbench.testing.conformance"} & set(sys.modules)
            assert not heavy
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)


@pytest.mark.backends("numpy")
def test_named_paths_are_respected(pytester):
    pytester.makepyfile(test_mine="def test_mine():\n    pass\n")
    pytester.inline_run("--cxrbench-backend", "numpy", "test_mine.py").assertoutcome(passed=1)


SPY = """
import os

from cxrbench.hookspecs import hookimpl


@hookimpl(wrapper=True)
def cxrbench_build_model(settings, weights):
    with open(os.environ["ARCH_SPY_FILE"], "a") as seen:
        seen.write(settings.model.arch + "\\n")
    return (yield)
"""


@pytest.mark.backends("numpy")
def test_arch_option_reaches_every_kit_model(pytester, monkeypatch):
    """``--cxrbench-arch`` reaches every model the kit builds, through the ``kit`` fixture (no module state is
    changed, so nothing needs undoing); a spy plugin records model.arch at each cxrbench_build_model call."""
    seen = pytester.path / "arch-seen.txt"
    monkeypatch.setenv("ARCH_SPY_FILE", str(seen))
    pytester.makepyfile(arch_spy=SPY)
    pytester.syspathinsert()
    options = ["--cxrbench-backend", "numpy", "--cxrbench-plugin", "arch_spy", "-p", "no:cacheprovider"]
    selection = "predict_returns or cam_identity or short_training or bad_weights_file"
    recorder = pytester.inline_run(*options, "--cxrbench-arch", "densenet-small", "-k", selection)
    passed, _, failed = recorder.listoutcomes()
    assert not failed and len(passed) == 8, _names(passed)
    assert set(seen.read_text().split()) == {"densenet-small"}
    assert conformance.kit_settings().model.arch == conformance.DEFAULT_ARCH == "densenet-tiny"


@pytest.mark.backends("numpy")
def test_reference_worker_builds_the_arch_it_is_given(tmp_path, numpy_backend):
    out = tmp_path / "logits.npz"
    conformance.reference_worker("numpy", [], str(out), "densenet-small")
    settings, weights, images = conformance.equivalence_inputs(32, "densenet-small")
    hook = numpy_backend.hook
    expected = hook.cxrbench_predict(
        model=hook.cxrbench_build_model(settings=settings, weights=weights), images=images, settings=settings
    )
    with np.load(out) as logits:
        assert sorted(logits.files) == sorted(str(size) for size in conformance.SIZES)
        np.testing.assert_array_equal(logits["32"], expected)


def test_unknown_backend_is_a_one_line_usage_error(pytester):
    result = pytester.runpytest("--cxrbench-backend", "no-such-backend")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        ["ERROR: --cxrbench-backend no-such-backend: unknown backend 'no-such-backend' (installed: *)"]
    )


# -- the kit fails broken backends ------------------------------------------------------------------

BROKEN_PREAMBLE = """
import dataclasses

import numpy as np

import cxrbench_numpy_example as good
from cxrbench.hookspecs import hookimpl
from cxrbench_numpy_example import (
    cxrbench_build_model, cxrbench_cam, cxrbench_export_onnx, cxrbench_get_weights,
    cxrbench_predict, cxrbench_set_weights, cxrbench_train,
)


@hookimpl
def cxrbench_backend_info():
    return dataclasses.replace(good.cxrbench_backend_info(), name="broken")
"""

#: name -> (the one hook that breaks a contract, -k selection, tests that must fail)
BROKEN = {
    "framework_imported_at_discovery": (
        """
        import torch  # at module import: every `cxrbench backends` would pay for it
        """,
        "imports_no_framework",
        {"test_backend_info_imports_no_framework"},
    ),
    "cam_off_by_a_constant": (
        """
        @hookimpl
        def cxrbench_cam(model, images, classes, settings):
            cam = good.cxrbench_cam(model, images, classes, settings)
            return dataclasses.replace(cam, maps=cam.maps + np.float32(0.01))
        """,
        "cam",
        {"test_cam_identity[32]", "test_cam_identity[64]"},
    ),
    "round_trip_loses_a_tensor": (
        """
        @hookimpl
        def cxrbench_get_weights(model):
            weights = good.cxrbench_get_weights(model)
            del weights["features.norm5.running_var"]
            return weights
        """,
        "weight",
        {
            "test_get_weights_has_the_canonical_layout",
            "test_weight_round_trip_is_bitwise",
            "test_build_with_weights_loads_them_exactly",
        },
    ),
    "set_weights_without_validation": (
        """
        @hookimpl
        def cxrbench_set_weights(model, weights):
            model.weights.update(weights)
            return True
        """,
        "bad_tensor",
        {
            "test_set_weights_names_the_bad_tensor[missing-features.conv0.weight]",
            "test_set_weights_names_the_bad_tensor[missing-features.norm5.running_var]",
            "test_set_weights_names_the_bad_tensor[misshapen-features.conv0.weight]",
            "test_set_weights_names_the_bad_tensor[misshapen-features.norm5.running_var]",
        },
    ),
    "seed_ignored": (
        """
        @hookimpl
        def cxrbench_build_model(settings, weights):
            return good.cxrbench_build_model(settings.replace(**{"run.seed": 0}), weights)
        """,
        "seed",
        {"test_different_seed_gives_different_weights"},
    ),
    "onnx_graph_differs": (
        """
        @hookimpl
        def cxrbench_export_onnx(model, path, settings):
            bias = model.weights["classifier.bias"] + 0.01
            shifted = dataclasses.replace(model, weights={**model.weights, "classifier.bias": bias})
            return good.cxrbench_export_onnx(shifted, path, settings)
        """,
        "onnx",
        {"test_onnx_runtime_matches_predict[32px-1]", "test_onnx_runtime_matches_predict[64px-3]"},
    ),
    "onnx_classifier_rows_swapped": (
        """
        from cxrbench.deploy.onnx_file import cam_metadata, stamp_metadata

        @hookimpl
        def cxrbench_export_onnx(model, path, settings):
            info = good.cxrbench_export_onnx(model, path, settings)
            weight, bias = model.weights["classifier.weight"], model.weights["classifier.bias"]
            stamp_metadata(path, cam_metadata(weight[::-1], bias, info.layout))  # CAM weights of the wrong classes
            return info
        """,
        "onnx_cam",
        {"test_onnx_cam_matches_the_native_cam[32px]", "test_onnx_cam_matches_the_native_cam[64px]"},
    ),
    "logits_differ_from_the_reference": (
        """
        @hookimpl
        def cxrbench_predict(model, images, settings):
            return good.cxrbench_predict(model, images, settings) * np.float32(1.001)
        """,
        "reference",
        {"test_same_logits_as_the_reference_backend[32]", "test_same_logits_as_the_reference_backend[64]"},
    ),
    "numerics_record_renamed": (
        """
        @hookimpl
        def cxrbench_train(model, data, settings, recorder):
            result = good.cxrbench_train(model, data, settings, recorder)
            numerics = result["numerics"]
            numerics["per_replica_batch"] = numerics.pop("batch_size_per_device")
            return result
        """,
        "short_training",
        {"test_short_training_run_reports_and_keeps_the_best_weights"},
    ),
    "divergence_swallowed": (
        """
        from cxrbench.errors import TrainingDiverged

        @hookimpl
        def cxrbench_train(model, data, settings, recorder):
            try:
                return good.cxrbench_train(model, data, settings, recorder)
            except TrainingDiverged:
                return {"best_epoch": 0, "best_val_loss": float("nan"), "numerics": {}}
        """,
        "diverged",
        {"test_non_finite_loss_raises_training_diverged"},
    ),
}


@pytest.fixture(scope="module")
def torch_imported_first():
    """One broken backend imports torch. pytester drops every module first imported while a test
    uses it, and torch cannot be imported twice in a process: so import it (if installed) before any snapshot."""
    if importlib.util.find_spec("torch") is not None:
        import torch  # noqa: F401


@pytest.mark.parametrize(
    "broken",
    [
        pytest.param(name, marks=pytest.mark.backends("numpy", "pytorch") if "import torch" in override else ())
        for name, (override, _, _) in BROKEN.items()
    ],
)
@pytest.mark.backends("numpy")
def test_kit_fails_a_broken_backend(torch_imported_first, pytester, broken):
    override, selection, must_fail = BROKEN[broken]
    pytester.makepyfile(**{f"broken_{broken}": BROKEN_PREAMBLE + textwrap.dedent(override)})
    pytester.syspathinsert()
    recorder = pytester.inline_run(
        "--cxrbench-backend",
        "broken",
        "--cxrbench-plugin",
        f"broken_{broken}",
        "--cxrbench-reference",
        "numpy",
        "-k",
        selection,
        "-p",
        "no:cacheprovider",
    )
    failed = _names(recorder.listoutcomes()[2])
    assert must_fail <= failed, f"the kit let {broken} through (failed: {sorted(failed)})"


# -- the numpy backend against independent references ---------------------------------------------


@pytest.mark.backends("numpy", "pytorch")
@pytest.mark.parametrize(("arch", "size"), [("densenet-tiny", 32), ("densenet-small", 64)])
def test_numpy_network_matches_torchvision(numpy_backend, arch, size):
    import torch
    import torchvision

    settings = kit_settings(size, **{"model.arch": arch})
    weights = random_canonical(settings.model.block_config, seed=21)
    reference = torchvision.models.DenseNet(block_config=settings.model.block_config, num_classes=14).eval()
    missing, unexpected = reference.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()}, strict=False)
    assert not unexpected and all(k.endswith("num_batches_tracked") for k in missing)

    images = random_images(3, size, seed=22)
    hook = numpy_backend.hook
    ours = hook.cxrbench_predict(
        model=hook.cxrbench_build_model(settings=settings, weights=weights), images=images, settings=settings
    )
    with torch.no_grad():
        from cxrbench.deploy.onnx_file import normalise

        theirs = reference(torch.from_numpy(normalise(images, "NCHW"))).numpy()
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4)


@pytest.mark.backends("numpy", "pytorch")
def test_probe_training_steps_match_torch_adam(numpy_backend):
    """Two probe steps equal torch's BCEWithLogits + Adam on the same pooled features and batches."""
    import torch

    from cxrbench.backend.recorder import Recorder
    from cxrbench_numpy_example.network import pooled_features

    settings = kit_settings(32, **{"train.max_steps": 2, "train.learning_rate": 0.01, "train.weight_decay": 1e-3})
    data = synthetic_data(32)
    weights = random_canonical(settings.model.block_config, seed=23)
    hook = numpy_backend.hook
    model = hook.cxrbench_build_model(settings=settings, weights=weights)
    hook.cxrbench_train(model=model, data=data, settings=settings, recorder=Recorder())
    trained = hook.cxrbench_get_weights(model=model)

    linear = torch.nn.Linear(*weights["classifier.weight"].shape[::-1])
    with torch.no_grad():
        linear.weight.copy_(torch.from_numpy(weights["classifier.weight"]))
        linear.bias.copy_(torch.from_numpy(weights["classifier.bias"]))
    train = settings.train
    adam = torch.optim.Adam(
        linear.parameters(),
        lr=train.learning_rate,
        betas=(train.adam_beta1, train.adam_beta2),
        eps=train.adam_epsilon,
        weight_decay=train.weight_decay,
    )
    for batch in data.batches(
        "train", train.batch_size, seed=settings.run.seed, hflip=train.hflip, max_steps=train.max_steps
    ):
        features = torch.from_numpy(pooled_features(weights, settings.model.block_config, batch.images))
        loss = torch.nn.functional.binary_cross_entropy_with_logits(linear(features), torch.from_numpy(batch.labels))
        adam.zero_grad()
        loss.backward()
        adam.step()
    np.testing.assert_allclose(trained["classifier.weight"], linear.weight.detach().numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(trained["classifier.bias"], linear.bias.detach().numpy(), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(trained["features.conv0.weight"], weights["features.conv0.weight"])


@pytest.mark.backends("numpy")
def test_imagenet_init_is_a_one_line_weights_error(numpy_backend):
    from cxrbench.errors import WeightsError

    with pytest.raises(WeightsError, match=r"^model.init = 'imagenet': the numpy backend has no ImageNet weights"):
        numpy_backend.hook.cxrbench_build_model(settings=kit_settings(**{"model.init": "imagenet"}), weights=None)
