//! The wire's primitives, below every message: the limits, the frame
//! header and its checksum, message type numbers, the errors of decoding,
//! and the bounds-checked cursor payloads are read with. A leaf: it uses
//! no other module of this crate.

use std::fmt;
use std::io;

use thiserror::Error;

/// The four bytes every frame starts with.
pub const MAGIC: [u8; 4] = *b"RMS1";

/// Size of the fixed frame header in bytes.
pub const HEADER_LEN: usize = 16;

/// Largest payload a frame may carry (64 MiB). Page runs are split to fit.
pub const MAX_PAYLOAD: u32 = 64 << 20;

/// Flag bits 8..15 are *critical*: a receiver that does not know a critical
/// bit must reject the frame. Bits 0..7 may be ignored when unknown. Version 1
/// defines no flags; senders set none.
pub const CRITICAL_FLAGS: u16 = 0xff00;

/// Size of a guest page as carried in page runs.
pub const PAGE_SIZE: usize = 4096;

/// The most pages one PageDelta frame carries (1 MiB before compression).
pub const MAX_DELTA_PAGES: u32 = 256;

/// Length of the handshake nonces.
pub const NONCE_LEN: usize = 32;

/// Length of an HMAC-SHA256 proof.
pub const PROOF_LEN: usize = 32;

/// Length of a checkpoint digest (XXH3-128).
pub const DIGEST_LEN: usize = 16;

/// Largest device state accepted in one checkpoint (512 MiB). QEMU's device
/// state is normally well under a few MiB, since guest RAM travels as pages.
pub const MAX_DEVICE_STATE: u64 = 512 << 20;

/// Raw bytes of device state per DeviceStateDelta frame, at most: a
/// receiver refuses longer ones before allocating anything.
pub const DEVICE_CHUNK: usize = 16 << 20;

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
    /// Primary → backup: the session's failover timeout changed (`remus
    /// protect --set`). Sent only to a backup that answered the setup's
    /// `tune` with a Tune of its own (additive, no version bump).
    Tune = 11,
    /// Primary → backup: the primary's agent restarts (epoch u64, grace_ms
    /// u64). `epoch` is acknowledged and the guest stays stopped at it; the
    /// backup keeps its standby for `grace_ms` for a session that resumes
    /// from it, and does not fail over meanwhile. Sent only to a backup that
    /// answered the setup's `suspend` with a Resumable (additive).
    Suspend = 12,
    /// Backup → primary, first answer to a setup that says `suspend`
    /// (resumed_at u64): it keeps its standby across a Suspend; non-zero,
    /// this session resumes from that committed epoch (no initial copy,
    /// no SyncPlan). Older backups never send it (additive).
    Resumable = 13,
    /// Backup → primary (no payload): the backup's agent restarts. A
    /// primary that wants the standby kept suspends the session (as for
    /// its own restart) and resumes it once the backup's next agent
    /// answers. Sent only in a session whose backup said Resumable.
    Restarting = 14,
    /// Backup → primary before Ready (no payload), answering a setup that
    /// says `devices_only_state`: its standby loads device state saved
    /// without QEMU's RAM blocks and configuration section (see
    /// `remus_vm::devstate`), so the primary may send that. Older
    /// backups never send it, and are sent QEMU's full migration stream
    /// (additive).
    DevicesOnlyState = 15,
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
            11 => Tune,
            12 => Suspend,
            13 => Resumable,
            14 => Restarting,
            15 => DevicesOnlyState,
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

/// A message type number as it appeared on the wire, printed by name when
/// this build knows it ("PageRun (17)") and as "unknown type 99" otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TypeCode(pub u16);

impl fmt::Display for TypeCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match MsgType::from_u16(self.0) {
            Some(t) => write!(f, "{t:?} ({})", self.0),
            None => write!(f, "unknown type {}", self.0),
        }
    }
}

/// Why a frame or its payload was rejected. Each variant says what failed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DecodeError {
    #[error(
        "bad frame magic {found:02x?} (expected \"RMS1\"): the peer is not a remus agent, or the stream lost sync"
    )]
    BadMagic { found: [u8; 4] },
    #[error("frame of {msg_type} announces a {len}-byte payload, above the {max}-byte limit")]
    TooLarge {
        msg_type: TypeCode,
        len: u32,
        max: u32,
    },
    #[error(
        "checksum mismatch in a frame of {msg_type}: header says {expected:#010x}, contents give {computed:#010x} (corrupted in transit or in memory)"
    )]
    Checksum {
        msg_type: TypeCode,
        expected: u32,
        computed: u32,
    },
    #[error("frame of {msg_type} sets critical flags {flags:#06x} that this version does not know")]
    UnknownCriticalFlags { msg_type: TypeCode, flags: u16 },
    #[error("message type 0 is reserved as invalid")]
    InvalidType,
    #[error(
        "unknown message type {0} (sent by a newer peer? additive types need a peer that knows them)"
    )]
    UnknownType(u16),
    #[error("malformed {msg_type:?} payload: {what}")]
    Malformed { msg_type: MsgType, what: String },
    #[error("expected {expected}, got a frame of {msg_type}")]
    NotExpected {
        msg_type: TypeCode,
        expected: &'static str,
    },
}

