#!/usr/bin/env bash
# The remus demo, end to end on one machine (as root): installs what is
# missing, builds the guest and the tools, starts an agent, creates the
# demo VM and shows it running and counting. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-deps.sh
bash scripts/build-guest.sh
echo "== building remus"
cargo build --release --quiet -p remus -p remus-dirty-preload
BIN=$PWD/target/release

WORK=$(mktemp -d /tmp/remus-demo.XXXXXX)
AGENT_PID=
cleanup() {
    if [ -n "$AGENT_PID" ] && kill -0 "$AGENT_PID" 2>/dev/null; then
        kill -TERM "$AGENT_PID"      # the agent destroys its VMs on SIGTERM
        wait "$AGENT_PID" 2>/dev/null || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT

export REMUS_SOCKET=$WORK/remusd.sock
"$BIN/remusd" --state-dir "$WORK/state" --ram-dir "$WORK" >"$WORK/remusd.log" 2>&1 &
AGENT_PID=$!
for _ in $(seq 100); do [ -S "$REMUS_SOCKET" ] && break; sleep 0.1; done
[ -S "$REMUS_SOCKET" ] || { cat "$WORK/remusd.log"; echo "demo: agent did not start"; exit 1; }

"$BIN/remus" info
echo
echo "== remus create examples/guest.toml"
"$BIN/remus" create examples/guest.toml
echo "== waiting for the guest to boot (TCG emulation: ~10 s)"
for _ in $(seq 600); do
    "$BIN/remus" console --dump demo | grep -q '^tick 5' && break
    sleep 0.2
done
"$BIN/remus" list
echo
echo "== the guest's console (remus console --dump demo | tail -5)"
"$BIN/remus" console --dump demo | tr -d '\r' | tail -5
echo
echo "== remus pause demo: the counter stops"
"$BIN/remus" pause demo
"$BIN/remus" list demo
before=$("$BIN/remus" console --dump demo | grep -c '^tick' || true)
sleep 2
after=$("$BIN/remus" console --dump demo | grep -c '^tick' || true)
echo "ticks while paused: $((after - before))"
echo "== remus unpause demo: it counts on"
"$BIN/remus" unpause demo
sleep 1
"$BIN/remus" console --dump demo | tr -d '\r' | grep '^tick' | tail -3
echo "== remus destroy demo"
"$BIN/remus" destroy demo
"$BIN/remus" list
echo "demo: done"
