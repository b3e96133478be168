#!/usr/bin/env bash
# The prepared GPU check (README "GPU check"): on a machine with an NVIDIA GPU, every GPU code path of
# cxrbench in about 8 minutes, one JSON summary (path printed last). --dry-run: the same steps at tiny
# size on the CPU. Runs with the Python that imports cxrbench (override with PYTHON=/path/to/python).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
exec "${PYTHON:-python}" "$here/gpu_check.py" "$@"
