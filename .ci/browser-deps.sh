#!/usr/bin/env bash
# What tests/test_report_browser.py needs besides the test extras (its playwright Python client): Debian's chromium
# (never `playwright install`, which downloads a browser).
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
if ! command -v /usr/bin/chromium >/dev/null 2>&1; then
  apt-get update
  apt-get install -y chromium
fi
/usr/bin/chromium --version
