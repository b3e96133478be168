#!/usr/bin/env bash
# The GPU check (docs/gpu-check.md; every option and the budget: tools/gpu-check.sh --help). Runs with $PYTHON or
# python3 (the GPU machine's only interpreter); needs nothing installed beyond that interpreter's packages.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
exec "${PYTHON:-python3}" "$here/gpu_check.py" "$@"
