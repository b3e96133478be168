#!/usr/bin/env bash
# The core without any framework: a fresh venv with `pip install -e ".[test]"` (no backend), checked to resolve no
# framework, then `cxrbench --help`, `cxrbench backends` and the core's tests (tests needing a backend skip, naming
# what to install). Usage: bash .ci/core-only.sh VENV_DIR
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:?usage: core-only.sh VENV_DIR}"

python -m venv "$venv"
py="$venv/bin/python"
"$py" -m pip install --quiet --upgrade pip

echo "-- the core's dependencies name no framework (pip's resolution, before installing)"
"$py" -m pip install --quiet --dry-run --ignore-installed --report "$venv/resolution.json" -e ".[test]"
"$py" - "$venv/resolution.json" <<'PY'
import json, sys
names = sorted(item["metadata"]["name"].lower() for item in json.load(open(sys.argv[1]))["install"])
frameworks = [n for n in names if n in {"torch", "torchvision", "tensorflow", "tensorflow-cpu", "keras", "tf2onnx",
                                        "jax", "jaxlib", "flax"} or n.startswith(("nvidia-cu", "nvidia-cudnn"))]
print(f"   {len(names)} distributions resolve; frameworks among them: {frameworks or 'none'}")
sys.exit(1 if frameworks else 0)
PY

"$py" -m pip install --quiet -e ".[test]"
echo "-- cxrbench --help and cxrbench backends with no backend installed"
"$venv/bin/cxrbench" --help >/dev/null
"$venv/bin/cxrbench" backends
"$py" -c "import cxrbench, sys; assert not {'torch', 'tensorflow', 'keras', 'jax'} & set(sys.modules)"

echo "-- the core's tests, with the framework-free example backend installed"
"$py" -m pip install --quiet -e tests/example_plugin
"$py" -m pytest -p no:cacheprovider -q -rs --benchmark-skip  # the benchmarks run in the full stage
