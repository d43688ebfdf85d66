//! Reading guest RAM from the RAM file, read-only, never through a mapping.
//!
//! The initial full copy walks only the file's data ([`RamFile::data_ranges`],
//! `SEEK_DATA`/`SEEK_HOLE`): guest RAM is mostly holes, and reading holes
//! through a mapping would allocate them. Reads use `pread` on the file,
//! which neither allocates holes nor touches QEMU's page tables, so it does
//! not disturb tracking.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::{DirtyError, PageRange, page_size};

/// The guest RAM file, opened read-only.
#[derive(Debug)]
pub struct RamFile {
    file: File,
    path: PathBuf,
    len: u64,
    page_size: u64,
}

impl RamFile {
    pub fn open(path: &Path) -> Result<Self, DirtyError> {
        let err = |op| {
            move |source| DirtyError::RamFile {
                path: path.to_owned(),
                op,
                source,
            }
        };
        let file = File::open(path).map_err(err("open"))?;
        let len = file.metadata().map_err(err("stat"))?.len();
        Ok(RamFile {
            file,
            path: path.to_owned(),
            len,
            page_size: page_size(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Size in bytes (the guest RAM size).
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn page_size(&self) -> u64 {
        self.page_size
    }

    /// Number of pages, counting a partial last page.
    pub fn page_count(&self) -> u64 {
        self.len.div_ceil(self.page_size)
    }

    /// The page ranges holding data; everything else reads as zeroes.
    pub fn data_ranges(&self) -> DataRanges<'_> {
        DataRanges { ram: self, pos: 0 }
    }

    /// Reads `range` into `buf`, which must be exactly its byte length
    /// (shorter at the end of the file, where a partial page is cut).
    pub fn read_pages(&self, range: PageRange, buf: &mut [u8]) -> Result<(), DirtyError> {
        self.file
            .read_exact_at(buf, range.file_offset(self.page_size))
            .map_err(|source| self.error("pread", source))
    }

    /// Byte length of `range` within the file (the last page may be partial).
    pub fn range_len(&self, range: PageRange) -> usize {
        let start = range.file_offset(self.page_size).min(self.len);
        let end = (start + range.byte_len(self.page_size)).min(self.len);
        (end - start) as usize
    }

    fn error(&self, op: &'static str, source: io::Error) -> DirtyError {
        DirtyError::RamFile {
            path: self.path.clone(),
            op,
            source,
        }
    }

    /// `lseek(fd, pos, whence)`; `None` when there is no more data (ENXIO).
    fn seek(&self, pos: u64, whence: libc::c_int) -> Result<Option<u64>, DirtyError> {
        // SAFETY: lseek on an fd we own; no memory is passed.
        let off = unsafe { libc::lseek(self.file.as_raw_fd(), pos as libc::off_t, whence) };
        if off >= 0 {
            return Ok(Some(off as u64));
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::ENXIO) {
            Ok(None)
        } else {
            Err(self.error("lseek(SEEK_DATA/SEEK_HOLE)", err))
        }
    }
}

/// Iterator over the data regions of a [`RamFile`], as page ranges.
#[derive(Debug)]
pub struct DataRanges<'a> {
    ram: &'a RamFile,
    pos: u64,
}

impl DataRanges<'_> {
    fn next_range(&mut self) -> Result<Option<PageRange>, DirtyError> {
        let page = self.ram.page_size;
        if self.pos >= self.ram.len {
            return Ok(None);
        }
        let Some(data) = self.ram.seek(self.pos, libc::SEEK_DATA)? else {
            self.pos = self.ram.len;
            return Ok(None);
        };
        // There is always a hole at end of file, so SEEK_HOLE finds one.
        let hole = self
            .ram
            .seek(data, libc::SEEK_HOLE)?
            .unwrap_or(self.ram.len);
        let first = data / page;
        let end = hole.div_ceil(page);
        self.pos = end * page;
        Ok(Some(PageRange::new(first, end - first)))
    }
}

impl Iterator for DataRanges<'_> {
    type Item = Result<PageRange, DirtyError>;

    fn next(&mut self) -> Option<Self::Item> {
        match self.next_range() {
            Ok(range) => range.map(Ok),
            Err(e) => {
                self.pos = self.ram.len;
                Some(Err(e))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_ranges_skip_holes() {
        let page = page_size();
        let file = tempfile::Builder::new()
            .prefix("remus-dirty-holes-")
            .tempfile_in("/dev/shm")
            .expect("tmpfs file");
        file.as_file().set_len(64 * page).expect("set_len");
        for (index, byte) in [(0u64, 1u8), (5, 2), (6, 3), (63, 4)] {
            file.as_file()
                .write_all_at(&[byte], index * page + 7)
                .expect("write");
        }
        let ram = RamFile::open(file.path()).expect("open");
        assert_eq!(ram.page_count(), 64);
        let ranges: Vec<PageRange> = ram.data_ranges().collect::<Result<_, _>>().expect("scan");
        assert_eq!(
            ranges,
            vec![
                PageRange::new(0, 1),
                PageRange::new(5, 2),
                PageRange::new(63, 1)
            ]
        );
        let mut buf = vec![0; ram.range_len(ranges[1])];
        ram.read_pages(ranges[1], &mut buf).expect("read");
        assert_eq!((buf[7], buf[page as usize + 7]), (2, 3));
    }
}
