"""tools/gpu-check.sh: refused in one line without a GPU; its --dry-run runs every step at tiny size on the CPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cxrbench.machine.env import gpu_inventory

SCRIPT = Path(__file__).resolve().parent.parent / "tools" / "gpu-check.sh"


def _check(*args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHON": sys.executable},
    )


@pytest.mark.skipif(gpu_inventory()["count"] > 0, reason="this machine has a GPU")
def test_without_a_gpu_the_check_refuses_in_one_line(tmp_path):
    done = _check("--out", str(tmp_path / "check"), timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and done.stderr.startswith("gpu-check: no NVIDIA GPU on this machine")
    assert "--dry-run" in done.stderr and not (tmp_path / "check").exists()


@pytest.mark.slow
@pytest.mark.backends("pytorch", "keras")
def test_dry_run_runs_every_step_on_the_cpu_and_writes_one_summary(tmp_path):
    out = tmp_path / "check"
    done = _check("--dry-run", "--backend", "pytorch", "--out", str(out), timeout=900)
    summary_path = out / "gpu-check.json"
    assert done.stdout.strip().splitlines()[-1].endswith(f"summary: {summary_path}"), done.stdout + done.stderr
    summary = json.loads(summary_path.read_text())
    assert done.returncode == 0 and summary["passed"], json.dumps(summary["steps"], indent=1)[:4000]
    steps = summary["steps"]
    assert {name: step["status"] for name, step in steps.items()} == {
        "devices": "passed",
        "sweep": "passed",
        "smoke": "passed",
        "ddp-torch": "passed",
        "mirrored-keras": "skipped",
        "compile": "passed",
        "tf32": "passed",
        "oversized": "skipped",
        "syncs-torch": "skipped",
        "ddp-sigterm": "skipped",
        "visible-device": "skipped",
    }
    assert steps["devices"]["frameworks"]["torch"]["gpus"] == 0
    assert steps["ddp-torch"]["with_compile"].startswith("skipped")
    assert len(steps["sweep"]["cells"]) == 4 and all(c["train_images_per_s"] for c in steps["sweep"]["cells"])
    assert steps["smoke"]["equivalence_tf32_off"]["passed"] is True
    assert steps["compile"]["backends"]["pytorch"]["numerics"]["compile"] == "torch.compile"
    assert steps["ddp-torch"]["device"] == "cpu" and steps["ddp-torch"]["max_abs_weight_diff_between_ranks"] == 0
