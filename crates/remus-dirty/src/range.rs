//! Guest RAM page ranges and the set of them one scan returns.
//!
//! Pages are numbered by their position in the RAM file (byte offset / page
//! size), which is what a replica is indexed by, not by QEMU's addresses.

/// A run of `count` consecutive RAM-file pages starting at page `first`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PageRange {
    pub first: u64,
    pub count: u64,
}

impl PageRange {
    pub fn new(first: u64, count: u64) -> Self {
        PageRange { first, count }
    }

    /// One past the last page.
    pub fn end(&self) -> u64 {
        self.first + self.count
    }

    /// Byte offset of the first page in the RAM file.
    pub fn file_offset(&self, page_size: u64) -> u64 {
        self.first * page_size
    }

    /// Length in bytes.
    pub fn byte_len(&self, page_size: u64) -> u64 {
        self.count * page_size
    }
}

/// The pages written during one epoch, as sorted, non-overlapping,
/// non-adjacent ranges (adjacent ones are merged on insertion).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DirtySet {
    ranges: Vec<PageRange>,
}

impl DirtySet {
    pub fn new() -> Self {
        DirtySet::default()
    }

    /// Adds a range that starts no earlier than the last one did (a scan
    /// walks addresses upwards); touching or overlapping ranges are merged.
    pub(crate) fn push(&mut self, range: PageRange) {
        if range.count == 0 {
            return;
        }
        if let Some(last) = self.ranges.last_mut()
            && last.end() >= range.first
        {
            debug_assert!(last.first <= range.first);
            last.count = last.end().max(range.end()) - last.first;
            return;
        }
        self.ranges.push(range);
    }

    /// Builds a set from ranges in any order (several mappings of the file).
    pub(crate) fn from_unsorted(mut ranges: Vec<PageRange>) -> Self {
        ranges.sort_unstable_by_key(|r| r.first);
        let mut set = DirtySet::new();
        for range in ranges {
            set.push(range);
        }
        set
    }

    pub fn ranges(&self) -> &[PageRange] {
        &self.ranges
    }

    pub fn iter(&self) -> std::slice::Iter<'_, PageRange> {
        self.ranges.iter()
    }

    /// Total number of pages.
    pub fn page_count(&self) -> u64 {
        self.ranges.iter().map(|r| r.count).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }
}

impl<'a> IntoIterator for &'a DirtySet {
    type Item = &'a PageRange;
    type IntoIter = std::slice::Iter<'a, PageRange>;

    fn into_iter(self) -> Self::IntoIter {
        self.ranges.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adjacent_ranges_merge_and_gaps_do_not() {
        let mut set = DirtySet::new();
        set.push(PageRange::new(3, 2));
        set.push(PageRange::new(5, 1));
        set.push(PageRange::new(0, 0));
        set.push(PageRange::new(9, 4));
        assert_eq!(set.ranges(), &[PageRange::new(3, 3), PageRange::new(9, 4)]);
        assert_eq!(set.page_count(), 7);
        let unsorted = vec![
            PageRange::new(9, 2),
            PageRange::new(1, 1),
            PageRange::new(10, 5),
        ];
        assert_eq!(
            DirtySet::from_unsorted(unsorted).ranges(),
            &[PageRange::new(1, 1), PageRange::new(9, 6)]
        );
        assert_eq!(PageRange::new(9, 4).file_offset(4096), 9 * 4096);
        assert_eq!(PageRange::new(9, 4).byte_len(4096), 4 * 4096);
    }
}
