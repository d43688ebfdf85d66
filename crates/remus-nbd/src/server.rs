//! The NBD server: a unix-socket listener with one accept thread and one
//! thread per client connection, each running the fixed newstyle handshake
//! and then serving simple-reply transmission requests against a
//! [`BlockBackend`].
//!
//! Failures are confined to the connection that caused them: a malformed
//! request gets an NBD error reply (or, where the protocol leaves no other
//! way to stay in sync, a hard disconnect of that one connection); nothing
//! a peer sends can panic or stop the server.

use std::collections::HashMap;
use std::convert::Infallible;
use std::fs;
use std::io::{self, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use tracing::{debug, info, warn};

use crate::backend::BlockBackend;
use crate::error::{NbdError, ProtoError};
use crate::proto::{self, ClientOption, Command, ExportInfoRequest, OptionHeader, Request};

/// How long the server waits for each read during the handshake (the
/// number of options is capped too, so the handshake cannot last forever).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// Options accepted per connection before we decide the client is looping.
const MAX_OPTIONS_PER_CONNECTION: usize = 256;
/// Read buffer for the socket (requests and WRITE payloads).
const READ_BUFFER: usize = 128 * 1024;

/// A snapshot of a server's counters (since it started, all connections).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NbdStats {
    /// Client connections accepted.
    pub connections: u64,
    /// Successful `NBD_CMD_READ`s.
    pub reads: u64,
    /// Successful `NBD_CMD_WRITE`s.
    pub writes: u64,
    /// Bytes returned by successful reads.
    pub bytes_read: u64,
    /// Bytes stored by successful writes.
    pub bytes_written: u64,
    /// Successful `NBD_CMD_FLUSH`es.
    pub flushes: u64,
    /// Successful `NBD_CMD_TRIM`s.
    pub trims: u64,
    /// Successful `NBD_CMD_WRITE_ZEROES`.
    pub write_zeroes: u64,
    /// Requests answered with a nonzero NBD error.
    pub errors: u64,
}

#[derive(Default)]
struct Counters {
    connections: AtomicU64,
    reads: AtomicU64,
    writes: AtomicU64,
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
    flushes: AtomicU64,
    trims: AtomicU64,
    write_zeroes: AtomicU64,
    errors: AtomicU64,
}

fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

impl Counters {
    fn snapshot(&self) -> NbdStats {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        NbdStats {
            connections: g(&self.connections),
            reads: g(&self.reads),
            writes: g(&self.writes),
            bytes_read: g(&self.bytes_read),
            bytes_written: g(&self.bytes_written),
            flushes: g(&self.flushes),
            trims: g(&self.trims),
            write_zeroes: g(&self.write_zeroes),
            errors: g(&self.errors),
        }
    }
}

#[derive(Default)]
struct Connections {
    next_id: u64,
    /// Clones of the open sockets, so shutdown can `shutdown(2)` them.
    streams: HashMap<u64, UnixStream>,
    threads: Vec<JoinHandle<()>>,
}

struct Shared {
    export: String,
    backend: Arc<dyn BlockBackend>,
    counters: Counters,
    stopping: AtomicBool,
    conns: Mutex<Connections>,
}

impl Shared {
    fn conns(&self) -> MutexGuard<'_, Connections> {
        // A poisoned lock only means some thread panicked while holding it;
        // the map itself is still usable.
        self.conns.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Entry point for serving one export on a unix socket.
pub struct NbdServer;

impl NbdServer {
    /// Binds `socket_path` (replacing a stale socket file left by an earlier
    /// run, but never a live socket or a non-socket file) and starts serving
    /// `backend` as the export `export_name`. The empty export name is also
    /// accepted by clients as the default export.
    pub fn start(
        socket_path: &Path,
        export_name: &str,
        backend: Arc<dyn BlockBackend>,
    ) -> Result<NbdServerHandle, NbdError> {
        if let Err(ProtoError::BadString(reason)) = proto::validate_string(export_name.as_bytes()) {
            return Err(NbdError::InvalidExportName {
                name: export_name.to_owned(),
                reason,
            });
        }
        let listener = bind(socket_path)?;
        let started = Self::launch(socket_path, export_name, backend, listener);
        if started.is_err() {
            // Do not leave a socket file nobody serves.
            let _ = fs::remove_file(socket_path);
        }
        started
    }

