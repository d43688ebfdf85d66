//! The primary's disk journal: every write, zeroing and flush the guest
//! issues while protected, in the order they were applied locally, tagged
//! with the epoch whose checkpoint will contain them.
//!
//! Guest writes are applied to the primary's disk at once and queued here;
//! the replication sender takes them off the queue continuously (they
//! travel while the guest runs, not during the checkpoint pause). The
//! queue is bounded: when the link cannot keep up, a guest write waits for
//! room (back-pressure, as a slow disk would), it is never dropped. Closing
//! the journal (end of the session) releases every waiter.
//!
//! The journal rings a [`Doorbell`] whenever it queues a record or
//! closes: the sender's, which other sources (a staged checkpoint, the end
//! of the session) ring too, so the sender sleeps on one thing.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use remus_proto::{DiskOp, DiskRecord, Epoch};

/// Per-record bookkeeping counted against the bound besides its data.
const RECORD_OVERHEAD: u64 = 64;

/// A wake-up for one waiter with several sources: each [`ring`](Self::ring)
/// bumps a counter, so a waiter that read the counter before it looked for
/// work cannot miss a ring that came in between.
#[derive(Default)]
pub struct Doorbell {
    rings: Mutex<u64>,
    cv: Condvar,
}

impl Doorbell {
    pub fn new() -> Doorbell {
        Doorbell::default()
    }

