//! NBD wire format: protocol constants plus encoders and decoders for the
//! fixed newstyle handshake, option haggling and simple-reply transmission.
//!
//! Every decoder checks the buffer length before reading any field and
//! returns a [`ProtoError`] for anything malformed; none of them panics,
//! whatever bytes it is given. All integers are big-endian on the wire.
//! The layouts follow `doc/proto.md` of the NBD reference implementation.

use crate::error::ProtoError;

// ---------------------------------------------------------------------------
// Magic numbers
// ---------------------------------------------------------------------------

/// `NBDMAGIC`, first 8 bytes the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`, sent by the server after `NBDMAGIC` and by the client before
/// every option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every fixed-newstyle option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

// ---------------------------------------------------------------------------
// Flags
// ---------------------------------------------------------------------------

/// Handshake flag: server supports fixed newstyle.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: server can omit the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Handshake flags this server sends.
pub const SERVER_HANDSHAKE_FLAGS: u16 = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES;

/// Client flag: client speaks fixed newstyle.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: omit the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;
/// Every client flag this server understands.
pub const KNOWN_CLIENT_FLAGS: u32 = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES;

/// Transmission flag: MUST always be set.
pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
/// Transmission flag: export is read-only.
pub const FLAG_READ_ONLY: u16 = 1 << 1;
/// Transmission flag: `NBD_CMD_FLUSH` supported.
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
/// Transmission flag: `NBD_CMD_FLAG_FUA` supported.
pub const FLAG_SEND_FUA: u16 = 1 << 3;
/// Transmission flag: rotational medium hint.
pub const FLAG_ROTATIONAL: u16 = 1 << 4;
/// Transmission flag: `NBD_CMD_TRIM` supported.
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
/// Transmission flag: `NBD_CMD_WRITE_ZEROES` (and `NO_HOLE`) supported.
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// Transmission flag: `NBD_CMD_FLAG_DF` supported (structured replies only).
pub const FLAG_SEND_DF: u16 = 1 << 7;
/// Transmission flag: flush/FUA effects are visible across connections.
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
/// Transmission flag: `NBD_CMD_CACHE` understood.
pub const FLAG_SEND_CACHE: u16 = 1 << 10;
/// Transmission flag: `NBD_CMD_FLAG_FAST_ZERO` supported.
pub const FLAG_SEND_FAST_ZERO: u16 = 1 << 11;

/// Command flag: force unit access.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// Command flag (`WRITE_ZEROES` only): do not punch a hole.
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// Command flag (`READ`, structured replies only): don't fragment.
pub const CMD_FLAG_DF: u16 = 1 << 2;
/// Command flag (`BLOCK_STATUS` only): one extent only.
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
/// Command flag (`WRITE_ZEROES` only): fail unless zeroing is fast.
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

// ---------------------------------------------------------------------------
// Options, option replies, info types
// ---------------------------------------------------------------------------

pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_PEEK_EXPORT: u32 = 4;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;
pub const OPT_EXTENDED_HEADERS: u32 = 11;

pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_ERR_BIT: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_ERR_BIT | 1;
pub const REP_ERR_POLICY: u32 = REP_ERR_BIT | 2;
pub const REP_ERR_INVALID: u32 = REP_ERR_BIT | 3;
pub const REP_ERR_PLATFORM: u32 = REP_ERR_BIT | 4;
pub const REP_ERR_TLS_REQD: u32 = REP_ERR_BIT | 5;
pub const REP_ERR_UNKNOWN: u32 = REP_ERR_BIT | 6;
pub const REP_ERR_SHUTDOWN: u32 = REP_ERR_BIT | 7;
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_ERR_BIT | 8;
pub const REP_ERR_TOO_BIG: u32 = REP_ERR_BIT | 9;

pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// ---------------------------------------------------------------------------
// Commands and errors
// ---------------------------------------------------------------------------

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

pub const NBD_EPERM: u32 = 1;
pub const NBD_EIO: u32 = 5;
pub const NBD_ENOMEM: u32 = 12;
pub const NBD_EINVAL: u32 = 22;
pub const NBD_ENOSPC: u32 = 28;
pub const NBD_EOVERFLOW: u32 = 75;
pub const NBD_ENOTSUP: u32 = 95;
pub const NBD_ESHUTDOWN: u32 = 108;

// ---------------------------------------------------------------------------
// Limits
// ---------------------------------------------------------------------------

