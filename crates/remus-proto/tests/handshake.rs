//! The handshake over real loopback TCP connections: the encrypted channel
//! (protocol 6), authentication, versions, compatibility, and what an
//! unauthenticated or hostile peer can make a server do.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use remus_proto::{
    Channel, CheckpointKind, DiskCompat, Epoch, ErrorCode, HandshakeError, HandshakeFailure, Hello,
    HelloParams, Key, Message, MsgType, Purpose, ServerOptions, Session, VmCompat,
    client_handshake, client_handshake_unencrypted, encode_raw, read_frame, server_handshake,
};

fn vm() -> VmCompat {
    VmCompat {
        memory_mib: 256,
        vcpus: 2,
        machine: "q35".into(),
        cpu_model: "max".into(),
        disks: vec![DiskCompat {
            target: "vda".into(),
            size_bytes: 1 << 30,
        }],
        macs: vec![[0x52, 0x54, 0, 1, 2, 3]],
    }
}

fn key(b: u8) -> Key {
    Key::from_bytes(&[b; 32]).unwrap()
}

fn quick_opts() -> ServerOptions {
    ServerOptions {
        timeout: Duration::from_secs(5),
        ..ServerOptions::default()
    }
}

type ServerResult = Result<(Channel, Session, Hello), HandshakeError>;

/// Starts a server that handshakes one connection with `key`, `opts` and a
/// lookup answering `local` for VM "web".
fn serve(
    key: Key,
    opts: ServerOptions,
    local: VmCompat,
) -> (String, thread::JoinHandle<ServerResult>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let h = thread::spawn(move || {
        let (s, _) = listener.accept().unwrap();
        server_handshake(s, &key, &opts, |name, _purpose| {
            if name == "web" {
                Ok(Some(local))
            } else {
                Err("no such VM on this host".into())
            }
        })
    });
    (addr, h)
}

fn client(
    addr: &str,
    key: &Key,
    params: &HelloParams,
) -> Result<(Channel, Session), HandshakeError> {
    client_handshake(TcpStream::connect(addr).unwrap(), key, params)
}

fn frame(m: &Message) -> Vec<u8> {
    let mut out = Vec::new();
    encode_raw(m.msg_type() as u16, &m.encode_payload(), &mut out);
    out
}

#[test]
fn handshake_succeeds_and_the_encrypted_session_carries_checkpoints() {
    let (addr, server) = serve(key(1), quick_opts(), vm());
    let (mut ch, session) = client(
        &addr,
        &key(1),
        &HelloParams::new(Purpose::Protect, "web", vm()),
    )
    .unwrap();
    assert_eq!(session.version, remus_proto::PROTOCOL_VERSION);
    assert!(session.encrypted && ch.is_encrypted());
    assert_eq!(session.vm_name, "web");
    assert_eq!(session.peer, addr);
    let (mut srv, srv_session, hello) = server.join().unwrap().unwrap();
    assert_eq!(srv_session.version, session.version);
    assert!(srv_session.encrypted);
    assert_eq!(srv_session.purpose, Purpose::Protect);
    assert_eq!(hello.compat, vm());
    // The channel is positioned right after the handshake, both ways.
    let begin = Message::CheckpointBegin {
        epoch: Epoch(1),
        kind: CheckpointKind::InitialSync,
    };
    begin.write_to(&mut ch).unwrap();
    ch.flush().unwrap();
    assert_eq!(read_frame(&mut srv).unwrap(), begin);
    Message::Ack { epoch: Epoch(1) }.write_to(&mut srv).unwrap();
    assert_eq!(
        read_frame(&mut ch).unwrap(),
        Message::Ack { epoch: Epoch(1) }
    );
}

