#!/usr/bin/env bash
# A three-node yunqi cluster on this machine, to try cluster mode in one command:
# starts PostgreSQL (scripts/services.sh), creates the database yunqi_dev if it is missing,
# starts a NATS 2.15 server with JetStream on 127.0.0.1:4233 storing under DIR/nats (installed
# by scripts/engines.sh) and a SeaweedFS S3 server on 127.0.0.1:8433 with bucket yunqi-dev
# storing under DIR/weed, prepares all three (`yunqi cluster init`), and runs nodes a, b, c on HTTP
# 7701-7703 and PostgreSQL protocol 7431-7433 with data directories under DIR (default
# ./yunqi-cluster). Ctrl-C stops them. Usage: bash scripts/dev-cluster.sh [DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
DIR="${1:-./yunqi-cluster}"
bash scripts/services.sh
cargo build --locked -p yunqi
BIN="${CARGO_TARGET_DIR:-target}/debug/yunqi"
psql -qX -h 127.0.0.1 -U postgres -d test -tc "SELECT 1 FROM pg_database WHERE datname = 'yunqi_dev'" | grep -q 1 \
  || psql -qX -h 127.0.0.1 -U postgres -d test -c "CREATE DATABASE yunqi_dev"
export YUNQI_POSTGRES=postgresql://postgres@127.0.0.1:5432/yunqi_dev
eval "$(bash scripts/engines.sh)"
mkdir -p "$DIR/nats"
trap 'kill $(jobs -p) 2>/dev/null; wait' INT TERM EXIT
cat >"$DIR/nats/nats.conf" <<CONF
listen: 127.0.0.1:4233
max_payload: 8MB
jetstream { store_dir: "$DIR/nats/store", sync_interval: always }
CONF
"$YUNQI_NATS_SERVER" -c "$DIR/nats/nats.conf" >"$DIR/nats.log" 2>&1 &
for _ in $(seq 1 100); do (exec 3<>/dev/tcp/127.0.0.1/4233) 2>/dev/null && break; sleep 0.1; done
export YUNQI_NATS=nats://127.0.0.1:4233
mkdir -p "$DIR/weed"
(cd "$DIR/weed" && "$YUNQI_WEED" mini -dir=. -ip=127.0.0.1 -ip.bind=127.0.0.1 -master.telemetry=false \
  -admin.ui=false -webdav=false -s3.port.iceberg=0 -s3.port.lance=0 -bucket=yunqi-dev \
  -s3.port=8433 -master.port=19433 -volume.port=18433 -filer.port=18933 -admin.port=23733 \
  >../weed.log 2>&1) &
for _ in $(seq 1 300); do (exec 3<>/dev/tcp/127.0.0.1/8433) 2>/dev/null && break; sleep 0.2; done
export YUNQI_OBJECT_STORE=s3://yunqi-dev/city YUNQI_S3_ENDPOINT=http://127.0.0.1:8433
# The gateway listens a moment before its bucket is ready.
for _ in $(seq 1 30); do "$BIN" cluster init 2>/dev/null && break; sleep 1; done
"$BIN" cluster init
i=1
for n in a b c; do
  "$BIN" serve --node "$n" --data "$DIR/$n" --http "127.0.0.1:770$i" --pg "127.0.0.1:743$i" \
    >"$DIR/$n.log" 2>&1 &
  for _ in $(seq 1 100); do grep -q '^ready' "$DIR/$n.log" 2>/dev/null && break; sleep 0.1; done
  grep -q '^ready' "$DIR/$n.log" || { echo "node $n did not start:" >&2; cat "$DIR/$n.log" >&2; exit 1; }
  i=$((i + 1))
done
"$BIN" cluster status
TOKEN_FILE=$(ls "$DIR"/*/admin.token | head -n 1)
echo
echo "admin token: $TOKEN_FILE (any node accepts it)"
echo "try: export YUNQI_URL=http://127.0.0.1:7702 YUNQI_TOKEN=\$(cat $TOKEN_FILE); yunqi whoami"
echo "logs: $DIR/{a,b,c,nats,weed}.log — Ctrl-C stops the nodes, NATS and SeaweedFS"
wait
