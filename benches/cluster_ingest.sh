#!/usr/bin/env bash
# Cluster mode: durable event ingest over HTTP into an embedded node and into a cluster node
# whose streams live in NATS JetStream (a NATS 2.15 server of this script's own, syncing every
# write: `sync_interval: always`), on the same file of simulated detections; one client and
# four at once, each run into a fresh stream, median of RUNS. Needs PostgreSQL on
# 127.0.0.1:5432 (scripts/services.sh) and YUNQI_NATS_SERVER (scripts/engines.sh prints it).
# Usage: bash benches/cluster_ingest.sh [BINARY] [EVENTS] [RUNS]
set -euo pipefail
BIN="${1:-target/release/yunqi}"; EVENTS="${2:-1000000}"; RUNS="${3:-3}"
: "${YUNQI_NATS_SERVER:?run: eval \"\$(bash scripts/engines.sh)\"}"
DB="yunqi_bench_ingest_$$"; WORK="$(mktemp -d)"
psql -qX -h 127.0.0.1 -U postgres -d test -c "CREATE DATABASE $DB"
URL="postgresql://postgres@127.0.0.1:5432/$DB"
cleanup() {
  kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true
  psql -qX -h 127.0.0.1 -U postgres -d test -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)"
  rm -rf "$WORK"
}
trap cleanup EXIT
mkdir -p "$WORK/nats"
cat >"$WORK/nats/nats.conf" <<CONF
listen: 127.0.0.1:4291
max_payload: 8MB
jetstream { store_dir: "$WORK/nats/store", sync_interval: always }
CONF
"$YUNQI_NATS_SERVER" -c "$WORK/nats/nats.conf" >"$WORK/nats.log" 2>&1 &
for _ in $(seq 1 100); do (exec 3<>/dev/tcp/127.0.0.1/4291) 2>/dev/null && break; sleep 0.1; done
NATS=nats://127.0.0.1:4291
"$BIN" cluster init --postgres "$URL" --nats "$NATS" >/dev/null
start() { # DIR PORT [args…]
  local dir="$1" port="$2"; shift 2
  "$BIN" serve --data "$WORK/$dir" --http "127.0.0.1:$port" --pg 127.0.0.1:0 "$@" >"$WORK/$dir.log" 2>&1 &
  for _ in $(seq 1 100); do grep -q '^ready' "$WORK/$dir.log" 2>/dev/null && return; sleep 0.1; done
  echo "node $dir did not start" >&2; cat "$WORK/$dir.log" >&2; exit 1
}
start e 7821
start c 7822 --postgres "$URL" --nats "$NATS" --node c
RATE=$(( EVENTS / 56 ))
"$BIN" simulate traffic --rate "$RATE" --duration 56 --out "$WORK/detections.ndjson" >/dev/null
LINES=$(wc -l <"$WORK/detections.ndjson")
split -n l/4 "$WORK/detections.ndjson" "$WORK/part."
median() { python3 -c 'import sys; v=sorted(float(x) for x in sys.stdin); print(v[len(v)//2])'; }
for node in "e 7821 embedded" "c 7822 cluster-node-on-JetStream"; do
  set -- $node
  base="http://127.0.0.1:$2"; admin="$(cat "$WORK/$1/admin.token")"
  post() { curl -sf -H "Authorization: Bearer $admin" -H 'Content-Type: application/json' -d "$2" "$base$1"; }
  post /api/v1/departments '{"name":"traffic"}' >/dev/null
  post /api/v1/principals '{"name":"tsteward","role":"steward","department":"traffic"}' >/dev/null
  post /api/v1/principals '{"name":"cameras","role":"service","department":"traffic"}' >/dev/null
  token() { post "/api/v1/principals/$1/tokens" '{}' | python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])'; }
  steward=$(token tsteward); camera=$(token cameras)
  for r in $(seq 1 "$RUNS"); do
    for c in 1 4; do
      q="CREATE STREAM traffic.d${c}_$r (plate TEXT, segment INT, district TEXT, speed DOUBLE, ts TIMESTAMP) WITH (event_time = 'ts', watermark = '5 seconds')"
      curl -sf -H "Authorization: Bearer $steward" -H 'Content-Type: application/json' \
        -d "$(python3 -c 'import json,sys; print(json.dumps({"sql": sys.argv[1]}))' "$q")" "$base/api/v1/sql" >/dev/null
    done
    t0=$(date +%s.%N)
    YUNQI_URL=$base YUNQI_TOKEN=$camera "$BIN" stream replay "traffic.d1_$r" "$WORK/detections.ndjson" --batch 10000 >/dev/null
    t1=$(date +%s.%N)
    python3 -c "print($LINES / ($t1 - $t0))" >>"$WORK/$1.one"
    t0=$(date +%s.%N)
    pids=()
    for p in "$WORK"/part.*; do
      YUNQI_URL=$base YUNQI_TOKEN=$camera "$BIN" stream replay "traffic.d4_$r" "$p" --batch 10000 >/dev/null &
      pids+=($!)
    done
    wait "${pids[@]}"
    t1=$(date +%s.%N)
    python3 -c "print($LINES / ($t1 - $t0))" >>"$WORK/$1.four"
  done
  printf '%s: %s events, 1 client %.0f events/s, 4 clients %.0f events/s (median of %s)\n' \
    "$3" "$LINES" "$(median <"$WORK/$1.one")" "$(median <"$WORK/$1.four")" "$RUNS"
done
