//! The agent's state: the VMs this host owns, and the operations on them.
//!
//! One map of VMs behind a mutex; QEMU and QMP work happens outside the
//! lock (on blocking threads) so that a slow VM never stalls `list`.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use remus_api::{HostInfo, SessionEvent, VcpuInfo, VmInfo};
use remus_config::VmConfig;
use remus_vm::{QemuBinary, ResolvedAccel, Role, RunState, StartOptions, Vm, VmPaths};

use crate::lifecycle::{Life, Refused, Stage};

/// An error of an API operation, with its HTTP meaning.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Internal(String),
    /// The peer agent refused the session: its code says what may help
    /// (e.g. `Busy`: try again), the text is for people.
    #[error("{message}")]
    PeerRefused {
        code: remus_proto::ErrorCode,
        message: String,
    },
}

/// Agent settings (from the command line).
#[derive(Clone)]
pub struct AgentOptions {
    pub state_dir: PathBuf,
    /// Where guest RAM files go (tmpfs is best).
    pub ram_dir: PathBuf,
    pub qemu: QemuBinary,
    pub replication_listen: Option<String>,
    /// Shared key authenticating replication peers.
    pub key: Option<remus_proto::Key>,
    /// The etcd arbiter deciding which host may run a protected VM.
    pub arbiter: Option<Arc<crate::arbiter::AgentArbiter>>,
    /// Activity-log extents kept marked per disk (`--al-extents`).
    pub al_extents: usize,
    /// As a backup, accept sessions in the clear (protocol-5 peers during a
    /// rolling upgrade, `protect --unencrypted`).
    pub allow_unencrypted: bool,
    /// Where copies kept for peers live.
    pub storage: crate::storage::Storage,
    /// Bound of a backup's spill file of uncommitted disk writes (MiB).
    pub max_spill_mib: u64,
    /// Metrics and event hooks.
    pub observer: Arc<crate::observe::Observer>,
    /// Default cap of the bulk transfers, bytes/s (`--max-rate`; 0: none).
    pub max_rate: u64,
    /// What stopping the agent does to its VMs (`--on-stop`).
    pub on_stop: crate::cli::OnStop,
    /// How long a backup keeps the standby of a session suspended for a
    /// restart of this agent (`--restart-grace`).
    pub restart_grace: std::time::Duration,
    /// Who decides a failover (`--failover-by`).
    pub failover_by: crate::cli::FailoverBy,
}

impl AgentOptions {
    /// Whether a cluster manager decides every failover
    /// (`--failover-by cluster`).
    pub fn cluster_decides(&self) -> bool {
        self.failover_by == crate::cli::FailoverBy::Cluster
    }
}

/// What a VM's event channel carries.
#[derive(Debug, Clone)]
pub enum Published {
    Event(SessionEvent),
    /// The session is over: a follower's stream ends here.
    End,
}

/// One VM owned by this agent.
pub struct VmSlot {
    pub id: u32,
    pub vm: Vm,
    /// What the VM is here, and the session that holds it.
    pub life: Life,
    console_attached: AtomicBool,
    /// The session's events as they happen, for followers.
    events: tokio::sync::broadcast::Sender<Published>,
    /// The current session's milestone events (everything but the
    /// per-checkpoint and progress lines), replayed to a follower that
    /// subscribes late, so that it never misses how the session started.
    history: Mutex<Vec<SessionEvent>>,
    /// The current session's last checkpoint event.
    last_checkpoint: Mutex<Option<remus_api::CheckpointStats>>,
    /// The VM's arbiter key, once this host has held it.
    pub arbiter: Mutex<Option<Arc<crate::arbiter::Guard>>>,
    observer: Arc<crate::observe::Observer>,
    /// The session the healer set up after protection was lost: its
    /// first acknowledged checkpoint is `protection-restored`.
    restoring: AtomicBool,
    /// The protection session's request to suspend at the agent's stop,
    /// when its backup keeps the standby across it.
    suspend: Mutex<Option<Arc<AtomicBool>>>,
    /// When this VM's session was last suspended for a restart of its
    /// backup's agent.
    backup_restart: Mutex<Option<std::time::Instant>>,
    /// Waiting for the cluster manager's word (`--failover-by cluster`).
    pub cluster_hold: crate::cluster::Hold,
}

/// How often a backup's restart may pause a VM: once in this long.
const BACKUP_RESTART_EVERY: std::time::Duration = std::time::Duration::from_secs(600);

/// The arbiter's guard sees the slot through this (and so does not
/// depend on the agent).
impl crate::arbiter::Guarded for VmSlot {
    fn vm(&self) -> &Vm {
        &self.vm
    }
    fn publish(&self, event: SessionEvent) {
        VmSlot::publish(self, event)
    }
    fn release_held_output(&self) {
        VmSlot::release_held_output(self)
    }
    fn protected(&self) -> bool {
        self.protected_to().is_some()
    }
    fn notice(&self, notice: crate::observe::Notice) {
        VmSlot::notice(self, notice)
    }
}

