//! Replication sessions of this agent, in both roles, and the failover
//! policy.
//!
//! Primary: `POST /v1/vms/NAME/protect` connects to the backup agent,
//! authenticates, sends the VM's config, waits for the standby to be
//! ready, then runs the epoch loop (remus-replication) on a thread of its
//! own. Events go to a broadcast channel the CLI follows.
//!
//! Backup: the `--listen` port accepts sessions; each one authenticates,
//! receives the config, checks that this host can run it (same shape,
//! disks present with the same sizes), starts a standby QEMU with
//! `-incoming defer` on a RAM replica and receives checkpoints. When the
//! session ends, [`decide_failover`] decides what happens to the standby —
//! the one place where the arbiter (etcd) can veto a failover.

use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use remus_config::VmConfig;
use remus_proto::{
    DiskCompat, ErrorCode, HelloParams, Message, Purpose, VmCompat, client_handshake,
    server_handshake,
};
use remus_replication::backup::{BackupConfig, BackupEnd};
use remus_replication::primary::{ProtectConfig, ProtectEnd, ProtectEvent};
use remus_replication::replica::Replica;
use remus_vm::Role;
use serde::{Deserialize, Serialize};

use crate::agent::{Agent, AgentError, VmSlot};

pub use remus_api::ProtectRequest;

/// What the primary sends after the handshake (the `VmConfig` message's
/// JSON): the VM's config and the session's parameters.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SessionSetup {
    pub config: VmConfig,
    /// No checkpoint or heartbeat for this long: the primary is lost.
    pub timeout_ms: u64,
    /// The VM's replicated disks are replicated in this session (protocol
    /// D): the backup syncs and buffers them. False for `--no-disk`, for
    /// VMs without replicated disks, and from agents that predate it.
    #[serde(default)]
    pub replicate_disks: bool,
    /// The primary holds the VM's arbiter key: the backup may resume only
    /// after taking it (protocol version 4 on).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arbiter: Option<ArbiterSetup>,
}

/// The arbiter a protection session is decided by.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ArbiterSetup {
    /// etcd's cluster ID as the primary sees it: the backup must talk to
    /// the same cluster.
    pub cluster_id: u64,
    pub prefix: String,
    /// The primary's lease (hex) and the revision it was taken at.
    pub lease: String,
    pub revision: i64,
}

/// Backup memory for buffered disk writes of uncommitted epochs before
/// they spill to a file in the VM's state directory.
const DISK_BUFFER_MEMORY: u64 = 128 << 20;

/// The replication-relevant shape of a VM on this host.
pub fn compat_of(cfg: &VmConfig) -> Result<VmCompat, String> {
    let mut disks = Vec::new();
    for d in cfg.disks_in_order() {
        let size = remus_nbd::qsd::image_size(&d.path, d.format.as_str())
            .map_err(|e| format!("disk {}: {}: {e}", d.target, d.path.display()))?;
        disks.push(DiskCompat {
            target: d.target.clone(),
            size_bytes: size,
        });
    }
    Ok(VmCompat {
        memory_mib: cfg.memory,
        vcpus: cfg.vcpus,
        machine: cfg.machine.to_string(),
        cpu_model: cfg.cpu.clone().unwrap_or_default(),
        disks,
        macs: (0..cfg.vifs.len()).map(|i| cfg.vif_mac(i).0).collect(),
    })
}

