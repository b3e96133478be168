"""The GPU check: cxrbench's GPU code paths and DenseNet-121 figures from one command, made for the project's GPU
machine as it is (one H200; Python 3.12 with torch 2.11, jax 0.11.2, no TensorFlow, nothing installable; 10 minutes
per command, about 15 per visit, at most 8 result files two folders deep).

One command on that machine (the `device` tool's `run`, timeout_s=600):

    bash tools/gpu-check.sh --out $OUT

Setup, offline: nothing is installed. The core and every first-party backend whose framework imports here are put on
PYTHONPATH from this checkout, with generated .dist-info records (tools/tree_site.py) so their entry points are found;
distributions already installed are used as they are. A backend whose framework is missing (Keras: no TensorFlow on
that machine) is reported as not installed and its steps are skipped with that reason; the others still run.

Steps, cheap and risky first; each in fresh processes, each with its own time limit (seconds; the estimates for one
H200 are guesses until a visit has measured them):

  step            estimate  limit  what
  devices               30     90  what torch / JAX / TensorFlow see, next to NVML (a framework blind to the GPU fails)
  syncs-torch           30     90  host syncs per training step in bf16 and fp16 (torch's sync debug mode)
  ddp-torch             40    120  the DDP path: NCCL, one rank per GPU (one on one GPU); + torch.compile with 2 GPUs
  mirrored-keras        60    180  MirroredStrategy over two logical devices (Keras only)
  ddp-sigterm           60    120  SIGTERM to a 2-GPU DDP run: no rank may outlive it (2 GPUs only)
  visible-device        60    150  a run on a non-first GPU through CUDA_VISIBLE_DEVICES (2 GPUs only)
  oversized            100    180  batch 1280 at 448 px: must end in the one-line out-of-memory error, per backend
  tf32                  45    120  equivalence + ONNX parity of the initial model with numerics.tf32 = true
  sweep                200    300  DenseNet-121 at 224 px, batch 64, 40 steps: the fp32 run with every stage
                                   (equivalence and ONNX parity with TF32 off, NVML utilisation per phase, framework
                                   peak memory), then bf16 x channels_last (cudnn.benchmark on); JAX's bf16 is refused
  compile              120    200  torch.compile (bf16, channels_last): last, its cold compile time is the least known

Budget: --budget-s (default 520 s, under 9 minutes). A step starts only when the time left covers its estimate (the
sweep: 120 s, enough for its fp32 run); it runs at most min(its limit, the time left), and a step cut at its limit is
"timed out" and keeps what its run folder already wrote. --steps NAME,... runs a subset (a second command in the same
visit for what was skipped). JAX workers share one persistent compilation cache (JAX_COMPILATION_CACHE_DIR in the work
folder): a worker compiling a step another already compiled loads it.

Results under --out (at most 8 files, flat; each under 16 MiB):
  gpu-check.json          the summary, rewritten after every step: environment, backends, every step's record, figures
  gpu-check.log           everything printed, the end of each failing command's output and worker log
  oversized-run.json      run.json of the step (each backend's one-line error)
  tf32-comparison.json    comparison.json of the step (equivalence matrix with TF32 on)
  sweep-run.json          run.json of the sweep (fp32 run, every cell, numerics records, GPU summaries)
  sweep-comparison.json   comparison.json of the sweep (equivalence, ONNX parity, agreement, ONNX Runtime)
  compile-run.json        run.json of the compile step
The run folders themselves (hundreds of files, ONNX exports) stay in --work (default: a new folder under $TMPDIR).

Carried wheels: none is needed on that machine (it has every package the core, the pytorch and jax backends use; GPUtil,
FastAPI, uvicorn and pydicom are optional and unused here). Should an image lack one, make wheels here and carry them in
a folder git ignores, e.g. .whl/ (`echo /.whl/ >> .git/info/exclude`):
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl NAME==VERSION
    python3 -m pip wheel --no-deps -w .whl NAME==VERSION      # a pure-Python package published without a wheel
then name the folder in the run's carry list and pass --wheels .whl: the check installs them with
`pip install --no-index --no-deps --target` into its work folder and puts that first on PYTHONPATH.

--dry-run runs the same steps at tiny sizes on the CPU (tests the check itself; no GPU needed). Without it, a machine
with no NVIDIA GPU is refused in one line. Exit status: 0 every step passed or was skipped, 1 a step failed or timed
out, 2 bad input or no GPU.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tree_site

REPO = Path(__file__).resolve().parent.parent
PROBES = Path(__file__).resolve().parent / "gpu_check_probes.py"

#: Whole-check budget on a GPU (seconds); a dry run's is larger (a loaded 2-core CI machine), never the limit there.
BUDGET_S = 520.0
DRY_BUDGET_S = 1500.0
#: Seconds a timed-out step's command gets to stop its workers after SIGTERM before SIGKILL; reserved in every limit.
STOP_GRACE_S = 20
#: The result files --out may hold (the machine returns at most 8, at most 16 MiB each).
OUT_FILES = (
    "gpu-check.json",
    "gpu-check.log",
    "oversized-run.json",
    "tf32-comparison.json",
    "sweep-run.json",
    "sweep-comparison.json",
    "compile-run.json",
)
MAX_FILE_BYTES = 16 * 2**20
#: Lines of a failing command's output (and of a failed worker's log) copied into the log.
TAIL_LINES = 40
#: Which probe tells what a backend's framework sees.
FRAMEWORK_PROBE = {"pytorch": "torch", "keras": "tensorflow", "jax": "jax"}


@dataclass(frozen=True)
class Step:
    name: str
    estimate_s: int  #: expected seconds on the GPU machine (a guess until measured there)
    limit_s: int  #: the most it may take
    minimum_s: int | None = None  #: the least time worth starting it with (default: the estimate)
    dry_limit_s: int = 600  #: the most it may take in a dry run


STEPS = {
    step.name: step
    for step in (
        Step("devices", 30, 90),
        Step("syncs-torch", 30, 90),
        Step("ddp-torch", 40, 120),
        Step("mirrored-keras", 60, 180),
        Step("ddp-sigterm", 60, 120),
        Step("visible-device", 60, 150),
        Step("oversized", 100, 180),
        Step("tf32", 45, 120),
        Step("sweep", 200, 300, minimum_s=120, dry_limit_s=900),
        Step("compile", 120, 200),
    )
}

#: The data and model every run step shares: DenseNet-121 at 224 px on 3,600 phantom images (2,567 for training: 40
#: full steps at batch 64); the dry run's: a tiny DenseNet at 32 px (the tests' TINY_RUN data).
BASE = {
    "gpu": [
        "model.arch=densenet121",
        "data.phantom_images=3600",
        "data.phantom_size=256",
        "data.image_size=224",
        "train.epochs=1",
        "train.batch_size=64",
        "train.max_steps=40",
        "eval.bootstrap_rounds=100",
        "eval.cam_images=8",
    ],
    "dry": [
        "model.arch=densenet-tiny",
        "data.phantom_images=120",
        "data.phantom_size=64",
        "data.image_size=32",
        "train.epochs=1",
        "train.batch_size=4",
        "train.max_steps=6",
        "train.warmup_steps=1",
        "train.window_steps=1",
        "eval.bootstrap_rounds=10",
        "eval.cam_images=2",
    ],
}
#: The oversized batch: at 448 px DenseNet-121 keeps about 550 MiB of activations per image for the backward pass
#: (138 MiB at 224, measured with torch's saved-tensor hooks), so 1,280 images need about 690 GiB: five times an
#: H200. Two steps (2 x 1,280 of the 2,567 training images) leave one after the one-step warm-up, so the run is not
#: refused before training. The dry run rehearses the same settings at a size that fits and must reach training.
OVERSIZED = {
    "gpu": ["data.image_size=448", "train.batch_size=1280", "train.max_steps=2", "train.warmup_steps=1"],
    "dry": ["train.max_steps=2", "train.warmup_steps=1"],  # the sweep's batch: JAX compiles its step once for both
}
#: The sweep's grid beside its fp32 run (NCHW, the suite's cudnn.benchmark off): bf16 in both layouts with cuDNN
#: autotuning, the configuration timm's benchmark measures. The dry run keeps one point (fewer processes).
SWEEP_GRID = {
    "gpu": ["numerics.precision=bf16", "numerics.channels_last=false,true", "numerics.cudnn_benchmark=true"],
    "dry": ["numerics.precision=bf16", "numerics.channels_last=true"],
}
COMPILE_SETS = [
    "numerics.compile=true",
    "numerics.jit_compile=true",
    "numerics.precision=bf16",
    "numerics.channels_last=true",
    "numerics.cudnn_benchmark=true",
]
#: The kit-sized model of the probes (image side).
PROBE_SIZE = {"gpu": 64, "dry": 32}


class StepTimedOut(Exception):
    """A step's command ran into its limit; the record keeps what it wrote."""


