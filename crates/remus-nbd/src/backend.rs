//! Storage behind an export: the [`BlockBackend`] trait the server drives,
//! and [`FileBackend`], a raw image file (or block device) on the host.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};

use crate::error::NbdError;

/// The storage an NBD export reads and writes.
///
/// # Calling contract
///
/// * Within one client connection the server calls these methods strictly
///   in the order the requests arrived, one at a time, and sends the reply
///   to a request only after its call has returned. A write is therefore
///   acknowledged to the guest only once `write_at` (or `trim` /
///   `write_zeroes`) has returned `Ok`, and a flush only once `flush` has.
///   This is the seam a replicating wrapper uses to tag writes with the
///   current checkpoint epoch.
/// * Different connections to the same export run on different threads,
///   so calls from different connections may be concurrent.
/// * The server checks every range against [`size`](Self::size) (as read
///   when the client connected) and refuses writes itself when
///   [`read_only`](Self::read_only) is true, so implementations only see
///   in-bounds ranges; they must still not panic on anything.
/// * Lengths may be zero.
/// * Errors map onto NBD errors: `ENOSPC`, `EDQUOT` and `EFBIG` (by OS
///   error number, or [`io::ErrorKind::StorageFull`]) become `NBD_ENOSPC`;
///   everything else becomes `NBD_EIO`.
pub trait BlockBackend: Send + Sync + 'static {
    /// Size of the export in bytes.
    fn size(&self) -> u64;
    /// Whether the export refuses writes.
    fn read_only(&self) -> bool;
    /// Fills all of `buf` from `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes all of `buf` at `offset`; when `fua` is set the data must be on
    /// stable storage before returning.
    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> io::Result<()>;
    /// Makes every write that has returned so far durable.
    fn flush(&self) -> io::Result<()>;
    /// Discards `len` bytes at `offset` (a hint: contents become unspecified).
    fn trim(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Makes `len` bytes at `offset` read as zero. With `may_trim` the range
    /// may be deallocated; with `fua` it must be durable before returning.
    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool, fua: bool) -> io::Result<()>;
    /// Whether `len` bytes at `offset` may hold data: `false` only when the
    /// range is known to be a hole (reads as zero without being stored).
    /// The default, `true`, is always correct; it only costs reads.
    fn may_hold_data(&self, _offset: u64, _len: u64) -> io::Result<bool> {
        Ok(true)
    }
}

/// Largest buffer used when zeroes have to be written out by hand.
const ZERO_CHUNK: usize = 1024 * 1024;

/// A raw disk image file (or block device) accessed with positional I/O.
#[derive(Debug)]
pub struct FileBackend {
    file: File,
    path: PathBuf,
    size: u64,
    read_only: bool,
}

impl FileBackend {
    /// Opens a raw image. Its size is taken once, here.
    pub fn open(path: &Path, read_only: bool) -> Result<Self, NbdError> {
        let mode = if read_only { "read-only" } else { "read-write" };
        let mut file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|source| NbdError::Open {
                path: path.to_owned(),
                mode,
                source,
            })?;
        let meta = file.metadata().map_err(|source| NbdError::Open {
            path: path.to_owned(),
            mode,
            source,
        })?;
        let ft = meta.file_type();
        if !(ft.is_file() || ft.is_block_device()) {
            return Err(NbdError::NotExportable {
                path: path.to_owned(),
                reason: "not a regular file or block device".into(),
            });
        }
        // Seeking to the end gives the size of block devices too.
        let size = file
            .seek(SeekFrom::End(0))
            .map_err(|source| NbdError::Open {
                path: path.to_owned(),
                mode,
                source,
            })?;
        Ok(Self {
            file,
            path: path.to_owned(),
            size,
            read_only,
        })
    }

    /// Path the image was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn check_writable(&self) -> io::Result<()> {
        if self.read_only {
            Err(io::Error::from_raw_os_error(libc::EROFS))
        } else {
            Ok(())
        }
    }

    /// Writes zero buffers of at most [`ZERO_CHUNK`] bytes over the range.
    fn write_zero_buffers(&self, offset: u64, len: u64) -> io::Result<()> {
        let chunk = usize::try_from(len).map_or(ZERO_CHUNK, |l| l.min(ZERO_CHUNK));
        let zeroes = vec![0u8; chunk];
        let mut done = 0u64;
        while done < len {
            let n = usize::try_from(len - done).map_or(chunk, |r| r.min(chunk));
            self.file.write_all_at(&zeroes[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }
}

fn is_unsupported(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP)) || e.kind() == io::ErrorKind::Unsupported
}

