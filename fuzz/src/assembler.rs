//! `checkpoint_assembler`: a [`CheckpointAssembler`] driven by a sequence
//! of messages built from the input ([`Op`]), next to a reference model of
//! the receiver state machine written from the protocol's rules (crate
//! documentation of `remus_proto`, "Receiver state machine").
//!
//! After every message the assembler and the model must agree on the
//! outcome (pending, a pre-copy page run streamed back, a complete
//! checkpoint, handed back, or the same error), the last committed epoch, the open epoch and the bytes
//! buffered. Besides, each checkpoint yielded is checked on its own: its
//! epoch is above the previous one, its pages lie in guest memory, its page
//! count, device-state length and digest are those its End announced
//! (recomputed from the checkpoint itself and, for a pre-copy epoch, from
//! the runs streamed back before it), and it holds exactly what was fed
//! since its Begin. The bytes buffered never exceed the configured
//! guest memory plus [`MAX_DEVICE_STATE`].
//!
//! Messages are built rather than decoded from frames so that the fuzzer
//! can reach a verified End (it cannot forge CRCs and XXH3 digests); an
//! [`Op::Raw`] feeds a payload decoded by [`Message::decode_payload`], so
//! any message a peer can send is reachable too.

use remus_config::MAX_MEMORY_MIB;
use remus_proto::{
    Accepted, CheckpointAssembler, CheckpointDigest, CheckpointEnd, CheckpointError,
    CheckpointKind, CompleteCheckpoint, DIGEST_LEN, Epoch, MAX_DEVICE_STATE, Message, PAGE_SIZE,
    PageRun,
};

use crate::Reader;

/// The largest guest a valid VM config describes, in pages (the
/// assembler's limit comes from the local VM's memory size).
pub const MAX_GUEST_PAGES: u64 = MAX_MEMORY_MIB * (1 << 20) / PAGE_SIZE as u64;

/// How an epoch is chosen: relative to the model's state, so that the
/// fuzzer hits "next", "stale" and "mismatch" often, or raw.
#[derive(Debug, Clone, Copy)]
pub enum EpochSel {
    /// Begin: the last committed epoch (or 0) plus this. End: the open
    /// epoch (or the last committed plus one) plus this.
    Rel(u8),
    Raw(u64),
}

/// Where a page run starts.
#[derive(Debug, Clone, Copy)]
pub enum PageSel {
    /// `v % guest_pages`: in guest memory.
    Within(u32),
    /// `guest_pages - v` (saturating): at the end of guest memory.
    FromEnd(u8),
    Raw(u64),
}

/// One step of the input. Encoded as a tag byte then fixed-width
/// big-endian fields ([`Op::encode`]); [`Op::read`] is its inverse.
#[derive(Debug, Clone)]
pub enum Op {
    Begin {
        epoch: EpochSel,
        kind: u8,
    },
    /// A run of `count % 16 + 1` pages whose contents come from `fill`.
    Pages {
        first: PageSel,
        count: u8,
        fill: u8,
    },
    /// A chunk of `len` bytes of device state made from `fill`.
    DeviceState {
        len: u16,
        fill: u8,
    },
    /// An End whose counts are the model's plus the deltas and whose
    /// digest is right when `flip` is 0, else has bit `flip - 1` flipped.
    End {
        epoch: EpochSel,
        pages_delta: i8,
        dev_delta: i8,
        flip: u8,
    },
    /// A payload of message type `msg_type`, fed when it decodes.
    Raw {
        msg_type: u8,
        payload: Vec<u8>,
    },
    /// A message the assembler must hand back.
    Heartbeat,
    /// The connection dropped: [`CheckpointAssembler::discard`].
    Discard,
}

/// The input's header: the assembler's configuration.
#[derive(Debug, Clone, Copy)]
pub struct Setup {
    /// Even: `value % 256 + 1` pages; odd: `value % MAX_GUEST_PAGES + 1`.
    /// Bit 1 set: a streaming receiver (a migration's destination,
    /// [`CheckpointAssembler::stream_checkpoints`]).
    pub guest_pages_mode: u8,
    pub guest_pages: u32,
    /// 0: nothing committed; 0xff: u64::MAX; else `n - 1`.
    pub last_committed: u8,
}

