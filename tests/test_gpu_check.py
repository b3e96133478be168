"""tools/gpu-check.sh: its --help (budget, files, wheels), the offline exposure of the checkout, carried wheels, the
budget and time-out rules, the refusal without a GPU, and (slow) the whole --dry-run in an imitation of the GPU
machine's image: no TensorFlow, Keras, tf2onnx or GPUtil, cxrbench not installed."""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from cxrbench.errors import out_of_memory
from cxrbench.files import write_json
from cxrbench.machine.env import gpu_inventory

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tools" / "gpu-check.sh"
#: sitecustomize.py that hides what the GPU machine's image lacks (see its docstring).
IMAGE_WITHOUT_TENSORFLOW = Path(__file__).resolve().parent / "image_without_tensorflow"


def _check(*args: str, timeout: float, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHON": sys.executable, **(env or {})},
    )


@pytest.fixture
def tools(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "tools"))
    import gpu_check
    import tree_site

    return SimpleNamespace(gpu_check=gpu_check, tree_site=tree_site)


# -- what --help promises ----------------------------------------------------------------------------


def test_help_documents_every_step_budget_result_file_and_the_wheels(tools):
    done = _check("--help", timeout=60)
    assert done.returncode == 0, done.stderr
    text = done.stdout
    documented = {m[0]: (int(m[1]), int(m[2])) for m in re.findall(r"^  ([a-z0-9-]+) +(\d+) +(\d+)  ", text, re.M)}
    assert documented == {name: (s.estimate_s, s.limit_s) for name, s in tools.gpu_check.STEPS.items()}
    assert f"default {tools.gpu_check.BUDGET_S:.0f} s, under 9 minutes" in text
    assert tools.gpu_check.BUDGET_S <= 9 * 60 - 15  # a stop's grace lies inside the budget; 15 s to start and end
    assert all(name in text for name in tools.gpu_check.OUT_FILES) and len(tools.gpu_check.OUT_FILES) <= 8
    assert "pip download --no-deps --only-binary=:all: --python-version 3.12" in text and "--wheels .whl" in text
    assert "bash tools/gpu-check.sh --out $OUT" in text


@pytest.mark.skipif(gpu_inventory()["count"] > 0, reason="this machine has a GPU")
def test_without_a_gpu_the_check_refuses_in_one_line(tmp_path):
    done = _check("--out", str(tmp_path / "check"), "--work", str(tmp_path / "work"), timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and done.stderr.startswith("gpu-check: no NVIDIA GPU on this machine")
    assert "--dry-run" in done.stderr and not (tmp_path / "check").exists()


# -- the checkout without installing it ---------------------------------------------------------------


def test_tree_site_makes_entry_points_and_versions_visible(tools, tmp_path):
    core = tools.tree_site.read(ROOT)
    pytorch = tools.tree_site.read(ROOT / "plugins" / "pytorch_backend")
    assert (pytorch.name, pytorch.entry_points["cxrbench"]) == ("cxrbench-pytorch", {"pytorch": "cxrbench_pytorch"})
    entries = tools.tree_site.expose([core, pytorch], tmp_path / "site")
    assert entries == [str((tmp_path / "site").resolve()), str(ROOT), str(ROOT / "plugins" / "pytorch_backend")]
    found = {d.metadata["Name"]: d for d in importlib.metadata.distributions(path=[entries[0]])}
    assert sorted(found) == ["cxrbench", "cxrbench-pytorch"]
    assert found["cxrbench"].version == core.version
    points = {(ep.group, ep.name, ep.value) for d in found.values() for ep in d.entry_points}
    assert ("cxrbench", "pytorch", "cxrbench_pytorch") in points
    assert ("console_scripts", "cxrbench", "cxrbench.cli:main") in points


def _wheel(folder: Path, name: str, version: str, code: str) -> Path:
    """A minimal pure-Python wheel (a zip with its .dist-info and a RECORD of hashes), as pip wheel writes one."""
    info = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": code,
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(text.encode())}")
    files[f"{info}/RECORD"] = "\n".join([*record, f"{info}/RECORD,,"]) + "\n"
    path = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as wheel:
        for member, text in files.items():
            wheel.writestr(member, text)
    return path


def test_carried_wheels_are_installed_offline_into_the_work_folder(tools, tmp_path):
    carried = tmp_path / "whl"
    carried.mkdir()
    _wheel(carried, "carried_demo", "1.0", "VALUE = 42\n")
    entries = tools.gpu_check.install_wheels(carried, tmp_path / "work" / "wheels")
    done = subprocess.run(
        [sys.executable, "-c", "import carried_demo; print(carried_demo.VALUE)"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(entries)},
    )
    assert done.stdout.strip() == "42", done.stderr
    (tmp_path / "empty").mkdir()
    with pytest.raises(tools.gpu_check.WheelsError, match="no .whl file there"):
        tools.gpu_check.install_wheels(tmp_path / "empty", tmp_path / "work" / "other")


# -- the budget and the time limit --------------------------------------------------------------------


