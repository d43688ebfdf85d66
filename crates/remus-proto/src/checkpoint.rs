//! The receiver's checkpoint state machine: pure logic, no I/O.
//!
//! ```text
//!                 CheckpointBegin(e), e > last committed
//!      ┌──────┐ ──────────────────────────────────────► ┌───────────┐
//!      │ Idle │                                          │   Pages   │ ◄─┐ PageRun
//!      └──────┘ ◄─────────────────────────────────────── └───────────┘ ──┘
//!        ▲  ▲      CheckpointEnd(e): counts and digest       │ DeviceState
//!        │  │      match → yields CompleteCheckpoint         ▼ (Checkpoint kind only)
//!        │  │                                          ┌─────────────┐
//!        │  └───────────────────────────────────────── │ DeviceState │ ◄─┐ DeviceState
//!        │         CheckpointEnd(e): as above          └─────────────┘ ──┘
//!        │
//!        └── any error: the partial checkpoint is discarded, the assembler is
//!            Idle again and the last committed epoch is unchanged
//! ```
//!
//! Rejected (each a [`CheckpointError`], each discarding the open epoch):
//! End, PageRun or DeviceState with no open epoch; Begin while an epoch is
//! open; Begin of an epoch not above the last committed one; End of another
//! epoch than the open one; a page run outside guest memory; more pages in one
//! epoch than guest memory has; a page run after device state; device state
//! in a kind that has none, or none in a Checkpoint; counts or digest that do
//! not match End. On connection loss the caller drops the assembler (or calls
//! [`CheckpointAssembler::discard`]): a partial checkpoint is never applied.
//!
//! Yielding a [`CompleteCheckpoint`] advances the last committed epoch: the
//! caller applies it and acks. If the caller cannot apply it, the session is
//! broken anyway and must be restarted with a full resync.
//!
//! **Pre-copy epochs stream.** The pages of an InitialSync or Round epoch
//! (the copy of all of RAM before the first checkpoint, and a migration's
//! rounds) are handed back one run at a time as [`Accepted::PreCopy`], for
//! the caller to write to its replica at once, instead of being held until
//! End: so the receiver's memory does not grow with the guest's. That is
//! safe because nothing exists to protect before the first committed
//! Checkpoint (no failover is possible yet); End still checks their counts
//! and digest, and a mismatch ends the session. A Checkpoint epoch is held
//! whole until its End verifies, as above, except at a migration's
//! destination ([`CheckpointAssembler::stream_checkpoints`]): it resumes
//! nothing but the checkpoint the source orders the switch-over to after
//! its Ack, so its last checkpoint streams too, device state included (its
//! QEMU loads the state as it arrives, the VM held stopped until that
//! order).

use std::io::Write;

use thiserror::Error;
use xxhash_rust::xxh3::Xxh3Default;

use crate::delta::DeltaEncoder;
use crate::message::{
    CheckpointEnd, CheckpointKind, DIGEST_LEN, Epoch, Message, PAGE_SIZE, PageRun, write_counted,
    write_device_state, write_page_run,
};
pub use crate::wire::MAX_DEVICE_STATE;
use crate::wire::WireError;

/// XXH3-128 over an epoch's contents, computed the same way by sender and
/// receiver. Pages are hashed one at a time with their page number, so the
/// digest does not depend on how pages were grouped into runs or frames; the
/// device state is hashed as one byte stream after all pages.
pub struct CheckpointDigest {
    hasher: Xxh3Default,
}

impl Default for CheckpointDigest {
    fn default() -> Self {
        Self::new()
    }
}

impl CheckpointDigest {
    pub fn new() -> Self {
        CheckpointDigest {
            hasher: Xxh3Default::new(),
        }
    }

    /// Adds the pages `first_page..` whose contents are `data` (whole pages).
    pub fn add_pages(&mut self, first_page: u64, data: &[u8]) {
        for (i, page) in data.chunks(PAGE_SIZE).enumerate() {
            self.hasher.update(&(first_page + i as u64).to_be_bytes());
            self.hasher.update(page);
        }
    }

    /// Adds a chunk of device state; call after all pages.
    pub fn add_device_state(&mut self, data: &[u8]) {
        self.hasher.update(data);
    }

    pub fn finish(&self) -> [u8; DIGEST_LEN] {
        self.hasher.digest128().to_be_bytes()
    }
}

/// The sender's side of one checkpoint: writes Begin, page runs, device
/// state and an End whose counts and digest match what was written, so the
/// sender cannot get the digest out of step with the stream.
pub struct CheckpointWriter {
    epoch: Epoch,
    kind: CheckpointKind,
    pages: u64,
    device_state_len: u64,
    device_state_started: bool,
    digest: CheckpointDigest,
}

impl CheckpointWriter {
    /// Writes CheckpointBegin.
    pub fn begin(
        w: &mut impl Write,
        epoch: Epoch,
        kind: CheckpointKind,
    ) -> Result<Self, WireError> {
        Message::CheckpointBegin { epoch, kind }.write_to(w)?;
        Ok(CheckpointWriter {
            epoch,
            kind,
            pages: 0,
            device_state_len: 0,
            device_state_started: false,
            digest: CheckpointDigest::new(),
        })
    }

