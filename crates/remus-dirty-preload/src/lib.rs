//! `libremus_dirty_preload.so`: the QEMU-side half of remus dirty-page
//! tracking (DESIGN.md §3.2), loaded into a stock QEMU with `LD_PRELOAD`.
//!
//! Job: when QEMU maps the guest RAM file named by `REMUS_DIRTY_TRACK_PATH`
//! with `MAP_SHARED`, turn on userfaultfd async write-protect over that
//! mapping and keep the userfaultfd open for the life of the process. The
//! agent then collects written pages from outside with `PAGEMAP_SCAN`
//! (crate `remus-dirty`), which also re-protects them.
//!
//! Boundaries:
//! - The shim never decides whether tracking is good enough. On failure it
//!   writes one line to stderr (the agent captures QEMU's stderr) and lets
//!   QEMU run untracked; the agent checks tracking with `PAGE_IS_WPALLOWED`
//!   and refuses to protect a VM whose tracking is off.
//! - Hooks run inside QEMU's threads, possibly early in start-up: no heap
//!   allocation, no locks, no panics. Unwinding cannot escape into QEMU:
//!   a panic in an `extern "C"` function aborts (Rust ≥ 1.81), which is why
//!   this crate needs no `panic = "abort"` profile.
//! - Writes that do not fault are invisible to the tracker, and so is a
//!   page the file loses while its PTE is write-protected (the kernel keeps
//!   the write-protect marker, so the page never looks written). Hence
//!   `fallocate(PUNCH_HOLE)` of the RAM file and `madvise(MADV_REMOVE)` on
//!   a tracked mapping are hooked here, and each affected page is touched
//!   afterwards so it is reported, as zeroes (re-allocated: a balloon then
//!   frees no host memory, but the replica stays exact). Unmapping without
//!   losing contents needs no help: `MADV_DONTNEED` is tested; reclaim of
//!   guest RAM to swap empties the PTE the same way (untested).
//!   Still not covered: `pwrite()` to the RAM file, writes by other
//!   processes (vhost-user), raw syscalls that bypass libc.
//! - The RAM file belongs on tmpfs (tested) or hugetlbfs. The kernel also
//!   accepts async write-protect on a file on ext4 (seen on 6.18), but
//!   tracking there is untested.

mod uffd;

use core::ffi::{CStr, c_char, c_int, c_void};
use core::fmt::Write as _;
use core::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};

/// Environment variable naming the RAM file to track (an absolute path;
/// compared by device and inode, so symlinks are fine).
const TRACK_PATH_ENV: &CStr = c"REMUS_DIRTY_TRACK_PATH";

type MmapFn = unsafe extern "C" fn(*mut c_void, usize, c_int, c_int, c_int, i64) -> *mut c_void;
type FallocateFn = unsafe extern "C" fn(c_int, c_int, i64, i64) -> c_int;
type MadviseFn = unsafe extern "C" fn(*mut c_void, usize, c_int) -> c_int;

// Real libc entry points, looked up once with `dlsym(RTLD_NEXT)`; 0 = not yet.
static REAL_MMAP: AtomicUsize = AtomicUsize::new(0);
static REAL_MMAP64: AtomicUsize = AtomicUsize::new(0);
static REAL_FALLOCATE: AtomicUsize = AtomicUsize::new(0);
static REAL_FALLOCATE64: AtomicUsize = AtomicUsize::new(0);
static REAL_MADVISE: AtomicUsize = AtomicUsize::new(0);

/// Tracked mappings, so that a hole punch can be turned into page touches.
/// QEMU maps the RAM file once; a few slots leave room for odd set-ups.
/// A slot is published by storing `len` last (0 = free).
const MAX_MAPPINGS: usize = 8;
struct TrackedMapping {
    addr: AtomicU64,
    file_offset: AtomicU64,
    len: AtomicU64,
}
static MAPPINGS: [TrackedMapping; MAX_MAPPINGS] = [const {
    TrackedMapping {
        addr: AtomicU64::new(0),
        file_offset: AtomicU64::new(0),
        len: AtomicU64::new(0),
    }
}; MAX_MAPPINGS];
static NEXT_MAPPING: AtomicUsize = AtomicUsize::new(0);

/// Looks up (once) the next definition of `name` after this library.
///
/// # Safety
/// `F` must be the function pointer type of the symbol `name`.
unsafe fn next_symbol<F: Copy>(slot: &AtomicUsize, name: &CStr) -> Option<F> {
    let mut ptr = slot.load(Ordering::Relaxed);
    if ptr == 0 {
        // SAFETY: `name` is NUL-terminated; RTLD_NEXT is valid in a shared object.
        ptr = unsafe { libc::dlsym(libc::RTLD_NEXT, name.as_ptr()) } as usize;
        if ptr == 0 {
            return None;
        }
        slot.store(ptr, Ordering::Relaxed);
    }
    // SAFETY: the caller vouches that `F` is this symbol's type; `F` is a
    // function pointer, the same size as `usize`.
    Some(unsafe { core::mem::transmute_copy::<usize, F>(&ptr) })
}

