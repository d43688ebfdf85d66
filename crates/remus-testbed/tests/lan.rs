//! The multi-host testbed with real kernel objects (no QEMU): a LAN of
//! namespaces `a`, `b` (vm hosts) and `c` (client host), a sequence server
//! played by the test inside `a`, and the `SeqClient` in `c`.
//!
//! Each test makes its own LAN with its own tag; dropping it deletes the
//! namespaces, also when the test fails. The tests start no processes
//! other than short `ip` and `ping` runs that are waited for. Needs root;
//! skipped with a message otherwise.

use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::linux::fs::MetadataExt;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use remus_testbed::lan::{HOST_BRIDGE, UPLINK};
use remus_testbed::{HostKind, HostSpec, Lan, Netns, SeqClient};

const PORT: u16 = 7000;
const LINE_INTERVAL: Duration = Duration::from_millis(5);
const WAIT: Duration = Duration::from_secs(10);

fn can_run() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipping: needs root (creates network namespaces, bridges and veths)");
        return false;
    }
    true
}

/// This process's namespaces with `tag`.
fn namespaces_with(tag: &str) -> Vec<String> {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    let prefix = format!("remus-{tag}-");
    let suffix = format!("-{}", std::process::id());
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(&prefix) && n.ends_with(&suffix))
        .map(str::to_owned)
        .collect()
}

fn sock(lan: &Lan, host: &str) -> SocketAddrV4 {
    SocketAddrV4::new(lan.addr(host), PORT)
}

// ------------------------------------------------------- sequence server

/// How the test server misbehaves, if at all.
#[derive(Clone, Copy, Default)]
struct Script {
    /// Never sends this number.
    skip: Option<u64>,
    /// Splits some lines over two writes and joins others into one.
    split: bool,
    /// After this many lines: close the sending direction (FIN).
    eof_after: Option<u64>,
    /// After this many lines: reset the connection (RST).
    reset_after: Option<u64>,
}

/// What the server saw: the last number it sent, and the client's numbers
/// (all in order, or the first fault).
#[derive(Debug)]
struct ServerReport {
    sent: u64,
    from_client: Result<u64, String>,
}

/// A sequence-protocol server for one connection, listening in a host's
/// namespace.
struct SeqServer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<ServerReport, String>>>,
}

impl SeqServer {
    fn start(ns: &Netns, addr: SocketAddrV4, script: Script) -> SeqServer {
        // The listening socket is made in the namespace; the thread that
        // serves it need not be there.
        let listener = ns
            .run_in(|| TcpListener::bind(addr))
            .unwrap()
            .expect("bind in the host's namespace");
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || serve(listener, script, &s));
        SeqServer {
            stop,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> ServerReport {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .unwrap()
            .join()
            .expect("server thread panicked")
            .expect("server failed")
    }
}

impl Drop for SeqServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Waits for a connection, giving up when `stop` is set.
fn accept(listener: &TcpListener, stop: &AtomicBool) -> Result<TcpStream, String> {
    loop {
        if stop.load(Ordering::Relaxed) {
            return Err("stopped before a client connected".into());
        }
        let mut pfd = libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, 100) };
        if n > 0 {
            return listener
                .accept()
                .map(|(c, _)| c)
                .map_err(|e| format!("accept: {e}"));
        }
    }
}

