"""``--repeats``: folders and seeds, the across-repeat arithmetic and the pairing by seed on hand-made files, the
report section, and (slow) a real three-repeat run of two backends (a tiny PyTorch model and the numpy example)."""

import json
import math
import re
import shutil
import statistics
from pathlib import Path

import numpy as np
import pytest

from cxrbench.backend import canonical
from cxrbench.cli import main
from cxrbench.data.classes import CLASSES
from cxrbench.errors import CxrError
from cxrbench.files import write_json
from cxrbench.report.load import load_run
from cxrbench.report.render import write_report
from cxrbench.run import repeats
from cxrbench.run.folder import repeat_folder, shared_init_path
from cxrbench.run.orchestrator import exit_status
from cxrbench.run.schema import validate
from cxrbench.run.worker import _settings
from cxrbench.suite import ARCHITECTURES, EvalSettings, Settings
from helpers.fake_run import HOSTILE_BACKEND, make_fake_run
from helpers.tiny_run import TINY_RUN

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
    # Mean AUROC: pytorch - keras = 0.82 - 0.71 = +0.11; SDs 0.02 and 0.01 -> pooled sqrt((4e-4 + 1e-4) / 2).
    mean = pair["mean_auroc"]
    assert mean["difference"] == pytest.approx(0.11) and mean["sd"] == pytest.approx(math.sqrt(2.5e-4))
    assert mean["verdict"] == "exceeds" and mean["p_value"] < 0.05
    assert mean["text"].startswith("the difference (+0.1100) exceeds seed-to-seed variation (SD 0.0158; Welch p = ")
    # Class A: pytorch 0.70/0.72/0.74, keras 0.60/0.74/0.70: difference +0.04 within a spread of SD ~0.05.
    a = pair["per_class"][CLASS_A]
    assert a["difference"] == pytest.approx(0.04) and a["verdict"] == "within"
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
    assert lines[2].startswith(
        "mean AUROC pytorch - keras, unpaired Welch (secondary): the difference (+0.1100) exceeds seed-to-seed "
        "variation"
    )
    assert repeat_sentences(None) == []


def test_too_few_repeats_give_no_verdict(tmp_path):
    two = {name: rows[:2] for name, rows in FIGURES.items()}
    section = repeats.collect(_hand_made(tmp_path, two), ["pytorch", "keras"], 2, 0, [CLASS_A])
    mean = section["comparisons"][0]["mean_auroc"]
    assert mean["difference"] == pytest.approx(0.81 - 0.705) and mean["verdict"] is None and mean["p_value"] is None
    assert mean["text"] == "the difference (+0.1050) has too few repeats for a verdict (2 per backend, need 3)"


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


# -- paired by seed --------------------------------------------------------------------------------

#: Hand-made test set of the paired tests: 40 patients with 2 images, two classes.
TEST_LABELS = np.tile(np.array([[1, 0], [0, 1], [1, 1], [0, 0]]), (20, 1))
TEST_PATIENTS = np.arange(80) // 2


def _write_predictions(folder: Path, quality: float, seed: int) -> np.ndarray:
    logits = TEST_LABELS * quality + np.random.default_rng(seed).normal(0, 1, TEST_LABELS.shape)
    files = np.array([f"{i:08d}_000.png" for i in range(len(TEST_LABELS))])
    np.savez(folder / "predictions.npz", logits=logits, labels=TEST_LABELS, files=files, patients=TEST_PATIENTS)
    return logits


def _paired_run(run_dir: Path, count: int = 3) -> dict[str, list[np.ndarray]]:
    """Hand-made repeats of both backends, each with predictions whose quality depends on the repeat."""
    logits = {}
    for b, name in enumerate(("pytorch", "keras")):
        for i, row in enumerate(FIGURES[name][:count], start=1):
            folder = repeat_folder(run_dir, name, i)
            _write_repeat(folder, row)
            logits.setdefault(name, []).append(_write_predictions(folder, 1.0 + 0.3 * i - 0.5 * b, 10 * b + i))
    return logits


