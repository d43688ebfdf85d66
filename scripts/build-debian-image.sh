#!/usr/bin/env bash
# Builds a real Debian 12 VM image for tests and the bench:
# target/debian-image/debian.qcow2 (2 GiB virtual), booted by SeaBIOS
# through syslinux from its first partition (FAT: kernel, initrd,
# syslinux.cfg), root filesystem ext4 on its second partition, systemd,
# Debian's cloud kernel, and one service started at boot: remus-guest's
# seqserver on TCP port 7000 (the same protocol the tests' client speaks),
# with the address on the kernel command line in syslinux.cfg
# (remus.ip=198.18.0.10/24, the tests' VM address).
#
# Nothing is mounted and no loop device is used: debootstrap fills a
# directory, mke2fs -d copies it into the partition, mtools fill the FAT.
# Packages come from this machine's own apt source (the first one that
# serves bookworm main, as apt-get indextargets lists it). The result is
# cached: it is rebuilt only when this recipe or the guest binary change.
# Needs root; about 5 minutes and 1.5 GiB of disk the first time.
set -euo pipefail
cd "$(dirname "$0")/.."
log() { echo "build-debian-image: $*" >&2; }
# mtools would warn that the FAT is smaller than the whole disk file.
export MTOOLS_SKIP_CHECK=1
[ "$(id -u)" = 0 ] || { log "must run as root (debootstrap)"; exit 1; }

OUT=${REMUS_DEBIAN_IMAGE:-target/debian-image}
GUEST=target/guest-build/x86_64-unknown-linux-gnu/release/remus-guest
[ -x "$GUEST" ] || bash scripts/build-guest.sh --quiet
[ -x "$GUEST" ] || { log "no static guest binary at $GUEST"; exit 1; }

key=$( (cat "$0"; sha256sum "$GUEST") | sha256sum | cut -d' ' -f1)
if [ -f "$OUT/debian.qcow2" ] && [ "$(cat "$OUT/recipe" 2>/dev/null)" = "$key" ]; then
    log "up to date: $OUT/debian.qcow2"
    exit 0
fi

for p in debootstrap dosfstools fdisk mtools syslinux syslinux-common e2fsprogs qemu-utils; do
    dpkg -s "$p" >/dev/null 2>&1 || need="${need:-} $p"
done
if [ -n "${need:-}" ]; then
    log "installing$need"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $need >/dev/null
fi

mirror=$(apt-get indextargets --format '$(REPO_URI) $(RELEASE) $(COMPONENT) $(IDENTIFIER)' \
    | awk '$2 == "bookworm" && $3 == "main" && $4 == "Packages" { print $1; exit }')
[ -n "$mirror" ] || { log "no apt source serves bookworm main on this machine"; exit 1; }

work=$(mktemp -d "${TMPDIR:-/tmp}/remus-debian.XXXXXX")
trap 'rm -rf "$work"' EXIT
root=$work/root
log "debootstrap bookworm from this machine's apt source (a few minutes)"
debootstrap --variant=minbase \
    --include=linux-image-cloud-amd64,initramfs-tools,systemd-sysv,udev,iproute2,e2fsprogs,procps \
    bookworm "$root" "$mirror" >"$work/debootstrap.log" 2>&1 \
    || { tail -20 "$work/debootstrap.log" >&2; exit 1; }

# The system: a root on vda2, a serial console, no password on root (a
# test VM on an isolated LAN), the network from the command line, the
# service.
echo remus-debian >"$root/etc/hostname"
printf '/dev/vda2 / ext4 errors=remount-ro 0 1\n' >"$root/etc/fstab"
chroot "$root" passwd -d root >/dev/null
install -m 0755 "$GUEST" "$root/usr/local/bin/remus-guest"
cat >"$root/usr/local/sbin/remus-net" <<'EOF'
#!/bin/sh
# Brings eth0 up with the address of remus.ip=A/N on the kernel command line.
ip link set lo up
ip link set eth0 up
for w in $(cat /proc/cmdline); do
    case "$w" in remus.ip=*) ip addr add "${w#remus.ip=}" dev eth0 ;; esac
done
EOF
chmod 0755 "$root/usr/local/sbin/remus-net"
cat >"$root/etc/systemd/system/remus-net.service" <<'EOF'
[Unit]
Description=remus test network (remus.ip= on the kernel command line)
Before=network.target
[Service]
Type=oneshot
ExecStart=/usr/local/sbin/remus-net
RemainAfterExit=yes
[Install]
WantedBy=multi-user.target
EOF
cat >"$root/etc/systemd/system/remus-seqserver.service" <<'EOF'
[Unit]
Description=remus sequence server (TCP 7000)
After=remus-net.service
Wants=remus-net.service
[Service]
ExecStart=/usr/local/bin/remus-guest seqserver
StandardOutput=journal+console
StandardError=journal+console
Restart=always
[Install]
WantedBy=multi-user.target
EOF
chroot "$root" systemctl enable remus-net.service remus-seqserver.service >/dev/null 2>&1
# A smaller image: no package lists or caches.
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*

kernel=$(ls "$root"/boot/vmlinuz-* | head -n1)
initrd=$(ls "$root"/boot/initrd.img-* | head -n1)
[ -f "$kernel" ] && [ -f "$initrd" ] || { log "no kernel or initrd in the image"; exit 1; }

# The disk: 2 GiB; p1 FAT16 64 MiB from 1 MiB (boot), p2 ext4 after it.
raw=$work/debian.raw
truncate -s 2G "$raw"
printf 'label: dos\nstart=2048, size=131072, type=6, bootable\nstart=133120, type=83\n' \
    | sfdisk --quiet "$raw"
mkfs.fat -F 16 -n REMUSBOOT --offset 2048 "$raw" 65536 >/dev/null
cat >"$work/syslinux.cfg" <<'EOF'
SERIAL 0 115200
DEFAULT debian
TIMEOUT 0
LABEL debian
  KERNEL /vmlinuz
  INITRD /initrd.img
  APPEND root=/dev/vda2 ro console=ttyS0 net.ifnames=0 quiet remus.ip=198.18.0.10/24
EOF
mcopy -i "$raw@@1M" "$kernel" ::/vmlinuz
mcopy -i "$raw@@1M" "$initrd" ::/initrd.img
mcopy -i "$raw@@1M" "$work/syslinux.cfg" ::/syslinux.cfg
syslinux --install --offset $((1 << 20)) "$raw"
dd if=/usr/lib/syslinux/mbr/mbr.bin of="$raw" bs=440 count=1 conv=notrunc status=none
root_kib=$(( (2048 - 65) * 1024 ))
mke2fs -q -t ext4 -L remus-root -E offset=$((133120 * 512)) -d "$root" "$raw" "${root_kib}k"

mkdir -p "$OUT"
qemu-img convert -O qcow2 "$raw" "$OUT/debian.qcow2.new"
mv "$OUT/debian.qcow2.new" "$OUT/debian.qcow2"
echo "$key" >"$OUT/recipe"
log "built $OUT/debian.qcow2 ($(du -h "$OUT/debian.qcow2" | cut -f1) on disk; kernel $(basename "$kernel"))"