/// Starts protecting `name` (blocking: connects, authenticates, waits for
/// the standby). Returns once the session runs.
pub fn start_protect(
    agent: &Arc<Agent>,
    name: &str,
    req: ProtectRequest,
) -> Result<(), AgentError> {
    let slot = agent.slot(name)?;
    let key = require_key(agent)?;
    {
        let role = *slot.role.lock().unwrap_or_else(|p| p.into_inner());
        if role != Role::Unprotected {
            return Err(AgentError::Conflict(format!(
                "VM '{name}' is {} already; protect needs an unprotected running VM",
                role_name(role)
            )));
        }
    }
    // Claimed before connecting (which takes seconds): two sessions on one
    // VM would each clear the other's dirty bits and both miss pages.
    let stop = Arc::new(AtomicBool::new(false));
    if !slot.try_claim(stop.clone(), req.peer.clone()) {
        return Err(AgentError::Conflict(format!(
            "VM '{name}' is already being protected or migrated"
        )));
    }
    let claimed = Claim(&slot);
    if !(5..=60_000).contains(&req.interval_ms) {
        return Err(AgentError::BadRequest(format!(
            "interval {} ms is out of range 5..=60000",
            req.interval_ms
        )));
    }
    if req.timeout_ms < 2 * req.interval_ms.max(50) {
        return Err(AgentError::BadRequest(format!(
            "timeout {} ms must be at least twice the interval ({} ms)",
            req.timeout_ms, req.interval_ms
        )));
    }
    if slot.vm.is_fenced() {
        return Err(AgentError::Conflict(format!(
            "VM '{name}' is fenced (its arbiter lease lapsed); protect it again once the arbiter has answered and lifted the fence"
        )));
    }
    let cfg = &slot.vm.config;
    let replicate_disks = !req.no_disk && !slot.vm.replicated_disks().is_empty();
    let buffer_net = !req.no_net && !cfg.vifs.is_empty();
    slot.vm
        .dirty_tracker()
        .map_err(|e| AgentError::Conflict(e.to_string()))?;
    // Split-brain protection: this host takes the VM's key before the
    // backup exists; the backup resumes only after taking it over.
    let guard = match agent.opts.arbiter.as_ref().filter(|_| cfg.arbiter) {
        Some(arb) => Some(arbitrate(arb, &slot)?),
        None => {
            let why = if agent.opts.arbiter.is_some() {
                "the VM's config says arbiter = false"
            } else {
                "this agent has no --arbiter"
            };
            let msg = format!(
                "no arbiter ({why}): if the link between the hosts fails while both are up, the backup resumes a second running copy (split brain); see docs/operations.md"
            );
            tracing::warn!(vm = %name, "{msg}");
            slot.publish(serde_json::json!({"event": "warning", "message": msg}).to_string());
            None
        }
    };
    // Any early return from here keeps the VM running unprotected: its
    // key is pinned to this host.
    let mut pin_on_error = PinOnDrop(guard.clone());
    let arbiter_setup = match (&guard, &agent.opts.arbiter) {
        (Some(g), Some(arb)) => {
            let held = g.info();
            Some(ArbiterSetup {
                cluster_id: arb
                    .arb
                    .cluster_id()
                    .map_err(|e| AgentError::Conflict(format!("the arbiter: {e}")))?,
                prefix: arb.arb.config().prefix.clone(),
                lease: held.lease.unwrap_or_default(),
                revision: held.revision,
            })
        }
        _ => None,
    };
    let (stream, version) = open_session(
        &slot,
        &key,
        &req.peer,
        Purpose::Protect,
        req.timeout_ms,
        replicate_disks,
        arbiter_setup,
    )?;
    let compress = compression(&req.peer, version, !req.no_compress);
    if req.no_disk && !cfg.disks.is_empty() {
        tracing::warn!(vm = %name, "--no-disk: disk writes are not replicated; after a failover the backup's disk may not match its memory");
    }
    if req.no_net && !cfg.vifs.is_empty() {
        tracing::warn!(vm = %name, "--no-net: network output is not held for its checkpoint");
    }
    *slot.role.lock().unwrap_or_else(|p| p.into_inner()) = Role::Primary;
    claimed.keep();
    pin_on_error.0 = None;
    let cfg = ProtectConfig {
        interval: Duration::from_millis(req.interval_ms),
        heartbeat: Duration::from_millis((req.timeout_ms / 4).max(20)),
        timeout: Duration::from_millis(req.timeout_ms),
        replicate_disks,
        buffer_net,
        compress,
    };
    let vm_name = name.to_string();
    let slot2 = slot.clone();
    let peer = req.peer.clone();
    std::thread::Builder::new()
        .name(format!("protect-{vm_name}"))
        .spawn(move || {
            tracing::info!(vm = %vm_name, %peer, interval_ms = cfg.interval.as_millis() as u64, "protection started");
            let emit = |ev: ProtectEvent| {
                match &ev {
                    ProtectEvent::Checkpoint(s) => {
                        tracing::debug!(vm = %vm_name, epoch = s.epoch, pause_ms = s.pause_ms, dirty = s.dirty_pages, "checkpoint committed");
                    }
                    // The session's last word: whoever reads it and then
                    // asks `list` must already see the VM unprotected (and
                    // find the reason in the log).
                    ProtectEvent::BackupLost { reason } => {
                        tracing::error!(vm = %vm_name, %peer, %reason, "BACKUP LOST: the VM runs on UNPROTECTED; run `remus protect` again");
                        *slot2.role.lock().unwrap_or_else(|p| p.into_inner()) = Role::Unprotected;
                    }
                    ProtectEvent::Stopped { .. } => {
                        *slot2.role.lock().unwrap_or_else(|p| p.into_inner()) = Role::Unprotected;
                    }
                    _ => {}
                }
                slot2.publish(serde_json::to_string(&ev).unwrap_or_default());
            };
            let end = remus_replication::primary::protect(&slot2.vm, stream, &cfg, &stop, &emit);
            *slot2.role.lock().unwrap_or_else(|p| p.into_inner()) = Role::Unprotected;
            // Runs on here unprotected: nobody may take over any more.
            if let Some(g) = &guard {
                g.pin();
            }
            slot2.clear_protection();
            // Output the session left held (it ended while fenced) goes
            // out once the fence is lifted: here if it already is, else
            // by the arbiter's keeper when it lifts it.
            slot2.release_held_output();
            match end {
                Ok(ProtectEnd::Stopped) => {
                    tracing::info!(vm = %vm_name, "protection stopped by the operator");
                }
                // Logged as the event went out (above).
                Ok(ProtectEnd::BackupLost(_)) => {}
                Err(e) => {
                    slot2.publish(
                        serde_json::json!({"event": "failed", "reason": e.to_string()}).to_string(),
                    );
                    tracing::error!(vm = %vm_name, error = %e, "protection failed: the VM runs on UNPROTECTED");
                }
            }
            slot2.publish(String::new());
        })
        .map_err(|e| AgentError::Internal(format!("spawn protect thread: {e}")))?;
    Ok(())
}