impl VmSlot {
    fn new(id: u32, vm: Vm, stage: Stage, observer: Arc<crate::observe::Observer>) -> VmSlot {
        let life = Life::recorded(stage, crate::adopt::stage_path(vm.paths.dir()));
        VmSlot {
            id,
            vm,
            life,
            console_attached: AtomicBool::new(false),
            events: tokio::sync::broadcast::channel(256).0,
            history: Mutex::new(Vec::new()),
            last_checkpoint: Mutex::new(None),
            arbiter: Mutex::new(None),
            observer,
            restoring: AtomicBool::new(false),
            suspend: Mutex::new(None),
            cluster_hold: Default::default(),
            backup_restart: Mutex::new(None),
        }
    }
    /// Whether a restart of the backup's agent may suspend this VM's
    /// session (pausing the guest) now: once in ten minutes.
    pub fn backup_may_restart(&self) -> bool {
        lock(&self.backup_restart).is_none_or(|t| t.elapsed() >= BACKUP_RESTART_EVERY)
    }
    /// The session was suspended for a restart of the backup's agent.
    pub fn backup_restarted(&self) {
        *lock(&self.backup_restart) = Some(std::time::Instant::now());
    }
    /// The running session's suspend request (see
    /// [`crate::replication::suspend`]), if its backup takes one.
    pub fn set_suspend_flag(&self, flag: Option<Arc<AtomicBool>>) {
        *lock(&self.suspend) = flag;
    }
    pub fn suspend_flag(&self) -> Option<Arc<AtomicBool>> {
        lock(&self.suspend).clone()
    }
    /// Reports `notice` (metrics, hooks) with the VM's role here now.
    pub fn notice(&self, notice: crate::observe::Notice) {
        self.observer
            .notice(self.vm.name(), self.life.role().name(), notice);
    }
    /// The session just set up restores protection that was lost.
    pub fn expect_restoration(&self) {
        self.restoring.store(true, Ordering::SeqCst);
    }
    /// Publishes a replication event (nobody listening is fine).
    pub fn publish(&self, event: SessionEvent) {
        self.observer.session_event(self.vm.name(), &event);
        if let SessionEvent::Checkpoint(c) = &event
            && self.restoring.swap(false, Ordering::SeqCst)
            && let Some(peer) = self.protected_to()
        {
            tracing::info!(vm = %self.vm.name(), %peer, epoch = c.epoch, "PROTECTION RESTORED: the backup acknowledged the first checkpoint");
            self.notice(crate::observe::Notice::ProtectionRestored {
                peer,
                epoch: c.epoch,
            });
        }
        let mut h = lock(&self.history);
        if let SessionEvent::Checkpoint(c) = &event {
            *lock(&self.last_checkpoint) = Some(c.clone());
        }
        if !event.is_progress() && h.len() < 64 {
            h.push(event.clone());
        }
        let _ = self.events.send(Published::Event(event));
    }
    /// Ends the session's stream: followers stop there.
    pub fn end_session(&self) {
        let _ = self.events.send(Published::End);
    }
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Published> {
        self.events.subscribe()
    }
    /// The session's milestones so far and a subscription to what follows
    /// (taken together: nothing is missed or repeated).
    pub fn follow(
        &self,
    ) -> (
        Vec<SessionEvent>,
        tokio::sync::broadcast::Receiver<Published>,
    ) {
        let h = lock(&self.history);
        (h.clone(), self.events.subscribe())
    }
    /// Claims the VM for a protection or migration session to `peer`
    /// ([`Life::claim`]); a new session's events start afresh.
    pub fn claim(
        &self,
        purpose: remus_proto::Purpose,
        peer: &str,
        stop: Arc<AtomicBool>,
    ) -> Result<(), Refused> {
        self.life.claim(purpose, peer, stop)?;
        lock(&self.history).clear();
        *lock(&self.last_checkpoint) = None;
        Ok(())
    }
    /// The peer of the session that holds the VM, if one does.
    pub fn protected_to(&self) -> Option<String> {
        self.life.peer()
    }
    /// Marks the console attached; false when someone already is.
    pub fn claim_console(&self) -> bool {
        !self.console_attached.swap(true, Ordering::SeqCst)
    }
    pub fn release_console(&self) {
        self.console_attached.store(false, Ordering::SeqCst);
    }
    /// Sends the output a protection session left held, once the VM is
    /// neither protected nor fenced (both the end of a session and the
    /// lifting of a fence call this; whichever comes last releases it).
    pub fn release_held_output(&self) {
        if self.protected_to().is_none() && !self.vm.is_fenced() {
            for n in self.vm.output_commits() {
                n.go_live();
            }
        }
    }
    pub fn arbiter_guard(&self) -> Option<Arc<crate::arbiter::Guard>> {
        lock(&self.arbiter).clone()
    }
}

/// What happens to a VM's copy record when the VM goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyRecord {
    /// Forget it (`remus destroy`, a migrated VM's source).
    Forget,
    /// Keep it as it is (agent shutdown: a copy that was running is stale
    /// when the agent starts again; a discarded standby keeps what its
    /// disks hold).
    Keep,
    /// Keep it, marked given up (`remus destroy --discard-this-copy`): a
    /// resync may overwrite it whatever it ran.
    Discard,
}

/// A copy this host used to run, found when the agent started: it never
/// runs again on its own.
#[derive(Debug, Clone)]
pub struct StaleCopy {
    pub id: u32,
    pub state: remus_replication::copy::CopyState,
}

/// The agent.
pub struct Agent {
    pub opts: AgentOptions,
    vms: Mutex<BTreeMap<String, Arc<VmSlot>>>,
    /// Stale copies (not running), by name.
    stale: Mutex<BTreeMap<String, StaleCopy>>,
    /// Names being created right now (reserved against a second create).
    creating: Mutex<HashSet<String>>,
    next_id: AtomicU32,
    /// A short tag unique to this agent, used in tap names so that two
    /// agents in one network namespace never collide.
    tag: String,
    qemu_version: Result<String, String>,
    /// The protection wanted per VM, and the healer's state.
    wishes: Arc<crate::wishes::Wishes>,
    /// Set when the agent shuts down: the healer stops.
    stopping: AtomicBool,
    /// Backup: standbys kept for sessions their primary's agent suspended
    /// to restart.
    parked: crate::replication::ParkedStandbys,
    /// Primary: adopted VMs whose session the last agent suspended, until
    /// it is resumed (the healer leaves them alone meanwhile).
    suspended: Mutex<BTreeMap<String, crate::replication::SuspendRecord>>,
    /// Backup: standbys adopted from the last agent, to park once the
    /// agent runs (see `replication::suspend::park_adopted`).
    adopted_standbys: Mutex<Vec<AdoptedStandby>>,
}

