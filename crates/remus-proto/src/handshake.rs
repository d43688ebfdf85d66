//! The handshake: the encrypted channel, version negotiation, mutual
//! authentication, compatibility.
//!
//! The client is the side that sends VM state (primary, migration source); the
//! server receives it (backup, destination). See the crate documentation for
//! the sequence diagram. Until the client's AuthProof has verified, the server
//! sends nothing about its VMs and accepts no message that carries VM state:
//! anything but the expected handshake message ends the session.
//!
//! Work before authentication is bounded: the server reads one frame header,
//! accepts only the handshake's own type from the header alone and at most
//! [`PREAUTH_MAX_PAYLOAD`] bytes of it, and the whole handshake has one
//! deadline ([`HANDSHAKE_TIMEOUT`]), not a timeout per read.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::ops::RangeInclusive;
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::auth::{self, Key};
use crate::channel::{self, Channel};
use crate::compat::VmCompat;
use crate::frame::{DecodeError, WireError, read_frame_bounded};
use crate::message::{ErrorCode, Hello, HelloAck, Message, MsgType, Purpose};
use crate::{ENCRYPTED_PROTOCOL_VERSION, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION};

/// How long a whole handshake may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest frame payload a server reads before the client has proven it
/// holds the key: a Noise message, or a protocol-5 Hello when unencrypted
/// peers are allowed.
pub const PREAUTH_MAX_PAYLOAD: u32 = 4096;
/// Largest handshake message inside the channel (Hello with its VM shape,
/// an Error's text).
pub const HANDSHAKE_MAX_PAYLOAD: u32 = 64 * 1024;

/// The versions this build speaks: the current and the previous one.
pub fn supported_versions() -> RangeInclusive<u16> {
    MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION
}

/// The versions spoken inside the encrypted channel (protocol 6 on).
pub fn encrypted_versions() -> RangeInclusive<u16> {
    ENCRYPTED_PROTOCOL_VERSION..=PROTOCOL_VERSION
}

/// The versions spoken in the clear: only the one before encryption, and
/// only when the operator allows it for a rolling upgrade.
pub fn unencrypted_versions() -> RangeInclusive<u16> {
    MIN_PROTOCOL_VERSION..=(ENCRYPTED_PROTOCOL_VERSION - 1).max(MIN_PROTOCOL_VERSION)
}

/// What went wrong, without the where (see [`HandshakeError`]).
#[derive(Debug, Error)]
pub enum HandshakeFailure {
    #[error("I/O error: {0}")]
    Io(io::Error),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("the peer closed the connection")]
    Closed,
    #[error("{0}")]
    Wire(WireError),
    #[error("expected {expected}, got {got:?}")]
    Unexpected {
        expected: &'static str,
        got: MsgType,
    },
    #[error(
        "no common protocol version: we speak {}..={}, the peer {}..={}",
        ours.start(), ours.end(), theirs.start(), theirs.end()
    )]
    VersionMismatch {
        ours: RangeInclusive<u16>,
        theirs: RangeInclusive<u16>,
    },
    #[error("the peer chose protocol version {chosen}, which we did not offer ({}..={})", offered.start(), offered.end())]
    BadVersionChoice {
        chosen: u16,
        offered: RangeInclusive<u16>,
    },
    #[error(
        "the peer could not prove it holds our replication key (the two key files differ, or this is not our peer)"
    )]
    PeerNotAuthenticated,
    #[error("the peer refused: {code}: {message}")]
    Refused { code: ErrorCode, message: String },
    #[error("VM configurations are incompatible: {}", .0.join("; "))]
    Incompatible(Vec<String>),
    #[error("the VM is not available here: {0}")]
    UnknownVm(String),
    #[error(
        "the peer speaks protocol {0}, without encryption; this agent requires the encrypted link of protocol {ENCRYPTED_PROTOCOL_VERSION}: upgrade the peer, or allow unencrypted peers on this agent during a rolling upgrade (remusd --allow-unencrypted-peers)"
    )]
    Unencrypted(u16),
    #[error(
        "the peer closed the connection during the encrypted handshake: a remus agent older than protocol {ENCRYPTED_PROTOCOL_VERSION} does that (upgrade it, or during a rolling upgrade protect with --unencrypted to a backup started with --allow-unencrypted-peers), as does an agent that refuses connections (too many unauthenticated ones at once; see its log)"
    )]
    ClosedDuringNoise,
}