fn serve(listener: TcpListener, script: Script, stop: &AtomicBool) -> Result<ServerReport, String> {
    let conn = accept(&listener, stop)?;
    conn.set_nodelay(true).map_err(|e| e.to_string())?;
    let reader = {
        let c = conn.try_clone().map_err(|e| e.to_string())?;
        std::thread::spawn(move || check_client(c))
    };
    let mut w = &conn;
    let mut n = 0u64;
    let mut written = 0u64;
    while !stop.load(Ordering::Relaxed) {
        if script.eof_after == Some(written) {
            conn.shutdown(Shutdown::Write).map_err(|e| e.to_string())?;
            break;
        }
        if script.reset_after == Some(written) {
            // Wake the reader (SHUT_RD sends nothing), then close with
            // SO_LINGER 0: the kernel answers with a reset.
            let _ = conn.shutdown(Shutdown::Read);
            let from_client = reader.join().expect("reader panicked");
            set_linger_zero(&conn);
            drop(conn);
            return Ok(ServerReport {
                sent: n,
                from_client,
            });
        }
        n += 1;
        if script.skip == Some(n) {
            n += 1;
        }
        let line = format!("{n}\n");
        let r = if script.split && n % 10 == 3 {
            // One line over two segments (no Nagle, a pause between).
            let (a, b) = line.split_at(line.len() / 2);
            w.write_all(a.as_bytes()).and_then(|()| {
                std::thread::sleep(Duration::from_millis(2));
                w.write_all(b.as_bytes())
            })
        } else if script.split && n % 10 == 7 {
            // Two lines in one segment.
            n += 1;
            written += 1;
            w.write_all(format!("{line}{n}\n").as_bytes())
        } else {
            w.write_all(line.as_bytes())
        };
        if let Err(e) = r {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            return Err(format!("server send of {n}: {e}"));
        }
        written += 1;
        std::thread::sleep(LINE_INTERVAL);
    }
    // The client hangs up when stopped: the reader then ends.
    let from_client = reader.join().expect("reader panicked");
    Ok(ServerReport {
        sent: n,
        from_client,
    })
}

/// Reads the client's lines until EOF, checking 1, 2, 3, …
fn check_client(c: TcpStream) -> Result<u64, String> {
    let mut last = 0u64;
    for line in BufReader::new(c).lines() {
        let line = match line {
            Ok(l) => l,
            // The client shut down; what it sent so far was checked.
            Err(e) if e.kind() == ErrorKind::ConnectionReset => break,
            Err(e) => return Err(format!("reading the client after {last}: {e}")),
        };
        match line.parse::<u64>() {
            Ok(v) if v == last + 1 => last = v,
            _ => return Err(format!("client: expected {}, got {line:?}", last + 1)),
        }
    }
    Ok(last)
}

fn set_linger_zero(s: &TcpStream) {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket and a correctly sized option value.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&l as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "SO_LINGER: {}", std::io::Error::last_os_error());
}

// ------------------------------------------------------------------ tests

#[test]
fn specs_are_checked_before_anything_is_made() {
    for (specs, what) in [
        (vec![HostSpec::vm("a", "203.0.113.1/24")], "198.18.0.0/15"),
        (
            vec![HostSpec::client("c", "198.51.100.3/24")],
            "198.18.0.0/15",
        ),
        (vec![HostSpec::vm("a", "198.18.0.1")], "ADDRESS/PREFIX"),
        (
            vec![
                HostSpec::vm("a", "198.18.0.1/24"),
                HostSpec::vm("a", "198.18.0.2/24"),
            ],
            "twice",
        ),
        (vec![HostSpec::vm("lan", "198.18.0.1/24")], "taken"),
        (
            vec![HostSpec::vm("much-too-long", "198.18.0.1/24")],
            "15 characters",
        ),
    ] {
        let e = Lan::new("lanspec", &specs).err().expect("refused");
        assert!(format!("{e:#}").contains(what), "{e:#}");
    }
    assert!(Lan::new("bad tag", &[]).is_err());
    assert!(namespaces_with("lanspec").is_empty());
}

