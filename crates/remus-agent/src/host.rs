//! What this host must offer before the agent starts, checked once at
//! start (and by `remusd --check`): a kernel with `PAGEMAP_SCAN`, QEMU 10
//! or newer, the dirty-tracking preload library, and (optional) a KVM
//! that really runs a 64-bit guest.

use std::path::{Path, PathBuf};

/// The oldest kernel with `PAGEMAP_SCAN` and async userfaultfd
/// write-protect, on which dirty-page tracking rests.
pub const MIN_KERNEL: &str = "6.7";

/// The running kernel's release (`uname -r`).
pub fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// Whether the kernel can track dirty pages; the error says what to
/// install.
pub fn check_kernel() -> Result<String, String> {
    let release = kernel_release();
    match remus_dirty::kernel_has_pagemap_scan() {
        Ok(()) => Ok(format!("Linux {release} has PAGEMAP_SCAN")),
        Err(why) => Err(format!(
            "Linux {release} cannot track a VM's dirty pages: {why}. remus needs Linux {MIN_KERNEL} or newer \
             (PAGEMAP_SCAN and async userfaultfd write-protect). Debian 12: install the backports kernel \
             (apt-get install -t bookworm-backports linux-image-amd64) and reboot; Debian 13, Ubuntu 24.04 \
             and RHEL 10 kernels have it"
        )),
    }
}

/// The preload library QEMU is started with: `given`, else found where a
/// build or the package puts it. When the agent runs as root, the file
/// and its directory must belong to root and be writable by nobody else:
/// whoever can replace it runs code in every QEMU, as root.
pub fn find_preload(given: Option<&Path>) -> Result<PathBuf, String> {
    let path = match given {
        Some(p) => {
            if !p.is_file() {
                return Err(format!("--preload {}: no such file", p.display()));
            }
            p.to_path_buf()
        }
        None => remus_dirty::preload_path().ok_or_else(|| {
            format!(
                "the dirty-tracking library {} was not found next to remusd, in a cargo target \
                 directory, or in {}: give --preload PATH (a build makes it with \
                 `cargo build --release -p remus-dirty-preload`)",
                remus_dirty::PRELOAD_FILE_NAME,
                remus_dirty::PRELOAD_INSTALL_DIR
            )
        })?,
    };
    let path = std::fs::canonicalize(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        for p in [Some(path.as_path()), path.parent()].into_iter().flatten() {
            owned_by_root_only(p)?;
        }
    }
    Ok(path)
}

fn owned_by_root_only(p: &Path) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(p).map_err(|e| format!("{}: {e}", p.display()))?;
    if m.uid() != 0 || m.mode() & 0o022 != 0 {
        return Err(format!(
            "{} is owned by uid {} with mode {:o}: the preload runs inside every QEMU as root, so it and its \
             directory must belong to root and be writable by nobody else",
            p.display(),
            m.uid(),
            m.mode() & 0o7777
        ));
    }
    Ok(())
}
