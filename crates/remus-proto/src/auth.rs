//! The shared key and the HMAC-SHA256 proofs of the handshake.
//!
//! Both agents of a pair hold the same secret key file. In the handshake each
//! side proves it holds the key by sending HMAC-SHA256(key, label ‖ Hello
//! payload ‖ chosen version ‖ server nonce): the Hello payload contains the
//! client's nonce, both version bounds, the purpose, the VM name and the VM
//! shape, so a proof is bound to this one session and cannot be replayed into
//! another. The two labels differ, so a proof cannot be reflected back to the
//! side that produced it. Proofs are compared in constant time by
//! [`hmac::Mac::verify_slice`].
//!
//! The same key, through [`Key::noise_psk`], keys the Noise handshake that
//! encrypts and authenticates every byte of a protocol-6 session (see
//! `channel` and the crate documentation, "Security"); these proofs then
//! run inside that channel. In a protocol-5 session in the clear they
//! authenticate the peer only.

use std::fmt;
use std::io::{self, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use hmac::{Hmac, Mac};
use sha2::Sha256;
use thiserror::Error;

use crate::wire::{NONCE_LEN, PROOF_LEN};

type HmacSha256 = Hmac<Sha256>;

const SERVER_LABEL: &[u8] = b"remus-proto server proof\0";
const CLIENT_LABEL: &[u8] = b"remus-proto client proof\0";
const NOISE_PSK_LABEL: &[u8] = b"remus-proto noise psk\0";

/// Failure to load the shared key; each names the file.
#[derive(Debug, Error)]
pub enum KeyError {
    #[error(
        "replication key {path}: file not found (create it on one host with `head -c 32 /dev/urandom > {path}; chmod 600 {path}` and copy it to the peer)"
    )]
    Missing { path: PathBuf },
    #[error("replication key {path}: cannot read: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("replication key {path}: not a regular file")]
    NotAFile { path: PathBuf },
    #[error(
        "replication key {path}: accessible by other users (mode {mode:o}); run `chmod 600 {path}`"
    )]
    WorldAccessible { path: PathBuf, mode: u32 },
    #[error(
        "replication key {path}: owned by uid {owner}, not by this agent's user ({ours}) or root; run `chown {ours} {path}`"
    )]
    ForeignOwner {
        path: PathBuf,
        owner: u32,
        ours: u32,
    },
    #[error("replication key{}: {len} bytes, at least {min} needed", at(.path))]
    TooShort {
        path: Option<PathBuf>,
        len: usize,
        min: usize,
    },
    #[error("replication key{}: longer than {max} bytes; is this the right file?", at(.path))]
    TooLong { path: Option<PathBuf>, max: usize },
}

fn at(path: &Option<PathBuf>) -> String {
    match path {
        Some(p) => format!(" {}", p.display()),
        None => String::new(),
    }
}

/// The secret both agents of a pair share. Its bytes never appear in Debug.
#[derive(Clone)]
pub struct Key(Vec<u8>);

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key(<{} secret bytes>)", self.0.len())
    }
}

impl Key {
    /// Shortest accepted key: 32 bytes, the output size of SHA-256.
    pub const MIN_LEN: usize = 32;
    /// Longest accepted key; a larger file is most likely the wrong file.
    pub const MAX_LEN: usize = 4096;

    /// Uses `bytes` as the key.
    pub fn from_bytes(bytes: &[u8]) -> Result<Key, KeyError> {
        Self::check_len(bytes, None)?;
        Ok(Key(bytes.to_vec()))
    }

    fn check_len(bytes: &[u8], path: Option<&Path>) -> Result<(), KeyError> {
        if bytes.len() < Self::MIN_LEN {
            return Err(KeyError::TooShort {
                path: path.map(Path::to_path_buf),
                len: bytes.len(),
                min: Self::MIN_LEN,
            });
        }
        if bytes.len() > Self::MAX_LEN {
            return Err(KeyError::TooLong {
                path: path.map(Path::to_path_buf),
                max: Self::MAX_LEN,
            });
        }
        Ok(())
    }

