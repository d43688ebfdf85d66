//! Who may use the agent's API socket.
//!
//! The API is root-equivalent: a VM config names host files, and the
//! agent runs QEMU as root. So the socket is private to the agent's user
//! (mode 0600 in a 0700 directory), or with `--api-group GROUP` open to
//! that group (0660 in a 0750 directory), and every connection is checked
//! once more with `SO_PEERCRED` before a request is read: root, the
//! agent's own user, or a member of the API group; anyone else is
//! closed at once and logged.

use std::path::Path;

/// The callers [`CheckedListener`] lets in.
#[derive(Debug, Clone, Copy)]
pub struct Allowed {
    /// The agent's own uid.
    pub uid: u32,
    /// The API group's gid, if one was given.
    pub gid: Option<u32>,
}

impl Allowed {
    /// Whether a peer with these credentials may use the API: `groups`
    /// are its supplementary groups, as the kernel recorded them when it
    /// connected (`SO_PEERGROUPS`).
    pub fn admits(&self, uid: u32, gid: u32, groups: &[u32]) -> bool {
        if uid == 0 || uid == self.uid {
            return true;
        }
        let Some(g) = self.gid else { return false };
        gid == g || groups.contains(&g)
    }
}

/// The supplementary groups of the process at the other end of `fd`, as
/// they were when it connected (`SO_PEERGROUPS`, Linux 4.13): not looked
/// up by pid, which could by then name another process.
fn peer_groups(fd: std::os::fd::RawFd) -> Vec<u32> {
    // NGROUPS_MAX is 65536; start small, grow once to what the kernel asks.
    let mut groups = vec![0 as libc::gid_t; 64];
    for _ in 0..2 {
        let mut len = (groups.len() * std::mem::size_of::<libc::gid_t>()) as libc::socklen_t;
        // SAFETY: the buffer is valid for `len` bytes; the kernel writes
        // at most that and sets `len` to what it wrote or needs.
        let r = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let n = len as usize / std::mem::size_of::<libc::gid_t>();
        if r == 0 {
            groups.truncate(n);
            return groups;
        }
        if std::io::Error::last_os_error().raw_os_error() != Some(libc::ERANGE) || n > 65536 {
            break;
        }
        groups.resize(n, 0);
    }
    Vec::new()
}

/// The gid of group `name`.
pub fn group_id(name: &str) -> Result<u32, String> {
    let c = std::ffi::CString::new(name).map_err(|_| format!("group name {name:?}"))?;
    let mut grp: libc::group = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    let mut out: *mut libc::group = std::ptr::null_mut();
    // SAFETY: all pointers are valid for the call; buf outlives it.
    let r =
        unsafe { libc::getgrnam_r(c.as_ptr(), &mut grp, buf.as_mut_ptr(), buf.len(), &mut out) };
    if r != 0 || out.is_null() {
        return Err(format!("no group named '{name}' on this host"));
    }
    Ok(grp.gr_gid)
}

/// Sets the socket's group and mode for `allowed`, and its directory's
/// when `own_dir` (a directory the agent owns; never one it was merely
/// pointed into, such as /tmp).
pub fn set_socket_access(socket: &Path, allowed: &Allowed, own_dir: bool) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let dir = socket.parent().filter(|_| own_dir);
    let (sock_mode, dir_mode) = match allowed.gid {
        Some(g) => {
            std::os::unix::fs::chown(socket, None, Some(g))?;
            if let Some(dir) = dir {
                std::os::unix::fs::chown(dir, None, Some(g))?;
            }
            (0o660, 0o750)
        }
        None => (0o600, 0o700),
    };
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(sock_mode))?;
    if let Some(dir) = dir {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(dir_mode))?;
    }
    Ok(())
}

/// A unix listener that hands axum only connections from allowed peers.
pub struct CheckedListener {
    pub inner: tokio::net::UnixListener,
    pub allowed: Allowed,
    /// Refused connections, logged at most once per 10 s.
    pub refusals: RateLimited,
    /// Where refusals are counted.
    pub observer: std::sync::Arc<crate::observe::Observer>,
}

/// Logs one line per period at most, counting what it held back.
#[derive(Default)]
pub struct RateLimited {
    last: Option<std::time::Instant>,
    held: u64,
}

impl RateLimited {
    const EVERY: std::time::Duration = std::time::Duration::from_secs(10);

    /// Calls `log` with the number held back since the last line, or
    /// counts this one if a line went out less than a period ago.
    pub fn note(&mut self, log: impl FnOnce(u64)) {
        if self.last.is_none_or(|t| t.elapsed() >= Self::EVERY) {
            log(self.held);
            self.held = 0;
            self.last = Some(std::time::Instant::now());
        } else {
            self.held += 1;
        }
    }
}

impl axum::serve::Listener for CheckedListener {
    type Io = tokio::net::UnixStream;
    type Addr = tokio::net::unix::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.inner.accept().await {
                Ok((stream, addr)) => {
                    use std::os::fd::AsRawFd;
                    let groups = peer_groups(stream.as_raw_fd());
                    match stream.peer_cred() {
                        Ok(c) if self.allowed.admits(c.uid(), c.gid(), &groups) => {
                            return (stream, addr);
                        }
                        Ok(c) => {
                            self.observer.metrics.refused(crate::metrics::Refusal::Api);
                            let (uid, gid, pid) = (c.uid(), c.gid(), c.pid());
                            self.refusals.note(|n| {
                                tracing::warn!(uid, gid, pid = ?pid, refused_since_last_report = n, "API connection refused: not root, the agent's user or the API group");
                            });
                        }
                        Err(e) => {
                            self.observer.metrics.refused(crate::metrics::Refusal::Api);
                            self.refusals.note(|n| {
                                tracing::warn!(error = %e, refused_since_last_report = n, "API connection without credentials refused")
                            })
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "API accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn who_is_admitted() {
        let a = Allowed { uid: 0, gid: None };
        assert!(a.admits(0, 0, &[]));
        assert!(!a.admits(1000, 1000, &[]));
        let a = Allowed {
            uid: 0,
            gid: Some(4242),
        };
        assert!(a.admits(1000, 4242, &[]), "primary group");
        assert!(a.admits(1000, 1000, &[27, 4242]), "supplementary group");
        assert!(!a.admits(1000, 1000, &[27]));
        let a = Allowed {
            uid: 1000,
            gid: None,
        };
        assert!(a.admits(1000, 1000, &[]), "the agent's own user");
    }
}