/// A standby the last agent left running for a suspended session: its
/// slot, the record of the session and its RAM file.
pub(crate) type AdoptedStandby = (
    Arc<VmSlot>,
    crate::replication::suspend::ParkedRecord,
    std::path::PathBuf,
);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Agent {
    /// Prepares the state directory and checks QEMU.
    pub fn new(opts: AgentOptions) -> anyhow::Result<Agent> {
        use anyhow::Context;
        // Guest memory, disks, consoles and sockets live here: readable
        // by this agent's user only.
        for d in [
            opts.state_dir.clone(),
            opts.state_dir.join("vms"),
            opts.state_dir.join("logs"),
            opts.state_dir.join("copies"),
            opts.state_dir.join("protection"),
        ] {
            private_dir(&d).with_context(|| format!("state dir {}", d.display()))?;
        }
        std::fs::create_dir_all(&opts.ram_dir)
            .with_context(|| format!("create RAM dir {}", opts.ram_dir.display()))?;
        warn_unless_memory_fs(&opts.ram_dir);
        let tag = agent_tag(&opts.state_dir)?;
        // RAM files go into a directory of this agent's own inside the
        // RAM directory (often /dev/shm, writable by everyone): nobody
        // else can create, replace or read a guest's memory there.
        private_dir(&ram_files_dir(&opts.ram_dir, &tag))
            .with_context(|| format!("RAM dir {}", opts.ram_dir.display()))?;
        let next_id = read_next_id(&opts.state_dir);
        let qemu_version = match remus_vm::qemu_version(&opts.qemu.path) {
            Ok(v) if v >= remus_vm::MIN_QEMU => Ok(format!("{}.{}", v.0, v.1)),
            Ok(v) => Err(format!(
                "QEMU {}.{} at {} is too old: remus needs QEMU {}.{} or newer (Debian: bookworm-backports; run scripts/install-deps.sh)",
                v.0,
                v.1,
                opts.qemu.path.display(),
                remus_vm::MIN_QEMU.0,
                remus_vm::MIN_QEMU.1
            )),
            Err(e) => Err(e),
        };
        match &qemu_version {
            Ok(v) => {
                tracing::info!(qemu = %v, "QEMU found");
                probe_kvm_in_background(&opts.qemu.path);
            }
            Err(e) => tracing::error!(error = %e, "QEMU unusable; VMs cannot be created"),
        }
        let wishes = crate::wishes::Wishes::load(&opts.state_dir.join("protection"))
            .context("protection wishes")?;
        let agent = Agent {
            wishes: Arc::new(wishes),
            stopping: AtomicBool::new(false),
            parked: Default::default(),
            suspended: Mutex::new(BTreeMap::new()),
            adopted_standbys: Mutex::new(Vec::new()),
            opts,
            vms: Mutex::new(BTreeMap::new()),
            stale: Mutex::new(BTreeMap::new()),
            creating: Mutex::new(HashSet::new()),
            next_id: AtomicU32::new(next_id),
            tag,
            qemu_version,
        };
        // What an earlier agent left running, before anything else: an
        // adopted VM is neither a leftover nor a stale copy.
        let adopted = if agent.qemu_version.is_ok() {
            agent.adopt_leftovers()
        } else {
            Vec::new()
        };
        for leftover in leftover_vm_dirs(&agent.opts.state_dir) {
            if leftover
                .file_name()
                .is_some_and(|n| adopted.iter().any(|a| n == a.as_str()))
            {
                continue;
            }
            tracing::warn!(dir = %leftover.display(), "VM directory left by an earlier agent; it is cleaned up when a VM of that name is created");
        }
        {
            let mut stale = lock(&agent.stale);
            for (name, state) in crate::copies::stale_at_start(&agent.opts.state_dir) {
                if adopted.contains(&name) {
                    continue;
                }
                tracing::warn!(vm = %name, generation = %state.gens.current, "STALE COPY: this VM ran here when the agent stopped; its backup may have taken over since. It is listed as stale and never runs on its own: protect to this host from the running copy to resync it, or `remus destroy` it");
                let id = agent.next_id.fetch_add(1, Ordering::SeqCst);
                stale.insert(name, StaleCopy { id, state });
            }
        }
        Ok(agent)
    }

    /// The standbys kept for suspended sessions (backup side).
    pub fn parked(&self) -> &crate::replication::ParkedStandbys {
        &self.parked
    }

    /// Records that VM `name`, just adopted, waits for its suspended
    /// session to resume.
    pub(crate) fn suspended_at_start(&self, name: &str, rec: crate::replication::SuspendRecord) {
        lock(&self.suspended).insert(name.to_string(), rec);
    }

    /// Records a standby adopted from the last agent, to park.
    pub(crate) fn adopted_standby(&self, s: AdoptedStandby) {
        lock(&self.adopted_standbys).push(s);
    }

    /// The standbys adopted at start, to park (taken once).
    pub(crate) fn adopted_standbys(&self) -> Vec<AdoptedStandby> {
        std::mem::take(&mut *lock(&self.adopted_standbys))
    }

    /// The suspended sessions waiting to resume.
    pub fn suspended_sessions(&self) -> Vec<(String, crate::replication::SuspendRecord)> {
        lock(&self.suspended)
            .iter()
            .map(|(n, r)| (n.clone(), r.clone()))
            .collect()
    }

    /// The suspended session of `name` is resumed, or given up.
    pub fn resumed(&self, name: &str) {
        lock(&self.suspended).remove(name);
    }

    /// Whether `name`'s suspended session is still being resumed.
    pub fn resuming(&self, name: &str) -> bool {
        lock(&self.suspended).contains_key(name)
    }

    /// Lists the copy of `name` stale now (its QEMU was stopped because
    /// another host runs the VM), from its copy record.
    pub(crate) fn list_stale(&self, name: &str) {
        let dir = crate::copies::dir(&self.opts.state_dir, name);
        if let Ok(Some(state)) = crate::copies::load(&dir, name)
            && state.running
        {
            let id = self.next_id.fetch_add(1, Ordering::SeqCst);
            lock(&self.stale).insert(name.to_string(), StaleCopy { id, state });
        }
    }

    /// This agent's own directory for RAM files.
    pub(crate) fn ram_files_dir(&self) -> PathBuf {
        ram_files_dir(&self.opts.ram_dir, &self.tag)
    }

    /// Lists a VM adopted from an earlier agent, with its ID.
    pub(crate) fn insert_adopted(&self, id: u32, vm: Vm, stage: Stage) -> Arc<VmSlot> {
        let name = vm.name().to_string();
        self.next_id.fetch_max(id + 1, Ordering::SeqCst);
        let _ = std::fs::write(
            self.opts.state_dir.join("next-id"),
            format!("{}\n", self.next_id.load(Ordering::SeqCst)),
        );
        let slot = Arc::new(VmSlot::new(id, vm, stage, self.opts.observer.clone()));
        lock(&self.vms).insert(name, slot.clone());
        slot
    }

    pub fn host_info(&self) -> HostInfo {
        let probe = remus_vm::kvm::qemu_kvm_usable(
            &self.opts.qemu.path,
            remus_vm::qemu_args::DEFAULT_KVM_CPU,
            "q35",
        );
        let (kvm, kvm_reason) = match probe {
            Ok(()) => (true, None),
            Err(e) => (false, Some(e)),
        };
        HostInfo {
            agent_version: env!("CARGO_PKG_VERSION").into(),
            qemu: self.qemu_version.clone().unwrap_or_else(|e| e),
            kvm,
            kvm_reason,
            state_dir: self.opts.state_dir.clone(),
            replication_listen: self.opts.replication_listen.clone(),
            arbiter: self.opts.arbiter.as_ref().map(|a| a.host_info()),
        }
    }

    pub fn observer(&self) -> &crate::observe::Observer {
        &self.opts.observer
    }

    pub fn wishes(&self) -> Arc<crate::wishes::Wishes> {
        self.wishes.clone()
    }

    /// The protection wanted for `name`, if any.
    pub fn wish(&self, name: &str) -> Option<crate::wishes::Wish> {
        self.wishes.get(name)
    }

    pub fn stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    pub fn key(&self) -> Option<remus_proto::Key> {
        self.opts.key.clone()
    }

    pub fn slot(&self, name: &str) -> Result<Arc<VmSlot>, AgentError> {
        if let Some(s) = lock(&self.vms).get(name) {
            return Ok(s.clone());
        }
        if self.is_stale(name) {
            return Err(AgentError::Conflict(format!(
                "VM '{name}' is a stale copy here (it does not run): protect to this host from the running copy to resync it, or destroy it"
            )));
        }
        Err(AgentError::NotFound(format!(
            "no VM named '{name}' on this host"
        )))
    }

    pub fn slots(&self) -> Vec<Arc<VmSlot>> {
        lock(&self.vms).values().cloned().collect()
    }

    /// Creates and starts a VM. Blocking: call from a blocking thread.
    pub fn create(&self, config: VmConfig) -> Result<VmInfo, AgentError> {
        config
            .validate()
            .map_err(|e| AgentError::BadRequest(format!("invalid config: {e}")))?;
        config
            .check_host()
            .map_err(|e| AgentError::BadRequest(format!("invalid config: {e}")))?;
        let qemu_ok = self
            .qemu_version
            .as_ref()
            .map_err(|e| AgentError::Internal(e.clone()))?;
        let name = config.name.clone();
        {
            let vms = lock(&self.vms);
            if let Some(s) = vms.get(&name) {
                return Err(AgentError::Conflict(format!(
                    "a VM named '{name}' already exists (id {}); destroy it first or choose another name",
                    s.id
                )));
            }
            if lock(&self.stale).contains_key(&name) {
                return Err(AgentError::Conflict(format!(
                    "a stale copy of '{name}' is kept on this host (it ran here before the agent stopped, and its backup may run it now): protect to this host from the running copy to resync it, or `remus destroy {name}` to forget it"
                )));
            }
            if !lock(&self.creating).insert(name.clone()) {
                return Err(AgentError::Conflict(format!(
                    "a VM named '{name}' is being created right now"
                )));
            }
        }
        // A record of an earlier copy no longer describes these disks once
        // a new VM runs on them.
        if crate::copies::dir(&self.opts.state_dir, &name).exists() {
            tracing::info!(vm = %name, "forgetting the replication record of an earlier copy of this VM (the next resync compares every chunk)");
            crate::copies::forget(&crate::copies::dir(&self.opts.state_dir, &name), &name);
        }
        let result = self
            .start_vm(config, qemu_ok, None)
            .map(|(slot, _)| info(&slot));
        lock(&self.creating).remove(&name);
        result
    }

    /// Reserves `name` for a copy a peer is setting up here: from the
    /// handshake's lookup until the standby exists (or the setup fails and
    /// the reservation drops), no other session, `create` or teardown can
    /// use the name: two sessions for one VM never both create its images
    /// or its record. `None` if the name is taken or busy.
    pub fn reserve(self: &Arc<Self>, name: &str) -> Option<Reservation> {
        let vms = lock(&self.vms);
        if vms.contains_key(name) || !lock(&self.creating).insert(name.to_string()) {
            return None;
        }
        Some(Reservation {
            agent: self.clone(),
            name: name.to_string(),
        })
    }

    /// Creates a standby copy (QEMU with `-incoming defer` on a RAM
    /// replica) for a replication session, under the session's
    /// reservation of the name; listed as paused, role backup.
    /// `devices_only_state`: its QEMU loads device-only state (see
    /// `remus_vm::devstate`).
    pub fn create_standby(
        &self,
        config: VmConfig,
        purpose: remus_proto::Purpose,
        devices_only_state: bool,
        reserved: &Reservation,
    ) -> Result<(Arc<VmSlot>, remus_replication::replica::Replica), AgentError> {
        let qemu = self
            .qemu_version
            .as_ref()
            .map_err(|e| AgentError::Internal(e.clone()))?
            .clone();
        if config.name != reserved.name {
            return Err(AgentError::Internal(format!(
                "the standby '{}' is not the reserved '{}'",
                config.name, reserved.name
            )));
        }
        let (slot, replica) = self.start_vm(config, &qemu, Some((purpose, devices_only_state)))?;
        Ok((
            slot,
            replica.ok_or_else(|| AgentError::Internal("no replica".into()))?,
        ))
    }

    fn start_vm(
        &self,
        config: VmConfig,
        qemu: &str,
        standby: Option<(remus_proto::Purpose, bool)>,
    ) -> Result<(Arc<VmSlot>, Option<remus_replication::replica::Replica>), AgentError> {
        let name = config.name.clone();
        let accel = remus_vm::resolve_accel(
            config.accel,
            &self.opts.qemu.path,
            config.cpu.as_deref(),
            config.machine,
        )
        .map_err(AgentError::BadRequest)?;
        let dir = self.opts.state_dir.join("vms").join(&name);
        self.clear_stale_dir(&name, &dir)?;
        let paths = VmPaths::new(&dir);
        paths.check_socket_len().map_err(AgentError::BadRequest)?;
        std::fs::create_dir_all(&dir)
            .map_err(|e| AgentError::Internal(format!("create {}: {e}", dir.display())))?;
        let id = self.next_id.fetch_add(1, Ordering::SeqCst);
        let _ = std::fs::write(self.opts.state_dir.join("next-id"), format!("{}\n", id + 1));
        let config_json =
            serde_json::to_vec_pretty(&config).map_err(|e| AgentError::Internal(e.to_string()))?;
        std::fs::write(paths.config(), config_json).map_err(|e| {
            AgentError::Internal(format!("write {}: {e}", paths.config().display()))
        })?;
        let ram_file = ram_files_dir(&self.opts.ram_dir, &self.tag).join(format!("{name}.ram"));
        // Created here, exclusively, mode 0600, at its full size, before
        // QEMU maps it (a leftover of an earlier agent in our private
        // directory is removed first). A standby's RAM file is the
        // replica checkpoints are committed to.
        match std::fs::remove_file(&ram_file) {
            Ok(()) => {
                tracing::info!(vm = %name, file = %ram_file.display(), "removed a RAM file left by an earlier agent")
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(AgentError::Internal(format!(
                    "remove {}: {e}",
                    ram_file.display()
                )));
            }
        }
        let replica = match standby {
            Some(_) => Some(
                remus_replication::replica::Replica::create(&ram_file, config.memory * 1024 * 1024)
                    .map_err(|e| AgentError::Internal(e.to_string()))?,
            ),
            None => {
                create_ram_file(&ram_file, config.memory * 1024 * 1024).map_err(|e| {
                    AgentError::Internal(format!("RAM file {}: {e}", ram_file.display()))
                })?;
                None
            }
        };
        let opts = StartOptions {
            qemu: self.opts.qemu.clone(),
            ram_file,
            accel,
            tap_names: (0..config.vifs.len())
                .map(|i| format!("rm{}v{id}n{i}", self.tag))
                .collect(),
            incoming: standby.is_some(),
            devices_only_state: standby.is_some_and(|(_, d)| d),
        };
        tracing::info!(vm = %name, id, %qemu, accel = accel.as_str(), "creating VM");
        let vm = Vm::start(config, paths, opts).map_err(|e| {
            tracing::error!(vm = %name, error = %e, "create failed");
            let _ = std::fs::remove_dir_all(&dir);
            match e {
                remus_vm::VmError::Vif { .. } | remus_vm::VmError::Disk { .. } => {
                    AgentError::BadRequest(e.to_string())
                }
                _ => AgentError::Internal(e.to_string()),
            }
        })?;
        let stage = match standby {
            Some((purpose, _)) => Stage::Standby { purpose },
            None => Stage::Unprotected,
        };
        crate::adopt::save(
            vm.paths.dir(),
            &crate::adopt::RunRecord {
                id,
                accel: vm.accel,
                ram_file: vm.ram_file.clone(),
                tap_names: vm.tap_names.clone(),
                processes: vm.processes(),
            },
        );
        // Listed under the registry's lock, unless the agent began to stop
        // meanwhile: `shutdown` raises `stopping` before it takes the list,
        // so a VM either is in that list or is destroyed here (never left
        // running behind an agent that exited without knowing it).
        let mut vms = lock(&self.vms);
        if self.stopping() {
            drop(vms);
            tracing::warn!(vm = %name, "the agent is stopping: the VM just created is destroyed again");
            vm.destroy();
            let _ = std::fs::remove_dir_all(&dir);
            return Err(AgentError::Conflict("the agent is stopping".into()));
        }
        let slot = Arc::new(VmSlot::new(id, vm, stage, self.opts.observer.clone()));
        vms.insert(name.clone(), slot.clone());
        drop(vms);
        Ok((slot, replica))
    }

    /// A directory left by an earlier agent: refuse if its QEMU still runs,
    /// else keep its logs and remove it.
    fn clear_stale_dir(&self, name: &str, dir: &Path) -> Result<(), AgentError> {
        if !dir.exists() {
            return Ok(());
        }
        let paths = VmPaths::new(dir);
        if let Some(pid) = remus_vm::vm::read_pid_file(&paths.pid_file()) {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let needle = format!("{name},debug-threads=on");
            if cmdline.split(|b| *b == 0).any(|a| a == needle.as_bytes()) {
                return Err(AgentError::Conflict(format!(
                    "QEMU of an earlier '{name}' still runs as pid {pid}; stop it before creating the VM again"
                )));
            }
        }
        // A storage daemon left by an agent that died holds its image's
        // lock: say so instead of failing on the lock.
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let p = e.path();
            let is_qsd = p
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("qsd-") && n.ends_with(".pid"));
            if let Some(pid) = is_qsd.then(|| remus_vm::vm::read_pid_file(&p)).flatten() {
                let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                let sock = p.with_extension("sock");
                if cmdline
                    .windows(sock.as_os_str().len())
                    .any(|w| w == sock.as_os_str().as_encoded_bytes())
                {
                    return Err(AgentError::Conflict(format!(
                        "qemu-storage-daemon of an earlier '{name}' still runs as pid {pid} (it holds the disk image); stop it before creating the VM again"
                    )));
                }
            }
        }
        self.archive_logs(name, &paths, "stale");
        std::fs::remove_dir_all(dir)
            .map_err(|e| AgentError::Internal(format!("remove stale {}: {e}", dir.display())))
    }

    /// Keeps a VM's logs (with their rotated parts) under `logs/` for
    /// debugging after it is gone: one set per VM name and label, so the
    /// directory is bounded by the names in use.
    fn archive_logs(&self, name: &str, paths: &VmPaths, label: &str) {
        use remus_vm::logfile::with_backups;
        let logs = self.opts.state_dir.join("logs");
        for (src, kind) in [(paths.console_log(), "console"), (paths.qemu_log(), "qemu")] {
            let dst = logs.join(format!("{name}.{label}.{kind}.log"));
            for (from, to) in with_backups(&src).into_iter().zip(with_backups(&dst)) {
                let moved = std::fs::rename(&from, &to);
                match moved {
                    Ok(()) => {}
                    // An older archive's part this VM did not write.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        let _ = std::fs::remove_file(&to);
                    }
                    Err(e) => tracing::warn!(file = %from.display(), error = %e, "cannot keep log"),
                }
            }
        }
    }

    pub fn info(&self, name: &str) -> Result<VmInfo, AgentError> {
        // The stale list's guard ends with this statement: `slot` below
        // takes the same lock when the name is not found (a guard kept in
        // a `match` scrutinee would deadlock the agent right there).
        let stale = lock(&self.stale).get(name).map(|s| stale_info(name, s));
        let mut v = match stale {
            Some(v) => v,
            None => info(&*self.slot(name)?),
        };
        v.wanted = self.wish(name).map(|w| w.request.peer);
        Ok(v)
    }

    pub fn list(&self) -> Vec<VmInfo> {
        let mut all: Vec<VmInfo> = self.slots().iter().map(|s| info(s)).collect();
        all.extend(lock(&self.stale).iter().map(|(n, s)| stale_info(n, s)));
        all.sort_by_key(|v| v.id);
        for v in &mut all {
            v.wanted = self.wish(&v.name).map(|w| w.request.peer);
        }
        all
    }

    /// Takes a stale copy out of the list (a resync to it is starting);
    /// its record stays on disk.
    pub fn take_stale(&self, name: &str) -> Option<StaleCopy> {
        lock(&self.stale).remove(name)
    }

    /// Whether a stale copy of `name` is listed.
    pub fn is_stale(&self, name: &str) -> bool {
        lock(&self.stale).contains_key(name)
    }

    pub fn pause(&self, name: &str) -> Result<VmInfo, AgentError> {
        let slot = self.slot(name)?;
        refuse_standby(&slot, "paused")?;
        // The operator's own flag, not the live run state: a checkpoint
        // stops the guest for a few ms many times a second.
        if slot.vm.is_operator_paused() {
            return Err(AgentError::Conflict(format!(
                "VM '{name}' is already paused"
            )));
        }
        slot.vm.pause().map_err(vm_err)?;
        tracing::info!(vm = %name, "paused");
        Ok(info(&slot))
    }

    pub fn unpause(&self, name: &str) -> Result<VmInfo, AgentError> {
        let slot = self.slot(name)?;
        refuse_standby(&slot, "unpaused")?;
        if !slot.vm.is_operator_paused()
            && matches!(slot.vm.run_state(), RunState::Running | RunState::Blocked)
        {
            return Err(AgentError::Conflict(format!("VM '{name}' is not paused")));
        }
        slot.vm.unpause().map_err(vm_err)?;
        tracing::info!(vm = %name, "unpaused");
        Ok(info(&slot))
    }

    /// `remus takeover`: the cluster manager says this host runs the VM
    /// now (its peer is fenced or its instance stopped). A standby held
    /// since its primary was lost resumes; a primary held fenced since its
    /// backup was lost runs on, unprotected, its held output released.
    pub fn takeover(&self, name: &str) -> Result<VmInfo, AgentError> {
        let slot = self.slot(name)?;
        let Some((what, why)) = slot.cluster_hold.held() else {
            return Err(AgentError::Conflict(format!(
                "VM '{name}' is not waiting for a takeover here (role {}); only a VM held for the cluster's word (`remus list --json`: awaiting_takeover) is",
                slot.life.role().name()
            )));
        };
        match what {
            crate::cluster::Held::Standby => {
                tracing::warn!(vm = %name, reason = %why, "TAKEOVER: the cluster says the primary is gone; resuming the standby");
                slot.cluster_hold
                    .release_standby(crate::cluster::RESUME_WAIT)
                    .map_err(|e| {
                        AgentError::Conflict(format!("VM '{name}' did not take over: {e}"))
                    })?;
            }
            crate::cluster::Held::Primary => {
                slot.vm.unfence().map_err(vm_err)?;
                slot.cluster_hold.clear();
                slot.release_held_output();
                tracing::warn!(vm = %name, reason = %why, "TAKEOVER: the cluster says the backup is gone; the VM runs on here UNPROTECTED, its held output released");
            }
        }
        Ok(info(&slot))
    }

    /// Destroys this very VM, if it is still registered (not another VM
    /// that has taken its name since).
    pub fn destroy_slot(&self, slot: &Arc<VmSlot>, record: CopyRecord) {
        self.destroy_slot_then(slot, record, || {});
    }

    /// [`Agent::destroy_slot`], running `unlisted` once the VM is off the
    /// list and before its QEMU and files go (a migration says it is done
    /// only when the source no longer lists the VM).
    pub fn destroy_slot_then(
        &self,
        slot: &Arc<VmSlot>,
        record: CopyRecord,
        unlisted: impl FnOnce(),
    ) {
        let name = slot.vm.name().to_string();
        match self.take_slot(&name, |s| Arc::ptr_eq(s, slot)) {
            Some(s) => {
                unlisted();
                self.retire(&name, &s, record)
            }
            None => {
                unlisted();
                slot.vm.destroy()
            }
        }
    }

    /// Takes VM `name` off the map if `which` accepts its slot. Its name
    /// stays reserved until [`Agent::retire`] has removed its directory:
    /// a new copy of the same name waits meanwhile (see `busy`).
    fn take_slot(
        &self,
        name: &str,
        which: impl FnOnce(&Arc<VmSlot>) -> bool,
    ) -> Option<Arc<VmSlot>> {
        let mut vms = lock(&self.vms);
        if !vms.get(name).is_some_and(which) {
            return None;
        }
        lock(&self.creating).insert(name.to_string());
        vms.remove(name)
    }

    /// Tears down a slot [`Agent::take_slot`] took, then frees its name.
    fn retire(&self, name: &str, slot: &Arc<VmSlot>, record: CopyRecord) {
        self.teardown(name, slot, record);
        lock(&self.creating).remove(name);
    }

    /// Whether a VM of this name is being created or torn down right now.
    pub fn busy(&self, name: &str) -> bool {
        lock(&self.creating).contains(name)
    }

    /// `remus destroy [--discard-this-copy]`: a running VM is stopped; a
    /// stale copy is taken off the list. Plain, the copy's record is
    /// forgotten; with `discard`, it is kept and marked given up.
    pub fn destroy(&self, name: &str, discard: bool) -> Result<(), AgentError> {
        let record = if discard {
            CopyRecord::Discard
        } else {
            CopyRecord::Forget
        };
        // Whatever becomes of this copy, the operator wants no protection
        // of it from this host any more.
        self.wishes.clear(name);
        let stale = lock(&self.stale).remove(name);
        if let Some(s) = stale {
            tracing::info!(vm = %name, discard, "stale copy destroyed");
            self.settle_record(name, Some(s.state), record);
            return Ok(());
        }
        let slot = self
            .take_slot(name, |_| true)
            .ok_or_else(|| AgentError::NotFound(format!("no VM named '{name}' on this host")))?;
        self.retire(name, &slot, record);
        Ok(())
    }

    /// Applies `record` to a copy's record (`state`: as loaded, if known).
    fn settle_record(
        &self,
        name: &str,
        state: Option<remus_replication::copy::CopyState>,
        record: CopyRecord,
    ) {
        let dir = crate::copies::dir(&self.opts.state_dir, name);
        match record {
            CopyRecord::Forget => crate::copies::forget(&dir, name),
            CopyRecord::Keep => {}
            CopyRecord::Discard => {
                let state = state.or_else(|| crate::copies::load(&dir, name).ok().flatten());
                if let Some(mut st) = state {
                    st.discarded = true;
                    st.running = false;
                    crate::copies::save(&dir, name, &st);
                    tracing::warn!(vm = %name, generation = %st.gens.current, "this copy is given up: the next resync to this host overwrites what it ran");
                }
            }
        }
    }

    fn teardown(&self, name: &str, slot: &Arc<VmSlot>, record: CopyRecord) {
        tracing::info!(vm = %name, id = slot.id, "destroying");
        // A protected VM's destroy is a primary failure to its backup (the
        // link drops without an orderly end), as in the Remus docs.
        slot.end_session();
        slot.cluster_hold.abandon();
        let guard = lock(&slot.arbiter).take();
        if let Some(g) = &guard {
            g.stop();
        }
        slot.vm.destroy();
        // The VM no longer runs here: give its key up (if still ours).
        if let (Some(_), Some(a)) = (guard, &self.opts.arbiter)
            && let Err(e) = a.arb.clear(name)
        {
            tracing::warn!(vm = %name, error = %e, "cannot delete the VM's arbiter key; it names this host until deleted (etcdctl del)");
        }
        self.opts.observer.metrics.forget(name);
        // A VM that left for good (migrated away, destroyed) takes the
        // wish to protect it from here with it.
        if record == CopyRecord::Forget {
            self.wishes.clear(name);
        }
        self.archive_logs(name, &slot.vm.paths, &slot.id.to_string());
        if let Err(e) = std::fs::remove_dir_all(slot.vm.paths.dir()) {
            tracing::warn!(vm = %name, error = %e, "cannot remove VM directory");
        }
        self.settle_record(name, None, record);
    }

    pub fn vcpu_pin(
        &self,
        name: &str,
        vcpu: &str,
        cpus: &str,
    ) -> Result<Vec<VcpuInfo>, AgentError> {
        let slot = self.slot(name)?;
        let vcpus = remus_vm::cpuset::parse_vcpus(vcpu, slot.vm.config.vcpus)
            .map_err(AgentError::BadRequest)?;
        let ncpus = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .max(online_cpus());
        let cpus = remus_vm::cpuset::parse_cpus(cpus, ncpus).map_err(AgentError::BadRequest)?;
        for v in &vcpus {
            slot.vm.pin_vcpu(*v, &cpus).map_err(vm_err)?;
        }
        tracing::info!(vm = %name, vcpus = ?vcpus, cpus = ?cpus, "vCPUs pinned");
        self.vcpus(name)
    }

    pub fn vcpus(&self, name: &str) -> Result<Vec<VcpuInfo>, AgentError> {
        let slot = self.slot(name)?;
        (0..slot.vm.config.vcpus)
            .map(|v| {
                Ok(VcpuInfo {
                    vcpu: v,
                    thread_id: slot.vm.vcpu_thread(v).unwrap_or(0),
                    affinity: slot.vm.vcpu_affinity(v).map_err(vm_err)?,
                })
            })
            .collect()
    }

    /// Stops every VM (agent shutdown). Copy records are kept: a VM that
    /// ran here is a stale copy when the agent starts again.
    pub fn shutdown(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        self.wishes.poke();
        let keep = self.opts.on_stop == crate::cli::OnStop::Keep;
        let mut kept = Vec::new();
        if keep {
            self.end_sessions_for_restart();
            // Standbys whose primaries suspend their sessions run on for
            // the next agent.
            crate::replication::suspend::suspend_standbys(
                self,
                std::time::Instant::now() + std::time::Duration::from_secs(15),
            );
            kept = crate::replication::suspend::persist_for_restart(self);
        }
        // Keys being pinned by sessions that just ended get one TTL in all.
        let pins_until = std::time::Instant::now()
            + self
                .opts
                .arbiter
                .as_ref()
                .map_or(std::time::Duration::ZERO, |a| a.ttl);
        // No VM is listed after this (see `start_vm`).
        let names: Vec<String> = lock(&self.vms).keys().cloned().collect();
        for n in names {
            let Some(slot) = self.take_slot(&n, |_| true) else {
                continue;
            };
            if keep
                && (kept.contains(&n) || (slot.life.role() != Role::Backup && slot.vm.runs_on()))
            {
                self.leave_running(&n, &slot, pins_until);
            } else {
                self.retire(&n, &slot, CopyRecord::Keep);
            }
        }
    }

    /// Before the agent stops and leaves its VMs running: a protection
    /// session whose backup keeps its standby across a restart is
    /// suspended (the guest stops at a last checkpoint the backup holds;
    /// the next agent resumes from it, see
    /// [`crate::replication::suspend`]); every other session of a VM that
    /// runs here (protection, migration) ends in order, so that a backup
    /// drops its standby instead of failing over (the wish stays: the next
    /// agent protects the VM again). Waits up to 15 s in all.
    fn end_sessions_for_restart(&self) {
        let slots: Vec<Arc<VmSlot>> = self
            .slots()
            .into_iter()
            .filter(|s| {
                // Asked to stop now, or ending already (a lost backup).
                s.life.role() != Role::Backup
                    && (crate::replication::suspend::request(s)
                        || s.life.stop()
                        || matches!(s.life.stage(), Stage::Ending { .. }))
            })
            .collect();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
        for s in &slots {
            tracing::info!(vm = %s.vm.name(), "ending its session in order before the agent stops");
            // Until the session has let go of the VM (its end records the
            // copy and the change maps before that).
            while !matches!(s.life.stage(), Stage::Unprotected)
                && std::time::Instant::now() < deadline
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
    }

    /// Leaves a VM running for the next agent to adopt (see
    /// [`crate::adopt`]); a VM whose session did not end stays recorded as
    /// such and is not adopted.
    fn leave_running(&self, name: &str, slot: &Arc<VmSlot>, pins_until: std::time::Instant) {
        let guard = lock(&slot.arbiter).take();
        if let Some(g) = guard {
            g.stop_after_pin(pins_until);
        }
        let stage = slot.life.stage();
        if matches!(stage, Stage::Claimed { .. } | Stage::Protecting { .. }) {
            tracing::warn!(vm = %name, stage = crate::lifecycle::name(&stage), "its session did not end in time: the next agent will not adopt it");
        } else if !matches!(stage, Stage::Unprotected | Stage::Standby { .. }) {
            tracing::warn!(vm = %name, stage = crate::lifecycle::name(&stage), "its session was still ending; left running as it is");
        }
        slot.vm.detach();
        lock(&self.creating).remove(name);
    }
}

