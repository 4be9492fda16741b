#!/usr/bin/env bash
# The Share benchmarks side by side with DuckDB, in one run on the same generated data:
#   yunqi bench import  — CSV import MB/s (validation, typing, classification, Parquet) vs
#                         DuckDB's CSV → Parquet COPY of the same file;
#   yunqi bench sql     — governed (a grantee through yunqi) vs ungoverned (plain DataFusion)
#                         query time, and both vs DuckDB on the same Parquet files.
# DuckDB comes from PyPI into a virtual environment under target/. Don't run it next to
# another benchmark or a build: the figures are ratios measured in one run, on quiet cores.
set -euo pipefail
cd "$(dirname "$0")/.."
ROWS="${ROWS:-2000000}"
VENV=target/bench-venv
if ! "$VENV/bin/python" -c "import duckdb" 2>/dev/null; then
    if ! python3 -m venv "$VENV" 2>/dev/null; then
        sudo_cmd=""; [ "$(id -u)" = 0 ] || sudo_cmd="sudo"
        $sudo_cmd apt-get install -y python3-venv
        python3 -m venv "$VENV"
    fi
    "$VENV/bin/pip" install --quiet duckdb
fi
cargo build --release --locked -p yunqi
target/release/yunqi bench import --rows "$ROWS" --python "$VENV/bin/python"
target/release/yunqi bench sql --rows "$ROWS" --python "$VENV/bin/python"
