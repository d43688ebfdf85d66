//! Device and CPU state through QEMU's migration stream (DESIGN 3.3, 3.4).
//!
//! Guest RAM lives in the shared file and is copied by the agent, so QEMU
//! is told to skip it (`x-ignore-shared`): the stream then holds only CPU
//! and device state plus the small RAM blocks outside the file (firmware,
//! ACPI tables), a few hundred KB.
//!
//! Two ways to save it:
//!
//! - **Device-only** ([`save_devices`], the default between two agents
//!   that both have it): `xen-save-devices-state`, the synchronous command
//!   Xen's own Remus uses (QEMU runs no migration, starts no dirty
//!   logging, sends no RAM block and no configuration section): about
//!   80 KB and, measured on a 2-core TCG host, 1.3 ms against 2.3 ms for
//!   the full stream below. It leaves out the RAM blocks outside the
//!   shared file, so it is exact only when the guest cannot write any of
//!   them: firmware ROMs and ACPI tables, never a UEFI variable store (a
//!   UEFI VM always uses the full stream; see [`devices_only_capable`]).
//!   The standby then keeps the ROMs its own QEMU loaded, which are the
//!   same for the same QEMU and firmware packages. The standby's QEMU
//!   must be started for it ([`crate::StartOptions::devices_only_state`]:
//!   `-global migration.send-configuration=off`, as Xen's machines do, and
//!   `-S`, since such a stream says the guest was running and QEMU would
//!   otherwise resume it by itself at the end of the load). Loading is as
//!   below. QEMU then logs "Expected vmdescription section, but got 0":
//!   harmless, the description is only for tools that dump streams.
//!
//! - **Full stream** ([`save`]): a `migrate` to a file, as follows.
//!
//! A checkpoint starts either save with [`begin_save`] and copies guest
//! RAM while QEMU writes the file; [`Saving::finish`] waits for the end
//! before the guest may run. A migration's last checkpoint saves
//! device-only into a pipe instead ([`begin_streamed_save`]) and sends
//! the state on as QEMU writes it; its destination loads it as it
//! arrives ([`begin_fed_load`]).
//!
//! Save (VM already stopped by the caller):
//! ```text
//! migrate {"uri": "file:PATH"} → MIGRATION completed → runstate leaves
//! finish-migrate (postmigrate) → caller may `cont`
//! ```
//! Waiting for the runstate matters: the `completed` event can arrive
//! while the runstate is still `finish-migrate`, and a `cont` then fails
//! with "Migration is not finalized yet".
//!
//! Load (QEMU started with `-incoming defer`; [`listen`] when the standby
//! starts, [`load_and_run`] when it resumes, its RAM file then holding
//! the checkpoint's pages):
//! ```text
//! migrate-incoming {"uri": "unix:SOCKET"}       (at the standby's start)
//! cont (still inmigrate: only lifts -S); the state into SOCKET
//!   → MIGRATION completed, RESUME (QEMU ran the VM itself)
//! ```
//! A VM the stream left paused is resumed by [`load_and_run`] itself.
//! A migration's destination with a `-S` standby streams the state in
//! earlier ([`begin_load`]) but holds back its last byte and the
//! stream's end ([`Held`]), so that QEMU's load cannot end before the
//! switch-over, which alone sends them. Its `cont` goes ahead, with the
//! connection opened before the state exists ([`connect_incoming`]):
//! in `inmigrate` it only notes that the VM is to run once a load ends.
//! At the switch-over ([`Loading::run`]) the rest goes in and QEMU
//! starts the VM itself as the load ends, with no round trip to QEMU
//! between the order and the VM running:
//! ```text
//! migrate-incoming {"uri": "unix:SOCKET"}       (at the standby's start)
//! cont (still inmigrate); connect, the header   (at the session's start)
//! the state into SOCKET but its last byte        (before the switch-over)
//! the last byte, the stream's end                (at the switch-over)
//!   → RESUME, MIGRATION completed (QEMU ran the VM itself)
//! ```
//! Without a connection opened ahead, the `cont` waits for the
//! switch-over: sent then while QEMU's load waits for the last byte,
//! and answered before that byte goes.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use remus_qmp::{Pending, Qmp, QmpError};
use serde_json::json;

/// How long a save or load may take.
const STATE_TIMEOUT: Duration = Duration::from_secs(30);

/// Errors while saving or loading device state.
#[derive(Debug, thiserror::Error)]
pub enum DevStateError {
    #[error("{op}: {source}")]
    Qmp { op: &'static str, source: QmpError },
    #[error("{op}: migration {status}{detail}")]
    Failed {
        op: &'static str,
        status: String,
        detail: String,
    },
    #[error("{op}: {what} {}: {source}", path.display())]
    Io {
        op: &'static str,
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{op}: no result within {timeout:?} (runstate {runstate})")]
    Timeout {
        op: &'static str,
        timeout: Duration,
        runstate: String,
    },
}

/// Sets the migration capabilities remus relies on. Idempotent; call
/// once per QEMU, on both sides, before the first save or load.
pub fn prepare(qmp: &Qmp) -> Result<(), DevStateError> {
    qmp.execute(
        "migrate-set-capabilities",
        Some(json!({"capabilities": [
            {"capability": "x-ignore-shared", "state": true},
            {"capability": "events", "state": true},
        ]})),
    )
    .map_err(|source| DevStateError::Qmp {
        op: "set migration capabilities",
        source,
    })?;
    Ok(())
}

/// Saves device state to `path` through the full stream (a `migrate` to
/// the file). The VM must be stopped; it stays stopped (in
/// `postmigrate`) and the caller resumes it with `cont`.
pub fn save(qmp: &Qmp, path: &Path) -> Result<(), DevStateError> {
    begin_save(qmp, path, false)?.finish().map(drop)
}

/// The VM's device state may travel device-only ([`save_devices`]): no
/// RAM block outside guest RAM that the guest can write. UEFI's
/// variable store is one (the guest writes its variables through the
/// flash device into it).
pub fn devices_only_capable(config: &remus_config::VmConfig) -> bool {
    config.firmware != remus_config::Firmware::Uefi
}

/// Saves device and CPU state only (no RAM block, no configuration
/// section) to `path`. The VM must be stopped; it stays stopped and the
/// caller resumes it with `cont`. Only for a VM that is
/// [`devices_only_capable`] and a peer whose standby was started for it.
pub fn save_devices(qmp: &Qmp, path: &Path) -> Result<(), DevStateError> {
    begin_save(qmp, path, true)?.finish().map(drop)
}

/// A save of device state QEMU is running ([`begin_save`],
/// [`begin_streamed_save`]).
#[must_use = "the VM may be resumed only after the save has finished"]
pub struct Saving<'a> {
    qmp: &'a Qmp,
    /// The command's answer, until it is taken.
    reply: Option<Pending<'a>>,
    /// The answer, when [`Saving::next_chunk`] saw it come.
    answered: Option<Result<serde_json::Value, QmpError>>,
    /// The full stream's MIGRATION events (none for device-only).
    events: Option<Receiver<remus_qmp::Event>>,
    deadline: Instant,
    /// A streamed save's pipe.
    stream: Option<SaveStream>,
}

const SAVE_OP: &str = "save device state";

/// Starts saving device state to `path` (device-only when
/// `devices_only`, see [`save_devices`]; else the full stream, see
/// [`save`]) and returns at once: QEMU writes the state while the caller
/// copies guest RAM, which the save does not touch. The VM must be
/// stopped, and stays stopped until [`Saving::finish`] has returned;
/// QEMU runs a later QMP command only after this one.
pub fn begin_save<'a>(
    qmp: &'a Qmp,
    path: &Path,
    devices_only: bool,
) -> Result<Saving<'a>, DevStateError> {
    let deadline = Instant::now() + STATE_TIMEOUT;
    let sent = if devices_only {
        send_save_devices(qmp, path).map(|reply| (reply, None))
    } else {
        let events = qmp.subscribe();
        qmp.send(
            "migrate",
            Some(json!({"uri": format!("file:{}", path.display())})),
        )
        .map(|reply| (reply, Some(events)))
    };
    match sent {
        Ok((reply, events)) => Saving::started(qmp, Ok(reply), events, deadline, None),
        Err(e) => Saving::started(qmp, Err(e), None, deadline, None),
    }
}

fn send_save_devices<'a>(qmp: &'a Qmp, path: &Path) -> Result<Pending<'a>, QmpError> {
    // `live: false`: QEMU leaves the disks active (with `true` it would
    // hand them over, as at the end of a migration).
    qmp.send(
        SAVE_DEVICES,
        Some(json!({"filename": path.display().to_string(), "live": false})),
    )
}

const SAVE_DEVICES: &str = "xen-save-devices-state";

