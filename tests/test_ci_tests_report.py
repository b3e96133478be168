""".ci/tests_report.py's "every test ran once" check, on JUnit XML files written here: a skip that names a backend's
install line is not a run (CI's full stage has every backend), a test deselected by both stages never ran, a test in
two runs ran twice, and a test skipped for another reason ran (its outcome) and is listed."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / ".ci" / "tests_report.py"


@pytest.fixture(scope="module")
def report():
    spec = importlib.util.spec_from_file_location("tests_report", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def junit(path: Path, *cases: tuple[str, str, str]) -> Path:
    """A JUnit file of ``(name, outcome, skip message)`` cases in module tests.test_m, as pytest writes it."""
    rows = []
    for name, outcome, message in cases:
        inner = f'<skipped type="pytest.skip" message="{message}"/>' if outcome == "skipped" else ""
        rows.append(f'<testcase classname="tests.test_m" name="{name}" time="0.1">{inner}</testcase>')
    path.write_text(f'<testsuites><testsuite name="pytest">{"".join(rows)}</testsuite></testsuites>')
    return path


def test_skipped_for_a_backend_in_one_stage_and_run_in_the_other_ran_once(report, tmp_path, capsys):
    core = junit(tmp_path / "core.xml", ("test_a", "skipped", "needs the pytorch backend: pip install -e plugins/p"))
    full = junit(tmp_path / "full.xml", ("test_a", "passed", ""))
    deselected = tmp_path / "deselected.txt"
    deselected.write_text("")
    assert report.once(deselected, [core, full]) == 0
    assert "1 tests, each ran in exactly one of these runs" in capsys.readouterr().out


def test_a_skip_naming_a_plugins_install_line_everywhere_never_ran(report, tmp_path, capsys):
    core = junit(tmp_path / "core.xml", ("test_b", "skipped", "needs torch (pip install -e plugins/pytorch_backend)"))
    deselected = tmp_path / "deselected.txt"
    deselected.write_text("tests/test_m.py::test_c\n")  # the full stage deselected it, and no other run has it
    assert report.once(deselected, [core]) == 1
    out = capsys.readouterr().out
    assert "NEVER RAN: tests.test_m::test_b" in out and "NEVER RAN: tests.test_m::test_c" in out


def test_two_runs_of_one_test_and_a_test_skipped_for_another_reason(report, tmp_path, capsys):
    core = junit(tmp_path / "core.xml", ("test_d", "passed", ""), ("test_e", "skipped", "root writes anywhere"))
    full = junit(tmp_path / "full.xml", ("test_d", "passed", ""))
    deselected = tmp_path / "deselected.txt"
    deselected.write_text("")
    assert report.once(deselected, [core, full]) == 1
    out = capsys.readouterr().out
    assert "RAN TWICE: tests.test_m::test_d in core, full" in out
    assert "skipped wherever it ran: tests.test_m::test_e (root writes anywhere)" in out
