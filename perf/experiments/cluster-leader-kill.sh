#!/usr/bin/env bash
# One round of: a 3-server NATS cluster on loopback, a Flux node that creates an R3 stream and
# writes 50 events, `kill -9` of one NATS server, then a fresh Flux node started WAIT seconds
# later. Prints which server led the meta layer and the stream, which one was killed, how long
# the fresh node took to answer /api/health, and how many of its stream look-ups timed out.
#
#   perf/experiments/cluster-leader-kill.sh FLUX_BINARY stream|meta|0|1|2 [WAIT_SECONDS]
#
# Session 7 used it to find why a node started right after the stream leader stopped exited
# (before 8305275: every time with `stream`, WAIT=1) and to time the retry that replaced it.
set -euo pipefail
[[ $# -ge 2 ]] || { sed -n 2,10p "$0"; exit 2; }
flux=$1 kill=$2 wait=${3:-1}
cd "$(dirname "$0")/../.."
source perf/lib.sh
work=$(mktemp -d)
pids=()
trap 'kill -9 "${pids[@]}" 2>/dev/null || true; [[ -n ${KEEP:-} ]] || rm -rf "$work"' EXIT
client=() route=() monitor=()
for i in 0 1 2; do client+=("$(free_port)"); route+=("$(free_port)"); monitor+=("$(free_port)"); done
for i in 0 1 2; do
    routes=()
    for j in 0 1 2; do [[ $j != "$i" ]] && routes+=("nats://127.0.0.1:${route[$j]}"); done
    nats-server -js -a 127.0.0.1 -p "${client[$i]}" -m "${monitor[$i]}" -sd "$work/s$i" -n "n$i" \
        --cluster_name c --cluster "nats://127.0.0.1:${route[$i]}" \
        --routes "$(IFS=,; echo "${routes[*]}")" >"$work/nats$i.log" 2>&1 &
    pids+=($!)
done
jsz() { curl -sf "http://127.0.0.1:${monitor[0]}/jsz?accounts=true&streams=true" || echo '{}'; }
for _ in $(seq 100); do
    [[ $(jsz | python3 -c 'import json,sys; print(json.load(sys.stdin).get("meta_cluster",{}).get("leader") or "")') ]] && break
    sleep 0.1
done
log="nats://127.0.0.1:${client[0]},127.0.0.1:${client[1]},127.0.0.1:${client[2]}"
port=$(free_port)
"$flux" serve --listen "127.0.0.1:$port" --data-dir "$work/a" --log "$log" --nats-replicas 3 \
    >"$work/a.log" 2>&1 &
pids+=($!)
wait_healthy "$port" 600 0.1
batch=$(python3 -c 'import json; print(json.dumps([{"stream":"s","source":"x","timestamp":1795000000000,"payload":{"entity_id":f"acme/e{i}","properties":{"v":i}}} for i in range(50)]))')
curl -sf -X POST "http://127.0.0.1:$port/api/events/batch" -H 'content-type: application/json' \
    -d "$batch" | grep -q '"successful":50' || { echo "the batch was not accepted" >&2; exit 1; }
read -r meta stream < <(jsz | python3 -c '
import json, sys
j = json.load(sys.stdin)
leaders = [s.get("cluster", {}).get("leader") for a in j.get("account_details", []) for s in a.get("stream_detail", [])]
print(j.get("meta_cluster", {}).get("leader"), leaders[0] if leaders else None)')
case $kill in meta) victim=${meta#n} ;; stream) victim=${stream#n} ;; *) victim=$kill ;; esac
kill -9 "${pids[$victim]}"
sleep "$wait"
port=$(free_port)
start=$(date +%s.%N)
"$flux" serve --listen "127.0.0.1:$port" --data-dir "$work/b" --log "$log" >"$work/b.log" 2>&1 &
pids+=($!)
up=no
for _ in $(seq 90); do
    wait_healthy "$port" 10 0.1 && { up=yes; break; }
    kill -0 "${pids[-1]}" 2>/dev/null || { up="no (exited)"; break; }
done
end=$(date +%s.%N)
events=$(curl -sf "http://127.0.0.1:$port/api/state/entities?prefix=acme/e&limit=100" |
    python3 -c 'import json,sys; j=json.load(sys.stdin); print(len(j if isinstance(j, list) else j.get("entities", [])))' 2>/dev/null || echo "-")
echo "meta=$meta stream_leader=$stream killed=n$victim started=$up in $(python3 -c "print(round($end - $start, 1))") s" \
    "timeouts=$(grep -c 'timed out' "$work/b.log" || true) entities=$events"
