//! The tracker's one error type: each variant names the QEMU process or file
//! concerned and, for tracking failures, what the operator should do.

use std::io;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum DirtyError {
    #[error("cannot read {path}: {source}")]
    Proc { path: PathBuf, source: io::Error },

    #[error("RAM file {path}: {op} failed: {source}")]
    RamFile {
        path: PathBuf,
        op: &'static str,
        source: io::Error,
    },

    #[error("RAM file {path} is not mapped shared by QEMU pid {pid}")]
    NotMapped { pid: u32, path: PathBuf },

    /// Tracking was never turned on (or not over all of RAM): the VM cannot
    /// be protected incrementally. See QEMU's stderr for the preload's line.
    #[error("dirty tracking is not active in QEMU pid {pid}: {reason}")]
    NotTracking { pid: u32, reason: String },

    /// A scan failed: pages written since the last good scan may be unknown.
    #[error(
        "dirty tracking lost in QEMU pid {pid}: PAGEMAP_SCAN of {start:#x}..{end:#x} failed: \
         {source}; resync all of guest RAM"
    )]
    TrackingLost {
        pid: u32,
        start: u64,
        end: u64,
        source: io::Error,
    },
}

impl DirtyError {
    /// True if the caller must fall back to copying all of guest RAM.
    pub fn is_tracking_lost(&self) -> bool {
        matches!(self, DirtyError::TrackingLost { .. })
    }
}
