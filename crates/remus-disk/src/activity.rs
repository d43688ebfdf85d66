//! [`ActivityLog`]: the primary's persistent record of the disk extents
//! that may hold writes its backup has not acknowledged, as DRBD's
//! activity log is.
//!
//! When a primary dies, its disk holds the writes of the epochs after the
//! last one its backup committed. The backup resumes without them; a later
//! resynchronisation back to the old primary must overwrite them, so it
//! must know where they are. The activity log says so, at extent
//! granularity ([`EXTENT_SIZE`], 4 MiB), in a [`ChangeMap`] file:
//!
//! - an extent is marked, and the mark synced, *before* the first write to
//!   it (a write to an extent already marked pays nothing);
//! - each marked extent remembers the last epoch that wrote it; once the
//!   backup has acknowledged that epoch the extent may be cleared;
//! - it is cleared only when more than `limit` extents are marked (least
//!   recently written first), so a hot extent stays marked instead of
//!   paying a sync every epoch, and at most `limit` extents (plus those
//!   with unacknowledged writes) stay marked: the bound on what a resync
//!   after a primary crash must compare;
//! - a write the backup never received (the session ended, the journal was
//!   closed) keeps its extent marked until a resynchronisation covers it.
//!
//! Clearing is not synced: after a crash a cleared extent may come back
//! marked. That over-marks, never misses.

use std::collections::HashMap;
use std::io;
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use remus_proto::Epoch;

use crate::changes::ChangeMap;

/// Bytes per activity-log extent.
pub const EXTENT_SIZE: u32 = 4 << 20;
/// Extents kept marked after their writes are acknowledged: DRBD's
/// default al-extents (about 4.8 GiB). A guest whose random writes range
/// over more than this pays a sync for most writes (bench/results.md,
/// "Activity log"); a primary crash leaves at most this much to compare.
pub const DEFAULT_LIMIT: usize = 1237;

/// The extent's write is in progress (never cleared).
const IN_FLIGHT: u64 = u64::MAX;
/// The write was not replicated (no session, or it ended): kept until a
/// resync covers it.
const UNREPLICATED: u64 = u64::MAX - 1;

/// See the module documentation.
#[derive(Debug)]
pub struct ActivityLog {
    map: ChangeMap,
    /// Marked extent → last epoch that wrote it (0: before this session).
    last: Mutex<HashMap<u64, u64>>,
    limit: usize,
    syncs: AtomicU64,
}