def _mean_auroc(logits: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(np.mean([roc_auc_score(TEST_LABELS[:, c], logits[:, c]) for c in range(2)]))


def test_repeat_i_of_one_backend_pairs_with_repeat_i_of_the_other(tmp_path):
    logits = _paired_run(tmp_path)
    section = repeats.collect(tmp_path, ["pytorch", "keras"], 3, 10, [CLASS_A, CLASS_B])
    paired = section["comparisons"][0]["paired"]
    effect = paired["auroc"]
    assert paired["direction"] == "pytorch - keras" and effect["seeds"] == [10, 11, 12]
    expected = [_mean_auroc(t) - _mean_auroc(k) for t, k in zip(logits["pytorch"], logits["keras"])]
    assert effect["primary"]["per_seed"] == pytest.approx(expected, abs=1e-12)  # repeat i with repeat i, in order
    assert effect["primary"]["effect"] == pytest.approx(np.mean(expected), abs=1e-12)
    assert effect["primary"]["verdict"] in ("framework effect", "no framework effect shown")
    assert [m["seed"] for m in effect["seed_models"]] == [10, 11, 12] and paired["auroc_excluded"] == []
    assert paired["localisation"] is None  # no CAM files: nothing to pair
    assert [e["reason"] for e in paired["localisation_excluded"]] == [
        f"pytorch repeat {i} has no per-box localisation; keras repeat {i} has no per-box localisation"
        for i in (1, 2, 3)
    ]


def test_a_missing_repeat_in_one_backend_excludes_that_seed_and_says_so(tmp_path):
    logits = _paired_run(tmp_path)
    _write_repeat(repeat_folder(tmp_path, "keras", 2), FIGURES["keras"][1], status="failed")
    (repeat_folder(tmp_path, "pytorch", 3) / "predictions.npz").unlink()
    section = repeats.collect(tmp_path, ["pytorch", "keras"], 4, 10, [CLASS_A, CLASS_B])  # repeat 4 never ran
    paired = section["comparisons"][0]["paired"]
    assert paired["auroc_excluded"] == [
        {"repeat": 2, "seed": 11, "reason": "keras repeat 2 failed (boom)"},
        {"repeat": 3, "seed": 12, "reason": "pytorch repeat 3 has no predictions.npz"},
        {"repeat": 4, "seed": 13, "reason": "pytorch repeat 4 pending; keras repeat 4 pending"},
    ]
    effect = paired["auroc"]
    assert effect["seeds"] == [10] and effect["primary"]["per_seed"] == pytest.approx(
        [_mean_auroc(logits["pytorch"][0]) - _mean_auroc(logits["keras"][0])], abs=1e-12
    )
    assert effect["primary"]["verdict"] is None and "1 paired seed(s), at least 3 needed" in effect["no_verdict"]
    paired_seeds, excluded = repeats.pair_seeds("a", [{"repeat": 1, "seed": 0, "status": "completed"}], "b", [])
    assert paired_seeds == [] and excluded == [{"repeat": 1, "seed": 0, "reason": "b has no repeat 1"}]


def test_repeats_2_gives_results_but_no_framework_verdict_and_says_why(tmp_path):
    from cxrbench.report.verdicts import framework_lines

    _paired_run(tmp_path, count=2)
    section = repeats.collect(tmp_path, ["pytorch", "keras"], 2, 0, [CLASS_A, CLASS_B])
    effect = section["comparisons"][0]["paired"]["auroc"]
    assert effect["primary"]["effect"] is not None and effect["primary"]["interval"] is not None
    assert effect["primary"]["verdict"] is None and effect["classes_with_effect"] == []
    (line,) = framework_lines(section)
    assert line.startswith("framework effect on mean AUROC over 2 classes, pytorch - keras (2 paired seeds: 0, 1;")
    assert line.endswith(
        "no framework verdict: 2 paired seed(s), at least 3 needed for a framework verdict (--repeats 3 or more)"
    )


# -- report ----------------------------------------------------------------------------------------


def _with_repeats(run_dir: Path, names: list[str]) -> Path:
    """Repeats 2 and 3 beside the fake run's repeat 1: hand-made figures, and predictions that move with the seed."""
    figures = dict(zip(names, FIGURES.values()))
    for name, rows in figures.items():
        first = dict(np.load(run_dir / name / "predictions.npz"))
        for i, row in enumerate(rows[1:], start=2):
            folder = repeat_folder(run_dir, name, i)
            _write_repeat(folder, row)
            noise = np.random.default_rng(i).normal(0, 0.5, first["logits"].shape)
            np.savez(folder / "predictions.npz", **{**first, "logits": first["logits"] + noise})
    run = json.loads((run_dir / "run.json").read_text())
    run["repeats"] = repeats.collect(run_dir, names, 3, 0, run["data"]["classes"], EvalSettings(bootstrap_rounds=50))
    run.pop("verdicts", None)  # the report builds them from the repeats
    write_json(run_dir / "run.json", run)
    return run_dir


def _text(html: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html))


def test_report_has_a_repeats_table_with_mean_sd_difference_and_verdict(tmp_path):
    run_dir = _with_repeats(make_fake_run(tmp_path / "run"), ["pytorch", "keras"])
    html = write_report([run_dir]).read_text()
    table = html[html.index('id="repeats-table"') : html.index("</table>", html.index('id="repeats-table"'))]
    text = _text(table)
    section = load_run(run_dir).meta["repeats"]
    mean = section["backends"]["keras"]["summary"]["mean_auroc"]
    assert f"{mean['mean']:.4f} ± {mean['sd']:.4f}" in text
    assert section["comparisons"][0]["mean_auroc"]["text"] in text
    assert len(re.findall(r"<tr", table)) == 1 + 1 + len(CLASSES)  # header, mean, one row per class
    assert 'href="#repeats"' in html and 'id="repeats-speed"' in html
    summary = html[html.index('id="summary"') : html.index('id="accuracy"')]
    assert f"keras over 3 seed(s): mean AUROC {mean['mean']:.4f}" in summary  # the headline says it too


