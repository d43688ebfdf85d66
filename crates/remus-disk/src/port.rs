//! [`DiskPort`]: the block backend behind each VM disk's NBD export.
//!
//! It always applies operations to the local image first. Besides:
//!
//! - *journal* (switched on and off by the agent): after the local
//!   operation succeeded, a copy goes to the primary's [`Journal`]
//!   (protected VM, replicated disk);
//! - *track* (once set, kept): before the local operation, the blocks it
//!   touches are marked in a persistent [`ChangeMap`] (a VM that failed
//!   over, until a resynchronisation), whether or not it is journaled
//!   too (a VM protected again after its failover).
//!
//! The mode lock is held for the whole operation, so a switch waits for
//! the operation in progress and no write is half in one mode.

use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use remus_nbd::BlockBackend;
use remus_proto::DiskOp;

use crate::activity::ActivityLog;
use crate::changes::ChangeMap;
use crate::journal::Journal;

enum Mode {
    Plain,
    Journal { journal: Arc<Journal>, index: u16 },
}

/// See the module documentation.
pub struct DiskPort {
    target: String,
    inner: Arc<dyn BlockBackend>,
    mode: Mutex<Mode>,
    /// Apart from the mode: reading it never waits for a write.
    changes: Mutex<Option<Arc<ChangeMap>>>,
    /// The primary's activity log: extents marked before they are written.
    activity: Mutex<Option<Arc<ActivityLog>>>,
}

impl std::fmt::Debug for DiskPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskPort")
            .field("target", &self.target)
            .field("mode", &self.mode_name())
            .finish()
    }
}

