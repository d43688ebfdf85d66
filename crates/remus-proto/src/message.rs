//! Message types and their payload layouts.
//!
//! Every message has one [`MsgType`] number and one payload layout, encoded
//! big-endian; [`Message::encode`] and [`Message::decode_payload`] are exact
//! inverses (decoding is strict: no trailing bytes, no out-of-range enum
//! values), so a decoded message re-encodes to the very bytes received. The
//! handshake relies on that to authenticate the Hello it saw.

use std::fmt;
use std::io::Write;

use crate::compat::VmCompat;
use crate::wire::{
    Cursor, DecodeError, HEADER_LEN, MAX_PAYLOAD, WireError, encode_raw, put_str, put_u16, put_u32,
    put_u64, raw_header,
};
pub use crate::wire::{DIGEST_LEN, MAX_DELTA_PAGES, MsgType, NONCE_LEN, PAGE_SIZE, PROOF_LEN};

/// Bytes of a PageRun payload before the page data.
const PAGE_RUN_PREFIX: usize = 12;
/// The most pages one PageRun frame can carry (just under 64 MiB).
pub const MAX_PAGES_PER_RUN: u32 = ((MAX_PAYLOAD as usize - PAGE_RUN_PREFIX) / PAGE_SIZE) as u32;

/// A checkpoint epoch number. Epochs of one protected VM strictly increase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Epoch(pub u64);

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "epoch {}", self.0)
    }
}

/// Why a connection is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// Continuous Remus protection: primary → backup.
    Protect = 1,
    /// One-off live migration: source → destination.
    Migrate = 2,
}

impl Purpose {
    /// How an operator calls the (sending, receiving) sides.
    pub fn side_names(self) -> (&'static str, &'static str) {
        match self {
            Purpose::Protect => ("primary", "backup"),
            Purpose::Migrate => ("source", "destination"),
        }
    }
}

/// What a checkpoint stream between Begin and End contains.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckpointKind {
    /// First full copy while the VM runs: pages not sent are zero on the
    /// sender (holes). No device state.
    InitialSync = 1,
    /// A pre-copy round while the VM runs: only the pages sent changed. No
    /// device state.
    Round = 2,
    /// A consistent point taken while the VM was paused: the dirty pages
    /// plus the complete device state. Only these can be resumed from.
    Checkpoint = 3,
}

impl CheckpointKind {
    /// Whether this kind carries device state (exactly the resumable kind).
    pub fn has_device_state(self) -> bool {
        self == CheckpointKind::Checkpoint
    }
}

/// Error codes carried by [`Message::Error`]. Unknown codes from newer peers
/// are kept as `Other` rather than rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// No common protocol version.
    VersionMismatch,
    /// The peer's HMAC proof did not verify: the keys differ.
    AuthFailed,
    /// The receiving agent has no such VM, or will not take it now.
    UnknownVm,
    /// The two VM configurations differ; the message lists every mismatch,
    /// one per line.
    Incompatible,
    /// A message arrived that the protocol does not allow here.
    Protocol,
    /// A checkpoint failed verification and was discarded.
    CheckpointRejected,
    /// Anything else that stops the session on the sender of the Error.
    Internal,
    /// The receiver is setting up or tearing down a copy of this VM (or
    /// still holds one from an ending session): the same request may
    /// succeed in a moment.
    Busy,
    /// The VM runs on the receiving host (a copy that took over, or the
    /// other half of a split brain): it cannot also be a standby there.
    AlreadyRuns,
    Other(u16),
}

impl ErrorCode {
    pub fn to_u16(self) -> u16 {
        match self {
            ErrorCode::VersionMismatch => 1,
            ErrorCode::AuthFailed => 2,
            ErrorCode::UnknownVm => 3,
            ErrorCode::Incompatible => 4,
            ErrorCode::Protocol => 5,
            ErrorCode::CheckpointRejected => 6,
            ErrorCode::Internal => 7,
            ErrorCode::Busy => 8,
            ErrorCode::AlreadyRuns => 9,
            ErrorCode::Other(v) => v,
        }
    }

    pub fn from_u16(v: u16) -> ErrorCode {
        match v {
            1 => ErrorCode::VersionMismatch,
            2 => ErrorCode::AuthFailed,
            3 => ErrorCode::UnknownVm,
            4 => ErrorCode::Incompatible,
            5 => ErrorCode::Protocol,
            6 => ErrorCode::CheckpointRejected,
            7 => ErrorCode::Internal,
            8 => ErrorCode::Busy,
            9 => ErrorCode::AlreadyRuns,
            v => ErrorCode::Other(v),
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ErrorCode::VersionMismatch => f.write_str("version mismatch"),
            ErrorCode::AuthFailed => f.write_str("authentication failed"),
            ErrorCode::UnknownVm => f.write_str("unknown VM"),
            ErrorCode::Incompatible => f.write_str("incompatible VM configuration"),
            ErrorCode::Protocol => f.write_str("protocol violation"),
            ErrorCode::CheckpointRejected => f.write_str("checkpoint rejected"),
            ErrorCode::Internal => f.write_str("internal error"),
            ErrorCode::Busy => f.write_str("busy, try again"),
            ErrorCode::AlreadyRuns => f.write_str("the VM runs there"),
            ErrorCode::Other(v) => write!(f, "error code {v}"),
        }
    }
}

