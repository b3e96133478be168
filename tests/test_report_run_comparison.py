"""`cxrbench report A B` judges a change by evidence: paired bootstrap, intervals, disturbance; a threshold last."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from cxrbench.report.load import load_run
from cxrbench.report.run_comparison import compare_runs
from helpers.fake_run import make_fake_run


def _edit_run_json(run: Path, edit) -> None:
    data = json.loads((run / "run.json").read_text())
    edit(data)
    (run / "run.json").write_text(json.dumps(data))


def _figure(comparison, backend: str, key: str):
    return next(f for f in comparison.figures if f.backend == backend and f.figure.key == key)


def test_small_auroc_drop_on_the_same_images_is_flagged_by_the_paired_bootstrap(tmp_path):
    """A drop well inside the old 5 % threshold is still flagged when the paired test says it is real."""
    reference, other = make_fake_run(tmp_path / "a", n_test=800), make_fake_run(tmp_path / "b", n_test=800)
    path = other / "keras" / "predictions.npz"
    with np.load(path) as npz:
        saved = {k: npz[k] for k in npz.files}
    saved["logits"] = saved["logits"] + np.random.default_rng(0).normal(0, 0.8, saved["logits"].shape)
    np.savez(path, **saved)
    figure = _figure(compare_runs(load_run(reference), load_run(other)), "keras", "mean_auroc")
    assert figure.basis == "paired bootstrap" and figure.paired["interval"][1] < 0
    assert figure.verdict(5.0) == "worse"
    unchanged = _figure(compare_runs(load_run(reference), load_run(reference)), "keras", "mean_auroc")
    assert unchanged.verdict(5.0) == "within" and unchanged.paired["difference"] == 0.0


def test_a_disturbed_run_is_marked_not_judged(tmp_path):
    reference, other = make_fake_run(tmp_path / "a"), make_fake_run(tmp_path / "b")

    def busy(data):
        throughput = data["backends"]["pytorch"]["throughput"]
        throughput["train_images_per_s"] *= 0.1
        throughput["disturbed"] = True

    _edit_run_json(other, busy)
    comparison = compare_runs(load_run(reference), load_run(other))
    figure = _figure(comparison, "pytorch", "train_images_per_s")
    assert figure.relative_pct < -80 and figure.verdict(5.0) == "disturbed" and figure in comparison.flagged
    assert _figure(comparison, "pytorch", "mean_auroc").verdict(5.0) == "within"  # accuracy is not a timing


def test_speed_intervals_decide_when_present(tmp_path):
    reference, other = make_fake_run(tmp_path / "a"), make_fake_run(tmp_path / "b")

    def intervals(scale: float, low: float, high: float):
        def edit(data):
            throughput = data["backends"]["keras"]["throughput"]
            throughput["train_images_per_s"] *= scale
            throughput["train_images_per_s_interval"] = [low, high]

        return edit

    _edit_run_json(reference, intervals(1.0, 10.0, 30.0))
    _edit_run_json(other, intervals(1.2, 25.0, 35.0))  # +20 %, overlapping spread: no evidence
    figure = _figure(compare_runs(load_run(reference), load_run(other)), "keras", "train_images_per_s")
    assert figure.basis == "intervals" and figure.verdict(5.0) == "within"
    _edit_run_json(other, intervals(1.0, 31.0, 40.0))  # apart: faster
    figure = _figure(compare_runs(load_run(reference), load_run(other)), "keras", "train_images_per_s")
    assert figure.verdict(5.0) == "better"


def test_figures_without_evidence_fall_back_to_the_threshold(tmp_path):
    reference, other = make_fake_run(tmp_path / "a"), make_fake_run(tmp_path / "b")
    _edit_run_json(other, lambda d: d["backends"]["keras"]["throughput"].__setitem__("epoch_time_s", 1e6))
    figure = _figure(compare_runs(load_run(reference), load_run(other)), "keras", "epoch_time_s")
    assert figure.basis == "threshold" and figure.verdict(5.0) == "worse"


def test_report_shows_patient_intervals_holm_verdict_and_method_notes(tmp_path):
    """The accuracy section names the resampling, shows valid rounds, raw and Holm p, the verdict built on Holm,
    "too few positives (n)" instead of an interval, and a plugin's independence note."""
    from cxrbench.report.render import write_report

    run = make_fake_run(tmp_path / "a")
    metrics_path = run / "pytorch" / "metrics.json"
    metrics = json.loads(metrics_path.read_text())
    metrics["auroc"]["ci"]["per_class"]["Hernia"] = None
    metrics["auroc"]["no_interval"] = {"Hernia": "too few positives (3)"}
    metrics["independence_notes"] = ["plugin 'x': cxrbench_evaluate does not accept groups"]
    metrics_path.write_text(json.dumps(metrics))

    def drop_merged(data):  # the report reads the worker's files when run.json holds no merged copy
        data["backends"]["pytorch"]["auroc"] = None
        data["backends"]["pytorch"]["metrics"] = {"independence_notes": metrics["independence_notes"]}

    _edit_run_json(run, drop_merged)
    html = write_report([run], out=tmp_path / "r.html").read_text()
    accuracy = html[html.index('id="accuracy"') : html.index("<h3>ROC curves")]
    assert "resampling patients" in accuracy and "patients)" in accuracy
    assert "too few positives (3)" in accuracy and "does not accept groups" in accuracy
    assert "Holm-adjusted p &lt; 0.05" in accuracy and "paired patient bootstrap" in accuracy
    pair = json.loads((run / "comparison.json").read_text())["agreement"]["pairs"][0]
    assert "pytorch vs keras: " in accuracy and str(pair["classes_tested"]) in accuracy