/// [`begin_save`] device-only into a pipe at `fifo` (created here,
/// replacing what is there: a path in the agent's private directory),
/// whose bytes the caller takes as QEMU writes them
/// ([`Saving::next_chunk`]): a migration's last checkpoint sends them on
/// while QEMU still saves, and the destination's QEMU loads them as they
/// arrive, as QEMU's own migration overlaps save and load. QEMU writes in
/// pieces of its 32 KiB buffer. A state longer than `limit` bytes fails
/// the save (the pipe is drained to its end all the same, so that QEMU
/// never waits on it).
pub fn begin_streamed_save<'a>(
    qmp: &'a Qmp,
    fifo: &Path,
    limit: u64,
) -> Result<Saving<'a>, DevStateError> {
    let deadline = Instant::now() + STATE_TIMEOUT;
    let stream = SaveStream::open(fifo, limit)?;
    // The reading end is open before QEMU opens the writing end, so
    // QEMU's open does not wait; from here, `Saving`'s drop waits for
    // QEMU's answer before it closes that end.
    let reply = send_save_devices(qmp, fifo);
    Saving::started(qmp, reply, None, deadline, Some(stream))
}

impl<'a> Saving<'a> {
    /// A save whose command went (or failed to: then an error, and a
    /// stream given is closed, QEMU never having been asked).
    fn started(
        qmp: &'a Qmp,
        reply: Result<Pending<'a>, QmpError>,
        events: Option<Receiver<remus_qmp::Event>>,
        deadline: Instant,
        stream: Option<SaveStream>,
    ) -> Result<Saving<'a>, DevStateError> {
        let reply = reply.map_err(|source| DevStateError::Qmp {
            op: SAVE_OP,
            source,
        })?;
        Ok(Saving {
            qmp,
            reply: Some(reply),
            answered: None,
            events,
            deadline,
            stream,
        })
    }

    /// Whether QEMU ends this save before it runs the next command sent
    /// to it (device-only: one synchronous command), so that a `cont`
    /// sent behind it resumes the guest only once the state is saved. A
    /// full-stream save's `migrate` answers at once and saves from a
    /// thread: the guest may be resumed only after [`Saving::finish`].
    pub fn ends_before_the_next_command(&self) -> bool {
        self.events.is_none()
    }

    /// A streamed save ([`begin_streamed_save`]): the next bytes QEMU
    /// wrote, or `None` once it has written them all. Errors if QEMU's
    /// save failed (or took too long) before it had.
    pub fn next_chunk(&mut self) -> Result<Option<Vec<u8>>, DevStateError> {
        let Some(stream) = self.stream.as_mut() else {
            return Ok(None);
        };
        loop {
            match stream.next(Duration::from_millis(2)) {
                Some(Ok(Some(chunk))) => return Ok(Some(chunk)),
                Some(Ok(None)) => return Ok(None),
                Some(Err(e)) => return Err(e),
                None => {}
            }
            // Nothing yet: a save that failed ends the wait (a QEMU that
            // never opened the pipe would leave it waiting for ever).
            if self.answered.is_none()
                && let Some(r) = self.reply.as_ref().and_then(|p| p.try_wait())
            {
                self.answered = Some(r);
            }
            match self.answered.take() {
                Some(Err(source)) => {
                    // Said once here; `finish` says it again in words.
                    self.answered = Some(Err(QmpError::Protocol(source.to_string())));
                    return Err(DevStateError::Qmp {
                        op: SAVE_OP,
                        source,
                    });
                }
                other => self.answered = other,
            }
            if Instant::now() > self.deadline {
                return Err(DevStateError::Timeout {
                    op: SAVE_OP,
                    timeout: STATE_TIMEOUT,
                    runstate: self.qmp.status().unwrap_or_else(|e| e.to_string()),
                });
            }
        }
    }

    /// Waits until the state is saved and the VM may be resumed. A
    /// streamed save returns its whole state (what [`Saving::next_chunk`]
    /// handed out and what it had not yet); a save to a file, `None`.
    pub fn finish(mut self) -> Result<Option<Vec<u8>>, DevStateError> {
        let answer = self.answer();
        let stream = self.stream.take().map(SaveStream::close);
        answer.map_err(|source| DevStateError::Qmp {
            op: SAVE_OP,
            source,
        })?;
        if let Some(events) = &self.events {
            wait_completed(self.qmp, SAVE_OP, events, self.deadline, &mut |_| {})?;
            wait_runstate_leaves(self.qmp, SAVE_OP, "finish-migrate", self.deadline)?;
        }
        stream.transpose()
    }

    /// QEMU's answer to the save, waited for if it has not come. A
    /// streamed save's pipe is read meanwhile (what QEMU writes is kept
    /// for [`SaveStream::close`]): QEMU, whose main loop writes it, must
    /// never wait on it.
    fn answer(&mut self) -> Result<serde_json::Value, QmpError> {
        if let Some(r) = self.answered.take() {
            return r;
        }
        let Some(reply) = self.reply.take() else {
            return Err(QmpError::Closed);
        };
        let Some(stream) = self.stream.as_mut() else {
            return reply.wait(self.deadline.saturating_duration_since(Instant::now()));
        };
        loop {
            stream.fill();
            if let Some(r) = reply.try_wait() {
                return r;
            }
            if Instant::now() > self.deadline {
                return Err(QmpError::Timeout {
                    command: SAVE_DEVICES.into(),
                    timeout: STATE_TIMEOUT,
                });
            }
            stream.ready(Duration::from_millis(2));
        }
    }
}

impl Drop for Saving<'_> {
    /// A streamed save given up: its pipe is read until QEMU has answered
    /// (QEMU, whose main loop writes it, must never wait on it).
    fn drop(&mut self) {
        if self.stream.is_some() {
            let _ = self.answer();
            if let Some(stream) = self.stream.take() {
                let _ = stream.close();
            }
        }
    }
}

/// The reading end of a streamed save's pipe, read by the thread that
/// takes the state ([`Saving::next_chunk`]) and, while it waits for
/// QEMU's answer, by [`Saving`]'s `answer` (so QEMU never waits on it).
/// No reader thread: on the 2-core build machine the hop from one to the
/// sender put 0.05-0.13 ms between QEMU's write and the state going out,
/// in a migration's downtime.
struct SaveStream {
    file: std::fs::File,
    fifo: PathBuf,
    limit: u64,
    /// Bytes read, those past the limit (dropped) included.
    total: u64,
    /// What was read, up to the limit.
    taken: Vec<u8>,
    /// How much of `taken` was handed out.
    handed: usize,
    /// QEMU closed its end.
    ended: bool,
    /// A failure not yet reported (a read error, or the state outgrew
    /// the limit: said once).
    failed: Option<std::io::Error>,
}

