//! Resuming a standby from the last committed checkpoint.

use remus_vm::{Vm, devstate};

use crate::ReplError;
use crate::replica::Replica;

/// Timings of a failover.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FailoverStats {
    pub epoch: u64,
    pub load_ms: f64,
    pub cont_ms: f64,
    /// QEMU's timestamp of the VM's RESUME (µs since the Unix epoch, this
    /// host's clock), when seen.
    pub resumed_at_us: Option<u64>,
    /// QEMU started the VM itself as its load ended.
    pub started_by_load: bool,
}

/// Loads the committed device state into the standby QEMU (started with
/// `-incoming defer` on the replica, its migration capabilities set and
/// its incoming migration listening since it started or was adopted:
/// see `Vm::start`, `Vm::adopt`), resumes it and announces its MACs.
pub fn resume(standby: &Vm, replica: &Replica) -> Result<FailoverStats, ReplError> {
    resume_loading(standby, replica, None)
}

/// A load of the committed device state begun before the switch-over
/// ([`begin_load`]), for the epoch it was begun at.
pub struct EarlyLoad {
    epoch: remus_proto::Epoch,
    loading: devstate::Loading,
}

/// Begins loading the device state just committed at `epoch` into the
/// standby, its VM held stopped until [`resume_loading`] (a migration's
/// destination, between its commit of the last checkpoint and the
/// switch-over order). Only for a standby started for device-only state
/// (`-S`): see [`devstate::begin_load`].
///
/// `to`: the standby's incoming migration opened ahead
/// ([`devstate::connect_incoming`]), if it was.
pub fn begin_load(
    standby: &Vm,
    state: &std::path::Path,
    epoch: remus_proto::Epoch,
    to: Option<devstate::Incoming>,
) -> Result<EarlyLoad, ReplError> {
    held_stopped(standby)?;
    let loading = devstate::begin_load(standby.qmp(), state, &standby.paths.incoming_socket(), to)
        .map_err(load_failed)?;
    Ok(EarlyLoad { epoch, loading })
}

/// [`begin_load`] for the device state of `epoch` while it still arrives
/// (a migration's last checkpoint, streamed before its End): its bytes go
/// to the standby's QEMU as they are handed to the returned feed, which
/// is ended once the epoch has committed. [`resume_loading`] refuses a
/// load whose epoch did not commit.
pub fn begin_fed_load(
    standby: &Vm,
    epoch: remus_proto::Epoch,
    to: Option<devstate::Incoming>,
) -> Result<(EarlyLoad, devstate::Feed), ReplError> {
    held_stopped(standby)?;
    let (loading, feed) =
        devstate::begin_fed_load(standby.qmp(), &standby.paths.incoming_socket(), to)
            .map_err(load_failed)?;
    Ok((EarlyLoad { epoch, loading }, feed))
}

/// Only a standby started for device-only state (`-S`) keeps its VM
/// stopped after a load it took no `cont` for: see
/// [`devstate::begin_load`].
fn held_stopped(standby: &Vm) -> Result<(), ReplError> {
    if standby.devices_only_state() {
        Ok(())
    } else {
        Err(ReplError::Setup(
            "an early load needs a standby started for device-only state (-S)".into(),
        ))
    }
}

/// [`resume`], or, with `early`, runs the VM the early load holds, which
/// must be of the committed epoch (a later commit would pair its RAM with
/// older device state: refused, the VM is not run).
pub fn resume_loading(
    standby: &Vm,
    replica: &Replica,
    early: Option<EarlyLoad>,
) -> Result<FailoverStats, ReplError> {
    let epoch = replica
        .committed()
        .ok_or_else(|| ReplError::Setup("no committed checkpoint to resume from".into()))?;
    let loaded = match early {
        Some(e) if e.epoch != epoch => {
            return Err(ReplError::Protocol(format!(
                "the device state loaded early is of {} but {epoch} is committed: not resumed",
                e.epoch
            )));
        }
        Some(e) => e.loading.run(standby.qmp()).map_err(load_failed)?,
        None => devstate::load_and_run(
            standby.qmp(),
            replica.device_state_path(),
            &standby.paths.incoming_socket(),
        )
        .map_err(load_failed)?,
    };
    if !standby.config.vifs.is_empty() {
        standby.announce_in_background();
    }
    Ok(FailoverStats {
        epoch: epoch.0,
        load_ms: loaded.load_ms,
        cont_ms: loaded.cont_ms,
        resumed_at_us: loaded.resumed_at_us,
        started_by_load: loaded.started_by_load,
    })
}

fn load_failed(source: devstate::DevStateError) -> ReplError {
    ReplError::DevState {
        what: "load",
        source,
    }
}

/// What happened to the disks at a failover.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct DiskTakeover {
    /// Records (and their bytes) of epochs that never committed, dropped.
    pub discarded_records: u64,
    pub discarded_bytes: u64,
    /// Where each replicated disk now records its changed chunks.
    pub change_maps: Vec<std::path::PathBuf>,
}

/// Prepares the standby's disks for running the VM: drops what never
/// committed, makes what did durable, and from now on records which chunks
/// the VM changes, in a persistent map per replicated disk (in
/// `changes_dir`: `disk-TARGET.changed`), for a later resync. Call before
/// [`resume`].
pub fn take_over_disks(
    standby: &Vm,
    buffer: &mut remus_disk::EpochBuffer,
    changes_dir: &std::path::Path,
) -> Result<DiskTakeover, ReplError> {
    let (discarded_records, discarded_bytes) = buffer.discard();
    buffer.sync_all().map_err(|source| ReplError::Disk {
        what: "make the committed disk state durable",
        source,
    })?;
    let mut change_maps = Vec::new();
    std::fs::create_dir_all(changes_dir)
        .map_err(|e| ReplError::Io(format!("create {}", changes_dir.display()), e))?;
    for port in standby.replicated_disks() {
        let path = changes_dir.join(format!("disk-{}.changed", port.target()));
        let map =
            remus_disk::ChangeMap::open(&path, port.local().size(), remus_disk::sync::CHUNK_SIZE)
                .map_err(|e| ReplError::Io(format!("change map {}", path.display()), e))?;
        port.track_changes(std::sync::Arc::new(map));
        change_maps.push(path);
    }
    Ok(DiskTakeover {
        discarded_records,
        discarded_bytes,
        change_maps,
    })
}