/// A standby copy is paused by design; only a failover resumes it.
fn refuse_standby(slot: &VmSlot, what: &str) -> Result<(), AgentError> {
    if slot.life.role() == Role::Backup {
        return Err(AgentError::Conflict(format!(
            "VM '{}' is a standby copy (role backup): it cannot be {what}; it runs only after a failover",
            slot.vm.name()
        )));
    }
    Ok(())
}

fn vm_err(e: remus_vm::VmError) -> AgentError {
    match e {
        remus_vm::VmError::Exited { .. } | remus_vm::VmError::Invalid { .. } => {
            AgentError::Conflict(e.to_string())
        }
        _ => AgentError::Internal(e.to_string()),
    }
}

/// The API view of a VM.
pub fn info(slot: &VmSlot) -> VmInfo {
    let role = slot.life.role();
    let mut state = slot.vm.run_state();
    // A checkpoint pauses a protected VM for a few ms many times a second;
    // that is not the operator's pause, so do not show it as one.
    if role == Role::Primary && state == RunState::Paused && !slot.vm.is_held() {
        state = RunState::Running;
    }
    VmInfo {
        name: slot.vm.name().to_string(),
        id: slot.id,
        mem_mib: slot.vm.config.memory,
        vcpus: slot.vm.config.vcpus,
        state: state.letter().to_string(),
        state_name: serde_json::to_value(state)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default(),
        role: role.name().to_string(),
        time_s: (slot.vm.cpu_seconds() * 10.0).round() / 10.0,
        accel: match slot.vm.accel {
            ResolvedAccel::Tcg => "tcg".into(),
            ResolvedAccel::Kvm => "kvm".into(),
        },
        pid: slot.vm.pid(),
        crash: slot.vm.crash_report(),
        protection: slot.protected_to().map(|peer| {
            let tuning = slot.life.tuning();
            remus_api::ProtectionInfo {
                peer,
                last_checkpoint: lock(&slot.last_checkpoint).clone(),
                held_frames: slot
                    .vm
                    .output_commits()
                    .iter()
                    .map(|c| c.held() as u64)
                    .sum(),
                interval_ms: tuning.as_ref().map(|t| t.interval().as_millis() as u64),
                timeout_ms: tuning.as_ref().map(|t| t.timeout().as_millis() as u64),
            }
        }),
        changed_chunks: slot
            .vm
            .replicated_disks()
            .iter()
            .filter_map(|p| Some((p.target().to_string(), p.change_map()?.count())))
            .collect(),
        arbiter: slot.arbiter_guard().map(|g| g.info()),
        wanted: None,
        awaiting_takeover: slot.cluster_hold.held().map(|(_, why)| why),
    }
}

