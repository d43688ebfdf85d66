//! The primary side of a protection session.
//!
//! A session goes through named phases, each a function here:
//!
//! 1. [`protect`] sets up: the dirty tracker and RAM mapping ([`Capture`]),
//!    disk journaling, held network output, the sender and the ack reader.
//! 2. [`Session::initial_copy`]: the disks' differing chunks, then every
//!    page of RAM, while the guest runs; checkpoints start once the backup
//!    acknowledges it.
//! 3. [`Session::epoch_loop`]: one checkpoint per interval, taken by
//!    [`Capture::take_checkpoint`] (the only pause) and handed to the
//!    sender, which transmits it while the guest runs the next epoch.
//! 4. [`Session::switch_over`] (`remus failback`): the last checkpoint,
//!    with the guest left stopped, then the backup resumes it.
//! 5. [`Session::teardown`]: the goodbye (Done, or an Abort naming why),
//!    the threads' end, and how the session ended ([`ProtectEnd`]).
//!
//! The epoch loop, the sender and the ack reader share one state behind
//! one lock ([`Shared`]): the hand-off slot, what is in flight, why the
//! backup was lost ([`LostBackup`]). The epoch loop waits on its condition
//! variable (for room to hand off, for an ack); the sender sleeps on its
//! own [`Doorbell`], rung by a hand-off, a queued disk record or the end.
//! Everything an acknowledgement means happens in one place,
//! [`acknowledged`]: held output leaves, the activity logs forget the
//! extents, the caller's copy record learns of the commit, the checkpoint
//! is reported.
//!
//! The timer runs at a fixed rate (epoch k starts at start + k·interval),
//! not "interval after the last commit" as Xen's did, so the checkpoint
//! rate is what the operator asked for. When the link cannot keep up, the
//! one-slot hand-off to the sender makes the epoch loop wait: checkpoints
//! are delayed, never dropped or merged silently.

use remus_proto::Channel;
use std::collections::{HashMap, VecDeque};
use std::io::{BufWriter, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use remus_disk::{DiskPort, Doorbell, Journal};
use remus_net::{EpochOutput, OutputCommit, OutputSignal};
use remus_proto::{
    CheckpointKind, CheckpointWriter, DiskDigests, Epoch, ErrorCode, Message, MsgType,
};
use remus_vm::{Vm, devstate};

pub use crate::capture::PausePhases;
use crate::capture::{Capture, Staged, resume_unless_held};
use crate::disks::{PrimaryDisks, Sealer};
use crate::pace::{Paced, SharedPacer};
use crate::{ReplError, staging};
pub use remus_api::CheckpointStats;
use remus_api::SessionEvent;

/// Settings of a protection session.
#[derive(Debug, Clone)]
pub struct ProtectConfig {
    /// The checkpoint interval and the failover timeout (how long without
    /// any frame from the backup before it is declared lost; heartbeats
    /// go every quarter of it), which `remus protect --set` changes while
    /// the session runs.
    pub tuning: Arc<Tuning>,
    /// Replicate the writes of the VM's replicated disks (protocol D);
    /// false for `--no-disk`.
    pub replicate_disks: bool,
    /// Hold the VM's network output until its checkpoint is acknowledged
    /// (output commit); false for `--no-net`.
    pub buffer_net: bool,
    /// Compress checkpoints (XOR against the backup's copy, then LZ4) with
    /// a page cache of this many bytes; `None` for `--no-compress` or a
    /// peer older than protocol version 3.
    pub compress: Option<u64>,
    /// How the disks are synchronised: `None` compares every chunk;
    /// `Some(backup's runs)` (the backup's plan said `changed`) compares
    /// only the chunks this host's change records mark (its change maps
    /// and activity logs, read once journaling has started) and these.
    pub changed_sync: Option<Vec<Vec<(u64, u64)>>>,
    /// Set to hand the VM over to the backup at the next checkpoint
    /// (`remus failback`): the guest stays stopped here after it, the
    /// backup resumes it from that checkpoint.
    pub switch_over: Arc<AtomicBool>,
    /// Called at a switch-over once the last checkpoint is acknowledged,
    /// before the backup is told to take over: an arbitrated primary gives
    /// up its arbiter key here (and fences the guest, which then stays
    /// stopped here unless the key comes back).
    pub hand_over: Option<HandOver>,
    /// Called for each checkpoint the backup acknowledges (see
    /// [`acknowledged`]): the caller's record of what the backup's copy
    /// holds.
    pub on_commit: Option<OnCommit>,
    /// Cap of the initial copy (the disk sync's data and the copy of RAM)
    /// on the link, in bytes per second; `None`: as fast as it goes.
    /// Checkpoints, and the guest's disk writes meanwhile, are never
    /// capped.
    pub max_rate: Option<u64>,
    /// Output-driven epochs (with `buffer_net`): an epoch ends as soon as
    /// the guest has output waiting, but never sooner than this after the
    /// last checkpoint began (the bound on the checkpoint rate), and at the
    /// latest at the interval; an epoch with no output lasts the interval.
    /// `None`: every epoch lasts the interval.
    pub min_interval: Option<Duration>,
    /// With output-driven epochs: the longest a frame should wait. While
    /// the guest streams output (it has some waiting almost as soon as
    /// each epoch begins) the gap between checkpoints grows from
    /// `min_interval` toward this, less the last checkpoint's pause and
    /// ack, so that fewer, larger checkpoints stop the guest less often
    /// (see [`Gap`]); it falls back to `min_interval` at the first epoch
    /// whose output comes later. `None`, or not above `min_interval`:
    /// the gap stays `min_interval`.
    pub max_latency: Option<Duration>,
    /// The backup keeps its standby across a restart of this agent (it
    /// answered the setup with a Resumable): see [`Suspending`].
    pub suspend: Option<Suspending>,
    /// This session resumes a suspended one: the backup holds this epoch,
    /// the guest has stayed stopped at it since (it is resumed once the
    /// session runs). No initial copy; checkpoints go on from the next
    /// epoch.
    pub resume_from: Option<Epoch>,
    /// Someone else decides where the VM runs once its backup is lost: a
    /// cluster manager (`remusd --failover-by cluster`) or the arbiter. A
    /// backup that holds a committed checkpoint and is lost without
    /// saying it gives up (silent, gone, unreadable) may be resuming the
    /// VM, so the guest is fenced (paused, its unacknowledged output held)
    /// instead of going on alone: output the backup's copy does not
    /// contain must not leave while that copy may run. The hook is called
    /// just before the fence (the arbiter's guard, from then on, lifts it
    /// only once the key is pinned to this host); the agent lifts the
    /// fence when the backup is known to be gone.
    pub hold_on_loss: Option<OnHold>,
    /// Save device state without QEMU's RAM blocks (the backup said its
    /// standby loads that: see `remus_vm::devstate`).
    pub devices_only_state: bool,
}

/// Suspending a session for a restart of this agent: once `requested` is
/// set, the next checkpoint leaves the guest stopped, and once the backup
/// has acknowledged it, the backup is asked to keep its standby for
/// `grace` (a Suspend) instead of failing over when the link closes. The
/// next agent resumes the session from that checkpoint.
#[derive(Debug, Clone)]
pub struct Suspending {
    pub requested: Arc<AtomicBool>,
    pub grace: Duration,
    /// Set when the suspend was asked by the backup, whose agent restarts
    /// (a Restarting), rather than by this agent's stop.
    pub backup_restarting: Arc<AtomicBool>,
    /// Whether a Restarting from the backup is honoured: a backup's
    /// restart pauses the guest, so the caller allows it only now and then.
    /// Otherwise the session ends in order (the backup is told, so that it
    /// drops its standby rather than fail over) and the VM runs on
    /// unprotected.
    pub backup_may_restart: bool,
    /// Set when the backup's restart is not honoured: the epoch loop ends
    /// the session in order.
    pub end: Arc<AtomicBool>,
}

/// The settings of a running session that can change (`remus protect
/// --set`): the checkpoint interval from the next epoch on, and the
/// failover timeout, which the backup is told (a Tune message) when it
/// said it takes one.
pub struct Tuning {
    state: Mutex<TuneState>,
}

impl std::fmt::Debug for Tuning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let st = self.lock();
        f.debug_struct("Tuning")
            .field("interval", &st.interval)
            .field("timeout", &st.timeout)
            .field("backup_tunes", &st.backup_tunes)
            .finish()
    }
}

struct TuneState {
    interval: Duration,
    timeout: Duration,
    /// A lowered timeout applies to this side's patience with the backup
    /// only once the backup has had time to hear of it (and to send its
    /// heartbeats faster): until then, the old one.
    old_patience: Option<(Duration, Instant)>,
    /// A timeout the backup has yet to be told.
    unsent: Option<u64>,
    backup_tunes: bool,
}