/// A handshake failure: which peer, which step, what.
#[derive(Debug, Error)]
#[error("replication handshake with {peer}: {op}: {failure}")]
pub struct HandshakeError {
    pub peer: String,
    pub op: &'static str,
    pub failure: HandshakeFailure,
}

/// An established, authenticated session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    /// The protocol version both sides use from now on.
    pub version: u16,
    pub purpose: Purpose,
    pub vm_name: String,
    /// The peer's address, for messages.
    pub peer: String,
    /// Whether the channel is encrypted (always, but with a protocol-5
    /// peer allowed for a rolling upgrade).
    pub encrypted: bool,
}

/// What the client announces.
#[derive(Debug, Clone)]
pub struct HelloParams {
    pub purpose: Purpose,
    pub vm_name: String,
    pub compat: VmCompat,
    /// Versions offered inside the encrypted channel;
    /// [`encrypted_versions`] unless testing.
    pub versions: RangeInclusive<u16>,
    /// How long the whole handshake may take.
    pub timeout: Duration,
}

impl HelloParams {
    pub fn new(purpose: Purpose, vm_name: impl Into<String>, compat: VmCompat) -> Self {
        HelloParams {
            purpose,
            vm_name: vm_name.into(),
            compat,
            versions: encrypted_versions(),
            timeout: HANDSHAKE_TIMEOUT,
        }
    }
}

/// Server-side settings.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Versions accepted inside the encrypted channel;
    /// [`encrypted_versions`] unless testing.
    pub versions: RangeInclusive<u16>,
    /// How long the whole handshake may take.
    pub timeout: Duration,
    /// Accept a protocol-5 client in the clear (a rolling upgrade).
    pub allow_unencrypted: bool,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            versions: encrypted_versions(),
            timeout: HANDSHAKE_TIMEOUT,
            allow_unencrypted: false,
        }
    }
}

struct Conn<'a, S> {
    stream: &'a mut S,
    peer: String,
    timeout: Duration,
}

impl<S: Read + Write> Conn<'_, S> {
    fn fail(&self, op: &'static str, failure: HandshakeFailure) -> HandshakeError {
        HandshakeError {
            peer: self.peer.clone(),
            op,
            failure,
        }
    }

    fn wire(&self, op: &'static str, e: WireError) -> HandshakeError {
        let failure = if e.is_timeout() {
            HandshakeFailure::Timeout(self.timeout)
        } else {
            match e {
                WireError::Io(e) => HandshakeFailure::Io(e),
                WireError::Closed => HandshakeFailure::Closed,
                e => HandshakeFailure::Wire(e),
            }
        };
        self.fail(op, failure)
    }

    fn send(&mut self, op: &'static str, msg: &Message) -> Result<(), HandshakeError> {
        msg.write_to(self.stream)
            .and_then(|()| self.stream.flush().map_err(WireError::Io))
            .map_err(|e| self.wire(op, e))
    }

    /// Writes our next Noise handshake message and sends it.
    fn send_noise(
        &mut self,
        op: &'static str,
        noise: &mut snow::HandshakeState,
    ) -> Result<(), HandshakeError> {
        let mut out = [0u8; channel::MAX_NOISE_MESSAGE];
        let n = noise
            .write_message(&[], &mut out)
            .map_err(|e| self.fail(op, noise_failure(e)))?;
        self.send(
            op,
            &Message::NoiseHandshake {
                data: out[..n].to_vec(),
            },
        )
    }

    fn recv(&mut self, op: &'static str) -> Result<Message, HandshakeError> {
        read_frame_bounded(
            self.stream,
            HANDSHAKE_MAX_PAYLOAD,
            "a handshake message",
            |t| {
                matches!(
                    MsgType::from_u16(t),
                    Some(
                        MsgType::Hello
                            | MsgType::HelloAck
                            | MsgType::AuthProof
                            | MsgType::Ready
                            | MsgType::Error
                    )
                )
            },
        )
        .map_err(|e| self.wire(op, e))
    }

    /// Best effort: tell the peer why we stop; the local error is what counts.
    fn send_error(&mut self, code: ErrorCode, message: impl Into<String>) {
        let _ = self.send(
            "sending Error",
            &Message::Error {
                code,
                message: message.into(),
            },
        );
    }

    /// Turns an unexpected message into a local error, telling the peer.
    fn unexpected(
        &mut self,
        op: &'static str,
        expected: &'static str,
        got: Message,
    ) -> HandshakeError {
        match got {
            Message::Error { code, message } => self.fail(op, refused(code, message)),
            other => {
                let got = other.msg_type();
                self.send_error(
                    ErrorCode::Protocol,
                    format!("expected {expected}, got {got:?}"),
                );
                self.fail(op, HandshakeFailure::Unexpected { expected, got })
            }
        }
    }
}

