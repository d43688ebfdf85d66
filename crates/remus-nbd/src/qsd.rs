//! `qemu-storage-daemon` serving one disk image over NBD on a unix socket,
//! for image formats remus does not parse itself (qcow2): QEMU's own block
//! layer handles the format, backing files included, and the agent's
//! replicating layer talks to it as an [`NbdClient`](crate::NbdClient).
//!
//! The daemon is started with `discard=unmap` on both nodes, so zeroes and
//! trims the guest sends (and the backup's initial sync writes) leave the
//! image sparse. It is killed when the handle drops, unless the agent
//! [detaches](StorageDaemon::detach) it to keep it serving across its own
//! restart; the next agent [adopts](StorageDaemon::adopt) it.
//!
//! The backing chain is pinned: the daemon is told each backing file and
//! its format explicitly (`"backing": null` where there is none), so it
//! never opens a file because an image header names it, and never guesses
//! a format. [`backing_chain`] reads the chain once, before the image is
//! served, and refuses a link whose format its parent does not record
//! (QEMU would probe it: a raw base image whose guest wrote a qcow2
//! header would then name any host file as its backing) and external
//! data files.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::client::NbdClient;
use crate::process::Proc;

/// A running `qemu-storage-daemon` exporting one image.
pub struct StorageDaemon {
    /// None once detached.
    proc: Option<Proc>,
    socket: PathBuf,
    export: String,
    log: PathBuf,
}

/// Image formats served through the daemon.
pub const DAEMON_FORMATS: &[&str] = &["qcow2"];
/// Formats a backing file may have.
const BACKING_FORMATS: &[&str] = &["qcow2", "raw"];
/// Longest backing chain accepted.
const MAX_CHAIN: usize = 16;

/// One backing file of an image, as the daemon is told to open it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainLink {
    pub path: PathBuf,
    pub format: String,
}

