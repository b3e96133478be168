"""The comparison run: resolve suite and backends, prepare the data once, run one worker process per
backend, then merge their results, run the cross-backend checks and write the report.

Workers run one after another, never side by side, so no backend's timings include another's
load. A worker that fails or is killed is recorded as failed with its one-line error; the others
and every check that still makes sense go on. Ctrl-C stops the current worker, keeps what finished
and still writes ``run.json``, ``comparison.json`` and the report.
"""

from __future__ import annotations

import dataclasses
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from cxrbench import __version__
from cxrbench.backend import canonical, checkpoints, timing
from cxrbench.data import crop
from cxrbench.data.classes import CLASS_ORDER_NAME, CLASSES
from cxrbench.data.prepared import count_batches
from cxrbench.errors import BackendError, CxrError, StorageError, first_line, is_storage_fault, storage_error
from cxrbench.files import read_json, remove_orphaned_temporaries, save_npy, write_json, write_text
from cxrbench.machine.env import capture, gpu_inventory
from cxrbench.metrics import step_profile
from cxrbench.plugins import Plugins, load_plugins, missing_backend_message, no_backend_message, require_answer
from cxrbench.report import verdicts
from cxrbench.run import cluster, environments, keep, repeats, scaling, sweep, tracking
from cxrbench.run.child import start_process, stop_process
from cxrbench.run.comparison import write_comparison
from cxrbench.run.folder import (
    CROP_BOXES_CSV,
    EQUIVALENCE_BATCH,
    IMPORTED_INIT,
    LOG_TXT,
    OVERHEAD_JSON,
    REPEAT_STAGES,
    RUN_JSON,
    SCHEMA_VERSION,
    STATUS_JSON,
    backend_results,
    current_status,
    gpus_folder,
    log_of,
    nodes_folder,
    now_iso,
    repeat_folder,
    shared_init_path,
    sweep_folder,
)
from cxrbench.run.index_page import write_index
from cxrbench.run.progress import Progress, summary_table
from cxrbench.run.store import WORKER_STAGES, BackendStatus, RunLock, record_end
from cxrbench.suite import Settings

#: Images of the test split every backend's initial model is evaluated on (equivalence check).
EQUIVALENCE_IMAGES = 8
POLL_S = 0.5
#: Worker stages of a scaling sweep point (speed only).
SWEEP_STAGES = sweep.SWEEP_STAGES


@dataclass
class RunRequest:
    """A new run as the command line describes it."""

    settings: Settings
    backends: list[str] = field(default_factory=list)  #: empty: every installed backend
    plugins: list[str] = field(default_factory=list)
    out: Path | None = None
    gpus: str | None = None
    baseline: str | None = None
    argv: list[str] = field(default_factory=list)
    monitor_interval: float = 1.0
    sweep: list[str] = field(default_factory=list)  #: ``--sweep KEY=V1,V2`` texts
    pythons: dict[str, str] = field(default_factory=dict)  #: ``--python NAME=PATH``: a backend's own interpreter
    #: ``--executor``: run.json's ``executor`` record (:func:`cxrbench.run.cluster.executor_record`); None: here.
    executor: dict[str, Any] | None = None
    nodes: str | None = None  #: ``--nodes``: a machine count or a sweep such as ``1,2``
    #: ``--prepare-only``: the run folder without workers (a launcher the user runs starts the ranks).
    prepare_only: bool = False


def resolve_backends(plugins: Plugins, requested: list[str], pythons: dict[str, str] | None = None) -> list[str]:
    """The run's backends; one in its own environment (``--python``) is asked there and listed with the others."""
    for name, python in (pythons or {}).items():
        plugins.backends[name] = environments.backend_info(name, python)
    installed = plugins.backend_names()
    names = requested or installed
    if not names:
        raise BackendError(no_backend_message())
    for name in names:
        if name not in installed:
            raise BackendError(missing_backend_message(name, plugins))
    return list(dict.fromkeys(names))


def _default_out(settings: Settings) -> Path:
    return Path("reports") / f"{time.strftime('%Y%m%d-%H%M%S')}-{settings.name}"


