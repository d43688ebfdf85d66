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
//! session ends, [`standby::decide_failover`] decides what happens to the
//! standby — the one place where the arbiter (etcd) can veto a failover.
//!
//! By job: [`protect`] (the primary's session and switch-over),
//! [`migrate`] (the migration source), [`standby`] (the backup's server
//! and its standbys), [`resync`] (the backup's copy record and images);
//! here, what they share: the session setup sent to the peer and opening
//! a session to it.

use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use remus_api::SessionEvent;
use remus_config::VmConfig;
use remus_proto::{
    Channel, DiskCompat, ErrorCode, HandshakeFailure, HelloParams, Message, Purpose, Refusal,
    VmCompat, client_handshake, client_handshake_unencrypted, server_handshake,
};
use remus_replication::backup::{BackupConfig, BackupEnd};
use remus_replication::copy::{CopyState, Generations, SyncMode, SyncPlan};
use remus_replication::primary::{
    HandOver, LostBackup, OnCommit, OnHold, ProtectConfig, ProtectEnd, Suspending, Tuning,
};
use remus_replication::replica::Replica;
use remus_vm::Role;

use crate::admission::Admitted;
use crate::agent::{Agent, AgentError, VmSlot};
use crate::failover::Decision;
use crate::lifecycle::Stage;

mod migrate;
mod protect;
mod resync;
mod standby;
pub mod suspend;

pub use migrate::start_migrate;
pub use protect::{start_failback, start_protect, tune};
pub use standby::serve;
pub use suspend::{ParkedStandbys, SuspendRecord, resume_suspended};

pub use remus_api::ProtectRequest;
pub use remus_proto::setup::{ArbiterSetup, ReturnTo, SessionSetup};

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

