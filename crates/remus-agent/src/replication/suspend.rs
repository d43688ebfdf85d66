//! A protection session that outlives a restart of the primary's agent.
//!
//! When the primary's agent stops (`--on-stop keep`), its session is not
//! ended but suspended: the last checkpoint leaves the guest stopped, the
//! backup acknowledges it, and a Suspend asks the backup to keep its
//! standby for the agent's `--restart-grace` instead of failing over when
//! the link closes ([`park`]). The guest stays stopped while no agent runs (its
//! disk and network I/O wait for the agent anyway). The next agent adopts
//! the VM, finds [`SuspendRecord`] in its directory and opens a session
//! that resumes from that checkpoint ([`resume_suspended`]): the backup
//! still holds exactly that epoch, so nothing is copied; the guest runs
//! again as soon as the backup is ready.
//!
//! Whatever goes wrong falls back to what a restart did before: a backup
//! that no longer holds the epoch sets up a new copy (changed-only disk
//! sync); a backup that cannot be reached within the grace is given up
//! and the VM runs on here unprotected (the healer protects it again); a
//! backup that resumed the VM after the grace (it took the silence for a
//! dead host) runs it, and the copy here is stopped and listed stale.
//! The guest never runs here while the backup may run it: it runs again
//! only once the backup answered, or once the grace (after which the
//! backup fails over) has passed without an answer from it — the same
//! choice as any session whose link fails without an arbiter.
//! Arbitrated sessions are not suspended (their key would lapse with the
//! agent): they end and are protected again as before.
//!
//! The backup's agent restarts the same way round: it tells the primary
//! (a Restarting), the primary suspends the session as for its own
//! restart, and the backup leaves its parked standby running for its next
//! agent (`parked.json` beside it, [`persist_for_restart`]), which adopts
//! it ([`park_adopted`]). The primary's guest waits paused for that, at
//! most [`BACKUP_RESTART_WAIT`]; then it runs on unprotected, and the
//! backup, which restarted itself, discards its standby at the end of its
//! grace instead of failing over.

use super::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use remus_proto::Epoch;
use serde::{Deserialize, Serialize};

/// Longest `suspended.json` or `parked.json` read.
const MAX_RECORD_BYTES: u64 = 1024 * 1024;

/// Longest a primary's guest waits paused for its backup's agent to come
/// back from a restart (the backup's grace, if shorter).
pub const BACKUP_RESTART_WAIT: Duration = Duration::from_secs(15);

// ---- the backup's side ----

/// A standby kept for a suspended session, and what deciding on it
/// needs: what a backup session hands over to be parked, and takes back
/// when it resumes.
pub(super) struct Kept {
    pub slot: Arc<VmSlot>,
    pub replica: Replica,
    pub disks: Option<remus_disk::EpochBuffer>,
    pub epoch: Epoch,
    /// The primary as it connected (its address decides who may resume).
    pub peer: String,
    pub setup: SessionSetup,
    pub copy_dir: PathBuf,
    pub copy: Option<CopyState>,
    /// Kept across this agent's own restart: the primary is alive, so the
    /// end of the grace discards the standby instead of failing over.
    pub own_restart: bool,
}

/// A parked standby: kept, until the end of its grace.
pub struct Parked {
    kept: Kept,
    token: u64,
    /// The end of the grace (ms since the Unix epoch).
    until_unix_ms: u64,
}

/// The standbys kept for suspended sessions, by VM name.
#[derive(Default)]
pub struct ParkedStandbys(Mutex<BTreeMap<String, Parked>>);

static NEXT_TOKEN: AtomicU64 = AtomicU64::new(1);

impl ParkedStandbys {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Parked>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a standby of `name` waits for its primary to resume.
    pub fn holds(&self, name: &str) -> bool {
        self.lock().contains_key(name)
    }

    fn take_all(&self) -> Vec<Parked> {
        std::mem::take(&mut *self.lock()).into_values().collect()
    }
}

