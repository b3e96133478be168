"""``cxrbench run``: the comparison of backends on one suite, end to end; ``cxrbench overhead``: each backend
against its framework's idiomatic loop (:mod:`cxrbench.run.overhead`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cxrbench.errors import SuiteError

#: Option spelling and type of each of the suite's common overrides (cxrbench.suite.COMMON_OVERRIDES).
_OVERRIDE_TYPES = {
    "epochs": int,
    "image_size": int,
    "batch_size": int,
    "seed": int,
    "data": str,
    "max_steps": int,
    "arch": str,
    "init": str,
    "precision": str,
}


def add_parser(commands) -> None:
    from cxrbench.suite import COMMON_OVERRIDES

    run = commands.add_parser("run", help="compare backends on a suite: train, evaluate, CAM, ONNX, checks, report")
    run.add_argument("--suite", help="suite name or TOML path (default: smoke)")
    run.add_argument(
        "--backend", action="append", default=[], metavar="NAME", help="repeatable (default: every installed backend)"
    )
    run.add_argument("--out", type=Path, help="run folder (default: reports/<timestamp>-<suite>)")
    run.add_argument("--gpus", help="GPU count, or a sweep such as 1,2,4 (default: the suite's run.gpus)")
    run.add_argument(
        "--nodes",
        help="machines per training run, or a sweep such as 1,2,4; above 1 needs --executor slurm (default: the "
        "suite's run.nodes; docs/multi-node.md)",
    )
    run.add_argument(
        "--plugin", action="append", default=[], metavar="MODULE", help="also load this plugin module (repeatable)"
    )
    run.add_argument(
        "--python",
        action="append",
        default=[],
        metavar="BACKEND=PATH",
        help="run this backend's worker with that interpreter (its own environment; repeatable)",
    )
    run.add_argument(
        "--resume", type=Path, metavar="RUN_DIR", help="finish an interrupted or failed run with its own settings"
    )
    run.add_argument("--baseline", metavar="NAME", help="the backend others are compared with (default: the first)")
    run.add_argument(
        "--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override any suite setting"
    )
    run.add_argument("--monitor-interval", type=float, default=1.0, help="seconds between GPU/CPU samples")
    run.add_argument(
        "--repeats", type=int, metavar="N", help="train every backend N times, repeat i with seed run.seed + i - 1"
    )
    run.add_argument(
        "--sweep",
        action="append",
        default=[],
        metavar="SECTION.KEY=V1,V2",
        help="also time every backend at each value (repeatable: a grid over all given keys)",
    )
    run.add_argument(
        "--executor",
        choices=("slurm", "local"),
        help="run each cell (sweep point, repeat) as a job through submitit: Slurm job arrays, or local processes "
        "for development (docs/multi-node.md)",
    )
    run.add_argument(
        "--array-parallelism", type=int, metavar="N", help="--executor slurm: at most N cells' jobs at a time"
    )
    run.add_argument(
        "--job-time-min", type=int, metavar="M", help="--executor: each job's time limit in minutes (default 240)"
    )
    run.add_argument(
        "--slurm",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="--executor slurm: a submitit Slurm parameter, e.g. partition=gpu, account=abc (repeatable)",
    )
    run.add_argument(
        "--prepare-only",
        action="store_true",
        help="write the run folder (data prepared, shared weights) and start no worker: for ranks a launcher starts "
        "(python -m cxrbench.run.worker --launched); then --resume RUN_DIR merges and reports (docs/multi-node.md)",
    )
    for option, dotted in COMMON_OVERRIDES.items():
        help_text = (
            "data set folder (default: the embedded phantom data set)" if option == "data" else f"override {dotted}"
        )
        run.add_argument(f"--{option.replace('_', '-')}", type=_OVERRIDE_TYPES[option], help=help_text)
    run.set_defaults(func=_cmd_run)


def _overrides(args: argparse.Namespace) -> dict:
    from cxrbench.run.repeats import check_count
    from cxrbench.suite import COMMON_OVERRIDES, parse_set_option

    given = {dotted: getattr(args, option) for option, dotted in COMMON_OVERRIDES.items()}
    given.update(parse_set_option(text) for text in args.set)
    if args.repeats is not None:
        given["run.repeats"] = check_count(args.repeats)
    return {k: v for k, v in given.items() if v is not None}


def _cmd_run(args: argparse.Namespace) -> int:
    from cxrbench.run.orchestrator import RunRequest, new_run, resume_run
    from cxrbench.suite import apply_overrides, load_suite

    argv = sys.argv[1:]
    overrides = _overrides(args)
    if args.resume:
        changed = [
            name
            for name, value in (
                ("--suite", args.suite),
                ("--backend", args.backend),
                ("--out", args.out),
                ("--gpus", args.gpus),
                ("--nodes", args.nodes),
                ("--plugin", args.plugin),
                ("--python", args.python),
                ("--baseline", args.baseline),
                ("--sweep", args.sweep),
                ("--prepare-only", args.prepare_only),
                ("--executor", args.executor),
                ("--array-parallelism", args.array_parallelism),
                ("--job-time-min", args.job_time_min),
                ("--slurm", args.slurm),
            )
            if value
        ]
        if overrides or changed:
            raise SuiteError(f"--resume reuses the run's own settings; drop {', '.join(changed + sorted(overrides))}")
        return resume_run(args.resume, argv, args.monitor_interval).execute()
    from cxrbench.run.cluster import executor_record
    from cxrbench.run.environments import parse_python_options

    options = (args.array_parallelism, args.job_time_min, args.slurm)
    if args.executor is None and any(options):
        raise SuiteError("--array-parallelism, --job-time-min and --slurm need --executor slurm")
    executor = executor_record(args.executor, *options) if args.executor else None

    settings = apply_overrides(load_suite(args.suite or "smoke"), overrides)
    request = RunRequest(
        settings,
        args.backend,
        args.plugin,
        args.out,
        args.gpus,
        args.baseline,
        argv,
        args.monitor_interval,
        args.sweep,
        parse_python_options(args.python),
        executor,
        args.nodes,
        args.prepare_only,
    )
    return new_run(request).execute()


def add_overhead_parser(commands) -> None:
    from cxrbench.run.overhead import TARGET

    overhead = commands.add_parser(
        "overhead",
        help=f"each backend's training path against its framework's idiomatic loop (goal >= {TARGET})",
        description="Alternate fresh processes of the backend's training (its worker, as a run runs it) and of its "
        "framework's idiomatic loop, on the same network, image size, batch, precision and threads; print the "
        "steady images/s of both and their ratio, and write OUT/overhead.json.",
    )
    overhead.add_argument("--backend", action="append", default=[], metavar="NAME", help="repeatable (default: all)")
    overhead.add_argument("--suite", help="suite name or TOML path (default: smoke)")
    overhead.add_argument("--rounds", type=int, default=3, help="alternating rounds, one process per side each")
    overhead.add_argument("--steps", type=int, help="training steps per process (default: warm-up + 5 windows)")
    overhead.add_argument("--out", type=Path, help="output folder (default: reports/<timestamp>-overhead)")
    overhead.add_argument(
        "--plugin", action="append", default=[], metavar="MODULE", help="also load this plugin module (repeatable)"
    )
    overhead.add_argument(
        "--python", action="append", default=[], metavar="BACKEND=PATH", help="that backend's interpreter"
    )
    overhead.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="any setting")
    overhead.add_argument("--monitor-interval", type=float, default=1.0, help="seconds between the worker's samples")
    for option in ("image_size", "batch_size", "arch", "precision", "seed", "data"):
        overhead.add_argument(f"--{option.replace('_', '-')}", type=_OVERRIDE_TYPES[option])
    overhead.set_defaults(func=_cmd_overhead)


def _cmd_overhead(args: argparse.Namespace) -> int:
    import time

    from cxrbench.backend import canonical
    from cxrbench.data import cache
    from cxrbench.errors import CxrError
    from cxrbench.files import write_json
    from cxrbench.machine.env import capture
    from cxrbench.plugins import load_plugins, require_answer
    from cxrbench.run import overhead
    from cxrbench.run.environments import parse_python_options
    from cxrbench.run.folder import OVERHEAD_JSON, RUN_JSON, shared_init_path
    from cxrbench.run.orchestrator import resolve_backends
    from cxrbench.run.scaling import grow_phantom
    from cxrbench.suite import COMMON_OVERRIDES, apply_overrides, load_suite, parse_set_option

    if args.rounds < 1:
        raise SuiteError(f"--rounds {args.rounds}: at least 1 (3 or more for a verdict)")
    given = {dotted: getattr(args, option, None) for option, dotted in COMMON_OVERRIDES.items()}
    given.update(parse_set_option(text) for text in args.set)
    settings = apply_overrides(load_suite(args.suite or "smoke"), {k: v for k, v in given.items() if v is not None})
    if settings.run.gpus > 1:
        raise SuiteError(f"run.gpus = {settings.run.gpus}: the idiomatic loops run on one device; use 0 or 1")
    steps = args.steps or overhead.default_steps(settings)
    pythons = parse_python_options(args.python)
    plugins = load_plugins(args.plugin)
    names = resolve_backends(plugins, args.backend, pythons)
    index = require_answer(plugins.hook.cxrbench_dataset(settings=settings), "cxrbench_dataset", settings.data.source)
    for _ in range(3):  # a grown phantom's splits are drawn by patient: check again after growing it
        train_images = len(index.rows("train"))
        if settings.data.source != "phantom" or train_images >= steps * settings.train.batch_size:
            break
        settings = grow_phantom(settings, steps * settings.train.batch_size, train_images, len(index))
        index = require_answer(plugins.hook.cxrbench_dataset(settings=settings), "cxrbench_dataset", "phantom")
    overhead.check_steps(settings, steps, len(index.rows("train")))
    out = args.out or Path("reports") / f"{time.strftime('%Y%m%d-%H%M%S')}-overhead"
    if (out / OVERHEAD_JSON).exists():
        raise CxrError(f"{out}: already holds an overhead measurement (choose another --out)")
    data = cache.prepare(index, settings.data.image_size)
    # What the processes read, as a run's workers do: the settings and data key, and the shared initial weights.
    write_json(out / RUN_JSON, {"settings": settings.to_dict(), "data": {"key": data.key}, "overhead_only": True})
    seed = settings.run.seed
    canonical.save(canonical.init_canonical(settings.model.block_config, seed), shared_init_path(out, seed, seed))
    summaries = {}
    for name in names:
        measurement = overhead.Measurement(
            run_dir=out,
            folder=out / name,
            backend=name,
            rounds=args.rounds,
            steps=steps,
            python=pythons.get(name, sys.executable),
            plugins=args.plugin,
            monitor_interval=args.monitor_interval,
            gpus=settings.run.gpus,
        )
        summaries[name] = overhead.measure(measurement)
    write_json(
        out / OVERHEAD_JSON,
        {"settings": settings.to_dict(), "steps": steps, "environment": capture(), "backends": summaries},
    )
    print(overhead.table(summaries))
    for name, summary in summaries.items():
        print(overhead.sentence(name, summary))
    print(f"written: {out / OVERHEAD_JSON}", file=sys.stderr)
    return 0 if all(s["status"] == "completed" for s in summaries.values()) else 1
