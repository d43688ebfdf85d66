//! The backup's [`EpochBuffer`]: disk records held per epoch and applied
//! only when their epoch's checkpoint commits (protocol D).
//!
//! - Epoch 0 is the initial sync: applied on arrival (nothing resumable
//!   exists yet to spoil), refused once anything has committed.
//! - Any other epoch is buffered: in memory up to a bound, then appended to
//!   a spill file. A seal (counts and digest) must close an epoch before
//!   its checkpoint may commit; [`commit`](EpochBuffer::commit) then
//!   applies its records in the order the primary applied them.
//! - A record for an epoch that has already committed, a record after its
//!   epoch's seal, an unknown disk or a range beyond the disk is a protocol
//!   error: nothing of it is applied.
//! - [`discard`](EpochBuffer::discard) drops everything uncommitted (a
//!   failover resumes from the last commit; later epochs never happened).
//! - Bounded, whatever the primary sends: at most `spill_limit` bytes of
//!   uncommitted data in the spill file (committed epochs' space is given
//!   back as they commit, also while later epochs are pending), [`MAX_PENDING_RECORDS`] records and
//!   [`MAX_OPEN_EPOCHS`] epochs waiting for their commit. Past a bound the
//!   record is refused with [`DiskError::Limit`]: the session ends, and
//!   what committed last stays as it is (nothing uncommitted is applied).
//!
//! Durability: when a committed epoch contains a flush or a FUA write, the
//! disks it touched are synced (fdatasync) before `commit` returns, that is
//! before the backup acks the epoch; since network output is released only
//! on that ack, no client can learn of a flush that is not durable on both
//! hosts. Epochs without one are applied to the page cache, like a disk
//! with a volatile write cache. (QEMU flushes its disks at every `stop`, so
//! in practice every epoch that wrote anything is synced.)

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use remus_nbd::BlockBackend;
use remus_proto::{DiskLogDigest, DiskOp, DiskRecord, DiskSeal, Epoch};

use crate::DiskError;

enum Item {
    Mem(DiskRecord),
    /// A write whose data lies in the spill file at `at` (`len` bytes);
    /// the record's own data is empty.
    Spilled {
        rec: DiskRecord,
        at: u64,
        len: usize,
    },
}

#[derive(Default)]
struct Pending {
    items: Vec<Item>,
    digest: DiskLogDigest,
    sealed: bool,
}

/// What one commit applied.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ApplyStats {
    pub records: u64,
    /// Bytes written or zeroed.
    pub bytes: u64,
    /// Whether the disks were synced before returning.
    pub synced: bool,
}

/// Records of uncommitted epochs held at once (memory for their
/// headers, even when their data is in the spill file).
pub const MAX_PENDING_RECORDS: usize = 1 << 20;
/// Epochs with records waiting for their commit at once (the primary has
/// one or two in flight).
pub const MAX_OPEN_EPOCHS: usize = 64;
/// The spill file's default bound.
pub const DEFAULT_SPILL_LIMIT: u64 = 8 << 30;

/// See the module documentation.
pub struct EpochBuffer {
    spill_limit: u64,
    pending_records: usize,
    disks: Vec<Arc<dyn BlockBackend>>,
    names: Vec<String>,
    mem_limit: u64,
    mem_used: u64,
    spill_path: PathBuf,
    spill: Option<File>,
    /// Spilled data of uncommitted epochs lies in `spill_start..spill_end`
    /// of the file; what lies before was committed or discarded, and its
    /// blocks are given back (a hole is punched), so under steady writes
    /// the file's blocks follow the live data while its offsets grow.
    spill_start: u64,
    spill_end: u64,
    pending: BTreeMap<u64, Pending>,
    sync: DiskLogDigest,
    sync_wrote: bool,
    sync_sealed: bool,
    /// Bytes ever spilled (for logs and tests).
    spilled_total: u64,
}

impl EpochBuffer {
    /// A buffer applying to `disks` (replicated disk number = index; with
    /// their names for messages), holding up to `mem_limit` bytes of write
    /// data in memory and the rest in `spill_path`.
    pub fn new(
        disks: Vec<(String, Arc<dyn BlockBackend>)>,
        mem_limit: u64,
        spill_path: &Path,
    ) -> EpochBuffer {
        Self::with_spill_limit(disks, mem_limit, spill_path, DEFAULT_SPILL_LIMIT)
    }

