//! The encrypted channel (protocol 6): every byte after the handshake is
//! encrypted and authenticated.
//!
//! ## Why Noise with the shared key, not TLS
//!
//! Both agents of a pair already hold the same secret key file; that is
//! their identity. TLS 1.3 would need certificates (a CA, issuing,
//! renewal, revocation) that operators of a two-host pair do not have, and
//! rustls has no external pre-shared keys. The Noise framework has a
//! pattern made for exactly this, the one WireGuard builds on:
//! **`Noise_NNpsk0_25519_AESGCM_SHA256`**. Both sides make a fresh X25519
//! key per connection (forward secrecy: a key file stolen later does not
//! decrypt recorded sessions), and the pre-shared key is mixed in before
//! the first message, so only a holder of the key file can complete the
//! handshake or read anything after it. AES-256-GCM because every x86-64
//! host of the kind that runs VMs has AES-NI, through `ring` (via `snow`,
//! the maintained Noise implementation).
//!
//! ```text
//!  client                                              server
//!    │── NoiseHandshake(-> psk, e)  48 bytes ──────────────►│ only this type, ≤ 256 bytes,
//!    │◄─────────────── NoiseHandshake(<- e, ee)  48 bytes ──│ is read before it
//!    │═══ records: Hello, HelloAck, AuthProof, Ready, … ════│
//! ```
//!
//! The 32-byte pre-shared key is HMAC-SHA256(key file, "remus-proto noise
//! psk"). A client without the key fails at the first message; a server
//! without it at the second. A replayed first message gets a fresh
//! server key, and the replayer cannot compute the session keys.
//!
//! ## Records
//!
//! After the handshake the stream is a sequence of records, each a u16
//! big-endian length (16 to 65535) and that many bytes of AES-256-GCM
//! ciphertext with its 16-byte tag. The nonce is the record's number in
//! its direction (0, 1, 2, …), never sent: a record that is altered,
//! dropped, replayed or reordered fails authentication, and the channel
//! is dead from then on (the session ends with that error; nothing from
//! the failing record is delivered). Frames travel inside the records
//! unchanged (their CRC stays, as a check on our own code).
//!
//! A `Channel` is also the type of a session with a protocol-5 peer during
//! a rolling upgrade (`--allow-unencrypted-peers`): then it passes bytes
//! through in the clear.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use snow::StatelessTransportState;

/// The Noise protocol of the channel.
pub const NOISE_PARAMS: &str = "Noise_NNpsk0_25519_AESGCM_SHA256";
/// Mixed into the handshake hash, so that the keys belong to this protocol.
pub const PROLOGUE: &[u8] = b"remus-proto 6";
/// Longest Noise handshake message accepted (ours are 48 bytes).
pub const MAX_NOISE_MESSAGE: usize = 256;
/// Longest record on the wire (Noise's message limit), tag included.
pub const MAX_RECORD: usize = 65535;
/// The AEAD tag of each record.
pub const TAG_LEN: usize = 16;
/// Most plaintext one record carries.
pub const MAX_RECORD_PLAINTEXT: usize = MAX_RECORD - TAG_LEN;
/// Plaintext sealed per `write` call at most (then one `write_all` to the
/// socket), so that large writes cost few system calls.
const WRITE_BATCH: usize = 16 * MAX_RECORD_PLAINTEXT;
/// Bytes read from the socket at a time.
const READ_BUFFER: usize = 4 * MAX_RECORD;

/// A replication connection: a TCP stream, encrypted (protocol 6) or, with
/// a protocol-5 peer during a rolling upgrade, in the clear. Clones made
/// with [`Channel::try_clone`] share the keys and the record counters, so
/// one thread may read while another writes.
pub struct Channel {
    tcp: TcpStream,
    crypto: Option<Arc<Crypto>>,
    /// While set (during the handshake), every socket read and write
    /// below the record layer may wait only until then: a record trickled
    /// in byte by byte cannot stretch it.
    deadline: Mutex<Option<Instant>>,
}