/// The API view of a stale copy: shut down, role `stale`.
fn stale_info(name: &str, s: &StaleCopy) -> VmInfo {
    VmInfo {
        name: name.to_string(),
        id: s.id,
        mem_mib: s.state.memory_mib,
        vcpus: s.state.vcpus,
        state: RunState::Shutdown.letter().to_string(),
        state_name: "shutdown".into(),
        role: "stale".into(),
        time_s: 0.0,
        accel: String::new(),
        pid: 0,
        crash: None,
        protection: None,
        changed_chunks: Default::default(),
        arbiter: None,
        wanted: None,
        awaiting_takeover: None,
    }
}

fn online_cpus() -> usize {
    // SAFETY: sysconf has no memory effects.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_CONF) };
    if n > 0 { n as usize } else { 1 }
}

/// Guest RAM belongs on a memory file system. On a disk file system
/// (say a RAM directory under /var or /tmp on ext4) every checkpoint
/// pays for it: QEMU truncates and rewrites the device-state file beside
/// the RAM file, the standby's replica is written back to disk, and the
/// kernel writes the guest's memory out. It works, so the agent says so
/// once at start and goes on.
fn warn_unless_memory_fs(dir: &Path) {
    match on_memory_fs(dir) {
        Ok(true) => {}
        Ok(false) => tracing::warn!(
            dir = %dir.display(),
            "the RAM directory is not on tmpfs, hugetlbfs or ramfs: guest RAM and each checkpoint's device state go through a disk file system, which makes every checkpoint slower (pause p50 about 3.0 against 2.2 ms in the bench) and writes guest memory to disk; give --ram-dir a tmpfs (the default /dev/shm is one)"
        ),
        Err(e) => {
            tracing::debug!(dir = %dir.display(), error = %e, "could not tell the RAM directory's file system")
        }
    }
}

