#!/usr/bin/env bash
# Sense side by side with Apache Flink SQL on the same file, in one run:
#   bash benches/stream_vs_flink.sh [EVENTS]   (default 20,000,000)
# 1. generates a detections CSV (benches/flink/gen_csv.py, deterministic) and a 100,000-event
#    one (to measure Flink's fixed start-up cost);
# 2. runs `yunqi bench stream --file` on it (in-process: parse + continuous view, one core);
# 3. runs the per-segment tumbling count in Flink (PyFlink from PyPI, Java 17, parallelism 2)
#    on both files;
# 4. prints events/s per core for each and the ratio. Don't run it beside a build or another
#    benchmark: 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
EVENTS="${1:-20000000}"
DIR=target/stream-bench
mkdir -p "$DIR"
BIG="$DIR/detections-$EVENTS.csv"
SMALL="$DIR/detections-100000.csv"
[ -s "$BIG" ] || python3 benches/flink/gen_csv.py "$EVENTS" "$BIG"
[ -s "$SMALL" ] || python3 benches/flink/gen_csv.py 100000 "$SMALL"
cargo build --release -q
./target/release/yunqi --json bench stream --file "$BIG" --runs 3 --http-events 0 > "$DIR/yunqi.json"
benches/flink/run.sh "$SMALL" seg > "$DIR/flink-small.json"
benches/flink/run.sh "$BIG" seg > "$DIR/flink-big.json"
python3 - "$DIR" <<'PY'
import json, sys
d = sys.argv[1]
y = json.load(open(f"{d}/yunqi.json"))["results"]
small = json.loads(open(f"{d}/flink-small.json").read().strip().splitlines()[-1])
big = json.loads(open(f"{d}/flink-big.json").read().strip().splitlines()[-1])
par = big.get("parallelism", 2)
flink_job = big["events"] / big["job_s"] / par
flink_marginal = (big["events"] - small["events"]) / (big["job_s"] - small["job_s"]) / par
ys = y["csv_segment_count"]
yr = y["csv_rollup"]
print(f"events: {big['events']:,}")
print(f"yunqi  segment count from CSV: {ys['events_per_s_per_core']/1e6:.2f} M events/s per core")
print(f"yunqi  3-level rollup from CSV: {yr['events_per_s_per_core']/1e6:.2f} M events/s per core")
print(f"flink  segment count from CSV: {flink_job/1e6:.3f} M events/s per core (job time, parallelism {par}); "
      f"marginal (start-up subtracted): {flink_marginal/1e6:.3f} M")
print(f"ratio yunqi/flink per core: {ys['events_per_s_per_core']/flink_job:.1f}x (job time), "
      f"{ys['events_per_s_per_core']/flink_marginal:.1f}x (marginal)")
PY
