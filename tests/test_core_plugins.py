"""Plugin discovery: built-ins, entry points and --plugin modules; failures named; one backend per worker."""

import importlib.metadata
import json

import numpy as np
import pytest

from cxrbench import plugins
from cxrbench.backend.api import BackendInfo
from cxrbench.cli import main
from cxrbench.errors import BackendError
from cxrbench.suite import Settings

MISSPELT, WRONG_ARGUMENT = "tests.plugins_wrong.misspelt_hook", "tests.plugins_wrong.wrong_argument"


def _names(pm):
    return {name for name, _ in pm.list_name_plugin()}


@pytest.mark.backends("pytorch", "keras")
def test_builtin_backends_come_from_entry_points():
    found = plugins.load_plugins()
    assert {"pytorch", "keras"} <= set(found.backends)
    assert found.backends["pytorch"].plugin == "cxrbench_pytorch"
    assert "cxrbench.builtin" in _names(found.manager)


@pytest.mark.backends("pytorch")
def test_extra_module_and_failures_are_reported_by_name():
    found = plugins.load_plugins(["tests.core_plugins.echo_backend", "tests.core_plugins.broken_at_import"])
    assert "echo" in found.backends
    [failure] = [f for f in found.failures if f.name == "tests.core_plugins.broken_at_import"]
    assert "ImportError: libfoo.so.1" in str(failure)
    assert "pytorch" in found.backends  # the others still load


@pytest.mark.backends("pytorch", "keras")
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
    results = found.hook.cxrbench_evaluate(
        labels=labels, scores=scores, classes=["a", "b"], groups=np.arange(3), settings=Settings()
    )
    assert {"positives_fraction": 4 / 6} in results
    [builtin] = [r for r in results if "auroc" in r]  # the core's own AUROC answers next to the plugin
    assert builtin["auroc"]["per_class"] == {"a": 1.0, "b": 1.0}


@pytest.mark.backends("pytorch")
def test_unknown_backend_lists_installed_and_broken():
    with pytest.raises(
        BackendError,
        match=r"unknown backend 'mxnet' \(installed: .*pytorch.*\); plugins that failed to load: "
        r"tests.core_plugins.broken_at_import",
    ):
        plugins.load_plugins(["tests.core_plugins.broken_at_import"], backend="mxnet")


@pytest.mark.backends("pytorch")
def test_misspelt_hook_is_a_load_failure_naming_plugin_and_hook():
    """check_pending: a hook implementation no hookspec knows refuses the whole plugin (it is never registered,
    so a backend cannot half-work), and the other plugins still load."""
    found = plugins.load_plugins([MISSPELT, "tests.core_plugins.echo_backend"])
    [failure] = found.failures
    assert str(failure) == (
        f"plugin {MISSPELT!r} failed to load: hook implementation 'cxrbench_predcit' matches no hookspec "
        "(did you mean 'cxrbench_predict'?)"
    )
    assert "misspelt" not in found.backends and found.manager.get_plugin(MISSPELT) is None
    assert {"echo", "pytorch"} <= set(found.backends)
    found.manager.check_pending()  # what was registered is all known hooks


def test_hook_argument_the_hookspec_lacks_is_a_one_line_load_failure():
    found = plugins.load_plugins([WRONG_ARGUMENT])
    [failure] = found.failures
    assert failure.name == WRONG_ARGUMENT and "\n" not in failure.error
    assert "cxrbench_predict" in failure.error and "'imgs'" in failure.error
    assert "wrong-argument" not in found.backends


def test_selecting_a_refused_backend_names_the_reason():
    with pytest.raises(
        BackendError, match=r"unknown backend 'misspelt' .*misspelt_hook \(hook implementation 'cxrbench_predcit'"
    ):
        plugins.load_plugins([MISSPELT], backend="misspelt")


def test_backend_info_is_keyword_only():
    """The documented fields in a positional call would land in ``plugin``; a TypeError says so at once."""
    with pytest.raises(TypeError):
        BackendInfo("mine", "numpy", "1.0", "NCHW")
    assert BackendInfo(name="mine", framework="numpy", version="1.0", onnx_layout="NHWC").plugin == ""


