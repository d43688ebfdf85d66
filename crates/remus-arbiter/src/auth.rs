//! etcd user/password authentication: the password comes from a file
//! that only its owner (and group) can read, like the replication key,
//! and never appears in an error, a log line or a `Debug` output.

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use crate::ArbiterError;

/// An etcd user's password. `Debug` shows neither it nor its length.
#[derive(Clone)]
pub struct Password(String);

impl std::fmt::Debug for Password {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Password(<secret>)")
    }
}

impl Password {
    /// Longest password file read.
    pub const MAX_LEN: usize = 1024;

    /// Reads a password file: a regular file that other users cannot
    /// read, UTF-8, one line (trailing newlines are dropped), at most
    /// [`Password::MAX_LEN`] bytes, not empty. Errors name the file and
    /// never quote it.
    pub fn from_file(path: &Path) -> Result<Password, ArbiterError> {
        let err = |reason: String| ArbiterError::PasswordFile {
            path: path.to_path_buf(),
            reason,
        };
        let bytes = read_private(path, Self::MAX_LEN as u64, "a password file").map_err(err)?;
        let text = String::from_utf8(bytes).map_err(|_| err("not UTF-8 text".into()))?;
        let pw = text.trim_end_matches(['\n', '\r']);
        if pw.contains(['\n', '\r']) {
            return Err(err(
                "more than one line: the file must hold the password alone".into(),
            ));
        }
        Password::new(pw).map_err(|_| err("empty".into()))
    }

    /// A password given directly (not empty).
    pub fn new(password: &str) -> Result<Password, ArbiterError> {
        if password.is_empty() {
            return Err(ArbiterError::Config("empty etcd password".into()));
        }
        Ok(Password(password.to_string()))
    }

    pub(crate) fn expose(&self) -> &str {
        &self.0
    }
}

/// Reads a file that holds a secret (a password, a TLS private key): a
/// regular file owned by this user or root that other users cannot access
/// (its group may read it, not write it: `root:remus 0640` is a usual way
/// to share it), at most `max` bytes.
/// The checks are made on the opened file, so what is checked is what is
/// read. A symlink is followed (certbot's keys are symlinks); the file it
/// leads to is what is checked. Errors never quote the contents.
pub(crate) fn read_private(path: &Path, max: u64, what: &str) -> Result<Vec<u8>, String> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        // A FIFO must not block the agent's start.
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| e.to_string())?;
    let meta = file.metadata().map_err(|e| e.to_string())?;
    if !meta.is_file() {
        return Err("not a regular file".into());
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o027 != 0 {
        return Err(format!(
            "other users can access it (mode {mode:o}): chmod 600 {}",
            path.display()
        ));
    }
    // SAFETY: geteuid has no preconditions.
    let ours = unsafe { libc::geteuid() };
    let owner = std::os::unix::fs::MetadataExt::uid(&meta);
    if owner != ours && owner != 0 {
        return Err(format!(
            "it belongs to user {owner}, not to this agent's user ({ours}) or root"
        ));
    }
    let mut bytes = Vec::new();
    file.take(max + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| e.to_string())?;
    if bytes.len() as u64 > max {
        return Err(format!("longer than {max} bytes: not {what}"));
    }
    Ok(bytes)
}

/// The etcd user the arbiter logs in as.
#[derive(Debug, Clone)]
pub struct Credentials {
    pub user: String,
    pub password: Password,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn file(dir: &Path, text: &[u8], mode: u32) -> std::path::PathBuf {
        let p = dir.join("pw");
        let _ = fs::remove_file(&p);
        fs::write(&p, text).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    #[test]
    fn reads_one_line_and_drops_the_newline() {
        let dir = tempfile::tempdir().unwrap();
        for text in [&b"s3cret pass"[..], b"s3cret pass\n", b"s3cret pass\r\n"] {
            let p = file(dir.path(), text, 0o600);
            assert_eq!(Password::from_file(&p).unwrap().expose(), "s3cret pass");
        }
        let p = file(dir.path(), b"s3cret\n", 0o640);
        assert!(Password::from_file(&p).is_ok(), "group-readable is fine");
    }

    #[test]
    fn refusals_name_the_file_and_never_the_password() {
        let dir = tempfile::tempdir().unwrap();
        let msg = |text: &[u8], mode: u32| {
            let p = file(dir.path(), text, mode);
            let e = Password::from_file(&p).unwrap_err().to_string();
            assert!(e.contains(&p.display().to_string()), "{e}");
            assert!(!e.contains("hunter2"), "the password leaked: {e}");
            e
        };
        let e = msg(b"hunter2\n", 0o644);
        assert!(e.contains("mode 644") && e.contains("chmod 600"), "{e}");
        let e = msg(b"hunter2\n", 0o604);
        assert!(e.contains("mode 604"), "{e}");
        let e = msg(b"hunter2\n", 0o660);
        assert!(e.contains("mode 660"), "group-writable: {e}");
        let e = msg(b"\n", 0o600);
        assert!(e.contains("empty"), "{e}");
        let e = msg(b"hunter2\nhunter3\n", 0o600);
        assert!(e.contains("more than one line"), "{e}");
        let e = msg(&[b'x'; Password::MAX_LEN + 1], 0o600);
        assert!(e.contains("longer than 1024 bytes"), "{e}");
        let e = msg(b"hunter2\xff", 0o600);
        assert!(e.contains("not UTF-8"), "{e}");
        let e = Password::from_file(dir.path()).unwrap_err().to_string();
        assert!(e.contains("not a regular file"), "{e}");
        let e = Password::from_file(&dir.path().join("missing"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing") && e.contains("No such file"), "{e}");
        let p = Password::new("hunter2").unwrap();
        assert!(!format!("{p:?}").contains("hunter2"));
    }
}