impl Tuning {
    /// `backup_tunes`: the backup answered the setup with a Tune.
    pub fn new(interval: Duration, timeout: Duration, backup_tunes: bool) -> Arc<Tuning> {
        Arc::new(Tuning {
            state: Mutex::new(TuneState {
                interval,
                timeout,
                old_patience: None,
                unsent: None,
                backup_tunes,
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, TuneState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn interval(&self) -> Duration {
        self.lock().interval
    }

    pub fn timeout(&self) -> Duration {
        self.lock().timeout
    }

    /// How often to say we are alive when there is nothing else to send.
    pub fn heartbeat(&self) -> Duration {
        (self.timeout() / 4).max(Duration::from_millis(20))
    }

    /// How long the ack reader waits for a word from the backup.
    fn patience(&self) -> Duration {
        let mut st = self.lock();
        match st.old_patience {
            Some((old, until)) if Instant::now() < until => old,
            _ => {
                st.old_patience = None;
                st.timeout
            }
        }
    }

    /// The new timeout for the backup, once.
    fn take_unsent(&self) -> Option<u64> {
        self.lock().unsent.take()
    }

    /// Changes the interval (from the next epoch) and the timeout (here at
    /// once when raised; the backup with its next frame). A timeout needs
    /// a backup that takes one.
    pub fn set(&self, interval: Option<Duration>, timeout: Option<Duration>) -> Result<(), String> {
        let mut st = self.lock();
        if let Some(t) = timeout {
            if !st.backup_tunes {
                return Err(
                    "the backup's agent cannot change the timeout of a running session (it is older): stop and protect again with the new --timeout, or upgrade it".into(),
                );
            }
            let ms = t.as_millis() as u64;
            if !(remus_proto::MIN_TUNE_TIMEOUT_MS..=remus_proto::MAX_TUNE_TIMEOUT_MS).contains(&ms)
            {
                return Err(format!(
                    "timeout {ms} ms is out of range {}..={}",
                    remus_proto::MIN_TUNE_TIMEOUT_MS,
                    remus_proto::MAX_TUNE_TIMEOUT_MS
                ));
            }
            if t < st.timeout {
                // Until the backup's faster heartbeats can have arrived.
                let old = st.timeout;
                st.old_patience = Some((old, Instant::now() + old));
            }
            st.timeout = t;
            st.unsent = Some(ms);
        }
        if let Some(i) = interval {
            st.interval = i;
        }
        Ok(())
    }
}

/// See [`ProtectConfig::hand_over`].
#[derive(Clone)]
pub struct HandOver(pub Arc<dyn Fn() + Send + Sync>);

impl std::fmt::Debug for HandOver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HandOver")
    }
}

/// See [`ProtectConfig::hold_on_loss`].
#[derive(Clone)]
pub struct OnHold {
    /// Called just before the guest is fenced.
    pub hook: Arc<dyn Fn() + Send + Sync>,
    /// An orderly stop holds too: the backup may take the VM over without
    /// waiting for a lease (the arbiter's fast takeover), and the Done
    /// that tells it not to may have been lost with the link.
    pub on_stop: bool,
}

impl std::fmt::Debug for OnHold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OnHold")
    }
}

/// See [`ProtectConfig::on_commit`].
#[derive(Clone)]
pub struct OnCommit(pub Arc<dyn Fn(Epoch) + Send + Sync>);

impl std::fmt::Debug for OnCommit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OnCommit")
    }
}

/// Why the primary lost its backup.
#[derive(Debug, Clone, PartialEq)]
pub enum LostBackup {
    /// No frame (not even a heartbeat) within the timeout.
    Silent,
    /// The connection closed or failed while reading.
    Closed(String),
    /// The backup stopped the session with an Error.
    Reported { code: ErrorCode, message: String },
    /// The backup sent a frame the session does not allow here.
    Unexpected(MsgType),
    /// Sending to the backup failed.
    SendFailed { what: String, error: String },
    /// The sender stopped before the epoch loop did (after a send failure
    /// whose reason was already recorded, or a bug).
    SenderStopped,
    /// The backup answered a switch-over with Done: it runs the VM.
    TookOver,
    /// The last checkpoint before a switch-over was not acknowledged in
    /// time; the guest runs on here.
    NoAck(Epoch),
    /// A switch-over the backup did not confirm, settled by the arbiter in
    /// favour of this host (the text says how).
    SwitchOverFailed(String),
}

impl std::fmt::Display for LostBackup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LostBackup::Silent => f.write_str("no word from the backup within the timeout"),
            LostBackup::Closed(e) => write!(f, "backup connection: {e}"),
            LostBackup::Reported { code, message } => {
                write!(f, "backup reported {code}: {message}")
            }
            LostBackup::Unexpected(t) => write!(f, "unexpected {t:?} from the backup"),
            LostBackup::SendFailed { what, error } => write!(f, "{what}: {error}"),
            LostBackup::SenderStopped => f.write_str("the sender stopped"),
            LostBackup::TookOver => f.write_str("the backup took the VM over (switch-over)"),
            LostBackup::NoAck(epoch) => write!(
                f,
                "the last checkpoint ({epoch}) was not acknowledged in time"
            ),
            LostBackup::SwitchOverFailed(why) => f.write_str(why),
        }
    }
}

/// How a protection session ended.
#[derive(Debug, Clone)]
pub enum ProtectEnd {
    /// The operator stopped it; the backup was told (it does not fail over).
    Stopped,
    /// The backup or the link failed; the VM runs on unprotected.
    BackupLost(LostBackup),
    /// The backup runs the VM now (planned switch-over); the guest here is
    /// stopped for good at `epoch` and must not run again.
    SwitchedOver { epoch: u64, downtime_ms: f64 },
    /// The switch-over at `epoch` was asked and sent but the backup's
    /// answer never came: it may be running the VM. The guest here stays
    /// stopped.
    SwitchOverUnconfirmed { epoch: u64, reason: String },
    /// The backup answered the switch-over at `epoch` with an error: it
    /// does not run the VM. Returned only for a guest fenced by its
    /// [`ProtectConfig::hand_over`] (the caller resumes it once it may);
    /// any other guest is resumed here and the end is `BackupLost`.
    SwitchOverRefused { epoch: u64, reason: String },
    /// Suspended for a restart of this agent: the guest stays stopped at
    /// `epoch`, which the backup holds. `confirmed`: the backup said it
    /// keeps its standby (it answered the Suspend); if not, it may also
    /// have discarded it or, after its grace, resumed the VM: the next
    /// agent asks before the guest runs again.
    Suspended { epoch: u64, confirmed: bool },
}

/// What the epoch loop hands to the sender.
enum Outgoing {
    Checkpoint(Staged),
    /// The operator stopped protection: tell the backup not to fail over.
    Done,
    /// Protection failed while the VM runs on here: tell the backup why,
    /// so that it discards its copy instead of resuming a second one.
    Abort(String),
    /// The last checkpoint was acknowledged with the guest stopped here:
    /// the backup resumes the VM from it.
    SwitchOver(Epoch),
    /// The last checkpoint was acknowledged with the guest stopped here:
    /// the backup keeps its standby for a session that resumes from it.
    Suspend {
        epoch: Epoch,
        grace_ms: u64,
    },
}

/// What a checkpoint closes while the guest is stopped and an ack
/// releases: the disk journal's epoch and the NICs' held output.
#[derive(Clone, Copy)]
struct Edges<'a> {
    vm: &'a Vm,
    journal: &'a Journal,
    nets: &'a [Arc<OutputCommit>],
    /// Told of output held in the open epoch (output-driven epochs).
    signal: Option<&'a OutputSignal>,
    /// [`ProtectConfig::hold_on_loss`] is set: see [`Edges::lost`].
    hold_on_loss: bool,
}

impl Edges<'_> {
    /// With the guest stopped for checkpoint `epoch`: later disk writes
    /// and frames belong to the next epoch.
    fn cut(&self, epoch: Epoch) -> Result<(), ReplError> {
        self.journal.cut(epoch).map_err(ReplError::Protocol)?;
        if let Some(s) = self.signal {
            s.clear();
        }
        for n in self.nets {
            n.cut(epoch);
        }
        Ok(())
    }

    /// The backup holds `epoch`: its output may leave.
    fn acked(&self, epoch: Epoch) {
        for n in self.nets {
            n.release(epoch);
        }
    }

    /// The ack reader lost the backup for `why`. When the backup may
    /// resume the VM and the session holds on a loss, its output stays
    /// held: the session's end decides (it fences the guest, or it lets
    /// the output go with [`Edges::end`]). Otherwise as `end`.
    fn lost(&self, why: &LostBackup) {
        if self.hold_on_loss && !matches!(why, LostBackup::Reported { .. } | LostBackup::TookOver) {
            return self.close();
        }
        self.end();
    }

    /// The journal closes and no epoch is signalled any more; held output
    /// stays held.
    fn close(&self) {
        self.journal.close();
        for n in self.nets {
            n.set_signal(None);
        }
    }

    /// No backup will acknowledge anything more: the journal closes and
    /// held output goes out (the VM runs on alone) — unless a fence (the
    /// arbiter's, or a hold after the loss) holds the VM: its
    /// unacknowledged output may come from a state another host never had
    /// and may already have superseded. The agent releases it if the fence
    /// is lifted, drops it if another host took over.
    fn end(&self) {
        self.close();
        if self.vm.is_fenced() {
            tracing::warn!(vm = %self.vm.name(), held = self.nets.iter().map(|n| n.held()).sum::<usize>(), "backup gone while the VM is fenced: held output stays held");
            return;
        }
        for n in self.nets {
            n.go_live();
        }
    }
}

/// What the epoch loop, the sender and the ack reader share.
struct Shared {
    state: Mutex<State>,
    /// The epoch loop's waits: the hand-off slot emptied, an ack, disk
    /// digests, the backup lost, a thread ended.
    changed: Condvar,
    /// The sender's: a hand-off, a queued disk record, the end.
    doorbell: Arc<Doorbell>,
}

#[derive(Default)]
struct State {
    /// The hand-off: at most one item waits for the sender.
    outgoing: Option<Outgoing>,
    /// The epoch loop hands over nothing more.
    finished: bool,
    /// Checkpoints sent and not yet acknowledged: epoch → (stats so far,
    /// End sent at).
    in_flight: HashMap<u64, (CheckpointStats, Instant)>,
    /// The highest epoch the backup acknowledged.
    acked_up_to: Option<u64>,
    /// From the last acknowledged checkpoint's End to its ack.
    last_ack: Option<Duration>,
    /// An ack read before the sender recorded its checkpoint in
    /// `in_flight` (the sender is between that checkpoint's End frame and
    /// the record, e.g. descheduled): its epoch and when it was read. The
    /// sender then reports that checkpoint itself.
    early_ack: Option<(u64, Instant)>,
    /// Checkpoints acknowledged (the initial copy not counted).
    committed: u64,
    /// The backup answered a switch-over with Done: it runs the VM now.
    switched: bool,
    /// Why the backup was lost; the first reason stands.
    lost: Option<LostBackup>,
    /// The backup's chunk digests for the initial disk sync, in order.
    digests: VecDeque<DiskDigests>,
    sender_done: bool,
    reader_done: bool,
}

impl State {
    /// The backup acknowledged `epoch` (read at `read_at`): the
    /// checkpoint's report with its ack time, if the sender has recorded
    /// it. A checkpoint's ack can overtake its record (see `early_ack`);
    /// an initial copy is never recorded, and its ack is reported by no
    /// one.
    fn take_acked(&mut self, epoch: Epoch, read_at: Instant) -> Option<CheckpointStats> {
        match self.in_flight.remove(&epoch.0) {
            Some((stats, end_sent)) => Some(self.acked_report(stats, end_sent, read_at)),
            None => {
                if epoch.0 > 0 {
                    self.early_ack = Some((epoch.0, read_at));
                }
                None
            }
        }
    }

