"""The report in a real browser: headless Debian chromium through playwright, opened from file://.

Never runs ``playwright install`` (that downloads a browser): CI installs Debian's chromium with
.ci/browser-deps.sh, and the test is skipped, saying so, where /usr/bin/chromium is missing.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from cxrbench.report.load import load_run
from cxrbench.report.render import write_report
from helpers.fake_run import make_fake_run

CHROMIUM = Path("/usr/bin/chromium")
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
LOAD_LIMIT_S = 5.0

pytestmark = [
    pytest.mark.browser,
    pytest.mark.serial,  # LOAD_LIMIT_S bounds a page's load time
    pytest.mark.skipif(
        not CHROMIUM.exists(), reason="/usr/bin/chromium is missing (CI installs it: .ci/browser-deps.sh)"
    ),
]


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the test extras")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield browser
        browser.close()


def _artifacts(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("CXRBENCH_ARTIFACTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


class Page:
    """A page opened from file:// with every console error, page error and dialog recorded."""

    def __init__(self, browser, html: Path):
        self.page = browser.new_page(viewport={"width": 1300, "height": 900})
        self.errors: list[str] = []
        self.dialogs: list[str] = []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("dialog", self._dialog)
        start = time.perf_counter()
        self.page.goto(html.as_uri(), wait_until="load")
        self.load_s = time.perf_counter() - start

    def _dialog(self, dialog) -> None:
        self.dialogs.append(dialog.message)
        dialog.dismiss()

    def sizes(self, selector: str) -> list[tuple[float, float]]:
        return self.page.eval_on_selector_all(
            selector, "els => els.map(e => { const r = e.getBoundingClientRect(); return [r.width, r.height]; })"
        )


def test_report_renders_in_chromium(browser, tmp_path):
    run_dir = make_fake_run(tmp_path / "run", gpus=1, scaling=True)
    html = write_report([run_dir])
    page = Page(browser, html)
    shot = _artifacts(tmp_path) / "report-full-page.png"
    page.page.screenshot(path=str(shot), full_page=True)
    print(f"\nscreenshot: {shot}\nreport: {html.stat().st_size / 1024:.0f} KiB, load {page.load_s:.2f} s")

    assert page.errors == []
    assert page.dialogs == []
    images, svgs = page.sizes("img"), page.sizes("svg")
    assert len(images) == 32 and len(svgs) == 5
    assert all(w > 0 and h > 0 for w, h in images + svgs)
    assert page.page.eval_on_selector_all("img", "els => els.every(e => e.complete && e.naturalWidth > 0)")
    visible = page.page.inner_text("body")
    for backend in load_run(run_dir).backends.values():
        assert f"{backend.get('auroc')['mean']:.4f}" in visible
    assert page.load_s < LOAD_LIMIT_S


def test_hostile_report_runs_no_script_in_chromium(browser, tmp_path):
    run_dir = make_fake_run(tmp_path / "hostile", failed="keras", hostile=True, cam_images=4)
    page = Page(browser, write_report([run_dir]))
    assert page.dialogs == [], "an injected alert() ran"
    assert page.errors == []
    dom = page.page.evaluate("""() => ({
        scripts: document.querySelectorAll('script').length,
        iframes: document.querySelectorAll('iframe').length,
        injected: document.querySelectorAll('#injected').length,
        handlers: [...document.querySelectorAll('*')]
            .filter(e => [...e.attributes].some(a => a.name.startsWith('on'))).length,
    })""")
    assert dom == {"scripts": 0, "iframes": 0, "injected": 0, "handlers": 0}
    assert "<script>alert('error')</script>" in page.page.inner_text("#failures")
