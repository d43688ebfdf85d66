//! Live migration (pre-copy), the source side.
//!
//! ```text
//! source                                         destination
//!   InitialSync(0): every page with data  ───►   written to the replica
//!   Round(1..k): pages dirtied meanwhile  ───►   written to the replica
//!   stop; Checkpoint(k+1): last dirty pages
//!         + device state                  ───►   committed
//!                                         ◄───   Ack(k+1)
//!   SwitchOver(k+1)                       ───►   load device state, cont
//!                                         ◄───   Done
//!   (caller destroys the source)
//! ```
//!
//! Replicated disks travel too (protocol D, as in protection): first the
//! chunks that differ from the destination's copy (epoch 0, before the
//! initial copy), then every guest write since, journaled and sent at each
//! round, applied by the destination only with the final checkpoint.
//!
//! Rounds stop when few pages are dirty or after a bounded number of
//! rounds (a guest dirtying faster than the link cannot converge; the
//! final pause then grows, which the summary reports as downtime).
//! Failure before SwitchOver: the source resumes and nothing changed.
//! No confirmation after SwitchOver: the destination may be running, so
//! the source stays paused and the error says so (two running copies are
//! worse than one paused one).

use remus_proto::Channel;
use std::io::{BufWriter, Write};
use std::time::{Duration, Instant};

use remus_dirty::RamFile;
use remus_proto::{CheckpointKind, DiskDigests, Epoch, Message};
use remus_vm::{Vm, devstate};

use crate::disks::{DiskSyncProgress, DiskSyncStats, PrimaryDisks, Sealer};
use crate::primary::{Staged, send_checkpoint};
use crate::{ReplError, staging};

/// Migration settings.
#[derive(Debug, Clone)]
pub struct MigrateConfig {
    /// Stop pre-copy when a round has fewer dirty pages than this.
    pub converge_pages: u64,
    /// At most this many pre-copy rounds after the initial copy.
    pub max_rounds: u64,
    /// How long to wait for each acknowledgement.
    pub timeout: Duration,
    /// Compress pages and device state with a page cache of this many
    /// bytes (protocol version 3); pages re-sent in later rounds travel as
    /// XOR against the round before. `None`: plain.
    pub compress: Option<u64>,
}

impl Default for MigrateConfig {
    fn default() -> Self {
        MigrateConfig {
            converge_pages: 256,
            max_rounds: 30,
            timeout: Duration::from_secs(30),
            compress: Some(remus_proto::delta::DEFAULT_CACHE_BYTES),
        }
    }
}

/// Progress of a migration.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum MigrateEvent {
    /// Initial disk sync: one more batch of chunks compared.
    DiskSync(DiskSyncProgress),
    /// Initial disk sync finished.
    DiskSynced(DiskSyncStats),
    /// Before the initial copy: how much there is to send.
    Start { pages: u64, bytes: u64 },
    /// A pre-copy round was sent (round 0 is the initial copy).
    Round {
        round: u64,
        pages: u64,
        bytes: u64,
        ms: f64,
    },
    /// The destination runs the VM.
    Done(MigrateStats),
}

/// What a migration cost.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MigrateStats {
    pub total_ms: f64,
    /// Guest paused at the source → running at the destination.
    pub downtime_ms: f64,
    pub bytes: u64,
    pub rounds: u64,
    pub final_pages: u64,
}

