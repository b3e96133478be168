"""A realistic FAKE run folder (the format of cxrbench/run/folder.py) so report tests never train anything.

Numbers are plausible and internally consistent: AUROC, DeLong, localisation and parity figures are
computed with the project's real metric functions from synthetic predictions, heat maps and boxes;
timings, utilisation and ONNX Runtime figures follow each backend's nominal speed.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from cxrbench.backend.numerics_record import build as numerics_record
from cxrbench.cam.overlay import overlay
from cxrbench.data.classes import CLASSES
from cxrbench.data.index import Box
from cxrbench.deploy.onnx_file import diff_stats
from cxrbench.metrics.auroc import auroc_report
from cxrbench.metrics.equivalence import agreement
from cxrbench.metrics.localisation import cam_localisation, centred_box_baseline, localisation_accuracy
from cxrbench.run.comparison import localisation_section
from cxrbench.run.folder import SCHEMA_VERSION
from cxrbench.suite import Settings

BOX_CLASSES = ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia", "Pneumothorax")
#: Nominal training images/s per backend (keras slower, as in the DeepLearningFrameworks benchmark).
DEFAULT_SPEED = {"pytorch": 30.0, "keras": 18.0}
HOSTILE_CLASS = "<script>alert('class')</script>"
HOSTILE_BACKEND = "<img src=x onerror=alert('backend')>"
HOSTILE_ERROR = "</pre><script>alert('error')</script><b id=injected>boom</b>"
HOSTILE_PLUGIN = "<iframe src=javascript:alert('plugin')></iframe>"


def _write(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1), encoding="utf-8")


def _environment(gpus: int) -> dict:
    devices = [{"index": i, "name": "NVIDIA H100 80GB HBM3", "memory_total_mib": 81559} for i in range(gpus)]
    gpu = (
        {"available": True, "count": gpus, "devices": devices, "driver": "550.54.15", "cuda_driver": "12.4"}
        if gpus
        else {"available": False, "count": 0, "devices": [], "reason": "NVML unavailable: NVMLError_LibraryNotFound"}
    )
    return {
        "os": "Linux-6.1.0-x86_64-with-glibc2.36",
        "python": "3.11.9",
        "cpu": "AMD EPYC 7B13",
        "cpu_count_logical": 2,
        "cpu_count_physical": 1,
        "memory_total_gib": 7.8,
        "packages": {
            "cxrbench": "0.1.0",
            "numpy": "2.1.3",
            "torch": "2.14.1",
            "torchvision": "0.29.1",
            "tensorflow": "2.21.0",
            "keras": "3.15.0",
            "onnx": "1.23.0",
            "onnxruntime": "1.32.0",
        },
        "gpu": gpu,
        "git_commit": "6cf1d94",
        "env": {},
    }


def _numerics(name: str) -> dict:
    """A numerics record with the core's keys, as each backend writes it (framework extras differ)."""
    keras = name == "keras"
    return numerics_record(
        name,
        framework={"dtype_policy": "float32"} if keras else {"cudnn_benchmark": False},
        device="/device:GPU:0 (NVIDIA H100 80GB HBM3)" if keras else "cuda:0 (NVIDIA H100 80GB HBM3)",
        devices=["/device:GPU:0"] if keras else ["cuda:0"],
        world_size=1,
        nodes=1,
        data_parallel="none",
        batch_size_per_device=16,
        global_batch=16,
        learning_rate=1e-3,
        lr_scaling="linear",
        precision="fp32",
        compute_dtype="float32",
        loss_scaling=False,
        tf32=False,
        layout="NHWC" if keras else "NCHW",
        compile="tf.function" if keras else "eager",
        synchronized_batchnorm=False,
        batchnorm_sync="none",
        intra_op_threads=2,
        inter_op_threads=2,
        thread_budget={"intra_op": 2, "inter_op": 2},
        deterministic=False,
        input_pipeline="tf.data" if keras else "plain iteration",
        versions={"tensorflow": "2.21.0", "keras": "3.15.0"} if keras else {"torch": "2.14.1"},
    )