impl Setup {
    pub fn guest_pages(&self) -> u64 {
        if self.guest_pages_mode.is_multiple_of(2) {
            u64::from(self.guest_pages % 256) + 1
        } else {
            u64::from(self.guest_pages) % MAX_GUEST_PAGES + 1
        }
    }

    pub fn streaming(&self) -> bool {
        self.guest_pages_mode & 2 != 0
    }

    pub fn last_committed(&self) -> Option<Epoch> {
        match self.last_committed {
            0 => None,
            0xff => Some(Epoch(u64::MAX)),
            n => Some(Epoch(u64::from(n - 1))),
        }
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        out.push(self.guest_pages_mode);
        out.extend_from_slice(&self.guest_pages.to_be_bytes());
        out.push(self.last_committed);
    }

    fn read(r: &mut Reader) -> Option<Setup> {
        Some(Setup {
            guest_pages_mode: r.u8()?,
            guest_pages: r.u32()?,
            last_committed: r.u8()?,
        })
    }
}

const TAGS: u8 = 7;

impl EpochSel {
    fn encode(&self, out: &mut Vec<u8>) {
        match *self {
            EpochSel::Rel(n) => out.push(n.min(0xfe)),
            EpochSel::Raw(e) => {
                out.push(0xff);
                out.extend_from_slice(&e.to_be_bytes());
            }
        }
    }

    fn read(r: &mut Reader) -> Option<EpochSel> {
        Some(match r.u8()? {
            0xff => EpochSel::Raw(r.u64()?),
            n => EpochSel::Rel(n),
        })
    }
}

impl Op {
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Op::Begin { epoch, kind } => {
                out.push(0);
                epoch.encode(out);
                out.push(*kind);
            }
            Op::Pages { first, count, fill } => {
                out.push(1);
                match *first {
                    PageSel::Within(v) => {
                        out.push(0);
                        out.extend_from_slice(&v.to_be_bytes());
                    }
                    PageSel::FromEnd(v) => out.extend_from_slice(&[1, v]),
                    PageSel::Raw(v) => {
                        out.push(2);
                        out.extend_from_slice(&v.to_be_bytes());
                    }
                }
                out.extend_from_slice(&[*count, *fill]);
            }
            Op::DeviceState { len, fill } => {
                out.push(2);
                out.extend_from_slice(&len.to_be_bytes());
                out.push(*fill);
            }
            Op::End {
                epoch,
                pages_delta,
                dev_delta,
                flip,
            } => {
                out.push(3);
                epoch.encode(out);
                out.extend_from_slice(&[*pages_delta as u8, *dev_delta as u8, *flip]);
            }
            Op::Raw { msg_type, payload } => {
                out.push(4);
                out.push(*msg_type);
                out.extend_from_slice(&(payload.len() as u16).to_be_bytes());
                out.extend_from_slice(payload);
            }
            Op::Heartbeat => out.push(5),
            Op::Discard => out.push(6),
        }
    }

    pub fn read(r: &mut Reader) -> Option<Op> {
        Some(match r.u8()? % TAGS {
            0 => Op::Begin {
                epoch: EpochSel::read(r)?,
                kind: r.u8()?,
            },
            1 => Op::Pages {
                first: match r.u8()? % 3 {
                    0 => PageSel::Within(r.u32()?),
                    1 => PageSel::FromEnd(r.u8()?),
                    _ => PageSel::Raw(r.u64()?),
                },
                count: r.u8()?,
                fill: r.u8()?,
            },
            2 => Op::DeviceState {
                len: r.u16()?,
                fill: r.u8()?,
            },
            3 => Op::End {
                epoch: EpochSel::read(r)?,
                pages_delta: r.u8()? as i8,
                dev_delta: r.u8()? as i8,
                flip: r.u8()?,
            },
            4 => {
                let msg_type = r.u8()?;
                let len = usize::from(r.u16()?);
                let payload = match r.take(len) {
                    Some(p) => p,
                    None => r.rest(),
                };
                Op::Raw {
                    msg_type,
                    payload: payload.to_vec(),
                }
            }
            5 => Op::Heartbeat,
            _ => Op::Discard,
        })
    }
}