/// Takes the VM's arbiter key for a protection session (a key this host
/// already holds, pinned or leased, is taken over on a new lease).
fn arbitrate(
    arb: &Arc<crate::arbiter::AgentArbiter>,
    slot: &Arc<VmSlot>,
) -> Result<Arc<crate::arbiter::Guard>, AgentError> {
    if let Some(old) = slot.arbiter_guard() {
        if old.is_stale() {
            return Err(AgentError::Conflict(format!(
                "VM '{}' is a stale copy: {} holds its arbiter key and runs it; destroy this copy",
                slot.vm.name(),
                old.info().holder
            )));
        }
        old.stop();
    }
    let guard = crate::arbiter::Guard::acquire(arb, slot).map_err(|e| match e {
        remus_arbiter::ArbiterError::HeldByOther { .. } => AgentError::Conflict(format!(
            "the arbiter refuses: {e}. If that host no longer runs the VM, delete the key: etcdctl del {}",
            arb.arb.config().runner_key(slot.vm.name())
        )),
        e => AgentError::Conflict(format!("the arbiter: {e}")),
    })?;
    *slot.arbiter.lock().unwrap_or_else(|p| p.into_inner()) = Some(guard.clone());
    Ok(guard)
}

/// Pins the VM's key to this host when dropped (a protect that failed
/// before its session ran: the VM runs on unprotected).
struct PinOnDrop(Option<Arc<crate::arbiter::Guard>>);

impl Drop for PinOnDrop {
    fn drop(&mut self) {
        if let Some(g) = &self.0 {
            g.pin();
        }
    }
}

/// The page cache for checkpoint compression, when wanted and the peer
/// speaks a version that has it.
fn compression(peer: &str, version: u16, wanted: bool) -> Option<u64> {
    if !wanted {
        return None;
    }
    if version < remus_proto::COMPRESSION_PROTOCOL_VERSION {
        tracing::warn!(%peer, version, "the peer speaks a protocol version without checkpoint compression: checkpoints travel uncompressed");
        return None;
    }
    Some(remus_proto::delta::DEFAULT_CACHE_BYTES)
}