    /// The rings so far (read before looking for work).
    pub fn rings(&self) -> u64 {
        *self.rings.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Wakes the waiter.
    pub fn ring(&self) {
        let mut n = self.rings.lock().unwrap_or_else(|p| p.into_inner());
        *n += 1;
        self.cv.notify_all();
    }

    /// Waits until it rang after `seen` was read, or `timeout` passes.
    pub fn wait(&self, seen: u64, timeout: Duration) {
        let n = self.rings.lock().unwrap_or_else(|p| p.into_inner());
        let _ = self
            .cv
            .wait_timeout_while(n, timeout, |n| *n == seen)
            .unwrap_or_else(|p| p.into_inner());
    }
}

/// See the module documentation.
pub struct Journal {
    state: Mutex<State>,
    /// Writers waiting for room.
    cv: Condvar,
    limit: std::sync::atomic::AtomicU64,
    /// The sender's: rung when a record is queued or the journal closes.
    doorbell: Arc<Doorbell>,
}

struct State {
    /// Epoch new guest writes are tagged with.
    epoch: u64,
    queue: VecDeque<DiskRecord>,
    queued_bytes: u64,
    closed: bool,
    /// Time guest writes spent waiting for room.
    blocked: Duration,
}

fn cost(r: &DiskRecord) -> u64 {
    RECORD_OVERHEAD
        + match &r.op {
            DiskOp::Write { data, .. } => data.len() as u64,
            _ => 0,
        }
}

impl Journal {
    /// A journal whose first guest writes belong to `first_epoch`, holding
    /// at most about `limit_bytes` of queued data, ringing `doorbell`
    /// when there is something to take.
    pub fn new(first_epoch: Epoch, limit_bytes: u64, doorbell: Arc<Doorbell>) -> Journal {
        Journal {
            state: Mutex::new(State {
                epoch: first_epoch.0,
                queue: VecDeque::new(),
                queued_bytes: 0,
                closed: false,
                blocked: Duration::ZERO,
            }),
            cv: Condvar::new(),
            limit: std::sync::atomic::AtomicU64::new(limit_bytes.max(1)),
            doorbell,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a guest operation on replicated disk `disk`, tagged with the
    /// current epoch; waits while the queue is full. Returns the epoch it
    /// was tagged with, or None (and queues nothing) once the journal is
    /// closed.
    pub fn push(&self, disk: u16, op: DiskOp) -> Option<Epoch> {
        let st = self.lock();
        let epoch = Epoch(st.epoch);
        let rec = DiskRecord { epoch, disk, op };
        self.enqueue(st, rec).then_some(epoch)
    }

    /// Queues an initial-sync record (epoch 0), waiting for room like a
    /// guest write. Returns false once the journal is closed.
    pub fn push_sync(&self, rec: DiskRecord) -> bool {
        self.enqueue(self.lock(), rec)
    }

    fn enqueue(&self, mut st: MutexGuard<'_, State>, rec: DiskRecord) -> bool {
        let c = cost(&rec);
        let waited = Instant::now();
        let mut blocked = false;
        // A record larger than the bound still goes through an empty queue.
        while !st.closed
            && st.queued_bytes > 0
            && st.queued_bytes.saturating_add(c)
                > self.limit.load(std::sync::atomic::Ordering::SeqCst)
        {
            blocked = true;
            st = self.cv.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        if blocked {
            st.blocked += waited.elapsed();
        }
        if st.closed {
            return false;
        }
        st.queued_bytes += c;
        st.queue.push_back(rec);
        drop(st);
        self.doorbell.ring();
        true
    }

    /// Closes epoch `closing` (called while the guest is stopped for its
    /// checkpoint): later guest writes belong to the next epoch.
    pub fn cut(&self, closing: Epoch) -> Result<(), String> {
        let mut st = self.lock();
        if st.epoch != closing.0 {
            return Err(format!(
                "disk journal is at epoch {}, the checkpoint closes {closing}",
                st.epoch
            ));
        }
        st.epoch += 1;
        Ok(())
    }

    /// Takes every queued record, oldest first, and makes room for waiting
    /// writers.
    pub fn take(&self) -> Vec<DiskRecord> {
        let mut st = self.lock();
        st.queued_bytes = 0;
        let out: Vec<DiskRecord> = st.queue.drain(..).collect();
        if !out.is_empty() {
            self.cv.notify_all();
        }
        out
    }

    /// Ends the journal: pushes fail from now on and every waiter returns.
    pub fn close(&self) {
        let mut st = self.lock();
        st.closed = true;
        st.queue.clear();
        st.queued_bytes = 0;
        self.cv.notify_all();
        drop(st);
        self.doorbell.ring();
    }

    /// Changes the bound (`u64::MAX`: writers never wait).
    pub fn set_limit(&self, limit_bytes: u64) {
        let _st = self.lock();
        self.limit
            .store(limit_bytes.max(1), std::sync::atomic::Ordering::SeqCst);
        self.cv.notify_all();
    }

    /// Total time guest writes waited for room in the queue.
    pub fn blocked(&self) -> Duration {
        self.lock().blocked
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn write(n: u8) -> DiskOp {
        DiskOp::Write {
            offset: u64::from(n) * 512,
            fua: false,
            data: vec![n; 512],
        }
    }

    #[test]
    fn records_carry_the_epoch_open_when_they_were_pushed() {
        let j = Journal::new(Epoch(1), 1 << 20, Arc::default());
        assert_eq!(j.push(0, write(1)), Some(Epoch(1)));
        j.cut(Epoch(1)).unwrap();
        assert_eq!(j.push(1, write(2)), Some(Epoch(2)));
        assert!(j.push(0, DiskOp::Flush).is_some());
        let got: Vec<(u64, u16)> = j.take().iter().map(|r| (r.epoch.0, r.disk)).collect();
        assert_eq!(got, vec![(1, 0), (2, 1), (2, 0)]);
        assert!(j.take().is_empty());
        // Cutting an epoch that is not the open one is a caller bug, named.
        let e = j.cut(Epoch(7)).unwrap_err();
        assert!(e.contains("at epoch 2"), "{e}");
    }

    #[test]
    fn a_full_queue_blocks_the_writer_until_taken_and_close_releases_it() {
        let j = Arc::new(Journal::new(Epoch(1), 1200, Arc::default()));
        assert!(j.push(0, write(1)).is_some());
        assert!(j.push(0, write(2)).is_some());
        let j2 = j.clone();
        let writer = std::thread::spawn(move || j2.push(0, write(3)));
        // The writer waits (about 1.2 KB queued against 1.2 KB allowed)...
        std::thread::sleep(Duration::from_millis(100));
        assert!(!writer.is_finished(), "the writer waits for room");
        assert_eq!(j.take().len(), 2);
        // ...and gets through once the sender took the queue.
        assert!(writer.join().unwrap().is_some());
        assert_eq!(j.take().len(), 1);

        assert!(j.push(0, write(4)).is_some());
        assert!(j.push(0, write(5)).is_some());
        let j2 = j.clone();
        let writer = std::thread::spawn(move || j2.push(0, write(6)));
        std::thread::sleep(Duration::from_millis(50));
        j.close();
        assert!(writer.join().unwrap().is_none(), "a closed journal refuses");
        assert!(j.blocked() > Duration::ZERO);
        assert!(j.push(0, write(7)).is_none());
    }

    #[test]
    fn the_doorbell_rings_on_push_and_close_and_waits_out_its_timeout() {
        let bell = Arc::new(Doorbell::new());
        let j = Arc::new(Journal::new(Epoch(1), 1 << 20, bell.clone()));
        let seen = bell.rings();
        let t = Instant::now();
        bell.wait(seen, Duration::from_millis(30));
        assert!(t.elapsed() >= Duration::from_millis(30), "nothing rang");
        let j2 = j.clone();
        let h = std::thread::spawn(move || j2.push(0, write(1)));
        bell.wait(seen, Duration::from_secs(10));
        assert!(h.join().unwrap().is_some());
        assert_ne!(bell.rings(), seen, "a push rings");
        let seen = bell.rings();
        j.close();
        assert_ne!(bell.rings(), seen, "closing rings");
        // A ring before the wait is not missed.
        let seen = bell.rings();
        bell.ring();
        let t = Instant::now();
        bell.wait(seen, Duration::from_secs(10));
        assert!(t.elapsed() < Duration::from_secs(5));
    }
}
