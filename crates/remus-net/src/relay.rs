//! The relay between QEMU's `-netdev stream` socket and a tap device.
//!
//! ```text
//!            QEMU (client)                               bridge
//!                 │  unix stream, 4-byte BE length + frame   │
//!   ┌─────────────▼──────────────┐                           │
//!   │ "vm" thread: accept, read, │  Egress::frame_from_vm   ┌┴──────┐
//!   │ FrameDecoder ──────────────┼──► (seam) ──► TapSink ──►│  tap  │
//!   │                            │                          │       │
//!   │ "tap" thread: poll tap ────┼──── framed, at once ◄────┤       │
//!   └────────────────────────────┘                          └───────┘
//! ```
//!
//! * One listener per VM NIC at `socket_path`. QEMU connects as the client
//!   (`server=off`). When it disconnects the relay goes back to `accept`,
//!   because a restored QEMU reconnects to the same path later.
//! * VM → network goes through the [`Egress`] seam, so Remus output
//!   buffering (hold frames until the backup acked the epoch) can be put
//!   there without touching the relay. [`PassThrough`] is the default.
//! * Network → VM is delivered at once, except while a checkpoint holds
//!   the inbound gate closed ([`crate::inbound`]): then frames wait in the
//!   tap's queue. With no QEMU connected such frames are dropped (and
//!   counted). The tap thread waits for room in QEMU's socket before it
//!   writes a frame, so a closing gate always finds it between two frames.
//! * A corrupt length prefix closes that connection only.
//! * [`Relay::shutdown`] (or drop) wakes both threads through an eventfd
//!   they poll on, `shutdown(2)`s the live connection (which also unblocks a
//!   writer stuck on a QEMU that is not reading, e.g. a paused VM), joins
//!   the threads and removes the socket file. No busy loops, no timeouts.

use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use thiserror::Error;
use tracing::{debug, error, info, warn};

use crate::frame::{self, FrameDecoder, MAX_FRAME_LEN};
use crate::inbound::{Gate, InboundGate};
use crate::tap::Tap;

/// The seam for frames leaving the VM (VM → tap → bridge).
///
/// The relay calls [`frame_from_vm`](Self::frame_from_vm) on its "vm"
/// thread for every frame QEMU sends, in order. An implementation forwards
/// the frame with [`TapSink::send`] now, or copies it and sends it later:
/// `TapSink` is `Clone + Send + Sync`, so a Remus output buffer keeps a
/// clone and releases held frames from whatever thread learns that the
/// backup acknowledged the checkpoint.
///
/// The call should not block for long: while it runs, nothing is read from
/// QEMU.
pub trait Egress: Send {
    /// One complete Ethernet frame from the VM.
    fn frame_from_vm(&mut self, frame: &[u8], tap: &TapSink);
}

/// Forwards every frame to the tap immediately (no buffering).
#[derive(Debug, Default, Clone, Copy)]
pub struct PassThrough;

impl Egress for PassThrough {
    fn frame_from_vm(&mut self, frame: &[u8], tap: &TapSink) {
        // A failed write is counted and logged by the sink; an Ethernet
        // frame that cannot be delivered is simply lost.
        let _ = tap.send(frame);
    }
}

/// Writes frames to the relay's tap and counts them. Cheap to clone.
#[derive(Debug, Clone)]
pub struct TapSink {
    tap: Arc<Tap>,
    counters: Arc<Counters>,
}

