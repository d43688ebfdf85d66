//! # The remus replication protocol
//!
//! One TCP connection between two remus agents carries one VM's state: from
//! the *client* (the primary, or a migration source) to the *server* (the
//! backup, or a migration destination). This comment is the specification;
//! `docs/protocol.md` mirrors it for operators.
//!
//! ## Frames
//!
//! Every message travels in one frame: a 16-byte header, then the payload.
//! All integers are big-endian (network order).
//!
//! ```text
//!  0       4       6       8              12             16
//!  ┌───────┬───────┬───────┬──────────────┬──────────────┬───────────────┐
//!  │ magic │ type  │ flags │ payload len  │   CRC32C     │ payload ...   │
//!  │"RMS1" │  u16  │  u16  │     u32      │     u32      │ (len bytes)   │
//!  └───────┴───────┴───────┴──────────────┴──────────────┴───────────────┘
//! ```
//!
//! - `payload len` is at most 64 MiB ([`MAX_PAYLOAD`]); a receiver rejects a
//!   larger value before allocating anything.
//! - `CRC32C` (Castagnoli, hardware-accelerated) covers header bytes 0..12
//!   and the payload. It catches corruption, not forgery (see Security).
//! - `flags`: none are defined in version 1 and senders send 0. Bits 8..15
//!   are *critical*: a receiver rejects a frame with a critical bit it does
//!   not know. Bits 0..7 are advisory and may be ignored.
//! - Receivers first check that a whole frame is buffered, then verify magic,
//!   length, CRC, flags and type, and only then parse the payload; nothing is
//!   consumed from a buffer until a whole frame has verified ([`decode`]).
//!
//! ## Messages
//!
//! | type | name            | payload (big-endian)                                              |
//! |-----:|-----------------|-------------------------------------------------------------------|
//! |    0 | (invalid)       | never sent                                                        |
//! |    1 | Hello           | max_version u16, min_version u16, purpose u8 (1 protect, 2 migrate), client_nonce `[32]`, vm_name str, compat |
//! |    2 | HelloAck        | chosen_version u16, server_nonce `[32]`, server_proof `[32]`          |
//! |    3 | AuthProof       | client_proof `[32]`                                                 |
//! |    4 | Ready           | —                                                                 |
//! |    5 | Error           | code u16, message str                                             |
//! |    6 | Heartbeat       | seq u64, sent_at_us u64 (sender's clock, µs since the Unix epoch) |
//! |    7 | Ack             | epoch u64                                                         |
//! |    8 | VmConfig        | JSON (the agents' session setup)                                  |
//! |    9 | SyncPlan        | JSON (version 5: the backup's disk sync plan, before Ready)       |
//! |   16 | CheckpointBegin | epoch u64, kind u8 (1 initial sync, 2 round, 3 checkpoint)        |
//! |   17 | PageRun         | first_page u64, page_count u32 (≥ 1), page_count × 4096 bytes     |
//! |   18 | DeviceState     | bytes (a chunk of QEMU's device state; chunks concatenate)        |
//! |   19 | CheckpointEnd   | epoch u64, page_count u64, device_state_len u64, digest `[16]`      |
//! |   20 | SwitchOver      | epoch u64                                                         |
//! |   21 | Done            | —                                                                 |
//! |   22 | PageDelta       | first_page u64, page_count u32 (1..=256), xor bitmap `[⌈count/8⌉]`, LZ4 block |
//! |   23 | DeviceStateDelta | offset u64, len u32 (≥ 1), LZ4 block                             |
//! |   32 | DiskWrite       | epoch u64, disk u16, offset u64, flags u8 (bit 0 FUA), data (≥ 1 byte) |
//! |   33 | DiskZero        | epoch u64, disk u16, offset u64, len u64 (≥ 1), flags u8 (bit 0 FUA, bit 1 may deallocate) |
//! |   34 | DiskFlush       | epoch u64, disk u16                                               |
//! |   35 | DiskSeal        | epoch u64, records u64, bytes u64, digest `[16]`                    |
//! |   36 | DiskDigests     | disk u16, chunk_size u32, first_chunk u64, n × digest `[16]` (n ≥ 1) |
//! |   37 | DiskSyncRuns    | disk u16, chunk_size u32, n × (first u64, count u64 ≥ 1), ascending, disjoint |
//!
//! Types 32–36 exist from version 2 on (disk replication, protocol D;
//! `docs/protocol.md` describes the flow: digests from the backup, the
//! epoch-0 sync, records tagged with their epoch, a [`DiskSeal`] before
//! each checkpoint, applied by the backup only at that commit).
//!
//! Types 22–23 exist from version 3 on (checkpoint compression, [`delta`]):
//! a PageDelta stands for the PageRun of the same pages, a
//! DeviceStateDelta for the DeviceState chunk at `offset`; the receiver
//! decodes pages against its last committed copy, and the device state
//! against the one committed earlier in the same session (none before the
//! session's first checkpoint: a session that resumes a suspended one
//! starts afresh there, as the new sender does); the checkpoint digest
//! covers the decoded bytes. The XOR bitmap marks the pages XOR'd with the
//! receiver's copy before compression (bit `i % 8` of byte `i / 8`); the
//! LZ4 block (raw block format, no frame) decompresses to exactly
//! `page_count` × 4096 or `len` bytes. A sender sends both only to a
//! version-3 peer and never sends one page twice in a checkpoint as XOR.
//!
//! `str` is a u16 byte length then UTF-8. `compat` ([`VmCompat`]) is
//! memory_mib u64, vcpus u32, machine str, cpu_model str, a u16 count of
//! disks each (target str, size_bytes u64), a u16 count of MACs each `[6]`.
//! Payloads have exactly this length: trailing bytes are an error.
//! Type ranges: 1–15 session control, 16–31 checkpoint stream, 32–47 disk.
//!
//! ## Handshake
//!
//! ```text
//!  client (primary / source)                         server (backup / destination)
//!    │── NoiseHandshake(-> psk, e)     48 bytes ────────►│ only this type, ≤ 4 KiB, is read
//!    │◄──────────── NoiseHandshake(<- e, ee)  48 bytes ──│ before it (checked from the header)
//!    │═══════════ everything below: AES-256-GCM records ═│ (see [`channel`])
//!    │── Hello(versions, purpose, vm, compat, Nc) ──────►│ pick version v
//!    │◄──────────── HelloAck(v, Ns, Ps) ─────────────────│ Ps = HMAC(K, "server" ‖ Hello ‖ v ‖ Ns)
//!    │ verify Ps                                         │
//!    │── AuthProof(Pc) ─────────────────────────────────►│ Pc = HMAC(K, "client" ‖ Hello ‖ v ‖ Ns)
//!    │                                                   │ verify Pc, look up vm, check compat
//!    │◄──────────── Ready  (or Error(code, why)) ────────│
//! ```
//!
//! Any failure is answered with an Error frame (when the peer can still
//! read one) and the connection is closed. A compatibility mismatch lists
//! every differing field, one per line, on both sides. The server sends
//! nothing about its VMs before `Pc` verifies and treats any other message
//! in its place — a checkpoint in particular — as a protocol error.
//!
//! ## Protect: the checkpoint stream
//!
//! ```text
//!  primary                                               backup
//!    │── CheckpointBegin(e, InitialSync) ─────────────────►│
//!    │── PageRun* ────────────────────────────────────────►│ (all non-zero pages)
//!    │── CheckpointEnd(e, pages, 0, digest) ──────────────►│ verify, commit
//!    │◄─────────────────────────────────────── Ack(e) ─────│
//!    │── CheckpointBegin(e+1, Checkpoint) ────────────────►│  every interval:
//!    │── PageRun* ── DeviceState+ ────────────────────────►│  dirty pages,
//!    │── CheckpointEnd(e+1, pages, len, digest) ──────────►│  then device state
//!    │◄─────────────────────────────────────── Ack(e+1) ───│ (primary releases
//!    │        ... Heartbeat both ways when idle ...        │  e+1's network output)
//!    │── Done ────────────────────────────────────────────►│ (orderly stop: no failover)
//! ```
//!
//! The backup fails over when neither a checkpoint message nor a Heartbeat
//! has arrived within its timeout, and never after Done. It acks each epoch
//! once committed; the primary releases an epoch's buffered output on that
//! Ack. A Checkpoint carries at least one DeviceState frame; InitialSync and
//! Round carry none. The digest is XXH3-128 over (page number u64 ‖ page)
//! for every page in stream order, then the device state bytes
//! ([`CheckpointDigest`]); it does not depend on how pages were grouped into
//! runs. XXH3-128 rather than SHA-256: it detects lost, repeated or
//! misplaced frames as well and is an order of magnitude faster (the backup
//! verifies every byte on the hot path); with no per-frame MAC a
//! cryptographic digest would add no authenticity.
//!
//! ## Migrate
//!
//! ```text
//!  source                                                destination
//!    │── Begin(1, InitialSync) … End(1) ──────────────────►│── Ack(1)
//!    │── Begin(n, Round) PageRun* End(n) ─────────────────►│── Ack(n)   (pre-copy rounds)
//!    │── Begin(m, Checkpoint) PageRun* DeviceState+ End(m)►│── Ack(m)   (source paused)
//!    │── SwitchOver(m) ───────────────────────────────────►│ resume the VM from m
//!    │── Done ────────────────────────────────────────────►│
//! ```
//!
//! ## Receiver state machine
//!
//! [`CheckpointAssembler`] implements it; its module documentation has the
//! diagram. A checkpoint is yielded only at a CheckpointEnd whose epoch,
//! page count, device-state length and digest all match what arrived since
//! its Begin. Anything else discards the partial epoch: End without Begin,
//! Begin while open, epoch not above the last committed one, pages beyond
//! guest memory, device state in the wrong place or missing. A partial or
//! corrupt checkpoint is never applied; a lost connection drops it.
//!
//! ## Versioning
//!
//! [`PROTOCOL_VERSION`] is bumped only for breaking changes: a changed
//! payload layout, a changed meaning, a new critical flag. Additive changes
//! do not bump it: a new message type gets a new number (numbers are never
//! reused), and a receiver that meets a type it does not know reports
//! "unknown message type N" by name and ends the session cleanly — so a
//! sender uses a new type only when the peer's version or the purpose
//! implies the peer knows it. Each build accepts the current and the
//! previous version ([`supported_versions`]); the server picks the highest
//! version both sides speak.
//!
//! ## Security
//!
//! Both agents hold the same secret key file (32 to 4096 bytes, readable by
//! its owner only: `head -c 32 /dev/urandom > /etc/remus/key; chmod 600
//! /etc/remus/key`, then copy it to the peer). From version 6 the session
//! runs in an encrypted, authenticated channel ([`channel`]): a Noise
//! handshake keyed by the key file, then AES-256-GCM records whose nonces
//! are their numbers, so a flipped, injected, replayed, dropped or
//! reordered byte ends the session and is never delivered. Before the
//! handshake completes, the server reads only a bounded frame of the
//! handshake's own type, with one deadline for the whole handshake
//! ([`PREAUTH_MAX_PAYLOAD`], [`HANDSHAKE_TIMEOUT`]). Inside the channel
//! the HMAC challenge-response of version 5 still authenticates both sides
//! and binds the version, the VM name and its shape. A protocol-5 peer is
//! served in the clear only where the operator allows it
//! ([`ServerOptions::allow_unencrypted`]). The CRC of each frame stays, as
//! a check on our own code.

