#!/usr/bin/env bash
# CPU per server thread (by thread name) over 3 s in the middle of a fanout run, and the
# sweeper's writes per second: where fanout's server CPU goes, thread by thread.
#
#   perf/experiments/thread-cpu.sh FLUX_BINARY RATE   # e.g. target/release/flux 1000
#
# Starts `FLUX_BINARY serve` on a free port and a fresh data dir, runs `flux-loadtest fanout
# --subscribers 1000 --rate RATE --duration 7 --warmup 1`, samples /proc/<pid>/task/*/stat at
# 4 s and 7 s, prints one line, stops the server.
set -euo pipefail
cd "$(dirname "$0")/../.."
source perf/lib.sh
binary=$1 rate=$2 port=$(free_port) data=$(mktemp -d)
"$binary" serve --listen "127.0.0.1:$port" --data-dir "$data" > "$data.log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true; rm -rf "$data" "$data.log"' EXIT
wait_healthy "$port" 50 0.1
target/release/flux-loadtest fanout --subscribers 1000 --rate "$rate" --duration 7 --warmup 1 \
    --url "http://127.0.0.1:$port" > /dev/null 2>&1 &
generator=$!
sleep 4
threads() {
    for t in /proc/$pid/task/*; do echo "$(cat "$t/comm") $(awk '{print $14 + $15}' "$t/stat")"; done |
        awk '{a[$1] += $2} END {for (k in a) print k, a[k]}' | sort
}
writes() { curl -s "127.0.0.1:$port/metrics" | awk '/^flux_websocket_sweep_writes_total/ {print $2}'; }
threads > "$data/t1"; w1=$(writes); sleep 3; threads > "$data/t2"; w2=$(writes)
ticks=$(getconf CLK_TCK)
echo "$(basename "$binary") sweep writes/s $(((w2 - w1) / 3)) $(join "$data/t1" "$data/t2" |
    awk -v hz="$ticks" '$3 > $2 {printf "%s %d ms/s  ", $1, ($3 - $2) * 1000 / hz / 3}')"
wait $generator