/// Whether `dir` is on tmpfs, hugetlbfs or ramfs.
fn on_memory_fs(dir: &Path) -> std::io::Result<bool> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes())?;
    // SAFETY: statfs only writes the struct it is given; all-zero bytes
    // are a valid value of that plain C struct.
    let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is NUL-terminated and outlives the call; `fs` is a
    // valid, writable statfs.
    if unsafe { libc::statfs(path.as_ptr(), &mut fs) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // ramfs's magic (linux/magic.h), which the libc crate leaves out.
    // Compared as the 32 bits they are, whatever width f_type has here.
    const RAMFS_MAGIC: u32 = 0x8584_58f6;
    let memory = [
        libc::TMPFS_MAGIC as u32,
        libc::HUGETLBFS_MAGIC as u32,
        RAMFS_MAGIC,
    ];
    Ok(memory.contains(&(fs.f_type as u32)))
}

/// Runs the KVM probe (`remus_vm::kvm`) for the default CPU model and
/// machine once, at agent start, on a thread of its own: it can take
/// seconds on a broken host, and the first VM with `accel = "auto"` (or
/// `remus info`) waits for the same verdict instead of starting another
/// probe. The verdict is logged once, with the reason when `auto` will
/// mean TCG.
fn probe_kvm_in_background(qemu: &Path) {
    let qemu = qemu.to_path_buf();
    let spawned = std::thread::Builder::new()
        .name("kvm-probe".into())
        .spawn(move || {
            let cpu = remus_vm::qemu_args::DEFAULT_KVM_CPU;
            match remus_vm::kvm::qemu_kvm_usable(&qemu, cpu, "q35") {
                Ok(()) => tracing::info!(
                    "accel: a 64-bit test guest ran under KVM; accel = \"auto\" uses KVM"
                ),
                Err(why) if Path::new("/dev/kvm").exists() => {
                    tracing::warn!("accel: accel = \"auto\" uses TCG (slow): {why}")
                }
                Err(why) => tracing::info!("accel: accel = \"auto\" uses TCG: {why}"),
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start the KVM probe now; it runs with the first VM");
    }
}

/// The directory of this agent's RAM files inside the RAM directory.
fn ram_files_dir(ram_dir: &Path, tag: &str) -> PathBuf {
    ram_dir.join(format!("remus-{tag}"))
}

/// Creates `dir` (mode 0700) or checks that it is this user's own private
/// directory, making it private if it is ours but open: a directory
/// someone else owns, or a symlink, is refused (whoever controls it
/// controls what we write there).
fn private_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    if let Some(parent) = dir.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| anyhow::anyhow!("create {}: {e}", parent.display()))?;
    }
    // Made by us, or checked as found: never "created unless it exists"
    // between a look and a use (in a world-writable directory such as
    // /dev/shm someone could put their own there in between).
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => anyhow::bail!("create {}: {e}", dir.display()),
    }
    let m =
        std::fs::symlink_metadata(dir).map_err(|e| anyhow::anyhow!("{}: {e}", dir.display()))?;
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if !m.is_dir() || m.uid() != me {
        anyhow::bail!(
            "{} is {} owned by uid {}, not a directory of this agent's user ({me}): remove it or choose another directory",
            dir.display(),
            if m.is_dir() {
                "a directory"
            } else {
                "not a directory"
            },
            m.uid()
        );
    }
    if m.mode() & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| anyhow::anyhow!("chmod 700 {}: {e}", dir.display()))?;
    }
    Ok(())
}