fn refused(code: ErrorCode, message: String) -> HandshakeFailure {
    match code {
        ErrorCode::Incompatible => {
            HandshakeFailure::Incompatible(message.lines().map(str::to_owned).collect())
        }
        ErrorCode::AuthFailed => HandshakeFailure::Refused {
            code,
            message: format!("{message} (the two replication key files differ)"),
        },
        code => HandshakeFailure::Refused { code, message },
    }
}

/// An Error that came before the peer proved it holds our key: anyone
/// who can answer on the peer's address could have sent it, so it is
/// reported as such and never read as a verdict on the VM (a real server
/// sends only AuthFailed or VersionMismatch there).
fn refused_unverified(code: ErrorCode, message: String) -> HandshakeFailure {
    let hint = match code {
        ErrorCode::AuthFailed => " (the two replication key files differ, or this is not our peer)",
        _ => "",
    };
    HandshakeFailure::Refused {
        code,
        message: format!(
            "{message}{hint} [said before the peer proved it holds our key: unverified]"
        ),
    }
}

fn peer_name(stream: &TcpStream) -> String {
    stream
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "unknown peer".to_string())
}

/// A stream whose every read and write may wait only until `deadline`:
/// one deadline for a whole handshake, so a peer that sends a byte now
/// and then cannot hold it open.
struct Deadline<'a, S> {
    stream: &'a mut S,
    deadline: Instant,
}

/// Socket timeouts, on a TCP stream or a channel.
trait Timeouts {
    fn set_timeouts(&self, t: Option<Duration>) -> io::Result<()>;
}
impl Timeouts for TcpStream {
    fn set_timeouts(&self, t: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(t)?;
        self.set_write_timeout(t)
    }
}
impl Timeouts for Channel {
    fn set_timeouts(&self, t: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(t)?;
        self.set_write_timeout(t)
    }
}

impl<S: Timeouts> Deadline<'_, S> {
    fn arm(&self) -> io::Result<()> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "handshake deadline passed",
            ));
        }
        self.stream.set_timeouts(Some(left))
    }
}
impl<S: Timeouts + Read> Read for Deadline<'_, S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.arm()?;
        self.stream.read(buf)
    }
}
impl<S: Timeouts + Write> Write for Deadline<'_, S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.arm()?;
        self.stream.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.stream.flush()
    }
}

/// After a handshake, the session sets its own timeouts.
fn clear_timeouts(s: &impl Timeouts) {
    let _ = s.set_timeouts(None);
}

/// Client side (primary / migration source): the Noise handshake that
/// opens the encrypted channel, then Hello, the server's proof, ours, and
/// Ready inside it. Returns the channel the session runs on.
pub fn client_handshake(
    mut tcp: TcpStream,
    key: &Key,
    params: &HelloParams,
) -> Result<(Channel, Session), HandshakeError> {
    let peer = peer_name(&tcp);
    let deadline = Instant::now() + params.timeout;
    let transport = client_noise(&mut tcp, key, &peer, params.timeout, deadline)?;
    let mut ch = Channel::encrypted(tcp, transport);
    ch.set_deadline(Some(deadline));
    let mut session = client_handshake_on(
        &mut Deadline {
            stream: &mut ch,
            deadline,
        },
        peer,
        key,
        params,
    )?;
    ch.set_deadline(None);
    clear_timeouts(&ch);
    session.encrypted = true;
    Ok((ch, session))
}

