//! Live migration (pre-copy), the source side.
//!
//! ```text
//! source                                         destination
//!   InitialSync(0): every page with data  ───►   written to the replica
//!   Round(1..k): pages dirtied meanwhile  ───►   written to the replica
//!   stop; Checkpoint(k+1): last dirty pages
//!         + device state, sent as QEMU    ───►   pages written, device
//!           saves it                             state into QEMU as it
//!                                                arrives; committed
//!                                         ◄───   Ack(k+1)
//!   SwitchOver(k+1)                       ───►   cont (QEMU runs the VM
//!                                                once the load ends)
//!                                         ◄───   Done
//!   (caller destroys the source)
//! ```
//!
//! Replicated disks travel too (protocol D, as in protection): first the
//! chunks that differ from the destination's copy (epoch 0, before the
//! initial copy), then every guest write since, journaled and sent at each
//! round, applied by the destination only with the final checkpoint.
//!
//! With a rate cap (`remus migrate --max-rate`) the disk sync's data,
//! the initial copy and the rounds go at most at that rate; the final
//! checkpoint does not (the guest is stopped for it), and neither do the
//! guest's disk writes sent along, as QEMU lifts its `max-bandwidth` for
//! the completion stage.
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

use remus_proto::{CheckpointKind, CheckpointWriter, DiskDigests, Epoch, Message, PageRun};
use remus_vm::{Vm, devstate};

pub use remus_api::MigrateStats;
use remus_api::SessionEvent;

use crate::capture::{Capture, Staged, WhileSaving, resume_unless_held};
use crate::disks::{PrimaryDisks, Sealer};
use crate::pace::{Paced, SharedPacer};
use crate::primary::{send_checkpoint, send_pages};
use crate::{ReplError, staging};

/// Migration settings.
#[derive(Debug, Clone)]
pub struct MigrateConfig {
    /// Stop pre-copy when a round has fewer dirty pages than this. They
    /// travel with the final checkpoint, while the guest is stopped: at
    /// 256 a guest dirtying 50 MB/s left 150-200 of them, about 1 ms of
    /// downtime more than at 32 (measured on the 2-core TCG build host).
    pub converge_pages: u64,
    /// At most this many pre-copy rounds after the initial copy.
    pub max_rounds: u64,
    /// How long to wait for each acknowledgement.
    pub timeout: Duration,
    /// Compress pages and device state with a page cache of this many
    /// bytes (protocol version 3); pages re-sent in later rounds travel as
    /// XOR against the round before. `None`: plain.
    pub compress: Option<u64>,
    /// Cap of the pre-copy (the disk sync's data, the initial copy and
    /// the rounds) on the link, in bytes per second; `None`: as fast as
    /// it goes. The final checkpoint is never capped.
    pub max_rate: Option<u64>,
    /// Save device state without QEMU's RAM blocks (the destination said
    /// its QEMU loads that: see `remus_vm::devstate`).
    pub devices_only_state: bool,
}

impl Default for MigrateConfig {
    fn default() -> Self {
        MigrateConfig {
            converge_pages: 32,
            max_rounds: 30,
            timeout: Duration::from_secs(30),
            compress: Some(remus_proto::delta::DEFAULT_CACHE_BYTES),
            max_rate: None,
            devices_only_state: false,
        }
    }
}

