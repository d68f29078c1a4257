# Shell helpers shared by the perf scripts (sourced, not run).

# A free TCP port on loopback.
free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Waits until the Flux server on loopback port $1 answers /api/health, polling $2 times every
# $3 s.
wait_healthy() {
    for _ in $(seq "$2"); do
        curl -sf -o /dev/null "http://127.0.0.1:$1/api/health" && return 0
        sleep "$3"
    done
    return 1
}

# Starts `$1 serve` on a free loopback port with its data dir in $2/data and its output in
# $2/server.log, and waits until it answers; sets `port` and `pid` (the caller's EXIT trap
# stops it).
start_server() {
    port=$(free_port)
    "$1" serve --listen "127.0.0.1:$port" --data-dir "$2/data" >"$2/server.log" 2>&1 &
    pid=$!
    wait_healthy "$port" 30 0.1
}
