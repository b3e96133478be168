"""``python -m cxrbench.run.overhead_side``: a framework's idiomatic training loop, timed in a process of its own.

The idiomatic side of the harness-overhead benchmark (:mod:`cxrbench.run.overhead`): the backend's
``cxrbench_idiomatic_loop`` hook builds the loop its framework's users write, from the run's settings and shared
initial weights, and the core's window timer times ``--steps`` steps of it with the run's warm-up and window
length, as the recorder times the backend's own epoch. The windows go to ``FOLDER/idiomatic.json``; a failure is
one line there (and the traceback in the process's log).
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path

from cxrbench import __version__
from cxrbench.backend import canonical, timing
from cxrbench.errors import CxrError
from cxrbench.files import read_json, write_json
from cxrbench.plugins import load_plugins
from cxrbench.run.folder import IDIOMATIC_JSON, RUN_JSON, shared_init_path
from cxrbench.run.worker import one_line
from cxrbench.suite import Settings, apply_overrides


def run(settings: Settings, hook, backend: str, weights, steps: int) -> dict:
    """Build the loop, time ``steps`` steps with the core's window timer, return the windows."""
    loop = hook.cxrbench_idiomatic_loop(settings=settings, weights=weights)
    if loop is None:
        raise CxrError(
            f"backend {backend!r} has no idiomatic loop to compare with (it implements no cxrbench_idiomatic_loop)"
        )
    train = settings.train
    timer = timing.WindowTimer(range(steps), loop.sync, train.batch_size, train.warmup_steps, train.window_steps)
    for _ in timer:
        loop.step()
    return {
        "status": "completed",
        "error": None,
        "pid": os.getpid(),
        "description": loop.description,
        "threads": dict(loop.threads),
        "first_step_s": timer.first_step_s,
        "steps": timer.steps,
        "windows": [window.to_list() for window in timer.windows],
    }


def initial_weights(run_dir: Path, settings: Settings):
    """The run's shared initial weights of its seed, or the same canonical weights made from the seed."""
    path = shared_init_path(run_dir, settings.run.seed, settings.run.seed)
    if path.exists():
        return canonical.load(path)
    return canonical.init_canonical(settings.model.block_config, settings.run.seed)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m cxrbench.run.overhead_side", description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", required=True, type=Path, help="holds run.json (the settings) and shared_init")
    parser.add_argument("--backend", required=True)
    parser.add_argument("--folder", required=True, type=Path, help="where idiomatic.json goes")
    parser.add_argument("--steps", required=True, type=int)
    parser.add_argument("--gpus", type=int, default=0, help="0: the CPU, or the first GPU if any; 1: one GPU")
    parser.add_argument("--plugin", action="append", default=[], metavar="MODULE")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    print(f"[{args.backend} idiomatic] python {sys.executable} (cxrbench {__version__})", flush=True)
    try:
        run_json = args.run_dir / RUN_JSON
        settings = Settings.from_dict((read_json(run_json) or {}).get("settings") or {}, str(run_json))
        settings = apply_overrides(settings, {"run.gpus": args.gpus})
        plugins = load_plugins(args.plugin, backend=args.backend)
        result = run(settings, plugins.hook, args.backend, initial_weights(args.run_dir, settings), args.steps)
    except BaseException as exc:  # one line in the result file, the traceback in the log
        traceback.print_exc()
        result = {"status": "failed", "error": one_line(exc)}
    write_json(args.folder / IDIOMATIC_JSON, result)
    print(f"[{args.backend} idiomatic] {result['status']}", flush=True)
    return 0 if result["status"] == "completed" else 1


if __name__ == "__main__":
    sys.exit(main())
