"""``--repeats``: folders and seeds, the across-repeat arithmetic on hand-made files, the report section,
and (slow) a real two-repeat run of a tiny PyTorch model."""

import json
import math
import re
import shutil
import statistics
from pathlib import Path

import numpy as np
import pytest

from cxrbench import weights as canonical
from cxrbench.classes import CLASSES
from cxrbench.cli import main
from cxrbench.errors import CxrError
from cxrbench.files import write_json
from cxrbench.report.load import load_run
from cxrbench.report.render import write_report
from cxrbench.run import repeats
from cxrbench.run.orchestrator import exit_status
from cxrbench.run.schema import validate
from cxrbench.run.worker import _settings
from cxrbench.run_folder import repeat_folder, shared_init_path
from cxrbench.suite import ARCHITECTURES, Settings
from helpers.fake_run import HOSTILE_BACKEND, make_fake_run

CLASS_A, CLASS_B = CLASSES[0], CLASSES[1]
#: Hand-made per-repeat figures: (mean AUROC, AUROC of class A, of class B, steady img/s, first step s, disturbed).
FIGURES = {
    "pytorch": [
        (0.80, 0.70, 0.90, 30.0, 2.0, False),
        (0.82, 0.72, 0.92, 28.0, 2.5, False),
        (0.84, 0.74, 0.94, 32.0, 1.5, True),
    ],
    "keras": [
        (0.70, 0.60, 0.80, 20.0, 9.0, False),
        (0.71, 0.74, 0.68, 22.0, 8.0, False),
        (0.72, 0.70, 0.74, 21.0, 10.0, False),
    ],
}


def _write_repeat(folder: Path, figures: tuple, status: str = "completed") -> None:
    mean, a, b, speed, first, disturbed = figures
    write_json(folder / "status.json", {"status": status, "error": None if status == "completed" else "boom"})
    write_json(folder / "metrics.json", {"auroc": {"mean": mean, "per_class": {CLASS_A: a, CLASS_B: b}}})
    write_json(
        folder / "throughput.json",
        {
            "train_images_per_s": speed,
            "first_step_s": first,
            "disturbed": disturbed,
            "train_images_per_s_interval": [speed - 1, speed + 1],
        },
    )


def _hand_made(run_dir: Path, figures=FIGURES) -> Path:
    for name, rows in figures.items():
        for i, row in enumerate(rows, start=1):
            _write_repeat(repeat_folder(run_dir, name, i), row)
    return run_dir


# -- seeds and folders ---------------------------------------------------------------------------


def test_repeat_i_uses_seed_plus_i_minus_one_and_its_own_folder(tmp_path):
    assert [repeats.seed_of(7, i) for i in (1, 2, 3)] == [7, 8, 9]
    assert repeat_folder(tmp_path, "keras", 1) == tmp_path / "keras"
    assert repeat_folder(tmp_path, "keras", 3) == tmp_path / "keras" / "repeats" / "r3"
    assert shared_init_path(tmp_path, 7, 7) == tmp_path / "shared_init.npz"
    assert shared_init_path(tmp_path, 8, 7) == tmp_path / "shared_init-seed8.npz"


