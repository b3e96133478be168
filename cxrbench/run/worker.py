"""``python -m cxrbench.run.worker``: one backend's stages in a process of its own.

The parent starts one worker per backend (crash isolation, clean device memory, a framework
that must be configured before import). The worker's plugin manager holds exactly that backend.
Each stage writes its files into the backend's folder when it completes and marks itself done in
``status.json``, so a resumed run skips it; a killed worker loses at most the stage it was in.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from cxrbench import __version__
from cxrbench.backend import canonical, initial_weights
from cxrbench.backend.recorder import Recorder
from cxrbench.errors import CxrError, DataError, StorageError, UnsupportedSetting
from cxrbench.files import read_json, write_json
from cxrbench.machine.energy import open_energy_meter
from cxrbench.machine.env import run_gpu_indices
from cxrbench.machine.monitor.sampler import Sampler
from cxrbench.plugins import Plugins, load_plugins, require_answer
from cxrbench.run import stages
from cxrbench.run.folder import shared_init_path
from cxrbench.run.progress import StepRate
from cxrbench.run.store import DONE, WORKER_STAGES, BackendStatus
from cxrbench.suite import Settings, apply_overrides, parse_set_option

#: The recorder phase (monitor tag) of each stage; training sets its own train/validate phases.
PHASES = {
    "prepare-check": "prepare",
    "equivalence": "equivalence",
    "ceiling": "ceiling",
    "train": "train",
    "profile": "profile",
    "evaluate": "predict",
    "cam": "cam",
    "export": "export",
}


class Interrupted(BaseException):
    """SIGTERM: from the parent (Ctrl-C in the orchestrator), a scheduler ending the job, or the worker itself when
    its parent is gone. A BaseException, like KeyboardInterrupt: the handlers that turn a failure into a missing
    figure (``except Exception`` around the ceiling, the profiler, a tracker) must never swallow a stop."""


def one_line(exc: BaseException) -> str:
    """The error as the one line status.json and the summary show."""
    text = str(exc).strip().splitlines()
    message = text[0] if text else ""
    return message if isinstance(exc, CxrError) else f"{type(exc).__name__}: {message}".rstrip(": ")


class Worker:
    def __init__(
        self,
        run_dir: Path,
        folder: Path,
        backend: str,
        plugins: Plugins,
        settings: Settings,
        status: BackendStatus,
        data_settings: Settings | None = None,
    ):
        self.run_dir, self.folder, self.backend = run_dir, folder, backend
        self.hook, self.settings, self.status = plugins.hook, settings, status
        #: The run's own settings open the data set: a repeat's seed changes the data order, never the data.
        self.data_settings = data_settings or settings
        self.recorder = Recorder([self._on_event])
        self.rate = StepRate(settings.train.batch_size * max(1, settings.run.gpus))
        self.ctx = stages.StageContext(
            folder=folder, backend=backend, hook=self.hook, settings=settings, recorder=self.recorder
        )

    # -- progress ------------------------------------------------------------------------------

    def _on_event(self, event: str, payload: dict[str, Any]) -> None:
        if event == "epoch_started":
            self.rate.start_epoch()
            self.status.progress(
                throttle_s=0,
                epoch=payload["epoch"],
                epochs=self.settings.train.epochs,
                step=0,
                steps=payload["steps"],
                images_per_s=None,
                eta_s=None,
            )
        elif event == "step":
            rate = self.rate.update(payload["step"], payload["steps"], payload.get("t", time.time()))
            self.status.progress(epoch=payload["epoch"], step=payload["step"], steps=payload["steps"], **rate)
        elif event == "epoch_ended":
            write_json(self.folder / "history.json", [r.to_dict() for r in self.recorder.history])
            self.status.progress(throttle_s=0, step=payload["steps"], steps=payload["steps"])

    # -- stages --------------------------------------------------------------------------------

    def _stage(self, name: str, enabled: bool, func) -> None:
        if self.status.is_done(name):
            print(f"[{self.backend}] {name}: already done, skipped", flush=True)
            return
        if not enabled:
            self.status.set_stage(name, "skipped")
            return
        print(f"[{self.backend}] {name}: started", flush=True)
        self.status.set_stage(name, "running")
        start = time.perf_counter()
        with self.recorder.phase(PHASES[name]):
            func()
        seconds = time.perf_counter() - start
        self.status.set_stage(name, DONE, seconds)
        print(f"[{self.backend}] {name}: done in {seconds:.1f} s", flush=True)

    def run(self, selected: tuple[str, ...]) -> None:
        self.open()
        self.run_stages(selected)

    def open(self) -> None:
        """Reopen the prepared data and build the model (with the trained weights when training is done)."""
        ctx = self.ctx
        with self.recorder.phase(PHASES["prepare-check"]):
            start = time.perf_counter()
            ctx.data = open_prepared(self.hook, self.data_settings, read_json(self.run_dir / "run.json")["data"]["key"])
            self.status.set_stage("prepare-check", DONE, time.perf_counter() - start)
            ctx.model = build_model(self.hook, self.settings, self.run_dir, self.backend, self.data_settings.run.seed)
            if self.status.is_done("train"):
                trained = canonical.load(self.folder / "weights_best.npz")
                require_answer(
                    self.hook.cxrbench_set_weights(model=ctx.model, weights=trained),
                    "cxrbench_set_weights",
                    self.backend,
                )

    def run_stages(self, selected: tuple[str, ...], only: tuple[str, ...] | None = None) -> None:
        """The selected stages in order; ``only`` leaves the others untouched (a launched world's rank 0 runs the
        stages after training once every rank's record has reached it)."""
        ctx, suite_stages = self.ctx, self.settings.run.stages
        shared = initial_weights.same_start(self.settings.model.init)
        if only is None or "equivalence" in only:
            self._stage(
                "equivalence",
                "equivalence" in selected and shared,
                lambda: stages.equivalence(ctx, self.run_dir / "equivalence_batch.npy"),
            )
        options = self.settings.profile
        wanted = {"ceiling": options.ceiling, "profile": options.enabled, "export": self.settings.export.onnx}
        for name in ("ceiling", "train", "profile", "evaluate", "cam", "export"):
            if only is not None and name not in only:
                continue  # a launched world: the ceiling and the profile are one process's measurements, not run
            enabled = _selected(name, selected, suite_stages) and wanted.get(name, True)
            self._stage(name, enabled, lambda name=name: getattr(stages, name)(ctx))
            if name == "profile":
                self.recorder.trained_loop = None  # the profile was the loop's last use: free its optimizer state


def _selected(name: str, selected: tuple[str, ...], suite_stages: tuple[str, ...]) -> bool:
    """A stage runs when the worker was asked for it and the suite's ``run.stages`` includes it (the ceiling and
    the profile belong to ``train``)."""
    return name in selected and (name in suite_stages or (name in ("ceiling", "profile") and "train" in suite_stages))


def open_prepared(hook, settings: Settings, key: str):
    """Reopen the prepared cache the parent built, and make sure it is the same one."""
    from cxrbench.data import cache, crop

    index = require_answer(hook.cxrbench_dataset(settings=settings), "cxrbench_dataset", settings.data.source)
    data = cache.prepare(index, settings.data.image_size, crop_spec=crop.spec_from_settings(settings.data))
    if data.key != key:
        raise DataError(
            f"prepared cache key {data.key[:16]} differs from the run's {key[:16]}: "
            "the data set changed since the run started"
        )
    return data


def build_model(hook, settings: Settings, run_dir: Path, backend: str, run_seed: int | None = None):
    """The model, started from the run folder's shared_init*.npz of its seed when ``model.init = "shared"`` (the
    record of what every backend got; equal to what :func:`cxrbench.backend.initial_weights.resolve` makes from the
    seed), otherwise as the backend resolves ``model.init`` through that function."""
    path = shared_init_path(run_dir, settings.run.seed, settings.run.seed if run_seed is None else run_seed)
    weights = canonical.load(path) if settings.model.init == "shared" else None
    return require_answer(
        hook.cxrbench_build_model(settings=settings, weights=weights), "cxrbench_build_model", backend
    )


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m cxrbench.run.worker", description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", required=True, type=Path)
    parser.add_argument("--backend", required=True)
    parser.add_argument("--folder", type=Path, help="results folder (default RUN_DIR/BACKEND)")
    parser.add_argument("--plugin", action="append", default=[], metavar="MODULE")
    parser.add_argument("--gpus", type=int, help="override settings.run.gpus (scaling sweeps)")
    parser.add_argument("--stages", default=",".join(WORKER_STAGES[1:]), help="comma-separated worker stages to run")
    parser.add_argument("--monitor-interval", type=float, default=1.0, help="seconds between monitor samples")
    parser.add_argument("--seed", type=int, help="override run.seed for the model and data order (seed repeats)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a setting (sweep points)"
    )
    parser.add_argument(
        "--launched",
        action="store_true",
        help="one rank of a world a framework's launcher started (torchrun, TF_CONFIG or Slurm, jax.distributed): "
        "joins it, checks its size; rank 0 alone writes the folder (docs/multi-node.md)",
    )
    return parser.parse_args(argv)


