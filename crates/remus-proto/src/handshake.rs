//! The handshake: version negotiation, mutual authentication, compatibility.
//!
//! The client is the side that sends VM state (primary, migration source); the
//! server receives it (backup, destination). See the crate documentation for
//! the sequence diagram. Until the client's AuthProof has verified, the server
//! sends nothing about its VMs and accepts no message that carries VM state:
//! anything but the expected handshake message ends the session.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::ops::RangeInclusive;
use std::time::Duration;

use thiserror::Error;

use crate::auth::{self, Key};
use crate::compat::VmCompat;
use crate::frame::{DecodeError, WireError, read_frame};
use crate::message::{ErrorCode, Hello, HelloAck, Message, MsgType, Purpose};
use crate::{MIN_PROTOCOL_VERSION, PROTOCOL_VERSION};

/// How long each handshake read or write may wait by default.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The versions this build speaks: the current and the previous one.
pub fn supported_versions() -> RangeInclusive<u16> {
    MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION
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
}

/// What the client announces.
#[derive(Debug, Clone)]
pub struct HelloParams {
    pub purpose: Purpose,
    pub vm_name: String,
    pub compat: VmCompat,
    /// Versions offered; [`supported_versions`] unless testing.
    pub versions: RangeInclusive<u16>,
    /// Per read/write timeout during the handshake.
    pub timeout: Duration,
}

impl HelloParams {
    pub fn new(purpose: Purpose, vm_name: impl Into<String>, compat: VmCompat) -> Self {
        HelloParams {
            purpose,
            vm_name: vm_name.into(),
            compat,
            versions: supported_versions(),
            timeout: HANDSHAKE_TIMEOUT,
        }
    }
}

/// Server-side settings.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Versions accepted; [`supported_versions`] unless testing.
    pub versions: RangeInclusive<u16>,
    /// Per read/write timeout during the handshake.
    pub timeout: Duration,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            versions: supported_versions(),
            timeout: HANDSHAKE_TIMEOUT,
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

    fn recv(&mut self, op: &'static str) -> Result<Message, HandshakeError> {
        read_frame(self.stream).map_err(|e| self.wire(op, e))
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

fn set_timeouts(stream: &TcpStream, t: Option<Duration>) -> io::Result<()> {
    stream.set_read_timeout(t)?;
    stream.set_write_timeout(t)
}

fn peer_name(stream: &TcpStream) -> String {
    stream
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "unknown peer".to_string())
}

/// Runs `f` with the handshake timeouts on `stream`, restoring the previous
/// timeouts afterwards (the session sets its own).
fn with_timeouts<T>(
    stream: &mut TcpStream,
    timeout: Duration,
    f: impl FnOnce(&mut TcpStream, String) -> Result<T, HandshakeError>,
) -> Result<T, HandshakeError> {
    let peer = peer_name(stream);
    let prev = (stream.read_timeout(), stream.write_timeout());
    set_timeouts(stream, Some(timeout)).map_err(|e| HandshakeError {
        peer: peer.clone(),
        op: "setting socket timeouts",
        failure: HandshakeFailure::Io(e),
    })?;
    let r = f(stream, peer);
    if let (Ok(rt), Ok(wt)) = prev {
        let _ = stream.set_read_timeout(rt);
        let _ = stream.set_write_timeout(wt);
    }
    r
}

/// Client side (primary / migration source): Hello, verify the server's
/// proof, send ours, wait for Ready.
pub fn client_handshake(
    stream: &mut TcpStream,
    key: &Key,
    params: &HelloParams,
) -> Result<Session, HandshakeError> {
    with_timeouts(stream, params.timeout, |s, peer| {
        client_handshake_on(s, peer, key, params)
    })
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
        }),
        other => Err(c.unexpected(OP2, "Ready", other)),
    }
}

/// Server side (backup / migration destination). `lookup` returns the local
/// view of the named VM (or `None` when there is no local copy yet and the
/// caller checks compatibility later) for that purpose, or why it cannot be taken; it is
/// called only after the client has authenticated. Returns the session and
/// the client's Hello.
pub fn server_handshake(
    stream: &mut TcpStream,
    key: &Key,
    lookup: impl FnOnce(&str, Purpose) -> Result<Option<VmCompat>, String>,
) -> Result<(Session, Hello), HandshakeError> {
    server_handshake_with(stream, key, &ServerOptions::default(), lookup)
}

/// [`server_handshake`] with explicit options.
pub fn server_handshake_with(
    stream: &mut TcpStream,
    key: &Key,
    opts: &ServerOptions,
    lookup: impl FnOnce(&str, Purpose) -> Result<Option<VmCompat>, String>,
) -> Result<(Session, Hello), HandshakeError> {
    with_timeouts(stream, opts.timeout, |s, peer| {
        server_handshake_on(s, peer, key, opts, lookup)
    })
}

/// [`server_handshake`] over any byte stream; `peer` names it in errors.
pub fn server_handshake_on<S: Read + Write>(
    stream: &mut S,
    peer: String,
    key: &Key,
    opts: &ServerOptions,
    lookup: impl FnOnce(&str, Purpose) -> Result<Option<VmCompat>, String>,
) -> Result<(Session, Hello), HandshakeError> {
    let mut c = Conn {
        stream,
        peer,
        timeout: opts.timeout,
    };
    const OP: &str = "waiting for Hello";
    let hello = match c.recv(OP)? {
        Message::Hello(h) => h,
        other => return Err(c.unexpected(OP, "Hello", other)),
    };
    let theirs = hello.min_version..=hello.max_version;
    let chosen = hello.max_version.min(*opts.versions.end());
    if theirs.is_empty() || !theirs.contains(&chosen) || !opts.versions.contains(&chosen) {
        let failure = HandshakeFailure::VersionMismatch {
            ours: opts.versions.clone(),
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
        Err(why) => {
            c.send_error(
                ErrorCode::UnknownVm,
                format!("VM {:?}: {why}", hello.vm_name),
            );
            return Err(c.fail("looking up the VM", HandshakeFailure::UnknownVm(why)));
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