/// A primary's RAM file: new (never a file someone else made), 0600, at
/// `size`, sparse.
fn create_ram_file(path: &Path, size: u64) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?
        .set_len(size)
}

/// A 4-hex-digit tag stored in the state dir (created once).
fn agent_tag(state_dir: &Path) -> anyhow::Result<String> {
    let path = state_dir.join("agent-tag");
    if let Ok(t) = std::fs::read_to_string(&path) {
        let t = t.trim();
        if t.len() == 4 && t.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Ok(t.to_string());
        }
    }
    let mut buf = [0u8; 2];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut buf))
        .map_err(|e| anyhow::anyhow!("read /dev/urandom: {e}"))?;
    let t = format!("{:02x}{:02x}", buf[0], buf[1]);
    std::fs::write(&path, format!("{t}\n"))
        .map_err(|e| anyhow::anyhow!("write {}: {e}", path.display()))?;
    Ok(t)
}

fn read_next_id(state_dir: &Path) -> u32 {
    std::fs::read_to_string(state_dir.join("next-id"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1)
}

fn leftover_vm_dirs(state_dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(state_dir.join("vms"))
        .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default()
}

/// A VM name held for a copy being set up (see [`Agent::reserve`]); freed
/// when dropped.
pub struct Reservation {
    agent: Arc<Agent>,
    name: String,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        lock(&self.agent.creating).remove(&self.name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    #[test]
    fn a_ram_directory_on_tmpfs_is_a_memory_file_system_and_proc_is_not() {
        // Every Debian host (and container) has /dev/shm on tmpfs.
        assert!(on_memory_fs(Path::new("/dev/shm")).unwrap());
        assert!(!on_memory_fs(Path::new("/proc")).unwrap());
        assert!(on_memory_fs(Path::new("/nonexistent-remus-dir")).is_err());
    }

    /// The RAM directory lives in a world-writable place: what someone
    /// else put at its name is refused, never adopted; our own is made
    /// private.
    #[test]
    fn private_dirs_are_ours_or_refused() {
        let d = tempfile::tempdir().unwrap();
        // New: created 0700 (parents too).
        let new = d.path().join("a/b");
        private_dir(&new).unwrap();
        assert_eq!(std::fs::metadata(&new).unwrap().mode() & 0o777, 0o700);
        // Ours but open: made private.
        let open = d.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).unwrap();
        private_dir(&open).unwrap();
        assert_eq!(std::fs::metadata(&open).unwrap().mode() & 0o777, 0o700);
        // A symlink to a directory of ours: refused.
        let link = d.path().join("link");
        std::os::unix::fs::symlink(&open, &link).unwrap();
        let e = private_dir(&link).unwrap_err().to_string();
        assert!(e.contains("not a directory"), "{e}");
        // Someone else's directory (as root, give one away): refused.
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            let theirs = d.path().join("theirs");
            std::fs::create_dir(&theirs).unwrap();
            std::os::unix::fs::chown(&theirs, Some(65534), None).unwrap();
            let e = private_dir(&theirs).unwrap_err().to_string();
            assert!(e.contains("owned by uid 65534"), "{e}");
        }
    }
}