    /// The sender sent checkpoint `epoch`, its End frame at `end_sent`:
    /// recorded as in flight, or, if its ack was read already, its report
    /// with the ack time (the caller publishes it).
    fn record_sent(
        &mut self,
        epoch: u64,
        stats: CheckpointStats,
        end_sent: Instant,
    ) -> Option<CheckpointStats> {
        match self.early_ack {
            Some((e, read_at)) if e == epoch => {
                self.early_ack = None;
                Some(self.acked_report(stats, end_sent, read_at))
            }
            _ => {
                self.in_flight.insert(epoch, (stats, end_sent));
                None
            }
        }
    }

    /// An acknowledged checkpoint's report: its End frame went out at
    /// `end_sent`, its ack was read at `read_at`.
    fn acked_report(
        &mut self,
        mut stats: CheckpointStats,
        end_sent: Instant,
        read_at: Instant,
    ) -> CheckpointStats {
        let ack = read_at.saturating_duration_since(end_sent);
        self.last_ack = Some(ack);
        stats.ack_ms = ack.as_secs_f64() * 1e3;
        stats
    }
}

/// What the sender finds in the hand-off slot.
enum Next {
    Item(Outgoing),
    Empty,
    /// Empty, and nothing more will come.
    Finished,
}

impl Shared {
    fn new() -> Shared {
        Shared {
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
            doorbell: Arc::new(Doorbell::new()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Changes the state and wakes the epoch loop's waits. The sender's
    /// doorbell rings only for what the sender acts on: a hand-off and
    /// [`finish`](Self::finish).
    fn update<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        let out = f(&mut self.lock());
        self.changed.notify_all();
        out
    }

    /// The epoch loop hands over nothing more: the sender ends once the
    /// slot is empty.
    fn finish(&self) {
        self.update(|s| s.finished = true);
        self.doorbell.ring();
    }

    fn lost(&self) -> Option<LostBackup> {
        self.lock().lost.clone()
    }

    /// The session is ending: the epoch loop hands over nothing more, or
    /// the backup is lost.
    fn ending(&self) -> bool {
        let st = self.lock();
        st.finished || st.lost.is_some()
    }

    /// Records why the backup is lost (the first reason stands).
    fn lose(&self, why: LostBackup) {
        self.update(|s| {
            s.lost.get_or_insert(why);
        });
    }

    /// Waits for `ready` (or `within`), giving up with the reason once the
    /// backup is lost. Returns whether `ready` held.
    fn wait_for(
        &self,
        within: Duration,
        ready: impl Fn(&State) -> bool,
    ) -> Result<(MutexGuard<'_, State>, bool), ReplError> {
        let (st, _) = self
            .changed
            .wait_timeout_while(self.lock(), within, |s| !ready(s) && s.lost.is_none())
            .unwrap_or_else(|p| p.into_inner());
        if ready(&st) {
            return Ok((st, true));
        }
        if let Some(why) = &st.lost {
            return Err(ReplError::BackupLost(why.clone()));
        }
        Ok((st, false))
    }

    /// Hands `item` to the sender, waiting while the slot is taken (the
    /// back-pressure that delays the next epoch), giving up as soon as the
    /// backup is lost.
    fn hand_off(&self, item: Outgoing) -> Result<(), ReplError> {
        let mut st = self.lock();
        loop {
            if let Some(why) = &st.lost {
                return Err(ReplError::BackupLost(why.clone()));
            }
            if st.sender_done {
                return Err(ReplError::BackupLost(LostBackup::SenderStopped));
            }
            if st.outgoing.is_none() {
                st.outgoing = Some(item);
                drop(st);
                self.doorbell.ring();
                return Ok(());
            }
            st = self.changed.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Hands the session's last word to the sender, lost backup or not;
    /// false if the sender is gone.
    fn hand_off_last(&self, item: Outgoing) -> bool {
        let mut st = self.lock();
        while st.outgoing.is_some() && !st.sender_done {
            st = self.changed.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        if st.sender_done {
            return false;
        }
        st.outgoing = Some(item);
        drop(st);
        self.doorbell.ring();
        true
    }

    /// The sender's side of the hand-off.
    fn next(&self) -> Next {
        let mut st = self.lock();
        match st.outgoing.take() {
            Some(item) => {
                drop(st);
                self.changed.notify_all();
                Next::Item(item)
            }
            None if st.finished => Next::Finished,
            None => Next::Empty,
        }
    }

    /// Waits until `epoch` has been acknowledged (true), or `within`
    /// passes (false); an error once the backup is lost.
    fn wait_acked(&self, epoch: Epoch, within: Duration) -> Result<bool, ReplError> {
        self.wait_for(within, |s| s.acked_up_to.is_some_and(|e| e >= epoch.0))
            .map(|(_, acked)| acked)
    }

    /// The backup's next disk digests, if they come `within`.
    fn next_digests(&self, within: Duration) -> Result<Option<DiskDigests>, ReplError> {
        let (mut st, ready) = self.wait_for(within, |s| !s.digests.is_empty() || s.reader_done)?;
        match st.digests.pop_front() {
            Some(d) => Ok(Some(d)),
            None if ready => {
                Err(ReplError::BackupLost(st.lost.clone().unwrap_or(
                    LostBackup::Closed("closed during the disk sync".into()),
                )))
            }
            None => Ok(None),
        }
    }

    /// Waits until the ack reader has ended, or `deadline`.
    fn wait_reader_done(&self, within: Duration) {
        let _ = self
            .changed
            .wait_timeout_while(self.lock(), within, |s| !s.reader_done)
            .unwrap_or_else(|p| p.into_inner());
    }
}

/// Runs protection until `stop` is set or the backup is lost. `stream` is
/// an authenticated session to the backup.
pub fn protect(
    vm: &Vm,
    stream: Channel,
    cfg: &ProtectConfig,
    stop: &AtomicBool,
    events: &(dyn Fn(SessionEvent) + Sync),
) -> Result<ProtectEnd, ReplError> {
    let mut capture = Capture::open(vm, devstate::PROTECT_SAVE, cfg.devices_only_state)?;
    let pool = capture.pool.clone();
    let (writer, reader, closer) = open_link(stream, cfg.tuning.timeout())?;
    let shared = Shared::new();
    // One bucket for the whole initial copy: the disk sync, then RAM.
    let pacer = cfg.max_rate.map(SharedPacer::new);
    // From here on the guest's disk writes are journaled (epoch 1 on, or
    // the one after the resumed checkpoint).
    let first_epoch = Epoch(cfg.resume_from.map_or(0, |e| e.0) + 1);
    let disks = PrimaryDisks::start(
        vm,
        cfg.replicate_disks,
        shared.doorbell.clone(),
        first_epoch,
    );
    // A resumed session has nothing to sync: the backup's disks hold the
    // resumed checkpoint, and the guest has written nothing since.
    let sync_runs = match cfg.resume_from {
        Some(_) => Vec::new(),
        None => announce_disk_sync(&disks, cfg, &writer)?,
    };
    // Network output: held per epoch from the first checkpoint on.
    let nets: Vec<Arc<OutputCommit>> = if cfg.buffer_net {
        vm.output_commits().to_vec()
    } else {
        Vec::new()
    };
    let signal = (!nets.is_empty() && cfg.min_interval.is_some()).then(OutputSignal::new);
    let signal = signal.map(Arc::new);
    for n in &nets {
        n.set_signal(signal.clone());
        n.arm();
    }
    let edges = Edges {
        vm,
        journal: &disks.journal,
        nets: &nets[..],
        signal: signal.as_deref(),
        hold_on_loss: cfg.hold_on_loss.is_some(),
    };
    let result = std::thread::scope(|s| {
        let (shared, disks, pacer) = (&shared, &disks, pacer.as_ref());
        let sender = s.spawn(move || {
            let enc = cfg.compress.map(remus_proto::delta::DeltaEncoder::new);
            sender_loop(
                writer,
                &cfg.tuning,
                (shared, events),
                disks,
                enc,
                &pool,
                pacer,
            );
        });
        let ack_reader = s.spawn(move || {
            ack_loop(
                reader,
                (&cfg.tuning, cfg.suspend.as_ref()),
                shared,
                edges,
                &disks.ports,
                cfg.on_commit.as_ref(),
                events,
            );
        });
        let session = Session {
            vm,
            cfg,
            stop,
            events,
            shared,
            edges,
            disks,
            pacer,
        };
        let end = match cfg.resume_from {
            // The backup holds the checkpoint the guest stopped at: it
            // runs again, its writes and output in the next epoch.
            Some(from) => {
                tracing::info!(vm = %vm.name(), epoch = from.0, "session resumed from the checkpoint the guest stopped at; no copy");
                resume_unless_held(vm);
                session.epoch_loop(&mut capture, from.0)
            }
            None => session
                .initial_copy(&mut capture, &sync_runs)
                .and_then(|end| match end {
                    Some(end) => Ok(end),
                    None => session.epoch_loop(&mut capture, 0),
                }),
        };
        session.teardown(end, closer, sender, ack_reader)
    });
    // Journal closed, disks back to local-only; held output released
    // unless fenced (see Edges::end).
    edges.end();
    drop(disks);
    result
}

/// The gap between checkpoints while output waits (output-driven
/// epochs), adapted to how the guest talks. A guest that sends data
/// ([`carries_data`]) early in every epoch (within half the minimum gap of
/// its start) is streaming: a bulk transfer, or large answers close enough
/// to count as one. Each checkpoint stops it for a pause whatever the
/// epoch's length, so its gap grows by half per such epoch, up to the
/// latency budget less the last checkpoint's pause and ack (the rest of a
/// frame's wait): it spends less of its time stopped and sends more per
/// checkpoint. The first epoch whose output comes later (an answer to a
/// new request, a ping) or is small frames drops the gap back to the
/// minimum: a reply to a quiet guest waits no longer than before, and a
/// guest receiving a transfer, whose output is the ACKs that open its
/// sender's window, has them held as briefly as the minimum allows (a
/// longer gap would slow the transfer in proportion).
#[derive(Debug, Clone, Copy)]
struct Gap {
    min: Option<Duration>,
    budget: Option<Duration>,
    now: Option<Duration>,
}

/// An epoch's output as the gap sees it.
#[derive(Debug, Clone, Copy)]
struct EpochStream {
    /// How long after the guest ran again its first frame was held.
    first: Duration,
    /// It is mostly data ([`carries_data`]).
    data: bool,
}

/// Frames this large on average are data (a full TCP segment is 1514
/// bytes on the wire); below it the output is mostly ACKs and short
/// answers.
const DATA_FRAME_BYTES: u64 = 512;

/// Whether an epoch's output is mostly data rather than small frames.
fn carries_data(o: &EpochOutput) -> bool {
    o.frames > 0 && o.bytes >= o.frames.saturating_mul(DATA_FRAME_BYTES)
}

impl Gap {
    fn new(min: Option<Duration>, max_latency: Option<Duration>) -> Gap {
        Gap {
            min,
            budget: max_latency.filter(|&b| min.is_some_and(|m| b > m)),
            now: min,
        }
    }

    /// This epoch's gap (`None`: output-driven epochs are off).
    fn now(&self) -> Option<Duration> {
        self.now
    }

    /// The epoch just ended with this output (`None`: it had none); the
    /// last checkpoint cost `overhead` (its pause and the ack of the last
    /// acknowledged one).
    fn observe(&mut self, output: Option<EpochStream>, overhead: Duration) {
        let (Some(min), Some(now)) = (self.min, self.now) else {
            return;
        };
        let Some(budget) = self.budget else {
            return;
        };
        let streaming = output.is_some_and(|o| o.data && o.first <= min / 2);
        let ceiling = budget.saturating_sub(overhead).max(min);
        self.now = Some(if streaming {
            (now + now / 2).min(ceiling)
        } else {
            min
        });
    }
}

/// Whether a session that ended so (`None`: with an error) leaves a
/// backup that may still resume the VM: not one the operator stopped (the
/// backup was told), one that said it gives up (an Error), nor a
/// switch-over or suspend (settled otherwise). With `on_stop`, a stop
/// counts too (see [`OnHold::on_stop`]).
fn may_resume_there(end: Option<&ProtectEnd>, on_stop: bool) -> bool {
    match end {
        Some(ProtectEnd::BackupLost(LostBackup::Reported { .. })) => false,
        Some(ProtectEnd::BackupLost(_)) | None => true,
        Some(ProtectEnd::Stopped) => on_stop,
        Some(_) => false,
    }
}

/// Sets the link's timeouts; returns the sender's, the ack reader's and a
/// handle to shut it down.
fn open_link(stream: Channel, timeout: Duration) -> Result<(Channel, Channel, Channel), ReplError> {
    stream.set_nodelay(true).ok();
    // Liveness is the backup's heartbeats: the ack reader declares it lost
    // after `timeout` of silence and shuts the socket down, which also
    // frees a sender blocked in a write. A backup that is alive but busy
    // (applying a large epoch to a slow disk) is waited for; only one that
    // stops reading for much longer while still sending heartbeats (a
    // stuck receiver) is given up by the write timeout.
    let write_timeout = (timeout * 15).max(Duration::from_secs(30));
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|()| stream.set_write_timeout(Some(write_timeout)))
        .map_err(|e| ReplError::Io("set timeout".into(), e))?;
    let clone = || {
        stream
            .try_clone()
            .map_err(|e| ReplError::Io("clone stream".into(), e))
    };
    let (reader, closer) = (clone()?, clone()?);
    Ok((stream, reader, closer))
}

/// What the disk sync compares, told to the backup for a changed-only
/// sync. The change records are read after journaling started: a write
/// before is in them, a write after is in the journal (and applied after
/// the sync data).
fn announce_disk_sync(
    disks: &PrimaryDisks,
    cfg: &ProtectConfig,
    stream: &Channel,
) -> Result<Vec<Vec<(u64, u64)>>, ReplError> {
    if !disks.active() {
        return Ok(Vec::new());
    }
    for p in &disks.ports {
        if let Some(al) = p.activity_log() {
            al.new_session();
        }
    }
    let Some(theirs) = &cfg.changed_sync else {
        return Ok(crate::disks::sync_runs(disks, None));
    };
    let runs = crate::disks::changed_runs(disks, theirs);
    for (i, r) in runs.iter().enumerate() {
        Message::DiskSyncRuns(remus_proto::DiskSyncRuns {
            disk: i as u16,
            chunk_size: remus_disk::sync::CHUNK_SIZE,
            runs: r.clone(),
        })
        .write_to(&mut &*stream)?;
    }
    Ok(runs)
}

/// The epoch loop's view of a running session.
struct Session<'s> {
    vm: &'s Vm,
    cfg: &'s ProtectConfig,
    stop: &'s AtomicBool,
    events: &'s (dyn Fn(SessionEvent) + Sync),
    shared: &'s Shared,
    edges: Edges<'s>,
    disks: &'s PrimaryDisks,
    /// The initial copy's rate cap ([`ProtectConfig::max_rate`]).
    pacer: Option<&'s SharedPacer>,
}

/// How the epoch loop ended.
enum LoopEnd {
    Stopped,
    Lost(LostBackup),
    /// The switch-over at `epoch` was handed to the sender; the guest has
    /// been stopped here since `since`.
    SwitchOverSent {
        epoch: Epoch,
        since: Instant,
    },
    /// The Suspend at `epoch` was handed to the sender; the guest stays
    /// stopped.
    SuspendSent {
        epoch: Epoch,
    },
}

impl Session<'_> {
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// Stopped, or asked to suspend before the first checkpoint: a
    /// session still making its initial copy cannot be suspended (the
    /// backup holds nothing to resume from), so it ends in order instead.
    fn stopped_during_copy(&self) -> bool {
        self.stopped() || self.suspend_requested() || self.backup_ends()
    }

    /// The backup's restart is not honoured: the session ends in order.
    fn backup_ends(&self) -> bool {
        self.cfg
            .suspend
            .as_ref()
            .is_some_and(|s| s.end.load(Ordering::SeqCst))
    }

    /// Phase 2: disks, then RAM, while the guest runs. `Some` if the
    /// session ended meanwhile.
    fn initial_copy(
        &self,
        capture: &mut Capture<'_>,
        sync_runs: &[Vec<(u64, u64)>],
    ) -> Result<Option<LoopEnd>, ReplError> {
        let t = Instant::now();
        let name = self.vm.name();
        // Disks first: only the chunks that differ from the backup's copy
        // are sent; guest writes meanwhile are journaled for epoch 1 and
        // applied after them.
        if self.disks.active() {
            self.disk_sync(sync_runs)?;
        }
        // Every page holding data, read as it goes out while the guest
        // runs; pages written meanwhile are caught by the first
        // checkpoint's scan.
        let lazy = capture.all_pages()?;
        let t_copy = Instant::now();
        let pages = lazy.page_count();
        let bytes = pages * remus_proto::PAGE_SIZE as u64;
        self.shared.hand_off(Outgoing::Checkpoint(Staged::precopy(
            Epoch(0),
            CheckpointKind::InitialSync,
            Vec::new(),
            Some(lazy),
        )))?;
        tracing::info!(vm = %name, pages, max_rate = ?self.cfg.max_rate, "initial copy of RAM under way");
        // Checkpoints start once the backup holds the initial copy. Until
        // the first checkpoint's cut the guest's output flows unheld
        // (nothing can fail over before a first commit), so a long initial
        // copy (a resync, a large VM) is no stall for its clients; the
        // first checkpoint then carries what the guest dirtied meanwhile.
        // The operator's stop is looked at every 100 ms.
        while !self
            .shared
            .wait_acked(Epoch(0), Duration::from_millis(100))?
        {
            if self.stopped_during_copy() {
                return Ok(Some(LoopEnd::Stopped));
            }
        }
        // The copy's time is until the backup holds it (pages are read and
        // sent as they go out).
        let copy_ms = t_copy.elapsed().as_secs_f64() * 1e3;
        (self.events)(SessionEvent::InitialSync {
            pages,
            bytes,
            ms: copy_ms,
        });
        tracing::info!(vm = %name, ms = copy_ms, setup_ms = t.elapsed().as_secs_f64() * 1e3, "initial copy acknowledged; checkpoints start");
        Ok(None)
    }

    /// The chunks of the replicated disks that differ from the backup's.
    fn disk_sync(&self, sync_runs: &[Vec<(u64, u64)>]) -> Result<(), ReplError> {
        let journal = &self.disks.journal;
        let stats = crate::disks::initial_sync(
            self.disks,
            if self.cfg.changed_sync.is_some() {
                remus_api::SyncMode::Changed
            } else {
                remus_api::SyncMode::Full
            },
            sync_runs,
            &mut || {
                // No deadline of its own: hashing a large disk takes the
                // backup a while, and its heartbeats (watched by the ack
                // reader) say it is alive. The operator's stop is looked
                // at every 100 ms.
                loop {
                    if self.stopped_during_copy() {
                        return Err(ReplError::Setup(
                            "stopped (by the operator, or for an agent's restart) during the initial disk sync".into(),
                        ));
                    }
                    if let Some(d) = self.shared.next_digests(Duration::from_millis(100))? {
                        return Ok(d);
                    }
                }
            },
            &mut |rec| {
                // Capped here, where the sync's data enters the journal:
                // the sender passes it on as it comes, and the journal
                // stays free for the guest's own writes.
                let bytes = crate::pace::record_bytes(&rec);
                if !journal.push_sync(rec) {
                    return Err(ReplError::BackupLost(
                        self.shared
                            .lost()
                            .unwrap_or(LostBackup::Closed("the disk journal closed".into())),
                    ));
                }
                if let Some(p) = self.pacer {
                    if self.stopped_during_copy() {
                        return Err(ReplError::Setup(
                            "stopped (by the operator, or for an agent's restart) during the initial disk sync".into(),
                        ));
                    }
                    p.pace(bytes);
                }
                Ok(())
            },
            &mut |p| (self.events)(SessionEvent::DiskSync(p)),
        )?;
        tracing::info!(vm = %self.vm.name(), mode = ?stats.mode, chunks = stats.chunks, disk_chunks = stats.disk_chunks, differing = stats.differing_chunks, sent_bytes = stats.sent_bytes, ms = stats.ms, "initial disk sync queued");
        (self.events)(SessionEvent::DiskSynced(stats));
        Ok(())
    }

    /// Phase 3: one checkpoint per interval until the operator stops, the
    /// backup is lost, or a switch-over is asked.
    fn epoch_loop(&self, capture: &mut Capture<'_>, from: u64) -> Result<LoopEnd, ReplError> {
        let mut last_start = Instant::now();
        let mut epoch = from;
        // Set once a checkpoint has captured an operator-paused guest: its
        // state cannot change until it is unpaused, and QEMU will not save
        // it twice (it stays in `postmigrate`), so further checkpoints wait
        // for the unpause; heartbeats go on.
        let mut captured_paused: Option<u64> = None;
        let mut gap = Gap::new(self.cfg.min_interval, self.cfg.max_latency);
        let mut resumed = last_start;
        loop {
            if self.stopped() || self.backup_ends() {
                return Ok(LoopEnd::Stopped);
            }
            if let Some(why) = self.shared.lost() {
                return Ok(LoopEnd::Lost(why));
            }
            if !self.suspend_requested() {
                let output = self.wait_epoch_end(last_start, gap.now());
                let last_ack = self.shared.lock().last_ack;
                gap.observe(
                    output.map(|o| EpochStream {
                        first: o
                            .first
                            .map(|f| f.saturating_duration_since(resumed))
                            .unwrap_or_default(),
                        data: carries_data(&o),
                    }),
                    resumed.saturating_duration_since(last_start) + last_ack.unwrap_or_default(),
                );
            }
            let suspend = self.suspend_requested();
            // A guest held paused (the operator, the fence) is not
            // suspended: its session ends as usual.
            if suspend && self.vm.is_held() {
                return Ok(LoopEnd::Stopped);
            }
            if captured_paused.is_some() && captured_paused == self.vm.hold_generation() {
                last_start = Instant::now();
                continue;
            }
            epoch += 1;
            let last = suspend || self.cfg.switch_over.load(Ordering::SeqCst);
            let t_stop = Instant::now();
            last_start = t_stop;
            let staged = {
                // An operator's pause or unpause cannot interleave with
                // the checkpoint's stop and cont.
                let (_guard, held) = self.vm.checkpoint_guard();
                let epoch = Epoch(epoch);
                capture.take_checkpoint(
                    epoch,
                    held,
                    self.edges.journal,
                    &|| self.edges.cut(epoch),
                    last,
                    Vec::new(),
                    None,
                )?
            };
            resumed = Instant::now();
            captured_paused = staged.operator_paused;
            self.shared.hand_off(Outgoing::Checkpoint(staged))?;
            if suspend {
                return self.suspend(Epoch(epoch));
            }
            if last {
                return self.switch_over(Epoch(epoch), t_stop);
            }
        }
    }

    /// Waits until the open epoch (whose checkpoint began at `last_start`)
    /// should end: at the interval after it; with output-driven epochs
    /// sooner, once the guest has output waiting and the minimum interval
    /// has passed. A checkpoint that took longer than the interval (a
    /// slow link) is followed at once, never by a burst of catch-ups.
    ///
    /// `min` is the gap of this epoch ([`Gap::now`]). Returns the epoch's
    /// output as it ends, if it had any.
    fn wait_epoch_end(&self, last_start: Instant, min: Option<Duration>) -> Option<EpochOutput> {
        let latest = last_start + self.cfg.tuning.interval();
        // A suspend (the agent stops) is looked for every 50 ms: a long
        // interval must not hold up the agent's stop.
        const LOOK: Duration = Duration::from_millis(50);
        let until = |t: Instant| loop {
            if self.suspend_requested() {
                return;
            }
            match t.checked_duration_since(Instant::now()) {
                Some(d) if !d.is_zero() => std::thread::sleep(d.min(LOOK)),
                _ => return,
            }
        };
        let (Some(signal), Some(min)) = (self.edges.signal, min) else {
            until(latest);
            return None;
        };
        // Output waits: end the epoch once the minimum has passed.
        loop {
            if self.suspend_requested() {
                return None;
            }
            let now = Instant::now();
            if now >= latest {
                return None;
            }
            if signal.wait_first(latest.min(now + LOOK)).is_some() {
                until((last_start + min).min(latest));
                return Some(signal.so_far());
            }
        }
    }

    fn suspend_requested(&self) -> bool {
        self.cfg
            .suspend
            .as_ref()
            .is_some_and(|s| s.requested.load(Ordering::SeqCst))
    }

    /// The agent restarts: the last checkpoint (`epoch`) was handed over
    /// with the guest left stopped; once the backup acknowledges it, it is
    /// asked to keep its standby. Without the ack the guest runs on here
    /// and the session fails as usual.
    fn suspend(&self, epoch: Epoch) -> Result<LoopEnd, ReplError> {
        let Some(s) = &self.cfg.suspend else {
            return Err(ReplError::Protocol(
                "suspend without a resumable backup".into(),
            ));
        };
        self.last_acked(epoch, "suspend")?;
        let grace_ms = (s.grace.as_millis() as u64).clamp(
            remus_proto::MIN_SUSPEND_GRACE_MS,
            remus_proto::MAX_SUSPEND_GRACE_MS,
        );
        self.shared
            .hand_off_last(Outgoing::Suspend { epoch, grace_ms });
        Ok(LoopEnd::SuspendSent { epoch })
    }

    /// Waits for the ack of the last checkpoint (`epoch`), taken with the
    /// guest left stopped for a switch-over or a suspend (`what`); without
    /// it the guest runs on here and the session fails as usual.
    fn last_acked(&self, epoch: Epoch, what: &str) -> Result<(), ReplError> {
        let acked = self
            .shared
            .wait_acked(epoch, self.cfg.tuning.timeout() * 4)
            .and_then(|acked| {
                acked
                    .then_some(())
                    .ok_or(ReplError::BackupLost(LostBackup::NoAck(epoch)))
            });
        if let Err(e) = &acked {
            resume_unless_held(self.vm);
            tracing::warn!(vm = %self.vm.name(), error = %e, "{what} abandoned before it was sent; the VM runs on here");
        }
        acked
    }

    /// Phase 4: the last checkpoint (`epoch`) was handed over with the
    /// guest left stopped; once the backup acknowledges it, the backup is
    /// told to resume the VM from it.
    fn switch_over(&self, epoch: Epoch, since: Instant) -> Result<LoopEnd, ReplError> {
        self.last_acked(epoch, "switch-over")?;
        if let Some(h) = &self.cfg.hand_over {
            (h.0)();
        }
        self.shared.hand_off_last(Outgoing::SwitchOver(epoch));
        Ok(LoopEnd::SwitchOverSent { epoch, since })
    }

    /// Phase 5: says goodbye, waits for the threads, and tells how the
    /// session ended.
    fn teardown(
        &self,
        end: Result<LoopEnd, ReplError>,
        closer: Channel,
        sender: std::thread::ScopedJoinHandle<'_, ()>,
        ack_reader: std::thread::ScopedJoinHandle<'_, ()>,
    ) -> Result<ProtectEnd, ReplError> {
        let said_goodbye = match &end {
            Ok(LoopEnd::Stopped) => self.shared.hand_off_last(Outgoing::Done),
            // Protection failed but the guest runs on here: the backup
            // must hear it, or it would take the silence for a dead
            // primary and resume a second copy.
            Err(e) if self.vm.runs_on() => {
                self.shared.hand_off_last(Outgoing::Abort(e.to_string()))
            }
            _ => false,
        };
        // Any other end (VM destroyed or failed, tracking lost) just drops
        // the link: to the backup that is a failed primary, and it fails
        // over, as the Remus docs specify for `destroy` on the primary.
        self.shared.finish();
        let _ = sender.join();
        if said_goodbye {
            // The Done (or Error) may still sit in our send queue behind
            // the tail of a checkpoint. Shutting our read side now would
            // make the kernel answer the backup's next heartbeat or ack
            // with a reset that throws that queue away: the backup would
            // see a lost primary and fail over. So keep reading until the
            // backup, having read the goodbye, closes its end (the ack
            // reader then ends), within a bound.
            self.shared
                .wait_reader_done((self.cfg.tuning.timeout() * 2).max(Duration::from_secs(5)));
        }
        if let Ok(LoopEnd::SwitchOverSent { .. } | LoopEnd::SuspendSent { .. }) = &end {
            // The backup answers a switch-over with Done once the VM runs
            // there, or with an Error if it could not resume it.
            self.shared.wait_reader_done(self.cfg.tuning.timeout() * 4);
        }
        // Wake the ack reader (it may be waiting on a backup that already
        // said goodbye or died).
        let _ = closer.shutdown(std::net::Shutdown::Read);
        let _ = ack_reader.join();
        let (lost, switched, committed, unacked) = {
            let st = self.shared.lock();
            (
                st.lost.clone(),
                st.switched,
                st.committed,
                st.in_flight.len(),
            )
        };
        // The backup may hold a committed checkpoint: one was acknowledged,
        // or one was sent whose ack has not come (the backup may have
        // committed it and lost the link before its ack arrived).
        let backup_may_hold = committed > 0 || unacked > 0 || self.cfg.resume_from.is_some();
        let end = match end {
            Ok(LoopEnd::Stopped) => ProtectEnd::Stopped,
            Ok(LoopEnd::Lost(why)) | Err(ReplError::BackupLost(why)) => ProtectEnd::BackupLost(why),
            Ok(LoopEnd::SwitchOverSent { epoch, since }) => {
                return Ok(self.switch_over_answer(epoch, since, switched, lost));
            }
            // The backup answers a Suspend with Done (its standby kept).
            Ok(LoopEnd::SuspendSent { epoch }) => {
                return Ok(ProtectEnd::Suspended {
                    epoch: epoch.0,
                    confirmed: switched,
                });
            }
            Err(e) => {
                self.hold_after_loss(None, backup_may_hold);
                return Err(e);
            }
        };
        self.hold_after_loss(Some(&end), backup_may_hold);
        match &end {
            ProtectEnd::Stopped => (self.events)(SessionEvent::Stopped {
                checkpoints: committed,
            }),
            ProtectEnd::BackupLost(why) => (self.events)(SessionEvent::BackupLost {
                reason: why.to_string(),
            }),
            _ => {}
        }
        Ok(end)
    }

    /// Under a cluster manager or an arbiter
    /// ([`ProtectConfig::hold_on_loss`]): fences the guest when the backup
    /// may resume it, before the session's end is told (so that whoever
    /// hears of it sees the VM held).
    fn hold_after_loss(&self, end: Option<&ProtectEnd>, backup_may_hold: bool) {
        let Some(hook) = &self.cfg.hold_on_loss else {
            return;
        };
        if backup_may_hold && may_resume_there(end, hook.on_stop) {
            if matches!(end, Some(ProtectEnd::Stopped)) {
                tracing::info!(vm = %self.vm.name(), "protection stopped: the guest is paused, its output held, until the arbiter's key is pinned to this host (the backup may not have read the stop)");
            } else {
                tracing::warn!(vm = %self.vm.name(), "backup lost holding a checkpoint it may resume: the guest is fenced, its output held, until the backup is known not to run the VM");
            }
            (hook.hook)();
            if let Err(e) = self.vm.fence() {
                tracing::error!(vm = %self.vm.name(), error = %e, "cannot pause the guest after the backup's loss");
            }
        }
    }

    /// What the backup made of the switch-over at `epoch`.
    fn switch_over_answer(
        &self,
        epoch: Epoch,
        since: Instant,
        switched: bool,
        lost: Option<LostBackup>,
    ) -> ProtectEnd {
        if switched {
            let downtime_ms = since.elapsed().as_secs_f64() * 1e3;
            (self.events)(SessionEvent::SwitchedOver {
                epoch: epoch.0,
                downtime_ms: Some(downtime_ms),
                confirmed_by: None,
            });
            return ProtectEnd::SwitchedOver {
                epoch: epoch.0,
                downtime_ms,
            };
        }
        match lost {
            // It said it could not resume: nothing runs there. A guest
            // fenced by a hand-over runs again only once the caller has
            // its arbiter key back.
            Some(why @ LostBackup::Reported { .. }) => {
                if self.vm.is_fenced() {
                    ProtectEnd::SwitchOverRefused {
                        epoch: epoch.0,
                        reason: why.to_string(),
                    }
                } else {
                    resume_unless_held(self.vm);
                    ProtectEnd::BackupLost(why)
                }
            }
            other => ProtectEnd::SwitchOverUnconfirmed {
                epoch: epoch.0,
                reason: other.map_or_else(|| "no answer from the backup".into(), |w| w.to_string()),
            },
        }
    }
}

/// Everything an acknowledgement of `epoch` means, in order: the backup
/// holds that state, so the output it produced may leave; the epoch is
/// no longer in flight; the activity logs may forget the extents written
/// up to it; the caller's copy record learns of the commit; the checkpoint
/// is reported with its ack time. Epoch 0 (the initial copy) only
/// releases the epoch loop.
fn acknowledged(
    epoch: Epoch,
    shared: &Shared,
    edges: Edges<'_>,
    ports: &[Arc<DiskPort>],
    on_commit: Option<&OnCommit>,
    events: &(dyn Fn(SessionEvent) + Sync),
) {
    // Output commit.
    edges.acked(epoch);
    let entry = shared.update(|s| {
        s.acked_up_to = Some(s.acked_up_to.unwrap_or(0).max(epoch.0));
        if epoch.0 > 0 {
            s.committed += 1;
        }
        s.take_acked(epoch, Instant::now())
    });
    if epoch.0 == 0 {
        return;
    }
    for p in ports {
        if let Some(al) = p.activity_log()
            && let Err(e) = al.acked(epoch)
        {
            tracing::warn!(vm = %edges.vm.name(), disk = %p.target(), error = %e, "activity log");
        }
    }
    if let Some(c) = on_commit {
        (c.0)(epoch);
    }
    if let Some(stats) = entry {
        events(SessionEvent::Checkpoint(stats));
    }
}

/// Reads the backup's acks, heartbeats and disk digests until it is lost
/// or the session ends.
fn ack_loop(
    mut r: Channel,
    (tuning, suspend): (&Tuning, Option<&Suspending>),
    shared: &Shared,
    edges: Edges<'_>,
    ports: &[Arc<DiskPort>],
    on_commit: Option<&OnCommit>,
    events: &(dyn Fn(SessionEvent) + Sync),
) {
    let mut patience = tuning.patience();
    let why = loop {
        let now = tuning.patience();
        if now != patience {
            if let Err(e) = r.set_read_timeout(Some(now)) {
                break LostBackup::Closed(format!("set timeout: {e}"));
            }
            patience = now;
        }
        match Message::read_from(&mut r) {
            Ok(Message::Ack { epoch }) => {
                acknowledged(epoch, shared, edges, ports, on_commit, events);
            }
            Ok(Message::Heartbeat { .. }) => {}
            Ok(Message::DiskDigests(d)) => shared.update(|s| s.digests.push_back(d)),
            // The backup's agent restarts: suspending the session keeps
            // its standby (the epoch loop does it at the next checkpoint).
            Ok(Message::Restarting) if suspend.is_some_and(|s| s.backup_may_restart) => {
                tracing::info!(vm = %edges.vm.name(), "the backup's agent is restarting: suspending the session so that it keeps its standby");
                if let Some(s) = suspend {
                    s.requested.store(true, Ordering::SeqCst);
                    s.backup_restarting.store(true, Ordering::SeqCst);
                }
            }
            Ok(Message::Restarting) if suspend.is_some() => {
                tracing::warn!(vm = %edges.vm.name(), "the backup's agent restarts again soon after its last restart: the session ends in order instead of pausing the guest again; the VM runs on unprotected until the backup answers");
                if let Some(s) = suspend {
                    s.end.store(true, Ordering::SeqCst);
                }
            }
            // The backup's answer to a switch-over: it runs the VM now.
            Ok(Message::Done) => {
                shared.update(|s| s.switched = true);
                break LostBackup::TookOver;
            }
            Ok(Message::Error { code, message }) => break LostBackup::Reported { code, message },
            Ok(other) => break LostBackup::Unexpected(other.msg_type()),
            Err(e) if e.is_timeout() => break LostBackup::Silent,
            Err(e) => break LostBackup::Closed(e.to_string()),
        }
    };
    // No backup will acknowledge anything more: the VM runs on alone, or
    // is held (see Edges::lost).
    edges.lost(&why);
    shared.lose(why);
    // Unblock a sender stuck writing to a backup that is gone, and guest
    // writes waiting for room in the journal.
    let _ = r.shutdown(std::net::Shutdown::Both);
    shared.update(|s| s.reader_done = true);
}

/// Marks the sender gone however it ends.
struct SenderDone<'a>(&'a Shared);

impl Drop for SenderDone<'_> {
    fn drop(&mut self) {
        self.0.update(|s| s.sender_done = true);
    }
}

