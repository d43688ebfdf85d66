//! The inbound gate: lets a checkpoint stop the VM with nothing queued
//! inside QEMU on the way to its NIC.
//!
//! QEMU drops the packets its net layer has queued towards a NIC whenever
//! the VM stops (`net_vm_change_state_handler` purges every queue it cannot
//! flush). Packets are queued there when the guest's receive ring is full:
//! the `-netdev stream` backend reads up to 68 KiB from our socket at a
//! time, and whatever the NIC cannot take waits in that queue. A checkpoint
//! stops the VM many times a second, so under inbound bulk traffic every
//! checkpoint used to lose a handful of frames, and each loss halved the
//! sender's TCP window.
//!
//! Frames still in our socket or in the tap's queue are safe: the kernel
//! keeps them across the stop. So before a checkpoint stops the VM it
//! closes the gate ([`InboundGate::close`]): the relay's tap thread parks
//! between two frames and leaves further frames in the tap. Then
//! [`InboundGate::wait_drained`] waits, within a budget, until QEMU has read
//! everything from the socket and, after that, has read two sentinel
//! frames written one at a time. QEMU's stream backend stops reading while
//! a packet it read is still queued, so a sentinel it reads means the
//! queue has moved on since the one before. This is a heuristic, not a
//! proof: QEMU exposes no queue length, and a backend that read several
//! frames at once resumes reading after the first of them is delivered.
//! The bench counts what still gets lost (see docs/architecture.md).
//!
//! A sentinel is a minimal frame to 01:80:C2:00:00:0E (the IEEE 802.1
//! "nearest bridge" group, which no bridge forwards) with the local
//! experimental EtherType 0x88B5: virtio-net drops it unless the guest is
//! promiscuous, and any guest stack ignores it. It never reaches the tap.
//! Once the checkpoint has stopped the VM the gate opens again
//! ([`InboundGate::open`]): packets QEMU queues while the VM is stopped are
//! delivered on `cont`, not purged.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::relay::GateStats;

/// Sentinels written after QEMU has read the socket empty.
const SENTINELS: usize = 2;

/// How often QEMU's progress on the socket is looked at while waiting: no
/// kernel event reports that the reader of a unix stream socket has taken
/// everything (`POLLOUT` fires at a quarter of the send buffer).
const OUTQ_POLL: Duration = Duration::from_micros(50);

/// One sentinel frame with its length prefix: 60 bytes, the Ethernet
/// minimum without the FCS.
pub const SENTINEL: [u8; 64] = {
    let mut f = [0u8; 64];
    // Length prefix (big-endian 60).
    f[3] = 60;
    // Destination: 01:80:C2:00:00:0E.
    f[4] = 0x01;
    f[5] = 0x80;
    f[6] = 0xc2;
    f[9] = 0x0e;
    // Source: a locally administered unicast address ("\x06remus").
    f[10] = 0x06;
    f[11] = b'r';
    f[12] = b'e';
    f[13] = b'm';
    f[14] = b'u';
    f[15] = b's';
    // EtherType 0x88B5 (IEEE 802 local experimental).
    f[16] = 0x88;
    f[17] = 0xb5;
    f
};

#[derive(Debug, Default)]
struct State {
    closed: bool,
    /// The tap thread sits at the gate: it writes nothing to QEMU.
    parked: bool,
    /// The tap thread has ended (shutdown, or its tap failed).
    tap_done: bool,
    /// The relay is shutting down: a parked tap thread returns.
    stopping: bool,
}

/// Counters of the gate.
#[derive(Debug, Default)]
pub(crate) struct GateCounters {
    drained: AtomicU64,
    timeouts: AtomicU64,
    sentinels: AtomicU64,
}

impl GateCounters {
    pub(crate) fn snapshot(&self) -> GateStats {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        GateStats {
            drained: g(&self.drained),
            timeouts: g(&self.timeouts),
            sentinels: g(&self.sentinels),
        }
    }
}

/// The gate shared by the relay's tap thread and the checkpoint.
#[derive(Debug)]
pub(crate) struct Gate {
    state: Mutex<State>,
    cv: Condvar,
    /// eventfd written on close: wakes a tap thread asleep in `poll`.
    kick: OwnedFd,
    pub(crate) counters: GateCounters,
}

/// How [`InboundGate::wait_drained`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drain {
    /// QEMU read everything and the sentinels after it (or no QEMU is
    /// connected).
    Drained,
    /// The budget ran out: the tap thread was still writing a frame, or
    /// QEMU was not reading (the guest's ring stayed full). The checkpoint
    /// goes ahead; a frame queued in QEMU may be lost (TCP resends it).
    TimedOut,
}

