#!/usr/bin/env bash
# The remus demo, end to end on one machine (as root): installs what is
# missing, builds the guest and the tools, then runs remus-demo, which
# makes three hosts on one LAN out of network namespaces (a: primary,
# b: backup with its own disks, c: a client), runs a VM on a with a
# replicated disk and a TCP service, protects it to b, pulls a's plug
# (SIGKILL of its agent and QEMU) and shows the VM carrying on at b: the
# client's TCP session goes on without a gap, and the guest finds every
# record it wrote on b's disk. Then a comes back (listed stale), b
# resyncs the VM to it (only changed blocks) and `remus failback` moves it
# home, the session still whole. Everything it made is removed at the
# end, also on failure. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-deps.sh
bash scripts/build-guest.sh
echo "== building remus"
cargo build --release --quiet -p remus -p remus-dirty-preload
cargo build --release --quiet -p remus-testbed --bin remus-demo
exec target/release/remus-demo "$@"
