//! The primary side: live initial sync, then one checkpoint per epoch.
//!
//! Per epoch, only this happens while the guest is paused (DESIGN 1.2):
//! `stop` → dirty scan → copy the dirty pages into a staging buffer →
//! device state saved through QMP → `cont`. The staged checkpoint then goes
//! to a sender thread and is transmitted while the guest runs the next
//! epoch; an ack reader thread matches the backup's acks to epochs.
//!
//! The timer runs at a fixed rate (epoch k starts at start + k·interval),
//! not "interval after the last commit" as Xen's did, so the checkpoint
//! rate is what the operator asked for. When the link cannot keep up, the
//! bounded hand-off to the sender makes the epoch loop wait: checkpoints
//! are delayed, never dropped or merged silently.

use remus_proto::Channel;
use std::collections::HashMap;
use std::io::{BufWriter, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, SyncSender, TryRecvError, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use remus_dirty::{DirtySet, DirtyTracker, RamFile};
use remus_disk::Journal;
use remus_net::OutputCommit;
use remus_proto::{CheckpointKind, CheckpointWriter, DiskDigests, Epoch, Message, PageRun};
use remus_vm::{Vm, devstate};

use crate::disks::{DiskSyncProgress, DiskSyncStats, PrimaryDisks, Sealer};
use crate::{ReplError, staging};

/// Settings of a protection session.
#[derive(Debug, Clone)]
pub struct ProtectConfig {
    /// Checkpoint interval.
    pub interval: Duration,
    /// Heartbeat period when there is nothing else to send.
    pub heartbeat: Duration,
    /// How long without any frame from the backup before it is declared
    /// lost.
    pub timeout: Duration,
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
}

/// See [`ProtectConfig::hand_over`].
#[derive(Clone)]
pub struct HandOver(pub Arc<dyn Fn() + Send + Sync>);

impl std::fmt::Debug for HandOver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HandOver")
    }
}

/// One committed checkpoint, as reported to the operator.
#[derive(Debug, Clone, serde::Serialize)]
pub struct EpochStats {
    pub epoch: u64,
    /// When the guest was paused for this checkpoint (Unix ms).
    pub taken_at_ms: u64,
    /// Guest paused for this long (stop → cont acknowledged).
    pub pause_ms: f64,
    pub dirty_pages: u64,
    /// Bytes of page data and device state put on the wire (compressed
    /// when compression is on; frame headers included).
    pub bytes: u64,
    /// The same before compression: dirty pages × 4096 plus the device
    /// state.
    pub raw_bytes: u64,
    /// Pages sent as XOR against the backup's copy (the rest went plain).
    pub xor_pages: u64,
    /// End frame sent → ack received.
    pub ack_ms: f64,
    /// Disk records of this epoch and the bytes they wrote or zeroed.
    pub disk_records: u64,
    pub disk_bytes: u64,
    /// Time guest disk writes spent waiting for room in the journal since
    /// the previous checkpoint (the link or the backup fell behind).
    pub disk_wait_ms: f64,
    /// Where the pause went: QMP stop, dirty scan, page copy, device
    /// state save, QMP cont (ms).
    pub phases: PausePhases,
}

/// The parts of one checkpoint pause, in ms.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct PausePhases {
    pub stop: f64,
    pub scan: f64,
    pub copy: f64,
    pub devstate: f64,
    pub cont: f64,
}

/// Progress of a protection session.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum ProtectEvent {
    /// Initial disk sync: one more batch of chunks compared.
    DiskSync(DiskSyncProgress),
    /// Initial disk sync finished (queued for sending).
    DiskSynced(DiskSyncStats),
    InitialSync {
        pages: u64,
        bytes: u64,
        ms: f64,
    },
    Checkpoint(EpochStats),
    BackupLost {
        reason: String,
    },
    Stopped {
        checkpoints: u64,
    },
    /// Planned switch-over: the backup resumed the VM from `epoch`; the
    /// guest was stopped here for `downtime_ms` until it confirmed.
    SwitchedOver {
        epoch: u64,
        downtime_ms: f64,
    },
}

/// How a protection session ended.
#[derive(Debug, Clone)]
pub enum ProtectEnd {
    /// The operator stopped it; the backup was told (it does not fail over).
    Stopped,
    /// The backup or the link failed; the VM runs on unprotected.
    BackupLost(String),
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
}

