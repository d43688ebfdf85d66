//! Typed errors of the image builder. Each variant says what was being done
//! (which package, file or command) so the message alone is actionable.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{context}: {path}: {source}")]
    Io {
        context: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("cannot run `{command}` (is it installed and on PATH?): {source}")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },

    #[error("`{command}` failed ({status}){}", fmt_stderr(.stderr))]
    CommandFailed {
        command: String,
        status: std::process::ExitStatus,
        stderr: String,
    },

    #[error(
        "apt has no package lists, so `{package}` cannot be resolved or downloaded, and no \
         cached .deb was found in {cache}; run `apt-get update` (as root) and retry"
    )]
    AptListsMissing { package: String, cache: PathBuf },

    #[error("cannot resolve `{package}`: {detail}")]
    Resolve { package: String, detail: String },

    #[error("`apt-get download {package}` succeeded but no {package}_*.deb appeared in {cache}")]
    DebMissingAfterDownload { package: String, cache: PathBuf },

    #[error("package {package}: {detail}")]
    PackageContents { package: String, detail: String },

    #[error("kernel module {module}: {detail}")]
    Module { module: String, detail: String },

    #[error("kernel module dependency cycle: {0}")]
    ModuleCycle(String),

    #[error("cannot make an uncompressed vmlinux: {0}")]
    Vmlinux(String),

    #[error("cpio: {0}")]
    Cpio(String),

    #[error("guest binary {path}: {detail}")]
    GuestBinary { path: PathBuf, detail: String },

    #[error(
        "cannot find the remus workspace root (a directory with Cargo.toml and crates/remus-guest); searched {searched}"
    )]
    NoWorkspace { searched: String },

    #[error("manifest {path}: {source}")]
    Manifest {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

fn fmt_stderr(stderr: &str) -> String {
    let s = stderr.trim();
    if s.is_empty() {
        String::new()
    } else {
        format!(":\n{s}")
    }
}

impl Error {
    pub(crate) fn io(
        context: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.into();
        move |source| Error::Io {
            context,
            path,
            source,
        }
    }
}
