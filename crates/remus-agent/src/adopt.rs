//! The VMs an earlier agent left running: QEMU outlives the agent
//! (`--on-stop keep`, and any crash of the agent), and the next agent
//! adopts what its state directory says runs, so that a restart or an
//! upgrade of remusd stops no VM.
//!
//! Per VM directory (`STATE_DIR/vms/NAME/`), beside `config.json`:
//! - `run.json` ([`RunRecord`]): the VM's ID, accelerator, RAM file, tap
//!   names and processes (PID and start time of QEMU and of each
//!   qemu-storage-daemon), written when the VM starts;
//! - `stage`: what the VM is here, one word, rewritten at every transition
//!   of its [`Life`](crate::lifecycle::Life);
//! - `held-paused`, `held-fenced`: the operator's pause and the arbiter's
//!   fence (see `remus_vm::VmPaths`).
//!
//! A VM is adopted when its recorded QEMU still runs (same PID, same start
//! time) and it ran here alone ([`adoptable`]) and is not fenced. Otherwise
//! its QEMU is stopped: a primary whose session was running may have been
//! taken over by its backup since (its copy is then listed stale, from its
//! copy record, as after a host crash), a standby or a migration's source
//! is another host's business, and a fenced VM may not run here.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use remus_nbd::process::Proc;
use remus_vm::qemu_args::ResolvedAccel;
use remus_vm::{Processes, StartOptions, Vm, VmPaths};
use serde::{Deserialize, Serialize};

use crate::agent::{Agent, VmSlot};
use crate::files::read_bounded;
use crate::lifecycle::{Stage, adoptable};

/// What the next agent needs to adopt a VM besides its config.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunRecord {
    pub id: u32,
    pub accel: ResolvedAccel,
    pub ram_file: PathBuf,
    pub tap_names: Vec<String>,
    pub processes: Processes,
}

/// Longest `run.json` read (a record is a few hundred bytes).
const MAX_RECORD_BYTES: u64 = 64 * 1024;
/// Longest `config.json` read.
const MAX_CONFIG_BYTES: u64 = 1024 * 1024;

pub fn record_path(dir: &Path) -> PathBuf {
    dir.join("run.json")
}

pub fn stage_path(dir: &Path) -> PathBuf {
    dir.join("stage")
}

/// Writes the record of a VM that now runs here (atomically).
pub fn save(dir: &Path, rec: &RunRecord) {
    let path = record_path(dir);
    let r = serde_json::to_vec_pretty(rec)
        .map_err(std::io::Error::other)
        .and_then(|b| crate::files::replace(&path, &b));
    if let Err(e) = r {
        tracing::error!(file = %path.display(), error = %e, "cannot record the VM's processes: the next agent will not adopt it");
    }
}

/// What was found in one VM directory.
enum Found {
    /// No record: a directory of an agent before adoption existed, or of
    /// a VM whose start did not finish.
    Nothing,
    /// The recorded QEMU no longer runs.
    Gone,
    /// Its QEMU runs and is stopped, for `why`.
    Stopped(String),
    Adopted(Arc<VmSlot>),
}

impl Agent {
    /// At start: adopts the VMs an earlier agent left running, stops the
    /// ones it may not adopt. Returns the names adopted.
    pub(crate) fn adopt_leftovers(&self) -> Vec<String> {
        let mut adopted = Vec::new();
        let vms = self.opts.state_dir.join("vms");
        let Ok(rd) = std::fs::read_dir(&vms) else {
            return adopted;
        };
        let mut dirs: Vec<PathBuf> = rd.flatten().map(|e| e.path()).collect();
        dirs.sort();
        for dir in dirs {
            let name = dir
                .file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_default();
            match self.adopt_one(&name, &dir) {
                Ok(Found::Nothing) => {}
                Ok(Found::Gone) => {
                    tracing::info!(vm = %name, "the VM's QEMU no longer runs (it stopped while no agent ran); its directory is cleaned up when a VM of that name is created")
                }
                Ok(Found::Stopped(why)) => {
                    tracing::warn!(vm = %name, "NOT ADOPTED, its QEMU stopped: {why}")
                }
                Ok(Found::Adopted(slot)) => {
                    tracing::info!(vm = %name, id = slot.id, pid = slot.vm.pid(), "adopted the VM an earlier agent left running; its disks, NICs and console are served again");
                    adopted.push(name);
                }
                Err(e) => {
                    tracing::error!(vm = %name, error = %e, "cannot adopt the VM an earlier agent left running; its QEMU is stopped")
                }
            }
        }
        adopted
    }