/// The client's side of the Noise handshake on `tcp`: the keys of the
/// encrypted channel, or why there are none.
fn client_noise(
    tcp: &mut TcpStream,
    key: &Key,
    peer: &str,
    timeout: Duration,
    deadline: Instant,
) -> Result<snow::StatelessTransportState, HandshakeError> {
    let mut c = Conn {
        stream: &mut Deadline {
            stream: tcp,
            deadline,
        },
        peer: peer.to_string(),
        timeout,
    };
    let mut noise = channel::noise(true, &key.noise_psk())
        .map_err(|e| c.fail("starting the encrypted handshake", noise_failure(e)))?;
    c.send_noise("sending the encrypted handshake", &mut noise)?;
    const OP: &str = "waiting for the encrypted handshake";
    let reply = read_frame_bounded(
        c.stream,
        PREAUTH_MAX_PAYLOAD,
        "the encrypted handshake",
        |t| {
            matches!(
                MsgType::from_u16(t),
                Some(MsgType::NoiseHandshake | MsgType::Error)
            )
        },
    );
    let data = match reply {
        Ok(Message::NoiseHandshake { data }) => data,
        Ok(Message::Error { code, message }) => {
            return Err(c.fail(OP, refused_unverified(code, message)));
        }
        Ok(other) => return Err(c.unexpected(OP, "NoiseHandshake", other)),
        Err(WireError::Closed) => return Err(c.fail(OP, HandshakeFailure::ClosedDuringNoise)),
        Err(WireError::Io(e)) if e.kind() == io::ErrorKind::ConnectionReset => {
            return Err(c.fail(OP, HandshakeFailure::ClosedDuringNoise));
        }
        Err(e) => return Err(c.wire(OP, e)),
    };
    let mut payload = [0u8; channel::MAX_NOISE_MESSAGE];
    if noise.read_message(&data, &mut payload).is_err() {
        c.send_error(
            ErrorCode::AuthFailed,
            "the encrypted handshake does not verify with our key",
        );
        return Err(c.fail(
            "verifying the server's handshake",
            HandshakeFailure::PeerNotAuthenticated,
        ));
    }
    noise
        .into_stateless_transport_mode()
        .map_err(|e| c.fail("finishing the encrypted handshake", noise_failure(e)))
}

/// The encrypted channel a key-holding client would have before its
/// Hello, for the fuzz targets (`fuzz/`): what follows on it is the
/// target's to send. Not an API.
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub fn fuzzing_client_channel(
    mut tcp: TcpStream,
    key: &Key,
    timeout: Duration,
) -> Result<Channel, HandshakeError> {
    let peer = peer_name(&tcp);
    let transport = client_noise(&mut tcp, key, &peer, timeout, Instant::now() + timeout)?;
    clear_timeouts(&tcp);
    Ok(Channel::encrypted(tcp, transport))
}

/// The AuthProof a key-holding client sends for `hello` (as the server
/// re-encodes it), `version` and the server's nonce, for the fuzz targets.
/// Not an API.
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub fn fuzzing_client_proof(
    key: &Key,
    hello: &Hello,
    version: u16,
    server_nonce: &[u8; crate::NONCE_LEN],
) -> [u8; crate::PROOF_LEN] {
    let hello_bytes = Message::Hello(hello.clone()).encode_payload();
    key.client_proof(&hello_bytes, version, server_nonce)
}

/// Client side in the clear, with a protocol-5 server during a rolling
/// upgrade (the operator allowed it): Hello offering only the unencrypted
/// version, then as before encryption existed.
pub fn client_handshake_unencrypted(
    mut tcp: TcpStream,
    key: &Key,
    params: &HelloParams,
) -> Result<(Channel, Session), HandshakeError> {
    let peer = peer_name(&tcp);
    let deadline = Instant::now() + params.timeout;
    let params = HelloParams {
        versions: unencrypted_versions(),
        ..params.clone()
    };
    let session = client_handshake_on(
        &mut Deadline {
            stream: &mut tcp,
            deadline,
        },
        peer,
        key,
        &params,
    )?;
    clear_timeouts(&tcp);
    Ok((Channel::plain(tcp), session))
}

/// Why a server will not take a VM (the `lookup` of [`server_handshake`]):
/// the code the client decides on, the text for people.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    pub code: ErrorCode,
    pub message: String,
}

impl Refusal {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Refusal {
        Refusal {
            code,
            message: message.into(),
        }
    }
}

