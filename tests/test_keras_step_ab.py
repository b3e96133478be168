"""tools/keras_step_ab.py, the in-process A/B of the Keras backend's step against Keras' own train_on_batch
(docs/speed.md): every variant runs and prints its figure, at the tiny network's size. Timings are never asserted."""

import subprocess
import sys
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parents[1] / "tools" / "keras_step_ab.py"
TINY = ["--set", "model.arch=densenet-tiny", "--set", "data.image_size=32", "--set", "train.batch_size=4"]


@pytest.mark.slow
@pytest.mark.backends("keras")
def test_every_variant_runs_in_one_process_and_prints_its_speed():
    variants = "backend,pipeline,keras_bn,keras_adam,idiomatic"
    command = [sys.executable, str(TOOL), "--variants", variants, "--rounds", "2", "--steps", "1", *TINY]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert [line.split()[0] for line in lines] == variants.split(",")
    assert lines[0].endswith("1.000x the speed of backend")


def test_an_unknown_variant_is_refused_naming_the_choices():
    done = subprocess.run([sys.executable, str(TOOL), "--variants", "backend,fused"], capture_output=True, text=True)
    assert done.returncode == 2 and "unknown variant(s) fused: choose from backend" in done.stderr
