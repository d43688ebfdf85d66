//! A VM's life on this host as one state machine: what the VM is here
//! (runs unprotected, is claimed by a session being set up, is protected,
//! is migrating away, has just lost its session, is a standby) and the
//! only transitions between those states. Every session start, end and
//! failover goes through [`Life`]; the role `remus list` shows is read
//! from it.
//!
//! ```text
//!                     claim(Protect)           protecting()
//!   Unprotected ───────────────────► Claimed ────────────────► Protecting
//!     ▲   ▲ │ claim(Migrate)           │ release()               │ session_over()
//!     │   │ └───────────────► Claimed ─┘ (setup failed,          ▼
//!     │   │                  (migrating) migration failed)     Ending
//!     │   └──────────────────────── release() ─────────────────────┘
//!     │ took_over() (failover, switch-over)
//!   Standby ◄── created as a standby copy
//! ```
//!
//! Kept elsewhere, on purpose: the guest's run-state holds (the operator's
//! pause and the arbiter's fence) live in `remus_vm::Vm`, where every
//! checkpoint reads them under the run-state lock; the arbiter's tenure
//! of the VM's key (leased, pinned, stale) lives in its `Guard`.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use remus_proto::Purpose;
use remus_replication::primary::Tuning;
use remus_vm::Role;

/// Where a VM stands on this host.
#[derive(Debug, Clone)]
pub enum Stage {
    /// Runs here with no session.
    Unprotected,
    /// A session to `peer` is being set up (protect), or runs (migrate):
    /// no other session may start.
    Claimed {
        purpose: Purpose,
        peer: String,
        stop: Arc<AtomicBool>,
    },
    /// Runs here and is checkpointed to `peer`.
    Protecting {
        peer: String,
        stop: Arc<AtomicBool>,
        /// Set by `failback`: the session hands the VM over at the next
        /// checkpoint.
        switch_over: Arc<AtomicBool>,
        /// The interval and timeout `remus protect --set` changes.
        tuning: Arc<Tuning>,
    },
    /// The session to `peer` has ended (backup lost, stopped, switch-over
    /// being settled); the VM runs here unprotected, and no new session
    /// starts until the old one has finished.
    Ending { peer: String },
    /// A standby copy receiving checkpoints (protection) or a migration.
    Standby { purpose: Purpose },
}

/// Why a transition was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("it is a standby copy (role backup)")]
    Standby,
    #[error("it is already being protected or migrated")]
    Busy,
    #[error("it is {0} here")]
    Role(&'static str),
}

/// The state, behind one lock; with a record, every transition is also
/// written to a file (one word, see [`token`]), so that the next agent
/// knows what the VM was here when this one stopped, even by SIGKILL.
pub struct Life(Mutex<Stage>, Option<PathBuf>);

impl Life {
    pub fn new(stage: Stage) -> Life {
        Life(Mutex::new(stage), None)
    }

    /// A life whose stages are recorded in `record` (written now).
    pub fn recorded(stage: Stage, record: PathBuf) -> Life {
        write_token(&record, &stage);
        Life(Mutex::new(stage), Some(record))
    }

    /// Moves to `to` (the caller holds the lock), recording it.
    fn set(&self, st: &mut MutexGuard<'_, Stage>, to: Stage) {
        if let Some(r) = &self.1 {
            write_token(r, &to);
        }
        **st = to;
    }