@pytest.mark.backends("pytorch")
def test_backends_json_lists_each_backends_extra(capsys):
    assert main(["backends", "--json", "--plugin", "tests.core_plugins.echo_backend"]) == 0
    listed = {row["name"]: row for row in json.loads(capsys.readouterr().out)["backends"]}
    assert listed["echo"]["extra"] == {} and listed["echo"]["plugin"] == "tests.core_plugins.echo_backend"
    assert set(listed["pytorch"]["extra"]) == {"torchvision"}


def _installed_only(monkeypatch, *names: str) -> None:
    """Pretend only the entry points ``names`` are installed (a backend "uninstalled" without pip)."""
    real = importlib.metadata.entry_points
    monkeypatch.setattr(
        importlib.metadata, "entry_points", lambda group: [ep for ep in real(group=group) if ep.name in names]
    )


@pytest.mark.backends("pytorch")
def test_missing_builtin_backend_names_the_distribution(monkeypatch, tmp_path, capsys):
    _installed_only(monkeypatch, "pytorch")
    code = main(["run", "--backend", "keras", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert (
        "backend 'keras' is not installed: pip install -e plugins/keras_backend (the distribution cxrbench-keras) "
        "from a cxrbench checkout (installed: pytorch)"
    ) in err
    assert not (tmp_path / "run").exists()


def test_builtin_backend_that_fails_to_load_is_not_called_uninstalled(monkeypatch):
    real = importlib.metadata.entry_points
    broken = importlib.metadata.EntryPoint("keras", "tests.core_plugins.broken_at_import", plugins.ENTRY_POINT_GROUP)
    monkeypatch.setattr(
        importlib.metadata,
        "entry_points",
        lambda group: [ep for ep in real(group=group) if ep.name != "keras"] + [broken],
    )
    with pytest.raises(
        BackendError,
        match=r"^unknown backend 'keras' \(installed: .*\); plugins that failed to "
        r"load: keras \(ImportError: libfoo.so.1",
    ):
        plugins.load_plugins(backend="keras")


def test_no_backend_installed_says_how_to_install_one(monkeypatch, tmp_path, capsys):
    _installed_only(monkeypatch)
    assert main(["backends"]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines() == ["backend  framework  version  plugin  devices"]
    for hint in (
        "pip install -e plugins/pytorch_backend",
        "pip install -e plugins/keras_backend",
        "'cxrbench' entry point",
    ):
        assert hint in err
    assert main(["run", "--out", str(tmp_path / "run")]) == 2
    assert f"cxrbench: error: {plugins.no_backend_message()}" in capsys.readouterr().err


def test_evaluate_stage_passes_patients_and_notes_a_plugin_without_groups(tmp_path):
    """The evaluate stage hands every metric plugin the test rows' patients; the built-in AUROC resamples them,
    and a plugin whose cxrbench_evaluate takes no ``groups`` is named in metrics.json."""
    from cxrbench.backend.recorder import Recorder
    from cxrbench.data.prepared import PreparedData
    from cxrbench.files import load_npz, read_json
    from cxrbench.run import stages

    rng = np.random.default_rng(0)
    labels = (rng.random((60, 14)) < 0.5).astype(np.uint8)
    images = (labels[:, :1, None] * 120 + rng.integers(0, 120, (60, 8, 8))).astype(np.uint8)
    data = PreparedData.in_memory(images, labels, np.array(["train"] * 20 + ["test"] * 40), key="groups")
    data.index.patients = np.repeat(np.arange(30), 2)  # two images per patient
    found = plugins.load_plugins(
        ["tests.core_plugins.logit_backend", "tests.core_plugins.metric_plugin"], backend="logit"
    )
    settings = Settings().replace(**{"eval.bootstrap_rounds": 30})
    ctx = stages.StageContext(
        folder=tmp_path, backend="logit", hook=found.hook, settings=settings, recorder=Recorder(), data=data
    )
    stages.evaluate(ctx)
    metrics = read_json(tmp_path / "metrics.json")
    assert metrics["auroc"]["resampling"] == "patients" and metrics["auroc"]["patients"] == 20
    [note] = metrics["independence_notes"]
    assert "tests.core_plugins.metric_plugin" in note and "treat images as independent" in note
    assert (load_npz(tmp_path / "predictions.npz")["patients"] == np.repeat(np.arange(10, 30), 2)).all()
