#!/usr/bin/env bash
# Cluster mode, part 1: what a shared metadata store costs one request, and how long a
# revocation takes to hold on every node. Two nodes of BINARY over a fresh database on the local
# PostgreSQL (127.0.0.1:5432, database test for the admin connection), N revocations, each timed
# from the call to its answer (after which every node refuses the token); then the same
# request (whoami) timed on an embedded server and on a cluster node.
# Usage: bash benches/cluster_revoke.sh [BINARY] [N]
set -euo pipefail
BIN="${1:-target/release/yunqi}"; N="${2:-50}"
DB="yunqi_bench_$$"; WORK="$(mktemp -d)"
psql -qX -h 127.0.0.1 -U postgres -d test -c "CREATE DATABASE $DB"
URL="postgresql://postgres@127.0.0.1:5432/$DB"
cleanup() {
  kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true
  psql -qX -h 127.0.0.1 -U postgres -d test -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)"
  rm -rf "$WORK"
}
trap cleanup EXIT
"$BIN" cluster init --postgres "$URL" >/dev/null
start() { # DIR PORT [args…]
  local dir="$1" port="$2"; shift 2
  "$BIN" serve --data "$WORK/$dir" --http "127.0.0.1:$port" --pg 127.0.0.1:0 "$@" >"$WORK/$dir.log" 2>&1 &
  for _ in $(seq 1 100); do grep -q '^ready' "$WORK/$dir.log" 2>/dev/null && return; sleep 0.1; done
  echo "node $dir did not start" >&2; cat "$WORK/$dir.log" >&2; exit 1
}
start a 7811 --postgres "$URL" --node a
start b 7812 --postgres "$URL" --node b
start e 7813
ADMIN="$(cat "$WORK/a/admin.token")"; EADMIN="$(cat "$WORK/e/admin.token")"
A=http://127.0.0.1:7811; B=http://127.0.0.1:7812; E=http://127.0.0.1:7813
curl -sf -H "Authorization: Bearer $ADMIN" -H 'Content-Type: application/json' \
  -d '{"name":"transport"}' $A/api/v1/departments >/dev/null
curl -sf -H "Authorization: Bearer $ADMIN" -H 'Content-Type: application/json' \
  -d '{"name":"wang","role":"steward","department":"transport"}' $A/api/v1/principals >/dev/null
ms() { python3 -c 'import sys; v=sorted(float(x) for x in sys.stdin); n=len(v); print(f"p50 {v[n//2]*1000:.1f} ms, p99 {v[min(n-1,int(n*0.99))]*1000:.1f} ms, n {n}")'; }
: >"$WORK/revoke.txt"
for _ in $(seq 1 "$N"); do
  tok=$(curl -sf -H "Authorization: Bearer $ADMIN" -H 'Content-Type: application/json' -d '{}' \
        $A/api/v1/principals/wang/tokens)
  id=$(python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])' <<<"$tok")
  secret=$(python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])' <<<"$tok")
  until curl -sf -o /dev/null -H "Authorization: Bearer $secret" $B/api/v1/whoami; do sleep 0.01; done
  curl -s -o /dev/null -w '%{time_total}\n' -X POST -H "Authorization: Bearer $ADMIN" \
    $A/api/v1/tokens/$id/revoke >>"$WORK/revoke.txt"
  code=$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $secret" $B/api/v1/whoami)
  [ "$code" = 401 ] || { echo "node b answered $code to a revoked token" >&2; exit 1; }
done
echo "revocation, 2 live nodes: $(ms <"$WORK/revoke.txt")"
for target in "$E $EADMIN embedded" "$B $ADMIN cluster-node"; do
  set -- $target
  for _ in $(seq 1 300); do
    curl -s -o /dev/null -w '%{time_total}\n' -H "Authorization: Bearer $2" "$1/api/v1/whoami"
  done | tail -n 250 | { printf 'whoami, %s: ' "$3"; ms; }
done