mod auth;
pub mod channel;
mod checkpoint;
mod compat;
pub mod delta;
mod frame;
mod handshake;
mod message;
pub mod setup;
mod wire;

pub use auth::{Key, KeyError};
pub use channel::Channel;
pub use checkpoint::{
    Accepted, CheckpointAssembler, CheckpointDigest, CheckpointError, CheckpointWriter,
    CompleteCheckpoint, MAX_DEVICE_STATE,
};
pub use compat::{DiskCompat, VmCompat};
pub use frame::{
    CRITICAL_FLAGS, DecodeError, Decoded, FrameHeader, HEADER_LEN, MAGIC, MAX_PAYLOAD, TypeCode,
    WireError, decode, encode_raw, read_frame, read_frame_bounded, write_frame,
};
pub use handshake::{
    HANDSHAKE_MAX_PAYLOAD, HANDSHAKE_TIMEOUT, HandshakeError, HandshakeFailure, HelloParams,
    PREAUTH_MAX_PAYLOAD, Refusal, ServerOptions, Session, client_handshake, client_handshake_on,
    client_handshake_unencrypted, encrypted_versions, server_handshake, server_handshake_on,
    supported_versions, unencrypted_versions,
};
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub use handshake::{fuzzing_client_channel, fuzzing_client_proof};
pub use message::{
    CheckpointEnd, CheckpointKind, DIGEST_LEN, DeviceStateDelta, DiskDigests, DiskLogDigest,
    DiskOp, DiskRecord, DiskSeal, DiskSyncRuns, Epoch, ErrorCode, Hello, HelloAck, MAX_DELTA_PAGES,
    MAX_PAGES_PER_RUN, MAX_SUSPEND_GRACE_MS, MAX_TUNE_TIMEOUT_MS, MIN_SUSPEND_GRACE_MS,
    MIN_TUNE_TIMEOUT_MS, Message, MsgType, NONCE_LEN, PAGE_SIZE, PROOF_LEN, PageDelta, PageRun,
    Purpose, printable, write_device_state, write_page_run,
};

/// The protocol version this build speaks by preference.
pub const PROTOCOL_VERSION: u16 = 6;
/// The first version with disk replication (messages 32–36).
pub const DISK_PROTOCOL_VERSION: u16 = 2;
/// The first version with checkpoint compression (messages 22–23).
pub const COMPRESSION_PROTOCOL_VERSION: u16 = 3;
/// The first version whose backups honour the arbiter named in the
/// session setup (they resume only holding the VM's etcd key).
pub const ARBITER_PROTOCOL_VERSION: u16 = 4;
/// The first version with generations and change-based resynchronisation
/// (messages 9 and 37): a v5 backup answers the setup with a SyncPlan.
pub const RESYNC_PROTOCOL_VERSION: u16 = 5;
/// The first version whose sessions run in the encrypted channel
/// ([`channel`]): every byte after the handshake authenticated.
pub const ENCRYPTED_PROTOCOL_VERSION: u16 = 6;
/// The oldest version this build still accepts: the previous one, once there
/// is one (version 0 does not exist).
pub const MIN_PROTOCOL_VERSION: u16 = if PROTOCOL_VERSION > 1 {
    PROTOCOL_VERSION - 1
} else {
    1
};
