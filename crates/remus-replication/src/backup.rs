//! The backup side: receive checkpoints, commit only whole verified ones,
//! ack them, and notice when the primary is gone.
//!
//! This module only receives and commits. Whether to resume the standby
//! when the primary goes silent is decided by the caller (the agent's
//! failover policy), in one place, so that a tie-breaker can later veto a
//! failover when only the link failed.

use remus_proto::Channel;
use std::io::{BufReader, Write};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use remus_disk::{DiskError, EpochBuffer};
use remus_proto::{
    Accepted, CheckpointAssembler, CheckpointKind, DiskDigests, Epoch, ErrorCode, Message,
};

use crate::ReplError;
use crate::replica::Replica;

/// Settings of the receiving side.
#[derive(Debug, Clone)]
pub struct BackupConfig {
    /// No frame from the primary for this long: it is declared lost.
    pub timeout: Duration,
    /// How often the backup says it is alive.
    pub heartbeat: Duration,
    /// The plan said `changed`: digests only of the chunks the primary
    /// names (a DiskSyncRuns per disk) instead of every chunk.
    pub changed_sync: bool,
    /// This backup said it keeps its standby across a restart of the
    /// primary's agent (a Resumable): a Suspend is taken.
    pub suspendable: bool,
    /// Set when this backup's own agent restarts: the primary is told
    /// (a Restarting, in a suspendable session), so that it suspends the
    /// session and the standby can be kept across the restart.
    pub restarting: Option<Arc<std::sync::atomic::AtomicBool>>,
    /// A migration's destination that loads the last checkpoint's device
    /// state as it arrives: its pages are written at once and its device
    /// state is handed to `events` chunk by chunk
    /// ([`BackupEvent::DeviceState`]) before its End verifies (see
    /// `CheckpointAssembler::stream_checkpoints`). Only where nothing is
    /// ever resumed from a checkpoint whose End failed.
    pub stream_checkpoints: bool,
}

/// What the receiver tells its owner.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum BackupEvent {
    Committed {
        epoch: u64,
        pages: u64,
        device_state_bytes: u64,
        /// Disk records applied with it, and whether the disks were synced.
        disk_records: u64,
        disk_synced: bool,
    },
    Rejected {
        reason: String,
    },
    /// With [`BackupConfig::stream_checkpoints`]: the next chunk of
    /// `epoch`'s device state, before its End has verified (the chunks
    /// concatenate in order; the epoch's pages are in the replica already).
    DeviceState {
        epoch: u64,
        #[serde(skip)]
        data: StateChunk,
    },
}

/// Bytes of device state (shown by their count, not their contents).
#[derive(Clone, Default)]
pub struct StateChunk(pub Vec<u8>);

impl std::fmt::Debug for StateChunk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} bytes", self.0.len())
    }
}

/// How a receiving session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackupEnd {
    /// The primary ended protection on purpose: do not fail over.
    Done,
    /// Migration: the source stopped after `epoch` and the VM was resumed
    /// here by the switch-over callback.
    SwitchOver(Epoch),
    /// The primary's agent restarts: the guest is stopped there at
    /// `epoch`, committed here. Keep the standby for `grace` for the
    /// session that resumes from it; no failover meanwhile.
    Suspended { epoch: Epoch, grace: Duration },
    /// The primary went silent or its connection closed: it (or the link)
    /// failed. `committed` is what can be resumed, if anything.
    PrimaryLost {
        committed: Option<Epoch>,
        reason: String,
        /// Lost by silence (nothing within the timeout), not by a closed
        /// or failed connection: the primary may be alive behind a cut
        /// link, and may be settling the VM's fate with the arbiter.
        silent: bool,
    },
    /// The session broke while the primary was demonstrably alive (a
    /// corrupt or rejected checkpoint, a protocol violation, the standby
    /// died): the primary was told and runs on, so the standby must not
    /// resume.
    Aborted { reason: String },
}