/// Sends what the epoch loop hands over, the disk records the journal
/// queues (as soon as they are queued, while the guest runs: they only
/// have to be there before their epoch's seal), and heartbeats when there
/// is nothing else to send.
fn sender_loop(
    stream: Channel,
    tuning: &Tuning,
    (shared, events): (&Shared, &(dyn Fn(SessionEvent) + Sync)),
    disks: &PrimaryDisks,
    mut enc: Option<remus_proto::delta::DeltaEncoder>,
    pool: &staging::BufferPool,
    pacer: Option<&SharedPacer>,
) {
    let _done = SenderDone(shared);
    // A capped initial copy is given up once the session ends: its
    // goodbye comes next.
    let ending = || shared.ending();
    let journal = &*disks.journal;
    let mut w = BufWriter::with_capacity(1 << 20, stream);
    let mut seq = 0u64;
    let mut sealer = Sealer::default();
    let mut last_sent = Instant::now();
    let mut waited = journal.blocked();
    // Any end of the sender ends the journal: a guest write waiting for
    // room must not wait for a sender that is gone.
    let fail = |what: String, error: String| {
        tracing::warn!(%what, %error, "replication send failed");
        shared.lose(LostBackup::SendFailed { what, error });
        journal.close();
    };
    let goodbye = |w: &mut BufWriter<Channel>, m: Message| {
        let _ = m.write_to(w);
        let _ = w.flush();
        let _ = w.get_ref().shutdown(std::net::Shutdown::Write);
        journal.close();
    };
    loop {
        let rings = shared.doorbell.rings();
        let records = journal.take();
        if !records.is_empty() {
            let r = sealer.write_records(&mut w, &records).and_then(|_| {
                w.flush()
                    .map_err(|e| ReplError::Io("send disk records".into(), e))
            });
            if let Err(e) = r {
                return fail("sending disk records".into(), e.to_string());
            }
            last_sent = Instant::now();
        }
        // A new timeout goes first, between checkpoints (a sender that is
        // never idle, a loaded host at a short interval, must not hold it
        // back): the heartbeats that follow keep the pace it sets.
        if let Some(timeout_ms) = tuning.take_unsent() {
            let tune = Message::Tune { timeout_ms };
            if let Err(e) = tune
                .write_to(&mut w)
                .and_then(|()| w.flush().map_err(Into::into))
            {
                return fail("new timeout".into(), e.to_string());
            }
            last_sent = Instant::now();
        }
        let staged = match shared.next() {
            Next::Item(Outgoing::Done) => return goodbye(&mut w, Message::Done),
            Next::Item(Outgoing::SwitchOver(epoch)) => {
                return goodbye(&mut w, Message::SwitchOver { epoch });
            }
            Next::Item(Outgoing::Suspend { epoch, grace_ms }) => {
                return goodbye(&mut w, Message::Suspend { epoch, grace_ms });
            }
            Next::Item(Outgoing::Abort(reason)) => {
                let m = Message::Error {
                    code: ErrorCode::Internal,
                    message: format!("the primary stopped protecting and runs on: {reason}"),
                };
                return goodbye(&mut w, m);
            }
            Next::Item(Outgoing::Checkpoint(staged)) => staged,
            Next::Empty => {
                let heartbeat = tuning.heartbeat();
                let idle = last_sent.elapsed();
                if idle < heartbeat {
                    shared.doorbell.wait(rings, heartbeat - idle);
                    continue;
                }
                seq += 1;
                let hb = Message::Heartbeat {
                    seq,
                    sent_at_us: crate::now_us(),
                };
                if let Err(e) = hb
                    .write_to(&mut w)
                    .and_then(|()| w.flush().map_err(Into::into))
                {
                    return fail("heartbeat".into(), e.to_string());
                }
                last_sent = Instant::now();
                continue;
            }
            Next::Finished => {
                let _ = w.flush();
                let _ = w.get_ref().shutdown(std::net::Shutdown::Both);
                journal.close();
                return;
            }
        };
        let epoch = staged.epoch.0;
        // Every record of this epoch was queued before the checkpoint was
        // handed over: send them, seal, then the checkpoint itself.
        let records = journal.take();
        let sent = (|| -> Result<(Sent, u64, u64), ReplError> {
            sealer.write_records(&mut w, &records)?;
            let (recs, disk_bytes) = if disks.active() {
                let seal = sealer.seal(&mut w, staged.epoch)?;
                (seal.records, seal.bytes)
            } else {
                (0, 0)
            };
            // Only the initial copy is capped, never a checkpoint.
            let paced = pacer
                .filter(|_| staged.kind == CheckpointKind::InitialSync)
                .map(|pacer| Paced {
                    pacer,
                    give_up: &ending,
                });
            let sent = send_checkpoint(&mut w, &staged, enc.as_mut(), paced, &mut |w| {
                sealer.write_records(w, &journal.take()).map(|_| ())
            })?;
            Ok((sent, recs, disk_bytes))
        })();
        last_sent = Instant::now();
        let stats = CheckpointStats {
            epoch,
            taken_at_ms: staged.taken_at_ms,
            pause_ms: staged.pause_ms,
            dirty_pages: staged.dirty_pages(),
            bytes: 0,
            raw_bytes: 0,
            xor_pages: 0,
            ack_ms: 0.0,
            disk_records: 0,
            disk_bytes: 0,
            disk_wait_ms: {
                let now = journal.blocked();
                let d = now.saturating_sub(waited);
                waited = now;
                d.as_secs_f64() * 1e3
            },
            guest_held: staged.operator_paused.is_some(),
            phases: staged.phases,
        };
        for run in staged.runs {
            pool.give(run.data);
        }
        match sent {
            // Only checkpoints are reported (the initial copy's ack is not
            // a checkpoint).
            Ok((sent, disk_records, disk_bytes)) if staged.kind == CheckpointKind::Checkpoint => {
                let stats = CheckpointStats {
                    bytes: sent.wire,
                    raw_bytes: sent.raw,
                    xor_pages: sent.xor_pages,
                    disk_records,
                    disk_bytes,
                    ..stats
                };
                // `last_sent` is when its End frame went out. Its ack may
                // have been read already (the backup was quicker than
                // this thread): then it is reported here, else when the
                // ack comes.
                let acked_first = shared.lock().record_sent(epoch, stats, last_sent);
                if let Some(stats) = acked_first {
                    events(SessionEvent::Checkpoint(stats));
                }
            }
            Ok(_) => {}
            // The session ended during a capped initial copy: its
            // goodbye (or the end) is next in the slot.
            Err(ReplError::GivenUp(_)) => continue,
            Err(e) => return fail(format!("sending epoch {epoch}"), e.to_string()),
        }
    }
}

