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
    Channel, DiskCompat, ErrorCode, HelloParams, Message, Purpose, VmCompat, client_handshake,
    client_handshake_unencrypted, server_handshake,
};
use remus_replication::backup::{BackupConfig, BackupEnd};
use remus_replication::copy::{CopyState, Generations, SyncMode, SyncPlan};
use remus_replication::primary::{HandOver, ProtectConfig, ProtectEnd, ProtectEvent};
use remus_replication::replica::Replica;
use remus_vm::Role;
use serde::{Deserialize, Serialize};

use crate::admission::Admitted;
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
    /// The primary's generations (protocol version 5 on, with replicated
    /// disks): the backup plans the disk sync from them and answers with
    /// a SyncPlan before Ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generations: Option<Generations>,
    /// Where the primary's agent takes replication sessions, and the
    /// session's settings: after a planned switch-over (`remus failback`)
    /// the backup protects the VM back to it with them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub return_to: Option<ReturnTo>,
}

/// How the new primary protects back after a planned switch-over.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReturnTo {
    pub address: String,
    pub interval_ms: u64,
    pub no_net: bool,
    pub no_compress: bool,
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
    require_key(agent)?;
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
    // The copy record: generations for the backup's sync plan, and the
    // activity logs that mark extents before they are written.
    let copy_dir = crate::copies::dir(&agent.opts.state_dir, name);
    // This host's own config of the VM, for a resync back to it one day.
    crate::copies::save_config(&copy_dir, &slot.vm.config);
    let copy = if replicate_disks {
        let mut st = crate::copies::load(&copy_dir, name)
            .ok()
            .flatten()
            .unwrap_or_else(|| CopyState::new(cfg.memory, cfg.vcpus));
        st.running = true;
        st.discarded = false;
        crate::copies::save(&copy_dir, name, &st);
        crate::copies::attach_activity_logs(&slot.vm, &copy_dir, agent.opts.al_extents)
            .map_err(AgentError::Internal)?;
        Some(st)
    } else {
        None
    };
    let return_to = agent
        .opts
        .replication_listen
        .clone()
        .map(|address| ReturnTo {
            address,
            interval_ms: req.interval_ms,
            no_net: req.no_net,
            no_compress: req.no_compress,
        });
    let (stream, version, plan) = open_session(
        agent,
        &slot,
        &req.peer,
        Purpose::Protect,
        req.timeout_ms,
        replicate_disks,
        arbiter_setup,
        copy.as_ref().map(|c| c.gens.clone()),
        return_to,
        req.unencrypted,
    )?;
    if let Some(p) = &plan {
        tracing::info!(vm = %name, peer = %req.peer, mode = ?p.mode, reason = %remus_proto::printable(&p.reason), "disk sync plan");
        slot.publish(
            serde_json::json!({"event": "sync_plan", "mode": p.mode, "reason": p.reason})
                .to_string(),
        );
    }
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
        changed_sync: plan
            .filter(|p| p.mode == SyncMode::Changed)
            .map(|p| p.target_runs),
        switch_over: Arc::new(AtomicBool::new(false)),
        // An arbitrated VM's key moves with it at a switch-over.
        hand_over: guard.clone().map(|g| {
            let slot = slot.clone();
            HandOver(Arc::new(move || g.hand_over(&slot)))
        }),
    };
    slot.set_switch_over(cfg.switch_over.clone());
    let vm_name = name.to_string();
    let slot2 = slot.clone();
    let agent2 = agent.clone();
    let peer = req.peer.clone();
    let copy = std::sync::Mutex::new(copy);
    let committed_any = AtomicBool::new(false);
    std::thread::Builder::new()
        .name(format!("protect-{vm_name}"))
        .spawn(move || {
            tracing::info!(vm = %vm_name, %peer, interval_ms = cfg.interval.as_millis() as u64, "protection started");
            let emit = |ev: ProtectEvent| {
                match &ev {
                    ProtectEvent::Checkpoint(s) => {
                        tracing::debug!(vm = %vm_name, epoch = s.epoch, pause_ms = s.pause_ms, dirty = s.dirty_pages, "checkpoint committed");
                        source_committed(&slot2.vm, &copy, &copy_dir, s.epoch, &committed_any);
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
            let mut end = remus_replication::primary::protect(&slot2.vm, stream, &cfg, &stop, &emit);
            // An arbitrated VM whose key was handed over, and whose backup
            // did not confirm the switch-over (or refused it): the key
            // decides where it runs.
            if let (Some(g), Some(arb)) = (&guard, &agent2.opts.arbiter)
                && g.handed_over()
                && !matches!(end, Ok(ProtectEnd::SwitchedOver { .. }))
            {
                end = settle_hand_over(&slot2, arb, &peer, end);
            }
            if let Ok(ProtectEnd::SwitchedOver { epoch, downtime_ms }) = &end {
                // The backup runs the VM now and protects it back here:
                // this copy stops, its record says what its disks hold.
                tracing::warn!(vm = %vm_name, %peer, epoch, downtime_ms, "SWITCHED OVER: {peer} runs the VM from epoch {epoch} and protects it back to this host");
                switched_out(&agent2, &slot2, &copy, &copy_dir, *epoch);
                slot2.publish(String::new());
                return;
            }
            if let Ok(ProtectEnd::SwitchOverUnconfirmed { reason, .. }) = &end {
                // Neither resumed here nor known to run there: the guest
                // stays stopped and the operator decides.
                tracing::error!(vm = %vm_name, %peer, %reason, "switch-over UNCONFIRMED: {peer} may be running the VM; it stays paused here. Check {peer}: if it runs the VM there, destroy this copy; if not, `remus unpause` it here");
                slot2.vm.mark_operator_paused();
                slot2.clear_protection();
                slot2.publish(
                    serde_json::json!({"event": "failed", "reason": format!("switch-over unconfirmed ({reason}): {peer} may be running the VM; it stays paused here until you check")}).to_string(),
                );
                slot2.publish(String::new());
                return;
            }
            source_alone(&slot2.vm, &copy, &copy_dir, committed_any.load(std::sync::atomic::Ordering::SeqCst));
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
                // A fenced guest whose backup refused the switch-over: it
                // runs again here once the arbiter lifts the fence.
                Ok(ProtectEnd::SwitchOverRefused { reason, .. }) => {
                    let msg = format!("the backup refused the switch-over ({reason}); the VM runs on here, unprotected, once the arbiter lifts its fence");
                    tracing::error!(vm = %vm_name, %peer, "{msg}");
                    slot2.publish(serde_json::json!({"event": "failed", "reason": msg}).to_string());
                }
                // Handled above.
                Ok(ProtectEnd::SwitchedOver { .. } | ProtectEnd::SwitchOverUnconfirmed { .. }) => {}
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

/// A checkpoint of this primary's session committed on the backup: its
/// activity logs may drop acknowledged extents, and the first commit
/// completes the resync (the backup holds this copy's generation now).
fn source_committed(
    vm: &remus_vm::Vm,
    copy: &std::sync::Mutex<Option<CopyState>>,
    dir: &std::path::Path,
    epoch: u64,
    committed_any: &AtomicBool,
) {
    let mut copy = copy.lock().unwrap_or_else(|p| p.into_inner());
    let Some(st) = copy.as_mut() else {
        return;
    };
    for p in vm.replicated_disks() {
        if let Some(al) = p.activity_log()
            && let Err(e) = al.acked(epoch)
        {
            tracing::warn!(vm = %vm.name(), disk = %p.target(), error = %e, "activity log");
        }
    }
    if !committed_any.swap(true, std::sync::atomic::Ordering::SeqCst) {
        crate::copies::source_synced(vm);
        st.gens.synced();
        st.common_epoch = Some(epoch);
        crate::copies::save(dir, vm.name(), st);
        tracing::info!(vm = %vm.name(), epoch, generation = %st.gens.current, "resync complete: the backup holds this copy's data; change maps cleared");
    }
}

/// `remus failback VM`: a planned role swap of a protected VM. At the next
/// checkpoint the guest stops here for good, the backup resumes it from
/// that checkpoint and protects it back to this host. Progress goes to
/// the VM's event channel (subscribe first).
pub fn start_failback(agent: &Arc<Agent>, name: &str) -> Result<(), AgentError> {
    let slot = agent.slot(name)?;
    let role = *slot.role.lock().unwrap_or_else(|p| p.into_inner());
    if role != Role::Primary || slot.protected_to().is_none() {
        return Err(AgentError::Conflict(format!(
            "VM '{name}' is {} here: failback swaps the roles of a protected VM, run it on the primary. After a failover, first protect the VM back to the old primary (`remus protect {name} OLD_PRIMARY:PORT`), which resyncs it, then fail back",
            role_name(role)
        )));
    }
    if slot.vm.is_held() {
        return Err(AgentError::Conflict(format!(
            "VM '{name}' is paused; unpause it first"
        )));
    }
    if !slot.request_switch_over() {
        return Err(AgentError::Conflict(format!(
            "VM '{name}' has no protection session running"
        )));
    }
    tracing::info!(vm = %name, "failback requested: switching over at the next checkpoint");
    Ok(())
}

/// After a switch-over of an arbitrated VM that its backup did not
/// confirm, or refused: the etcd key, given up before the switch-over,
/// says which host runs the VM ([`crate::arbiter::reclaim`]). Taken back
/// here: the guest runs on here unprotected (`BackupLost`). Held by the
/// backup: it runs the VM, as after a confirmed switch-over
/// (`SwitchedOver`). The guest stays fenced until this is known, however
/// long etcd takes to answer (`protect --stop` does not cut that short:
/// only etcd may say that this copy can run); `remus destroy` ends it.
fn settle_hand_over(
    slot: &Arc<VmSlot>,
    arb: &Arc<crate::arbiter::AgentArbiter>,
    peer: &str,
    end: Result<ProtectEnd, remus_replication::ReplError>,
) -> Result<ProtectEnd, remus_replication::ReplError> {
    let (epoch, why) = match &end {
        Ok(
            ProtectEnd::SwitchOverUnconfirmed { epoch, reason }
            | ProtectEnd::SwitchOverRefused { epoch, reason },
        ) => (*epoch, reason.clone()),
        // The key is given up only right before the switch-over is sent.
        _ => return end,
    };
    let name = slot.vm.name().to_string();
    tracing::warn!(vm = %name, %peer, epoch, reason = %why, "switch-over not confirmed by {peer}; asking the arbiter which host runs the VM");
    let gone = || slot.vm.exit_status().is_some();
    match crate::arbiter::reclaim(arb, &name, &gone) {
        Some(crate::arbiter::Reclaimed::Here(_)) if gone() => {
            // Destroyed meanwhile: the key taken back goes too.
            let _ = arb.arb.clear(&name);
            end
        }
        Some(crate::arbiter::Reclaimed::Here(revision)) => {
            *slot.arbiter.lock().unwrap_or_else(|p| p.into_inner()) =
                Some(crate::arbiter::Guard::pinned(arb, slot, revision));
            let reason = match slot.vm.unfence() {
                Ok(()) => format!(
                    "switch-over failed ({why}); the arbiter gave the VM back to this host (key pinned at revision {revision}): it runs on here UNPROTECTED"
                ),
                Err(e) => format!(
                    "switch-over failed ({why}); the arbiter gave the VM back to this host (key pinned at revision {revision}), but it cannot be resumed: {e}"
                ),
            };
            tracing::error!(vm = %name, %peer, revision, "{reason}");
            slot.publish(serde_json::json!({"event": "failed", "reason": reason}).to_string());
            Ok(ProtectEnd::BackupLost(reason))
        }
        Some(crate::arbiter::Reclaimed::There { holder, revision }) => {
            tracing::warn!(vm = %name, %holder, revision, epoch, "switch-over not confirmed ({why}), but the arbiter says {holder} holds the VM's key: it runs the VM");
            slot.publish(
                serde_json::json!({"event": "switched_over", "epoch": epoch, "downtime_ms": null, "confirmed_by": "arbiter"}).to_string(),
            );
            Ok(ProtectEnd::SwitchedOver {
                epoch,
                downtime_ms: f64::NAN,
            })
        }
        // Stopped or gone meanwhile: as it was.
        None => end,
    }
}

/// The VM was handed over to the backup (planned switch-over): every
/// write of this copy is acknowledged, so its activity logs are cleared;
/// the record stays (not running) for the session that protects it back
/// here; the QEMU process goes.
fn switched_out(
    agent: &Arc<Agent>,
    slot: &Arc<VmSlot>,
    copy: &std::sync::Mutex<Option<CopyState>>,
    dir: &std::path::Path,
    epoch: u64,
) {
    let name = slot.vm.name().to_string();
    if let Some(st) = copy.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
        for p in slot.vm.replicated_disks() {
            if let Some(al) = p.activity_log() {
                let _ = al.acked_all(epoch);
            }
        }
        st.running = false;
        st.common_epoch = Some(epoch);
        crate::copies::save(dir, &name, st);
    }
    slot.clear_protection();
    agent.destroy_slot(slot, crate::agent::CopyRecord::Keep);
}

/// This primary's session ended and the VM (if it still runs) goes on
/// alone: from a new generation once the backup had committed one of
/// ours (so that the two copies can tell what each did since), with its
/// changes recorded in change maps from now on.
fn source_alone(
    vm: &remus_vm::Vm,
    copy: &std::sync::Mutex<Option<CopyState>>,
    dir: &std::path::Path,
    committed_any: bool,
) {
    let mut copy = copy.lock().unwrap_or_else(|p| p.into_inner());
    let Some(st) = copy.as_mut() else {
        return;
    };
    // Destroyed meanwhile: its record was settled by the destroy.
    if vm.exit_status().is_some() || !dir.exists() {
        return;
    }
    if let Err(e) = crate::copies::track_changes(vm, dir) {
        tracing::error!(vm = %vm.name(), error = %e, "cannot record disk changes after the session; the next resync compares every chunk");
        crate::copies::forget(dir, vm.name());
        return;
    }
    if committed_any {
        st.gens.diverge();
    }
    crate::copies::save(dir, vm.name(), st);
    tracing::info!(vm = %vm.name(), generation = %st.gens.current, since = ?st.gens.bitmap.map(|g| g.to_string()), "the VM goes on alone; its disk changes are recorded for the next resync");
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
        // Its keeper may be pinning the key right now (a copy that has
        // just taken over): that write must not land after the new lease.
        old.stop_and_wait();
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
/// With `generations` (a protected VM's replicated disks) a version-5 peer
/// answers with its sync plan first.
#[allow(clippy::too_many_arguments)]
fn open_session(
    agent: &Agent,
    slot: &VmSlot,
    peer: &str,
    purpose: Purpose,
    timeout_ms: u64,
    replicate_disks: bool,
    arbiter: Option<ArbiterSetup>,
    generations: Option<Generations>,
    return_to: Option<ReturnTo>,
    unencrypted: bool,
) -> Result<(Channel, u16, Option<SyncPlan>), AgentError> {
    let name = slot.vm.name();
    let compat = compat_of(&slot.vm.config).map_err(AgentError::Internal)?;
    let key = &require_key(agent)?;
    let params = HelloParams::new(purpose, name, compat);
    let handshake = if unencrypted {
        tracing::warn!(vm = %name, %peer, "replicating IN THE CLEAR as asked (remus protect --unencrypted)");
        client_handshake_unencrypted(connect(peer)?, key, &params)
    } else {
        client_handshake(connect(peer)?, key, &params)
    };
    // Never a silent step down to the clear: a closed or reset connection
    // during the encrypted handshake is also what a flood of the backup's
    // admission slots, or someone on the path, produces. Talking to an
    // older agent in the clear is asked for per session (--unencrypted).
    let (mut stream, session) = handshake.map_err(|e| AgentError::BadRequest(e.to_string()))?;
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
    let generations =
        generations.filter(|_| session.version >= remus_proto::RESYNC_PROTOCOL_VERSION);
    let expect_plan = generations.is_some();
    // An agent listening on every address is reached back at the address
    // this session leaves from.
    let return_to = return_to.map(|mut r| {
        if let (Ok(listen), Ok(local)) = (
            r.address.parse::<std::net::SocketAddr>(),
            stream.local_addr(),
        ) && listen.ip().is_unspecified()
        {
            r.address = std::net::SocketAddr::new(local.ip(), listen.port()).to_string();
        }
        r
    });
    let setup = serde_json::to_string(&SessionSetup {
        config: slot.vm.config.clone(),
        timeout_ms,
        replicate_disks,
        arbiter,
        generations,
        return_to,
    })
    .map_err(|e| AgentError::Internal(e.to_string()))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .map_err(|e| AgentError::Internal(e.to_string()))?;
    Message::VmConfig { json: setup }
        .write_to(&mut stream)
        .map_err(|e| AgentError::Internal(format!("send config to {}: {e}", session.peer)))?;
    let (_, theirs) = purpose.side_names();
    let mut plan = None;
    if expect_plan {
        match Message::read_from(&mut stream) {
            Ok(Message::SyncPlan { json }) => {
                let p = serde_json::from_str::<SyncPlan>(&json).map_err(|e| {
                    AgentError::Internal(format!(
                        "{theirs} {} sent a bad sync plan: {e}",
                        session.peer
                    ))
                })?;
                // Bounded before anything is made of it: one run per
                // replicated disk list, each within that disk.
                let disks = slot.vm.replicated_disks();
                let bad = |why: String| {
                    AgentError::Internal(format!(
                        "{theirs} {} sent a sync plan this host refuses: {why}",
                        session.peer
                    ))
                };
                if p.target_runs.len() > disks.len() {
                    return Err(bad(format!(
                        "runs for {} disks, the VM replicates {}",
                        p.target_runs.len(),
                        disks.len()
                    )));
                }
                for (runs, port) in p.target_runs.iter().zip(&disks) {
                    let total = port
                        .local()
                        .size()
                        .div_ceil(u64::from(remus_disk::sync::CHUNK_SIZE));
                    remus_replication::copy::check_peer_runs(runs, total, port.target())
                        .map_err(bad)?;
                }
                plan = Some(p);
            }
            Ok(Message::Error { code, message }) => {
                return Err(AgentError::BadRequest(format!(
                    "{theirs} {} refused: {code}: {message}",
                    session.peer
                )));
            }
            Ok(other) => {
                return Err(AgentError::Internal(format!(
                    "{theirs} {} answered {:?} instead of its sync plan",
                    session.peer,
                    other.msg_type()
                )));
            }
            Err(e) => {
                return Err(AgentError::Internal(format!(
                    "{theirs} {} did not prepare the VM: {e}",
                    session.peer
                )));
            }
        }
    }
    match Message::read_from(&mut stream) {
        Ok(Message::Ready) => Ok((stream, session.version, plan)),
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
    require_key(agent)?;
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
    let (stream, version, _) = open_session(
        agent,
        &slot,
        peer,
        Purpose::Migrate,
        30_000,
        replicate_disks,
        None,
        None,
        None,
        false,
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
                    agent.destroy_slot(&slot, crate::agent::CopyRecord::Forget);
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
/// its own thread). A connection gets a thread only if the admission caps
/// for unauthenticated peers allow it (see [`crate::admission`]); others
/// are closed at once.
pub fn serve(agent: Arc<Agent>, listener: TcpListener) {
    let admission = crate::admission::Admission::new(
        crate::admission::MAX_UNAUTHENTICATED,
        crate::admission::MAX_PER_ADDRESS,
    );
    for conn in listener.incoming() {
        match conn {
            Ok(stream) => {
                let Ok(peer_addr) = stream.peer_addr() else {
                    continue;
                };
                let Some(admitted) = admission.admit(peer_addr.ip()) else {
                    // Closed at once: no thread, nothing read.
                    drop(stream);
                    continue;
                };
                let a = agent.clone();
                let peer = peer_addr.to_string();
                let spawned = std::thread::Builder::new()
                    .name("repl-session".into())
                    .spawn(move || {
                        if let Err(e) = backup_session(&a, stream, admitted) {
                            // The reason may quote the peer (a VM name, a
                            // field of its setup): escaped, so it cannot
                            // forge log lines.
                            tracing::warn!(%peer, error = %remus_proto::printable(&e), "replication session refused");
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

fn backup_session(
    agent: &Arc<Agent>,
    mut tcp: TcpStream,
    admitted: Admitted,
) -> Result<(), String> {
    let Some(key) = agent.key() else {
        let _ = Message::Error {
            code: ErrorCode::Internal,
            message: "the backup agent has no replication key (--key)".into(),
        }
        .write_to(&mut tcp);
        return Err("no --key: replication refused".into());
    };
    let opts = remus_proto::ServerOptions {
        allow_unencrypted: agent.opts.allow_unencrypted,
        ..Default::default()
    };
    let mut reservation = None;
    let handshake = server_handshake(tcp, &key, &opts, |vm, _purpose| {
        // A name from the wire is checked as a name before it is used for
        // anything (it names directories of this host).
        remus_config::validate_name(vm)
            .map_err(|e| e.to_string())
            .and_then(|()| crate::storage::check_name("VM", vm))?;
        if let Some(r) = agent.reserve(vm) {
            // Held until the standby exists: no other session sets up
            // the same copy meanwhile.
            reservation = Some(r);
            return Ok(None);
        }
        if agent.busy(vm) {
            return Err(format!(
                "a copy of '{vm}' is being set up or torn down on this host; try again in a moment"
            ));
        }
        if let Ok(slot) = agent.slot(vm) {
            if *slot.role.lock().unwrap_or_else(|p| p.into_inner()) == Role::Backup {
                return Err(format!(
                    "this host still holds a standby copy of '{vm}' from another session (it is discarded when that session ends); try again in a moment"
                ));
            }
            Err(format!(
                "a VM named '{vm}' already runs on this host. If both copies ran on their own after a failover (split brain), give one up: on its host run `remus destroy --discard-this-copy {vm}`, then protect from the copy you keep"
            ))
        } else {
            Err(format!(
                "a copy of '{vm}' is being set up or torn down on this host; try again in a moment"
            ))
        }
    });
    let (mut stream, session, hello) = match handshake {
        Ok(h) => h,
        Err(e) => {
            // Anyone can make a handshake fail: logged, rate-limited.
            admitted.handshake_failed(&e.peer, &e.to_string());
            return Ok(());
        }
    };
    // Authenticated: the slot for unauthenticated peers is free again.
    drop(admitted);
    if !session.encrypted {
        tracing::warn!(peer = %session.peer, vm = %hello.vm_name, "replication session with a protocol-{} peer IN THE CLEAR (--allow-unencrypted-peers)", session.version);
    }
    let peer = session.peer.clone();
    let refuse = |stream: &mut Channel, msg: String| {
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
    // This host's own configuration of the copy: the peer's shape, this
    // host's paths (its record of the VM, the operator's placement file,
    // or its own image and boot directories); never a path from the wire.
    // Each host keeps its own image format: replication is of guest-
    // visible blocks, so a raw image here may back a qcow2 one there.
    let copy_dir = crate::copies::dir(&agent.opts.state_dir, &hello.vm_name);
    let record = crate::copies::load_config(&copy_dir);
    let sizes = hello
        .compat
        .disks
        .iter()
        .map(|d| (d.target.clone(), d.size_bytes))
        .collect();
    let (cfg, new_images) = agent
        .opts
        .storage
        .local_config(&setup.config, record.as_ref(), &sizes)
        .map_err(|e| {
            refuse(
                &mut stream,
                format!("this host cannot keep '{}': {e}", hello.vm_name),
            )
        })?;
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
        create_images(agent, &cfg.name, &new_images).map_err(|e| refuse(&mut stream, e))?;
    } else if let Some(missing) = new_images.first() {
        return Err(refuse(
            &mut stream,
            format!(
                "disk {} is not replicated in this session and this host has no image at {}",
                missing.target,
                missing.path.display()
            ),
        ));
    }
    // Files only: the formats are this host's own (never sniffed).
    if let Err(e) = cfg.check_files() {
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
    // This host's record of its copy decides how the disks are synced.
    let (plan, copy) = plan_target(&setup, session.purpose, &copy_dir, &cfg, &local)
        .map_err(|e| refuse(&mut stream, e))?;
    if agent.take_stale(&name).is_some() {
        tracing::info!(vm = %name, %peer, "the stale copy here becomes the standby of the running copy");
    }
    let own_config = cfg.clone();
    let reserved = reservation
        .take()
        .ok_or_else(|| refuse(&mut stream, format!("'{name}' is not reserved here")))?;
    let (slot, replica) = agent
        .create_standby(cfg, session.purpose, &reserved)
        .map_err(|e| refuse(&mut stream, e.to_string()))?;
    drop(reserved);
    crate::copies::save_config(&copy_dir, &own_config);
    if let Some(p) = &plan {
        tracing::info!(vm = %name, %peer, mode = ?p.mode, reason = %remus_proto::printable(&p.reason), "disk sync plan");
        let json = serde_json::to_string(p).map_err(|e| e.to_string())?;
        Message::SyncPlan { json }
            .write_to(&mut stream)
            .map_err(|e| format!("{peer}: {e}"))?;
    }
    Message::Ready
        .write_to(&mut stream)
        .map_err(|e| format!("{peer}: {e}"))?;
    tracing::info!(vm = %name, %peer, purpose = ?session.purpose, "standby ready; receiving checkpoints");
    let mut replica = replica;
    let cfg = BackupConfig {
        timeout,
        heartbeat: timeout / 4,
        changed_sync: plan.as_ref().is_some_and(|p| p.mode == SyncMode::Changed),
    };
    let copy = std::sync::Mutex::new(copy);
    let protect_purpose = session.purpose == Purpose::Protect;
    let setup_replicates = setup.replicate_disks;
    let source_gens = setup.generations.clone();
    let first_commit = AtomicBool::new(false);
    let targets: Vec<String> = slot
        .vm
        .replicated_disks()
        .iter()
        .map(|p| p.target().to_string())
        .collect();
    // Disk replication: the standby's replicated disks, written only when
    // an epoch commits.
    let mut disks = setup.replicate_disks.then(|| {
        remus_disk::EpochBuffer::with_spill_limit(
            slot.vm
                .replicated_disks()
                .iter()
                .map(|p| (p.target().to_string(), p.local().clone()))
                .collect(),
            DISK_BUFFER_MEMORY,
            &slot.vm.paths.dir().join("disk-epochs.spill"),
            agent.opts.max_spill_mib << 20,
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
            if let remus_replication::backup::BackupEvent::Committed { epoch, .. } = ev
                && !first_commit.swap(true, std::sync::atomic::Ordering::SeqCst)
            {
                target_committed(
                    &vm_name,
                    &copy,
                    &copy_dir,
                    source_gens.as_ref(),
                    &targets,
                    epoch,
                );
            }
        },
        &|replica| {
            // Every epoch up to the switch-over committed: make it durable.
            for p in slot2.vm.replicated_disks() {
                p.local()
                    .flush()
                    .map_err(|e| format!("sync disk {}: {e}", p.target()))?;
            }
            // An arbitrated VM runs here only with its key, which the
            // primary gave up before sending the switch-over (or, if it
            // could not reach etcd, which lapses within its lease time).
            let lease = match arbiter.as_ref().filter(|_| protect_purpose) {
                Some(arb) => Some((
                    arb,
                    crate::arbiter::take_over(arb, &vm_name)
                        .map_err(|why| format!("NOT resuming at the switch-over: {why}"))?,
                )),
                None => None,
            };
            // A planned switch-over of a protected VM: this copy goes on
            // alone from here, its changes recorded from before it runs.
            let failback = protect_purpose && setup_replicates;
            let resumed = (|| {
                if failback {
                    crate::copies::track_changes(&slot2.vm, &copy_dir)?;
                }
                remus_replication::failover::resume(&slot2.vm, replica).map_err(|e| e.to_string())
            })();
            let stats = match resumed {
                Ok(stats) => stats,
                Err(e) => {
                    // Not running here: the key goes back.
                    if let Some((arb, l)) = lease {
                        let _ = arb.arb.release(l);
                    }
                    return Err(e);
                }
            };
            if let Some((arb, l)) = lease {
                // Runs here, unprotected until protected back: pinned.
                let g = crate::arbiter::keep_taken(arb, &slot2, l);
                *slot2.arbiter.lock().unwrap_or_else(|p| p.into_inner()) = Some(g);
            }
            *slot2.role.lock().unwrap_or_else(|p| p.into_inner()) = Role::Unprotected;
            if failback && let Some(st) = copy.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
                st.gens.diverge();
                st.running = true;
                st.common_epoch = Some(stats.epoch);
                crate::copies::save(&copy_dir, &vm_name, st);
            }
            tracing::info!(vm = %slot2.vm.name(), epoch = stats.epoch, load_ms = stats.load_ms, "switch-over: VM resumed here");
            Ok(())
        },
        &|| slot3.vm.exit_status().is_none(),
    );
    let copy = copy.into_inner().unwrap_or_else(|p| p.into_inner());
    let switched = matches!(end, Ok(BackupEnd::SwitchOver(_)));
    decide_failover(
        agent,
        &slot,
        session.purpose,
        arbiter.as_ref(),
        &replica,
        disks.as_mut(),
        end,
        (&copy_dir, copy),
    );
    if switched && session.purpose == Purpose::Protect {
        protect_back(agent, &name, &setup);
    }
    Ok(())
}

/// After a planned switch-over this host runs the VM: it protects it back
/// to the old primary (which takes the session once its own copy is gone),
/// with the session's settings.
fn protect_back(agent: &Arc<Agent>, name: &str, setup: &SessionSetup) {
    let Some(back) = setup.return_to.clone() else {
        tracing::warn!(vm = %name, "switched over, but the old primary gave no address to protect back to: the VM runs here UNPROTECTED; run `remus protect`");
        return;
    };
    let req = ProtectRequest {
        peer: back.address.clone(),
        interval_ms: back.interval_ms,
        timeout_ms: setup.timeout_ms,
        no_net: back.no_net,
        no_disk: !setup.replicate_disks,
        no_compress: back.no_compress,
        unencrypted: false,
    };
    // The old primary tears its copy down as soon as it has our Done; its
    // agent refuses the session while the VM is still listed there.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        match start_protect(agent, name, req.clone()) {
            Ok(()) => {
                tracing::info!(vm = %name, peer = %back.address, "switch-over: protecting the VM back to the old primary");
                return;
            }
            Err(e)
                if std::time::Instant::now() < deadline
                    && (e.to_string().contains("try again")
                        || e.to_string().contains("already runs")) =>
            {
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => {
                tracing::error!(vm = %name, peer = %back.address, error = %e, "switch-over: cannot protect the VM back; it runs here UNPROTECTED; run `remus protect`");
                return;
            }
        }
    }
}

/// The backup's side of the sync plan: from the primary's generations and
/// this host's record of its copy. Returns the plan to send (None for
/// peers before version 5, and for sessions without disk replication)
/// and the record to keep up to date (None: nothing known of the disks).
/// A refusal (split brain, a newer copy here) is an error naming the
/// resolution. The record is marked as being resynced before anything is
/// written.
fn plan_target(
    setup: &SessionSetup,
    purpose: Purpose,
    dir: &std::path::Path,
    cfg: &VmConfig,
    local: &VmCompat,
) -> Result<(Option<SyncPlan>, Option<CopyState>), String> {
    let name = &cfg.name;
    if purpose != Purpose::Protect || !setup.replicate_disks {
        // The disks are not written by this session: the record (if any)
        // still describes them.
        let rec = crate::copies::load(dir, name).ok().flatten();
        if purpose == Purpose::Migrate {
            // A migration overwrites the disks with a full compare.
            crate::copies::forget(dir, name);
            return Ok((None, None));
        }
        return Ok((None, rec));
    }
    let Some(source) = &setup.generations else {
        // A version-4 primary: a full compare overwrites the disks and
        // nothing is known of its generation.
        crate::copies::forget(dir, name);
        return Ok((None, None));
    };
    let loaded = crate::copies::load(dir, name);
    let (mut mode, mut reason, common) = match &loaded {
        Ok(rec) => remus_replication::copy::plan(source, rec.as_ref(), name)?,
        Err(e) => (
            SyncMode::Full,
            format!(
                "this host's record of the VM is unreadable ({e}): digest compare of every chunk"
            ),
            None,
        ),
    };
    let mut target_runs = Vec::new();
    if mode == SyncMode::Changed {
        let disks: Vec<(String, u64)> = local
            .disks
            .iter()
            .filter(|d| {
                cfg.disks
                    .iter()
                    .any(|c| c.target == d.target && c.replicate && !c.readonly)
            })
            .map(|d| (d.target.clone(), d.size_bytes))
            .collect();
        match crate::copies::own_runs(dir, &disks) {
            Ok(r) => target_runs = r,
            Err(e) => {
                tracing::error!(vm = %name, error = %e, "this copy's change records are unusable");
                mode = SyncMode::Full;
                reason = format!(
                    "this copy's change records are unusable ({e}): digest compare of every chunk"
                );
            }
        }
    }
    let mut rec = loaded
        .ok()
        .flatten()
        .unwrap_or_else(|| CopyState::new(cfg.memory, cfg.vcpus));
    rec.resync_from = Some(source.current);
    rec.running = false;
    rec.memory_mib = cfg.memory;
    rec.vcpus = cfg.vcpus;
    crate::copies::save(dir, name, &rec);
    Ok((
        Some(SyncPlan {
            mode,
            reason,
            common: common.filter(|_| mode == SyncMode::Changed),
            target_runs,
        }),
        Some(rec),
    ))
}

/// The first checkpoint of a resync committed here: this copy holds the
/// source's generation now, and its own change records are spent.
fn target_committed(
    vm: &str,
    copy: &std::sync::Mutex<Option<CopyState>>,
    dir: &std::path::Path,
    source: Option<&Generations>,
    targets: &[String],
    epoch: u64,
) {
    let mut copy = copy.lock().unwrap_or_else(|p| p.into_inner());
    let (Some(st), Some(src)) = (copy.as_mut(), source) else {
        return;
    };
    if st.resync_from.is_none() {
        return;
    }
    st.gens.adopt(src);
    st.resync_from = None;
    st.discarded = false;
    st.common_epoch = Some(epoch);
    crate::copies::save(dir, vm, st);
    crate::copies::target_synced(dir, targets);
    tracing::info!(%vm, epoch, generation = %st.gens.current, "resync complete: this copy holds the primary's data");
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

/// Creates the images this host keeps a copy in (missing ones, sparse, at
/// the peer's size), each recorded with its format before it exists.
fn create_images(
    agent: &Agent,
    vm: &str,
    images: &[crate::storage::NewImage],
) -> Result<(), String> {
    for img in images {
        agent
            .opts
            .storage
            .record_created(vm, &img.target, img.format)
            .map_err(|e| format!("disk {}: {e}", img.target))?;
        if img.format == remus_config::DiskFormat::Qcow2 {
            let out =
                std::process::Command::new(remus_vm::qemu_tool(&agent.opts.qemu.path, "qemu-img"))
                    .args(["create", "-q", "-f", "qcow2"])
                    .arg(&img.path)
                    .arg(img.size.to_string())
                    .output()
                    .map_err(|e| format!("disk {}: run qemu-img: {e}", img.target))?;
            if !out.status.success() {
                return Err(format!(
                    "disk {}: cannot create the qcow2 image {}: {}",
                    img.target,
                    img.path.display(),
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
        } else {
            use std::os::unix::fs::OpenOptionsExt;
            let f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&img.path)
                .map_err(|e| {
                    format!(
                        "disk {}: cannot create {}: {e}",
                        img.target,
                        img.path.display()
                    )
                })?;
            f.set_len(img.size)
                .map_err(|e| format!("disk {}: size {}: {e}", img.target, img.path.display()))?;
        }
        tracing::info!(%vm, disk = %img.target, path = %img.path.display(), size = img.size, format = img.format.as_str(), "created the copy's disk image (sparse); the initial sync fills it");
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
    (copy_dir, copy): (&std::path::Path, Option<CopyState>),
) {
    let name = slot.vm.name().to_string();
    // A discarded standby keeps its record: it says what its disks hold
    // (a committed checkpoint of the primary's generation, or an
    // interrupted resync), for the next session to this host.
    let discard = |why: &str| {
        tracing::warn!(vm = %name, "{why}; the copy here is discarded");
        agent.destroy_slot(slot, crate::agent::CopyRecord::Keep);
    };
    match end {
        Ok(BackupEnd::SwitchOver(epoch)) => {
            let what = if purpose == Purpose::Protect {
                "planned switch-over complete"
            } else {
                "migration complete"
            };
            tracing::info!(vm = %name, epoch = epoch.0, "{what}: the VM runs on this host");
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
                match remus_replication::failover::take_over_disks(&slot.vm, d, copy_dir) {
                    Ok(t) => {
                        tracing::info!(vm = %name, discarded_records = t.discarded_records, discarded_bytes = t.discarded_bytes, change_maps = ?t.change_maps, "failover: uncommitted disk writes discarded; changes from now on are recorded");
                    }
                    Err(e) => {
                        tracing::error!(vm = %name, error = %e, "failover FAILED: the disks cannot take over");
                        agent.destroy_slot(slot, crate::agent::CopyRecord::Keep);
                        give_back(lease);
                        return;
                    }
                }
                // This copy goes on alone from here: a new generation,
                // recorded before the VM runs.
                let mut rec = copy
                    .unwrap_or_else(|| CopyState::new(slot.vm.config.memory, slot.vm.config.vcpus));
                rec.gens.diverge();
                rec.running = true;
                rec.resync_from = None;
                rec.common_epoch = replica.committed().map(|e| e.0);
                crate::copies::save(copy_dir, &name, &rec);
                tracing::info!(vm = %name, generation = %rec.gens.current, since = ?rec.gens.bitmap.map(|g| g.to_string()), "failover: this copy goes on alone from a new generation");
            } else {
                // Its disks were not replicated: what they hold is not
                // what any record says.
                crate::copies::forget(copy_dir, &name);
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
                    agent.destroy_slot(slot, crate::agent::CopyRecord::Keep);
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
