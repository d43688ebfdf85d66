//! `handshake`: the server side of the replication handshake
//! ([`remus_proto::server_handshake`]), the code every incoming connection
//! meets, on real loopback TCP connections, against four kinds of client
//! (the first byte, mod 4):
//!
//! 0. no key, a server that accepts only the encrypted protocol: the rest
//!    is sent as is;
//! 1. no key, a server that also accepts protocol 5 in the clear
//!    (`--allow-unencrypted-peers`): the rest is sent as is;
//! 2. the key, through the real Noise handshake, then the rest inside the
//!    encrypted channel;
//! 3. the key, in the clear, to the server of 1.
//!
//! With the key the client is interactive where the protocol needs it:
//! when the rest starts with a whole frame it is sent alone, and if the
//! server answers HelloAck the client sends a correct AuthProof for it
//! (or, when the next input byte is odd, a wrong one), then what is left.
//! Otherwise everything is sent at once and the write side closed.
//!
//! Asserted, besides "no panic" (a server thread that panics fails the
//! next input):
//! - the server accepts only a client whose proof was right, for the one
//!   VM it has ("vm", compatible) or a VM it has no copy of ("new"); a
//!   peer without the key is never accepted;
//! - the VM lookup runs only after the client proved the key;
//! - everything the server sends is whole, valid frames of the kinds the
//!   handshake uses (HelloAck, NoiseHandshake, Ready, Error), at most four,
//!   and an accepted session's last frame is Ready.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use remus_proto::{
    Decoded, Hello, Key, Message, Purpose, ServerOptions, VmCompat, decode, encrypted_versions,
    fuzzing_client_channel, fuzzing_client_proof, server_handshake,
};

/// The replication key both sides of modes 2 and 3 hold.
const KEY: [u8; 32] = [0x3c; 32];
/// How long the server waits; the client always closes its side, so
/// only a stuck server would reach it.
const TIMEOUT: Duration = Duration::from_secs(5);

/// The one VM the server has.
pub fn local_vm() -> VmCompat {
    VmCompat {
        memory_mib: 256,
        vcpus: 1,
        machine: "q35".into(),
        cpu_model: "max".into(),
        disks: Vec::new(),
        macs: vec![[0x52, 0x54, 0, 0x12, 0x34, 0x56]],
    }
}

/// What the server made of one connection.
struct Verdict {
    /// The accepted session's VM name, or why it was refused.
    result: Result<String, String>,
    /// Whether the VM lookup ran (the client side knows whether it had
    /// proved the key by then).
    lookup_ran: bool,
}

struct Server {
    addr: std::net::SocketAddr,
    verdicts: Mutex<mpsc::Receiver<Verdict>>,
}

fn server(allow_unencrypted: bool) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind on loopback");
    let addr = listener.local_addr().expect("local address");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let key = Key::from_bytes(&KEY).expect("a valid key");
        let opts = ServerOptions {
            versions: encrypted_versions(),
            timeout: TIMEOUT,
            allow_unencrypted,
        };
        for conn in listener.incoming() {
            let Ok(tcp) = conn else { continue };
            let lookup_ran = Arc::new(AtomicBool::new(false));
            let ran = lookup_ran.clone();
            let r = server_handshake(tcp, &key, &opts, move |name: &str, _: Purpose| {
                ran.store(true, Ordering::SeqCst);
                match name {
                    "vm" => Ok(Some(local_vm())),
                    "new" => Ok(None),
                    _ => Err("no such VM here".into()),
                }
            });
            let result = match r {
                Ok((_ch, session, hello)) => {
                    assert_eq!(session.vm_name, hello.vm_name);
                    assert!(
                        (hello.min_version..=hello.max_version).contains(&session.version),
                        "version {} outside the client's range",
                        session.version
                    );
                    Ok(session.vm_name)
                }
                Err(e) => Err(e.to_string()),
            };
            let v = Verdict {
                result,
                lookup_ran: lookup_ran.load(Ordering::SeqCst),
            };
            if tx.send(v).is_err() {
                return;
            }
        }
    });
    Server {
        addr,
        verdicts: Mutex::new(rx),
    }
}