def _check_gpus(counts: list[int]) -> None:
    if max(counts) > 0:
        scaling.check_available(counts, gpu_inventory())


def _dataset(plugins: Plugins, settings: Settings):
    """The data set's index: read (and so validated) before the run folder is created."""
    return require_answer(plugins.hook.cxrbench_dataset(settings=settings), "cxrbench_dataset", settings.data.source)


def _check_warmup(settings: Settings, index, gpu_counts: list[int], grid: dict[str, list[Any]]) -> None:
    """The warm-up must leave steps to time at the largest world size and at every sweep point."""
    for overrides in [point["overrides"] for point in sweep.points(grid)] or [{}]:
        train = settings.replace(**overrides).train
        images = len(index.rows("train"))
        steps = count_batches(images, train.batch_size, max([1, *gpu_counts]), max_steps=train.max_steps)
        timing.check_warmup(train.warmup_steps, steps)


def new_run(request: RunRequest) -> Orchestrator:
    """Check everything that can be refused (backends, GPUs, data, folder) before the run folder exists."""
    counts = scaling.parse_gpus(request.gpus) or [request.settings.run.gpus]
    node_counts = scaling.parse_gpus(request.nodes, "--nodes") or [request.settings.run.nodes]
    if request.executor is None:  # with an executor the jobs run on other machines, whose GPUs Slurm allocates
        _check_gpus(counts)
    plugins = load_plugins(request.plugins)
    backends = resolve_backends(plugins, request.backends, request.pythons)
    baseline = request.baseline or backends[0]
    if baseline not in backends:
        raise CxrError(f"--baseline {baseline!r} is not one of the run's backends ({', '.join(backends)})")
    settings = request.settings.replace(**{"run.gpus": counts[0], "run.nodes": node_counts[0]})
    run_dir = request.out or _default_out(settings)
    if not request.prepare_only:
        _check_executor(request.executor, run_dir, max(node_counts))
    imported = _import_init(settings, request.plugins)
    if imported is not None:
        settings = settings.replace(**{"model.init": str(Path(run_dir, IMPORTED_INIT).absolute())})
    grid = sweep.parse_grid(request.sweep, settings)
    crop_spec = crop.spec_from_settings(settings.data)
    crop.check(crop_spec)
    if crop_spec.model:  # workers and --resume find the network wherever they start
        settings = settings.replace(**{"data.crop_model": crop_spec.model})
    index = _dataset(plugins, settings)
    for _ in range(3):  # a grown phantom's splits are drawn by patient: check again after growing it
        replicas = sorted({nodes * max(1, gpus) for nodes in node_counts for gpus in counts})
        sized = scaling.size_for_counts(settings, len(index.rows("train")), len(index), replicas)
        if sized == settings:
            break
        settings, index = sized, _dataset(plugins, sized)
    _check_warmup(settings, index, [max(node_counts) * max(1, c) for c in counts], grid)
    if settings.run.overhead_rounds:
        if request.executor is not None:
            raise CxrError(
                "run.overhead_rounds times processes on the machine that runs `cxrbench run`, not on the cluster's: "
                "measure it with `cxrbench overhead` on a compute machine (docs/speed.md)"
            )
        from cxrbench.run import overhead

        steps = overhead.default_steps(settings)
        overhead.check_steps(settings, steps, len(index.rows("train")), "run.overhead_rounds: steps")
    _refuse_existing(run_dir)
    run = {
        "schema_version": SCHEMA_VERSION,
        "cxrbench_version": __version__,
        "suite": settings.name,
        "settings": settings.to_dict(),
        "environment": capture(),
        "created": now_iso(),
        "finished": None,
        "status": "running",
        "argv": request.argv,
        "baseline": baseline,
        "plugins": request.plugins,
        "pythons": request.pythons,
        "gpu_counts": counts,
        "node_counts": node_counts,
        "data": None,
        "backends": {name: {"status": "pending", "error": None, "log": log_of(name)} for name in backends},
        "scaling": None,
        "repeats": None,
        "verdicts": None,
        "sweep": {"grid": grid, "cells": None} if grid else None,
        "executor": request.executor,
        "init_checkpoint": checkpoints.record(Path(request.settings.model.init), IMPORTED_INIT, imported)
        if imported is not None
        else None,
    }
    orchestrator = Orchestrator(run_dir, run, plugins, request.monitor_interval, index, new=True)
    orchestrator.imported_init = imported
    orchestrator.prepare_only = request.prepare_only
    return orchestrator