    fn launch(
        socket_path: &Path,
        export_name: &str,
        backend: Arc<dyn BlockBackend>,
        listener: UnixListener,
    ) -> Result<NbdServerHandle, NbdError> {
        let bind_err = |source| NbdError::Bind {
            path: socket_path.to_owned(),
            source,
        };
        let socket_id = fs::symlink_metadata(socket_path)
            .map(|m| (m.dev(), m.ino()))
            .ok();
        listener.set_nonblocking(true).map_err(bind_err)?;
        let (wake_tx, wake_rx) = UnixStream::pair().map_err(|source| NbdError::Io {
            context: "creating the accept wake-up pair",
            source,
        })?;
        let shared = Arc::new(Shared {
            export: export_name.to_owned(),
            backend,
            counters: Counters::default(),
            stopping: AtomicBool::new(false),
            conns: Mutex::new(Connections::default()),
        });
        let accept_shared = Arc::clone(&shared);
        let accept_thread = thread::Builder::new()
            .name(format!("nbd-accept-{export_name}"))
            .spawn(move || accept_loop(&accept_shared, &listener, &wake_rx))
            .map_err(|source| NbdError::Io {
                context: "spawning the accept thread",
                source,
            })?;
        info!(export = %export_name, socket = %socket_path.display(),
              size = shared.backend.size(), read_only = shared.backend.read_only(),
              "NBD server listening");
        Ok(NbdServerHandle {
            shared,
            socket_path: socket_path.to_owned(),
            socket_id,
            wake: Some(wake_tx),
            accept_thread: Some(accept_thread),
        })
    }
}

fn bind(path: &Path) -> Result<UnixListener, NbdError> {
    let in_use = |reason: &str| NbdError::SocketInUse {
        path: path.to_owned(),
        reason: reason.to_owned(),
    };
    let bind_err = |source| NbdError::Bind {
        path: path.to_owned(),
        source,
    };
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if UnixStream::connect(path).is_ok() {
                return Err(in_use("another server is listening on it"));
            }
            debug!(socket = %path.display(), "removing stale socket file");
            fs::remove_file(path).map_err(bind_err)?;
        }
        Ok(_) => return Err(in_use("the path exists and is not a socket")),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(bind_err(e)),
    }
    UnixListener::bind(path).map_err(bind_err)
}

/// A running server. Dropping it has the same effect as [`shutdown`](Self::shutdown).
pub struct NbdServerHandle {
    shared: Arc<Shared>,
    socket_path: PathBuf,
    socket_id: Option<(u64, u64)>,
    wake: Option<UnixStream>,
    accept_thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for NbdServerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdServerHandle")
            .field("export", &self.shared.export)
            .field("socket_path", &self.socket_path)
            .field("running", &self.accept_thread.is_some())
            .finish()
    }
}

impl NbdServerHandle {
    /// The socket the server listens on.
    pub fn socket_path(&self) -> &Path {
        &self.socket_path
    }

    /// The export's name.
    pub fn export_name(&self) -> &str {
        &self.shared.export
    }

    /// Current counters.
    pub fn stats(&self) -> NbdStats {
        self.shared.counters.snapshot()
    }

    /// Number of client connections currently open.
    pub fn active_connections(&self) -> usize {
        self.shared.conns().streams.len()
    }