/// Keeps the standby of a suspended session for `grace`; past it, the
/// primary counts as lost (the failover policy decides, as for a silent
/// primary).
pub(super) fn park(agent: &Arc<Agent>, p: Kept, grace: Duration) {
    let name = p.slot.vm.name().to_string();
    let token = NEXT_TOKEN.fetch_add(1, Ordering::SeqCst);
    tracing::warn!(vm = %name, peer = %p.peer, epoch = p.epoch.0, grace_s = grace.as_secs(), "the primary's agent is restarting: the standby is kept at the last checkpoint for the session to resume; no failover unless it is not back within the grace");
    agent.parked().lock().insert(
        name.clone(),
        Parked {
            kept: p,
            token,
            until_unix_ms: now_unix_ms().saturating_add(grace.as_millis() as u64),
        },
    );
    let a = agent.clone();
    let spawned = std::thread::Builder::new()
        .name(format!("parked-{name}"))
        .spawn(move || {
            std::thread::sleep(grace);
            expire(&a, &name, token, grace);
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot time the kept standby; it waits until a session takes it");
    }
}

/// The grace passed: a standby still kept is decided on as if its primary
/// had gone silent after the checkpoint it holds.
fn expire(agent: &Arc<Agent>, name: &str, token: u64, grace: Duration) {
    let mut p = {
        let mut m = agent.parked().lock();
        if m.get(name).is_none_or(|p| p.token != token) {
            return;
        }
        let Some(p) = m.remove(name) else { return };
        p.kept
    };
    if agent.stopping() {
        return;
    }
    if p.own_restart {
        tracing::warn!(vm = %name, peer = %p.peer, "the primary did not resume the session within the grace after this agent's restart: the standby is discarded (the primary runs the VM)");
        agent.destroy_slot(&p.slot, crate::agent::CopyRecord::Keep);
        return;
    }
    let end = Ok(BackupEnd::PrimaryLost {
        committed: Some(p.epoch),
        reason: format!(
            "the primary's agent suspended the session for a restart and did not resume it within {}s",
            grace.as_secs()
        ),
        silent: true,
    });
    super::standby::decide_failover(
        agent,
        &p.slot,
        (Purpose::Protect, &p.peer, &p.setup),
        None,
        &p.replica,
        p.disks.as_mut(),
        end,
        (&p.copy_dir, p.copy),
    );
}

/// A new session of `name` arrived: the kept standby is taken back if the
/// session resumes exactly its checkpoint, from the same host, with the
/// same settings; otherwise it is discarded (its record stays, for the
/// new copy's changed-only sync). None: nothing (more) is kept.
pub(super) fn unpark(
    agent: &Arc<Agent>,
    name: &str,
    setup: &SessionSetup,
    peer: &str,
) -> Option<Kept> {
    let p = agent.parked().lock().remove(name)?.kept;
    let same_host = |a: &str, b: &str| match (
        a.parse::<std::net::SocketAddr>(),
        b.parse::<std::net::SocketAddr>(),
    ) {
        (Ok(a), Ok(b)) => a.ip() == b.ip(),
        _ => false,
    };
    let why_not = if setup.resume != Some(p.epoch.0) {
        Some(match setup.resume {
            Some(e) => format!(
                "the session resumes epoch {e}, the standby holds {}",
                p.epoch
            ),
            None => "the new session does not resume it".into(),
        })
    } else if !same_host(peer, &p.peer) {
        Some(format!(
            "the session comes from {peer}, the suspended one from {}",
            p.peer
        ))
    } else if setup.replicate_disks != p.disks.is_some() {
        Some("the new session replicates the disks differently".into())
    } else if p.slot.vm.exit_status().is_some() {
        Some("the standby QEMU stopped meanwhile".into())
    } else {
        None
    };
    if let Some(why) = why_not {
        tracing::warn!(vm = %name, %peer, epoch = p.epoch.0, "the standby kept for the suspended session is discarded: {}", remus_proto::printable(&why));
        agent.destroy_slot(&p.slot, crate::agent::CopyRecord::Keep);
        return None;
    }
    Some(p)
}

/// A standby left running across this agent's restart, for the next
/// agent (`vms/NAME/parked.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ParkedRecord {
    pub epoch: u64,
    pub peer: String,
    pub setup: SessionSetup,
    /// Until when (ms since the Unix epoch) the standby waits.
    pub deadline_unix_ms: u64,
    /// Kept for this agent's restart (the end of the grace discards it),
    /// not for the primary's (the end of the grace is a lost primary).
    pub own_restart: bool,
}

