"""The GPU check's probes: each runs in a process of its own (``python tools/gpu_check_probes.py NAME``), imports one
framework, and prints one JSON line, so a framework that fails to load or crashes takes no other record with it.

torch / tensorflow / jax   what the framework sees (version, CUDA build, GPUs)
ddp-torch                  the backend's DDP training path: NCCL ranks on GPUs (one per GPU, at most two; one rank on
                           a one-GPU machine), one gloo rank on the CPU in a dry run
syncs-torch                host synchronisations per training step in bf16 and fp16, counted by torch's sync debug mode
mirrored-keras             MirroredStrategy over two logical devices split from the first one
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from typing import Any

#: Characters kept of a failure's full message (TensorFlow's first line is often just "Graph execution error:").
DETAIL_CHARS = 1500


def probe_torch(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from cxrbench_pytorch.distributed import no_forward_buffer_sync

    count = torch.cuda.device_count()
    return {
        "framework": "torch",
        "version": torch.__version__,
        "cuda_build": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cuda_available": torch.cuda.is_available(),
        "gpus": count,
        "devices": [
            {"name": torch.cuda.get_device_name(i), "capability": list(torch.cuda.get_device_capability(i))}
            for i in range(count)
        ],
        "bf16_supported": bool(count and torch.cuda.is_bf16_supported()),
        "ddp_buffer_keyword": next(iter(no_forward_buffer_sync())),
    }


def probe_tensorflow(args: argparse.Namespace) -> dict[str, Any]:
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


def probe_jax(args: argparse.Namespace) -> dict[str, Any]:
    import jax

    gpus = [d for d in jax.devices() if d.platform == "gpu"] if jax.default_backend() == "gpu" else []
    return {
        "framework": "jax",
        "version": jax.__version__,
        "backend": jax.default_backend(),
        "gpus": len(gpus),
        "devices": [f"{d} ({d.device_kind})" for d in gpus],
        "compilation_cache_dir": jax.config.jax_compilation_cache_dir,
    }


def probe_ddp_torch(args: argparse.Namespace) -> dict[str, Any]:
    """The backend's DDP path for one step. On GPUs: NCCL, one rank per GPU (NCCL refuses two ranks on one device, so
    a one-GPU machine runs one rank: DDP, SyncBatchNorm and NCCL all set up, no all-reduce between ranks); with two
    GPUs also DDP around torch.compile. Without a GPU (dry run): one gloo rank on the CPU, the same call path as the
    one-GPU machine's (several gloo ranks against one process: tests/test_pytorch_distributed.py)."""
    import torch

    gpus = torch.cuda.device_count()
    world, device = (min(gpus, 2), "cuda") if gpus else (1, "cpu")
    result = _ddp_step(args.size, world, device, compile_=False)
    record = {
        "device": device,
        "ranks": world,
        "backend": "nccl" if device == "cuda" else "gloo",
        "max_abs_weight_diff_between_ranks": result.get("max_abs_weight_diff_between_ranks"),
        "data_parallel": result["numerics"]["data_parallel"],
        "synchronized_batchnorm": result["numerics"]["framework"]["batchnorm"],
    }
    if world >= 2 and device == "cuda":
        record["with_compile"] = _ddp_compiled(args.size, world)
    else:
        record["with_compile"] = f"skipped: DDP around torch.compile runs with two GPUs ({gpus} here)"
    if world == 1:
        record["note"] = f"one {device} rank: the DDP path set up end to end, no all-reduce between ranks"
    spread = record["max_abs_weight_diff_between_ranks"]
    failed = spread != 0 or (isinstance(record["with_compile"], dict) and record["with_compile"]["status"] != "passed")
    return {"status": "failed" if failed else "passed", **record, **({"error": _ddp_error(record)} if failed else {})}


def _ddp_error(record: dict[str, Any]) -> str:
    if record["max_abs_weight_diff_between_ranks"] != 0:
        return f"the ranks' weights differ by {record['max_abs_weight_diff_between_ranks']}"
    return f"DDP + torch.compile: {record['with_compile'].get('error', 'failed')}"


def _ddp_step(size: int, world: int, device: str, compile_: bool) -> dict[str, Any]:
    import cxrbench_pytorch as backend
    from cxrbench.backend.recorder import Recorder
    from cxrbench.testing.conformance import kit_settings, random_canonical, synthetic_data
    from cxrbench_pytorch import distributed

    sets = {"train.max_steps": 2, "train.batch_size": 2, "run.gpus": world if device == "cuda" else 0}
    settings = kit_settings(size, **sets, **({"numerics.compile": True} if compile_ else {}))
    model = backend.cxrbench_build_model(
        settings=settings.replace(**{"run.gpus": 0}), weights=random_canonical(settings.model.block_config, 0)
    )
    data = synthetic_data(size, train=4 * world, val=4)
    return distributed.train(model, data, settings, Recorder(), world=world, device_type=device)