/// The client's opening message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// Newest protocol version the client speaks.
    pub max_version: u16,
    /// Oldest protocol version the client still speaks.
    pub min_version: u16,
    pub purpose: Purpose,
    pub vm_name: String,
    /// The client's view of the VM, checked against the server's.
    pub compat: VmCompat,
    pub client_nonce: [u8; NONCE_LEN],
}

/// The server's reply to Hello: the version it chose and its proof of key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HelloAck {
    pub chosen_version: u16,
    pub server_nonce: [u8; NONCE_LEN],
    pub server_proof: [u8; PROOF_LEN],
}

/// A run of consecutive guest pages. `data.len()` is a non-zero multiple of
/// [`PAGE_SIZE`], at most [`MAX_PAGES_PER_RUN`] pages.
#[derive(Clone, PartialEq, Eq)]
pub struct PageRun {
    /// Guest page frame number of the first page (guest address / 4096).
    pub first_page: u64,
    pub data: Vec<u8>,
}

impl PageRun {
    pub fn page_count(&self) -> u32 {
        (self.data.len() / PAGE_SIZE) as u32
    }
}

impl fmt::Debug for PageRun {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PageRun")
            .field("first_page", &self.first_page)
            .field("page_count", &self.page_count())
            .finish_non_exhaustive()
    }
}

/// Pages `first_page..first_page + page_count`, compressed (version 3,
/// see [`crate::delta`]): the pages whose bit is set in `xor` (bit `i % 8`
/// of byte `i / 8` for page `i`) were XOR'd with the receiver's copy, then
/// all pages were compressed together as one LZ4 block.
#[derive(Clone, PartialEq, Eq)]
pub struct PageDelta {
    pub first_page: u64,
    /// 1..=[`MAX_DELTA_PAGES`].
    pub page_count: u32,
    /// ⌈page_count / 8⌉ bytes; bits past `page_count` are zero.
    pub xor: Vec<u8>,
    /// LZ4 block of `page_count` × 4096 bytes.
    pub compressed: Vec<u8>,
}

impl fmt::Debug for PageDelta {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PageDelta")
            .field("first_page", &self.first_page)
            .field("page_count", &self.page_count)
            .field("compressed", &self.compressed.len())
            .finish_non_exhaustive()
    }
}

/// Device state bytes `offset..offset + len` of this checkpoint, XOR'd
/// with the same bytes of the receiver's last committed device state
/// (zero where that one is shorter), as one LZ4 block (version 3).
#[derive(Clone, PartialEq, Eq)]
pub struct DeviceStateDelta {
    pub offset: u64,
    /// Bytes after decompression, ≥ 1.
    pub len: u32,
    pub compressed: Vec<u8>,
}

impl fmt::Debug for DeviceStateDelta {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeviceStateDelta")
            .field("offset", &self.offset)
            .field("len", &self.len)
            .field("compressed", &self.compressed.len())
            .finish()
    }
}

/// Closes a checkpoint: what the receiver must have seen since Begin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointEnd {
    pub epoch: Epoch,
    /// Total pages over all page runs of this epoch.
    pub page_count: u64,
    /// Total bytes over all DeviceState frames of this epoch.
    pub device_state_len: u64,
    /// [`crate::CheckpointDigest`] over the epoch's pages and device state.
    pub digest: [u8; DIGEST_LEN],
}

/// One disk operation of protocol D, tagged with the epoch whose checkpoint
/// it belongs to. Epoch 0 is the initial sync: applied on arrival, allowed
/// only before anything is committed. Any later epoch is buffered by the
/// backup and applied only when that epoch's checkpoint commits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskRecord {
    pub epoch: Epoch,
    /// Index of the disk in the VM's replicated disks, in target order.
    pub disk: u16,
    pub op: DiskOp,
}

/// What a [`DiskRecord`] does.
#[derive(Clone, PartialEq, Eq)]
pub enum DiskOp {
    /// Write `data` (at least one byte) at `offset`; `fua`: the guest asked
    /// for it to be durable before completion.
    Write {
        offset: u64,
        fua: bool,
        data: Vec<u8>,
    },
    /// The range reads as zero afterwards; `trim`: it may be deallocated
    /// (a trim, or write-zeroes without NO_HOLE).
    Zero {
        offset: u64,
        len: u64,
        trim: bool,
        fua: bool,
    },
    /// Everything this disk wrote before must be durable.
    Flush,
}

impl DiskRecord {
    /// Bytes of guest data this record carries or zeroes.
    pub fn data_len(&self) -> u64 {
        match &self.op {
            DiskOp::Write { data, .. } => data.len() as u64,
            DiskOp::Zero { len, .. } => *len,
            DiskOp::Flush => 0,
        }
    }

    /// Whether applying it asks for durability (a flush or FUA).
    pub fn wants_durability(&self) -> bool {
        match &self.op {
            DiskOp::Write { fua, .. } | DiskOp::Zero { fua, .. } => *fua,
            DiskOp::Flush => true,
        }
    }