fn parked_path(dir: &Path) -> PathBuf {
    dir.join("parked.json")
}

/// The agent stops: every parked standby is recorded for the next agent
/// and left running. Returns their names.
pub(crate) fn persist_for_restart(agent: &Agent) -> Vec<String> {
    let mut names = Vec::new();
    for Parked {
        kept: p,
        until_unix_ms,
        ..
    } in agent.parked().take_all()
    {
        let name = p.slot.vm.name().to_string();
        let rec = ParkedRecord {
            epoch: p.epoch.0,
            peer: p.peer.clone(),
            setup: p.setup.clone(),
            deadline_unix_ms: until_unix_ms,
            own_restart: p.own_restart,
        };
        let path = parked_path(p.slot.vm.paths.dir());
        let r = serde_json::to_vec(&rec)
            .map_err(std::io::Error::other)
            .and_then(|b| crate::files::replace(&path, &b));
        match r {
            Ok(()) => {
                tracing::info!(vm = %name, epoch = p.epoch.0, "the standby runs on for the next agent");
                names.push(name);
            }
            Err(e) => {
                tracing::error!(vm = %name, file = %path.display(), error = %e, "cannot record the kept standby: it is dropped");
            }
        }
    }
    names
}

/// Takes the record of a standby kept across the restart out of a VM's
/// directory, if there is one and its grace has not passed.
pub fn take_parked_record(dir: &Path) -> Result<Option<ParkedRecord>, String> {
    let path = parked_path(dir);
    if !path.exists() {
        return Ok(None);
    }
    let rec = crate::files::read_bounded(&path, MAX_RECORD_BYTES)
        .map_err(|e| e.to_string())
        .and_then(|t| serde_json::from_str::<ParkedRecord>(&t).map_err(|e| e.to_string()))
        .map_err(|e| format!("{}: {e}", path.display()));
    if let Err(e) = std::fs::remove_file(&path) {
        return Err(format!("remove {}: {e}", path.display()));
    }
    let rec = rec?;
    if rec.deadline_unix_ms <= now_unix_ms() {
        return Ok(None);
    }
    Ok(Some(rec))
}

/// At start, after adoption: the standbys kept across the restart wait
/// for their primaries for the rest of their grace.
pub fn park_adopted(agent: &Arc<Agent>) {
    for (slot, rec, ram_file) in agent.adopted_standbys() {
        let name = slot.vm.name().to_string();
        let size = slot.vm.config.memory * 1024 * 1024;
        let replica = match Replica::reopen(&ram_file, size, slot.vm.paths.dir(), Epoch(rec.epoch))
        {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(vm = %name, error = %e, "the kept standby's replica cannot be reopened: it is dropped");
                agent.destroy_slot(&slot, crate::agent::CopyRecord::Keep);
                continue;
            }
        };
        let disks = rec
            .setup
            .replicate_disks
            .then(|| super::standby::standby_disks(agent, &slot));
        let copy_dir = crate::copies::dir(&agent.opts.state_dir, &name);
        let copy = crate::copies::load(&copy_dir, &name).ok().flatten();
        let left = Duration::from_millis(rec.deadline_unix_ms.saturating_sub(now_unix_ms()));
        park(
            agent,
            Kept {
                slot,
                replica,
                disks,
                epoch: Epoch(rec.epoch),
                peer: rec.peer,
                setup: rec.setup,
                copy_dir,
                copy,
                own_restart: rec.own_restart,
            },
            left,
        );
    }
}

