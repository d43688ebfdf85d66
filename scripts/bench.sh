#!/usr/bin/env bash
# The benchmark suite: builds the tools in release and the guest image,
# installs what it needs (scripts/install-deps.sh), then runs
# `remus-bench --suite`, which appends one dated report to
# bench/results.md and one run to bench/results.json: checkpoint pause by
# interval x dirty rate, bytes on the wire against raw dirty bytes,
# pause against guest RAM size (256 MiB to 4 GiB), guest slowdown under
# protection, failover times, `remus migrate` against QEMU's own live
# migration, disk throughput and network latency and throughput, resync
# after a failover (changed chunks only) against a full compare and a full
# copy for 1/4/16 GiB disks with 1%/10% rewritten, a protected VM's
# checkpoints during another VM's initial copy (uncapped and --max-rate)
# and as 1, 2 and 4 protected VMs share the hosts, agent restarts under
# a running VM (the client's wait, the time to protection restored); then
# a table of the targets, each met or missed by how much. About 40 minutes
# on a 2-core machine; needs root (network namespaces) and about 10 GiB of
# free memory (the 4 GiB case runs a primary and a backup copy), and about
# 4 GiB free in /tmp (the 16 GiB resync case, two copies of 1.6 GiB data).
#
# Arguments go to remus-bench (`--help`), e.g.
#   scripts/bench.sh --only matrix,wire --seconds 5
#   scripts/bench.sh --disk      (only the disk cases, as before)
#   scripts/bench.sh --net       (only the network cases)
#   scripts/bench.sh --pause     (only the original pause cases)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
cargo build --release --workspace
bash scripts/build-guest.sh
bash scripts/build-debian-image.sh
if [ "$#" -eq 0 ]; then
    set -- --suite
fi
if [ "${1:-}" = "--pause" ]; then
    shift
fi
exec target/release/remus-bench "$@"