/// The parsed fixed header of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub msg_type: u16,
    pub flags: u16,
    pub payload_len: u32,
    pub crc: u32,
}

impl FrameHeader {
    /// Checks the magic and the length bound of a raw header. Type, flags and
    /// CRC are checked later, once the payload is there.
    pub fn parse(raw: &[u8; HEADER_LEN]) -> Result<FrameHeader, DecodeError> {
        let found = [raw[0], raw[1], raw[2], raw[3]];
        if found != MAGIC {
            return Err(DecodeError::BadMagic { found });
        }
        let header = FrameHeader {
            msg_type: u16::from_be_bytes([raw[4], raw[5]]),
            flags: u16::from_be_bytes([raw[6], raw[7]]),
            payload_len: u32::from_be_bytes([raw[8], raw[9], raw[10], raw[11]]),
            crc: u32::from_be_bytes([raw[12], raw[13], raw[14], raw[15]]),
        };
        if header.payload_len > MAX_PAYLOAD {
            return Err(DecodeError::TooLarge {
                msg_type: TypeCode(header.msg_type),
                len: header.payload_len,
                max: MAX_PAYLOAD,
            });
        }
        Ok(header)
    }

    pub(crate) fn frame_len(&self) -> usize {
        HEADER_LEN + self.payload_len as usize
    }
}

/// Appends one frame of type `msg_type` with `payload` to `out`.
///
/// # Panics
/// If `payload` is longer than [`MAX_PAYLOAD`]: that is a bug in the sender
/// (page runs are split by [`crate::PageRun`]'s helpers), not an input error.
pub fn encode_raw(msg_type: u16, payload: &[u8], out: &mut Vec<u8>) {
    let header = raw_header(msg_type, &[payload]);
    out.reserve(HEADER_LEN + payload.len());
    out.extend_from_slice(&header);
    out.extend_from_slice(payload);
}

/// Builds the header of a frame whose payload is the concatenation of
/// `parts`, so large payloads need not be copied into one buffer.
pub(crate) fn raw_header(msg_type: u16, parts: &[&[u8]]) -> [u8; HEADER_LEN] {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    assert!(
        len <= MAX_PAYLOAD as usize,
        "frame payload of {len} bytes exceeds MAX_PAYLOAD; the sender must split it"
    );
    let mut h = [0u8; HEADER_LEN];
    h[..4].copy_from_slice(&MAGIC);
    h[4..6].copy_from_slice(&msg_type.to_be_bytes());
    h[6..8].copy_from_slice(&0u16.to_be_bytes());
    h[8..12].copy_from_slice(&(len as u32).to_be_bytes());
    let mut crc = crc32c::crc32c(&h[..12]);
    for p in parts {
        crc = crc32c::crc32c_append(crc, p);
    }
    h[12..16].copy_from_slice(&crc.to_be_bytes());
    h
}

/// Failure of [`read_frame`] / [`write_frame`].
#[derive(Debug, Error)]
pub enum WireError {
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    #[error("the peer closed the connection")]
    Closed,
    #[error("the connection ended inside a frame ({got} of {expected} bytes received)")]
    Truncated { got: usize, expected: usize },
    #[error("{0}")]
    Decode(#[from] DecodeError),
}

impl WireError {
    /// True when a socket read or write timeout expired.
    pub fn is_timeout(&self) -> bool {
        matches!(self, WireError::Io(e)
            if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut))
    }
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
    pub(crate) fn new(msg_type: MsgType, buf: &'a [u8]) -> Self {
        Cursor { msg_type, buf }
    }

    pub(crate) fn bad(&self, what: String) -> DecodeError {
        DecodeError::Malformed {
            msg_type: self.msg_type,
            what,
        }
    }

    pub(crate) fn take(&mut self, n: usize, field: &str) -> Result<&'a [u8], DecodeError> {
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
    pub(crate) fn remaining(&self) -> usize {
        self.buf.len()
    }
    pub(crate) fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }
    pub(crate) fn finish(&self) -> Result<(), DecodeError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(self.bad(format!("{} trailing bytes", self.buf.len())))
        }
    }
}
