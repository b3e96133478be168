"""The README's picture of a report: the top of a real run's ``index.html``, in headless Chromium.

The README shows what a run gives before anyone installs anything, so its picture is taken from the report of an
actual ``cxrbench run`` rather than drawn or edited by hand, and can be taken again whenever the report changes::

    python tools/report_screenshot.py reports/<timestamp>-smoke/ [docs/images/report.png]

Chromium is Debian's ``/usr/bin/chromium`` (``.ci/browser-deps.sh`` installs it), driven through playwright (in the
test extras) exactly as ``tests/test_report_browser.py`` drives it; nothing is downloaded (never
``playwright install``). The page is 1280 px wide and the picture its first 1600 px: the summary and the first
figures, what a reader sees first.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")
#: A report opened from file:// needs no network, no GPU and no profile of its own.
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"]
WIDTH, HEIGHT = 1280, 1600
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "docs" / "images" / "report.png"


class ScreenshotError(Exception):
    """A one-line reason why no picture was taken (the file or program it names)."""


def screenshot(run_dir: Path, out: Path, width: int = WIDTH, height: int = HEIGHT) -> Path:
    """Write a PNG of the top ``height`` pixels of ``run_dir/index.html`` at ``width`` pixels to ``out``."""
    index = Path(run_dir) / "index.html"
    if not index.is_file():
        raise ScreenshotError(f"{index}: no report here; give the folder of a cxrbench run (reports/<...>/)")
    if not CHROMIUM.exists():
        raise ScreenshotError(f"{CHROMIUM}: Debian's chromium is missing (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        raise ScreenshotError('playwright is missing: pip install -e ".[test]"') from None
    out.parent.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": height}, device_scale_factor=1)
            page.goto(index.resolve().as_uri(), wait_until="load")
            page.screenshot(path=str(out))  # the viewport: the page's top, whatever its length
        finally:
            browser.close()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a cxrbench run folder (holds index.html)")
    parser.add_argument("out", type=Path, nargs="?", default=DEFAULT_OUT, help=f"PNG to write (default {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    try:
        written = screenshot(args.run_dir, args.out)
    except ScreenshotError as exc:
        print(f"report_screenshot: error: {exc}", file=sys.stderr)
        return 2
    print(f"written: {written} ({WIDTH} x {HEIGHT} px)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
