#!/usr/bin/env bash
# The core without any framework, and every test that needs none (`pytest --stage core`), in a venv of its own:
#   1. `pip install -e ".[test]"` only (with uv, which never resolves a framework here): the installed set is checked
#      to hold no framework, `cxrbench --help` and `cxrbench backends` run, `import cxrbench` loads no framework;
#   2. the tests, with no backend at all: those needing one must skip, naming what to install (a test that errors or
#      skips on a failed import instead fails this stage);
#   3. the example numpy backend installed, the tests that need it (and no framework).
# Each step runs the parallel tests two at a time (pytest-xdist), then the `serial` ones alone.
# The venv is kept between runs under ~/.cache/cxrbench-ci, keyed on the pyproject files, the Python and uv.
# Usage: bash .ci/core-only.sh [PYTEST-ARGS...] (needs uv: python -m pip install uv)
set -euo pipefail
cd "$(dirname "$0")/.."
source .ci/lib.sh
trap 'status=$?; [[ $status -eq 0 ]] || stage_end "FAILED (exit $status)"' EXIT

PYTHON="${PYTHON:-python}"
unset PYTHONPATH  # the venv sees what is installed in it, nothing else
uv=("$PYTHON" -m uv)

stage "core: venv (uv, cached by the pyproject files)"
key="$(cat pyproject.toml tests/example_plugin/pyproject.toml .ci/core-only.sh <("$PYTHON" -VV) <("${uv[@]}" --version) | sha256sum)"
cache="${XDG_CACHE_HOME:-$HOME/.cache}/cxrbench-ci"
venv="$cache/core-venv-${key:0:16}"
mkdir -p "$cache"
exec 9>"$cache/core-venv.lock"
flock 9  # one CI run at a time uses the cached venv
if [[ ! -x "$venv/bin/python" ]]; then
  rm -rf "$cache"/core-venv-*/  # venvs of other pyproject files
  "${uv[@]}" venv --quiet --seed --python "$("$PYTHON" -c 'import sys; print(sys.executable)')" "$venv"
fi
py="$venv/bin/python"
# Always: the editable install must point at this checkout; the example backend comes later, in step 3.
# --compile-bytecode: uv writes no .pyc by default, and without them every process of the stage compiled numpy,
# scipy, matplotlib and scikit-learn again (4.4 s against 1.8 s to import them; seconds once the .pyc exist).
"${uv[@]}" pip install --quiet --compile-bytecode --python "$py" -e ".[test]"
"${uv[@]}" pip uninstall --quiet --python "$py" cxrbench-numpy-example 2>/dev/null || true

stage "core: no framework installed, none imported"
#: What `import cxrbench` must never load and the core's install must never bring: the frameworks of the first-party
#: backends (cxrbench.plugins.FRAMEWORKS, the one list), and tensorflow's CPU-only distribution.
FRAMEWORKS="$("$py" -c 'from cxrbench.plugins import FRAMEWORKS; print(*FRAMEWORKS, "tensorflow-cpu")')"
"$py" - "$FRAMEWORKS" <<'PY'
import importlib.metadata, re, sys
names = sorted({re.sub(r"[-_.]+", "-", d.metadata["Name"]).lower() for d in importlib.metadata.distributions()})
frameworks = [n for n in names if n in sys.argv[1].split() or n.startswith(("nvidia-cu", "nvidia-cudnn"))]
print(f"   {len(names)} distributions installed; frameworks among them: {frameworks or 'none'}")
sys.exit(1 if frameworks else 0)
PY
"$venv/bin/cxrbench" --help >/dev/null
"$venv/bin/cxrbench" backends
"$py" -c "import cxrbench, sys; loaded = set(sys.argv[1].split()) & set(sys.modules); assert not loaded, loaded" \
  "$FRAMEWORKS"

stage "core: tests with no backend installed"
run_parallel_tests core-bare "$py" --stage core -m "not serial" "$@"
stage "core: tests with no backend installed (serial)"
run_serial_tests core-bare-serial "$py" --stage core -m serial "$@"
"$py" .ci/tests_report.py declared "$ARTIFACTS"/junit/core-bare*.xml

stage "core: tests needing the example backend"
"${uv[@]}" pip install --quiet --compile-bytecode --python "$py" -e tests/example_plugin
run_parallel_tests core-example "$py" --stage core -m "backends and not serial" "$@"
run_serial_tests core-example-serial "$py" --stage core -m "backends and serial" "$@"
stage_end
