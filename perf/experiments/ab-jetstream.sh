#!/usr/bin/env bash
# Interleaved A/B runs of two `flux` builds in JetStream mode, each against a fresh
# `nats-server -js` (own port and store), with nats-server's CPU counted too.
#
#   perf/experiments/ab-jetstream.sh OLD_FLUX NEW_FLUX ROUNDS -- GENERATOR_ARGS...
#   perf/experiments/ab-jetstream.sh /tmp/flux-old target/release/flux 3 -- ingest -c 32 --duration 5 --warmup 1
#
# Prints per run: events/s, latency p50/p99 (µs), errors by status, and CPU µs per event of
# flux and of nats-server (utime+stime of /proc/PID/stat around the generator run, warm-up
# included). Needs nats-server on the PATH and a built target/release/flux-loadtest.
set -euo pipefail
cd "$(dirname "$0")/../.."
source perf/lib.sh
[[ $# -ge 4 && "$4" == "--" ]] || { sed -n 2,10p "$0"; exit 2; }
old=$1 new=$2 rounds=$3
shift 4
work=$(mktemp -d)
nats_pid= flux_pid=
trap 'kill $flux_pid $nats_pid 2>/dev/null || true; rm -rf "$work"' EXIT
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
for _ in $(seq "$rounds"); do
    for side in old new; do
        binary=$old
        [[ $side == new ]] && binary=$new
        rm -rf "$work/nats" "$work/data"
        nats_port=$(free_port) port=$(free_port)
        nats-server -js -a 127.0.0.1 -p "$nats_port" -sd "$work/nats" 2>"$work/nats.log" &
        nats_pid=$!
        sleep 0.5
        FLUX_LOG_LEVEL=warn "$binary" serve --listen "127.0.0.1:$port" --data-dir "$work/data" \
            --log "nats://127.0.0.1:$nats_port" >"$work/server.log" 2>&1 &
        flux_pid=$!
        wait_healthy "$port" 100 0.05 || true
        before=$(ticks "$nats_pid")
        timeout 300 target/release/flux-loadtest "$@" --url "http://127.0.0.1:$port" \
            --server-pid "$flux_pid" >"$work/result.json" 2>/dev/null
        after=$(ticks "$nats_pid")
        SIDE=$side NATS_TICKS=$((after - before)) python3 -c '
import json, os, sys
d = json.load(open(sys.argv[1])); events = max(1, d["events"]); l = d["latency_us"]
print(os.environ["SIDE"], "events/s %.0f" % d["throughput_events_per_s"], "p50", l["p50"], "p99", l["p99"],
      "errors", d.get("errors_by_status") or {}, "flux µs/event %.2f" % (d["server"]["cpu_s"] * 1e6 / events),
      "nats-server µs/event %.2f" % (int(os.environ["NATS_TICKS"]) * 1e4 / events))' "$work/result.json"
        kill "$flux_pid" "$nats_pid"
        wait "$flux_pid" "$nats_pid" 2>/dev/null || true
        flux_pid= nats_pid=
    done
done
