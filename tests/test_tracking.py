"""Training curves for trackers (cxrbench/run/tracking.py, the cxrbench_record_scalars hook): the scalars read back
from a worker's files, the built-in TensorBoard writer read back with TensorBoard's own reader, the hint without the
package, a failing tracker, and the MLflow tracker of docs/tracking.md against MLflow's local file store."""

from __future__ import annotations

import json
import re
import sys
import types
from pathlib import Path

import pluggy
import pytest

from cxrbench import hookspecs
from cxrbench.plugins import load_plugins
from cxrbench.report import tensorboard
from cxrbench.run import tracking
from cxrbench.run.folder import HISTORY_JSON, METRICS_JSON, MONITOR_JSONL

DOCS = Path(__file__).resolve().parents[1] / "docs" / "tracking.md"


def event_reader(folder: Path):
    """TensorBoard's own reader (EventAccumulator), on its TensorFlow-free path (``tensorboard.compat.notf``, the
    package's switch for it), so this test never imports TensorFlow."""
    pytest.importorskip("tensorboard", reason='needs the tensorboard package: pip install -e ".[tensorboard]"')
    sys.modules.setdefault("tensorboard.compat.notf", types.ModuleType("tensorboard.compat.notf"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(folder))
    accumulator.Reload()
    return accumulator


def _epoch(epoch: int, **values) -> dict:
    base = {
        "epoch": epoch,
        "warmup": epoch == 1,
        "train_loss": 0.7 / epoch,
        "val_loss": 0.8 / epoch,
        "train_time_s": 10.0,
        "val_time_s": 2.0,
        "data_wait_s": 2.5,
        "images": 64,
        "images_per_s": 6.4,
        "lr": 1e-3 / epoch,
        "steps": 16,
        "steady_images_per_s": None,
    }
    return {**base, **values}


def write_backend_folder(folder: Path, gpu: bool) -> Path:
    folder.mkdir(parents=True)
    history = [_epoch(1), _epoch(2, steady_images_per_s=7.5, data_wait_s=None)]
    (folder / HISTORY_JSON).write_text(json.dumps(history))
    rows = []
    for epoch, t0 in ((1, 100.0), (2, 200.0)):
        for i, phase in enumerate(("train", "train", "validate")):
            t = t0 + i
            rows.append({"t": t, "phase": phase, "epoch": epoch, "device": "cpu", "cpu_percent": 100.0 * epoch + i,
                         "rss_mib": 500.0 + 10 * i})  # fmt: skip
            if gpu:
                rows.append({"t": t, "phase": phase, "epoch": epoch, "device": "gpu0", "util": 50.0 + 10 * i,
                             "mem_mib": 1000.0 * epoch + i})  # fmt: skip
    rows.append({"t": 300.0, "phase": "export", "epoch": 2, "device": "cpu", "cpu_percent": 1.0, "rss_mib": 9e9})
    (folder / MONITOR_JSONL).write_text("".join(json.dumps(r) + "\n" for r in rows))
    auroc = {"per_class": {"Atelectasis": 0.75, "Hernia": None}, "mean": 0.75}
    (folder / METRICS_JSON).write_text(json.dumps({"auroc": auroc}))
    return folder


def test_the_records_come_from_history_monitor_and_metrics(tmp_path):
    records = tracking.epoch_scalars(write_backend_folder(tmp_path / "gpu-backend", gpu=True))
    assert [r["step"] for r in records] == [1, 2]
    assert [r["wall_time"] for r in records] == [102.0, 202.0]  # the last epoch sample the monitor took
    first, last = (r["scalars"] for r in records)
    assert first == {
        "loss/train": 0.7,
        "loss/validation": 0.8,
        "learning_rate": 1e-3,
        "throughput/images_per_s": 6.4,
        "time/data_wait_share": 0.25,
        "gpu/utilisation_percent": 55.0,  # the two training samples (50, 60); validation is not training
        "gpu/memory_mib": 1002.0,  # peak over training and validation
        "host/cpu_percent": 100.5,
        "host/rss_mib": 520.0,
    }
    assert last["throughput/steady_images_per_s"] == 7.5 and "time/data_wait_share" not in last
    assert last["gpu/memory_mib"] == 2002.0 and last["host/rss_mib"] == 520.0  # the export's sample is no epoch's
    assert last["auroc/Atelectasis"] == 0.75 and last["auroc/mean"] == 0.75 and "auroc/Hernia" not in last
    assert not any(tag.startswith("auroc/") for tag in first)
    cpu_only = tracking.epoch_scalars(write_backend_folder(tmp_path / "cpu-backend", gpu=False))
    assert not any(tag.startswith("gpu/") for record in cpu_only for tag in record["scalars"])
    assert tracking.epoch_scalars(tmp_path / "never-trained") == []


def test_tensorboard_event_files_read_back_with_tensorboards_reader(tmp_path):
    records = tracking.epoch_scalars(write_backend_folder(tmp_path / "b", gpu=True))
    assert tensorboard.cxrbench_record_scalars(run_dir=tmp_path, backend="pytorch", records=records) is None
    reader = event_reader(tmp_path / "tensorboard" / "pytorch")
    tags = set(reader.Tags()["scalars"])
    assert tags == set(records[0]["scalars"]) | set(records[1]["scalars"])
    assert [(e.step, e.value) for e in reader.Scalars("loss/validation")] == [
        (1, pytest.approx(0.8)),
        (2, pytest.approx(0.4)),
    ]
    assert [(e.step, e.wall_time) for e in reader.Scalars("loss/train")] == [(1, 102.0), (2, 202.0)]
    assert [e.step for e in reader.Scalars("auroc/mean")] == [2]

    again = [{"step": 1, "wall_time": None, "scalars": {"loss/train": 0.1}}]  # a resumed run records again
    tensorboard.cxrbench_record_scalars(run_dir=tmp_path, backend="pytorch", records=again)
    assert len(list((tmp_path / "tensorboard" / "pytorch").iterdir())) == 1
    assert set(event_reader(tmp_path / "tensorboard" / "pytorch").Tags()["scalars"]) == {"loss/train"}
    assert [p.name for p in (tmp_path / "tensorboard").iterdir()] == ["pytorch"]  # no temporary folders left


def test_the_run_says_once_how_to_get_the_curves_without_tensorboard(tmp_path, monkeypatch, capsys):
    from cxrbench.run.orchestrator import Orchestrator
    from cxrbench.suite import Settings

    for name in [m for m in sys.modules if m == "tensorboard" or m.startswith("tensorboard.")] + ["tensorboard"]:
        monkeypatch.setitem(sys.modules, name, None)  # `import tensorboard...` raises ImportError
    run = {"settings": Settings().to_dict(), "backends": {"a": {}, "b": {}}}
    orchestrator = Orchestrator(tmp_path, run, load_plugins(), 1.0)
    for name in ("a", "b"):
        write_backend_folder(tmp_path / name, gpu=False)
        orchestrator.record_curves(name)
    hints = [line for line in capsys.readouterr().err.splitlines() if "tensorboard" in line]
    assert hints == [f"note: {tensorboard.INSTALL_HINT}"] and 'pip install -e ".[tensorboard]"' in hints[0]
    assert not (tmp_path / "tensorboard").exists()


class Broken:
    @hookspecs.hookimpl
    def cxrbench_record_scalars(self, backend):
        raise RuntimeError("tracker server unreachable")


def test_a_failing_tracker_is_a_warning_and_the_others_still_record(tmp_path):
    plugins = load_plugins()
    plugins.manager.register(Broken(), name="broken-tracker")
    folder = write_backend_folder(tmp_path / "keras", gpu=False)
    lines = tracking.record(plugins.hook, tmp_path, "keras", folder)
    assert lines == [
        "warning: plugin 'broken-tracker' failed to record keras's curves: RuntimeError: tracker server unreachable"
    ]
    if tensorboard_installed():
        assert event_reader(tmp_path / "tensorboard" / "keras").Tags()["scalars"]


def tensorboard_installed() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


def docs_example(heading: str) -> str:
    """The first ```python block after ``heading`` in docs/tracking.md."""
    text = DOCS.read_text(encoding="utf-8")
    section = text[text.index(heading) :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_mlflow_tracker_of_the_docs_logs_every_epoch_to_a_local_file_store(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow", reason="needs MLflow: pip install mlflow-skinny")
    store = tmp_path / "mlruns"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the file store behind this switch
    module = types.ModuleType("cxrbench_mlflow_example")
    exec(compile(docs_example("## An MLflow tracker"), str(DOCS), "exec"), module.__dict__)
    manager = pluggy.PluginManager(hookspecs.PROJECT)
    manager.add_hookspecs(hookspecs)
    manager.register(module)
    for backend in ("pytorch", "keras"):
        folder = write_backend_folder(tmp_path / "run" / backend, gpu=True)
        assert tracking.record(manager.hook, tmp_path / "run", backend, folder) == []

    client = mlflow.tracking.MlflowClient(tracking_uri=store.as_uri())
    (experiment,) = [e for e in client.search_experiments() if e.name == "cxrbench"]
    runs = {r.data.tags["cxrbench.backend"]: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {"pytorch", "keras"}
    for run in runs.values():
        assert run.data.tags["cxrbench.run"] == str(tmp_path / "run")
        history = client.get_metric_history(run.info.run_id, "loss/validation")
        assert sorted((m.step, m.value) for m in history) == [(1, pytest.approx(0.8)), (2, pytest.approx(0.4))]
        assert [m.step for m in client.get_metric_history(run.info.run_id, "auroc/mean")] == [2]
