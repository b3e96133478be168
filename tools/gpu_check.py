"""The prepared GPU check: one command that exercises every GPU code path of cxrbench on a machine with
an NVIDIA GPU and writes ONE JSON summary (its path is printed last).

Steps (each in fresh processes, each with its own time limit, a failing step never stops the others):
  devices      what torch, TensorFlow and JAX see (each in its own process); a framework that sees no GPU fails
  sweep        `cxrbench run --suite throughput` at 224 px with --sweep precision x channels_last
  compile      the throughput suite with torch.compile / XLA (numerics.compile, numerics.jit_compile)
  smoke        the smoke suite on one GPU, every stage, NVML sampling: per-phase utilisation,
               equivalence (TF32 off) and ONNX parity
  tf32         the equivalence check again with TF32 on for training: inference must still be IEEE float32, so
               the equivalence and ONNX parity must pass
  oversized    an oversized batch per backend: must end as a one-line out-of-memory error, not a crash
  ddp-torch    two DDP ranks: one per GPU over NCCL with >= 2 GPUs; with one GPU the backend's CUDA path
               cannot run (one rank per device), so the gloo path runs its two ranks on the CPU; on GPUs also
               with torch.compile (DDP + SyncBatchNorm compiled)
  syncs-torch  host synchronisations per training step in bf16 and fp16 (torch's sync debug mode): the fused
               Adam keeps GradScaler's inf check on the device, so fp16 must not sync every step
  ddp-sigterm  SIGTERM to a `cxrbench run --gpus 2` while its DDP ranks train: every rank must be gone after
  mirrored-keras  MirroredStrategy over two logical devices split from GPU 0: fp32 and bf16 must train with identical
               replicas; fp16 and XLA must be refused in one line (Keras gets them wrong under replication)
  visible-device  a run with CUDA_VISIBLE_DEVICES set to a non-first GPU (needs >= 2 GPUs)

``--dry-run`` runs the same steps at tiny size on the CPU (tiny DenseNet, a few steps) so the script
itself is tested without a GPU; without it, a machine with no NVIDIA GPU is refused in one line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

#: Whole-check budget on a GPU: steps that would start after it are skipped (recorded as such).
BUDGET_S = 480.0
#: A dry run on a small CPU machine is slower than the GPU check: its time limits are stretched.
DRY_STRETCH = 4
#: Settings per mode: the GPU sizes of the issue (224 px, DenseNet-121), and tiny CPU ones.
SIZES = {
    "gpu": {
        "throughput": [
            "data.image_size=224",
            "data.phantom_images=1200",
            "train.batch_size=32",
            "train.max_steps=20",
            "train.epochs=1",
            "model.arch=densenet121",
        ],
        "smoke": [],
        "probe_size": 64,
        "gpus": ["--gpus", "1"],
        #: ~4x the pixels of 224 px at batch 1024: far beyond any single GPU's memory for DenseNet-121.
        "oversized": ["data.image_size=448", "data.phantom_images=2000", "train.batch_size=1024", "train.max_steps=1"],
    },
    #: Six steps with a one-step warm-up and one-step windows: a steady-state figure even at this size.
    "dry": {
        "throughput": [
            "data.image_size=32",
            "data.phantom_images=800",
            "data.phantom_size=128",
            "train.batch_size=4",
            "train.max_steps=6",
            "train.warmup_steps=1",
            "train.window_steps=1",
            "train.epochs=1",
            "model.arch=densenet-tiny",
        ],
        "smoke": [
            "model.arch=densenet-tiny",
            "train.max_steps=6",
            "train.warmup_steps=1",
            "train.window_steps=1",
            "data.image_size=32",
        ],
        "oversized": None,
        "probe_size": 32,
        "gpus": [],
    },
}
#: Seconds a timed-out step's command gets to stop its worker after SIGTERM.
STOP_GRACE_S = 30
#: Characters kept of a failure's full message (TensorFlow's first line is often just "Graph execution error:").
DETAIL_CHARS = 1500
#: Step name -> seconds it may take at most.
LIMITS = {
    "devices": 120,
    "sweep": 240,
    "compile": 240,
    "smoke": 240,
    "tf32": 120,
    "oversized": 180,
    "ddp-torch": 180,
    "mirrored-keras": 180,
    "visible-device": 180,
    "syncs-torch": 180,
    "ddp-sigterm": 240,
}


# -- probes: run as `python tools/gpu_check.py --probe NAME`, print one JSON line ----------------------


def probe_torch() -> dict[str, Any]:
    import torch

    count = torch.cuda.device_count()
    return {
        "framework": "torch",
        "version": torch.__version__,
        "cuda_build": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "gpus": count,
        "devices": [
            {"name": torch.cuda.get_device_name(i), "capability": list(torch.cuda.get_device_capability(i))}
            for i in range(count)
        ],
        "bf16_supported": bool(count and torch.cuda.is_bf16_supported()),
    }


def probe_tensorflow() -> dict[str, Any]:
    import tensorflow as tf

    build = tf.sysconfig.get_build_info()
    gpus = tf.config.list_physical_devices("GPU")
    return {
        "framework": "tensorflow",
        "version": tf.__version__,
        "cuda_build": build.get("cuda_version"),
        "cudnn_build": build.get("cudnn_version"),
        "gpus": len(gpus),
        "devices": [g.name for g in gpus],
    }


def probe_jax() -> dict[str, Any]:
    import jax

    gpus = [d for d in jax.devices() if d.platform == "gpu"] if jax.default_backend() == "gpu" else []
    return {
        "framework": "jax",
        "version": jax.__version__,
        "backend": jax.default_backend(),
        "gpus": len(gpus),
        "devices": [str(d) for d in gpus],
    }


def probe_ddp_torch(size: int) -> dict[str, Any]:
    """Two DDP ranks, one step: the CUDA path (NCCL, a GPU per rank) when two GPUs exist, else gloo on the CPU."""
    import torch

    import cxrbench_pytorch as backend
    from cxrbench.backend.recorder import Recorder
    from cxrbench.testing.conformance import kit_settings, random_canonical, synthetic_data
    from cxrbench_pytorch import distributed

    cuda = torch.cuda.device_count() >= 2
    compiled = _ddp_compiled(size) if cuda else "skipped: the CPU (gloo) path is checked without compile"
    settings = kit_settings(size, **{"train.max_steps": 1, "train.batch_size": 2, "run.gpus": 2 if cuda else 0})
    model = backend.cxrbench_build_model(
        settings=settings.replace(**{"run.gpus": 0}), weights=random_canonical(settings.model.block_config, 0)
    )
    result = distributed.train(
        model,
        synthetic_data(size, train=8, val=4),
        settings,
        Recorder(),
        world=2,
        device_type="cuda" if cuda else "cpu",
    )
    note = (
        None
        if cuda
        else (
            "the backend's CUDA DDP path runs one rank per GPU over NCCL (NCCL refuses two ranks "
            "on one device), so with one GPU the two ranks ran the gloo path on the CPU"
        )
    )
    return {
        "device": "cuda" if cuda else "cpu",
        "ranks": 2,
        "note": note,
        "max_abs_weight_diff_between_ranks": result.get("max_abs_weight_diff_between_ranks"),
        "with_compile": compiled,
    }


def _ddp_compiled(size: int) -> dict[str, Any] | str:
    """Two NCCL ranks with ``numerics.compile``: DDP around a compiled DenseNet with SyncBatchNorm layers."""
    import numpy as np

    import cxrbench_pytorch as backend
    from cxrbench.backend.recorder import Recorder
    from cxrbench.testing.conformance import kit_settings, random_canonical, synthetic_data
    from cxrbench_pytorch import distributed

    sets = {"train.max_steps": 2, "train.batch_size": 2, "run.gpus": 2, "numerics.compile": True}
    settings = kit_settings(size, **sets)
    model = backend.cxrbench_build_model(
        settings=settings.replace(**{"run.gpus": 0}), weights=random_canonical(settings.model.block_config, 0)
    )
    try:
        result = distributed.train(model, synthetic_data(size, train=8, val=4), settings, Recorder(), world=2)
    except Exception as exc:  # recorded: the step fails on it
        return {"status": "failed", "error": f"{type(exc).__name__}: {exc}".splitlines()[0]}
    finite = bool(np.isfinite(result["best_val_loss"]))
    spread = result.get("max_abs_weight_diff_between_ranks")
    return {
        "status": "passed" if finite and spread == 0 else "failed",
        "best_val_loss": result["best_val_loss"],
        "max_abs_weight_diff_between_ranks": spread,
    }


def probe_syncs_torch(size: int) -> dict[str, Any]:
    """Host synchronisations per training step in bf16 and fp16, counted by torch's sync debug mode.

    The window timer's own edges synchronise explicitly (``torch.cuda.synchronize``, not counted); what is counted
    is every implicit sync (``.item()``, a device-to-host copy). The epoch's one loss fetch is one; GradScaler with an
    unfused Adam would add one per step.
    """
    import warnings

    import torch

    import cxrbench_pytorch as backend
    from cxrbench.backend.recorder import Recorder
    from cxrbench.testing.conformance import kit_settings, random_canonical, synthetic_data
    from cxrbench_pytorch import loop

    steps, variants = 8, {}
    for precision in ("bf16", "fp16"):
        settings = kit_settings(
            size, **{"train.max_steps": steps, "train.batch_size": 4, "numerics.precision": precision}
        )
        model = backend.cxrbench_build_model(
            settings=settings, weights=random_canonical(settings.model.block_config, 0)
        )
        epoch_loop = loop.TorchEpochLoop(model, synthetic_data(size, train=40, val=4), settings, Recorder(), model.net)
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                outcome = epoch_loop.train_epoch(1, 1e-3)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        syncs = sum("synchronizing" in str(w.message) for w in caught)
        variants[precision] = {
            "steps": len(outcome.losses),
            "syncs": syncs,
            "syncs_per_step": round(syncs / max(len(outcome.losses), 1), 3),
            "finite_losses": bool(torch.isfinite(torch.as_tensor(outcome.losses)).all()),
        }
    too_many = [p for p, v in variants.items() if v["syncs_per_step"] >= 1 or not v["finite_losses"]]
    return {
        "status": "failed" if too_many else "passed",
        "variants": variants,
        **({"error": f"{', '.join(too_many)}: a host sync every step, or a non-finite loss"} if too_many else {}),
    }


def _split_logical(tf, kind: str) -> list[str]:
    """Two logical devices from the first physical one (must happen before TensorFlow initialises)."""
    device = tf.config.list_physical_devices(kind)[0]
    config = tf.config.LogicalDeviceConfiguration(memory_limit=8192 if kind == "GPU" else None)
    tf.config.set_logical_device_configuration(device, [config, config])
    return [d.name for d in tf.config.list_logical_devices(kind)][:2]


def probe_mirrored_keras(size: int, gpu: bool) -> dict[str, Any]:
    """One step under MirroredStrategy over two logical devices, per (precision, XLA) variant."""
    import numpy as np
    import tensorflow as tf

    from cxrbench.backend.recorder import Recorder
    from cxrbench.testing.conformance import kit_settings, random_canonical, synthetic_data
    from cxrbench_keras import loop
    from cxrbench_keras import model as keras_model

    devices = _split_logical(tf, "GPU" if gpu else "CPU")
    strategy = tf.distribute.MirroredStrategy(devices)
    data, variants = synthetic_data(size, train=8, val=4), {}
    #: (precision, XLA) -> the one-line refusal expected, or None when the variant must train.
    expected = {
        ("fp32", False): None,
        ("bf16", False): None,
        ("fp16", False): "LossScaleOptimizer",
        ("fp32", True): "disables XLA",
    }
    for (precision, xla), refusal in expected.items():
        settings = kit_settings(
            size,
            **{
                "train.max_steps": 1,
                "train.batch_size": 2,
                "numerics.precision": precision,
                "numerics.jit_compile": xla,
            },
        )
        name = f"{precision}{' + XLA' if xla else ''}"
        try:
            model = keras_model.build(settings, random_canonical(settings.model.block_config, 0), strategy=strategy)
            outcome = loop.KerasEpochLoop(model, data, settings, Recorder()).train_epoch(1, 1e-3)
            replicas = [
                [v.numpy() for v in strategy.experimental_local_results(w.value)] for w in model.network.weights
            ]
            spread = max(float(np.max(np.abs(r[0].astype(np.float64) - r[1]))) for r in replicas)
            trained = all(np.isfinite(outcome.losses)) and spread == 0 and refusal is None
            variants[name] = {
                "status": "passed" if trained else "failed",
                "loss": float(outcome.losses[0]),
                "max_abs_weight_diff_between_replicas": spread,
                **({"error": f"trained although it must be refused ({refusal})"} if refusal else {}),
            }
        except Exception as exc:  # a refusal is a result here: record it and try the next variant
            text = str(exc).strip()
            first = text.splitlines()[0] if text else ""
            refused = refusal is not None and refusal in first and "\n" not in text
            variants[name] = {
                "status": "refused as expected" if refused else "failed",
                "error": f"{type(exc).__name__}: {first}",
                "detail": text[-DETAIL_CHARS:],
            }
    failed = [
        f"{name}: {v['error'] if 'error' in v else 'replicas differ or the loss is not finite'}"
        for name, v in variants.items()
        if v["status"] == "failed"
    ]
    return {
        "status": "failed" if failed else "passed",
        "devices": devices,
        "variants": variants,
        **({"error": "; ".join(failed)} if failed else {}),
    }


PROBES = {
    "torch": lambda args: probe_torch(),
    "tensorflow": lambda args: probe_tensorflow(),
    "jax": lambda args: probe_jax(),
    "syncs-torch": lambda args: probe_syncs_torch(args.size),
    "ddp-torch": lambda args: probe_ddp_torch(args.size),
    "mirrored-keras": lambda args: probe_mirrored_keras(args.size, args.gpu),
}


# -- steps -------------------------------------------------------------------------------------------


class Check:
    """Runs the steps, keeps their records, and writes the summary."""

    def __init__(self, out: Path, dry: bool, backends: list[str], budget_s: float):
        self.out, self.dry, self.backends, self.budget_s = out, dry, backends, budget_s
        self.sizes = SIZES["dry" if dry else "gpu"]
        self.start = time.monotonic()
        self.steps: dict[str, dict[str, Any]] = {}

    def _command(self, name: str, args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """Run ``args``; past the step's limit SIGTERM it (cxrbench run then stops its worker and keeps what
        finished), SIGKILL after a grace period, and raise TimeoutExpired."""
        left = max(self.budget_s - (time.monotonic() - self.start), 1)
        limit = min(LIMITS[name] * (DRY_STRETCH if self.dry else 1), left)
        process = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})}
        )
        try:
            stdout, stderr = process.communicate(timeout=limit)
        except subprocess.TimeoutExpired:
            process.terminate()
            try:
                process.communicate(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.communicate()
            raise subprocess.TimeoutExpired(args, limit) from None
        return subprocess.CompletedProcess(args, process.returncode, stdout, stderr)

    def _probe(self, name: str, probe: str, *extra: str) -> dict[str, Any]:
        done = self._command(name, [sys.executable, __file__, "--probe", probe, *extra])
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        if done.returncode != 0 or not lines:
            raise RuntimeError(_last_error(done))
        return json.loads(lines[-1])

    def _run(
        self, name: str, suite: str, sets: list[str], extra: list[str] = (), env: dict[str, str] | None = None
    ) -> dict:
        """``cxrbench run`` into OUT/<name>; returns its run.json (and comparison.json under "comparison")."""
        folder = self.out / name
        args = [
            sys.executable,
            "-m",
            "cxrbench",
            "run",
            "--suite",
            suite,
            "--out",
            str(folder),
            "--monitor-interval",
            "0.5",
        ]
        for backend in self.backends:
            args += ["--backend", backend]
        for text in sets:
            args += ["--set", text]
        done = self._command(name, [*args, *extra], env)
        run = _read(folder / "run.json")
        if run is None:
            raise RuntimeError(_last_error(done))
        run["comparison"] = _read(folder / "comparison.json") or {}
        run["exit_code"] = done.returncode
        return run

    def step(self, name: str, func, skip: str | None = None) -> None:
        """Run one step; its record gets status, seconds and what ``func`` returned (or the one-line error)."""
        if skip is None and time.monotonic() - self.start > self.budget_s:
            skip = f"the check's time budget ({self.budget_s:.0f} s) is spent"
        if skip:
            self.steps[name] = {"status": "skipped", "reason": skip}
            print(f"[gpu-check] {name}: skipped ({skip})", flush=True)
            return
        print(f"[gpu-check] {name}: started", flush=True)
        began = time.monotonic()
        try:
            record = func()
            status = record.pop("status", "passed")
        except subprocess.TimeoutExpired as exc:
            record, status = {"error": f"timed out after {exc.timeout:.0f} s"}, "failed"
        except Exception as exc:  # one step's failure is a result; the next steps still run
            record, status = {"error": f"{type(exc).__name__}: {exc}".splitlines()[0]}, "failed"
        self.steps[name] = {"status": status, "seconds": round(time.monotonic() - began, 1), **record}
        error = f" ({record['error']})" if "error" in record else ""
        print(f"[gpu-check] {name}: {status} in {self.steps[name]['seconds']} s{error}", flush=True)

    # -- the steps ---------------------------------------------------------------------------------

    def devices(self) -> dict[str, Any]:
        seen = {"torch": self._probe("devices", "torch")}
        if "keras" in self.backends:
            seen["tensorflow"] = self._probe("devices", "tensorflow")
        if "jax" in self.backends:
            seen["jax"] = self._probe("devices", "jax")
        for framework, info in seen.items():
            print(
                f"[gpu-check] {framework} {info['version']} sees {info['gpus']} GPU(s): {info['devices']}", flush=True
            )
        blind = [f for f, info in seen.items() if info["gpus"] == 0]
        if blind and not self.dry:
            return {
                "status": "failed",
                "frameworks": seen,
                "error": f"{', '.join(blind)} sees no GPU while NVML does: it would train on the CPU",
            }
        return {"frameworks": seen}

    def sweep(self) -> dict[str, Any]:
        run = self._run(
            "sweep",
            "throughput",
            self.sizes["throughput"],
            [
                "--sweep",
                "numerics.precision=fp32,bf16",
                "--sweep",
                "numerics.channels_last=false,true",
                *self.sizes["gpus"],
            ],
        )
        cells = (run.get("sweep") or {}).get("cells") or []
        failed = [f"{c['backend']} {c['point']}: {c['error']}" for c in cells if c["status"] != "completed"]
        return {
            "status": "passed" if cells and not failed else "failed",
            "cells": cells,
            "failed_cells": failed,
            **({"error": failed[0]} if failed else {}),
        }

    def compile(self) -> dict[str, Any]:
        sets = [*self.sizes["throughput"], "numerics.compile=true", "numerics.jit_compile=true"]
        run = self._run("compile", "throughput", sets, self.sizes["gpus"])
        return _backend_results(run)

    def smoke(self) -> dict[str, Any]:
        run = self._run("smoke", "smoke", [*self.sizes["smoke"], "numerics.tf32=false"], self.sizes["gpus"])
        record = _backend_results(run)
        record["equivalence_tf32_off"] = _equivalence(run)
        return record

    def tf32(self) -> dict[str, Any]:
        sets = [*self.sizes["smoke"], "numerics.tf32=true", "run.stages=[]"]
        run = self._run("tf32", "smoke", sets, self.sizes["gpus"])
        equivalence = _equivalence(run)
        exact = bool(equivalence and equivalence.get("passed"))
        return {
            "status": "passed" if exact else "failed",
            "equivalence_tf32_on": equivalence,
            "note": "TF32 is on for training only: prediction and the equivalence run at IEEE float32",
            **(
                {}
                if exact
                else {"error": "with numerics.tf32 = true the equivalence check failed: TF32 leaked into inference"}
            ),
        }

    def oversized(self) -> dict[str, Any]:
        sets = [*self.sizes["throughput"], *self.sizes["oversized"]]
        run = self._run("oversized", "throughput", sets, self.sizes["gpus"])
        errors = {name: b.get("error") for name, b in run["backends"].items()}
        one_line_oom = all(e and "\n" not in e and "memory" in e.lower() for e in errors.values())
        return {
            "status": "passed" if one_line_oom else "failed",
            "errors": errors,
            **({} if one_line_oom else {"error": "an oversized batch did not end in a one-line memory error"}),
        }

    def visible_device(self) -> dict[str, Any]:
        run = self._run(
            "visible-device",
            "smoke",
            [*self.sizes["smoke"], 'run.stages=["train"]'],
            self.sizes["gpus"],
            env={"CUDA_VISIBLE_DEVICES": "1"},
        )
        return _backend_results(run)

    def ddp_sigterm(self) -> dict[str, Any]:
        """SIGTERM to a 2-GPU run while its DDP ranks train; the run must end interrupted with no rank left."""
        import signal

        import psutil

        folder = self.out / "ddp-sigterm"
        sets = [*self.sizes["smoke"], "train.epochs=20", 'run.stages=["train"]']
        args = [sys.executable, "-m", "cxrbench", "run", "--backend", "pytorch", "--gpus", "2", "--out", str(folder)]
        for text in sets:
            args += ["--set", text]
        process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        status, deadline = folder / "pytorch" / "status.json", time.monotonic() + LIMITS["ddp-sigterm"] / 2
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

    def execute(self, gpu_count: int) -> dict[str, Any]:
        size, gpu_flag = str(self.sizes["probe_size"]), [] if self.dry else ["--gpu"]
        keras = "keras" in self.backends
        # Most telling first: a spent budget skips the tail.
        self.step("devices", self.devices)
        self.step("sweep", self.sweep)
        self.step("smoke", self.smoke)
        self.step(
            "ddp-torch",
            lambda: self._probe("ddp-torch", "ddp-torch", "--size", size),
            None if "pytorch" in self.backends else "pytorch is not among --backend",
        )
        self.step(
            "mirrored-keras",
            lambda: self._probe("mirrored-keras", "mirrored-keras", "--size", size, *gpu_flag),
            None if keras else "keras is not among --backend",
        )
        self.step("compile", self.compile)
        self.step("tf32", self.tf32)
        self.step(
            "oversized",
            self.oversized,
            "dry run: an oversized batch would exhaust this machine's memory" if self.dry else None,
        )
        self.step(
            "syncs-torch",
            lambda: self._probe("syncs-torch", "syncs-torch", "--size", size),
            "dry run: counting host syncs needs CUDA"
            if self.dry
            else None
            if "pytorch" in self.backends
            else "pytorch is not among --backend",
        )
        self.step(
            "ddp-sigterm",
            self.ddp_sigterm,
            None
            if gpu_count >= 2 and "pytorch" in self.backends
            else f"needs 2 GPUs and the pytorch backend ({gpu_count} GPU(s))",
        )
        self.step(
            "visible-device",
            self.visible_device,
            None if gpu_count >= 2 else f"needs 2 GPUs, this machine has {gpu_count}",
        )
        return {
            "mode": "dry-run (CPU, tiny)" if self.dry else "gpu",
            "backends": self.backends,
            "gpu_inventory_count": gpu_count,
            "seconds": round(time.monotonic() - self.start, 1),
            "budget_s": self.budget_s,
            "passed": all(s["status"] != "failed" for s in self.steps.values()),
            "steps": self.steps,
        }


# -- reading results -----------------------------------------------------------------------------------


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def _last_error(done: subprocess.CompletedProcess) -> str:
    lines = [line for line in (done.stderr + done.stdout).splitlines() if line.strip()]
    return f"exit code {done.returncode}: {lines[-1] if lines else 'no output'}"


def _phase_utilisation(gpu: dict | None) -> dict[str, dict[str, float]]:
    """Mean GPU utilisation (and peak memory) per phase and device from a backend's monitor summary."""
    phases = (gpu or {}).get("phases") or {}
    return {
        phase: {
            device: {
                "util_mean": (fields.get("util") or {}).get("mean"),
                "mem_mib_p95": (fields.get("mem_mib") or {}).get("p95"),
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
    "disturbed",
)


def _backend_results(run: dict) -> dict[str, Any]:
    backends = {}
    for name, b in run["backends"].items():
        throughput = b.get("throughput") or {}
        backends[name] = {
            "status": b["status"],
            "error": b.get("error"),
            "stage_seconds": b.get("stage_seconds"),
            "numerics": (b.get("train") or {}).get("numerics"),
            **{k: throughput.get(k) for k in THROUGHPUT_KEYS},
            "gpu_utilisation": _phase_utilisation(b.get("gpu")),
            "gpu_status": (b.get("gpu") or {}).get("reason"),
        }
    failed = [f"{n}: {b['error']}" for n, b in backends.items() if b["status"] != "completed"]
    return {
        "status": "failed" if failed else "passed",
        "backends": backends,
        **({"error": failed[0]} if failed else {}),
    }


def _equivalence(run: dict) -> dict[str, Any] | None:
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
    }


# -- command line ---------------------------------------------------------------------------------------


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tools/gpu-check.sh", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dry-run", action="store_true", help="the same steps at tiny size on the CPU (tests the check itself)"
    )
    parser.add_argument(
        "--out", type=Path, help="folder for the runs and gpu-check.json (default: reports/gpu-check-<time>)"
    )
    parser.add_argument("--backend", action="append", default=[], help="repeatable (default: pytorch and keras)")
    parser.add_argument(
        "--budget-s",
        type=float,
        help=f"steps that would start later are skipped (default {BUDGET_S:.0f}; dry run {BUDGET_S * DRY_STRETCH:.0f})",
    )
    parser.add_argument("--probe", choices=sorted(PROBES), help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, default=32, help=argparse.SUPPRESS)
    parser.add_argument("--gpu", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.probe:
        print(json.dumps(PROBES[args.probe](args)), flush=True)
        return 0
    from cxrbench.machine.env import gpu_inventory

    inventory = gpu_inventory()
    if not args.dry_run and inventory["count"] == 0:
        print(
            f"gpu-check: no NVIDIA GPU on this machine ({inventory.get('reason') or 'NVML reports 0 GPUs'}); "
            "use --dry-run to run the steps at tiny size on the CPU",
            file=sys.stderr,
        )
        return 2
    out = args.out or Path("reports") / f"gpu-check-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    budget = args.budget_s or BUDGET_S * (DRY_STRETCH if args.dry_run else 1)
    check = Check(out, args.dry_run, args.backend or ["pytorch", "keras"], budget)
    summary = {"gpu_inventory": inventory, **check.execute(inventory["count"])}
    path = out / "gpu-check.json"
    path.write_text(json.dumps(summary, indent=2, default=str), encoding="utf-8")
    verdict = "passed" if summary["passed"] else "FAILED"
    print(f"[gpu-check] {verdict} in {summary['seconds']} s; summary: {path}", flush=True)
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
