#!/usr/bin/env bash
# Runs every test of yunqi: unit, boundary (HTTP, audit, store), crash and layering tests, and
# the console's tests in Chromium.
# This is the README's test command, and what CI runs (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/services.sh
export YUNQI_CRASH_ITERATIONS="${YUNQI_CRASH_ITERATIONS:-20}"
cargo test --workspace --locked "$@"
# The console in a real browser, over `yunqi demo` (the debug binary the tests just built).
bash scripts/browser.sh
python3 tests/browser/console_test.py "${CARGO_TARGET_DIR:-target}/debug/yunqi"