/// What one checkpoint cost on the wire.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Sent {
    /// Page and device-state frames, headers included.
    pub(crate) wire: u64,
    /// Pages × 4096 plus the device state.
    pub(crate) raw: u64,
    pub(crate) xor_pages: u64,
}

/// Writes Begin, the page runs, the device state and End. With `enc`,
/// pages and device state travel compressed (protocol version 3).
/// `between` runs after each page run: the sender passes on the disk
/// records queued meanwhile (they may travel inside an open checkpoint;
/// the backup sets them aside by their own epoch), so a long initial copy
/// does not leave guest disk writes waiting for room in the journal.
/// With `paced` (a bulk copy under a rate cap) the pages go in pieces,
/// each flushed, then paid for; the records `between` passes on are not.
pub(crate) fn send_checkpoint<W: Write>(
    w: &mut W,
    s: &Staged,
    mut enc: Option<&mut remus_proto::delta::DeltaEncoder>,
    paced: Option<Paced<'_>>,
    between: &mut dyn FnMut(&mut W) -> Result<(), ReplError>,
) -> Result<Sent, ReplError> {
    let (mut cp, mut sent) = send_pages(
        w,
        (s.epoch, s.kind),
        &s.runs,
        s.lazy.as_ref(),
        enc.as_deref_mut(),
        paced,
        between,
    )?;
    if s.kind.has_device_state() {
        sent.wire += cp.device_state(w, &s.device_state, enc.as_deref_mut())?;
        sent.raw += s.device_state.len() as u64;
    }
    if let Some(e) = enc {
        sent.xor_pages = e.take_stats().xor_pages;
    }
    cp.end(w)?;
    w.flush()
        .map_err(|e| ReplError::Io("flush checkpoint".into(), e))?;
    Ok(sent)
}

