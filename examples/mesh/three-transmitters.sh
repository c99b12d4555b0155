#!/usr/bin/env bash
# Starts a three-transmitter mesh on this machine and leaves it running
# until Ctrl-C. Cells may join any of the three command endpoints.
#
#   examples/mesh/three-transmitters.sh            # ports 5454/5455, 6454/6455, 7454/7455
#   BASE=15454 examples/mesh/three-transmitters.sh # other ports
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release -q -p thynapse-transmitter
bin=target/release/thynapse
base=${BASE:-5454}
pids=()
trap 'kill "${pids[@]}" 2>/dev/null; wait' EXIT INT TERM
for i in 0 1 2; do
    cmd=$((base + 1000 * i))
    join=()
    [ "$i" -gt 0 ] && join=(--join "tcp://127.0.0.1:$base")
    "$bin" transmitter --command "tcp://127.0.0.1:$cmd" --event "tcp://127.0.0.1:$((cmd + 1))" "${join[@]}" &
    pids+=($!)
done
echo "mesh up: tcp://127.0.0.1:$base tcp://127.0.0.1:$((base + 1000)) tcp://127.0.0.1:$((base + 2000)); Ctrl-C stops it"
wait