/// A refusal without a more precise code: the VM is not available here.
impl From<String> for Refusal {
    fn from(message: String) -> Refusal {
        Refusal::new(ErrorCode::UnknownVm, message)
    }
}

impl From<&str> for Refusal {
    fn from(message: &str) -> Refusal {
        Refusal::new(ErrorCode::UnknownVm, message)
    }
}

/// Server side (backup / migration destination). Reads one bounded frame
/// of the handshake's own type (checked from its header alone), completes
/// the Noise handshake, then Hello, proofs and Ready inside the channel.
/// `lookup` returns the local view of the named VM (or `None` when there
/// is no local copy yet and the caller checks compatibility later) for
/// that purpose, or why it cannot be taken; it is called only after the
/// client has authenticated. Returns the channel, the session and the
/// client's Hello.
pub fn server_handshake(
    mut tcp: TcpStream,
    key: &Key,
    opts: &ServerOptions,
    lookup: impl FnOnce(&str, Purpose) -> Result<Option<VmCompat>, Refusal>,
) -> Result<(Channel, Session, Hello), HandshakeError> {
    let peer = peer_name(&tcp);
    let deadline = Instant::now() + opts.timeout;
    let (first, legacy_hello) = {
        let mut c = Conn {
            stream: &mut Deadline {
                stream: &mut tcp,
                deadline,
            },
            peer: peer.clone(),
            timeout: opts.timeout,
        };
        const OP: &str = "waiting for the encrypted handshake";
        let allow_hello = opts.allow_unencrypted;
        let first = read_frame_bounded(
            c.stream,
            PREAUTH_MAX_PAYLOAD,
            "the encrypted handshake",
            |t| {
                match MsgType::from_u16(t) {
                    Some(MsgType::NoiseHandshake) => true,
                    // A protocol-5 client starts with Hello in the clear.
                    Some(MsgType::Hello) => true,
                    _ => false,
                }
            },
        )
        .map_err(|e| c.wire(OP, e))?;
        match first {
            Message::NoiseHandshake { data } => (Some(data), None),
            Message::Hello(h) if allow_hello => (None, Some(h)),
            Message::Hello(h) => {
                let failure = HandshakeFailure::Unencrypted(h.max_version);
                c.send_error(ErrorCode::VersionMismatch, failure.to_string());
                return Err(c.fail(OP, failure));
            }
            other => return Err(c.unexpected(OP, "NoiseHandshake", other)),
        }
    };
    if let Some(hello) = legacy_hello {
        let (session, hello) = server_handshake_on(
            &mut Deadline {
                stream: &mut tcp,
                deadline,
            },
            peer,
            key,
            &unencrypted_versions(),
            opts.timeout,
            Some(hello),
            lookup,
        )?;
        clear_timeouts(&tcp);
        return Ok((Channel::plain(tcp), session, hello));
    }
    let data = first.unwrap_or_default();
    let transport = {
        let mut c = Conn {
            stream: &mut Deadline {
                stream: &mut tcp,
                deadline,
            },
            peer: peer.clone(),
            timeout: opts.timeout,
        };
        let mut noise = channel::noise(false, &key.noise_psk())
            .map_err(|e| c.fail("starting the encrypted handshake", noise_failure(e)))?;
        let mut payload = [0u8; channel::MAX_NOISE_MESSAGE];
        if noise.read_message(&data, &mut payload).is_err() {
            c.send_error(
                ErrorCode::AuthFailed,
                "the encrypted handshake does not verify with our key",
            );
            return Err(c.fail(
                "verifying the client's handshake",
                HandshakeFailure::PeerNotAuthenticated,
            ));
        }
        c.send_noise("answering the encrypted handshake", &mut noise)?;
        noise
            .into_stateless_transport_mode()
            .map_err(|e| c.fail("finishing the encrypted handshake", noise_failure(e)))?
    };
    let mut ch = Channel::encrypted(tcp, transport);
    ch.set_deadline(Some(deadline));
    let (mut session, hello) = server_handshake_on(
        &mut Deadline {
            stream: &mut ch,
            deadline,
        },
        peer,
        key,
        &opts.versions,
        opts.timeout,
        None,
        lookup,
    )?;
    ch.set_deadline(None);
    clear_timeouts(&ch);
    session.encrypted = true;
    Ok((ch, session, hello))
}