    /// [`new`](Self::new) with the spill file bounded to `spill_limit`
    /// bytes.
    pub fn with_spill_limit(
        disks: Vec<(String, Arc<dyn BlockBackend>)>,
        mem_limit: u64,
        spill_path: &Path,
        spill_limit: u64,
    ) -> EpochBuffer {
        let (names, disks) = disks.into_iter().unzip();
        EpochBuffer {
            spill_limit,
            pending_records: 0,
            disks,
            names,
            mem_limit,
            mem_used: 0,
            spill_path: spill_path.to_path_buf(),
            spill: None,
            spill_start: 0,
            spill_end: 0,
            pending: BTreeMap::new(),
            sync: DiskLogDigest::default(),
            sync_wrote: false,
            sync_sealed: false,
            spilled_total: 0,
        }
    }

    /// Whether the initial sync's seal (epoch 0) has arrived and matched.
    pub fn sync_sealed(&self) -> bool {
        self.sync_sealed
    }

    /// Number of replicated disks.
    pub fn disk_count(&self) -> usize {
        self.disks.len()
    }

    /// Replicated disk `i`.
    pub fn disk(&self, i: usize) -> Option<&Arc<dyn BlockBackend>> {
        self.disks.get(i)
    }

    /// Write data bytes buffered (memory and spill) for uncommitted epochs.
    pub fn pending_bytes(&self) -> u64 {
        self.pending.values().map(|p| p.digest.bytes).sum()
    }

    /// Bytes ever written to the spill file.
    pub fn spilled_total(&self) -> u64 {
        self.spilled_total
    }

    fn name(&self, disk: u16) -> &str {
        self.names.get(disk as usize).map_or("?", String::as_str)
    }

    /// Checks the record's disk and range.
    fn check(&self, r: &DiskRecord) -> Result<(), DiskError> {
        let Some(d) = self.disks.get(r.disk as usize) else {
            return Err(DiskError::Protocol(format!(
                "{:?} for replicated disk {}, but this VM has {}",
                r.op,
                r.disk,
                self.disks.len()
            )));
        };
        let (off, len) = match &r.op {
            DiskOp::Write { offset, data, .. } => (*offset, data.len() as u64),
            DiskOp::Zero { offset, len, .. } => (*offset, *len),
            DiskOp::Flush => return Ok(()),
        };
        if off.checked_add(len).is_none_or(|end| end > d.size()) {
            return Err(DiskError::Protocol(format!(
                "{} at {off}+{len} is beyond disk {} ({} bytes)",
                match r.op {
                    DiskOp::Write { .. } => "write",
                    _ => "zeroing",
                },
                self.name(r.disk),
                d.size()
            )));
        }
        Ok(())
    }

    /// Takes one record from the primary. `committed` is the last epoch
    /// whose checkpoint committed here.
    pub fn accept(&mut self, rec: DiskRecord, committed: Option<Epoch>) -> Result<(), DiskError> {
        self.check(&rec)?;
        if rec.epoch.0 == 0 {
            if let Some(c) = committed {
                return Err(DiskError::Protocol(format!(
                    "initial-sync data after {c} committed: refused"
                )));
            }
            if self.sync_sealed {
                return Err(DiskError::Protocol(
                    "initial-sync data after the initial sync was sealed".into(),
                ));
            }
            self.sync.add(&rec);
            self.sync_wrote = true;
            return self.apply_one(&rec, None).map(|_| ());
        }
        if let Some(c) = committed
            && rec.epoch <= c
        {
            return Err(DiskError::Protocol(format!(
                "a disk record for {}, which has already committed (last committed: {c}): refused, nothing applied",
                rec.epoch
            )));
        }
        if self.pending_records >= MAX_PENDING_RECORDS {
            return Err(DiskError::Limit(format!(
                "{MAX_PENDING_RECORDS} disk records of uncommitted epochs are held here already"
            )));
        }
        if !self.pending.contains_key(&rec.epoch.0) && self.pending.len() >= MAX_OPEN_EPOCHS {
            return Err(DiskError::Limit(format!(
                "records for {MAX_OPEN_EPOCHS} uncommitted epochs are held here already (the primary sent {} ahead)",
                rec.epoch
            )));
        }
        let p = self.pending.entry(rec.epoch.0).or_default();
        if p.sealed {
            return Err(DiskError::Protocol(format!(
                "a disk record for {} after its seal: refused",
                rec.epoch
            )));
        }
        p.digest.add(&rec);
        let item = match rec.op {
            DiskOp::Write { offset, fua, data }
                if self.mem_used + data.len() as u64 > self.mem_limit =>
            {
                let at = self.spill_end;
                if at - self.spill_start + data.len() as u64 > self.spill_limit {
                    return Err(DiskError::Limit(format!(
                        "the disk writes of uncommitted epochs fill this backup's spill file to its limit of {} MiB (the primary writes faster than its checkpoints commit; raise --max-spill-mib)",
                        self.spill_limit >> 20
                    )));
                }
                let spill = match &self.spill {
                    Some(f) => f,
                    None => {
                        let f = OpenOptions::new()
                            .read(true)
                            .write(true)
                            .create(true)
                            .truncate(true)
                            .open(&self.spill_path)
                            .map_err(DiskError::io(format!(
                                "create spill file {}",
                                self.spill_path.display()
                            )))?;
                        self.spill.insert(f)
                    }
                };
                spill
                    .write_all_at(&data, at)
                    .map_err(DiskError::io(format!(
                        "spill {} bytes of {} to {}",
                        data.len(),
                        rec.epoch,
                        self.spill_path.display()
                    )))?;
                self.spill_end += data.len() as u64;
                self.spilled_total += data.len() as u64;
                Item::Spilled {
                    len: data.len(),
                    rec: DiskRecord {
                        epoch: rec.epoch,
                        disk: rec.disk,
                        op: DiskOp::Write {
                            offset,
                            fua,
                            data: Vec::new(),
                        },
                    },
                    at,
                }
            }
            op => {
                if let DiskOp::Write { data, .. } = &op {
                    self.mem_used += data.len() as u64;
                }
                Item::Mem(DiskRecord {
                    epoch: rec.epoch,
                    disk: rec.disk,
                    op,
                })
            }
        };
        self.pending
            .entry(rec.epoch.0)
            .or_default()
            .items
            .push(item);
        self.pending_records += 1;
        Ok(())
    }

