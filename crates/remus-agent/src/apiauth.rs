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
    /// Whether a peer with these credentials may use the API. Members of
    /// the group by a supplementary group are found in the peer's
    /// `/proc/PID/status`.
    pub fn admits(&self, uid: u32, gid: u32, pid: Option<i32>) -> bool {
        if uid == 0 || uid == self.uid {
            return true;
        }
        let Some(g) = self.gid else { return false };
        gid == g || pid.is_some_and(|p| supplementary_groups(p).contains(&g))
    }
}

fn supplementary_groups(pid: i32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("Groups:")).map(|g| {
                g.split_whitespace()
                    .filter_map(|x| x.parse().ok())
                    .collect()
            })
        })
        .unwrap_or_default()
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

/// Sets the socket's and its directory's group and modes for `allowed`.
pub fn set_socket_access(socket: &Path, allowed: &Allowed) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let (sock_mode, dir_mode) = match allowed.gid {
        Some(g) => {
            std::os::unix::fs::chown(socket, None, Some(g))?;
            if let Some(dir) = socket.parent() {
                std::os::unix::fs::chown(dir, None, Some(g))?;
            }
            (0o660, 0o750)
        }
        None => (0o600, 0o700),
    };
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(sock_mode))?;
    if let Some(dir) = socket.parent() {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(dir_mode))?;
    }
    Ok(())
}

/// A unix listener that hands axum only connections from allowed peers.
pub struct CheckedListener {
    pub inner: tokio::net::UnixListener,
    pub allowed: Allowed,
}

impl axum::serve::Listener for CheckedListener {
    type Io = tokio::net::UnixStream;
    type Addr = tokio::net::unix::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.inner.accept().await {
                Ok((stream, addr)) => match stream.peer_cred() {
                    Ok(c) if self.allowed.admits(c.uid(), c.gid(), c.pid()) => {
                        return (stream, addr);
                    }
                    Ok(c) => {
                        tracing::warn!(uid = c.uid(), gid = c.gid(), pid = ?c.pid(), "API connection refused: not root, the agent's user or the API group");
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "API connection without credentials refused")
                    }
                },
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
        assert!(a.admits(0, 0, None));
        assert!(!a.admits(1000, 1000, None));
        let a = Allowed {
            uid: 0,
            gid: Some(4242),
        };
        assert!(a.admits(1000, 4242, None), "primary group");
        assert!(!a.admits(1000, 1000, None));
        let a = Allowed {
            uid: 1000,
            gid: None,
        };
        assert!(a.admits(1000, 1000, None), "the agent's own user");
    }
}