/// Receives until the session ends. Pages of the initial sync are written
/// at once (nothing resumable exists yet); after the first committed
/// checkpoint, only whole checkpoints touch the replica.
/// `on_switchover` resumes the VM at a migration's switch-over; the source
/// is told the outcome (Done, or an Error so that it resumes itself).
///
/// With `disks` (disk replication on), the backup first sends the digests
/// of its copy of each replicated disk, then buffers disk records per
/// epoch and applies an epoch's records when its checkpoint commits,
/// before the RAM and device state (see `remus_disk::epochs`). What is
/// still buffered when the session ends was never committed: the caller
/// discards it.
pub fn receive(
    stream: Channel,
    replica: &mut Replica,
    disks: Option<&mut EpochBuffer>,
    cfg: &BackupConfig,
    events: &(dyn Fn(BackupEvent) + Sync),
    on_switchover: &dyn Fn(&Replica) -> Result<(), String>,
    standby_alive: &dyn Fn() -> bool,
) -> Result<BackupEnd, ReplError> {
    stream
        .set_read_timeout(Some(cfg.timeout))
        .map_err(|e| ReplError::Io("set timeout".into(), e))?;
    stream.set_nodelay(true).ok();
    let writer = Arc::new(Mutex::new(
        stream
            .try_clone()
            .map_err(|e| ReplError::Io("clone stream".into(), e))?,
    ));
    let mut reader = BufReader::with_capacity(1 << 20, stream);
    // A resumed session goes on from the epoch the replica holds.
    let mut asm = CheckpointAssembler::new(replica.page_count(), replica.committed());
    if cfg.stream_checkpoints {
        asm.stream_checkpoints();
    }
    let stop = std::sync::atomic::AtomicBool::new(false);
    let digest_error: Mutex<Option<String>> = Mutex::new(None);
    // The heartbeat period; a Tune from the primary changes it.
    let heartbeat_us = std::sync::atomic::AtomicU64::new(cfg.heartbeat.as_micros().max(1) as u64);

    std::thread::scope(|s| {
        // Heartbeats from the backup, so the primary can tell a dead backup
        // from a busy link.
        let hb_writer = writer.clone();
        let (stop_ref, hb_ref) = (&stop, &heartbeat_us);
        let restarting = cfg.restarting.clone().filter(|_| cfg.suspendable);
        s.spawn(move || {
            let mut seq = 0u64;
            let mut next = Instant::now();
            let mut told = false;
            while !stop_ref.load(std::sync::atomic::Ordering::SeqCst) {
                let period =
                    Duration::from_micros(hb_ref.load(std::sync::atomic::Ordering::SeqCst));
                next += period;
                // The agent's restart is looked for every 50 ms.
                let look = Duration::from_millis(50);
                loop {
                    let left = next.saturating_duration_since(Instant::now());
                    if left.is_zero()
                        || stop_ref.load(std::sync::atomic::Ordering::SeqCst)
                        || (!told
                            && restarting
                                .as_ref()
                                .is_some_and(|r| r.load(std::sync::atomic::Ordering::SeqCst)))
                    {
                        break;
                    }
                    std::thread::sleep(left.min(look));
                }
                if !told
                    && restarting
                        .as_ref()
                        .is_some_and(|r| r.load(std::sync::atomic::Ordering::SeqCst))
                {
                    told = true;
                    let mut w = hb_writer.lock().unwrap_or_else(|p| p.into_inner());
                    if Message::Restarting.write_to(&mut *w).is_err() {
                        break;
                    }
                }
                seq += 1;
                let hb = Message::Heartbeat {
                    seq,
                    sent_at_us: crate::now_us(),
                };
                let mut w = hb_writer.lock().unwrap_or_else(|p| p.into_inner());
                if hb.write_to(&mut *w).is_err() {
                    break;
                }
            }
        });
        // The digests of the disks go out from a thread of their own while
        // this one reads: the primary answers each batch with the chunks
        // that differ, and neither side may wait for the other to read.
        let (runs_tx, runs_rx) = std::sync::mpsc::channel::<Vec<(u64, u64)>>();
        let changed = cfg.changed_sync;
        if let Some(d) = disks.as_deref() {
            let backends: Vec<_> = (0..d.disk_count())
                .filter_map(|i| d.disk(i).cloned())
                .collect();
            let (w, err, stop_ref) = (&writer, &digest_error, &stop);
            s.spawn(move || {
                let runs = |_disk: usize, total: u64| -> Option<Vec<(u64, u64)>> {
                    if !changed {
                        return Some(if total == 0 {
                            Vec::new()
                        } else {
                            vec![(0, total)]
                        });
                    }
                    loop {
                        match runs_rx.recv_timeout(Duration::from_millis(100)) {
                            Ok(r) => return Some(r),
                            Err(std::sync::mpsc::RecvTimeoutError::Timeout)
                                if !stop_ref.load(std::sync::atomic::Ordering::SeqCst) => {}
                            Err(_) => return None,
                        }
                    }
                };
                if let Err(e) = send_digests(&backends, w, stop_ref, &runs) {
                    tracing::error!(error = %e, "sending disk digests failed");
                    *err.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
                    // Ends the receive loop below.
                    let _ = w
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .shutdown(std::net::Shutdown::Both);
                }
            });
        }
        let end = receive_loop(
            &mut reader,
            &writer,
            replica,
            disks,
            changed.then_some(&runs_tx),
            &mut asm,
            events,
            on_switchover,
            standby_alive,
            &heartbeat_us,
            cfg.suspendable,
        );
        let digest_error = digest_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let end = match digest_error {
            Some(e) => Err(ReplError::Setup(format!("disk digests: {e}"))),
            None => end,
        };
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = writer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .shutdown(std::net::Shutdown::Both);
        end
    })
}