/// The agent stops: each standby of a session that can be suspended asks
/// its primary to suspend, so that the standby is kept; waits (within
/// `deadline`) until each is parked, runs the VM, or has stopped.
pub(crate) fn suspend_standbys(agent: &Agent, deadline: std::time::Instant) {
    let asked: Vec<Arc<VmSlot>> = agent
        .slots()
        .into_iter()
        .filter(|s| s.life.role() == remus_vm::Role::Backup)
        .filter(|s| {
            s.suspend_flag()
                .map(|f| f.store(true, Ordering::SeqCst))
                .is_some()
        })
        .collect();
    for s in &asked {
        let name = s.vm.name();
        tracing::info!(vm = %name, "asking the primary to suspend the session, so that the standby is kept across the restart");
        // Until it is parked, or no longer a standby: a discarded one
        // until its QEMU has gone (its teardown must not be cut short by
        // the agent's exit).
        while !agent.parked().holds(name)
            && s.life.role() == remus_vm::Role::Backup
            && s.vm.exit_status().is_none()
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

// ---- the primary's side ----

/// What the stopping agent leaves for the next one: the session to resume.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SuspendRecord {
    /// The checkpoint the guest is stopped at (acknowledged by the backup).
    pub epoch: u64,
    /// The session as it was asked for (its peer, interval, ...).
    pub request: ProtectRequest,
    /// When it was suspended (ms since the Unix epoch) and for how long
    /// the backup keeps its standby.
    pub at_unix_ms: u64,
    pub grace_ms: u64,
    /// The backup answered the Suspend.
    pub confirmed: bool,
}

fn record_path(dir: &Path) -> PathBuf {
    dir.join("suspended.json")
}

fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Records the suspended session in the VM's directory (before the agent
/// lets the VM go).
pub(super) fn save_record(
    slot: &VmSlot,
    request: &ProtectRequest,
    (epoch, grace): (u64, Duration),
    confirmed: bool,
) -> SuspendRecord {
    let rec = SuspendRecord {
        epoch,
        request: request.clone(),
        at_unix_ms: now_unix_ms(),
        grace_ms: grace.as_millis() as u64,
        confirmed,
    };
    let path = record_path(slot.vm.paths.dir());
    let r = serde_json::to_vec_pretty(&rec)
        .map_err(std::io::Error::other)
        .and_then(|b| crate::files::replace(&path, &b));
    if let Err(e) = r {
        tracing::error!(vm = %slot.vm.name(), file = %path.display(), error = %e, "cannot record the suspended session: the next agent will leave the VM paused for you to check");
    }
    rec
}

/// The record of a suspended session in a VM's directory, if there is
/// one. It stays until the session is resumed (or given up), so that an
/// agent stopping meanwhile leaves it to the next one.
pub fn read_record(dir: &Path) -> Result<Option<SuspendRecord>, String> {
    let path = record_path(dir);
    if !path.exists() {
        return Ok(None);
    }
    crate::files::read_bounded(&path, MAX_RECORD_BYTES)
        .map_err(|e| e.to_string())
        .and_then(|t| serde_json::from_str::<SuspendRecord>(&t).map_err(|e| e.to_string()))
        .map(Some)
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// Removes the record of a suspended session: it is used.
pub fn remove_record(dir: &Path) {
    let path = record_path(dir);
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::warn!(file = %path.display(), error = %e, "cannot remove the used record of a suspended session")
        }
    }
}

/// At start, after adoption: resumes each suspended session on a thread
/// of its own.
pub fn resume_suspended(agent: &Arc<Agent>) {
    for (name, rec) in agent.suspended_sessions() {
        spawn_resume(agent, name, rec, false);
    }
}