/// Connects to a peer agent, authenticates, sends the VM's config and
/// waits until the peer has prepared its copy (standby or destination).
fn open_session(
    slot: &VmSlot,
    key: &remus_proto::Key,
    peer: &str,
    purpose: Purpose,
    timeout_ms: u64,
    replicate_disks: bool,
    arbiter: Option<ArbiterSetup>,
) -> Result<(TcpStream, u16), AgentError> {
    let name = slot.vm.name();
    let compat = compat_of(&slot.vm.config).map_err(AgentError::Internal)?;
    let mut stream = connect(peer)?;
    let session = client_handshake(&mut stream, key, &HelloParams::new(purpose, name, compat))
        .map_err(|e| AgentError::BadRequest(e.to_string()))?;
    if replicate_disks && session.version < remus_proto::DISK_PROTOCOL_VERSION {
        let _ = Message::Error {
            code: ErrorCode::VersionMismatch,
            message: "disk replication needs protocol version 2".into(),
        }
        .write_to(&mut stream);
        return Err(AgentError::BadRequest(format!(
            "the agent at {peer} speaks replication protocol {}, which cannot replicate disks (version {} can): upgrade it, or protect with --no-disk",
            session.version,
            remus_proto::DISK_PROTOCOL_VERSION
        )));
    }
    if arbiter.is_some() && session.version < remus_proto::ARBITER_PROTOCOL_VERSION {
        let _ = Message::Error {
            code: ErrorCode::VersionMismatch,
            message: "an arbitrated session needs protocol version 4".into(),
        }
        .write_to(&mut stream);
        return Err(AgentError::BadRequest(format!(
            "the agent at {peer} speaks replication protocol {}, which does not honour the arbiter (version {} does): upgrade it",
            session.version,
            remus_proto::ARBITER_PROTOCOL_VERSION
        )));
    }
    let setup = serde_json::to_string(&SessionSetup {
        config: slot.vm.config.clone(),
        timeout_ms,
        replicate_disks,
        arbiter,
    })
    .map_err(|e| AgentError::Internal(e.to_string()))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .map_err(|e| AgentError::Internal(e.to_string()))?;
    Message::VmConfig { json: setup }
        .write_to(&mut stream)
        .map_err(|e| AgentError::Internal(format!("send config to {}: {e}", session.peer)))?;
    let (_, theirs) = purpose.side_names();
    match Message::read_from(&mut stream) {
        Ok(Message::Ready) => Ok((stream, session.version)),
        Ok(Message::Error { code, message }) => Err(AgentError::BadRequest(format!(
            "{theirs} {} refused: {code}: {message}",
            session.peer
        ))),
        Ok(other) => Err(AgentError::Internal(format!(
            "{theirs} {} answered {:?} instead of Ready",
            session.peer,
            other.msg_type()
        ))),
        Err(e) => Err(AgentError::Internal(format!(
            "{theirs} {} did not prepare the VM: {e}",
            session.peer
        ))),
    }
}

