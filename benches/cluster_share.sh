#!/usr/bin/env bash
# Cluster mode against embedded on the same work, in one run: an embedded server, a cluster of
# one node and a cluster of three nodes (PostgreSQL on 127.0.0.1:5432, one NATS 2.15 server and
# one SeaweedFS server of this script's own, all on this machine's cores), each given the same
# CSV import and the same governed queries; requests to the three-node cluster go round-robin.
# Prints import MB/s (median of RUNS imports of the file into a fresh dataset), a governed
# query's latency and an unaudited request's (whoami) latency, p50/p99 over N requests.
# Usage: eval "$(bash scripts/engines.sh)"; bash benches/cluster_share.sh [BINARY] [ROWS] [RUNS] [N]
set -euo pipefail
BIN="${1:-target/release/yunqi}"; ROWS="${2:-400000}"; RUNS="${3:-3}"; N="${4:-300}"
: "${YUNQI_NATS_SERVER:?run eval \"\$(bash scripts/engines.sh)\" first}"
: "${YUNQI_WEED:?run eval \"\$(bash scripts/engines.sh)\" first}"
WORK="$(mktemp -d)"
DBS=()
cleanup() {
  kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true
  for db in "${DBS[@]}"; do
    psql -qX -h 127.0.0.1 -U postgres -d test -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" || true
  done
  rm -rf "$WORK"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_for() { # LOG TEXT
  for _ in $(seq 1 200); do grep -q "$2" "$1" 2>/dev/null && return; sleep 0.1; done
  echo "not ready: $1" >&2; cat "$1" >&2; exit 1
}

# The engines: NATS with every write synced (as the tests run it), SeaweedFS with a bucket.
NATS_PORT=$(free_port)
mkdir -p "$WORK/nats"
printf 'listen: 127.0.0.1:%s\nmax_payload: 8MB\njetstream {\n  store_dir: "%s"\n  sync_interval: always\n}\n' \
  "$NATS_PORT" "$WORK/nats" >"$WORK/nats.conf"
"$YUNQI_NATS_SERVER" -c "$WORK/nats.conf" >"$WORK/nats.log" 2>&1 &
for _ in $(seq 1 100); do (exec 3<>"/dev/tcp/127.0.0.1/$NATS_PORT") 2>/dev/null && break; sleep 0.1; done
NATS="nats://127.0.0.1:$NATS_PORT"
S3_PORT=$(free_port)
mkdir -p "$WORK/weed"
"$YUNQI_WEED" mini -dir="$WORK/weed" -ip=127.0.0.1 -ip.bind=127.0.0.1 -master.telemetry=false \
  -admin.ui=false -webdav=false -s3.port.iceberg=0 -s3.port.lance=0 -bucket=yunqi-bench \
  -s3.port="$S3_PORT" -master.port="$(free_port)" -volume.port="$(free_port)" \
  -filer.port="$(free_port)" -admin.port="$(free_port)" -s3.port.grpc="$(free_port)" \
  -master.port.grpc="$(free_port)" -volume.port.grpc="$(free_port)" \
  -filer.port.grpc="$(free_port)" -admin.port.grpc="$(free_port)" >"$WORK/weed.log" 2>&1 &
S3="http://127.0.0.1:$S3_PORT"
for _ in $(seq 1 600); do
  [ "$(curl -s -o /dev/null -w '%{http_code}' -I "$S3/yunqi-bench")" = 200 ] && break; sleep 0.1
done

# The data: ROWS vehicles.
python3 - "$ROWS" >"$WORK/vehicles.csv" <<'EOF'
import random, sys
n = int(sys.argv[1]); r = random.Random(7)
print("plate,district,year,seats,mileage_km")
d = ["西湖区", "上城区", "拱墅区", "滨江区", "萧山区", "余杭区"]
for i in range(n):
    print(f"浙A{i:06d},{d[i % 6]},{2010 + i % 15},{r.choice([2, 4, 5, 7])},{r.randint(0, 300000)}")
EOF
BYTES=$(stat -c %s "$WORK/vehicles.csv")

start() { # NAME [serve args…]: starts a node, prints its URL
  local name="$1"; shift
  local port; port=$(free_port)
  "$BIN" serve --data "$WORK/$name" --http "127.0.0.1:$port" --pg 127.0.0.1:0 "$@" >"$WORK/$name.log" 2>&1 &
  wait_for "$WORK/$name.log" '^ready'
  echo "http://127.0.0.1:$port"
}
cluster() { # PREFIX NODES: a cluster of NODES nodes; sets URLS and ADMIN
  local prefix="$1" nodes="$2" db="yunqi_bench_${1}_$$"
  psql -qX -h 127.0.0.1 -U postgres -d test -c "CREATE DATABASE $db"; DBS+=("$db")
  local engines=(--postgres "postgresql://postgres@127.0.0.1:5432/$db" --nats "$NATS"
                 --object-store "s3://yunqi-bench/$prefix" --s3-endpoint "$S3")
  "$BIN" cluster init "${engines[@]}" --nats-prefix "$prefix" >/dev/null
  # The NATS prefix (one per cluster on the one NATS server) is set in the configuration file.
  printf '[cluster]\nnats_prefix = "%s"\n' "$prefix" >"$WORK/$prefix.toml"
  URLS=()
  for i in $(seq 1 "$nodes"); do
    URLS+=("$(start "$prefix-$i" --config "$WORK/$prefix.toml" "${engines[@]}" --node "$prefix-$i")")
  done
  ADMIN="$(cat "$WORK/$prefix-1/admin.token")"
}
ms() { python3 -c 'import sys; v=sorted(float(x) for x in sys.stdin); n=len(v); print(f"p50 {v[n//2]*1000:.2f} ms, p99 {v[min(n-1,int(n*0.99))]*1000:.2f} ms (n {n})")'; }

run() { # LABEL: URLS and ADMIN set
  local label="$1" u="${URLS[0]}"
  post() { curl -sf -H "Authorization: Bearer $2" -H 'Content-Type: application/json' -d "$3" "$u$1"; }
  post /api/v1/departments "$ADMIN" '{"name":"transport"}' >/dev/null
  local st
  st=$(post /api/v1/principals "$ADMIN" '{"name":"wang","role":"steward","department":"transport"}' \
       | python3 -c 'import json,sys; print(json.load(sys.stdin)["token"]["token"])')
  sleep 0.5
  : >"$WORK/import-$label.txt"
  for k in $(seq 1 "$RUNS"); do
    local n=$(( (k - 1) % ${#URLS[@]} ))
    post /api/v1/datasets "$st" "{\"department\":\"transport\",\"name\":\"v$k\"}" >/dev/null
    curl -sf -o /dev/null -w '%{time_total}\n' -H "Authorization: Bearer $st" -H 'Content-Type: text/csv' \
      --data-binary "@$WORK/vehicles.csv" "${URLS[$n]}/api/v1/datasets/transport/v$k/import" >>"$WORK/import-$label.txt"
  done
  local mbs
  mbs=$(python3 -c "import sys; v=sorted(float(x) for x in open('$WORK/import-$label.txt')); print(f'{$BYTES/1e6/v[len(v)//2]:.1f}')")
  echo "$label: import $(( BYTES / 1000000 )) MB: $mbs MB/s (median of $RUNS)"
  local q='{"sql":"SELECT district, count(*) AS vehicles, avg(mileage_km) AS km FROM transport.v1 WHERE seats >= 5 GROUP BY district ORDER BY district"}'
  for i in $(seq 1 "$N"); do
    curl -s -o /dev/null -w '%{time_total}\n' -H "Authorization: Bearer $st" -H 'Content-Type: application/json' \
      -d "$q" "${URLS[$(( i % ${#URLS[@]} ))]}/api/v1/sql"
  done | tail -n $(( N * 5 / 6 )) | { printf '%s: governed query: ' "$label"; ms; }
  for i in $(seq 1 "$N"); do
    curl -s -o /dev/null -w '%{time_total}\n' -H "Authorization: Bearer $st" \
      "${URLS[$(( i % ${#URLS[@]} ))]}/api/v1/whoami"
  done | tail -n $(( N * 5 / 6 )) | { printf '%s: whoami: ' "$label"; ms; }
}

URLS=("$(start embedded)"); ADMIN="$(cat "$WORK/embedded/admin.token")"
run embedded
cluster one 1; run "cluster, 1 node"
cluster three 3; run "cluster, 3 nodes"