    /// Takes the seal of an epoch: it must match what arrived for it.
    pub fn seal(&mut self, seal: &DiskSeal, committed: Option<Epoch>) -> Result<(), DiskError> {
        let mismatch = |got: &DiskLogDigest| {
            DiskError::Protocol(format!(
                "the disk log of {} does not match its seal: received {} records / {} bytes, the primary sent {} / {}{}",
                seal.epoch,
                got.records,
                got.bytes,
                seal.records,
                seal.bytes,
                if got.records == seal.records && got.bytes == seal.bytes {
                    " (same counts, different contents)"
                } else {
                    ""
                }
            ))
        };
        if seal.epoch.0 == 0 {
            if committed.is_some() {
                return Err(DiskError::Protocol(
                    "initial-sync seal after a commit".into(),
                ));
            }
            if self.sync_sealed {
                return Err(DiskError::Protocol("initial sync sealed twice".into()));
            }
            if self.sync.seal(seal.epoch) != *seal {
                return Err(mismatch(&self.sync));
            }
            self.sync_sealed = true;
            if self.sync_wrote {
                for (i, d) in self.disks.iter().enumerate() {
                    d.flush().map_err(DiskError::io(format!(
                        "sync disk {} after the initial sync",
                        self.names[i]
                    )))?;
                }
            }
            return Ok(());
        }
        if let Some(c) = committed
            && seal.epoch <= c
        {
            return Err(DiskError::Protocol(format!(
                "a disk seal for {}, which has already committed (last committed: {c})",
                seal.epoch
            )));
        }
        if !self.pending.contains_key(&seal.epoch.0) && self.pending.len() >= MAX_OPEN_EPOCHS {
            return Err(DiskError::Limit(format!(
                "seals for {MAX_OPEN_EPOCHS} uncommitted epochs are held here already (the primary sealed {} ahead)",
                seal.epoch
            )));
        }
        let p = self.pending.entry(seal.epoch.0).or_default();
        if p.sealed {
            return Err(DiskError::Protocol(format!("{} sealed twice", seal.epoch)));
        }
        if p.digest.seal(seal.epoch) != *seal {
            return Err(mismatch(&p.digest));
        }
        p.sealed = true;
        Ok(())
    }

    /// Applies every buffered epoch up to and including `epoch`, in order,
    /// then syncs the disks if any of them asked for durability. `epoch`
    /// must have been sealed. On an error the commit must not be acked:
    /// the session is over (the disk may hold part of the epoch, which is
    /// why the standby is then discarded, never resumed).
    pub fn commit(&mut self, epoch: Epoch) -> Result<ApplyStats, DiskError> {
        if !self.pending.get(&epoch.0).is_some_and(|p| p.sealed) {
            return Err(DiskError::Protocol(format!(
                "{epoch} commits without a disk seal"
            )));
        }
        let later = match epoch.0.checked_add(1) {
            Some(next) => self.pending.split_off(&next),
            None => std::collections::BTreeMap::new(),
        };
        let now = std::mem::replace(&mut self.pending, later);
        self.pending_records = self.pending.values().map(|p| p.items.len()).sum();
        let mut stats = ApplyStats::default();
        let mut flush = vec![false; self.disks.len()];
        for (e, p) in now {
            if !p.sealed {
                return Err(DiskError::Protocol(format!(
                    "epoch {e} was never sealed but {epoch} commits"
                )));
            }
            for item in p.items {
                let (rec, at) = match item {
                    Item::Mem(r) => {
                        if let DiskOp::Write { data, .. } = &r.op {
                            self.mem_used = self.mem_used.saturating_sub(data.len() as u64);
                        }
                        (r, None)
                    }
                    Item::Spilled { rec, at, len } => (rec, Some((at, len))),
                };
                if rec.wants_durability() {
                    flush[rec.disk as usize] = true;
                }
                stats.bytes += self.apply_one(&rec, at)?;
                stats.records += 1;
            }
        }
        for (i, f) in flush.iter().enumerate() {
            if *f {
                self.disks[i].flush().map_err(DiskError::io(format!(
                    "sync disk {} for {epoch}",
                    self.names[i]
                )))?;
                stats.synced = true;
            }
        }
        self.reclaim();
        Ok(stats)
    }

