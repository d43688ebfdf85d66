//! [`ChangeMap`]: a persistent bitmap of the disk chunks written since a
//! point in time (here: since the backup took over at failover), so a
//! later resynchronisation copies only those chunks, as DRBD's bitmap does.
//!
//! File layout (big-endian): a 4096-byte header holding the magic
//! `RMSCHG01`, the chunk size (u32) and the disk size (u64), zero padded;
//! then one bit per chunk, chunk `i` in byte `i / 8`, bit `i % 8` (least
//! significant first).
//!
//! Crash safety: a bit is written and synced to stable storage *before*
//! the write it covers is applied, so after a crash at any moment every
//! chunk that may differ is marked. (A chunk may be marked whose write
//! never happened; a resync then copies it needlessly, never misses one.)
//! Only the first write to a chunk pays the sync.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

const MAGIC: &[u8; 8] = b"RMSCHG01";
/// Bytes before the bitmap.
pub const HEADER_LEN: u64 = 4096;

/// See the module documentation.
#[derive(Debug)]
pub struct ChangeMap {
    file: File,
    path: PathBuf,
    chunk: u64,
    size: u64,
    bits: Mutex<Vec<u8>>,
}

fn invalid(path: &Path, why: String) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("change map {}: {why}", path.display()),
    )
}

