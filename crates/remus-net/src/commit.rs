//! Remus output commit: frames the VM sends are held until the backup has
//! acknowledged the checkpoint that contains the state which sent them
//! (DESIGN 1.5). The Linux `sch_plug` qdisc Xen used is not available on
//! the target kernel, so this lives in the relay's [`Egress`] seam.
//!
//! - Every frame is held, whatever its protocol (Xen's netbuf let ARP and
//!   IPv6 escape; here nothing does). Frames from the network to the VM
//!   are never held.
//! - Frames are tagged with the epoch open when the VM sent them.
//!   [`OutputCommit::cut`] is called while the guest is stopped for
//!   checkpoint *e*: later frames belong to epoch *e+1*, whose checkpoint
//!   captures the state that sent them. [`OutputCommit::release`] on the
//!   backup's Ack of *e* sends every frame of epochs ≤ *e*, in order.
//! - Before the first checkpoint no failover is possible (there is nothing
//!   to resume), so an [`armed`](OutputCommit::arm) buffer lets output
//!   flow until the first cut: the initial sync does not stall the VM's
//!   network.
//! - **Bounded.** At most `limit` bytes are held. When a frame does not
//!   fit, the relay's VM thread waits for a release: it stops reading
//!   QEMU's socket, QEMU stops taking frames from the guest's transmit
//!   queue, and the guest's driver backs off — back-pressure, as a slow
//!   link would apply, instead of frames silently dropped.
//! - **Output drives the epochs.** A buffer with an [`OutputSignal`] says
//!   when the first frame of the open epoch is held (on any NIC of the VM),
//!   so that the primary can end that epoch early instead of letting the
//!   output wait for the interval's end.
//! - When protection ends (stopped, or the backup lost), [`go_live`]
//!   releases whatever is held and output flows directly again: the VM
//!   runs on alone, and no backup can resume an older state.
//!
//! [`Egress`]: crate::relay::Egress
//! [`go_live`]: OutputCommit::go_live

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use remus_proto::Epoch;

use crate::relay::{Egress, TapSink};

/// Where released frames go: the relay's tap ([`TapSink`]), or anything
/// else that takes whole Ethernet frames.
pub trait FrameSink: Send + Sync {
    /// Sends one frame; failures are the sink's to count and log.
    fn send_frame(&self, frame: &[u8]);
}

impl FrameSink for TapSink {
    fn send_frame(&self, frame: &[u8]) {
        // A frame the tap refuses is counted and logged by the sink.
        let _ = self.send(frame);
    }
}

/// Default bound on held output per NIC.
pub const DEFAULT_LIMIT: u64 = 32 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Frames go straight out (unprotected VM, standby, `--no-net`).
    Live,
    /// Protected, before the first checkpoint: frames still flow.
    Armed,
    /// Protected: frames are held until their epoch is acknowledged.
    Buffering,
}

/// Counters of one NIC's output buffer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OutputStats {
    /// Frames held and later released (or dropped when the VM went away).
    pub held_frames: u64,
    pub released_frames: u64,
    /// Most bytes held at once.
    pub max_held_bytes: u64,
    /// Time the VM's output waited for room (back-pressure).
    pub blocked: Duration,
    /// Frames dropped because the VM was destroyed while they were held.
    pub dropped_frames: u64,
}

struct State {
    mode: Mode,
    /// Told when a frame is held (see [`OutputSignal`]).
    signal: Option<Arc<OutputSignal>>,
    /// Epoch new frames are tagged with.
    open: u64,
    queue: VecDeque<(u64, Vec<u8>)>,
    bytes: u64,
    sink: Option<Arc<dyn FrameSink>>,
    stats: OutputStats,
}

/// One NIC's output buffer; see the module documentation.
pub struct OutputCommit {
    state: Mutex<State>,
    cv: Condvar,
    limit: u64,
    /// Held by whoever sends released frames, which it does outside
    /// `state`: the VM's frames go on being held meanwhile (a release of a
    /// large epoch takes milliseconds of tap writes, and the guest's
    /// output would otherwise wait that long for the lock), while two
    /// releases cannot interleave their frames.
    sending: Mutex<()>,
}

impl std::fmt::Debug for OutputCommit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let st = self.lock();
        f.debug_struct("OutputCommit")
            .field("mode", &st.mode)
            .field("open", &st.open)
            .field("held", &st.queue.len())
            .finish()
    }
}

