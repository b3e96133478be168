"""What each worker stage computes and writes. Framework-free: the backend is reached through hooks.

Each function takes the :class:`StageContext` and writes its files (atomically) into the
backend's folder; the worker marks the stage done afterwards.
"""

from __future__ import annotations

import dataclasses
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cxrbench.backend import canonical, numerics_record, timing
from cxrbench.backend.recorder import Recorder
from cxrbench.cam import files as cam_files
from cxrbench.data.classes import CLASSES
from cxrbench.errors import CxrError
from cxrbench.files import atomic_output, read_json, require_space, save_npz, write_json
from cxrbench.machine import energy
from cxrbench.plugins import require_answer
from cxrbench.run import profiling
from cxrbench.run.folder import (
    CEILING_JSON,
    EFFICIENCY_JSON,
    EQUIVALENCE_NPZ,
    HISTORY_JSON,
    INIT_ONNX,
    INIT_ONNX_JSON,
    LOCALISATION_JSON,
    METRICS_JSON,
    MODEL_ONNX,
    ONNX_JSON,
    PREDICTIONS_NPZ,
    PROFILE_JSON,
    THROUGHPUT_JSON,
    TRAIN_JSON,
    WEIGHTS_NPZ,
)
from cxrbench.suite import Settings

#: Random (uint8 noise) images compared between the native model and its ONNX export.
RANDOM_PARITY_IMAGES = 8


@dataclass
class StageContext:
    folder: Path
    backend: str
    hook: Any
    settings: Settings
    recorder: Recorder
    data: Any = None  #: cxrbench.data.prepared.PreparedData
    model: Any = None
    energy_meter: Any = None  #: cxrbench.machine.energy.EnergyMeter, read at the timing windows' edges

    @property
    def energy(self):
        """The meter's reading function for the window timers (None without a meter)."""
        return self.energy_meter.read if self.energy_meter is not None else None

    def call(self, name: str, **kwargs):
        """A ``firstresult`` hook of the selected backend; a missing answer is a clear error."""
        return require_answer(getattr(self.hook, name)(**kwargs), name, self.backend)

    def logits(self, images: np.ndarray, tta: bool | None = None) -> np.ndarray:
        settings = self.settings if tta is None else self.settings.replace(**{"eval.tta_hflip": tta})
        logits = np.asarray(
            self.call("cxrbench_predict", model=self.model, images=images, settings=settings), dtype=np.float32
        )
        if logits.shape != (len(images), len(CLASSES)):
            raise CxrError(
                f"backend {self.backend!r}: cxrbench_predict returned shape {logits.shape}, "
                f"expected {(len(images), len(CLASSES))}"
            )
        return logits


def sigmoid(logits: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(logits, dtype=np.float64)))


# -- equivalence ---------------------------------------------------------------------------------


def equivalence(ctx: StageContext, batch_path: Path) -> None:
    """Logits of the initial model on the shared batch, and the initial model in ONNX (init.onnx)."""
    batch = np.load(batch_path, allow_pickle=False)
    save_npz(ctx.folder / EQUIVALENCE_NPZ, logits=ctx.logits(batch, tta=False))
    if ctx.settings.export.onnx:
        info = export_onnx(ctx, ctx.folder / INIT_ONNX)
        write_json(ctx.folder / INIT_ONNX_JSON, {"export": info.to_dict()})


# -- train ---------------------------------------------------------------------------------------


def train(ctx: StageContext) -> None:
    """Train from the initial weights; keep the best weights in the canonical layout."""
    write_json(ctx.folder / HISTORY_JSON, [])
    result = ctx.call("cxrbench_train", model=ctx.model, data=ctx.data, settings=ctx.settings, recorder=ctx.recorder)
    write_json(ctx.folder / HISTORY_JSON, [r.to_dict() for r in ctx.recorder.history])
    write_json(ctx.folder / TRAIN_JSON, result)
    weights = ctx.call("cxrbench_get_weights", model=ctx.model)
    canonical.validate(weights, ctx.settings.model.block_config, f"backend {ctx.backend!r} weights")
    canonical.save(weights, ctx.folder / WEIGHTS_NPZ)
    history = [r.to_dict() for r in ctx.recorder.history]
    throughput = {
        **training_throughput(history, ctx.settings),
        **framework_peak_memory(result.get("peak_memory")),
        "energy": training_energy(history, ctx.energy_meter),
    }
    write_json(ctx.folder / THROUGHPUT_JSON, throughput)
    write_json(ctx.folder / EFFICIENCY_JSON, profiling.efficiency(ctx, throughput))
    # Checked last, so a backend with a broken record still leaves its trained weights and timings behind.
    numerics_record.check(ctx.backend, result.get("numerics"))


