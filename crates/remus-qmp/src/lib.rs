//! A synchronous QMP client (see QEMU's `docs/interop/qmp-spec.rst`).
//!
//! One reader thread owns the socket's read side: it routes each reply to
//! the caller waiting for that `id` and fans events out to subscribers.
//! Callers block only on their own reply, with a timeout, so a checkpoint
//! loop can issue `stop`/`migrate`/`cont` with the lowest latency and the
//! agent's async code can call it from a blocking task.
//!
//! The client never panics on what QEMU sends: an unparsable line ends the
//! connection with [`QmpError::Protocol`] for every waiter.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// Default time to wait for a command's reply.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// QMP errors.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("QMP socket {path}: {source}")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("QMP I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("QMP protocol error: {0}")]
    Protocol(String),
    /// QEMU answered the command with an error object.
    #[error("QEMU refused '{command}': {class}: {desc}")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
    #[error("no reply to '{command}' within {timeout:?}")]
    Timeout { command: String, timeout: Duration },
    #[error("QMP connection closed")]
    Closed,
}

impl QmpError {
    /// The QMP error description, when QEMU refused a command.
    pub fn desc(&self) -> Option<&str> {
        match self {
            QmpError::Command { desc, .. } => Some(desc),
            _ => None,
        }
    }
}

/// An asynchronous QMP event.
#[derive(Debug, Clone)]
pub struct Event {
    pub name: String,
    pub data: Value,
    /// When QEMU emitted it (its `timestamp`, µs since the Unix epoch).
    pub timestamp_us: Option<u64>,
}

type Waiters = HashMap<u64, Sender<Result<Value, QmpError>>>;

struct Shared {
    waiters: Mutex<Waiters>,
    subscribers: Mutex<Vec<Sender<Event>>>,
    closed: Mutex<bool>,
}

/// A connected, capabilities-negotiated QMP session.
pub struct Qmp {
    writer: Mutex<UnixStream>,
    shared: Arc<Shared>,
    next_id: AtomicU64,
    reader: Option<JoinHandle<()>>,
    /// QEMU version reported in the greeting (major, minor, micro).
    pub version: (u64, u64, u64),
    /// QEMU offered the "oob" capability and it is enabled.
    pub oob: bool,
}

