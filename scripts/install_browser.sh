#!/usr/bin/env bash
# Install Debian's chromium for the browser test (tests/test_browser.py) when it is missing.
# Playwright drives this binary via executable_path; `playwright install` is never used.
set -euo pipefail

for bin in chromium chromium-browser; do
  if command -v "$bin" >/dev/null 2>&1; then
    echo "chromium present: $(command -v "$bin")"
    exit 0
  fi
done

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core
echo "chromium installed: $(command -v chromium)"