class WheelsError(Exception):
    """``--wheels`` names no wheel, or pip cannot install them offline (one line, exit 2)."""


# -- the environment ---------------------------------------------------------------------------------


def install_wheels(wheels: Path, target: Path) -> list[str]:
    """Every wheel in ``wheels`` into ``target`` with pip, offline and without dependencies; the PYTHONPATH entry."""
    found = sorted(wheels.glob("*.whl"))
    if not found:
        raise WheelsError(f"--wheels {wheels}: no .whl file there")
    command = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--upgrade"]
    done = subprocess.run([*command, "--target", str(target), *map(str, found)], capture_output=True, text=True)
    if done.returncode != 0:
        lines = [line for line in (done.stderr + done.stdout).splitlines() if line.strip()]
        raise WheelsError(f"--wheels {wheels}: pip failed: {lines[-1] if lines else done.returncode}")
    return [str(target.resolve())]


def _frameworks_missing(frameworks: tuple[str, ...]) -> list[str]:
    return [name for name in frameworks if importlib.util.find_spec(name) is None]


def expose_tree(site: Path) -> tuple[list[str], list[str]]:
    """Make the checkout's distributions importable where they are not installed: the core, and each first-party
    backend whose frameworks import here. Returns (PYTHONPATH entries, distribution names exposed)."""
    if importlib.util.find_spec("cxrbench") is None:
        sys.path.insert(0, str(REPO))  # read FIRST_PARTY_BACKENDS from this checkout
    from cxrbench.plugins import FIRST_PARTY_BACKENDS

    folders = [] if tree_site.installed("cxrbench", REPO) else ["."]
    for backend in FIRST_PARTY_BACKENDS.values():
        wanted = not backend.example and not _frameworks_missing(backend.frameworks)
        if wanted and not tree_site.installed(backend.distribution, REPO):
            folders.append(backend.folder)
    distributions = [tree_site.read(REPO / folder) for folder in folders]
    return (tree_site.expose(distributions, site) if distributions else []), [d.name for d in distributions]