    /// Stops accepting, shuts down every open connection (a request being
    /// served finishes its backend call first), joins all threads and
    /// removes the socket file.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        let Some(accept_thread) = self.accept_thread.take() else {
            return;
        };
        self.shared.stopping.store(true, Ordering::SeqCst);
        if let Some(mut wake) = self.wake.take() {
            // Either the byte or the hang-up wakes the accept thread's poll.
            let _ = wake.write_all(&[1]);
        }
        if accept_thread.join().is_err() {
            warn!(export = %self.shared.export, "NBD accept thread panicked");
        }
        let threads = {
            let mut conns = self.shared.conns();
            for stream in conns.streams.values() {
                let _ = stream.shutdown(std::net::Shutdown::Both);
            }
            std::mem::take(&mut conns.threads)
        };
        for t in threads {
            if t.join().is_err() {
                warn!(export = %self.shared.export, "NBD connection thread panicked");
            }
        }
        // Only remove the socket file if it is still the one we created.
        let still_ours = fs::symlink_metadata(&self.socket_path)
            .map(|m| Some((m.dev(), m.ino())) == self.socket_id)
            .unwrap_or(false);
        let removed = if still_ours {
            fs::remove_file(&self.socket_path)
        } else {
            Ok(())
        };
        if let Err(e) = removed {
            warn!(socket = %self.socket_path.display(), error = %e, "cannot remove socket file");
        }
        info!(export = %self.shared.export, "NBD server stopped");
    }
}

impl Drop for NbdServerHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

// ---------------------------------------------------------------------------
// Accepting
// ---------------------------------------------------------------------------

fn accept_loop(shared: &Arc<Shared>, listener: &UnixListener, wake: &UnixStream) {
    loop {
        let mut fds = [
            libc::pollfd {
                fd: listener.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: wake.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a valid array of two pollfd structs whose fds stay
        // open for the duration of the call.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            warn!(export = %shared.export, error = %e, "poll on NBD listener failed");
            thread::sleep(Duration::from_millis(100));
            continue;
        }
        if shared.stopping.load(Ordering::SeqCst) || fds[1].revents != 0 {
            break;
        }
        match listener.accept() {
            Ok((stream, _)) => register_connection(shared, stream),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) => {}
            Err(e) => {
                // E.g. EMFILE: back off instead of spinning.
                warn!(export = %shared.export, error = %e, "accept on NBD socket failed");
                thread::sleep(Duration::from_millis(100));
            }
        }
    }
    debug!(export = %shared.export, "NBD accept thread exiting");
}

fn register_connection(shared: &Arc<Shared>, stream: UnixStream) {
    if let Err(e) = stream.set_nonblocking(false) {
        warn!(export = %shared.export, error = %e, "cannot configure NBD connection");
        return;
    }
    let clone = match stream.try_clone() {
        Ok(c) => c,
        Err(e) => {
            warn!(export = %shared.export, error = %e, "cannot clone NBD connection socket");
            return;
        }
    };
    let mut conns = shared.conns();
    if shared.stopping.load(Ordering::SeqCst) {
        let _ = stream.shutdown(std::net::Shutdown::Both);
        return;
    }
    // Reap threads of connections that already ended.
    let (done, running): (Vec<_>, Vec<_>) = std::mem::take(&mut conns.threads)
        .into_iter()
        .partition(|t| t.is_finished());
    conns.threads = running;
    for t in done {
        let _ = t.join();
    }
    let id = conns.next_id;
    conns.next_id += 1;
    let thread_shared = Arc::clone(shared);
    let spawned = thread::Builder::new()
        .name(format!("nbd-conn-{id}"))
        .spawn(move || {
            serve_connection(&thread_shared, id, stream);
            thread_shared.conns().streams.remove(&id);
        });
    match spawned {
        Ok(handle) => {
            conns.streams.insert(id, clone);
            conns.threads.push(handle);
            bump(&shared.counters.connections, 1);
        }
        Err(e) => {
            warn!(export = %shared.export, error = %e, "cannot spawn NBD connection thread");
            let _ = clone.shutdown(std::net::Shutdown::Both);
        }
    }
}

// ---------------------------------------------------------------------------
// One connection
// ---------------------------------------------------------------------------

/// Why a connection ended.
#[derive(Debug)]
enum Close {
    /// Client sent `NBD_CMD_DISC`.
    Disconnect,
    /// Client sent `NBD_OPT_ABORT`.
    Abort,
    /// Peer closed the socket (or we shut it down).
    Eof,
    /// We hard-disconnected because the peer broke the protocol.
    Protocol(String),
    /// Socket error.
    Io(io::Error),
}

