//! The console hub: owns a VM's serial console.
//!
//! QEMU's socket chardev drops output (and skips its own `logfile=`) while
//! no client is connected, so a log written by QEMU would miss everything
//! printed while nobody is attached. Instead the hub listens on
//! `console.sock` *before* QEMU starts and QEMU connects to it as a client
//! (`server=off`) while it initialises, so no byte is lost. The hub appends
//! everything to `console.log` and bridges one attached client at a time,
//! which connects to `console-attach.sock`.

use crate::logfile::CappedLog;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

struct Shared {
    /// The attached client, if any.
    client: Mutex<Option<UnixStream>>,
    /// QEMU's side, once connected.
    qemu: Mutex<Option<UnixStream>>,
    stop: AtomicBool,
}

/// A running console hub.
pub struct ConsoleHub {
    shared: Arc<Shared>,
    qemu_listener_path: PathBuf,
    attach_path: PathBuf,
    threads: Vec<JoinHandle<()>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn bind(path: &Path) -> std::io::Result<UnixListener> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    UnixListener::bind(path)
}

impl ConsoleHub {
    /// Listens on `qemu_path` (for QEMU) and `attach_path` (for clients)
    /// and logs to `log_path`.
    pub fn start(qemu_path: &Path, attach_path: &Path, log_path: &Path) -> std::io::Result<Self> {
        let qemu_listener = bind(qemu_path)?;
        let attach_listener = bind(attach_path)?;
        // Capped: the guest decides how much it prints.
        let log = CappedLog::open(log_path)?;
        let shared = Arc::new(Shared {
            client: Mutex::new(None),
            qemu: Mutex::new(None),
            stop: AtomicBool::new(false),
        });
        let s1 = shared.clone();
        let t1 = std::thread::Builder::new()
            .name("console-out".into())
            .spawn(move || output_loop(qemu_listener, log, s1))?;
        let s2 = shared.clone();
        let t2 = std::thread::Builder::new()
            .name("console-attach".into())
            .spawn(move || attach_loop(attach_listener, s2))?;
        Ok(ConsoleHub {
            shared,
            qemu_listener_path: qemu_path.to_path_buf(),
            attach_path: attach_path.to_path_buf(),
            threads: vec![t1, t2],
        })
    }

    /// Stops the hub and removes its sockets.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        let qemu = lock(&self.shared.qemu).take();
        if let Some(q) = qemu {
            let _ = q.shutdown(std::net::Shutdown::Both);
        }
        let client = lock(&self.shared.client).take();
        if let Some(c) = client {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
        // Wake the accept calls.
        let _ = UnixStream::connect(&self.qemu_listener_path);
        let _ = UnixStream::connect(&self.attach_path);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.qemu_listener_path);
        let _ = std::fs::remove_file(&self.attach_path);
    }
}

impl Drop for ConsoleHub {
    fn drop(&mut self) {
        if !self.threads.is_empty() {
            self.stop();
        }
    }
}

/// Accepts QEMU (again after a reconnect) and copies its output to the log
/// and the attached client.
fn output_loop(listener: UnixListener, mut log: CappedLog, shared: Arc<Shared>) {
    let mut buf = [0u8; 4096];
    while !shared.stop.load(Ordering::SeqCst) {
        let Ok((mut qemu, _)) = listener.accept() else {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        };
        if shared.stop.load(Ordering::SeqCst) {
            break;
        }
        match qemu.try_clone() {
            Ok(w) => *lock(&shared.qemu) = Some(w),
            Err(e) => {
                tracing::warn!(error = %e, "console: cannot clone QEMU's stream");
                continue;
            }
        }
        loop {
            let n = match qemu.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if let Err(e) = log.write(&buf[..n]) {
                tracing::warn!(error = %e, "console: cannot write the log");
            }
            let mut client = lock(&shared.client);
            if let Some(c) = client.as_mut()
                && c.write_all(&buf[..n]).is_err()
            {
                let _ = c.shutdown(std::net::Shutdown::Both);
                *client = None;
            }
        }
        *lock(&shared.qemu) = None;
    }
}

/// Accepts one client at a time and forwards its input to QEMU.
fn attach_loop(listener: UnixListener, shared: Arc<Shared>) {
    let mut buf = [0u8; 1024];
    while !shared.stop.load(Ordering::SeqCst) {
        let Ok((mut client, _)) = listener.accept() else {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        };
        if shared.stop.load(Ordering::SeqCst) {
            break;
        }
        // A client that stops reading is dropped after a second rather than
        // stalling QEMU's serial output (and with it the guest).
        let _ = client.set_write_timeout(Some(Duration::from_secs(1)));
        match client.try_clone() {
            Ok(w) => *lock(&shared.client) = Some(w),
            Err(_) => continue,
        }
        // Serve this client until it leaves; a second client waits in the
        // accept queue (the agent refuses a second attach before that).
        loop {
            let n = match client.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let mut qemu = lock(&shared.qemu);
            if let Some(q) = qemu.as_mut() {
                let _ = q.write_all(&buf[..n]);
            }
        }
        let client = lock(&shared.client).take();
        if let Some(c) = client {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_without_client_and_bridges_a_client() {
        let dir = tempfile::tempdir().unwrap();
        let q = dir.path().join("console.sock");
        let a = dir.path().join("attach.sock");
        let log = dir.path().join("console.log");
        let hub = ConsoleHub::start(&q, &a, &log).unwrap();
        let mut qemu = UnixStream::connect(&q).unwrap();
        qemu.write_all(b"early boot\n").unwrap();
        let mut client = UnixStream::connect(&a).unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        // The client is registered asynchronously, possibly before the hub
        // has read "early boot": send lines until the client has seen one.
        let mut got = Vec::new();
        let mut b = [0u8; 64];
        for i in 0..100 {
            qemu.write_all(format!("line {i}\n").as_bytes()).unwrap();
            client
                .set_read_timeout(Some(Duration::from_millis(50)))
                .unwrap();
            while let Ok(n) = client.read(&mut b) {
                got.extend_from_slice(&b[..n]);
                if n == 0 || String::from_utf8_lossy(&got).contains("line") {
                    break;
                }
            }
            if String::from_utf8_lossy(&got).contains("line") {
                break;
            }
        }
        assert!(String::from_utf8_lossy(&got).contains("line"), "{got:?}");
        client.write_all(b"ls\n").unwrap();
        qemu.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let n = qemu.read(&mut b).unwrap();
        assert_eq!(&b[..n], b"ls\n");
        drop(qemu);
        hub.shutdown();
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(text.starts_with("early boot\nline 0\n"), "{text}");
        assert!(!q.exists() && !a.exists());
    }
}
