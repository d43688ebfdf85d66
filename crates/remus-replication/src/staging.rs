//! Copying guest pages out of the RAM file into page runs ready to send.

use remus_dirty::{DirtySet, PageRange, RamFile};
use remus_proto::{MAX_PAGES_PER_RUN, PAGE_SIZE, PageRun};

use crate::ReplError;

/// Pages per run: 1 MiB. Runs are hashed and written one at a time, so
/// bytes keep flowing to the backup (whose silence timeout counts) instead
/// of waiting for one huge run to be hashed.
const RUN_PAGES: u64 = 256;
const _: () = assert!(RUN_PAGES <= MAX_PAGES_PER_RUN as u64);

/// `range` cut into runs of at most [`RUN_PAGES`] pages.
fn pieces(range: PageRange) -> impl Iterator<Item = PageRange> {
    let end = range.end();
    (range.first..end)
        .step_by(RUN_PAGES as usize)
        .map(move |first| PageRange::new(first, (end - first).min(RUN_PAGES)))
}

/// A read-only shared mapping of the guest RAM file, for copying dirty
/// pages while the guest is paused: a memcpy from the page cache, with no
/// syscall per run and no zero-filled buffer, is several times faster
/// than `pread` (DESIGN 5). Only pages the scanner reported as written are
/// read through it: reading a hole through a mapping would allocate it.
pub struct RamMap {
    map: memmap2::Mmap,
}

impl RamMap {
    pub fn open(path: &std::path::Path) -> Result<RamMap, ReplError> {
        let file = std::fs::File::open(path)
            .map_err(|e| ReplError::Io(format!("open {}", path.display()), e))?;
        // SAFETY: the mapping is read-only; QEMU writes the file
        // concurrently, which only changes the bytes we copy (the guest is
        // paused while we copy a checkpoint's pages).
        let map = unsafe { memmap2::Mmap::map(&file) }
            .map_err(|e| ReplError::Io(format!("map {}", path.display()), e))?;
        Ok(RamMap { map })
    }

    /// Copies the dirty pages into runs, in buffers from `pool`.
    pub fn stage(&self, dirty: &DirtySet, pool: &BufferPool) -> Result<Vec<PageRun>, ReplError> {
        let mut runs = Vec::new();
        for piece in dirty.iter().flat_map(|r| pieces(*r)) {
            let start = piece.first as usize * PAGE_SIZE;
            let stop = piece.end() as usize * PAGE_SIZE;
            let bytes = self.map.get(start..stop).ok_or(ReplError::PagesBeyondRam {
                first: piece.first,
                count: piece.count,
            })?;
            let mut data = pool.take();
            data.extend_from_slice(bytes);
            runs.push(PageRun {
                first_page: piece.first,
                data,
            });
        }
        Ok(runs)
    }
}

/// Staging buffers reused from epoch to epoch. A fresh 1 MiB buffer is a
/// fresh anonymous mapping whose pages fault in as they are first written,
/// which made copying dirty pages (with the guest paused) several times
/// slower than memcpy; recycled buffers are already backed. The sender
/// gives buffers back once their pages are on the wire. Bounded: at most
/// `max` buffers are kept.
pub struct BufferPool {
    free: std::sync::Mutex<Vec<Vec<u8>>>,
    max: usize,
}

impl BufferPool {
    pub fn new(max: usize) -> BufferPool {
        BufferPool {
            free: std::sync::Mutex::new(Vec::new()),
            max,
        }
    }

    /// An empty buffer with room for one run.
    pub fn take(&self) -> Vec<u8> {
        self.free
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(RUN_PAGES as usize * PAGE_SIZE))
    }

    /// Returns a buffer for reuse.
    pub fn give(&self, mut buf: Vec<u8>) {
        buf.clear();
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        if free.len() < self.max && buf.capacity() >= RUN_PAGES as usize * PAGE_SIZE {
            free.push(buf);
        }
    }
}

/// The pages the runs carry.
pub fn pages_in(runs: &[PageRun]) -> u64 {
    runs.iter().map(|r| u64::from(r.page_count())).sum()
}

/// The pieces (at most a page run each) of every range of the RAM file
/// that holds data, holes skipped: what the initial copy sends, read one
/// piece at a time as it goes out ([`LazyPages`]).
pub fn data_pieces(ram: &RamFile) -> Result<Vec<PageRange>, ReplError> {
    if ram.page_size() != PAGE_SIZE as u64 {
        return Err(ReplError::Setup(format!(
            "host page size {} is not the protocol's {PAGE_SIZE}",
            ram.page_size()
        )));
    }
    let ranges: Vec<PageRange> = ram
        .data_ranges()
        .collect::<Result<_, _>>()
        .map_err(ReplError::Ram)?;
    Ok(ranges.into_iter().flat_map(pieces).collect())
}

/// Pages still in guest RAM, read when they are sent: the initial copy of
/// a large guest costs one page run of memory, not the guest's size.
/// Reading while the guest runs is what the initial copy does anyway
/// (pages written meanwhile are caught by the first checkpoint's scan).
pub struct LazyPages {
    pub ram: std::sync::Arc<RamFile>,
    pub pieces: Vec<PageRange>,
}

impl LazyPages {
    pub fn page_count(&self) -> u64 {
        self.pieces.iter().map(|p| p.count).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_cover_a_range_in_runs_of_at_most_run_pages() {
        let got: Vec<(u64, u64)> = pieces(PageRange::new(10, 600))
            .map(|p| (p.first, p.count))
            .collect();
        assert_eq!(got, vec![(10, 256), (266, 256), (522, 88)]);
        assert_eq!(pieces(PageRange::new(5, 1)).count(), 1);
        assert_eq!(pieces(PageRange::new(5, 0)).count(), 0);
    }
}