/// The backing chain of `image` (its backing file, that file's, and so
/// on; empty when it has none), read with `qemu-img info`: from the image
/// headers, which whoever made the images wrote, never a guest. Refused:
/// a link whose format its parent does not record, a format other than
/// qcow2 or raw, an external data file, a chain longer than 16.
pub fn backing_chain(qemu_img: &Path, image: &Path) -> std::io::Result<Vec<ChainLink>> {
    let bad = |why: String| std::io::Error::new(std::io::ErrorKind::InvalidData, why);
    let out = Command::new(qemu_img)
        .args(["info", "--output=json", "--backing-chain"])
        .arg(image)
        .output()
        .map_err(|e| std::io::Error::new(e.kind(), format!("run {}: {e}", qemu_img.display())))?;
    if !out.status.success() {
        return Err(bad(format!(
            "qemu-img info {}: {}",
            image.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let infos: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout)
        .map_err(|e| bad(format!("qemu-img info {}: {e}", image.display())))?;
    if infos.len() > MAX_CHAIN {
        return Err(bad(format!(
            "{}: a backing chain of {} images (at most {MAX_CHAIN})",
            image.display(),
            infos.len()
        )));
    }
    let mut chain = Vec::new();
    for (i, info) in infos.iter().enumerate() {
        let name = info["filename"].as_str().unwrap_or("?");
        if info["format-specific"]["data"]["data-file"].is_string() {
            return Err(bad(format!(
                "{name} has an external data file, which remus does not serve"
            )));
        }
        let Some(backing) = info["full-backing-filename"].as_str() else {
            break;
        };
        let Some(format) = info["backing-filename-format"].as_str() else {
            return Err(bad(format!(
                "{name} names its backing file {backing} without its format; record it with `qemu-img rebase -u -F FORMAT -b {backing} {name}` (remus never guesses a format)"
            )));
        };
        if !BACKING_FORMATS.contains(&format) {
            return Err(bad(format!(
                "{name}: backing file {backing} of format {format} (qcow2 or raw expected)"
            )));
        }
        if infos.get(i + 1).is_none() {
            return Err(bad(format!(
                "{name}: backing file {backing} missing from qemu-img's answer"
            )));
        }
        chain.push(ChainLink {
            path: PathBuf::from(backing),
            format: format.to_string(),
        });
    }
    Ok(chain)
}

/// The daemon's `--blockdev` for `image` (qcow2) and its pinned `chain`,
/// in QEMU's JSON syntax (the only one that says "no backing file").
fn blockdev(image: &Path, chain: &[ChainLink], read_only: bool) -> serde_json::Value {
    use serde_json::json;
    let file = |p: &Path, ro: bool| {
        json!({"driver": "file", "filename": p.display().to_string(), "read-only": ro,
               "discard": "unmap", "cache": {"direct": false}})
    };
    // From the deepest backing file up: each node's backing is the one below.
    let mut below = serde_json::Value::Null;
    for link in chain.iter().rev() {
        let mut node = json!({"driver": link.format, "read-only": true,
                              "file": file(&link.path, true)});
        if link.format == "qcow2" {
            node["backing"] = below;
        }
        below = node;
    }
    json!({"driver": "qcow2", "node-name": "fmt0", "read-only": read_only, "discard": "unmap",
           "file": file(image, read_only), "backing": below})
}

impl StorageDaemon {
    /// Starts `binary` serving `image` (of `format`, with the pinned
    /// backing `chain` from [`backing_chain`]) as export `export` on unix
    /// socket `socket`, logging to `log`; waits until it answers.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        binary: &Path,
        image: &Path,
        format: &str,
        chain: &[ChainLink],
        read_only: bool,
        socket: &Path,
        export: &str,
        log: &Path,
    ) -> std::io::Result<StorageDaemon> {
        if !DAEMON_FORMATS.contains(&format) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("image format '{format}' is not served by qemu-storage-daemon here"),
            ));
        }
        let _ = std::fs::remove_file(socket);
        let logf = std::fs::File::create(log)?;
        // Commas in a path would end the option: QEMU escapes them as ",,".
        let sock = socket.display().to_string().replace(',', ",,");
        let proc = Proc::spawn(
            Command::new(binary)
                .arg("--blockdev")
                .arg(blockdev(image, chain, read_only).to_string())
                .arg("--nbd-server")
                .arg(format!("addr.type=unix,addr.path={sock}"))
                .arg("--export")
                .arg(format!(
                    "type=nbd,id=exp0,node-name=fmt0,name={export},writable={}",
                    if read_only { "off" } else { "on" }
                ))
                .stdin(Stdio::null())
                .stdout(logf.try_clone()?)
                .stderr(logf),
        )
        .map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!(
                    "start {} (Debian package qemu-utils): {e}",
                    binary.display()
                ),
            )
        })?;
        // A pid file beside the socket: if the agent dies, whoever cleans
        // up (a new agent refusing to reuse the image, a test harness)
        // finds the daemon by it.
        let _ = std::fs::write(pid_file(socket), format!("{}\n", proc.pid()));
        let d = StorageDaemon {
            proc: Some(proc),
            socket: socket.to_path_buf(),
            export: export.to_string(),
            log: log.to_path_buf(),
        };
        let t = Instant::now();
        loop {
            if let Some(p) = &d.proc
                && p.poll(Some(Duration::ZERO))?
            {
                return Err(std::io::Error::other(format!(
                    "qemu-storage-daemon for {} exited ({}): {}",
                    image.display(),
                    p.reap(),
                    d.log_tail()
                )));
            }
            if std::os::unix::net::UnixStream::connect(socket).is_ok() {
                return Ok(d);
            }
            if t.elapsed() > Duration::from_secs(30) {
                return Err(std::io::Error::other(format!(
                    "qemu-storage-daemon for {} did not listen within 30 s: {}",
                    image.display(),
                    d.log_tail()
                )));
            }
            // The daemon has no readiness notification we can wait on
            // without a QMP monitor; its socket appears within ms.
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// A client connection to the export.
    pub fn connect(&self) -> std::io::Result<NbdClient> {
        NbdClient::connect_unix(&self.socket, &self.export)
    }

    /// Takes over the daemon a previous agent started (PID `pid`, start
    /// time `start`) and detached, serving `export` on `socket`; an error
    /// when it no longer runs or does not answer.
    pub fn adopt(
        pid: u32,
        start: u64,
        socket: &Path,
        export: &str,
        log: &Path,
    ) -> std::io::Result<StorageDaemon> {
        let d = StorageDaemon {
            proc: Some(Proc::adopt(pid, start)?),
            socket: socket.to_path_buf(),
            export: export.to_string(),
            log: log.to_path_buf(),
        };
        std::os::unix::net::UnixStream::connect(socket)?;
        Ok(d)
    }

    pub fn pid(&self) -> u32 {
        self.proc.as_ref().map_or(0, Proc::pid)
    }

    /// The daemon's start time (see [`Proc::start_time`]); 0 once detached.
    pub fn start_time(&self) -> u64 {
        self.proc.as_ref().map_or(0, Proc::start_time)
    }

    /// Leaves the daemon running (and its socket and PID file in place)
    /// for the next agent to adopt.
    pub fn detach(mut self) {
        self.proc = None;
    }

    fn log_tail(&self) -> String {
        let s = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(5)..].join(" | ")
    }
}

impl Drop for StorageDaemon {
    fn drop(&mut self) {
        let Some(p) = self.proc.take() else {
            return;
        };
        p.kill();
        let _ = p.poll(Some(Duration::from_secs(10)));
        p.reap();
        let _ = std::fs::remove_file(&self.socket);
        let _ = std::fs::remove_file(pid_file(&self.socket));
    }
}

/// The pid file of the daemon listening on `socket`: `qsd-vda.sock` →
/// `qsd-vda.pid`.
pub fn pid_file(socket: &Path) -> PathBuf {
    socket.with_extension("pid")
}

/// The guest-visible size of a qcow2 image, from its header (bytes 24..32,
/// big-endian), or an error naming what is wrong.
pub fn qcow2_virtual_size(path: &Path) -> std::io::Result<u64> {
    use std::io::Read;
    let mut h = [0u8; 32];
    std::fs::File::open(path)?.read_exact(&mut h)?;
    if !is_qcow2_header(&h) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{} is not a qcow2 image", path.display()),
        ));
    }
    Ok(u64::from_be_bytes(h[24..32].try_into().unwrap_or_default()))
}

/// The guest-visible size of an image of `format` (`raw`: the file's
/// length).
pub fn image_size(path: &Path, format: &str) -> std::io::Result<u64> {
    match format {
        "qcow2" => qcow2_virtual_size(path),
        _ => Ok(std::fs::metadata(path)?.len()),
    }
}

fn is_qcow2_header(header: &[u8]) -> bool {
    header.starts_with(b"QFI\xfb")
}