#[test]
fn run_in_moves_only_its_own_thread() {
    if !can_run() {
        return;
    }
    let lan = Lan::new("lanrun", &[HostSpec::client("c", "198.18.0.3/24")]).unwrap();
    let c = lan.host("c");
    let inode = |p: &str| std::fs::metadata(p).unwrap().st_ino();
    let want = inode(&format!("/run/netns/{}", c.name));
    let mine = inode("/proc/thread-self/ns/net");
    assert_ne!(mine, want);
    let (inside, child) = c
        .run_in(|| {
            let child = std::thread::spawn(move || inode("/proc/thread-self/ns/net"))
                .join()
                .unwrap();
            (inode("/proc/thread-self/ns/net"), child)
        })
        .unwrap();
    assert_eq!((inside, child), (want, want));
    assert_eq!(inode("/proc/thread-self/ns/net"), mine);
    let spawned = c
        .spawn(move || inode("/proc/thread-self/ns/net"))
        .unwrap()
        .join()
        .unwrap();
    assert_eq!(spawned, want);

    // What the host sees: its address on eth0, no IPv6, no route out.
    let addrs = c.exec_ok("ip", &["-o", "addr"]).unwrap();
    assert!(addrs.contains("eth0    inet 198.18.0.3/24"), "{addrs}");
    assert!(!addrs.contains("inet6"), "{addrs}");
    let routes = c.exec_ok("ip", &["route"]).unwrap();
    assert!(!routes.contains("default"), "{routes}");
    assert_eq!(lan.kind("c"), HostKind::Client);

    // Panics in the closure reach the caller.
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let _ = c.run_in(|| panic!("inside"));
    }));
    assert!(r.is_err());

    let names = lan.namespaces();
    assert_eq!(names.len(), 2);
    drop(lan);
    assert!(namespaces_with("lanrun").is_empty());
    for n in names {
        assert!(!std::path::Path::new("/run/netns").join(n).exists());
    }
}

#[test]
fn hosts_reach_each_other_until_the_plug_is_pulled() {
    if !can_run() {
        return;
    }
    let lan = Lan::standard("lanping").unwrap();
    assert_eq!(lan.hosts(), ["a", "b", "c"]);
    assert_eq!(namespaces_with("lanping").len(), 4);
    assert_eq!(lan.addr("a"), Ipv4Addr::new(198, 18, 0, 1));
    assert_eq!(lan.prefix_len("b"), 24);

    // A vm host: its address on br0, its LAN link a port of br0.
    let a = lan.host("a");
    let br = a
        .exec_ok("ip", &["-o", "-4", "addr", "show", HOST_BRIDGE])
        .unwrap();
    assert!(br.contains("inet 198.18.0.1/24"), "{br}");
    let link = a.exec_ok("ip", &["-o", "link", "show", UPLINK]).unwrap();
    assert!(link.contains(&format!("master {HOST_BRIDGE}")), "{link}");
    assert!(!a.exec_ok("ip", &["route"]).unwrap().contains("default"));

    assert!(lan.ping("a", lan.addr("b")), "a cannot ping b");
    assert!(lan.ping("b", lan.addr("a")), "b cannot ping a");
    assert!(lan.ping("c", lan.addr("a")), "c cannot ping a");
    assert!(lan.ping("c", lan.addr("b")), "c cannot ping b");

    // Something to connect to in a.
    let listener = a
        .run_in(|| TcpListener::bind(sock(&lan, "a")))
        .unwrap()
        .unwrap();
    let connect = || {
        lan.host("c")
            .run_in(|| TcpStream::connect_timeout(&sock(&lan, "a").into(), Duration::from_secs(1)))
            .unwrap()
    };
    connect().expect("c connects to a");

    lan.cut("a").unwrap();
    assert!(
        !lan.ping("c", lan.addr("a")),
        "c still reaches a after the cut"
    );
    assert!(
        !lan.ping("b", lan.addr("a")),
        "b still reaches a after the cut"
    );
    assert!(lan.ping("c", lan.addr("b")), "the cut of a took b off too");
    let e = connect().expect_err("c connected to a through a pulled plug");
    assert!(
        matches!(e.kind(), ErrorKind::TimedOut | ErrorKind::HostUnreachable),
        "{e:?}"
    );
    let e = SeqClient::start_with(
        lan.host("c"),
        sock(&lan, "a"),
        LINE_INTERVAL,
        Duration::from_millis(500),
    )
    .err()
    .expect("SeqClient connected through a pulled plug");
    assert!(
        format!("{e:#}").contains("connect to 198.18.0.1:7000"),
        "{e:#}"
    );

    lan.restore("a").unwrap();
    // At once: no forward delay on the ports (ping waits 2 s at most).
    assert!(
        lan.ping("c", lan.addr("a")),
        "c cannot reach a after restore"
    );
    connect().expect("c connects to a after restore");
    drop(listener);

    drop(lan);
    assert!(namespaces_with("lanping").is_empty());
}

