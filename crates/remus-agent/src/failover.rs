//! The standby's decision when its session ends: does the VM run here
//! now, must this copy be resumed, or discarded? A pure function of how
//! the session ended and what the arbiter answered, so that every branch
//! is tested here; `replication::standby::decide_failover` carries it out.

use remus_proto::Purpose;
use remus_replication::ReplError;
use remus_replication::backup::BackupEnd;

use crate::arbiter::TakeOverRefused;

/// What the standby does.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// A switch-over or migration completed: the VM already runs here.
    RunsHere { epoch: u64, what: &'static str },
    /// The primary is lost after a checkpoint committed: resume from it
    /// (with an arbiter, only once it grants the VM's key: see
    /// [`after_arbiter`]). `silent`: lost by silence, not by a closed
    /// connection (the primary may be alive behind a cut link).
    Resume { reason: String, silent: bool },
    /// The primary's agent restarts with the guest stopped at `epoch`
    /// (committed here): keep the standby for `grace` for the session
    /// that resumes from it; no failover meanwhile.
    Park {
        epoch: remus_proto::Epoch,
        grace: std::time::Duration,
    },
    /// This copy must not run: discard it (its record stays), for this
    /// reason.
    Discard(String),
}

/// The first step: from how the session ended.
pub fn decide(purpose: Purpose, end: &Result<BackupEnd, ReplError>) -> Decision {
    match end {
        Ok(BackupEnd::SwitchOver(epoch)) => Decision::RunsHere {
            epoch: epoch.0,
            what: match purpose {
                Purpose::Protect => "planned switch-over complete",
                Purpose::Migrate => "migration complete",
            },
        },
        Ok(BackupEnd::PrimaryLost {
            committed: Some(_),
            reason,
            silent,
        }) if purpose == Purpose::Protect => Decision::Resume {
            reason: reason.clone(),
            silent: *silent,
        },
        Ok(BackupEnd::PrimaryLost {
            committed: None,
            reason,
            ..
        }) => Decision::Discard(format!(
            "primary lost ({reason}) before the first checkpoint committed: nothing to resume"
        )),
        // A migration's destination resumes only at the switch-over.
        Ok(BackupEnd::PrimaryLost { reason, .. }) => Decision::Discard(format!(
            "migration source lost before the switch-over ({reason}); the VM stays where it was"
        )),
        Ok(BackupEnd::Suspended { epoch, grace }) if purpose == Purpose::Protect => {
            Decision::Park {
                epoch: *epoch,
                grace: *grace,
            }
        }
        Ok(BackupEnd::Suspended { .. }) => {
            Decision::Discard("a migration cannot be suspended".into())
        }
        Ok(BackupEnd::Done) => Decision::Discard("the primary ended the session on purpose".into()),
        Ok(BackupEnd::Aborted { reason }) => Decision::Discard(format!(
            "session aborted while the primary was alive ({reason})"
        )),
        Err(e) => Decision::Discard(format!("replication session failed here ({e})")),
    }
}

/// The second step of a [`Decision::Resume`] on an arbitrated VM: resume
/// only holding the VM's key (taken from the primary's tenure, or once
/// its lease has lapsed: `arbiter::take_over`).
pub fn after_arbiter(reason: &str, silent: bool, answer: Result<(), &TakeOverRefused>) -> Decision {
    match answer {
        Ok(()) => Decision::Resume {
            reason: reason.to_string(),
            silent,
        },
        Err(why) => Decision::Discard(format!("primary lost ({reason}) but NOT resuming: {why}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use remus_proto::Epoch;
    use std::time::Duration;

    fn lost(committed: Option<u64>, reason: &str) -> Result<BackupEnd, ReplError> {
        Ok(BackupEnd::PrimaryLost {
            committed: committed.map(Epoch),
            reason: reason.into(),
            silent: reason.contains("no word"),
        })
    }

    fn discards(d: &Decision, words: &str) -> bool {
        matches!(d, Decision::Discard(why) if why.contains(words))
    }

    #[test]
    fn a_suspended_protection_is_kept_and_a_suspended_migration_is_not() {
        let end = Ok(BackupEnd::Suspended {
            epoch: Epoch(7),
            grace: Duration::from_secs(60),
        });
        assert_eq!(
            decide(Purpose::Protect, &end),
            Decision::Park {
                epoch: Epoch(7),
                grace: Duration::from_secs(60)
            }
        );
        assert!(discards(&decide(Purpose::Migrate, &end), "migration"));
    }

    #[test]
    fn a_silent_or_closed_primary_after_a_commit_is_resumed() {
        for reason in ["no word from the primary within 400ms", "connection closed"] {
            assert_eq!(
                decide(Purpose::Protect, &lost(Some(3), reason)),
                Decision::Resume {
                    reason: reason.into(),
                    silent: reason.contains("no word"),
                }
            );
        }
    }

    #[test]
    fn nothing_committed_means_nothing_to_resume() {
        let d = decide(Purpose::Protect, &lost(None, "silent"));
        assert!(
            discards(&d, "before the first checkpoint committed"),
            "{d:?}"
        );
    }

    #[test]
    fn a_migration_destination_never_resumes_a_lost_source() {
        let d = decide(Purpose::Migrate, &lost(Some(2), "silent"));
        assert!(discards(&d, "the VM stays where it was"), "{d:?}");
        let d = decide(Purpose::Migrate, &lost(None, "silent"));
        assert!(discards(&d, "nothing to resume"), "{d:?}");
    }

    #[test]
    fn a_primary_that_said_done_or_abort_is_alive_so_the_copy_goes() {
        let d = decide(Purpose::Protect, &Ok(BackupEnd::Done));
        assert!(discards(&d, "on purpose"), "{d:?}");
        let d = decide(
            Purpose::Protect,
            &Ok(BackupEnd::Aborted {
                reason: "checkpoint rejected".into(),
            }),
        );
        assert!(discards(&d, "aborted while the primary was alive"), "{d:?}");
        let d = decide(
            Purpose::Protect,
            &Err(ReplError::Protocol("bad frame".into())),
        );
        assert!(discards(&d, "failed here"), "{d:?}");
    }

    #[test]
    fn a_switch_over_runs_here_already() {
        assert_eq!(
            decide(Purpose::Protect, &Ok(BackupEnd::SwitchOver(Epoch(9)))),
            Decision::RunsHere {
                epoch: 9,
                what: "planned switch-over complete"
            }
        );
        assert!(matches!(
            decide(Purpose::Migrate, &Ok(BackupEnd::SwitchOver(Epoch(4)))),
            Decision::RunsHere {
                what: "migration complete",
                ..
            }
        ));
    }

    #[test]
    fn the_arbiter_decides_whether_a_lost_primary_is_resumed() {
        assert_eq!(
            after_arbiter("silent", true, Ok(())),
            Decision::Resume {
                reason: "silent".into(),
                silent: true,
            }
        );
        let elsewhere = TakeOverRefused::RunsElsewhere {
            holder: "host-a".into(),
            revision: 12,
        };
        let d = after_arbiter("silent", true, Err(&elsewhere));
        assert!(
            discards(&d, "NOT resuming: the arbiter says host-a runs the VM"),
            "{d:?}"
        );
        let unreachable = TakeOverRefused::NotGranted {
            window: Duration::from_secs(4),
            last: "etcd: connection refused".into(),
        };
        let d = after_arbiter("silent", true, Err(&unreachable));
        assert!(discards(&d, "NOT resuming"), "{d:?}");
        assert!(discards(&d, "connection refused"), "{d:?}");
    }
}