/// Migrates `vm` over an authenticated session. On success the caller
/// destroys the source; on error the source is running again unless the
/// error says otherwise.
pub fn migrate(
    vm: &Vm,
    stream: Channel,
    cfg: &MigrateConfig,
    events: &dyn Fn(MigrateEvent),
) -> Result<MigrateStats, ReplError> {
    let t_start = Instant::now();
    let mut tracker = vm
        .dirty_tracker()
        .map_err(|e| ReplError::Setup(e.to_string()))?;
    let ram = RamFile::open(&vm.ram_file).map_err(|e| ReplError::Setup(e.to_string()))?;
    let map = staging::RamMap::open(&vm.ram_file)?;
    let pool = staging::BufferPool::new(64);
    devstate::prepare(vm.qmp()).map_err(|e| ReplError::Setup(e.to_string()))?;
    let dev_file = vm.paths.dir().join("dev.migrate");
    stream.set_nodelay(true).ok();
    stream
        .set_read_timeout(Some(cfg.timeout))
        .map_err(|e| ReplError::Io("set timeout".into(), e))?;
    let mut reader = stream
        .try_clone()
        .map_err(|e| ReplError::Io("clone stream".into(), e))?;
    let mut w = BufWriter::with_capacity(1 << 20, stream);
    let mut bytes = 0u64;
    // Guest disk writes are journaled from here on (all of them belong to
    // the final checkpoint, epoch 1 of the journal).
    let disks = PrimaryDisks::start(vm, true);
    let mut sealer = Sealer::default();
    let mut enc = cfg.compress.map(remus_proto::delta::DeltaEncoder::new);
    if disks.active() {
        let journal = disks.journal.clone();
        let runs = crate::disks::sync_runs(&disks, None);
        let stats = crate::disks::initial_sync(
            &disks,
            crate::copy::SyncMode::Full,
            &runs,
            &mut || next_digests(&mut reader),
            &mut |rec| {
                // The guest's writes meanwhile go along, so the journal
                // never holds up the guest for long.
                let mut recs = journal.take();
                recs.push(rec);
                bytes += sealer.write_records(&mut w, &recs)?;
                Ok(())
            },
            &mut |p| events(MigrateEvent::DiskSync(p)),
        )?;
        events(MigrateEvent::DiskSynced(stats));
    }

    // Pre-copy while the guest runs.
    tracker
        .scan()
        .map_err(|e| ReplError::TrackingLost(e.to_string()))?;
    // The first round reads guest RAM as it goes out (its memory is one
    // page run, not the guest's size); later rounds send what was dirtied.
    let mut lazy = Some(staging::LazyPages {
        pieces: staging::data_pieces(&ram)?,
        ram: std::sync::Arc::new(
            remus_dirty::RamFile::open(&vm.ram_file)
                .map_err(|e| ReplError::Setup(e.to_string()))?,
        ),
    });
    let mut runs: Vec<remus_proto::PageRun> = Vec::new();
    let initial_pages = lazy.as_ref().map_or(0, |l| l.page_count());
    events(MigrateEvent::Start {
        pages: initial_pages,
        bytes: initial_pages * remus_proto::PAGE_SIZE as u64,
    });
    let mut round = 0u64;
    let mut kind = CheckpointKind::InitialSync;
    loop {
        let t = Instant::now();
        let lazy = lazy.take();
        let pages: u64 = runs.iter().map(|r| u64::from(r.page_count())).sum::<u64>()
            + lazy.as_ref().map_or(0, |l| l.page_count());
        let staged = Staged {
            epoch: Epoch(round),
            kind,
            runs,
            lazy,
            device_state: Vec::new(),
            pause_ms: 0.0,
            taken_at_ms: crate::now_us() / 1000,
            phases: Default::default(),
            operator_paused: None,
        };
        if disks.active() {
            bytes += sealer.write_records(&mut w, &disks.journal.take())?;
            if kind == CheckpointKind::InitialSync {
                sealer.seal(&mut w, Epoch(0))?;
            }
        }
        bytes += send_with_records(&mut w, &staged, &mut sealer, &disks, enc.as_mut())?;
        for run in staged.runs {
            pool.give(run.data);
        }
        wait_ack(&mut reader, Epoch(round))?;
        events(MigrateEvent::Round {
            round,
            pages,
            bytes,
            ms: t.elapsed().as_secs_f64() * 1e3,
        });
        let dirty = tracker
            .scan()
            .map_err(|e| ReplError::TrackingLost(e.to_string()))?;
        round += 1;
        if dirty.page_count() < cfg.converge_pages || round > cfg.max_rounds {
            // Put back what was scanned: it belongs to the final copy.
            runs = map.stage(&dirty, &pool)?;
            break;
        }
        runs = map.stage(&dirty, &pool)?;
        kind = CheckpointKind::Round;
    }

    // Stop and copy. The pages scanned just above were dirtied while the
    // guest ran; the final scan under pause adds what changed since.
    let t_down = Instant::now();
    // No operator pause/unpause may interleave with the final copy.
    let _run_state = vm.checkpoint_guard();
    // `stop` waits for the guest's disk writes in flight: none may wait
    // for room in the journal now, as nothing drains it until after stop.
    disks.journal.set_limit(u64::MAX);
    vm.qmp()
        .execute("stop", None)
        .map_err(|e| ReplError::Vm(format!("stop: {e}")))?;
    let result = (|| -> Result<(u64, Epoch), ReplError> {
        let last = tracker
            .scan()
            .map_err(|e| ReplError::TrackingLost(e.to_string()))?;
        runs.extend(map.stage(&last, &pool)?);
        let final_pages: u64 = runs.iter().map(|r| u64::from(r.page_count())).sum();
        devstate::save(vm.qmp(), &dev_file).map_err(|e| ReplError::Vm(e.to_string()))?;
        let device_state = std::fs::read(&dev_file)
            .map_err(|e| ReplError::Io(format!("read {}", dev_file.display()), e))?;
        let epoch = Epoch(round);
        if disks.active() {
            // Every guest write since the sync, then the seals: the
            // destination applies them with this checkpoint.
            disks.journal.cut(Epoch(1)).map_err(ReplError::Protocol)?;
            bytes += sealer.write_records(&mut w, &disks.journal.take())?;
            sealer.seal(&mut w, Epoch(1))?;
            if epoch != Epoch(1) {
                sealer.seal(&mut w, epoch)?;
            }
        }
        let staged = Staged {
            epoch,
            kind: CheckpointKind::Checkpoint,
            runs,
            lazy: None,
            device_state,
            pause_ms: 0.0,
            taken_at_ms: crate::now_us() / 1000,
            phases: Default::default(),
            operator_paused: None,
        };
        bytes += send_with_records(&mut w, &staged, &mut sealer, &disks, enc.as_mut())?;
        wait_ack(&mut reader, epoch)?;
        Ok((final_pages, epoch))
    })();
    let (final_pages, epoch) = match result {
        Ok(v) => v,
        Err(e) => {
            // Nothing switched: the source carries on.
            let _ = vm.qmp().execute("cont", None);
            return Err(e);
        }
    };
    let paused_msg = |what: String| {
        ReplError::PeerLost(format!(
            "{what} at switch-over; the destination may be running the VM, so the source stays PAUSED — check the destination, then destroy one copy"
        ))
    };
    Message::SwitchOver { epoch }
        .write_to(&mut w)
        .map_err(|e| paused_msg(format!("sending SwitchOver failed ({e})")))?;
    w.flush()
        .map_err(|e| paused_msg(format!("sending SwitchOver failed ({e})")))?;
    match Message::read_from(&mut reader) {
        Ok(Message::Done) => {}
        Ok(Message::Error { code, message }) => {
            // The destination refused to resume: it does not run the VM.
            let _ = vm.qmp().execute("cont", None);
            return Err(ReplError::PeerLost(format!(
                "destination could not resume the VM ({code}: {message}); it runs here again"
            )));
        }
        other => {
            return Err(ReplError::PeerLost(format!(
                "no confirmation from the destination after switch-over ({}); it may be running the VM, so the source stays PAUSED — check the destination, then destroy one copy",
                match other {
                    Ok(m) => format!("got {:?}", m.msg_type()),
                    Err(e) => e.to_string(),
                }
            )));
        }
    }
    let stats = MigrateStats {
        total_ms: t_start.elapsed().as_secs_f64() * 1e3,
        downtime_ms: t_down.elapsed().as_secs_f64() * 1e3,
        bytes,
        rounds: round,
        final_pages,
    };
    events(MigrateEvent::Done(stats.clone()));
    Ok(stats)
}

