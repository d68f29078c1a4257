#!/usr/bin/env bash
# Interleaved A/B runs of two `flux` builds under the same generator command, the way the
# before/after pairs in perf/README.md and docs/decisions/ were taken.
#
#   perf/ab.sh OLD_FLUX NEW_FLUX ROUNDS -- GENERATOR_ARGS...
#   perf/ab.sh /tmp/flux-old target/release/flux 4 -- ingest-batch -c 4 --batch 1000 --props 5 --duration 4
#
# Each round starts OLD then NEW, each a fresh `flux serve` on a free port with an empty data
# dir, runs `target/release/flux-loadtest GENERATOR_ARGS --url ... --server-pid ...`, prints
# one line (events/s; latency p50/p99/p99.9 in µs; frames lost, for e2e/fanout; server and
# generator CPU µs per event; the server's mean fdatasync from /metrics; load average) and
# stops the server. To compare two generators against one server, give the same binary twice
# and set OLD_GENERATOR / NEW_GENERATOR (default: target/release/flux-loadtest for both).
# With AB_LOG=nats each run gets a fresh `nats-server -js` (own port and store), the server runs
# with `--log nats://…`, and the line adds nats-server's CPU µs per event (utime+stime of
# /proc/PID/stat around the generator run).
# Build an OLD binary from another commit with a worktree, e.g.
#   git worktree add /tmp/old <commit> && (cd /tmp/old && CARGO_TARGET_DIR=/tmp/old-target \
#     cargo build --release -p flux) && cp /tmp/old-target/release/flux /tmp/flux-old
set -euo pipefail
cd "$(dirname "$0")/.."
source perf/lib.sh
[[ $# -ge 4 && "$4" == "--" ]] || { sed -n 2,19p "$0"; exit 2; }
old=$1 new=$2 rounds=$3
shift 4
work=$(mktemp -d)
trap 'kill $pid $nats_pid 2>/dev/null || true; rm -rf "$work"' EXIT
pid= nats_pid=
ticks() { if [[ -n $nats_pid ]]; then awk '{print $14 + $15}' "/proc/$nats_pid/stat"; else echo 0; fi; }
for _ in $(seq "$rounds"); do
    for side in old new; do
        binary=$old generator=${OLD_GENERATOR:-target/release/flux-loadtest}
        [[ $side == new ]] && binary=$new generator=${NEW_GENERATOR:-target/release/flux-loadtest}
        port=$(free_port)
        rm -rf "$work/data" "$work/nats"
        log=()
        if [[ ${AB_LOG:-local} == nats ]]; then
            nats_port=$(free_port)
            nats-server -js -a 127.0.0.1 -p "$nats_port" -sd "$work/nats" 2>"$work/nats.log" &
            nats_pid=$!
            sleep 0.5
            log=(--log "nats://127.0.0.1:$nats_port")
        fi
        "$binary" serve --listen "127.0.0.1:$port" --data-dir "$work/data" "${log[@]}" \
            >"$work/server.log" 2>&1 &
        pid=$!
        wait_healthy "$port" 100 0.05 || true
        nats_before=$(ticks)
        timeout 300 "$generator" "$@" --url "http://127.0.0.1:$port" --server-pid "$pid" \
            >"$work/result.json" 2>/dev/null
        nats_ticks=$(($(ticks) - nats_before))
        curl -sf "http://127.0.0.1:$port/metrics" >"$work/metrics.txt" || true
        SIDE=$side WORK=$work NATS_TICKS=${nats_pid:+$nats_ticks} python3 -c '
import json, os
work = os.environ["WORK"]
d = json.load(open(work + "/result.json")); l = d["latency_us"]; s = d["server"]
events = max(1, d.get("events", 1))
sync = {}
for line in open(work + "/metrics.txt"):
    if line.startswith("flux_log_fsync_seconds_"):
        name, value = line.split()
        sync[name.rsplit("_", 1)[1]] = float(value)
lost = (d.get("loss") or {}).get("lost")
nats = os.environ.get("NATS_TICKS")
errors = d.get("errors_by_status") or {}
print(os.environ["SIDE"], "events/s %.0f" % d["throughput_events_per_s"],
      "p50", l["p50"], "p99", l["p99"], "p99.9", l["p999"], *(["lost", lost] if lost is not None else []),
      "server µs/event %.2f" % (s["cpu_s"] * 1e6 / events),
      "generator µs/event %.2f" % (d["generator"]["cpu_s"] * 1e6 / events),
      *(["nats-server µs/event %.2f" % (int(nats) * 1e4 / events)] if nats else
        ["fsync mean ms %.2f" % (sync.get("sum", 0) * 1e3 / max(1, sync.get("count", 0)))]),
      *(["errors", errors] if errors else []),
      "load", open("/proc/loadavg").read().split()[0])'
        kill $pid $nats_pid
        wait $pid $nats_pid 2>/dev/null || true
        nats_pid=
    done
done