impl Qmp {
    /// Connects to a QMP socket, retrying until `wait` has passed (QEMU
    /// creates the socket shortly after it starts), then negotiates
    /// capabilities.
    pub fn connect(path: &Path, wait: Duration) -> Result<Qmp, QmpError> {
        let deadline = Instant::now() + wait;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() < deadline => {
                    tracing::trace!(path = %path.display(), error = %e, "QMP not ready yet");
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(source) => {
                    return Err(QmpError::Connect {
                        path: path.to_path_buf(),
                        source,
                    });
                }
            }
        };
        Self::from_stream(stream)
    }

    /// Negotiates on an already connected stream.
    pub fn from_stream(stream: UnixStream) -> Result<Qmp, QmpError> {
        stream.set_read_timeout(Some(DEFAULT_TIMEOUT))?;
        let mut reader = BufReader::new(stream.try_clone()?);
        let mut line = String::new();
        if std::io::Read::take(&mut reader, MAX_MESSAGE).read_line(&mut line)? == 0 {
            return Err(QmpError::Closed);
        }
        let greeting: Value = serde_json::from_str(&line)
            .map_err(|e| QmpError::Protocol(format!("bad greeting: {e}")))?;
        let v = greeting
            .pointer("/QMP/version/qemu")
            .ok_or_else(|| QmpError::Protocol(format!("not a QMP greeting: {}", line.trim())))?;
        let num = |k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
        let version = (num("major"), num("minor"), num("micro"));
        let oob = greeting
            .pointer("/QMP/capabilities")
            .and_then(Value::as_array)
            .is_some_and(|c| c.iter().any(|c| c == "oob"));
        stream.set_read_timeout(None)?;

        let shared = Arc::new(Shared {
            waiters: Mutex::new(HashMap::new()),
            subscribers: Mutex::new(Vec::new()),
            closed: Mutex::new(false),
        });
        let rshared = shared.clone();
        let reader_thread = std::thread::Builder::new()
            .name("qmp-reader".into())
            .spawn(move || read_loop(reader, rshared))?;
        let qmp = Qmp {
            writer: Mutex::new(stream),
            shared,
            next_id: AtomicU64::new(1),
            reader: Some(reader_thread),
            version,
            oob,
        };
        // With "oob", QEMU reads the next commands (queued, up to 8) while
        // one runs, instead of suspending the monitor until it is done.
        // QEMU reads a command one byte at a time (some 1.5 µs a byte on
        // the 2-core build machine): a command sent right behind another
        // (a checkpoint's save behind its `stop`, its `cont` behind the
        // save) is then parsed while the one before runs and starts the
        // moment it ends, not some 0.1-0.3 ms later. In-band commands
        // still run one at a time, in order; this client sends no
        // out-of-band ones (`exec-oob`).
        let caps = if oob {
            Some(json!({ "enable": ["oob"] }))
        } else {
            None
        };
        qmp.execute("qmp_capabilities", caps)?;
        Ok(qmp)
    }

    /// Runs a command and returns its `return` value.
    pub fn execute(&self, command: &str, arguments: Option<Value>) -> Result<Value, QmpError> {
        self.execute_timeout(command, arguments, DEFAULT_TIMEOUT)
    }

    /// Runs a command, waiting at most `timeout` for the reply.
    pub fn execute_timeout(
        &self,
        command: &str,
        arguments: Option<Value>,
        timeout: Duration,
    ) -> Result<Value, QmpError> {
        self.send(command, arguments)?.wait(timeout)
    }

    /// Sends a command without waiting for its reply: the caller does
    /// other work while QEMU runs it, then [`Pending::wait`]s. QEMU runs
    /// one monitor's commands in order, so a command sent later starts
    /// only after this one has finished.
    pub fn send(&self, command: &str, arguments: Option<Value>) -> Result<Pending<'_>, QmpError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut msg = json!({ "execute": command, "id": id });
        if let Some(a) = arguments {
            msg["arguments"] = a;
        }
        let (tx, rx) = mpsc::channel();
        {
            if *lock(&self.shared.closed) {
                return Err(QmpError::Closed);
            }
            lock(&self.shared.waiters).insert(id, tx);
        }
        let pending = Pending {
            qmp: self,
            id,
            command: command.to_string(),
            rx,
        };
        let mut line = msg.to_string();
        line.push('\n');
        // On a failed write the pending reply is dropped, which forgets
        // its waiter.
        lock(&self.writer).write_all(line.as_bytes())?;
        tracing::trace!(command, id, "QMP command sent");
        Ok(pending)
    }

    /// Subscribes to events from now on.
    pub fn subscribe(&self) -> Receiver<Event> {
        let (tx, rx) = mpsc::channel();
        lock(&self.shared.subscribers).push(tx);
        rx
    }

    /// The VM's run state (`running`, `paused`, `shutdown`, ...).
    pub fn status(&self) -> Result<String, QmpError> {
        let v = self.execute("query-status", None)?;
        v.get("status")
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| QmpError::Protocol(format!("query-status without status: {v}")))
    }

    /// Whether the connection is still open.
    pub fn is_open(&self) -> bool {
        !*lock(&self.shared.closed)
    }
}

impl Drop for Qmp {
    fn drop(&mut self) {
        let _ = lock(&self.writer).shutdown(std::net::Shutdown::Both);
        if let Some(h) = self.reader.take() {
            let _ = h.join();
        }
    }
}

/// The reply to a command [`Qmp::send`] sent.
pub struct Pending<'a> {
    qmp: &'a Qmp,
    id: u64,
    command: String,
    rx: Receiver<Result<Value, QmpError>>,
}

impl Pending<'_> {
    /// Waits at most `timeout` for the reply and returns its `return`
    /// value.
    pub fn wait(self, timeout: Duration) -> Result<Value, QmpError> {
        match self.rx.recv_timeout(timeout) {
            Ok(r) => self.named(r),
            Err(RecvTimeoutError::Timeout) => Err(QmpError::Timeout {
                command: self.command.clone(),
                timeout,
            }),
            Err(RecvTimeoutError::Disconnected) => Err(QmpError::Closed),
        }
    }

    /// The reply, if it has come (as [`Pending::wait`] would return it);
    /// `None` while it has not.
    pub fn try_wait(&self) -> Option<Result<Value, QmpError>> {
        match self.rx.try_recv() {
            Ok(r) => Some(self.named(r)),
            Err(std::sync::mpsc::TryRecvError::Empty) => None,
            Err(std::sync::mpsc::TryRecvError::Disconnected) => Some(Err(QmpError::Closed)),
        }
    }

    /// A command's error, named after the command.
    fn named(&self, r: Result<Value, QmpError>) -> Result<Value, QmpError> {
        match r {
            Err(QmpError::Command { class, desc, .. }) => Err(QmpError::Command {
                command: self.command.clone(),
                class,
                desc,
            }),
            r => r,
        }
    }
}

