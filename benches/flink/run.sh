#!/usr/bin/env bash
# The Apache Flink half of the tumbling-window streaming benchmark:
#   benches/flink/run.sh FILE [QUERY] [tumble.py options]
# FILE is a detections CSV (benches/flink/gen_csv.py N FILE makes one), QUERY is seg (default)
# or rollup; options such as --parallelism N or --verify OUT.csv go on to tumble.py.
# PyFlink comes from PyPI into target/bench-venv-flink (installed once, reused while
# requirements.txt is unchanged); it needs Java 17. Prints one JSON line on stdout.
# Don't run it next to another benchmark or a build: the figures want quiet cores.
set -euo pipefail
if [ $# -lt 1 ]; then
    echo "usage: $0 FILE [seg|rollup] [--parallelism N] [--verify OUT.csv]" >&2
    exit 2
fi
FILE="$(realpath "$1")"; shift
QUERY="seg"
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then QUERY="$1"; shift; fi
# --verify OUT.csv is relative to the caller's directory: make it absolute before the cd.
args=()
while [ $# -gt 0 ]; do
    if [ "$1" = "--verify" ] && [ $# -gt 1 ]; then args+=("$1" "$(realpath -m "$2")"); shift 2
    else args+=("$1"); shift; fi
done
HERE="$(cd "$(dirname "$0")" && pwd)"
cd "$HERE/../.."

# Java 17: take JAVA_HOME if set, else the java on PATH.
if [ -z "${JAVA_HOME:-}" ]; then
    java_bin="$(command -v java || true)"
    if [ -z "$java_bin" ]; then
        echo "error: java not found; hint: install OpenJDK 17 (apt-get install openjdk-17-jre-headless)" >&2
        exit 1
    fi
    JAVA_HOME="$(dirname "$(dirname "$(readlink -f "$java_bin")")")"
fi
export JAVA_HOME
java_version="$("$JAVA_HOME/bin/java" -version 2>&1 | sed -n 's/.*version "\([0-9]*\).*/\1/p' | head -1 || true)"
if [ "$java_version" != "17" ]; then
    echo "error: $JAVA_HOME/bin/java is Java ${java_version:-unknown}, not 17" >&2
    echo "hint: set JAVA_HOME to a Java 17 installation" >&2
    exit 1
fi

VENV=target/bench-venv-flink
STAMP="$VENV/.requirements.sha256"
want="$(sha256sum "$HERE/requirements.txt" | cut -d' ' -f1)"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ] || ! "$VENV/bin/python" -c "import pyflink" 2>/dev/null; then
    if ! python3 -m venv "$VENV" 2>/dev/null; then
        sudo_cmd=""; [ "$(id -u)" = 0 ] || sudo_cmd="sudo"
        $sudo_cmd apt-get install -y python3-venv
        python3 -m venv "$VENV"
    fi
    "$VENV/bin/pip" install --quiet -r "$HERE/requirements.txt"
    echo "$want" > "$STAMP"
fi

exec "$VENV/bin/python" "$HERE/tumble.py" "$FILE" --query "$QUERY" ${args[@]+"${args[@]}"}
