//! The initramfs layout and its `/init` script (busybox sh).
//!
//! The script is a constant: everything that varies with the inputs (the
//! module load order, the kernel release) is in data files next to it, so the
//! image cache key can be computed before the kernel package is extracted.
//!
//! Kernel command-line contract (read from /proc/cmdline):
//! * `remus.workload=ITEM[,ITEM...]` — each ITEM is a `remus-guest`
//!   subcommand with its arguments joined by `:` (`tick`,
//!   `disk-probe:/dev/vda`, `tick:--interval-ms:50`); default `tick`;
//!   `none` or empty: no workload. Parsed by `remus-guest start-workloads`.
//! * `remus.ip=ADDR/PREFIX` — if present, eth0 is brought up with that address;
//!   `remus.ip1=ADDR/PREFIX` likewise for eth1 (a second NIC).
//! * `console=ttyS0` — where everything (workload output, shell) goes.
//!
//! On the console: module load failures (`remus-init: insmod X failed`),
//! then exactly `remus-guest: init done`, then the workloads' output, then an
//! interactive shell (respawned if it exits).

use crate::cpio::Archive;
use crate::error::Result;
use crate::modinfo::Module;

/// Path of the guest binary inside the initramfs.
pub const GUEST_BIN_PATH: &str = "bin/remus-guest";
/// The line /init prints once modules, network and mounts are set up.
pub const INIT_DONE_LINE: &str = "remus-guest: init done";

pub const INIT_SCRIPT: &str = r#"#!/bin/busybox sh
# /init of the remus guest, written by remus-image (crates/remus-image/src/init.rs).
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin HOME=/root TERM=vt100 PS1='remus-guest# '
set -f
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev || echo "remus-init: mount devtmpfs failed"
mkdir -p /dev/pts && mount -t devpts devpts /dev/pts

# Modules in dependency order (derived from each module's .modinfo by remus-image).
while read -r m; do
    [ -n "$m" ] || continue
    insmod "/lib/modules/$m.ko" || echo "remus-init: insmod $m failed (continuing)"
done < /etc/remus/modules

ip link set lo up
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        remus.ip=*) dev=eth0 ipaddr="${arg#remus.ip=}" ;;
        remus.ip1=*) dev=eth1 ipaddr="${arg#remus.ip1=}" ;;
        *) continue ;;
    esac
    { ip link set "$dev" up && ip addr add "$ipaddr" dev "$dev"; } ||
        echo "remus-init: cannot configure $dev with $ipaddr"
done
hostname remus-guest

echo "remus-guest: init done"
remus-guest start-workloads || echo "remus-init: remus-guest start-workloads failed"

# Interactive shell on the console; setsid + cttyhack give it a controlling
# tty so Ctrl-C works. Respawned if it exits (PID 1 must never exit).
while :; do
    setsid cttyhack sh
    echo "remus-init: console shell exited; restarting"
    sleep 1
done
"#;

/// Inputs of the initramfs.
pub struct InitramfsInputs<'a> {
    pub busybox: &'a [u8],
    pub guest_bin: &'a [u8],
    pub modules: &'a [Module],
    /// Free text recorded in /etc/remus/image (kernel release, packages, recipe).
    pub image_info: &'a str,
}

/// Builds the initramfs archive (uncompressed newc; the kernel accepts it as is).
pub fn build_initramfs(inp: &InitramfsInputs<'_>) -> Result<Vec<u8>> {
    let mut a = Archive::new();
    a.file("init", 0o755, INIT_SCRIPT.as_bytes().to_vec())?;
    a.file("bin/busybox", 0o755, inp.busybox.to_vec())?;
    a.symlink("bin/sh", "busybox")?;
    a.file(GUEST_BIN_PATH, 0o755, inp.guest_bin.to_vec())?;
    for d in [
        "sbin", "usr/bin", "usr/sbin", "dev", "proc", "sys", "run", "tmp", "root",
    ] {
        a.dir(d, if d == "tmp" { 0o1777 } else { 0o755 })?;
    }
    // The kernel opens /dev/console for init before devtmpfs is mounted.
    a.char_dev("dev/console", 0o600, 5, 1)?;
    a.char_dev("dev/null", 0o666, 1, 3)?;
    let mut order = String::new();
    for m in inp.modules {
        a.file(
            &format!("lib/modules/{}.ko", m.info.name),
            0o644,
            m.data.clone(),
        )?;
        order.push_str(&m.info.name);
        order.push('\n');
    }
    a.file("etc/remus/modules", 0o644, order.into_bytes())?;
    a.file("etc/remus/image", 0o644, inp.image_info.as_bytes().to_vec())?;
    Ok(a.to_bytes())
}