impl TapSink {
    /// Writes one frame to the tap (towards the bridge). On failure the
    /// frame is dropped, counted in [`DropCounts::tap_write_failed`], and
    /// the error is returned for information.
    pub fn send(&self, frame: &[u8]) -> io::Result<()> {
        match self.tap.write_frame(frame) {
            Ok(()) => {
                self.counters.frames_to_tap.fetch_add(1, Ordering::Relaxed);
                self.counters
                    .bytes_to_tap
                    .fetch_add(frame.len() as u64, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => {
                self.counters
                    .drop_tap_write_failed
                    .fetch_add(1, Ordering::Relaxed);
                debug!(tap = %self.tap.name(), len = frame.len(), error = %e, "dropped frame: tap write failed");
                Err(e)
            }
        }
    }

    /// Name of the tap device frames go to.
    pub fn tap_name(&self) -> &str {
        self.tap.name()
    }
}

/// Frames dropped, by reason.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DropCounts {
    /// VM → tap: writing to the tap failed.
    pub tap_write_failed: u64,
    /// Tap → VM: a frame arrived while no QEMU was connected.
    pub no_vm_connected: u64,
    /// Tap → VM: writing to QEMU's socket failed (QEMU went away).
    pub vm_write_failed: u64,
    /// VM → tap: a partial frame was pending when QEMU disconnected.
    pub truncated_at_disconnect: u64,
    /// Connections closed because of an invalid length prefix (each loses
    /// whatever followed the bad prefix).
    pub corrupt_streams: u64,
}

/// A snapshot of the relay's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RelayStats {
    /// QEMU connections accepted so far.
    pub connections: u64,
    /// Frames decoded from QEMU's socket (before the egress seam).
    pub frames_from_vm: u64,
    /// Bytes (frame payload, no prefix) decoded from QEMU's socket.
    pub bytes_from_vm: u64,
    /// Frames written to the tap (after the egress seam).
    pub frames_to_tap: u64,
    /// Bytes written to the tap.
    pub bytes_to_tap: u64,
    /// Frames read from the tap and written to QEMU's socket.
    pub frames_to_vm: u64,
    /// Bytes (frame payload, no prefix) written to QEMU's socket.
    pub bytes_to_vm: u64,
    /// Frames dropped, by reason.
    pub drops: DropCounts,
    /// The inbound gate's work for checkpoints.
    pub gate: GateStats,
}

/// What the inbound gate did (see [`crate::inbound`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GateStats {
    /// Checkpoints that found QEMU drained before they stopped the VM.
    pub drained: u64,
    /// Checkpoints whose wait ran out (the guest did not take its frames
    /// in time).
    pub timeouts: u64,
    /// Sentinel frames written to QEMU.
    pub sentinels: u64,
}