    /// Loads the key file: all its bytes are the key (32 to 4096 bytes).
    /// A file that other users may read or write is refused, as ssh refuses
    /// a private key with loose permissions: such a key is no secret.
    pub fn load(path: &Path) -> Result<Key, KeyError> {
        let io_err = |source: io::Error| {
            if source.kind() == io::ErrorKind::NotFound {
                KeyError::Missing {
                    path: path.to_path_buf(),
                }
            } else {
                KeyError::Io {
                    path: path.to_path_buf(),
                    source,
                }
            }
        };
        // Opened first, then checked through the open file: what is
        // checked is what is read (no swap between the two), and a
        // symlink is not followed.
        use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(path)
            .map_err(io_err)?;
        let meta = file.metadata().map_err(io_err)?;
        if !meta.is_file() {
            return Err(KeyError::NotAFile {
                path: path.to_path_buf(),
            });
        }
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(KeyError::WorldAccessible {
                path: path.to_path_buf(),
                mode,
            });
        }
        // SAFETY: geteuid has no preconditions.
        let ours = unsafe { libc::geteuid() };
        if meta.uid() != ours && meta.uid() != 0 {
            return Err(KeyError::ForeignOwner {
                path: path.to_path_buf(),
                owner: meta.uid(),
                ours,
            });
        }
        let mut bytes = Vec::new();
        file.take(Self::MAX_LEN as u64 + 1)
            .read_to_end(&mut bytes)
            .map_err(io_err)?;
        Self::check_len(&bytes, Some(path))?;
        Ok(Key(bytes))
    }

    /// The 32-byte pre-shared key of the encrypted channel's Noise
    /// handshake: HMAC-SHA256(key file, "remus-proto noise psk"), so a key
    /// file of any accepted length gives a uniform key.
    pub(crate) fn noise_psk(&self) -> [u8; 32] {
        let mut m =
            <HmacSha256 as Mac>::new_from_slice(&self.0).expect("HMAC takes any key length");
        m.update(NOISE_PSK_LABEL);
        m.finalize().into_bytes().into()
    }

    fn mac(
        &self,
        label: &[u8],
        hello_payload: &[u8],
        version: u16,
        server_nonce: &[u8],
    ) -> HmacSha256 {
        // HMAC accepts keys of any length; ours are 32..=4096 bytes.
        let mut m =
            <HmacSha256 as Mac>::new_from_slice(&self.0).expect("HMAC takes any key length");
        m.update(label);
        m.update(&(hello_payload.len() as u64).to_be_bytes());
        m.update(hello_payload);
        m.update(&version.to_be_bytes());
        m.update(server_nonce);
        m
    }

    pub(crate) fn server_proof(
        &self,
        hello: &[u8],
        version: u16,
        nonce: &[u8; NONCE_LEN],
    ) -> [u8; PROOF_LEN] {
        self.mac(SERVER_LABEL, hello, version, nonce)
            .finalize()
            .into_bytes()
            .into()
    }

    pub(crate) fn client_proof(
        &self,
        hello: &[u8],
        version: u16,
        nonce: &[u8; NONCE_LEN],
    ) -> [u8; PROOF_LEN] {
        self.mac(CLIENT_LABEL, hello, version, nonce)
            .finalize()
            .into_bytes()
            .into()
    }

    pub(crate) fn verify_server(
        &self,
        hello: &[u8],
        version: u16,
        nonce: &[u8; NONCE_LEN],
        proof: &[u8],
    ) -> bool {
        self.mac(SERVER_LABEL, hello, version, nonce)
            .verify_slice(proof)
            .is_ok()
    }

    pub(crate) fn verify_client(
        &self,
        hello: &[u8],
        version: u16,
        nonce: &[u8; NONCE_LEN],
        proof: &[u8],
    ) -> bool {
        self.mac(CLIENT_LABEL, hello, version, nonce)
            .verify_slice(proof)
            .is_ok()
    }
}

/// A fresh random nonce from the operating system.
pub(crate) fn nonce() -> io::Result<[u8; NONCE_LEN]> {
    let mut n = [0u8; NONCE_LEN];
    getrandom::fill(&mut n)
        .map_err(|e| io::Error::other(format!("no randomness for a nonce: {e}")))?;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    #[test]
    fn load_accepts_a_private_key_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("key");
        fs::write(&p, [7u8; 32]).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
        let k = Key::load(&p).unwrap();
        assert_eq!(format!("{k:?}"), "Key(<32 secret bytes>)");
    }

    #[test]
    fn load_errors_name_the_file_and_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("key");
        let e = Key::load(&p).unwrap_err().to_string();
        assert!(
            e.contains("not found") && e.contains("head -c 32 /dev/urandom"),
            "{e}"
        );

        fs::write(&p, [7u8; 16]).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
        let e = Key::load(&p).unwrap_err().to_string();
        assert!(e.contains("16 bytes, at least 32"), "{e}");

        fs::write(&p, [7u8; 32]).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
        let e = Key::load(&p).unwrap_err().to_string();
        assert!(e.contains("mode 644") && e.contains("chmod 600"), "{e}");

        // Group access is access by other users too.
        fs::set_permissions(&p, fs::Permissions::from_mode(0o640)).unwrap();
        let e = Key::load(&p).unwrap_err().to_string();
        assert!(e.contains("mode 640"), "{e}");
        fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
        assert!(Key::load(&p).is_ok());

        // A symlink is not followed (whoever can place one chooses the key).
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&p, &link).unwrap();
        assert!(Key::load(&link).is_err());

        // Another user's file is not this agent's secret.
        if unsafe { libc::geteuid() } == 0 {
            std::os::unix::fs::chown(&p, Some(12345), None).unwrap();
            let e = Key::load(&p).unwrap_err().to_string();
            assert!(e.contains("owned by uid 12345"), "{e}");
        }

        let e = Key::load(dir.path()).unwrap_err().to_string();
        assert!(e.contains("not a regular file"), "{e}");
    }

    #[test]
    fn proofs_depend_on_key_label_and_transcript() {
        let a = Key::from_bytes(&[1u8; 32]).unwrap();
        let b = Key::from_bytes(&[2u8; 32]).unwrap();
        let n = [9u8; NONCE_LEN];
        let p = a.server_proof(b"hello", 1, &n);
        assert!(a.verify_server(b"hello", 1, &n, &p));
        assert!(!b.verify_server(b"hello", 1, &n, &p));
        assert!(!a.verify_client(b"hello", 1, &n, &p), "labels differ");
        assert!(!a.verify_server(b"hellO", 1, &n, &p));
        assert!(!a.verify_server(b"hello", 2, &n, &p));
    }
}