/// Turns a PageDelta into the PageRun and a DeviceStateDelta into the
/// DeviceState it stands for; other messages pass through. A device
/// state decodes against the one committed earlier in this session
/// (`dev_base`): a session that resumes a suspended one starts from none,
/// as the new primary's encoder does, although the replica holds the old
/// session's (for a failover).
fn decompress(
    msg: Message,
    replica: &Replica,
    dev_base: bool,
) -> Result<Message, remus_proto::delta::DeltaError> {
    use remus_proto::delta::{decode_device_state, decode_pages};
    Ok(match msg {
        Message::PageDelta(d) => {
            Message::PageRun(decode_pages(&d, &mut |p, b| replica.read_page(p, b))?)
        }
        Message::DeviceStateDelta(d) => Message::DeviceState {
            data: decode_device_state(
                &d,
                if dev_base {
                    replica.device_state()
                } else {
                    &[]
                },
            )?,
        },
        m => m,
    })
}

/// Why a stream error means the data was altered on the way (a record
/// that fails authentication), if it does.
fn altered(e: &remus_proto::WireError) -> Option<String> {
    match e {
        remus_proto::WireError::Io(io) if io.kind() == std::io::ErrorKind::InvalidData => {
            Some(io.to_string())
        }
        _ => None,
    }
}

/// The Ack could not be sent: reads what the primary sent before its
/// connection closed, to tell an orderly end (Done or Error queued before
/// the close) from a lost primary.
fn after_broken_ack(
    reader: &mut BufReader<Channel>,
    committed: Option<Epoch>,
    ack_error: ReplError,
) -> BackupEnd {
    loop {
        match Message::read_from(reader) {
            Ok(Message::Done) => return BackupEnd::Done,
            Ok(Message::Error { code, message }) => {
                tracing::warn!(%code, %message, "primary ended the session with an error");
                return BackupEnd::Done;
            }
            // Anything else it sent before closing cannot be committed
            // any more (no Ack can reach it); keep looking for a Done.
            Ok(_) => {}
            // Altered or malformed data is tampering, corruption or a
            // broken primary, never a lost one: no second copy is resumed
            // for it (as in the main loop).
            Err(e) if altered(&e).is_some() || matches!(e, remus_proto::WireError::Decode(_)) => {
                let why = altered(&e).unwrap_or_else(|| e.to_string());
                tracing::error!(error = %why, "the replication stream failed authentication or was malformed after a lost Ack: this copy is discarded, not resumed");
                return BackupEnd::Aborted {
                    reason: format!("the replication stream was altered: {why}"),
                };
            }
            Err(e) => {
                return BackupEnd::PrimaryLost {
                    committed,
                    reason: format!(
                        "replication stream broke (ack: {ack_error}; then: {e}) with no orderly end from the primary"
                    ),
                    silent: e.is_timeout(),
                };
            }
        }
    }
}