    fn lock(&self) -> MutexGuard<'_, Stage> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn stage(&self) -> Stage {
        self.lock().clone()
    }

    /// The role `remus list` shows.
    pub fn role(&self) -> Role {
        match &*self.lock() {
            Stage::Protecting { .. } => Role::Primary,
            Stage::Standby { .. } => Role::Backup,
            Stage::Unprotected | Stage::Claimed { .. } | Stage::Ending { .. } => Role::Unprotected,
        }
    }

    /// The peer of the session that holds the VM, if one does.
    pub fn peer(&self) -> Option<String> {
        match &*self.lock() {
            Stage::Claimed { peer, .. }
            | Stage::Protecting { peer, .. }
            | Stage::Ending { peer } => Some(peer.clone()),
            Stage::Unprotected | Stage::Standby { .. } => None,
        }
    }

    /// Unprotected → Claimed: a session to `peer` starts setting up. Its
    /// `stop` flag ends it.
    pub fn claim(
        &self,
        purpose: Purpose,
        peer: &str,
        stop: Arc<AtomicBool>,
    ) -> Result<(), Refused> {
        let mut st = self.lock();
        match &*st {
            Stage::Unprotected => {
                self.set(
                    &mut st,
                    Stage::Claimed {
                        purpose,
                        peer: peer.to_string(),
                        stop,
                    },
                );
                Ok(())
            }
            Stage::Standby { .. } => Err(Refused::Standby),
            _ => Err(Refused::Busy),
        }
    }

    /// Claimed (protect) → Protecting: the backup is ready.
    pub fn protecting(
        &self,
        switch_over: Arc<AtomicBool>,
        tuning: Arc<Tuning>,
    ) -> Result<(), Refused> {
        let mut st = self.lock();
        match &*st {
            Stage::Claimed {
                purpose: Purpose::Protect,
                peer,
                stop,
            } => {
                let to = Stage::Protecting {
                    peer: peer.clone(),
                    stop: stop.clone(),
                    switch_over,
                    tuning,
                };
                self.set(&mut st, to);
                Ok(())
            }
            other => Err(Refused::Role(name(other))),
        }
    }

    /// The running protection session's settings, if one runs.
    pub fn tuning(&self) -> Option<Arc<Tuning>> {
        match &*self.lock() {
            Stage::Protecting { tuning, .. } => Some(tuning.clone()),
            _ => None,
        }
    }

    /// Protecting → Ending: the session's last word is out (the role shows
    /// unprotected from here).
    pub fn session_over(&self) {
        let mut st = self.lock();
        if let Stage::Protecting { peer, .. } = &*st {
            let to = Stage::Ending { peer: peer.clone() };
            self.set(&mut st, to);
        }
    }

    /// Claimed, Protecting or Ending → Unprotected: the session is gone.
    pub fn release(&self) {
        let mut st = self.lock();
        if matches!(
            *st,
            Stage::Claimed { .. } | Stage::Protecting { .. } | Stage::Ending { .. }
        ) {
            self.set(&mut st, Stage::Unprotected);
        }
    }

    /// Standby → Unprotected: this copy runs now (failover, switch-over,
    /// migration).
    pub fn took_over(&self) {
        let mut st = self.lock();
        if matches!(*st, Stage::Standby { .. }) {
            self.set(&mut st, Stage::Unprotected);
        }
    }

    /// Asks the running session to stop; false if none can be stopped.
    pub fn stop(&self) -> bool {
        match &*self.lock() {
            Stage::Claimed { stop, .. } | Stage::Protecting { stop, .. } => {
                stop.store(true, Ordering::SeqCst);
                true
            }
            _ => false,
        }
    }

    /// Asks the protection session to hand the VM over at the next
    /// checkpoint; false if the VM is not being protected.
    pub fn request_switch_over(&self) -> bool {
        match &*self.lock() {
            Stage::Protecting { switch_over, .. } => {
                switch_over.store(true, Ordering::SeqCst);
                true
            }
            _ => false,
        }
    }
}

/// A stage as one word, for the record a next agent reads.
pub fn token(stage: &Stage) -> &'static str {
    match stage {
        Stage::Unprotected => "unprotected",
        Stage::Claimed {
            purpose: Purpose::Protect,
            ..
        } => "claimed-protect",
        Stage::Claimed {
            purpose: Purpose::Migrate,
            ..
        } => "claimed-migrate",
        Stage::Protecting { .. } => "protecting",
        Stage::Ending { .. } => "ending",
        Stage::Standby { .. } => "standby",
    }
}

/// Whether a VM whose recorded stage is `token` may be adopted by the
/// next agent: it ran here alone (or its protection was only being set
/// up, so no backup can have run it). Not a primary of a running session
/// (its backup may have taken over since the agent died), not a
/// migration's source (the destination may run it), not a standby.
pub fn adoptable(token: &str) -> bool {
    matches!(token, "unprotected" | "ending" | "claimed-protect")
}

/// Writes `stage`'s token to `path` (atomically: a new file renamed over
/// the old one). A record that cannot be written is logged: the next
/// agent then does not adopt the VM.
fn write_token(path: &Path, stage: &Stage) {
    if let Err(e) = crate::files::replace(path, token(stage).as_bytes()) {
        tracing::error!(file = %path.display(), error = %e, "cannot record the VM's stage for the next agent");
    }
}