/// An input: the setup, then the ops.
pub fn input(setup: Setup, ops: &[Op]) -> Vec<u8> {
    let mut out = Vec::new();
    setup.encode(&mut out);
    for op in ops {
        op.encode(&mut out);
    }
    out
}

/// Page contents of an [`Op::Pages`] run.
pub fn page_data(first_page: u64, count: usize, fill: u8) -> Vec<u8> {
    let mut data = vec![fill; count * PAGE_SIZE];
    for (i, page) in data.chunks_exact_mut(PAGE_SIZE).enumerate() {
        page[..8].copy_from_slice(&first_page.wrapping_add(i as u64).to_be_bytes());
        page[PAGE_SIZE - 1] = fill.wrapping_add(i as u8);
    }
    data
}

/// Device state of an [`Op::DeviceState`] (mostly `fill`: cheap to make).
pub fn device_state(len: usize, fill: u8) -> Vec<u8> {
    let mut data = vec![fill; len];
    for (i, b) in data.iter_mut().step_by(61).enumerate() {
        *b = fill ^ (i as u8);
    }
    data
}

fn kind(k: u8) -> CheckpointKind {
    match k % 3 {
        0 => CheckpointKind::InitialSync,
        1 => CheckpointKind::Round,
        _ => CheckpointKind::Checkpoint,
    }
}

// ---------------------------------------------------------------------------
// The reference model
// ---------------------------------------------------------------------------

struct ModelOpen {
    epoch: Epoch,
    kind: CheckpointKind,
    runs: Vec<PageRun>,
    pages: u64,
    device_state: Option<Vec<u8>>,
    digest: CheckpointDigest,
}

/// The receiver's rules, checked in the order the assembler checks them
/// (the order decides which error a message that breaks two rules gets).
pub struct Model {
    guest_pages: u64,
    last: Option<Epoch>,
    open: Option<ModelOpen>,
    /// A Checkpoint's pages and device state are handed back as they
    /// arrive, as a pre-copy epoch's pages are.
    streaming: bool,
}

#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Pending,
    PreCopy(PageRun),
    DeviceState(Vec<u8>),
    Complete(CompleteCheckpoint),
    Other(Message),
    Rejected(CheckpointError),
}

impl Model {
    fn step(&mut self, msg: &Message) -> Outcome {
        let outcome = self.rules(msg);
        if matches!(outcome, Outcome::Rejected(_)) {
            self.open = None;
        }
        outcome
    }

