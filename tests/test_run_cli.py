"""`cxrbench run` without training: refusals, GPU sweeps, the checks' arithmetic, the progress display."""

import io
import sys

import numpy as np
import pytest

from cxrbench.cli import main
from cxrbench.errors import CxrError
from cxrbench.files import write_json
from cxrbench.machine.env import gpu_inventory
from cxrbench.metrics.equivalence import agreement, equivalence_matrix, model_passes
from cxrbench.run import scaling
from cxrbench.run.folder import gpus_folder
from cxrbench.run.index_page import write_index
from cxrbench.run.orchestrator import exit_status
from cxrbench.run.progress import Progress, status_line, summary_table
from cxrbench.suite import load_suite


def _run_cli(capsys, *args):
    code = main(["run", *args])
    return code, capsys.readouterr().err


@pytest.mark.skipif(gpu_inventory()["count"] >= 4, reason="this machine has 4 GPUs")
def test_more_gpus_than_the_machine_has_is_refused_before_any_work(tmp_path, capsys):
    out = tmp_path / "run"
    code, err = _run_cli(capsys, "--gpus", "1,2,4", "--out", str(out), "--backend", "numpy")
    assert code == 2
    assert err.strip().count("\n") == 0  # one line
    assert f"--gpus 1,2,4: asked for 4 GPUs but this machine has {gpu_inventory()['count']}" in err
    assert not out.exists()


@pytest.mark.parametrize("text", ["0", "two", "2,2", "1,-1"])
def test_bad_gpu_counts_are_one_line_errors(text):
    with pytest.raises(CxrError, match=f"--gpus '{text}'"):
        scaling.parse_gpus(text)


def test_gpu_sweeps_are_sorted_and_absent_means_the_suite_value():
    assert scaling.parse_gpus("4,1,2") == [1, 2, 4]
    assert scaling.parse_gpus(None) is None


@pytest.mark.backends("pytorch")
def test_unknown_backend_names_the_installed_ones(tmp_path, capsys):
    code, err = _run_cli(capsys, "--backend", "nosuch", "--out", str(tmp_path / "r"))
    assert code == 2 and "unknown backend 'nosuch' (installed: " in err and "pytorch" in err


def test_resume_refuses_new_settings(tmp_path, capsys):
    code, err = _run_cli(capsys, "--resume", str(tmp_path), "--epochs", "3")
    assert code == 2 and "--resume reuses the run's own settings; drop train.epochs" in err


def test_equivalence_failures_name_both_models_and_the_difference():
    base = np.linspace(-1, 1, 28, dtype=np.float32).reshape(2, 14)
    outputs = {"pytorch": base, "pytorch/onnx": base + 2e-7, "keras": base + np.float32(0.31)}
    matrix = equivalence_matrix(outputs, atol=1e-4)

    assert matrix["passed"] is False
    assert matrix["failures"] == [
        "keras computes a different function from pytorch: max |logit diff| 0.31 > 0.0001",
        "keras computes a different function from pytorch/onnx: max |logit diff| 0.31 > 0.0001",
    ]
    assert matrix["max_abs"][0][1] == pytest.approx(2e-7, abs=1e-7)
    assert matrix["mean_abs"][2][0] == pytest.approx(0.31, rel=1e-5)
    assert model_passes(matrix, "keras") is False and model_passes(matrix, "absent") is None
    assert equivalence_matrix({"a": base, "b": base.copy()}, 1e-4)["passed"] is True


def test_agreement_of_identical_scores_is_perfect_and_of_noise_is_not():
    rng = np.random.default_rng(1)
    labels = (rng.random((60, 14)) < 0.4).astype(np.float32)
    logits = rng.normal(size=(60, 14)) + 2 * labels
    same = agreement("a", logits, "b", logits, labels)
    assert same["score_correlation"] == {"pearson": pytest.approx(1.0), "spearman": pytest.approx(1.0)}
    assert all(c["difference"] == 0.0 and c["p_value"] == 1.0 for c in same["per_class"].values() if c)
    noisy = agreement("a", logits, "b", rng.normal(size=(60, 14)), labels)
    assert noisy["score_correlation"]["pearson"] < 0.5
    assert min(c["p_value"] for c in noisy["per_class"].values() if c) < 0.05


def test_scaling_efficiency_is_relative_to_the_smallest_count(tmp_path):
    for gpus, rate in ((1, 100.0), (2, 180.0), (4, 300.0)):
        folder = gpus_folder(tmp_path, "pytorch", gpus, first=1)
        write_json(folder / "throughput.json", {"train_images_per_s": rate})
        write_json(
            folder / "monitor.json",
            {"phases": {"train": {f"gpu{i}": {"util": {"mean": 80.0 + i}} for i in range(gpus)}}},
        )

    table = scaling.scaling_table(tmp_path, ["pytorch"], [1, 2, 4])

    assert [(e["gpus"], e["images_per_s"], e["efficiency"]) for e in table["pytorch"]] == [
        (1, 100.0, 1.0),
        (2, 180.0, 0.9),
        (4, 300.0, 0.75),
    ]
    assert sorted(table["pytorch"][2]["gpu_util"]) == ["gpu0", "gpu1", "gpu2", "gpu3"]
    assert scaling.scaling_table(tmp_path, ["pytorch"], [1]) is None