def training_energy(history: list[dict], meter) -> dict[str, Any]:
    """Joules per image of the steady training and validation windows (the counter read at their edges), and what
    the counter covers or why there is none (:mod:`cxrbench.machine.energy`)."""
    described = meter.describe() if meter is not None else {"source": "none", "covers": None, "reason": "no meter"}
    phases = {
        phase: energy.phase_energy([w for r in history for w in r.get(key) or []])
        for phase, key in (("train", "train_window_list"), ("validate", "val_window_list"))
    }
    return {**described, **phases}


def framework_peak_memory(peak: dict[str, Any] | None) -> dict[str, Any]:
    """The framework's own peak device allocation while training (``cxrbench_train``'s optional ``peak_memory``),
    beside the monitor's NVML figure, which adds caching allocators' reserves and the CUDA context."""
    peak = peak or {}
    return {"framework_peak_memory_mib": peak.get("mib"), "framework_peak_memory_source": peak.get("source")}


def training_throughput(history: list[dict], settings: Settings) -> dict[str, Any]:
    """Steady-state training and validation images/s pooled over every epoch's windows, and the warm-up.

    Epoch times keep their old meaning: the median over the epochs after the warm-up epoch (the
    warm-up epoch when alone).
    """
    gpus, train = settings.run.gpus, settings.train
    if not history:
        return {"gpus": gpus, "steady": False, "disturbed": False, "disturbance": {}}
    later = [r for r in history if not r["warmup"]]
    measured = later or history
    windows = {
        phase: [w for r in history for w in r.get(key) or []]
        for phase, key in (("train", "train_window_list"), ("validate", "val_window_list"))
    }
    figures = {phase: timing.summarise(found) for phase, found in windows.items()}
    steps_after = sum(r.get("steps_after_warmup") or 0 for r in history)
    return {
        "train_images_per_s": figures["train"]["images_per_s"],
        "train_images_per_s_interval": figures["train"]["interval"],
        "first_step_s": history[0].get("first_step_s"),
        "validate_images_per_s": figures["validate"]["images_per_s"],
        "validate_images_per_s_interval": figures["validate"]["interval"],
        "steady": figures["train"]["steady"],
        "no_steady_state": None
        if figures["train"]["steady"]
        else timing.no_steady_reason(
            steps_after,
            figures["train"]["windows"],
            train.warmup_steps,
            train.window_steps,
            timed=any(r.get("first_step_s") is not None for r in history),
        ),
        "epoch_time_s": statistics.median(r["train_time_s"] for r in measured),
        "warmup_epoch_time_s": next((r["train_time_s"] for r in history if r["warmup"]), None),
        "warmup_only": not later,
        "epochs_measured": len(measured),
        "warmup_steps": train.warmup_steps,
        "window_steps": train.window_steps,
        "phases": figures,
        "window_rates": {phase: rounded_rates(found) for phase, found in windows.items()},
        "disturbed": False,
        "disturbance": {},
        "gpus": gpus,
    }


def rounded_rates(windows: list) -> list[float]:
    """Each window's images/s for throughput.json (the ratio intervals of the report resample them)."""
    return [round(float(r), 4) for r in timing.window_rates(windows)]


