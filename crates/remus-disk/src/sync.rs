//! Chunk digests for the initial synchronisation.
//!
//! The backup hashes its copy of each replicated disk in [`CHUNK_SIZE`]
//! chunks (XXH3-128) and sends the digests; the primary hashes its own
//! chunks and sends only those that differ — as data, or as a zeroing
//! when its chunk is all zeroes (so sparse images stay sparse). Writes the
//! guest makes during the sync are journaled for the first checkpoint
//! epoch and applied after the sync data, so the result is exact whatever
//! the order in which chunk reads and guest writes interleaved.
//!
//! Chunks the image does not store (holes, as `SEEK_DATA` reports them)
//! are not read: they are zero. A mostly empty sparse image is compared in
//! moments, not at the speed of reading zeroes.

use std::io;

use remus_nbd::BlockBackend;
use remus_proto::DIGEST_LEN;

/// Bytes per chunk compared (the last chunk of a disk may be shorter).
pub const CHUNK_SIZE: u32 = 64 * 1024;
/// Digests per DiskDigests frame (256 MiB of disk per frame).
pub const DIGESTS_PER_FRAME: usize = 4096;

/// Number of chunks of a disk of `size` bytes.
pub fn chunk_count(size: u64) -> u64 {
    size.div_ceil(u64::from(CHUNK_SIZE))
}

/// Byte range of chunk `i` of a disk of `size` bytes.
pub fn chunk_range(size: u64, i: u64) -> (u64, usize) {
    let off = i * u64::from(CHUNK_SIZE);
    let len = (size.saturating_sub(off)).min(u64::from(CHUNK_SIZE)) as usize;
    (off, len)
}

/// XXH3-128 of one chunk's bytes.
pub fn digest(data: &[u8]) -> [u8; DIGEST_LEN] {
    xxhash_rust::xxh3::xxh3_128(data).to_be_bytes()
}

/// Whether every byte is zero.
pub fn is_zero(data: &[u8]) -> bool {
    let mut words = data.chunks_exact(8);
    words.all(|w| w == [0u8; 8]) && words.remainder().iter().all(|&b| b == 0)
}

/// Reads chunk `i` of `disk` into `buf` (resized as needed) and returns it;
/// a chunk in a hole is zero-filled without reading.
pub fn read_chunk<'a>(
    disk: &dyn BlockBackend,
    i: u64,
    buf: &'a mut Vec<u8>,
) -> io::Result<&'a [u8]> {
    let (off, len) = chunk_range(disk.size(), i);
    buf.resize(len, 0);
    if disk.may_hold_data(off, len as u64)? {
        disk.read_at(&mut buf[..len], off)?;
    } else {
        buf[..len].fill(0);
    }
    Ok(&buf[..len])
}

/// Digests of chunks `first..first + count` of `disk` (clamped to the disk).
pub fn digest_chunks(
    disk: &dyn BlockBackend,
    first: u64,
    count: usize,
) -> io::Result<Vec<[u8; DIGEST_LEN]>> {
    let end = (first + count as u64).min(chunk_count(disk.size()));
    let mut buf = Vec::with_capacity(CHUNK_SIZE as usize);
    (first..end)
        .map(|i| read_chunk(disk, i, &mut buf).map(digest))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use remus_nbd::FileBackend;

    #[test]
    fn chunks_cover_the_disk_exactly() {
        let size = 3 * u64::from(CHUNK_SIZE) + 10;
        assert_eq!(chunk_count(size), 4);
        assert_eq!(chunk_range(size, 3), (3 * u64::from(CHUNK_SIZE), 10));
        assert_eq!(chunk_count(0), 0);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d");
        let mut data = vec![0u8; size as usize];
        data[size as usize - 1] = 9;
        std::fs::write(&p, &data).unwrap();
        let b = FileBackend::open(&p, true).unwrap();
        let d = digest_chunks(&b, 0, 100).unwrap();
        assert_eq!(d.len(), 4);
        assert_eq!(d[0], d[1], "equal chunks, equal digests");
        assert_ne!(d[3], digest(&[0u8; 10]), "the last byte counts");
        assert!(is_zero(&data[..100]) && !is_zero(&data[size as usize - 9..]));
    }

    #[test]
    fn a_sparse_image_digests_like_the_same_bytes_written_out() {
        let dir = tempfile::tempdir().unwrap();
        let size = 64 * u64::from(CHUNK_SIZE);
        let sparse = dir.path().join("sparse");
        let f = std::fs::File::create(&sparse).unwrap();
        f.set_len(size).unwrap();
        use std::os::unix::fs::FileExt;
        f.write_all_at(b"data", 40 * u64::from(CHUNK_SIZE) + 5)
            .unwrap();
        let mut dense = vec![0u8; size as usize];
        dense[40 * CHUNK_SIZE as usize + 5..][..4].copy_from_slice(b"data");
        let dense_path = dir.path().join("dense");
        std::fs::write(&dense_path, &dense).unwrap();
        let a = digest_chunks(&FileBackend::open(&sparse, true).unwrap(), 0, 100).unwrap();
        let b = digest_chunks(&FileBackend::open(&dense_path, true).unwrap(), 0, 100).unwrap();
        assert_eq!(a, b);
        assert_ne!(a[40], a[39]);
    }
}
