//! Small files of the agent's own state directory, read and written
//! whole.

use std::path::Path;

/// Reads `path` whole, refusing one longer than `max` bytes (without
/// reading past `max + 1`).
pub fn read_bounded(path: &Path, max: u64) -> std::io::Result<String> {
    use std::io::Read;
    let mut text = String::new();
    std::fs::File::open(path)?
        .take(max + 1)
        .read_to_string(&mut text)?;
    if text.len() as u64 > max {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("longer than {max} bytes"),
        ));
    }
    Ok(text)
}

/// Replaces `path` with `data` in one rename (a reader sees the old file
/// or the new one, never half of one); not synced.
pub fn replace(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, data)?;
    std::fs::rename(&tmp, path)
}