/// Starts migrating `name` to the agent at `peer`; progress goes to the
/// VM's event channel (subscribe first). On success the VM is destroyed
/// here.
pub fn start_migrate(agent: &Arc<Agent>, name: &str, peer: &str) -> Result<(), AgentError> {
    let slot = agent.slot(name)?;
    let key = require_key(agent)?;
    {
        let role = *slot.role.lock().unwrap_or_else(|p| p.into_inner());
        if role != Role::Unprotected || slot.protected_to().is_some() {
            return Err(AgentError::Conflict(format!(
                "VM '{name}' is {} or busy; migrate needs an unprotected running VM (stop protection first)",
                role_name(role)
            )));
        }
    }
    if slot.vm.is_held() {
        return Err(AgentError::Conflict(format!(
            "VM '{name}' is paused; unpause it before migrating"
        )));
    }
    if slot.arbiter_guard().is_some_and(|g| g.is_leased()) {
        return Err(AgentError::Conflict(format!(
            "VM '{name}' still holds its arbiter lease from the last protection (the arbiter has not answered since); migrate once `remus list --json` shows it pinned"
        )));
    }
    if !slot.try_claim(Arc::new(AtomicBool::new(false)), peer.to_string()) {
        return Err(AgentError::Conflict(format!(
            "VM '{name}' is already being protected or migrated"
        )));
    }
    let claimed = Claim(&slot);
    slot.vm
        .dirty_tracker()
        .map_err(|e| AgentError::Conflict(e.to_string()))?;
    // Replicated disks travel with the VM; disks marked `replicate =
    // false` are taken to be shared storage both hosts see.
    let replicate_disks = !slot.vm.replicated_disks().is_empty();
    let (stream, version) = open_session(
        &slot,
        &key,
        peer,
        Purpose::Migrate,
        30_000,
        replicate_disks,
        None,
    )?;
    let mcfg = remus_replication::migrate::MigrateConfig {
        compress: compression(peer, version, true),
        ..Default::default()
    };
    claimed.keep();
    let agent = agent.clone();
    let vm_name = name.to_string();
    let peer = peer.to_string();
    std::thread::Builder::new()
        .name(format!("migrate-{vm_name}"))
        .spawn(move || {
            tracing::info!(vm = %vm_name, %peer, "migration started");
            let emit = |ev: remus_replication::migrate::MigrateEvent| {
                slot.publish(serde_json::to_string(&ev).unwrap_or_default());
            };
            let r = remus_replication::migrate::migrate(
                &slot.vm,
                stream,
                &mcfg,
                &emit,
            );
            slot.clear_protection();
            match r {
                Ok(stats) => {
                    tracing::info!(vm = %vm_name, %peer, total_ms = stats.total_ms, downtime_ms = stats.downtime_ms, bytes = stats.bytes, "migrated; destroying the source copy");
                    slot.publish(String::new());
                    agent.destroy_slot(&slot);
                }
                Err(e) => {
                    tracing::error!(vm = %vm_name, %peer, error = %e, "migration failed");
                    slot.publish(
                        serde_json::json!({"event": "failed", "reason": e.to_string()}).to_string(),
                    );
                    slot.publish(String::new());
                }
            }
        })
        .map_err(|e| AgentError::Internal(format!("spawn migrate thread: {e}")))?;
    Ok(())
}

fn connect(peer: &str) -> Result<TcpStream, AgentError> {
    let addrs: Vec<_> = peer
        .to_socket_addrs()
        .map_err(|e| AgentError::BadRequest(format!("peer '{peer}': {e} (want HOST:PORT)")))?
        .collect();
    let mut last = None;
    for a in addrs {
        match TcpStream::connect_timeout(&a, Duration::from_secs(5)) {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
    }
    Err(AgentError::BadRequest(format!(
        "cannot reach the backup agent at {peer}: {}",
        last.map(|e| e.to_string())
            .unwrap_or_else(|| "no address".into())
    )))
}

/// A claim on a VM for a session being set up: released on drop (any
/// early return) unless kept.
struct Claim<'a>(&'a VmSlot);

impl Claim<'_> {
    fn keep(self) {
        std::mem::forget(self);
    }
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        self.0.clear_protection();
    }
}

/// The replication key, or the error telling the operator how to set one.
fn require_key(agent: &Agent) -> Result<remus_proto::Key, AgentError> {
    agent.key().ok_or_else(|| {
        AgentError::BadRequest(
            "this agent has no replication key: start remusd with --key FILE (the same key file on both hosts)".into(),
        )
    })
}

pub fn role_name(r: Role) -> &'static str {
    match r {
        Role::Unprotected => "unprotected",
        Role::Primary => "primary",
        Role::Backup => "backup",
    }
}