    /// Writes the pages `first_page..` (whole pages, split into frames as
    /// needed): as PageRun frames, or as PageDelta frames through `enc`
    /// (peer version 3 or later). Returns the bytes put on the wire,
    /// frame headers included.
    ///
    /// # Panics
    /// After device state, or if `data` is not whole pages: sender bugs.
    pub fn pages(
        &mut self,
        w: &mut impl Write,
        first_page: u64,
        data: &[u8],
        enc: Option<&mut DeltaEncoder>,
    ) -> Result<u64, WireError> {
        assert!(!self.device_state_started, "page run after device state");
        if data.is_empty() {
            return Ok(0);
        }
        let wire = match enc {
            None => write_page_run(w, first_page, data)?,
            Some(enc) => write_counted(
                w,
                enc.encode_pages(first_page, data)
                    .into_iter()
                    .map(Message::PageDelta),
            )?,
        };
        self.digest.add_pages(first_page, data);
        self.pages += (data.len() / PAGE_SIZE) as u64;
        Ok(wire)
    }

    /// Writes a chunk of device state (split into frames as needed), plain
    /// or through `enc` (a checkpoint's whole device state in one call,
    /// then: the encoder XORs it with the previous checkpoint's). Returns
    /// the bytes put on the wire.
    ///
    /// # Panics
    /// If this kind carries no device state: a sender bug.
    pub fn device_state(
        &mut self,
        w: &mut impl Write,
        data: &[u8],
        enc: Option<&mut DeltaEncoder>,
    ) -> Result<u64, WireError> {
        self.check_kind();
        let frames = match enc {
            Some(enc) if !data.is_empty() => Some(enc.encode_device_state(data)),
            Some(enc) => {
                // Empty: sent plain, but the encoder must forget the
                // previous state too, as the receiver's commit will.
                enc.encode_device_state(data);
                None
            }
            None => None,
        };
        self.put_device_state(w, data, frames)
    }

    /// Writes the next chunk of a device state sent as it is produced
    /// (a migration's last checkpoint: see
    /// [`DeltaEncoder::encode_device_state_part`]), plain or through
    /// `enc`; chunks concatenate in order. Returns the bytes put on the
    /// wire.
    ///
    /// # Panics
    /// If this kind carries no device state: a sender bug.
    pub fn device_state_part(
        &mut self,
        w: &mut impl Write,
        data: &[u8],
        enc: Option<&mut DeltaEncoder>,
    ) -> Result<u64, WireError> {
        self.check_kind();
        let frames = enc
            .filter(|_| !data.is_empty())
            .map(|enc| enc.encode_device_state_part(self.device_state_len, data));
        self.put_device_state(w, data, frames)
    }

    fn check_kind(&self) {
        assert!(
            self.kind.has_device_state(),
            "device state in a {:?}",
            self.kind
        );
    }

    /// `data` as `frames` when encoded, else plain; counted and hashed.
    fn put_device_state(
        &mut self,
        w: &mut impl Write,
        data: &[u8],
        frames: Option<Vec<crate::message::DeviceStateDelta>>,
    ) -> Result<u64, WireError> {
        let wire = match frames {
            Some(frames) => write_counted(w, frames.into_iter().map(Message::DeviceStateDelta))?,
            None => write_device_state(w, data)?,
        };
        self.device_state_started = true;
        self.digest.add_device_state(data);
        self.device_state_len += data.len() as u64;
        Ok(wire)
    }

    /// Writes CheckpointEnd and returns it. Does not flush.
    pub fn end(self, w: &mut impl Write) -> Result<CheckpointEnd, WireError> {
        let end = CheckpointEnd {
            epoch: self.epoch,
            page_count: self.pages,
            device_state_len: self.device_state_len,
            digest: self.digest.finish(),
        };
        Message::CheckpointEnd(end.clone()).write_to(w)?;
        Ok(end)
    }
}

/// A verified checkpoint, ready to be applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompleteCheckpoint {
    pub epoch: Epoch,
    pub kind: CheckpointKind,
    /// Page runs in the order received; later runs win if they overlap.
    pub runs: Vec<PageRun>,
    /// The device state (empty unless `kind` is `Checkpoint`).
    pub device_state: Vec<u8>,
}

