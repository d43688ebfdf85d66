#!/usr/bin/env bash
# Install what remus needs on a fresh Debian 12 (bookworm) machine.
# Safe to run more than once. Needs root (it uses apt-get).
#
# QEMU 10 comes from bookworm-backports: bookworm's own QEMU 7.2 lacks pieces
# remus relies on. A fresh machine has no backports source, so we add one,
# reusing the URIs of the Debian source the machine already has, so that no
# mirror host is ever written into this project.
set -euo pipefail

log() { printf 'install-deps: %s\n' "$*" >&2; }

if [ "$(id -u)" != 0 ]; then
    log "must run as root (apt-get install)"; exit 1
fi

export DEBIAN_FRONTEND=noninteractive

backports_list=/etc/apt/sources.list.d/remus-bookworm-backports.sources

find_debian_uri() {
    # deb822 file first, then the one-line format.
    local f=/etc/apt/sources.list.d/debian.sources
    if [ -r "$f" ]; then
        # The first URIs: line of a stanza that serves the plain 'bookworm' suite.
        awk '
            /^[[:space:]]*$/ { if (uri != "" && suite) { print uri; exit } uri=""; suite=0; next }
            /^URIs:/ { uri=$2 }
            /^Suites:/ { for (i = 2; i <= NF; i++) if ($i == "bookworm") suite=1 }
            END { if (uri != "" && suite) print uri }
        ' "$f" | head -n1
        return
    fi
    if [ -r /etc/apt/sources.list ]; then
        awk '$1 == "deb" && $3 == "bookworm" { print $2; exit }' /etc/apt/sources.list
    fi
}

need_update=0
if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
    uri=$(find_debian_uri || true)
    if [ -z "$uri" ]; then
        log "cannot find this machine's Debian source (debian.sources or sources.list) to derive a backports entry"
        exit 1
    fi
    log "adding bookworm-backports (same URIs as this machine's Debian source)"
    cat >"$backports_list" <<SRC
Types: deb
URIs: $uri
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
    need_update=1
fi

# Commands' output is captured before it is matched: under pipefail,
# `cmd | grep -q` or `cmd | head` can fail when the reader exits early.
have_pkg() { [[ $(dpkg-query -W -f='${Status}' "$1" 2>/dev/null) == "install ok installed"* ]]; }

qemu_ok() {
    command -v qemu-system-x86_64 >/dev/null 2>&1 || return 1
    local v
    v=$(qemu-system-x86_64 --version | sed -n '1s/.*version \([0-9]*\)\..*/\1/p')
    [ -n "$v" ] && [ "$v" -ge 10 ]
}

# etcd-server and etcd-client: the arbiter's tests start a real etcd;
# protobuf-compiler and libprotobuf-dev: the etcd-client crate generates its
# gRPC code with protoc at build time, and protoc needs the well-known
# google/protobuf/*.proto files, which only libprotobuf-dev ships
# (protobuf-compiler merely recommends it, and we install without
# recommends).
# dosfstools, fdisk, mtools, syslinux, syslinux-common, syslinux-efi: the
# guest's boot disk (a FAT partition with syslinux for BIOS and UEFI,
# built without mounting anything);
# ovmf: UEFI firmware for VMs that ask for it; debootstrap: the Debian VM
# image (scripts/build-debian-image.sh) and the package's install test;
# dpkg-dev: dpkg-shlibdeps, which computes the package's library
# dependencies (scripts/package.sh); gcc and pkg-config: crates that build
# C code; prometheus (and its promtool): the metrics test scrapes the
# agents with a real server, and contrib/'s alert rules are checked with
# promtool.
# corosync, pacemaker, pacemaker-cli-utils, resource-agents, cluster-glue:
# the Pacemaker test runs a real three-node cluster (cluster-glue's
# stonith:null stands in for fencing hardware); resource-agents brings
# ocf-tester, which needs xmllint from libxml2-utils (only a Recommends);
# jq: the resource agent ocf:remus:vm reads `remus list --json` with it;
# shellcheck: the test command lints that agent.
base_pkgs=(iproute2 iputils-ping procps ca-certificates e2fsprogs cpio bc xz-utils
    etcd-server etcd-client protobuf-compiler libprotobuf-dev
    dosfstools fdisk mtools syslinux syslinux-common syslinux-efi ovmf debootstrap
    dpkg-dev gcc libc6-dev pkg-config prometheus
    corosync pacemaker pacemaker-cli-utils resource-agents cluster-glue libxml2-utils jq shellcheck)
missing=()
for p in "${base_pkgs[@]}"; do have_pkg "$p" || missing+=("$p"); done

if [ "${#missing[@]}" -gt 0 ] || ! qemu_ok || ! have_pkg qemu-utils; then
    need_update=1
fi

if [ "$need_update" = 1 ]; then
    log "apt-get update"
    apt-get update -qq
fi
if [ "${#missing[@]}" -gt 0 ]; then
    log "installing ${missing[*]}"
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
if ! qemu_ok || ! have_pkg qemu-utils; then
    log "installing QEMU from bookworm-backports"
    apt-get install -y -qq --no-install-recommends -t bookworm-backports \
        qemu-system-x86 qemu-utils >/dev/null
fi
qemu_ok || { log "QEMU >= 10 is required; found: $(qemu-system-x86_64 --version 2>&1 | head -n1)"; exit 1; }
log "ok: $(qemu-system-x86_64 --version | head -n1)"
