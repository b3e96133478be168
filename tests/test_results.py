"""``cxrbench.results.load`` and ``cxrbench results`` against a run folder made by a tiny real run (numpy backend),
values checked against the run's own JSON files; and a run folder as ``predict``'s MODEL."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cxrbench.cli import main
from helpers.deploy import chest_like, png_bytes

pandas = pytest.importorskip("pandas")
pytestmark = pytest.mark.backends("numpy")

import cxrbench.results  # noqa: E402

TINY_RUN = [
    "--backend",
    "numpy",
    "--set",
    "model.arch=densenet-tiny",
    "--set",
    "train.max_steps=6",
    "--set",
    "train.warmup_steps=2",
    "--monitor-interval",
    "0.05",  # a tiny run's phases last about a second: sample often enough to see each
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "tiny"
    assert main(["run", *TINY_RUN, "--out", str(out)]) == 0
    return out


def _json(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def test_auroc_table_has_every_class_with_its_interval(run_dir):
    table = cxrbench.results.load(run_dir).auroc
    report = _json(run_dir / "numpy" / "metrics.json")["auroc"]
    per_class = table[table["class"] != cxrbench.results.MEAN_ROW].set_index("class")
    assert list(per_class.index) == list(report["per_class"])
    for cls, value in report["per_class"].items():
        assert per_class.loc[cls, "auroc"] == value
        interval = report["ci"]["per_class"][cls]
        if interval is None:
            assert np.isnan(per_class.loc[cls, "ci_low"]) and per_class.loc[cls, "no_interval"]
        else:
            assert [per_class.loc[cls, "ci_low"], per_class.loc[cls, "ci_high"]] == interval
    mean = table[table["class"] == cxrbench.results.MEAN_ROW].iloc[0]
    assert (mean["auroc"], [mean["ci_low"], mean["ci_high"]]) == (report["mean"], report["ci"]["mean"])
    assert set(table["run"]) == {str(run_dir)} and set(table["backend"]) == {"numpy"}


def test_history_throughput_and_localisation_tables_hold_the_files_values(run_dir):
    results = cxrbench.results.load(run_dir)
    history = _json(run_dir / "numpy" / "history.json")
    assert results.history["epoch"].tolist() == [r["epoch"] for r in history]
    assert results.history["val_loss"].tolist() == [r["val_loss"] for r in history]

    phases = _json(run_dir / "numpy" / "throughput.json")["phases"]
    throughput = results.throughput.set_index("phase")
    assert list(throughput.index) == list(phases)
    assert throughput.loc["predict", "images_per_s"] == phases["predict"]["images_per_s"]

    iobb = _json(run_dir / "numpy" / "localisation.json")["iobb"]
    local = results.localisation
    overall = local[(local["metric"] == "iobb") & (local["class"] == "(overall)")].set_index("threshold")
    assert {float(t): a for t, a in iobb["overall"]["accuracy"].items()} == overall["accuracy"].to_dict()
    assert set(local["class"]) - {"(overall)"} == set(iobb["per_class"])


def test_utilisation_table_summarises_the_monitor_samples(run_dir):
    table = cxrbench.results.load(run_dir).utilisation
    samples = [json.loads(line) for line in (run_dir / "numpy" / "monitor.jsonl").read_text().splitlines()]
    cpu = [s for s in samples if s["device"] == "cpu"]
    phase = max({s["phase"] for s in cpu}, key=lambda name: sum(s["phase"] == name for s in cpu))  # the best sampled
    values = [s["cpu_percent"] for s in cpu if s["phase"] == phase]
    row = table[(table["phase"] == phase) & (table["device"] == "cpu")].iloc[0]
    assert row["n"] == len(values) and row["mean"] == pytest.approx(np.mean(values), rel=1e-12)


@pytest.mark.parametrize("fmt", ["csv", "json", "markdown"])
def test_results_command_stacks_runs(run_dir, tmp_path, capsys, fmt):
    other = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(run_dir), str(other)], check=True)
    assert main(["results", str(run_dir), str(other), "--table", "auroc", "--format", fmt]) == 0
    out = capsys.readouterr().out
    expected = pandas.concat(
        [cxrbench.results.load(run_dir).auroc, cxrbench.results.load(other).auroc], ignore_index=True
    )
    if fmt == "csv":
        got = pandas.read_csv(io.StringIO(out))
        assert got["run"].tolist() == expected["run"].tolist()
        np.testing.assert_allclose(got["auroc"], expected["auroc"], rtol=1e-12)
    elif fmt == "json":
        got = json.loads(out)
        assert [r["run"] for r in got] == expected["run"].tolist()
        assert [r["auroc"] for r in got] == pytest.approx(expected["auroc"].tolist(), rel=1e-12)
    else:
        lines = out.splitlines()
        assert lines[0] == "| " + " | ".join(expected.columns) + " |" and len(lines) == 2 + len(expected)
        assert lines[2].startswith(f"| {run_dir} | numpy | {expected['class'][0]} | {expected['auroc'][0]:.4g} |")


def test_results_of_a_folder_that_is_no_run_is_one_line(tmp_path, capsys):
    assert main(["results", str(tmp_path)]) == 2
    assert (
        capsys.readouterr().err.strip() == f"cxrbench: error: {tmp_path / 'run.json'}: not found "
        f"(is {tmp_path} a cxrbench run folder?)"
    )


def test_missing_pandas_names_the_extra(run_dir, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "pandas", None)
    assert main(["results", str(run_dir)]) == 2
    needs = 'cxrbench.results needs pandas: pip install -e ".[results]"'
    assert capsys.readouterr().err.strip() == f"cxrbench: error: {needs}"


def test_predict_takes_a_run_folder_and_a_backend(run_dir, tmp_path, capsys):
    picture = tmp_path / "p.png"
    picture.write_bytes(png_bytes(chest_like(1)))
    assert main(["predict", str(run_dir), "--backend", "numpy", str(picture), "--format", "json"]) == 0
    from_folder = json.loads(capsys.readouterr().out)
    assert main(["predict", str(run_dir / "numpy" / "model.onnx"), str(picture), "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == from_folder
    assert main(["predict", str(run_dir), "--backend", "keras", str(picture)]) == 2
    assert f"--backend keras: not in the run folder {run_dir} (it has numpy)" in capsys.readouterr().err


def test_cam_identity_is_recorded_with_the_export(run_dir):
    identity = _json(run_dir / "numpy" / "onnx.json")["cam_identity"]
    assert identity["passed"] and identity["compared"] > 0, identity


def test_help_imports_no_optional_extra():
    code = (
        "import sys, cxrbench, cxrbench.cli; cxrbench.cli.build_parser().format_help(); "
        "print(sorted(m for m in ('fastapi', 'uvicorn', 'pandas', 'pydicom', 'onnxruntime') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