#[test]
fn wrong_key_fails_on_both_sides_with_a_clear_error() {
    let (addr, server) = serve(key(1), quick_opts(), vm());
    let e = client(
        &addr,
        &key(2),
        &HelloParams::new(Purpose::Protect, "web", vm()),
    )
    .unwrap_err();
    assert!(
        matches!(
            &e.failure,
            HandshakeFailure::Refused {
                code: ErrorCode::AuthFailed,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("key files differ"), "{e}");

    let e = server.join().unwrap().unwrap_err();
    assert!(
        matches!(e.failure, HandshakeFailure::PeerNotAuthenticated),
        "{e}"
    );
    let msg = e.to_string();
    assert!(
        msg.contains("verifying the client's handshake") && msg.contains("key"),
        "{msg}"
    );
}

/// Without the key nothing gets past the first frame: forged handshake
/// bytes are refused, and VM state in the clear is refused by its type
/// from the header alone.
#[test]
fn a_peer_without_the_key_cannot_push_vm_state() {
    let (addr, server) = serve(key(1), quick_opts(), vm());
    let mut s = TcpStream::connect(&addr).unwrap();
    s.write_all(&frame(&Message::NoiseHandshake { data: vec![7; 48] }))
        .unwrap();
    assert!(matches!(
        read_frame(&mut s).unwrap(),
        Message::Error {
            code: ErrorCode::AuthFailed,
            ..
        }
    ));
    // The server has hung up; whatever we push now goes nowhere.
    let _ = s.write_all(&frame(&Message::CheckpointBegin {
        epoch: Epoch(1),
        kind: CheckpointKind::Checkpoint,
    }));
    let e = server.join().unwrap().unwrap_err();
    assert!(
        matches!(e.failure, HandshakeFailure::PeerNotAuthenticated),
        "{e}"
    );

    // State in the clear instead of the handshake: refused unread.
    let (addr, server) = serve(key(1), quick_opts(), vm());
    let mut s = TcpStream::connect(&addr).unwrap();
    s.write_all(&frame(&Message::CheckpointBegin {
        epoch: Epoch(1),
        kind: CheckpointKind::Checkpoint,
    }))
    .unwrap();
    let e = server.join().unwrap().unwrap_err();
    assert!(
        e.to_string()
            .contains("expected the encrypted handshake, got a frame of CheckpointBegin (16)"),
        "{e}"
    );
}

/// An unauthenticated frame header announcing a large payload is refused
/// at once, before the server reads (or allocates) any of it.
#[test]
fn a_large_first_frame_is_refused_from_its_header() {
    let (addr, server) = serve(key(1), quick_opts(), vm());
    let mut s = TcpStream::connect(&addr).unwrap();
    let mut header = Vec::new();
    header.extend_from_slice(b"RMS1");
    header.extend_from_slice(&(MsgType::NoiseHandshake as u16).to_be_bytes());
    header.extend_from_slice(&0u16.to_be_bytes());
    header.extend_from_slice(&(64u32 << 20).to_be_bytes());
    header.extend_from_slice(&0u32.to_be_bytes());
    s.write_all(&header).unwrap();
    let start = Instant::now();
    let e = server.join().unwrap().unwrap_err();
    // Decided without waiting for the announced bytes.
    assert!(start.elapsed() < Duration::from_secs(2));
    assert!(
        e.to_string()
            .contains("67108864-byte payload, above the 4096-byte limit"),
        "{e}"
    );
}

/// One deadline for the whole handshake: a peer that trickles a valid
/// first frame a byte at a time cannot keep the server busy past it.
#[test]
fn a_trickling_peer_cannot_outlast_the_deadline() {
    let opts = ServerOptions {
        timeout: Duration::from_millis(600),
        ..ServerOptions::default()
    };
    let (addr, server) = serve(key(1), opts, vm());
    let bytes = frame(&Message::NoiseHandshake { data: vec![1; 48] });
    let mut s = TcpStream::connect(&addr).unwrap();
    let trickle = thread::spawn(move || {
        for b in bytes {
            if s.write_all(&[b]).is_err() {
                break;
            }
            thread::sleep(Duration::from_millis(100));
        }
    });
    let start = Instant::now();
    let e = server.join().unwrap().unwrap_err();
    let took = start.elapsed();
    assert!(matches!(e.failure, HandshakeFailure::Timeout(_)), "{e}");
    assert!(took < Duration::from_millis(1500), "took {took:?}");
    trickle.join().unwrap();
}

/// A server without the right key cannot get a primary's VM state: the
/// client refuses after the server's handshake message and sends nothing
/// but its own first message and an Error.
#[test]
fn a_server_without_the_key_gets_no_vm_state() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let fake = thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let Message::NoiseHandshake { .. } = read_frame(&mut s).unwrap() else {
            panic!()
        };
        s.write_all(&frame(&Message::NoiseHandshake { data: vec![2; 48] }))
            .unwrap();
        // Everything the client sends from now on.
        let mut got = Vec::new();
        while let Ok(m) = read_frame(&mut s) {
            got.push(m.msg_type());
        }
        got
    });
    let e = client(
        &addr,
        &key(1),
        &HelloParams::new(Purpose::Protect, "web", vm()),
    )
    .unwrap_err();
    assert!(
        matches!(e.failure, HandshakeFailure::PeerNotAuthenticated),
        "{e}"
    );
    assert!(
        e.to_string().contains("verifying the server's handshake"),
        "{e}"
    );
    assert_eq!(fake.join().unwrap(), vec![MsgType::Error]);
}

