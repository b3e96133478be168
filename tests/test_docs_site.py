"""The documentation site: built strictly (warnings, broken links and missing anchors are errors), every page in
the navigation, and every public name of ``cxrbench.backend`` documented on the API page."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import cxrbench.backend as surface

ROOT = Path(__file__).resolve().parents[1]
API_PAGE = ROOT / "docs" / "api.md"


def _documented_objects() -> set[str]:
    return set(re.findall(r"^::: ([\w.]+)$", API_PAGE.read_text(encoding="utf-8"), flags=re.M))


def test_every_public_name_of_the_backend_surface_is_on_the_api_page():
    documented = _documented_objects()
    missing = []
    for name in surface.__all__:
        source = surface._SOURCES[name]
        path = f"cxrbench.backend.{name}" if source is None else f"{source}.{name}"
        if path not in documented:
            missing.append(path)
    assert missing == []


def test_the_api_page_documents_what_the_surface_exports_and_the_hooks():
    documented = _documented_objects()
    assert "cxrbench.hookspecs" in documented
    # every directive names an object the surface exports (or the hookspecs), so the page cannot drift from __all__
    exported = {f"cxrbench.backend.{n}" if s is None else f"{s}.{n}" for n, s in surface._SOURCES.items()}
    assert documented - exported == {"cxrbench.hookspecs"}


def test_every_docs_page_is_in_the_navigation():
    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    pages = sorted(p.name for p in (ROOT / "docs").glob("*.md"))
    assert [page for page in pages if f": {page}" not in nav] == []


@pytest.mark.skipif(shutil.which("mkdocs") is None, reason='needs the docs extra: pip install -e ".[docs]"')
def test_the_site_builds_strictly(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={"NO_MKDOCS_2_WARNING": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "site" / "api" / "index.html").is_file()