def add_prediction_figures(throughput: dict[str, Any], timer: timing.WindowTimer) -> dict[str, Any]:
    """The prediction figures (windows of ``cxrbench_predict`` calls on the test split) into throughput.json."""
    figure = timing.summarise(timer.windows)
    throughput.update(predict_images_per_s=figure["images_per_s"], predict_images_per_s_interval=figure["interval"])
    throughput.setdefault("disturbed", False)  # the noise guard's verdicts are merged in when the worker ends
    throughput.setdefault("disturbance", {})
    throughput.setdefault("phases", {})["predict"] = figure
    throughput.setdefault("window_rates", {})["predict"] = rounded_rates(timer.windows)
    throughput.setdefault("energy", {})["predict"] = energy.phase_energy([w.to_list() for w in timer.windows])
    return throughput


# -- ceiling and profile (where the time goes, how close to the machine's limit) ----------------------------------


def ceiling(ctx: StageContext) -> None:
    """The device's dense-matmul rate, measured by the backend's framework before training (ceiling.json)."""
    write_json(ctx.folder / CEILING_JSON, profiling.ceiling(ctx))


def profile(ctx: StageContext) -> None:
    """A few steady steps under the framework's profiler, cut into categories (profile.json, profile/ traces).
    An unavailable profiler is one line, printed and recorded; the run goes on."""
    record = profiling.profile(ctx)
    write_json(ctx.folder / PROFILE_JSON, record)
    if record["status"] != "done":
        print(f"[{ctx.backend}] profile {record['status']}: {record['reason']}", flush=True)


# -- evaluate ------------------------------------------------------------------------------------


def evaluate(ctx: StageContext) -> None:
    """Logits on the test split, and every plugin's metrics of them."""
    images, labels = ctx.data.split_images("test"), ctx.data.split_labels("test")
    logits, timer = timing.timed_calls(ctx.logits, images, ctx.settings.train.batch_size, ctx.energy)
    rows = ctx.data.rows("test")
    files = np.asarray([ctx.data.index.files[r] for r in rows])
    patients = np.asarray(ctx.data.index.patients)[rows]
    save_npz(ctx.folder / PREDICTIONS_NPZ, logits=logits, labels=labels, files=files, patients=patients)
    answers = ctx.hook.cxrbench_evaluate(
        labels=labels, scores=sigmoid(logits), classes=list(CLASSES), groups=patients, settings=ctx.settings
    )
    metrics = merge_metrics(answers)
    notes = independence_notes(ctx.hook.cxrbench_evaluate)
    if notes:
        metrics["independence_notes"] = notes
    write_json(ctx.folder / METRICS_JSON, metrics)
    throughput = read_json(ctx.folder / THROUGHPUT_JSON, {"gpus": ctx.settings.run.gpus})
    write_json(ctx.folder / THROUGHPUT_JSON, add_prediction_figures(throughput, timer))


def independence_notes(caller) -> list[str]:
    """One note per ``cxrbench_evaluate`` implementation that does not take ``groups``: pluggy calls it
    without the patients, so any interval or test it reports treats images as independent."""
    return [
        f"plugin {impl.plugin_name!r}: cxrbench_evaluate does not accept groups (patient ids), so its "
        "intervals and tests treat images as independent (too narrow when patients have several images)"
        for impl in caller.get_hookimpls()
        if "groups" not in impl.argnames
    ]


def merge_metrics(answers: list[dict | None]) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for answer in answers:
        for key, value in (answer or {}).items():
            if key in merged:
                raise CxrError(f"two plugins return the metric {key!r} from cxrbench_evaluate: namespace the keys")
            merged[key] = value
    return merged


# -- cam -----------------------------------------------------------------------------------------


