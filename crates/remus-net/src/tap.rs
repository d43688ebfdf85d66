//! Linux tap devices, attached to a bridge.
//!
//! The ioctls are written by hand with `libc`: no maintained crate covers
//! `TUNSETIFF` plus `SIOCBRADDIF` without pulling in a netlink stack, and
//! the whole job is four small ioctls on an `ifreq`.
//!
//! The tap is created *non-persistent* (`TUNSETPERSIST` is never issued):
//! the kernel deletes the device, and detaches it from its bridge, when the
//! last file descriptor for it is closed, i.e. when the [`Tap`] is dropped
//! (or the process dies). If a *persistent* tap of the requested name
//! already exists (made by `ip tuntap add`), `TUNSETIFF` attaches to it
//! instead and it outlives us; that is the administrator's choice.
//!
//! The device is opened with `IFF_TAP | IFF_NO_PI` and without
//! `IFF_VNET_HDR`: each `read`/`write` is exactly one Ethernet frame, which
//! is what QEMU's stream netdev carries. The fd is non-blocking.
//!
//! Everything here acts on the network namespace of the *calling thread*.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use thiserror::Error;

/// `linux/sockios.h`: add an interface to a bridge (not exported by libc
/// for Linux targets).
const SIOCBRADDIF: libc::c_ulong = 0x89a2;

/// Longest interface name the kernel accepts (`IFNAMSIZ` - 1 for the NUL).
pub const MAX_IFNAME_LEN: usize = libc::IFNAMSIZ - 1;