/// Longest string (export name, message) the spec allows.
pub const MAX_STRING_LEN: usize = 4096;
/// Longest option payload this server accepts; longer ones end the session
/// without being read (no option we support needs more than ~4 KiB).
pub const MAX_OPTION_LEN: u32 = 64 * 1024;
/// Advertised minimum block size (the spec default).
pub const MIN_BLOCK_SIZE: u32 = 1;
/// Advertised preferred block size (the spec default).
pub const PREFERRED_BLOCK_SIZE: u32 = 4096;
/// Advertised and enforced maximum payload for READ and WRITE (spec default).
pub const MAX_PAYLOAD: u32 = 32 * 1024 * 1024;
/// Zero padding after the `NBD_OPT_EXPORT_NAME` reply unless `NO_ZEROES`.
pub const EXPORT_NAME_PADDING: usize = 124;

// ---------------------------------------------------------------------------
// Small big-endian readers; callers have already checked lengths.
// ---------------------------------------------------------------------------

fn need(buf: &[u8], n: usize) -> Result<(), ProtoError> {
    if buf.len() < n {
        Err(ProtoError::Short {
            need: n,
            got: buf.len(),
        })
    } else {
        Ok(())
    }
}

fn be16(buf: &[u8], at: usize) -> Result<u16, ProtoError> {
    let b = buf.get(at..at + 2).ok_or(ProtoError::Short {
        need: at + 2,
        got: buf.len(),
    })?;
    Ok(u16::from_be_bytes([b[0], b[1]]))
}

fn be32(buf: &[u8], at: usize) -> Result<u32, ProtoError> {
    let b = buf.get(at..at + 4).ok_or(ProtoError::Short {
        need: at + 4,
        got: buf.len(),
    })?;
    Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

fn be64(buf: &[u8], at: usize) -> Result<u64, ProtoError> {
    let b = buf.get(at..at + 8).ok_or(ProtoError::Short {
        need: at + 8,
        got: buf.len(),
    })?;
    let mut a = [0u8; 8];
    a.copy_from_slice(b);
    Ok(u64::from_be_bytes(a))
}

/// Checks `bytes` against the NBD string rules (valid UTF-8, no NUL, at most
/// [`MAX_STRING_LEN`] bytes) and returns it as `&str`.
pub fn validate_string(bytes: &[u8]) -> Result<&str, ProtoError> {
    if bytes.len() > MAX_STRING_LEN {
        return Err(ProtoError::BadString("longer than 4096 bytes"));
    }
    if bytes.contains(&0) {
        return Err(ProtoError::BadString("contains NUL"));
    }
    std::str::from_utf8(bytes).map_err(|_| ProtoError::BadString("not UTF-8"))
}

// ---------------------------------------------------------------------------
// Handshake
// ---------------------------------------------------------------------------

/// The server's opening message: `NBDMAGIC`, `IHAVEOPT`, handshake flags.
pub fn encode_greeting(handshake_flags: u16) -> [u8; 18] {
    let mut out = [0u8; 18];
    out[0..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    out[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    out[16..18].copy_from_slice(&handshake_flags.to_be_bytes());
    out
}

/// Header of a client option: `IHAVEOPT`, option number, payload length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub length: u32,
}

impl OptionHeader {
    pub const LEN: usize = 16;

    /// Decodes exactly [`Self::LEN`] bytes (more is an error).
    pub fn decode(buf: &[u8]) -> Result<Self, ProtoError> {
        need(buf, Self::LEN)?;
        if buf.len() > Self::LEN {
            return Err(ProtoError::Trailing {
                extra: buf.len() - Self::LEN,
            });
        }
        let magic = be64(buf, 0)?;
        if magic != IHAVEOPT {
            return Err(ProtoError::BadMagic {
                expected: IHAVEOPT,
                got: magic,
            });
        }
        Ok(Self {
            option: be32(buf, 8)?,
            length: be32(buf, 12)?,
        })
    }

    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut out = [0u8; Self::LEN];
        out[0..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
        out[8..12].copy_from_slice(&self.option.to_be_bytes());
        out[12..16].copy_from_slice(&self.length.to_be_bytes());
        out
    }
}

/// Payload of `NBD_OPT_INFO` / `NBD_OPT_GO`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfoRequest {
    pub name: String,
    pub info_requests: Vec<u16>,
}

impl ExportInfoRequest {
    /// Decodes the whole option payload; the lengths inside must add up to
    /// exactly `data.len()`.
    pub fn decode(data: &[u8]) -> Result<Self, ProtoError> {
        let name_len = be32(data, 0)?;
        // name + 2-byte count must fit after the 4-byte length.
        let rest = data.len() - 4;
        let name_len_usize = usize::try_from(name_len).unwrap_or(usize::MAX);
        if name_len_usize > rest.saturating_sub(2) || rest < 2 {
            return Err(ProtoError::BadLength {
                len: u64::from(name_len),
                available: rest.saturating_sub(2),
            });
        }
        let name_end = 4 + name_len_usize;
        let name = validate_string(&data[4..name_end])?.to_owned();
        let count = usize::from(be16(data, name_end)?);
        let list = &data[name_end + 2..];
        let want = count * 2;
        if list.len() < want {
            return Err(ProtoError::BadLength {
                len: want as u64,
                available: list.len(),
            });
        }
        if list.len() > want {
            return Err(ProtoError::Trailing {
                extra: list.len() - want,
            });
        }
        let info_requests = list
            .chunks_exact(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]]))
            .collect();
        Ok(Self {
            name,
            info_requests,
        })
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(6 + self.name.len() + 2 * self.info_requests.len());
        out.extend_from_slice(&(self.name.len() as u32).to_be_bytes());
        out.extend_from_slice(self.name.as_bytes());
        out.extend_from_slice(&(self.info_requests.len() as u16).to_be_bytes());
        for r in &self.info_requests {
            out.extend_from_slice(&r.to_be_bytes());
        }
        out
    }
}

