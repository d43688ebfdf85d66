//! Failover decided by a cluster manager (`remusd --failover-by cluster`).
//!
//! The agent then never decides by itself that a VM runs on this host
//! after its peer was lost: the cluster manager (Pacemaker, which fences
//! the lost host first) does, and says so with `remus takeover VM`.
//!
//! - A **standby** whose primary is lost after a committed checkpoint
//!   waits here ([`Hold::wait`]) instead of resuming; `takeover` lets it
//!   resume (Pacemaker's promote), `destroy` discards it.
//! - A **primary** whose backup is lost without a word (silent, gone) is
//!   fenced by the session (paused, its unacknowledged output held: the
//!   cluster may be promoting the standby); `takeover` lifts the fence
//!   (the resource agent's notify, once the peer's instance is stopped or
//!   its host fenced), and the VM runs on here unprotected.
//!
//! The hold is this module's state per VM: what it waits for, the word
//! to go on, and the outcome the standby reports back to `takeover`.

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// What a held VM waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Held {
    /// A standby whose primary is lost: it resumes at `takeover`.
    Standby,
    /// A primary whose backup is lost: its fence is lifted at `takeover`.
    Primary,
}

#[derive(Debug, Default)]
struct State {
    /// Set while held: what for, and why (for `list`).
    held: Option<(Held, String)>,
    /// A held standby's primary (its host's address).
    primary: Option<std::net::IpAddr>,
    /// `takeover` said go.
    go: bool,
    /// The slot is being destroyed: the waiting standby gives up.
    abandoned: bool,
    /// The standby's outcome after `go`: `Ok` once the VM runs here.
    outcome: Option<Result<(), String>>,
}

/// One VM's hold (see the module's text).
#[derive(Debug, Default)]
pub struct Hold {
    state: Mutex<State>,
    changed: Condvar,
}

/// How long `takeover` waits for a released standby to run.
pub const RESUME_WAIT: Duration = Duration::from_secs(60);

impl Hold {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What the VM waits for, and why, while held.
    pub fn held(&self) -> Option<(Held, String)> {
        self.lock().held.clone()
    }

    /// A standby waits for the cluster's word: true once `takeover` says
    /// go (the caller then resumes the VM and reports with
    /// [`Hold::resumed`]), false if the slot is destroyed, its primary
    /// (at `primary`) comes back ([`Hold::primary_is_back`]), or
    /// `give_up` turns true (checked every half second).
    pub fn wait(
        &self,
        reason: &str,
        primary: Option<std::net::IpAddr>,
        give_up: impl Fn() -> bool,
    ) -> bool {
        let mut st = self.lock();
        st.held = Some((Held::Standby, reason.to_string()));
        st.primary = primary;
        st.go = false;
        st.outcome = None;
        loop {
            if st.go {
                return true;
            }
            if st.abandoned || give_up() {
                st.held = None;
                return false;
            }
            st = self
                .changed
                .wait_timeout(st, Duration::from_millis(500))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// An authenticated session for this VM comes from the host of the
    /// primary this standby waits after: that primary is alive, so the
    /// cluster will not promote this copy (it fences a host before it
    /// promotes a standby of its VM). The standby gives up, and true is
    /// returned: the caller lets the session retry once it is gone.
    pub fn primary_is_back(&self, from: std::net::IpAddr) -> bool {
        let mut st = self.lock();
        let back =
            matches!(st.held, Some((Held::Standby, _))) && !st.go && st.primary == Some(from);
        if back {
            st.abandoned = true;
            self.changed.notify_all();
        }
        back
    }

    /// The released standby's outcome, for the `takeover` waiting on it.
    pub fn resumed(&self, outcome: Result<(), String>) {
        let mut st = self.lock();
        st.held = None;
        st.outcome = Some(outcome);
        self.changed.notify_all();
    }

    /// A primary is held fenced for the cluster's word.
    pub fn hold_primary(&self, reason: &str) {
        self.lock().held = Some((Held::Primary, reason.to_string()));
    }

    /// Ends a primary's hold (its fence is lifted, or the VM is gone).
    pub fn clear(&self) {
        self.lock().held = None;
    }

    /// The slot goes away: a waiting standby gives up.
    pub fn abandon(&self) {
        let mut st = self.lock();
        st.abandoned = true;
        self.changed.notify_all();
    }

    /// `takeover` on a held standby: says go, then waits (up to `within`)
    /// for the VM to run here.
    pub fn release_standby(&self, within: Duration) -> Result<(), String> {
        let mut st = self.lock();
        if !matches!(st.held, Some((Held::Standby, _))) || st.go {
            return Err("it is not a standby waiting for a takeover".into());
        }
        st.go = true;
        self.changed.notify_all();
        let deadline = Instant::now() + within;
        loop {
            if let Some(outcome) = st.outcome.take() {
                return outcome;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(format!(
                    "the standby did not report running within {}s; see the agent's log",
                    within.as_secs()
                ));
            }
            st = self
                .changed
                .wait_timeout(st, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn a_released_standby_reports_its_outcome_to_the_takeover() {
        let hold = Arc::new(Hold::default());
        let h = hold.clone();
        let standby = std::thread::spawn(move || {
            let go = h.wait("primary lost", None, || false);
            if go {
                h.resumed(Ok(()));
            }
            go
        });
        while hold.held().is_none() {
            std::thread::yield_now();
        }
        assert_eq!(hold.held().map(|(w, _)| w), Some(Held::Standby));
        assert_eq!(hold.release_standby(Duration::from_secs(5)), Ok(()));
        assert!(standby.join().unwrap());
        assert_eq!(hold.held(), None);
        // Not held any more: a second takeover is refused.
        assert!(hold.release_standby(Duration::from_millis(10)).is_err());
    }

    #[test]
    fn a_failed_resume_is_reported_and_an_abandoned_standby_gives_up() {
        let hold = Arc::new(Hold::default());
        let h = hold.clone();
        let standby = std::thread::spawn(move || {
            if h.wait("primary lost", None, || false) {
                h.resumed(Err("disks cannot take over".into()));
            }
        });
        while hold.held().is_none() {
            std::thread::yield_now();
        }
        assert_eq!(
            hold.release_standby(Duration::from_secs(5)),
            Err("disks cannot take over".into())
        );
        standby.join().unwrap();

        let hold = Arc::new(Hold::default());
        let h = hold.clone();
        let standby = std::thread::spawn(move || h.wait("primary lost", None, || false));
        while hold.held().is_none() {
            std::thread::yield_now();
        }
        hold.abandon();
        assert!(!standby.join().unwrap());
        assert_eq!(hold.held(), None);
    }

    #[test]
    fn a_standby_gives_up_when_its_primary_comes_back_and_only_then() {
        let hold = Arc::new(Hold::default());
        let h = hold.clone();
        let primary: std::net::IpAddr = "198.18.0.1".parse().unwrap();
        let standby = std::thread::spawn(move || h.wait("primary lost", Some(primary), || false));
        while hold.held().is_none() {
            std::thread::yield_now();
        }
        assert!(!hold.primary_is_back("198.18.0.3".parse().unwrap()));
        assert!(hold.held().is_some());
        assert!(hold.primary_is_back(primary));
        assert!(!standby.join().unwrap());
    }

    #[test]
    fn a_primary_is_not_released_as_a_standby() {
        let hold = Hold::default();
        hold.hold_primary("backup silent");
        assert!(hold.release_standby(Duration::from_millis(10)).is_err());
        assert_eq!(hold.held().map(|(w, _)| w), Some(Held::Primary));
        hold.clear();
        assert_eq!(hold.held(), None);
    }
}
