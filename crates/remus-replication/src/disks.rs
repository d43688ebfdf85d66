//! The primary's side of disk replication: attaching the VM's replicated
//! disks to a [`Journal`], the initial sync against the backup's chunk
//! digests, and the per-epoch seals the sender writes.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::Arc;
use std::time::Instant;

use remus_disk::sync::{CHUNK_SIZE, chunk_count, chunk_range, digest, is_zero, read_chunk};
use remus_disk::{ActivityLog, ChangeMap, DiskPort, Doorbell, Journal};
use remus_proto::{DiskDigests, DiskLogDigest, DiskOp, DiskRecord, DiskSeal, Epoch, Message};
use remus_vm::Vm;

pub use remus_api::{DiskSyncProgress, DiskSyncStats};

use crate::ReplError;

/// Queued guest data the journal holds before guest writes wait.
pub const JOURNAL_LIMIT: u64 = 64 << 20;

/// The replicated disks of a protected VM, journaling into one journal
/// (so all disks' records are in one order, and one epoch commits them
/// together). Dropping it closes the journal and puts the disks back to
/// local-only operation.
pub struct PrimaryDisks {
    pub journal: Arc<Journal>,
    pub ports: Vec<Arc<DiskPort>>,
}

impl PrimaryDisks {
    /// Starts journaling the VM's replicated disks (none when `replicate`
    /// is false: the journal then stays empty). Guest writes from now on
    /// belong to epoch 1, the first checkpoint; each rings `doorbell`.
    /// Journals the guest's writes from `first` on (epoch 1, or the one
    /// after a resumed checkpoint).
    pub fn start(vm: &Vm, replicate: bool, doorbell: Arc<Doorbell>, first: Epoch) -> PrimaryDisks {
        let journal = Arc::new(Journal::new(first, JOURNAL_LIMIT, doorbell));
        let ports = if replicate {
            vm.replicated_disks()
        } else {
            Vec::new()
        };
        for (i, p) in ports.iter().enumerate() {
            p.journal_to(journal.clone(), i as u16);
        }
        PrimaryDisks { journal, ports }
    }

    pub fn active(&self) -> bool {
        !self.ports.is_empty()
    }
}

impl Drop for PrimaryDisks {
    fn drop(&mut self) {
        self.journal.close();
        for p in &self.ports {
            p.plain();
        }
    }
}

/// The chunk runs of each replicated disk a sync compares: every chunk
/// (`None`), or only the given runs (a resync of changed chunks).
pub fn sync_runs(disks: &PrimaryDisks, only: Option<&[Vec<(u64, u64)>]>) -> Vec<Vec<(u64, u64)>> {
    disks
        .ports
        .iter()
        .enumerate()
        .map(|(i, p)| match only {
            Some(r) => r.get(i).cloned().unwrap_or_default(),
            None => {
                let n = chunk_count(p.local().size());
                if n == 0 { Vec::new() } else { vec![(0, n)] }
            }
        })
        .collect()
}

/// The chunks of a disk of `size` bytes that a copy's change records
/// mark (its activity log, per extent; its change map, per chunk), with
/// `extra`, as runs. Both sides of a resync read their records with it.
pub fn record_runs(
    al: Option<&ActivityLog>,
    map: Option<&ChangeMap>,
    extra: &[(u64, u64)],
    size: u64,
) -> Vec<(u64, u64)> {
    let total = chunk_count(size);
    let mut chunks: Vec<u64> = map.map(ChangeMap::marked_chunks).unwrap_or_default();
    if let Some(al) = al {
        chunks.extend(al.marked_chunks(CHUNK_SIZE));
    }
    chunks.retain(|&c| c < total);
    // The peer's runs are merged as intervals, clipped to the disk, never
    // expanded into chunk numbers (one run may name billions).
    let mut runs = crate::copy::to_runs(chunks);
    runs.extend(
        extra
            .iter()
            .filter(|r| r.0 < total)
            .map(|&(f, n)| (f, n.min(total - f))),
    );
    crate::copy::union_runs(runs)
}

/// The chunks each replicated disk's own change records mark, with
/// `extra` (the backup's), as runs of at most [`crate::copy::MAX_RUNS`].
pub fn changed_runs(disks: &PrimaryDisks, extra: &[Vec<(u64, u64)>]) -> Vec<Vec<(u64, u64)>> {
    disks
        .ports
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let runs = record_runs(
                p.activity_log().as_deref(),
                p.change_map().as_deref(),
                extra.get(i).map(Vec::as_slice).unwrap_or_default(),
                p.local().size(),
            );
            crate::copy::coalesce(runs, crate::copy::MAX_RUNS)
        })
        .collect()
}