fn noise_failure(e: snow::Error) -> HandshakeFailure {
    HandshakeFailure::Io(io::Error::other(format!("Noise: {e}")))
}

/// [`client_handshake`] over any byte stream; `peer` names it in errors.
/// Timeouts are the caller's business here.
pub fn client_handshake_on<S: Read + Write>(
    stream: &mut S,
    peer: String,
    key: &Key,
    params: &HelloParams,
) -> Result<Session, HandshakeError> {
    let mut c = Conn {
        stream,
        peer,
        timeout: params.timeout,
    };
    let client_nonce =
        auth::nonce().map_err(|e| c.fail("making a nonce", HandshakeFailure::Io(e)))?;
    let hello = Message::Hello(Hello {
        max_version: *params.versions.end(),
        min_version: *params.versions.start(),
        purpose: params.purpose,
        vm_name: params.vm_name.clone(),
        compat: params.compat.clone(),
        client_nonce,
    });
    let hello_bytes = hello.encode_payload();
    c.send("sending Hello", &hello)?;

    const OP: &str = "waiting for HelloAck";
    let ack = match c.recv(OP)? {
        Message::HelloAck(a) => a,
        other => return Err(c.unexpected(OP, "HelloAck", other)),
    };
    if !params.versions.contains(&ack.chosen_version) {
        c.send_error(ErrorCode::VersionMismatch, "chosen version was not offered");
        return Err(c.fail(
            OP,
            HandshakeFailure::BadVersionChoice {
                chosen: ack.chosen_version,
                offered: params.versions.clone(),
            },
        ));
    }
    if !key.verify_server(
        &hello_bytes,
        ack.chosen_version,
        &ack.server_nonce,
        &ack.server_proof,
    ) {
        c.send_error(
            ErrorCode::AuthFailed,
            "the server's proof does not match our key",
        );
        return Err(c.fail(
            "verifying the server's proof",
            HandshakeFailure::PeerNotAuthenticated,
        ));
    }
    let client_proof = key.client_proof(&hello_bytes, ack.chosen_version, &ack.server_nonce);
    c.send("sending AuthProof", &Message::AuthProof { client_proof })?;

    const OP2: &str = "waiting for Ready";
    match c.recv(OP2)? {
        Message::Ready => Ok(Session {
            version: ack.chosen_version,
            purpose: params.purpose,
            vm_name: params.vm_name.clone(),
            peer: c.peer,
            encrypted: false,
        }),
        other => Err(c.unexpected(OP2, "Ready", other)),
    }
}

