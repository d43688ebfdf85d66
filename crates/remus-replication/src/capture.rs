//! Taking a VM's state: the one place the guest is paused for a
//! checkpoint, shared by protection and migration.
//!
//! [`Capture::take_checkpoint`] is the whole pause (DESIGN 1.2), after a
//! short hold of inbound frames while the guest still runs (see
//! [`remus_net::inbound`]): `stop` → cut the epoch (disk journal, held
//! output) → dirty scan → copy the dirty pages into staging buffers →
//! device state through QMP → `cont` (or not: the last checkpoint before a switch-over leaves the
//! guest stopped). An operator's pause, or the arbiter's fence, stands:
//! the checkpoint then neither stops nor resumes the guest.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use remus_dirty::{DirtyTracker, RamFile};
use remus_disk::Journal;
use remus_net::{Drain, InboundGate};
use remus_proto::{CheckpointKind, Epoch, PageRun};
use remus_vm::{Vm, devstate};

pub use remus_api::PausePhases;

use crate::{ReplError, staging};

/// One checkpoint (or pre-copy round) ready to send.
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
    /// Taken while the guest was held paused (by the operator or the
    /// fence): that pause's generation. Such a guest is never resumed by
    /// the checkpoint, nor by whoever abandons it.
    pub(crate) operator_paused: Option<u64>,
}

impl Staged {
    /// A pre-copy epoch (no pause, no device state).
    pub(crate) fn precopy(
        epoch: Epoch,
        kind: CheckpointKind,
        runs: Vec<PageRun>,
        lazy: Option<staging::LazyPages>,
    ) -> Staged {
        Staged {
            epoch,
            kind,
            runs,
            lazy,
            device_state: Vec::new(),
            pause_ms: 0.0,
            taken_at_ms: crate::now_us() / 1000,
            phases: PausePhases::default(),
            operator_paused: None,
        }
    }

    pub(crate) fn dirty_pages(&self) -> u64 {
        staging::pages_in(&self.runs)
    }
}

/// The longest a checkpoint waits, before it stops the guest, for the
/// guest to take the frames already handed to QEMU (QEMU drops what it
/// still holds for a NIC when the VM stops). Under inbound bulk traffic on
/// the build machine (TCG) the wait is well under this when it succeeds;
/// an idle link costs one sentinel round trip through QEMU.
const INBOUND_BUDGET: Duration = Duration::from_millis(3);

/// Every NIC's inbound gate closed; open again on drop.
struct InboundHold<'a>(&'a [InboundGate]);

impl<'a> InboundHold<'a> {
    fn close(gates: &'a [InboundGate]) -> InboundHold<'a> {
        for g in gates {
            g.close();
        }
        InboundHold(gates)
    }

    /// Whether every NIC drained within `budget`.
    fn wait(&self, budget: Duration) -> bool {
        let deadline = Instant::now() + budget;
        self.0
            .iter()
            .map(|g| g.wait_drained(deadline))
            .fold(true, |all, d| all & (d == Drain::Drained))
    }
}

impl Drop for InboundHold<'_> {
    fn drop(&mut self) {
        for g in self.0 {
            g.open();
        }
    }
}

/// What a checkpoint cuts while the guest is stopped, before anything is
/// copied: later disk writes and network frames belong to the next epoch.
pub(crate) type Cut<'a> = &'a dyn Fn() -> Result<(), ReplError>;

/// What a migration's last checkpoint does while QEMU still saves the
/// device state into a pipe: sends the pages just copied, then the state
/// as it comes ([`devstate::Saving::next_chunk`]).
pub(crate) type WhileSaving<'a> =
    &'a mut dyn FnMut(&[PageRun], &mut devstate::Saving<'_>) -> Result<(), ReplError>;

/// The means of taking a VM's state: its dirty tracker, a mapping of its
/// RAM, recycled staging buffers and the device-state file.
pub(crate) struct Capture<'v> {
    vm: &'v Vm,
    tracker: DirtyTracker,
    map: staging::RamMap,
    pub(crate) pool: Arc<staging::BufferPool>,
    dev_file: PathBuf,
    /// Where a streamed save's pipe goes (a migration's last checkpoint).
    pipe: PathBuf,
    /// Device state is saved without QEMU's RAM blocks.
    devices_only: bool,
}