def _check_object(tools, tmp_path, budget_s: float, dry: bool = False):
    out, work = tmp_path / "out", tmp_path / "work"
    out.mkdir()
    summary = {"backends": {"pytorch": None, "keras": "not installed: tensorflow cannot be imported here"}, "steps": {}}
    return tools.gpu_check.Check(out, work, dry, budget_s, 1, summary)


def test_a_step_that_cannot_finish_in_the_time_left_is_skipped_and_says_so(tools, tmp_path):
    check = _check_object(tools, tmp_path, budget_s=100)  # 80 s usable, the sweep needs 120
    check.step(tools.gpu_check.STEPS["sweep"], lambda: pytest.fail("must not start"))
    record = json.loads((tmp_path / "out" / "gpu-check.json").read_text())["steps"]["sweep"]
    assert record["status"] == "skipped" and record["for_time"] is True
    assert record["reason"].startswith("80 s of the budget left, the step needs about 120 s")
    summary = json.loads((tmp_path / "out" / "gpu-check.json").read_text())
    assert summary["passed"] is True and summary["complete"] is False
    check.step(tools.gpu_check.STEPS["mirrored-keras"], lambda: pytest.fail("must not start"))
    assert check.steps["mirrored-keras"]["reason"] == (
        "needs keras (keras: not installed: tensorflow cannot be imported here)"
    )


def test_a_step_cut_at_its_limit_keeps_what_its_run_wrote(tools, tmp_path, monkeypatch):
    check = _check_object(tools, tmp_path, budget_s=500)
    folder = tmp_path / "work" / "runs" / "sweep"
    grid = {"numerics.precision": ["bf16"]}

    def killed_at_the_limit(args, env=None):
        """What a `cxrbench run` killed before its finish leaves: run.json as written at the start, the backends'
        own files as far as they got (the fp32 run done, the bf16 cell still training)."""
        write_json(folder / "run.json", {"status": "running", "backends": {"pytorch": {}}, "sweep": {"grid": grid}})
        write_json(folder / "pytorch" / "status.json", {"status": "completed", "error": None, "stages": {}})
        write_json(folder / "pytorch" / "throughput.json", {"train_images_per_s": 812.5, "disturbed": False})
        write_json(folder / "pytorch" / "train.json", {"numerics": {"precision": "fp32", "device": "cuda:0"}})
        write_json(folder / "sweep" / "numerics.precision-bf16" / "pytorch" / "status.json", {"status": "running"})
        raise tools.gpu_check.StepTimedOut(f"timed out after {check.limit_s:.0f} s")

    monkeypatch.setattr(check, "command", killed_at_the_limit)
    check.backends = ["pytorch"]
    check.step(tools.gpu_check.STEPS["sweep"], check.sweep)

    record = json.loads((tmp_path / "out" / "gpu-check.json").read_text())["steps"]["sweep"]
    assert record["status"] == "timed out" and record["limit_s"] == 300
    assert record["error"] == "timed out after 300 s; the record holds what the run wrote by then"
    pytorch = record["partial"]["backends"]["pytorch"]
    assert (pytorch["status"], pytorch["train_images_per_s"], pytorch["conditions"]["precision"]) == (
        "completed",
        812.5,
        "fp32",
    )
    assert [(c["point"], c["status"]) for c in record["partial"]["cells"]] == [("numerics.precision-bf16", "running")]
    assert json.loads((tmp_path / "out" / "sweep-run.json").read_text())["status"] == "running"  # kept as it was
    assert json.loads((tmp_path / "out" / "gpu-check.json").read_text())["passed"] is False


def test_oversized_on_a_gpu_needs_the_one_line_out_of_memory_error_from_every_backend(tools, tmp_path):
    check = _check_object(tools, tmp_path, budget_s=500)
    oom = str(out_of_memory("cuda:0 (NVIDIA H200)", 1280, "training"))
    run = {
        "backends": {
            "pytorch": {"status": "failed", "error": oom, "stages": {"train": "failed"}},
            "jax": {"status": "completed", "error": None, "stages": {"train": "done"}},  # fitted: no error to show
        }
    }
    record = check._oversized_record(run)
    assert (record["status"], record["error"]) == ("failed", "not as expected: jax")
    run["backends"]["jax"] = {"status": "failed", "error": "XlaRuntimeError: INTERNAL: ...\nmore", "stages": {}}
    assert check._oversized_record(run)["error"] == "not as expected: jax"
    run["backends"]["jax"]["error"] = str(out_of_memory("gpu:0 (NVIDIA H200)", 1280, "training"))
    assert check._oversized_record(run)["status"] == "passed"


# -- the whole check, rehearsed on the CPU in the GPU machine's image ----------------------------------