/// A line for stderr, built on the stack; overlong text is cut, not grown.
struct Line {
    buf: [u8; 512],
    len: usize,
}

impl Line {
    fn new() -> Self {
        Line {
            buf: [0; 512],
            len: 0,
        }
    }

    fn emit(mut self) {
        if self.len == self.buf.len() {
            self.len -= 1;
        }
        self.buf[self.len] = b'\n';
        // SAFETY: writing our own initialised buffer to fd 2.
        unsafe { libc::write(2, self.buf.as_ptr().cast(), self.len + 1) };
    }
}

impl core::fmt::Write for Line {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        let room = self.buf.len() - self.len;
        let n = s.len().min(room);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

/// Saves errno across our bookkeeping: callers of `mmap` may look at it.
struct ErrnoGuard(c_int);

impl ErrnoGuard {
    fn save() -> Self {
        // SAFETY: this thread's errno slot.
        ErrnoGuard(unsafe { *libc::__errno_location() })
    }
}

impl Drop for ErrnoGuard {
    fn drop(&mut self) {
        // SAFETY: this thread's errno slot.
        unsafe { *libc::__errno_location() = self.0 };
    }
}

/// The tracked path from the environment, if set and not empty.
fn tracked_path() -> Option<&'static CStr> {
    // SAFETY: getenv returns NULL or a NUL-terminated string that lives as
    // long as the environment entry; QEMU does not modify its environment.
    let ptr = unsafe { libc::getenv(TRACK_PATH_ENV.as_ptr()) };
    if ptr.is_null() {
        return None;
    }
    // SAFETY: non-null, NUL-terminated (see above).
    let path = unsafe { CStr::from_ptr(ptr as *const c_char) };
    (!path.is_empty()).then_some(path)
}

enum FdMatch {
    Tracked,
    Other,
    /// The tracked path cannot be stat'ed: worth a line in the log.
    PathError(c_int),
}

/// Does `fd` refer to the tracked file? Compares device and inode, which
/// needs no path buffers and sees through symlinks.
fn fd_is_tracked_file(fd: c_int, path: &CStr) -> FdMatch {
    // SAFETY: zeroed `stat` is a valid out-buffer.
    let mut of_fd: libc::stat = unsafe { core::mem::zeroed() };
    // SAFETY: valid out-pointer; a bad fd just fails.
    if unsafe { libc::fstat(fd, &mut of_fd) } != 0 || of_fd.st_mode & libc::S_IFMT != libc::S_IFREG
    {
        return FdMatch::Other;
    }
    // SAFETY: as above.
    let mut of_path: libc::stat = unsafe { core::mem::zeroed() };
    // SAFETY: `path` is NUL-terminated; valid out-pointer.
    if unsafe { libc::stat(path.as_ptr(), &mut of_path) } != 0 {
        return FdMatch::PathError(ErrnoGuard::save().0);
    }
    if of_fd.st_dev == of_path.st_dev && of_fd.st_ino == of_path.st_ino {
        FdMatch::Tracked
    } else {
        FdMatch::Other
    }
}

fn path_str(path: &CStr) -> &str {
    path.to_str().unwrap_or("<non-UTF-8 path>")
}

/// After `mmap`: turn on tracking if this mapped the RAM file.
fn after_mmap(addr: *mut c_void, len: usize, flags: c_int, fd: c_int, offset: i64) {
    let map_type = flags & 0x0f; // MAP_TYPE
    if addr == libc::MAP_FAILED
        || fd < 0
        || (map_type != libc::MAP_SHARED && map_type != libc::MAP_SHARED_VALIDATE)
    {
        return;
    }
    let _errno = ErrnoGuard::save();
    let Some(path) = tracked_path() else { return };
    match fd_is_tracked_file(fd, path) {
        FdMatch::Other => return,
        FdMatch::PathError(errno) => {
            let mut line = Line::new();
            let _ = write!(
                line,
                "remus-dirty-preload: cannot stat {}={} (errno {errno}); dirty tracking is OFF",
                path_str(TRACK_PATH_ENV),
                path_str(path)
            );
            line.emit();
            return;
        }
        FdMatch::Tracked => {}
    }

    let mut line = Line::new();
    // SAFETY: `[addr, addr + len)` was just mapped by this process.
    match unsafe { uffd::enable_wp_async(addr, len) } {
        Ok(uffd_fd) => {
            // The userfaultfd is leaked on purpose: tracking lasts as long
            // as it stays open, i.e. as long as QEMU runs.
            remember_mapping(addr as u64, offset as u64, len as u64);
            let _ = write!(
                line,
                "remus-dirty-preload: tracking writes to {} at {:#x}+{:#x} (userfaultfd {uffd_fd})",
                path_str(path),
                addr as u64,
                len
            );
        }
        Err(e) => {
            let _ = write!(
                line,
                "remus-dirty-preload: cannot track writes to {}: {} failed (errno {}); dirty tracking is OFF",
                path_str(path),
                e.step,
                e.errno
            );
        }
    }
    line.emit();
}

