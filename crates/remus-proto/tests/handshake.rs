//! The handshake over real loopback TCP connections.

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use remus_proto::{
    CheckpointKind, DiskCompat, Epoch, ErrorCode, HandshakeError, HandshakeFailure, Hello,
    HelloParams, Key, Message, Purpose, ServerOptions, Session, VmCompat, client_handshake,
    read_frame, server_handshake_with,
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

type ServerResult = Result<(Session, Hello), HandshakeError>;

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
        let (mut s, _) = listener.accept().unwrap();
        server_handshake_with(&mut s, &key, &opts, |name, _purpose| {
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
) -> (TcpStream, Result<Session, HandshakeError>) {
    let mut s = TcpStream::connect(addr).unwrap();
    let r = client_handshake(&mut s, key, params);
    (s, r)
}

#[test]
fn handshake_succeeds_and_the_session_carries_checkpoints() {
    let (addr, server) = serve(key(1), quick_opts(), vm());
    let (mut s, r) = client(
        &addr,
        &key(1),
        &HelloParams::new(Purpose::Protect, "web", vm()),
    );
    let session = r.unwrap();
    assert_eq!(session.version, remus_proto::PROTOCOL_VERSION);
    assert_eq!(session.vm_name, "web");
    assert_eq!(session.peer, addr);
    let (srv_session, hello) = server.join().unwrap().unwrap();
    assert_eq!(srv_session.version, session.version);
    assert_eq!(srv_session.purpose, Purpose::Protect);
    assert_eq!(hello.compat, vm());
    // The stream is positioned right after the handshake.
    Message::CheckpointBegin {
        epoch: Epoch(1),
        kind: CheckpointKind::InitialSync,
    }
    .write_to(&mut s)
    .unwrap();
    s.flush().unwrap();
}

#[test]
fn wrong_key_fails_on_both_sides_with_a_clear_error() {
    let (addr, server) = serve(key(1), quick_opts(), vm());
    let (_s, r) = client(
        &addr,
        &key(2),
        &HelloParams::new(Purpose::Protect, "web", vm()),
    );
    let e = r.unwrap_err();
    assert!(
        matches!(e.failure, HandshakeFailure::PeerNotAuthenticated),
        "{e}"
    );
    let msg = e.to_string();
    assert!(
        msg.contains(&addr) && msg.contains("verifying the server's proof") && msg.contains("key"),
        "{msg}"
    );

    let e = server.join().unwrap().unwrap_err();
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
}

/// A client without the key that ignores the server's proof and pushes a
/// checkpoint anyway gets nothing accepted.
#[test]
fn a_peer_without_the_key_cannot_push_vm_state() {
    let (addr, server) = serve(key(1), quick_opts(), vm());
    let mut s = TcpStream::connect(&addr).unwrap();
    let hello = Message::Hello(Hello {
        max_version: remus_proto::PROTOCOL_VERSION,
        min_version: remus_proto::PROTOCOL_VERSION,
        purpose: Purpose::Protect,
        vm_name: "web".into(),
        compat: vm(),
        client_nonce: [0; 32],
    });
    hello.write_to(&mut s).unwrap();
    assert!(matches!(read_frame(&mut s).unwrap(), Message::HelloAck(_)));
    // Forged proof, then VM state.
    Message::AuthProof {
        client_proof: [0; 32],
    }
    .write_to(&mut s)
    .unwrap();
    assert!(matches!(
        read_frame(&mut s).unwrap(),
        Message::Error {
            code: ErrorCode::AuthFailed,
            ..
        }
    ));
    // The server has hung up; whatever we push now goes nowhere.
    let _ = Message::CheckpointBegin {
        epoch: Epoch(1),
        kind: CheckpointKind::Checkpoint,
    }
    .write_to(&mut s);
    let e = server.join().unwrap().unwrap_err();
    assert!(
        matches!(e.failure, HandshakeFailure::PeerNotAuthenticated),
        "{e}"
    );
    assert!(
        e.to_string().contains("verifying the client's proof"),
        "{e}"
    );

    // Skipping the proof altogether is a protocol error, not state.
    let (addr, server) = serve(key(1), quick_opts(), vm());
    let mut s = TcpStream::connect(&addr).unwrap();
    hello.write_to(&mut s).unwrap();
    assert!(matches!(read_frame(&mut s).unwrap(), Message::HelloAck(_)));
    Message::CheckpointBegin {
        epoch: Epoch(1),
        kind: CheckpointKind::Checkpoint,
    }
    .write_to(&mut s)
    .unwrap();
    let e = server.join().unwrap().unwrap_err();
    assert!(
        matches!(
            e.failure,
            HandshakeFailure::Unexpected {
                expected: "AuthProof",
                ..
            }
        ),
        "{e}"
    );
}

/// A server without the right key cannot get a primary's VM state: the
/// client refuses before sending anything but its Hello.
#[test]
fn a_server_without_the_key_gets_no_vm_state() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let fake = thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let Message::Hello(_) = read_frame(&mut s).unwrap() else {
            panic!()
        };
        Message::HelloAck(remus_proto::HelloAck {
            chosen_version: remus_proto::PROTOCOL_VERSION,
            server_nonce: [1; 32],
            server_proof: [2; 32],
        })
        .write_to(&mut s)
        .unwrap();
        // Everything the client sends from now on.
        let mut got = Vec::new();
        while let Ok(m) = read_frame(&mut s) {
            got.push(m.msg_type());
        }
        got
    });
    let (s, r) = client(
        &addr,
        &key(1),
        &HelloParams::new(Purpose::Protect, "web", vm()),
    );
    assert!(matches!(
        r.unwrap_err().failure,
        HandshakeFailure::PeerNotAuthenticated
    ));
    drop(s);
    assert_eq!(fake.join().unwrap(), vec![remus_proto::MsgType::Error]);
}

