#!/usr/bin/env bash
# Installs what the console's browser tests need, if it is missing: Debian's Chromium and the
# Playwright client for Python (driving that Chromium; no browser download of its own).
set -euo pipefail
# Chromium, and CJK fonts so that the console's Chinese renders in the screenshots.
if ! command -v chromium >/dev/null 2>&1 || ! dpkg -s fonts-noto-cjk >/dev/null 2>&1; then
  echo "browser: installing chromium and fonts-noto-cjk (Debian packages)…"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq chromium fonts-noto-cjk >/dev/null
fi
if ! python3 -c "import playwright" >/dev/null 2>&1; then
  echo "browser: installing the Playwright client (PyPI)…"
  python3 -m pip install --quiet "playwright==1.65.2"
fi
echo "browser: $(chromium --version 2>/dev/null | head -1); playwright $(python3 -c 'import importlib.metadata as m; print(m.version("playwright"))')"
