#!/usr/bin/env bash
# The standard performance suite of Flux: builds the release binaries, then runs
# perf/suite.py, which starts a fresh `flux serve` for every run, drives it with
# `flux-loadtest`, and writes perf/reports/<date>-<commit>.md plus the raw JSON beside it.
#
#   perf/run-suite.sh            # the full suite (3 runs of everything, about 15 minutes)
#   perf/run-suite.sh --quick    # 1 short run of everything: a smoke test of the suite itself
#   perf/run-suite.sh --help     # every option
#
# Every server and generator is started by suite.py in its own session, bounded by a timeout
# and killed on exit (normal, error, Ctrl-C or SIGTERM). This wrapper forwards INT/TERM to
# suite.py and, as a last resort, kills whatever process ids suite.py recorded as still alive.
set -euo pipefail

cd "$(dirname "$0")/.."

for arg in "$@"; do
    if [[ "$arg" == "-h" || "$arg" == "--help" ]]; then
        exec python3 perf/suite.py --help
    fi
done

echo "== building release binaries" >&2
cargo build --release -p flux -p flux-loadtest
cargo build --release -p flux-bench --bin fsync_probe

mkdir -p target/perf-data
pid_file="target/perf-data/suite-pids.$$"
: >"$pid_file"

suite_pid=""
cleanup() {
    local status=$?
    if [[ -n "$suite_pid" ]] && kill -0 "$suite_pid" 2>/dev/null; then
        kill -TERM "$suite_pid" 2>/dev/null || true
        for _ in $(seq 1 100); do
            kill -0 "$suite_pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$suite_pid" 2>/dev/null || true
    fi
    # Anything suite.py started and could not stop itself (one pid per line; each was
    # started as the leader of its own process group).
    if [[ -s "$pid_file" ]]; then
        while read -r pid; do
            [[ "$pid" =~ ^[0-9]+$ ]] || continue
            # Only our own copies of the binaries (target/perf-data/<stamp>/bin/), never a reused pid.
            if kill -0 "$pid" 2>/dev/null && tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q perf-data; then
                kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
            fi
        done <"$pid_file"
    fi
    rm -f "$pid_file"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

python3 perf/suite.py --pid-file "$pid_file" "$@" &
suite_pid=$!
wait "$suite_pid"