impl OutputCommit {
    /// A live (pass-through) buffer holding at most `limit` bytes once
    /// protection starts.
    pub fn new(limit: u64) -> OutputCommit {
        OutputCommit {
            state: Mutex::new(State {
                mode: Mode::Live,
                signal: None,
                open: 0,
                queue: VecDeque::new(),
                bytes: 0,
                sink: None,
                stats: OutputStats::default(),
            }),
            cv: Condvar::new(),
            limit: limit.max(1),
            sending: Mutex::new(()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Tells `signal` of every frame held from now on (`None`: no more).
    pub fn set_signal(&self, signal: Option<Arc<OutputSignal>>) {
        self.lock().signal = signal;
    }

    /// Where released frames go (the relay's tap).
    pub fn set_sink(&self, sink: Arc<dyn FrameSink>) {
        self.lock().sink = Some(sink);
    }

    /// Protection starts: frames flow until the first [`cut`](Self::cut),
    /// then are held per epoch.
    pub fn arm(&self) {
        let mut st = self.lock();
        if st.mode == Mode::Live {
            st.mode = Mode::Armed;
        }
    }

    /// With the guest stopped for checkpoint `closing`: frames from now on
    /// belong to epoch `closing + 1`.
    pub fn cut(&self, closing: Epoch) {
        let closing = closing.0;
        let mut st = self.lock();
        if st.mode == Mode::Live {
            return;
        }
        st.mode = Mode::Buffering;
        st.open = closing + 1;
    }

    /// The backup acknowledged checkpoint `acked`: sends every held frame
    /// of epochs up to it, in order.
    pub fn release(&self, acked: Epoch) {
        let _sending = self.sending.lock().unwrap_or_else(|p| p.into_inner());
        self.send_released(acked.0);
    }

    /// Takes the held frames of epochs up to `acked` off the queue and
    /// sends them without holding the state lock; the caller holds
    /// `sending`. Their bytes count against the bound until they are
    /// sent.
    fn send_released(&self, acked: u64) {
        let (frames, sink) = {
            let mut st = self.lock();
            let frames = take_released(&mut st, acked);
            if frames.is_empty() {
                return;
            }
            (frames, st.sink.clone())
        };
        let sent = send_all(sink.as_deref(), &frames);
        let mut st = self.lock();
        st.bytes = st.bytes.saturating_sub(sent);
        self.cv.notify_all();
    }

    /// Protection ended: sends everything held, then lets frames through.
    pub fn go_live(&self) {
        let _sending = self.sending.lock().unwrap_or_else(|p| p.into_inner());
        // Most of what is held goes out without the lock; what the guest
        // added meanwhile goes out under it, so nothing more can be added
        // before the buffer goes live and no frame passes one held before
        // it. (Draining without the lock until the queue is empty could
        // go on for as long as the guest sends as fast as the tap takes.)
        self.send_released(u64::MAX);
        let mut st = self.lock();
        let rest = take_released(&mut st, u64::MAX);
        send_all(st.sink.as_deref(), &rest);
        // Nobody else is sending (`sending` is ours): the held bytes were
        // exactly those.
        st.bytes = 0;
        st.mode = Mode::Live;
        self.cv.notify_all();
    }

    /// The VM is going away: drops what is held and wakes a waiting relay.
    /// (Only at the VM's end: a release still sending meanwhile may be
    /// passed by a frame sent live, which no longer matters then.)
    pub fn close(&self) {
        let mut st = self.lock();
        st.stats.dropped_frames += st.queue.len() as u64;
        st.queue.clear();
        st.bytes = 0;
        st.mode = Mode::Live;
        self.cv.notify_all();
    }

    /// Frames held now.
    pub fn held(&self) -> usize {
        self.lock().queue.len()
    }

    /// Frames and bytes held now.
    pub fn held_now(&self) -> (u64, u64) {
        let st = self.lock();
        (st.queue.len() as u64, st.bytes)
    }

    pub fn stats(&self) -> OutputStats {
        self.lock().stats
    }

    /// One frame from the VM (the relay's VM thread): sent to `out` now,
    /// or held.
    pub fn frame(&self, frame: &[u8], out: &dyn FrameSink) {
        let mut st = self.lock();
        let len = frame.len() as u64;
        let since = Instant::now();
        let mut waited = false;
        // A frame larger than the bound still goes through an empty buffer.
        while st.mode == Mode::Buffering && st.bytes > 0 && st.bytes + len > self.limit {
            waited = true;
            st = self.cv.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        if waited {
            st.stats.blocked += since.elapsed();
        }
        if st.mode != Mode::Buffering {
            // Sent under the lock: go_live makes the buffer live under it
            // only once everything held has gone out, so this cannot
            // overtake a held frame.
            out.send_frame(frame);
            return;
        }
        let open = st.open;
        st.queue.push_back((open, frame.to_vec()));
        if let Some(s) = &st.signal {
            s.held(len);
        }
        st.bytes += len;
        st.stats.held_frames += 1;
        st.stats.max_held_bytes = st.stats.max_held_bytes.max(st.bytes);
    }
}

/// Takes the held frames of epochs up to `acked` off the queue, in order,
/// counting them as released.
fn take_released(st: &mut State, acked: u64) -> Vec<Vec<u8>> {
    let n = st.queue.iter().take_while(|(e, _)| *e <= acked).count();
    st.stats.released_frames += n as u64;
    st.queue.drain(..n).map(|(_, f)| f).collect()
}

/// Sends `frames` in order to `sink` (none: they are dropped); returns
/// their bytes.
fn send_all(sink: Option<&dyn FrameSink>, frames: &[Vec<u8>]) -> u64 {
    let mut bytes = 0;
    for frame in frames {
        if let Some(s) = sink {
            s.send_frame(frame);
        }
        bytes += frame.len() as u64;
    }
    bytes
}

/// When the guest's output of the open epoch began to wait: the first
/// frame any of its NICs held since the last checkpoint's cut, and how
/// much it has held since. The primary's epoch loop waits on it to end an
/// epoch as soon as output is waiting (output-driven epochs) rather than
/// at the interval's end, and looks at what the output is to choose the
/// next epoch's length.
#[derive(Debug, Default)]
pub struct OutputSignal {
    open: Mutex<EpochOutput>,
    cv: Condvar,
}

/// The output the open epoch has held so far (on all of the VM's NICs).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct EpochOutput {
    /// When its first frame was held.
    pub first: Option<Instant>,
    pub frames: u64,
    pub bytes: u64,
}

impl OutputSignal {
    pub fn new() -> OutputSignal {
        OutputSignal::default()
    }

    fn lock(&self) -> MutexGuard<'_, EpochOutput> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A frame of `len` bytes was held (the first one of the epoch wakes
    /// the waiter).
    fn held(&self, len: u64) {
        let mut o = self.lock();
        o.frames += 1;
        o.bytes += len;
        if o.first.is_none() {
            o.first = Some(Instant::now());
            self.cv.notify_all();
        }
    }

    /// With the guest stopped for a checkpoint, before the NICs' cut: what
    /// is held from now on waits for the next epoch. (A frame held between
    /// this and the cut belongs to the closing epoch yet marks the next
    /// one as having output: at worst one early checkpoint, never a late
    /// one.)
    pub fn clear(&self) {
        *self.lock() = EpochOutput::default();
    }

    /// When output of the open epoch began to wait, waiting for some until
    /// `deadline`; `None` if none came by then.
    pub fn wait_first(&self, deadline: Instant) -> Option<Instant> {
        let mut o = self.lock();
        loop {
            if let Some(t) = o.first {
                return Some(t);
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            if left.is_zero() {
                return None;
            }
            o = self
                .cv
                .wait_timeout(o, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// The open epoch's output so far.
    pub fn so_far(&self) -> EpochOutput {
        *self.lock()
    }
}

/// The relay egress that goes through an [`OutputCommit`].
pub struct CommitEgress(pub Arc<OutputCommit>);

impl Egress for CommitEgress {
    fn frame_from_vm(&mut self, frame: &[u8], tap: &TapSink) {
        self.0.frame(frame, tap);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Wire(Mutex<Vec<Vec<u8>>>);
    impl FrameSink for Wire {
        fn send_frame(&self, frame: &[u8]) {
            self.0.lock().unwrap().push(frame.to_vec());
        }
    }
    impl Wire {
        fn seen(&self) -> Vec<u8> {
            self.0.lock().unwrap().iter().map(|f| f[0]).collect()
        }
    }

    fn setup(limit: u64) -> (Arc<OutputCommit>, Arc<Wire>) {
        let oc = Arc::new(OutputCommit::new(limit));
        let wire = Arc::new(Wire::default());
        oc.set_sink(wire.clone());
        (oc, wire)
    }

    #[test]
    fn frames_wait_for_the_ack_of_their_epoch_and_leave_in_order() {
        let (oc, wire) = setup(1 << 20);
        oc.frame(&[1], &*wire); // live: out at once
        oc.arm();
        oc.frame(&[2], &*wire); // armed, before the first checkpoint: out
        oc.cut(Epoch(1)); // checkpoint 1: from now on held
        oc.frame(&[3], &*wire);
        oc.frame(&[4], &*wire);
        oc.cut(Epoch(2));
        oc.frame(&[5], &*wire);
        assert_eq!(wire.seen(), vec![1, 2]);
        oc.release(Epoch(1)); // nothing of epoch 1 is held (it flowed)
        assert_eq!(wire.seen(), vec![1, 2]);
        oc.release(Epoch(2));
        assert_eq!(wire.seen(), vec![1, 2, 3, 4]);
        assert_eq!(oc.held(), 1);
        oc.go_live();
        assert_eq!(wire.seen(), vec![1, 2, 3, 4, 5]);
        oc.frame(&[6], &*wire);
        assert_eq!(wire.seen(), vec![1, 2, 3, 4, 5, 6]);
        let st = oc.stats();
        assert_eq!((st.held_frames, st.released_frames), (3, 3));
    }

    #[test]
    fn a_full_buffer_holds_the_vm_back_until_a_release() {
        let (oc, wire) = setup(100);
        oc.arm();
        oc.cut(Epoch(1));
        oc.frame(&[1; 60], &*wire);
        let (oc2, wire2) = (oc.clone(), wire.clone());
        let vm = std::thread::spawn(move || oc2.frame(&[2; 60], &*wire2));
        // The second frame does not fit: the VM side waits...
        std::thread::sleep(Duration::from_millis(50));
        assert!(!vm.is_finished(), "back-pressure, not a drop");
        assert_eq!(oc.held(), 1);
        // ...until the ack of epoch 2 frees the room.
        oc.release(Epoch(2));
        vm.join().unwrap();
        assert_eq!(oc.held(), 1);
        assert_eq!(wire.seen(), vec![1]);
        assert!(oc.stats().blocked > Duration::ZERO);
        // close() wakes a waiting VM side and drops what is held.
        oc.release(Epoch(2));
        oc.frame(&[3; 60], &*wire);
        let (oc2, wire2) = (oc.clone(), wire.clone());
        let vm = std::thread::spawn(move || oc2.frame(&[4; 60], &*wire2));
        oc.close();
        vm.join().unwrap();
        assert!(oc.stats().dropped_frames >= 1);
    }

    #[test]
    fn an_unarmed_buffer_never_holds() {
        let (oc, wire) = setup(1 << 20);
        oc.cut(Epoch(1));
        oc.frame(&[7], &*wire);
        assert_eq!(wire.seen(), vec![7]);
    }

    /// A sink that blocks on each frame until the test lets it go.
    struct Gate {
        wire: Wire,
        go: Mutex<std::sync::mpsc::Receiver<()>>,
    }
    impl FrameSink for Gate {
        fn send_frame(&self, frame: &[u8]) {
            let _ = self.go.lock().unwrap().recv();
            self.wire.send_frame(frame);
        }
    }

    /// A buffer whose sink blocks, with frames 1 and 2 held in epoch 2.
    fn gated() -> (Arc<OutputCommit>, Arc<Gate>, std::sync::mpsc::Sender<()>) {
        let oc = Arc::new(OutputCommit::new(1 << 20));
        let (go, wait) = std::sync::mpsc::channel();
        let gate = Arc::new(Gate {
            wire: Wire::default(),
            go: Mutex::new(wait),
        });
        oc.set_sink(gate.clone());
        oc.arm();
        oc.cut(Epoch(1));
        let direct = Wire::default();
        oc.frame(&[1], &direct);
        oc.frame(&[2], &direct);
        assert!(direct.seen().is_empty());
        (oc, gate, go)
    }

    /// The VM's frame `n`, which must be held at once (not wait for a
    /// release in progress).
    fn held_at_once(oc: &Arc<OutputCommit>, n: u8) {
        let (done, finished) = std::sync::mpsc::channel();
        let oc2 = oc.clone();
        let vm = std::thread::spawn(move || {
            let direct = Wire::default();
            oc2.frame(&[n], &direct);
            done.send(direct.seen()).unwrap();
        });
        let sent_directly = finished
            .recv_timeout(Duration::from_secs(10))
            .expect("the VM's frame waited for the release's sends");
        assert!(sent_directly.is_empty());
        vm.join().unwrap();
    }

    #[test]
    fn the_guest_output_is_held_while_a_release_is_still_sending() {
        let (oc, gate, go) = gated();
        oc.cut(Epoch(2));
        // The ack of 2 (their epoch) sends frames 1 and 2 through a sink
        // that blocks.
        let releaser = {
            let oc = oc.clone();
            std::thread::spawn(move || oc.release(Epoch(2)))
        };
        while oc.held() != 0 {
            std::thread::yield_now();
        }
        held_at_once(&oc, 3);
        assert_eq!(oc.held(), 1);
        go.send(()).unwrap();
        go.send(()).unwrap();
        releaser.join().unwrap();
        assert_eq!(gate.wire.seen(), vec![1, 2]);
        // Frame 3 waits for its own epoch's ack.
        assert_eq!(oc.held(), 1);
        oc.cut(Epoch(3));
        go.send(()).unwrap();
        oc.release(Epoch(3));
        assert_eq!(gate.wire.seen(), vec![1, 2, 3]);
    }

    #[test]
    fn going_live_sends_what_was_held_meanwhile_before_anything_live() {
        let (oc, gate, go) = gated();
        let live = {
            let oc = oc.clone();
            std::thread::spawn(move || oc.go_live())
        };
        // go_live has taken 1 and 2 off the queue and blocks sending 1.
        while oc.held() != 0 {
            std::thread::yield_now();
        }
        held_at_once(&oc, 3);
        for _ in 0..3 {
            go.send(()).unwrap();
        }
        live.join().unwrap();
        assert_eq!(gate.wire.seen(), vec![1, 2, 3]);
        assert_eq!(oc.held_now(), (0, 0));
        // Live: frames go straight out, after everything held.
        let after = Wire::default();
        oc.frame(&[4], &after);
        assert_eq!(after.seen(), vec![4]);
    }

    #[test]
    fn the_signal_tells_when_output_of_the_open_epoch_began_to_wait() {
        let (oc, wire) = setup(1 << 20);
        let sig = Arc::new(OutputSignal::new());
        oc.set_signal(Some(sig.clone()));
        oc.arm();
        // Armed, before the first checkpoint: frames flow, nothing waits.
        oc.frame(&[1], &*wire);
        assert_eq!(sig.wait_first(Instant::now()), None);
        sig.clear();
        oc.cut(Epoch(1));
        // A waiter wakes when the first frame is held, not at its deadline.
        let (sig2, oc2, wire2) = (sig.clone(), oc.clone(), wire.clone());
        let t = Instant::now();
        let held = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            oc2.frame(&[2], &*wire2);
            oc2.frame(&[3], &*wire2);
        });
        let first = sig2.wait_first(t + Duration::from_secs(10)).unwrap();
        assert!(t.elapsed() < Duration::from_secs(5));
        held.join().unwrap();
        // The second frame does not move it, and is counted.
        assert_eq!(sig.wait_first(Instant::now()), Some(first));
        let both = sig.so_far();
        assert_eq!(both.first, Some(first));
        assert_eq!((both.frames, both.bytes), (2, 2));
        // The checkpoint's cut starts over.
        sig.clear();
        oc.cut(Epoch(2));
        assert_eq!(
            sig.wait_first(Instant::now() + Duration::from_millis(10)),
            None
        );
        oc.frame(&[5; 1500], &*wire);
        oc.frame(&[6; 60], &*wire);
        let o = sig.so_far();
        assert!(o.first.is_some());
        assert_eq!((o.frames, o.bytes), (2, 1560));
        sig.clear();
        assert_eq!(sig.so_far(), EpochOutput::default());
        oc.set_signal(None);
        oc.frame(&[4], &*wire);
        assert_eq!(sig.wait_first(Instant::now()), None);
    }
}