struct Crypto {
    transport: StatelessTransportState,
    tx: Mutex<Tx>,
    rx: Mutex<Rx>,
}

struct Tx {
    nonce: u64,
    out: Vec<u8>,
    /// A record was cut short on the wire: nothing may follow it.
    broken: bool,
}

struct Rx {
    nonce: u64,
    /// Bytes from the socket not yet decrypted: `buf[start..end]`.
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// A decrypted record not yet handed out: `plain[pos..]`.
    plain: Vec<u8>,
    pos: usize,
    /// Why the channel died, once it has.
    failed: Option<String>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl std::fmt::Debug for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Channel")
            .field("peer", &self.tcp.peer_addr().ok())
            .field("encrypted", &self.crypto.is_some())
            .finish()
    }
}

impl Channel {
    /// An encrypted channel over `tcp` with the keys of a finished Noise
    /// handshake.
    pub(crate) fn encrypted(tcp: TcpStream, transport: StatelessTransportState) -> Channel {
        Channel {
            tcp,
            crypto: Some(Arc::new(Crypto::new(transport))),
            deadline: Mutex::new(None),
        }
    }

    /// A channel in the clear (a protocol-5 peer).
    pub(crate) fn plain(tcp: TcpStream) -> Channel {
        Channel {
            tcp,
            crypto: None,
            deadline: Mutex::new(None),
        }
    }

    /// Sets or clears the deadline of every socket read and write (see
    /// the field).
    pub(crate) fn set_deadline(&self, deadline: Option<Instant>) {
        *lock(&self.deadline) = deadline;
    }

    /// Whether bytes travel encrypted.
    pub fn is_encrypted(&self) -> bool {
        self.crypto.is_some()
    }

    /// Another handle on the same channel (same socket, keys and counters).
    pub fn try_clone(&self) -> io::Result<Channel> {
        Ok(Channel {
            tcp: self.tcp.try_clone()?,
            crypto: self.crypto.clone(),
            deadline: Mutex::new(*lock(&self.deadline)),
        })
    }

    pub fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.tcp.peer_addr()
    }
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.tcp.local_addr()
    }
    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.tcp.set_read_timeout(t)
    }
    pub fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.tcp.set_write_timeout(t)
    }
    pub fn read_timeout(&self) -> io::Result<Option<Duration>> {
        self.tcp.read_timeout()
    }
    pub fn write_timeout(&self) -> io::Result<Option<Duration>> {
        self.tcp.write_timeout()
    }
    pub fn set_nodelay(&self, on: bool) -> io::Result<()> {
        self.tcp.set_nodelay(on)
    }
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        self.tcp.shutdown(how)
    }
}

fn dead(why: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why.to_string())
}

impl Crypto {
    fn new(transport: StatelessTransportState) -> Crypto {
        Crypto {
            transport,
            tx: Mutex::new(Tx {
                nonce: 0,
                out: Vec::new(),
                broken: false,
            }),
            rx: Mutex::new(Rx {
                nonce: 0,
                buf: vec![0; READ_BUFFER],
                start: 0,
                end: 0,
                plain: Vec::new(),
                pos: 0,
                failed: None,
            }),
        }
    }

