#!/usr/bin/env bash
# Runs the whole remus test suite on a fresh Debian 12 machine (as root):
# installs what is missing, builds the guest image and a Debian VM image,
# then runs every test,
# including the ones that boot real QEMU guests and create network
# namespaces. Safe to run again: each step skips what is already done.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-deps.sh
bash scripts/build-guest.sh
# A real Debian VM image (debootstrap; cached, about 5 minutes the first
# time) for the end-to-end test of a distribution booted from disk.
bash scripts/build-debian-image.sh

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== shellcheck (the resource agent)"
shellcheck packaging/ocf/remus-vm
echo "== cargo clippy"
cargo clippy --workspace --all-targets --quiet -- -D warnings
echo "== cargo build"
# Builds every member, including the dirty-tracking preload (a cdylib that
# `cargo test` alone does not produce) that QEMU loads in the tests.
cargo build --workspace --quiet
echo "== fuzz smoke"
# Each fuzz target for 10 s from its committed corpus (nightly, cargo-fuzz
# pinned in target/tools; about 2 minutes with the build): a decoder that
# now panics on an input of the corpus, or soon after, stops the run here.
bash scripts/fuzz.sh --smoke
echo "== cargo test"
# Tests that boot guests share the 2 cores; keep at most two at a time.
export RUST_TEST_THREADS="${RUST_TEST_THREADS:-2}"
cargo test --workspace --no-fail-fast 2>&1 | tee target/test-output.log
# cargo test's own exit status is kept by pipefail.
