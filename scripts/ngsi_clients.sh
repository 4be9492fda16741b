#!/usr/bin/env bash
# Installs the published NGSI-LD client library the suite drives yunqi with (PyPI's
# ngsildclient, pinned) into a virtual environment under target/, once. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${CARGO_TARGET_DIR:-target}/ngsi-clients/venv"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
if ! "$venv/bin/python" -c "import ngsildclient" 2>/dev/null; then
  "$venv/bin/pip" install --quiet --disable-pip-version-check "ngsildclient==0.5.2"
fi
echo "ngsi clients: ngsildclient $("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("ngsildclient"))') in $venv"