/// Errors creating or wiring up a tap device.
#[derive(Debug, Error)]
pub enum TapError {
    /// Interface name longer than [`MAX_IFNAME_LEN`] bytes.
    #[error("interface name '{name}' is too long ({len} bytes, at most 15)")]
    NameTooLong {
        /// The name as given.
        name: String,
        /// Its length in bytes.
        len: usize,
    },
    /// Interface name the kernel would refuse.
    #[error("invalid interface name '{name}': {reason}")]
    InvalidName {
        /// The name as given.
        name: String,
        /// Why it is invalid.
        reason: &'static str,
    },
    /// The bridge named in the VM config does not exist (in this netns).
    #[error("bridge '{0}' does not exist")]
    NoSuchBridge(String),
    /// The named device exists but is not a Linux bridge.
    #[error("'{0}' is not a bridge")]
    NotABridge(String),
    /// Missing CAP_NET_ADMIN (or no access to /dev/net/tun).
    #[error("permission denied: {op} (needs root or CAP_NET_ADMIN)")]
    PermissionDenied {
        /// What was being attempted.
        op: &'static str,
    },
    /// /dev/net/tun missing (tun module not loaded, or not in a container).
    #[error("/dev/net/tun is not available: {0}")]
    TunUnavailable(#[source] io::Error),
    /// An interface with that name exists and cannot be opened as our tap.
    #[error("interface '{0}' already exists and is not a free tap device")]
    NameInUse(String),
    /// Any other failure.
    #[error("{op}: {source}")]
    Io {
        /// What was being attempted.
        op: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// Checks an interface name the way the kernel's `dev_valid_name` does.
///
/// `%d` is allowed: the kernel then picks the number (e.g. `vif%d`).
pub fn validate_ifname(name: &str) -> Result<(), TapError> {
    let invalid = |reason| TapError::InvalidName {
        name: name.to_owned(),
        reason,
    };
    if name.is_empty() {
        return Err(invalid("empty"));
    }
    if name.len() > MAX_IFNAME_LEN {
        return Err(TapError::NameTooLong {
            name: name.to_owned(),
            len: name.len(),
        });
    }
    if name == "." || name == ".." {
        return Err(invalid("'.' and '..' are reserved"));
    }
    if name
        .bytes()
        .any(|b| b == b'/' || b == b':' || b == 0 || b.is_ascii_whitespace())
    {
        return Err(invalid("contains '/', ':', NUL or whitespace"));
    }
    Ok(())
}

fn ifreq_for(name: &str) -> Result<libc::ifreq, TapError> {
    validate_ifname(name)?;
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    Ok(ifr)
}

fn ifreq_name(ifr: &libc::ifreq) -> String {
    // The kernel always NUL-terminates ifr_name; be defensive anyway.
    let bytes: Vec<u8> = ifr
        .ifr_name
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

fn os_err(op: &'static str) -> TapError {
    let source = io::Error::last_os_error();
    match source.raw_os_error() {
        Some(libc::EPERM | libc::EACCES) => TapError::PermissionDenied { op },
        _ => TapError::Io { op, source },
    }
}

/// A throw-away socket to issue interface ioctls on. Created in the calling
/// thread's network namespace.
fn ctl_socket() -> Result<OwnedFd, TapError> {
    // SAFETY: plain socket(2) call.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(os_err("socket(AF_UNIX) for interface ioctls"));
    }
    // SAFETY: fd is a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Issues `req` on `fd` with `ifr`; returns the raw errno on failure.
fn ioctl_ifreq(fd: RawFd, req: libc::c_ulong, ifr: &mut libc::ifreq) -> Result<(), io::Error> {
    // SAFETY: every request used here takes a `struct ifreq *`, and `ifr`
    // is a valid, exclusively borrowed ifreq for the duration of the call.
    let rc = unsafe { libc::ioctl(fd, req as libc::Ioctl, ifr as *mut libc::ifreq) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Interface index of `name` in the calling thread's netns, or `None` if no
/// such interface exists.
pub fn ifindex(name: &str) -> Result<Option<u32>, TapError> {
    let mut ifr = ifreq_for(name)?;
    let sock = ctl_socket()?;
    match ioctl_ifreq(sock.as_raw_fd(), libc::SIOCGIFINDEX, &mut ifr) {
        Ok(()) => {
            // SAFETY: SIOCGIFINDEX filled the ifindex member of the union.
            let idx = unsafe { ifr.ifr_ifru.ifru_ifindex };
            Ok(Some(idx as u32))
        }
        Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Ok(None),
        Err(source) => Err(TapError::Io {
            op: "SIOCGIFINDEX",
            source,
        }),
    }
}

/// An open, non-persistent tap device. Dropping it deletes the device.
#[derive(Debug)]
pub struct Tap {
    fd: OwnedFd,
    name: String,
}

impl Tap {
    /// Creates a tap named `name`, or a kernel-chosen `tapN` when `None`.
    ///
    /// The device is left down and unattached; see [`attach_to_bridge`]
    /// and [`set_up`], or use [`create_on_bridge`].
    ///
    /// [`attach_to_bridge`]: Self::attach_to_bridge
    /// [`set_up`]: Self::set_up
    /// [`create_on_bridge`]: Self::create_on_bridge
    pub fn create(name: Option<&str>) -> Result<Tap, TapError> {
        let mut ifr = ifreq_for(name.unwrap_or("tap%d"))?;
        let path = c"/dev/net/tun";
        // SAFETY: open(2) with a valid NUL-terminated path.
        let fd = unsafe {
            libc::open(
                path.as_ptr(),
                libc::O_RDWR | libc::O_CLOEXEC | libc::O_NONBLOCK,
            )
        };
        if fd < 0 {
            let e = io::Error::last_os_error();
            return Err(match e.raw_os_error() {
                Some(libc::EPERM | libc::EACCES) => TapError::PermissionDenied {
                    op: "open /dev/net/tun",
                },
                _ => TapError::TunUnavailable(e),
            });
        }
        // SAFETY: fd is a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };

        // No IFF_VNET_HDR: frames are bare Ethernet, as on QEMU's stream.
        ifr.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
        if let Err(source) = ioctl_ifreq(fd.as_raw_fd(), libc::TUNSETIFF as libc::c_ulong, &mut ifr)
        {
            let requested = name.unwrap_or("tap%d").to_owned();
            return Err(match source.raw_os_error() {
                Some(libc::EPERM | libc::EACCES) => TapError::PermissionDenied { op: "TUNSETIFF" },
                // EBUSY: a tap of that name is open elsewhere; EINVAL: the
                // name belongs to a device of another kind.
                Some(libc::EBUSY | libc::EINVAL) => TapError::NameInUse(requested),
                _ => TapError::Io {
                    op: "TUNSETIFF",
                    source,
                },
            });
        }
        let name = ifreq_name(&ifr);
        tracing::debug!(tap = %name, "created tap device");
        Ok(Tap { fd, name })
    }

    /// Creates a tap (as [`create`](Self::create)), attaches it to
    /// `bridge` and brings it up. The bridge is checked first, so a missing
    /// bridge is reported before any device is made.
    pub fn create_on_bridge(name: Option<&str>, bridge: &str) -> Result<Tap, TapError> {
        if ifindex(bridge)?.is_none() {
            return Err(TapError::NoSuchBridge(bridge.to_owned()));
        }
        let tap = Tap::create(name)?;
        tap.attach_to_bridge(bridge)?;
        tap.set_up()?;
        Ok(tap)
    }

    /// The device name the kernel gave the tap.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The tap's interface index.
    pub fn ifindex(&self) -> Result<u32, TapError> {
        ifindex(&self.name)?.ok_or_else(|| TapError::Io {
            op: "SIOCGIFINDEX on own tap",
            source: io::Error::from_raw_os_error(libc::ENODEV),
        })
    }

    /// Adds the tap to `bridge` (`SIOCBRADDIF`, like `brctl addif`).
    pub fn attach_to_bridge(&self, bridge: &str) -> Result<(), TapError> {
        let tap_index = self.ifindex()?;
        if ifindex(bridge)?.is_none() {
            return Err(TapError::NoSuchBridge(bridge.to_owned()));
        }
        let mut ifr = ifreq_for(bridge)?;
        ifr.ifr_ifru.ifru_ifindex = tap_index as libc::c_int;
        let sock = ctl_socket()?;
        ioctl_ifreq(sock.as_raw_fd(), SIOCBRADDIF, &mut ifr).map_err(|source| {
            match source.raw_os_error() {
                Some(libc::ENODEV) => TapError::NoSuchBridge(bridge.to_owned()),
                // dev_ioctl: `if (!netif_is_bridge_master(dev)) return -EOPNOTSUPP`
                Some(libc::EOPNOTSUPP) => TapError::NotABridge(bridge.to_owned()),
                Some(libc::EPERM | libc::EACCES) => {
                    TapError::PermissionDenied { op: "SIOCBRADDIF" }
                }
                _ => TapError::Io {
                    op: "SIOCBRADDIF",
                    source,
                },
            }
        })?;
        tracing::debug!(tap = %self.name, %bridge, "attached tap to bridge");
        Ok(())
    }

    /// Sets `IFF_UP` on the tap.
    pub fn set_up(&self) -> Result<(), TapError> {
        let sock = ctl_socket()?;
        let mut ifr = ifreq_for(&self.name)?;
        ioctl_ifreq(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut ifr).map_err(|source| {
            TapError::Io {
                op: "SIOCGIFFLAGS",
                source,
            }
        })?;
        // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
        let flags = unsafe { ifr.ifr_ifru.ifru_flags };
        ifr.ifr_ifru.ifru_flags = flags | libc::IFF_UP as libc::c_short;
        ioctl_ifreq(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &mut ifr).map_err(|source| {
            match source.raw_os_error() {
                Some(libc::EPERM | libc::EACCES) => {
                    TapError::PermissionDenied { op: "SIOCSIFFLAGS" }
                }
                _ => TapError::Io {
                    op: "SIOCSIFFLAGS",
                    source,
                },
            }
        })
    }

    /// Reads one frame into `buf` (non-blocking: `WouldBlock` when none is
    /// queued). A frame longer than `buf` is truncated by the kernel.
    pub fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: buf is valid for writes of buf.len() bytes.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    /// Writes one frame. The kernel takes the whole frame or fails.
    pub fn write_frame(&self, frame: &[u8]) -> io::Result<()> {
        loop {
            // SAFETY: frame is valid for reads of frame.len() bytes.
            let n = unsafe { libc::write(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len()) };
            if n >= 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

impl AsFd for Tap {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        tracing::debug!(tap = %self.name, "closing tap (device is removed by the kernel)");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn name_validation() {
        assert!(validate_ifname("vif1.0").is_ok());
        assert!(validate_ifname("tap%d").is_ok());
        assert!(validate_ifname("abcdefghijklmno").is_ok()); // 15 bytes
        let e = validate_ifname("abcdefghijklmnop").unwrap_err();
        assert!(matches!(e, TapError::NameTooLong { len: 16, .. }));
        assert_eq!(
            e.to_string(),
            "interface name 'abcdefghijklmnop' is too long (16 bytes, at most 15)"
        );
        for bad in ["", ".", "..", "a/b", "a:b", "a b", "a\0b"] {
            assert!(
                matches!(validate_ifname(bad), Err(TapError::InvalidName { .. })),
                "{bad:?}"
            );
        }
        assert!(matches!(
            Tap::create(Some("a-very-long-tap-name")),
            Err(TapError::NameTooLong { .. })
        ));
    }

    #[test]
    fn error_messages() {
        assert_eq!(
            TapError::NoSuchBridge("br-x".into()).to_string(),
            "bridge 'br-x' does not exist"
        );
        assert_eq!(
            TapError::NotABridge("lo".into()).to_string(),
            "'lo' is not a bridge"
        );
    }
}