def prepare_environment(work: Path, wheels: Path | None, dry: bool) -> dict[str, Any]:
    """PYTHONPATH (carried wheels, the exposed checkout) for this process and every child, and the caches the steps
    share: the prepared data (CXRBENCH_CACHE, unless set) and JAX's persistent compilation cache. A dry run hides
    any GPU from its children, so it runs on the CPU wherever it runs."""
    entries = install_wheels(wheels, work / "wheels") if wheels else []
    for entry in reversed(entries):
        sys.path.insert(0, entry)
    exposed_entries, exposed = expose_tree(work / "site")
    entries += exposed_entries
    for entry in reversed(exposed_entries):
        sys.path.insert(0, entry)
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([*entries, *([old] if old else [])])
    os.environ.setdefault("CXRBENCH_CACHE", str(work / "cache"))
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(work / "jax-cache"))
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")  # every compile is worth keeping here
    os.environ["PYTHONUNBUFFERED"] = "1"
    if dry:
        os.environ.update(CUDA_VISIBLE_DEVICES="", JAX_PLATFORMS="cpu")
    return {
        "python": sys.executable,
        "python_version": sys.version.split()[0],
        "exposed_from_checkout": exposed,
        "pythonpath_added": entries,
        "cxrbench_cache": os.environ["CXRBENCH_CACHE"],
        "jax_compilation_cache_dir": os.environ["JAX_COMPILATION_CACHE_DIR"],
        "wheels": str(wheels) if wheels else None,
    }


def available_backends(requested: list[str]) -> dict[str, str | None]:
    """Backend -> None when it can run here, else why not (its framework does not import, or no plugin answers)."""
    from cxrbench.plugins import FIRST_PARTY_BACKENDS, load_plugins

    found = load_plugins().backends
    reasons: dict[str, str | None] = {}
    for name in requested:
        known = FIRST_PARTY_BACKENDS.get(name)
        missing = _frameworks_missing(known.frameworks) if known else []
        if missing:
            reasons[name] = f"not installed: {', '.join(missing)} cannot be imported here"
        elif name not in found:
            reasons[name] = f"no plugin answers to {name!r} (installed backends: {', '.join(found) or 'none'})"
        else:
            reasons[name] = None
    return reasons


# -- the check ---------------------------------------------------------------------------------------