def _check_executor(executor: dict[str, Any] | None, run_dir: Path, nodes: int) -> None:
    """Ranks on several machines come from a scheduler's job (or a launcher the user runs), never from here."""
    if executor is None:
        if nodes > 1:
            raise CxrError(
                f"run.nodes = {nodes}: ranks on several machines start through --executor slurm, or through your "
                "launcher after --prepare-only (docs/multi-node.md)"
            )
        return
    cluster.check_executor(executor, run_dir, nodes)


def _import_init(settings: Settings, plugin_modules: list[str]) -> dict[str, np.ndarray] | None:
    """``model.init = FILE`` in a framework's format, as canonical weights (refused before the run folder exists)."""
    if not checkpoints.is_foreign(settings.model.init):
        return None
    return checkpoints.import_in_child(settings.model.init, settings.model.arch, plugin_modules)


def _refuse_existing(run_dir: Path) -> None:
    if (run_dir / RUN_JSON).exists():
        raise CxrError(f"{run_dir}: already holds a run (use --resume {run_dir} to finish it, or another --out)")


def resume_run(run_dir: Path, argv: list[str], monitor_interval: float = 1.0) -> Orchestrator:
    """Reuse a run's settings, backends and plugins; completed backends and stages are skipped."""
    run = read_json(run_dir / RUN_JSON)
    if run is None:
        raise CxrError(f"--resume {run_dir}: no {RUN_JSON} there")
    if (run.get("kept") or {}).get("removed"):
        raise CxrError(
            f"--resume {run_dir}: the run completed and its large files were removed (run.keep = "
            f"{run['kept']['keep']}): nothing to resume"
        )
    plugins = load_plugins(run.get("plugins", []))
    resolve_backends(plugins, list(run["backends"]), run.get("pythons"))
    if not run.get("executor"):
        _check_gpus(run["gpu_counts"])
    settings = Settings.from_dict(run["settings"], str(run_dir / RUN_JSON))
    if run.get("executor"):
        _check_executor(run["executor"], run_dir, max(run.get("node_counts") or [settings.run.nodes]))
    index = _dataset(plugins, settings)
    run.update(status="running", finished=None, error=None)
    run.setdefault("resumed", []).append({"at": now_iso(), "argv": argv})
    return Orchestrator(run_dir, run, plugins, monitor_interval, index)