/// A decoded client option (header option number + payload).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientOption {
    ExportName(String),
    Abort,
    List,
    Info(ExportInfoRequest),
    Go(ExportInfoRequest),
    /// Any option this server does not implement (answered `ERR_UNSUP`).
    Unsupported(u32),
}

/// Decodes an option payload. Errors mean "syntactically invalid"
/// (answered with `NBD_REP_ERR_INVALID`, or a hard disconnect for
/// `NBD_OPT_EXPORT_NAME`, which cannot carry an error).
pub fn decode_option(option: u32, data: &[u8]) -> Result<ClientOption, ProtoError> {
    match option {
        OPT_EXPORT_NAME => Ok(ClientOption::ExportName(validate_string(data)?.to_owned())),
        // The spec says a server SHOULD ignore data sent with ABORT.
        OPT_ABORT => Ok(ClientOption::Abort),
        OPT_LIST => {
            if data.is_empty() {
                Ok(ClientOption::List)
            } else {
                Err(ProtoError::Trailing { extra: data.len() })
            }
        }
        OPT_INFO => Ok(ClientOption::Info(ExportInfoRequest::decode(data)?)),
        OPT_GO => Ok(ClientOption::Go(ExportInfoRequest::decode(data)?)),
        other => Ok(ClientOption::Unsupported(other)),
    }
}

/// Encodes one fixed-newstyle option reply.
pub fn encode_option_reply(option: u32, reply_type: u32, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(20 + data.len());
    out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply_type.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
    out
}

/// Header of an option reply, for clients and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyHeader {
    pub option: u32,
    pub reply_type: u32,
    pub length: u32,
}

impl OptionReplyHeader {
    pub const LEN: usize = 20;

    pub fn decode(buf: &[u8]) -> Result<Self, ProtoError> {
        need(buf, Self::LEN)?;
        let magic = be64(buf, 0)?;
        if magic != OPTION_REPLY_MAGIC {
            return Err(ProtoError::BadMagic {
                expected: OPTION_REPLY_MAGIC,
                got: magic,
            });
        }
        Ok(Self {
            option: be32(buf, 8)?,
            reply_type: be32(buf, 12)?,
            length: be32(buf, 16)?,
        })
    }
}

/// `NBD_REP_SERVER` payload describing one export.
pub fn encode_rep_server(name: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + name.len());
    out.extend_from_slice(&(name.len() as u32).to_be_bytes());
    out.extend_from_slice(name.as_bytes());
    out
}

/// `NBD_REP_INFO` payload of type `NBD_INFO_EXPORT`.
pub fn encode_info_export(size: u64, transmission_flags: u16) -> [u8; 12] {
    let mut out = [0u8; 12];
    out[0..2].copy_from_slice(&INFO_EXPORT.to_be_bytes());
    out[2..10].copy_from_slice(&size.to_be_bytes());
    out[10..12].copy_from_slice(&transmission_flags.to_be_bytes());
    out
}

/// `NBD_REP_INFO` payload of type `NBD_INFO_BLOCK_SIZE`.
pub fn encode_info_block_size(minimum: u32, preferred: u32, maximum: u32) -> [u8; 14] {
    let mut out = [0u8; 14];
    out[0..2].copy_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    out[2..6].copy_from_slice(&minimum.to_be_bytes());
    out[6..10].copy_from_slice(&preferred.to_be_bytes());
    out[10..14].copy_from_slice(&maximum.to_be_bytes());
    out
}

