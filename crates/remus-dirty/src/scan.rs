//! Collecting written pages from QEMU with `PAGEMAP_SCAN`.
//!
//! One ioctl on `/proc/<pid>/pagemap` (Linux 6.7+) both reports the pages
//! written since they were last protected and write-protects them again, so
//! nothing written between "read the bits" and "reset the bits" is lost.
//! Constants and `struct pm_scan_arg` follow the kernel's
//! `include/uapi/linux/fs.h`; Debian 12's headers predate them.
//!
//! `PM_SCAN_CHECK_WPASYNC` is always passed: without it a range that is not
//! registered for async write-protect silently scans as "nothing written".
//!
//! The masks of [`DirtyTracker::scan`] must stay exactly `category_mask =
//! return_mask = PAGE_IS_WRITTEN` with no `anyof`/`inverted` masks: that
//! selects the kernel's fast path, which reports every PTE that is not
//! write-protected, *empty ones included*, and protects it. So a page written
//! and then unmapped before the scan (`MADV_DONTNEED`, reclaim) is still
//! reported; the general path would drop it (an empty PTE has no category).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use crate::maps::{Segment, find_segments};
use crate::{DirtyError, DirtySet, PageRange, page_size};

/// Only pages that match are reported, and they are write-protected again.
const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
/// Fail (EPERM) unless the whole range is registered for async WP.
const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;
/// The page lies in a VMA registered for async write-protect.
const PAGE_IS_WPALLOWED: u64 = 1 << 0;
/// The page was written since it was last write-protected.
const PAGE_IS_WRITTEN: u64 = 1 << 1;

/// `_IOWR('f', 16, struct pm_scan_arg)`.
const PAGEMAP_SCAN: libc::c_ulong = 0xC060_6610;

/// Regions returned per ioctl. The kernel stops after about 512 regions
/// anyway (hence the loop on `walk_end`); more room would be wasted.
const REGIONS_PER_CALL: usize = 512;

#[repr(C)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct PageRegion {
    start: u64,
    end: u64,
    categories: u64,
}

const _: () = assert!(size_of::<PmScanArg>() == 96);
const _: () = assert!(size_of::<PageRegion>() == 24);

/// The page is present in memory.
const PAGE_IS_PRESENT: u64 = 1 << 3;

/// Whether this kernel has `PAGEMAP_SCAN` (Linux 6.7 and newer), on which
/// dirty-page tracking rests: one scan of a page of this process's own
/// stack. A kernel without it answers `ENOTTY` (pagemap has no ioctls).
pub fn kernel_has_pagemap_scan() -> Result<(), String> {
    let pagemap =
        File::open("/proc/self/pagemap").map_err(|e| format!("/proc/self/pagemap: {e}"))?;
    let probe = [0u8; 1];
    let page = page_size();
    let start = (probe.as_ptr() as u64) & !(page - 1);
    let mut region = PageRegion::default();
    let mut arg = PmScanArg {
        size: size_of::<PmScanArg>() as u64,
        flags: 0,
        start,
        end: start + page,
        walk_end: 0,
        vec: &mut region as *mut PageRegion as u64,
        vec_len: 1,
        max_pages: 0,
        category_inverted: 0,
        category_mask: 0,
        category_anyof_mask: 0,
        return_mask: PAGE_IS_PRESENT,
    };
    // SAFETY: `arg` and the one-entry region vector outlive the call; the
    // kernel writes at most `vec_len` regions and `walk_end`.
    let r = unsafe { libc::ioctl(pagemap.as_raw_fd(), PAGEMAP_SCAN as _, &mut arg) };
    std::hint::black_box(&probe);
    if r >= 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    Err(match e.raw_os_error() {
        Some(libc::ENOTTY) | Some(libc::EINVAL) => format!("the kernel has no PAGEMAP_SCAN ({e})"),
        _ => format!("PAGEMAP_SCAN failed: {e}"),
    })
}

/// Dirty-page tracker for one QEMU process and its RAM file.
pub struct DirtyTracker {
    pid: u32,
    ram_file: PathBuf,
    pagemap: File,
    segments: Vec<Segment>,
    page_size: u64,
    regions: Vec<PageRegion>,
}