/// Why a checkpoint was rejected. The open epoch, if any, was discarded.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CheckpointError {
    #[error("{what} arrived with no checkpoint open")]
    NotOpen { what: &'static str },
    #[error("CheckpointBegin of {new} while {open} was still open; {open} was discarded")]
    BeginWhileOpen { open: Epoch, new: Epoch },
    #[error("CheckpointBegin of {epoch} is not after the last committed {last_committed}")]
    StaleEpoch { epoch: Epoch, last_committed: Epoch },
    #[error("CheckpointEnd of {end} while {open} was open; {open} was discarded")]
    EpochMismatch { open: Epoch, end: Epoch },
    #[error(
        "{epoch}: page run {first_page}+{page_count} lies beyond guest memory ({guest_pages} pages); discarded"
    )]
    PageOutOfRange {
        epoch: Epoch,
        first_page: u64,
        page_count: u32,
        guest_pages: u64,
    },
    #[error("{epoch}: more pages than guest memory holds ({guest_pages}); discarded")]
    TooManyPages { epoch: Epoch, guest_pages: u64 },
    #[error("{epoch}: page run after device state; discarded")]
    PageRunAfterDeviceState { epoch: Epoch },
    #[error("{epoch}: device state in a {kind:?}, which carries none; discarded")]
    UnexpectedDeviceState { epoch: Epoch, kind: CheckpointKind },
    #[error("{epoch}: device state larger than {max} bytes; discarded")]
    DeviceStateTooLarge { epoch: Epoch, max: u64 },
    #[error("{epoch}: checkpoint ended without device state; discarded")]
    MissingDeviceState { epoch: Epoch },
    #[error("{epoch}: End announces {announced} {what}, {received} arrived; discarded")]
    CountMismatch {
        epoch: Epoch,
        what: &'static str,
        announced: u64,
        received: u64,
    },
    #[error(
        "{epoch}: digest mismatch (End announces {announced:032x}, contents give {computed:032x}); discarded"
    )]
    DigestMismatch {
        epoch: Epoch,
        announced: u128,
        computed: u128,
    },
}

/// What [`CheckpointAssembler::accept`] did with a message.
#[derive(Debug, PartialEq)]
pub enum Accepted {
    /// Part of an open checkpoint, stored.
    Pending,
    /// A page run of a pre-copy epoch (InitialSync or Round), counted into
    /// its digest and handed back for the caller to write now.
    PreCopy(PageRun),
    /// A chunk of a Checkpoint epoch's device state, kept for its End and
    /// handed back (a copy) for the caller to use before that End
    /// verifies: only with [`CheckpointAssembler::stream_checkpoints`].
    DeviceState(Vec<u8>),
    /// The End of a checkpoint that verified.
    Complete(CompleteCheckpoint),
    /// Not a checkpoint message: handed back for the caller to handle.
    Other(Message),
}

struct Open {
    epoch: Epoch,
    kind: CheckpointKind,
    runs: Vec<PageRun>,
    pages: u64,
    device_state: Option<Vec<u8>>,
    digest: CheckpointDigest,
}

/// Receives the checkpoint messages of one connection and yields only whole,
/// verified checkpoints. See the module documentation for the state diagram.
pub struct CheckpointAssembler {
    guest_pages: u64,
    last_committed: Option<Epoch>,
    open: Option<Open>,
    streaming: bool,
}

impl CheckpointAssembler {
    /// `guest_pages` is the VM's memory size in pages; `last_committed` is
    /// the newest epoch the receiver already holds, if any.
    pub fn new(guest_pages: u64, last_committed: Option<Epoch>) -> Self {
        CheckpointAssembler {
            guest_pages,
            last_committed,
            open: None,
            streaming: false,
        }
    }

    /// Streams Checkpoint epochs too: their pages are handed back as they
    /// arrive ([`Accepted::PreCopy`]) and their device state chunk by
    /// chunk ([`Accepted::DeviceState`], also kept for the End), before
    /// the End verifies. Only for a receiver that never resumes from a
    /// checkpoint whose End failed: a migration's destination, discarded
    /// unless the source orders the switch-over after its Ack.
    pub fn stream_checkpoints(&mut self) {
        self.streaming = true;
    }

    pub fn last_committed(&self) -> Option<Epoch> {
        self.last_committed
    }

    /// The epoch being received, if one is open.
    pub fn open_epoch(&self) -> Option<Epoch> {
        self.open.as_ref().map(|o| o.epoch)
    }

    /// Bytes of page data and device state held for the open checkpoint:
    /// what a peer can make this receiver buffer, never more than
    /// `guest_pages` pages plus [`MAX_DEVICE_STATE`].
    pub fn buffered_bytes(&self) -> u64 {
        self.open.as_ref().map_or(0, |o| {
            let pages: u64 = o.runs.iter().map(|r| r.data.len() as u64).sum();
            pages + o.device_state.as_ref().map_or(0, |d| d.len() as u64)
        })
    }

    /// Drops the partial checkpoint, if any (connection lost).
    pub fn discard(&mut self) {
        self.open = None;
    }

    /// Feeds one message. On error the open checkpoint is discarded.
    pub fn accept(&mut self, msg: Message) -> Result<Accepted, CheckpointError> {
        let r = self.step(msg);
        if r.is_err() {
            self.open = None;
        }
        r
    }