impl From<io::Error> for Close {
    fn from(e: io::Error) -> Self {
        match e.kind() {
            io::ErrorKind::UnexpectedEof
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionReset => Close::Eof,
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                Close::Protocol("timed out waiting for the client".into())
            }
            _ => Close::Io(e),
        }
    }
}

struct Conn<'a> {
    shared: &'a Shared,
    id: u64,
    reader: BufReader<&'a UnixStream>,
    writer: NoSigPipe<'a>,
}

/// Writes with `send(MSG_NOSIGNAL)`, so a client that hung up yields
/// `EPIPE` rather than a `SIGPIPE` for the host process, whatever its
/// signal disposition.
struct NoSigPipe<'a>(&'a UnixStream);

impl Write for NoSigPipe<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // SAFETY: `buf` is valid for `buf.len()` bytes and the fd is owned by
        // the borrowed stream for the duration of the call.
        let n = unsafe {
            libc::send(
                self.0.as_raw_fd(),
                buf.as_ptr().cast(),
                buf.len(),
                libc::MSG_NOSIGNAL,
            )
        };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Export parameters fixed for the rest of the connection at handshake end.
#[derive(Clone, Copy)]
struct Negotiated {
    size: u64,
    read_only: bool,
}

fn transmission_flags(read_only: bool) -> u16 {
    let mut flags = proto::FLAG_HAS_FLAGS | proto::FLAG_SEND_FLUSH | proto::FLAG_SEND_FUA;
    if read_only {
        flags |= proto::FLAG_READ_ONLY;
    } else {
        flags |= proto::FLAG_SEND_TRIM | proto::FLAG_SEND_WRITE_ZEROES;
    }
    flags
}

fn serve_connection(shared: &Shared, id: u64, stream: UnixStream) {
    let export = shared.export.as_str();
    info!(export, conn = id, "NBD client connected");
    let mut conn = Conn {
        shared,
        id,
        reader: BufReader::with_capacity(READ_BUFFER, &stream),
        writer: NoSigPipe(&stream),
    };
    let outcome = stream
        .set_read_timeout(Some(HANDSHAKE_TIMEOUT))
        .map_err(Close::from)
        .and_then(|()| conn.handshake())
        .and_then(|neg| {
            stream.set_read_timeout(None)?;
            info!(
                export,
                conn = id,
                size = neg.size,
                read_only = neg.read_only,
                "NBD client entered transmission phase"
            );
            conn.transmission(neg)
        });
    let why = match outcome {
        Ok(never) => match never {},
        Err(why) => why,
    };
    match why {
        Close::Disconnect => info!(export, conn = id, "NBD client disconnected"),
        Close::Abort => info!(export, conn = id, "NBD client aborted the handshake"),
        Close::Eof => info!(export, conn = id, "NBD client connection closed"),
        Close::Protocol(reason) => {
            warn!(export, conn = id, %reason, "dropping NBD client: protocol violation");
        }
        Close::Io(e) => warn!(export, conn = id, error = %e, "NBD connection failed"),
    }
    let _ = stream.shutdown(std::net::Shutdown::Both);
}

/// Maps a backend error onto an NBD error number.
fn nbd_errno(e: &io::Error) -> u32 {
    match e.raw_os_error() {
        Some(libc::ENOSPC | libc::EDQUOT | libc::EFBIG) => proto::NBD_ENOSPC,
        _ if e.kind() == io::ErrorKind::StorageFull => proto::NBD_ENOSPC,
        _ => proto::NBD_EIO,
    }
}

/// Checks `[offset, offset + len)` against the export size.
fn range_errno(offset: u64, len: u64, size: u64, is_write: bool) -> Option<u32> {
    match offset.checked_add(len) {
        None => Some(proto::NBD_EINVAL),
        // The spec asks for ENOSPC on writes past the end, EINVAL otherwise.
        Some(end) if end > size => Some(if is_write {
            proto::NBD_ENOSPC
        } else {
            proto::NBD_EINVAL
        }),
        Some(_) => None,
    }
}

