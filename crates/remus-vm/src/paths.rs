//! Where a VM's files live: one directory per VM under the agent's state
//! directory.

use std::path::{Path, PathBuf};

/// Longest unix socket path (`sun_path` is 108 bytes including the NUL).
pub const MAX_SOCKET_PATH: usize = 107;

/// The files of one VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmPaths {
    dir: PathBuf,
}

impl VmPaths {
    pub fn new(dir: &Path) -> VmPaths {
        VmPaths {
            dir: dir.to_path_buf(),
        }
    }
    pub fn dir(&self) -> &Path {
        &self.dir
    }
    pub fn config(&self) -> PathBuf {
        self.dir.join("config.json")
    }
    pub fn qmp_socket(&self) -> PathBuf {
        self.dir.join("qmp.sock")
    }
    pub fn console_socket(&self) -> PathBuf {
        self.dir.join("console.sock")
    }
    /// Where console clients connect (the hub bridges them to QEMU).
    pub fn console_attach_socket(&self) -> PathBuf {
        self.dir.join("console-attach.sock")
    }
    pub fn console_log(&self) -> PathBuf {
        self.dir.join("console.log")
    }
    pub fn qemu_log(&self) -> PathBuf {
        self.dir.join("qemu.log")
    }
    pub fn pid_file(&self) -> PathBuf {
        self.dir.join("qemu.pid")
    }
    /// Present while the operator holds the guest paused (for the next
    /// agent, which cannot tell an operator's pause from QEMU alone).
    pub fn paused_marker(&self) -> PathBuf {
        self.dir.join("held-paused")
    }
    /// Present while the arbiter's fence holds the guest paused: a VM
    /// found fenced is never adopted (see the agent).
    pub fn fenced_marker(&self) -> PathBuf {
        self.dir.join("held-fenced")
    }
    pub fn disk_socket(&self, target: &str) -> PathBuf {
        self.dir.join(format!("disk-{target}.sock"))
    }
    /// Where a standby's QEMU listens for the device state it resumes
    /// from (`migrate-incoming`, see `devstate::listen`).
    pub fn incoming_socket(&self) -> PathBuf {
        self.dir.join("incoming.sock")
    }
    pub fn vif_socket(&self, index: usize) -> PathBuf {
        self.dir.join(format!("vif{index}.sock"))
    }

    /// Checks that the longest socket path fits in `sun_path`.
    pub fn check_socket_len(&self) -> Result<(), String> {
        let n = [self.disk_socket("vdz"), self.incoming_socket()]
            .iter()
            .map(|p| p.as_os_str().len())
            .max()
            .unwrap_or(0);
        if n > MAX_SOCKET_PATH {
            return Err(format!(
                "VM directory {} is too deep: socket paths would be {n} bytes, unix sockets allow {MAX_SOCKET_PATH}; use a shorter --state-dir",
                self.dir.display()
            ));
        }
        Ok(())
    }
}
