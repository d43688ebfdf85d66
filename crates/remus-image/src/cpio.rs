//! A minimal writer (and reader, for tests and checks) of the `newc` cpio
//! format the kernel unpacks as an initramfs.
//!
//! Why by hand rather than `find | cpio -o` or a crate: the archive is built
//! from memory, so the output is a pure function of its entries — sorted by
//! path, inode numbers assigned in that order, mtime 0, uid/gid 0 — and the
//! same inputs give byte-identical `initrd.img` (the image cache key relies on
//! it). It also lets us put device nodes (`/dev/console`) in the archive
//! without creating them on the host (which would need mknod), and it is
//! about sixty lines.

use crate::error::{Error, Result};
use std::collections::BTreeMap;

const MAGIC: &[u8; 6] = b"070701";
const HEADER_LEN: usize = 110;
const TRAILER: &str = "TRAILER!!!";

pub const S_IFDIR: u32 = 0o040000;
pub const S_IFREG: u32 = 0o100000;
pub const S_IFLNK: u32 = 0o120000;
pub const S_IFCHR: u32 = 0o020000;
pub const S_IFMT: u32 = 0o170000;

/// What an entry is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    Dir,
    File(Vec<u8>),
    Symlink(String),
    CharDev { major: u32, minor: u32 },
}

/// An archive under construction: entries keyed (and written) by path.
#[derive(Debug, Clone, Default)]
pub struct Archive {
    entries: BTreeMap<String, (Kind, u32)>,
}

fn clean(path: &str) -> Result<String> {
    let p = path.trim_start_matches("./").trim_start_matches('/');
    if p.is_empty() || p.split('/').any(|c| c.is_empty() || c == "." || c == "..") {
        return Err(Error::Cpio(format!("bad path '{path}'")));
    }
    Ok(p.to_string())
}

impl Archive {
    pub fn new() -> Archive {
        Archive::default()
    }

    /// Adds an entry (permission bits in `perm`), creating missing parent
    /// directories (0755). Adding a path twice is an error, except a directory.
    pub fn add(&mut self, path: &str, perm: u32, kind: Kind) -> Result<&mut Archive> {
        let path = clean(path)?;
        let mut parent = String::new();
        for comp in path
            .split('/')
            .collect::<Vec<_>>()
            .split_last()
            .map(|(_, p)| p)
            .unwrap_or(&[])
        {
            if !parent.is_empty() {
                parent.push('/');
            }
            parent.push_str(comp);
            match self.entries.get(&parent) {
                None => {
                    self.entries.insert(parent.clone(), (Kind::Dir, 0o755));
                }
                Some((Kind::Dir, _)) => {}
                Some(_) => return Err(Error::Cpio(format!("'{parent}' is not a directory"))),
            }
        }
        match self.entries.get(&path) {
            Some((Kind::Dir, _)) if kind == Kind::Dir => {}
            Some(_) => return Err(Error::Cpio(format!("duplicate entry '{path}'"))),
            None => {}
        }
        self.entries.insert(path, (kind, perm & 0o7777));
        Ok(self)
    }

    pub fn dir(&mut self, path: &str, perm: u32) -> Result<&mut Archive> {
        self.add(path, perm, Kind::Dir)
    }
    pub fn file(&mut self, path: &str, perm: u32, data: Vec<u8>) -> Result<&mut Archive> {
        self.add(path, perm, Kind::File(data))
    }
    pub fn symlink(&mut self, path: &str, target: &str) -> Result<&mut Archive> {
        self.add(path, 0o777, Kind::Symlink(target.to_string()))
    }
    pub fn char_dev(
        &mut self,
        path: &str,
        perm: u32,
        major: u32,
        minor: u32,
    ) -> Result<&mut Archive> {
        self.add(path, perm, Kind::CharDev { major, minor })
    }

    pub fn paths(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    /// The archive as newc bytes, trailer included.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for (i, (path, (kind, perm))) in self.entries.iter().enumerate() {
            let (ftype, data, nlink, rdev): (u32, &[u8], u32, (u32, u32)) = match kind {
                Kind::Dir => (S_IFDIR, &[], 2, (0, 0)),
                Kind::File(d) => (S_IFREG, d, 1, (0, 0)),
                Kind::Symlink(t) => (S_IFLNK, t.as_bytes(), 1, (0, 0)),
                Kind::CharDev { major, minor } => (S_IFCHR, &[], 1, (*major, *minor)),
            };
            write_entry(
                &mut out,
                i as u32 + 1,
                ftype | perm,
                nlink,
                rdev,
                path,
                data,
            );
        }
        write_entry(&mut out, 0, 0, 1, (0, 0), TRAILER, &[]);
        out
    }
}