/// The session was suspended because the backup's agent restarts: this
/// agent resumes it as soon as the backup's next agent answers.
pub(super) fn resume_after_backup_restart(agent: &Arc<Agent>, name: &str, rec: SuspendRecord) {
    agent.suspended_at_start(name, rec.clone());
    spawn_resume(agent, name.to_string(), rec, true);
}

fn spawn_resume(agent: &Arc<Agent>, name: String, rec: SuspendRecord, backup_restart: bool) {
    let a = agent.clone();
    let spawned = std::thread::Builder::new()
        .name(format!("resume-{name}"))
        .spawn(move || {
            resume_one(&a, &name, &rec, backup_restart);
            a.resumed(&name);
            // Used: a later restart of this agent must not resume it again
            // (unless this one stops meanwhile: the next one resumes it).
            if !a.stopping()
                && let Ok(slot) = a.slot(&name)
            {
                remove_record(slot.vm.paths.dir());
            }
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start resuming a suspended session");
    }
}

fn resume_one(agent: &Arc<Agent>, name: &str, rec: &SuspendRecord, backup_restart: bool) {
    let deadline_ms = rec.at_unix_ms.saturating_add(rec.grace_ms);
    let peer = rec.request.peer.clone();
    tracing::info!(vm = %name, %peer, epoch = rec.epoch, "resuming the session suspended by the last agent");
    let mut tries = 0u32;
    loop {
        if agent.stopping() {
            return;
        }
        let Ok(slot) = agent.slot(name) else {
            return;
        };
        tries += 1;
        match protect::start_protect_from(agent, name, rec.request.clone(), Some(Epoch(rec.epoch)))
        {
            Ok(()) => return,
            // The backup restarted itself and never fails over from that:
            // a backup that runs the VM now is a split brain, for the
            // operator to settle; the guest here stays paused.
            Err(AgentError::PeerRefused {
                code: ErrorCode::AlreadyRuns,
                message,
            }) if backup_restart => {
                tracing::error!(vm = %name, %peer, "the backup RUNS THE VM although only its agent restarted: the guest here stays PAUSED. Check the backup: destroy one of the two copies, then `remus unpause` here if this is the one kept ({})", remus_proto::printable(&message));
                slot.vm.mark_operator_paused();
                return;
            }
            Err(AgentError::PeerRefused {
                code: ErrorCode::AlreadyRuns,
                message,
            }) => {
                tracing::error!(vm = %name, %peer, "the backup RUNS THE VM (it resumed it after the grace): the copy here is stopped and listed stale ({})", remus_proto::printable(&message));
                agent.destroy_slot(&slot, crate::agent::CopyRecord::Keep);
                agent.list_stale(name);
                return;
            }
            Err(e) if now_unix_ms() < deadline_ms => {
                if tries == 1 || tries.is_multiple_of(10) {
                    tracing::warn!(vm = %name, %peer, error = %e, "cannot resume the suspended session yet; the guest stays paused until the backup answers or its grace has passed");
                }
                std::thread::sleep(Duration::from_millis(500));
            }
            Err(e) => {
                // The backup did not answer within its grace: it is gone,
                // or (the link failed) it has resumed its copy, as after
                // any lost link without an arbiter.
                tracing::error!(vm = %name, %peer, error = %e, "the backup did not answer within the grace of the suspended session: the VM runs on here UNPROTECTED");
                if !slot.vm.is_held()
                    && let Err(e) = slot.vm.qmp().execute("cont", None)
                {
                    tracing::error!(vm = %name, error = %e, "cannot resume the guest");
                }
                agent.wishes().poke();
                return;
            }
        }
    }
}

/// The agent stops: asks the protection session to suspend instead of
/// ending; false if it cannot (no resumable backup).
pub(crate) fn request(slot: &VmSlot) -> bool {
    if !matches!(slot.life.stage(), Stage::Protecting { .. }) {
        return false;
    }
    match slot.suspend_flag() {
        Some(f) => {
            f.store(true, Ordering::SeqCst);
            true
        }
        None => false,
    }
}