    fn rules(&mut self, msg: &Message) -> Outcome {
        use CheckpointError as E;
        use Outcome::Rejected;
        match msg {
            Message::CheckpointBegin { epoch, kind } => {
                if let Some(o) = &self.open {
                    return Rejected(E::BeginWhileOpen {
                        open: o.epoch,
                        new: *epoch,
                    });
                }
                if let Some(last) = self.last
                    && epoch.0 <= last.0
                {
                    return Rejected(E::StaleEpoch {
                        epoch: *epoch,
                        last_committed: last,
                    });
                }
                self.open = Some(ModelOpen {
                    epoch: *epoch,
                    kind: *kind,
                    runs: Vec::new(),
                    pages: 0,
                    device_state: None,
                    digest: CheckpointDigest::new(),
                });
                Outcome::Pending
            }
            Message::PageRun(run) => {
                let Some(o) = &mut self.open else {
                    return Rejected(E::NotOpen { what: "PageRun" });
                };
                if o.device_state.is_some() {
                    return Rejected(E::PageRunAfterDeviceState { epoch: o.epoch });
                }
                let count = (run.data.len() / PAGE_SIZE) as u64;
                let end = u128::from(run.first_page) + u128::from(count);
                if end > u128::from(self.guest_pages) {
                    return Rejected(E::PageOutOfRange {
                        epoch: o.epoch,
                        first_page: run.first_page,
                        page_count: count as u32,
                        guest_pages: self.guest_pages,
                    });
                }
                if o.pages + count > self.guest_pages {
                    return Rejected(E::TooManyPages {
                        epoch: o.epoch,
                        guest_pages: self.guest_pages,
                    });
                }
                o.pages += count;
                o.digest.add_pages(run.first_page, &run.data);
                // Pre-copy pages stream back at once; a checkpoint's are
                // held until its End verifies, unless streaming.
                if self.streaming
                    || matches!(o.kind, CheckpointKind::InitialSync | CheckpointKind::Round)
                {
                    return Outcome::PreCopy(run.clone());
                }
                o.runs.push(run.clone());
                Outcome::Pending
            }
            Message::DeviceState { data } => {
                let Some(o) = &mut self.open else {
                    return Rejected(E::NotOpen {
                        what: "DeviceState",
                    });
                };
                if o.kind != CheckpointKind::Checkpoint {
                    return Rejected(E::UnexpectedDeviceState {
                        epoch: o.epoch,
                        kind: o.kind,
                    });
                }
                let held = o.device_state.as_ref().map_or(0, Vec::len);
                if (held + data.len()) as u64 > MAX_DEVICE_STATE {
                    return Rejected(E::DeviceStateTooLarge {
                        epoch: o.epoch,
                        max: MAX_DEVICE_STATE,
                    });
                }
                o.digest.add_device_state(data);
                o.device_state
                    .get_or_insert_default()
                    .extend_from_slice(data);
                if self.streaming {
                    Outcome::DeviceState(data.clone())
                } else {
                    Outcome::Pending
                }
            }
            Message::CheckpointEnd(end) => {
                let Some(o) = self.open.take() else {
                    return Rejected(E::NotOpen {
                        what: "CheckpointEnd",
                    });
                };
                if end.epoch != o.epoch {
                    return Rejected(E::EpochMismatch {
                        open: o.epoch,
                        end: end.epoch,
                    });
                }
                if o.kind == CheckpointKind::Checkpoint && o.device_state.is_none() {
                    return Rejected(E::MissingDeviceState { epoch: o.epoch });
                }
                if end.page_count != o.pages {
                    return Rejected(E::CountMismatch {
                        epoch: o.epoch,
                        what: "pages",
                        announced: end.page_count,
                        received: o.pages,
                    });
                }
                let device_state = o.device_state.unwrap_or_default();
                if end.device_state_len != device_state.len() as u64 {
                    return Rejected(E::CountMismatch {
                        epoch: o.epoch,
                        what: "device-state bytes",
                        announced: end.device_state_len,
                        received: device_state.len() as u64,
                    });
                }
                let computed = o.digest.finish();
                if computed != end.digest {
                    return Rejected(E::DigestMismatch {
                        epoch: o.epoch,
                        announced: u128::from_be_bytes(end.digest),
                        computed: u128::from_be_bytes(computed),
                    });
                }
                self.last = Some(o.epoch);
                Outcome::Complete(CompleteCheckpoint {
                    epoch: o.epoch,
                    kind: o.kind,
                    runs: o.runs,
                    device_state,
                })
            }
            other => Outcome::Other(other.clone()),
        }
    }

    fn buffered_bytes(&self) -> u64 {
        self.open.as_ref().map_or(0, |o| {
            o.runs.iter().map(|r| r.data.len() as u64).sum::<u64>()
                + o.device_state.as_ref().map_or(0, |d| d.len() as u64)
        })
    }
}

// ---------------------------------------------------------------------------
// The target
// ---------------------------------------------------------------------------

/// What a run did, for the corpus generator's sanity checks.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    pub messages: usize,
    pub complete: usize,
    pub rejected: usize,
}

/// The input stops being read once this much page data and device state
/// has been fed (keeps one input's time and memory small).
const FEED_LIMIT: usize = 16 << 20;

