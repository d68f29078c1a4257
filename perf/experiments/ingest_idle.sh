#!/usr/bin/env bash
# ingest -c 32 against a fresh server, with the machine's idle share and the log's commits
# (perf/README, session 20: on disk and on tmpfs).
#
#   perf/experiments/ingest_idle.sh FLUX_BINARY DATA_PARENT
#   perf/experiments/ingest_idle.sh target/release/flux target/tmp      # the disk
#   perf/experiments/ingest_idle.sh target/release/flux /dev/shm        # tmpfs: no fdatasync cost
#
# Runs `flux-loadtest ingest -c 32 --duration 8 --warmup 1 --server-pid <pid>` and prints
# events/s, p50/p99, server and generator CPU µs per request, the machine's idle + iowait
# share (`/proc/stat` over 4 s in the middle of the run) and the records per commit
# (`flux_log_group_commit_records_sum / _count`, warmup included). Any extra arguments go to
# the generator (for example `-c 16`). Needs a built target/release/flux-loadtest.
set -euo pipefail
cd "$(dirname "$0")/../.."
source perf/lib.sh
[[ $# -ge 2 ]] || { sed -n 2,14p "$0"; exit 2; }
binary=$1
parent=$2
shift 2
work=$(mktemp -d "$parent/ingest-idle.XXXXXX")
pid=
trap '[[ -n $pid ]] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null; rm -rf "$work"' EXIT
start_server "$binary" "$work"
(sleep 3; head -1 /proc/stat >"$work/stat1"; sleep 4; head -1 /proc/stat >"$work/stat2") &
sampler=$!
timeout 60 target/release/flux-loadtest ingest -c 32 --duration 8 --warmup 1 --server-pid "$pid" \
    --url "http://127.0.0.1:$port" "$@" 2>/dev/null >"$work/result.json"
wait "$sampler"
curl -s "http://127.0.0.1:$port/metrics" >"$work/metrics.txt"
WORK=$work python3 - <<'PY'
import json, os
work = os.environ["WORK"]
d = json.load(open(f"{work}/result.json"))
a = [int(x) for x in open(f"{work}/stat1").read().split()[1:]]
b = [int(x) for x in open(f"{work}/stat2").read().split()[1:]]
delta = [y - x for x, y in zip(a, b)]
idle = 100 * (delta[3] + delta[4]) / sum(delta)
m = {}
for line in open(f"{work}/metrics.txt"):
    name, _, value = line.partition(" ")
    if name.startswith("flux_log_group_commit_records_"):
        m[name] = float(value)
per_commit = m["flux_log_group_commit_records_sum"] / m["flux_log_group_commit_records_count"]
requests = d["total"]["requests"]
print(f"{d['throughput_events_per_s']:,.0f} events/s, p50 {d['latency_us']['p50']} us, "
      f"p99 {d['latency_us']['p99']} us, server {d['server']['cpu_us_per_event']:.2f} us/request, "
      f"generator {d['generator']['cpu_s'] * 1e6 / requests:.2f} us/request, idle {idle:.1f} %, "
      f"{per_commit:.1f} records per commit")
PY