fn servers() -> &'static [Server; 2] {
    static S: OnceLock<[Server; 2]> = OnceLock::new();
    S.get_or_init(|| {
        // libFuzzer's main() is not Rust's: SIGPIPE is not ignored, and a
        // write to a connection the other side closed would kill the run.
        // SAFETY: setting a signal's disposition to SIG_IGN is sound.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
        [server(false), server(true)]
    })
}

/// Whole frames from `bytes`; panics on anything else.
fn frames(bytes: &[u8]) -> Vec<Message> {
    let mut v = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        match decode(&bytes[at..]) {
            Ok(Decoded::Frame { message, consumed }) => {
                at += consumed;
                v.push(message);
            }
            other => panic!("the server sent a bad or cut frame: {other:?}"),
        }
    }
    v
}

/// One whole frame at the start of `data`, if there is one.
fn first_frame(data: &[u8]) -> Option<(Message, usize)> {
    match decode(data) {
        Ok(Decoded::Frame { message, consumed }) => Some((message, consumed)),
        _ => None,
    }
}

pub fn run(data: &[u8]) {
    session(data);
}

/// One input's connection: whether the server accepted it (`None` for an
/// empty input).
pub fn session(data: &[u8]) -> Option<bool> {
    let Some((&mode, rest)) = data.split_first() else {
        return None;
    };
    let mode = mode % 4;
    let server = &servers()[usize::from(mode % 2)];
    let tcp = TcpStream::connect(server.addr).expect("connect on loopback");
    tcp.set_read_timeout(Some(TIMEOUT * 2)).expect("timeout");
    let key = Key::from_bytes(&KEY).expect("a valid key");
    let mut proved = false;
    let mut sent_hello: Option<Hello> = None;
    let replies = match mode {
        0 | 1 => talk(&tcp, &tcp, rest, None, &mut proved, &mut sent_hello),
        3 => talk(&tcp, &tcp, rest, Some(&key), &mut proved, &mut sent_hello),
        _ => match fuzzing_client_channel(tcp.try_clone().expect("clone"), &key, TIMEOUT) {
            Ok(ch) => {
                ch.set_read_timeout(Some(TIMEOUT * 2)).expect("timeout");
                talk(&ch, &ch, rest, Some(&key), &mut proved, &mut sent_hello)
            }
            Err(e) => panic!("the Noise handshake with the right key failed: {e}"),
        },
    };
    let verdict = server
        .verdicts
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .recv_timeout(TIMEOUT * 2)
        .expect("the server thread gave no verdict (it panicked or hung)");
    let replies = frames(&replies);
    assert!(replies.len() <= 4, "{} frames in reply", replies.len());
    for m in &replies {
        assert!(
            matches!(
                m,
                Message::HelloAck(_)
                    | Message::NoiseHandshake { .. }
                    | Message::Ready
                    | Message::Error { .. }
            ),
            "the server sent {m:?} during the handshake"
        );
    }
    if verdict.lookup_ran {
        assert!(
            proved,
            "the VM lookup ran for a client that did not prove the key"
        );
    }
    match verdict.result {
        Ok(name) => {
            assert!(proved, "a session for {name:?} without a valid proof");
            let hello = sent_hello.expect("accepted without our Hello");
            assert_eq!(hello.vm_name, name);
            match name.as_str() {
                "new" => {}
                "vm" => {
                    let (ours, theirs) = hello.purpose.side_names();
                    assert!(
                        hello.compat.check_sides(&local_vm(), ours, theirs).is_ok(),
                        "accepted an incompatible VM"
                    );
                }
                other => panic!("accepted a session for {other:?}, which this server lacks"),
            }
            assert!(
                matches!(replies.last(), Some(Message::Ready)),
                "accepted without Ready"
            );
            Some(true)
        }
        Err(_) => {
            assert!(!matches!(replies.last(), Some(Message::Ready)));
            Some(false)
        }
    }
}

