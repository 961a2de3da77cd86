#!/usr/bin/env bash
# `make test` N times in a row in a fresh clone of this repository's HEAD, each run's result, wall
# time, CPU time and load average appended to OUT/LABEL.jsonl (its output in OUT/LABEL-I.log).
# The load average is logged every minute to OUT/LABEL-loadavg.log.
# usage: benchmarks/suite_repeat.sh OUT LABEL N [HOGS]
#   HOGS: that many busy-looping processes beside the runs (a loaded machine; `hog` means 2); or run
#   several of these side by side, each loading the others.
# SUITE_DIR=an earlier clone: update that clone to HEAD and keep its .venv instead of cloning afresh.
set -u
out=$(realpath -m "$1"); label=$2; n=$3; hog=${4:-0}
[ "$hog" = hog ] && hog=2
repo=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
mkdir -p "$out"
if [ -n "${SUITE_DIR:-}" ]; then
  dir=$SUITE_DIR; git -C "$dir" fetch -q "$repo" HEAD && git -C "$dir" reset -q --hard FETCH_HEAD || exit 1
else
  dir=$(mktemp -d "/tmp/suite-$label.XXXX"); git clone -q "$repo" "$dir"
fi
cd "$dir" || exit 1
commit=$(git rev-parse --short HEAD)
hogs=()
( while true; do echo "$(date +%T) $(cut -d' ' -f1-3 /proc/loadavg)" >> "$out/$label-loadavg.log"; sleep 60; done ) &
hogs+=($!)
for _ in $(seq 1 "$hog"); do python3 -c 'while True: pass' & hogs+=($!); done
for i in $(seq 1 "$n"); do
  load0=$(cut -d' ' -f1-3 /proc/loadavg); t0=$(date +%s)
  /usr/bin/time -f '%U %S' -o "$dir/.time" make test > "$out/$label-$i.log" 2>&1; rc=$?
  t1=$(date +%s); load1=$(cut -d' ' -f1-3 /proc/loadavg)
  summary=$(grep -E '^[0-9]+ (passed|failed)' "$out/$label-$i.log" | tail -1)
  printf '{"label":"%s","run":%d,"commit":"%s","hog":"%s","start":%d,"wall_s":%d,"rc":%d,"loadavg_start":"%s","loadavg_end":"%s","cpu_user_sys":"%s","summary":"%s"}\n' \
    "$label" "$i" "$commit" "$hog" "$t0" "$((t1 - t0))" "$rc" "$load0" "$load1" "$(tail -1 "$dir/.time")" "$summary" >> "$out/$label.jsonl"
done
for p in "${hogs[@]}"; do kill "$p"; done