/// Sends the digests of every replicated disk (initial sync), in order:
/// of the chunk runs `runs(disk, chunks)` gives (None: the session ended).
fn send_digests(
    disks: &[std::sync::Arc<dyn remus_nbd::BlockBackend>],
    writer: &Mutex<Channel>,
    stop: &std::sync::atomic::AtomicBool,
    runs: &dyn Fn(usize, u64) -> Option<Vec<(u64, u64)>>,
) -> Result<(), ReplError> {
    use remus_disk::sync::{CHUNK_SIZE, DIGESTS_PER_FRAME, chunk_count, digest_chunks};
    for (i, d) in disks.iter().enumerate() {
        let total = chunk_count(d.size());
        let Some(disk_runs) = runs(i, total) else {
            return Ok(());
        };
        for (start, count) in disk_runs {
            let end = start + count;
            let mut first = start;
            while first < end {
                if stop.load(std::sync::atomic::Ordering::SeqCst) {
                    return Ok(());
                }
                let want = usize::try_from(end - first)
                    .unwrap_or(usize::MAX)
                    .min(DIGESTS_PER_FRAME);
                let digests = digest_chunks(&**d, first, want).map_err(|e| {
                    ReplError::Io(format!("read replicated disk {i} for its digests"), e)
                })?;
                let n = digests.len() as u64;
                let m = Message::DiskDigests(DiskDigests {
                    disk: i as u16,
                    chunk_size: CHUNK_SIZE,
                    first_chunk: first,
                    digests,
                });
                let mut w = writer.lock().unwrap_or_else(|p| p.into_inner());
                m.write_to(&mut *w)?;
                w.flush()
                    .map_err(|e| ReplError::Io("send disk digests".into(), e))?;
                first += n;
                if n == 0 {
                    break;
                }
            }
        }
    }
    Ok(())
}