/// Sends `input` as the client, interactive where the protocol needs the
/// key; returns every byte the server sent until it closed.
fn talk<R: Read, W: Write + Closable>(
    mut r: R,
    mut w: W,
    input: &[u8],
    key: Option<&Key>,
    proved: &mut bool,
    sent_hello: &mut Option<Hello>,
) -> Vec<u8> {
    let mut replies = Vec::new();
    let mut rest = input;
    if let (Some(key), Some((first, used))) = (key, first_frame(input)) {
        rest = &input[used..];
        let _ = w.write_all(&input[..used]);
        let _ = w.flush();
        // The server answers a whole frame with one frame (or closes).
        if let Some(ack) = read_one_frame(&mut r, &mut replies) {
            if let (Message::HelloAck(ack), Message::Hello(hello)) = (ack, &first) {
                let wrong = rest.first().is_some_and(|b| b & 1 == 1);
                rest = rest.get(1..).unwrap_or(&[]);
                let mut proof =
                    fuzzing_client_proof(key, hello, ack.chosen_version, &ack.server_nonce);
                if wrong {
                    proof[0] ^= 1;
                }
                *proved = !wrong;
                *sent_hello = Some(hello.clone());
                let mut bytes = Vec::new();
                Message::AuthProof {
                    client_proof: proof,
                }
                .encode(&mut bytes);
                let _ = w.write_all(&bytes);
            }
        }
    }
    let _ = w.write_all(rest);
    let _ = w.flush();
    w.close_write();
    let _ = r.read_to_end(&mut replies);
    replies
}

/// Reads one whole frame's bytes into `into` and decodes it.
fn read_one_frame(r: &mut impl Read, into: &mut Vec<u8>) -> Option<Message> {
    let start = into.len();
    let mut byte = [0u8; 1];
    loop {
        if let Some((m, used)) = first_frame(&into[start..]) {
            assert_eq!(start + used, into.len());
            return Some(m);
        }
        match r.read(&mut byte) {
            Ok(1) => into.push(byte[0]),
            _ => return None,
        }
    }
}

/// The write side of a connection, closable.
trait Closable {
    fn close_write(&self);
}

impl Closable for &TcpStream {
    fn close_write(&self) {
        let _ = self.shutdown(Shutdown::Write);
    }
}

impl Closable for &remus_proto::Channel {
    fn close_write(&self) {
        let _ = self.shutdown(Shutdown::Write);
    }
}

/// Seeds for the corpus generator, each run through [`session`]: those
/// named "-ok" and "-new" must be accepted and no other, so that the
/// corpus starts past the proof and the target is known to reach the
/// lookup and the compatibility check.
pub fn seeds() -> Vec<(String, Vec<u8>)> {
    let v = seed_inputs();
    for (name, input) in &v {
        let accepted = session(input) == Some(true);
        let want = name.ends_with("-ok") || name.ends_with("-new");
        assert_eq!(accepted, want, "seed {name}: accepted {accepted}");
    }
    v
}

fn seed_inputs() -> Vec<(String, Vec<u8>)> {
    let hello = |name: &str, versions: std::ops::RangeInclusive<u16>, compat: VmCompat| {
        let mut b = Vec::new();
        Message::Hello(Hello {
            max_version: *versions.end(),
            min_version: *versions.start(),
            purpose: Purpose::Protect,
            vm_name: name.into(),
            compat,
            client_nonce: [7; remus_proto::NONCE_LEN],
        })
        .encode(&mut b);
        b
    };
    let enc = encrypted_versions();
    let clear = remus_proto::unencrypted_versions();
    let other = VmCompat {
        memory_mib: 512,
        ..local_vm()
    };
    let mut v = Vec::new();
    for (mode, versions, tag) in [(2u8, enc.clone(), "noise"), (3, clear.clone(), "clear")] {
        for (name, compat, proof, what) in [
            ("vm", local_vm(), 0u8, "ok"),
            ("new", VmCompat::default(), 0, "new"),
            ("vm", local_vm(), 1, "wrong-proof"),
            ("vm", other.clone(), 0, "incompatible"),
            ("nope", local_vm(), 0, "unknown"),
        ] {
            let mut input = vec![mode];
            input.extend(hello(name, versions.clone(), compat));
            input.push(proof);
            v.push((format!("{tag}-{what}"), input));
        }
    }
    for mode in [0u8, 1] {
        let mut input = vec![mode];
        input.extend(hello("vm", clear.clone(), local_vm()));
        v.push((format!("nokey-{mode}-hello"), input));
        let mut input = vec![mode];
        Message::NoiseHandshake { data: vec![1; 48] }.encode(&mut input);
        v.push((format!("nokey-{mode}-noise"), input));
    }
    v
}