#[test]
fn versions_too_new_or_too_old_are_refused_by_name() {
    let v = remus_proto::PROTOCOL_VERSION;
    // Client too new.
    let (addr, server) = serve(key(1), quick_opts(), vm());
    let mut p = HelloParams::new(Purpose::Protect, "web", vm());
    p.versions = v + 1..=v + 3;
    let e = client(&addr, &key(1), &p).unwrap_err();
    let theirs = format!("{}..={}", v + 1, v + 3);
    assert!(
        matches!(&e.failure, HandshakeFailure::Refused { code: ErrorCode::VersionMismatch, message } if message.contains(&theirs)),
        "{e}"
    );
    let e = server.join().unwrap().unwrap_err();
    assert!(
        matches!(e.failure, HandshakeFailure::VersionMismatch { .. }),
        "{e}"
    );
    assert!(
        e.to_string().contains(&format!(
            "no common protocol version: we speak {}..={v}, the peer {theirs}",
            remus_proto::ENCRYPTED_PROTOCOL_VERSION
        )),
        "{e}"
    );

    // Client too old for a server that only speaks newer versions.
    let opts = ServerOptions {
        versions: v + 1..=v + 2,
        ..quick_opts()
    };
    let (addr, server) = serve(key(1), opts, vm());
    let e = client(
        &addr,
        &key(1),
        &HelloParams::new(Purpose::Protect, "web", vm()),
    )
    .unwrap_err();
    assert!(matches!(
        e.failure,
        HandshakeFailure::Refused {
            code: ErrorCode::VersionMismatch,
            ..
        }
    ));
    assert!(matches!(
        server.join().unwrap().unwrap_err().failure,
        HandshakeFailure::VersionMismatch { .. }
    ));

    // Overlapping ranges pick the highest common version.
    let opts = ServerOptions {
        versions: v..=v + 2,
        ..quick_opts()
    };
    let (addr, server) = serve(key(1), opts, vm());
    let mut p = HelloParams::new(Purpose::Protect, "web", vm());
    p.versions = v..=v + 1;
    assert_eq!(client(&addr, &key(1), &p).unwrap().1.version, v + 1);
    assert_eq!(server.join().unwrap().unwrap().1.version, v + 1);
}