def _ddp_compiled(size: int, world: int) -> dict[str, Any]:
    import math

    try:
        result = _ddp_step(size, world, "cuda", compile_=True)
    except Exception as exc:  # recorded: the probe fails on it
        return {"status": "failed", "error": f"{type(exc).__name__}: {exc}".splitlines()[0]}
    spread = result.get("max_abs_weight_diff_between_ranks")
    finite = math.isfinite(result["best_val_loss"])
    return {
        "status": "passed" if finite and spread == 0 else "failed",
        "best_val_loss": result["best_val_loss"],
        "max_abs_weight_diff_between_ranks": spread,
    }


def probe_syncs_torch(args: argparse.Namespace) -> dict[str, Any]:
    """Host synchronisations per training step in bf16 and fp16, counted by torch's sync debug mode.

    The window timer's own edges synchronise explicitly (``torch.cuda.synchronize``, not counted); what is counted is
    every implicit sync (``.item()``, a device-to-host copy). The epoch's one loss fetch is one; GradScaler with an
    unfused Adam would add one per step. Without CUDA (dry run) the same loops run and nothing can be counted.
    """
    import torch

    import cxrbench_pytorch as backend
    from cxrbench.backend.recorder import Recorder
    from cxrbench.testing.conformance import kit_settings, random_canonical, synthetic_data
    from cxrbench_pytorch import loop

    cuda = torch.cuda.is_available()
    steps, variants = 8 if cuda else 3, {}
    for precision in ("bf16", "fp16"):
        settings = kit_settings(
            args.size, **{"train.max_steps": steps, "train.batch_size": 4, "numerics.precision": precision}
        )
        model = backend.cxrbench_build_model(
            settings=settings, weights=random_canonical(settings.model.block_config, 0)
        )
        data = synthetic_data(args.size, train=4 * steps, val=4)
        epoch_loop = loop.TorchEpochLoop(model, data, settings, Recorder(), model.net)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if cuda:
                torch.cuda.set_sync_debug_mode("warn")
            try:
                outcome = epoch_loop.train_epoch(1, 1e-3)
            finally:
                if cuda:
                    torch.cuda.set_sync_debug_mode("default")
        syncs = sum("synchronizing" in str(w.message) for w in caught) if cuda else None
        variants[precision] = {
            "device": str(model.device),
            "steps": len(outcome.losses),
            "syncs": syncs,
            "syncs_per_step": round(syncs / max(len(outcome.losses), 1), 3) if cuda else None,
            "finite_losses": bool(torch.isfinite(torch.as_tensor(outcome.losses)).all()),
        }
    too_many = [p for p, v in variants.items() if (cuda and v["syncs_per_step"] >= 1) or not v["finite_losses"]]
    return {
        "status": "failed" if too_many else "passed",
        "counted": cuda,
        "variants": variants,
        **({} if cuda else {"note": "no CUDA: the bf16 and fp16 loops ran; torch counts host syncs on GPUs only"}),
        **({"error": f"{', '.join(too_many)}: a host sync every step, or a non-finite loss"} if too_many else {}),
    }


def _split_logical(tf, kind: str) -> list[str]:
    """Two logical devices from the first physical one (must happen before TensorFlow initialises)."""
    device = tf.config.list_physical_devices(kind)[0]
    config = tf.config.LogicalDeviceConfiguration(memory_limit=8192 if kind == "GPU" else None)
    tf.config.set_logical_device_configuration(device, [config, config])
    return [d.name for d in tf.config.list_logical_devices(kind)][:2]


def probe_mirrored_keras(args: argparse.Namespace) -> dict[str, Any]:
    """One step under MirroredStrategy over two logical devices, per (precision, XLA) variant."""
    import numpy as np
    import tensorflow as tf

    from cxrbench.backend.recorder import Recorder
    from cxrbench.testing.conformance import kit_settings, random_canonical, synthetic_data
    from cxrbench_keras import loop
    from cxrbench_keras import model as keras_model

    devices = _split_logical(tf, "GPU" if args.gpu else "CPU")
    strategy = tf.distribute.MirroredStrategy(devices)
    data, variants = synthetic_data(args.size, train=8, val=4), {}
    #: (precision, XLA) -> the one-line refusal expected, or None when the variant must train.
    expected = {
        ("fp32", False): None,
        ("bf16", False): None,
        ("fp16", False): "LossScaleOptimizer",
        ("fp32", True): "disables XLA",
    }
    for (precision, xla), refusal in expected.items():
        sets = {"train.max_steps": 1, "train.batch_size": 2, "numerics.precision": precision}
        settings = kit_settings(args.size, **sets, **{"numerics.jit_compile": xla})
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
        f"{name}: {v.get('error', 'replicas differ or the loss is not finite')}"
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
    "torch": probe_torch,
    "tensorflow": probe_tensorflow,
    "jax": probe_jax,
    "ddp-torch": probe_ddp_torch,
    "syncs-torch": probe_syncs_torch,
    "mirrored-keras": probe_mirrored_keras,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tools/gpu_check_probes.py", description=__doc__.splitlines()[0])
    parser.add_argument("probe", choices=sorted(PROBES))
    parser.add_argument("--size", type=int, default=32, help="image side of the kit's tiny model")
    parser.add_argument("--gpu", action="store_true", help="mirrored-keras: split the first GPU, not the CPU")
    args = parser.parse_args(argv)
    print(json.dumps(PROBES[args.probe](args), default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
