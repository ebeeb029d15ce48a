#!/usr/bin/env bash
# Instructions per request, counted by valgrind's callgrind (deterministic, unlike CPU time on
# a shared machine): the gateway serves N2 and then N1 non-stream requests; the difference over
# N2-N1 is one request's cost, start-up excluded. Every thread of the process is counted.
#   bench/instructions.sh [ENV=VALUE ...]          e.g. OPENAI_FORWARD_USAGE=false
#   GWDIR=/path/to/other/checkout bench/instructions.sh   measures another build
#   MODE=stream bench/instructions.sh                  counts 50-chunk streams instead
set -euo pipefail
BENCH="$(cd "$(dirname "$0")" && pwd)"
PY="${PYTHON:-python3}"
N1=${N1:-200}
N2=${N2:-1200}
work=$(mktemp -d)
trap 'kill $UP 2>/dev/null; rm -rf "$work"' EXIT
mkdir -p "$work/notik"
# tiktoken's first use downloads its encodings in a thread: hide it, it is not per request
echo 'raise ImportError("hidden while counting")' > "$work/notik/tiktoken.py"
UPORT=$(( 20000 + RANDOM % 10000 ))
"$PY" "$BENCH/upstream.py" --port $UPORT > "$work/upstream.log" 2>&1 &
UP=$!
count() {
    local n=$1; shift
    local port=$(( 30000 + RANDOM % 10000 ))
    (cd "${GWDIR:-$work}" && env OPENAI_FORWARD_DATABASE="$work/gw.db" \
        OPENAI_BASE_URL=http://127.0.0.1:$UPORT OPENAI_API_KEY=sk-bench \
        PYTHONHASHSEED=0 PYTHONPATH="$work/notik" "$@" \
        valgrind --tool=callgrind --callgrind-out-file="$work/cg.%p" \
        "$PY" -m openai_forward run --port $port > "$work/gw.log" 2>&1) &
    local gw=$!
    for _ in $(seq 1 240); do
        curl -s -o /dev/null "http://127.0.0.1:$port/healthz" && break
        sleep 0.5
    done
    "$PY" "$BENCH/load.py" --url "http://127.0.0.1:$port" --mode "${MODE:-json}" --concurrency 8 \
        --requests "$n" > /dev/null
    pkill -TERM -P $gw 2>/dev/null || true
    wait $gw || true
    local total
    total=$(grep -h "summary:" "$work"/cg.* | awk '{print $2}')
    rm -f "$work"/cg.* "$work"/gw.db* "$work"/cache.db*
    echo "$total"
}
a=$(count $N1 "$@")
b=$(count $N2 "$@")
echo "instructions per request: $(( (b - a) / (N2 - N1) ))"