#[cfg(target_os = "linux")]
fn fallocate(file: &File, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let off =
        libc::off_t::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let ln = libc::off_t::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    loop {
        // SAFETY: fallocate only reads its integer arguments; the fd is
        // owned by `file`, which outlives the call.
        let rc = unsafe { libc::fallocate(file.as_raw_fd(), mode, off, ln) };
        if rc == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

#[cfg(target_os = "linux")]
fn punch_hole(file: &File, offset: u64, len: u64) -> io::Result<()> {
    fallocate(
        file,
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        offset,
        len,
    )
}

#[cfg(target_os = "linux")]
fn zero_range(file: &File, offset: u64, len: u64) -> io::Result<()> {
    fallocate(
        file,
        libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
        offset,
        len,
    )
}

/// The first offset at or after `offset` holding data (`SEEK_DATA`), or
/// None when only a hole follows. Filesystems without hole reporting say
/// "data everywhere", which is correct, only slower for the caller.
fn next_data(file: &File, offset: u64) -> io::Result<Option<u64>> {
    use std::os::fd::AsRawFd;
    let off =
        libc::off_t::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: lseek only reads its integer arguments; the fd is owned by
    // `file`, which outlives the call. It moves the file offset, which no
    // caller uses (all I/O is positional).
    let r = unsafe { libc::lseek(file.as_raw_fd(), off, libc::SEEK_DATA) };
    if r >= 0 {
        return Ok(Some(r as u64));
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::ENXIO) => Ok(None),
        Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => Ok(Some(offset)),
        _ => Err(err),
    }
}

#[cfg(not(target_os = "linux"))]
fn punch_hole(_file: &File, _offset: u64, _len: u64) -> io::Result<()> {
    Err(io::Error::from(io::ErrorKind::Unsupported))
}

#[cfg(not(target_os = "linux"))]
fn zero_range(_file: &File, _offset: u64, _len: u64) -> io::Result<()> {
    Err(io::Error::from(io::ErrorKind::Unsupported))
}

impl BlockBackend for FileBackend {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> io::Result<()> {
        self.check_writable()?;
        self.file.write_all_at(buf, offset)?;
        if fua {
            self.file.sync_data()?;
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.file.sync_data()
    }

    fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check_writable()?;
        if len == 0 {
            return Ok(());
        }
        match punch_hole(&self.file, offset, len) {
            Ok(()) => Ok(()),
            Err(e) if is_unsupported(&e) => self.write_zero_buffers(offset, len),
            Err(e) => Err(e),
        }
    }

    fn may_hold_data(&self, offset: u64, len: u64) -> io::Result<bool> {
        if len == 0 {
            return Ok(false);
        }
        next_data(&self.file, offset).map(|d| d.is_some_and(|d| d < offset.saturating_add(len)))
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool, fua: bool) -> io::Result<()> {
        self.check_writable()?;
        if len > 0 {
            let mut done = false;
            if may_trim {
                match punch_hole(&self.file, offset, len) {
                    Ok(()) => done = true,
                    Err(e) if is_unsupported(&e) => {}
                    Err(e) => return Err(e),
                }
            }
            if !done {
                match zero_range(&self.file, offset, len) {
                    Ok(()) => {}
                    Err(e) if is_unsupported(&e) => self.write_zero_buffers(offset, len)?,
                    Err(e) => return Err(e),
                }
            }
        }
        if fua {
            self.file.sync_data()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fallback used when the filesystem cannot punch or zero ranges:
    /// bounded chunks that cover exactly the range, however unaligned.
    #[test]
    fn zero_buffer_fallback_covers_exactly_the_range() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        let size = 3 * ZERO_CHUNK + 100;
        std::fs::write(&path, vec![0x77u8; size]).unwrap();
        let b = FileBackend::open(&path, false).unwrap();
        let (off, len) = (13u64, (2 * ZERO_CHUNK + 999) as u64);
        b.write_zero_buffers(off, len).unwrap();
        b.write_zero_buffers(5, 0).unwrap();
        let disk = std::fs::read(&path).unwrap();
        assert_eq!(disk.len(), size);
        for (i, &x) in disk.iter().enumerate() {
            let inside = (off..off + len).contains(&(i as u64));
            assert_eq!(x, if inside { 0 } else { 0x77 }, "byte {i}");
        }
    }

    #[test]
    fn holes_are_reported_and_data_is_not_missed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sparse");
        let f = std::fs::File::create(&path).unwrap();
        f.set_len(64 << 20).unwrap();
        use std::os::unix::fs::FileExt;
        f.write_all_at(b"x", 10 << 20).unwrap();
        f.sync_all().unwrap();
        let b = FileBackend::open(&path, false).unwrap();
        assert!(b.may_hold_data(10 << 20, 1).unwrap());
        assert!(
            b.may_hold_data(9 << 20, 2 << 20).unwrap(),
            "a range around the data"
        );
        // Filesystems report holes at their own granularity; far from the
        // byte written the image is a hole (ext4 and tmpfs, where tests
        // run, report holes).
        assert!(!b.may_hold_data(40 << 20, 1 << 20).unwrap());
        assert!(!b.may_hold_data(60 << 20, 4 << 20).unwrap(), "the tail");
        assert!(!b.may_hold_data(5, 0).unwrap());
    }

    #[test]
    fn unsupported_detection() {
        assert!(is_unsupported(&io::Error::from_raw_os_error(
            libc::EOPNOTSUPP
        )));
        assert!(!is_unsupported(&io::Error::from_raw_os_error(libc::EIO)));
    }
}
