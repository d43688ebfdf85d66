//! What the agent tells the outside about its VMs besides its log: the
//! Prometheus metrics ([`crate::metrics`]) and the operator's event hooks
//! ([`crate::hooks`]). Every site that changes what a VM is on this host
//! (a failover, a lost backup, a fence) reports a [`Notice`] here once;
//! the per-checkpoint numbers come from the session's events.

use std::sync::Arc;

use remus_api::SessionEvent;

use crate::hooks::{HookSettings, Hooks};
use crate::metrics::Metrics;

/// Something an operator is paged or a script acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// This host resumed the VM from its standby copy: its primary was
    /// lost.
    Failover {
        peer: Option<String>,
        epoch: u64,
        reason: String,
    },
    /// The VM's backup or the link to it failed: the VM runs on here
    /// unprotected.
    BackupLost { peer: String, reason: String },
    /// The arbiter paused the VM here (its lease could not be renewed).
    Fenced { reason: String },
    /// The arbiter let the fenced VM run again.
    FenceLifted { reason: String },
    /// Another host holds the VM's key: the copy here never runs again.
    Stale { reason: String },
    /// A takeover (or resumption) was refused because another host may run
    /// the VM.
    SplitBrainRefused {
        peer: Option<String>,
        reason: String,
    },
    /// A changed-only or full resync finished: the backup holds this
    /// copy's data (primary) or this copy holds the primary's (backup).
    ResyncDone { peer: Option<String>, epoch: u64 },
    /// The first checkpoint of protection set up again after it was lost
    /// (by the agent's own retry, or after a failover) is acknowledged.
    ProtectionRestored { peer: String, epoch: u64 },
}

impl Notice {
    /// The event's name (the hook's first argument and `REMUS_EVENT`).
    pub fn name(&self) -> &'static str {
        match self {
            Notice::Failover { .. } => "failover",
            Notice::BackupLost { .. } => "backup-lost",
            Notice::Fenced { .. } => "fenced",
            Notice::FenceLifted { .. } => "fence-lifted",
            Notice::Stale { .. } => "stale",
            Notice::SplitBrainRefused { .. } => "split-brain-refused",
            Notice::ResyncDone { .. } => "resync-done",
            Notice::ProtectionRestored { .. } => "protection-restored",
        }
    }

    pub fn peer(&self) -> Option<&str> {
        match self {
            Notice::Failover { peer, .. }
            | Notice::SplitBrainRefused { peer, .. }
            | Notice::ResyncDone { peer, .. } => peer.as_deref(),
            Notice::BackupLost { peer, .. } | Notice::ProtectionRestored { peer, .. } => Some(peer),
            Notice::Fenced { .. } | Notice::FenceLifted { .. } | Notice::Stale { .. } => None,
        }
    }

    pub fn epoch(&self) -> Option<u64> {
        match self {
            Notice::Failover { epoch, .. }
            | Notice::ResyncDone { epoch, .. }
            | Notice::ProtectionRestored { epoch, .. } => Some(*epoch),
            _ => None,
        }
    }

    /// A sentence for people.
    pub fn reason(&self) -> String {
        match self {
            Notice::Failover { reason, .. }
            | Notice::BackupLost { reason, .. }
            | Notice::Fenced { reason }
            | Notice::FenceLifted { reason }
            | Notice::Stale { reason }
            | Notice::SplitBrainRefused { reason, .. } => reason.clone(),
            Notice::ResyncDone { epoch, .. } => {
                format!("resync complete at epoch {epoch}")
            }
            Notice::ProtectionRestored { peer, epoch } => {
                format!("protected to {peer} again from epoch {epoch}")
            }
        }
    }
}

/// The metrics and hooks of one agent.
pub struct Observer {
    pub metrics: Metrics,
    hooks: Option<Hooks>,
}

impl Observer {
    /// The metrics, and the hooks of `hooks` (checked and started).
    pub fn new(hooks: Option<HookSettings>) -> Result<Arc<Observer>, String> {
        let metrics = Metrics::new();
        let hooks = match hooks {
            Some(h) => {
                tracing::info!(dir = %h.dir.display(), timeout_s = h.timeout.as_secs(), "event hooks from");
                Some(Hooks::start(h, metrics.hook_runs.clone())?)
            }
            None => None,
        };
        Ok(Arc::new(Observer { metrics, hooks }))
    }

    /// `vm` had `notice`; `role` is what it is here now.
    pub fn notice(&self, vm: &str, role: &str, notice: Notice) {
        self.metrics.notice(vm, &notice);
        if let Some(h) = &self.hooks {
            h.fire(vm, role, &notice);
        }
    }

    /// One event of a session this host runs as primary or source.
    pub fn session_event(&self, vm: &str, event: &SessionEvent) {
        self.metrics.session_event(vm, event);
    }

    /// The standby copy of `vm` here committed a checkpoint.
    pub fn backup_committed(&self, vm: &str) {
        self.metrics.backup_committed(vm);
    }
}