    fn msg_type(&self) -> MsgType {
        match self.op {
            DiskOp::Write { .. } => MsgType::DiskWrite,
            DiskOp::Zero { .. } => MsgType::DiskZero,
            DiskOp::Flush => MsgType::DiskFlush,
        }
    }

    /// The payload up to (not including) a write's data.
    fn payload_head(&self) -> Vec<u8> {
        let mut p = Vec::with_capacity(32);
        put_u64(&mut p, self.epoch.0);
        put_u16(&mut p, self.disk);
        match &self.op {
            DiskOp::Write { offset, fua, .. } => {
                put_u64(&mut p, *offset);
                p.push(u8::from(*fua));
            }
            DiskOp::Zero {
                offset,
                len,
                trim,
                fua,
            } => {
                put_u64(&mut p, *offset);
                put_u64(&mut p, *len);
                p.push(u8::from(*fua) | (u8::from(*trim) << 1));
            }
            DiskOp::Flush => {}
        }
        p
    }

    /// Writes this record as one frame, its data from where it lies.
    pub fn write_to(&self, w: &mut impl Write) -> Result<(), WireError> {
        let head = self.payload_head();
        let data: &[u8] = match &self.op {
            DiskOp::Write { data, .. } => data,
            _ => &[],
        };
        let header = raw_header(self.msg_type() as u16, &[&head, data]);
        w.write_all(&header)?;
        w.write_all(&head)?;
        w.write_all(data)?;
        Ok(())
    }
}

impl fmt::Debug for DiskOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DiskOp::Write { offset, fua, data } => f
                .debug_struct("Write")
                .field("offset", offset)
                .field("len", &data.len())
                .field("fua", fua)
                .finish(),
            DiskOp::Zero {
                offset,
                len,
                trim,
                fua,
            } => f
                .debug_struct("Zero")
                .field("offset", offset)
                .field("len", len)
                .field("trim", trim)
                .field("fua", fua)
                .finish(),
            DiskOp::Flush => f.write_str("Flush"),
        }
    }
}

/// XXH3-128 over an epoch's disk records in stream order (each record's
/// whole payload), computed the same way by primary and backup.
pub struct DiskLogDigest {
    hasher: xxhash_rust::xxh3::Xxh3Default,
    pub records: u64,
    pub bytes: u64,
}

impl Default for DiskLogDigest {
    fn default() -> Self {
        DiskLogDigest {
            hasher: xxhash_rust::xxh3::Xxh3Default::new(),
            records: 0,
            bytes: 0,
        }
    }
}

impl DiskLogDigest {
    pub fn add(&mut self, r: &DiskRecord) {
        self.hasher.update(&(r.msg_type() as u16).to_be_bytes());
        self.hasher.update(&r.payload_head());
        if let DiskOp::Write { data, .. } = &r.op {
            self.hasher.update(data);
        }
        self.records += 1;
        self.bytes += r.data_len();
    }

    /// The seal for `epoch` closing what was added.
    pub fn seal(&self, epoch: Epoch) -> DiskSeal {
        DiskSeal {
            epoch,
            records: self.records,
            bytes: self.bytes,
            digest: self.hasher.digest128().to_be_bytes(),
        }
    }
}

/// Closes an epoch's disk log: sent after the epoch's last disk record and
/// before its CheckpointEnd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSeal {
    pub epoch: Epoch,
    pub records: u64,
    /// Bytes written or zeroed by the records.
    pub bytes: u64,
    pub digest: [u8; DIGEST_LEN],
}

/// Digests of consecutive chunks of one disk (initial sync).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskDigests {
    pub disk: u16,
    /// Bytes per chunk (the last chunk of a disk may be shorter).
    pub chunk_size: u32,
    pub first_chunk: u64,
    pub digests: Vec<[u8; DIGEST_LEN]>,
}

/// The chunks of one disk a resynchronisation compares: runs of
/// consecutive chunks, ascending and disjoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSyncRuns {
    pub disk: u16,
    pub chunk_size: u32,
    /// (first chunk, number of chunks ≥ 1)
    pub runs: Vec<(u64, u64)>,
}

/// Shortest failover timeout a Tune carries (ms).
pub const MIN_TUNE_TIMEOUT_MS: u64 = 100;
/// Longest failover timeout a Tune carries (ms): an hour.
pub const MAX_TUNE_TIMEOUT_MS: u64 = 3_600_000;

/// Shortest standby grace a Suspend asks for (ms).
pub const MIN_SUSPEND_GRACE_MS: u64 = 1_000;
/// Longest standby grace a Suspend asks for (ms): ten minutes.
pub const MAX_SUSPEND_GRACE_MS: u64 = 600_000;