impl ActivityLog {
    /// Opens (or creates) the log at `path` for a disk of `disk_size`
    /// bytes. Extents marked in an existing log are kept; they count as
    /// written before this session.
    pub fn open(path: &Path, disk_size: u64, limit: usize) -> io::Result<ActivityLog> {
        let map = ChangeMap::open(path, disk_size, EXTENT_SIZE)?;
        let last = map.marked_chunks().into_iter().map(|e| (e, 0)).collect();
        Ok(ActivityLog {
            map,
            last: Mutex::new(last),
            limit: limit.max(1),
            syncs: AtomicU64::new(0),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, u64>> {
        self.last.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn extents(&self, offset: u64, len: u64) -> std::ops::RangeInclusive<u64> {
        let size = self.map.disk_size();
        if len == 0 || offset >= size {
            #[allow(clippy::reversed_empty_ranges)]
            return 1..=0;
        }
        let end = offset.saturating_add(len).min(size);
        offset / u64::from(EXTENT_SIZE)..=(end - 1) / u64::from(EXTENT_SIZE)
    }

    /// Before a write of `len` bytes at `offset`: its extents are marked
    /// durably (a sync only when one was not marked yet).
    pub fn begin(&self, offset: u64, len: u64) -> io::Result<()> {
        let range = self.extents(offset, len);
        if range.is_empty() {
            return Ok(());
        }
        if range.clone().any(|e| !self.map.is_marked(e)) {
            self.map.mark(offset, len)?;
            self.syncs.fetch_add(1, Ordering::Relaxed);
        }
        let mut last = self.lock();
        for e in range {
            last.insert(e, IN_FLIGHT);
        }
        Ok(())
    }

    /// After the write: the epoch it was replicated in, or None when it
    /// was not replicated.
    pub fn end(&self, offset: u64, len: u64, epoch: Option<Epoch>) {
        let mut last = self.lock();
        for e in self.extents(offset, len) {
            last.insert(e, epoch.map_or(UNREPLICATED, |e| e.0));
        }
    }

    /// The backup acknowledged `epoch`: extents written only in epochs up
    /// to it may be cleared, oldest first, while more than the limit are
    /// marked. Returns how many were cleared.
    pub fn acked(&self, epoch: Epoch) -> io::Result<usize> {
        let epoch = epoch.0;
        let mut last = self.lock();
        if last.len() <= self.limit {
            return Ok(0);
        }
        let mut old: Vec<(u64, u64)> = last
            .iter()
            .filter(|&(_, &l)| l <= epoch)
            .map(|(&e, &l)| (l, e))
            .collect();
        old.sort_unstable();
        let n = (last.len() - self.limit).min(old.len());
        let clear: Vec<u64> = old[..n].iter().map(|&(_, e)| e).collect();
        for e in &clear {
            last.remove(e);
        }
        self.map.unmark(&clear)?;
        Ok(n)
    }

    /// Every write up to `epoch` is acknowledged and nothing is written
    /// after it (a planned switch-over): clears every extent whose writes
    /// the backup has, whatever the limit.
    pub fn acked_all(&self, epoch: Epoch) -> io::Result<usize> {
        let epoch = epoch.0;
        let mut last = self.lock();
        let clear: Vec<u64> = last
            .iter()
            .filter(|&(_, &l)| l <= epoch)
            .map(|(&e, _)| e)
            .collect();
        for e in &clear {
            last.remove(e);
        }
        self.map.unmark(&clear)?;
        Ok(clear.len())
    }

    /// A new session starts: what is marked now is sent with its initial
    /// sync, so it counts as written before the session (epoch 0).
    pub fn new_session(&self) {
        for l in self.lock().values_mut() {
            if *l != IN_FLIGHT {
                *l = 0;
            }
        }
    }

    /// The session's first checkpoint committed: everything marked from
    /// before it is on the backup now and is cleared.
    pub fn forget_before_session(&self) -> io::Result<()> {
        let mut last = self.lock();
        let clear: Vec<u64> = last
            .iter()
            .filter(|&(_, &l)| l == 0)
            .map(|(&e, _)| e)
            .collect();
        for e in &clear {
            last.remove(e);
        }
        self.map.unmark(&clear)
    }

    /// Numbers of the marked extents, ascending.
    pub fn marked_extents(&self) -> Vec<u64> {
        self.map.marked_chunks()
    }

    /// The marked extents as chunks of `chunk` bytes (which must divide
    /// [`EXTENT_SIZE`]), ascending, within the disk.
    pub fn marked_chunks(&self, chunk: u32) -> Vec<u64> {
        let per = u64::from(EXTENT_SIZE / chunk.max(1));
        let total = self.map.disk_size().div_ceil(u64::from(chunk.max(1)));
        self.marked_extents()
            .into_iter()
            .flat_map(|e| (e * per..((e + 1) * per).min(total)).collect::<Vec<_>>())
            .collect()
    }

    /// Extents marked now.
    pub fn count(&self) -> u64 {
        self.map.count()
    }

    /// Syncs paid so far (one per write that touched an unmarked extent).
    pub fn syncs(&self) -> u64 {
        self.syncs.load(Ordering::Relaxed)
    }

    pub fn path(&self) -> &Path {
        self.map.path()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const E: u64 = EXTENT_SIZE as u64;

    #[test]
    fn marks_before_writes_and_syncs_once_per_new_extent() {
        let dir = tempfile::tempdir().unwrap();
        let al = ActivityLog::open(&dir.path().join("al"), 10 * E, 4).unwrap();
        al.begin(E - 1, 2).unwrap(); // extents 0 and 1
        al.end(E - 1, 2, Some(Epoch(1)));
        al.begin(10, 10).unwrap(); // extent 0 again: no sync
        al.end(10, 10, Some(Epoch(1)));
        assert_eq!(al.marked_extents(), vec![0, 1]);
        assert_eq!(al.syncs(), 1);
        // Persistent: a crash now leaves both marked.
        let again = ActivityLog::open(&dir.path().join("al"), 10 * E, 4).unwrap();
        assert_eq!(again.marked_extents(), vec![0, 1]);
        assert_eq!(
            al.marked_chunks(1 << 20),
            vec![0, 1, 2, 3, 4, 5, 6, 7],
            "extents as 1 MiB chunks"
        );
    }

    #[test]
    fn acked_extents_are_cleared_only_beyond_the_limit_oldest_first() {
        let dir = tempfile::tempdir().unwrap();
        let al = ActivityLog::open(&dir.path().join("al"), 10 * E, 2).unwrap();
        for (ext, epoch) in [(0, 1), (1, 2), (2, 3), (3, 4)] {
            al.begin(ext * E, 1).unwrap();
            al.end(ext * E, 1, Some(Epoch(epoch)));
        }
        // Nothing acknowledged yet: all four stay.
        assert_eq!(al.acked(Epoch(0)).unwrap(), 0);
        assert_eq!(al.count(), 4);
        // Epoch 1 acknowledged: only extent 0 may go.
        assert_eq!(al.acked(Epoch(1)).unwrap(), 1);
        assert_eq!(al.marked_extents(), vec![1, 2, 3]);
        // Everything acknowledged: down to the limit, oldest first.
        assert_eq!(al.acked(Epoch(10)).unwrap(), 1);
        assert_eq!(al.marked_extents(), vec![2, 3]);
        // A write in flight or never replicated is never cleared.
        al.begin(5 * E, 1).unwrap();
        al.begin(6 * E, 1).unwrap();
        al.end(6 * E, 1, None);
        assert_eq!(al.acked(Epoch(100)).unwrap(), 2);
        assert_eq!(al.marked_extents(), vec![5, 6]);
    }

    #[test]
    fn a_new_sessions_first_commit_forgets_what_came_before() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("al");
        let al = ActivityLog::open(&p, 10 * E, 8).unwrap();
        al.begin(0, 1).unwrap();
        al.end(0, 1, None);
        drop(al);
        let al = ActivityLog::open(&p, 10 * E, 8).unwrap();
        al.new_session();
        al.begin(3 * E, 1).unwrap();
        al.end(3 * E, 1, Some(Epoch(1)));
        al.forget_before_session().unwrap();
        assert_eq!(al.marked_extents(), vec![3]);
    }
}