fn pad4(out: &mut Vec<u8>) {
    out.resize(out.len().next_multiple_of(4), 0);
}

fn write_entry(
    out: &mut Vec<u8>,
    ino: u32,
    mode: u32,
    nlink: u32,
    rdev: (u32, u32),
    name: &str,
    data: &[u8],
) {
    // ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor rdevminor namesize check
    let fields = [
        ino,
        mode,
        0,
        0,
        nlink,
        0,
        data.len() as u32,
        0,
        0,
        rdev.0,
        rdev.1,
        name.len() as u32 + 1,
        0,
    ];
    out.extend_from_slice(MAGIC);
    for f in fields {
        out.extend_from_slice(format!("{f:08x}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    pad4(out);
    out.extend_from_slice(data);
    pad4(out);
}

/// One entry read back from a newc archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadEntry {
    pub path: String,
    /// File type and permission bits.
    pub mode: u32,
    pub data: Vec<u8>,
    pub rdev: (u32, u32),
}

/// Parses a newc archive up to its trailer.
pub fn read(bytes: &[u8]) -> Result<Vec<ReadEntry>> {
    let bad = |at: usize, what: &str| Error::Cpio(format!("offset {at}: {what}"));
    let mut pos = 0;
    let mut out = Vec::new();
    loop {
        let hdr = bytes
            .get(pos..pos + HEADER_LEN)
            .ok_or_else(|| bad(pos, "truncated header"))?;
        if &hdr[..6] != MAGIC {
            return Err(bad(pos, "bad magic (not newc)"));
        }
        let field = |i: usize| -> Result<u32> {
            let s = std::str::from_utf8(&hdr[6 + 8 * i..14 + 8 * i])
                .map_err(|_| bad(pos, "non-ASCII header"))?;
            u32::from_str_radix(s, 16).map_err(|_| bad(pos, "bad hex field"))
        };
        let (mode, size, rdev, namesize) = (
            field(1)?,
            field(6)? as usize,
            (field(9)?, field(10)?),
            field(11)? as usize,
        );
        let name_start = pos + HEADER_LEN;
        let name = bytes
            .get(name_start..name_start + namesize.saturating_sub(1))
            .ok_or_else(|| bad(pos, "truncated name"))?;
        let name = String::from_utf8_lossy(name).into_owned();
        let data_start = (name_start + namesize).next_multiple_of(4);
        let data = bytes
            .get(data_start..data_start + size)
            .ok_or_else(|| bad(pos, "truncated data"))?;
        pos = (data_start + size).next_multiple_of(4);
        if name == TRAILER {
            return Ok(out);
        }
        out.push(ReadEntry {
            path: name,
            mode,
            data: data.to_vec(),
            rdev,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parents_sorted_and_round_trip() {
        let mut a = Archive::new();
        a.file("bin/busybox", 0o755, b"BB".to_vec()).unwrap();
        a.symlink("bin/sh", "busybox").unwrap();
        a.file("init", 0o755, b"#!/bin/sh\n".to_vec()).unwrap();
        a.char_dev("dev/console", 0o600, 5, 1).unwrap();
        a.dir("proc", 0o555).unwrap();
        let bytes = a.to_bytes();
        assert_eq!(bytes.len() % 4, 0);
        let r = read(&bytes).unwrap();
        let paths: Vec<_> = r.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "bin",
                "bin/busybox",
                "bin/sh",
                "dev",
                "dev/console",
                "init",
                "proc"
            ]
        );
        assert_eq!(r[1].data, b"BB");
        assert_eq!(r[1].mode, S_IFREG | 0o755);
        assert_eq!(r[2].mode & S_IFMT, S_IFLNK);
        assert_eq!(r[2].data, b"busybox");
        assert_eq!(r[4].rdev, (5, 1));
        assert_eq!(r[6].mode, S_IFDIR | 0o555);
    }

    #[test]
    fn duplicates_and_bad_paths() {
        let mut a = Archive::new();
        a.file("a/b", 0o644, vec![]).unwrap();
        assert!(a.file("a/b", 0o644, vec![]).is_err());
        assert!(a.file("a/b/c", 0o644, vec![]).is_err());
        assert!(a.dir("a", 0o755).is_ok());
        assert!(a.file("../x", 0o644, vec![]).is_err());
        assert!(a.file("", 0o644, vec![]).is_err());
    }
}
