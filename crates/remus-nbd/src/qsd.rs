//! `qemu-storage-daemon` serving one disk image over NBD on a unix socket,
//! for image formats remus does not parse itself (qcow2): QEMU's own block
//! layer handles the format, backing files included, and the agent's
//! replicating layer talks to it as an [`NbdClient`](crate::NbdClient).
//!
//! The daemon is started with `discard=unmap` on both nodes, so zeroes and
//! trims the guest sends (and the backup's initial sync writes) leave the
//! image sparse. It is killed, by its PID, when the handle drops.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::client::NbdClient;

/// A running `qemu-storage-daemon` exporting one image.
pub struct StorageDaemon {
    child: Child,
    socket: PathBuf,
    export: String,
    log: PathBuf,
}

/// Image formats served through the daemon.
pub const DAEMON_FORMATS: &[&str] = &["qcow2"];

impl StorageDaemon {
    /// Starts `binary` serving `image` (of `format`) as export `export` on
    /// unix socket `socket`, logging to `log`; waits until it answers.
    pub fn start(
        binary: &Path,
        image: &Path,
        format: &str,
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
        let ro = if read_only { "on" } else { "off" };
        let logf = std::fs::File::create(log)?;
        // Commas in a path would end the option: QEMU escapes them as ",,".
        let path = image.display().to_string().replace(',', ",,");
        let sock = socket.display().to_string().replace(',', ",,");
        let child = Command::new(binary)
            .arg("--blockdev")
            .arg(format!(
                "driver=file,node-name=file0,filename={path},read-only={ro},discard=unmap,cache.direct=off"
            ))
            .arg("--blockdev")
            .arg(format!(
                "driver={format},node-name=fmt0,file=file0,read-only={ro},discard=unmap"
            ))
            .arg("--nbd-server")
            .arg(format!("addr.type=unix,addr.path={sock}"))
            .arg("--export")
            .arg(format!(
                "type=nbd,id=exp0,node-name=fmt0,name={export},writable={}",
                if read_only { "off" } else { "on" }
            ))
            .stdin(Stdio::null())
            .stdout(logf.try_clone()?)
            .stderr(logf)
            .spawn()
            .map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!("start {} (Debian package qemu-utils): {e}", binary.display()),
                )
            })?;
        // A pid file beside the socket: if the agent dies, whoever cleans
        // up (a new agent refusing to reuse the image, a test harness)
        // finds the daemon by it.
        let _ = std::fs::write(pid_file(socket), format!("{}\n", child.id()));
        let mut d = StorageDaemon {
            child,
            socket: socket.to_path_buf(),
            export: export.to_string(),
            log: log.to_path_buf(),
        };
        let t = Instant::now();
        loop {
            if let Some(status) = d.child.try_wait()? {
                return Err(std::io::Error::other(format!(
                    "qemu-storage-daemon for {} exited ({status}): {}",
                    image.display(),
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

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn log_tail(&self) -> String {
        let s = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(5)..].join(" | ")
    }
}

impl Drop for StorageDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
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