/// How the state reads in messages.
pub fn name(stage: &Stage) -> &'static str {
    match stage {
        Stage::Unprotected => "unprotected",
        Stage::Claimed {
            purpose: Purpose::Protect,
            ..
        } => "setting up protection",
        Stage::Claimed {
            purpose: Purpose::Migrate,
            ..
        } => "migrating",
        Stage::Protecting { .. } => "primary",
        Stage::Ending { .. } => "ending its protection session",
        Stage::Standby { .. } => "backup",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flag() -> Arc<AtomicBool> {
        Arc::new(AtomicBool::new(false))
    }

    #[test]
    fn a_protection_session_goes_claimed_protecting_ending_unprotected() {
        let life = Life::new(Stage::Unprotected);
        assert_eq!((life.role(), life.peer()), (Role::Unprotected, None));
        let stop = flag();
        life.claim(Purpose::Protect, "b:7000", stop.clone())
            .unwrap();
        assert_eq!(life.peer().as_deref(), Some("b:7000"));
        assert_eq!(life.role(), Role::Unprotected, "not protected until ready");
        assert_eq!(
            life.claim(Purpose::Protect, "c:7000", flag()),
            Err(Refused::Busy),
            "one session at a time"
        );
        assert!(!life.request_switch_over(), "nothing to switch over yet");
        let switch = flag();
        life.protecting(switch.clone(), tuning()).unwrap();
        assert_eq!(life.role(), Role::Primary);
        assert!(life.request_switch_over() && switch.load(Ordering::SeqCst));
        assert!(life.stop() && stop.load(Ordering::SeqCst));
        life.session_over();
        assert_eq!(life.role(), Role::Unprotected, "shown unprotected at once");
        assert_eq!(life.peer().as_deref(), Some("b:7000"), "still winding down");
        assert_eq!(
            life.claim(Purpose::Protect, "b:7000", flag()),
            Err(Refused::Busy)
        );
        life.release();
        assert!(matches!(life.stage(), Stage::Unprotected));
        life.claim(Purpose::Protect, "b:7000", flag()).unwrap();
    }

    fn tuning() -> Arc<Tuning> {
        Tuning::new(
            std::time::Duration::from_millis(100),
            std::time::Duration::from_secs(1),
            true,
        )
    }

    #[test]
    fn a_failed_setup_or_a_migration_releases_the_claim() {
        let life = Life::new(Stage::Unprotected);
        life.claim(Purpose::Migrate, "b:7000", flag()).unwrap();
        assert_eq!(
            life.protecting(flag(), tuning()),
            Err(Refused::Role("migrating")),
            "a migration never becomes protection"
        );
        assert_eq!(life.role(), Role::Unprotected);
        life.release();
        assert!(matches!(life.stage(), Stage::Unprotected));
    }

    #[test]
    fn a_standby_takes_no_session_until_it_has_taken_over() {
        let life = Life::new(Stage::Standby {
            purpose: Purpose::Protect,
        });
        assert_eq!(life.role(), Role::Backup);
        assert_eq!(
            life.claim(Purpose::Protect, "a:7000", flag()),
            Err(Refused::Standby)
        );
        assert!(!life.stop(), "a standby's session is the peer's");
        life.release();
        assert_eq!(life.role(), Role::Backup, "release is not a takeover");
        life.took_over();
        assert_eq!(life.role(), Role::Unprotected);
        life.claim(Purpose::Protect, "a:7000", flag()).unwrap();
    }

    #[test]
    fn every_transition_is_recorded_for_the_next_agent() {
        let dir = tempfile::tempdir().unwrap();
        let rec = dir.path().join("stage");
        let read = || std::fs::read_to_string(&rec).unwrap();
        let life = Life::recorded(Stage::Unprotected, rec.clone());
        assert_eq!(read(), "unprotected");
        assert!(adoptable(&read()));
        life.claim(Purpose::Protect, "b:7000", flag()).unwrap();
        assert_eq!(read(), "claimed-protect");
        assert!(adoptable(&read()), "no backup can have run it yet");
        life.protecting(flag(), tuning()).unwrap();
        assert_eq!(read(), "protecting");
        assert!(!adoptable(&read()), "its backup may have taken over");
        life.session_over();
        assert_eq!(read(), "ending");
        life.release();
        assert_eq!(read(), "unprotected");
        life.claim(Purpose::Migrate, "b:7000", flag()).unwrap();
        assert!(!adoptable(&read()), "the destination may run it");
        let standby = Life::recorded(
            Stage::Standby {
                purpose: Purpose::Protect,
            },
            dir.path().join("standby"),
        );
        assert!(!adoptable(
            &std::fs::read_to_string(dir.path().join("standby")).unwrap()
        ));
        standby.took_over();
        assert_eq!(
            std::fs::read_to_string(dir.path().join("standby")).unwrap(),
            "unprotected"
        );
        assert!(!adoptable("") && !adoptable("garbage"));
    }
}