pub(crate) struct Staged {
    pub(crate) epoch: Epoch,
    pub(crate) kind: CheckpointKind,
    pub(crate) runs: Vec<PageRun>,
    /// Pages read from guest RAM as they are sent, after `runs` (the
    /// initial copy: its memory is one run, not the guest's size).
    pub(crate) lazy: Option<staging::LazyPages>,
    pub(crate) device_state: Vec<u8>,
    pub(crate) pause_ms: f64,
    pub(crate) taken_at_ms: u64,
    pub(crate) phases: PausePhases,
    /// Taken while the operator had the guest paused: that pause's
    /// generation.
    pub(crate) operator_paused: Option<u64>,
}

/// What a checkpoint closes while the guest is stopped and an ack
/// releases: the disk journal's epoch and the NICs' held output.
#[derive(Clone, Copy)]
struct Edges<'a> {
    vm: &'a Vm,
    journal: &'a Journal,
    nets: &'a [Arc<OutputCommit>],
}

impl Edges<'_> {
    /// With the guest stopped for checkpoint `epoch`: later disk writes
    /// and frames belong to the next epoch.
    fn cut(&self, epoch: Epoch) -> Result<(), ReplError> {
        self.journal.cut(epoch).map_err(ReplError::Protocol)?;
        for n in self.nets {
            n.cut(epoch.0);
        }
        Ok(())
    }

    /// The backup holds `epoch`: its output may leave.
    fn acked(&self, epoch: Epoch) {
        for n in self.nets {
            n.release(epoch.0);
        }
    }

    /// The session is over: guest writes stop waiting for the journal and
    /// held output leaves (the VM runs on alone).
    /// No backup will acknowledge anything more: the journal closes and
    /// held output goes out (the VM runs on alone) — unless the arbiter's
    /// fence holds the VM: its unacknowledged output may come from a state
    /// another host never had and may already have superseded. The agent
    /// releases it if the fence is lifted, drops it if another host took
    /// over.
    fn end(&self) {
        self.journal.close();
        if self.vm.is_fenced() {
            tracing::warn!(vm = %self.vm.name(), held = self.nets.iter().map(|n| n.held()).sum::<usize>(), "backup gone while the VM is fenced: held output stays held");
            return;
        }
        for n in self.nets {
            n.go_live();
        }
    }
}

#[derive(Default)]
struct InFlight {
    /// epoch → (stats so far, End sent at)
    sent: HashMap<u64, (EpochStats, Instant)>,
    /// The highest epoch the backup acknowledged.
    acked_up_to: Option<u64>,
    /// The backup answered a switch-over with Done: it runs the VM now.
    switched: bool,
}

