"""tools/report_screenshot.py, the README's picture of a report: a folder without a report is one line and no file;
a report becomes a 1280 x 1600 PNG of its top (in Debian's chromium, where installed)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from cxrbench.report.render import write_report
from helpers.fake_run import make_fake_run

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "report_screenshot.py"


def _screenshot(*args: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(TOOL), *map(str, args)], capture_output=True, text=True, timeout=120, cwd=ROOT
    )


def test_a_folder_without_a_report_is_one_line_naming_the_file(tmp_path):
    out = tmp_path / "shot.png"
    done = _screenshot(tmp_path / "not-a-run", out)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"report_screenshot: error: {tmp_path / 'not-a-run' / 'index.html'}: no report here; "
        "give the folder of a cxrbench run (reports/<...>/)"
    ]
    assert not out.exists()


@pytest.mark.browser
@pytest.mark.skipif(not Path("/usr/bin/chromium").exists(), reason="/usr/bin/chromium is missing (.ci/browser-deps.sh)")
def test_the_top_of_a_report_becomes_a_1280_by_1600_png(tmp_path):
    pytest.importorskip("playwright.sync_api", reason="playwright is in the test extras")
    run_dir = make_fake_run(tmp_path / "run")
    write_report([run_dir])
    out = tmp_path / "images" / "report.png"

    done = _screenshot(run_dir, out)

    assert done.returncode == 0, done.stderr
    with Image.open(out) as picture:
        assert picture.format == "PNG" and picture.size == (1280, 1600)
        colours = picture.convert("RGB").getcolors(maxcolors=1 << 16)
    assert colours is None or len(colours) > 50  # text and charts were drawn, not an empty page