impl DiskPort {
    pub fn new(target: &str, inner: Arc<dyn BlockBackend>) -> DiskPort {
        DiskPort {
            target: target.to_string(),
            inner,
            mode: Mutex::new(Mode::Plain),
            changes: Mutex::new(None),
            activity: Mutex::new(None),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Mode> {
        self.mode.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Guest device name (`vda`, ...).
    pub fn target(&self) -> &str {
        &self.target
    }

    /// The local image, bypassing replication (the backup applies
    /// committed epochs through it).
    pub fn local(&self) -> &Arc<dyn BlockBackend> {
        &self.inner
    }

    /// From now on, operations are also queued on `journal` as replicated
    /// disk number `index`.
    pub fn journal_to(&self, journal: Arc<Journal>, index: u16) {
        *self.lock() = Mode::Journal { journal, index };
    }

    /// From now on, blocks written are marked in `map` before the write.
    pub fn track_changes(&self, map: Arc<ChangeMap>) {
        // Taken with the mode lock so no write in progress is missed.
        let _mode = self.lock();
        *self.changes.lock().unwrap_or_else(|p| p.into_inner()) = Some(map);
    }

    /// Stops recording changes (after a resynchronisation made both
    /// copies equal); returns the map that was in use.
    pub fn stop_tracking(&self) -> Option<Arc<ChangeMap>> {
        let _mode = self.lock();
        self.changes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    /// From now on (`Some`) every write first marks its extents in the
    /// activity log; `None` detaches it (its file keeps its marks).
    pub fn set_activity_log(&self, al: Option<Arc<ActivityLog>>) {
        let _mode = self.lock();
        *self.activity.lock().unwrap_or_else(|p| p.into_inner()) = al;
    }

    /// The activity log, while attached.
    pub fn activity_log(&self) -> Option<Arc<ActivityLog>> {
        self.activity
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Stops journaling (change tracking, if set, goes on). Close the
    /// journal first: a write waiting for room in it holds the mode lock.
    pub fn plain(&self) {
        *self.lock() = Mode::Plain;
    }

    /// `plain`, `journal`, `track` or `journal+track`.
    pub fn mode_name(&self) -> &'static str {
        let tracking = self.change_map().is_some();
        match (&*self.lock(), tracking) {
            (Mode::Plain, false) => "plain",
            (Mode::Journal { .. }, false) => "journal",
            (Mode::Plain, true) => "track",
            (Mode::Journal { .. }, true) => "journal+track",
        }
    }

    /// The change map, while tracking.
    pub fn change_map(&self) -> Option<Arc<ChangeMap>> {
        self.changes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Runs `local` under the mode lock: marks first when tracking, queues
    /// `op()` after success when journaling.
    fn apply(
        &self,
        offset: u64,
        len: u64,
        local: impl FnOnce(&dyn BlockBackend) -> io::Result<()>,
        op: impl FnOnce() -> DiskOp,
    ) -> io::Result<()> {
        let mode = self.lock();
        let al = self.activity_log();
        if let Some(al) = &al {
            al.begin(offset, len)?;
        }
        if let Some(map) = self.change_map() {
            map.mark(offset, len)?;
        }
        let done = local(&*self.inner);
        let epoch = match (&*mode, &done) {
            (Mode::Journal { journal, index }, Ok(())) => {
                let e = journal.push(*index, op());
                if e.is_none() {
                    // The session ended while this write waited: it is
                    // applied locally; the backup that would have received
                    // it is gone (the activity log keeps its extent).
                    tracing::debug!(disk = %self.target, "journal closed; write kept locally only");
                }
                e
            }
            _ => None,
        };
        if let Some(al) = &al {
            al.end(offset, len, epoch);
        }
        done
    }
}

impl BlockBackend for DiskPort {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn read_only(&self) -> bool {
        self.inner.read_only()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)
    }

    fn may_hold_data(&self, offset: u64, len: u64) -> io::Result<bool> {
        self.inner.may_hold_data(offset, len)
    }

    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> io::Result<()> {
        if buf.is_empty() {
            return self.inner.write_at(buf, offset, fua);
        }
        self.apply(
            offset,
            buf.len() as u64,
            |b| b.write_at(buf, offset, fua),
            || DiskOp::Write {
                offset,
                fua,
                data: buf.to_vec(),
            },
        )
    }

    fn flush(&self) -> io::Result<()> {
        self.apply(0, 0, |b| b.flush(), || DiskOp::Flush)
    }

    fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return self.inner.trim(offset, len);
        }
        // Replicated as "reads as zero": the local trim punches a hole (or
        // writes zeroes), and so does the backup, so the copies agree.
        self.apply(
            offset,
            len,
            |b| b.trim(offset, len),
            || DiskOp::Zero {
                offset,
                len,
                trim: true,
                fua: false,
            },
        )
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool, fua: bool) -> io::Result<()> {
        if len == 0 {
            return self.inner.write_zeroes(offset, len, may_trim, fua);
        }
        self.apply(
            offset,
            len,
            |b| b.write_zeroes(offset, len, may_trim, fua),
            || DiskOp::Zero {
                offset,
                len,
                trim: may_trim,
                fua,
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use remus_nbd::FileBackend;
    use remus_proto::Epoch;

    fn port(dir: &std::path::Path) -> DiskPort {
        let path = dir.join("img");
        std::fs::write(&path, vec![0u8; 1 << 20]).unwrap();
        DiskPort::new("vda", Arc::new(FileBackend::open(&path, false).unwrap()))
    }

    #[test]
    fn journal_mode_applies_locally_then_queues_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let p = port(dir.path());
        p.write_at(b"before", 0, false).unwrap();
        let j = Arc::new(Journal::new(Epoch(1), 1 << 20, Arc::default()));
        p.journal_to(j.clone(), 3);
        assert_eq!(p.mode_name(), "journal");
        p.write_at(b"hello", 4096, true).unwrap();
        p.write_zeroes(8192, 100, false, false).unwrap();
        p.trim(65536, 4096).unwrap();
        p.flush().unwrap();
        let got = j.take();
        assert_eq!(got.len(), 4);
        assert!(got.iter().all(|r| r.disk == 3 && r.epoch == Epoch(1)));
        assert!(
            matches!(&got[0].op, DiskOp::Write { offset: 4096, fua: true, data } if data == b"hello")
        );
        assert!(matches!(
            got[1].op,
            DiskOp::Zero {
                offset: 8192,
                len: 100,
                trim: false,
                ..
            }
        ));
        assert!(matches!(
            got[2].op,
            DiskOp::Zero {
                offset: 65536,
                trim: true,
                ..
            }
        ));
        assert!(matches!(got[3].op, DiskOp::Flush));
        let mut b = [0u8; 5];
        p.read_at(&mut b, 4096).unwrap();
        assert_eq!(&b, b"hello");
        // Back to plain: nothing more is queued.
        p.plain();
        p.write_at(b"after", 0, false).unwrap();
        assert!(j.take().is_empty());
    }

    #[test]
    fn a_failed_local_write_is_not_replicated() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        std::fs::write(&path, vec![0u8; 4096]).unwrap();
        let ro = DiskPort::new("vda", Arc::new(FileBackend::open(&path, true).unwrap()));
        let j = Arc::new(Journal::new(Epoch(1), 1 << 20, Arc::default()));
        ro.journal_to(j.clone(), 0);
        assert!(ro.write_at(b"x", 0, false).is_err());
        assert!(j.take().is_empty());
    }

    #[test]
    fn track_mode_marks_before_writing() {
        let dir = tempfile::tempdir().unwrap();
        let p = port(dir.path());
        let map = Arc::new(ChangeMap::open(&dir.path().join("map"), 1 << 20, 65536).unwrap());
        p.track_changes(map.clone());
        p.write_at(&[1u8; 10], 65536 * 3 + 5, false).unwrap();
        p.trim(0, 65536 * 2).unwrap();
        assert_eq!(map.marked_chunks(), vec![0, 1, 3]);
        let again = ChangeMap::open(&dir.path().join("map"), 1 << 20, 65536).unwrap();
        assert_eq!(again.marked_chunks(), vec![0, 1, 3], "persistent");
        // Protected again after the failover: tracking goes on alongside
        // the journal, and after it.
        let j = Arc::new(Journal::new(Epoch(1), 1 << 20, Arc::default()));
        p.journal_to(j.clone(), 0);
        assert_eq!(p.mode_name(), "journal+track");
        p.write_at(&[2u8; 10], 65536 * 7, false).unwrap();
        assert_eq!(j.take().len(), 1);
        p.plain();
        assert_eq!(p.mode_name(), "track");
        assert_eq!(map.marked_chunks(), vec![0, 1, 3, 7]);
    }
}