    fn adopt_one(&self, name: &str, dir: &Path) -> Result<Found, String> {
        let rec_path = record_path(dir);
        if !rec_path.exists() {
            return Ok(Found::Nothing);
        }
        let rec: RunRecord = read_bounded(&rec_path, MAX_RECORD_BYTES)
            .map_err(|e| e.to_string())
            .and_then(|t| serde_json::from_str(&t).map_err(|e| e.to_string()))
            .map_err(|e| format!("{}: {e}", rec_path.display()))?;
        let qemu = match Proc::adopt(rec.processes.qemu.pid, rec.processes.qemu.start) {
            Ok(p) => p,
            Err(_) => {
                self.stop_daemons(name, &rec.processes);
                return Ok(Found::Gone);
            }
        };
        // From here on, every way out but adoption stops the processes.
        let stop = |why: String| {
            qemu.kill();
            let _ = qemu.poll(Some(Duration::from_secs(10)));
            self.stop_daemons(name, &rec.processes);
            self.remove_ram_file(name, &rec.ram_file);
            why
        };
        let paths = VmPaths::new(dir);
        let stage = read_bounded(&stage_path(dir), 64)
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        // A standby the last agent left running for a suspended session
        // (its primary resumes it from the checkpoint it holds).
        let parked = match stage.as_str() {
            "standby" => crate::replication::suspend::take_parked_record(dir).unwrap_or_else(|e| {
                tracing::warn!(vm = %name, error = %e, "the record of the kept standby cannot be read");
                None
            }),
            _ => None,
        };
        if !adoptable(&stage) && parked.is_none() {
            let why = match stage.as_str() {
                "protecting" => "it was the primary of a running protection session: its backup may have taken over since (as after a crash of this host); protect to this host from the running copy to resync it".to_string(),
                "claimed-migrate" => "it was being migrated away: the destination may run it".to_string(),
                "standby" => "it was a standby copy: its primary sets protection up again".to_string(),
                "" => "no record of what it was here".to_string(),
                other => format!("it was '{other}' here"),
            };
            return Ok(Found::Stopped(stop(why)));
        }
        if paths.fenced_marker().exists() {
            return Ok(Found::Stopped(stop(
                "the arbiter's fence held it paused: this host may not run it".into(),
            )));
        }
        let config = read_bounded(&paths.config(), MAX_CONFIG_BYTES)
            .map_err(|e| e.to_string())
            .and_then(|t| {
                serde_json::from_str::<remus_config::VmConfig>(&t).map_err(|e| e.to_string())
            })
            .and_then(|c| c.validate().map(|()| c).map_err(|e| e.to_string()))
            .map_err(|e| stop(format!("{}: {e}", paths.config().display())))?;
        if config.name != name {
            return Err(stop(format!(
                "its config names '{}', not its directory's '{name}'",
                config.name
            )));
        }
        if !rec.ram_file.starts_with(self.ram_files_dir()) {
            return Err(stop(format!(
                "its RAM file {} is not in this agent's RAM directory",
                rec.ram_file.display()
            )));
        }
        drop(qemu);
        let opts = StartOptions {
            qemu: self.opts.qemu.clone(),
            ram_file: rec.ram_file.clone(),
            accel: rec.accel,
            tap_names: rec.tap_names.clone(),
            incoming: parked.is_some(),
            // Vm::adopt takes it from the record.
            devices_only_state: rec.processes.devices_only_state,
        };
        // Vm::adopt stops QEMU itself when it fails.
        let vm = Vm::adopt(config, paths, opts, &rec.processes).map_err(|e| {
            self.stop_daemons(name, &rec.processes);
            e.to_string()
        })?;
        if let Some(p) = parked {
            tracing::info!(vm = %name, epoch = p.epoch, peer = %p.peer, "a standby kept across the restart: waiting for its primary to resume the session");
            let slot = self.insert_adopted(
                rec.id,
                vm,
                Stage::Standby {
                    purpose: remus_proto::Purpose::Protect,
                },
            );
            save(slot.vm.paths.dir(), &rec);
            self.adopted_standby((slot.clone(), p, rec.ram_file.clone()));
            return Ok(Found::Adopted(slot));
        }
        // A VM that was protected from here goes on alone: its writes are
        // recorded for the changed-only resync, as at the end of a session
        // (the change map keeps its marks).
        let copy_dir = crate::copies::dir(&self.opts.state_dir, name);
        if let Ok(Some(st)) = crate::copies::load(&copy_dir, name)
            && st.running
            && let Err(e) = crate::copies::track_changes(&vm, &copy_dir)
        {
            vm.destroy();
            return Err(format!(
                "cannot record its disk changes for the next resync: {e}"
            ));
        }
        // Frames to the guest reach it through a new tap port: the guest
        // announces itself so that switches learn where it is now.
        if let Err(e) = remus_vm::vm::announce_self(vm.qmp()) {
            tracing::warn!(vm = %name, error = %e, "announce-self");
        }
        // A session the last agent suspended: the guest stays stopped at
        // its checkpoint until the session resumes (see
        // `replication::suspend`). A record that cannot be read leaves it
        // paused for the operator: the backup may run the VM after its
        // grace.
        let suspended = crate::replication::suspend::read_record(dir);
        let slot = self.insert_adopted(rec.id, vm, Stage::Unprotected);
        save(slot.vm.paths.dir(), &rec);
        match suspended {
            Ok(None) => {}
            Ok(Some(s)) => {
                tracing::info!(vm = %name, epoch = s.epoch, peer = %s.request.peer, "its protection session was suspended for the restart: resuming it");
                self.suspended_at_start(name, s);
            }
            Err(e) => {
                tracing::error!(vm = %name, error = %e, "its protection session was suspended for the restart, but the record cannot be read: the VM stays PAUSED. Check its backup: if the backup runs the VM, destroy this copy; if not, `remus unpause` it here");
                slot.vm.mark_operator_paused();
                crate::replication::suspend::remove_record(slot.vm.paths.dir());
            }
        }
        Ok(Found::Adopted(slot))
    }

    /// Stops the recorded qemu-storage-daemons that still run.
    fn stop_daemons(&self, name: &str, procs: &Processes) {
        for (target, id) in &procs.daemons {
            if let Ok(p) = Proc::adopt(id.pid, id.start) {
                tracing::info!(vm = %name, disk = %target, pid = id.pid, "stopping the qemu-storage-daemon left running");
                p.kill();
                let _ = p.poll(Some(Duration::from_secs(10)));
            }
        }
    }

    fn remove_ram_file(&self, name: &str, file: &Path) {
        if !file.starts_with(self.ram_files_dir()) {
            return;
        }
        remus_vm::vm::remove_ram_file(name, file);
    }
}