#[test]
fn versions_too_new_or_too_old_are_refused_by_name() {
    // Client too new.
    let (addr, server) = serve(key(1), quick_opts(), vm());
    let mut p = HelloParams::new(Purpose::Protect, "web", vm());
    p.versions = 6..=8;
    let (_s, r) = client(&addr, &key(1), &p);
    let e = r.unwrap_err();
    assert!(
        matches!(&e.failure, HandshakeFailure::Refused { code: ErrorCode::VersionMismatch, message } if message.contains("6..=8")),
        "{e}"
    );
    let e = server.join().unwrap().unwrap_err();
    assert!(
        matches!(e.failure, HandshakeFailure::VersionMismatch { .. }),
        "{e}"
    );
    assert!(
        e.to_string().contains(&format!(
            "no common protocol version: we speak {}..={}, the peer 6..=8",
            remus_proto::MIN_PROTOCOL_VERSION,
            remus_proto::PROTOCOL_VERSION
        )),
        "{e}"
    );

    // Client too old for a server that only speaks newer versions.
    let opts = ServerOptions {
        versions: remus_proto::PROTOCOL_VERSION + 1..=remus_proto::PROTOCOL_VERSION + 2,
        ..quick_opts()
    };
    let (addr, server) = serve(key(1), opts, vm());
    let (_s, r) = client(
        &addr,
        &key(1),
        &HelloParams::new(Purpose::Protect, "web", vm()),
    );
    assert!(matches!(
        r.unwrap_err().failure,
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
        versions: 1..=3,
        ..quick_opts()
    };
    let (addr, server) = serve(key(1), opts, vm());
    let mut p = HelloParams::new(Purpose::Protect, "web", vm());
    p.versions = 2..=4;
    let (_s, r) = client(&addr, &key(1), &p);
    assert_eq!(r.unwrap().version, 3);
    assert_eq!(server.join().unwrap().unwrap().0.version, 3);
}

#[test]
fn compat_mismatch_lists_every_field_on_both_sides() {
    let mut backup = vm();
    backup.memory_mib = 512;
    backup.vcpus = 1;
    let (addr, server) = serve(key(1), quick_opts(), backup);
    let (_s, r) = client(
        &addr,
        &key(1),
        &HelloParams::new(Purpose::Protect, "web", vm()),
    );
    let want = vec![
        "memory: primary 256 MiB, backup 512 MiB".to_string(),
        "vcpus: primary 2, backup 1".to_string(),
    ];
    let e = r.unwrap_err();
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
    let (_s, r) = client(
        &addr,
        &key(1),
        &HelloParams::new(Purpose::Migrate, "web", vm()),
    );
    assert!(
        r.unwrap_err()
            .to_string()
            .contains("machine: source \"q35\", destination \"pc\"")
    );
    server.join().unwrap().unwrap_err();
}

#[test]
fn unknown_vm_is_refused_after_authentication() {
    let (addr, server) = serve(key(1), quick_opts(), vm());
    let (_s, r) = client(
        &addr,
        &key(1),
        &HelloParams::new(Purpose::Protect, "db", vm()),
    );
    let e = r.unwrap_err();
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
fn garbage_instead_of_hello_is_a_clean_error() {
    let (addr, server) = serve(key(1), quick_opts(), vm());
    let mut s = TcpStream::connect(&addr).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let e = server.join().unwrap().unwrap_err();
    assert!(e.decode_error().is_some(), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("waiting for Hello") && msg.contains("bad frame magic"),
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
            .contains("waiting for Hello: no answer within 300ms"),
        "{e}"
    );
    assert!(start.elapsed() < Duration::from_secs(5));

    // And the client side, against a server that accepts and says nothing.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let hold = thread::spawn(move || {
        listener.accept().map(|(s, _)| {
            thread::sleep(Duration::from_millis(800));
            drop(s)
        })
    });
    let mut p = HelloParams::new(Purpose::Protect, "web", vm());
    p.timeout = Duration::from_millis(300);
    let (_s, r) = client(&addr, &key(1), &p);
    let e = r.unwrap_err();
    assert!(matches!(e.failure, HandshakeFailure::Timeout(_)), "{e}");
    assert!(e.to_string().contains("waiting for HelloAck"), "{e}");
    hold.join().unwrap().unwrap();
}

#[test]
fn a_peer_that_hangs_up_is_reported_as_closed() {
    let (addr, server) = serve(key(1), quick_opts(), vm());
    drop(TcpStream::connect(&addr).unwrap());
    let e = server.join().unwrap().unwrap_err();
    assert!(matches!(e.failure, HandshakeFailure::Closed), "{e}");
}