def _patients(n: int) -> np.ndarray:
    """Two images per patient, like follow-up images."""
    return np.arange(n) // 2 + 1


def _labels(rng, n: int, classes) -> np.ndarray:
    prevalence = np.linspace(0.08, 0.25, len(classes))
    labels = (rng.random((n, len(classes))) < prevalence).astype(np.uint8)
    labels[:2] = 1  # every class has positives
    labels[2:4] = 0  # and negatives
    return labels


def _history(rng, epochs: int, speed: float, images: int) -> list[dict]:
    records = []
    for epoch in range(1, epochs + 1):
        warmup = epoch == 1
        train_s = images / speed * (1.35 if warmup else 1.0) * rng.uniform(0.97, 1.03)
        records.append(
            {
                "epoch": epoch,
                "warmup": warmup,
                "train_loss": 0.35 / epoch**0.5,
                "val_loss": 0.33 / epoch**0.4,
                "train_time_s": train_s,
                "val_time_s": train_s * 0.18,
                "data_wait_s": train_s * 0.04,
                "images": images,
                "images_per_s": images / train_s,
                "lr": 1e-3 if epoch < 3 else 1e-4,
                "steps": images // 16,
                "best": True,
            }
        )
    return records


def _monitor(backend: str, history: list[dict], gpus: int, rng) -> list[dict]:
    samples, t = [], 1_700_000_000.0
    devices = [f"gpu{i}" for i in range(gpus)] + ["cpu"]
    for record in history:
        for phase, seconds in (("train", record["train_time_s"]), ("validate", record["val_time_s"])):
            for _ in range(max(2, int(seconds))):
                t += 1.0
                for device in devices:
                    gpu = device.startswith("gpu")
                    samples.append(
                        {
                            "t": t,
                            "backend": backend,
                            "phase": phase,
                            "epoch": record["epoch"],
                            "device": device,
                            "util": float(np.clip(rng.normal(75 if phase == "train" else 40, 12), 0, 100))
                            if gpu
                            else None,
                            "mem_mib": 30_000.0 if gpu else None,
                            "power_w": 350.0 if gpu else None,
                            "temp_c": 60.0 if gpu else None,
                            "cpu_percent": float(np.clip(rng.normal(160, 20), 0, 200)),
                            "rss_mib": 2900.0,
                        }
                    )
    return samples


def _truth(rng, images: int, size: int) -> list[tuple[int, Box]]:
    truth = []
    for pos in range(images):
        label = BOX_CLASSES[pos % len(BOX_CLASSES)]
        w, h = rng.uniform(0.15, 0.4, 2) * size
        x, y = rng.uniform(0, size - w), rng.uniform(0, size - h)
        truth.append((pos, Box(f"{pos:08d}_000.png", label, x, y, w, h, size, size)))
    return truth


def _heat_maps(rng, truth, size: int, blur: float) -> np.ndarray:
    """(N, len(BOX_CLASSES), S, S) maps with a blob near each true box (further off for larger blur)."""
    yy, xx = np.mgrid[0:size, 0:size]
    maps = np.zeros((len(truth), len(BOX_CLASSES), size, size), np.float32)
    for pos, box in truth:
        cx, cy = box.x + box.w / 2 + rng.normal(0, blur), box.y + box.h / 2 + rng.normal(0, blur)
        maps[pos, BOX_CLASSES.index(box.label)] = np.exp(-((xx - cx) ** 2 / box.w**2 + (yy - cy) ** 2 / box.h**2) * 2)
    return maps


