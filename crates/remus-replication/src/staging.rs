//! Copying guest pages out of the RAM file into page runs ready to send.

use remus_dirty::{DirtySet, PageRange, RamFile};
use remus_proto::{MAX_PAGES_PER_RUN, PAGE_SIZE, PageRun};

use crate::ReplError;

/// Pages per run: 1 MiB. Runs are hashed and written one at a time, so
/// bytes keep flowing to the backup (whose silence timeout counts) instead
/// of waiting for one huge run to be hashed.
const RUN_PAGES: u64 = 256;

/// Copies the dirty pages (guest paused) into runs.
pub fn stage(ram: &RamFile, dirty: &DirtySet) -> Result<Vec<PageRun>, ReplError> {
    stage_ranges(ram, dirty.iter().copied())
}

/// Copies every page that holds data (holes skipped), for the initial sync
/// while the guest runs.
pub fn stage_data_ranges(ram: &RamFile) -> Result<Vec<PageRun>, ReplError> {
    let ranges: Vec<PageRange> = ram
        .data_ranges()
        .collect::<Result<_, _>>()
        .map_err(|e| ReplError::Setup(format!("scan RAM file for data: {e}")))?;
    stage_ranges(ram, ranges.into_iter())
}

fn stage_ranges(
    ram: &RamFile,
    ranges: impl Iterator<Item = PageRange>,
) -> Result<Vec<PageRun>, ReplError> {
    if ram.page_size() != PAGE_SIZE as u64 {
        return Err(ReplError::Setup(format!(
            "host page size {} is not the protocol's {PAGE_SIZE}",
            ram.page_size()
        )));
    }
    let mut runs = Vec::new();
    for range in ranges {
        let mut first = range.first;
        let end = range.end();
        while first < end {
            let count = (end - first).min(RUN_PAGES.min(u64::from(MAX_PAGES_PER_RUN)));
            let piece = PageRange::new(first, count);
            let mut data = vec![0u8; ram.range_len(piece)];
            ram.read_pages(piece, &mut data)
                .map_err(|e| ReplError::Setup(format!("read guest RAM: {e}")))?;
            runs.push(PageRun {
                first_page: first,
                data,
            });
            first += count;
        }
    }
    Ok(runs)
}
