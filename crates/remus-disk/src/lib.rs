//! Disk replication for remus (DRBD's protocol D, as block-remus did it).
//!
//! - [`port`]: [`DiskPort`], the block backend the agent's NBD server
//!   drives for each VM disk. It applies every write locally and, while
//!   protected, hands a copy to the [`Journal`]; after a failover it
//!   records which blocks change in a [`ChangeMap`].
//! - [`journal`]: the primary's ordered queue of disk records, each tagged
//!   with the epoch whose checkpoint will contain it.
//! - [`epochs`]: the backup's [`EpochBuffer`]: records held per epoch (in
//!   memory up to a bound, then in a spill file), applied only when their
//!   checkpoint commits, discarded otherwise.
//! - [`sync`]: chunk digests for the initial synchronisation.
//! - [`changes`]: the persistent bitmap of blocks changed since failover.
//! - [`activity`]: the primary's activity log, the extents that may hold
//!   writes its backup has not acknowledged.
//!
//! # The epoch boundary
//!
//! A write belongs to the epoch in which QEMU sent it. QEMU's `stop`
//! drains all block I/O before it returns (and then flushes), so once the
//! checkpoint has stopped the guest no request is in flight: every write
//! the guest has seen complete is in the epoch being closed, and the
//! checkpoint's device state (virtio rings included) agrees with exactly
//! those writes. [`Journal::cut`] is called right there, while the guest
//! is stopped.

pub mod activity;
pub mod changes;
pub mod epochs;
pub mod journal;
pub mod port;
pub mod sync;

pub use activity::ActivityLog;
pub use changes::ChangeMap;
pub use epochs::{ApplyStats, EpochBuffer};
pub use journal::{Doorbell, Journal};
pub use port::DiskPort;

/// Disk replication errors, naming the disk, epoch and range involved.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// The peer sent something the protocol does not allow: nothing of it
    /// was applied.
    #[error("disk protocol: {0}")]
    Protocol(String),
    /// A bound on what this host holds for uncommitted epochs was reached:
    /// nothing of the record was kept.
    #[error("backup buffer limit: {0}")]
    Limit(String),
    /// Local I/O failed (the disk is full, unwritable, ...).
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

impl DiskError {
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> DiskError {
        let what = what.into();
        move |source| DiskError::Io { what, source }
    }
}