    /// Applies one record; spilled data is read back from the spill file.
    fn apply_one(
        &mut self,
        rec: &DiskRecord,
        spilled: Option<(u64, usize)>,
    ) -> Result<u64, DiskError> {
        let d = &self.disks[rec.disk as usize];
        let name = &self.names[rec.disk as usize];
        match &rec.op {
            DiskOp::Write { offset, data, .. } => {
                let buf;
                let bytes: &[u8] = match spilled {
                    None => data,
                    Some((at, len)) => {
                        let mut b = vec![0u8; len];
                        self.spill
                            .as_ref()
                            .ok_or_else(|| DiskError::Protocol("spill file missing".into()))?
                            .read_exact_at(&mut b, at)
                            .map_err(DiskError::io(format!(
                                "read back {len} spilled bytes from {}",
                                self.spill_path.display()
                            )))?;
                        buf = b;
                        &buf
                    }
                };
                d.write_at(bytes, *offset, false)
                    .map_err(DiskError::io(format!(
                        "apply {} ({} bytes at {offset}) to disk {name}",
                        rec.epoch,
                        bytes.len()
                    )))?;
                Ok(bytes.len() as u64)
            }
            DiskOp::Zero {
                offset, len, trim, ..
            } => {
                d.write_zeroes(*offset, *len, *trim, false)
                    .map_err(DiskError::io(format!(
                        "apply {} (zero {len} bytes at {offset}) to disk {name}",
                        rec.epoch
                    )))?;
                Ok(*len)
            }
            DiskOp::Flush => Ok(0),
        }
    }

    /// Drops every uncommitted epoch; returns (records, bytes) dropped.
    pub fn discard(&mut self) -> (u64, u64) {
        let dropped = self.pending.values().fold((0, 0), |(r, b), p| {
            (r + p.digest.records, b + p.digest.bytes)
        });
        self.pending.clear();
        self.pending_records = 0;
        self.reclaim();
        dropped
    }

    /// Gives back the spill file's space that no pending epoch uses: all
    /// of it once nothing is pending (and the memory count), else the
    /// blocks before the first live spilled record.
    fn reclaim(&mut self) {
        if self.pending.is_empty() {
            self.mem_used = 0;
        }
        let live_start = self
            .pending
            .values()
            .flat_map(|p| &p.items)
            .filter_map(|i| match i {
                Item::Spilled { at, .. } => Some(*at),
                Item::Mem(_) => None,
            })
            .min();
        let Some(f) = &self.spill else { return };
        match live_start {
            None if self.spill_end > 0 => {
                let _ = f.set_len(0);
                self.spill_start = 0;
                self.spill_end = 0;
            }
            None => {}
            Some(start) if start > self.spill_start => {
                // Best effort: a file system without hole punching keeps
                // the blocks until the file is emptied; the bound on live
                // data holds either way.
                // SAFETY: fallocate on our own open file descriptor.
                unsafe {
                    libc::fallocate(
                        f.as_raw_fd(),
                        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                        self.spill_start as libc::off_t,
                        (start - self.spill_start) as libc::off_t,
                    )
                };
                self.spill_start = start;
            }
            Some(_) => {}
        }
    }

    /// Makes everything applied so far durable (before a failover resumes
    /// the VM on these disks).
    pub fn sync_all(&self) -> Result<(), DiskError> {
        for (i, d) in self.disks.iter().enumerate() {
            d.flush()
                .map_err(DiskError::io(format!("sync disk {}", self.names[i])))?;
        }
        Ok(())
    }
}

impl Drop for EpochBuffer {
    fn drop(&mut self) {
        if self.spill.is_some() {
            let _ = std::fs::remove_file(&self.spill_path);
        }
    }
}
