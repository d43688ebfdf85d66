#!/usr/bin/env bash
# The remus demo, end to end on one machine (as root): installs what is
# missing, builds the guest and the tools, starts two agents ("hosts" A
# and B), runs a VM on A, protects it to B, pulls A's plug (SIGKILL of A's
# agent and QEMU) and shows the VM carrying on at B from its last
# checkpoint. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-deps.sh
bash scripts/build-guest.sh
echo "== building remus"
cargo build --release --quiet -p remus -p remus-dirty-preload
BIN=$PWD/target/release

WORK=$(mktemp -d /tmp/remus-demo.XXXXXX)
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do
        if kill -0 "$pid" 2>/dev/null; then
            kill -TERM "$pid"          # an agent destroys its VMs on SIGTERM
            wait "$pid" 2>/dev/null || true
        fi
    done
    rm -rf "$WORK"
}
trap cleanup EXIT

head -c 32 /dev/urandom >"$WORK/key" && chmod 600 "$WORK/key"
PORT=$(( 20000 + RANDOM % 20000 ))

start_agent() {   # NAME [extra args]
    local name=$1; shift
    "$BIN/remusd" --state-dir "$WORK/$name" --socket "$WORK/$name.sock" \
        --ram-dir "$WORK" --key "$WORK/key" "$@" >"$WORK/$name.log" 2>&1 &
    PIDS+=($!)
    for _ in $(seq 100); do [ -S "$WORK/$name.sock" ] && return; sleep 0.1; done
    cat "$WORK/$name.log"; echo "demo: agent $name did not start"; exit 1
}
A() { "$BIN/remus" --socket "$WORK/A.sock" "$@"; }
B() { "$BIN/remus" --socket "$WORK/B.sock" "$@"; }
last_tick() { "$BIN/remus" --socket "$WORK/$1.sock" console --dump demo | tr -d '\r' | grep -o 'tick [0-9]*$' | tail -1; }

start_agent A
start_agent B --listen "127.0.0.1:$PORT"
A_PID=${PIDS[0]}

echo "== host A: remus create examples/guest.toml"
A create examples/guest.toml
# (Output is captured before matching: with pipefail, `cmd | grep -q` can
# fail when grep exits at its first match and cmd gets SIGPIPE.)
for _ in $(seq 600); do [[ $(A console --dump demo) == *"tick 5"* ]] && break; sleep 0.1; done
A list
echo "   console: $(last_tick A)"

echo
echo "== host A: remus protect -i 100 demo 127.0.0.1:$PORT"
A protect -i 100 --timeout 1000 demo "127.0.0.1:$PORT" >"$WORK/protect.out" 2>&1 &
for _ in $(seq 100); do [ "$(grep -c '^epoch' "$WORK/protect.out" || true)" -ge 20 ] && break; sleep 0.1; done
head -14 "$WORK/protect.out"
echo "   ..."
echo "== host B: remus list (the standby copy is paused)"
B list

echo
echo "== pulling host A's plug (SIGKILL of its agent and its QEMU) at $(last_tick A)"
QEMU_A=$(A list --json | grep -o '"pid": [0-9]*' | grep -o '[0-9]*')
kill -KILL "$A_PID" "$QEMU_A"
SECONDS_BEFORE=$(date +%s%N)
for _ in $(seq 300); do
    LIST=$(B list --json)
    [[ $LIST == *'"role": "unprotected"'* ]] && break
    [[ $LIST == *'"demo"'* ]] || { echo "demo: B has no copy to resume; its log says:"; sed 's/\x1b\[[0-9;]*m//g' "$WORK/B.log" | tail -8 | cut -c1-300; exit 1; }
    sleep 0.02
done
echo "   B resumed the VM after $(( ($(date +%s%N) - SECONDS_BEFORE) / 1000000 )) ms"
sleep 1
echo "== host B: remus list"
B list
echo "   console on B: $(B console --dump demo | tr -d '\r' | grep -o 'tick [0-9]*$' | head -1) ... $(last_tick B)"
echo "   (the counter went on from the last checkpoint, not from tick 1)"
grep -h "FAILOVER" "$WORK/B.log" | sed 's/\x1b\[[0-9;]*m//g' | cut -c1-200
B destroy demo
echo "demo: done"
