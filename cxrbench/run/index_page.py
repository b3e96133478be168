"""The run's ``index.html``: the report package's page when it is installed, else a minimal one."""

from __future__ import annotations

import html
import sys
from pathlib import Path
from typing import Any

from cxrbench.files import write_text
from cxrbench.run.folder import COMPARISON_JSON, INDEX_HTML, RUN_JSON, log_of
from cxrbench.run.progress import HEADER, summary_rows


def minimal_page(run: dict[str, Any], comparison: dict[str, Any]) -> str:
    """A self-contained page: the summary table, the equivalence failures, links to the files."""
    esc = html.escape
    head = "".join(f"<th>{esc(h)}</th>" for h in HEADER)
    rows = "".join(
        "<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in summary_rows(run, comparison)
    )
    failures = comparison.get("equivalence", {}).get("failures") or []
    errors = [f"{name}: {b['error']}" for name, b in run["backends"].items() if b.get("error")]
    items = "".join(f"<li>{esc(text)}</li>" for text in failures + errors)
    links = "".join(f'<li><a href="{esc(log_of(name))}">{esc(name)} log</a></li>' for name in run["backends"])
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>cxrbench run {esc(run['suite'])}</title></head><body>"
        f"<h1>cxrbench run: {esc(run['suite'])}</h1><p>status: {esc(str(run.get('status')))}</p>"
        f"<table><tr>{head}</tr>{rows}</table>"
        + (f"<h2>Problems</h2><ul>{items}</ul>" if items else "")
        + f"<p><a href='{RUN_JSON}'>{RUN_JSON}</a> · <a href='{COMPARISON_JSON}'>{COMPARISON_JSON}</a></p>"
        + f"<ul>{links}</ul>"
        "</body></html>"
    )


def write_index(run_dir: Path, run: dict[str, Any], comparison: dict[str, Any], baseline: str | None) -> Path:
    """The full report; the minimal page when the report package is absent or fails, so that a
    report bug never leaves a finished run without its page (the failure is printed)."""
    out = run_dir / INDEX_HTML
    try:
        from cxrbench.report.render import write_report

        return write_report([run_dir], out, baseline=baseline)
    except ModuleNotFoundError as exc:
        if exc.name != "cxrbench.report.render":
            raise
    except Exception as exc:  # the run's results are on disk already; keep the page minimal instead
        print(
            f"cxrbench: warning: the report failed ({type(exc).__name__}: {exc}); wrote a minimal {out}",
            file=sys.stderr,
        )
    return write_text(out, minimal_page(run, comparison))