/// A protocol-5 peer speaks in the clear: refused by default on both
/// sides with what to do, accepted only when the operator allows it for
/// a rolling upgrade.
#[test]
fn unencrypted_peers_only_when_allowed() {
    let (addr, server) = serve(key(1), quick_opts(), vm());
    let e = client_handshake_unencrypted(
        TcpStream::connect(&addr).unwrap(),
        &key(1),
        &HelloParams::new(Purpose::Protect, "web", vm()),
    )
    .unwrap_err();
    assert!(
        matches!(&e.failure, HandshakeFailure::Refused { code: ErrorCode::VersionMismatch, message } if message.contains("--allow-unencrypted-peers")),
        "{e}"
    );
    let e = server.join().unwrap().unwrap_err();
    assert!(matches!(e.failure, HandshakeFailure::Unencrypted(5)), "{e}");

    let opts = ServerOptions {
        allow_unencrypted: true,
        ..quick_opts()
    };
    let (addr, server) = serve(key(1), opts, vm());
    let (ch, session) = client_handshake_unencrypted(
        TcpStream::connect(&addr).unwrap(),
        &key(1),
        &HelloParams::new(Purpose::Protect, "web", vm()),
    )
    .unwrap();
    assert_eq!(session.version, 5);
    assert!(!session.encrypted && !ch.is_encrypted());
    let (srv, srv_session, _) = server.join().unwrap().unwrap();
    assert!(!srv_session.encrypted && !srv.is_encrypted());
    // The wrong key still fails in the clear.
    let opts = ServerOptions {
        allow_unencrypted: true,
        ..quick_opts()
    };
    let (addr, server) = serve(key(1), opts, vm());
    assert!(
        client_handshake_unencrypted(
            TcpStream::connect(&addr).unwrap(),
            &key(2),
            &HelloParams::new(Purpose::Protect, "web", vm()),
        )
        .is_err()
    );
    assert!(matches!(
        server.join().unwrap().unwrap_err().failure,
        HandshakeFailure::Refused {
            code: ErrorCode::AuthFailed,
            ..
        }
    ));
}

/// A protocol-5 server reads our first frame, does not know its type and
/// hangs up: the client says what that probably means.
#[test]
fn an_old_server_that_hangs_up_is_explained() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let old = thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut header = [0u8; 16];
        s.read_exact(&mut header).unwrap();
    });
    let e = client(
        &addr,
        &key(1),
        &HelloParams::new(Purpose::Protect, "web", vm()),
    )
    .unwrap_err();
    old.join().unwrap();
    assert!(
        matches!(e.failure, HandshakeFailure::ClosedDuringNoise),
        "{e}"
    );
    assert!(e.to_string().contains("older than protocol 6"), "{e}");
}