class Orchestrator:
    def __init__(
        self,
        run_dir: Path,
        run: dict[str, Any],
        plugins: Plugins,
        monitor_interval: float,
        index=None,
        new: bool = False,
    ):
        self.run_dir, self.run, self.plugins = Path(run_dir), run, plugins
        self.settings = Settings.from_dict(run["settings"], str(self.run_dir / RUN_JSON))
        self.backends = list(run["backends"])
        self.monitor_interval = monitor_interval
        self.progress = Progress(self.backends)
        self.index, self.new = index, new
        #: ``model.init``'s checkpoint as canonical weights, written to the run folder by :meth:`prepare`.
        self.imported_init: dict[str, np.ndarray] | None = None
        self.lock = RunLock(self.run_dir)
        self.tracker_notes: set[str] = set()
        self.prepare_only = False

    # -- before the workers ----------------------------------------------------------------------

    def _save_run(self) -> None:
        write_json(self.run_dir / RUN_JSON, self.run)

    def prepare(self) -> None:
        """The data set and its prepared cache (once, for every worker), shared weights, equivalence batch."""
        from cxrbench.data import cache

        settings = self.settings
        index = self.index if self.index is not None else _dataset(self.plugins, settings)
        crop_spec = crop.spec_from_settings(settings.data)
        data = cache.prepare(index, settings.data.image_size, crop_spec=crop_spec)
        test_boxes, mapping = data.mapped_boxes("test")
        self.run["data"] = {
            "source": index.source,
            "root": str(index.root),
            "key": data.key,
            "size": data.size,
            "splits": {split: int(len(data.rows(split))) for split in ("train", "val", "test")},
            "classes": list(CLASSES),
            "class_order": CLASS_ORDER_NAME,
            "boxes_test": len(test_boxes),
            "notes": list(index.notes),
            "crop": self._record_crop(crop_spec, data, mapping),
        }
        if settings.model.init == "shared":
            for seed in self.seeds():
                path = shared_init_path(self.run_dir, seed, settings.run.seed)
                if not path.exists():
                    canonical.save(canonical.init_canonical(settings.model.block_config, seed), path)
        if self.imported_init is not None and not (self.run_dir / IMPORTED_INIT).exists():
            canonical.save(self.imported_init, self.run_dir / IMPORTED_INIT)
        if not (self.run_dir / EQUIVALENCE_BATCH).exists():
            batch = np.ascontiguousarray(data.split_images("test")[:EQUIVALENCE_IMAGES])
            save_npy(self.run_dir / EQUIVALENCE_BATCH, batch)
        self._save_run()

    def _record_crop(self, crop_spec, data, mapping: dict[str, int]) -> dict[str, Any]:
        """run.json's ``data.crop``; with a crop, its boxes are copied beside run.json (crop_boxes.csv)."""
        record = crop_spec.describe()
        if crop_spec.active:
            boxes = [data.crop_boxes[name] for name in data.index.files]
            write_text(self.run_dir / CROP_BOXES_CSV, crop.boxes_csv(data.index.files, boxes))
            record.update(
                boxes_file=CROP_BOXES_CSV,
                images=len(boxes),
                fallbacks=sum(box.fallback for box in boxes),
                test_boxes_clipped=mapping["clipped"],
                test_boxes_outside=mapping["outside"],
            )
        return record

    def seeds(self) -> list[int]:
        """The seed of every repeat, the run's own first."""
        return [repeats.seed_of(self.settings.run.seed, i) for i in range(1, self.settings.run.repeats + 1)]

    # -- workers ---------------------------------------------------------------------------------

    def _worker_command(
        self, name: str, gpus: int, folder: Path, stages: tuple[str, ...], extra: list[str]
    ) -> list[str]:
        python = (self.run.get("pythons") or {}).get(name, sys.executable)
        return [python, "-u", "-m", "cxrbench.run.worker", *self._worker_args(name, gpus, folder, stages, extra)]

    def _worker_args(self, name: str, gpus: int, folder: Path, stages: tuple[str, ...], extra: list[str]) -> list[str]:
        command = [
            "--run-dir",
            str(self.run_dir),
            "--backend",
            name,
            "--folder",
            str(folder),
            "--gpus",
            str(gpus),
            "--stages",
            ",".join(stages),
            "--monitor-interval",
            str(self.monitor_interval),
            *extra,
        ]
        for module in self.run.get("plugins", []):
            command += ["--plugin", module]
        return command

    def run_worker(
        self,
        name: str,
        gpus: int,
        folder: Path,
        stages: tuple[str, ...],
        extra: list[str] | None = None,
        prepared: bool = False,
    ) -> bool:
        """Start the worker, show its progress until it exits, and record how it ended; False when it had completed
        before (a resumed run) and did not run (``prepared``: ``extra`` is the worker's whole argument list,
        :meth:`cells` made it)."""
        status = BackendStatus(folder, name)
        if status.data["status"] == "completed":
            self.progress.update(name, status.data)
            return False
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / LOG_TXT, "a", encoding="utf-8") as log:
            log.write(f"=== cxrbench worker {name} started {now_iso()}\n")
            log.flush()
            python = (self.run.get("pythons") or {}).get(name, sys.executable)
            command = (
                [python, "-u", "-m", "cxrbench.run.worker", *(extra or [])]
                if prepared
                else self._worker_command(name, gpus, folder, stages, extra or [])
            )
            # The worker holds the folder's lock with us: a resumed run waits until an orphaned worker has stopped.
            process = start_process(command, log, pass_fds=(self.lock.fd,) if self.lock.fd is not None else ())
            try:
                returncode = self._wait(name, process, folder)
            except KeyboardInterrupt:
                stop_process(process)
                self._record_end(name, folder, process.returncode, interrupted=True)
                raise
        self._record_end(name, folder, returncode)
        return True

    def record_curves(self, name: str) -> None:
        """The backend's training curves to every tracker (TensorBoard built in); each note is shown once per run."""
        for line in tracking.record(self.plugins.hook, self.run_dir, name, self.run_dir / name):
            if line not in self.tracker_notes:
                self.tracker_notes.add(line)
                self.progress.message(line)

    def _wait(self, name: str, process: subprocess.Popen, folder: Path) -> int:
        while True:
            try:
                return process.wait(timeout=POLL_S)
            except subprocess.TimeoutExpired:
                self.progress.update(name, read_json(folder / STATUS_JSON))

    def _record_end(self, name: str, folder: Path, returncode: int | None, interrupted: bool = False) -> None:
        """A worker that died without recording its outcome is marked here, naming the signal."""
        self.progress.update(name, record_end(folder, name, returncode, interrupted))

    def cells(self) -> list[cluster.Cell]:
        """Every worker the run needs, grouped in cells: the backends of one cell run one after another on the
        same machine(s) (the first GPU count, every further count of ``--gpus``, each repeat, each sweep point)."""
        counts, first = self.run["gpu_counts"], self.run["gpu_counts"][0]

        def cell(
            name: str, gpus: int, folder_of, stages: tuple[str, ...], extra: list[str], nodes: int | None = None
        ) -> cluster.Cell:
            calls = tuple(
                cluster.WorkerCall(
                    backend,
                    str(folder_of(backend)),
                    (self.run.get("pythons") or {}).get(backend, sys.executable),
                    tuple(self._worker_args(backend, gpus, folder_of(backend), stages, extra)),
                )
                for backend in self.backends
            )
            return cluster.Cell(name, calls, nodes or self.settings.run.nodes, gpus)

        cells = [cell("main", first, lambda b: self.run_dir / b, WORKER_STAGES, [])]
        for gpus in counts[1:]:
            cells.append(
                cell(f"gpus-{gpus}", gpus, lambda b, g=gpus: gpus_folder(self.run_dir, b, g, first), SWEEP_STAGES, [])
            )
        node_counts = self.run.get("node_counts") or [self.settings.run.nodes]
        for nodes in node_counts[1:]:
            folder_of = lambda b, n=nodes: nodes_folder(self.run_dir, b, n, node_counts[0])  # noqa: E731
            cells.append(cell(f"nodes-{nodes}", first, folder_of, SWEEP_STAGES, ["--set", f"run.nodes={nodes}"], nodes))
        for i, seed in enumerate(self.seeds()[1:], start=2):
            cells.append(
                cell(
                    f"repeat-{i}",
                    first,
                    lambda b, i=i: repeat_folder(self.run_dir, b, i),
                    REPEAT_STAGES,
                    ["--seed", str(seed)],
                )
            )
        for point in sweep.points((self.run.get("sweep") or {}).get("grid") or {}):
            cells.append(
                cell(
                    f"sweep-{point['name']}",
                    first,
                    lambda b, p=point: sweep_folder(self.run_dir, p["name"], b),
                    SWEEP_STAGES,
                    sweep.set_options(point["overrides"]),
                )
            )
        return cells

    def run_workers(self) -> None:
        """Every cell here, one worker after another, or as cluster jobs (``--executor``)."""
        executor = self.run.get("executor")
        if executor:
            cluster.run_cells(self.run_dir, self.cells(), executor, self._save_run, self.progress)
            for name in self.backends:
                self.record_curves(name)
            return
        for cell in self.cells():
            for call in cell.calls:
                ran = self.run_worker(call.backend, cell.gpus, Path(call.folder), (), list(call.args), prepared=True)
                if ran and cell.name == "main":
                    self.record_curves(call.backend)

    def run_overhead(self, gpus: int) -> None:
        """``run.overhead_rounds``: every completed backend against its framework's idiomatic loop, into its folder's
        overhead.json (:mod:`cxrbench.run.overhead`); a backend already measured (``--resume``) is skipped."""
        rounds = self.settings.run.overhead_rounds
        if not rounds:
            return
        from cxrbench.run import overhead

        for name in self.backends:
            folder = self.run_dir / name
            if (folder / OVERHEAD_JSON).exists() or BackendStatus(folder, name).data["status"] != "completed":
                continue
            measurement = overhead.Measurement(
                run_dir=self.run_dir,
                folder=folder,
                backend=name,
                rounds=rounds,
                steps=overhead.default_steps(self.settings),
                python=(self.run.get("pythons") or {}).get(name, sys.executable),
                plugins=self.run.get("plugins", []),
                monitor_interval=self.monitor_interval,
                gpus=min(gpus, 1),
            )
            self.progress.message(overhead.sentence(name, overhead.measure(measurement, self.progress.message)))

    # -- after the workers -----------------------------------------------------------------------

    def backend_summary(self, name: str) -> dict[str, Any]:
        folder = self.run_dir / name
        status = read_json(folder / STATUS_JSON) or {"status": "pending", "error": None}
        info = self.plugins.backends.get(name)
        return {
            "status": status["status"] if status["status"] != "running" else "interrupted",
            "error": status.get("error"),
            "info": dataclasses.asdict(info) if info else None,
            "stages": status.get("stages", {}),
            "stage_seconds": status.get("stage_seconds", {}),
            **backend_results(folder, read_json),
            "log": log_of(name),
        }

    def _ort_threads(self) -> int:
        return self.settings.numerics.intra_op_threads or psutil.cpu_count(logical=False) or 1

    def finish(self, outcome: str) -> dict[str, Any]:
        """Merge the workers' files into run.json, run the checks, write the report."""
        self.run["backends"] = {name: self.backend_summary(name) for name in self.backends}
        self.run["profile_comparison"] = step_profile.compare(
            self.run["backends"], self.run.get("baseline"), step_profile.global_batch(self.run["settings"])
        )
        self.run["scaling"] = scaling.scaling_table(
            self.run_dir, self.backends, self.run["gpu_counts"], self.run.get("node_counts")
        )
        self.run["repeats"] = repeats.collect(
            self.run_dir,
            self.backends,
            self.settings.run.repeats,
            self.settings.run.seed,
            list(CLASSES),
            self.settings.eval,
        )
        if self.run.get("sweep"):
            self.run["sweep"] = sweep.table(self.run_dir, self.backends, self.run["sweep"]["grid"])
            sweep.write_csv(self.run_dir, self.run["sweep"])
        comparison = (
            write_comparison(self.run_dir, self.backends, self.settings, self._ort_threads())
            if self.run["data"]
            else {}
        )
        self.run["verdicts"] = verdicts.build(self.run, comparison)
        complete = all(b["status"] == "completed" for b in self.run["backends"].values())
        self.run["kept"] = keep.prune(self.run_dir, self.settings.run.keep, complete and outcome == "completed")
        self.run.update(status=outcome, finished=now_iso())
        self._save_run()
        report = write_index(self.run_dir, self.run, comparison, self.run["baseline"])
        print(summary_table(self.run, comparison), file=sys.stderr)
        for failure in comparison.get("equivalence", {}).get("failures", []):
            print(f"equivalence FAILED: {failure}", file=sys.stderr)
        print(f"report: {report}", file=sys.stderr)
        return comparison

    def execute(self) -> int:
        """The whole run; the exit status is 0 only when every backend completed and every check passed. With
        ``prepare_only``: the run folder, its data and shared weights, no worker (a launcher starts the ranks)."""
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise (storage_error(exc, self.run_dir) if is_storage_fault(exc) else exc) from None
        note = self.lock.acquire()
        try:
            if note:
                self.progress.message(f"note: {note}")
                self._remove_orphaned_temporaries(self.run_dir, recursive=False)  # the killed run's own files
            return self._prepare_locked() if self.prepare_only else self._execute_locked()
        finally:
            self.lock.release()

    def _prepare_locked(self) -> int:
        _refuse_existing(self.run_dir)
        self.prepare()
        self.run.update(status="prepared")
        self._save_run()
        self.progress.message(
            f"prepared {self.run_dir}: start the workers (python -m cxrbench.run.worker --launched --run-dir "
            f"{self.run_dir} --backend NAME), then `cxrbench run --resume {self.run_dir}`"
        )
        return 0

    def _execute_locked(self) -> int:
        if self.new:
            _refuse_existing(self.run_dir)  # another run may have started here since new_run() looked
        self._mark_stale_backends()
        self._save_run()
        # Ctrl-C and SIGTERM both stop the run cleanly, even where SIGINT was ignored at start (`cmd &`).
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        self.progress.message(f"cxrbench run {self.settings.name}: {', '.join(self.backends)} -> {self.run_dir}")
        outcome = "completed"
        try:
            try:
                self.prepare()
                self.run_workers()
                self.run_overhead(self.run["gpu_counts"][0])
            except KeyboardInterrupt:
                outcome = "interrupted"
                self.progress.message("interrupted: workers stopped, writing what finished")
            comparison = self.finish(outcome)
        except StorageError as exc:
            self._record_failure(exc)
            resume = f"cxrbench run --resume {self.run_dir}"
            raise StorageError(f"{exc}; results so far are kept: free space, then `{resume}`") from None
        except Exception as exc:
            self._record_failure(exc)
            raise
        return exit_status(self.run, comparison)

    def _mark_stale_backends(self) -> None:
        """A backend left ``running`` by a process that is gone was interrupted: say so, then resume it."""
        for name in self.backends:
            status = BackendStatus(self.run_dir / name, name)
            if status.data["status"] == "running" and current_status(status.data) == "interrupted":
                stage = status.data.get("stage") or "start-up"
                status.finish(
                    "interrupted",
                    f"its process (pid {status.data.get('pid')}) ended without recording an "
                    f"outcome during stage {stage}",
                )
                self.progress.message(
                    f"note: {name} was interrupted during stage {stage} (process "
                    f"{status.data.get('pid')} is gone); resuming it from its last completed stage"
                )
                self._remove_orphaned_temporaries(self.run_dir / name)

    def _remove_orphaned_temporaries(self, folder: Path, recursive: bool = True) -> None:
        """A process killed mid-write leaves its temporary file (never a partial file under a final name)."""
        for leftover in remove_orphaned_temporaries(folder, recursive):
            self.progress.message(f"note: removed {leftover}, a partial write its killed process left")

    def _record_failure(self, exc: Exception) -> None:
        """run.json says ``failed`` with the error; files already written stay, and ``--resume`` goes on from them."""
        error = first_line(exc) if isinstance(exc, CxrError) else first_line(exc, with_type=True)
        self.run.update(status="failed", error=error, finished=now_iso())
        try:
            self.run["backends"] = {name: self.backend_summary(name) for name in self.backends}
            self._save_run()
        except CxrError:
            pass  # e.g. the full disk refuses run.json too: `report` and `--resume` then see it as interrupted


def exit_status(run: dict[str, Any], comparison: dict[str, Any]) -> int:
    if run["status"] == "interrupted":
        return 130
    backends_ok = all(b["status"] == "completed" for b in run["backends"].values())
    repeat_lists = [b["repeats"] for b in ((run.get("repeats") or {}).get("backends") or {}).values()]
    repeats_ok = all(r["status"] == "completed" for listed in repeat_lists for r in listed)
    equivalent = comparison.get("equivalence", {}).get("passed") is not False
    parity = all(p.get("passed") for p in comparison.get("parity", {}).values())
    return 0 if backends_ok and repeats_ok and equivalent and parity else 1
