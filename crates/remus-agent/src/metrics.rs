//! Prometheus metrics (`remusd --metrics ADDR:PORT`, `GET /metrics`).
//!
//! Counters and histograms are fed as things happen (a checkpoint, a
//! failover, a refused connection); what a VM *is* (its role, state, the
//! age of its last checkpoint, the output held for it) is read from the
//! agent at each scrape, so that a scrape never shows a VM that is gone.
//! Names and meanings: docs/operations.md, "What to monitor".

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use remus_api::SessionEvent;

use crate::agent::Agent;
use crate::observe::Notice;

/// Bucket bounds of the pause and ack histograms (seconds): 1 ms to
/// 144 ms, Fibonacci-spaced, fine where checkpoints live.
const BUCKETS: [f64; 11] = [
    0.001, 0.002, 0.003, 0.005, 0.008, 0.013, 0.021, 0.034, 0.055, 0.089, 0.144,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VmLabel {
    pub vm: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VmInfoLabels {
    vm: String,
    role: String,
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BytesLabels {
    vm: String,
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
    protocol: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HookLabels {
    pub event: &'static str,
    pub result: &'static str,
}

/// Why a connection was refused (`remus_refused_connections_total`).
#[derive(Debug, Clone, Copy)]
pub enum Refusal {
    /// The replication port's limits on handshakes in progress.
    Admission,
    /// A replication handshake that failed (wrong key, garbage, timeout).
    Handshake,
    /// An API socket client that is not allowed.
    Api,
}

type F64Gauge = Gauge<f64, AtomicU64>;
type F64Counter = Counter<f64, AtomicU64>;
type Histograms = Family<VmLabel, Histogram, fn() -> Histogram>;

fn histogram() -> Histogram {
    Histogram::new(BUCKETS)
}

/// The agent's metrics.
pub struct Metrics {
    registry: Registry,
    /// Serialises scrapes (they rebuild the per-VM gauges).
    scrape: Mutex<()>,
    // Read from the agent at each scrape.
    vm_info: Family<VmInfoLabels, Gauge>,
    protected: Family<VmLabel, Gauge>,
    wanted: Family<VmLabel, Gauge>,
    fenced: Family<VmLabel, Gauge>,
    age: Family<VmLabel, F64Gauge>,
    held_frames: Family<VmLabel, Gauge>,
    held_bytes: Family<VmLabel, Gauge>,
    stale_now: Gauge,
    arbiter_up: Gauge,
    // Fed as things happen.
    pause: Histograms,
    ack: Histograms,
    checkpoints: Family<VmLabel, Counter>,
    dirty_last: Family<VmLabel, Gauge>,
    dirty_total: Family<VmLabel, Counter>,
    bytes: Family<BytesLabels, Counter>,
    journal_wait: Family<VmLabel, F64Counter>,
    sync_compared: Family<VmLabel, Gauge>,
    sync_total: Family<VmLabel, Gauge>,
    failovers: Family<VmLabel, Counter>,
    backup_lost: Family<VmLabel, Counter>,
    fences: Family<VmLabel, Counter>,
    stale: Family<VmLabel, Counter>,
    refused: Family<ReasonLabel, Counter>,
    pub(crate) hook_runs: Family<HookLabels, Counter>,
    /// When each VM's last checkpoint was acknowledged (primary) or
    /// committed (backup).
    last_commit: Mutex<HashMap<String, Instant>>,
}

fn label(vm: &str) -> VmLabel {
    VmLabel { vm: vm.to_string() }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let m = Metrics {
            registry: Registry::default(),
            scrape: Mutex::new(()),
            vm_info: Family::default(),
            protected: Family::default(),
            wanted: Family::default(),
            fenced: Family::default(),
            age: Family::default(),
            held_frames: Family::default(),
            held_bytes: Family::default(),
            stale_now: Gauge::default(),
            arbiter_up: Gauge::default(),
            pause: Family::new_with_constructor(histogram),
            ack: Family::new_with_constructor(histogram),
            checkpoints: Family::default(),
            dirty_last: Family::default(),
            dirty_total: Family::default(),
            bytes: Family::default(),
            journal_wait: Family::default(),
            sync_compared: Family::default(),
            sync_total: Family::default(),
            failovers: Family::default(),
            backup_lost: Family::default(),
            fences: Family::default(),
            stale: Family::default(),
            refused: Family::default(),
            hook_runs: Family::default(),
            last_commit: Mutex::new(HashMap::new()),
        };
        let mut r = Registry::default();
        let build: Family<BuildLabels, Gauge> = Family::default();
        build
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
                protocol: remus_proto::PROTOCOL_VERSION.to_string(),
            })
            .set(1);
        r.register(
            "remus_build_info",
            "The agent's version and the newest replication protocol it speaks",
            build,
        );
        r.register(
            "remus_vm_info",
            "A VM on this host: its role here (primary, backup, unprotected, stale) and run state",
            m.vm_info.clone(),
        );
        r.register(
            "remus_vm_protected",
            "1 while this host runs the VM and checkpoints it to a backup",
            m.protected.clone(),
        );
        r.register(
            "remus_vm_protection_wanted",
            "1 while protection of the VM is wanted here (remus protect, until --stop)",
            m.wanted.clone(),
        );
        r.register(
            "remus_vm_fenced",
            "1 while the arbiter holds the VM paused here",
            m.fenced.clone(),
        );
        r.register(
            "remus_vm_last_checkpoint_age_seconds",
            "Seconds since the VM's last checkpoint was acknowledged (primary) or committed (backup): what a failover now would lose at most",
            m.age.clone(),
        );
        r.register(
            "remus_net_held_frames",
            "Network frames of the VM held until their checkpoint is acknowledged",
            m.held_frames.clone(),
        );
        r.register(
            "remus_net_held_bytes",
            "Bytes of network output of the VM held until their checkpoint is acknowledged",
            m.held_bytes.clone(),
        );
        r.register(
            "remus_stale_copies_listed",
            "Stale copies this host lists now (VMs that run elsewhere)",
            m.stale_now.clone(),
        );
        r.register(
            "remus_arbiter_up",
            "1 when the arbiter (etcd) answered the last scrape's health check",
            m.arbiter_up.clone(),
        );
        r.register(
            "remus_checkpoint_pause_seconds",
            "How long the guest was paused per checkpoint",
            m.pause.clone(),
        );
        r.register(
            "remus_checkpoint_ack_seconds",
            "From a checkpoint's last frame sent to the backup's acknowledgement",
            m.ack.clone(),
        );
        r.register(
            "remus_checkpoints",
            "Checkpoints the backup acknowledged",
            m.checkpoints.clone(),
        );
        r.register(
            "remus_checkpoint_dirty_pages",
            "Dirty pages of the last checkpoint",
            m.dirty_last.clone(),
        );
        r.register(
            "remus_dirty_pages",
            "Dirty pages checkpointed",
            m.dirty_total.clone(),
        );
        r.register(
            "remus_checkpoint_bytes",
            "Checkpoint bytes: raw (pages and device state) and wire (after compression)",
            m.bytes.clone(),
        );
        r.register(
            "remus_disk_journal_wait_seconds",
            "Time guest disk writes waited for room in the replication journal",
            m.journal_wait.clone(),
        );
        r.register(
            "remus_disk_sync_compared_bytes",
            "Bytes of the VM's disks compared so far by the running initial sync or resync",
            m.sync_compared.clone(),
        );
        r.register(
            "remus_disk_sync_total_bytes",
            "Bytes of the disk the running initial sync or resync compares",
            m.sync_total.clone(),
        );
        r.register(
            "remus_failovers",
            "Failovers to this host (its standby resumed the VM after losing the primary)",
            m.failovers.clone(),
        );
        r.register(
            "remus_backup_lost",
            "Protection sessions that ended because the backup or the link failed",
            m.backup_lost.clone(),
        );
        r.register(
            "remus_fences",
            "Times the arbiter paused the VM here",
            m.fences.clone(),
        );
        r.register(
            "remus_stale_copies",
            "Copies here marked stale (another host holds the VM's key)",
            m.stale.clone(),
        );
        r.register(
            "remus_refused_connections",
            "Connections refused: admission (handshake limits), handshake (failed), api (socket peer not allowed)",
            m.refused.clone(),
        );
        r.register(
            "remus_hook_runs",
            "Event hook runs by event and result (ok, failed, timeout, dropped)",
            m.hook_runs.clone(),
        );
        Metrics { registry: r, ..m }
    }

    /// One event of a session this host runs.
    pub fn session_event(&self, vm: &str, event: &SessionEvent) {
        let l = label(vm);
        match event {
            SessionEvent::Checkpoint(c) => {
                self.pause.get_or_create(&l).observe(c.pause_ms / 1000.0);
                self.ack.get_or_create(&l).observe(c.ack_ms / 1000.0);
                self.checkpoints.get_or_create(&l).inc();
                self.dirty_last
                    .get_or_create(&l)
                    .set(i64::try_from(c.dirty_pages).unwrap_or(i64::MAX));
                self.dirty_total.get_or_create(&l).inc_by(c.dirty_pages);
                for (kind, n) in [("raw", c.raw_bytes), ("wire", c.bytes)] {
                    self.bytes
                        .get_or_create(&BytesLabels {
                            vm: vm.to_string(),
                            kind,
                        })
                        .inc_by(n);
                }
                self.journal_wait
                    .get_or_create(&l)
                    .inc_by(c.disk_wait_ms / 1000.0);
                self.committed(vm);
            }
            SessionEvent::DiskSync(p) => {
                let sat = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
                self.sync_compared
                    .get_or_create(&l)
                    .set(sat(p.compared_bytes));
                self.sync_total.get_or_create(&l).set(sat(p.disk_bytes));
            }
            SessionEvent::DiskSynced(_) => {
                self.sync_compared.remove(&l);
                self.sync_total.remove(&l);
            }
            // A session that starts or ends: the last checkpoint of an
            // earlier one says nothing about this one.
            SessionEvent::SyncPlan { .. }
            | SessionEvent::InitialSync { .. }
            | SessionEvent::Stopped { .. }
            | SessionEvent::BackupLost { .. } => self.restart_clock(vm),
            _ => {}
        }
    }

    /// The standby copy of `vm` committed a checkpoint.
    pub fn backup_committed(&self, vm: &str) {
        self.committed(vm);
    }

    fn committed(&self, vm: &str) {
        let mut last = self.last_commit.lock().unwrap_or_else(|p| p.into_inner());
        match last.get_mut(vm) {
            Some(t) => *t = Instant::now(),
            None => {
                last.insert(vm.to_string(), Instant::now());
            }
        }
    }

    pub fn notice(&self, vm: &str, notice: &Notice) {
        let l = label(vm);
        match notice {
            Notice::Failover { .. } => self.failovers.get_or_create(&l).inc(),
            Notice::BackupLost { .. } => self.backup_lost.get_or_create(&l).inc(),
            Notice::Fenced { .. } => self.fences.get_or_create(&l).inc(),
            Notice::Stale { .. } => self.stale.get_or_create(&l).inc(),
            _ => 0,
        };
        // A new role starts a new clock: the last checkpoint of the old
        // one says nothing about the new.
        if matches!(notice, Notice::Failover { .. } | Notice::Stale { .. }) {
            self.restart_clock(vm);
        }
    }

    /// No checkpoint of the current session yet: the age is absent.
    fn restart_clock(&self, vm: &str) {
        self.last_commit
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(vm);
    }

    pub fn refused(&self, why: Refusal) {
        let reason = match why {
            Refusal::Admission => "admission",
            Refusal::Handshake => "handshake",
            Refusal::Api => "api",
        };
        self.refused.get_or_create(&ReasonLabel { reason }).inc();
    }

    /// A VM left this host: its per-session values go (its counters stay
    /// until the agent restarts, as counters do).
    pub fn forget(&self, vm: &str) {
        let l = label(vm);
        self.restart_clock(vm);
        self.dirty_last.remove(&l);
        self.sync_compared.remove(&l);
        self.sync_total.remove(&l);
    }

    /// The text a scrape gets (OpenMetrics), with the VMs' current state.
    /// Blocking (the arbiter's health check): call off the async runtime.
    pub fn render(&self, agent: &Agent) -> String {
        let _one = self.scrape.lock().unwrap_or_else(|p| p.into_inner());
        for f in [
            &self.protected,
            &self.wanted,
            &self.fenced,
            &self.held_frames,
            &self.held_bytes,
        ] {
            f.clear();
        }
        self.vm_info.clear();
        self.age.clear();
        let sat = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        let mut stale = 0;
        for v in agent.list() {
            if v.role == "stale" {
                stale += 1;
            }
            self.vm_info
                .get_or_create(&VmInfoLabels {
                    vm: v.name.clone(),
                    role: v.role.clone(),
                    state: v.state_name.clone(),
                })
                .set(1);
            let l = label(&v.name);
            self.wanted
                .get_or_create(&l)
                .set(i64::from(v.wanted.is_some()));
        }
        self.stale_now.set(stale);
        let last = self
            .last_commit
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        for slot in agent.slots() {
            let name = slot.vm.name();
            let l = label(name);
            let role = slot.life.role();
            self.protected
                .get_or_create(&l)
                .set(i64::from(role == remus_vm::Role::Primary));
            self.fenced
                .get_or_create(&l)
                .set(i64::from(slot.vm.is_fenced()));
            let (frames, bytes) =
                slot.vm
                    .output_commits()
                    .iter()
                    .fold((0u64, 0u64), |(f, b), c| {
                        let (cf, cb) = c.held_now();
                        (f + cf, b + cb)
                    });
            self.held_frames.get_or_create(&l).set(sat(frames));
            self.held_bytes.get_or_create(&l).set(sat(bytes));
            if role != remus_vm::Role::Unprotected
                && let Some(t) = last.get(name)
            {
                self.age.get_or_create(&l).set(t.elapsed().as_secs_f64());
            }
        }
        if let Some(arb) = &agent.opts.arbiter {
            self.arbiter_up.set(i64::from(arb.arb.health().is_ok()));
        }
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "metrics: cannot encode");
        }
        out
    }
}

/// Content type of [`Metrics::render`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Serves `GET /metrics` on `listener` until the runtime ends.
pub async fn serve(listener: tokio::net::TcpListener, agent: Arc<Agent>) {
    use axum::http::header;
    use axum::response::IntoResponse;
    use axum::routing::get;
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(
                |axum::extract::State(a): axum::extract::State<Arc<Agent>>| async move {
                    match tokio::task::spawn_blocking(move || a.observer().metrics.render(&a)).await
                    {
                        Ok(text) => ([(header::CONTENT_TYPE, CONTENT_TYPE)], text).into_response(),
                        Err(e) => (
                            axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                            format!("metrics: {e}\n"),
                        )
                            .into_response(),
                    }
                },
            ),
        )
        .route(
            "/",
            get(|| async { "remusd: metrics at /metrics (Prometheus text format)\n" }),
        )
        .with_state(agent);
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!(error = %e, "metrics server ended");
    }
}