/// `NBD_REP_INFO` payload of type `NBD_INFO_NAME`.
pub fn encode_info_name(name: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(2 + name.len());
    out.extend_from_slice(&INFO_NAME.to_be_bytes());
    out.extend_from_slice(name.as_bytes());
    out
}

/// Reply to `NBD_OPT_EXPORT_NAME`: size, transmission flags and, unless the
/// client negotiated `NO_ZEROES`, 124 zero bytes.
pub fn encode_export_name_reply(size: u64, transmission_flags: u16, no_zeroes: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(10 + EXPORT_NAME_PADDING);
    out.extend_from_slice(&size.to_be_bytes());
    out.extend_from_slice(&transmission_flags.to_be_bytes());
    if !no_zeroes {
        out.resize(out.len() + EXPORT_NAME_PADDING, 0);
    }
    out
}

// ---------------------------------------------------------------------------
// Transmission
// ---------------------------------------------------------------------------

/// Known command types, plus the raw value of anything else.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Read,
    Write,
    Disc,
    Flush,
    Trim,
    WriteZeroes,
    /// Any other type (including `CACHE` and `BLOCK_STATUS`, which this
    /// server does not implement).
    Other(u16),
}

impl Command {
    pub fn from_wire(kind: u16) -> Self {
        match kind {
            CMD_READ => Self::Read,
            CMD_WRITE => Self::Write,
            CMD_DISC => Self::Disc,
            CMD_FLUSH => Self::Flush,
            CMD_TRIM => Self::Trim,
            CMD_WRITE_ZEROES => Self::WriteZeroes,
            other => Self::Other(other),
        }
    }

    pub fn to_wire(self) -> u16 {
        match self {
            Self::Read => CMD_READ,
            Self::Write => CMD_WRITE,
            Self::Disc => CMD_DISC,
            Self::Flush => CMD_FLUSH,
            Self::Trim => CMD_TRIM,
            Self::WriteZeroes => CMD_WRITE_ZEROES,
            Self::Other(k) => k,
        }
    }
}

/// A transmission-phase request header (the WRITE payload follows it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub command: Command,
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

impl Request {
    pub const LEN: usize = 28;

    /// Decodes exactly [`Self::LEN`] bytes (more is an error).
    pub fn decode(buf: &[u8]) -> Result<Self, ProtoError> {
        need(buf, Self::LEN)?;
        if buf.len() > Self::LEN {
            return Err(ProtoError::Trailing {
                extra: buf.len() - Self::LEN,
            });
        }
        let magic = be32(buf, 0)?;
        if magic != REQUEST_MAGIC {
            return Err(ProtoError::BadMagic {
                expected: u64::from(REQUEST_MAGIC),
                got: u64::from(magic),
            });
        }
        Ok(Self {
            flags: be16(buf, 4)?,
            command: Command::from_wire(be16(buf, 6)?),
            cookie: be64(buf, 8)?,
            offset: be64(buf, 16)?,
            length: be32(buf, 24)?,
        })
    }

    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut out = [0u8; Self::LEN];
        out[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        out[4..6].copy_from_slice(&self.flags.to_be_bytes());
        out[6..8].copy_from_slice(&self.command.to_wire().to_be_bytes());
        out[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        out[16..24].copy_from_slice(&self.offset.to_be_bytes());
        out[24..28].copy_from_slice(&self.length.to_be_bytes());
        out
    }
}

/// A simple reply header (READ data follows it on success).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimpleReply {
    pub error: u32,
    pub cookie: u64,
}

impl SimpleReply {
    pub const LEN: usize = 16;

    pub fn decode(buf: &[u8]) -> Result<Self, ProtoError> {
        need(buf, Self::LEN)?;
        if buf.len() > Self::LEN {
            return Err(ProtoError::Trailing {
                extra: buf.len() - Self::LEN,
            });
        }
        let magic = be32(buf, 0)?;
        if magic != SIMPLE_REPLY_MAGIC {
            return Err(ProtoError::BadMagic {
                expected: u64::from(SIMPLE_REPLY_MAGIC),
                got: u64::from(magic),
            });
        }
        Ok(Self {
            error: be32(buf, 4)?,
            cookie: be64(buf, 8)?,
        })
    }

    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut out = [0u8; Self::LEN];
        out[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
        out[4..8].copy_from_slice(&self.error.to_be_bytes());
        out[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        out
    }
}