impl ChangeMap {
    /// Opens the map at `path` for a disk of `disk_size` bytes in chunks of
    /// `chunk` bytes, creating it (all clear) if it does not exist. An
    /// existing map keeps its marks; one made for another disk size or
    /// chunk size is an error.
    pub fn open(path: &Path, disk_size: u64, chunk: u32) -> io::Result<ChangeMap> {
        if chunk == 0 {
            return Err(invalid(path, "chunk size 0".into()));
        }
        let chunks = disk_size.div_ceil(u64::from(chunk));
        let bytes = usize::try_from(chunks.div_ceil(8))
            .map_err(|_| invalid(path, "disk too large".into()))?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        let len = file.metadata()?.len();
        let mut bits = vec![0u8; bytes];
        if len == 0 {
            let mut header = vec![0u8; HEADER_LEN as usize];
            header[..8].copy_from_slice(MAGIC);
            header[8..12].copy_from_slice(&chunk.to_be_bytes());
            header[12..20].copy_from_slice(&disk_size.to_be_bytes());
            file.write_all_at(&header, 0)?;
            file.write_all_at(&bits, HEADER_LEN)?;
            file.sync_all()?;
            if let Some(dir) = path.parent() {
                File::open(dir)?.sync_all()?;
            }
        } else {
            let mut header = [0u8; 20];
            file.read_exact_at(&mut header, 0)
                .map_err(|e| invalid(path, format!("header: {e}")))?;
            if &header[..8] != MAGIC {
                return Err(invalid(path, "not a remus change map".into()));
            }
            let have_chunk = u32::from_be_bytes(header[8..12].try_into().unwrap_or_default());
            let have_size = u64::from_be_bytes(header[12..20].try_into().unwrap_or_default());
            if have_chunk != chunk || have_size != disk_size {
                return Err(invalid(
                    path,
                    format!(
                        "made for a {have_size}-byte disk in {have_chunk}-byte chunks, not {disk_size} in {chunk}"
                    ),
                ));
            }
            file.read_exact_at(&mut bits, HEADER_LEN)
                .map_err(|e| invalid(path, format!("bitmap: {e}")))?;
        }
        Ok(ChangeMap {
            file,
            path: path.to_path_buf(),
            chunk: u64::from(chunk),
            size: disk_size,
            bits: Mutex::new(bits),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes per chunk (per bit).
    pub fn chunk_size(&self) -> u64 {
        self.chunk
    }

    /// Marks the chunks `len` bytes at `offset` touch, durably, before
    /// returning. Ranges beyond the disk are clamped.
    pub fn mark(&self, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 || offset >= self.size {
            return Ok(());
        }
        let end = offset.saturating_add(len).min(self.size);
        let first = offset / self.chunk;
        let last = (end - 1) / self.chunk;
        let mut bits = self.bits.lock().unwrap_or_else(|p| p.into_inner());
        let mut changed = false;
        for i in first..=last {
            let (byte, bit) = ((i / 8) as usize, (i % 8) as u8);
            if bits[byte] & (1 << bit) == 0 {
                bits[byte] |= 1 << bit;
                changed = true;
            }
        }
        if changed {
            let (a, b) = ((first / 8) as usize, (last / 8) as usize);
            self.file
                .write_all_at(&bits[a..=b], HEADER_LEN + a as u64)?;
            self.file.sync_data()?;
        }
        Ok(())
    }

    /// Clears the given chunks (no sync: after a crash a cleared bit may
    /// come back, which over-marks, never misses). Numbers beyond the
    /// disk are ignored.
    pub fn unmark(&self, chunks: &[u64]) -> io::Result<()> {
        let mut bits = self.bits.lock().unwrap_or_else(|p| p.into_inner());
        let (mut lo, mut hi) = (usize::MAX, 0usize);
        for &i in chunks {
            let byte = (i / 8) as usize;
            if byte >= bits.len() {
                continue;
            }
            bits[byte] &= !(1u8 << (i % 8));
            lo = lo.min(byte);
            hi = hi.max(byte);
        }
        if lo <= hi {
            self.file
                .write_all_at(&bits[lo..=hi], HEADER_LEN + lo as u64)?;
        }
        Ok(())
    }

    /// Whether chunk `i` is marked.
    pub fn is_marked(&self, i: u64) -> bool {
        let bits = self.bits.lock().unwrap_or_else(|p| p.into_inner());
        bits.get((i / 8) as usize)
            .is_some_and(|b| b & (1 << (i % 8)) != 0)
    }

    /// The disk size the map was made for.
    pub fn disk_size(&self) -> u64 {
        self.size
    }

    /// Numbers of the marked chunks, ascending.
    pub fn marked_chunks(&self) -> Vec<u64> {
        let bits = self.bits.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = Vec::new();
        for (i, &b) in bits.iter().enumerate() {
            for bit in 0..8 {
                if b & (1 << bit) != 0 {
                    out.push(i as u64 * 8 + bit);
                }
            }
        }
        out
    }

    /// How many chunks are marked.
    pub fn count(&self) -> u64 {
        let bits = self.bits.lock().unwrap_or_else(|p| p.into_inner());
        bits.iter().map(|b| u64::from(b.count_ones())).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_cover_exactly_the_touched_chunks_and_persist() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m");
        let m = ChangeMap::open(&p, 100 * 4096 + 7, 4096).unwrap();
        m.mark(4095, 2).unwrap(); // chunks 0 and 1
        m.mark(10 * 4096, 4096).unwrap(); // chunk 10 only
        m.mark(100 * 4096, 1000).unwrap(); // the short last chunk, clamped
        m.mark(5000 * 4096, 1).unwrap(); // beyond the disk: ignored
        m.mark(3 * 4096, 0).unwrap(); // empty
        assert_eq!(m.marked_chunks(), vec![0, 1, 10, 100]);
        assert_eq!(m.count(), 4);
        drop(m);
        let m = ChangeMap::open(&p, 100 * 4096 + 7, 4096).unwrap();
        assert_eq!(m.marked_chunks(), vec![0, 1, 10, 100]);
        // The on-disk layout is the documented one.
        let raw = std::fs::read(&p).unwrap();
        assert_eq!(&raw[..8], b"RMSCHG01");
        assert_eq!(raw[HEADER_LEN as usize], 0b11);
        assert_eq!(raw[HEADER_LEN as usize + 1], 0b100);
    }

    #[test]
    fn unmarked_chunks_are_clear_after_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m");
        let m = ChangeMap::open(&p, 64 * 4096, 4096).unwrap();
        m.mark(0, 20 * 4096).unwrap();
        m.unmark(&[3, 9, 10, 999]).unwrap();
        assert!(!m.is_marked(3) && m.is_marked(4));
        drop(m);
        let m = ChangeMap::open(&p, 64 * 4096, 4096).unwrap();
        assert_eq!(m.count(), 17);
        assert!(!m.is_marked(9) && !m.is_marked(10) && m.is_marked(19));
    }

    #[test]
    fn a_map_for_another_disk_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m");
        ChangeMap::open(&p, 1 << 20, 4096).unwrap();
        let e = ChangeMap::open(&p, 2 << 20, 4096).unwrap_err().to_string();
        assert!(e.contains("made for a 1048576-byte disk"), "{e}");
        std::fs::write(&p, b"garbage that is not a map").unwrap();
        let e = ChangeMap::open(&p, 1 << 20, 4096).unwrap_err().to_string();
        assert!(e.contains("not a remus change map"), "{e}");
    }
}