impl Drop for Pending<'_> {
    /// A reply nobody waits for any more is dropped when it comes.
    fn drop(&mut self) {
        lock(&self.qmp.shared.waiters).remove(&self.id);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A poisoned lock only means another thread panicked while holding it;
    // the maps inside stay consistent, so carry on.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Longest QMP message read: QEMU's answers are a few KiB (a guest can
/// make some longer, and QEMU itself is reachable from the guest).
const MAX_MESSAGE: u64 = 16 << 20;

fn read_loop(mut reader: BufReader<UnixStream>, shared: Arc<Shared>) {
    use std::io::Read;
    let mut line = String::new();
    let end = loop {
        line.clear();
        match (&mut reader).take(MAX_MESSAGE).read_line(&mut line) {
            Ok(0) => break QmpError::Closed,
            Ok(_) if !line.ends_with('\n') && line.len() as u64 >= MAX_MESSAGE => {
                break QmpError::Protocol(format!(
                    "a QMP message longer than {} MiB",
                    MAX_MESSAGE >> 20
                ));
            }
            Ok(_) => {}
            Err(e) => break QmpError::Io(e),
        }
        let msg: Value = match serde_json::from_str(&line) {
            Ok(v) => v,
            Err(e) => break QmpError::Protocol(format!("unparsable message: {e}")),
        };
        if let Some(name) = msg.get("event").and_then(Value::as_str) {
            let ev = Event {
                name: name.to_string(),
                data: msg.get("data").cloned().unwrap_or(Value::Null),
                timestamp_us: msg.get("timestamp").and_then(|t| {
                    Some(
                        t.get("seconds")?.as_u64()? * 1_000_000
                            + t.get("microseconds")?.as_u64()?,
                    )
                }),
            };
            tracing::trace!(event = %ev.name, "QMP event");
            lock(&shared.subscribers).retain(|s| s.send(ev.clone()).is_ok());
            continue;
        }
        let Some(id) = msg.get("id").and_then(Value::as_u64) else {
            tracing::warn!(message = %line.trim(), "QMP message without id ignored");
            continue;
        };
        let result = if let Some(r) = msg.get("return") {
            Ok(r.clone())
        } else if let Some(e) = msg.get("error") {
            Err(QmpError::Command {
                command: String::new(),
                class: e
                    .get("class")
                    .and_then(Value::as_str)
                    .unwrap_or("?")
                    .to_string(),
                desc: e
                    .get("desc")
                    .and_then(Value::as_str)
                    .unwrap_or("?")
                    .to_string(),
            })
        } else {
            Err(QmpError::Protocol(format!(
                "reply without return or error: {}",
                line.trim()
            )))
        };
        let waiter = lock(&shared.waiters).remove(&id);
        if let Some(w) = waiter {
            let _ = w.send(result);
        }
    };
    tracing::debug!(reason = %end, "QMP reader stopped");
    *lock(&shared.closed) = true;
    for (_, w) in lock(&shared.waiters).drain() {
        let _ = w.send(Err(QmpError::Closed));
    }
    lock(&shared.subscribers).clear();
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    /// A scripted fake QEMU: answers each command by name.
    fn fake_qemu(listener: UnixListener, script: fn(&str, u64) -> Option<String>) {
        std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            let mut w = s.try_clone().unwrap();
            w.write_all(
                br#"{"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": ""}, "capabilities": []}}
"#,
            )
            .unwrap();
            let mut r = BufReader::new(s);
            let mut line = String::new();
            while r.read_line(&mut line).unwrap_or(0) > 0 {
                let v: Value = serde_json::from_str(&line).unwrap();
                let cmd = v["execute"].as_str().unwrap().to_string();
                let id = v["id"].as_u64().unwrap();
                if let Some(reply) = script(&cmd, id) {
                    w.write_all(reply.as_bytes()).unwrap();
                }
                line.clear();
            }
        });
    }

    fn connect(script: fn(&str, u64) -> Option<String>) -> (tempfile::TempDir, Qmp) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        fake_qemu(UnixListener::bind(&path).unwrap(), script);
        let q = Qmp::connect(&path, Duration::from_secs(5)).unwrap();
        (dir, q)
    }

    #[test]
    fn replies_are_routed_and_events_delivered() {
        let (_d, q) = connect(|cmd, id| match cmd {
            "qmp_capabilities" => Some(format!("{{\"return\": {{}}, \"id\": {id}}}\n")),
            "stop" => Some(format!(
                "{{\"event\": \"STOP\", \"data\": {{}}, \"timestamp\": {{}}}}\n{{\"return\": {{}}, \"id\": {id}}}\n"
            )),
            "query-status" => Some(format!(
                "{{\"return\": {{\"status\": \"paused\", \"running\": false}}, \"id\": {id}}}\n"
            )),
            _ => Some(format!(
                "{{\"error\": {{\"class\": \"CommandNotFound\", \"desc\": \"The command {cmd} has not been found\"}}, \"id\": {id}}}\n"
            )),
        });
        assert_eq!(q.version, (10, 0, 2));
        let events = q.subscribe();
        q.execute("stop", None).unwrap();
        assert_eq!(
            events.recv_timeout(Duration::from_secs(5)).unwrap().name,
            "STOP"
        );
        assert_eq!(q.status().unwrap(), "paused");
        let err = q.execute("nope", None).unwrap_err();
        match err {
            QmpError::Command { command, class, .. } => {
                assert_eq!(command, "nope");
                assert_eq!(class, "CommandNotFound");
            }
            other => panic!("{other:?}"),
        }
    }

    /// "oob" is enabled exactly when the greeting offers it (QEMU refuses
    /// a capability it did not offer).
    #[test]
    fn oob_is_enabled_only_when_offered() {
        for offered in [true, false] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("qmp.sock");
            let listener = UnixListener::bind(&path).unwrap();
            let server = std::thread::spawn(move || {
                let (s, _) = listener.accept().unwrap();
                let mut w = s.try_clone().unwrap();
                let caps = if offered { r#"["oob"]"# } else { "[]" };
                writeln!(
                    w,
                    r#"{{"QMP": {{"version": {{"qemu": {{"micro": 2, "minor": 0, "major": 10}}, "package": ""}}, "capabilities": {caps}}}}}"#
                )
                .unwrap();
                let mut line = String::new();
                BufReader::new(s).read_line(&mut line).unwrap();
                let v: Value = serde_json::from_str(&line).unwrap();
                writeln!(w, r#"{{"return": {{}}, "id": {}}}"#, v["id"]).unwrap();
                v
            });
            let q = Qmp::connect(&path, Duration::from_secs(5)).unwrap();
            let sent = server.join().unwrap();
            assert_eq!(sent["execute"], "qmp_capabilities");
            assert_eq!(q.oob, offered);
            if offered {
                assert_eq!(sent["arguments"], json!({"enable": ["oob"]}));
            } else {
                assert!(sent.get("arguments").is_none(), "{sent}");
            }
        }
    }

    #[test]
    fn missing_reply_times_out_and_garbage_closes() {
        let (_d, q) = connect(|cmd, id| match cmd {
            "qmp_capabilities" => Some(format!("{{\"return\": {{}}, \"id\": {id}}}\n")),
            "silent" => None,
            _ => Some("this is not json\n".to_string()),
        });
        let e = q
            .execute_timeout("silent", None, Duration::from_millis(50))
            .unwrap_err();
        assert!(matches!(e, QmpError::Timeout { .. }), "{e:?}");
        let e = q.execute("garbage", None).unwrap_err();
        assert!(matches!(e, QmpError::Closed), "{e:?}");
        assert!(!q.is_open());
        assert!(matches!(q.execute("x", None), Err(QmpError::Closed)));
    }

    #[test]
    fn a_sent_command_is_waited_for_later_and_a_dropped_one_is_forgotten() {
        let (_d, q) = connect(|cmd, id| match cmd {
            "qmp_capabilities" | "xen-save-devices-state" => {
                Some(format!("{{\"return\": {{}}, \"id\": {id}}}\n"))
            }
            "query-status" => Some(format!(
                "{{\"return\": {{\"status\": \"paused\", \"running\": false}}, \"id\": {id}}}\n"
            )),
            "silent" => None,
            _ => Some(format!(
                "{{\"error\": {{\"class\": \"GenericError\", \"desc\": \"no {cmd}\"}}, \"id\": {id}}}\n"
            )),
        });
        let save = q.send("xen-save-devices-state", None).unwrap();
        let refused = q.send("nope", None).unwrap();
        // Another caller's command meanwhile gets its own reply.
        assert_eq!(q.status().unwrap(), "paused");
        assert_eq!(save.wait(Duration::from_secs(5)).unwrap(), json!({}));
        match refused.wait(Duration::from_secs(5)).unwrap_err() {
            QmpError::Command { command, desc, .. } => {
                assert_eq!(command, "nope");
                assert_eq!(desc, "no nope");
            }
            e => panic!("{e:?}"),
        }
        // Looked at without waiting: nothing yet, then the reply, named
        // after its command.
        let silent = q.send("silent", None).unwrap();
        assert!(silent.try_wait().is_none());
        let refused = q.send("nope", None).unwrap();
        assert_eq!(q.status().unwrap(), "paused", "replies come in order");
        match refused.try_wait() {
            Some(Err(QmpError::Command { command, .. })) => assert_eq!(command, "nope"),
            other => panic!("{other:?}"),
        }
        drop(q.send("silent", None).unwrap());
        assert!(matches!(
            silent.wait(Duration::from_millis(20)),
            Err(QmpError::Timeout { .. })
        ));
        assert!(lock(&q.shared.waiters).is_empty());
    }

    #[test]
    fn connect_gives_up_with_the_path_in_the_error() {
        let e = Qmp::connect(
            Path::new("/nonexistent/qmp.sock"),
            Duration::from_millis(20),
        )
        .err()
        .unwrap();
        assert!(e.to_string().contains("/nonexistent/qmp.sock"), "{e}");
    }
}
