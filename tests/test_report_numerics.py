"""The report's numerics table: the backends' records side by side, one row per key of the core's schema."""

from __future__ import annotations

from pathlib import Path

import pytest

from cxrbench.backend.numerics_record import FIELDS
from cxrbench.report.load import load_run
from cxrbench.report.render import write_report
from cxrbench.report.sections import NOT_RECORDED, environment, numerics_table
from helpers.fake_run import make_fake_run


@pytest.fixture(scope="module")
def fake_run(tmp_path_factory) -> Path:
    return make_fake_run(tmp_path_factory.mktemp("run") / "run-numerics", gpus=1)


def test_rows_follow_the_schema_and_line_the_backends_up(fake_run):
    run = load_run(fake_run)
    table = environment(run)["numerics"]
    assert table["backends"] == list(run.backends)
    keys = [row["key"] for row in table["rows"]]
    tops = list(dict.fromkeys(key.split(".")[0] for key in keys))
    assert tops == list(FIELDS)  # every schema key once, in the schema's order, extras last
    rows = {row["key"]: row for row in table["rows"]}
    assert rows["batch_size_per_device"]["values"] == [16, 16] and rows["batch_size_per_device"]["same"]
    assert not rows["layout"]["same"]
    pytorch_only = rows["framework.cudnn_benchmark"]["values"]
    assert pytorch_only[table["backends"].index("keras")] == NOT_RECORDED


def test_a_record_without_a_key_says_not_recorded_and_other_keys_keep_their_place():
    table = numerics_table(
        {"old": {"grad_scaler": False, "precision": "fp32"}, "new": {"precision": "fp32"}, "failed": None}
    )
    assert table["backends"] == ["old", "new"]
    assert [(row["key"], row["values"], row["same"]) for row in table["rows"]] == [
        ("precision", ["fp32", "fp32"], True),
        ("grad_scaler", [False, NOT_RECORDED], False),
    ]
    assert numerics_table({"failed": None}) is None


def test_the_html_has_one_numerics_table_with_a_row_per_key_and_a_column_per_backend(fake_run):
    html = write_report([fake_run]).read_text(encoding="utf-8")
    assert html.count('<table id="numerics">') == 1 and "numerics in force</h3>" not in html
    table = html.split('<table id="numerics">', 1)[1].split("</table>", 1)[0]
    rows = environment(load_run(fake_run))["numerics"]["rows"]
    assert table.count("<tr") == 1 + len(rows)
    assert all(f'<th class="text">{row["key"]}</th>' in table for row in rows)
    assert table.count('class="flag-changed"') == sum(not row["same"] for row in rows) > 0