fn remember_mapping(addr: u64, file_offset: u64, len: u64) {
    let slot = NEXT_MAPPING.fetch_add(1, Ordering::Relaxed);
    let Some(m) = MAPPINGS.get(slot) else {
        let mut line = Line::new();
        let _ = write!(
            line,
            "remus-dirty-preload: more than {MAX_MAPPINGS} tracked mappings; hole punches at {addr:#x} will not be tracked"
        );
        line.emit();
        return;
    };
    m.addr.store(addr, Ordering::Relaxed);
    m.file_offset.store(file_offset, Ordering::Relaxed);
    m.len.store(len, Ordering::Release);
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
        p if p > 0 => p as u64,
        _ => 4096,
    }
}

/// Writes to every page of `[start, end)` (addresses inside a tracked
/// mapping) so that the write-protect fault marks it written. An atomic OR
/// of 0 changes no data, even if a vCPU writes the same byte meanwhile.
fn touch_pages(start: u64, end: u64) {
    let page = page_size();
    let mut addr = start / page * page;
    while addr < end {
        // SAFETY: `addr` lies inside a live shared mapping of this process
        // (QEMU does not unmap guest RAM while it runs).
        unsafe { AtomicU8::from_ptr(addr as *mut u8) }.fetch_or(0, Ordering::Relaxed);
        addr += page;
    }
}

/// Calls `visit` with each published tracked mapping and its length.
fn for_each_tracked(mut visit: impl FnMut(&TrackedMapping, u64)) {
    for m in &MAPPINGS {
        let len = m.len.load(Ordering::Acquire);
        if len != 0 {
            visit(m, len);
        }
    }
}

/// After punching `[offset, offset + len)` out of the tracked file: touch
/// every punched page through each tracked mapping so it is reported. It
/// comes back as zeroes (re-allocated: the punch frees no host memory),
/// which is exactly what the replica must hold.
fn after_punch_hole(offset: u64, len: u64) {
    let punch_end = offset.saturating_add(len);
    for_each_tracked(|m, map_len| {
        let map_addr = m.addr.load(Ordering::Relaxed);
        let map_off = m.file_offset.load(Ordering::Relaxed);
        let start = offset.max(map_off);
        let end = punch_end.min(map_off + map_len);
        if start < end {
            touch_pages(map_addr + (start - map_off), map_addr + (end - map_off));
        }
    });
}

/// After `madvise(MADV_REMOVE)` on a tracked mapping: the same as a hole
/// punch, addressed by memory instead of file offset. Other advice that
/// unmaps (`DONTNEED`, `PAGEOUT`) keeps contents and needs nothing: a
/// written page whose PTE is gone is still reported by the scan.
fn after_madvise(result: c_int, addr: *mut c_void, len: usize, advice: c_int) {
    if result != 0 || advice != libc::MADV_REMOVE || len == 0 {
        return;
    }
    let _errno = ErrnoGuard::save();
    let (start, end) = (addr as u64, (addr as u64).saturating_add(len as u64));
    for_each_tracked(|m, map_len| {
        let map_addr = m.addr.load(Ordering::Relaxed);
        let (lo, hi) = (start.max(map_addr), end.min(map_addr + map_len));
        if lo < hi {
            touch_pages(lo, hi);
        }
    });
}

/// After `fallocate`: make a successful hole punch of the RAM file visible.
fn after_fallocate(result: c_int, fd: c_int, mode: c_int, offset: i64, len: i64) {
    if result != 0 || mode & libc::FALLOC_FL_PUNCH_HOLE == 0 || offset < 0 || len <= 0 {
        return;
    }
    let _errno = ErrnoGuard::save();
    let Some(path) = tracked_path() else { return };
    if let FdMatch::Tracked = fd_is_tracked_file(fd, path) {
        after_punch_hole(offset as u64, len as u64);
    }
}

