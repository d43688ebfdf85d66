//! The primary's side of disk replication: attaching the VM's replicated
//! disks to a [`Journal`], the initial sync against the backup's chunk
//! digests, and the per-epoch seals the sender writes.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::Arc;
use std::time::Instant;

use remus_disk::sync::{CHUNK_SIZE, chunk_count, chunk_range, digest, is_zero, read_chunk};
use remus_disk::{DiskPort, Journal};
use remus_proto::{DiskDigests, DiskLogDigest, DiskOp, DiskRecord, DiskSeal, Epoch, Message};
use remus_vm::Vm;

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
    /// is false; the journal then only wakes the sender). Guest writes
    /// from now on belong to epoch 1, the first checkpoint.
    pub fn start(vm: &Vm, replicate: bool) -> PrimaryDisks {
        let journal = Arc::new(Journal::new(Epoch(1), JOURNAL_LIMIT));
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

/// Progress of the initial disk sync, per digest frame.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DiskSyncProgress {
    pub disk: String,
    /// Bytes of this disk compared so far, and its size.
    pub compared_bytes: u64,
    pub disk_bytes: u64,
    /// Over all disks so far: chunks that differed, bytes sent for them.
    pub differing_chunks: u64,
    pub sent_bytes: u64,
}

/// What the initial disk sync did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct DiskSyncStats {
    pub disks: u64,
    pub chunks: u64,
    pub chunk_size: u32,
    pub differing_chunks: u64,
    /// Data bytes sent (zeroed chunks send none).
    pub sent_bytes: u64,
    /// Differing chunks that were all zero here, sent as a zeroing.
    pub zeroed_chunks: u64,
    pub ms: f64,
}

/// Compares every replicated disk against the backup's digests (one
/// [`DiskDigests`] at a time from `next`) and hands a record for each
/// differing chunk to `emit` (epoch 0: applied by the backup on arrival).
pub fn initial_sync(
    disks: &PrimaryDisks,
    next: &mut dyn FnMut() -> Result<DiskDigests, ReplError>,
    emit: &mut dyn FnMut(DiskRecord) -> Result<(), ReplError>,
    progress: &mut dyn FnMut(DiskSyncProgress),
) -> Result<DiskSyncStats, ReplError> {
    let t = Instant::now();
    let mut st = DiskSyncStats {
        disks: disks.ports.len() as u64,
        chunk_size: CHUNK_SIZE,
        ..Default::default()
    };
    let mut buf = Vec::with_capacity(CHUNK_SIZE as usize);
    for (i, port) in disks.ports.iter().enumerate() {
        let local = port.local();
        let size = local.size();
        let total = chunk_count(size);
        st.chunks += total;
        let mut covered = 0u64;
        while covered < total {
            let d = next()?;
            if d.disk as usize != i || d.first_chunk != covered || d.chunk_size != CHUNK_SIZE {
                return Err(ReplError::Protocol(format!(
                    "backup sent digests for disk {} from chunk {} ({} bytes each); expected disk {i} from chunk {covered} ({CHUNK_SIZE})",
                    d.disk, d.first_chunk, d.chunk_size
                )));
            }
            if covered + d.digests.len() as u64 > total {
                return Err(ReplError::Protocol(format!(
                    "backup sent digests beyond the end of disk {}",
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
            progress(DiskSyncProgress {
                disk: port.target().to_string(),
                compared_bytes: (covered * u64::from(CHUNK_SIZE)).min(size),
                disk_bytes: size,
                differing_chunks: st.differing_chunks,
                sent_bytes: st.sent_bytes,
            });
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
