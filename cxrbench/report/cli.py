"""`cxrbench report RUN_DIR [RUN_DIR ...]`: write the HTML report of a run, compared with later runs."""

from __future__ import annotations

import argparse
from pathlib import Path

from cxrbench.report.run_comparison import DEFAULT_THRESHOLD_PCT


def _cmd_report(args: argparse.Namespace) -> int:
    from cxrbench.report.render import write_report

    out = write_report(
        [Path(d) for d in args.run_dirs],
        out=Path(args.out) if args.out else None,
        baseline=args.baseline,
        benchmark_json=[Path(p) for p in args.benchmark_json],
        threshold_pct=args.threshold,
    )
    size_kib = out.stat().st_size / 1024
    print(f"wrote {out} ({size_kib:.0f} KiB)")
    return 0


def add_parser(commands) -> None:
    report = commands.add_parser(
        "report",
        help="write a run's self-contained HTML report (several runs: compare them with the first)",
        description="Write ONE self-contained HTML file (no network needed) for RUN_DIR; further run folders are "
        "compared with the first: what changed and how every headline figure moved.",
    )
    report.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders; the first is the reference")
    report.add_argument(
        "--out", metavar="FILE", help="HTML file to write (default: RUN_DIR/index.html of the first run)"
    )
    report.add_argument(
        "--baseline",
        metavar="NAME",
        help="backend that speed ratios are stated against (default: the run's baseline, else its first backend)",
    )
    report.add_argument(
        "--benchmark-json",
        action="append",
        default=[],
        metavar="FILE",
        help="a pytest-benchmark JSON file to include as a table (repeatable)",
    )
    report.add_argument(
        "--threshold",
        type=float,
        default=DEFAULT_THRESHOLD_PCT,
        metavar="PCT",
        help="judge a run-to-run change by this relative change in percent, only for figures "
        f"with neither intervals nor a paired test (default {DEFAULT_THRESHOLD_PCT:g})",
    )
    report.set_defaults(func=_cmd_report)
