"""The core never imports a framework, and the CLI starts fast."""

import json
import subprocess
import sys
import time

import pytest

FRAMEWORKS = ("torch", "tensorflow", "keras", "jax")

PROBE = """
import json, sys, runpy
sys.argv = {argv!r}
try:
    runpy.run_module("cxrbench", run_name="__main__")
except SystemExit:
    pass
print(json.dumps(sorted(m for m in {frameworks!r} if m in sys.modules)), file=sys.stderr)
"""


def _loaded_after(argv: list[str]) -> list[str]:
    code = PROBE.format(argv=["cxrbench", *argv], frameworks=FRAMEWORKS)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    return json.loads(result.stderr.strip().splitlines()[-1])


def test_import_cxrbench_loads_no_framework():
    code = (
        "import sys, cxrbench, cxrbench.cli, cxrbench.plugins, cxrbench.hookspecs, cxrbench.training, "
        "cxrbench.suite, cxrbench.weights, cxrbench.checks.onnx, cxrbench.data.prepared, cxrbench.env; "
        f"print([m for m in {FRAMEWORKS!r} if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_help_and_backends_load_no_framework():
    assert _loaded_after(["--help"]) == []
    assert _loaded_after(["backends"]) == []


@pytest.mark.serial  # a bound on wall time
@pytest.mark.backends("pytorch", "keras")
def test_backends_lists_both_builtin_backends_quickly():
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "cxrbench", "backends", "--json"], capture_output=True, text=True, check=True
    )
    elapsed = time.perf_counter() - start
    listed = {b["name"]: b for b in json.loads(result.stdout)["backends"]}
    assert {"pytorch", "keras"} <= set(listed)
    assert listed["pytorch"]["framework"] == "torch"
    assert listed["keras"]["plugin"] == "cxrbench_keras"
    # A generous bound for a loaded 2-core CI machine; typical is ~0.3 s including the interpreter.
    assert elapsed < 5.0, f"cxrbench backends took {elapsed:.2f} s"