    fn step(&mut self, msg: Message) -> Result<Accepted, CheckpointError> {
        match msg {
            Message::CheckpointBegin { epoch, kind } => {
                if let Some(open) = &self.open {
                    return Err(CheckpointError::BeginWhileOpen {
                        open: open.epoch,
                        new: epoch,
                    });
                }
                match self.last_committed {
                    Some(last) if epoch <= last => {
                        return Err(CheckpointError::StaleEpoch {
                            epoch,
                            last_committed: last,
                        });
                    }
                    _ => {}
                }
                self.open = Some(Open {
                    epoch,
                    kind,
                    runs: Vec::new(),
                    pages: 0,
                    device_state: None,
                    digest: CheckpointDigest::new(),
                });
                Ok(Accepted::Pending)
            }
            Message::PageRun(run) => {
                let guest_pages = self.guest_pages;
                let open = self
                    .open
                    .as_mut()
                    .ok_or(CheckpointError::NotOpen { what: "PageRun" })?;
                let epoch = open.epoch;
                if open.device_state.is_some() {
                    return Err(CheckpointError::PageRunAfterDeviceState { epoch });
                }
                let count = u64::from(run.page_count());
                if run
                    .first_page
                    .checked_add(count)
                    .is_none_or(|end| end > guest_pages)
                {
                    return Err(CheckpointError::PageOutOfRange {
                        epoch,
                        first_page: run.first_page,
                        page_count: run.page_count(),
                        guest_pages,
                    });
                }
                open.pages += count;
                if open.pages > guest_pages {
                    return Err(CheckpointError::TooManyPages { epoch, guest_pages });
                }
                open.digest.add_pages(run.first_page, &run.data);
                if self.streaming
                    || matches!(
                        open.kind,
                        CheckpointKind::InitialSync | CheckpointKind::Round
                    )
                {
                    return Ok(Accepted::PreCopy(run));
                }
                open.runs.push(run);
                Ok(Accepted::Pending)
            }
            Message::DeviceState { data } => {
                let open = self.open.as_mut().ok_or(CheckpointError::NotOpen {
                    what: "DeviceState",
                })?;
                let epoch = open.epoch;
                if !open.kind.has_device_state() {
                    return Err(CheckpointError::UnexpectedDeviceState {
                        epoch,
                        kind: open.kind,
                    });
                }
                let state = open.device_state.get_or_insert_with(Vec::new);
                if (state.len() + data.len()) as u64 > MAX_DEVICE_STATE {
                    return Err(CheckpointError::DeviceStateTooLarge {
                        epoch,
                        max: MAX_DEVICE_STATE,
                    });
                }
                open.digest.add_device_state(&data);
                state.extend_from_slice(&data);
                Ok(if self.streaming {
                    Accepted::DeviceState(data)
                } else {
                    Accepted::Pending
                })
            }
            Message::CheckpointEnd(end) => self.finish(end).map(Accepted::Complete),
            other => Ok(Accepted::Other(other)),
        }
    }

