"""The core never imports a framework, and the CLI starts fast."""

import json
import subprocess
import sys
import time

import pytest

from cxrbench.plugins import FRAMEWORKS

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


#: Imports every module of the core, each first of all (its cxrbench modules dropped before it), and prints the
#: frameworks loaded and the modules that failed: an import cycle shows up as a module that cannot load first.
EVERY_MODULE = """
import importlib, json, pkgutil, sys, warnings
warnings.simplefilter("ignore", DeprecationWarning)
import cxrbench
names = [m.name for m in pkgutil.walk_packages(cxrbench.__path__, "cxrbench.") if m.name != "cxrbench.__main__"]
failed = {{}}
for name in names:
    for loaded in [m for m in sys.modules if m == "cxrbench" or m.startswith("cxrbench.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception as exc:
        failed[name] = f"{{type(exc).__name__}}: {{exc}}"
print(json.dumps({{"modules": len(names), "failed": failed,
                  "frameworks": sorted(m for m in {frameworks!r} if m in sys.modules)}}))
"""


def test_every_core_module_imports_first_and_loads_no_framework():
    code = EVERY_MODULE.format(frameworks=FRAMEWORKS)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    # the optional extras (FastAPI, pydicom, pandas) are imported inside the commands, never at module import
    assert result["failed"] == {}
    assert result["frameworks"] == []
    assert result["modules"] > 60


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
