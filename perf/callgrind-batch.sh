#!/usr/bin/env bash
# Instruction counts of the server for a batch ingest run, repeatable where timings are not.
#
#   perf/callgrind-batch.sh FLUX_BINARY [OUT_FILE]
#   perf/callgrind-batch.sh target/release/flux /tmp/cg.out
#
# Starts FLUX_BINARY under `valgrind --tool=callgrind` on a free port with an empty data dir,
# sends 100 batches of 1,000 events with 5 properties over 10,000 entities (so most events
# update an entity, as in a long run), stops the server with SIGTERM and prints the totals of
# the stages: instructions per accepted event for the whole process, the HTTP side
# (`dispatch`: parsing, validation, record encoding, the reply), the event parser, the shards
# and the log writer. Needs valgrind and a built `target/release/flux-loadtest`.
set -euo pipefail
cd "$(dirname "$0")/.."
source perf/lib.sh
[[ $# -ge 1 ]] || { sed -n 2,12p "$0"; exit 2; }
binary=$1
out=${2:-$(mktemp -u /tmp/callgrind.XXXXXX)}
work=$(mktemp -d)
pid=
trap '[[ -n $pid ]] && kill "$pid" 2>/dev/null; rm -rf "$work"' EXIT
port=$(free_port)
timeout 600 valgrind --tool=callgrind --callgrind-out-file="$out" \
    "$binary" serve --listen "127.0.0.1:$port" --data-dir "$work/data" >"$work/server.log" 2>&1 &
pid=$!
wait_healthy "$port" 300 0.1 || true
events=$(timeout 300 target/release/flux-loadtest ingest-batch -c 2 --batch 1000 --props 5 \
    --rate 10000 --duration 10 --warmup 0 --url "http://127.0.0.1:$port" 2>/dev/null |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["events"])')
kill -TERM "$pid"
wait "$pid" || true
pid=
callgrind_annotate --inclusive=yes "$out" 2>/dev/null | EVENTS=$events python3 -c '
import os, re, sys
events = int(os.environ["EVENTS"])
stages = [("total", "PROGRAM TOTALS"), ("http side", r"flux_ingress::dispatch::\{\{closure\}\} \["),
          ("parser", r"flux_ingress::event::parse_batch \["), ("shards", r"flux_engine::shard::run_shard \["),
          ("log writer", r"flux_engine::log::local::run_writer \[")]
seen = {}
for line in sys.stdin:
    for name, pattern in stages:
        if name not in seen and re.search(pattern, line):
            seen[name] = int(line.split()[0].replace(",", ""))
print(f"{events} events accepted; callgrind output: {sys.argv[1]}")
for name, _ in stages:
    if name in seen:
        print(f"{name:>10}: {seen[name]:>14,} instructions, {seen[name] / events:8.0f} per event")
' "$out"
