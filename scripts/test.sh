#!/usr/bin/env bash
# Runs every test of yunqi: unit, boundary (HTTP, audit, store), crash and layering tests.
# This is the README's test command, and what CI runs (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/services.sh
export YUNQI_CRASH_ITERATIONS="${YUNQI_CRASH_ITERATIONS:-20}"
cargo test --workspace --locked "$@"