/// Accepts replication sessions on the `--listen` port (blocking; runs on
/// its own thread).
pub fn serve(agent: Arc<Agent>, listener: TcpListener) {
    for conn in listener.incoming() {
        match conn {
            Ok(stream) => {
                let a = agent.clone();
                let peer = stream
                    .peer_addr()
                    .map(|p| p.to_string())
                    .unwrap_or_default();
                let spawned = std::thread::Builder::new()
                    .name("repl-session".into())
                    .spawn(move || {
                        if let Err(e) = backup_session(&a, stream) {
                            tracing::warn!(%peer, error = %e, "replication session refused");
                        }
                    });
                if let Err(e) = spawned {
                    tracing::error!(error = %e, "cannot start a session thread");
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "replication accept failed");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

fn backup_session(agent: &Arc<Agent>, mut stream: TcpStream) -> Result<(), String> {
    let Some(key) = agent.key() else {
        let _ = Message::Error {
            code: ErrorCode::Internal,
            message: "the backup agent has no replication key (--key)".into(),
        }
        .write_to(&mut stream);
        return Err("no --key: replication refused".into());
    };
    let (session, hello) = server_handshake(&mut stream, &key, |vm, _purpose| {
        if agent.slot(vm).is_ok() {
            Err(format!("a VM named '{vm}' already exists on this host"))
        } else {
            Ok(None)
        }
    })
    .map_err(|e| e.to_string())?;
    let peer = session.peer.clone();
    let refuse = |stream: &mut TcpStream, msg: String| {
        let _ = Message::Error {
            code: ErrorCode::Incompatible,
            message: msg.clone(),
        }
        .write_to(stream);
        msg
    };
    let setup = match Message::read_from(&mut stream) {
        Ok(Message::VmConfig { json }) => serde_json::from_str::<SessionSetup>(&json)
            .map_err(|e| refuse(&mut stream, format!("bad VM config from {peer}: {e}")))?,
        Ok(other) => {
            return Err(format!(
                "{peer} sent {:?} instead of the VM config",
                other.msg_type()
            ));
        }
        Err(e) => return Err(format!("{peer}: {e}")),
    };
    let timeout = Duration::from_millis(setup.timeout_ms.clamp(100, 600_000));
    let arbiter = match &setup.arbiter {
        None => None,
        Some(theirs) => Some(check_arbiter(agent, theirs).map_err(|e| refuse(&mut stream, e))?),
    };
    let mut cfg = setup.config;
    // Each host keeps its own image format: replication is of guest-
    // visible blocks, so a raw image here may back a qcow2 one there.
    for d in cfg.disks.iter_mut() {
        if d.path.exists() {
            let here = remus_config::DiskFormat::of_image(&d.path);
            if here != d.format {
                tracing::info!(vm = %cfg.name, disk = %d.target, here = here.as_str(), primary = d.format.as_str(), "this host's image has another format than the primary's; using it as it is");
                d.format = here;
            }
        }
    }
    if cfg.name != hello.vm_name {
        return Err(refuse(
            &mut stream,
            "config name differs from the Hello".into(),
        ));
    }
    if let Err(e) = cfg.validate() {
        return Err(refuse(
            &mut stream,
            format!("this host cannot run '{}': {e}", cfg.name),
        ));
    }
    // A replicated disk missing here is created (and filled by the
    // initial sync) before the host check, which wants every disk present.
    if setup.replicate_disks {
        create_missing_images(&cfg, &hello.compat, &agent.opts.qemu.path)
            .map_err(|e| refuse(&mut stream, e))?;
    }
    if let Err(e) = cfg.check_host() {
        return Err(refuse(
            &mut stream,
            format!("this host cannot run '{}': {e}", cfg.name),
        ));
    }
    let local = compat_of(&cfg).map_err(|e| refuse(&mut stream, e))?;
    if let Err(diffs) = hello.compat.check_sides(&local, "primary", "backup") {
        return Err(refuse(&mut stream, diffs.join("; ")));
    }
    let name = cfg.name.clone();
    let (slot, replica) = agent
        .create_standby(cfg, session.purpose)
        .map_err(|e| refuse(&mut stream, e.to_string()))?;
    Message::Ready
        .write_to(&mut stream)
        .map_err(|e| format!("{peer}: {e}"))?;
    tracing::info!(vm = %name, %peer, purpose = ?session.purpose, "standby ready; receiving checkpoints");
    let mut replica = replica;
    let cfg = BackupConfig {
        timeout,
        heartbeat: timeout / 4,
    };
    // Disk replication: the standby's replicated disks, written only when
    // an epoch commits.
    let mut disks = setup.replicate_disks.then(|| {
        remus_disk::EpochBuffer::new(
            slot.vm
                .replicated_disks()
                .iter()
                .map(|p| (p.target().to_string(), p.local().clone()))
                .collect(),
            DISK_BUFFER_MEMORY,
            &slot.vm.paths.dir().join("disk-epochs.spill"),
        )
    });
    let vm_name = name.clone();
    let slot2 = slot.clone();
    let slot3 = slot.clone();
    let end = remus_replication::backup::receive(
        stream,
        &mut replica,
        disks.as_mut(),
        &cfg,
        &|ev| {
            tracing::debug!(vm = %vm_name, event = ?ev, "backup");
        },
        &|replica| {
            // Every epoch up to the switch-over committed: make it durable.
            for p in slot2.vm.replicated_disks() {
                p.local()
                    .flush()
                    .map_err(|e| format!("sync disk {}: {e}", p.target()))?;
            }
            let stats = remus_replication::failover::resume(&slot2.vm, replica)
                .map_err(|e| e.to_string())?;
            *slot2.role.lock().unwrap_or_else(|p| p.into_inner()) = Role::Unprotected;
            tracing::info!(vm = %slot2.vm.name(), epoch = stats.epoch, load_ms = stats.load_ms, "migration: VM resumed here");
            Ok(())
        },
        &|| slot3.vm.exit_status().is_none(),
    );
    decide_failover(
        agent,
        &slot,
        session.purpose,
        arbiter.as_ref(),
        &replica,
        disks.as_mut(),
        end,
    );
    Ok(())
}

/// The backup's side of an arbitrated session: this agent must have an
/// arbiter on the same etcd cluster, under the same prefix.
fn check_arbiter(
    agent: &Agent,
    theirs: &ArbiterSetup,
) -> Result<Arc<crate::arbiter::AgentArbiter>, String> {
    let Some(arb) = agent.opts.arbiter.clone() else {
        return Err(
            "the primary protects this VM with an arbiter but this agent has none: start remusd with the same --arbiter".into(),
        );
    };
    let prefix = &arb.arb.config().prefix;
    if *prefix != theirs.prefix {
        return Err(format!(
            "arbiter prefixes differ: the primary uses '{}', this host '{prefix}'",
            theirs.prefix
        ));
    }
    let id = arb
        .arb
        .cluster_id()
        .map_err(|e| format!("this host cannot reach the arbiter: {e}"))?;
    if id != theirs.cluster_id {
        return Err(format!(
            "the primary's arbiter is etcd cluster {:x}, this host's is {id:x}: they must be the same cluster",
            theirs.cluster_id
        ));
    }
    Ok(arb)
}

/// Creates each replicated disk image that does not exist here yet, as a
/// sparse file of the primary's size; the initial sync then sends only
/// the primary's non-zero chunks. The directory must exist.
fn create_missing_images(
    cfg: &VmConfig,
    theirs: &VmCompat,
    qemu: &std::path::Path,
) -> Result<(), String> {
    for d in cfg.disks_in_order() {
        if !d.replicate || d.readonly || d.path.exists() {
            continue;
        }
        let size = theirs
            .disks
            .iter()
            .find(|c| c.target == d.target)
            .map(|c| c.size_bytes)
            .ok_or_else(|| format!("disk {}: the primary did not say its size", d.target))?;
        if d.format == remus_config::DiskFormat::Qcow2 {
            let out = std::process::Command::new(remus_vm::qemu_tool(qemu, "qemu-img"))
                .args(["create", "-q", "-f", "qcow2"])
                .arg(&d.path)
                .arg(size.to_string())
                .output()
                .map_err(|e| format!("disk {}: run qemu-img: {e}", d.target))?;
            if !out.status.success() {
                return Err(format!(
                    "disk {}: cannot create the missing qcow2 image {}: {}",
                    d.target,
                    d.path.display(),
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
        } else {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&d.path)
                .map_err(|e| {
                    format!(
                        "disk {}: cannot create the missing image {}: {e}",
                        d.target,
                        d.path.display()
                    )
                })?;
            f.set_len(size)
                .map_err(|e| format!("disk {}: size {}: {e}", d.target, d.path.display()))?;
        }
        tracing::info!(disk = %d.target, path = %d.path.display(), size, format = d.format.as_str(), "created the missing disk image (sparse); the initial sync fills it");
    }
    Ok(())
}

/// The failover policy: the one place that decides whether the standby
/// runs. It resumes only when a protected VM's primary went silent or its
/// connection closed after at least one committed checkpoint. A migration
/// resumes only at its switch-over (done in the session already). In every
/// other case (orderly end, an aborted session whose primary was told and
/// runs on, a local failure) the copy is discarded: never two running
/// copies. With an arbiter, a failover also needs the VM's etcd key,
/// which the primary's lease holds until it lapses.
#[allow(clippy::too_many_arguments)]
fn decide_failover(
    agent: &Arc<Agent>,
    slot: &Arc<VmSlot>,
    purpose: Purpose,
    arbiter: Option<&Arc<crate::arbiter::AgentArbiter>>,
    replica: &Replica,
    disks: Option<&mut remus_disk::EpochBuffer>,
    end: Result<BackupEnd, remus_replication::ReplError>,
) {
    let name = slot.vm.name().to_string();
    let discard = |why: &str| {
        tracing::warn!(vm = %name, "{why}; the copy here is discarded");
        agent.destroy_slot(slot);
    };
    match end {
        Ok(BackupEnd::SwitchOver(epoch)) => {
            tracing::info!(vm = %name, epoch = epoch.0, "migration complete: the VM runs on this host");
        }
        Ok(BackupEnd::PrimaryLost {
            committed: Some(_),
            reason,
        }) if purpose == Purpose::Protect => {
            // The arbiter first: resume only holding the VM's key, which
            // etcd grants only once the primary's lease has lapsed.
            let lease = match arbiter {
                Some(arb) => {
                    tracing::warn!(vm = %name, %reason, window_ms = arb.takeover_window().as_millis() as u64, "primary lost; asking the arbiter before resuming");
                    match crate::arbiter::take_over(arb, &name) {
                        Ok(l) => Some((arb, l)),
                        Err(why) => {
                            return discard(&format!(
                                "primary lost ({reason}) but NOT resuming: {why}"
                            ));
                        }
                    }
                }
                None => None,
            };
            // Gives the key back if this copy does not run after all.
            let give_back =
                |lease: Option<(&Arc<crate::arbiter::AgentArbiter>, remus_arbiter::Lease)>| {
                    if let Some((arb, l)) = lease {
                        let _ = arb.arb.release(l);
                    }
                };
            // The disks first: drop what never committed, make the rest
            // durable, and record what changes from now on.
            if let Some(d) = disks {
                match remus_replication::failover::take_over_disks(&slot.vm, d) {
                    Ok(t) => {
                        tracing::info!(vm = %name, discarded_records = t.discarded_records, discarded_bytes = t.discarded_bytes, change_maps = ?t.change_maps, "failover: uncommitted disk writes discarded; changes from now on are recorded");
                    }
                    Err(e) => {
                        tracing::error!(vm = %name, error = %e, "failover FAILED: the disks cannot take over");
                        agent.destroy_slot(slot);
                        give_back(lease);
                        return;
                    }
                }
            }
            match remus_replication::failover::resume(&slot.vm, replica) {
                Ok(stats) => {
                    *slot.role.lock().unwrap_or_else(|p| p.into_inner()) = Role::Unprotected;
                    tracing::warn!(vm = %name, epoch = stats.epoch, load_ms = stats.load_ms, cont_ms = stats.cont_ms, "FAILOVER: primary lost ({reason}); resumed from the last committed checkpoint, epoch {}", stats.epoch);
                    // Runs here unprotected now: the key is pinned to this
                    // host (the lease is kept, and fenced, until it is).
                    if let Some((arb, l)) = lease {
                        let g = crate::arbiter::keep_taken(arb, slot, l);
                        *slot.arbiter.lock().unwrap_or_else(|p| p.into_inner()) = Some(g);
                    }
                }
                Err(e) => {
                    tracing::error!(vm = %name, error = %e, "failover FAILED");
                    agent.destroy_slot(slot);
                    give_back(lease);
                }
            }
        }
        Ok(BackupEnd::PrimaryLost {
            committed: None,
            reason,
        }) => discard(&format!(
            "primary lost ({reason}) before the first checkpoint committed: nothing to resume"
        )),
        Ok(BackupEnd::PrimaryLost { reason, .. }) => discard(&format!(
            "migration source lost before the switch-over ({reason}); the VM stays where it was"
        )),
        Ok(BackupEnd::Done) => discard("the primary ended the session on purpose"),
        Ok(BackupEnd::Aborted { reason }) => discard(&format!(
            "session aborted while the primary was alive ({reason})"
        )),
        Err(e) => discard(&format!("replication session failed here ({e})")),
    }
}