/// One protocol message, one variant per [`MsgType`] (reserved types excepted).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Hello(Hello),
    HelloAck(HelloAck),
    AuthProof {
        client_proof: [u8; PROOF_LEN],
    },
    /// The server accepted the session; VM state may flow from now on.
    Ready,
    /// The sender stops the session for the reason given.
    Error {
        code: ErrorCode,
        message: String,
    },
    /// Liveness, sent by both sides when there is nothing else to send.
    Heartbeat {
        seq: u64,
        sent_at_us: u64,
    },
    /// The VM's configuration and session parameters as JSON (the agents
    /// define the schema; the server validates it before preparing a copy).
    VmConfig {
        json: String,
    },
    /// The backup's disk sync plan as JSON (version 5).
    SyncPlan {
        json: String,
    },
    /// One message of the Noise handshake (version 6), in the clear: the
    /// keys of the channel everything else travels in.
    NoiseHandshake {
        data: Vec<u8>,
    },
    /// The receiver committed this epoch.
    Ack {
        epoch: Epoch,
    },
    CheckpointBegin {
        epoch: Epoch,
        kind: CheckpointKind,
    },
    PageRun(PageRun),
    /// A chunk of the device state; chunks concatenate in order.
    DeviceState {
        data: Vec<u8>,
    },
    PageDelta(PageDelta),
    DeviceStateDelta(DeviceStateDelta),
    CheckpointEnd(CheckpointEnd),
    /// Migration: the source has stopped for good after `epoch` was acked;
    /// the destination resumes the VM from it.
    SwitchOver {
        epoch: Epoch,
    },
    /// Orderly end of the session: the sender stops on purpose. A backup that
    /// receives Done must not fail over.
    Done,
    /// The session's failover timeout (ms), [`MIN_TUNE_TIMEOUT_MS`] to
    /// [`MAX_TUNE_TIMEOUT_MS`]: from the primary, a new one; from the
    /// backup before Ready, that it can take one.
    Tune {
        timeout_ms: u64,
    },
    /// The primary's agent restarts with the guest stopped at `epoch`
    /// (acknowledged): keep the standby for `grace_ms`
    /// ([`MIN_SUSPEND_GRACE_MS`] to [`MAX_SUSPEND_GRACE_MS`]).
    Suspend {
        epoch: Epoch,
        grace_ms: u64,
    },
    /// The backup keeps its standby across a Suspend; `resumed_at` is the
    /// epoch this session resumes from (0: a new copy).
    Resumable {
        resumed_at: u64,
    },
    /// The backup's agent restarts: suspend the session to keep the
    /// standby.
    Restarting,
    /// The backup loads device-only state: see
    /// [`MsgType::DevicesOnlyState`].
    DevicesOnlyState,
    /// DiskWrite, DiskZero or DiskFlush.
    Disk(DiskRecord),
    DiskSeal(DiskSeal),
    DiskDigests(DiskDigests),
    DiskSyncRuns(DiskSyncRuns),
}

