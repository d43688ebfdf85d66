//! Reading QEMU's own words: the line of its log (stderr) that says why it
//! failed, for messages an operator reads at 3 a.m.

/// The last line that reads as an error of QEMU's: one QEMU prefixed with
/// its name (`qemu-system-x86_64: ...`, how it reports every error), or
/// one that says `error`, `failed` or `abort`. The register dump QEMU
/// prints after a KVM internal error is skipped, so the line quoted is the
/// error itself.
pub fn last_error_line<'a>(lines: impl DoubleEndedIterator<Item = &'a str>) -> Option<String> {
    lines
        .rev()
        .map(str::trim)
        .find(|l| {
            let lower = l.to_ascii_lowercase();
            l.starts_with("qemu-") || l.starts_with("qemu:") || {
                let register_dump = l.contains('=') && !lower.contains("error");
                !register_dump
                    && (lower.contains("error")
                        || lower.contains("failed")
                        || lower.contains("abort"))
            }
        })
        .map(|l| l.chars().take(300).collect())
}

/// [`last_error_line`] of a log file (its last 64 KiB).
pub fn last_error_line_of(path: &std::path::Path) -> Option<String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path).ok()?;
    let len = f.metadata().ok()?.len();
    f.seek(SeekFrom::Start(len.saturating_sub(64 * 1024)))
        .ok()?;
    let mut buf = Vec::new();
    f.read_to_end(&mut buf).ok()?;
    let text = String::from_utf8_lossy(&buf);
    last_error_line(text.lines())
}

#[cfg(test)]
mod tests {
    use super::last_error_line;

    #[test]
    fn quotes_the_error_not_the_register_dump() {
        let log = "KVM internal error. Suberror: 1\n\
                   extra data[0]: 0x0000000000000000\n\
                   RAX=0000000000000000 RBX=0000000000000000\n\
                   EFER=0000000000000500\n\
                   Code=00 00 <0f> 22 c0\n";
        assert_eq!(
            last_error_line(log.lines()).as_deref(),
            Some("KVM internal error. Suberror: 1")
        );
        let log = "qemu-system-x86_64: -blockdev x: Could not open 'x'\n";
        assert_eq!(
            last_error_line(log.lines()).as_deref(),
            Some("qemu-system-x86_64: -blockdev x: Could not open 'x'")
        );
        assert_eq!(last_error_line("booting\nall fine\n".lines()), None);
    }
}