#[test]
fn seq_client_follows_a_correct_server() {
    if !can_run() {
        return;
    }
    let lan = Lan::standard("lanseq").unwrap();
    let server = SeqServer::start(
        lan.host("a"),
        sock(&lan, "a"),
        Script {
            split: true,
            ..Script::default()
        },
    );
    let mut client = SeqClient::start(lan.host("c"), sock(&lan, "a"), LINE_INTERVAL).unwrap();
    assert_eq!(client.peer(), sock(&lan, "a"));
    client.wait_received(200, WAIT).unwrap();
    assert_eq!(client.error(), None);
    assert!(client.received() >= 200);
    assert!(client.sent() > 0);
    assert!(client.last_received_at().unwrap().elapsed() < Duration::from_secs(1));
    let gap = client.longest_gap();
    assert!(
        gap >= LINE_INTERVAL && gap < Duration::from_secs(1),
        "{gap:?}"
    );
    client.stop();
    // Stopping is not an error.
    assert_eq!(client.error(), None);
    let sent = client.sent();
    let report = server.finish();
    assert_eq!(report.from_client, Ok(sent), "{report:?}");
    assert!(report.sent >= 200);
    // Waiting on a stopped client fails at once.
    assert!(client.wait_received(u64::MAX, WAIT).is_err());
    drop(client);
    drop(lan);
    assert!(namespaces_with("lanseq").is_empty());
}

#[test]
fn seq_client_reports_a_gap() {
    if !can_run() {
        return;
    }
    let lan = Lan::standard("langap").unwrap();
    let _server = SeqServer::start(
        lan.host("a"),
        sock(&lan, "a"),
        Script {
            skip: Some(50),
            ..Script::default()
        },
    );
    let client = SeqClient::start(lan.host("c"), sock(&lan, "a"), LINE_INTERVAL).unwrap();
    let e = client.wait_received(100, WAIT).unwrap_err().to_string();
    assert!(e.contains("gap: expected 50, got 51"), "{e}");
    assert_eq!(
        client.violation().as_deref(),
        Some("gap: expected 50, got 51")
    );
    assert_eq!(client.error(), client.violation());
    assert_eq!(client.io_error(), None);
    // It carries on from the server's numbering.
    assert!(client.received() >= 51);
}

#[test]
fn seq_client_reports_eof_and_reset() {
    if !can_run() {
        return;
    }
    let lan = Lan::standard("laneof").unwrap();

    let server = SeqServer::start(
        lan.host("a"),
        sock(&lan, "a"),
        Script {
            eof_after: Some(20),
            ..Script::default()
        },
    );
    let mut client = SeqClient::start(lan.host("c"), sock(&lan, "a"), LINE_INTERVAL).unwrap();
    let e = client.wait_error(WAIT).expect("EOF reported");
    assert_eq!(e, "EOF: the server closed the connection after line 20");
    assert_eq!(client.io_error().unwrap().0, ErrorKind::UnexpectedEof);
    assert_eq!(client.received(), 20);
    assert_eq!(client.violation(), None);
    client.stop();
    let report = server.finish();
    assert_eq!(report.sent, 20);
    assert_eq!(report.from_client, Ok(client.sent()));

    let server = SeqServer::start(
        lan.host("b"),
        sock(&lan, "b"),
        Script {
            reset_after: Some(30),
            ..Script::default()
        },
    );
    let client = SeqClient::start(lan.host("c"), sock(&lan, "b"), LINE_INTERVAL).unwrap();
    let e = client.wait_received(1000, WAIT).unwrap_err().to_string();
    let (kind, msg) = client.io_error().expect("reset reported");
    assert_eq!(kind, ErrorKind::ConnectionReset, "{msg} / {e}");
    assert!(e.contains("reset"), "{e}");
    assert_eq!(client.received(), 30);
    assert_eq!(server.finish().sent, 30);
}
