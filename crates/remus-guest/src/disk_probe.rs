//! `disk-probe DEVICE`: a smoke test of the guest's block device.
//!
//! 1. Reads the first 4 KiB and prints `disk-probe read: <first text line>`
//!    (or `empty`). Host tests put a marker line at offset 0 before boot.
//! 2. Writes one 4 KiB block at offset 1 MiB holding
//!    `remus-guest-wrote <16 hex digits>\n` padded with zeros, fsyncs, reads
//!    it back with O_DIRECT (falling back to posix_fadvise(DONTNEED) and a
//!    cached read if O_DIRECT is refused), and prints
//!    `disk-probe wrote: remus-guest-wrote <value>` then `disk-probe ok`.
//!
//! Any failure prints `disk-probe error: ...` (to stdout, so it lands on the
//! console next to the other lines) and exits non-zero.

use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};

pub const BLOCK: usize = 4096;
pub const WRITE_OFFSET: u64 = 1 << 20;
pub const MARKER_PREFIX: &str = "remus-guest-wrote";

pub fn run(args: &[String]) -> Result<(), String> {
    let [device] = args else {
        return Err("usage: disk-probe DEVICE".into());
    };
    match probe(device) {
        Ok(()) => {
            println!("disk-probe ok");
            Ok(())
        }
        Err(e) => {
            println!("disk-probe error: {e}");
            Err(e)
        }
    }
}

fn probe(device: &str) -> Result<(), String> {
    let mut dev = OpenOptions::new()
        .read(true)
        .write(true)
        .open(device)
        .map_err(|e| format!("open {device}: {e}"))?;

    let mut head = vec![0u8; BLOCK];
    dev.read_exact(&mut head)
        .map_err(|e| format!("read first {BLOCK} bytes of {device}: {e}"))?;
    println!("disk-probe read: {}", first_line(&head));
    let _ = std::io::stdout().flush();

    let value = random_value();
    let block = marker_block(value);
    dev.write_all_at(&block, WRITE_OFFSET)
        .map_err(|e| format!("write {BLOCK} bytes at {WRITE_OFFSET} of {device}: {e}"))?;
    dev.sync_all().map_err(|e| format!("fsync {device}: {e}"))?;

    let back = read_back_uncached(device, &dev)?;
    if back != block {
        return Err(format!(
            "read-back mismatch at offset {WRITE_OFFSET}: got '{}'",
            first_line(&back)
        ));
    }
    println!("disk-probe wrote: {MARKER_PREFIX} {value:016x}");
    Ok(())
}

/// The 4 KiB block written at [`WRITE_OFFSET`].
pub fn marker_block(value: u64) -> Vec<u8> {
    let mut block = vec![0u8; BLOCK];
    let text = format!("{MARKER_PREFIX} {value:016x}\n");
    block[..text.len()].copy_from_slice(text.as_bytes());
    block
}

/// First line of text in `buf` (up to `\n` or NUL), or `empty`.
pub fn first_line(buf: &[u8]) -> String {
    let end = buf
        .iter()
        .position(|&b| b == b'\n' || b == 0)
        .unwrap_or(buf.len());
    let line: String = String::from_utf8_lossy(&buf[..end])
        .chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    let line = line.trim();
    if line.is_empty() {
        "empty".into()
    } else {
        line.to_string()
    }
}

/// Opens `path` read-write with O_DIRECT; where the filesystem refuses
/// O_DIRECT at open (tmpfs files in host tests), with `fallback_flags`
/// instead. Returns the file and whether it is O_DIRECT.
pub fn open_direct(path: &str, fallback_flags: i32) -> Result<(File, bool), String> {
    let open = |flags| {
        OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(flags)
            .open(path)
    };
    match open(libc::O_DIRECT) {
        Ok(f) => Ok((f, true)),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => open(fallback_flags)
            .map(|f| (f, false))
            .map_err(|e| format!("open {path}: {e}")),
        Err(e) => Err(format!("open {path} with O_DIRECT: {e}")),
    }
}

pub fn random_value() -> u64 {
    let mut b = [0u8; 8];
    if File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .is_ok()
    {
        return u64::from_le_bytes(b);
    }
    // No /dev/urandom: time and pid are unique enough for a probe.
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    t ^ ((std::process::id() as u64) << 32)
}

/// A page-aligned buffer, as O_DIRECT requires (a multiple of [`BLOCK`] long).
pub struct Aligned {
    ptr: *mut u8,
    layout: Layout,
}

impl Aligned {
    pub fn new(len: usize) -> Aligned {
        let layout = Layout::from_size_align(len, BLOCK).expect("layout");
        // SAFETY: layout has non-zero size.
        let ptr = unsafe { alloc_zeroed(layout) };
        if ptr.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        Aligned { ptr, layout }
    }
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: ptr is valid for layout.size() bytes, zero-initialised, owned.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
    }
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: as in `as_mut_slice`, shared.
        unsafe { std::slice::from_raw_parts(self.ptr, self.layout.size()) }
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with the same layout.
        unsafe { dealloc(self.ptr, self.layout) }
    }
}

/// Reads the block at [`WRITE_OFFSET`] from the device, not the page cache.
fn read_back_uncached(device: &str, dev: &File) -> Result<Vec<u8>, String> {
    if let Ok(direct) = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(device)
    {
        let mut buf = Aligned::new(BLOCK);
        match direct.read_exact_at(buf.as_mut_slice(), WRITE_OFFSET) {
            Ok(()) => return Ok(buf.as_mut_slice().to_vec()),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {} // fall back
            Err(e) => return Err(format!("O_DIRECT read-back of {device}: {e}")),
        }
    }
    // SAFETY: plain syscall on a valid fd.
    let rc = unsafe {
        libc::posix_fadvise(
            dev.as_raw_fd(),
            WRITE_OFFSET as libc::off_t,
            BLOCK as libc::off_t,
            libc::POSIX_FADV_DONTNEED,
        )
    };
    if rc != 0 {
        return Err(format!(
            "posix_fadvise(DONTNEED) on {device}: {}",
            std::io::Error::from_raw_os_error(rc)
        ));
    }
    let mut buf = vec![0u8; BLOCK];
    dev.read_exact_at(&mut buf, WRITE_OFFSET)
        .map_err(|e| format!("read-back of {device}: {e}"))?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_line_cases() {
        assert_eq!(first_line(b"hello marker\nrest"), "hello marker");
        assert_eq!(first_line(b"abc\0\0\0"), "abc");
        assert_eq!(first_line(&[0u8; 16]), "empty");
        assert_eq!(first_line(b"  \n"), "empty");
        assert_eq!(first_line(b"a\x01b\n"), "a?b");
    }

    #[test]
    fn marker_block_layout() {
        let b = marker_block(0x1234);
        assert_eq!(b.len(), BLOCK);
        assert!(b.starts_with(b"remus-guest-wrote 0000000000001234\n"));
        assert!(b[35..].iter().all(|&x| x == 0));
    }

    #[test]
    fn probe_on_a_file() {
        let path = std::env::temp_dir().join(format!("remus-disk-probe-{}", std::process::id()));
        let mut img = vec![0u8; 2 << 20];
        img[..13].copy_from_slice(b"host-marker\nx");
        std::fs::write(&path, &img).unwrap();
        probe(path.to_str().unwrap()).unwrap();
        let after = std::fs::read(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        let at = WRITE_OFFSET as usize;
        assert!(after[at..at + BLOCK].starts_with(MARKER_PREFIX.as_bytes()));
    }
}