impl std::fmt::Debug for DirtyTracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Not the region buffer: it is scratch space.
        f.debug_struct("DirtyTracker")
            .field("pid", &self.pid)
            .field("ram_file", &self.ram_file)
            .field("segments", &self.segments)
            .finish()
    }
}

impl DirtyTracker {
    /// Attaches to QEMU `pid`, which must already have `ram_file` mapped
    /// (i.e. QEMU has started; it maps RAM before the guest runs).
    pub fn attach(pid: u32, ram_file: &Path) -> Result<Self, DirtyError> {
        let segments = find_segments(pid, ram_file)?;
        let pagemap_path = PathBuf::from(format!("/proc/{pid}/pagemap"));
        let pagemap = File::open(&pagemap_path).map_err(|source| DirtyError::Proc {
            path: pagemap_path,
            source,
        })?;
        Ok(DirtyTracker {
            pid,
            ram_file: ram_file.to_owned(),
            pagemap,
            segments,
            page_size: page_size(),
            regions: vec![PageRegion::default(); REGIONS_PER_CALL],
        })
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn page_size(&self) -> u64 {
        self.page_size
    }

    /// Confirms that all of QEMU's mapping of the RAM file is registered for
    /// async write-protect, i.e. that the preload did its job. Call before
    /// treating the VM as protected; an error names the cause.
    pub fn verify_tracking(&mut self) -> Result<(), DirtyError> {
        let not_tracking = |pid, reason| DirtyError::NotTracking { pid, reason };
        for segment in self.segments.clone() {
            let mut covered: Vec<(u64, u64)> = Vec::new();
            walk(
                &self.pagemap,
                &mut self.regions,
                segment,
                PM_SCAN_CHECK_WPASYNC,
                PAGE_IS_WPALLOWED,
                |start, end| match covered.last_mut() {
                    Some(last) if last.1 == start => last.1 = end,
                    _ => covered.push((start, end)),
                },
            )
            .map_err(|e| {
                let hint = if e.raw_os_error() == Some(libc::EPERM) {
                    format!(
                        " (the mapping is not registered for userfaultfd async write-protect: \
                         was QEMU started with LD_PRELOAD={} and {}={}? its stderr says why not)",
                        crate::PRELOAD_FILE_NAME,
                        crate::TRACK_PATH_ENV,
                        self.ram_file.display()
                    )
                } else {
                    String::new()
                };
                not_tracking(
                    self.pid,
                    format!(
                        "PAGEMAP_SCAN check of {:#x}..{:#x} failed: {e}{hint}",
                        segment.start, segment.end
                    ),
                )
            })?;
            if covered != [(segment.start, segment.end)] {
                return Err(not_tracking(
                    self.pid,
                    format!(
                        "write-protect covers {covered:x?} of the RAM mapping {:#x}..{:#x}, \
                         not all of it",
                        segment.start, segment.end
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Returns the pages written since the previous scan (or since tracking
    /// began) and write-protects them again, atomically per page.
    ///
    /// A page written while the scan runs is reported now or by the next
    /// scan, never lost. On error the written state is unknown: resend all.
    ///
    /// The kernel walks every page-table entry of the mapping, so the cost
    /// grows with guest RAM (about 0.9 ms per GiB here). A large mapping is
    /// cut into pieces walked by several threads at once: the guest is
    /// paused meanwhile, so its vCPUs' cores are free.
    pub fn scan(&mut self) -> Result<DirtySet, DirtyError> {
        let page = self.page_size;
        let mut ranges = Vec::new();
        let threads = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .min(MAX_SCAN_THREADS);
        for segment in self.segments.clone() {
            let lost = |source| DirtyError::TrackingLost {
                pid: self.pid,
                start: segment.start,
                end: segment.end,
                source,
            };
            let to_range = |start: u64, end: u64| {
                let first = (start - segment.start + segment.file_offset) / page;
                PageRange::new(first, (end - start) / page)
            };
            let pieces = split(segment, threads, PARALLEL_SCAN_MIN_BYTES, PIECE_ALIGN);
            if pieces.len() == 1 {
                walk(
                    &self.pagemap,
                    &mut self.regions,
                    segment,
                    PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC,
                    PAGE_IS_WRITTEN,
                    |start, end| ranges.push(to_range(start, end)),
                )
                .map_err(lost)?;
                continue;
            }
            let pagemap = &self.pagemap;
            let found: Vec<io::Result<Vec<PageRange>>> = std::thread::scope(|s| {
                let handles: Vec<_> = pieces
                    .iter()
                    .map(|&piece| {
                        s.spawn(move || {
                            let mut regions = vec![PageRegion::default(); REGIONS_PER_CALL];
                            let mut out = Vec::new();
                            walk(
                                pagemap,
                                &mut regions,
                                piece,
                                PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC,
                                PAGE_IS_WRITTEN,
                                |start, end| out.push(to_range(start, end)),
                            )
                            .map(|()| out)
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| {
                        h.join()
                            .unwrap_or_else(|_| Err(io::Error::other("scan thread panicked")))
                    })
                    .collect()
            });
            for piece in found {
                ranges.extend(piece.map_err(lost)?);
            }
        }
        Ok(if self.segments.len() == 1 {
            // One mapping: already sorted by address, hence by file page.
            let mut set = DirtySet::new();
            ranges.into_iter().for_each(|r| set.push(r));
            set
        } else {
            DirtySet::from_unsorted(ranges)
        })
    }
}

/// At most this many threads walk one scan.
const MAX_SCAN_THREADS: usize = 4;
/// Mappings smaller than this are walked by one thread (a thread costs
/// more than it saves).
const PARALLEL_SCAN_MIN_BYTES: u64 = 1 << 30;
/// Piece boundaries fall on multiples of this (from the mapping's start,
/// which is aligned to its page size): no huge page, 2 MiB or 1 GiB, is
/// ever cut in two, which `PAGEMAP_SCAN` cannot write-protect in part.
const PIECE_ALIGN: u64 = 1 << 30;

/// `segment` cut into at most `n` pieces of at least `min_bytes` each,
/// their boundaries on multiples of `align`, in address order (one piece
/// if it is small).
fn split(segment: Segment, n: usize, min_bytes: u64, align: u64) -> Vec<Segment> {
    let len = segment.end - segment.start;
    let n = (n as u64).min(len / min_bytes.max(1)).max(1);
    let step = (len / n).div_ceil(align) * align;
    let mut out = Vec::new();
    let mut start = segment.start;
    while start < segment.end {
        let end = (start + step).min(segment.end);
        out.push(Segment {
            start,
            end,
            file_offset: segment.file_offset + (start - segment.start),
        });
        start = end;
    }
    out
}

/// Runs `PAGEMAP_SCAN` over `segment` until the kernel has walked all of
/// it, passing each returned region's address range to `found`.
fn walk(
    pagemap: &File,
    regions: &mut [PageRegion],
    segment: Segment,
    flags: u64,
    category: u64,
    mut found: impl FnMut(u64, u64),
) -> io::Result<()> {
    let mut start = segment.start;
    while start < segment.end {
        let mut arg = PmScanArg {
            size: size_of::<PmScanArg>() as u64,
            flags,
            start,
            end: segment.end,
            walk_end: 0,
            vec: regions.as_mut_ptr() as u64,
            vec_len: regions.len() as u64,
            max_pages: 0,
            category_inverted: 0,
            category_mask: category,
            category_anyof_mask: 0,
            return_mask: category,
        };
        // SAFETY: `arg` is a valid `struct pm_scan_arg` whose `vec` points
        // at `vec_len` writable `struct page_region`s we own.
        let count = unsafe { libc::ioctl(pagemap.as_raw_fd(), PAGEMAP_SCAN, &mut arg) };
        if count < 0 {
            return Err(io::Error::last_os_error());
        }
        let count = (count as usize).min(regions.len());
        for region in &regions[..count] {
            found(region.start, region.end);
        }
        if arg.walk_end <= start || arg.walk_end > segment.end {
            return Err(io::Error::other(format!(
                "PAGEMAP_SCAN made no progress (walk_end {:#x}, start {start:#x})",
                arg.walk_end
            )));
        }
        start = arg.walk_end;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::uffd::enable_wp_async;
    use std::os::fd::RawFd;
    use std::time::Instant;
    use tempfile::NamedTempFile;

    /// The build machines run Linux 6.7 or newer (the project requires
    /// it), so the check must pass here; on an older kernel this test is
    /// the one that says why nothing else works.
    #[test]
    fn this_kernel_has_pagemap_scan() {
        kernel_has_pagemap_scan().expect("PAGEMAP_SCAN (Linux 6.7+)");
    }

    /// A tmpfs file mapped shared into this process, optionally tracked the
    /// way the preload tracks QEMU's RAM.
    struct MappedFile {
        file: NamedTempFile,
        addr: *mut u8,
        len: usize,
        uffd: Option<RawFd>,
    }

    impl MappedFile {
        fn new(pages: u64, track: bool) -> Self {
            let file = tempfile::Builder::new()
                .prefix("remus-dirty-scan-")
                .tempfile_in("/dev/shm")
                .expect("tmpfs file");
            let len = (pages * page_size()) as usize;
            file.as_file().set_len(len as u64).expect("set_len");
            // SAFETY: fresh shared mapping of our own file.
            let addr = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    file.as_file().as_raw_fd(),
                    0,
                )
            };
            assert_ne!(
                addr,
                libc::MAP_FAILED,
                "mmap: {}",
                io::Error::last_os_error()
            );
            let uffd = track.then(|| {
                // SAFETY: the range is the mapping just made.
                unsafe { enable_wp_async(addr, len) }.expect("enable WP async")
            });
            MappedFile {
                file,
                addr: addr.cast(),
                len,
                uffd,
            }
        }

        fn write_page(&self, index: u64, byte: u8) {
            let offset = (index * page_size()) as usize + 100;
            assert!(offset < self.len);
            // SAFETY: inside our mapping.
            unsafe { self.addr.add(offset).write_volatile(byte) };
        }

        fn read_page(&self, index: u64) -> u8 {
            // SAFETY: inside our mapping.
            unsafe {
                self.addr
                    .add((index * page_size()) as usize)
                    .read_volatile()
            }
        }

        fn tracker(&self) -> DirtyTracker {
            DirtyTracker::attach(std::process::id(), self.file.path()).expect("attach")
        }
    }

    impl Drop for MappedFile {
        fn drop(&mut self) {
            // SAFETY: unmapping and closing what `new` created.
            unsafe {
                libc::munmap(self.addr.cast(), self.len);
                if let Some(fd) = self.uffd {
                    libc::close(fd);
                }
            }
        }
    }

    fn pages(set: &DirtySet) -> Vec<(u64, u64)> {
        set.iter().map(|r| (r.first, r.count)).collect()
    }

    #[test]
    fn scan_reports_exactly_the_written_pages_once() {
        let mapped = MappedFile::new(1024, true);
        let mut tracker = mapped.tracker();
        tracker.verify_tracking().expect("tracking verified");
        assert!(
            tracker.scan().expect("scan").is_empty(),
            "nothing written yet"
        );

        for index in [3, 4, 5, 100, 1023] {
            mapped.write_page(index, 0xaa);
        }
        assert_eq!(mapped.read_page(700), 0, "reads are not writes");
        assert_eq!(
            pages(&tracker.scan().expect("scan")),
            vec![(3, 3), (100, 1), (1023, 1)]
        );
        assert!(tracker.scan().expect("scan").is_empty(), "re-protected");

        mapped.write_page(4, 0xbb);
        mapped.write_page(4, 0xcc);
        assert_eq!(pages(&tracker.scan().expect("scan")), vec![(4, 1)]);
    }

    #[test]
    fn split_cuts_large_mappings_into_aligned_pieces_in_order() {
        let page = 4096;
        let gib = 1u64 << 30;
        let seg = |start: u64, len: u64| Segment {
            start,
            end: start + len,
            file_offset: 1 << 20,
        };
        // Small: one piece, itself.
        let small = split(seg(0x1000_0000, 100 << 20), 4, 512 << 20, page);
        assert_eq!(small.len(), 1);
        assert_eq!(
            (small[0].start, small[0].end),
            (0x1000_0000, 0x1000_0000 + (100 << 20))
        );
        // 1 GiB + 3 pages over 4 threads with 256 MiB minimum: 4 pieces
        // that tile the segment, page-aligned, file offsets following.
        let s = seg(0x4000_0000, gib + 3 * page);
        let pieces = split(s, 4, 256 << 20, page);
        assert_eq!(pieces.len(), 4);
        // With a 1 GiB alignment: 2.5 GiB in 4 asked pieces gives 3, cut
        // at whole GiB from the start (no huge page is split).
        let big = seg(0x4000_0000, 2 * gib + gib / 2);
        let cut = split(big, 4, 512 << 20, gib);
        assert_eq!(cut.len(), 3);
        for p in &cut[1..] {
            assert_eq!((p.start - big.start) % gib, 0);
        }
        assert_eq!(cut.last().unwrap().end, big.end);
        assert_eq!(pieces[0].start, s.start);
        assert_eq!(pieces.last().unwrap().end, s.end);
        for w in pieces.windows(2) {
            assert_eq!(w[0].end, w[1].start);
        }
        for p in &pieces {
            assert_eq!(p.start % page, 0);
            assert_eq!(p.file_offset, s.file_offset + (p.start - s.start));
        }
        // Never more pieces than the minimum size allows.
        assert_eq!(split(s, 16, 512 << 20, page).len(), 2);
    }

    /// A mapping large enough to be walked by several threads: the pages
    /// written on both sides of every piece boundary are reported exactly
    /// once, merged into runs across the boundaries.
    #[test]
    fn a_parallel_scan_reports_exactly_the_written_pages() {
        let total = PARALLEL_SCAN_MIN_BYTES * 2 / page_size();
        let mapped = MappedFile::new(total, true);
        let mut tracker = mapped.tracker();
        assert!(tracker.scan().expect("scan").is_empty());
        let threads = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .min(MAX_SCAN_THREADS);
        let seg = tracker.segments[0];
        let pieces = split(seg, threads, PARALLEL_SCAN_MIN_BYTES, PIECE_ALIGN);
        let mut want: Vec<u64> = vec![0, 7, total - 1];
        for p in &pieces[1..] {
            let first = (p.start - seg.start) / page_size();
            want.extend([first - 2, first - 1, first, first + 1]);
        }
        want.sort_unstable();
        for &i in &want {
            mapped.write_page(i, 0x5a);
        }
        let set = tracker.scan().expect("scan");
        let got: Vec<u64> = set.iter().flat_map(|r| r.first..r.end()).collect();
        assert_eq!(got, want);
        if pieces.len() > 1 {
            assert!(
                set.ranges().len() < want.len(),
                "runs across piece boundaries are merged: {:?}",
                set.ranges()
            );
        }
        assert!(tracker.scan().expect("scan").is_empty(), "re-protected");
    }

    #[test]
    fn scan_walks_past_the_kernels_region_limit() {
        // Every other page written: 2,048 separate regions, four times the
        // ~512 the kernel returns per call.
        let total = 4096;
        let mapped = MappedFile::new(total, true);
        let mut tracker = mapped.tracker();
        for index in (0..total).step_by(2) {
            mapped.write_page(index, 1);
        }
        let started = Instant::now();
        let set = tracker.scan().expect("scan");
        let elapsed = started.elapsed();
        assert_eq!(set.ranges().len(), 2048);
        assert!(
            set.iter()
                .enumerate()
                .all(|(i, r)| *r == PageRange::new(2 * i as u64, 1))
        );
        let started = Instant::now();
        assert!(tracker.scan().expect("scan").is_empty());
        eprintln!(
            "scan of 16 MiB: 2048 regions {:?}, nothing written {:?}",
            elapsed,
            started.elapsed()
        );
    }

    #[test]
    fn untracked_mapping_fails_loudly() {
        let mapped = MappedFile::new(64, false);
        mapped.write_page(1, 1);
        let mut tracker = mapped.tracker();

        let err = tracker.verify_tracking().expect_err("not tracked");
        let text = err.to_string();
        assert!(
            text.starts_with(&format!(
                "dirty tracking is not active in QEMU pid {}",
                std::process::id()
            )),
            "{text}"
        );
        assert!(text.contains("LD_PRELOAD"), "{text}");

        let err = tracker.scan().expect_err("scan of an unregistered range");
        assert!(err.is_tracking_lost(), "{err}");
        match err {
            DirtyError::TrackingLost { source, .. } => {
                assert_eq!(source.raw_os_error(), Some(libc::EPERM))
            }
            other => panic!("unexpected {other}"),
        }
    }

    #[test]
    fn unmapped_file_is_reported() {
        let file = NamedTempFile::new_in("/dev/shm").expect("tmpfs file");
        let err = DirtyTracker::attach(std::process::id(), file.path()).expect_err("not mapped");
        assert!(matches!(err, DirtyError::NotMapped { .. }), "{err}");
    }
}