/// Sends a checkpoint, passing on the guest's disk writes queued while
/// it goes out; returns the bytes of both.
fn send_with_records(
    w: &mut impl Write,
    staged: &Staged,
    sealer: &mut Sealer,
    disks: &PrimaryDisks,
    enc: Option<&mut remus_proto::delta::DeltaEncoder>,
) -> Result<u64, ReplError> {
    let mut records = 0u64;
    let sent = send_checkpoint(w, staged, enc, &mut |w| {
        records += sealer.write_records(w, &disks.journal.take())?;
        Ok(())
    })?;
    Ok(sent.wire + records)
}

/// The destination's next disk digests (initial disk sync).
fn next_digests(r: &mut Channel) -> Result<DiskDigests, ReplError> {
    read_expected(r, "disk digests", |m| match m {
        Message::DiskDigests(d) => Some(d),
        _ => None,
    })
}

fn wait_ack(r: &mut Channel, epoch: Epoch) -> Result<(), ReplError> {
    read_expected(r, &format!("Ack of {epoch}"), |m| match m {
        Message::Ack { epoch: e } if e == epoch => Some(()),
        _ => None,
    })
}

/// Reads from the destination, skipping heartbeats, until `want` takes a
/// message; an Error from the destination, any other message or a broken
/// stream ends the wait with an error naming `what` was awaited.
fn read_expected<T>(
    r: &mut Channel,
    what: &str,
    want: impl Fn(Message) -> Option<T>,
) -> Result<T, ReplError> {
    loop {
        match Message::read_from(r) {
            Ok(Message::Heartbeat { .. }) => {}
            Ok(Message::Error { code, message }) => {
                return Err(ReplError::PeerLost(format!(
                    "destination: {code}: {message}"
                )));
            }
            Ok(m) => {
                let got = m.msg_type();
                return want(m)
                    .ok_or_else(|| ReplError::Protocol(format!("expected {what}, got {got:?}")));
            }
            Err(e) => return Err(ReplError::PeerLost(format!("waiting for {what}: {e}"))),
        }
    }
}
