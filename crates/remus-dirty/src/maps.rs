//! Finding QEMU's mapping(s) of the RAM file in `/proc/<pid>/maps`.
//!
//! Entries are matched by device and inode rather than by path text, so a
//! symlinked, renamed or already-unlinked RAM file (" (deleted)") is still
//! found. Adjacent entries are merged: QEMU's `madvise` calls can split its
//! one mapping into several VMAs.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::DirtyError;

/// A stretch of QEMU's address space mapping the RAM file from
/// `file_offset` on: addresses `[start, end)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Segment {
    pub start: u64,
    pub end: u64,
    pub file_offset: u64,
}

/// Shared mappings of `ram_file` in process `pid`, merged, by address.
pub(crate) fn find_segments(pid: u32, ram_file: &Path) -> Result<Vec<Segment>, DirtyError> {
    let meta = std::fs::metadata(ram_file).map_err(|source| DirtyError::RamFile {
        path: ram_file.to_owned(),
        op: "stat",
        source,
    })?;
    let maps_path = PathBuf::from(format!("/proc/{pid}/maps"));
    let maps = std::fs::read_to_string(&maps_path).map_err(|source| DirtyError::Proc {
        path: maps_path,
        source,
    })?;
    let (major, minor) = (libc::major(meta.dev()), libc::minor(meta.dev()));
    let segments = parse_maps(&maps, major, minor, meta.ino());
    if segments.is_empty() {
        return Err(DirtyError::NotMapped {
            pid,
            path: ram_file.to_owned(),
        });
    }
    Ok(segments)
}

/// One maps line: `start-end perms offset major:minor inode [path]`.
fn parse_line(line: &str) -> Option<(Segment, bool, u32, u32, u64)> {
    let mut fields = line.split_ascii_whitespace();
    let (start, end) = fields.next()?.split_once('-')?;
    let perms = fields.next()?;
    let offset = fields.next()?;
    let (major, minor) = fields.next()?.split_once(':')?;
    let inode = fields.next()?.parse().ok()?;
    let segment = Segment {
        start: u64::from_str_radix(start, 16).ok()?,
        end: u64::from_str_radix(end, 16).ok()?,
        file_offset: u64::from_str_radix(offset, 16).ok()?,
    };
    let shared = perms.as_bytes().get(3) == Some(&b's');
    Some((
        segment,
        shared,
        u32::from_str_radix(major, 16).ok()?,
        u32::from_str_radix(minor, 16).ok()?,
        inode,
    ))
}

fn parse_maps(maps: &str, major: u32, minor: u32, inode: u64) -> Vec<Segment> {
    let mut segments: Vec<Segment> = Vec::new();
    for (segment, shared, maj, min, ino) in maps.lines().filter_map(parse_line) {
        if !shared || (maj, min, ino) != (major, minor, inode) {
            continue;
        }
        if let Some(last) = segments.last_mut()
            && last.end == segment.start
            && last.file_offset + (last.end - last.start) == segment.file_offset
        {
            last.end = segment.end;
            continue;
        }
        segments.push(segment);
    }
    segments
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_vmas_of_the_file_are_merged_and_others_ignored() {
        let maps = "\
7f0000000000-7f0000200000 rw-s 00000000 00:1a 42 /dev/shm/ram (deleted)
7f0000200000-7f0004000000 rw-s 00200000 00:1a 42 /dev/shm/ram (deleted)
7f0004000000-7f0004001000 rw-p 00000000 00:1a 42 /dev/shm/ram (deleted)
7f0005000000-7f0005001000 rw-s 00000000 00:1a 43 /dev/shm/other
7f0006000000-7f0006001000 rw-s 00000000 00:1b 42 /elsewhere
garbage line
7f0008000000-7f0008001000 r--s 00100000 00:1a 42 /dev/shm/ram
";
        assert_eq!(
            parse_maps(maps, 0, 0x1a, 42),
            vec![
                Segment {
                    start: 0x7f00_0000_0000,
                    end: 0x7f00_0400_0000,
                    file_offset: 0
                },
                Segment {
                    start: 0x7f00_0800_0000,
                    end: 0x7f00_0800_1000,
                    file_offset: 0x10_0000
                },
            ]
        );
    }
}
