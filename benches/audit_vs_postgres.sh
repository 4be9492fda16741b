#!/usr/bin/env bash
# The peer a city would otherwise use as an audit store: a PostgreSQL table, one INSERT per
# audit record, synchronous commit, 64 concurrent clients (pgbench). PostgreSQL does no hash
# chaining here, so this favours it. Prints the median of 3 runs of inserts/s.
#
#   bash benches/audit_vs_postgres.sh [seconds]   (PostgreSQL at 127.0.0.1:5432, database test)
set -euo pipefail
seconds="${1:-5}"
db="${YUNQI_BENCH_PGDATABASE:-test}"
psql_() { PGOPTIONS="-c client_min_messages=warning" psql -h 127.0.0.1 -p 5432 -U "${PGUSER:-postgres}" -d "$db" -v ON_ERROR_STOP=1 -qAt "$@"; }
psql_ -c "DROP TABLE IF EXISTS yunqi_bench_audit; CREATE TABLE yunqi_bench_audit (
  seq bigserial PRIMARY KEY, time timestamptz NOT NULL DEFAULT now(), principal text, department text,
  action text, object text, outcome smallint, purpose text, detail text, request_id text)"
script=$(mktemp)
trap 'rm -f "$script"; psql_ -c "DROP TABLE IF EXISTS yunqi_bench_audit" >/dev/null' EXIT
cat > "$script" <<'SQL'
\set i random(1, 1000000000)
INSERT INTO yunqi_bench_audit (principal, department, action, object, outcome, purpose, detail, request_id)
VALUES ('analyst' || (:i % 97), 'traffic_police', 'dataset.query', 'dataset:transport.vehicles#' || (:i % 1000), 0,
        'urgent entry permit decision', 'columns plate,owner_id masked', to_hex(:i));
SQL
rates=()
for run in 1 2 3; do
  tps=$(pgbench -h 127.0.0.1 -p 5432 -U "${PGUSER:-postgres}" -n -c 64 -j 2 -T "$seconds" -f "$script" "$db" 2>/dev/null \
        | awk '/^tps = /{print $3}')
  echo "run $run: PostgreSQL $(psql -V | awk '{print $3}'), 64 clients: $tps inserts/s" >&2
  rates+=("$tps")
done
printf '%s\n' "${rates[@]}" | sort -n | sed -n 2p
