//! Checkpoint replication between two agents (Remus for QEMU).
//!
//! - [`primary`]: the epoch loop on the protected VM's host.
//! - [`backup`]: receive, verify, commit, ack; report a lost primary.
//! - [`replica`]: the backup's RAM replica and committed device state.
//! - `capture`: taking a VM's state (the checkpoint pause), shared by
//!   protection and migration.
//! - [`staging`]: copying guest pages into page runs.
//! - [`failover`]: resuming the standby from the last committed checkpoint.
//! - [`migrate`]: live migration (pre-copy), source side.
//! - [`pace`]: the rate cap of the bulk transfers (`--max-rate`).
//!
//! The wire format and handshake live in `remus-proto`.

pub mod backup;
mod capture;
pub mod copy;
pub mod disks;
pub mod failover;
pub mod migrate;
pub mod pace;
pub mod primary;
pub mod replica;
pub mod staging;

/// Replication errors, naming what failed.
#[derive(Debug, thiserror::Error)]
pub enum ReplError {
    /// A reason replication cannot start (no underlying error).
    #[error("cannot start replication: {0}")]
    Setup(String),
    #[error("cannot start replication: dirty-page tracking: {0}")]
    Tracker(#[source] remus_vm::VmError),
    #[error("dirty-page tracking lost ({0}); protection stops, the VM runs on unprotected")]
    TrackingLost(#[source] remus_dirty::DirtyError),
    #[error(
        "dirty pages {first}+{count} lie beyond the RAM file; protection stops, the VM runs on unprotected"
    )]
    PagesBeyondRam { first: u64, count: u64 },
    #[error("guest RAM: {0}")]
    Ram(#[source] remus_dirty::DirtyError),
    #[error("QMP {command}: {source}")]
    Qmp {
        command: &'static str,
        #[source]
        source: remus_qmp::QmpError,
    },
    #[error("device state ({what}): {source}")]
    DevState {
        what: &'static str,
        #[source]
        source: remus_vm::devstate::DevStateError,
    },
    #[error("disks: {what}: {source}")]
    Disk {
        what: &'static str,
        #[source]
        source: remus_disk::DiskError,
    },
    /// The agent's resume at a migration's switch-over failed, for this
    /// reason.
    #[error("resume at switch-over: {0}")]
    Resume(String),
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    #[error("peer lost: {0}")]
    PeerLost(String),
    /// A protection session's backup is gone (see [`primary::LostBackup`]).
    #[error("backup lost: {0}")]
    BackupLost(primary::LostBackup),
    #[error("protocol: {0}")]
    Protocol(String),
    /// A capped bulk copy stopped between two pieces because its session
    /// is ending (names the copy).
    #[error("{0} was given up: the session is ending")]
    GivenUp(&'static str),
    #[error(transparent)]
    Wire(#[from] remus_proto::WireError),
}

/// Microseconds since the Unix epoch (heartbeat timestamps).
pub(crate) fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}
