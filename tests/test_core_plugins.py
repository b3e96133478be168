"""Plugin discovery: built-ins, entry points and --plugin modules; failures named; one backend per worker."""

import importlib.metadata

import numpy as np
import pytest

from cxrbench import plugins
from cxrbench.errors import BackendError
from cxrbench.suite import Settings


def _names(pm):
    return {name for name, _ in pm.list_name_plugin()}


def test_builtin_backends_come_from_entry_points():
    found = plugins.load_plugins()
    assert {"pytorch", "keras"} <= set(found.backends)
    assert found.backends["pytorch"].plugin == "cxrbench_pytorch"
    assert "cxrbench.builtin" in _names(found.manager)


def test_extra_module_and_failures_are_reported_by_name():
    found = plugins.load_plugins(["tests.core_plugins.echo_backend", "tests.core_plugins.broken_at_import"])
    assert "echo" in found.backends
    [failure] = [f for f in found.failures if f.name == "tests.core_plugins.broken_at_import"]
    assert "ImportError: libfoo.so.1" in str(failure)
    assert "pytorch" in found.backends  # the others still load


def test_broken_entry_point_does_not_stop_the_others(monkeypatch):
    real = importlib.metadata.entry_points

    def with_broken(group):
        broken = importlib.metadata.EntryPoint("shiny", "tests.core_plugins.broken_at_import", group)
        return list(real(group=group)) + [broken]

    monkeypatch.setattr(importlib.metadata, "entry_points", with_broken)
    found = plugins.load_plugins()
    assert [f.name for f in found.failures] == ["shiny"]
    assert {"pytorch", "keras"} <= set(found.backends)


def test_worker_manager_holds_exactly_one_backend():
    found = plugins.load_plugins(
        ["tests.core_plugins.echo_backend", "tests.core_plugins.metric_plugin"], backend="echo"
    )
    registered = _names(found.manager)
    assert "tests.core_plugins.echo_backend" in registered
    assert "pytorch" not in registered and "keras" not in registered
    assert "tests.core_plugins.metric_plugin" in registered  # non-backend plugins stay
    assert found.hook.cxrbench_predict(model=None, images=None, settings=None) == "echo"
    labels, scores = np.array([[1, 0], [0, 1], [1, 1]]), np.array([[0.9, 0.2], [0.1, 0.8], [0.7, 0.6]])
    results = found.hook.cxrbench_evaluate(labels=labels, scores=scores, classes=["a", "b"], groups=np.arange(3),
                                           settings=Settings())
    assert {"positives_fraction": 4 / 6} in results
    [builtin] = [r for r in results if "auroc" in r]  # the core's own AUROC answers next to the plugin
    assert builtin["auroc"]["per_class"] == {"a": 1.0, "b": 1.0}


def test_unknown_backend_lists_installed_and_broken():
    with pytest.raises(BackendError, match=r"unknown backend 'mxnet' \(installed: .*pytorch.*\); plugins that failed to load: tests.core_plugins.broken_at_import"):
        plugins.load_plugins(["tests.core_plugins.broken_at_import"], backend="mxnet")


def test_evaluate_stage_passes_patients_and_notes_a_plugin_without_groups(tmp_path):
    """The evaluate stage hands every metric plugin the test rows' patients; the built-in AUROC resamples them,
    and a plugin whose cxrbench_evaluate takes no ``groups`` is named in metrics.json."""
    from cxrbench.data.prepared import PreparedData
    from cxrbench.recorder import Recorder
    from cxrbench.run import stages
    from cxrbench.files import load_npz, read_json

    rng = np.random.default_rng(0)
    labels = (rng.random((60, 14)) < 0.5).astype(np.uint8)
    images = (labels[:, :1, None] * 120 + rng.integers(0, 120, (60, 8, 8))).astype(np.uint8)
    data = PreparedData.in_memory(images, labels, np.array(["train"] * 20 + ["test"] * 40), key="groups")
    data.index.patients = np.repeat(np.arange(30), 2)  # two images per patient
    found = plugins.load_plugins(["tests.core_plugins.logit_backend", "tests.core_plugins.metric_plugin"],
                                 backend="logit")
    settings = Settings().replace(**{"eval.bootstrap_rounds": 30})
    ctx = stages.StageContext(folder=tmp_path, backend="logit", hook=found.hook, settings=settings,
                              recorder=Recorder(), data=data)
    stages.evaluate(ctx)
    metrics = read_json(tmp_path / "metrics.json")
    assert metrics["auroc"]["resampling"] == "patients" and metrics["auroc"]["patients"] == 20
    [note] = metrics["independence_notes"]
    assert "tests.core_plugins.metric_plugin" in note and "treat images as independent" in note
    assert (load_npz(tmp_path / "predictions.npz")["patients"] == np.repeat(np.arange(10, 30), 2)).all()
