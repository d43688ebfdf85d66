//! Dirty-page tracking for QEMU guest RAM, agent side (DESIGN.md §3.2).
//!
//! Job: tell the primary's agent which pages of the guest RAM file QEMU
//! wrote since the last look, so that a checkpoint carries only those.
//!
//! How: QEMU runs with `LD_PRELOAD=libremus_dirty_preload.so` and
//! [`TRACK_PATH_ENV`] naming its RAM file (a `memory-backend-file` with
//! `share=on` on tmpfs). The preload write-protects QEMU's mapping of that
//! file with userfaultfd in async mode; the kernel then marks each page on
//! its first write. [`DirtyTracker::scan`] collects the written pages with
//! `PAGEMAP_SCAN` on `/proc/<qemu>/pagemap` and re-protects them in the same
//! atomic step. [`RamFile`] reads page contents from the file itself (never
//! through a mapping, which would allocate holes).
//!
//! Boundaries:
//! - This crate only finds and reads pages; shipping them, epochs and the
//!   pause are the replication code's business.
//! - Tracking must be confirmed with [`DirtyTracker::verify_tracking`]
//!   before a VM is called protected; the preload only logs its failures.
//! - Any scan error means pages may have been missed: it is reported as
//!   [`DirtyError::TrackingLost`] and the caller must resend all of RAM.
//! - Writes that do not fault are invisible: `pwrite()` to the RAM file,
//!   writes by other processes (vhost-user). Pages removed from the file
//!   (`fallocate(PUNCH_HOLE)`, `madvise(MADV_REMOVE)`, e.g. by a balloon)
//!   are made visible by the preload's hooks on those libc calls.
//! - Other QEMU RAM blocks (ROMs, ACPI tables) are not in the file; they
//!   travel with device state.
//! - The scanner needs ptrace-read rights on QEMU (root or same user).

mod error;
mod maps;
mod preload;
mod ram_file;
mod range;
mod scan;

pub use error::DirtyError;
pub use preload::{
    INSTALL_DIR as PRELOAD_INSTALL_DIR, PRELOAD_FILE_NAME, TRACK_PATH_ENV, preload_env,
    preload_path,
};
pub use ram_file::{DataRanges, RamFile};
pub use range::{DirtySet, PageRange};
pub use scan::{DirtyTracker, kernel_has_pagemap_scan};

/// The system page size in bytes: the unit of tracking.
pub fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
        size if size > 0 => size as u64,
        _ => 4096,
    }
}

/// The preload's userfaultfd set-up, compiled into the tests so that they
/// exercise the code that runs inside QEMU.
#[cfg(test)]
#[path = "../../remus-dirty-preload/src/uffd.rs"]
mod uffd;