    /// Reads plaintext from the records that arrive on `src`.
    fn read(&self, src: &mut impl Read, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        let mut rx = lock(&self.rx);
        let rx = &mut *rx;
        if let Some(why) = &rx.failed {
            return Err(dead(why));
        }
        loop {
            if rx.pos < rx.plain.len() {
                let n = out.len().min(rx.plain.len() - rx.pos);
                out[..n].copy_from_slice(&rx.plain[rx.pos..rx.pos + n]);
                rx.pos += n;
                return Ok(n);
            }
            // A whole record buffered: decrypt it.
            let have = rx.end - rx.start;
            if have >= 2 {
                let len = u16::from_be_bytes([rx.buf[rx.start], rx.buf[rx.start + 1]]) as usize;
                if len < TAG_LEN {
                    let why = format!(
                        "encrypted record {} announces {len} bytes, less than its tag: the stream is corrupt",
                        rx.nonce
                    );
                    rx.failed = Some(why.clone());
                    return Err(dead(&why));
                }
                if have >= 2 + len {
                    let sealed = &rx.buf[rx.start + 2..rx.start + 2 + len];
                    let plain_len = len - TAG_LEN;
                    // Straight into the caller's buffer when it has room
                    // for the sealed record: the AEAD opens in place
                    // there, where a smaller buffer would cost it a copy
                    // of its own.
                    let direct = out.len() >= len;
                    if !direct {
                        rx.plain.resize(len, 0);
                    }
                    let target: &mut [u8] = if direct {
                        &mut out[..len]
                    } else {
                        &mut rx.plain[..]
                    };
                    if self
                        .transport
                        .read_message(rx.nonce, sealed, target)
                        .is_err()
                    {
                        let why = format!(
                            "encrypted record {} failed authentication: altered, replayed or reordered on the way, or not from our peer; the session is over",
                            rx.nonce
                        );
                        rx.failed = Some(why.clone());
                        rx.plain.clear();
                        rx.pos = 0;
                        return Err(dead(&why));
                    }
                    rx.nonce += 1;
                    rx.start += 2 + len;
                    if direct {
                        rx.plain.clear();
                        rx.pos = 0;
                        if plain_len == 0 {
                            continue;
                        }
                        return Ok(plain_len);
                    }
                    rx.plain.truncate(plain_len);
                    rx.pos = 0;
                    continue;
                }
            }
            // More bytes needed: make room, then read what the socket has.
            if rx.start > 0 && rx.end == rx.buf.len() || rx.start == rx.end {
                rx.buf.copy_within(rx.start..rx.end, 0);
                rx.end -= rx.start;
                rx.start = 0;
            }
            let end = rx.end;
            let n = src.read(&mut rx.buf[end..])?;
            if n == 0 {
                if rx.start == rx.end {
                    return Ok(0);
                }
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the connection ended inside an encrypted record",
                ));
            }
            rx.end += n;
        }
    }

    /// Seals `data` (a batch of it) into records and writes them to `dst`.
    fn write(&self, dst: &mut impl Write, data: &[u8]) -> io::Result<usize> {
        if data.is_empty() {
            return Ok(0);
        }
        let mut tx = lock(&self.tx);
        let tx = &mut *tx;
        if tx.broken {
            return Err(dead(
                "an encrypted record was cut short on the way out; the session is over",
            ));
        }
        let take = data.len().min(WRITE_BATCH);
        tx.out.clear();
        for chunk in data[..take].chunks(MAX_RECORD_PLAINTEXT) {
            let at = tx.out.len();
            let sealed_len = chunk.len() + TAG_LEN;
            tx.out.resize(at + 2 + sealed_len, 0);
            tx.out[at..at + 2].copy_from_slice(&(sealed_len as u16).to_be_bytes());
            let n = match self
                .transport
                .write_message(tx.nonce, chunk, &mut tx.out[at + 2..])
            {
                Ok(n) => n,
                Err(e) => {
                    // Records before it in this batch took nonces but
                    // were never sent: nothing may follow.
                    tx.broken = true;
                    return Err(io::Error::other(format!(
                        "encrypting record {}: {e}",
                        tx.nonce
                    )));
                }
            };
            debug_assert_eq!(n, sealed_len);
            tx.nonce += 1;
        }
        if let Err(e) = dst.write_all(&tx.out) {
            // The peer may have part of a record: nothing can follow it.
            tx.broken = true;
            return Err(e);
        }
        Ok(take)
    }
}

impl Read for &Channel {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let deadline = *lock(&self.deadline);
        match (&self.crypto, deadline) {
            (Some(c), None) => c.read(&mut &self.tcp, buf),
            (Some(c), Some(d)) => c.read(&mut Until(&self.tcp, d), buf),
            (None, None) => (&self.tcp).read(buf),
            (None, Some(d)) => Until(&self.tcp, d).read(buf),
        }
    }
}