impl SaveStream {
    fn open(fifo: &Path, limit: u64) -> Result<SaveStream, DevStateError> {
        use std::os::unix::ffi::OsStrExt;
        use std::os::unix::fs::OpenOptionsExt;
        let io = |what: &'static str| {
            move |source| DevStateError::Io {
                op: SAVE_OP,
                what,
                path: fifo.to_path_buf(),
                source,
            }
        };
        match std::fs::remove_file(fifo) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io("remove")(e)),
            _ => {}
        }
        let c = std::ffi::CString::new(fifo.as_os_str().as_bytes())
            .map_err(|e| io("name")(std::io::Error::other(e)))?;
        // SAFETY: `c` is a valid NUL-terminated path for the call.
        if unsafe { libc::mkfifo(c.as_ptr(), 0o600) } != 0 {
            return Err(io("create the pipe")(std::io::Error::last_os_error()));
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(fifo)
            .map_err(io("open the pipe"))?;
        // Room for a whole device-only state (some 32-80 KiB), so QEMU
        // does not wait while the caller sends the last pages before it
        // reads; best effort (64 KiB without it).
        // SAFETY: fcntl on a descriptor this function owns.
        unsafe {
            libc::fcntl(
                std::os::fd::AsRawFd::as_raw_fd(&file),
                libc::F_SETPIPE_SZ,
                1 << 20,
            );
        }
        Ok(SaveStream {
            file,
            fifo: fifo.to_path_buf(),
            limit,
            total: 0,
            taken: Vec::new(),
            handed: 0,
            ended: false,
            failed: None,
        })
    }

    /// Reads what the pipe holds now, without waiting: kept up to the
    /// limit, dropped past it.
    fn fill(&mut self) {
        use std::io::Read;
        let mut buf = [0u8; 64 << 10];
        // Read only what poll says is there: a pipe no writer has opened
        // yet reads as its end, but polls neither readable nor hung up.
        while !self.ended && self.ready(Duration::ZERO) {
            match (&self.file).read(&mut buf) {
                // QEMU closed its end.
                Ok(0) => self.ended = true,
                Ok(n) => {
                    let before = self.total;
                    self.total += n as u64;
                    if self.total <= self.limit {
                        self.taken.extend_from_slice(&buf[..n]);
                    } else if before <= self.limit {
                        self.failed = Some(std::io::Error::other(format!(
                            "the device state is larger than {} bytes",
                            self.limit
                        )));
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.failed.get_or_insert(e);
                    self.ended = true;
                }
            }
        }
    }

    /// Whether, within `wait`, the pipe has something to read or its
    /// writer closed it. An interrupted or failed poll says no.
    fn ready(&self, wait: Duration) -> bool {
        let mut pfd = libc::pollfd {
            fd: std::os::fd::AsRawFd::as_raw_fd(&self.file),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = i32::try_from(wait.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: one valid pollfd for the duration of the call.
        unsafe { libc::poll(&mut pfd, 1, ms) > 0 }
    }

    /// What was read and not yet handed out, a failure, or the end.
    fn take(&mut self) -> Option<Result<Option<Vec<u8>>, DevStateError>> {
        if let Some(source) = self.failed.take() {
            return Some(Err(DevStateError::Io {
                op: SAVE_OP,
                what: "read the pipe",
                path: self.fifo.clone(),
                source,
            }));
        }
        if self.handed < self.taken.len() {
            let chunk = self.taken[self.handed..].to_vec();
            self.handed = self.taken.len();
            return Some(Ok(Some(chunk)));
        }
        self.ended.then_some(Ok(None))
    }

    /// Within `wait`: `Some(Ok(Some(bytes)))`, the next bytes;
    /// `Some(Ok(None))`, the end; `Some(Err(_))`, the pipe failed or the
    /// state outgrew the limit; `None`, nothing yet.
    fn next(&mut self, wait: Duration) -> Option<Result<Option<Vec<u8>>, DevStateError>> {
        self.fill();
        if let Some(r) = self.take() {
            return Some(r);
        }
        self.ready(wait);
        self.fill();
        self.take()
    }

    /// After QEMU's answer (its end is closed, or was never opened):
    /// reads what is left and removes the pipe; the whole state.
    fn close(mut self) -> Result<Vec<u8>, DevStateError> {
        self.fill();
        match self.failed.take() {
            Some(source) => Err(DevStateError::Io {
                op: SAVE_OP,
                what: "read the pipe",
                path: self.fifo.clone(),
                source,
            }),
            None => Ok(std::mem::take(&mut self.taken)),
        }
    }
}

impl Drop for SaveStream {
    /// Only once QEMU has answered (or was never asked): see `Saving`'s
    /// drop.
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.fifo);
    }
}

/// Makes a standby's QEMU (started with `-incoming defer`) listen for the
/// device state it will resume from on `socket`, in the VM's private
/// directory: the incoming migration is set up before anything is
/// loaded, as libvirt does on a migration's destination, so that a
/// resume only streams the state in. Setting it up took some 0.5 ms of
/// QEMU's time on the build machine (from `migrate-incoming` to its
/// `setup` event), guest downtime when it was done at the resume.
/// Idempotent: an adopted standby already listening there is left as it
/// is.
pub fn listen(qmp: &Qmp, socket: &Path) -> Result<(), DevStateError> {
    const OP: &str = "listen for device state";
    let qmp_err = |source| DevStateError::Qmp { op: OP, source };
    let info = qmp.execute("query-migrate", None).map_err(qmp_err)?;
    match info["status"].as_str() {
        None | Some("none") => {}
        Some("setup") if listens_on(&info, socket) => return Ok(()),
        Some(status) => {
            return Err(DevStateError::Failed {
                op: OP,
                status: status.to_string(),
                detail: format!(
                    " (an incoming migration other than on {}: {info})",
                    socket.display()
                ),
            });
        }
    }
    qmp.execute(
        "migrate-incoming",
        Some(json!({"uri": format!("unix:{}", socket.display())})),
    )
    .map_err(qmp_err)?;
    Ok(())
}

/// Whether `query-migrate`'s answer says QEMU listens on `socket` (by
/// that name, or by another for the same file: an agent started with
/// its state directory spelled otherwise).
fn listens_on(info: &serde_json::Value, socket: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let same = |path: &str| {
        Path::new(path) == socket
            || match (std::fs::metadata(path), std::fs::metadata(socket)) {
                (Ok(a), Ok(b)) => (a.dev(), a.ino()) == (b.dev(), b.ino()),
                _ => false,
            }
    };
    info["socket-address"].as_array().is_some_and(|a| {
        a.iter()
            .any(|s| s["type"] == "unix" && s["path"].as_str().is_some_and(same))
    })
}

/// How long [`load_and_run`] took.
#[derive(Debug, Clone, Copy)]
pub struct Loaded {
    /// From the start until QEMU said the load completed.
    pub load_ms: f64,
    /// From then until the VM was known to run.
    pub cont_ms: f64,
    /// QEMU's timestamp of its RESUME event (µs since the Unix epoch, by
    /// this host's clock), when the event was seen.
    pub resumed_at_us: Option<u64>,
    /// QEMU started the VM itself as its load ended (its RESUME came
    /// before its `completed`): the `cont` reached it in `inmigrate`.
    pub started_by_load: bool,
}

/// Streams the device state in `state` into a standby's QEMU that
/// [`listen`]s on `socket` and runs the VM as soon as the load has ended.
///
/// `cont` goes first, not after the load: QEMU runs it in `inmigrate`
/// (where it only lifts `-S`: "the guest starts once migration
/// finishes", QMP's `cont`, and QEMU starts the VM itself at the end of
/// the load) or, had the load ended first, after it (where it starts the
/// VM), with no round trip of ours between the load and the VM running.
/// Before, a poll of the runstate and then a `cont` after the load cost
/// the VM some 0.4 ms more downtime at every failover and switch-over.
/// A stream that says the VM was paused when saved leaves it paused
/// whatever `-S` said: the runstate says so and one more `cont` runs it.
pub fn load_and_run(qmp: &Qmp, state: &Path, socket: &Path) -> Result<Loaded, DevStateError> {
    let events = qmp.subscribe();
    let started = Instant::now();
    let deadline = started + STATE_TIMEOUT;
    let cont = qmp.send("cont", None).map_err(load_qmp_err)?;
    stream_state(state, socket, deadline)
        .map_err(load_io_err)?
        .end();
    finish_load(qmp, Some(cont), &events, started, deadline)
}

const LOAD: &str = "load device state";

fn load_qmp_err(source: QmpError) -> DevStateError {
    DevStateError::Qmp { op: LOAD, source }
}

fn load_io_err((what, path, source): StreamError) -> DevStateError {
    DevStateError::Io {
        op: LOAD,
        what,
        path,
        source,
    }
}