#[derive(Debug, Default)]
struct Counters {
    connections: AtomicU64,
    frames_from_vm: AtomicU64,
    bytes_from_vm: AtomicU64,
    frames_to_tap: AtomicU64,
    bytes_to_tap: AtomicU64,
    frames_to_vm: AtomicU64,
    bytes_to_vm: AtomicU64,
    drop_tap_write_failed: AtomicU64,
    drop_no_vm_connected: AtomicU64,
    drop_vm_write_failed: AtomicU64,
    drop_truncated_at_disconnect: AtomicU64,
    drop_corrupt_streams: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> RelayStats {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        RelayStats {
            connections: g(&self.connections),
            frames_from_vm: g(&self.frames_from_vm),
            bytes_from_vm: g(&self.bytes_from_vm),
            frames_to_tap: g(&self.frames_to_tap),
            bytes_to_tap: g(&self.bytes_to_tap),
            frames_to_vm: g(&self.frames_to_vm),
            bytes_to_vm: g(&self.bytes_to_vm),
            drops: DropCounts {
                tap_write_failed: g(&self.drop_tap_write_failed),
                no_vm_connected: g(&self.drop_no_vm_connected),
                vm_write_failed: g(&self.drop_vm_write_failed),
                truncated_at_disconnect: g(&self.drop_truncated_at_disconnect),
                corrupt_streams: g(&self.drop_corrupt_streams),
            },
            gate: GateStats::default(),
        }
    }
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// Errors starting a relay.
#[derive(Debug, Error)]
pub enum RelayError {
    /// Something other than a socket sits at the socket path; not removed.
    #[error("{} exists and is not a socket; refusing to remove it", .0.display())]
    PathOccupied(PathBuf),
    /// Binding the listening socket failed.
    #[error("cannot listen on {}: {source}", path.display())]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Any other setup failure.
    #[error("{op}: {source}")]
    Io {
        /// What was being attempted.
        op: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// State shared by the handle and both threads.
#[derive(Debug)]
pub(crate) struct Shared {
    /// eventfd; once written it stays readable, so it is a level-triggered
    /// "stop" signal for every poll.
    wake: OwnedFd,
    /// The live QEMU connection, if any (the tap thread writes to it).
    conn: Mutex<Option<Arc<UnixStream>>>,
    counters: Arc<Counters>,
    /// Where a checkpoint holds frames from the tap back (the tap thread
    /// only writes to QEMU while it is open).
    pub(crate) gate: Gate,
}

impl Shared {
    pub(crate) fn conn(&self) -> MutexGuard<'_, Option<Arc<UnixStream>>> {
        // Nothing panics while holding the lock, but never propagate poison.
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A running relay for one VM NIC. Stops on [`shutdown`](Self::shutdown)
/// or drop.
#[derive(Debug)]
pub struct Relay {
    socket_path: PathBuf,
    /// (st_dev, st_ino) of the socket we bound, so we never remove a file
    /// somebody else created at the same path afterwards.
    socket_id: (u64, u64),
    tap_name: String,
    shared: Arc<Shared>,
    sink: TapSink,
    threads: Vec<JoinHandle<()>>,
    stopped: bool,
}

impl Relay {
    /// Starts a pass-through relay (no output buffering).
    pub fn start(socket_path: impl AsRef<Path>, tap: Tap) -> Result<Relay, RelayError> {
        Self::start_with_egress(socket_path, tap, Box::new(PassThrough))
    }

    /// Starts a relay whose VM → network frames go through `egress`.
    ///
    /// Binds a listener at `socket_path` (a stale socket file there is
    /// removed first) and spawns the two relay threads.
    pub fn start_with_egress(
        socket_path: impl AsRef<Path>,
        tap: Tap,
        egress: Box<dyn Egress>,
    ) -> Result<Relay, RelayError> {
        let socket_path = socket_path.as_ref().to_path_buf();
        remove_stale_socket(&socket_path)?;
        let listener = UnixListener::bind(&socket_path).map_err(|source| RelayError::Bind {
            path: socket_path.clone(),
            source,
        })?;
        let meta = std::fs::symlink_metadata(&socket_path).map_err(|source| RelayError::Io {
            op: "stat bound socket",
            source,
        })?;
        let socket_id = (meta.dev(), meta.ino());
        let cleanup = |e: RelayError| {
            let _ = std::fs::remove_file(&socket_path);
            e
        };
        listener.set_nonblocking(true).map_err(|source| {
            cleanup(RelayError::Io {
                op: "set listener non-blocking",
                source,
            })
        })?;

        // SAFETY: plain eventfd(2) call.
        let wake = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if wake < 0 {
            return Err(cleanup(RelayError::Io {
                op: "eventfd",
                source: io::Error::last_os_error(),
            }));
        }
        // SAFETY: fresh descriptor we own.
        let wake = unsafe { OwnedFd::from_raw_fd(wake) };

        let tap_name = tap.name().to_owned();
        let counters = Arc::new(Counters::default());
        let gate = Gate::new().map_err(|source| {
            cleanup(RelayError::Io {
                op: "eventfd",
                source,
            })
        })?;
        let shared = Arc::new(Shared {
            wake,
            conn: Mutex::new(None),
            counters: counters.clone(),
            gate,
        });
        let tap = Arc::new(tap);
        let sink = TapSink {
            tap: tap.clone(),
            counters,
        };

        let mut relay = Relay {
            socket_path,
            socket_id,
            tap_name,
            shared,
            sink,
            threads: Vec::new(),
            stopped: false,
        };

        let vm = VmSide {
            listener,
            shared: relay.shared.clone(),
            sink: relay.sink.clone(),
            egress,
            socket_path: relay.socket_path.clone(),
        };
        let spawn_err = |source| RelayError::Io {
            op: "spawn relay thread",
            source,
        };
        // On a spawn failure `relay` drops: threads stop, socket is removed.
        let handle = std::thread::Builder::new()
            .name(format!("remus-net-vm-{}", relay.tap_name))
            .spawn(move || vm.run())
            .map_err(spawn_err)?;
        relay.threads.push(handle);

        let shared = relay.shared.clone();
        let handle = std::thread::Builder::new()
            .name(format!("remus-net-tap-{}", relay.tap_name))
            .spawn(move || tap_thread(&tap, &shared))
            .map_err(spawn_err)?;
        relay.threads.push(handle);

        info!(socket = %relay.socket_path.display(), tap = %relay.tap_name, "network relay started");
        Ok(relay)
    }

    /// Path of the listening socket (what QEMU's `addr.path` names).
    pub fn socket_path(&self) -> &Path {
        &self.socket_path
    }

    /// Name of the tap device.
    pub fn tap_name(&self) -> &str {
        &self.tap_name
    }

    /// Whether a QEMU is currently connected.
    pub fn is_vm_connected(&self) -> bool {
        self.shared.conn().is_some()
    }

    /// A handle to write frames to the tap, e.g. for an output buffer that
    /// releases frames from another thread.
    pub fn tap_sink(&self) -> TapSink {
        self.sink.clone()
    }

    /// Current counters.
    pub fn stats(&self) -> RelayStats {
        RelayStats {
            gate: self.shared.gate.counters.snapshot(),
            ..self.shared.counters.snapshot()
        }
    }

    /// The gate a checkpoint closes before it stops the VM, so that no
    /// frame is queued inside QEMU when it stops (see [`crate::inbound`]).
    pub fn inbound_gate(&self) -> InboundGate {
        InboundGate {
            shared: self.shared.clone(),
        }
    }

    /// Stops both threads, waits for them, removes the socket file, and
    /// returns the final counters. The tap closes (and disappears) once the
    /// last [`TapSink`] clone is gone.
    pub fn shutdown(mut self) -> RelayStats {
        self.stop();
        self.stats()
    }

    fn stop(&mut self) {
        if self.stopped {
            return;
        }
        self.stopped = true;
        let one: u64 = 1;
        // SAFETY: writing 8 bytes from a valid u64 to our eventfd.
        let rc = unsafe {
            libc::write(
                self.shared.wake.as_raw_fd(),
                (&one as *const u64).cast(),
                std::mem::size_of::<u64>(),
            )
        };
        if rc < 0 {
            // Cannot really happen (counter overflow at most); the
            // shutdown(2) below still ends a live connection.
            error!(error = %io::Error::last_os_error(), "cannot signal relay threads");
        }
        self.shared.gate.stop();
        let conn = self.shared.conn().take();
        if let Some(conn) = conn {
            let _ = conn.shutdown(std::net::Shutdown::Both);
        }
        for t in self.threads.drain(..) {
            if t.join().is_err() {
                error!(tap = %self.tap_name, "relay thread panicked");
            }
        }
        match std::fs::symlink_metadata(&self.socket_path) {
            Ok(m) if (m.dev(), m.ino()) == self.socket_id => {
                if let Err(e) = std::fs::remove_file(&self.socket_path) {
                    warn!(socket = %self.socket_path.display(), error = %e, "cannot remove socket file");
                }
            }
            _ => {}
        }
        info!(socket = %self.socket_path.display(), tap = %self.tap_name, "network relay stopped");
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop();
    }
}

fn remove_stale_socket(path: &Path) -> Result<(), RelayError> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            debug!(socket = %path.display(), "removing stale socket file");
            std::fs::remove_file(path).map_err(|source| RelayError::Io {
                op: "remove stale socket file",
                source,
            })
        }
        Ok(_) => Err(RelayError::PathOccupied(path.to_path_buf())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(RelayError::Io {
            op: "stat socket path",
            source,
        }),
    }
}

/// Outcome of waiting on a descriptor together with the stop eventfd.
enum Wait {
    /// Stop requested.
    Stop,
    /// The descriptor is ready.
    Ready,
    /// Timed out (only with a finite timeout).
    Timeout,
}

/// Polls `fd` for input together with the stop eventfd.
fn wait(fd: RawFd, wake: RawFd, timeout_ms: libc::c_int) -> io::Result<Wait> {
    let mut fds = [
        libc::pollfd {
            fd: wake,
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    let rc = poll(&mut fds, timeout_ms)?;
    Ok(if fds[0].revents != 0 {
        Wait::Stop
    } else if rc == 0 {
        Wait::Timeout
    } else {
        Wait::Ready
    })
}

/// poll(2), retried when a signal interrupts it; the number of ready
/// descriptors.
fn poll(fds: &mut [libc::pollfd], timeout_ms: libc::c_int) -> io::Result<libc::c_int> {
    loop {
        // SAFETY: fds is a valid, exclusively borrowed array of pollfd.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
        if rc >= 0 {
            return Ok(rc);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Sends all of `buf` on a stream socket without raising SIGPIPE.
pub(crate) fn send_all(fd: RawFd, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        // SAFETY: buf is valid for reads of buf.len() bytes.
        let n = unsafe { libc::send(fd, buf.as_ptr().cast(), buf.len(), libc::MSG_NOSIGNAL) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        buf = &buf[n as usize..];
    }
    Ok(())
}

/// Why a QEMU connection ended.
enum ConnEnd {
    Stop,
    Eof,
    Corrupt(frame::FrameError),
    Error(io::Error),
}

/// The "vm" thread: accepts QEMU, decodes its frames, feeds the egress.
struct VmSide {
    listener: UnixListener,
    shared: Arc<Shared>,
    sink: TapSink,
    egress: Box<dyn Egress>,
    socket_path: PathBuf,
}

impl VmSide {
    fn run(mut self) {
        let wake = self.shared.wake.as_raw_fd();
        let mut decoder = FrameDecoder::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match wait(self.listener.as_raw_fd(), wake, -1) {
                Ok(Wait::Stop) => return,
                Ok(_) => {}
                Err(e) => {
                    error!(error = %e, "poll on listener failed; relay VM side stops");
                    return;
                }
            }
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // e.g. EMFILE: back off instead of spinning on a
                    // readable listener; still wake promptly for stop.
                    warn!(socket = %self.socket_path.display(), error = %e, "accept failed");
                    match wait(-1, wake, 200) {
                        Ok(Wait::Stop) => return,
                        _ => continue,
                    }
                }
            };
            // Accepted sockets do not inherit O_NONBLOCK; make sure the
            // tap thread's writes block (back-pressure, not EAGAIN drops).
            if let Err(e) = stream.set_nonblocking(false) {
                warn!(error = %e, "cannot configure QEMU connection; closing it");
                continue;
            }
            bump(&self.shared.counters.connections);
            info!(socket = %self.socket_path.display(), tap = %self.sink.tap_name(), "QEMU connected");
            let stream = Arc::new(stream);
            *self.shared.conn() = Some(stream.clone());

            decoder.reset();
            let end = self.serve(&stream, &mut decoder, &mut buf);

            // Count before closing, so a peer that sees EOF also sees the
            // counters updated.
            if decoder.buffered() > 0 && !matches!(end, ConnEnd::Corrupt(_)) {
                bump(&self.shared.counters.drop_truncated_at_disconnect);
            }
            if matches!(end, ConnEnd::Corrupt(_)) {
                bump(&self.shared.counters.drop_corrupt_streams);
            }
            *self.shared.conn() = None;
            let _ = stream.shutdown(std::net::Shutdown::Both);
            drop(stream);
            match end {
                ConnEnd::Stop => return,
                ConnEnd::Eof => {
                    info!(socket = %self.socket_path.display(), "QEMU disconnected");
                }
                ConnEnd::Corrupt(e) => {
                    warn!(socket = %self.socket_path.display(), error = %e, "corrupt stream from QEMU; connection closed");
                }
                ConnEnd::Error(e) => {
                    warn!(socket = %self.socket_path.display(), error = %e, "QEMU connection failed");
                }
            }
        }
    }

    fn serve(
        &mut self,
        stream: &UnixStream,
        decoder: &mut FrameDecoder,
        buf: &mut [u8],
    ) -> ConnEnd {
        let wake = self.shared.wake.as_raw_fd();
        let counters = &self.shared.counters;
        loop {
            match wait(stream.as_raw_fd(), wake, -1) {
                Ok(Wait::Stop) => return ConnEnd::Stop,
                Ok(_) => {}
                Err(e) => return ConnEnd::Error(e),
            }
            let n = match (&*stream).read(buf) {
                Ok(0) => return ConnEnd::Eof,
                Ok(n) => n,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock
                    ) =>
                {
                    continue;
                }
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return ConnEnd::Eof,
                Err(e) => return ConnEnd::Error(e),
            };
            decoder.push(&buf[..n]);
            loop {
                match decoder.next_frame() {
                    Ok(Some(frame)) => {
                        bump(&counters.frames_from_vm);
                        counters
                            .bytes_from_vm
                            .fetch_add(frame.len() as u64, Ordering::Relaxed);
                        self.egress.frame_from_vm(frame, &self.sink);
                    }
                    Ok(None) => break,
                    Err(e) => return ConnEnd::Corrupt(e),
                }
            }
        }
    }
}

/// What the tap thread woke up for.
enum TapWake {
    /// Stop requested.
    Stop,
    /// The inbound gate was closed (look at it).
    Gate,
    /// The descriptor is ready; its `revents`.
    Ready(libc::c_short),
}

/// Polls `fd` for `events` together with the stop eventfd and the gate's.
fn wait_tap_side(shared: &Shared, fd: RawFd, events: libc::c_short) -> io::Result<TapWake> {
    let mut fds = [
        libc::pollfd {
            fd: shared.wake.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: shared.gate.kick_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd,
            events,
            revents: 0,
        },
    ];
    poll(&mut fds, -1)?;
    Ok(if fds[0].revents != 0 {
        TapWake::Stop
    } else if fds[1].revents != 0 {
        shared.gate.clear_kick();
        TapWake::Gate
    } else {
        TapWake::Ready(fds[2].revents)
    })
}

/// Waits until QEMU's socket has room for a frame, passing the gate
/// whenever it closes meanwhile (a frame in hand waits there with the
/// thread). False: the relay stops.
fn wait_room(shared: &Shared, conn: RawFd) -> bool {
    loop {
        if shared.gate.pass() {
            return false;
        }
        match wait_tap_side(shared, conn, libc::POLLOUT) {
            Ok(TapWake::Stop) => return false,
            Ok(TapWake::Gate) => continue,
            // Writable, or failed: the write says which.
            Ok(TapWake::Ready(_)) => return true,
            Err(e) => {
                error!(error = %e, "poll on QEMU connection failed; tap → VM relay stops");
                return false;
            }
        }
    }
}

/// The "tap" thread: frames from the bridge go to QEMU at once, while the
/// inbound gate is open (see [`crate::inbound`]).
fn tap_thread(tap: &Tap, shared: &Shared) {
    relay_tap(tap, shared);
    shared.gate.tap_done();
}

fn relay_tap(tap: &Tap, shared: &Shared) {
    let counters = &shared.counters;
    // A tap frame is at most MTU (<= 65535) + Ethernet header + VLAN tags.
    let mut buf = vec![0u8; MAX_FRAME_LEN];
    let mut wire = Vec::with_capacity(frame::HEADER_LEN + MAX_FRAME_LEN);
    loop {
        if shared.gate.pass() {
            return;
        }
        match wait_tap_side(shared, tap.as_raw_fd(), libc::POLLIN) {
            Ok(TapWake::Stop) => return,
            Ok(TapWake::Gate) => continue,
            Ok(TapWake::Ready(revents)) if revents & libc::POLLIN == 0 => {
                // POLLERR/POLLHUP/POLLNVAL without data: the device is gone
                // (e.g. deleted by an administrator). Nothing more to relay.
                error!(tap = %tap.name(), revents, "tap device failed; tap → VM relay stops");
                return;
            }
            Ok(TapWake::Ready(_)) => {}
            Err(e) => {
                error!(tap = %tap.name(), error = %e, "poll on tap failed; tap → VM relay stops");
                return;
            }
        }
        // Drain what is queued, then poll again. While the gate is closed
        // frames stay in the tap's queue.
        loop {
            if shared.gate.pass() {
                return;
            }
            let n = match tap.read_frame(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    error!(tap = %tap.name(), error = %e, "tap read failed; tap → VM relay stops");
                    return;
                }
            };
            let frame = &buf[..n];
            let conn = shared.conn().clone();
            let Some(conn) = conn else {
                bump(&counters.drop_no_vm_connected);
                continue;
            };
            wire.clear();
            if frame::encode(frame, &mut wire).is_err() {
                // Cannot happen for n in 1..=MAX_FRAME_LEN; counted anyway.
                bump(&counters.drop_vm_write_failed);
                continue;
            }
            // Block only while the gate is open: a checkpoint that closes
            // it must find this thread between two frames.
            if !wait_room(shared, conn.as_raw_fd()) {
                return;
            }
            match send_all(conn.as_raw_fd(), &wire) {
                Ok(()) => {
                    bump(&counters.frames_to_vm);
                    counters.bytes_to_vm.fetch_add(n as u64, Ordering::Relaxed);
                }
                Err(e) => {
                    bump(&counters.drop_vm_write_failed);
                    debug!(tap = %tap.name(), error = %e, "dropped frame: write to QEMU failed");
                }
            }
        }
    }
}
