//! A VM's run state and role, with the xl letters operators know.

use serde::{Deserialize, Serialize};

/// Run state, as `xl list` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunState {
    /// A vCPU is running on a host CPU right now (`r`).
    Running,
    /// Running but every vCPU is idle, waiting for an event (`b`).
    Blocked,
    /// Paused by the operator or the system (`p`); a standby copy on a
    /// backup is shown paused as well.
    Paused,
    /// The guest has shut down; QEMU stays until destroyed (`s`).
    Shutdown,
    /// QEMU died or the guest crashed (`c`).
    Crashed,
    /// Being destroyed (`d`).
    Dying,
}

impl RunState {
    /// The xl letter.
    pub fn letter(self) -> char {
        match self {
            RunState::Running => 'r',
            RunState::Blocked => 'b',
            RunState::Paused => 'p',
            RunState::Shutdown => 's',
            RunState::Crashed => 'c',
            RunState::Dying => 'd',
        }
    }

    /// The six-column flag field of `xl list` (`r-----`, `-b----`, ...).
    pub fn xl_flags(self) -> String {
        let pos = "rbpscd".find(self.letter()).unwrap_or(0);
        (0..6)
            .map(|i| if i == pos { self.letter() } else { '-' })
            .collect()
    }

    /// Maps QEMU's `query-status` value; `running` is refined into running
    /// or blocked by looking at the vCPU threads.
    pub fn from_qemu(status: &str, vcpu_busy: bool) -> RunState {
        match status {
            "running" if vcpu_busy => RunState::Running,
            "running" => RunState::Blocked,
            "shutdown" => RunState::Shutdown,
            "internal-error" | "guest-panicked" => RunState::Crashed,
            // paused, suspended, prelaunch, inmigrate, postmigrate,
            // finish-migrate, save-vm, restore-vm, io-error, watchdog, debug,
            // colo: the guest is not executing.
            _ => RunState::Paused,
        }
    }
}

/// What a VM is to Remus on this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Running here, not protected.
    Unprotected,
    /// Running here and checkpointed to a backup.
    Primary,
    /// A standby copy receiving checkpoints.
    Backup,
}

impl Role {
    /// As `remus list` and the API show it (the serde name).
    pub fn name(self) -> &'static str {
        match self {
            Role::Unprotected => "unprotected",
            Role::Primary => "primary",
            Role::Backup => "backup",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xl_letters_and_flags() {
        assert_eq!(RunState::Running.xl_flags(), "r-----");
        assert_eq!(RunState::Blocked.xl_flags(), "-b----");
        assert_eq!(RunState::Paused.xl_flags(), "--p---");
        assert_eq!(RunState::Shutdown.xl_flags(), "---s--");
        assert_eq!(RunState::Crashed.xl_flags(), "----c-");
        assert_eq!(RunState::Dying.xl_flags(), "-----d");
    }

    #[test]
    fn qemu_states_map() {
        assert_eq!(RunState::from_qemu("running", true), RunState::Running);
        assert_eq!(RunState::from_qemu("running", false), RunState::Blocked);
        assert_eq!(RunState::from_qemu("paused", false), RunState::Paused);
        assert_eq!(RunState::from_qemu("inmigrate", false), RunState::Paused);
        assert_eq!(RunState::from_qemu("shutdown", false), RunState::Shutdown);
        assert_eq!(
            RunState::from_qemu("guest-panicked", false),
            RunState::Crashed
        );
    }
}
