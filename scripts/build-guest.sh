#!/usr/bin/env bash
# Build the remus guest image (kernel + busybox initramfs + static remus-guest)
# into target/guest-image. Arguments go to `remus-image build`:
#   --out DIR  --cache DIR  --force  --quiet
# Downloads two Debian packages on first use (needs `apt-get update` once);
# offline afterwards. See crates/remus-image/src/lib.rs.
#
# Only the static guest binary (no image):
#   RUSTFLAGS="-C target-feature=+crt-static" cargo build --release \
#     --target x86_64-unknown-linux-gnu -p remus-guest --target-dir target/guest-build
set -euo pipefail
cd "$(dirname "$0")/.."
exec cargo run --quiet -p remus-image -- build "$@"
