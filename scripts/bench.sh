#!/usr/bin/env bash
# Checkpoint pause benchmark: builds the tools in release and the guest
# image, then runs remus-bench, which appends a dated section to
# bench/results.md and a run to bench/results.json. Takes a few minutes
# (four cases: -i 100 / -i 200 × idle / 50 MB/s, one VM at a time).
# Arguments go to remus-bench (`--help`), e.g. --seconds 5 --no-write.
# `--disk`: instead, guest disk write throughput and fsync latency,
# unprotected vs protected on one VM (target >= 0.7x at -i 200).
# `--net`: instead, ping RTT and TCP throughput between a client and one VM
# on a LAN of network namespaces: unprotected, protected --no-net, and
# protected with output buffering (target: RTT p50 + interval/2 + 2 ms at
# most). Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --workspace
bash scripts/build-guest.sh
exec target/release/remus-bench "$@"
