"""Write a run's report: one self-contained HTML file (inline CSS and SVG, PNGs as data: URIs).

It opens from ``file://`` with no network. Every string that comes from data, settings, plugins,
file names or errors goes through Jinja2 with autoescape on; the only markup inserted as given is
matplotlib's SVG (which escapes its text) and plugin sections, whose hook contract makes the plugin
responsible for escaping its own HTML.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined
from markupsafe import Markup

from cxrbench import __version__
from cxrbench.errors import CxrError
from cxrbench.files import write_text
from cxrbench.report import sections
from cxrbench.report.explain import flop_rate
from cxrbench.report.figures import HEADLINES, format_number
from cxrbench.report.load import Run, load_run
from cxrbench.report.run_comparison import DEFAULT_THRESHOLD_PCT, compare_runs, flatten
from cxrbench.run.folder import INDEX_HTML

TEMPLATE = "report.html.j2"


# -- template filters -----------------------------------------------------------------------------


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _fixed(value: Any, digits: int = 4) -> str:
    return f"{value:.{digits}f}" if _is_number(value) else "–"


def _sci(value: Any) -> str:
    if not _is_number(value):
        return "–"
    return "0" if value == 0 else f"{value:.1e}"


def _p_value(value: Any) -> str:
    if not _is_number(value):
        return "–"
    if value == 0:  # only below float64's range: the metrics keep log10 p (log10_p_value)
        return "<1e-300"
    return "<0.001" if value < 0.001 else f"{value:.3f}"


def _interval(value: Any, digits: int = 3) -> str:
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(map(_is_number, value)):
        return f"[{value[0]:.{digits}f}, {value[1]:.{digits}f}]"
    return ""


def _show(value: Any) -> str:
    """Any settings or environment value as short text."""
    if value is None:
        return "–"
    return value if isinstance(value, str) else json.dumps(value)


def _svg(text: str | None) -> Markup | None:
    """matplotlib's SVG (text already escaped by matplotlib) is the one trusted markup we create."""
    return Markup(text) if text else None


def environment() -> Environment:
    env = Environment(
        loader=PackageLoader("cxrbench.report", "templates"),
        autoescape=True,
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(
        num=format_number,
        fixed=_fixed,
        sci=_sci,
        pvalue=_p_value,
        interval=_interval,
        show=_show,
        svg=_svg,
        flops=flop_rate,
    )
    return env


# -- inputs other than the run folder -------------------------------------------------------------


def load_benchmarks(path: Path) -> dict[str, Any]:
    """A pytest-benchmark JSON file as table rows; a one-line error naming the file when it is not one."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CxrError(f"--benchmark-json {path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CxrError(f"--benchmark-json {path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), list):
        raise CxrError(f"--benchmark-json {path}: not a pytest-benchmark file (no 'benchmarks' list)")
    rows = []
    for bench in data["benchmarks"]:
        stats = bench.get("stats") or {}
        rows.append(
            {
                "name": bench.get("fullname") or bench.get("name"),
                "group": bench.get("group"),
                **{k: stats.get(k) for k in ("median", "mean", "stddev", "ops", "rounds")},
                "extra": flatten(bench.get("extra_info") or {}),
            }
        )
    machine = data.get("machine_info") or {}
    return {
        "file": path.name,
        "rows": rows,
        "datetime": data.get("datetime"),
        "machine": {
            "node": machine.get("node"),
            "cpu": (machine.get("cpu") or {}).get("brand_raw"),
            "python": machine.get("python_version"),
            "system": machine.get("system"),
        },
        "commit": (data.get("commit_info") or {}).get("id"),
    }


def plugin_sections(run: Run) -> list[tuple[str, Markup]]:
    """Sections contributed through ``cxrbench_report_sections``; a failing plugin becomes a note."""
    from cxrbench.plugins import load_plugins

    try:
        answers = load_plugins().hook.cxrbench_report_sections(run={**run.meta, "path": str(run.path)})
    except Exception as exc:  # a plugin's bug must not cost the user the whole report
        run.notes.append(f"a plugin's cxrbench_report_sections failed: {type(exc).__name__}: {exc}")
        return []
    return [(str(title), Markup(html)) for answer in answers for title, html in (answer or [])]


# -- the report -----------------------------------------------------------------------------------


def build_context(runs: Sequence[Run], baseline: str | None, benchmarks: list[dict], threshold_pct: float) -> dict:
    run = runs[0]
    resolved = sections.resolve_baseline(run, baseline)
    return {
        "version": __version__,
        "run": run,
        "data": run.meta.get("data") or {},
        "colours": sections.backend_colours(run),
        "summary": sections.summary(run, resolved),
        "headlines": HEADLINES,
        "auroc": sections.auroc_table(run),
        "roc_svg": sections.roc_svg(run),
        "speed": sections.speed(run),
        "explain": sections.explain(run),
        "repeats": sections.repeats(run),
        "sweep": sections.sweep(run),
        "localisation": sections.localisation(run),
        "localisation_skipped": sections.localisation_skipped(run),
        "gallery": sections.gallery(run),
        "onnx": sections.onnx(run),
        "environment": sections.environment(run),
        "failures": sections.failures(run),
        "pending": sections.pending(run),
        "kept": sections.kept(run),
        "plugin_sections": plugin_sections(run),
        "benchmarks": benchmarks,
        "comparisons": [compare_runs(run, other, threshold_pct) for other in runs[1:]],
        "threshold_pct": threshold_pct,
    }


def write_report(
    run_dirs: list[Path],
    out: Path | None = None,
    baseline: str | None = None,
    benchmark_json: Sequence[Path] = (),
    threshold_pct: float = DEFAULT_THRESHOLD_PCT,
) -> Path:
    """Render the report of ``run_dirs[0]`` (compared with any further runs) to ``out``.

    :param out: the HTML file; default ``run_dirs[0]/index.html``.
    :param baseline: the backend speed ratios are stated against (default: run.json's, else the first).
    :param benchmark_json: pytest-benchmark JSON files shown as tables.
    :param threshold_pct: relative change beyond which a run-to-run difference is flagged.
    """
    if not run_dirs:
        raise CxrError("cxrbench report: give at least one run folder")
    if not threshold_pct >= 0:
        raise CxrError(f"--threshold {threshold_pct!r}: must be a percentage >= 0")
    runs = [load_run(Path(d)) for d in run_dirs]
    benchmarks = [load_benchmarks(Path(p)) for p in benchmark_json]
    html = environment().get_template(TEMPLATE).render(build_context(runs, baseline, benchmarks, threshold_pct))
    out = Path(out) if out is not None else Path(run_dirs[0]) / INDEX_HTML
    write_text(out, html)
    return out