/// Opens checkpoint `epoch` of `kind` and writes its pages (`runs`, then
/// `lazy`), with `between` after each run; the writer goes on with its
/// device state and End.
pub(crate) fn send_pages<W: Write>(
    w: &mut W,
    (epoch, kind): (Epoch, CheckpointKind),
    runs: &[remus_proto::PageRun],
    lazy: Option<&staging::LazyPages>,
    mut enc: Option<&mut remus_proto::delta::DeltaEncoder>,
    paced: Option<Paced<'_>>,
    between: &mut dyn FnMut(&mut W) -> Result<(), ReplError>,
) -> Result<(CheckpointWriter, Sent), ReplError> {
    // The protocol's writer keeps the End's counts and digest in step with
    // what was written.
    let mut cp = CheckpointWriter::begin(w, epoch, kind)?;
    if let Some(e) = enc.as_deref_mut() {
        e.begin_checkpoint();
    }
    let mut sent = Sent::default();
    for run in runs {
        sent.wire += write_pages(
            w,
            &mut cp,
            run.first_page,
            &run.data,
            enc.as_deref_mut(),
            paced,
        )?;
        sent.raw += run.data.len() as u64;
        between(w)?;
    }
    if let Some(lazy) = lazy {
        let mut buf = Vec::new();
        for piece in &lazy.pieces {
            buf.resize(lazy.ram.range_len(*piece), 0);
            lazy.ram
                .read_pages(*piece, &mut buf)
                .map_err(ReplError::Ram)?;
            sent.wire += write_pages(w, &mut cp, piece.first, &buf, enc.as_deref_mut(), paced)?;
            sent.raw += buf.len() as u64;
            between(w)?;
        }
    }
    Ok((cp, sent))
}

