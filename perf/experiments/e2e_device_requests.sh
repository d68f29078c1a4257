#!/usr/bin/env bash
# Device requests per commit of a `flux serve` under e2e-1 (decision 0013).
#
#   perf/experiments/e2e_device_requests.sh FLUX_BINARY [DEVICE]
#   perf/experiments/e2e_device_requests.sh target/release/flux vda
#
# Starts FLUX_BINARY on a fresh data dir under target/tmp, warms it up with 3 s of
# `e2e --subscribers 1 --rate 200` (so the log is in a spare), then runs 5 s more and prints the
# delivery p50/p99, the commits (`flux_log_fsync_seconds_count`), and the device's write
# requests and flushes per commit from /sys/block/DEVICE/stat (fields 5 and 16) around it, then
# the inode numbers of the log's files. Other writers on the disk count too: run it on a quiet
# machine. Needs a built target/release/flux-loadtest.
set -euo pipefail
cd "$(dirname "$0")/../.."
source perf/lib.sh
[[ $# -ge 1 ]] || { sed -n 2,13p "$0"; exit 2; }
binary=$1
device=${2:-vda}
mkdir -p target/tmp
work=$(mktemp -d target/tmp/e2e-device.XXXXXX)
pid=
trap '[[ -n $pid ]] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null; rm -rf "$work"' EXIT
start_server "$binary" "$work"
url="http://127.0.0.1:$port"
commits() { curl -s "$url/metrics" | awk '/^flux_log_fsync_seconds_count/ {print $2}'; }
timeout 60 target/release/flux-loadtest e2e --subscribers 1 --rate 200 --duration 2 --warmup 1 \
    --url "$url" >/dev/null 2>&1
c0=$(commits)
read -r w0 f0 < <(awk '{print $5, $16}' "/sys/block/$device/stat")
out=$(timeout 60 target/release/flux-loadtest e2e --subscribers 1 --rate 200 --duration 5 \
    --warmup 0 --url "$url" 2>/dev/null)
read -r w1 f1 < <(awk '{print $5, $16}' "/sys/block/$device/stat")
c1=$(commits)
OUT=$out C=$((${c1%.*} - ${c0%.*})) W=$((w1 - w0)) F=$((f1 - f0)) python3 -c '
import json, os
d = json.loads(os.environ["OUT"])
c, w, f = (int(os.environ[k]) for k in ("C", "W", "F"))
p50, p99 = d["latency_us"]["p50"], d["latency_us"]["p99"]
print(f"p50 {p50} us, p99 {p99} us, {c} commits, "
      f"{w / c:.2f} writes and {f / c:.2f} flushes per commit")'
ls -i "$work/data/log" | tr '\n' ' '
echo
