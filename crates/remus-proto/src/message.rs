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
use crate::frame::{self, DecodeError, HEADER_LEN, MAX_PAYLOAD, WireError};

/// Size of a guest page as carried in page runs.
pub const PAGE_SIZE: usize = 4096;
/// Bytes of a PageRun payload before the page data.
const PAGE_RUN_PREFIX: usize = 12;
/// The most pages one PageRun frame can carry (just under 64 MiB).
pub const MAX_PAGES_PER_RUN: u32 = ((MAX_PAYLOAD as usize - PAGE_RUN_PREFIX) / PAGE_SIZE) as u32;
/// The most pages one PageDelta frame carries (1 MiB before compression).
pub const MAX_DELTA_PAGES: u32 = 256;
/// Length of the handshake nonces.
pub const NONCE_LEN: usize = 32;
/// Length of an HMAC-SHA256 proof.
pub const PROOF_LEN: usize = 32;
/// Length of a checkpoint digest (XXH3-128).
pub const DIGEST_LEN: usize = 16;

/// Message type numbers. Zero is reserved as invalid so that a zeroed header
/// never means anything. New types are added with new numbers; numbers are
/// never reused.
#[repr(u16)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MsgType {
    Invalid = 0,
    // Session set-up and control: 1..=15.
    Hello = 1,
    HelloAck = 2,
    AuthProof = 3,
    Ready = 4,
    Error = 5,
    Heartbeat = 6,
    Ack = 7,
    /// The VM's configuration and session parameters (JSON), sent by the
    /// client right after Ready so that the server can prepare the copy.
    /// Added after version 1 shipped as an additive type (no version bump).
    VmConfig = 8,
    /// Version 5: the backup's answer to the VM config, before Ready: how
    /// the disks will be synchronised (JSON, defined by the agents).
    SyncPlan = 9,
    /// Version 6: a message of the Noise handshake that opens the
    /// encrypted channel; the only type a server reads before it.
    NoiseHandshake = 10,
    // Checkpoint stream: 16..=31.
    CheckpointBegin = 16,
    PageRun = 17,
    DeviceState = 18,
    CheckpointEnd = 19,
    SwitchOver = 20,
    Done = 21,
    /// Version 3: pages XOR'd against the receiver's copy, LZ4-compressed.
    PageDelta = 22,
    /// Version 3: device state XOR'd against the previous one, LZ4.
    DeviceStateDelta = 23,
    // Disk replication (protocol D), version 2: 32..=47.
    /// Data the guest wrote, tagged with its epoch.
    DiskWrite = 32,
    /// A range the guest trimmed or wrote zeroes to: it reads as zero.
    DiskZero = 33,
    /// The guest asked for everything written so far to be durable.
    DiskFlush = 34,
    /// Closes one epoch's disk log: counts and digest of its records.
    DiskSeal = 35,
    /// Backup → primary at the start of a session: digests of the backup's
    /// copy of a disk, so the initial sync sends only differing chunks.
    DiskDigests = 36,
    /// Version 5, primary → backup at the start of a session whose plan
    /// syncs only changed chunks: which chunks the digest exchange covers.
    DiskSyncRuns = 37,
}

impl MsgType {
    /// The known type with number `v`, if any (including `Invalid`).
    pub fn from_u16(v: u16) -> Option<MsgType> {
        use MsgType::*;
        Some(match v {
            0 => Invalid,
            1 => Hello,
            2 => HelloAck,
            3 => AuthProof,
            4 => Ready,
            5 => Error,
            6 => Heartbeat,
            7 => Ack,
            8 => VmConfig,
            9 => SyncPlan,
            10 => NoiseHandshake,
            16 => CheckpointBegin,
            17 => PageRun,
            18 => DeviceState,
            19 => CheckpointEnd,
            20 => SwitchOver,
            21 => Done,
            22 => PageDelta,
            23 => DeviceStateDelta,
            32 => DiskWrite,
            33 => DiskZero,
            34 => DiskFlush,
            35 => DiskSeal,
            36 => DiskDigests,
            37 => DiskSyncRuns,
            _ => return None,
        })
    }

