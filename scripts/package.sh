#!/usr/bin/env bash
# Builds the remus Debian package into target/debian/:
#   /usr/sbin/remusd, /usr/bin/remus, /usr/lib/remus/libremus_dirty_preload.so,
#   remusd.service (enabled; never restarted by an upgrade),
#   /etc/remus/remusd.toml (every setting, commented out),
#   man pages remus(1), remus-*(1), remusd(8), remus.toml(5), and bash, zsh
#   and fish completions, generated from the code by remus-docgen.
# Debug symbols go to remus-dbgsym (a .ddeb beside it). Prints the path of
# the .deb on its last line. Safe to run again.
#
# Built with cargo-deb (installed once into target/tools, pinned): it reads
# the package's metadata from crates/remus/Cargo.toml, computes the shared
# library dependencies with dpkg-shlibdeps, marks /etc files as conffiles,
# and writes the same systemd maintainer-script fragments dh_installsystemd
# would, without a debian/ source tree or debhelper.
set -euo pipefail
cd "$(dirname "$0")/.."
log() { echo "package: $*" >&2; }

CARGO_DEB_VERSION=3.8.0
target=${CARGO_TARGET_DIR:-target}
tool=target/tools/bin/cargo-deb
have=$("$tool" --version 2>/dev/null || true)
if [ "${have##* }" != "$CARGO_DEB_VERSION" ]; then
    log "installing cargo-deb $CARGO_DEB_VERSION into target/tools (once, a few minutes)"
    cargo install --quiet --locked cargo-deb --version "$CARGO_DEB_VERSION" --root target/tools
fi
command -v dpkg-shlibdeps >/dev/null || { log "dpkg-shlibdeps is missing: run scripts/install-deps.sh"; exit 1; }

log "building remus, remusd, the preload library and the docs (release)"
cargo build --release --quiet -p remus -p remus-dirty-preload -p remus-docgen
docs=$target/release/remus-docs
rm -rf "$docs"
"$target/release/remus-docgen" "$docs"
# Debian policy: man pages gzip-compressed (-n: no name or time inside,
# so the package is reproducible).
gzip -9n "$docs"/man/*

log "writing the package"
mkdir -p "$target/debian"
# Stripped binaries in the package, their debug symbols (the release
# profile keeps them) in remus-dbgsym, as Debian ships them.
out=$("$tool" deb --no-build --quiet -p remus --dbgsym --compress-debug-symbols=zlib \
    --output "$target/debian/")
deb=$(printf '%s\n' "$out" | grep '\.deb$' | tail -n1)
[ -f "$deb" ] || { log "cargo-deb did not say where the package is: $out"; exit 1; }
echo "$deb"