/// [`server_handshake`] over any byte stream, after the channel is set
/// up: Hello (read here, or `first` when the caller has read it already),
/// HelloAck, AuthProof, Ready. `versions` are those acceptable on this
/// stream; `peer` names it in errors.
pub fn server_handshake_on<S: Read + Write>(
    stream: &mut S,
    peer: String,
    key: &Key,
    versions: &RangeInclusive<u16>,
    timeout: Duration,
    first: Option<Hello>,
    lookup: impl FnOnce(&str, Purpose) -> Result<Option<VmCompat>, Refusal>,
) -> Result<(Session, Hello), HandshakeError> {
    let mut c = Conn {
        stream,
        peer,
        timeout,
    };
    const OP: &str = "waiting for Hello";
    let hello = match first {
        Some(h) => h,
        None => match c.recv(OP)? {
            Message::Hello(h) => h,
            other => return Err(c.unexpected(OP, "Hello", other)),
        },
    };
    let opts_versions = versions;
    let theirs = hello.min_version..=hello.max_version;
    let chosen = hello.max_version.min(*opts_versions.end());
    if theirs.is_empty() || !theirs.contains(&chosen) || !opts_versions.contains(&chosen) {
        let failure = HandshakeFailure::VersionMismatch {
            ours: opts_versions.clone(),
            theirs,
        };
        c.send_error(ErrorCode::VersionMismatch, failure.to_string());
        return Err(c.fail("negotiating the version", failure));
    }

    let hello_bytes = Message::Hello(hello.clone()).encode_payload();
    let server_nonce =
        auth::nonce().map_err(|e| c.fail("making a nonce", HandshakeFailure::Io(e)))?;
    let server_proof = key.server_proof(&hello_bytes, chosen, &server_nonce);
    c.send(
        "sending HelloAck",
        &Message::HelloAck(HelloAck {
            chosen_version: chosen,
            server_nonce,
            server_proof,
        }),
    )?;

    const OP2: &str = "waiting for AuthProof";
    let proof = match c.recv(OP2)? {
        Message::AuthProof { client_proof } => client_proof,
        other => return Err(c.unexpected(OP2, "AuthProof", other)),
    };
    if !key.verify_client(&hello_bytes, chosen, &server_nonce, &proof) {
        c.send_error(
            ErrorCode::AuthFailed,
            "the client's proof does not match our key",
        );
        return Err(c.fail(
            "verifying the client's proof",
            HandshakeFailure::PeerNotAuthenticated,
        ));
    }

    // Authenticated from here on: only now may we talk about our VMs.
    let local = match lookup(&hello.vm_name, hello.purpose) {
        Ok(v) => v,
        Err(Refusal { code, message }) => {
            c.send_error(code, format!("VM {:?}: {message}", hello.vm_name));
            return Err(c.fail("looking up the VM", HandshakeFailure::UnknownVm(message)));
        }
    };
    let (ours, theirs) = hello.purpose.side_names();
    // `None`: the server has no copy of this VM yet (a new standby or
    // migration destination); it checks the client's compat against the
    // configuration that follows in a VmConfig message.
    if let Some(Err(list)) = local.map(|local| hello.compat.check_sides(&local, ours, theirs)) {
        c.send_error(ErrorCode::Incompatible, list.join("\n"));
        return Err(c.fail(
            "checking VM compatibility",
            HandshakeFailure::Incompatible(list),
        ));
    }
    c.send("sending Ready", &Message::Ready)?;
    Ok((
        Session {
            version: chosen,
            purpose: hello.purpose,
            vm_name: hello.vm_name.clone(),
            peer: c.peer,
            encrypted: false,
        },
        hello,
    ))
}

impl HandshakeError {
    /// The decode error, if the handshake failed on a malformed frame.
    pub fn decode_error(&self) -> Option<&DecodeError> {
        match &self.failure {
            HandshakeFailure::Wire(WireError::Decode(d)) => Some(d),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// The deadline holds inside the encrypted channel too: someone who
    /// replays a genuine client's first Noise message (it carries no
    /// freshness, so the server answers it) and then trickles one record a
    /// byte at a time cannot keep the server's handshake going past its
    /// deadline. (Each socket read of the record layer gets only what is
    /// left of it, not the whole timeout again.)
    #[test]
    fn a_trickled_record_cannot_outlast_the_deadline() {
        let key = Key::from_bytes(&[4; 32]).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server_key = key.clone();
        let server = std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            let opts = ServerOptions {
                timeout: Duration::from_millis(800),
                ..ServerOptions::default()
            };
            let start = Instant::now();
            let r = server_handshake(s, &server_key, &opts, |_, _| Ok(None));
            (r.map(|_| ()), start.elapsed())
        });
        // A genuine first message, as a recording of a real client holds.
        let mut noise = channel::noise(true, &key.noise_psk()).unwrap();
        let mut out = [0u8; channel::MAX_NOISE_MESSAGE];
        let n = noise.write_message(&[], &mut out).unwrap();
        let mut tcp = TcpStream::connect(addr).unwrap();
        Message::NoiseHandshake {
            data: out[..n].to_vec(),
        }
        .write_to(&mut tcp)
        .unwrap();
        // The server answers; then one record of the largest size, slowly.
        tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let reply = crate::read_frame(&mut tcp).unwrap();
        assert!(matches!(reply, Message::NoiseHandshake { .. }), "{reply:?}");
        let trickle = std::thread::spawn(move || {
            let _ = tcp.write_all(&[0xff, 0xff]);
            for _ in 0..40 {
                if tcp.write_all(&[0x55]).is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        let (r, took) = server.join().unwrap();
        let e = r.unwrap_err();
        assert!(matches!(e.failure, HandshakeFailure::Timeout(_)), "{e}");
        assert!(took < Duration::from_millis(2000), "took {took:?}");
        trickle.join().unwrap();
    }
}