impl Write for &Channel {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let deadline = *lock(&self.deadline);
        match (&self.crypto, deadline) {
            (Some(c), None) => c.write(&mut &self.tcp, buf),
            (Some(c), Some(d)) => c.write(&mut Until(&self.tcp, d), buf),
            (None, None) => (&self.tcp).write(buf),
            (None, Some(d)) => Until(&self.tcp, d).write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        (&self.tcp).flush()
    }
}

/// A socket whose every read and write waits at most until a deadline.
struct Until<'a>(&'a TcpStream, Instant);

impl Until<'_> {
    fn left(&self) -> io::Result<Duration> {
        let left = self.1.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "handshake deadline passed",
            ));
        }
        Ok(left)
    }
}

impl Read for Until<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.set_read_timeout(Some(self.left()?))?;
        (&mut &*self.0).read(buf)
    }
}

impl Write for Until<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.set_write_timeout(Some(self.left()?))?;
        (&mut &*self.0).write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        (&mut &*self.0).flush()
    }
}

impl Read for Channel {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        (&*self).read(buf)
    }
}

impl Write for Channel {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        (&*self).write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        (&*self).flush()
    }
}

/// The Noise handshake state of one side, keyed by `psk`.
pub(crate) fn noise(initiator: bool, psk: &[u8; 32]) -> Result<snow::HandshakeState, snow::Error> {
    let b = snow::Builder::new(NOISE_PARAMS.parse()?)
        .prologue(PROLOGUE)?
        .psk(0, psk)?;
    if initiator {
        b.build_initiator()
    } else {
        b.build_responder()
    }
}