def _status(stage, epoch=None, step=None, state="running"):
    return {
        "status": state,
        "stage": stage,
        "error": None,
        "progress": {"epoch": epoch, "epochs": 2, "step": step, "steps": 40},
    }


def test_plain_progress_prints_a_line_per_stage_or_epoch_change_not_per_step():
    stream = io.StringIO()
    progress = Progress(["pytorch", "keras"], stream=stream, tty=False)
    for status in (_status("equivalence"), _status("train", 1, 0), _status("train", 1, 5), _status("train", 2, 0)):
        progress.update("pytorch", status)
    lines = stream.getvalue().splitlines()
    assert lines == [
        "pytorch  running      equivalence",
        "pytorch  running      train          epoch 1/2  step 0/40",
        "pytorch  running      train          epoch 2/2  step 0/40",
    ]


def test_tty_progress_redraws_one_line_per_backend():
    stream = io.StringIO()
    progress = Progress(["pytorch", "keras"], stream=stream, tty=True)
    progress.update("pytorch", _status("train", 1, 3))
    progress.update("pytorch", _status("train", 1, 4))
    text = stream.getvalue()
    assert text.count("\x1b[2F") == 1  # the second draw moves up over the two lines of the first
    assert text.endswith(
        "\x1b[2F\x1b[2Kpytorch  running      train          epoch 1/2  step 4/40\n\x1b[2Kkeras    pending\n"
    )


def test_failed_backend_line_shows_its_error():
    line = status_line(
        "keras", {"status": "failed", "error": "worker killed by signal SIGKILL during stage train"}, width=5
    )
    assert line == "keras  failed       worker killed by signal SIGKILL during stage train"


def test_summary_table_and_exit_status():
    run = {
        "status": "completed",
        "backends": {
            "pytorch": {
                "status": "completed",
                "auroc": {"mean": 0.81234},
                "throughput": {"train_images_per_s": 30.04, "epoch_time_s": 18.6},
            },
            "keras": {"status": "failed", "auroc": None, "throughput": None},
        },
    }
    comparison = {
        "equivalence": equivalence_matrix({"pytorch": np.zeros((1, 14)), "keras": np.ones((1, 14))}, 1e-4),
        "parity": {"pytorch": {"passed": True}},
    }
    table = summary_table(run, comparison).splitlines()
    assert table[0].split() == [
        "backend",
        "status",
        "mean",
        "AUROC",
        "steady",
        "img/s",
        "[95",
        "%]",
        "first",
        "step",
        "s",
        "epoch",
        "s",
        "ONNX",
        "parity",
        "equivalence",
    ]
    assert table[1].split() == ["pytorch", "completed", "0.8123", "30.0", "-", "-", "18.6", "pass", "FAIL"]
    assert table[2].split() == ["keras", "failed", "-", "-", "-", "-", "-", "-", "FAIL"]
    assert exit_status(run, comparison) == 1
    run["backends"].pop("keras")
    assert exit_status(run, {"equivalence": {"passed": True}, "parity": {"pytorch": {"passed": True}}}) == 0
    assert exit_status({**run, "status": "interrupted"}, {}) == 130


def test_without_the_report_package_a_minimal_escaped_page_is_written(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "cxrbench.report.render", None)  # as if not installed
    run = {
        "suite": "smoke",
        "status": "completed",
        "backends": {
            "evil<b>": {"status": "failed", "error": "<script>alert(1)</script>", "auroc": None, "throughput": None}
        },
    }

    page = write_index(tmp_path, run, {}, baseline=None).read_text()

    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "evil&lt;b&gt;" in page and "<table>" in page


def test_a_gpu_sweep_gives_every_count_the_same_steps_per_epoch():
    settings = load_suite("scaling")  # batch 64, train.max_steps 40, a 4000-image phantom
    total = settings.data.phantom_images
    train = int(total * 0.7)

    sized = scaling.size_for_counts(settings, train, total, [1, 2, 4, 8])

    grown_train = sized.data.phantom_images * train / total
    assert grown_train >= 40 * 64 * 8  # 8 GPUs still run 40 full steps of 64 x 8 images
    assert scaling.size_for_counts(settings, train, total, [1]) is settings  # no sweep: nothing to size
    assert (
        scaling.size_for_counts(settings.replace(**{"train.max_steps": 0}), train, total, [1, 8]).data == settings.data
    )


def test_real_data_too_small_for_equal_steps_is_refused_naming_what_to_change():
    settings = load_suite("scaling").replace(**{"data.source": "chestxray14"})
    with pytest.raises(
        CxrError,
        match=r"--gpus 1,8: at 8 GPUs an epoch has 5 steps of 64x8 images, fewer than "
        r"train.max_steps = 40; equal steps per epoch need 20480 training images",
    ):
        scaling.size_for_counts(settings, 2800, 4000, [1, 8])