/// A byte altered on the wire after the handshake ends the session with
/// an authentication error; nothing of the altered record is delivered.
#[test]
fn a_bit_flipped_in_flight_ends_the_session() {
    let (addr, server) = serve(key(1), quick_opts(), vm());
    // A proxy that passes the handshake through, then flips one bit of
    // the first bytes the client sends after it.
    let proxy = TcpListener::bind("127.0.0.1:0").unwrap();
    let proxy_addr = proxy.local_addr().unwrap().to_string();
    let relay = thread::spawn(move || {
        let (c, _) = proxy.accept().unwrap();
        let s = TcpStream::connect(&addr).unwrap();
        let (mut c2, mut s2) = (c.try_clone().unwrap(), s.try_clone().unwrap());
        let back = thread::spawn(move || {
            let _ = std::io::copy(&mut s2, &mut c2);
        });
        let (mut c, mut s) = (c, s);
        let mut seen = 0usize;
        let mut buf = [0u8; 65536];
        loop {
            let n = match c.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            // The handshake (the 64-byte Noise frame, then the Hello and
            // the proof as records) is a few hundred bytes; the byte at
            // offset FLIP is inside the 4 KiB record written after it.
            const FLIP: usize = 1500;
            if (seen..seen + n).contains(&FLIP) {
                buf[FLIP - seen] ^= 0x04;
            }
            seen += n;
            if s.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = s.shutdown(std::net::Shutdown::Write);
        let _ = back.join();
    });
    let (mut ch, _) = client(
        &proxy_addr,
        &key(1),
        &HelloParams::new(Purpose::Protect, "web", vm()),
    )
    .unwrap();
    let (mut srv, _, _) = server.join().unwrap().unwrap();
    // Enough bytes that the proxy's counter passes 1000 in this write.
    let data = vec![0x5a; 4096];
    Message::DeviceState { data }.write_to(&mut ch).unwrap();
    ch.flush().unwrap();
    match read_frame(&mut srv) {
        Ok(m) => panic!("an altered record was delivered: {:?}", m.msg_type()),
        Err(e) => assert!(e.to_string().contains("failed authentication"), "{e}"),
    }
    drop(ch);
    drop(srv);
    relay.join().unwrap();
}

#[test]
fn compat_mismatch_lists_every_field_on_both_sides() {
    let mut backup = vm();
    backup.memory_mib = 512;
    backup.vcpus = 1;
    let (addr, server) = serve(key(1), quick_opts(), backup);
    let e = client(
        &addr,
        &key(1),
        &HelloParams::new(Purpose::Protect, "web", vm()),
    )
    .unwrap_err();
    let want = vec![
        "memory: primary 256 MiB, backup 512 MiB".to_string(),
        "vcpus: primary 2, backup 1".to_string(),
    ];
    assert!(
        matches!(&e.failure, HandshakeFailure::Incompatible(l) if *l == want),
        "{e}"
    );
    let e = server.join().unwrap().unwrap_err();
    assert!(
        matches!(&e.failure, HandshakeFailure::Incompatible(l) if *l == want),
        "{e}"
    );
    assert!(e.to_string().contains("checking VM compatibility"), "{e}");
}

#[test]
fn migration_names_the_sides_source_and_destination() {
    let mut dest = vm();
    dest.machine = "pc".into();
    let (addr, server) = serve(key(1), quick_opts(), dest);
    let e = client(
        &addr,
        &key(1),
        &HelloParams::new(Purpose::Migrate, "web", vm()),
    )
    .unwrap_err();
    assert!(
        e.to_string()
            .contains("machine: source \"q35\", destination \"pc\""),
        "{e}"
    );
    server.join().unwrap().unwrap_err();
}

#[test]
fn unknown_vm_is_refused_after_authentication() {
    let (addr, server) = serve(key(1), quick_opts(), vm());
    let e = client(
        &addr,
        &key(1),
        &HelloParams::new(Purpose::Protect, "db", vm()),
    )
    .unwrap_err();
    assert!(
        matches!(&e.failure, HandshakeFailure::Refused { code: ErrorCode::UnknownVm, message } if message.contains("no such VM")),
        "{e}"
    );
    assert!(matches!(
        server.join().unwrap().unwrap_err().failure,
        HandshakeFailure::UnknownVm(_)
    ));
}

#[test]
fn garbage_instead_of_the_handshake_is_a_clean_error() {
    let (addr, server) = serve(key(1), quick_opts(), vm());
    let mut s = TcpStream::connect(&addr).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let e = server.join().unwrap().unwrap_err();
    assert!(e.decode_error().is_some(), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("waiting for the encrypted handshake") && msg.contains("bad frame magic"),
        "{msg}"
    );
}

#[test]
fn a_silent_peer_times_out() {
    let opts = ServerOptions {
        timeout: Duration::from_millis(300),
        ..ServerOptions::default()
    };
    let (addr, server) = serve(key(1), opts, vm());
    let _s = TcpStream::connect(&addr).unwrap();
    let start = Instant::now();
    let e = server.join().unwrap().unwrap_err();
    assert!(matches!(e.failure, HandshakeFailure::Timeout(_)), "{e}");
    assert!(
        e.to_string()
            .contains("waiting for the encrypted handshake: no answer within 300ms"),
        "{e}"
    );
    assert!(start.elapsed() < Duration::from_secs(5));

    // And the client side, against a server that accepts and says nothing.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let hold = thread::spawn(move || {
        let (s, _) = listener.accept().unwrap();
        // Hold the connection open until the client has given up.
        let _ = done_rx.recv();
        drop(s)
    });
    let mut p = HelloParams::new(Purpose::Protect, "web", vm());
    p.timeout = Duration::from_millis(300);
    let e = client(&addr, &key(1), &p).unwrap_err();
    done_tx.send(()).unwrap();
    assert!(matches!(e.failure, HandshakeFailure::Timeout(_)), "{e}");
    assert!(
        e.to_string()
            .contains("waiting for the encrypted handshake"),
        "{e}"
    );
    hold.join().unwrap();
}

#[test]
fn a_peer_that_hangs_up_is_reported_as_closed() {
    let (addr, server) = serve(key(1), quick_opts(), vm());
    drop(TcpStream::connect(&addr).unwrap());
    let e = server.join().unwrap().unwrap_err();
    assert!(matches!(e.failure, HandshakeFailure::Closed), "{e}");
}
