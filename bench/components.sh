#!/usr/bin/env bash
# Instructions per request of each piece of bench/components.py, counted by valgrind's
# callgrind: the piece runs N1 and then N2 times; the difference over N2-N1 is one run's
# cost (start-up excluded), divided by the requests one run stands for, less the loop's
# own cost ("nothing").
#   bench/components.sh                 every piece
#   bench/components.sh access_line     some of them
set -euo pipefail
BENCH="$(cd "$(dirname "$0")" && pwd)"
PY="${PYTHON:-python3}"
N1=${N1:-20}
N2=${N2:-220}
count() {
    PYTHONHASHSEED=0 valgrind --tool=callgrind --callgrind-out-file=/dev/null \
        "$PY" "$BENCH/components.py" "$1" "$2" 2>&1 \
        | sed -n 's/.*Collected : \([0-9]*\).*/\1/p'
}
per_run() {  # a batch piece runs a tenth as often
    local n1=$N1 n2=$N2 a b
    if [ "${2:-1}" -gt 1 ]; then n1=$(( N1 / 10 )); n2=$(( N2 / 10 )); fi
    a=$(count "$1" $n1); b=$(count "$1" $n2); echo $(( (b - a) / (n2 - n1) ))
}
base=$(per_run nothing)
pieces=("$@")
[ ${#pieces[@]} -gt 0 ] || mapfile -t pieces < <("$PY" "$BENCH/components.py" --list | awk '{print $1}' | grep -v '^nothing$')
for name in "${pieces[@]}"; do
    per=$("$PY" "$BENCH/components.py" --list | awk -v n="$name" '$1 == n {print $2}')
    printf '%-22s %9d instructions per request\n' "$name" $(( ($(per_run "$name" "${per:-1}") - base) / ${per:-1} ))
done