@pytest.mark.parametrize("count", [0, -2])
def test_repeats_below_one_are_a_one_line_error_naming_the_option(count, tmp_path, capsys):
    with pytest.raises(CxrError, match=f"--repeats {count}: must be a whole number >= 1"):
        repeats.check_count(count)
    assert main(["run", "--repeats", str(count), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "--repeats" in err
    assert not (tmp_path / "r").exists()


def test_worker_seed_changes_model_and_order_seed_but_not_the_data_settings():
    run = Settings().replace(**{"run.seed": 3})
    worker = _settings(run, None, seed=5, sets=["numerics.channels_last=true"])
    assert worker.run.seed == 5 and worker.numerics.channels_last is True
    assert worker.data == run.data and run.run.seed == 3  # the data set is opened with the run's own settings
    assert _settings(run, 2) == run.replace(**{"run.gpus": 2})


# -- arithmetic ------------------------------------------------------------------------------------


def test_spread_is_mean_sample_sd_min_max():
    expected = {"n": 3, "mean": 0.82, "sd": 0.02, "min": 0.80, "max": 0.84}
    assert repeats.spread([0.80, None, 0.84, 0.82]) == pytest.approx(expected)
    assert repeats.spread([0.5]) == {"n": 1, "mean": 0.5, "sd": None, "min": 0.5, "max": 0.5}
    assert repeats.spread([None]) == {"n": 0, "mean": None, "sd": None, "min": None, "max": None}
    assert repeats.speed_spread([30.0, 28.0, 32.0, None]) == {"n": 3, "median": 30.0, "interval": [28.0, 32.0]}


def test_welch_p_value_matches_the_textbook_formula():
    a, b = [0.70, 0.72, 0.74], [0.60, 0.74, 0.70]
    va, vb = statistics.variance(a) / 3, statistics.variance(b) / 3
    t = (statistics.fmean(a) - statistics.fmean(b)) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / 2 + vb**2 / 2)
    from scipy.stats import t as student

    assert repeats.welch(a, b) == pytest.approx(2 * student.sf(abs(t), df), rel=1e-12)
    assert repeats.welch([0.5] * 3, [0.5] * 3) == 1.0  # deterministic and identical
    assert repeats.welch([0.5] * 3, [0.6] * 3) == 0.0  # deterministic and different


def test_summary_of_hand_made_repeat_files(tmp_path):
    section = repeats.collect(_hand_made(tmp_path), ["pytorch", "keras"], 3, 10, [CLASS_A, CLASS_B])
    torch_ = section["backends"]["pytorch"]
    assert [r["seed"] for r in torch_["repeats"]] == [10, 11, 12]
    assert torch_["repeats"][2] == {
        "repeat": 3,
        "seed": 12,
        "status": "completed",
        "error": None,
        "mean_auroc": 0.84,
        "per_class": {CLASS_A: 0.74, CLASS_B: 0.94},
        "train_images_per_s": 32.0,
        "train_images_per_s_interval": [31.0, 33.0],
        "first_step_s": 1.5,
        "disturbed": True,
    }
    summary = torch_["summary"]
    assert summary["mean_auroc"] == pytest.approx({"n": 3, "mean": 0.82, "sd": 0.02, "min": 0.80, "max": 0.84})
    assert summary["per_class"][CLASS_B] == pytest.approx({"n": 3, "mean": 0.92, "sd": 0.02, "min": 0.90, "max": 0.94})
    assert summary["train_images_per_s"] == {"n": 3, "median": 30.0, "interval": [28.0, 32.0]}
    assert summary["first_step_s"] == {"n": 3, "median": 2.0, "interval": [1.5, 2.5]}
    assert summary["disturbed_repeats"] == [3]

    (pair,) = section["comparisons"]
    assert (pair["a"], pair["b"]) == ("pytorch", "keras")
    # Mean AUROC: keras - pytorch = 0.71 - 0.82 = -0.11; SDs 0.02 and 0.01 -> pooled sqrt((4e-4 + 1e-4) / 2).
    mean = pair["mean_auroc"]
    assert mean["difference"] == pytest.approx(-0.11) and mean["sd"] == pytest.approx(math.sqrt(2.5e-4))
    assert mean["verdict"] == "exceeds" and mean["p_value"] < 0.05
    assert mean["text"].startswith("the difference (-0.1100) exceeds seed-to-seed variation (SD 0.0158; Welch p = ")
    # Class A: pytorch 0.70/0.72/0.74, keras 0.60/0.74/0.70: difference -0.04 within a spread of SD ~0.05.
    a = pair["per_class"][CLASS_A]
    assert a["difference"] == pytest.approx(-0.04) and a["verdict"] == "within"
    assert a["p_value"] == pytest.approx(repeats.welch([0.70, 0.72, 0.74], [0.60, 0.74, 0.70]))
    assert "is within seed-to-seed variation" in a["text"]


def test_terminal_summary_gives_the_across_seed_figures_and_the_verdict(tmp_path):
    from cxrbench.report.figures import repeat_sentences

    section = repeats.collect(_hand_made(tmp_path), ["pytorch", "keras"], 3, 10, [CLASS_A, CLASS_B])
    lines = repeat_sentences(section)
    assert (
        lines[0] == "pytorch over 3 seed(s): mean AUROC 0.8200 (SD 0.0200), steady img/s median 30.0 [28.0, 32.0] "
        "across seeds"
    )
    assert lines[1].startswith("keras over 3 seed(s): mean AUROC 0.7100 (SD 0.0100)")
    assert lines[2].startswith("mean AUROC keras - pytorch: the difference (-0.1100) exceeds seed-to-seed variation")
    assert repeat_sentences(None) == []


def test_too_few_repeats_give_no_verdict(tmp_path):
    two = {name: rows[:2] for name, rows in FIGURES.items()}
    section = repeats.collect(_hand_made(tmp_path, two), ["pytorch", "keras"], 2, 0, [CLASS_A])
    mean = section["comparisons"][0]["mean_auroc"]
    assert mean["difference"] == pytest.approx(0.705 - 0.81) and mean["verdict"] is None and mean["p_value"] is None
    assert mean["text"] == "the difference (-0.1050) has too few repeats for a verdict (2 per backend, need 3)"


def test_failed_repeats_and_missing_files_are_tolerated(tmp_path):
    _hand_made(tmp_path)
    _write_repeat(repeat_folder(tmp_path, "keras", 3), FIGURES["keras"][2], status="failed")
    (repeat_folder(tmp_path, "pytorch", 2) / "throughput.json").unlink()
    section = repeats.collect(tmp_path, ["pytorch", "keras"], 4, 0, [CLASS_A])  # repeat 4 never ran
    keras = section["backends"]["keras"]
    assert [r["status"] for r in keras["repeats"]] == ["completed", "completed", "failed", "pending"]
    assert keras["summary"]["completed"] == 2 and keras["summary"]["mean_auroc"]["mean"] == pytest.approx(0.705)
    speed = section["backends"]["pytorch"]["summary"]["train_images_per_s"]
    assert speed == {"n": 2, "median": 31.0, "interval": [30.0, 32.0]}
    assert section["comparisons"][0]["mean_auroc"]["verdict"] is None  # keras has 2 completed repeats
    assert exit_status({"status": "completed", "backends": {}, "repeats": section}, {}) == 1
    assert repeats.collect(tmp_path, ["pytorch"], 1, 0, [CLASS_A]) is None


# -- report ----------------------------------------------------------------------------------------


def _with_repeats(run_dir: Path, names: list[str]) -> Path:
    figures = dict(zip(names, FIGURES.values()))
    for name, rows in figures.items():
        for i, row in enumerate(rows[1:], start=2):
            _write_repeat(repeat_folder(run_dir, name, i), row)
    run = json.loads((run_dir / "run.json").read_text())
    per_backend = {
        name: [repeats.repeat_figures(repeat_folder(run_dir, name, i), i, i - 1) for i in (1, 2, 3)] for name in names
    }
    run["repeats"] = repeats.summarise(per_backend, run["data"]["classes"])
    write_json(run_dir / "run.json", run)
    return run_dir


def test_report_has_a_repeats_table_with_mean_sd_difference_and_verdict(tmp_path):
    run_dir = _with_repeats(make_fake_run(tmp_path / "run"), ["pytorch", "keras"])
    html = write_report([run_dir]).read_text()
    table = html[html.index('id="repeats-table"') : html.index("</table>", html.index('id="repeats-table"'))]
    text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", table))
    section = load_run(run_dir).meta["repeats"]
    mean = section["backends"]["keras"]["summary"]["mean_auroc"]
    assert f"{mean['mean']:.4f} ± {mean['sd']:.4f}" in text
    assert section["comparisons"][0]["mean_auroc"]["text"] in text
    assert len(re.findall(r"<tr", table)) == 1 + 1 + len(CLASSES)  # header, mean, one row per class
    assert 'href="#repeats"' in html and 'id="repeats-speed"' in html
    summary = html[html.index('id="summary"') : html.index('id="accuracy"')]
    assert f"keras over 3 seed(s): mean AUROC {mean['mean']:.4f}" in summary  # the headline says it too


def test_repeats_section_escapes_hostile_names(tmp_path):
    run_dir = make_fake_run(tmp_path / "run", hostile=True)
    names = list(json.loads((run_dir / "run.json").read_text())["backends"])
    html = write_report([_with_repeats(run_dir, names)]).read_text()
    section = html[html.index('id="repeats"') : html.index('id="localisation"')]
    assert HOSTILE_BACKEND not in section and "&lt;img src=x" in section


# -- end to end ------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.backends("pytorch")
def test_two_repeats_of_a_tiny_model_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(
        [
            "run",
            "--backend",
            "pytorch",
            "--set",
            "model.arch=densenet-tiny",
            "--set",
            "train.max_steps=2",
            "--set",
            "train.warmup_steps=1",
            "--set",
            "export.onnx=false",
            "--repeats",
            "2",
            "--out",
            str(out),
        ]
    )
    assert code == 0, capsys.readouterr().err
    block = ARCHITECTURES["densenet-tiny"]
    second = canonical.load(out / "shared_init-seed1.npz")
    for key, value in canonical.init_canonical(block, 1).items():
        np.testing.assert_array_equal(second[key], value)
    r2 = out / "pytorch" / "repeats" / "r2"
    stages = json.loads((r2 / "status.json").read_text())["stages"]
    assert stages == {
        "prepare-check": "done",
        "equivalence": "skipped",
        "train": "done",
        "evaluate": "done",
        "cam": "skipped",
        "export": "skipped",
    }
    section = json.loads((out / "run.json").read_text())["repeats"]
    seeds = [r["seed"] for r in section["backends"]["pytorch"]["repeats"]]
    aurocs = [r["mean_auroc"] for r in section["backends"]["pytorch"]["repeats"]]
    assert seeds == [0, 1] and None not in aurocs and aurocs[0] != aurocs[1]
    assert all(r["first_step_s"] > 0 for r in section["backends"]["pytorch"]["repeats"])  # the timing contract
    assert section["backends"]["pytorch"]["summary"]["mean_auroc"]["mean"] == pytest.approx(sum(aurocs) / 2)
    assert 'id="repeats-table"' in (out / "index.html").read_text()
    validate(json.loads((out / "run.json").read_text()))

    # --resume completes a missing repeat and leaves the finished ones alone.
    shutil.rmtree(r2)
    assert main(["run", "--resume", str(out)]) == 0, capsys.readouterr().err
    assert json.loads((r2 / "status.json").read_text())["status"] == "completed"
    assert (out / "pytorch" / "log.txt").read_text().count("=== cxrbench worker pytorch started") == 1
    resumed = json.loads((out / "run.json").read_text())["repeats"]["backends"]["pytorch"]["repeats"]
    assert resumed[0]["mean_auroc"] == aurocs[0] and resumed[1]["status"] == "completed"