/// One run of pages (`data` from `first`): at once, or under `paced` in
/// pieces of [`SharedPacer::piece_bytes`], each flushed to the link and
/// paid for before the next (so no wait is long, and none is spent on
/// bytes still sitting in a buffer). Returns the bytes on the wire.
fn write_pages<W: Write>(
    w: &mut W,
    cp: &mut CheckpointWriter,
    first: u64,
    data: &[u8],
    mut enc: Option<&mut remus_proto::delta::DeltaEncoder>,
    paced: Option<Paced<'_>>,
) -> Result<u64, ReplError> {
    let Some(paced) = paced else {
        return Ok(cp.pages(w, first, data, enc)?);
    };
    let page = remus_proto::PAGE_SIZE;
    let piece = paced.pacer.piece_bytes(page);
    let mut wire = 0;
    for (i, part) in data.chunks(piece).enumerate() {
        if (paced.give_up)() {
            return Err(ReplError::GivenUp("the capped copy"));
        }
        let n = cp.pages(
            w,
            first + (i * piece / page) as u64,
            part,
            enc.as_deref_mut(),
        )?;
        w.flush()
            .map_err(|e| ReplError::Io("flush pages".into(), e))?;
        paced.pacer.pace(n);
        wire += n;
    }
    Ok(wire)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_checkpoint_is_reported_once_whether_its_ack_or_its_record_comes_first() {
        let end_sent = Instant::now();
        let stats = |epoch| CheckpointStats {
            epoch,
            bytes: 900,
            ..Default::default()
        };
        // The usual order: recorded at its End, reported at its ack.
        let mut st = State::default();
        assert_eq!(st.record_sent(7, stats(7), end_sent), None);
        let read_at = end_sent + Duration::from_micros(1500);
        let cp = st
            .take_acked(Epoch(7), read_at)
            .expect("reported at the ack");
        assert_eq!((cp.epoch, cp.bytes, cp.ack_ms), (7, 900, 1.5));
        assert!(st.in_flight.is_empty() && st.early_ack.is_none());
        // The ack read before the sender recorded its checkpoint (the
        // sender descheduled after the End frame): nothing to report at
        // the ack, the sender reports it, and nothing stays in flight.
        assert_eq!(st.take_acked(Epoch(8), read_at), None);
        let cp = st
            .record_sent(8, stats(8), end_sent)
            .expect("reported by the sender");
        assert_eq!((cp.epoch, cp.ack_ms), (8, 1.5));
        assert_eq!(st.last_ack, Some(Duration::from_micros(1500)));
        assert!(st.in_flight.is_empty() && st.early_ack.is_none());
        // An initial copy's ack (epoch 0) waits for no report, and an
        // early ack of another epoch does not swallow this one.
        assert_eq!(st.take_acked(Epoch(0), read_at), None);
        assert!(st.early_ack.is_none());
        assert_eq!(st.take_acked(Epoch(9), read_at), None);
        assert_eq!(st.record_sent(10, stats(10), end_sent), None);
        assert!(st.in_flight.contains_key(&10));
    }

    #[test]
    fn the_gap_grows_while_the_guest_streams_and_drops_back_when_it_is_quiet() {
        let mut g = Gap::new(Some(ms(10)), Some(ms(40)));
        assert_eq!(g.now(), Some(ms(10)));
        // Data 1 ms into each epoch: streaming; the gap grows by half
        // per epoch up to the budget less pause + ack (40 - 6).
        let mut seen = Vec::new();
        for _ in 0..6 {
            g.observe(data(ms(1)), ms(6));
            seen.push(g.now().unwrap());
        }
        assert_eq!(
            seen,
            [
                ms(15),
                ms(22) + Duration::from_micros(500),
                ms(33) + Duration::from_micros(750),
                ms(34),
                ms(34),
                ms(34)
            ]
        );
        // Output 8 ms in (a new request): back to the minimum at once.
        g.observe(data(ms(8)), ms(6));
        assert_eq!(g.now(), Some(ms(10)));
        // No output at all: stays at the minimum.
        g.observe(None, ms(6));
        assert_eq!(g.now(), Some(ms(10)));
        // A slow checkpoint eats the budget: never below the minimum.
        g.observe(data(ms(0)), ms(45));
        assert_eq!(g.now(), Some(ms(10)));
    }

    #[test]
    fn the_gap_stays_at_the_minimum_without_a_budget_above_it() {
        for budget in [None, Some(ms(10)), Some(ms(5))] {
            let mut g = Gap::new(Some(ms(10)), budget);
            g.observe(data(ms(0)), ms(1));
            assert_eq!(g.now(), Some(ms(10)), "budget {budget:?}");
        }
        // Output-driven epochs off: nothing to adapt.
        let mut g = Gap::new(None, Some(ms(40)));
        g.observe(data(ms(0)), ms(1));
        assert_eq!(g.now(), None);
    }

    /// Data output early in an epoch.
    fn data(first: Duration) -> Option<EpochStream> {
        Some(EpochStream { first, data: true })
    }

    /// Small frames (ACKs) at once in an epoch.
    fn acks() -> Option<EpochStream> {
        Some(EpochStream {
            first: ms(0),
            data: false,
        })
    }

    #[test]
    fn the_gap_stays_at_the_minimum_while_the_output_is_small_frames() {
        // A guest receiving a transfer: its output is ACKs, at once in
        // every epoch. Holding them longer would slow its sender.
        let mut g = Gap::new(Some(ms(10)), Some(ms(40)));
        for _ in 0..4 {
            g.observe(acks(), ms(3));
            assert_eq!(g.now(), Some(ms(10)));
        }
        // It starts sending data: the gap grows; ACKs again: back down.
        g.observe(data(ms(0)), ms(3));
        assert_eq!(g.now(), Some(ms(15)));
        g.observe(acks(), ms(3));
        assert_eq!(g.now(), Some(ms(10)));
    }

    #[test]
    fn output_is_data_when_its_frames_average_half_a_kilobyte() {
        let out = |frames, bytes| EpochOutput {
            first: Some(Instant::now()),
            frames,
            bytes,
        };
        // Full segments, a few ACKs among them.
        assert!(carries_data(&out(10, 9 * 1514 + 66)));
        // ACKs of a transfer the guest receives; a ping's reply.
        assert!(!carries_data(&out(40, 40 * 66)));
        assert!(!carries_data(&out(1, 98)));
        assert!(carries_data(&out(2, 1024)));
        assert!(!carries_data(&out(2, 1023)));
        // Nothing held: not data.
        assert!(!carries_data(&EpochOutput::default()));
    }

    fn staged(epoch: u64) -> Outgoing {
        Outgoing::Checkpoint(Staged::precopy(
            Epoch(epoch),
            CheckpointKind::Checkpoint,
            Vec::new(),
            None,
        ))
    }

    #[test]
    fn a_hand_off_waits_for_the_sender_and_gives_up_once_the_backup_is_lost() {
        let shared = Arc::new(Shared::new());
        let rings = shared.doorbell.rings();
        shared.hand_off(staged(1)).unwrap();
        assert_ne!(shared.doorbell.rings(), rings, "the sender is woken");
        // The slot is taken: the next hand-off waits...
        let s2 = shared.clone();
        let waiting = std::thread::spawn(move || s2.hand_off(staged(2)));
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            !waiting.is_finished(),
            "back-pressure: the epoch loop waits"
        );
        // ...until the sender takes the first.
        assert!(
            matches!(shared.next(), Next::Item(Outgoing::Checkpoint(s)) if s.epoch == Epoch(1))
        );
        waiting.join().unwrap().unwrap();
        // A hand-off waiting on a backup that is lost returns its reason.
        let s2 = shared.clone();
        let waiting = std::thread::spawn(move || s2.hand_off(staged(3)));
        std::thread::sleep(Duration::from_millis(50));
        shared.lose(LostBackup::Silent);
        assert!(matches!(
            waiting.join().unwrap(),
            Err(ReplError::BackupLost(LostBackup::Silent))
        ));
        // The first reason stands.
        shared.lose(LostBackup::TookOver);
        assert_eq!(shared.lost(), Some(LostBackup::Silent));
        // The last word still goes to a sender that is alive...
        assert!(matches!(shared.next(), Next::Item(_)));
        assert!(shared.hand_off_last(Outgoing::Done));
        assert!(matches!(shared.next(), Next::Item(Outgoing::Done)));
        // ...and the sender learns when nothing more will come.
        assert!(matches!(shared.next(), Next::Empty));
        let rings = shared.doorbell.rings();
        shared.finish();
        assert_ne!(shared.doorbell.rings(), rings, "the sender is woken");
        assert!(matches!(shared.next(), Next::Finished));
    }

    /// A round of `pages` pages whose bytes name their page.
    fn round(pages: u64) -> Staged {
        let data: Vec<u8> = (0..pages * remus_proto::PAGE_SIZE as u64)
            .map(|i| (i / remus_proto::PAGE_SIZE as u64 * 7 + i % 251) as u8)
            .collect();
        let runs = vec![remus_proto::PageRun {
            first_page: 16,
            data,
        }];
        Staged::precopy(Epoch(1), CheckpointKind::Round, runs, None)
    }

    /// The frames `send_checkpoint` wrote, through the backup's assembler:
    /// the page runs it handed back, and the checkpoint it completed.
    fn received(mut wire: &[u8]) -> (Vec<remus_proto::PageRun>, Option<u64>) {
        let mut asm = remus_proto::CheckpointAssembler::new(1 << 20, None);
        let (mut runs, mut complete) = (Vec::new(), None);
        while !wire.is_empty() {
            match asm.accept(Message::read_from(&mut wire).unwrap()).unwrap() {
                remus_proto::Accepted::PreCopy(r) => runs.push(r),
                remus_proto::Accepted::Complete(c) => complete = Some(c.epoch.0),
                _ => {}
            }
        }
        (runs, complete)
    }

    #[test]
    fn a_capped_copy_goes_in_pieces_that_make_the_same_checkpoint() {
        // 16 MiB/s: pieces of 25 ms are 102 pages, and the bucket holds
        // 1.6 MiB, so this 1 MiB round goes without a wait.
        let pacer = SharedPacer::new(16 << 20);
        let paced = Paced {
            pacer: &pacer,
            give_up: &|| false,
        };
        let s = round(256);
        let mut wire = Vec::new();
        let sent = send_checkpoint(&mut wire, &s, None, Some(paced), &mut |_| Ok(())).unwrap();
        assert_eq!(sent.raw, 256 * 4096);
        assert_eq!(
            sent.wire,
            wire.len() as u64 - {
                // Begin and End are not page frames.
                let mut plain = Vec::new();
                send_checkpoint(&mut plain, &round(0), None, None, &mut |_| Ok(())).unwrap();
                plain.len() as u64
            }
        );
        let (runs, complete) = received(&wire);
        assert_eq!(complete, Some(1), "the digest over the pieces verifies");
        let firsts: Vec<(u64, u32)> = runs
            .iter()
            .map(|r| (r.first_page, r.page_count()))
            .collect();
        assert_eq!(firsts, vec![(16, 102), (118, 102), (220, 52)]);
        let joined: Vec<u8> = runs.iter().flat_map(|r| r.data.iter().copied()).collect();
        assert_eq!(joined, s.runs[0].data);
        // Uncapped, the same round is one run.
        let mut whole = Vec::new();
        send_checkpoint(&mut whole, &s, None, None, &mut |_| Ok(())).unwrap();
        assert_eq!(received(&whole).0.len(), 1);
    }

    #[test]
    fn a_capped_copy_is_given_up_between_pieces_once_asked() {
        let pacer = SharedPacer::new(16 << 20);
        let pieces = std::cell::Cell::new(0);
        let give_up = || {
            pieces.set(pieces.get() + 1);
            pieces.get() > 2
        };
        let paced = Paced {
            pacer: &pacer,
            give_up: &give_up,
        };
        let mut wire = Vec::new();
        let r = send_checkpoint(&mut wire, &round(256), None, Some(paced), &mut |_| Ok(()));
        assert!(matches!(r, Err(ReplError::GivenUp(_))), "{r:?}");
        // Two pieces went, and no End: the backup sees an open copy that
        // the goodbye ends.
        let (runs, complete) = received(&wire);
        assert_eq!(runs.len(), 2);
        assert_eq!(complete, None);
    }

    #[test]
    fn nothing_is_handed_to_a_sender_that_is_gone() {
        let shared = Shared::new();
        drop(SenderDone(&shared));
        assert!(matches!(
            shared.hand_off(staged(1)),
            Err(ReplError::BackupLost(LostBackup::SenderStopped))
        ));
        assert!(!shared.hand_off_last(Outgoing::Done));
    }

    #[test]
    fn waits_for_an_ack_end_on_the_ack_the_loss_or_the_deadline() {
        let shared = Arc::new(Shared::new());
        let t = Instant::now();
        assert!(
            !shared
                .wait_acked(Epoch(1), Duration::from_millis(30))
                .unwrap()
        );
        assert!(t.elapsed() >= Duration::from_millis(30));
        let s2 = shared.clone();
        let waiter = std::thread::spawn(move || s2.wait_acked(Epoch(2), Duration::from_secs(30)));
        shared.update(|s| s.acked_up_to = Some(1));
        std::thread::sleep(Duration::from_millis(20));
        assert!(
            !waiter.is_finished(),
            "epoch 1 does not acknowledge epoch 2"
        );
        shared.update(|s| s.acked_up_to = Some(3));
        assert!(waiter.join().unwrap().unwrap(), "a later ack covers it");
        let s2 = shared.clone();
        let waiter = std::thread::spawn(move || s2.wait_acked(Epoch(9), Duration::from_secs(30)));
        shared.lose(LostBackup::Closed("reset".into()));
        assert!(matches!(
            waiter.join().unwrap(),
            Err(ReplError::BackupLost(LostBackup::Closed(_)))
        ));
    }

    #[test]
    fn disk_digests_come_in_order_until_the_reader_ends() {
        let shared = Shared::new();
        assert!(
            shared
                .next_digests(Duration::from_millis(10))
                .unwrap()
                .is_none()
        );
        for disk in [0, 1] {
            shared.update(|s| {
                s.digests.push_back(DiskDigests {
                    disk,
                    chunk_size: 4096,
                    first_chunk: 0,
                    digests: Vec::new(),
                })
            });
        }
        let got = |s: &Shared| {
            s.next_digests(Duration::from_secs(5))
                .unwrap()
                .unwrap()
                .disk
        };
        assert_eq!((got(&shared), got(&shared)), (0, 1));
        shared.update(|s| s.reader_done = true);
        assert!(shared.next_digests(Duration::from_secs(5)).is_err());
    }

    #[test]
    fn lost_reasons_read_as_before() {
        let r = LostBackup::Reported {
            code: ErrorCode::Internal,
            message: "disk full".into(),
        };
        assert_eq!(r.to_string(), "backup reported internal error: disk full");
        assert_eq!(
            LostBackup::NoAck(Epoch(7)).to_string(),
            "the last checkpoint (epoch 7) was not acknowledged in time"
        );
    }
}
