"""What each accuracy verdict is about, in the terminal summary, run.json and the report: one seed's trained models
(with how to estimate the framework's effect, and what it would cost) or the framework from paired seeds."""

import json
import re

from cxrbench.report import verdicts
from cxrbench.report.load import load_run
from cxrbench.report.render import write_report
from cxrbench.run.progress import summary_table
from cxrbench.run.schema import validate
from helpers.fake_run import make_fake_run

SCOPE = "(two trained models, this test set, training seed 0 fixed)"
#: make_fake_run's stage seconds: pytorch 2 + 60 + 5 + 3 = 70 s, keras 2 + 100 + 5 + 3 = 110 s per repeat.
ESTIMATE = (
    "to estimate the framework's effect, rerun the same command with --repeats 5 (at least 3): repeats paired by "
    "seed; about 12.0 min more: 4 more repeats x 180 s (pytorch 70 s + keras 110 s: this run's prepare-check + "
    "train + evaluate + cam stage seconds; worker start-up not counted)"
)


def _text(html: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html)).replace("&#39;", "'").replace("&lt;", "<")


def test_one_seed_verdicts_name_their_scope_and_how_to_estimate_the_framework(tmp_path):
    run_dir = make_fake_run(tmp_path / "run")
    run = json.loads((run_dir / "run.json").read_text())
    comparison = json.loads((run_dir / "comparison.json").read_text())
    stated = verdicts.build(run, comparison)
    assert stated["about"] == "trained-models" and stated["seeds"] == [0]
    assert stated["scope"] == (
        "two trained models, this test set, training seed 0 fixed: whether these models differ; the framework's "
        "effect is not estimable from one seed"
    )
    auroc_line, iobb_line = stated["lines"]
    pair = comparison["agreement"]["pairs"][0]
    assert auroc_line.startswith(f"AUROC, pytorch vs keras {SCOPE}: ")
    assert f"mean AUROC over 14 classes pytorch - keras {pair['mean']['difference']:+.4f}" in auroc_line
    assert iobb_line.startswith(f"IoBB accuracy at T = 0.5, pytorch vs keras {SCOPE}: ")
    for line in stated["lines"]:
        assert line.endswith("; the framework's effect is not estimable from one seed")
    assert stated["how_to_estimate"] == ESTIMATE
    validate({**run, "verdicts": stated})

    table = summary_table(run, comparison).splitlines()  # the terminal summary, after the backend table
    assert table[3:6] == [auroc_line, iobb_line, ESTIMATE]


def test_report_states_the_scope_in_summary_accuracy_and_localisation(tmp_path):
    run_dir = make_fake_run(tmp_path / "run")
    html = write_report([run_dir]).read_text()
    summary = _text(html[html.index('id="summary"') : html.index('id="summary-table"')])
    assert "What they are about: two trained models, this test set, training seed 0 fixed" in summary
    assert ESTIMATE in summary
    accuracy = _text(html[html.index('id="accuracy"') : html.index("<h3>ROC curves")])
    assert f"AUROC, pytorch vs keras {SCOPE}: " in accuracy
    assert "the framework's effect is not estimable from one seed." in accuracy
    localisation = html[html.index('id="localisation"') : html.index('id="onnx"')]
    assert 'id="localisation-pairs"' in localisation
    pair = load_run(run_dir).comparison["localisation"]["pairs"][0]
    assert f"{pair['overall']['difference']:.3f}" in _text(localisation)
    assert f"IoBB accuracy at T = 0.5, pytorch vs keras {SCOPE}: " in _text(localisation)


def test_localisation_between_backends_is_paired_box_by_box(tmp_path):
    run_dir = make_fake_run(tmp_path / "run")
    pair = json.loads((run_dir / "comparison.json").read_text())["localisation"]["pairs"][0]
    boxes = {n: json.loads((run_dir / n / "localisation.json").read_text())["boxes"] for n in ("pytorch", "keras")}
    found = {n: [v > 0.5 for v in b["iobb"]] for n, b in boxes.items()}
    expected = (sum(found["pytorch"]) - sum(found["keras"])) / len(found["pytorch"])
    assert pair["overall"]["difference"] == expected and pair["resampling"] == "patients"
    assert pair["about"] == "two trained models, this test set, training seed 0 fixed"


def test_a_single_backend_has_no_verdicts(tmp_path):
    run_dir = make_fake_run(tmp_path / "run", backends=("pytorch",))
    run = json.loads((run_dir / "run.json").read_text())
    assert verdicts.build(run, json.loads((run_dir / "comparison.json").read_text())) is None
    assert verdicts.estimate_line(run) is None