def _gray(rng, size: int) -> np.ndarray:
    """A chest-like gray image: bright mediastinum, dark lungs, noise (compresses like a real one)."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = 90 + 110 * np.exp(-((xx - 0.5) ** 2) / 0.01) + 40 * yy
    return np.clip(base + rng.normal(0, 12, (size, size)), 0, 255).astype(np.uint8)


def _cams(folder: Path, rng, truth, maps, count: int, size: int) -> None:
    entries, grays, heat, boxes = [], [], [], []
    for k, (pos, box) in enumerate(truth[:count]):
        gray = _gray(rng, size)
        m = maps[pos, BOX_CLASSES.index(box.label)]
        heat_u8 = (255 * (m - m.min()) / max(m.max() - m.min(), 1e-9)).astype(np.uint8)
        image = overlay(gray, heat_u8, [(box.x, box.y, box.w, box.h)], [])
        name = f"{box.image[:-4]}_{k:02d}.png"
        (folder / "cams").mkdir(parents=True, exist_ok=True)
        image.save(folder / "cams" / name)
        entries.append({"file": name, "image": box.image, "position": pos, "class": box.label})
        grays.append(gray)
        heat.append(heat_u8)
        boxes.append([k, box.x, box.y, box.w, box.h])
    _write(folder / "cams" / "index.json", entries)
    np.savez(
        folder / "cams.npz",
        positions=np.array([e["position"] for e in entries]),
        classes=np.array([e["class"] for e in entries]),
        maps=np.stack(heat),
        images=np.stack(grays),
        true_boxes=np.array(boxes, dtype=np.float64),
    )


def _localisation(truth, maps, size: int) -> dict:
    result = cam_localisation(maps, truth, [CLASSES.index(c) for c in BOX_CLASSES], threshold=0.5)
    result["centred_box"] = localisation_accuracy(centred_box_baseline(truth, size), truth, metric="iobb")
    return result


def _onnx(backend: str, logits: np.ndarray, rng) -> dict:
    layout = "NCHW" if backend != "keras" else "NHWC"
    return {
        "export": {
            "path": "model.onnx",
            "layout": layout,
            "opset": 17,
            "input_name": "input",
            "output_name": "logits",
            "seconds": 1.2 if layout == "NCHW" else 13.0,
            "exporter": "torch.onnx (dynamo=False)" if layout == "NCHW" else "tf2onnx.convert.from_function",
        },
        "parity_random": diff_stats(logits, logits + rng.normal(0, 1e-7, logits.shape), 1e-4, 1e-3),
        "parity_images": diff_stats(logits, logits + rng.normal(0, 2e-7, logits.shape), 1e-4, 1e-3),
        "metadata": {"cxrbench.backend": backend},
    }


def _log(backend: str, error: str | None, lines: int = 100) -> str:
    text = [f"[{backend}] epoch 1 step {i}/50 loss 0.{300 + i}" for i in range(lines)]
    return "\n".join(text + ([f"Traceback (most recent call last):\n  ...\n{error}"] if error else [])) + "\n"


def _write_backend(
    run_dir: Path,
    name: str,
    rng,
    labels,
    classes,
    failed: bool,
    gpus: int,
    cam_images: int,
    image_size: int,
    speed: float,
    epochs: int,
    hostile: bool,
) -> dict:
    folder = run_dir / name
    error = (HOSTILE_ERROR if hostile else "BackendError: out of memory at batch size 16") if failed else None
    history = _history(rng, 1 if failed else epochs, speed, 640)
    info = {
        "name": name,
        "framework": "keras" if "keras" in name else "torch",
        "version": "3.15.0" if "keras" in name else "2.14.1",
        "plugin": HOSTILE_PLUGIN if hostile else f"cxrbench_{name}",
        "onnx_layout": "NHWC" if "keras" in name else "NCHW",
        "extra": {},
    }
    summary = {
        "status": "failed" if failed else "completed",
        "error": error,
        "info": info,
        "history": history,
        "log": f"{name}/log.txt",
        # what a further seed repeat would cost (prepare-check + train + evaluate + cam): 70 s pytorch, 110 s keras
        "stage_seconds": {
            "prepare-check": 2.0,
            "equivalence": 3.0,
            "train": {"pytorch": 60.0, "keras": 100.0}.get(name, 80.0),
            "evaluate": 5.0,
            "cam": 3.0,
        },
    }
    _write(folder / "history.json", history)
    (folder / "log.txt").write_text(_log(name, error), encoding="utf-8")
    monitor = _monitor(name, history, gpus, rng)
    (folder / "monitor.jsonl").write_text("".join(json.dumps(s) + "\n" for s in monitor), encoding="utf-8")
    summary["gpu"] = {
        "gpu_available": bool(gpus),
        "source": "nvml" if gpus else "none",
        "reason": None if gpus else "NVML unavailable: NVMLError_LibraryNotFound",
    }
    _write(folder / "monitor.json", summary["gpu"])
    if not failed:
        quality = {"pytorch": 1.6}.get(name, 1.5)
        logits = (labels * quality + rng.normal(0, 1, labels.shape) - 1.5).astype(np.float32)
        files = np.array([f"{i:08d}_000.png" for i in range(len(labels))])
        np.savez(folder / "predictions.npz", logits=logits, labels=labels, files=files, patients=_patients(len(labels)))
        summary["auroc"] = auroc_report(labels, logits, classes, groups=_patients(len(labels)), rounds=50, seed=0)
        _write(folder / "metrics.json", {"auroc": summary["auroc"]})
        truth = _truth(np.random.default_rng(7), 40, image_size)  # same boxes for every backend
        maps = _heat_maps(rng, truth, image_size, blur=image_size * (0.05 if name == "pytorch" else 0.08))
        summary["localisation"] = _localisation(truth, maps, image_size)
        _write(folder / "localisation.json", summary["localisation"])
        _cams(folder, np.random.default_rng(11), truth, maps, cam_images, image_size)
        steady = [r for r in history if not r["warmup"]]
        rates = {"train": speed * rng.uniform(0.95, 1.05, 12), "predict": speed * 3.4 * rng.uniform(0.9, 1.1, 6)}
        summary["throughput"] = {
            "train_images_per_s": float(np.median(rates["train"])),
            "train_images_per_s_interval": [float(np.percentile(rates["train"], q)) for q in (2.5, 97.5)],
            "first_step_s": 100.0 if name == "keras" else 1.2,
            "steady": True,
            "epoch_time_s": float(np.median([r["train_time_s"] for r in steady])),
            "warmup_epoch_time_s": history[0]["train_time_s"],
            "predict_images_per_s": float(np.median(rates["predict"])),
            "window_rates": {k: [float(r) for r in v] for k, v in rates.items()},
            "disturbed": False,
            "disturbance": {},
            "gpus": max(gpus, 1) if gpus else 0,
        }
        summary["train"] = {"best_epoch": epochs, "best_val_loss": history[-1]["val_loss"], "numerics": _numerics(name)}
        summary["onnx"] = _onnx(name, logits, rng)
        for key, file_name in (("throughput", "throughput.json"), ("train", "train.json"), ("onnx", "onnx.json")):
            _write(folder / file_name, summary[key])
    _write(
        folder / "status.json",
        {
            "backend": name,
            "status": summary["status"],
            "stages": {"train": "done"},
            "error": error,
            "pid": 1234,
            "started": "2025-11-27T13:00:00+0000",
            "finished": "2025-11-27T13:05:00+0000",
        },
    )
    return summary


def _comparison(run_dir: Path, names: list[str], summaries: dict, labels, classes, rng) -> dict:
    ok = [n for n in names if summaries[n]["status"] == "completed"]
    model_labels = [label for n in ok for label in (n, f"{n}/onnx")]
    size = len(model_labels)
    max_abs = [[0.0 if i == j else float(10 ** rng.uniform(-7.5, -6)) for j in range(size)] for i in range(size)]
    max_abs = [[max(max_abs[i][j], max_abs[j][i]) for j in range(size)] for i in range(size)]
    predictions = {n: np.load(run_dir / n / "predictions.npz")["logits"] for n in ok}
    pairs = []
    for i, a in enumerate(ok):
        for b in ok[i + 1 :]:
            pair = agreement(a, predictions[a], b, predictions[b], labels, _patients(len(labels)), rounds=50)
            pairs.append(
                {
                    **pair,
                    "per_class": dict(zip(classes, pair["per_class"].values())),
                    "score_correlation": {**pair["score_correlation"], "spearman": 0.9},
                }
            )
    return {
        "schema_version": SCHEMA_VERSION,
        "equivalence": {
            "atol": 1e-4,
            "labels": model_labels,
            "max_abs": max_abs,
            "mean_abs": [[v / 10 for v in row] for row in max_abs],
            "passed": True,
            "failures": [],
        },
        "parity": {n: summaries[n]["onnx"]["parity_images"] for n in ok},
        "agreement": {"pairs": pairs},
        "localisation": localisation_section(run_dir, ok, Settings().replace(**{"eval.bootstrap_rounds": 200})),
        "onnxruntime": {
            n: {
                "latency_ms_b1": {"p50": 800 / DEFAULT_SPEED.get(n, 25.0), "p95": 900 / DEFAULT_SPEED.get(n, 25.0)},
                "throughput_b32_images_per_s": DEFAULT_SPEED.get(n, 25.0) * 5,
                "session_options": {"intra_op_num_threads": 2, "graph_optimization_level": "ORT_ENABLE_ALL"},
            }
            for n in ok
        },
    }


def make_fake_run(
    root: Path,
    *,
    backends=("pytorch", "keras"),
    failed: str | None = None,
    n_test: int = 400,
    cam_images: int = 16,
    image_size: int = 64,
    gpus: int = 0,
    epochs: int = 3,
    scaling: bool = False,
    hostile: bool = False,
    seed: int = 0,
    settings: Settings | None = None,
) -> Path:
    """Write a complete run folder at ``root`` and return it.

    ``failed`` names a backend that failed after its first epoch; ``hostile`` puts markup and
    ``<script>`` into a class name, the first (baseline) backend's name, the plugin names, the
    failed backend's error and the suite name.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    names = list(backends)
    classes = list(CLASSES)
    if hostile:
        classes[-1] = HOSTILE_CLASS
        names[0] = HOSTILE_BACKEND
    settings = settings or Settings(name=HOSTILE_CLASS if hostile else "smoke")
    labels = _labels(rng, n_test, classes)
    summaries = {
        n: _write_backend(
            root,
            n,
            rng,
            labels,
            classes,
            n == failed,
            gpus,
            cam_images,
            image_size,
            DEFAULT_SPEED.get(n, 25.0),
            epochs,
            hostile,
        )
        for n in names
    }
    _write(root / "comparison.json", _comparison(root, names, summaries, labels, classes, rng))
    _write(
        root / "run.json",
        {
            "schema_version": SCHEMA_VERSION,
            "cxrbench_version": "0.1.0",
            "suite": settings.name,
            "settings": settings.to_dict(),
            "environment": _environment(gpus),
            "created": "2025-11-27T13:00:00+0000",
            "finished": "2025-11-27T13:06:00+0000",
            "argv": ["cxrbench", "run"],
            "baseline": names[0],
            "data": {
                "source": "phantom",
                "root": "/tmp/phantom",
                "key": "abc123",
                "size": image_size,
                "splits": {"train": 640, "val": 80, "test": n_test},
                "classes": classes,
                "class_order": "chexnet",
            },
            "backends": summaries,
            "scaling": (
                {
                    n: [
                        {
                            "gpus": g,
                            "images_per_s": DEFAULT_SPEED.get(n, 25.0) * g * (1 - 0.06 * (g - 1)),
                            "efficiency": 1 - 0.06 * (g - 1),
                            "gpu_util": {"mean": 80 - 3 * g},
                        }
                        for g in (1, 2, 4)
                    ]
                    for n in names
                }
                if scaling
                else None
            ),
        },
    )
    return root