pub fn run(data: &[u8]) -> Stats {
    let mut r = Reader::new(data);
    let mut stats = Stats::default();
    let Some(setup) = Setup::read(&mut r) else {
        return stats;
    };
    let guest_pages = setup.guest_pages();
    let mut asm = CheckpointAssembler::new(guest_pages, setup.last_committed());
    if setup.streaming() {
        asm.stream_checkpoints();
    }
    let mut model = Model {
        guest_pages,
        last: setup.last_committed(),
        open: None,
        streaming: setup.streaming(),
    };
    let mut fed = 0usize;
    // The runs of the open epoch streamed back as PreCopy, and its device
    // state handed back (streaming).
    let mut streamed: Vec<PageRun> = Vec::new();
    let mut streamed_state: Vec<u8> = Vec::new();
    while fed < FEED_LIMIT
        && let Some(op) = Op::read(&mut r)
    {
        let msg = match op {
            Op::Discard => {
                asm.discard();
                model.open = None;
                streamed.clear();
                streamed_state.clear();
                check_state(&asm, &model);
                continue;
            }
            op => match message(&op, &model) {
                Some(m) => m,
                None => continue,
            },
        };
        fed += match &msg {
            Message::PageRun(run) => run.data.len(),
            Message::DeviceState { data } => data.len(),
            _ => 0,
        };
        stats.messages += 1;
        let before = model.last;
        let end = match &msg {
            Message::CheckpointEnd(e) => Some(e.clone()),
            _ => None,
        };
        let want = model.step(&msg);
        let got = match asm.accept(msg) {
            Ok(Accepted::Pending) => Outcome::Pending,
            Ok(Accepted::PreCopy(r)) => Outcome::PreCopy(r),
            Ok(Accepted::DeviceState(d)) => Outcome::DeviceState(d),
            Ok(Accepted::Complete(c)) => Outcome::Complete(c),
            Ok(Accepted::Other(m)) => Outcome::Other(m),
            Err(e) => Outcome::Rejected(e),
        };
        if let Outcome::PreCopy(r) = &got {
            streamed.push(r.clone());
        }
        if let Outcome::DeviceState(d) = &got {
            streamed_state.extend_from_slice(d);
        }
        if let Outcome::Complete(c) = &got {
            let end = end.as_ref().expect("completed by a CheckpointEnd");
            let handed = Handed {
                streaming: setup.streaming(),
                runs: &streamed,
                state: &streamed_state,
            };
            check_complete(c, end, before, guest_pages, &handed, &want);
            stats.complete += 1;
        }
        if let Outcome::Rejected(e) = &got {
            let _ = e.to_string();
            stats.rejected += 1;
        }
        assert_eq!(got, want, "assembler and model disagree");
        check_state(&asm, &model);
        if model.open.is_none() {
            streamed.clear();
            streamed_state.clear();
        }
    }
    stats
}

/// The message an op stands for, given the model's state.
fn message(op: &Op, model: &Model) -> Option<Message> {
    let gp = model.guest_pages;
    let last = model.last.map_or(0, |e| e.0);
    let open = model.open.as_ref();
    Some(match op {
        Op::Begin { epoch, kind: k } => Message::CheckpointBegin {
            epoch: Epoch(match *epoch {
                EpochSel::Rel(n) => last.wrapping_add(u64::from(n)),
                EpochSel::Raw(e) => e,
            }),
            kind: kind(*k),
        },
        Op::Pages { first, count, fill } => {
            let first_page = match *first {
                PageSel::Within(v) => u64::from(v) % gp,
                PageSel::FromEnd(v) => gp.saturating_sub(u64::from(v)),
                PageSel::Raw(v) => v,
            };
            let count = usize::from(count % 16) + 1;
            // Pages past u64::MAX included: the decoder refuses such a
            // run, but the assembler takes any Message.
            Message::PageRun(PageRun {
                first_page,
                data: page_data(first_page, count, *fill),
            })
        }
        Op::DeviceState { len, fill } => Message::DeviceState {
            data: device_state(usize::from(*len), *fill),
        },
        Op::End {
            epoch,
            pages_delta,
            dev_delta,
            flip,
        } => {
            let epoch = match *epoch {
                EpochSel::Rel(n) => open
                    .map_or(last.wrapping_add(1), |o| o.epoch.0)
                    .wrapping_add(u64::from(n)),
                EpochSel::Raw(e) => e,
            };
            let pages = open.map_or(0, |o| o.pages);
            let dev = open.map_or(0, |o| o.device_state.as_ref().map_or(0, Vec::len) as u64);
            let mut digest = open.map_or([0; DIGEST_LEN], |o| o.digest.finish());
            if *flip != 0 {
                let bit = usize::from(flip - 1) % (DIGEST_LEN * 8);
                digest[bit / 8] ^= 1 << (bit % 8);
            }
            Message::CheckpointEnd(CheckpointEnd {
                epoch: Epoch(epoch),
                page_count: pages.wrapping_add_signed(i64::from(*pages_delta)),
                device_state_len: dev.wrapping_add_signed(i64::from(*dev_delta)),
                digest,
            })
        }
        Op::Raw { msg_type, payload } => {
            Message::decode_payload(u16::from(*msg_type), payload).ok()?
        }
        Op::Heartbeat => Message::Heartbeat {
            seq: 1,
            sent_at_us: 2,
        },
        Op::Discard => return None,
    })
}