/// What went wrong streaming a state into QEMU: what was done, to which
/// path.
type StreamError = (&'static str, PathBuf, std::io::Error);

/// A load of device state under way in a standby's QEMU while its VM
/// stays stopped ([`begin_load`]); [`Loading::run`] lets the VM run.
pub struct Loading {
    events: Receiver<remus_qmp::Event>,
    started: Instant,
    deadline: Instant,
    streaming: Streaming,
    /// QEMU took its `cont` ahead ([`connect_incoming`]).
    cont_taken: bool,
}

/// Where a [`Loading`]'s state goes into QEMU from.
enum Streaming {
    /// A thread of its own (a state in a file).
    Thread(std::thread::JoinHandle<Result<Held, StreamError>>),
    /// A [`Feed`], from the thread the state arrives on.
    Fed(FeedOutcome),
}

impl Streaming {
    /// Waits for the whole state to be in QEMU but for what a [`Held`]
    /// keeps (or for why not).
    fn outcome(self) -> Result<Held, StreamError> {
        let qemu = || PathBuf::from("QEMU");
        match self {
            Streaming::Thread(t) => t.join().unwrap_or_else(|_| {
                Err((
                    "stream the state into",
                    qemu(),
                    std::io::Error::other("the streaming thread panicked"),
                ))
            }),
            Streaming::Fed(o) => o
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take()
                .unwrap_or_else(|| {
                    Err((
                        "receive the state for",
                        qemu(),
                        std::io::Error::other("it had not ended when the VM was to run"),
                    ))
                }),
        }
    }
}

/// A whole state in QEMU's incoming migration but for its last byte
/// (QEMU's end-of-stream marker) and the stream's end, both held back
/// until [`Held::end`]. QEMU's load of everything before them runs, then
/// waits for the rest: it cannot end, so a `cont` may reach QEMU in
/// `inmigrate` ahead of the switch-over ([`connect_incoming`]), or
/// during that wait (a load that has every byte runs without yielding,
/// and QEMU takes no command during it). Either way [`Held::end`] sends
/// the rest once QEMU took it and QEMU starts the VM itself as the load
/// ends. Measured on the 2-core TCG build machine, a `cont` queued
/// behind a load that ended on its own ran 0.2-0.3 ms after the load's
/// `completed`. A `Held` dropped instead closes the stream one byte
/// short: QEMU's load fails, and that QEMU never runs the VM, `cont` or
/// not (it runs one only at the end of a load).
#[derive(Debug)]
pub struct Held {
    s: UnixStream,
    socket: PathBuf,
    /// The state's last byte (none for a state too short to be one).
    last: Option<u8>,
}

impl Held {
    /// Sends the state's last byte and ends the stream: QEMU's load
    /// ends. Whether it ended well is QEMU's to say (its MIGRATION
    /// event), not this call's: a failed write leaves the stream one byte
    /// short and closed, which fails the load.
    pub fn end(mut self) {
        let r = match self.last.take() {
            Some(b) => std::io::Write::write_all(&mut self.s, &[b]),
            None => Ok(()),
        }
        .and_then(|()| self.s.shutdown(std::net::Shutdown::Write));
        if let Err(e) = r {
            tracing::debug!(socket = %self.socket.display(), error = %e, "could not end the state's stream; closing it");
        }
    }
}

/// Starts streaming the device state in `state` into a standby's QEMU
/// that [`listen`]s on `socket`, and returns at once: QEMU loads it while
/// the caller goes on (a migration's destination, between its commit of
/// the last checkpoint and the source's switch-over order, whose round
/// trip and the disks' flush then overlap the load instead of preceding
/// it). The state's last byte and the stream's end are held back
/// ([`Held`]): QEMU's load, done but for them, waits until
/// [`Loading::run`]. Only for a QEMU started with `-S` (a device-only
/// standby), which leaves the VM paused at the end of a load unless it
/// took a `cont` ([`connect_incoming`] sends one ahead; otherwise
/// [`Loading::run`] does). Dropping the returned [`Loading`] leaves the
/// stream one byte short: the load fails and the VM never runs there (a
/// migration that did not switch over discards its destination).
///
/// `to`: a connection opened ahead ([`connect_incoming`]); without one,
/// `socket` is connected to now.
pub fn begin_load(
    qmp: &Qmp,
    state: &Path,
    socket: &Path,
    to: Option<Incoming>,
) -> Result<Loading, DevStateError> {
    let (state, socket) = (state.to_path_buf(), socket.to_path_buf());
    let cont_taken = to.as_ref().is_some_and(|to| to.cont_taken);
    spawn_load(qmp, cont_taken, move |deadline| match to {
        Some(to) => stream_rest(&state, to, deadline),
        None => stream_state(&state, &socket, deadline),
    })
}

/// The device state of a load begun with [`begin_fed_load`], handed
/// over as it arrives: each piece is written into QEMU's incoming
/// migration at once, from the caller's thread. No thread of its own: on
/// the 2-core build machine the hop to a feeding thread (woken, or
/// started at the first piece) put 0.1-0.8 ms between a piece's arrival
/// and QEMU getting it, all of it guest downtime. QEMU reads as it
/// loads; a QEMU that stops reading fails the write at the load's
/// deadline.
pub struct Feed {
    /// Taken by [`Feed::end`].
    s: Option<UnixStream>,
    socket: PathBuf,
    /// The last byte handed over, not yet written ([`Held`]).
    last: Option<u8>,
    /// The state's own header while it is checked rather than sent (the
    /// header went ahead: [`connect_incoming`]).
    head: Option<Vec<u8>>,
    outcome: FeedOutcome,
    done: bool,
}

/// How a [`Feed`] ended, for the [`Loading`] it feeds: `None` until it
/// has.
type FeedOutcome = std::sync::Arc<std::sync::Mutex<Option<Result<Held, StreamError>>>>;

impl Feed {
    /// Feeds `to` until `deadline`; the returned outcome is set when the
    /// feed ends, fails or is dropped.
    fn new(to: Incoming, deadline: Instant) -> Result<(Feed, FeedOutcome), StreamError> {
        let (s, socket, header_sent) = to.until(deadline)?;
        let outcome = FeedOutcome::default();
        let feed = Feed {
            s: Some(s),
            socket,
            last: None,
            head: header_sent.then(|| Vec::with_capacity(STREAM_HEADER.len())),
            outcome: outcome.clone(),
            done: false,
        };
        Ok((feed, outcome))
    }

    /// The next bytes of the state (they concatenate in order). A
    /// failure is kept for [`Loading::run`] and ends the feed.
    pub fn push(&mut self, data: &[u8]) {
        if self.done {
            return;
        }
        if let Err(e) = self.write(data) {
            self.finish(Err(e));
        }
    }

    fn write(&mut self, data: &[u8]) -> Result<(), StreamError> {
        let mut rest = data;
        if let Some(head) = self.head.as_mut().filter(|h| h.len() < STREAM_HEADER.len()) {
            let take = (STREAM_HEADER.len() - head.len()).min(rest.len());
            head.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            if head.len() == STREAM_HEADER.len() && head[..] != STREAM_HEADER {
                return Err(not_a_stream(FED_HEADER, &self.socket, head));
            }
        }
        let (Some(s), Some((&tail, body))) = (self.s.as_mut(), rest.split_last()) else {
            return Ok(());
        };
        // The byte held back from the piece before goes first.
        let held = self.last.replace(tail);
        held.map_or(Ok(()), |b| std::io::Write::write_all(s, &[b]))
            .and_then(|()| std::io::Write::write_all(s, body))
            .map_err(on(&self.socket, "stream the state into"))
    }

    /// The state is whole: the feed ends, and the stream, its last byte
    /// and its end held back ([`Held`]), goes to the [`Loading`] for its
    /// switch-over. Dropping a feed without this fails the load (the
    /// stream never ends well).
    pub fn end(mut self) {
        if self.done {
            return;
        }
        let r = match (&self.head, self.s.take()) {
            (Some(head), _) if head.len() < STREAM_HEADER.len() => {
                Err(not_a_stream(FED_HEADER, &self.socket, head))
            }
            (_, Some(s)) => Ok(Held {
                s,
                socket: self.socket.clone(),
                last: self.last.take(),
            }),
            (_, None) => Err((
                "end the stream on",
                self.socket.clone(),
                std::io::Error::other("the stream is gone"),
            )),
        };
        self.finish(r);
    }

    /// Ends the feed with `r`; a failed one closes the connection, so
    /// that QEMU's load ends too, with nothing that passes for a whole
    /// state.
    fn finish(&mut self, r: Result<Held, StreamError>) {
        self.done = true;
        if r.is_err()
            && let Some(s) = self.s.take()
        {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        *self.outcome.lock().unwrap_or_else(|p| p.into_inner()) = Some(r);
    }
}

impl Drop for Feed {
    fn drop(&mut self) {
        if !self.done {
            let e = std::io::Error::other("it stopped arriving before its end");
            self.finish(Err(("receive the state for", self.socket.clone(), e)));
        }
    }
}

/// [`begin_load`] for a state that is still arriving: its bytes go to
/// QEMU as they are handed to the returned [`Feed`] (a migration's
/// destination, whose last checkpoint streams the source's save), so that
/// QEMU loads while the source still saves and sends. The VM stays
/// stopped as with [`begin_load`].
pub fn begin_fed_load(
    qmp: &Qmp,
    socket: &Path,
    to: Option<Incoming>,
) -> Result<(Loading, Feed), DevStateError> {
    let events = qmp.subscribe();
    let started = Instant::now();
    let deadline = started + STATE_TIMEOUT;
    let to = match to {
        Some(to) => to,
        None => Incoming::connect(socket).map_err(load_io_err)?,
    };
    let cont_taken = to.cont_taken;
    let (feed, outcome) = Feed::new(to, deadline).map_err(load_io_err)?;
    let loading = Loading {
        events,
        started,
        deadline,
        streaming: Streaming::Fed(outcome),
        cont_taken,
    };
    Ok((loading, feed))
}

/// Starts the thread that streams a state into QEMU, as `stream` says.
fn spawn_load(
    qmp: &Qmp,
    cont_taken: bool,
    stream: impl FnOnce(Instant) -> Result<Held, StreamError> + Send + 'static,
) -> Result<Loading, DevStateError> {
    let events = qmp.subscribe();
    let started = Instant::now();
    let deadline = started + STATE_TIMEOUT;
    let streaming = std::thread::Builder::new()
        .name("devstate-load".into())
        .spawn(move || stream(deadline))
        .map_err(|e| {
            load_io_err((
                "start a thread to stream the state into",
                PathBuf::from("QEMU"),
                e,
            ))
        })?;
    Ok(Loading {
        events,
        started,
        deadline,
        streaming: Streaming::Thread(streaming),
        cont_taken,
    })
}

const FED_HEADER: &str = "check the header of the state for";

/// A state whose first bytes are not QEMU's stream header (`what` was
/// done, to `path`).
fn not_a_stream(what: &'static str, path: &Path, head: &[u8]) -> StreamError {
    (
        what,
        path.to_path_buf(),
        std::io::Error::other(format!(
            "it does not start as QEMU's migration stream (read {head:02x?})"
        )),
    )
}

impl Loading {
    /// Lets the VM run once the load has ended: once the whole state is
    /// in QEMU but for the state's last byte and the stream's end
    /// ([`Held`]; a fed state has ended by now, a file's thread is
    /// waited for), those, and QEMU runs the VM itself as the load ends.
    /// A QEMU that took no `cont` ahead ([`connect_incoming`]) is sent
    /// one first, which it takes while its load waits for them, and its
    /// answer awaited. Then waits for the end of the load as
    /// [`load_and_run`]. `load_ms` counts from [`begin_load`].
    pub fn run(self, qmp: &Qmp) -> Result<Loaded, DevStateError> {
        // Known before the VM may run: a failed stream never ends well,
        // so its load never ends in a running VM.
        let held = self.streaming.outcome().map_err(load_io_err)?;
        if !self.cont_taken {
            let left = self.deadline.saturating_duration_since(Instant::now());
            qmp.send("cont", None)
                .and_then(|cont| cont.wait(left))
                .map_err(load_qmp_err)?;
        }
        held.end();
        finish_load(qmp, None, &self.events, self.started, self.deadline)
    }
}

/// The end of a load whose `cont` is on its way (or answered: `None`):
/// waits for QEMU's `completed` and the `cont`'s answer, and runs a VM
/// the stream left paused.
fn finish_load(
    qmp: &Qmp,
    cont: Option<Pending<'_>>,
    events: &Receiver<remus_qmp::Event>,
    started: Instant,
    deadline: Instant,
) -> Result<Loaded, DevStateError> {
    let mut resumed: Option<Option<u64>> = None;
    let seen = |resumed: &mut Option<Option<u64>>, ev: &remus_qmp::Event| {
        if ev.name == "RESUME" {
            *resumed = Some(ev.timestamp_us);
        }
    };
    wait_completed(qmp, LOAD, events, deadline, &mut |ev| {
        seen(&mut resumed, ev)
    })?;
    let started_by_load = resumed.is_some();
    let load_ms = started.elapsed().as_secs_f64() * 1e3;
    let t = Instant::now();
    if let Some(cont) = cont {
        let left = deadline.saturating_duration_since(Instant::now());
        cont.wait(left).map_err(load_qmp_err)?;
    }
    events.try_iter().for_each(|ev| seen(&mut resumed, &ev));
    tracing::debug!(
        load_ms,
        resume_seen = resumed.is_some(),
        "device state loaded"
    );
    if resumed.is_none() && qmp.status().map_err(load_qmp_err)? != "running" {
        qmp.execute("cont", None).map_err(load_qmp_err)?;
        resumed = events
            .try_iter()
            .find(|ev| ev.name == "RESUME")
            .map(|ev| ev.timestamp_us);
    }
    Ok(Loaded {
        load_ms,
        cont_ms: t.elapsed().as_secs_f64() * 1e3,
        resumed_at_us: resumed.flatten(),
        started_by_load,
    })
}

/// Copies the file `state` into the socket QEMU listens on, but for its
/// last byte and the stream's end, which are the caller's ([`Held`]).
fn stream_state(state: &Path, socket: &Path, deadline: Instant) -> Result<Held, StreamError> {
    stream_rest(state, Incoming::connect(socket)?, deadline)
}

/// The first bytes of every migration stream QEMU writes (its file magic
/// "QEVM" and stream version 3, big-endian), which a load reads before
/// anything else.
pub const STREAM_HEADER: [u8; 8] = *b"QEVM\0\0\0\x03";

/// A connection to a standby QEMU's incoming migration, opened before its
/// device state exists ([`connect_incoming`]).
pub struct Incoming {
    s: UnixStream,
    socket: PathBuf,
    /// [`STREAM_HEADER`] went ahead: the state's own is checked, not sent.
    header_sent: bool,
    /// QEMU took a `cont` before this connection was made.
    cont_taken: bool,
}

impl Incoming {
    /// A connection to the incoming migration on `socket` made now, the
    /// whole stream still to send (header included).
    fn connect(socket: &Path) -> Result<Incoming, StreamError> {
        Ok(Incoming {
            s: UnixStream::connect(socket).map_err(on(socket, "connect to QEMU's"))?,
            socket: socket.to_path_buf(),
            header_sent: false,
            cont_taken: false,
        })
    }

    /// The connection, with writes that give up at `deadline` (a QEMU
    /// that stops reading must not hold the resume for ever), its path
    /// and whether the header went ahead.
    fn until(self, deadline: Instant) -> Result<(UnixStream, PathBuf, bool), StreamError> {
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        self.s
            .set_write_timeout(Some(left))
            .map_err(on(&self.socket, "set a timeout on"))?;
        Ok((self.s, self.socket, self.header_sent))
    }
}

/// An I/O error's mapping for `what` was done to `socket`.
fn on(socket: &Path, what: &'static str) -> impl FnOnce(std::io::Error) -> StreamError {
    let socket = socket.to_path_buf();
    move |e| (what, socket, e)
}

/// Connects to the incoming migration of a standby QEMU that [`listen`]s
/// on `socket` and sends it the stream's header ([`STREAM_HEADER`]), so
/// that QEMU accepts the connection and sets its load up (some 0.2 ms,
/// measured on the 2-core TCG build machine) while the device state is
/// still on its way; [`begin_load`] then sends the rest. Only for a
/// migration's destination with a `-S` standby, which loads early
/// anyway: a standby that may fail over later keeps its socket free.
///
/// QEMU is sent its `cont` first. In `inmigrate` it only notes that the
/// VM is to run as a load ends, and this load cannot end before the
/// switch-over, which alone sends the state's last byte and the stream's
/// end ([`Held`]): QEMU then starts the VM as the load ends, with no
/// round trip of the switch-over's to QEMU before it. (On the 2-core
/// TCG build machine a `cont` sent at the switch-over instead, and
/// answered before the last byte went, cost a migration 0.15-0.37 ms
/// more downtime at the median, A/B over 12 migrations a side, twice.)
/// A `cont` taken when the connection then fails is harmless: that load
/// is begun without this connection, and its `cont` then goes again.
pub fn connect_incoming(qmp: &Qmp, socket: &Path) -> Result<Incoming, DevStateError> {
    qmp.execute("cont", None).map_err(load_qmp_err)?;
    let mut to = open_ahead(socket)?;
    to.cont_taken = true;
    Ok(to)
}

/// [`connect_incoming`] but for the `cont`.
fn open_ahead(socket: &Path) -> Result<Incoming, DevStateError> {
    let on_socket = |what| move |e| load_io_err(on(socket, what)(e));
    let mut to = Incoming::connect(socket).map_err(load_io_err)?;
    to.s.set_write_timeout(Some(STATE_TIMEOUT))
        .map_err(on_socket("set a timeout on"))?;
    std::io::Write::write_all(&mut to.s, &STREAM_HEADER)
        .map_err(on_socket("send the stream header into"))?;
    to.header_sent = true;
    Ok(to)
}

/// Copies the file `state` into `to` (its header checked, not sent, when
/// it went ahead), but for its last byte and the stream's end, which are
/// the caller's ([`Held`]).
fn stream_rest(state: &Path, to: Incoming, deadline: Instant) -> Result<Held, StreamError> {
    use std::io::Read;
    let mut file =
        std::fs::File::open(state).map_err(|e| ("open the saved state", state.into(), e))?;
    let (mut s, socket, header_sent) = to.until(deadline)?;
    let on_socket = |what| on(&socket, what);
    if header_sent {
        let mut head = [0u8; STREAM_HEADER.len()];
        file.read_exact(&mut head)
            .map_err(|e| ("read the header of", state.into(), e))?;
        if head != STREAM_HEADER {
            return Err(not_a_stream("check the header of", state, &head));
        }
    }
    // All but the last byte, which the Held keeps.
    let read_err = |e| ("read", state.to_path_buf(), e);
    let left = file
        .metadata()
        .and_then(|m| std::io::Seek::stream_position(&mut file).map(|p| m.len().saturating_sub(p)))
        .map_err(read_err)?;
    std::io::copy(&mut (&mut file).take(left.saturating_sub(1)), &mut s)
        .map_err(on_socket("stream the state into"))?;
    let mut last = [0u8; 1];
    let last = match file.read(&mut last).map_err(read_err)? {
        0 => None,
        _ => Some(last[0]),
    };
    Ok(Held { s, socket, last })
}

/// Waits for the MIGRATION event saying `completed`; `failed` or
/// `cancelled` are errors with QEMU's reason.
fn wait_completed(
    qmp: &Qmp,
    op: &'static str,
    events: &Receiver<remus_qmp::Event>,
    deadline: Instant,
    other: &mut dyn FnMut(&remus_qmp::Event),
) -> Result<(), DevStateError> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match events.recv_timeout(left) {
            Ok(ev) if ev.name == "MIGRATION" => {
                let status = ev.data["status"].as_str().unwrap_or("").to_string();
                match status.as_str() {
                    "completed" => return Ok(()),
                    "failed" | "cancelled" => {
                        return Err(DevStateError::Failed {
                            op,
                            status,
                            detail: migrate_error(qmp),
                        });
                    }
                    _ => {}
                }
            }
            Ok(ev) => other(&ev),
            Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => {
                return Err(DevStateError::Timeout {
                    op,
                    timeout: STATE_TIMEOUT,
                    runstate: qmp.status().unwrap_or_else(|e| e.to_string()),
                });
            }
        }
    }
}

