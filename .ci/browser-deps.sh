#!/usr/bin/env bash
# What tests/test_report_browser.py needs: Debian's chromium (never `playwright install`, which
# downloads a browser) and the playwright Python client (already in the test extras).
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
if ! command -v /usr/bin/chromium >/dev/null 2>&1; then
  apt-get update
  apt-get install -y chromium
fi
python -m pip install "playwright>=1.40"
/usr/bin/chromium --version