/// Fallback when `dlsym` finds no `mmap` (never seen): straight to the kernel.
unsafe extern "C" fn syscall_mmap(
    addr: *mut c_void,
    len: usize,
    prot: c_int,
    flags: c_int,
    fd: c_int,
    offset: i64,
) -> *mut c_void {
    // SAFETY: the caller's `mmap` contract, forwarded unchanged.
    unsafe { libc::syscall(libc::SYS_mmap, addr, len, prot, flags, fd, offset) as *mut c_void }
}

/// Fallback when `dlsym` finds no `fallocate`: straight to the kernel.
unsafe extern "C" fn syscall_fallocate(fd: c_int, mode: c_int, offset: i64, len: i64) -> c_int {
    // SAFETY: the caller's `fallocate` contract, forwarded unchanged.
    unsafe { libc::syscall(libc::SYS_fallocate, fd, mode, offset, len) as c_int }
}

fn real_mmap(slot: &AtomicUsize, name: &CStr) -> MmapFn {
    // SAFETY: `mmap`/`mmap64` have type `MmapFn` on 64-bit glibc.
    unsafe { next_symbol::<MmapFn>(slot, name) }.unwrap_or(syscall_mmap)
}

/// Fallback when `dlsym` finds no `madvise`: straight to the kernel.
unsafe extern "C" fn syscall_madvise(addr: *mut c_void, len: usize, advice: c_int) -> c_int {
    // SAFETY: the caller's `madvise` contract, forwarded unchanged.
    unsafe { libc::syscall(libc::SYS_madvise, addr, len, advice) as c_int }
}

fn real_madvise() -> MadviseFn {
    // SAFETY: `madvise` has type `MadviseFn`.
    unsafe { next_symbol::<MadviseFn>(&REAL_MADVISE, c"madvise") }.unwrap_or(syscall_madvise)
}

fn real_fallocate(slot: &AtomicUsize, name: &CStr) -> FallocateFn {
    // SAFETY: `fallocate`/`fallocate64` have type `FallocateFn` on 64-bit glibc.
    unsafe { next_symbol::<FallocateFn>(slot, name) }.unwrap_or(syscall_fallocate)
}

/// Interposes on `mmap64` (what QEMU imports).
///
/// # Safety
/// Same contract as libc's `mmap64`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mmap64(
    addr: *mut c_void,
    len: usize,
    prot: c_int,
    flags: c_int,
    fd: c_int,
    offset: i64,
) -> *mut c_void {
    // SAFETY: the caller's contract, forwarded unchanged.
    let result = unsafe { real_mmap(&REAL_MMAP64, c"mmap64")(addr, len, prot, flags, fd, offset) };
    after_mmap(result, len, flags, fd, offset);
    result
}

/// Interposes on `mmap` (same function on 64-bit glibc, other name).
///
/// # Safety
/// Same contract as libc's `mmap`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mmap(
    addr: *mut c_void,
    len: usize,
    prot: c_int,
    flags: c_int,
    fd: c_int,
    offset: i64,
) -> *mut c_void {
    // SAFETY: the caller's contract, forwarded unchanged.
    let result = unsafe { real_mmap(&REAL_MMAP, c"mmap")(addr, len, prot, flags, fd, offset) };
    after_mmap(result, len, flags, fd, offset);
    result
}

/// Interposes on `fallocate64` (what QEMU imports) to track hole punches.
///
/// # Safety
/// Same contract as libc's `fallocate64`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fallocate64(fd: c_int, mode: c_int, offset: i64, len: i64) -> c_int {
    // SAFETY: the caller's contract, forwarded unchanged.
    let result =
        unsafe { real_fallocate(&REAL_FALLOCATE64, c"fallocate64")(fd, mode, offset, len) };
    after_fallocate(result, fd, mode, offset, len);
    result
}

/// Interposes on `fallocate` (same function on 64-bit glibc, other name).
///
/// # Safety
/// Same contract as libc's `fallocate`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fallocate(fd: c_int, mode: c_int, offset: i64, len: i64) -> c_int {
    // SAFETY: the caller's contract, forwarded unchanged.
    let result = unsafe { real_fallocate(&REAL_FALLOCATE, c"fallocate")(fd, mode, offset, len) };
    after_fallocate(result, fd, mode, offset, len);
    result
}

/// Interposes on `madvise` to keep pages removed by `MADV_REMOVE` tracked.
///
/// # Safety
/// Same contract as libc's `madvise`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn madvise(addr: *mut c_void, len: usize, advice: c_int) -> c_int {
    // SAFETY: the caller's contract, forwarded unchanged.
    let result = unsafe { real_madvise()(addr, len, advice) };
    after_madvise(result, addr, len, advice);
    result
}
