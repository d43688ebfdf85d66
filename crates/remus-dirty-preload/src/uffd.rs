//! Turning on userfaultfd async write-protect ("WP async") over a range.
//!
//! Job: given a shared file mapping in *this* process, create a userfaultfd,
//! negotiate the WP-async features, register the range in write-protect mode
//! and protect all of it. From then on the kernel resolves each first write
//! to a protected page by itself (no thread, no messages) and records it, so
//! that another process can collect and re-protect the written pages with
//! `PAGEMAP_SCAN` (see the `remus-dirty` crate).
//!
//! Boundaries: only libc, no heap allocation, no panics; this file is shared
//! with `remus-dirty`'s unit tests (included by path) so that the tests
//! exercise the very code that runs inside QEMU.
//!
//! Constants and struct layouts follow the kernel's
//! `include/uapi/linux/userfaultfd.h`; Debian 12's headers predate WP async.

use core::ffi::{c_int, c_ulong, c_void};

/// `UFFD_API`: the only API version there is.
const UFFD_API: u64 = 0xAA;
/// `UFFD_USER_MODE_ONLY`: handle user-mode faults only; what an unprivileged
/// process may still ask for when `vm.unprivileged_userfaultfd = 0`.
const UFFD_USER_MODE_ONLY: c_int = 1;

/// Write-protect faults on shmem/hugetlbfs (our RAM file lives on tmpfs).
pub const UFFD_FEATURE_WP_HUGETLBFS_SHMEM: u64 = 1 << 12;
/// Protecting pages that are not populated yet (guest RAM mostly is not).
pub const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
/// The kernel resolves WP faults itself and marks the page written.
pub const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;
/// Everything the tracker needs; `UFFDIO_API` fails if one is missing.
pub const WP_ASYNC_FEATURES: u64 =
    UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED | UFFD_FEATURE_WP_HUGETLBFS_SHMEM;

const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;

/// `_IOWR(type, nr, size)` from `asm-generic/ioctl.h`.
const fn iowr(ty: u8, nr: u8, size: usize) -> c_ulong {
    const READ_WRITE: c_ulong = 3;
    (READ_WRITE << 30) | ((size as c_ulong) << 16) | ((ty as c_ulong) << 8) | nr as c_ulong
}

const UFFDIO: u8 = 0xAA;
const UFFDIO_API: c_ulong = iowr(UFFDIO, 0x3F, size_of::<UffdioApi>());
const UFFDIO_REGISTER: c_ulong = iowr(UFFDIO, 0x00, size_of::<UffdioRegister>());
const UFFDIO_WRITEPROTECT: c_ulong = iowr(UFFDIO, 0x06, size_of::<UffdioWriteprotect>());

#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioWriteprotect {
    range: UffdioRange,
    mode: u64,
}

/// Why tracking could not be turned on: the step that failed and its errno.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WpAsyncFailure {
    pub step: &'static str,
    pub errno: c_int,
}

fn errno() -> c_int {
    // SAFETY: `__errno_location` always returns this thread's errno slot.
    unsafe { *libc::__errno_location() }
}

fn failure(step: &'static str) -> WpAsyncFailure {
    WpAsyncFailure {
        step,
        errno: errno(),
    }
}

/// Creates a userfaultfd, first with full rights and, when that is refused
/// (unprivileged process), again in user-mode-only mode. Kernel-side writes
/// into the range (e.g. `read()` into guest RAM) still fault in that mode.
fn create_userfaultfd() -> Result<c_int, WpAsyncFailure> {
    let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
    // SAFETY: plain syscall without pointer arguments.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
    if fd >= 0 {
        return Ok(fd as c_int);
    }
    if errno() != libc::EPERM {
        return Err(failure("userfaultfd"));
    }
    // SAFETY: as above.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags | UFFD_USER_MODE_ONLY) };
    if fd >= 0 {
        Ok(fd as c_int)
    } else {
        Err(failure("userfaultfd(UFFD_USER_MODE_ONLY)"))
    }
}

/// Turns on async write-protect tracking over `[addr, addr + len)` and
/// returns the userfaultfd, which must stay open for as long as tracking is
/// wanted (closing it ends tracking; the scanner then reports an error).
///
/// `len` is rounded up to whole pages, as the mapping itself is.
///
/// # Safety
/// `[addr, addr + len)` must lie within mappings of this process; tracking
/// is meant for (and tested on) a shared mapping of a tmpfs file.
pub unsafe fn enable_wp_async(addr: *mut c_void, len: usize) -> Result<c_int, WpAsyncFailure> {
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    let page = if page > 0 { page as u64 } else { 4096 };
    let range = || UffdioRange {
        start: addr as u64,
        len: (len as u64).div_ceil(page) * page,
    };

    let fd = create_userfaultfd()?;
    let close_on_error = |step| {
        let err = failure(step);
        // SAFETY: `fd` is ours and not shared with anyone yet.
        unsafe { libc::close(fd) };
        Err(err)
    };

    let mut api = UffdioApi {
        api: UFFD_API,
        features: WP_ASYNC_FEATURES,
        ioctls: 0,
    };
    // SAFETY: `api` is a valid `struct uffdio_api` for the kernel to update.
    if unsafe { libc::ioctl(fd, UFFDIO_API, &mut api) } != 0 {
        return close_on_error(
            "UFFDIO_API (kernel lacks WP_ASYNC/WP_UNPOPULATED/WP_HUGETLBFS_SHMEM?)",
        );
    }

    let mut register = UffdioRegister {
        range: range(),
        mode: UFFDIO_REGISTER_MODE_WP,
        ioctls: 0,
    };
    // SAFETY: valid `struct uffdio_register`; the range is the caller's mapping.
    if unsafe { libc::ioctl(fd, UFFDIO_REGISTER, &mut register) } != 0 {
        return close_on_error("UFFDIO_REGISTER (mode WP)");
    }

    let mut protect = UffdioWriteprotect {
        range: range(),
        mode: UFFDIO_WRITEPROTECT_MODE_WP,
    };
    // SAFETY: valid `struct uffdio_writeprotect` over the registered range.
    if unsafe { libc::ioctl(fd, UFFDIO_WRITEPROTECT, &mut protect) } != 0 {
        return close_on_error("UFFDIO_WRITEPROTECT");
    }
    Ok(fd)
}

#[cfg(test)]
mod layout_tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_kernel_headers() {
        assert_eq!(UFFDIO_API, 0xC018_AA3F);
        assert_eq!(UFFDIO_REGISTER, 0xC020_AA00);
        assert_eq!(UFFDIO_WRITEPROTECT, 0xC018_AA06);
    }
}