/// How long opening a session asks again a peer that answers Busy.
const PEER_BUSY_WAIT: Duration = Duration::from_secs(10);

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
    suspend: Option<SuspendAsk>,
) -> Result<Opened, AgentError> {
    let name = slot.vm.name();
    let compat = compat_of(&slot.vm.config).map_err(AgentError::Internal)?;
    let key = &require_key(agent)?;
    let params = HelloParams::new(purpose, name, compat);
    if unencrypted {
        tracing::warn!(vm = %name, %peer, "replicating IN THE CLEAR as asked (remus protect --unencrypted)");
    }
    // A peer that says Busy (a copy of this VM being set up or torn down
    // there, e.g. the standby of a session that just ended) is asked
    // again for a while instead of failing the request at once.
    let busy_until = std::time::Instant::now() + PEER_BUSY_WAIT;
    let mut said_busy = false;
    let handshake = loop {
        let h = if unencrypted {
            client_handshake_unencrypted(connect(peer)?, key, &params)
        } else {
            client_handshake(connect(peer)?, key, &params)
        };
        match &h {
            Err(e)
                if matches!(
                    e.failure,
                    HandshakeFailure::Refused {
                        code: ErrorCode::Busy,
                        ..
                    }
                ) && std::time::Instant::now() < busy_until =>
            {
                if !said_busy {
                    tracing::info!(vm = %name, %peer, reason = %e, wait_s = PEER_BUSY_WAIT.as_secs(), "the peer is busy with a copy of the VM; asking again");
                    said_busy = true;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            _ => break h,
        }
    };
    // Never a silent step down to the clear: a closed or reset connection
    // during the encrypted handshake is also what a flood of the backup's
    // admission slots, or someone on the path, produces. Talking to an
    // older agent in the clear is asked for per session (--unencrypted).
    let (mut stream, session) = handshake.map_err(|e| match &e.failure {
        HandshakeFailure::Refused { code, .. } => AgentError::PeerRefused {
            code: *code,
            message: e.to_string(),
        },
        _ => AgentError::BadRequest(e.to_string()),
    })?;
    // (Both hold for every version this build accepts today; they stay
    // as the rule for the versions that made them features.)
    if replicate_disks {
        needs_version(
            &mut stream,
            peer,
            session.version,
            remus_proto::DISK_PROTOCOL_VERSION,
            "cannot replicate disks",
            ": upgrade it, or protect with --no-disk",
        )?;
    }
    if arbiter.is_some() {
        needs_version(
            &mut stream,
            peer,
            session.version,
            remus_proto::ARBITER_PROTOCOL_VERSION,
            "does not honour the arbiter",
            ": upgrade it",
        )?;
    }
    let generations =
        generations.filter(|_| session.version >= remus_proto::RESYNC_PROTOCOL_VERSION);
    let mut expect_plan = generations.is_some();
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
        tune: purpose == Purpose::Protect,
        suspend: suspend.is_some(),
        resume: suspend.and_then(|s| s.resume),
        devices_only_state: remus_vm::devstate::devices_only_capable(&slot.vm.config),
    })
    .map_err(|e| AgentError::Internal(e.to_string()))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .map_err(|e| AgentError::Internal(e.to_string()))?;
    Message::VmConfig { json: setup }
        .write_to(&mut stream)
        .map_err(|e| AgentError::Internal(format!("send config to {}: {e}", session.peer)))?;
    let (_, theirs) = purpose.side_names();
    // A backup that keeps its standby across a restart of this agent says
    // so first (older ones go on with their plan or Ready).
    let mut resumable = None;
    let mut first = None;
    if suspend.is_some() {
        match Message::read_from(&mut stream) {
            Ok(Message::Resumable { resumed_at }) => {
                let asked = suspend.and_then(|s| s.resume);
                if resumed_at != 0 && asked != Some(resumed_at) {
                    return Err(AgentError::Internal(format!(
                        "{theirs} {} resumes epoch {resumed_at}, which this agent did not ask for ({asked:?})",
                        session.peer
                    )));
                }
                if resumed_at != 0 {
                    // Nothing to sync: the backup holds the checkpoint.
                    expect_plan = false;
                }
                resumable = Some(resumed_at);
            }
            other => first = Some(other),
        }
    }
    let mut read_next = || {
        first
            .take()
            .unwrap_or_else(|| Message::read_from(&mut stream))
    };
    let mut plan = None;
    if expect_plan {
        match read_next() {
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
    // A backup that can take a new timeout during the session says so
    // first (older ones go straight to Ready).
    let mut tunes = false;
    let mut next = read_next();
    if purpose == Purpose::Protect && matches!(next, Ok(Message::Tune { .. })) {
        tunes = true;
        next = read_next();
    }
    // A backup whose standby loads device-only state says so last (only
    // when offered: older ones, and UEFI VMs, take the full stream).
    let mut devices_only_state = false;
    if matches!(next, Ok(Message::DevicesOnlyState)) {
        if !remus_vm::devstate::devices_only_capable(&slot.vm.config) {
            return Err(AgentError::Internal(format!(
                "{theirs} {} answered DevicesOnlyState, which this agent did not offer",
                session.peer
            )));
        }
        devices_only_state = true;
        next = read_next();
    }
    // This QEMU took over from device-only state: its full stream lacks
    // the configuration section a standby started for the full stream
    // expects, so that standby could never resume it.
    if matches!(next, Ok(Message::Ready)) && slot.vm.devices_only_state() && !devices_only_state {
        let _ = Message::Error {
            code: ErrorCode::Incompatible,
            message: "this VM's QEMU took over from device-only state, which the standby here does not load".into(),
        }
        .write_to(&mut stream);
        return Err(AgentError::BadRequest(format!(
            "{theirs} {} does not load device-only state, and this VM's QEMU (started when this host took the VM over from such state) cannot send the full migration stream its standby would load: upgrade the agent there",
            session.peer
        )));
    }
    match next {
        Ok(Message::Ready) => Ok(Opened {
            stream,
            version: session.version,
            plan,
            tunes,
            resumable,
            devices_only_state,
        }),
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

/// A session to a peer, set up and ready.
struct Opened {
    stream: Channel,
    version: u16,
    /// The backup's disk sync plan (protocol 5 on, replicated disks).
    plan: Option<SyncPlan>,
    /// The backup takes a new failover timeout during the session.
    tunes: bool,
    /// The backup keeps its standby across a restart of this agent (it
    /// answered `suspend`): Some(0), a new copy; Some(epoch), this session
    /// resumes from that checkpoint.
    resumable: Option<u64>,
    /// The backup's standby loads device-only state: save that.
    devices_only_state: bool,
}

/// What a protection session asks of a backup about restarts of this
/// agent (see [`suspend`]): that it keep its standby across one, and
/// whether this session resumes from the checkpoint at `resume`.
#[derive(Debug, Clone, Copy)]
struct SuspendAsk {
    resume: Option<u64>,
}

/// Ends the session (telling the peer why) when the peer's protocol
/// `version` is below `need`, the first with a feature this session uses.
fn needs_version(
    stream: &mut Channel,
    peer: &str,
    version: u16,
    need: u16,
    lacks: &str,
    advice: &str,
) -> Result<(), AgentError> {
    if version >= need {
        return Ok(());
    }
    let _ = Message::Error {
        code: ErrorCode::VersionMismatch,
        message: format!("this session needs protocol version {need}"),
    }
    .write_to(stream);
    Err(AgentError::BadRequest(format!(
        "the agent at {peer} speaks replication protocol {version}, which {lacks} (that needs version {need}){advice}"
    )))
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
        self.0.life.release();
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
