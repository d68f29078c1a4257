#!/usr/bin/env bash
# The same server and generator under the system's default TCP congestion control switched
# between bbr and cubic (root; the default is restored to bbr at the end), one fresh
# `flux serve` per run, interleaved: whether loopback pacing or BBR's per-ACK work shows in a
# run. Prints latency p50/p99 (µs) and server/generator CPU µs per event.
#
#   perf/experiments/congestion-control-ab.sh ROUNDS -- GENERATOR_ARGS...
#   perf/experiments/congestion-control-ab.sh 3 -- fanout --subscribers 1000 --rate 200 --duration 5 --warmup 1
set -euo pipefail
cd "$(dirname "$0")/../.."
source perf/lib.sh
[[ $# -ge 3 && "$2" == "--" ]] || { sed -n 2,9p "$0"; exit 2; }
rounds=$1
shift 2
work=$(mktemp -d)
pid=
trap 'kill $pid 2>/dev/null || true; sysctl -q -w net.ipv4.tcp_congestion_control=bbr; rm -rf "$work"' EXIT
for _ in $(seq "$rounds"); do
    for cc in bbr cubic; do
        sysctl -q -w net.ipv4.tcp_congestion_control=$cc
        port=$(free_port)
        rm -rf "$work/data"
        target/release/flux serve --listen "127.0.0.1:$port" --data-dir "$work/data" \
            >"$work/server.log" 2>&1 &
        pid=$!
        wait_healthy "$port" 100 0.05 || true
        timeout 300 target/release/flux-loadtest "$@" --url "http://127.0.0.1:$port" \
            --server-pid "$pid" >"$work/result.json" 2>/dev/null
        kill "$pid"
        wait "$pid" 2>/dev/null || true
        CC=$cc python3 -c '
import json, os, sys
d = json.load(open(sys.argv[1])); l = d["latency_us"]; e = max(1, d.get("events", 1))
print(os.environ["CC"], "p50", l["p50"], "p99", l["p99"],
      "server µs/event", round(d["server"]["cpu_s"] * 1e6 / e),
      "generator µs/event", round(d["generator"]["cpu_s"] * 1e6 / e))' "$work/result.json"
    done
done