/// The primary's sync runs for the next disk: that disk, our chunk size,
/// within the disk.
fn check_sync_runs(
    r: &remus_proto::DiskSyncRuns,
    d: &EpochBuffer,
    expected_disk: usize,
) -> Result<(), String> {
    use remus_disk::sync::{CHUNK_SIZE, chunk_count};
    if usize::from(r.disk) != expected_disk || r.chunk_size != CHUNK_SIZE {
        return Err(format!(
            "sync runs for disk {} in {}-byte chunks; expected disk {expected_disk} in {CHUNK_SIZE}",
            r.disk, r.chunk_size
        ));
    }
    let total = d
        .disk(expected_disk)
        .map(|b| chunk_count(b.size()))
        .ok_or_else(|| format!("sync runs for disk {expected_disk}, which does not exist"))?;
    if let Some(&(f, n)) = r.runs.last()
        && f + n > total
    {
        return Err(format!(
            "sync runs reach chunk {} beyond disk {expected_disk}'s {total}",
            f + n
        ));
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn receive_loop(
    reader: &mut BufReader<Channel>,
    writer: &Mutex<Channel>,
    replica: &mut Replica,
    mut disks: Option<&mut EpochBuffer>,
    sync_runs: Option<&std::sync::mpsc::Sender<Vec<(u64, u64)>>>,
    asm: &mut CheckpointAssembler,
    events: &(dyn Fn(BackupEvent) + Sync),
    on_switchover: &dyn Fn(&Replica) -> Result<(), String>,
    standby_alive: &dyn Fn() -> bool,
    heartbeat_us: &std::sync::atomic::AtomicU64,
    suspendable: bool,
) -> Result<BackupEnd, ReplError> {
    let send = |m: Message| -> Result<(), ReplError> {
        let mut w = writer.lock().unwrap_or_else(|p| p.into_inner());
        m.write_to(&mut *w)?;
        w.flush().map_err(|e| ReplError::Io("flush".into(), e))
    };
    // A disk record or seal that cannot be taken ends the session: the
    // primary is told why and runs on; this copy is never resumed.
    let disk_failed = |e: DiskError, what: &str| {
        let (code, reason) = match &e {
            DiskError::Protocol(_) => (ErrorCode::Protocol, format!("{what}: {e}")),
            DiskError::Io { .. } => (ErrorCode::Internal, format!("backup disk: {what}: {e}")),
            DiskError::Limit(_) => (ErrorCode::Internal, format!("{what}: {e}")),
        };
        tracing::error!(%reason, "disk replication failed on the backup");
        let _ = send(Message::Error {
            code,
            message: reason.clone(),
        });
        Ok(BackupEnd::Aborted { reason })
    };
    // A corrupt or inconsistent checkpoint: never applied. The session
    // cannot continue (later epochs build on it).
    let rejected = |reason: String| {
        events(BackupEvent::Rejected {
            reason: reason.clone(),
        });
        let _ = send(Message::Error {
            code: ErrorCode::CheckpointRejected,
            message: reason.clone(),
        });
        Ok(BackupEnd::Aborted {
            reason: format!("checkpoint rejected: {reason}"),
        })
    };
    // What only comes before the first commit came after it: the
    // primary is told, the session ends.
    let after_commit = |what: &str, last: Epoch| {
        let _ = send(Message::Error {
            code: ErrorCode::Protocol,
            message: format!("{what} after a committed checkpoint"),
        });
        Err(ReplError::Protocol(format!(
            "{what} after committed {last}"
        )))
    };
    let mut runs_seen = 0usize;
    // Pages of the open epoch written as they arrived.
    let mut streamed_pages = 0u64;
    // A checkpoint of this session has committed (the base of the next
    // compressed device state).
    let mut committed_here = false;
    loop {
        let msg = match Message::read_from(reader) {
            Ok(m) => m,
            Err(e) => {
                asm.discard();
                // Only silence or a closed connection say "the primary is
                // gone". Garbled frames come from a live sender.
                if let remus_proto::WireError::Decode(d) = &e {
                    let _ = send(Message::Error {
                        code: ErrorCode::Protocol,
                        message: d.to_string(),
                    });
                    return Ok(BackupEnd::Aborted {
                        reason: format!("bad frame from the primary: {d}"),
                    });
                }
                // A record that fails authentication was altered on the
                // way (or injected): the primary is alive, someone is
                // tampering with the link. Never a reason to resume a
                // second copy; nothing of the record was delivered.
                if let Some(io) = altered(&e) {
                    tracing::error!(error = %io, "the replication stream failed authentication: the link is being tampered with (or corrupts data); this copy is discarded, not resumed");
                    let _ = send(Message::Error {
                        code: ErrorCode::Protocol,
                        message: format!("the backup received altered data: {io}"),
                    });
                    return Ok(BackupEnd::Aborted {
                        reason: format!("the replication stream was altered: {io}"),
                    });
                }
                let reason = if e.is_timeout() {
                    "no checkpoint or heartbeat within the timeout".to_string()
                } else {
                    format!("replication stream: {e}")
                };
                return Ok(BackupEnd::PrimaryLost {
                    committed: replica.committed(),
                    reason,
                    silent: e.is_timeout(),
                });
            }
        };
        // Compressed pages and device state (protocol version 3) decode
        // against the committed copy: every earlier checkpoint has been
        // applied before this one's frames are read.
        let msg = match decompress(msg, replica, committed_here) {
            Ok(m) => m,
            Err(e) => {
                asm.discard();
                return rejected(e.to_string());
            }
        };
        if !standby_alive() {
            let _ = send(Message::Error {
                code: ErrorCode::Internal,
                message: "the standby QEMU on the backup died".into(),
            });
            return Ok(BackupEnd::Aborted {
                reason: "the standby QEMU died".into(),
            });
        }
        match asm.accept(msg) {
            Ok(Accepted::Pending) => {}
            // The copy of RAM before the first checkpoint streams into the
            // replica as it arrives (the assembler holds none of it).
            Ok(Accepted::PreCopy(run)) => {
                if let Some(last) = replica.committed() {
                    return after_commit("pre-copy pages", last);
                }
                replica.write_run(&run)?;
                streamed_pages += u64::from(run.page_count());
            }
            // A migration's last checkpoint, streaming (its pages came
            // first, written above).
            Ok(Accepted::DeviceState(data)) => {
                let epoch = asm.open_epoch().map_or(0, |e| e.0);
                if let Some(last) = replica.committed() {
                    return after_commit("device state streamed", last);
                }
                events(BackupEvent::DeviceState {
                    epoch,
                    data: StateChunk(data),
                });
            }
            Ok(Accepted::Complete(cp)) => {
                let pages =
                    crate::staging::pages_in(&cp.runs) + std::mem::take(&mut streamed_pages);
                match cp.kind {
                    CheckpointKind::InitialSync | CheckpointKind::Round => {
                        if let Some(d) = disks.as_deref()
                            && cp.kind == CheckpointKind::InitialSync
                            && !d.sync_sealed()
                        {
                            return disk_failed(
                                DiskError::Protocol("no disk seal before the initial sync".into()),
                                "initial sync",
                            );
                        }
                        if let Some(last) = replica.committed() {
                            return after_commit(&format!("a {:?}", cp.kind), last);
                        }
                        for r in &cp.runs {
                            replica.write_run(r)?;
                        }
                    }
                    CheckpointKind::Checkpoint => {
                        // The disk first: once the RAM commit names this
                        // epoch, its disk must be there too.
                        let mut applied = remus_disk::ApplyStats::default();
                        if let Some(d) = disks.as_deref_mut() {
                            match d.commit(cp.epoch) {
                                Ok(st) => applied = st,
                                Err(e) => {
                                    return disk_failed(e, &format!("commit {}", cp.epoch));
                                }
                            }
                        }
                        replica.commit(cp.epoch, &cp.runs, &cp.device_state)?;
                        committed_here = true;
                        events(BackupEvent::Committed {
                            epoch: cp.epoch.0,
                            pages,
                            device_state_bytes: cp.device_state.len() as u64,
                            disk_records: applied.records,
                            disk_synced: applied.synced,
                        });
                    }
                }
                if let Err(e) = send(Message::Ack { epoch: cp.epoch }) {
                    // The epoch is committed here, but the primary closed
                    // its end while we committed. If it ended on purpose,
                    // its Done (or Error) was sent before its close and is
                    // still readable; only without one is it lost, and
                    // this copy resumable.
                    return Ok(after_broken_ack(reader, replica.committed(), e));
                }
            }
            Ok(Accepted::Other(m)) => match m {
                Message::Heartbeat { .. } => {}
                // `remus protect --set --timeout` on the primary: the
                // primary is declared lost after the new silence, and
                // this side's heartbeats keep pace with it. (The primary
                // keeps its own, longer, patience until these have had
                // time to arrive.)
                Message::Tune { timeout_ms } => {
                    let timeout = Duration::from_millis(timeout_ms);
                    reader
                        .get_ref()
                        .set_read_timeout(Some(timeout))
                        .map_err(|e| ReplError::Io("set timeout".into(), e))?;
                    heartbeat_us.store(
                        (timeout / 4).as_micros() as u64,
                        std::sync::atomic::Ordering::SeqCst,
                    );
                    tracing::info!(timeout_ms, "the primary changed the failover timeout");
                }
                Message::Disk(rec) => {
                    let Some(d) = disks.as_deref_mut() else {
                        return disk_failed(
                            DiskError::Protocol(
                                "a disk record, but this session does not replicate disks".into(),
                            ),
                            "disk record",
                        );
                    };
                    if let Err(e) = d.accept(rec, replica.committed()) {
                        return disk_failed(e, "disk record");
                    }
                }
                Message::DiskSeal(seal) => {
                    let Some(d) = disks.as_deref_mut() else {
                        return disk_failed(
                            DiskError::Protocol(
                                "a disk seal, but this session does not replicate disks".into(),
                            ),
                            "disk seal",
                        );
                    };
                    if let Err(e) = d.seal(&seal, replica.committed()) {
                        return disk_failed(e, "disk seal");
                    }
                }
                Message::DiskSyncRuns(r) => {
                    let (Some(tx), Some(d)) = (sync_runs, disks.as_deref()) else {
                        return disk_failed(
                            DiskError::Protocol(
                                "sync runs, but this session's plan compares every chunk".into(),
                            ),
                            "sync runs",
                        );
                    };
                    if let Err(e) = check_sync_runs(&r, d, runs_seen) {
                        return disk_failed(DiskError::Protocol(e), "sync runs");
                    }
                    runs_seen += 1;
                    let _ = tx.send(r.runs);
                }
                Message::Done => return Ok(BackupEnd::Done),
                Message::Suspend { epoch, grace_ms } if suspendable => {
                    if replica.committed() != Some(epoch) {
                        let message = format!(
                            "suspend at {epoch} but {:?} is committed here",
                            replica.committed()
                        );
                        let _ = send(Message::Error {
                            code: ErrorCode::Protocol,
                            message: message.clone(),
                        });
                        return Err(ReplError::Protocol(message));
                    }
                    // The guest stopped at the epoch, so the next one can
                    // hold only the flushes QEMU sends while saving its
                    // state: they are dropped (the next session's epochs
                    // start afresh), after the disks were synced. A write
                    // there would be one the backup never gets: refused.
                    if let Some(d) = disks.as_deref_mut() {
                        if let Err(e) = d.sync_all() {
                            return disk_failed(e, "sync before the suspend");
                        }
                        let (records, bytes) = d.discard();
                        if bytes > 0 {
                            return disk_failed(
                                DiskError::Protocol(format!(
                                    "suspend at {epoch} with {bytes} bytes of disk writes after it"
                                )),
                                "suspend",
                            );
                        }
                        if records > 0 {
                            tracing::debug!(records, "flushes after the suspended epoch dropped");
                        }
                    }
                    send(Message::Done)?;
                    return Ok(BackupEnd::Suspended {
                        epoch,
                        grace: Duration::from_millis(grace_ms),
                    });
                }
                Message::SwitchOver { epoch } => {
                    if replica.committed() != Some(epoch) {
                        return Err(ReplError::Protocol(format!(
                            "switch-over at {epoch} but {:?} is committed here",
                            replica.committed()
                        )));
                    }
                    return match on_switchover(replica) {
                        Ok(()) => {
                            send(Message::Done)?;
                            Ok(BackupEnd::SwitchOver(epoch))
                        }
                        Err(why) => {
                            let _ = send(Message::Error {
                                code: ErrorCode::Internal,
                                message: why.clone(),
                            });
                            Err(ReplError::Resume(why))
                        }
                    };
                }
                Message::Error { code, message } => {
                    // The primary stopped on purpose (it says why): no
                    // failover.
                    tracing::warn!(%code, %message, "primary ended the session with an error");
                    return Ok(BackupEnd::Done);
                }
                other => {
                    let what = format!("{:?}", other.msg_type());
                    let _ = send(Message::Error {
                        code: ErrorCode::Protocol,
                        message: format!("unexpected {what}"),
                    });
                    return Err(ReplError::Protocol(format!(
                        "unexpected {what} from the primary"
                    )));
                }
            },
            // The assembler has discarded the open epoch already.
            Err(e) => return rejected(e.to_string()),
        }
    }
}