fn check_state(asm: &CheckpointAssembler, model: &Model) {
    assert_eq!(asm.last_committed(), model.last, "last committed epoch");
    assert_eq!(
        asm.open_epoch(),
        model.open.as_ref().map(|o| o.epoch),
        "open epoch"
    );
    let held = asm.buffered_bytes();
    assert_eq!(held, model.buffered_bytes(), "bytes buffered");
    assert!(
        held <= model.guest_pages * PAGE_SIZE as u64 + MAX_DEVICE_STATE,
        "{held} bytes buffered for a {}-page guest",
        model.guest_pages
    );
}

/// What the assembler handed back of an epoch before its End.
struct Handed<'a> {
    streaming: bool,
    runs: &'a [PageRun],
    state: &'a [u8],
}

/// A yielded checkpoint, checked on its own against the End it answered.
fn check_complete(
    c: &CompleteCheckpoint,
    end: &CheckpointEnd,
    before: Option<Epoch>,
    guest_pages: u64,
    handed: &Handed<'_>,
    want: &Outcome,
) {
    let streamed = handed.runs;
    assert_eq!(c.epoch, end.epoch, "epoch");
    assert!(before.is_none_or(|b| c.epoch > b), "epoch did not advance");
    if c.kind == CheckpointKind::Checkpoint && !handed.streaming {
        assert!(
            streamed.is_empty(),
            "a checkpoint's pages streamed before its End"
        );
        assert!(handed.state.is_empty(), "device state handed back");
    } else {
        assert!(c.runs.is_empty(), "a {:?} held pages until its End", c.kind);
    }
    if handed.streaming {
        assert_eq!(
            handed.state, c.device_state,
            "the device state handed back is the one kept"
        );
    }
    let mut digest = CheckpointDigest::new();
    let mut pages = 0u64;
    for run in streamed.iter().chain(&c.runs) {
        assert!(!run.data.is_empty() && run.data.len().is_multiple_of(PAGE_SIZE));
        let count = (run.data.len() / PAGE_SIZE) as u64;
        assert!(
            run.first_page
                .checked_add(count)
                .is_some_and(|end| end <= guest_pages),
            "run {}+{count} outside a {guest_pages}-page guest",
            run.first_page
        );
        pages += count;
        digest.add_pages(run.first_page, &run.data);
    }
    assert!(pages <= guest_pages);
    if !c.kind.has_device_state() {
        assert!(c.device_state.is_empty(), "device state in a {:?}", c.kind);
    }
    digest.add_device_state(&c.device_state);
    assert_eq!(pages, end.page_count, "page count");
    assert_eq!(
        c.device_state.len() as u64,
        end.device_state_len,
        "device state length"
    );
    assert_eq!(digest.finish(), end.digest, "digest");
    // What was fed since the Begin, as the model kept it.
    let Outcome::Complete(expected) = want else {
        panic!("yielded {c:?}, the model expected {want:?}");
    };
    assert_eq!(c, expected, "yielded something else than was fed");
}