/// Compares the chunks `runs` names on every replicated disk (per disk,
/// ascending) against the backup's digests of them (one [`DiskDigests`]
/// at a time from `next`) and hands a record for each differing chunk to
/// `emit` (epoch 0: applied by the backup on arrival).
pub fn initial_sync(
    disks: &PrimaryDisks,
    mode: remus_api::SyncMode,
    runs: &[Vec<(u64, u64)>],
    next: &mut dyn FnMut() -> Result<DiskDigests, ReplError>,
    emit: &mut dyn FnMut(DiskRecord) -> Result<(), ReplError>,
    progress: &mut dyn FnMut(DiskSyncProgress),
) -> Result<DiskSyncStats, ReplError> {
    let t = Instant::now();
    let mut st = DiskSyncStats {
        disks: disks.ports.len() as u64,
        mode,
        chunk_size: CHUNK_SIZE,
        ..Default::default()
    };
    let mut buf = Vec::with_capacity(CHUNK_SIZE as usize);
    for (i, port) in disks.ports.iter().enumerate() {
        let local = port.local();
        let size = local.size();
        let total = chunk_count(size);
        let disk_runs = runs.get(i).map(Vec::as_slice).unwrap_or_default();
        let planned = crate::copy::run_chunks(disk_runs);
        st.disk_chunks += total;
        st.chunks += planned;
        let mut done = 0u64;
        for &(first, count) in disk_runs {
            let end = first + count;
            if end > total {
                return Err(ReplError::Protocol(format!(
                    "sync runs reach chunk {end} beyond the end of disk {} ({total} chunks)",
                    port.target()
                )));
            }
            let mut covered = first;
            while covered < end {
                let d = next()?;
                if d.disk as usize != i || d.first_chunk != covered || d.chunk_size != CHUNK_SIZE {
                    return Err(ReplError::Protocol(format!(
                        "backup sent digests for disk {} from chunk {} ({} bytes each); expected disk {i} from chunk {covered} ({CHUNK_SIZE})",
                        d.disk, d.first_chunk, d.chunk_size
                    )));
                }
                if covered + d.digests.len() as u64 > end {
                    return Err(ReplError::Protocol(format!(
                        "backup sent digests beyond the planned chunks of disk {}",
                        port.target()
                    )));
                }
                for (k, theirs) in d.digests.iter().enumerate() {
                    let chunk = covered + k as u64;
                    let data = read_chunk(&**local, chunk, &mut buf).map_err(|e| {
                        ReplError::Io(format!("read disk {} chunk {chunk}", port.target()), e)
                    })?;
                    if digest(data) == *theirs {
                        continue;
                    }
                    st.differing_chunks += 1;
                    let (offset, len) = chunk_range(size, chunk);
                    let op = if is_zero(data) {
                        st.zeroed_chunks += 1;
                        DiskOp::Zero {
                            offset,
                            len: len as u64,
                            trim: true,
                            fua: false,
                        }
                    } else {
                        st.sent_bytes += len as u64;
                        DiskOp::Write {
                            offset,
                            fua: false,
                            data: data.to_vec(),
                        }
                    };
                    emit(DiskRecord {
                        epoch: Epoch(0),
                        disk: i as u16,
                        op,
                    })?;
                }
                covered += d.digests.len() as u64;
                done += d.digests.len() as u64;
                progress(DiskSyncProgress {
                    disk: port.target().to_string(),
                    compared_bytes: (done * u64::from(CHUNK_SIZE)).min(size),
                    disk_bytes: (planned * u64::from(CHUNK_SIZE)).min(size),
                    differing_chunks: st.differing_chunks,
                    sent_bytes: st.sent_bytes,
                });
            }
        }
    }
    st.ms = t.elapsed().as_secs_f64() * 1e3;
    Ok(st)
}

/// The sender's per-epoch digests of the disk records it wrote, turned
/// into the seal that precedes each checkpoint.
#[derive(Default)]
pub struct Sealer {
    open: BTreeMap<u64, DiskLogDigest>,
}

impl Sealer {
    /// Writes `records` in order; returns the data bytes they carry.
    pub fn write_records(
        &mut self,
        w: &mut impl Write,
        records: &[DiskRecord],
    ) -> Result<u64, ReplError> {
        let mut bytes = 0;
        for r in records {
            r.write_to(w)?;
            self.open.entry(r.epoch.0).or_default().add(r);
            bytes += r.data_len();
        }
        Ok(bytes)
    }

    /// Writes the seal of `epoch` (every record of it must have been
    /// written) and returns it.
    pub fn seal(&mut self, w: &mut impl Write, epoch: Epoch) -> Result<DiskSeal, ReplError> {
        let seal = self.open.remove(&epoch.0).unwrap_or_default().seal(epoch);
        if let Some((&e, _)) = self.open.range(..epoch.0).next() {
            return Err(ReplError::Protocol(format!(
                "disk records of epoch {e} were never sealed before {epoch}"
            )));
        }
        Message::DiskSeal(seal.clone()).write_to(w)?;
        Ok(seal)
    }
}