@pytest.mark.slow
@pytest.mark.backends("pytorch", "jax")
def test_dry_run_without_tensorflow_passes_pytorch_and_jax_and_skips_keras(tmp_path, tools):
    """The command as the GPU machine runs it, --dry-run, with only PYTHONPATH pointing at the image imitation: the
    check has to expose the checkout itself (nothing of cxrbench is installed there)."""
    out = tmp_path / "out"
    env = {"PYTHONPATH": str(IMAGE_WITHOUT_TENSORFLOW)}
    done = _check("--dry-run", "--out", str(out), "--work", str(tmp_path / "work"), timeout=1500, env=env)
    summary_path = out / "gpu-check.json"
    assert done.stdout.strip().splitlines()[-1].endswith(f"summary: {summary_path}"), done.stdout + done.stderr
    summary = json.loads(summary_path.read_text())
    steps = summary["steps"]
    assert done.returncode == 0 and summary["passed"], json.dumps(steps, indent=1)[:6000]

    assert summary["environment"]["exposed_from_checkout"] == ["cxrbench", "cxrbench-pytorch", "cxrbench-jax"]
    keras_reason = "not installed: tensorflow, keras, tf2onnx cannot be imported here"
    assert summary["backends"] == {"pytorch": None, "keras": keras_reason, "jax": None}
    assert {name: step["status"] for name, step in steps.items()} == {
        "devices": "passed",
        "syncs-torch": "passed",
        "ddp-torch": "passed",
        "mirrored-keras": "skipped",
        "ddp-sigterm": "skipped",
        "visible-device": "skipped",
        "oversized": "passed",
        "tf32": "skipped",
        "sweep": "passed",
        "compile": "skipped",
    }
    assert steps["mirrored-keras"]["reason"] == f"needs keras (keras: {keras_reason})"
    frameworks = steps["devices"]["frameworks"]
    assert frameworks["tensorflow"] == {"status": "skipped", "reason": f"keras: {keras_reason}"}
    assert frameworks["torch"]["status"] == frameworks["jax"]["status"] == "passed"
    assert frameworks["jax"]["compilation_cache_dir"] == summary["environment"]["jax_compilation_cache_dir"]
    assert any(Path(summary["environment"]["jax_compilation_cache_dir"]).glob("jit_step-*"))  # the workers' cache

    assert steps["syncs-torch"]["counted"] is False
    assert all(v["steps"] == 3 and v["finite_losses"] for v in steps["syncs-torch"]["variants"].values())
    ddp = steps["ddp-torch"]
    assert (ddp["device"], ddp["ranks"], ddp["backend"]) == ("cpu", 1, "gloo")  # one rank, as on the one-GPU machine
    assert ddp["data_parallel"] == "DistributedDataParallel (gloo)" and ddp["max_abs_weight_diff_between_ranks"] == 0
    oversized = steps["oversized"]["backends"]
    assert {name: (b["status"], b["stages"]["train"]) for name, b in oversized.items()} == {
        "pytorch": ("completed", "done"),
        "jax": ("completed", "done"),
    }

    sweep = steps["sweep"]
    assert sweep["equivalence_tf32_off"]["passed"] is True
    assert sweep["equivalence_tf32_off"]["labels"] == ["pytorch", "pytorch/onnx", "jax", "jax/onnx"]
    assert {name: p["passed"] for name, p in sweep["onnx_parity"].items()} == {"pytorch": True, "jax": True}
    assert all(b["status"] == "completed" and b["train_images_per_s"] for b in sweep["backends"].values())
    cells = {c["backend"]: c for c in sweep["cells"]}
    assert cells["pytorch"]["status"] == "completed" and cells["pytorch"]["train_images_per_s"] > 0
    assert cells["jax"]["status"] == "refused"
    assert cells["jax"]["error"] == "numerics.precision = 'bf16': the jax backend computes in fp32 only"
    assert [(row["backend"], row["status"]) for row in summary["figures"]] == [
        ("pytorch", "completed"),
        ("jax", "completed"),
        ("pytorch", "completed"),
        ("jax", "refused"),
    ]

    returned = sorted(path.name for path in out.iterdir())
    assert set(returned) <= set(tools.gpu_check.OUT_FILES) and len(returned) <= 8
    assert all(path.is_file() and path.stat().st_size < 16 * 2**20 for path in out.iterdir())
    assert {"gpu-check.log", "oversized-run.json", "sweep-run.json", "sweep-comparison.json"} <= set(returned)


def test_metadata_seen_only_from_the_checkout_is_not_an_installation(tools, tmp_path, monkeypatch):
    """A build leaves ``<name>.egg-info`` in the checkout, visible through the current folder only: the check's probes,
    started elsewhere, could not import the package, so the check must expose it (CI's fresh clone showed this)."""
    checkout = tmp_path / "checkout"
    (checkout / "demo_dist.egg-info").mkdir(parents=True)
    (checkout / "demo_dist.egg-info" / "PKG-INFO").write_text("Metadata-Version: 2.1\nName: demo-dist\nVersion: 1.0\n")
    monkeypatch.syspath_prepend(str(checkout))
    assert not tools.tree_site.installed("demo-dist", checkout)
    assert tools.tree_site.installed("demo-dist", tmp_path / "elsewhere")
    assert not tools.tree_site.installed("no-such-distribution", checkout)
