#!/usr/bin/env bash
# One round of bench/src/bin/http_runtime_probe.rs per runtime, driven by wrk (Debian's `wrk`):
# server CPU per request with nothing behind the HTTP layer, and wrk's own CPU per request.
#   cargo build --release -p flux-bench --bin http_runtime_probe
#   perf/experiments/http-runtime-probe.sh [rounds=3] [port=18700]
set -euo pipefail
cd "$(dirname "$0")/../.."
ROUNDS=${1:-3}
PORT=${2:-18700}
for _ in $(seq "$ROUNDS"); do
  for MODE in tokio hyper monoio monoio-legacy; do
    OUT=$(mktemp)
    timeout 30 target/release/http_runtime_probe "$MODE" "$PORT" 4 > "$OUT" 2>&1 &
    PROBE=$!
    sleep 0.5
    timeout 20 wrk -t2 -c32 -d6s -s perf/experiments/wrk-post.lua "http://127.0.0.1:$PORT" \
      > "$OUT.wrk" 2>&1 &
    sleep 0.3
    WRK=$(pgrep -x wrk | head -1)
    sleep 1.2
    W0=$(awk '{print $14+$15}' "/proc/$WRK/stat")
    sleep 4
    W1=$(awk '{print $14+$15}' "/proc/$WRK/stat")
    wait "$PROBE" || true
    while kill -0 "$WRK" 2>/dev/null; do sleep 0.2; done
    RPS=$(awk '/Requests\/sec/ {print $2}' "$OUT.wrk")
    WRK_US=$(python3 -c "print(round(($W1 - $W0) * 1e6 / $(getconf CLK_TCK) / ($RPS * 4), 2))")
    echo "$MODE: $(tail -1 "$OUT") | wrk $RPS requests/s, ~$WRK_US µs/request"
    rm -f "$OUT" "$OUT.wrk"
  done
done