impl Gate {
    pub(crate) fn new() -> io::Result<Gate> {
        // SAFETY: plain eventfd(2) call.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Gate {
            state: Mutex::new(State::default()),
            cv: Condvar::new(),
            // SAFETY: fresh descriptor we own.
            kick: unsafe { OwnedFd::from_raw_fd(fd) },
            counters: GateCounters::default(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The eventfd the tap thread polls besides its tap and the socket.
    pub(crate) fn kick_fd(&self) -> RawFd {
        self.kick.as_raw_fd()
    }

    /// Resets the kick eventfd once the tap thread saw it.
    pub(crate) fn clear_kick(&self) {
        let mut v: u64 = 0;
        // SAFETY: reading 8 bytes into a valid u64 from our eventfd; EAGAIN
        // (already clear) is fine.
        let _ = unsafe {
            libc::read(
                self.kick.as_raw_fd(),
                (&mut v as *mut u64).cast(),
                std::mem::size_of::<u64>(),
            )
        };
    }

    fn kick(&self) {
        let one: u64 = 1;
        // SAFETY: writing 8 bytes from a valid u64 to our eventfd. It can
        // only fail on counter overflow, when it is readable anyway.
        let _ = unsafe {
            libc::write(
                self.kick.as_raw_fd(),
                (&one as *const u64).cast(),
                std::mem::size_of::<u64>(),
            )
        };
    }

    /// Tap thread, between frames: if the gate is closed, sits there until
    /// it opens. Returns true when the relay is stopping instead.
    pub(crate) fn pass(&self) -> bool {
        let mut st = self.lock();
        if !st.closed {
            return st.stopping;
        }
        st.parked = true;
        self.cv.notify_all();
        while st.closed && !st.stopping {
            st = self.cv.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        st.parked = false;
        st.stopping
    }

    /// Tap thread, on its way out.
    pub(crate) fn tap_done(&self) {
        self.lock().tap_done = true;
        self.cv.notify_all();
    }

    /// Relay shutdown: releases a parked tap thread.
    pub(crate) fn stop(&self) {
        self.lock().stopping = true;
        self.cv.notify_all();
    }

    fn close(&self) {
        self.lock().closed = true;
        self.kick();
    }

    fn open(&self) {
        self.lock().closed = false;
        self.cv.notify_all();
    }

    /// Waits until the tap thread is parked (or gone), or `deadline`.
    fn wait_parked(&self, deadline: Instant) -> bool {
        let mut st = self.lock();
        while !(st.parked || st.tap_done) {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            st = self
                .cv
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }
}

/// Bytes written to `fd` that its reader has not taken yet.
fn unread(fd: RawFd) -> io::Result<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: TIOCOUTQ (SIOCOUTQ) writes one int.
    if unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut n) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(usize::try_from(n).unwrap_or(0))
}

/// Waits until the reader has taken everything, or `deadline`.
fn wait_read(fd: RawFd, deadline: Instant) -> bool {
    loop {
        match unread(fd) {
            Ok(0) => return true,
            Ok(_) => {}
            // The connection is gone: nothing is queued towards it.
            Err(_) => return true,
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(OUTQ_POLL);
    }
}

/// A handle on one relay's inbound gate, for the checkpoint. Cheap to
/// clone.
#[derive(Debug, Clone)]
pub struct InboundGate {
    pub(crate) shared: Arc<crate::relay::Shared>,
}

impl InboundGate {
    /// Stops handing frames from the tap to QEMU (after the frame being
    /// written, if any). Does not wait.
    pub fn close(&self) {
        self.shared.gate.close();
    }

    /// Hands frames to QEMU again.
    pub fn open(&self) {
        self.shared.gate.open();
    }

    /// After [`close`](Self::close): waits until QEMU has taken every frame
    /// handed to it (see the module documentation), or `deadline`.
    pub fn wait_drained(&self, deadline: Instant) -> Drain {
        let gate = &self.shared.gate;
        let drained = gate.wait_parked(deadline) && {
            let conn = self.shared.conn().clone();
            match conn {
                None => true,
                Some(conn) => self.sentinels(&conn, deadline),
            }
        };
        if drained {
            gate.counters.drained.fetch_add(1, Ordering::Relaxed);
            Drain::Drained
        } else {
            gate.counters.timeouts.fetch_add(1, Ordering::Relaxed);
            Drain::TimedOut
        }
    }

    /// With the tap thread parked, the socket is ours to write.
    fn sentinels(&self, conn: &UnixStream, deadline: Instant) -> bool {
        let fd = conn.as_raw_fd();
        if !wait_read(fd, deadline) {
            return false;
        }
        for _ in 0..SENTINELS {
            // A sentinel fits in an emptied socket whole; never block.
            // SAFETY: SENTINEL is valid for reads of its length.
            let n = unsafe {
                libc::send(
                    fd,
                    SENTINEL.as_ptr().cast(),
                    SENTINEL.len(),
                    libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                )
            };
            if n < 0 {
                return false;
            }
            if n as usize != SENTINEL.len() {
                // Cannot happen on an emptied socket; if it did, the rest
                // must follow (a torn frame would corrupt the stream).
                let _ = crate::relay::send_all(fd, &SENTINEL[n as usize..]);
                return false;
            }
            self.shared
                .gate
                .counters
                .sentinels
                .fetch_add(1, Ordering::Relaxed);
            if !wait_read(fd, deadline) {
                return false;
            }
        }
        true
    }
}