/// Runs protection until `stop` is set or the backup is lost. `stream` is
/// an authenticated session to the backup.
pub fn protect(
    vm: &Vm,
    stream: Channel,
    cfg: &ProtectConfig,
    stop: &AtomicBool,
    events: &(dyn Fn(ProtectEvent) + Sync),
) -> Result<ProtectEnd, ReplError> {
    let name = vm.name().to_string();
    let mut tracker = vm
        .dirty_tracker()
        .map_err(|e| ReplError::Setup(e.to_string()))?;
    let ram = RamFile::open(&vm.ram_file).map_err(|e| ReplError::Setup(e.to_string()))?;
    let map = staging::RamMap::open(&vm.ram_file)?;
    // 64 MiB of recycled staging buffers: a checkpoint of up to 16k dirty
    // pages copies into memory that is already backed.
    let pool = Arc::new(staging::BufferPool::new(64));
    devstate::prepare(vm.qmp()).map_err(|e| ReplError::Setup(e.to_string()))?;
    let dev_file = vm.paths.dir().join("dev.out");

    stream.set_nodelay(true).ok();
    // Liveness is the backup's heartbeats: the ack reader declares it lost
    // after `timeout` of silence and shuts the socket down, which also
    // frees a sender blocked in a write. A backup that is alive but busy
    // (applying a large epoch to a slow disk) is waited for; only one that
    // stops reading for much longer while still sending heartbeats (a
    // stuck receiver) is given up by the write timeout.
    let write_timeout = (cfg.timeout * 15).max(Duration::from_secs(30));
    stream
        .set_read_timeout(Some(cfg.timeout))
        .and_then(|()| stream.set_write_timeout(Some(write_timeout)))
        .map_err(|e| ReplError::Io("set timeout".into(), e))?;
    let reader = stream
        .try_clone()
        .map_err(|e| ReplError::Io("clone stream".into(), e))?;
    let closer = stream
        .try_clone()
        .map_err(|e| ReplError::Io("clone stream".into(), e))?;

    let lost: Arc<Mutex<Option<String>>> = Arc::new(Mutex::new(None));
    let flight = Arc::new(Mutex::new(InFlight::default()));
    let (tx, rx) = sync_channel::<Outgoing>(1);
    let (dig_tx, dig_rx) = std::sync::mpsc::channel::<DiskDigests>();
    let committed = std::sync::atomic::AtomicU64::new(0);
    let mut switch_sent: Option<(Epoch, Instant)> = None;
    // From here on the guest's disk writes are journaled (epoch 1 on).
    let disks = PrimaryDisks::start(vm, cfg.replicate_disks);
    let journal = &*disks.journal;
    let disk_on = disks.active();
    // What the disk sync compares. The change records are read after
    // journaling started: a write before is in them, a write after is in
    // the journal (and applied after the sync data).
    let sync_runs = if disk_on {
        for p in &disks.ports {
            if let Some(al) = p.activity_log() {
                al.new_session();
            }
        }
        match &cfg.changed_sync {
            Some(theirs) => {
                let runs = crate::disks::changed_runs(&disks, theirs);
                for (i, r) in runs.iter().enumerate() {
                    Message::DiskSyncRuns(remus_proto::DiskSyncRuns {
                        disk: i as u16,
                        chunk_size: remus_disk::sync::CHUNK_SIZE,
                        runs: r.clone(),
                    })
                    .write_to(&mut &stream)?;
                }
                runs
            }
            None => crate::disks::sync_runs(&disks, None),
        }
    } else {
        Vec::new()
    };
    // Network output: held per epoch from the first checkpoint on.
    let nets: Vec<Arc<OutputCommit>> = if cfg.buffer_net {
        vm.output_commits().to_vec()
    } else {
        Vec::new()
    };
    for n in &nets {
        n.arm();
    }
    let edges = Edges {
        vm,
        journal,
        nets: &nets[..],
    };

    let result = std::thread::scope(|s| -> Result<ProtectEnd, ReplError> {
        let lost_s = lost.clone();
        let flight_s = flight.clone();
        let hb = cfg.heartbeat;
        let pool_s = pool.clone();
        let compress = cfg.compress;
        let sender = s.spawn(move || {
            let enc = compress.map(remus_proto::delta::DeltaEncoder::new);
            sender_loop(
                stream, rx, hb, flight_s, lost_s, &pool_s, journal, disk_on, enc,
            )
        });
        let lost_r = lost.clone();
        let flight_r = flight.clone();
        let committed_r = &committed;
        let ack_reader = s.spawn(move || {
            ack_loop(reader, flight_r, lost_r, events, committed_r, dig_tx, edges);
        });

        let t = Instant::now();
        let result = (|| -> Result<ProtectEnd, ReplError> {
            // Disks first: only the chunks that differ from the backup's
            // copy are sent; guest writes meanwhile are journaled for
            // epoch 1 and applied after them.
            if disk_on {
                let lost_reason = || lost.lock().unwrap_or_else(|p| p.into_inner()).clone();
                let stats = crate::disks::initial_sync(
                    &disks,
                    if cfg.changed_sync.is_some() {
                        crate::copy::SyncMode::Changed
                    } else {
                        crate::copy::SyncMode::Full
                    },
                    &sync_runs,
                    &mut || {
                        // No deadline of its own: hashing a large disk
                        // takes the backup a while, and its heartbeats
                        // (watched by the ack reader) say it is alive.
                        loop {
                            if stop.load(Ordering::SeqCst) {
                                return Err(ReplError::Setup(
                                    "stopped by the operator during the initial disk sync".into(),
                                ));
                            }
                            if let Some(r) = lost_reason() {
                                return Err(ReplError::PeerLost(r));
                            }
                            match dig_rx.recv_timeout(Duration::from_millis(100)) {
                                Ok(d) => return Ok(d),
                                Err(RecvTimeoutError::Timeout) => {}
                                Err(RecvTimeoutError::Disconnected) => {
                                    return Err(ReplError::PeerLost(lost_reason().unwrap_or_else(
                                        || {
                                            "the backup connection closed during the disk sync"
                                                .into()
                                        },
                                    )));
                                }
                            }
                        }
                    },
                    &mut |rec| {
                        if journal.push_sync(rec) {
                            Ok(())
                        } else {
                            Err(ReplError::PeerLost(
                                lost_reason().unwrap_or_else(|| "disk journal closed".into()),
                            ))
                        }
                    },
                    &mut |p| events(ProtectEvent::DiskSync(p)),
                )?;
                tracing::info!(vm = %name, mode = ?stats.mode, chunks = stats.chunks, disk_chunks = stats.disk_chunks, differing = stats.differing_chunks, sent_bytes = stats.sent_bytes, ms = stats.ms, "initial disk sync queued");
                events(ProtectEvent::DiskSynced(stats));
            }
            // Initial sync: reset the dirty bits, then copy every page holding
            // data while the guest runs; pages written meanwhile are caught by
            // the first checkpoint's scan.
            tracker
                .scan()
                .map_err(|e| ReplError::TrackingLost(e.to_string()))?;
            let t_copy = Instant::now();
            let lazy = staging::LazyPages {
                pieces: staging::data_pieces(&ram)?,
                ram: std::sync::Arc::new(
                    RamFile::open(&vm.ram_file).map_err(|e| ReplError::Setup(e.to_string()))?,
                ),
            };
            let pages = lazy.page_count();
            let bytes = pages * remus_proto::PAGE_SIZE as u64;
            send(
                &tx,
                journal,
                Staged {
                    epoch: Epoch(0),
                    kind: CheckpointKind::InitialSync,
                    runs: Vec::new(),
                    lazy: Some(lazy),
                    device_state: Vec::new(),
                    pause_ms: 0.0,
                    taken_at_ms: crate::now_us() / 1000,
                    phases: PausePhases::default(),
                    operator_paused: None,
                },
                &lost,
            )?;
            tracing::info!(vm = %name, pages, "initial copy of RAM under way");
            // Checkpoints start once the backup holds the initial copy.
            // Until the first checkpoint's cut the guest's output flows
            // unheld (nothing can fail over before a first commit), so a
            // long initial copy (a resync, a large VM) is no stall for its
            // clients; the first checkpoint then carries what the guest
            // dirtied meanwhile.
            loop {
                if stop.load(Ordering::SeqCst) {
                    return Ok(ProtectEnd::Stopped);
                }
                if wait_acked(&flight, &lost, Epoch(0), Duration::from_millis(100))? {
                    break;
                }
            }
            // The copy's time is until the backup holds it (pages are read
            // and sent as they go out).
            let copy_ms = t_copy.elapsed().as_secs_f64() * 1e3;
            events(ProtectEvent::InitialSync {
                pages,
                bytes,
                ms: copy_ms,
            });
            tracing::info!(vm = %name, ms = copy_ms, setup_ms = t.elapsed().as_secs_f64() * 1e3, "initial copy acknowledged; checkpoints start");

            let mut next_due = Instant::now();
            let mut epoch = 0u64;
            // Set once a checkpoint has captured an operator-paused guest:
            // its state cannot change until it is unpaused, and QEMU will
            // not save it twice (it stays in `postmigrate`), so further
            // checkpoints wait for the unpause; heartbeats go on.
            let mut captured_paused: Option<u64> = None;
            loop {
                if stop.load(Ordering::SeqCst) {
                    return Ok(ProtectEnd::Stopped);
                }
                if let Some(reason) = lost.lock().unwrap_or_else(|p| p.into_inner()).clone() {
                    return Ok(ProtectEnd::BackupLost(reason));
                }
                // Fixed rate: the next slot of the schedule; slots missed
                // while the link was slow are skipped, not caught up in a
                // burst.
                next_due += cfg.interval;
                let now = Instant::now();
                match next_due.checked_duration_since(now) {
                    Some(wait) => std::thread::sleep(wait),
                    None => next_due = now,
                }
                if captured_paused.is_some() && captured_paused == vm.hold_generation() {
                    continue;
                }
                epoch += 1;
                let last = cfg.switch_over.load(Ordering::SeqCst);
                let t_stop = Instant::now();
                let staged = checkpoint(
                    vm,
                    &mut tracker,
                    &map,
                    &pool,
                    &dev_file,
                    edges,
                    Epoch(epoch),
                    last,
                )?;
                captured_paused = staged.operator_paused;
                send(&tx, journal, staged, &lost)?;
                if last {
                    // The guest stays stopped: once this checkpoint is
                    // acknowledged the backup resumes from it.
                    let acked =
                        wait_acked(&flight, &lost, Epoch(epoch), cfg.timeout * 4).and_then(|a| {
                            if a {
                                Ok(())
                            } else {
                                Err(ReplError::PeerLost(format!(
                                    "the last checkpoint ({epoch}) was not acknowledged in time"
                                )))
                            }
                        });
                    if let Err(e) = acked {
                        let _ = vm.qmp().execute("cont", None);
                        tracing::warn!(vm = %name, error = %e, "switch-over abandoned before it was sent; the VM runs on here");
                        return Err(e);
                    }
                    if let Some(h) = &cfg.hand_over {
                        (h.0)();
                    }
                    let _ = tx.send(Outgoing::SwitchOver(Epoch(epoch)));
                    journal.notify();
                    switch_sent = Some((Epoch(epoch), t_stop));
                    return Ok(ProtectEnd::SwitchedOver {
                        epoch,
                        downtime_ms: 0.0,
                    });
                }
            }
        })();
        let said_goodbye = match &result {
            Ok(ProtectEnd::Stopped) => tx.send(Outgoing::Done).is_ok(),
            // Protection failed but the guest runs on here: the backup
            // must hear it, or it would take the silence for a dead
            // primary and resume a second copy.
            Err(e) if vm.runs_on() => tx.send(Outgoing::Abort(e.to_string())).is_ok(),
            _ => false,
        };
        // Any other end (VM destroyed or failed, tracking lost) just drops
        // the link: to the backup that is a failed primary, and it fails
        // over, as the Remus docs specify for `destroy` on the primary.
        drop(tx);
        journal.notify();
        let _ = sender.join();
        if said_goodbye {
            // The Done (or Error) may still sit in our send queue behind
            // the tail of a checkpoint. Shutting our read side now would
            // make the kernel answer the backup's next heartbeat or ack
            // with a reset that throws that queue away: the backup would
            // see a lost primary and fail over. So keep reading until the
            // backup, having read the goodbye, closes its end (the ack
            // reader then ends), within a bound.
            let deadline = Instant::now() + (cfg.timeout * 2).max(Duration::from_secs(5));
            while !ack_reader.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        if let Some((epoch, since)) = switch_sent {
            // The backup answers a switch-over with Done once the VM runs
            // there, or with an Error if it could not resume it.
            let deadline = Instant::now() + cfg.timeout * 4;
            while !ack_reader.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(2));
            }
            let _ = closer.shutdown(std::net::Shutdown::Read);
            let _ = ack_reader.join();
            let reason = lost.lock().unwrap_or_else(|p| p.into_inner()).clone();
            let switched = flight.lock().unwrap_or_else(|p| p.into_inner()).switched;
            let result = if switched {
                let downtime_ms = since.elapsed().as_secs_f64() * 1e3;
                events(ProtectEvent::SwitchedOver {
                    epoch: epoch.0,
                    downtime_ms,
                });
                Ok(ProtectEnd::SwitchedOver {
                    epoch: epoch.0,
                    downtime_ms,
                })
            } else if reason
                .as_deref()
                .is_some_and(|r| r.starts_with("backup reported"))
            {
                // It said it could not resume: nothing runs there. A guest
                // fenced by a hand-over runs again only once the caller
                // has its arbiter key back.
                let reason = reason.unwrap_or_default();
                if vm.is_fenced() {
                    Ok(ProtectEnd::SwitchOverRefused {
                        epoch: epoch.0,
                        reason,
                    })
                } else {
                    let _ = vm.qmp().execute("cont", None);
                    Ok(ProtectEnd::BackupLost(reason))
                }
            } else {
                Ok(ProtectEnd::SwitchOverUnconfirmed {
                    epoch: epoch.0,
                    reason: reason.unwrap_or_else(|| "no answer from the backup".into()),
                })
            };
            return result;
        }
        // Wake the ack reader (it may be waiting on a backup that already
        // said goodbye or died).
        let _ = closer.shutdown(std::net::Shutdown::Read);
        let _ = ack_reader.join();
        let result = match result {
            Err(ReplError::PeerLost(r)) => Ok(ProtectEnd::BackupLost(r)),
            other => other,
        };
        match &result {
            Ok(ProtectEnd::Stopped) => events(ProtectEvent::Stopped {
                checkpoints: committed.load(Ordering::SeqCst),
            }),
            Ok(ProtectEnd::BackupLost(r)) => events(ProtectEvent::BackupLost { reason: r.clone() }),
            // Reported where the switch-over ends (above).
            Ok(
                ProtectEnd::SwitchedOver { .. }
                | ProtectEnd::SwitchOverUnconfirmed { .. }
                | ProtectEnd::SwitchOverRefused { .. },
            )
            | Err(_) => {}
        }
        result
    });
    // Journal closed, disks back to local-only; held output released
    // unless fenced (see Edges::end).
    edges.end();
    drop(disks);
    result
}