/// `text` with its control characters escaped (`\n`, `\u{1b}`): safe to
/// put into a log line or print on a terminal, whoever wrote it.
pub fn printable(text: &str) -> String {
    // Control characters, and the invisible ones that reorder or break
    // what a terminal or a log viewer shows: line and paragraph
    // separators, bidirectional embeddings, overrides and isolates.
    let hidden = |c: char| {
        c.is_control()
            || matches!(c, '\u{2028}' | '\u{2029}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
    };
    if !text.chars().any(hidden) {
        return text.to_string();
    }
    text.chars()
        .map(|c| {
            if hidden(c) {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

impl Message {
    pub fn msg_type(&self) -> MsgType {
        match self {
            Message::Hello(_) => MsgType::Hello,
            Message::HelloAck(_) => MsgType::HelloAck,
            Message::AuthProof { .. } => MsgType::AuthProof,
            Message::Ready => MsgType::Ready,
            Message::Error { .. } => MsgType::Error,
            Message::Heartbeat { .. } => MsgType::Heartbeat,
            Message::Ack { .. } => MsgType::Ack,
            Message::VmConfig { .. } => MsgType::VmConfig,
            Message::SyncPlan { .. } => MsgType::SyncPlan,
            Message::NoiseHandshake { .. } => MsgType::NoiseHandshake,
            Message::CheckpointBegin { .. } => MsgType::CheckpointBegin,
            Message::PageRun(_) => MsgType::PageRun,
            Message::DeviceState { .. } => MsgType::DeviceState,
            Message::PageDelta(_) => MsgType::PageDelta,
            Message::DeviceStateDelta(_) => MsgType::DeviceStateDelta,
            Message::CheckpointEnd(_) => MsgType::CheckpointEnd,
            Message::SwitchOver { .. } => MsgType::SwitchOver,
            Message::Done => MsgType::Done,
            Message::Tune { .. } => MsgType::Tune,
            Message::Suspend { .. } => MsgType::Suspend,
            Message::Resumable { .. } => MsgType::Resumable,
            Message::Restarting => MsgType::Restarting,
            Message::DevicesOnlyState => MsgType::DevicesOnlyState,
            Message::Disk(r) => r.msg_type(),
            Message::DiskSeal(_) => MsgType::DiskSeal,
            Message::DiskDigests(_) => MsgType::DiskDigests,
            Message::DiskSyncRuns(_) => MsgType::DiskSyncRuns,
        }
    }

    /// The payload bytes of this message (without the frame header).
    pub fn encode_payload(&self) -> Vec<u8> {
        let mut p = Vec::new();
        match self {
            Message::Hello(h) => {
                put_u16(&mut p, h.max_version);
                put_u16(&mut p, h.min_version);
                p.push(h.purpose as u8);
                p.extend_from_slice(&h.client_nonce);
                put_str(&mut p, &h.vm_name);
                h.compat.encode(&mut p);
            }
            Message::HelloAck(a) => {
                put_u16(&mut p, a.chosen_version);
                p.extend_from_slice(&a.server_nonce);
                p.extend_from_slice(&a.server_proof);
            }
            Message::AuthProof { client_proof } => p.extend_from_slice(client_proof),
            Message::Ready | Message::Done | Message::Restarting | Message::DevicesOnlyState => {}
            Message::Error { code, message } => {
                put_u16(&mut p, code.to_u16());
                put_str(&mut p, message);
            }
            Message::Heartbeat { seq, sent_at_us } => {
                put_u64(&mut p, *seq);
                put_u64(&mut p, *sent_at_us);
            }
            Message::Ack { epoch } | Message::SwitchOver { epoch } => put_u64(&mut p, epoch.0),
            Message::Tune { timeout_ms } => put_u64(&mut p, *timeout_ms),
            Message::Suspend { epoch, grace_ms } => {
                put_u64(&mut p, epoch.0);
                put_u64(&mut p, *grace_ms);
            }
            Message::Resumable { resumed_at } => put_u64(&mut p, *resumed_at),
            Message::VmConfig { json } | Message::SyncPlan { json } => {
                p.extend_from_slice(json.as_bytes())
            }
            Message::NoiseHandshake { data } => p.extend_from_slice(data),
            Message::CheckpointBegin { epoch, kind } => {
                put_u64(&mut p, epoch.0);
                p.push(*kind as u8);
            }
            Message::PageRun(run) => {
                p.extend_from_slice(&page_run_prefix(run.first_page, run.page_count()));
                p.extend_from_slice(&run.data);
            }
            Message::DeviceState { data } => p.extend_from_slice(data),
            Message::PageDelta(d) => {
                put_u64(&mut p, d.first_page);
                put_u32(&mut p, d.page_count);
                p.extend_from_slice(&d.xor);
                p.extend_from_slice(&d.compressed);
            }
            Message::DeviceStateDelta(d) => {
                put_u64(&mut p, d.offset);
                put_u32(&mut p, d.len);
                p.extend_from_slice(&d.compressed);
            }
            Message::CheckpointEnd(e) => {
                put_u64(&mut p, e.epoch.0);
                put_u64(&mut p, e.page_count);
                put_u64(&mut p, e.device_state_len);
                p.extend_from_slice(&e.digest);
            }
            Message::Disk(r) => {
                p = r.payload_head();
                if let DiskOp::Write { data, .. } = &r.op {
                    p.extend_from_slice(data);
                }
            }
            Message::DiskSeal(s) => {
                put_u64(&mut p, s.epoch.0);
                put_u64(&mut p, s.records);
                put_u64(&mut p, s.bytes);
                p.extend_from_slice(&s.digest);
            }
            Message::DiskDigests(d) => {
                put_u16(&mut p, d.disk);
                put_u32(&mut p, d.chunk_size);
                put_u64(&mut p, d.first_chunk);
                for x in &d.digests {
                    p.extend_from_slice(x);
                }
            }
            Message::DiskSyncRuns(r) => {
                put_u16(&mut p, r.disk);
                put_u32(&mut p, r.chunk_size);
                for &(first, count) in &r.runs {
                    put_u64(&mut p, first);
                    put_u64(&mut p, count);
                }
            }
        }
        p
    }

    /// Bytes of this message's frame on the wire (header and payload).
    pub fn wire_len(&self) -> u64 {
        let payload = match self {
            Message::PageRun(r) => PAGE_RUN_PREFIX + r.data.len(),
            Message::DeviceState { data } => data.len(),
            Message::PageDelta(d) => 12 + d.xor.len() + d.compressed.len(),
            Message::DeviceStateDelta(d) => 12 + d.compressed.len(),
            Message::Disk(r) => {
                r.payload_head().len()
                    + match &r.op {
                        DiskOp::Write { data, .. } => data.len(),
                        _ => 0,
                    }
            }
            m => m.encode_payload().len(),
        };
        (HEADER_LEN + payload) as u64
    }

    /// Appends this message as one complete frame to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        encode_raw(self.msg_type() as u16, &self.encode_payload(), out);
    }

    /// Writes this message as one frame. Page data is written from where it
    /// lies, not copied into a frame buffer.
    pub fn write_to(&self, w: &mut impl Write) -> Result<(), WireError> {
        match self {
            Message::PageRun(run) => write_page_run(w, run.first_page, &run.data).map(|_| ()),
            Message::DeviceState { data } => {
                let header = raw_header(MsgType::DeviceState as u16, &[data]);
                w.write_all(&header)?;
                w.write_all(data)?;
                Ok(())
            }
            Message::Disk(r) => r.write_to(w),
            _ => {
                let mut buf = Vec::new();
                self.encode(&mut buf);
                w.write_all(&buf)?;
                Ok(())
            }
        }
    }

    /// Parses the payload of a frame of type `msg_type` (CRC already checked).
    pub fn decode_payload(msg_type: u16, payload: &[u8]) -> Result<Message, DecodeError> {
        let t = match MsgType::from_u16(msg_type) {
            None => return Err(DecodeError::UnknownType(msg_type)),
            Some(MsgType::Invalid) => return Err(DecodeError::InvalidType),
            Some(t) => t,
        };
        let mut c = Cursor::new(t, payload);
        let msg = match t {
            MsgType::Hello => {
                let max_version = c.u16("max_version")?;
                let min_version = c.u16("min_version")?;
                let purpose = match c.u8("purpose")? {
                    1 => Purpose::Protect,
                    2 => Purpose::Migrate,
                    v => {
                        return Err(c.bad(format!("purpose {v} is not 1 (protect) or 2 (migrate)")));
                    }
                };
                let client_nonce = c.array("client_nonce")?;
                let vm_name = c.string("vm_name")?;
                let compat = VmCompat::decode(&mut c)?;
                Message::Hello(Hello {
                    max_version,
                    min_version,
                    purpose,
                    vm_name,
                    compat,
                    client_nonce,
                })
            }
            MsgType::HelloAck => Message::HelloAck(HelloAck {
                chosen_version: c.u16("chosen_version")?,
                server_nonce: c.array("server_nonce")?,
                server_proof: c.array("server_proof")?,
            }),
            MsgType::AuthProof => Message::AuthProof {
                client_proof: c.array("client_proof")?,
            },
            MsgType::Ready => Message::Ready,
            MsgType::Done => Message::Done,
            MsgType::Restarting => Message::Restarting,
            MsgType::DevicesOnlyState => Message::DevicesOnlyState,
            MsgType::Error => {
                let code = ErrorCode::from_u16(c.u16("code")?);
                let text = c.string("message")?;
                // The peer's words end up in log lines and terminals:
                // control characters (a newline forging a log line, an
                // escape sequence) are shown escaped, never passed on;
                // only an incompatibility keeps its one field per line.
                let message = if code == ErrorCode::Incompatible {
                    text.split('\n')
                        .map(printable)
                        .collect::<Vec<_>>()
                        .join("\n")
                } else {
                    printable(&text)
                };
                Message::Error { code, message }
            }
            MsgType::Heartbeat => Message::Heartbeat {
                seq: c.u64("seq")?,
                sent_at_us: c.u64("sent_at_us")?,
            },
            MsgType::Ack => Message::Ack {
                epoch: Epoch(c.u64("epoch")?),
            },
            MsgType::VmConfig | MsgType::SyncPlan => {
                let bytes = c.rest();
                let json = String::from_utf8(bytes.to_vec())
                    .map_err(|_| c.bad("json is not UTF-8".to_string()))?;
                if t == MsgType::VmConfig {
                    Message::VmConfig { json }
                } else {
                    Message::SyncPlan { json }
                }
            }
            MsgType::SwitchOver => Message::SwitchOver {
                epoch: Epoch(c.u64("epoch")?),
            },
            MsgType::Tune => {
                let timeout_ms = c.u64("timeout_ms")?;
                if !(MIN_TUNE_TIMEOUT_MS..=MAX_TUNE_TIMEOUT_MS).contains(&timeout_ms) {
                    return Err(c.bad(format!(
                        "timeout {timeout_ms} ms is out of range {MIN_TUNE_TIMEOUT_MS}..={MAX_TUNE_TIMEOUT_MS}"
                    )));
                }
                Message::Tune { timeout_ms }
            }
            MsgType::Suspend => {
                let epoch = Epoch(c.u64("epoch")?);
                let grace_ms = c.u64("grace_ms")?;
                if epoch.0 == 0 {
                    return Err(c.bad("a suspend at epoch 0 (nothing committed)".to_string()));
                }
                if !(MIN_SUSPEND_GRACE_MS..=MAX_SUSPEND_GRACE_MS).contains(&grace_ms) {
                    return Err(c.bad(format!(
                        "grace {grace_ms} ms is out of range {MIN_SUSPEND_GRACE_MS}..={MAX_SUSPEND_GRACE_MS}"
                    )));
                }
                Message::Suspend { epoch, grace_ms }
            }
            MsgType::Resumable => Message::Resumable {
                resumed_at: c.u64("resumed_at")?,
            },
            MsgType::NoiseHandshake => {
                let data = c.rest().to_vec();
                if data.is_empty() || data.len() > crate::channel::MAX_NOISE_MESSAGE {
                    return Err(c.bad(format!(
                        "{} handshake bytes (1 to {} expected)",
                        data.len(),
                        crate::channel::MAX_NOISE_MESSAGE
                    )));
                }
                Message::NoiseHandshake { data }
            }
            MsgType::CheckpointBegin => {
                let epoch = Epoch(c.u64("epoch")?);
                let kind = match c.u8("kind")? {
                    1 => CheckpointKind::InitialSync,
                    2 => CheckpointKind::Round,
                    3 => CheckpointKind::Checkpoint,
                    v => return Err(c.bad(format!("checkpoint kind {v} is not 1, 2 or 3"))),
                };
                Message::CheckpointBegin { epoch, kind }
            }
            MsgType::PageRun => {
                let first_page = c.u64("first_page")?;
                let page_count = c.u32("page_count")?;
                if page_count == 0 {
                    return Err(c.bad("page_count is 0".into()));
                }
                if first_page.checked_add(u64::from(page_count)).is_none() {
                    return Err(c.bad(format!(
                        "run of {page_count} pages from page {first_page} overflows the page numbers"
                    )));
                }
                let want = page_count as usize * PAGE_SIZE;
                if c.remaining() != want {
                    return Err(c.bad(format!(
                        "page_count {page_count} needs {want} data bytes, frame has {}",
                        c.remaining()
                    )));
                }
                Message::PageRun(PageRun {
                    first_page,
                    data: c.rest().to_vec(),
                })
            }
            MsgType::DeviceState => Message::DeviceState {
                data: c.rest().to_vec(),
            },
            MsgType::PageDelta => {
                let first_page = c.u64("first_page")?;
                let page_count = c.u32("page_count")?;
                if page_count == 0 || page_count > MAX_DELTA_PAGES {
                    return Err(c.bad(format!(
                        "page_count {page_count} is not in 1..={MAX_DELTA_PAGES}"
                    )));
                }
                if first_page.checked_add(u64::from(page_count)).is_none() {
                    return Err(c.bad(format!(
                        "run of {page_count} pages from page {first_page} overflows the page numbers"
                    )));
                }
                let xor = c.take((page_count as usize).div_ceil(8), "xor")?.to_vec();
                let tail_bits = page_count % 8;
                if tail_bits != 0 && xor[xor.len() - 1] >> tail_bits != 0 {
                    return Err(c.bad("xor bits set past page_count".into()));
                }
                let compressed = c.rest().to_vec();
                if compressed.is_empty() {
                    return Err(c.bad("empty compressed block".into()));
                }
                Message::PageDelta(PageDelta {
                    first_page,
                    page_count,
                    xor,
                    compressed,
                })
            }
            MsgType::DeviceStateDelta => {
                let offset = c.u64("offset")?;
                let len = c.u32("len")?;
                if len == 0
                    || len > crate::wire::DEVICE_CHUNK as u32
                    || offset
                        .checked_add(u64::from(len))
                        .is_none_or(|end| end > crate::wire::MAX_DEVICE_STATE)
                {
                    return Err(c.bad(format!(
                        "device state range {offset}+{len} is empty, longer than {} bytes or beyond {} bytes",
                        crate::wire::DEVICE_CHUNK,
                        crate::wire::MAX_DEVICE_STATE
                    )));
                }
                let compressed = c.rest().to_vec();
                if compressed.is_empty() {
                    return Err(c.bad("empty compressed block".into()));
                }
                Message::DeviceStateDelta(DeviceStateDelta {
                    offset,
                    len,
                    compressed,
                })
            }
            MsgType::CheckpointEnd => Message::CheckpointEnd(CheckpointEnd {
                epoch: Epoch(c.u64("epoch")?),
                page_count: c.u64("page_count")?,
                device_state_len: c.u64("device_state_len")?,
                digest: c.array("digest")?,
            }),
            MsgType::DiskWrite => {
                let epoch = Epoch(c.u64("epoch")?);
                let disk = c.u16("disk")?;
                let offset = c.u64("offset")?;
                let flags = c.u8("flags")?;
                if flags & !1 != 0 {
                    return Err(c.bad(format!("unknown write flags {flags:#x}")));
                }
                let data = c.rest().to_vec();
                if data.is_empty() {
                    return Err(c.bad("write of 0 bytes".into()));
                }
                if offset.checked_add(data.len() as u64).is_none() {
                    return Err(c.bad(format!("write at {offset} overflows the offsets")));
                }
                Message::Disk(DiskRecord {
                    epoch,
                    disk,
                    op: DiskOp::Write {
                        offset,
                        fua: flags & 1 != 0,
                        data,
                    },
                })
            }
            MsgType::DiskZero => {
                let epoch = Epoch(c.u64("epoch")?);
                let disk = c.u16("disk")?;
                let offset = c.u64("offset")?;
                let len = c.u64("len")?;
                let flags = c.u8("flags")?;
                if flags & !3 != 0 {
                    return Err(c.bad(format!("unknown zero flags {flags:#x}")));
                }
                if len == 0 || offset.checked_add(len).is_none() {
                    return Err(c.bad(format!("bad zero range {offset}+{len}")));
                }
                Message::Disk(DiskRecord {
                    epoch,
                    disk,
                    op: DiskOp::Zero {
                        offset,
                        len,
                        fua: flags & 1 != 0,
                        trim: flags & 2 != 0,
                    },
                })
            }
            MsgType::DiskFlush => Message::Disk(DiskRecord {
                epoch: Epoch(c.u64("epoch")?),
                disk: c.u16("disk")?,
                op: DiskOp::Flush,
            }),
            MsgType::DiskSeal => Message::DiskSeal(DiskSeal {
                epoch: Epoch(c.u64("epoch")?),
                records: c.u64("records")?,
                bytes: c.u64("bytes")?,
                digest: c.array("digest")?,
            }),
            MsgType::DiskDigests => {
                let disk = c.u16("disk")?;
                let chunk_size = c.u32("chunk_size")?;
                let first_chunk = c.u64("first_chunk")?;
                if chunk_size == 0 {
                    return Err(c.bad("chunk_size is 0".into()));
                }
                let rest = c.rest();
                if rest.is_empty() || !rest.len().is_multiple_of(DIGEST_LEN) {
                    return Err(c.bad(format!(
                        "{} digest bytes is not a positive multiple of {DIGEST_LEN}",
                        rest.len()
                    )));
                }
                let digests = rest
                    .chunks_exact(DIGEST_LEN)
                    .map(|d| {
                        let mut a = [0u8; DIGEST_LEN];
                        a.copy_from_slice(d);
                        a
                    })
                    .collect();
                Message::DiskDigests(DiskDigests {
                    disk,
                    chunk_size,
                    first_chunk,
                    digests,
                })
            }
            MsgType::DiskSyncRuns => {
                let disk = c.u16("disk")?;
                let chunk_size = c.u32("chunk_size")?;
                if chunk_size == 0 {
                    return Err(c.bad("chunk_size is 0".into()));
                }
                let rest = c.rest();
                if !rest.len().is_multiple_of(16) {
                    return Err(c.bad(format!("{} run bytes is not a multiple of 16", rest.len())));
                }
                let mut runs = Vec::with_capacity(rest.len() / 16);
                let mut next = 0u64;
                for r in rest.chunks_exact(16) {
                    let first = u64::from_be_bytes(r[..8].try_into().unwrap_or_default());
                    let count = u64::from_be_bytes(r[8..].try_into().unwrap_or_default());
                    if count == 0 || first < next || first.checked_add(count).is_none() {
                        return Err(c.bad(format!(
                            "run ({first}, {count}) is empty, out of order or overlapping"
                        )));
                    }
                    next = first + count;
                    runs.push((first, count));
                }
                Message::DiskSyncRuns(DiskSyncRuns {
                    disk,
                    chunk_size,
                    runs,
                })
            }
            MsgType::Invalid => unreachable!("filtered above"),
        };
        c.finish()?;
        Ok(msg)
    }
}

fn page_run_prefix(first_page: u64, page_count: u32) -> [u8; PAGE_RUN_PREFIX] {
    let mut p = [0u8; PAGE_RUN_PREFIX];
    p[..8].copy_from_slice(&first_page.to_be_bytes());
    p[8..].copy_from_slice(&page_count.to_be_bytes());
    p
}

/// Writes guest pages `first_page..` taken from `data` (a whole number of
/// pages) as as many PageRun frames as needed, without copying the pages;
/// returns the bytes written, frame headers included.
///
/// # Panics
/// If `data` is not a whole number of pages: a sender bug.
pub fn write_page_run(w: &mut impl Write, first_page: u64, data: &[u8]) -> Result<u64, WireError> {
    assert!(
        data.len().is_multiple_of(PAGE_SIZE),
        "page run of {} bytes is not a whole number of pages",
        data.len()
    );
    let chunk = MAX_PAGES_PER_RUN as usize * PAGE_SIZE;
    let mut written = 0u64;
    for (i, part) in data.chunks(chunk).enumerate() {
        let first = first_page + (i * MAX_PAGES_PER_RUN as usize) as u64;
        let prefix = page_run_prefix(first, (part.len() / PAGE_SIZE) as u32);
        let header = raw_header(MsgType::PageRun as u16, &[&prefix, part]);
        let mut head = [0u8; HEADER_LEN + PAGE_RUN_PREFIX];
        head[..HEADER_LEN].copy_from_slice(&header);
        head[HEADER_LEN..].copy_from_slice(&prefix);
        w.write_all(&head)?;
        w.write_all(part)?;
        written += (head.len() + part.len()) as u64;
    }
    Ok(written)
}

/// Writes device state as as many DeviceState frames as needed (one, if
/// it is empty); returns the bytes written, frame headers included.
pub fn write_device_state(w: &mut impl Write, data: &[u8]) -> Result<u64, WireError> {
    let mut written = 0u64;
    for part in data
        .chunks(MAX_PAYLOAD as usize)
        .chain(data.is_empty().then_some(data))
    {
        let header = raw_header(MsgType::DeviceState as u16, &[part]);
        w.write_all(&header)?;
        w.write_all(part)?;
        written += (header.len() + part.len()) as u64;
    }
    Ok(written)
}

/// Writes each message as a frame; returns the bytes written.
pub(crate) fn write_counted(
    w: &mut impl Write,
    messages: impl IntoIterator<Item = Message>,
) -> Result<u64, WireError> {
    let mut written = 0u64;
    for m in messages {
        m.write_to(w)?;
        written += m.wire_len();
    }
    Ok(written)
}