    fn finish(&mut self, end: CheckpointEnd) -> Result<CompleteCheckpoint, CheckpointError> {
        let open = self.open.take().ok_or(CheckpointError::NotOpen {
            what: "CheckpointEnd",
        })?;
        let epoch = open.epoch;
        if end.epoch != epoch {
            return Err(CheckpointError::EpochMismatch {
                open: epoch,
                end: end.epoch,
            });
        }
        if open.kind.has_device_state() && open.device_state.is_none() {
            return Err(CheckpointError::MissingDeviceState { epoch });
        }
        if end.page_count != open.pages {
            return Err(CheckpointError::CountMismatch {
                epoch,
                what: "pages",
                announced: end.page_count,
                received: open.pages,
            });
        }
        let device_state = open.device_state.unwrap_or_default();
        if end.device_state_len != device_state.len() as u64 {
            return Err(CheckpointError::CountMismatch {
                epoch,
                what: "device-state bytes",
                announced: end.device_state_len,
                received: device_state.len() as u64,
            });
        }
        let computed = open.digest.finish();
        if computed != end.digest {
            return Err(CheckpointError::DigestMismatch {
                epoch,
                announced: u128::from_be_bytes(end.digest),
                computed: u128::from_be_bytes(computed),
            });
        }
        self.last_committed = Some(epoch);
        Ok(CompleteCheckpoint {
            epoch,
            kind: open.kind,
            runs: open.runs,
            device_state,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GUEST_PAGES: u64 = 64;

    fn run(first_page: u64, pages: usize, fill: u8) -> PageRun {
        PageRun {
            first_page,
            data: vec![fill; pages * PAGE_SIZE],
        }
    }

    /// The messages a correct sender emits for one checkpoint.
    fn stream(epoch: u64, kind: CheckpointKind, runs: &[PageRun], dev: &[u8]) -> Vec<Message> {
        let mut d = CheckpointDigest::new();
        let mut msgs = vec![Message::CheckpointBegin {
            epoch: Epoch(epoch),
            kind,
        }];
        let mut pages = 0;
        for r in runs {
            d.add_pages(r.first_page, &r.data);
            pages += u64::from(r.page_count());
            msgs.push(Message::PageRun(r.clone()));
        }
        if kind.has_device_state() {
            d.add_device_state(dev);
            msgs.push(Message::DeviceState { data: dev.to_vec() });
        }
        msgs.push(Message::CheckpointEnd(CheckpointEnd {
            epoch: Epoch(epoch),
            page_count: pages,
            device_state_len: if kind.has_device_state() {
                dev.len() as u64
            } else {
                0
            },
            digest: d.finish(),
        }));
        msgs
    }

    fn feed(
        a: &mut CheckpointAssembler,
        msgs: Vec<Message>,
    ) -> Result<Option<CompleteCheckpoint>, CheckpointError> {
        let mut out = None;
        // Pre-copy runs come back as they arrive; gathered here so the
        // tests can compare a whole epoch either way.
        let mut streamed = Vec::new();
        for m in msgs {
            match a.accept(m)? {
                Accepted::Complete(mut c) => {
                    if !streamed.is_empty() {
                        assert!(c.runs.is_empty(), "pre-copy runs are not held");
                        c.runs = std::mem::take(&mut streamed);
                    }
                    out = Some(c)
                }
                Accepted::PreCopy(r) => streamed.push(r),
                Accepted::Pending | Accepted::DeviceState(_) => {}
                Accepted::Other(m) => panic!("unexpected handback {m:?}"),
            }
        }
        Ok(out)
    }

    /// The pages of pre-copy epochs are handed back as they arrive (the
    /// assembler holds none of them); End still checks what came, and a
    /// Checkpoint's pages are held until its End.
    #[test]
    fn pre_copy_pages_stream_and_end_still_checks_them() {
        let mut a = CheckpointAssembler::new(GUEST_PAGES, None);
        let runs = [run(0, 2, 1), run(10, 1, 2)];
        let mut msgs = stream(0, CheckpointKind::InitialSync, &runs, b"").into_iter();
        assert_eq!(a.accept(msgs.next().unwrap()).unwrap(), Accepted::Pending);
        for r in &runs {
            assert_eq!(
                a.accept(msgs.next().unwrap()).unwrap(),
                Accepted::PreCopy(r.clone())
            );
        }
        assert!(matches!(
            a.accept(msgs.next().unwrap()).unwrap(),
            Accepted::Complete(_)
        ));
        // A pre-copy epoch whose End does not match what streamed: refused.
        let mut bad = stream(1, CheckpointKind::Round, &runs, b"");
        let last = bad.len() - 1;
        if let Message::CheckpointEnd(e) = &mut bad[last] {
            e.digest[0] ^= 1;
        }
        assert!(feed(&mut a, bad).is_err());
        // A checkpoint's pages wait for its End.
        let msgs = stream(2, CheckpointKind::Checkpoint, &runs, b"d");
        for m in msgs.into_iter().take(3) {
            assert_eq!(a.accept(m).unwrap(), Accepted::Pending);
        }
    }

    #[test]
    fn happy_path_yields_the_checkpoint_and_advances_the_epoch() {
        let mut a = CheckpointAssembler::new(GUEST_PAGES, None);
        let runs = [run(0, 2, 1), run(10, 1, 2)];
        let c = feed(&mut a, stream(1, CheckpointKind::Checkpoint, &runs, b"dev"))
            .unwrap()
            .unwrap();
        assert_eq!(c.epoch, Epoch(1));
        assert_eq!(c.runs, runs);
        assert_eq!(c.device_state, b"dev");
        assert_eq!(a.last_committed(), Some(Epoch(1)));
        assert_eq!(a.open_epoch(), None);
        // Rounds carry no device state.
        let c = feed(&mut a, stream(2, CheckpointKind::Round, &runs, b""))
            .unwrap()
            .unwrap();
        assert_eq!(c.kind, CheckpointKind::Round);
        assert!(c.device_state.is_empty());
    }

    #[test]
    fn device_state_may_come_in_chunks() {
        let mut a = CheckpointAssembler::new(GUEST_PAGES, None);
        let mut msgs = stream(1, CheckpointKind::Checkpoint, &[run(0, 1, 3)], b"abcdef");
        msgs.splice(
            2..3,
            [
                Message::DeviceState {
                    data: b"abc".to_vec(),
                },
                Message::DeviceState {
                    data: b"def".to_vec(),
                },
            ],
        );
        let c = feed(&mut a, msgs).unwrap().unwrap();
        assert_eq!(c.device_state, b"abcdef");
    }

    /// A migration's destination: a Checkpoint's pages and device state
    /// are handed over as they arrive, the state also kept for the End,
    /// which still checks them all.
    #[test]
    fn a_streaming_receiver_hands_a_checkpoint_over_as_it_arrives_and_still_checks_its_end() {
        let runs = [run(0, 1, 3), run(5, 2, 4)];
        let chunked = |digest_ok: bool| {
            let mut msgs = stream(1, CheckpointKind::Checkpoint, &runs, b"abcdef");
            msgs.splice(
                3..4,
                [b"abc", b"def"].map(|d| Message::DeviceState { data: d.to_vec() }),
            );
            if !digest_ok && let Some(Message::CheckpointEnd(end)) = msgs.last_mut() {
                end.digest[0] ^= 1;
            }
            msgs
        };
        let mut a = CheckpointAssembler::new(GUEST_PAGES, None);
        a.stream_checkpoints();
        let (mut pages, mut state, mut done) = (Vec::new(), Vec::new(), None);
        for m in chunked(true) {
            match a.accept(m).unwrap() {
                Accepted::PreCopy(r) => pages.push(r),
                Accepted::DeviceState(d) => {
                    assert_eq!(pages.len(), 2, "the pages came first");
                    state.extend_from_slice(&d);
                }
                Accepted::Complete(c) => done = Some(c),
                Accepted::Pending => {}
                Accepted::Other(m) => panic!("unexpected handback {m:?}"),
            }
        }
        assert_eq!(pages, runs);
        assert_eq!(state, b"abcdef");
        let c = done.expect("complete");
        assert!(c.runs.is_empty(), "the pages were handed over, not held");
        assert_eq!(
            c.device_state, b"abcdef",
            "the state is kept for the commit"
        );
        assert_eq!(a.last_committed(), Some(Epoch(1)));

        // Handed over all the same, a checkpoint whose End does not match
        // is refused at its End: the receiver must not run it.
        let mut a = CheckpointAssembler::new(GUEST_PAGES, None);
        a.stream_checkpoints();
        let mut msgs = chunked(false);
        let end = msgs.pop().unwrap();
        for m in msgs {
            a.accept(m).unwrap();
        }
        assert!(matches!(
            a.accept(end),
            Err(CheckpointError::DigestMismatch { .. })
        ));
        assert_eq!(a.last_committed(), None);
    }

    #[test]
    fn corrupt_digest_is_rejected_and_nothing_committed() {
        let mut a = CheckpointAssembler::new(GUEST_PAGES, Some(Epoch(4)));
        let mut msgs = stream(5, CheckpointKind::Checkpoint, &[run(0, 1, 1)], b"dev");
        if let Some(Message::CheckpointEnd(e)) = msgs.last_mut() {
            e.digest[0] ^= 1;
        }
        let err = feed(&mut a, msgs).unwrap_err();
        assert!(
            matches!(
                err,
                CheckpointError::DigestMismatch {
                    epoch: Epoch(5),
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(a.last_committed(), Some(Epoch(4)));
        assert_eq!(a.open_epoch(), None);
    }

    #[test]
    fn changed_page_contents_fail_the_digest() {
        let mut a = CheckpointAssembler::new(GUEST_PAGES, None);
        let mut msgs = stream(1, CheckpointKind::Checkpoint, &[run(0, 1, 1)], b"dev");
        if let Message::PageRun(r) = &mut msgs[1] {
            r.data[100] ^= 0x40;
        }
        assert!(matches!(
            feed(&mut a, msgs),
            Err(CheckpointError::DigestMismatch { .. })
        ));
    }

    #[test]
    fn missing_device_state_is_rejected() {
        let mut a = CheckpointAssembler::new(GUEST_PAGES, None);
        let mut msgs = stream(1, CheckpointKind::Checkpoint, &[run(0, 1, 1)], b"");
        msgs.remove(2);
        let err = feed(&mut a, msgs).unwrap_err();
        assert_eq!(err, CheckpointError::MissingDeviceState { epoch: Epoch(1) });
        assert_eq!(a.last_committed(), None);
    }

    #[test]
    fn device_state_in_a_round_is_rejected() {
        let mut a = CheckpointAssembler::new(GUEST_PAGES, None);
        a.accept(Message::CheckpointBegin {
            epoch: Epoch(1),
            kind: CheckpointKind::Round,
        })
        .unwrap();
        let err = a
            .accept(Message::DeviceState { data: vec![1] })
            .unwrap_err();
        assert!(matches!(err, CheckpointError::UnexpectedDeviceState { .. }));
    }

    #[test]
    fn new_begin_while_open_discards_the_partial_checkpoint() {
        let mut a = CheckpointAssembler::new(GUEST_PAGES, None);
        let mut first = stream(1, CheckpointKind::Checkpoint, &[run(0, 1, 1)], b"d");
        first.truncate(2); // Begin + one page run, no End
        feed(&mut a, first).unwrap();
        assert_eq!(a.open_epoch(), Some(Epoch(1)));
        let err = a
            .accept(Message::CheckpointBegin {
                epoch: Epoch(2),
                kind: CheckpointKind::Checkpoint,
            })
            .unwrap_err();
        assert_eq!(
            err,
            CheckpointError::BeginWhileOpen {
                open: Epoch(1),
                new: Epoch(2)
            }
        );
        assert_eq!(a.open_epoch(), None);
        assert_eq!(a.last_committed(), None);
        // The sender (after reconnecting) starts over cleanly.
        let c = feed(
            &mut a,
            stream(2, CheckpointKind::Checkpoint, &[run(1, 1, 9)], b"d"),
        )
        .unwrap();
        assert_eq!(c.unwrap().epoch, Epoch(2));
    }

    #[test]
    fn stale_epoch_is_rejected() {
        let mut a = CheckpointAssembler::new(GUEST_PAGES, Some(Epoch(7)));
        for e in [0, 6, 7] {
            let err = feed(&mut a, stream(e, CheckpointKind::Checkpoint, &[], b"")).unwrap_err();
            assert_eq!(
                err,
                CheckpointError::StaleEpoch {
                    epoch: Epoch(e),
                    last_committed: Epoch(7)
                }
            );
        }
    }

    #[test]
    fn end_without_begin_and_mismatched_end_are_rejected() {
        let mut a = CheckpointAssembler::new(GUEST_PAGES, None);
        let msgs = stream(1, CheckpointKind::Checkpoint, &[], b"x");
        let end = msgs.last().unwrap().clone();
        assert_eq!(
            a.accept(end).unwrap_err(),
            CheckpointError::NotOpen {
                what: "CheckpointEnd"
            }
        );
        let mut msgs = stream(1, CheckpointKind::Checkpoint, &[], b"x");
        if let Some(Message::CheckpointEnd(e)) = msgs.last_mut() {
            e.epoch = Epoch(2);
        }
        assert!(matches!(
            feed(&mut a, msgs),
            Err(CheckpointError::EpochMismatch { .. })
        ));
    }

    #[test]
    fn page_runs_beyond_guest_memory_are_rejected() {
        let mut a = CheckpointAssembler::new(GUEST_PAGES, None);
        let msgs = stream(
            1,
            CheckpointKind::Checkpoint,
            &[run(GUEST_PAGES - 1, 2, 0)],
            b"",
        );
        assert!(matches!(
            feed(&mut a, msgs),
            Err(CheckpointError::PageOutOfRange { .. })
        ));
        let many: Vec<PageRun> = (0..5).map(|_| run(0, 16, 0)).collect();
        let msgs = stream(2, CheckpointKind::Round, &many, b"");
        assert!(matches!(
            feed(&mut a, msgs),
            Err(CheckpointError::TooManyPages { .. })
        ));
    }

    #[test]
    fn count_mismatch_is_rejected() {
        let mut a = CheckpointAssembler::new(GUEST_PAGES, None);
        let mut msgs = stream(1, CheckpointKind::Checkpoint, &[run(0, 1, 1)], b"dev");
        if let Some(Message::CheckpointEnd(e)) = msgs.last_mut() {
            e.page_count = 2;
        }
        assert!(matches!(
            feed(&mut a, msgs),
            Err(CheckpointError::CountMismatch { what: "pages", .. })
        ));
    }

    #[test]
    fn buffered_bytes_counts_the_open_checkpoint_only() {
        let mut a = CheckpointAssembler::new(GUEST_PAGES, None);
        assert_eq!(a.buffered_bytes(), 0);
        let mut msgs = stream(1, CheckpointKind::Checkpoint, &[run(0, 2, 1)], b"dev");
        let end = msgs.pop().unwrap();
        feed(&mut a, msgs).unwrap();
        assert_eq!(a.buffered_bytes(), 2 * PAGE_SIZE as u64 + 3);
        assert!(feed(&mut a, vec![end]).unwrap().is_some());
        assert_eq!(a.buffered_bytes(), 0, "released once yielded");
        let mut msgs = stream(2, CheckpointKind::Round, &[run(0, 1, 1)], b"");
        msgs.pop();
        feed(&mut a, msgs).unwrap();
        assert_eq!(
            a.buffered_bytes(),
            0,
            "a pre-copy round's pages are handed back, not held"
        );
        a.discard();
        let mut msgs = stream(3, CheckpointKind::Checkpoint, &[run(0, 1, 1)], b"");
        msgs.truncate(2);
        feed(&mut a, msgs).unwrap();
        assert_eq!(a.buffered_bytes(), PAGE_SIZE as u64);
        a.accept(Message::CheckpointBegin {
            epoch: Epoch(4),
            kind: CheckpointKind::Checkpoint,
        })
        .unwrap_err();
        assert_eq!(a.buffered_bytes(), 0, "released on error");
    }

    #[test]
    fn other_messages_are_handed_back() {
        let mut a = CheckpointAssembler::new(GUEST_PAGES, None);
        let hb = Message::Heartbeat {
            seq: 1,
            sent_at_us: 2,
        };
        assert!(matches!(a.accept(hb.clone()), Ok(Accepted::Other(m)) if m == hb));
    }

    #[test]
    fn writer_output_is_accepted_by_the_assembler() {
        let mut wire = Vec::new();
        let mut cw =
            CheckpointWriter::begin(&mut wire, Epoch(3), CheckpointKind::Checkpoint).unwrap();
        let pages: Vec<u8> = (0..3 * PAGE_SIZE).map(|i| (i % 251) as u8).collect();
        let w1 = cw.pages(&mut wire, 7, &pages, None).unwrap();
        cw.pages(&mut wire, 20, &pages[..PAGE_SIZE], None).unwrap();
        cw.device_state(&mut wire, b"cpu", None).unwrap();
        cw.device_state(&mut wire, b"+devices", None).unwrap();
        let before_end = wire.len();
        let end = cw.end(&mut wire).unwrap();
        let begin_len = Message::CheckpointBegin {
            epoch: Epoch(3),
            kind: CheckpointKind::Checkpoint,
        }
        .wire_len();
        assert_eq!(
            w1 + (PAGE_SIZE + 28) as u64 + 19 + 24,
            before_end as u64 - begin_len,
            "returned wire bytes add up to what was written"
        );
        assert_eq!((end.page_count, end.device_state_len), (4, 11));

        let mut a = CheckpointAssembler::new(GUEST_PAGES, Some(Epoch(2)));
        let mut r = &wire[..];
        let mut done = None;
        while !r.is_empty() {
            if let Accepted::Complete(c) = a.accept(crate::read_frame(&mut r).unwrap()).unwrap() {
                done = Some(c);
            }
        }
        let c = done.unwrap();
        assert_eq!(c.epoch, Epoch(3));
        assert_eq!(c.device_state, b"cpu+devices");
        assert_eq!(c.runs.len(), 2);
        assert_eq!(c.runs[0].data, pages);
    }

    /// Two compressed checkpoints through the assembler, with the receiver
    /// applying the first before decoding the second against it.
    #[test]
    fn compressed_checkpoints_decode_against_the_committed_copy() {
        use crate::delta::{DeltaEncoder, decode_device_state, decode_pages};
        let mut enc = DeltaEncoder::new(1 << 20);
        let mut ram = vec![0u8; GUEST_PAGES as usize * PAGE_SIZE];
        let mut dev: Vec<u8> = Vec::new();
        let mut a = CheckpointAssembler::new(GUEST_PAGES, Some(Epoch(0)));
        let mut page: Vec<u8> = (0..2 * PAGE_SIZE).map(|i| (i % 13) as u8).collect();
        let mut state = vec![7u8; 5000];
        for epoch in 1..=2u64 {
            page[epoch as usize * 10] ^= 0x80;
            state[epoch as usize] = epoch as u8;
            let mut wire = Vec::new();
            enc.begin_checkpoint();
            let mut cw =
                CheckpointWriter::begin(&mut wire, Epoch(epoch), CheckpointKind::Checkpoint)
                    .unwrap();
            let pw = cw.pages(&mut wire, 4, &page, Some(&mut enc)).unwrap();
            let dw = cw.device_state(&mut wire, &state, Some(&mut enc)).unwrap();
            cw.end(&mut wire).unwrap();
            if epoch == 2 {
                assert!(pw < 200, "two pages with one changed byte each: {pw} bytes");
                assert!(dw < 200, "device state with one changed byte: {dw} bytes");
            }
            let mut r = &wire[..];
            let mut done = None;
            while !r.is_empty() {
                let m = match crate::read_frame(&mut r).unwrap() {
                    Message::PageDelta(d) => Message::PageRun(
                        decode_pages(&d, &mut |p, b| {
                            let o = p as usize * PAGE_SIZE;
                            b.copy_from_slice(&ram[o..o + PAGE_SIZE]);
                            Ok(())
                        })
                        .unwrap(),
                    ),
                    Message::DeviceStateDelta(d) => Message::DeviceState {
                        data: decode_device_state(&d, &dev).unwrap(),
                    },
                    m => m,
                };
                if let Accepted::Complete(c) = a.accept(m).unwrap() {
                    done = Some(c);
                }
            }
            let c = done.expect("the digest verified the decoded checkpoint");
            for run in &c.runs {
                let o = run.first_page as usize * PAGE_SIZE;
                ram[o..o + run.data.len()].copy_from_slice(&run.data);
            }
            dev = c.device_state;
            assert_eq!(&ram[4 * PAGE_SIZE..6 * PAGE_SIZE], &page[..]);
            assert_eq!(dev, state);
        }
    }

    /// An empty device state goes plain, and the encoder forgets the
    /// previous one as the receiver does when it commits the empty one.
    #[test]
    fn an_empty_device_state_keeps_both_sides_bases_in_step() {
        use crate::delta::{DeltaEncoder, decode_device_state};
        let mut enc = DeltaEncoder::new(1 << 20);
        let mut base: Vec<u8> = Vec::new();
        for state in [vec![9u8; 4000], Vec::new(), vec![9u8; 4000]] {
            let mut wire = Vec::new();
            let mut cw =
                CheckpointWriter::begin(&mut wire, Epoch(1), CheckpointKind::Checkpoint).unwrap();
            cw.device_state(&mut wire, &state, Some(&mut enc)).unwrap();
            let mut r = &wire[..];
            let mut got = Vec::new();
            while !r.is_empty() {
                match crate::read_frame(&mut r).unwrap() {
                    Message::DeviceState { data } => got.extend(data),
                    Message::DeviceStateDelta(d) => {
                        got.extend(decode_device_state(&d, &base).unwrap())
                    }
                    _ => {}
                }
            }
            assert_eq!(got, state);
            base = got;
        }
    }

    #[test]
    fn digest_does_not_depend_on_run_grouping() {
        let data: Vec<u8> = (0..3 * PAGE_SIZE).map(|i| i as u8).collect();
        let mut one = CheckpointDigest::new();
        one.add_pages(5, &data);
        let mut split = CheckpointDigest::new();
        split.add_pages(5, &data[..PAGE_SIZE]);
        split.add_pages(6, &data[PAGE_SIZE..]);
        assert_eq!(one.finish(), split.finish());
    }
}