/// Migrates `vm` over an authenticated session. On success the caller
/// destroys the source; on error the source is running again unless the
/// error says otherwise.
pub fn migrate(
    vm: &Vm,
    stream: Channel,
    cfg: &MigrateConfig,
    events: &dyn Fn(SessionEvent),
) -> Result<MigrateStats, ReplError> {
    let t_start = Instant::now();
    let mut capture = Capture::open(vm, devstate::MIGRATE_SAVE, cfg.devices_only_state)?;
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
    // the final checkpoint, epoch 1 of the journal). Nobody sleeps on its
    // doorbell: each round takes what it queued.
    let disks = PrimaryDisks::start(vm, true, Default::default(), Epoch(1));
    let mut sealer = Sealer::default();
    let mut enc = cfg.compress.map(remus_proto::delta::DeltaEncoder::new);
    let pacer = cfg.max_rate.map(SharedPacer::new);
    if let Some(rate) = cfg.max_rate {
        tracing::info!(vm = %vm.name(), rate, "pre-copy capped (bytes/s)");
    }
    // Nothing ends a migration from outside while it copies.
    let paced = pacer.as_ref().map(|pacer| Paced {
        pacer,
        give_up: &|| false,
    });
    if disks.active() {
        let journal = disks.journal.clone();
        let runs = crate::disks::sync_runs(&disks, None);
        let stats = crate::disks::initial_sync(
            &disks,
            remus_api::SyncMode::Full,
            &runs,
            &mut || next_digests(&mut reader),
            &mut |rec| {
                // The guest's writes meanwhile go along, so the journal
                // never holds up the guest for long.
                let mut recs = journal.take();
                let paid = crate::pace::record_bytes(&rec);
                recs.push(rec);
                bytes += sealer.write_records(&mut w, &recs)?;
                if let Some(p) = &pacer {
                    // Out of the buffer first: the wait is for bytes sent.
                    w.flush()
                        .map_err(|e| ReplError::Io("send disk records".into(), e))?;
                    p.pace(paid);
                }
                Ok(())
            },
            &mut |p| events(SessionEvent::DiskSync(p)),
        )?;
        events(SessionEvent::DiskSynced(stats));
    }

    // Pre-copy while the guest runs. The first round reads guest RAM as
    // it goes out (its memory is one page run, not the guest's size);
    // later rounds send what was dirtied.
    let mut lazy = Some(capture.all_pages()?);
    let mut runs: Vec<remus_proto::PageRun> = Vec::new();
    let initial_pages = lazy.as_ref().map_or(0, |l| l.page_count());
    events(SessionEvent::Start {
        pages: initial_pages,
        bytes: initial_pages * remus_proto::PAGE_SIZE as u64,
    });
    let mut round = 0u64;
    let mut kind = CheckpointKind::InitialSync;
    loop {
        let t = Instant::now();
        let staged = Staged::precopy(Epoch(round), kind, runs, lazy.take());
        let pages = staged.dirty_pages() + staged.lazy.as_ref().map_or(0, |l| l.page_count());
        if disks.active() {
            bytes += sealer.write_records(&mut w, &disks.journal.take())?;
            if kind == CheckpointKind::InitialSync {
                sealer.seal(&mut w, Epoch(0))?;
            }
        }
        bytes += send_with_records(&mut w, &staged, &mut sealer, &disks, enc.as_mut(), paced)?;
        for run in staged.runs {
            capture.pool.give(run.data);
        }
        wait_ack(&mut reader, Epoch(round))?;
        events(SessionEvent::Round {
            round,
            pages,
            bytes,
            ms: t.elapsed().as_secs_f64() * 1e3,
        });
        runs = capture.dirty_runs()?;
        round += 1;
        if staging::pages_in(&runs) < cfg.converge_pages || round > cfg.max_rounds {
            // What was scanned belongs to the final copy.
            break;
        }
        kind = CheckpointKind::Round;
    }

    // Stop and copy: the pages scanned just above were dirtied while the
    // guest ran; the final checkpoint adds what changed since, with the
    // guest left stopped. No operator pause or unpause may interleave
    // until the destination has answered; a guest the operator paused
    // stays paused whatever happens.
    let (_run_state, held) = vm.checkpoint_guard();
    // For QEMU's timestamp of the stop.
    let qemu_events = vm.qmp().subscribe();
    let t_down = Instant::now();
    let epoch = Epoch(round);
    // A device-only state streams: QEMU saves it into a pipe, and its
    // bytes go out as QEMU writes them, after the last pages, while the
    // destination's QEMU loads them as they arrive (QEMU's own migration
    // overlaps its save and load so). A full stream goes through a file.
    let streamed = cfg.devices_only_state;
    let result = (|| -> Result<(u64, f64), ReplError> {
        // The last checkpoint, open: its writer and the state bytes sent.
        let mut open: Option<(CheckpointWriter, usize)> = None;
        let staged = {
            let mut send_early =
                |runs: &[PageRun], saving: &mut devstate::Saving<'_>| -> Result<(), ReplError> {
                    let (mut cp, mut wire) =
                        open_final(&mut w, &mut sealer, &disks, enc.as_mut(), epoch, runs)?;
                    w.flush()
                        .map_err(|e| ReplError::Io("send the last pages".into(), e))?;
                    let mut sent = 0;
                    while let Some(chunk) =
                        saving.next_chunk().map_err(|source| ReplError::DevState {
                            what: "save",
                            source,
                        })?
                    {
                        wire += cp.device_state_part(&mut w, &chunk, enc.as_mut())?;
                        w.flush()
                            .map_err(|e| ReplError::Io("send the device state".into(), e))?;
                        sent += chunk.len();
                    }
                    bytes += wire;
                    open = Some((cp, sent));
                    Ok(())
                };
            capture.take_checkpoint(
                epoch,
                held,
                &disks.journal,
                &|| disks.journal.cut(Epoch(1)).map_err(ReplError::Protocol),
                true,
                std::mem::take(&mut runs),
                streamed.then_some(&mut send_early as WhileSaving<'_>),
            )?
        };
        let final_pages = staged.dirty_pages();
        let ph = &staged.phases;
        tracing::info!(vm = %vm.name(), %epoch, final_pages, streamed, stop_ms = ph.stop, devstate_ms = ph.devstate, scan_ms = ph.scan, copy_ms = ph.copy, "migration: guest stopped for the last checkpoint; its state is taken");
        // Before its `stop` the guest ran on while it took the frames
        // QEMU held for it: not downtime.
        let ran_on = staged.phases.inbound;
        let (mut cp, sent) = match open.take() {
            Some(open) => open,
            None => {
                let (cp, wire) = open_final(
                    &mut w,
                    &mut sealer,
                    &disks,
                    enc.as_mut(),
                    epoch,
                    &staged.runs,
                )?;
                bytes += wire;
                (cp, 0)
            }
        };
        // What was not streamed (all of a state saved to a file).
        let rest = staged.device_state.get(sent..).unwrap_or_default();
        if sent == 0 || !rest.is_empty() {
            bytes += cp.device_state_part(&mut w, rest, enc.as_mut())?;
        }
        if disks.active() {
            // The journal's epoch 2 began at the stop: it holds only the
            // flushes QEMU made while it saved the device state (the guest
            // is stopped; they were queued before the save returned). They
            // are sealed before the checkpoint's own epoch, or that seal
            // would find them open when the final epoch is above 2.
            bytes += sealer.write_records(&mut w, &disks.journal.take())?;
            if epoch > Epoch(2) {
                sealer.seal(&mut w, Epoch(2))?;
            }
            if epoch != Epoch(1) {
                sealer.seal(&mut w, epoch)?;
            }
        }
        cp.end(&mut w)?;
        w.flush()
            .map_err(|e| ReplError::Io("flush checkpoint".into(), e))?;
        for run in staged.runs {
            capture.pool.give(run.data);
        }
        wait_ack(&mut reader, epoch)?;
        Ok((final_pages, ran_on))
    })();
    let (final_pages, ran_on) = match result {
        Ok(v) => v,
        Err(e) => {
            // Nothing switched: the source carries on.
            resume_unless_held(vm);
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
            resume_unless_held(vm);
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
        downtime_ms: (t_down.elapsed().as_secs_f64() * 1e3 - ran_on).max(0.0),
        bytes,
        rounds: round,
        final_pages,
        stopped_at_us: qemu_events
            .try_iter()
            .find(|ev| ev.name == "STOP")
            .and_then(|ev| ev.timestamp_us),
    };
    events(SessionEvent::Done(stats.clone()));
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
    paced: Option<Paced<'_>>,
) -> Result<u64, ReplError> {
    let mut records = 0u64;
    let sent = send_checkpoint(w, staged, enc, paced, &mut |w| {
        records += sealer.write_records(w, &disks.journal.take())?;
        Ok(())
    })?;
    Ok(sent.wire + records)
}

/// Opens the last checkpoint: every guest disk write up to the stop and
/// their seal (the destination applies them with this checkpoint), then
/// Begin and the pages, with the flushes QEMU queued meanwhile; returns
/// the writer and the bytes sent.
fn open_final(
    w: &mut impl Write,
    sealer: &mut Sealer,
    disks: &PrimaryDisks,
    enc: Option<&mut remus_proto::delta::DeltaEncoder>,
    epoch: Epoch,
    runs: &[PageRun],
) -> Result<(CheckpointWriter, u64), ReplError> {
    let mut bytes = 0;
    if disks.active() {
        bytes += sealer.write_records(w, &disks.journal.take())?;
        sealer.seal(w, Epoch(1))?;
    }
    // The guest is stopped: no cap.
    let (cp, sent) = send_pages(
        w,
        (epoch, CheckpointKind::Checkpoint),
        runs,
        None,
        enc,
        None,
        &mut |w| {
            bytes += sealer.write_records(w, &disks.journal.take())?;
            Ok(())
        },
    )?;
    Ok((cp, sent.wire + bytes))
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