/// Polls the runstate until it is no longer `state`. There is no event
/// for the end of `finish-migrate`; the wait is short (a few ms).
fn wait_runstate_leaves(
    qmp: &Qmp,
    op: &'static str,
    state: &str,
    deadline: Instant,
) -> Result<(), DevStateError> {
    loop {
        let now = qmp
            .status()
            .map_err(|source| DevStateError::Qmp { op, source })?;
        if now != state {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(DevStateError::Timeout {
                op,
                timeout: STATE_TIMEOUT,
                runstate: now,
            });
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

fn migrate_error(qmp: &Qmp) -> String {
    qmp.execute("query-migrate", None)
        .ok()
        .and_then(|v| v["error-desc"].as_str().map(|s| format!(": {s}")))
        .unwrap_or_default()
}

/// The device state of a protection's checkpoints.
pub const PROTECT_SAVE: &str = "dev.out";
/// The device state of a migration's last checkpoint.
pub const MIGRATE_SAVE: &str = "dev.migrate";
/// The pipe a migration's last checkpoint streams its device state
/// through ([`begin_streamed_save`]).
pub const MIGRATE_PIPE: &str = "dev.migrate.pipe";
/// What device state is saved for, each to its own file.
pub const SAVES: [&str; 2] = [PROTECT_SAVE, MIGRATE_SAVE];
/// A standby's: the device state of its last committed checkpoint,
/// beside its RAM replica (remus-replication's `Replica`).
pub const COMMITTED: &str = "dev.committed";
/// Where the next committed device state is written before it is
/// renamed over [`COMMITTED`].
pub const COMMITTED_NEXT: &str = "dev.committed.next";

/// Where the device state `what` (one of [`SAVES`], [`COMMITTED`] or
/// [`COMMITTED_NEXT`]) of the VM whose guest RAM is `ram_file` is kept:
/// beside that file (`NAME.dev.out`), in the agent's private directory
/// for RAM files, a tmpfs by default. QEMU writes a save with the guest
/// stopped at every checkpoint; on the build machine one took 1.13-1.17
/// ms (p50) there against 1.32-1.37 ms into the VM's directory on ext4.
/// A backup writes its committed state on the path of every
/// acknowledgement (0.05 ms on tmpfs against 0.21 ms on ext4). The RAM
/// beside these files is lost with the host, so they need not outlive it
/// either.
pub fn save_file(ram_file: &Path, what: &str) -> PathBuf {
    ram_file.with_extension(what)
}

/// Removes the device state files [`save_file`] names (a VM that goes).
pub fn remove_save_files(ram_file: &Path) {
    for what in SAVES
        .into_iter()
        .chain([MIGRATE_PIPE, COMMITTED, COMMITTED_NEXT])
    {
        let f = save_file(ram_file, what);
        if let Err(e) = std::fs::remove_file(&f)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(file = %f.display(), error = %e, "cannot remove a device state file");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Read, Write};
    use std::os::unix::net::UnixListener;
    use std::sync::{Arc, Mutex};

    /// A connection opened ahead carries the header first and then the
    /// state without its own; a state that does not start with the header
    /// is refused before any of it is sent.
    /// A state fed as it arrives, its header split across chunks, goes
    /// into a connection opened ahead without its header; one that ends
    /// early or starts as a stranger is refused, nothing of it sent.
    #[test]
    fn a_fed_state_streams_chunk_by_chunk_and_refuses_a_stranger_or_a_short_one() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("in.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        // How a feed finishes: ended, and then its Held ended or dropped;
        // or dropped before its end.
        #[derive(Clone, Copy, PartialEq)]
        enum Finish {
            Ended,
            HeldDropped,
            Dropped,
        }
        // The outcome, what QEMU had before the Held let go and whether
        // it was waiting for more then, and all it got.
        let feed = |chunks: &[&[u8]], how: Finish| {
            let ahead = open_ahead(&socket).unwrap();
            let (mut peer, _) = listener.accept().unwrap();
            let (mut feed, outcome) = Feed::new(ahead, deadline).unwrap();
            for c in chunks {
                feed.push(c);
            }
            if how == Finish::Dropped {
                drop(feed);
            } else {
                feed.end();
            }
            let r = Streaming::Fed(outcome).outcome();
            // Every write is done: a read that would block means the
            // stream goes on.
            let (mut got, mut waiting) = (Vec::new(), false);
            peer.set_nonblocking(true).unwrap();
            let mut buf = [0; 64];
            loop {
                match peer.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        waiting = true;
                        break;
                    }
                    Err(e) => panic!("{e}"),
                }
            }
            peer.set_nonblocking(false).unwrap();
            let before = got.clone();
            let r = r.map(|held| match how {
                Finish::Ended => held.end(),
                _ => drop(held),
            });
            peer.read_to_end(&mut got).unwrap();
            (r, before, waiting, got)
        };
        let chunks: &[&[u8]] = &[b"QEV", b"M\0\0\0\x03sec", b"tions"];
        let (r, before, waiting, got) = feed(chunks, Finish::Ended);
        r.unwrap();
        assert_eq!(
            (&before[..], waiting),
            (&b"QEVM\0\0\0\x03section"[..], true),
            "all but the last byte, and no end, until the Held ends"
        );
        assert_eq!(
            got, b"QEVM\0\0\0\x03sections",
            "the header once, then the rest, then the end"
        );
        // A Held dropped leaves the stream one byte short: QEMU's load
        // fails.
        let (r, _, _, got) = feed(chunks, Finish::HeldDropped);
        r.unwrap();
        assert_eq!(got, b"QEVM\0\0\0\x03section");

        let (r, _, _, got) = feed(&[b"XXXX\0\0\0\x03sections"], Finish::Ended);
        let (what, _, e) = r.unwrap_err();
        assert_eq!(what, FED_HEADER);
        assert!(e.to_string().contains("QEMU's migration stream"), "{e}");
        assert_eq!(got, STREAM_HEADER, "nothing of the refused state was sent");

        // Dropped before the end: the load fails, QEMU never gets an end
        // of stream that would pass for a whole state.
        let (r, _, _, _) = feed(&[b"QEVM\0\0\0\x03sec"], Finish::Dropped);
        let (what, _, e) = r.unwrap_err();
        assert_eq!(what, "receive the state for");
        assert!(e.to_string().contains("before its end"), "{e}");
        let (r, _, _, _) = feed(&[b"QEV"], Finish::Ended);
        assert_eq!(r.unwrap_err().0, FED_HEADER, "too short for a header");
    }

    /// A streamed save's pipe hands over what its writer wrote, in order,
    /// then its end; past the limit, an error; a writer that never came
    /// leaves nothing waiting once stopped.
    #[test]
    fn a_save_pipe_hands_over_what_was_written_then_its_end() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("vm.dev.migrate.pipe");
        std::fs::write(&fifo, b"stale").unwrap();
        let body: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let mut stream = SaveStream::open(&fifo, 1 << 20).unwrap();
        let writer = {
            let (fifo, body) = (fifo.clone(), body.clone());
            std::thread::spawn(move || {
                let mut w = std::fs::OpenOptions::new().write(true).open(&fifo).unwrap();
                for part in body.chunks(32 << 10) {
                    w.write_all(part).unwrap();
                }
            })
        };
        let mut got = Vec::new();
        loop {
            match stream.next(Duration::from_secs(5)) {
                Some(Ok(Some(chunk))) => got.extend_from_slice(&chunk),
                Some(Ok(None)) => break,
                Some(Err(e)) => panic!("{e}"),
                None => panic!("nothing within 5 s"),
            }
        }
        writer.join().unwrap();
        assert_eq!(got, body);
        assert_eq!(stream.close().unwrap(), body, "the whole state, once");
        assert!(!fifo.exists(), "the pipe is removed");

        let mut stream = SaveStream::open(&fifo, 1000).unwrap();
        let writer = {
            let fifo = fifo.clone();
            std::thread::spawn(move || {
                let mut w = std::fs::OpenOptions::new().write(true).open(&fifo).unwrap();
                w.write_all(&[7u8; 5000]).unwrap();
            })
        };
        let too_large = loop {
            match stream.next(Duration::from_secs(5)) {
                Some(Ok(Some(_))) => {}
                Some(Err(e)) => break e,
                other => panic!(
                    "no error past the limit: {:?}",
                    other.map(|r| r.map(|c| c.map(|c| c.len())))
                ),
            }
        };
        assert!(
            too_large.to_string().contains("larger than 1000"),
            "{too_large}"
        );
        writer.join().unwrap();
        let _ = stream.close();

        // No writer ever: stopping returns at once.
        let stream = SaveStream::open(&fifo, 1000).unwrap();
        let t = Instant::now();
        assert_eq!(stream.close().unwrap(), Vec::<u8>::new());
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    }

    #[test]
    fn an_incoming_opened_ahead_gets_the_header_once_and_refuses_a_stranger() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("in.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let state = dir.path().join("dev.state");
        let mut body = STREAM_HEADER.to_vec();
        body.extend_from_slice(b"sections");
        std::fs::write(&state, &body).unwrap();
        let ahead = open_ahead(&socket).unwrap();
        let (mut peer, _) = listener.accept().unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        stream_rest(&state, ahead, deadline).unwrap().end();
        let mut got = Vec::new();
        peer.read_to_end(&mut got).unwrap();
        assert_eq!(got, body, "the header once, then the rest");
        // Not ended: one byte short.
        let ahead = open_ahead(&socket).unwrap();
        let (mut peer, _) = listener.accept().unwrap();
        drop(stream_rest(&state, ahead, deadline).unwrap());
        let mut got = Vec::new();
        peer.read_to_end(&mut got).unwrap();
        assert_eq!(got, body[..body.len() - 1], "all but the last byte");

        std::fs::write(&state, b"XXXX\0\0\0\x03sections").unwrap();
        let ahead = open_ahead(&socket).unwrap();
        let (mut peer, _) = listener.accept().unwrap();
        let (what, path, e) = stream_rest(&state, ahead, deadline).unwrap_err();
        assert_eq!((what, path), ("check the header of", state.clone()));
        assert!(e.to_string().contains("QEMU's migration stream"), "{e}");
        let mut got = Vec::new();
        peer.read_to_end(&mut got).unwrap();
        assert_eq!(got, STREAM_HEADER, "nothing of the refused state was sent");
    }

    /// One QMP message of the scripted QEMU: an event.
    fn ev(name: &str, data: &str) -> String {
        format!(
            "{{\"event\": \"{name}\", \"data\": {data}, \"timestamp\": {{\"seconds\": 1, \"microseconds\": 0}}}}\n"
        )
    }

    type Script = Box<dyn FnMut(&str, &serde_json::Value) -> (String, String) + Send>;

    /// A scripted QEMU: `script` gets each command (after
    /// `qmp_capabilities`) with its arguments and returns the events to
    /// send before the reply, and the reply's `return` value. Every
    /// command is recorded.
    fn scripted(script: Script) -> (Qmp, Arc<Mutex<Vec<String>>>) {
        let (q, seen, _) = scripted_with_events(script);
        (q, seen)
    }

    /// Where a scripted QEMU's messages go: its own events may go there
    /// at any time, between its replies.
    type Out = Arc<Mutex<UnixStream>>;

    /// [`scripted`], and where to write events of its own at any time.
    fn scripted_with_events(mut script: Script) -> (Qmp, Arc<Mutex<Vec<String>>>, Out) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let out = Arc::new(Mutex::new(theirs.try_clone().unwrap()));
        let events = out.clone();
        std::thread::spawn(move || {
            out.lock().unwrap().write_all(b"{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 2, \"minor\": 0, \"major\": 10}, \"package\": \"\"}, \"capabilities\": []}}\n").unwrap();
            let mut line = String::new();
            let mut r = BufReader::new(theirs);
            while r.read_line(&mut line).unwrap_or(0) > 0 {
                let v: serde_json::Value = serde_json::from_str(&line).unwrap();
                line.clear();
                let cmd = v["execute"].as_str().unwrap().to_string();
                let id = v["id"].as_u64().unwrap();
                let (events, ret) = if cmd == "qmp_capabilities" {
                    (String::new(), "{}".to_string())
                } else {
                    log.lock().unwrap().push(cmd.clone());
                    script(&cmd, &v["arguments"])
                };
                let reply = format!("{events}{{\"return\": {ret}, \"id\": {id}}}\n");
                out.lock().unwrap().write_all(reply.as_bytes()).unwrap();
            }
        });
        (Qmp::from_stream(ours).unwrap(), seen, events)
    }

    /// A streamed save whose caller reads none of it while QEMU writes
    /// more than the pipe holds: waiting for QEMU's answer (`finish`, or
    /// the drop of a save given up) reads the pipe, so QEMU's write never
    /// waits on it.
    #[test]
    fn a_streamed_save_is_read_while_its_answer_is_awaited() {
        let body: Vec<u8> = (0..3u32 << 20).map(|i| (i % 253) as u8).collect();
        let written = body.clone();
        let (q, seen) = scripted(Box::new(move |cmd, args| {
            assert_eq!(cmd, SAVE_DEVICES);
            let path = args["filename"].as_str().unwrap();
            let mut w = std::fs::OpenOptions::new().write(true).open(path).unwrap();
            w.write_all(&written).unwrap();
            (String::new(), "{}".into())
        }));
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("vm.dev.migrate.pipe");
        let t = Instant::now();
        let saving = begin_streamed_save(&q, &fifo, 8 << 20).unwrap();
        assert_eq!(saving.finish().unwrap().unwrap(), body);
        let saving = begin_streamed_save(&q, &fifo, 8 << 20).unwrap();
        drop(saving);
        assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
        assert_eq!(commands(&seen).len(), 2, "both saves answered");
        assert!(!fifo.exists(), "the pipe is removed");
    }

    fn commands(seen: &Mutex<Vec<String>>) -> Vec<String> {
        seen.lock().unwrap().clone()
    }

    /// How the scripted QEMU below ends a load.
    #[derive(Clone, Copy)]
    enum Ending {
        /// Starts the VM itself (`cont` came during `inmigrate`).
        StartsIt,
        /// Leaves it paused (a stream saved from a paused VM).
        LeavesItPaused,
        /// The load fails.
        Fails,
    }

    /// A standby listening on `incoming` in the returned directory: at
    /// the first `cont` it reads the state streamed in (which must be
    /// `want`), then ends the load as `ending` says.
    fn standby(
        ending: Ending,
        want: &'static [u8],
    ) -> (tempfile::TempDir, Qmp, Arc<Mutex<Vec<String>>>, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let incoming = dir.path().join("incoming.sock");
        let listener = UnixListener::bind(&incoming).unwrap();
        let mut running = false;
        let mut conts = 0;
        let (q, seen) = scripted(Box::new(move |cmd, _| {
            let mut events = String::new();
            let mut ret = "{}".to_string();
            match cmd {
                "cont" => {
                    conts += 1;
                    if conts == 1 {
                        let (mut s, _) = listener.accept().unwrap();
                        let mut got = Vec::new();
                        s.read_to_end(&mut got).unwrap();
                        assert_eq!(got, want, "the state streamed in");
                        match ending {
                            Ending::Fails => events += &ev("MIGRATION", r#"{"status": "failed"}"#),
                            Ending::StartsIt => {
                                events += &ev("MIGRATION", r#"{"status": "completed"}"#);
                                events += &ev("RESUME", "{}");
                                running = true;
                            }
                            Ending::LeavesItPaused => {
                                events += &ev("MIGRATION", r#"{"status": "completed"}"#)
                            }
                        }
                    } else {
                        events += &ev("RESUME", "{}");
                        running = true;
                    }
                }
                "query-status" => {
                    let status = if running { "running" } else { "paused" };
                    ret = format!("{{\"status\": \"{status}\", \"running\": {running}}}");
                }
                "query-migrate" => {
                    ret = r#"{"status": "failed", "error-desc": "load of device state failed"}"#
                        .into();
                }
                _ => {}
            }
            (events, ret)
        }));
        (dir, q, seen, incoming)
    }

    const STATE: &[u8] = b"QEVM device state";

    fn state_file(dir: &tempfile::TempDir) -> PathBuf {
        let f = dir.path().join("dev.committed");
        std::fs::write(&f, STATE).unwrap();
        f
    }

    #[test]
    fn qemu_starts_the_vm_at_the_end_of_the_load() {
        let (d, q, seen, incoming) = standby(Ending::StartsIt, STATE);
        load_and_run(&q, &state_file(&d), &incoming).unwrap();
        assert_eq!(commands(&seen), ["cont"]);
    }

    #[test]
    fn a_vm_the_stream_left_paused_is_resumed() {
        let (d, q, seen, incoming) = standby(Ending::LeavesItPaused, STATE);
        load_and_run(&q, &state_file(&d), &incoming).unwrap();
        assert_eq!(commands(&seen), ["cont", "query-status", "cont"]);
    }

    #[test]
    fn a_failed_load_is_an_error_with_qemus_reason() {
        let (d, q, seen, incoming) = standby(Ending::Fails, STATE);
        let e = load_and_run(&q, &state_file(&d), &incoming).unwrap_err();
        assert!(
            matches!(&e, DevStateError::Failed { detail, .. } if detail.contains("load of device state failed")),
            "{e}"
        );
        assert_eq!(commands(&seen), ["cont", "query-migrate"]);
    }

    /// Reads `n` bytes from `s`, and whether it then waits for more (a
    /// read would block: neither another byte nor the stream's end is
    /// there).
    fn read_then_waiting(s: &mut UnixStream, n: usize) -> (Vec<u8>, bool) {
        let mut got = vec![0; n];
        s.read_exact(&mut got).unwrap();
        s.set_nonblocking(true).unwrap();
        let more = s.read(&mut [0; 1]);
        s.set_nonblocking(false).unwrap();
        let waiting = matches!(&more, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock);
        (got, waiting)
    }

    /// At the switch-over the `cont` reaches QEMU while its load still
    /// waits for the state's last byte and the stream's end, which go only
    /// after the answer: QEMU then starts the VM itself as the load ends.
    #[test]
    fn an_early_loads_stream_ends_only_after_qemu_took_the_cont() {
        let dir = tempfile::tempdir().unwrap();
        let incoming = dir.path().join("incoming.sock");
        let listener = UnixListener::bind(&incoming).unwrap();
        // What QEMU had at the `cont`: the state but its last byte,
        // whether more came, and the connection.
        type AtCont = Option<(Vec<u8>, bool, UnixStream)>;
        let at_cont: Arc<Mutex<AtCont>> = Default::default();
        let at_cont2 = at_cont.clone();
        let (q, seen) = scripted(Box::new(move |cmd, _| {
            let mut events = String::new();
            if cmd == "cont" {
                let (mut s, _) = listener.accept().unwrap();
                let (got, waiting) = read_then_waiting(&mut s, STATE.len() - 1);
                *at_cont2.lock().unwrap() = Some((got, !waiting, s));
                events += &ev("RESUME", "{}");
                events += &ev("MIGRATION", r#"{"status": "completed"}"#);
            }
            (events, "{}".into())
        }));
        let (loading, mut feed) = begin_fed_load(&q, &incoming, None).unwrap();
        feed.push(&STATE[..5]);
        feed.push(&STATE[5..]);
        feed.end();
        let loaded = loading.run(&q).unwrap();
        assert!(loaded.started_by_load, "RESUME came before completed");
        assert_eq!(commands(&seen), ["cont"], "no second cont");
        let (got, ended, mut s) = at_cont.lock().unwrap().take().expect("a cont");
        assert_eq!(
            got,
            STATE[..STATE.len() - 1],
            "all but the last byte was in before the cont"
        );
        assert!(!ended, "the last byte or the end came before the cont");
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).unwrap();
        assert_eq!(
            rest,
            STATE[STATE.len() - 1..],
            "then the last byte, the end"
        );
    }

    /// An incoming migration opened ahead has its `cont` first, before
    /// the connection; at the switch-over QEMU, done with all but the
    /// state's last byte and waiting for more, gets those and the end,
    /// and no command: it runs the VM itself as the load ends.
    #[test]
    fn an_early_load_opened_ahead_sends_qemu_no_command_at_its_switch_over() {
        let dir = tempfile::tempdir().unwrap();
        let incoming = dir.path().join("incoming.sock");
        let listener = UnixListener::bind(&incoming).unwrap();
        listener.set_nonblocking(true).unwrap();
        let probe = listener.try_clone().unwrap();
        let connected_at_cont: Arc<Mutex<Vec<bool>>> = Default::default();
        let at_cont = connected_at_cont.clone();
        let (q, seen, events) = scripted_with_events(Box::new(move |cmd, _| {
            if cmd == "cont" {
                at_cont.lock().unwrap().push(probe.accept().is_ok());
            }
            (String::new(), "{}".into())
        }));
        let state = [&STREAM_HEADER[..], b"sections"].concat();

        let ahead = connect_incoming(&q, &incoming).unwrap();
        assert_eq!(
            *connected_at_cont.lock().unwrap(),
            [false],
            "one cont, before the connection"
        );
        listener.set_nonblocking(false).unwrap();
        let (mut s, _) = listener.accept().unwrap();
        let (loading, mut feed) = begin_fed_load(&q, &incoming, Some(ahead)).unwrap();
        feed.push(&state[..5]);
        feed.push(&state[5..]);
        feed.end();
        let (got, waiting) = read_then_waiting(&mut s, state.len() - 1);
        assert_eq!(got, state[..state.len() - 1], "all but the last byte");
        assert!(
            waiting,
            "the last byte or the end came before the switch-over"
        );
        // QEMU: the rest, then the VM runs and the load completes.
        let qemu = std::thread::spawn(move || {
            let mut rest = Vec::new();
            s.read_to_end(&mut rest).unwrap();
            let mut out = events.lock().unwrap();
            out.write_all(ev("RESUME", "{}").as_bytes()).unwrap();
            out.write_all(ev("MIGRATION", r#"{"status": "completed"}"#).as_bytes())
                .unwrap();
            rest
        });
        let loaded = loading.run(&q).unwrap();
        assert_eq!(
            qemu.join().unwrap(),
            state[state.len() - 1..],
            "the last byte, the end"
        );
        assert!(loaded.started_by_load, "{loaded:?}");
        assert_eq!(commands(&seen), ["cont"], "nothing sent at the switch-over");
    }

    #[test]
    fn a_standby_that_does_not_listen_is_an_error_not_a_hang() {
        let (d, q, _seen, _incoming) = standby(Ending::StartsIt, STATE);
        let gone = d.path().join("nobody.sock");
        let e = load_and_run(&q, &state_file(&d), &gone).unwrap_err();
        assert!(
            matches!(&e, DevStateError::Io { path, .. } if *path == gone),
            "{e}"
        );
    }

    #[test]
    fn the_socket_is_recognised_by_another_name_for_it() {
        let d = tempfile::tempdir().unwrap();
        let real = d.path().join("vms/a");
        std::fs::create_dir_all(&real).unwrap();
        let sock = real.join("incoming.sock");
        std::fs::write(&sock, b"").unwrap();
        std::os::unix::fs::symlink(d.path().join("vms"), d.path().join("state")).unwrap();
        let info = |path: &Path| json!({"status": "setup", "socket-address": [{"type": "unix", "path": path.to_str().unwrap()}]});
        assert!(listens_on(&info(&sock), &sock));
        assert!(listens_on(
            &info(&d.path().join("state/a/incoming.sock")),
            &sock
        ));
        assert!(!listens_on(&info(&real.join("other.sock")), &sock));
        assert!(!listens_on(&json!({"status": "setup"}), &sock));
    }

    /// A QEMU whose `query-migrate` says `info`; records where
    /// `migrate-incoming` was asked to listen.
    fn incoming_state(info: &'static str) -> (Qmp, Arc<Mutex<Vec<String>>>) {
        scripted(Box::new(move |cmd, args| {
            let ret = match cmd {
                "query-migrate" => info.to_string(),
                _ => "{}".to_string(),
            };
            if cmd == "migrate-incoming" {
                assert_eq!(args["uri"], "unix:/run/vm/incoming.sock");
            }
            (String::new(), ret)
        }))
    }

    #[test]
    fn a_standby_listens_once() {
        let sock = Path::new("/run/vm/incoming.sock");
        let (q, seen) = incoming_state("{}");
        listen(&q, sock).unwrap();
        assert_eq!(commands(&seen), ["query-migrate", "migrate-incoming"]);
        // Adopted: it listens there already.
        let (q, seen) = incoming_state(
            r#"{"status": "setup", "socket-address": [{"type": "unix", "path": "/run/vm/incoming.sock"}]}"#,
        );
        listen(&q, sock).unwrap();
        assert_eq!(commands(&seen), ["query-migrate"]);
        // Anything else is not a standby to resume from.
        for info in [
            r#"{"status": "setup", "socket-address": [{"type": "unix", "path": "/elsewhere.sock"}]}"#,
            r#"{"status": "active"}"#,
        ] {
            let (q, seen) = incoming_state(info);
            let e = listen(&q, sock).unwrap_err();
            assert!(matches!(e, DevStateError::Failed { .. }), "{e}");
            assert_eq!(commands(&seen), ["query-migrate"]);
        }
    }
}
