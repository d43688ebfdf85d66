//! Error types: [`NbdError`] for setting up servers and backends, and
//! [`ProtoError`] for malformed wire data seen by the protocol decoders.

use std::io;
use std::path::PathBuf;

/// Errors returned when opening a backend or starting/running a server.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    /// The disk image could not be opened.
    #[error("cannot open disk image {path} ({mode}): {source}")]
    Open {
        path: PathBuf,
        mode: &'static str,
        #[source]
        source: io::Error,
    },
    /// The disk image is not something we can export (e.g. a directory).
    #[error("cannot export {path}: {reason}")]
    NotExportable { path: PathBuf, reason: String },
    /// The export name is not a valid NBD string.
    #[error("invalid export name {name:?}: {reason}")]
    InvalidExportName { name: String, reason: &'static str },
    /// The socket path is occupied by something we must not remove, or a
    /// live server already listens there.
    #[error("socket path {path} is in use: {reason}")]
    SocketInUse { path: PathBuf, reason: String },
    /// Binding or configuring the listening socket failed.
    #[error("cannot listen on {path}: {source}")]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Any other I/O failure (e.g. spawning a thread).
    #[error("{context}: {source}")]
    Io {
        context: &'static str,
        #[source]
        source: io::Error,
    },
}

/// A decoding failure for data received from an NBD peer. Decoders return
/// this instead of panicking, whatever the input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    /// Fewer bytes than the fixed-size structure needs.
    #[error("short buffer: need {need} bytes, got {got}")]
    Short { need: usize, got: usize },
    /// More bytes than the structure may contain.
    #[error("trailing data: {extra} unexpected bytes")]
    Trailing { extra: usize },
    /// A magic number did not match.
    #[error("bad magic {got:#x}, expected {expected:#x}")]
    BadMagic { expected: u64, got: u64 },
    /// A length field points outside the data that holds it.
    #[error("length field {len} exceeds the {available} bytes available")]
    BadLength { len: u64, available: usize },
    /// A string is not valid per the NBD rules (UTF-8, no NUL, <= 4096 bytes).
    #[error("invalid string: {0}")]
    BadString(&'static str),
}
