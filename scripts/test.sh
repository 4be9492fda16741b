#!/usr/bin/env bash
# Runs every test of yunqi: unit, boundary (HTTP, audit, store), crash and layering tests, the
# console's tests in Chromium, and the NGSI-LD API under a published client library.
# This is the README's test command, and what CI runs (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/services.sh
# NATS 2.15 for cluster mode's tests, which start servers of their own from it.
eval "$(bash scripts/engines.sh)"
export YUNQI_CRASH_ITERATIONS="${YUNQI_CRASH_ITERATIONS:-20}"
cargo test --workspace --locked "$@"
# Share's suites, Sense's streams and views and Serve's services again against a three-node cluster (PostgreSQL, NATS JetStream, SeaweedFS),
# requests spread round-robin over the nodes.
YUNQI_TEST_CLUSTER=3 cargo test -p yunqi --locked --test datasets --test grants --test pg --test serve_services --test sense --test serve "$@"
# The console in a real browser, over `yunqi demo` (the debug binary the tests just built).
bash scripts/browser.sh
python3 tests/browser/console_test.py "${CARGO_TARGET_DIR:-target}/debug/yunqi"
# The NGSI-LD API driven by a published client library (installed by scripts/ngsi_clients.sh).
bash scripts/ngsi_clients.sh
NGSIJS_MODULES="$(cd "${CARGO_TARGET_DIR:-target}/ngsi-clients/node/node_modules" && pwd)" \
  "${CARGO_TARGET_DIR:-target}/ngsi-clients/venv/bin/python" tests/ngsi_clients/ngsildclient_test.py "${CARGO_TARGET_DIR:-target}/debug/yunqi"