/// The record layer of an encrypted channel over any reader or writer,
/// for the fuzz targets (`fuzz/`): the very code a [`Channel`] runs, with
/// both ends' keys from a Noise handshake made in memory. Not an API.
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing {
    use super::*;

    /// The sending end.
    pub struct Sender(Crypto);
    /// The receiving end.
    pub struct Receiver(Crypto);

    /// Two ends keyed by `psk` (a finished NNpsk0 handshake).
    pub fn pair(psk: &[u8; 32]) -> (Sender, Receiver) {
        let mut i = noise(true, psk).expect("Noise parameters");
        let mut r = noise(false, psk).expect("Noise parameters");
        let mut msg = [0u8; MAX_NOISE_MESSAGE];
        let mut payload = [0u8; MAX_NOISE_MESSAGE];
        let n = i.write_message(&[], &mut msg).expect("first message");
        r.read_message(&msg[..n], &mut payload).expect("same key");
        let n = r.write_message(&[], &mut msg).expect("second message");
        i.read_message(&msg[..n], &mut payload).expect("same key");
        (
            Sender(Crypto::new(
                i.into_stateless_transport_mode().expect("finished"),
            )),
            Receiver(Crypto::new(
                r.into_stateless_transport_mode().expect("finished"),
            )),
        )
    }

    impl Sender {
        /// What `Write::write` of a channel does: seals a batch of `data`.
        pub fn write(&self, dst: &mut impl Write, data: &[u8]) -> io::Result<usize> {
            self.0.write(dst, data)
        }
    }

    impl Receiver {
        /// What `Read::read` of a channel does.
        pub fn read(&self, src: &mut impl Read, out: &mut [u8]) -> io::Result<usize> {
            self.0.read(src, out)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// Two ends of a TCP connection with a finished Noise handshake (keys
    /// `a` and `b`; equal keys make a working pair).
    fn pair(a: &[u8; 32], b: &[u8; 32]) -> (TcpStream, TcpStream, Result<(Channel, Channel), ()>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        let mut i = noise(true, a).unwrap();
        let mut r = noise(false, b).unwrap();
        let mut m1 = [0u8; 256];
        let n1 = i.write_message(&[], &mut m1).unwrap();
        let mut p = [0u8; 256];
        if r.read_message(&m1[..n1], &mut p).is_err() {
            return (c, s, Err(()));
        }
        let mut m2 = [0u8; 256];
        let n2 = r.write_message(&[], &mut m2).unwrap();
        i.read_message(&m2[..n2], &mut p).unwrap();
        let ci = Channel::encrypted(
            c.try_clone().unwrap(),
            i.into_stateless_transport_mode().unwrap(),
        );
        let cr = Channel::encrypted(
            s.try_clone().unwrap(),
            r.into_stateless_transport_mode().unwrap(),
        );
        (c, s, Ok((ci, cr)))
    }

    #[test]
    fn bytes_arrive_whole_in_both_directions_whatever_the_sizes() {
        let (_c, _s, ch) = pair(&[7; 32], &[7; 32]);
        let (mut a, mut b) = ch.unwrap();
        let big: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
        let sent = big.clone();
        let writer = std::thread::spawn(move || {
            a.write_all(&sent).unwrap();
            a.write_all(b"tail").unwrap();
            a
        });
        let mut got = vec![0u8; big.len() + 4];
        // Odd read sizes: records are split and joined freely.
        let mut at = 0;
        let mut step = 1;
        while at < got.len() {
            let end = (at + step).min(got.len());
            let n = b.read(&mut got[at..end]).unwrap();
            assert!(n > 0);
            at += n;
            step = step * 3 % 200_000 + 1;
        }
        assert_eq!(&got[..big.len()], &big[..]);
        assert_eq!(&got[big.len()..], b"tail");
        let mut a = writer.join().unwrap();
        b.write_all(b"back").unwrap();
        let mut back = [0u8; 4];
        a.read_exact(&mut back).unwrap();
        assert_eq!(&back, b"back");
    }

    #[test]
    fn a_different_key_fails_the_handshake() {
        let (_c, _s, ch) = pair(&[7; 32], &[8; 32]);
        assert!(ch.is_err());
    }

    /// A flipped bit, a replayed record and a dropped record each end the
    /// channel with an error, and nothing of the bad record is delivered.
    #[test]
    fn altered_replayed_or_dropped_records_are_refused() {
        for attack in ["flip", "replay", "drop"] {
            let (raw_c, _s, ch) = pair(&[9; 32], &[9; 32]);
            let (a, mut b) = ch.unwrap();
            // Seal two records with the sender's keys, then tamper with
            // the bytes before they reach the receiver's socket.
            let crypto = a.crypto.clone().unwrap();
            let seal = |nonce: u64, text: &[u8]| {
                let mut out = vec![0u8; text.len() + TAG_LEN];
                crypto
                    .transport
                    .write_message(nonce, text, &mut out)
                    .unwrap();
                let mut rec = (out.len() as u16).to_be_bytes().to_vec();
                rec.extend(out);
                rec
            };
            let r0 = seal(0, b"first record");
            let r1 = seal(1, b"second record");
            let wire: Vec<u8> = match attack {
                "flip" => {
                    let mut w = r0.clone();
                    w[5] ^= 0x10;
                    w
                }
                "replay" => [r0.clone(), r0.clone()].concat(),
                _ => r1.clone(),
            };
            (&raw_c).write_all(&wire).unwrap();
            let mut buf = [0u8; 64];
            let first = b.read(&mut buf);
            match attack {
                "replay" => {
                    assert_eq!(&buf[..first.unwrap()], b"first record");
                    let again = b.read(&mut buf).unwrap_err();
                    assert!(
                        again.to_string().contains("record 1 failed authentication"),
                        "{again}"
                    );
                }
                _ => {
                    let e = first.unwrap_err();
                    assert!(
                        e.to_string().contains("record 0 failed authentication"),
                        "{attack}: {e}"
                    );
                }
            }
            // Dead for good.
            assert!(b.read(&mut buf).is_err());
        }
    }
}
