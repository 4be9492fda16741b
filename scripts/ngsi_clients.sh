#!/usr/bin/env bash
# Installs the published NGSI-LD client libraries the suite drives yunqi with, pinned, under
# target/, once: PyPI's ngsildclient in a virtual environment, npm's ngsijs with the machine's
# Node.js (installed from Debian's packages when missing). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${CARGO_TARGET_DIR:-target}/ngsi-clients/venv"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
if ! "$venv/bin/python" -c "import ngsildclient" 2>/dev/null; then
  "$venv/bin/pip" install --quiet --disable-pip-version-check "ngsildclient==0.5.2"
fi
node_dir="${CARGO_TARGET_DIR:-target}/ngsi-clients/node"
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null
fi
if [ ! -f "$node_dir/node_modules/ngsijs/package.json" ]; then
  mkdir -p "$node_dir"
  npm install --silent --no-audit --no-fund --prefix "$node_dir" "ngsijs@1.4.1" >/dev/null
fi
echo "ngsi clients: ngsijs $(node -p 'require(process.argv[1]).version' "$(cd "$node_dir" && pwd)/node_modules/ngsijs/package.json") in $node_dir"
echo "ngsi clients: ngsildclient $("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("ngsildclient"))') in $venv"