impl<'v> Capture<'v> {
    /// Opens the tracker and the RAM mapping and readies QEMU for device
    /// state saves for `dev_name` (one of [`devstate::SAVES`], a file
    /// beside the RAM file); `devices_only`: without QEMU's RAM blocks (the
    /// peer's QEMU loads that).
    pub(crate) fn open(
        vm: &'v Vm,
        dev_name: &str,
        devices_only: bool,
    ) -> Result<Capture<'v>, ReplError> {
        let tracker = vm.dirty_tracker().map_err(ReplError::Tracker)?;
        let map = staging::RamMap::open(&vm.ram_file)?;
        devstate::prepare(vm.qmp()).map_err(|source| ReplError::DevState {
            what: "prepare",
            source,
        })?;
        Ok(Capture {
            vm,
            tracker,
            map,
            // 64 MiB of recycled staging buffers: a checkpoint of up to 16k
            // dirty pages copies into memory that is already backed.
            pool: Arc::new(staging::BufferPool::new(64)),
            dev_file: devstate::save_file(&vm.ram_file, dev_name),
            pipe: devstate::save_file(&vm.ram_file, devstate::MIGRATE_PIPE),
            devices_only,
        })
    }

    /// Every page holding data, read as it is sent, with the dirty bits
    /// reset first: pages written from now on are caught by the next
    /// scan.
    pub(crate) fn all_pages(&mut self) -> Result<staging::LazyPages, ReplError> {
        self.tracker.scan().map_err(ReplError::TrackingLost)?;
        let ram = RamFile::open(&self.vm.ram_file).map_err(ReplError::Ram)?;
        Ok(staging::LazyPages {
            pieces: staging::data_pieces(&ram)?,
            ram: Arc::new(ram),
        })
    }

    /// The pages dirtied since the last scan, copied while the guest runs
    /// (a pre-copy round).
    pub(crate) fn dirty_runs(&mut self) -> Result<Vec<PageRun>, ReplError> {
        let dirty = self.tracker.scan().map_err(ReplError::TrackingLost)?;
        self.map.stage(&dirty, &self.pool)
    }

    /// Takes checkpoint `epoch`: the only part that runs with the guest
    /// paused. `held` is what [`Vm::checkpoint_guard`] said (the caller
    /// holds that guard across this call, and on past it where nothing
    /// may resume the guest). `cut` runs with the guest stopped. With
    /// `keep_stopped` (the last checkpoint before a switch-over) the guest
    /// is not resumed. The pages in `earlier` (a migration's last round,
    /// scanned while the guest ran) go first. With `while_saving` (a
    /// migration's last checkpoint, device-only state) QEMU saves into a
    /// pipe and `while_saving` runs once the pages are copied, while QEMU
    /// still saves; the state is then not read from a file.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn take_checkpoint(
        &mut self,
        epoch: Epoch,
        held: bool,
        journal: &Journal,
        cut: Cut<'_>,
        keep_stopped: bool,
        earlier: Vec<PageRun>,
        mut while_saving: Option<WhileSaving<'_>>,
    ) -> Result<Staged, ReplError> {
        let vm = self.vm;
        let qmp = vm.qmp();
        let mut phases = PausePhases::default();
        let ms = |t: Instant| t.elapsed().as_secs_f64() * 1e3;
        // Frames from the network wait in the tap while the guest takes
        // those QEMU holds for it; they go on once the guest is stopped
        // (QEMU keeps what arrives while it is stopped).
        let hold = (!held).then(|| {
            let t = Instant::now();
            let h = InboundHold::close(vm.inbound_gates());
            phases.inbound_timed_out = !h.wait(INBOUND_BUDGET);
            phases.inbound = ms(t);
            h
        });
        // The moment the state is taken: once the run state is ours (a
        // pause or unpause that held it finished before this began).
        let taken_at_ms = crate::now_us() / 1000;
        let t0 = Instant::now();
        let dev_err = |source| ReplError::DevState {
            what: "save",
            source,
        };
        // The save goes right behind the `stop`: QEMU runs one command
        // after the other, so it saves the stopped guest as soon as it has
        // stopped it, without waiting for our turn of the stop's answer
        // (and the cut below runs beside the save).
        let streamed = while_saving.is_some();
        if streamed && !self.devices_only {
            return Err(ReplError::Setup(
                "a streamed device-state save needs device-only state".into(),
            ));
        }
        let begin_save = || {
            if streamed {
                devstate::begin_streamed_save(qmp, &self.pipe, remus_proto::MAX_DEVICE_STATE)
            } else {
                devstate::begin_save(qmp, &self.dev_file, self.devices_only)
            }
        };
        let saving = if held {
            begin_save().map_err(dev_err)
        } else {
            // `stop` waits for the guest's disk writes in flight; none of
            // them may wait for room in the journal meanwhile (the sender
            // could be stuck on a slow backup): the bound is lifted for
            // the stop.
            journal.set_limit(u64::MAX);
            let stopped = qmp.send("stop", None).map(|stop| {
                let saving = begin_save();
                (stop.wait(remus_qmp::DEFAULT_TIMEOUT), saving)
            });
            journal.set_limit(crate::disks::JOURNAL_LIMIT);
            match stopped {
                Ok((Ok(_), saving)) => saving.map_err(dev_err),
                Ok((Err(e), saving)) => return Err(stop_failed(qmp, saving.ok(), e)),
                Err(e) => return Err(stop_failed(qmp, None, e)),
            }
        };
        phases.stop = ms(t0);
        drop(hold);
        let mut early_cont = None;
        let staged = (|| -> Result<(Vec<PageRun>, Option<Vec<u8>>), ReplError> {
            let mut saving = saving?;
            // `stop` drained the guest's disk I/O: every write it has seen
            // complete belongs to this epoch; later ones to the next.
            // Likewise the network: frames the guest sends from now on
            // are held until the next epoch is acknowledged. (QEMU's own
            // flushes while it saves may fall on either side: a flush
            // changes no data.)
            if let Err(e) = cut() {
                // The save ends before the guest may run.
                let _ = saving.finish();
                return Err(e);
            }
            // QEMU writes the device state while guest RAM is scanned and
            // copied here (the save reads no guest RAM and the copy no
            // device): the pause is the longer of the two, not their sum.
            let copied = (|| -> Result<Vec<PageRun>, ReplError> {
                let t = Instant::now();
                let dirty = self.tracker.scan().map_err(ReplError::TrackingLost)?;
                phases.scan = ms(t);
                let t = Instant::now();
                let mut runs = earlier;
                runs.extend(self.map.stage(&dirty, &self.pool)?);
                phases.copy = ms(t);
                Ok(runs)
            })();
            let sent = match (&copied, while_saving.as_mut()) {
                (Ok(runs), Some(send)) => send(runs, &mut saving),
                _ => Ok(()),
            };
            // Whatever the copy did, the guest resumes only after QEMU
            // has finished the save. A device-only save is one command
            // QEMU ends before it reads the next, so the `cont` goes now,
            // right behind it: QEMU resumes the guest the moment the save
            // ends, without waiting for our turn of the save's answer.
            // The copy is done (or failed: the guest resumes anyway).
            if saving.ends_before_the_next_command() && !keep_stopped && !(held || vm.is_fenced()) {
                early_cont = Some(qmp.send("cont", None));
            }
            let saved = saving.finish();
            phases.devstate = ms(t0);
            let runs = copied?;
            sent?;
            let streamed = saved.map_err(dev_err)?;
            Ok((runs, streamed))
        })();
        // Resume whatever happened: a failed checkpoint must not leave the
        // guest paused.
        let t = Instant::now();
        // Held at the guard, or fenced since (the fence raises its flag
        // before it waits for the guard): the guest stays stopped. (A
        // fence raised after a `cont` went stops the guest once the guard
        // is free, as one raised after any checkpoint's `cont`.)
        let held = held || (early_cont.is_none() && vm.is_fenced());
        // The last checkpoint before a switch-over leaves the guest
        // stopped, unless it failed (then the guest runs on here, as after
        // any failed checkpoint).
        let cont = match early_cont {
            Some(sent) => sent.and_then(|c| c.wait(remus_qmp::DEFAULT_TIMEOUT)),
            None if held || (keep_stopped && staged.is_ok()) => Ok(serde_json::Value::Null),
            None => qmp.execute("cont", None),
        };
        phases.cont = ms(t);
        let pause_ms = ms(t0);
        let (runs, streamed) = staged?;
        cont.map_err(|source| ReplError::Qmp {
            command: "cont",
            source,
        })?;
        // The device state file is read after the guest runs again.
        let device_state = match streamed {
            Some(state) => state,
            None => std::fs::read(&self.dev_file)
                .map_err(|e| ReplError::Io(format!("read {}", self.dev_file.display()), e))?,
        };
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
}

/// A `stop` that failed: whatever state QEMU got to, the guest must not
/// stay paused. A save queued behind it ends first (QEMU answers it after
/// the stop; a full-stream save of a running guest would stop it at its
/// end, after a `cont` sent before).
fn stop_failed(
    qmp: &remus_qmp::Qmp,
    saving: Option<devstate::Saving<'_>>,
    e: remus_qmp::QmpError,
) -> ReplError {
    if let Some(s) = saving {
        let _ = s.finish();
    }
    let _ = qmp.execute("cont", None);
    ReplError::Qmp {
        command: "stop",
        source: e,
    }
}

/// Resumes a guest a checkpoint left stopped, unless it is held paused
/// (the operator's pause or the fence stands).
pub(crate) fn resume_unless_held(vm: &Vm) {
    if !vm.is_held() {
        let _ = vm.qmp().execute("cont", None);
    }
}