fn dirty_pages(runs: &[PageRun]) -> u64 {
    runs.iter().map(|r| u64::from(r.page_count())).sum()
}

/// Hands a checkpoint to the sender, waiting while it is busy (the
/// back-pressure that delays the next epoch) but giving up as soon as the
/// backup is lost.
fn send(
    tx: &SyncSender<Outgoing>,
    journal: &Journal,
    s: Staged,
    lost: &Mutex<Option<String>>,
) -> Result<(), ReplError> {
    let lost_reason = || lost.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let mut item = Outgoing::Checkpoint(s);
    loop {
        match tx.try_send(item) {
            Ok(()) => {
                journal.notify();
                return Ok(());
            }
            Err(std::sync::mpsc::TrySendError::Full(back)) => {
                if let Some(r) = lost_reason() {
                    return Err(ReplError::PeerLost(r));
                }
                item = back;
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(std::sync::mpsc::TrySendError::Disconnected(_)) => {
                return Err(ReplError::PeerLost(
                    lost_reason().unwrap_or_else(|| "sender stopped".into()),
                ));
            }
        }
    }
}

/// Waits until `epoch` has been acknowledged (true), or `within` passes
/// (false); an error once the backup is lost.
fn wait_acked(
    flight: &Mutex<InFlight>,
    lost: &Mutex<Option<String>>,
    epoch: Epoch,
    within: Duration,
) -> Result<bool, ReplError> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(r) = lost.lock().unwrap_or_else(|p| p.into_inner()).clone() {
            return Err(ReplError::PeerLost(r));
        }
        // The ack reader records the highest epoch acknowledged.
        let f = flight.lock().unwrap_or_else(|p| p.into_inner());
        if f.acked_up_to.is_some_and(|e| e >= epoch.0) {
            return Ok(true);
        }
        drop(f);
        if Instant::now() > deadline {
            return Ok(false);
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Takes one checkpoint: the only part that runs with the guest paused.
/// With `keep_stopped` (the last one before a switch-over) the guest is
/// not resumed.
#[allow(clippy::too_many_arguments)]
fn checkpoint(
    vm: &Vm,
    tracker: &mut DirtyTracker,
    map: &staging::RamMap,
    pool: &staging::BufferPool,
    dev_file: &std::path::Path,
    edges: Edges<'_>,
    epoch: Epoch,
    keep_stopped: bool,
) -> Result<Staged, ReplError> {
    let qmp = vm.qmp();
    let mut phases = PausePhases::default();
    let ms = |t: Instant| t.elapsed().as_secs_f64() * 1e3;
    // An operator's pause stands: the checkpoint then neither stops nor
    // resumes the guest (it is already stopped).
    let (_guard, operator_paused) = vm.checkpoint_guard();
    // The moment the state is taken: once the run state is ours (a pause
    // or unpause that held it finished before this checkpoint began).
    let taken_at_ms = crate::now_us() / 1000;
    let t0 = Instant::now();
    if !operator_paused {
        // `stop` waits for the guest's disk writes in flight; none of them
        // may wait for room in the journal meanwhile (the sender could be
        // stuck on a slow backup): the bound is lifted for the stop.
        edges.journal.set_limit(u64::MAX);
        let stopped = qmp.execute("stop", None);
        edges.journal.set_limit(crate::disks::JOURNAL_LIMIT);
        if let Err(e) = stopped {
            // Whatever state QEMU got to, the guest must not stay paused.
            let _ = qmp.execute("cont", None);
            return Err(ReplError::Vm(format!("stop: {e}")));
        }
    }
    phases.stop = ms(t0);
    let staged = (|| -> Result<Vec<PageRun>, ReplError> {
        // `stop` drained the guest's disk I/O: every write it has seen
        // complete belongs to this epoch; later ones to the next.
        // Likewise the network: frames the guest sends from now on are
        // held until the next epoch is acknowledged.
        edges.cut(epoch)?;
        let t = Instant::now();
        let dirty: DirtySet = tracker
            .scan()
            .map_err(|e| ReplError::TrackingLost(e.to_string()))?;
        phases.scan = ms(t);
        let t = Instant::now();
        let runs = map.stage(&dirty, pool)?;
        phases.copy = ms(t);
        let t = Instant::now();
        devstate::save(qmp, dev_file).map_err(|e| ReplError::Vm(e.to_string()))?;
        phases.devstate = ms(t);
        Ok(runs)
    })();
    // Resume whatever happened: a failed checkpoint must not leave the
    // guest paused.
    let t = Instant::now();
    // Held at the guard, or fenced since (the fence raises its flag
    // before it waits for this lock): the guest stays stopped.
    let held = operator_paused || vm.is_fenced();
    // The last checkpoint before a switch-over leaves the guest stopped,
    // unless it failed (then the guest runs on here, as after any failed
    // checkpoint).
    let cont = if held || (keep_stopped && staged.is_ok()) {
        Ok(serde_json::Value::Null)
    } else {
        qmp.execute("cont", None)
    };
    phases.cont = ms(t);
    let pause_ms = ms(t0);
    let runs = staged?;
    cont.map_err(|e| ReplError::Vm(format!("cont after checkpoint: {e}")))?;
    // The device state file is read after the guest runs again.
    let device_state = std::fs::read(dev_file)
        .map_err(|e| ReplError::Io(format!("read {}", dev_file.display()), e))?;
    Ok(Staged {
        epoch,
        kind: CheckpointKind::Checkpoint,
        runs,
        lazy: None,
        device_state,
        pause_ms,
        taken_at_ms,
        phases,
        operator_paused: held.then(|| vm.hold_generation()).flatten(),
    })
}

#[allow(clippy::too_many_arguments)]
fn sender_loop(
    stream: Channel,
    rx: Receiver<Outgoing>,
    heartbeat: Duration,
    flight: Arc<Mutex<InFlight>>,
    lost: Arc<Mutex<Option<String>>>,
    pool: &staging::BufferPool,
    journal: &Journal,
    disk_on: bool,
    mut enc: Option<remus_proto::delta::DeltaEncoder>,
) {
    let mut w = BufWriter::with_capacity(1 << 20, stream);
    let mut seq = 0u64;
    let mut sealer = Sealer::default();
    let mut last_sent = Instant::now();
    let mut waited = journal.blocked();
    // Any end of the sender ends the journal: a guest write waiting for
    // room must not wait for a sender that is gone.
    let fail = |e: String| {
        tracing::warn!(error = %e, "replication send failed");
        lost.lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert(e);
        journal.close();
    };
    let goodbye = |w: &mut BufWriter<Channel>, m: Option<Message>| {
        if let Some(m) = m {
            let _ = m.write_to(w);
        }
        let _ = w.flush();
        let _ = w.get_ref().shutdown(std::net::Shutdown::Write);
        journal.close();
    };
    loop {
        let generation = journal.generation();
        // Disk records travel as soon as they are queued, while the guest
        // runs; they only have to be there before their epoch's seal.
        let records = journal.take();
        if !records.is_empty() {
            let r = sealer.write_records(&mut w, &records).and_then(|_| {
                w.flush()
                    .map_err(|e| ReplError::Io("send disk records".into(), e))
            });
            if let Err(e) = r {
                return fail(format!("sending disk records: {e}"));
            }
            last_sent = Instant::now();
        }
        match rx.try_recv() {
            Ok(Outgoing::Done) => return goodbye(&mut w, Some(Message::Done)),
            Ok(Outgoing::SwitchOver(epoch)) => {
                return goodbye(&mut w, Some(Message::SwitchOver { epoch }));
            }
            Ok(Outgoing::Abort(reason)) => {
                let m = Message::Error {
                    code: remus_proto::ErrorCode::Internal,
                    message: format!("the primary stopped protecting and runs on: {reason}"),
                };
                return goodbye(&mut w, Some(m));
            }
            Ok(Outgoing::Checkpoint(staged)) => {
                let epoch = staged.epoch.0;
                // Every record of this epoch was queued before the
                // checkpoint was handed over: send them, seal, then the
                // checkpoint itself.
                let records = journal.take();
                let sent = (|| -> Result<(Sent, u64, u64), ReplError> {
                    sealer.write_records(&mut w, &records)?;
                    let (recs, disk_bytes) = if disk_on {
                        let seal = sealer.seal(&mut w, staged.epoch)?;
                        (seal.records, seal.bytes)
                    } else {
                        (0, 0)
                    };
                    let sent = send_checkpoint(&mut w, &staged, enc.as_mut(), &mut |w| {
                        sealer.write_records(w, &journal.take()).map(|_| ())
                    })?;
                    Ok((sent, recs, disk_bytes))
                })();
                last_sent = Instant::now();
                let stats = EpochStats {
                    epoch,
                    taken_at_ms: staged.taken_at_ms,
                    pause_ms: staged.pause_ms,
                    dirty_pages: dirty_pages(&staged.runs),
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
                    phases: staged.phases,
                };
                for run in staged.runs {
                    pool.give(run.data);
                }
                match sent {
                    // Only checkpoints are reported (the initial sync's
                    // ack is not a checkpoint).
                    Ok((sent, disk_records, disk_bytes))
                        if staged.kind == CheckpointKind::Checkpoint =>
                    {
                        let stats = EpochStats {
                            bytes: sent.wire,
                            raw_bytes: sent.raw,
                            xor_pages: sent.xor_pages,
                            disk_records,
                            disk_bytes,
                            ..stats
                        };
                        let f = &mut flight.lock().unwrap_or_else(|p| p.into_inner());
                        f.sent.insert(epoch, (stats, Instant::now()));
                    }
                    Ok(_) => {}
                    Err(e) => return fail(format!("sending epoch {epoch}: {e}")),
                }
            }
            Err(TryRecvError::Empty) => {
                let idle = last_sent.elapsed();
                if idle >= heartbeat {
                    seq += 1;
                    let hb = Message::Heartbeat {
                        seq,
                        sent_at_us: crate::now_us(),
                    };
                    if let Err(e) = hb
                        .write_to(&mut w)
                        .and_then(|()| w.flush().map_err(Into::into))
                    {
                        return fail(format!("heartbeat: {e}"));
                    }
                    last_sent = Instant::now();
                } else {
                    journal.wait(generation, heartbeat - idle);
                }
            }
            Err(TryRecvError::Disconnected) => {
                let _ = w.flush();
                let _ = w.get_ref().shutdown(std::net::Shutdown::Both);
                journal.close();
                return;
            }
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
pub(crate) fn send_checkpoint<W: Write>(
    w: &mut W,
    s: &Staged,
    mut enc: Option<&mut remus_proto::delta::DeltaEncoder>,
    between: &mut dyn FnMut(&mut W) -> Result<(), ReplError>,
) -> Result<Sent, ReplError> {
    // The protocol's writer keeps the End's counts and digest in step with
    // what was written.
    let mut cp = CheckpointWriter::begin(w, s.epoch, s.kind)?;
    if let Some(e) = enc.as_deref_mut() {
        e.begin_checkpoint();
    }
    let mut sent = Sent::default();
    for run in &s.runs {
        sent.wire += cp.pages(w, run.first_page, &run.data, enc.as_deref_mut())?;
        sent.raw += run.data.len() as u64;
        between(w)?;
    }
    if let Some(lazy) = &s.lazy {
        let mut buf = Vec::new();
        for piece in &lazy.pieces {
            buf.resize(lazy.ram.range_len(*piece), 0);
            lazy.ram
                .read_pages(*piece, &mut buf)
                .map_err(|e| ReplError::Setup(format!("read guest RAM: {e}")))?;
            sent.wire += cp.pages(w, piece.first, &buf, enc.as_deref_mut())?;
            sent.raw += buf.len() as u64;
            between(w)?;
        }
    }
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

fn ack_loop(
    mut r: Channel,
    flight: Arc<Mutex<InFlight>>,
    lost: Arc<Mutex<Option<String>>>,
    events: &(dyn Fn(ProtectEvent) + Sync),
    committed: &std::sync::atomic::AtomicU64,
    digests: Sender<DiskDigests>,
    edges: Edges<'_>,
) {
    let reason = loop {
        match Message::read_from(&mut r) {
            Ok(Message::Ack { epoch }) => {
                // Output commit: the backup holds the state that sent
                // these frames.
                edges.acked(epoch);
                let entry = {
                    let mut f = flight.lock().unwrap_or_else(|p| p.into_inner());
                    f.acked_up_to = Some(f.acked_up_to.unwrap_or(0).max(epoch.0));
                    f.sent.remove(&epoch.0)
                };
                if epoch.0 == 0 {
                    continue; // the initial sync
                }
                committed.fetch_add(1, Ordering::SeqCst);
                if let Some((mut stats, at)) = entry {
                    stats.ack_ms = at.elapsed().as_secs_f64() * 1e3;
                    events(ProtectEvent::Checkpoint(stats));
                }
            }
            Ok(Message::Heartbeat { .. }) => {}
            Ok(Message::DiskDigests(d)) => {
                let _ = digests.send(d);
            }
            // The backup's answer to a switch-over: it runs the VM now.
            Ok(Message::Done) => {
                flight.lock().unwrap_or_else(|p| p.into_inner()).switched = true;
                break "the backup took the VM over (switch-over)".into();
            }
            Ok(Message::Error { code, message }) => {
                break format!("backup reported {code}: {message}");
            }
            Ok(other) => break format!("unexpected {:?} from the backup", other.msg_type()),
            Err(e) if e.is_timeout() => break "no word from the backup within the timeout".into(),
            Err(e) => break format!("backup connection: {e}"),
        }
    };
    {
        let mut l = lost.lock().unwrap_or_else(|p| p.into_inner());
        if l.is_none() {
            *l = Some(reason);
        }
    }
    // Unblock a sender stuck writing to a backup that is gone, and guest
    // writes waiting for room in the journal.
    let _ = r.shutdown(std::net::Shutdown::Both);
    // No backup will acknowledge anything more: the VM runs on alone.
    edges.end();
}