    /// True for the types whose payload carries or commits VM state; the
    /// server accepts none of them before the peer has authenticated.
    pub fn carries_vm_state(self) -> bool {
        use MsgType::*;
        matches!(
            self,
            CheckpointBegin
                | PageRun
                | DeviceState
                | PageDelta
                | DeviceStateDelta
                | CheckpointEnd
                | SwitchOver
                | DiskWrite
                | DiskZero
                | DiskFlush
                | DiskSeal
                | DiskDigests
                | DiskSyncRuns
        )
    }
}

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
        let header = frame::raw_header(self.msg_type() as u16, &[&head, data]);
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
            Message::Ready | Message::Done => {}
            Message::Error { code, message } => {
                put_u16(&mut p, code.to_u16());
                put_str(&mut p, message);
            }
            Message::Heartbeat { seq, sent_at_us } => {
                put_u64(&mut p, *seq);
                put_u64(&mut p, *sent_at_us);
            }
            Message::Ack { epoch } | Message::SwitchOver { epoch } => put_u64(&mut p, epoch.0),
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
        frame::encode_raw(self.msg_type() as u16, &self.encode_payload(), out);
    }

    /// Writes this message as one frame. Page data is written from where it
    /// lies, not copied into a frame buffer.
    pub fn write_to(&self, w: &mut impl Write) -> Result<(), WireError> {
        match self {
            Message::PageRun(run) => write_page_run(w, run.first_page, &run.data).map(|_| ()),
            Message::DeviceState { data } => {
                let header = frame::raw_header(MsgType::DeviceState as u16, &[data]);
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

    /// Reads one frame and returns its message (see [`frame::read_frame`]).
    pub fn read_from(r: &mut impl std::io::Read) -> Result<Message, WireError> {
        frame::read_frame(r)
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
                    || len > crate::delta::DEVICE_CHUNK as u32
                    || offset
                        .checked_add(u64::from(len))
                        .is_none_or(|end| end > crate::checkpoint::MAX_DEVICE_STATE)
                {
                    return Err(c.bad(format!(
                        "device state range {offset}+{len} is empty, longer than {} bytes or beyond {} bytes",
                        crate::delta::DEVICE_CHUNK,
                        crate::checkpoint::MAX_DEVICE_STATE
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
        let header = frame::raw_header(MsgType::PageRun as u16, &[&prefix, part]);
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
        let header = frame::raw_header(MsgType::DeviceState as u16, &[part]);
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

pub(crate) fn put_u16(p: &mut Vec<u8>, v: u16) {
    p.extend_from_slice(&v.to_be_bytes());
}
pub(crate) fn put_u32(p: &mut Vec<u8>, v: u32) {
    p.extend_from_slice(&v.to_be_bytes());
}
pub(crate) fn put_u64(p: &mut Vec<u8>, v: u64) {
    p.extend_from_slice(&v.to_be_bytes());
}
/// Strings are a u16 byte length then UTF-8. Longer strings are cut at a
/// character boundary (they are names and operator messages, never data).
pub(crate) fn put_str(p: &mut Vec<u8>, s: &str) {
    let mut end = s.len().min(u16::MAX as usize);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    put_u16(p, end as u16);
    p.extend_from_slice(&s.as_bytes()[..end]);
}

/// Bounds-checked reader over one payload; every failure names the field.
pub(crate) struct Cursor<'a> {
    msg_type: MsgType,
    buf: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn new(msg_type: MsgType, buf: &'a [u8]) -> Self {
        Cursor { msg_type, buf }
    }

    pub(crate) fn bad(&self, what: String) -> DecodeError {
        DecodeError::Malformed {
            msg_type: self.msg_type,
            what,
        }
    }

    fn take(&mut self, n: usize, field: &str) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < n {
            return Err(self.bad(format!(
                "payload ends inside {field} (needs {n} bytes, {} left)",
                self.buf.len()
            )));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    pub(crate) fn u8(&mut self, field: &str) -> Result<u8, DecodeError> {
        Ok(self.take(1, field)?[0])
    }
    pub(crate) fn u16(&mut self, field: &str) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(self.array(field)?))
    }
    pub(crate) fn u32(&mut self, field: &str) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array(field)?))
    }
    pub(crate) fn u64(&mut self, field: &str) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.array(field)?))
    }
    pub(crate) fn array<const N: usize>(&mut self, field: &str) -> Result<[u8; N], DecodeError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N, field)?);
        Ok(a)
    }
    pub(crate) fn string(&mut self, field: &str) -> Result<String, DecodeError> {
        let len = self.u16(field)? as usize;
        let bytes = self.take(len, field)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| self.bad(format!("{field} is not UTF-8")))
    }
    fn remaining(&self) -> usize {
        self.buf.len()
    }
    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }
    fn finish(&self) -> Result<(), DecodeError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(self.bad(format!("{} trailing bytes", self.buf.len())))
        }
    }
}