class Check:
    """Runs the steps in order, keeps their records, rewrites the summary after each, copies the key files."""

    def __init__(self, out: Path, work: Path, dry: bool, budget_s: float, gpu_count: int, summary: dict[str, Any]):
        self.out, self.work, self.dry, self.budget_s, self.gpus = out, work, dry, budget_s, gpu_count
        self.mode = "dry" if dry else "gpu"
        self.summary = summary
        self.backends = [name for name, reason in summary["backends"].items() if reason is None]
        self.steps: dict[str, dict[str, Any]] = summary["steps"]
        self.start = time.monotonic()
        self.limit_s, self.deadline = 0.0, 0.0

    # -- output ------------------------------------------------------------------------------------

    def log(self, text: str) -> None:
        print(text, flush=True)
        with open(self.out / "gpu-check.log", "a", encoding="utf-8") as log:
            log.write(text + "\n")

    def save(self) -> None:
        from cxrbench.files import write_json

        self.summary["seconds"] = round(time.monotonic() - self.start, 1)
        self.summary["passed"] = all(s["status"] in ("passed", "skipped") for s in self.steps.values())
        self.summary["complete"] = not any(s.get("for_time") or s["status"] == "timed out" for s in self.steps.values())
        write_json(self.out / "gpu-check.json", self.summary)

    def keep(self, source: Path, name: str) -> str | None:
        """Copy a run's file into --out under one of the allowed names; a missing or too large one is noted."""
        assert name in OUT_FILES, name
        if not source.is_file():
            return None
        if source.stat().st_size > MAX_FILE_BYTES:
            self.log(f"[gpu-check] {source} is over {MAX_FILE_BYTES} bytes: not copied to {self.out}")
            return None
        shutil.copyfile(source, self.out / name)
        return name

    # -- running things ----------------------------------------------------------------------------

    def _left(self) -> float:
        return self.budget_s - (time.monotonic() - self.start)

    def command(self, args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """Run ``args`` until the current step's deadline: then SIGTERM to its process group (``cxrbench run`` stops
        its worker and writes what finished; a probe's DDP ranks go with it), SIGKILL after a grace period, and
        :class:`StepTimedOut`."""
        process = subprocess.Popen(
            args,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
        try:
            output, _ = process.communicate(timeout=max(self.deadline - time.monotonic(), 1.0))
        except subprocess.TimeoutExpired:
            output = _stop(process)
            self._tail(args, output)
            raise StepTimedOut(f"timed out after {self.limit_s:.0f} s") from None
        except KeyboardInterrupt:  # the child runs in its own session: Ctrl-C reaches only this process
            _stop(process)
            raise
        if process.returncode != 0:
            self._tail(args, output)
        return subprocess.CompletedProcess(args, process.returncode, output, "")

    def _tail(self, args: list[str], output: str | None) -> None:
        lines = [line for line in (output or "").replace("\r", "\n").splitlines() if line.strip()]
        self.log(f"[gpu-check]   $ {' '.join(args[:6])} ... (last {TAIL_LINES} lines)")
        for line in lines[-TAIL_LINES:]:
            self.log(f"[gpu-check]   | {line}")

    def probe(self, name: str, *extra: str) -> dict[str, Any]:
        done = self.command([sys.executable, str(PROBES), name, *extra])
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        if done.returncode != 0 or not lines:
            raise RuntimeError(_last_line(done))
        return json.loads(lines[-1])

    def run(
        self,
        name: str,
        sets: list[str],
        backends: list[str],
        extra: list[str] = (),
        env: dict[str, str] | None = None,
        keep: tuple[tuple[str, str], ...] = (),
    ) -> dict[str, Any]:
        """``cxrbench run`` into WORK/runs/<name>; its run.json (with comparison.json under "comparison"), also when
        it timed out (what it wrote by then; the StepTimedOut is raised again after the files are kept)."""
        folder = self.work / "runs" / name
        args = [sys.executable, "-m", "cxrbench", "run", "--suite", "throughput", "--out", str(folder)]
        args += ["--monitor-interval", "0.25"]
        for backend in backends:
            args += ["--backend", backend]
        for text in [*BASE[self.mode], *sets]:
            args += ["--set", text]
        timed_out = None
        try:
            done = self.command([*args, *extra], env)
        except StepTimedOut as exc:
            timed_out, done = exc, None
        for source, target in keep:
            self.keep(folder / source, target)
        run = _read(folder / "run.json")
        if run is None:
            if timed_out:
                raise timed_out
            raise RuntimeError(_last_line(done))
        run["comparison"] = _read(folder / "comparison.json") or {}
        run["exit_code"] = None if done is None else done.returncode
        if timed_out:
            _from_folders(folder, run)
        self._worker_tails(folder, run)
        if timed_out:
            raise StepTimedOut(f"{timed_out}; the record holds what the run wrote by then", run)
        return run

    def _worker_tails(self, folder: Path, run: dict[str, Any]) -> None:
        for backend, record in run.get("backends", {}).items():
            if record.get("status") not in ("completed", None):
                log = folder / backend / "log.txt"
                lines = log.read_text(encoding="utf-8", errors="replace").splitlines() if log.is_file() else []
                self.log(f"[gpu-check]   {backend} {record.get('status')}: {record.get('error')}")
                for line in lines[-TAIL_LINES:]:
                    self.log(f"[gpu-check]   {backend} | {line}")

    # -- the step loop -----------------------------------------------------------------------------

    def execute(self, selected: list[str]) -> None:
        for name in STEPS:
            if name in selected:
                self.step(STEPS[name], getattr(self, name.replace("-", "_")))
        self.summary["figures"] = figures(self.steps)
        self.save()

    def step(self, step: Step, func) -> None:
        """Run one step (or skip it, saying why); its record gets status, seconds and what ``func`` returned."""
        left = self._left() - STOP_GRACE_S
        needed = 0 if self.dry else (step.minimum_s if step.minimum_s is not None else step.estimate_s)
        skip = self.skip_reason(step.name)
        record: dict[str, Any] = {"estimate_s": step.estimate_s}
        if skip is None and left < needed:
            skip = f"{max(left, 0):.0f} s of the budget left, the step needs about {needed} s (--budget-s, --steps)"
            record["for_time"] = True
        if skip:
            self.steps[step.name] = {"status": "skipped", "reason": skip, **record}
            self.log(f"[gpu-check] {step.name}: skipped ({skip})")
            self.save()
            return
        self.limit_s = max(1.0, min(step.dry_limit_s if self.dry else step.limit_s, left))
        self.deadline = time.monotonic() + self.limit_s
        self.log(f"[gpu-check] {step.name}: started (limit {self.limit_s:.0f} s)")
        self.steps[step.name] = {"status": "running", **record}
        self.save()
        began, cpu = time.monotonic(), _children_cpu_s()
        try:
            result = func()
            status = result.pop("status", "passed")
        except StepTimedOut as exc:
            partial = exc.args[1] if len(exc.args) > 1 else {}
            result, status = {"error": exc.args[0], **self.partial(step.name, partial)}, "timed out"
        except Exception as exc:  # one step's failure is a result; the next steps still run
            result, status = {"error": f"{type(exc).__name__}: {exc}".splitlines()[0]}, "failed"
        seconds = round(time.monotonic() - began, 1)
        self.steps[step.name] = {"status": status, "seconds": seconds, "limit_s": round(self.limit_s), **record}
        self.steps[step.name]["cpu_s"] = round(_children_cpu_s() - cpu, 1)
        self.steps[step.name].update(result)
        error = f" ({result['error']})" if result.get("error") else ""
        cpu = self.steps[step.name]["cpu_s"]
        self.log(f"[gpu-check] {step.name}: {status} in {seconds} s ({cpu} s CPU){error}")
        self.save()

    def partial(self, name: str, run: dict[str, Any]) -> dict[str, Any]:
        """What a timed-out run step's folder holds, read as the step would have read it."""
        if not run:
            return {}
        try:
            reader = {"sweep": self._sweep_record, "oversized": self._oversized_record, "tf32": _tf32_record}
            record = reader.get(name, _backend_results)(run)
        except Exception as exc:  # a half-written run: say so rather than lose the step's record
            return {"partial_error": f"{type(exc).__name__}: {exc}"}
        record.pop("status", None)
        record.pop("error", None)
        return {"partial": record}

    def skip_reason(self, name: str) -> str | None:
        """Why a step cannot run on this machine with these backends, or None."""
        needs = {
            "syncs-torch": ["pytorch"],
            "ddp-torch": ["pytorch"],
            "ddp-sigterm": ["pytorch"],
            "mirrored-keras": ["keras"],
            "compile": ["pytorch", "keras"],
        }.get(name)
        if needs is not None and not set(needs) & set(self.backends):
            why = "; ".join(f"{b}: {self.summary['backends'].get(b) or 'not among --backend'}" for b in needs)
            return f"needs {' or '.join(needs)} ({why})"
        if name in ("ddp-sigterm", "visible-device") and (self.dry or self.gpus < 2):
            return f"needs 2 GPUs, this machine has {0 if self.dry else self.gpus} in this mode"
        if name == "compile" and self.dry:
            return "dry run: a cold torch.compile costs minutes of CPU (the step is a run like the sweep's, compile on)"
        if name == "tf32" and self.dry:
            return "dry run: CPUs have no TF32; the equivalence check itself runs in the sweep's fp32 run"
        if not self.backends:
            return "no backend can run here"
        return None

    # -- the steps ---------------------------------------------------------------------------------

    def devices(self) -> dict[str, Any]:
        """Each backend's framework in its own probe process; a probe that fails keeps the others' records."""
        seen: dict[str, dict[str, Any]] = {}
        for backend, reason in self.summary["backends"].items():
            framework = FRAMEWORK_PROBE.get(backend)
            if framework is None:
                continue
            if reason is not None:
                seen[framework] = {"status": "skipped", "reason": f"{backend}: {reason}"}
                continue
            try:
                seen[framework] = {"status": "passed", **self.probe(framework)}
            except Exception as exc:  # timed out or failed: this framework's record, the others go on
                seen[framework] = {"status": "failed", "error": f"{type(exc).__name__}: {exc}".splitlines()[0]}
            info = seen[framework]
            shown = f"{info.get('version')} sees {info.get('gpus')} GPU(s) {info.get('devices')}"
            self.log(f"[gpu-check]   {framework}: {shown if info['status'] == 'passed' else info['error']}")
        failed = [f"{f}: {i['error']}" for f, i in seen.items() if i["status"] == "failed"]
        blind = [f for f, i in seen.items() if i["status"] == "passed" and i["gpus"] == 0 and not self.dry]
        if blind:
            failed.append(f"{', '.join(blind)} sees no GPU while NVML does: it would train on the CPU")
        return {
            "status": "failed" if failed else "passed",
            "frameworks": seen,
            **({"error": "; ".join(failed)} if failed else {}),
        }

    def syncs_torch(self) -> dict[str, Any]:
        return self.probe("syncs-torch", "--size", str(PROBE_SIZE[self.mode]))

    def ddp_torch(self) -> dict[str, Any]:
        return self.probe("ddp-torch", "--size", str(PROBE_SIZE[self.mode]))

    def mirrored_keras(self) -> dict[str, Any]:
        return self.probe("mirrored-keras", "--size", str(PROBE_SIZE[self.mode]), *([] if self.dry else ["--gpu"]))

    def oversized(self) -> dict[str, Any]:
        """On a GPU every backend must end in the core's one-line out-of-memory error; the dry run rehearses the same
        settings at a size that fits, and they must reach training (not be refused before it)."""
        sets = [*OVERSIZED[self.mode], 'run.stages=["train"]', "model.init=framework"]  # no equivalence stage
        gpus = [] if self.dry else ["--gpus", "1"]
        run = self.run("oversized", sets, self.backends, gpus, keep=(("run.json", "oversized-run.json"),))
        return self._oversized_record(run)

    def _oversized_record(self, run: dict[str, Any]) -> dict[str, Any]:
        backends = {
            name: {"status": b["status"], "error": b.get("error"), "stages": b.get("stages")}
            for name, b in run["backends"].items()
        }
        if self.dry:
            bad = [n for n, b in backends.items() if b["status"] != "completed"]
            expectation = "dry run: the oversized settings reach training and complete at a size that fits the CPU"
        else:
            bad = [n for n, b in backends.items() if not _one_line_oom(b["error"])]
            expectation = "every backend ends in the one-line out-of-memory error"
        return {
            "status": "failed" if bad else "passed",
            "expectation": expectation,
            "settings": OVERSIZED[self.mode],
            "backends": backends,
            **({"error": f"not as expected: {', '.join(bad)}"} if bad else {}),
        }

    def tf32(self) -> dict[str, Any]:
        """The equivalence check (every backend and its ONNX export, the same initial weights and images) with TF32
        on for training: inference must still compute IEEE float32, so it must pass."""
        sets = ["numerics.tf32=true", "run.stages=[]"]
        gpus = [] if self.dry else ["--gpus", "1"]
        run = self.run("tf32", sets, self.backends, gpus, keep=(("comparison.json", "tf32-comparison.json"),))
        return _tf32_record(run)

    def sweep(self) -> dict[str, Any]:
        sets = ["numerics.tf32=false", 'run.stages=["train","evaluate","cam","export"]', "export.onnx=true"]
        grid = [arg for text in SWEEP_GRID[self.mode] for arg in ("--sweep", text)]
        run = self.run(
            "sweep",
            sets,
            self.backends,
            [*grid, *([] if self.dry else ["--gpus", "1"])],
            keep=(("run.json", "sweep-run.json"), ("comparison.json", "sweep-comparison.json")),
        )
        return self._sweep_record(run)

    def _sweep_record(self, run: dict[str, Any]) -> dict[str, Any]:
        record = _backend_results(run)
        cells = (run.get("sweep") or {}).get("cells") or []
        record["cells"] = [_cell(c) for c in cells]
        record["equivalence_tf32_off"] = _equivalence(run)
        record["onnx_parity"] = {
            name: {k: p.get(k) for k in ("passed", "max_abs", "atol", "rtol", "images")}
            for name, p in (run["comparison"].get("parity") or {}).items()
        }
        failed = [f"{c['backend']} {c['point']}: {c['error']}" for c in cells if c["status"] == "failed"]
        unfinished = [
            f"{c['backend']} {c['point']}" for c in cells if c["status"] not in ("completed", "refused", "failed")
        ]
        equivalent = (record["equivalence_tf32_off"] or {}).get("passed") is True
        parity = all(p.get("passed") for p in record["onnx_parity"].values()) and bool(record["onnx_parity"])
        problems = [*([record["error"]] if record.get("error") else []), *failed]
        problems += [f"unfinished: {', '.join(unfinished)}"] if unfinished else []
        problems += [] if equivalent else ["the equivalence check (TF32 off) did not pass"]
        problems += [] if parity else ["ONNX parity did not pass for every backend"]
        record["status"] = "failed" if problems else "passed"
        if problems:
            record["error"] = "; ".join(problems)
        return record

    def compile(self) -> dict[str, Any]:
        backends = [b for b in ("pytorch", "keras") if b in self.backends]
        gpus = [] if self.dry else ["--gpus", "1"]
        sets = [*COMPILE_SETS, 'run.stages=["train"]', "model.init=framework"]  # no equivalence stage
        run = self.run("compile", sets, backends, gpus, keep=(("run.json", "compile-run.json"),))
        record = _backend_results(run)
        record["note"] = "jax is not in this step: every jax figure is XLA-compiled (jax.jit) already"
        return record

    def ddp_sigterm(self) -> dict[str, Any]:
        """SIGTERM to a 2-GPU run while its DDP ranks train; the run must end interrupted with no rank left."""
        import psutil

        folder = self.work / "runs" / "ddp-sigterm"
        args = [sys.executable, "-m", "cxrbench", "run", "--suite", "throughput", "--backend", "pytorch"]
        args += ["--gpus", "2", "--out", str(folder)]
        for text in [*BASE[self.mode], "train.epochs=20", 'run.stages=["train"]']:
            args += ["--set", text]
        process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        status, deadline = folder / "pytorch" / "status.json", self.deadline - 2 * STOP_GRACE_S
        tree: list[psutil.Process] = []
        while time.monotonic() < deadline and process.poll() is None:
            stages = (_read(status) or {}).get("stages", {})
            tree = psutil.Process(process.pid).children(recursive=True)
            if stages.get("train") == "running" and len(tree) >= 3:  # the worker and its two ranks
                break
            time.sleep(1.0)
        else:
            process.kill()
            return {"status": "failed", "error": "the DDP ranks did not start training in time"}
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=STOP_GRACE_S * 2)
        _, alive = psutil.wait_procs(tree, timeout=STOP_GRACE_S)
        outcome = (_read(folder / "run.json") or {}).get("backends", {}).get("pytorch", {}).get("status")
        return {
            "status": "passed" if not alive else "failed",
            "processes_before": len(tree),
            "left_alive": [p.pid for p in alive],
            "backend_status": outcome,
            **({"error": f"{len(alive)} process(es) outlived the run"} if alive else {}),
        }

    def visible_device(self) -> dict[str, Any]:
        sets = ['run.stages=["train"]', "train.max_steps=10"]
        run = self.run("visible-device", sets, self.backends, ["--gpus", "1"], env={"CUDA_VISIBLE_DEVICES": "1"})
        return _backend_results(run)


# -- reading results ---------------------------------------------------------------------------------


def _stop(process: subprocess.Popen) -> str:
    """SIGTERM to the process group, SIGKILL after the grace period; what it printed."""
    _signal_group(process, signal.SIGTERM)
    try:
        output, _ = process.communicate(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        _signal_group(process, signal.SIGKILL)
        output, _ = process.communicate()
    return output


def _signal_group(process: subprocess.Popen, signum: int) -> None:
    try:
        os.killpg(process.pid, signum)
    except ProcessLookupError:
        pass


def _children_cpu_s() -> float:
    """CPU seconds (user + system) of every finished child process so far: a step's cost on a busy machine."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def _last_line(done: subprocess.CompletedProcess | None) -> str:
    if done is None:
        return "no output"
    lines = [line for line in (done.stdout or "").splitlines() if line.strip()]
    return f"exit code {done.returncode}: {lines[-1] if lines else 'no output'}"


def _one_line_oom(error: str | None) -> bool:
    return bool(error) and "\n" not in error and "out of memory" in error


def _phase_utilisation(gpu: dict | None) -> dict[str, dict[str, Any]]:
    """NVML's GPU utilisation and memory per phase and device from a backend's monitor summary."""
    phases = (gpu or {}).get("phases") or {}
    return {
        phase: {
            device: {
                "util_mean": (fields.get("util") or {}).get("mean"),
                "util_p50": (fields.get("util") or {}).get("p50"),
                "mem_mib_max": (fields.get("mem_mib") or {}).get("max"),
                "samples": fields.get("samples"),
            }
            for device, fields in devices.items()
            if device.startswith("gpu")
        }
        for phase, devices in phases.items()
    }


#: throughput.json keys every reader may rely on (the contract), copied into the summary.
THROUGHPUT_KEYS = (
    "train_images_per_s",
    "train_images_per_s_interval",
    "first_step_s",
    "predict_images_per_s",
    "framework_peak_memory_mib",
    "framework_peak_memory_source",
    "no_steady_state",
    "disturbed",
)
#: Numerics keys that say under which conditions a figure was taken.
CONDITION_KEYS = ("device", "precision", "layout", "compile", "tf32", "batch_size_per_device")


def _backend_results(run: dict[str, Any]) -> dict[str, Any]:
    backends = {}
    for name, b in run["backends"].items():
        throughput = b.get("throughput") or {}
        numerics = (b.get("train") or {}).get("numerics") or {}
        backends[name] = {
            "status": b["status"],
            "error": b.get("error"),
            "stage_seconds": b.get("stage_seconds"),
            "conditions": {k: numerics.get(k) for k in CONDITION_KEYS},
            "cudnn_benchmark": (numerics.get("framework") or {}).get("cudnn_benchmark"),
            **{k: throughput.get(k) for k in THROUGHPUT_KEYS},
            "gpu_utilisation": _phase_utilisation(b.get("gpu")),
            "gpu_monitor": (b.get("gpu") or {}).get("source") or (b.get("gpu") or {}).get("reason"),
        }
    failed = [f"{n}: {b['error']}" for n, b in backends.items() if b["status"] != "completed"]
    return {
        "status": "failed" if failed else "passed",
        "backends": backends,
        **({"error": failed[0]} if failed else {}),
    }


def _from_folders(folder: Path, run: dict[str, Any]) -> None:
    """A stopped run's backends and sweep cells as the run's own finish would have merged them, from each backend's
    files: the orchestrator may have been killed before it wrote them into run.json."""
    from cxrbench.files import read_json
    from cxrbench.run import sweep
    from cxrbench.run.folder import backend_results

    for name, record in run.get("backends", {}).items():
        status = _read(folder / name / "status.json")
        if status:
            record.update({k: status.get(k) for k in ("status", "error", "stages", "stage_seconds")})
            record.update(backend_results(folder / name, read_json))
    grid = (run.get("sweep") or {}).get("grid")
    if grid:
        run["sweep"] = sweep.table(folder, list(run.get("backends", {})), grid)


def _tf32_record(run: dict[str, Any]) -> dict[str, Any]:
    equivalence = _equivalence(run)
    exact = bool(equivalence and equivalence.get("passed"))
    return {
        "status": "passed" if exact else "failed",
        "equivalence_tf32_on": equivalence,
        "backends": {n: {"status": b["status"], "error": b.get("error")} for n, b in run["backends"].items()},
        "note": "TF32 is on for training only: prediction, the equivalence and the exports run at IEEE float32",
        **({} if exact else {"error": "with numerics.tf32 = true the equivalence check failed"}),
    }


def _cell(cell: dict[str, Any]) -> dict[str, Any]:
    keys = ("point", "backend", "status", "error", "train_images_per_s", "train_images_per_s_interval")
    return {
        k: cell.get(k) for k in (*keys, "first_step_s", "peak_memory_mib", "framework_peak_memory_mib", "disturbed")
    }


def _equivalence(run: dict[str, Any]) -> dict[str, Any] | None:
    eq = run["comparison"].get("equivalence")
    if not eq:
        return None
    values = [v for row in eq.get("max_abs") or [] for v in row if v is not None]
    return {
        "passed": eq.get("passed"),
        "atol": eq.get("atol"),
        "worst_max_abs": max(values, default=None),
        "labels": eq.get("labels"),
        "failures": eq.get("failures"),
        "missing": eq.get("missing"),
    }


def figures(steps: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Every steady-state training figure of the check with its spread and conditions, one row each."""
    rows = []
    for name in ("sweep", "compile"):
        record = steps.get(name) or {}
        source = record if record.get("backends") else record.get("partial") or {}
        for backend, b in (source.get("backends") or {}).items():
            conditions = b.get("conditions") or {}
            what = [conditions.get("precision"), conditions.get("layout"), conditions.get("compile")]
            what += ["cudnn.benchmark"] if b.get("cudnn_benchmark") else []
            rows.append(
                {
                    "step": name,
                    "backend": backend,
                    "what": ", ".join(str(w) for w in what if w is not None) or name,
                    "images_per_s": b.get("train_images_per_s"),
                    "interval": b.get("train_images_per_s_interval"),
                    "first_step_s": b.get("first_step_s"),
                    "framework_peak_memory_mib": b.get("framework_peak_memory_mib"),
                    "gpu_util_train": _train_util(b.get("gpu_utilisation")),
                    "conditions": {**b.get("conditions", {}), "cudnn_benchmark": b.get("cudnn_benchmark")},
                    "disturbed": b.get("disturbed"),
                    "status": b.get("status"),
                }
            )
        for cell in source.get("cells") or []:
            rows.append(
                {
                    "step": name,
                    "backend": cell["backend"],
                    "what": cell["point"],
                    "images_per_s": cell["train_images_per_s"],
                    "interval": cell["train_images_per_s_interval"],
                    "first_step_s": cell["first_step_s"],
                    "framework_peak_memory_mib": cell["framework_peak_memory_mib"],
                    "disturbed": cell["disturbed"],
                    "status": cell["status"],
                    **({"error": cell["error"]} if cell["status"] != "completed" else {}),
                }
            )
    return rows


def _train_util(utilisation: dict | None) -> float | None:
    devices = (utilisation or {}).get("train") or {}
    means = [d["util_mean"] for d in devices.values() if d.get("util_mean") is not None]
    return round(sum(means) / len(means), 1) if means else None


def _figure_line(row: dict[str, Any]) -> str:
    speed = "-" if row["images_per_s"] is None else f"{row['images_per_s']:.1f}"
    spread = row.get("interval")
    spread = f" [{spread[0]:.1f}, {spread[1]:.1f}]" if spread else ""
    util = f", GPU util (train) {row['gpu_util_train']} %" if row.get("gpu_util_train") is not None else ""
    peak = row.get("framework_peak_memory_mib")
    peak = f", peak {peak:.0f} MiB" if peak is not None else ""
    error = f": {row['error']}" if row.get("error") else ""
    state = "" if row["status"] == "completed" else f" ({row['status']}{error})"
    noise = " DISTURBED (others used the machine)" if row.get("disturbed") else ""
    return f"  {row['backend']:<8} {row['what']:<70} {speed}{spread} img/s{util}{peak}{noise}{state}"


# -- command line --------------------------------------------------------------------------------------


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="tools/gpu-check.sh", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, help="the result files (default: reports/gpu-check-<time>)")
    parser.add_argument("--work", type=Path, help="run folders and caches (default: a new folder under $TMPDIR)")
    parser.add_argument("--dry-run", action="store_true", help="the same steps at tiny sizes on the CPU")
    parser.add_argument("--backend", action="append", default=[], help="repeatable (default: every first-party one)")
    parser.add_argument("--steps", help=f"comma-separated subset, run in the fixed order ({', '.join(STEPS)})")
    parser.add_argument(
        "--budget-s", type=float, help=f"seconds for all steps (default {BUDGET_S:.0f}; dry run {DRY_BUDGET_S:.0f})"
    )
    parser.add_argument("--wheels", type=Path, help="a folder of carried wheels to install offline first")
    args = parser.parse_args(argv)
    unknown = sorted(set((args.steps or "").split(",")) - set(STEPS) - {""})
    if unknown:
        parser.error(f"--steps: unknown {', '.join(unknown)} (choose from {', '.join(STEPS)})")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    work = (args.work or Path(tempfile.mkdtemp(prefix="cxrbench-gpu-check-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    try:
        environment = prepare_environment(work, args.wheels, args.dry_run)
    except WheelsError as exc:
        print(f"gpu-check: {exc}", file=sys.stderr)
        return 2
    from cxrbench.machine.env import gpu_inventory
    from cxrbench.plugins import FIRST_PARTY_BACKENDS

    inventory = gpu_inventory()
    if not args.dry_run and inventory["count"] == 0:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
        print(
            f"gpu-check: no NVIDIA GPU on this machine ({inventory.get('reason') or 'NVML reports 0 GPUs'}); "
            "use --dry-run to run the steps at tiny size on the CPU",
            file=sys.stderr,
        )
        return 2
    out = (args.out or Path("reports") / f"gpu-check-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    for stale in OUT_FILES:
        (out / stale).unlink(missing_ok=True)
    requested = args.backend or [name for name, b in FIRST_PARTY_BACKENDS.items() if not b.example]
    budget = args.budget_s or (DRY_BUDGET_S if args.dry_run else BUDGET_S)
    selected = args.steps.split(",") if args.steps else list(STEPS)
    summary = {
        "mode": "dry-run (CPU, tiny)" if args.dry_run else "gpu",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "budget_s": budget,
        "seconds": 0.0,
        "passed": None,
        "environment": environment,
        "gpu_inventory": inventory,
        "backends": available_backends(requested),
        "work": str(work),
        "plan": {n: {"estimate_s": s.estimate_s, "limit_s": s.limit_s} for n, s in STEPS.items() if n in selected},
        "steps": {},
        "figures": [],
    }
    check = Check(out, work, args.dry_run, budget, inventory["count"], summary)
    check.log(f"[gpu-check] {summary['mode']}, budget {budget:.0f} s, work folder {work}")
    for name, reason in summary["backends"].items():
        check.log(f"[gpu-check] backend {name}: {reason or 'available'}")
    check.save()
    try:
        check.execute(selected)
    except KeyboardInterrupt:
        check.log("[gpu-check] interrupted: the summary holds the steps so far")
        check.save()
        return 130
    check.log("[gpu-check] figures (steady-state median img/s [central 95 % of timing windows]):")
    for row in summary["figures"]:
        check.log(_figure_line(row))
    verdict = "FAILED" if not summary["passed"] else "passed" if summary["complete"] else "passed, INCOMPLETE"
    statuses = ", ".join(f"{n} {s['status']}" for n, s in summary["steps"].items())
    check.log(f"[gpu-check] {verdict} in {summary['seconds']} s ({statuses}); summary: {out / 'gpu-check.json'}")
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