def test_repeats_section_and_summary_lead_with_the_paired_framework_effect(tmp_path):
    from cxrbench.report.verdicts import framework_lines

    run_dir = _with_repeats(make_fake_run(tmp_path / "run"), ["pytorch", "keras"])
    html = write_report([run_dir]).read_text()
    section = load_run(run_dir).meta["repeats"]
    lead = framework_lines(section)[0]
    assert lead.startswith("framework effect on mean AUROC over 14 classes, pytorch - keras (3 paired seeds: 0, 1, 2;")
    repeats_html = html[html.index('id="repeats"') : html.index('id="localisation"')]
    assert repeats_html.index('id="paired-verdicts"') < repeats_html.index('id="repeats-table"')
    assert lead in _text(repeats_html).replace("&#39;", "'")
    effect = section["comparisons"][0]["paired"]["auroc"]
    table = _text(repeats_html[repeats_html.index('class="paired-table"') :])
    assert f"{effect['primary']['effect']:+.4f}" in table and "Holm-consistent" in _text(repeats_html)
    summary = _text(html[html.index('id="summary"') : html.index('id="summary-table"')]).replace("&#39;", "'")
    assert summary.index(lead) < summary.index("unpaired Welch (secondary)")  # the paired result leads
    assert "the framework's effect is judged from the repeats paired by seed" in summary


def test_repeats_section_escapes_hostile_names(tmp_path):
    run_dir = make_fake_run(tmp_path / "run", hostile=True)
    names = list(json.loads((run_dir / "run.json").read_text())["backends"])
    html = write_report([_with_repeats(run_dir, names)]).read_text()
    section = html[html.index('id="repeats"') : html.index('id="localisation"')]
    assert HOSTILE_BACKEND not in section and "&lt;img src=x" in section


# -- end to end ------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.backends("pytorch", "numpy")
def test_three_repeats_of_two_backends_end_to_end_lead_with_the_paired_framework_effect(tmp_path, capsys):
    """The smallest run with a framework verdict: two backends (the numpy example is cheap), 3 repeats, 32 px."""
    out = tmp_path / "run"
    code = main(
        [
            "run",
            "--backend",
            "numpy",
            "--backend",
            "pytorch",
            *TINY_RUN,
            "--set",
            "train.max_steps=2",
            "--set",
            "train.warmup_steps=1",
            "--set",
            "export.onnx=false",
            "--repeats",
            "3",
            "--out",
            str(out),
        ]
    )
    err = capsys.readouterr().err
    assert code == 0, err
    block = ARCHITECTURES["densenet-tiny"]
    second = canonical.load(out / "shared_init-seed1.npz")
    for key, value in canonical.init_canonical(block, 1).items():
        np.testing.assert_array_equal(second[key], value)
    r2 = out / "pytorch" / "repeats" / "r2"
    stages = json.loads((r2 / "status.json").read_text())["stages"]
    assert stages == {
        "prepare-check": "done",
        "equivalence": "skipped",
        "ceiling": "skipped",
        "train": "done",
        "profile": "skipped",
        "evaluate": "done",
        "cam": "done",
        "export": "skipped",
    }
    run = json.loads((out / "run.json").read_text())
    validate(run)
    section = run["repeats"]
    seeds = [r["seed"] for r in section["backends"]["pytorch"]["repeats"]]
    aurocs = [r["mean_auroc"] for r in section["backends"]["pytorch"]["repeats"]]
    assert seeds == [0, 1, 2] and None not in aurocs and len(set(aurocs)) == 3
    assert all(r["first_step_s"] > 0 for r in section["backends"]["pytorch"]["repeats"])  # the timing contract
    paired = section["comparisons"][0]["paired"]
    assert paired["direction"] == "numpy - pytorch" and paired["auroc_excluded"] == []
    assert paired["auroc"]["seeds"] == [0, 1, 2] and paired["auroc"]["primary"]["verdict"] is not None
    assert paired["localisation"]["seeds"] == [0, 1, 2] and paired["localisation"]["primary"]["name"] == "overall"
    verdicts = run["verdicts"]
    assert verdicts["about"] == "framework" and verdicts["seeds"] == [0, 1, 2]
    lead = verdicts["lines"][0]
    assert (
        lead.startswith("framework effect on mean AUROC over ") and "numpy - pytorch (3 paired seeds: 0, 1, 2;" in lead
    )
    assert err.index(lead) < err.index("unpaired Welch (secondary)")  # the terminal summary leads with it
    html = (out / "index.html").read_text()
    assert 'id="paired-verdicts"' in html and 'id="localisation-pairs"' in html

    # --resume completes a missing repeat and leaves the finished ones alone.
    shutil.rmtree(r2)
    assert main(["run", "--resume", str(out)]) == 0, capsys.readouterr().err
    assert json.loads((r2 / "status.json").read_text())["status"] == "completed"
    assert (out / "pytorch" / "log.txt").read_text().count("=== cxrbench worker pytorch started") == 1
    resumed = json.loads((out / "run.json").read_text())["repeats"]["backends"]["pytorch"]["repeats"]
    assert resumed[0]["mean_auroc"] == aurocs[0] and resumed[1]["status"] == "completed"