def cam(ctx: StageContext) -> None:
    """CAMs of every boxed test image for the classes of its boxes, scored against the boxes."""
    from cxrbench.metrics.localisation import cam_localisation, centred_box_baseline, localisation_accuracy, upsample

    truth, mapping = ctx.data.mapped_boxes("test")
    crop_note = {"crop_boxes": mapping} if ctx.data.crop_boxes is not None else {}
    threshold, method = ctx.settings.eval.cam_threshold, ctx.settings.eval.cam_method
    if not truth:
        write_json(
            ctx.folder / LOCALISATION_JSON,
            {"skipped": "no test image has a box", "threshold": threshold, "method": method, **crop_note},
        )
        return
    positions = sorted({pos for pos, _ in truth})
    local = {pos: i for i, pos in enumerate(positions)}
    truth_local = [(local[pos], box) for pos, box in truth]
    class_indices = sorted({CLASSES.index(box.label) for _, box in truth})
    images = ctx.data.split_images("test")[positions]
    result = ctx.call("cxrbench_cam", model=ctx.model, images=images, classes=class_indices, settings=ctx.settings)
    maps = upsample(np.asarray(result.maps, dtype=np.float32), ctx.data.size)
    scores = cam_localisation(maps, truth_local, class_indices, threshold, method)
    baseline = localisation_accuracy(centred_box_baseline(truth_local, ctx.data.size), truth_local, metric="iobb")
    write_json(
        ctx.folder / LOCALISATION_JSON,
        {
            "iobb": scores["iobb"],
            "iou": scores["iou"],
            "centred_box": baseline,
            "threshold": threshold,
            "method": scores["method"],
            "method_description": scores["method_description"],
            "images": len(positions),
            "classes": [CLASSES[c] for c in class_indices],
            **crop_note,
            # every true box's best overlaps, its test-split position restored: compared box by box between backends
            "boxes": {**scores["boxes"], "position": [positions[i] for i in scores["boxes"]["position"]]},
        },
    )
    shown = positions[: ctx.settings.eval.cam_images]
    cam_files.write(
        ctx.folder,
        images[: len(shown)],
        maps[: len(shown)],
        shown,
        class_indices,
        truth_local,
        threshold,
        [ctx.data.index.files[ctx.data.rows("test")[p]] for p in shown],
        method,
    )


# -- export --------------------------------------------------------------------------------------


def export_onnx(ctx: StageContext, path: Path):
    """The backend exports to a temporary name beside ``path``; checked by ``onnx.checker`` and given the core's
    preprocessing metadata (the crop), it is renamed into place. A crash, a full disk or a rejected model never
    leaves a file (whole or partial) under ``path``."""
    from cxrbench.data import crop
    from cxrbench.deploy import onnx_file

    require_space(path.parent, canonical.nbytes(ctx.settings.model.block_config), f"the ONNX export {path.name}")
    preprocessing = crop.crop_metadata(crop.spec_from_settings(ctx.settings.data))

    def check_and_stamp(written: Path) -> None:
        """The backend's file checked first; then the core's own preprocessing (the crop), alike on every backend's
        export, so predict and serve prepare pictures as the training pictures were."""
        onnx_file.check_model(written)
        onnx_file.stamp_metadata(written, preprocessing)

    tmp: Path | None = None
    try:
        with atomic_output(path, check=check_and_stamp) as tmp:
            info = ctx.call("cxrbench_export_onnx", model=ctx.model, path=str(tmp), settings=ctx.settings)
    except CxrError as exc:
        if tmp is None or str(tmp) not in str(exc):
            raise
        raise CxrError(str(exc).replace(str(tmp), str(path))) from None  # name the file the user knows
    return dataclasses.replace(info, path=str(path))


def export(ctx: StageContext) -> None:
    """The trained model in ONNX, checked, and compared with the native model."""
    from cxrbench.deploy import onnx_file

    settings, path = ctx.settings, ctx.folder / MODEL_ONNX
    info = export_onnx(ctx, path)
    images = ctx.data.split_images("test")
    noise = np.random.default_rng(settings.run.seed).integers(
        0, 256, (RANDOM_PARITY_IMAGES, ctx.data.size, ctx.data.size), dtype=np.uint8
    )

    def parity(batch: np.ndarray) -> dict[str, Any]:
        native = ctx.logits(batch, tta=False)
        return onnx_file.diff_stats(
            native, onnx_file.run_onnx(path, batch, info.layout), settings.export.atol, settings.export.rtol
        )

    write_json(
        ctx.folder / ONNX_JSON,
        {
            "export": info.to_dict(),
            "checker": "passed",
            "parity_images": parity(images),
            "parity_random": parity(noise),
            "cam_identity": onnx_file.cam_identity(
                path, noise, info.layout, settings.export.atol, settings.export.rtol
            ),
            "metadata": onnx_file.read_metadata(path),
        },
    )