impl Conn<'_> {
    fn read_exact(&mut self, buf: &mut [u8]) -> Result<(), Close> {
        self.reader.read_exact(buf).map_err(Close::from)
    }

    fn send(&mut self, bytes: &[u8]) -> Result<(), Close> {
        self.writer.write_all(bytes).map_err(Close::from)
    }

    fn send_option_reply(&mut self, option: u32, reply: u32, data: &[u8]) -> Result<(), Close> {
        self.send(&proto::encode_option_reply(option, reply, data))
    }

    fn export_matches(&self, name: &str) -> bool {
        name.is_empty() || name == self.shared.export
    }

    // -- handshake ----------------------------------------------------------

    fn handshake(&mut self) -> Result<Negotiated, Close> {
        self.send(&proto::encode_greeting(proto::SERVER_HANDSHAKE_FLAGS))?;
        let mut cf = [0u8; 4];
        self.read_exact(&mut cf)?;
        let client_flags = u32::from_be_bytes(cf);
        if client_flags & proto::FLAG_C_FIXED_NEWSTYLE == 0 {
            return Err(Close::Protocol(
                "client does not support fixed newstyle negotiation".into(),
            ));
        }
        if client_flags & !proto::KNOWN_CLIENT_FLAGS != 0 {
            return Err(Close::Protocol(format!(
                "unknown client flags {client_flags:#x}"
            )));
        }
        let no_zeroes = client_flags & proto::FLAG_C_NO_ZEROES != 0;
        let neg = Negotiated {
            size: self.shared.backend.size(),
            read_only: self.shared.backend.read_only(),
        };
        let tflags = transmission_flags(neg.read_only);

        for _ in 0..MAX_OPTIONS_PER_CONNECTION {
            let mut hb = [0u8; OptionHeader::LEN];
            self.read_exact(&mut hb)?;
            let header = OptionHeader::decode(&hb)
                .map_err(|e| Close::Protocol(format!("bad option header: {e}")))?;
            let (option, len) = (header.option, header.length);
            if len > proto::MAX_OPTION_LEN {
                // Do not read (or allocate) an absurd payload: refuse and hang up.
                if option != proto::OPT_EXPORT_NAME {
                    let _ = self.send_option_reply(
                        option,
                        proto::REP_ERR_TOO_BIG,
                        b"option data too long",
                    );
                }
                return Err(Close::Protocol(format!(
                    "option {option} has {len} bytes of data (limit {})",
                    proto::MAX_OPTION_LEN
                )));
            }
            let mut data = vec![0u8; len as usize];
            self.read_exact(&mut data)?;
            debug!(export = %self.shared.export, conn = self.id, option, len, "NBD option");

            let parsed = match proto::decode_option(option, &data) {
                Ok(p) => p,
                Err(e) if option == proto::OPT_EXPORT_NAME => {
                    return Err(Close::Protocol(format!("bad NBD_OPT_EXPORT_NAME: {e}")));
                }
                Err(e) => {
                    let msg = format!("invalid option data: {e}");
                    self.send_option_reply(option, proto::REP_ERR_INVALID, msg.as_bytes())?;
                    continue;
                }
            };
            match parsed {
                ClientOption::ExportName(name) => {
                    if !self.export_matches(&name) {
                        // EXPORT_NAME cannot carry an error: the spec says hang up.
                        return Err(Close::Protocol(format!("unknown export {name:?}")));
                    }
                    self.send(&proto::encode_export_name_reply(
                        neg.size, tflags, no_zeroes,
                    ))?;
                    return Ok(neg);
                }
                ClientOption::Abort => {
                    // The client may already have gone; that is fine.
                    let _ = self.send_option_reply(option, proto::REP_ACK, &[]);
                    return Err(Close::Abort);
                }
                ClientOption::List => {
                    let entry = proto::encode_rep_server(&self.shared.export);
                    self.send_option_reply(option, proto::REP_SERVER, &entry)?;
                    self.send_option_reply(option, proto::REP_ACK, &[])?;
                }
                ClientOption::Info(req) => {
                    self.reply_info(option, &req, neg, tflags)?;
                }
                ClientOption::Go(req) => {
                    if self.reply_info(option, &req, neg, tflags)? {
                        return Ok(neg);
                    }
                }
                ClientOption::Unsupported(o) => {
                    let msg = format!("option {o} is not supported by this server");
                    self.send_option_reply(o, proto::REP_ERR_UNSUP, msg.as_bytes())?;
                }
            }
        }
        Err(Close::Protocol(format!(
            "more than {MAX_OPTIONS_PER_CONNECTION} options"
        )))
    }

    /// Answers `NBD_OPT_INFO`/`NBD_OPT_GO`; returns whether it succeeded.
    fn reply_info(
        &mut self,
        option: u32,
        req: &ExportInfoRequest,
        neg: Negotiated,
        tflags: u16,
    ) -> Result<bool, Close> {
        if !self.export_matches(&req.name) {
            let msg = format!("export {:?} not found", req.name);
            self.send_option_reply(option, proto::REP_ERR_UNKNOWN, msg.as_bytes())?;
            return Ok(false);
        }
        self.send_option_reply(
            option,
            proto::REP_INFO,
            &proto::encode_info_export(neg.size, tflags),
        )?;
        // Our constraints are the spec defaults, so BLOCK_SIZE is optional;
        // we send it whenever it is asked for.
        if req.info_requests.contains(&proto::INFO_BLOCK_SIZE) {
            self.send_option_reply(
                option,
                proto::REP_INFO,
                &proto::encode_info_block_size(
                    proto::MIN_BLOCK_SIZE,
                    proto::PREFERRED_BLOCK_SIZE,
                    proto::MAX_PAYLOAD,
                ),
            )?;
        }
        if req.info_requests.contains(&proto::INFO_NAME) {
            let name = proto::encode_info_name(&self.shared.export);
            self.send_option_reply(option, proto::REP_INFO, &name)?;
        }
        self.send_option_reply(option, proto::REP_ACK, &[])?;
        Ok(true)
    }

    // -- transmission -------------------------------------------------------

    fn transmission(&mut self, neg: Negotiated) -> Result<Infallible, Close> {
        loop {
            let mut hb = [0u8; Request::LEN];
            self.read_exact(&mut hb)?;
            let req = Request::decode(&hb)
                .map_err(|e| Close::Protocol(format!("bad request header: {e}")))?;
            self.handle_request(&req, neg)?;
        }
    }

    fn reply(&mut self, cookie: u64, error: u32) -> Result<(), Close> {
        if error != 0 {
            bump(&self.shared.counters.errors, 1);
        }
        self.send(&proto::SimpleReply { error, cookie }.encode())
    }

    /// Replies with the result of a backend call, counting errors.
    fn reply_result(&mut self, req: &Request, what: &str, r: io::Result<()>) -> Result<(), Close> {
        match r {
            Ok(()) => self.reply(req.cookie, 0),
            Err(e) => {
                let errno = nbd_errno(&e);
                warn!(export = %self.shared.export, conn = self.id, op = what,
                      offset = req.offset, length = req.length, error = %e, nbd_error = errno,
                      "NBD backend error");
                self.reply(req.cookie, errno)
            }
        }
    }

    fn reject(&mut self, req: &Request, errno: u32, why: &str) -> Result<(), Close> {
        debug!(export = %self.shared.export, conn = self.id, command = ?req.command,
               flags = req.flags, offset = req.offset, length = req.length,
               nbd_error = errno, why, "NBD request rejected");
        self.reply(req.cookie, errno)
    }

    fn handle_request(&mut self, req: &Request, neg: Negotiated) -> Result<(), Close> {
        let shared = self.shared;
        let backend = &*shared.backend;
        let counters = &shared.counters;
        let len = u64::from(req.length);
        let fua = req.flags & proto::CMD_FLAG_FUA != 0;
        // FUA is valid on every command; NO_HOLE only on WRITE_ZEROES.
        let allowed = match req.command {
            Command::WriteZeroes => proto::CMD_FLAG_FUA | proto::CMD_FLAG_NO_HOLE,
            _ => proto::CMD_FLAG_FUA,
        };
        let bad_flags = req.flags & !allowed != 0;

        match req.command {
            Command::Disc => Err(Close::Disconnect),
            Command::Read => {
                if bad_flags {
                    return self.reject(req, proto::NBD_EINVAL, "unsupported flags");
                }
                if req.length > proto::MAX_PAYLOAD {
                    return self.reject(req, proto::NBD_EINVAL, "read longer than max payload");
                }
                if let Some(errno) = range_errno(req.offset, len, neg.size, false) {
                    return self.reject(req, errno, "read outside the export");
                }
                let mut buf = vec![0u8; req.length as usize];
                match backend.read_at(&mut buf, req.offset) {
                    Ok(()) => {
                        // Count before replying so a client that has its data
                        // also sees it in the stats.
                        bump(&counters.reads, 1);
                        bump(&counters.bytes_read, len);
                        self.send(
                            &proto::SimpleReply {
                                error: 0,
                                cookie: req.cookie,
                            }
                            .encode(),
                        )?;
                        self.send(&buf)
                    }
                    Err(e) => self.reply_result(req, "read", Err(e)),
                }
            }
            Command::Write => {
                if req.length > proto::MAX_PAYLOAD {
                    // We will not read that much, so we cannot stay in sync:
                    // say why, then hang up.
                    let _ = self.reply(req.cookie, proto::NBD_EINVAL);
                    return Err(Close::Protocol(format!(
                        "write payload of {} bytes exceeds the {} byte maximum",
                        req.length,
                        proto::MAX_PAYLOAD
                    )));
                }
                // Always consume the payload so the stream stays in sync.
                let mut buf = vec![0u8; req.length as usize];
                self.read_exact(&mut buf)?;
                if bad_flags {
                    return self.reject(req, proto::NBD_EINVAL, "unsupported flags");
                }
                if neg.read_only {
                    return self.reject(req, proto::NBD_EPERM, "write to read-only export");
                }
                if let Some(errno) = range_errno(req.offset, len, neg.size, true) {
                    return self.reject(req, errno, "write outside the export");
                }
                let r = backend.write_at(&buf, req.offset, fua);
                if r.is_ok() {
                    bump(&counters.writes, 1);
                    bump(&counters.bytes_written, len);
                }
                self.reply_result(req, "write", r)
            }
            Command::Flush => {
                if bad_flags {
                    return self.reject(req, proto::NBD_EINVAL, "unsupported flags");
                }
                let r = backend.flush();
                if r.is_ok() {
                    bump(&counters.flushes, 1);
                }
                self.reply_result(req, "flush", r)
            }
            Command::Trim => {
                if bad_flags {
                    return self.reject(req, proto::NBD_EINVAL, "unsupported flags");
                }
                if neg.read_only {
                    return self.reject(req, proto::NBD_EPERM, "trim on read-only export");
                }
                if let Some(errno) = range_errno(req.offset, len, neg.size, false) {
                    return self.reject(req, errno, "trim outside the export");
                }
                let mut r = backend.trim(req.offset, len);
                if r.is_ok() && fua {
                    r = backend.flush();
                }
                if r.is_ok() {
                    bump(&counters.trims, 1);
                }
                self.reply_result(req, "trim", r)
            }
            Command::WriteZeroes => {
                if bad_flags {
                    return self.reject(req, proto::NBD_EINVAL, "unsupported flags");
                }
                if neg.read_only {
                    return self.reject(req, proto::NBD_EPERM, "write zeroes on read-only export");
                }
                if let Some(errno) = range_errno(req.offset, len, neg.size, true) {
                    return self.reject(req, errno, "write zeroes outside the export");
                }
                let may_trim = req.flags & proto::CMD_FLAG_NO_HOLE == 0;
                let r = backend.write_zeroes(req.offset, len, may_trim, fua);
                if r.is_ok() {
                    bump(&counters.write_zeroes, 1);
                }
                self.reply_result(req, "write_zeroes", r)
            }
            Command::Other(_) => self.reject(req, proto::NBD_EINVAL, "unknown command"),
        }
    }
}