def _run_settings(run_dir: Path) -> Settings:
    run = read_json(run_dir / "run.json")
    if run is None:
        raise CxrError(f"{run_dir / 'run.json'}: no run there (cxrbench run --prepare-only --out {run_dir} makes one)")
    return Settings.from_dict(run["settings"], f"{run_dir / 'run.json'}")


def _settings(run: Settings, gpus: int | None, seed: int | None = None, sets: list[str] = ()) -> Settings:
    """The run's settings with this worker's GPU count, seed and sweep overrides."""
    overrides = dict(parse_set_option(text) for text in sets)
    overrides.update({"run.gpus": gpus, "run.seed": seed})
    return apply_overrides(run, overrides)


#: Why SIGTERM arrived when the worker sent it to itself (its parent is gone).
_stop_reason: list[str] = []
#: Seconds between checks that the parent orchestrator still runs.
PARENT_POLL_S = 0.5


def _raise_interrupted(signum, frame):
    raise Interrupted(_stop_reason[0] if _stop_reason else f"stopped by signal {signal.Signals(signum).name}")


def _watch_parent(parent: int) -> None:
    """Stop (as on SIGTERM) when the orchestrator dies: an orphan would race a resumed run for the folder."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_S)
        _stop_reason.append(f"the cxrbench run that started this worker (pid {parent}) is gone")
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="cxrbench-parent-watch", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    print(f"[{args.backend}] python {sys.executable} (cxrbench {__version__})", flush=True)
    if args.launched:
        from cxrbench.run import launched

        return launched.main(args)
    folder = args.folder or args.run_dir / args.backend
    status = BackendStatus(folder, args.backend)
    status.start(os.getpid())
    signal.signal(signal.SIGTERM, _raise_interrupted)
    _watch_parent(os.getppid())
    outcome, error, refused = "completed", None, False
    sampler = None
    try:
        run_settings = _run_settings(args.run_dir)
        settings = _settings(run_settings, args.gpus, args.seed, args.set)
        plugins = load_plugins(args.plugin, backend=args.backend)
        worker = Worker(args.run_dir, folder, args.backend, plugins, settings, status, run_settings)
        watched = run_gpu_indices(settings.run.gpus)
        sampler = Sampler(folder, args.backend, worker.recorder, args.monitor_interval, watch=watched).start()
        worker.ctx.energy_meter = open_energy_meter(watched)
        worker.recorder.energy = worker.ctx.energy
        worker.run(tuple(args.stages.split(",")))
    except (Interrupted, KeyboardInterrupt) as exc:
        outcome, error = "interrupted", str(exc) or "interrupted"
    except UnsupportedSetting as exc:  # refused by design: one line, no traceback, marked as a refusal
        outcome, error, refused = "failed", one_line(exc), True
    except BaseException as exc:  # any failure ends as one line in status.json, the traceback in log.txt
        traceback.print_exc()
        outcome, error = "failed", one_line(exc)
    finally:
        if sampler is not None:
            sampler.stop()
    print(f"[{args.backend}] {outcome}" + (f": {error}" if error else ""), flush=True)
    try:
        status.finish(outcome, error, refused=refused)
    except StorageError as exc:  # the disk that stopped the stage may refuse the status too: the parent records it
        print(f"[{args.backend}] could not record the outcome: {exc}", flush=True)
        return 1
    return {"completed": 0, "interrupted": 130}.get(outcome, 1)


if __name__ == "__main__":
    sys.exit(main())
