//! End-to-end tests with real kernel objects: a network namespace, a bridge
//! `br0` (198.18.0.1/24) inside it, a real tap, and the relay's unix socket
//! with the test playing QEMU's part.
//!
//! Every test creates its own namespace `remus-nettest-<pid>-<n>` and does
//! its work on a dedicated thread that `setns`es into it; a Drop guard
//! deletes the namespace even when the test fails. The tests start no
//! background processes (only short `ip` commands that are waited for), so
//! there is nothing else to kill.
//!
//! Need root (CAP_NET_ADMIN + CAP_SYS_ADMIN); skipped with a message
//! otherwise.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::linux::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use remus_net::frame::{self, MAX_FRAME_LEN};
use remus_net::tap::{self, Tap, TapError};
use remus_net::{Egress, Relay, TapSink};

const FAKE_MAC: [u8; 6] = [0x02, 0x00, 0x5e, 0x10, 0x00, 0x02];
const VM_IP: [u8; 4] = [198, 18, 0, 2];
const BR_IP: [u8; 4] = [198, 18, 0, 1];
const WAIT: Duration = Duration::from_secs(5);

fn can_run() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipping: needs root (creates network namespaces, bridges and taps)");
        return false;
    }
    if !Path::new("/dev/net/tun").exists() {
        eprintln!("skipping: /dev/net/tun not available");
        return false;
    }
    true
}

/// A network namespace with `br0` at 198.18.0.1/24; deleted on drop.
struct Netns {
    name: String,
}

impl Netns {
    fn new() -> Netns {
        static N: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "remus-nettest-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        run(Command::new("ip").args(["netns", "add", &name]));
        // From here on the guard owns the namespace.
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns.ip(&[
            "link",
            "add",
            "br0",
            "type",
            "bridge",
            "stp_state",
            "0",
            "forward_delay",
            "0",
        ]);
        ns.ip(&["addr", "add", "198.18.0.1/24", "dev", "br0"]);
        ns.ip(&["link", "set", "br0", "up"]);
        ns
    }

    /// A tap on `br0`, returned once `br0` can transmit. The bridge gets
    /// its carrier when this first port comes up, but the kernel attaches
    /// its queueing discipline later, from the link-watch work queue; until
    /// then (`qdisc noop`) everything `br0` sends, ARP replies included, is
    /// dropped. That work is delayed behind the RTNL lock, which other
    /// tests' namespace teardowns hold, so a test that sends at once can
    /// lose its only request. A real guest retries ARP; these tests send
    /// exactly once and count frames, so they wait for the bridge instead.
    fn tap_on_bridge(&self, name: Option<&str>) -> Tap {
        let tap = Tap::create_on_bridge(name, "br0").unwrap();
        wait_for("br0 to be able to transmit", || {
            let out = Command::new("ip")
                .args(["-n", &self.name, "-o", "link", "show", "dev", "br0"])
                .output()
                .expect("run ip");
            let line = String::from_utf8_lossy(&out.stdout);
            out.status.success() && line.contains("state UP") && !line.contains("qdisc noop")
        });
        tap
    }

    fn ip(&self, args: &[&str]) {
        run(Command::new("ip").arg("-n").arg(&self.name).args(args));
    }

    /// Runs `f` on a fresh thread that has joined this namespace.
    fn run_in<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/run/netns/{}", self.name);
        std::thread::scope(|s| {
            let h = s.spawn(|| {
                let ns = File::open(&path).expect("open netns");
                // SAFETY: valid fd; affects only this thread.
                let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(rc, 0, "setns: {}", io::Error::last_os_error());
                f()
            });
            match h.join() {
                Ok(v) => v,
                Err(p) => std::panic::resume_unwind(p),
            }
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        match Command::new("ip")
            .args(["netns", "del", &self.name])
            .status()
        {
            Ok(s) if s.success() => {}
            other => eprintln!("warning: ip netns del {} failed: {other:?}", self.name),
        }
    }
}

fn run(cmd: &mut Command) {
    let out = cmd.output().expect("run ip");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn netns_inode_of_current_thread() -> u64 {
    std::fs::metadata("/proc/thread-self/ns/net")
        .expect("stat /proc/thread-self/ns/net")
        .st_ino()
}

// ---------------------------------------------------------------- packets

fn arp_request() -> Vec<u8> {
    let mut f = Vec::with_capacity(60);
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&FAKE_MAC);
    f.extend_from_slice(&[0x08, 0x06]);
    f.extend_from_slice(&[0, 1, 0x08, 0x00, 6, 4, 0, 1]); // Ethernet/IPv4, request
    f.extend_from_slice(&FAKE_MAC);
    f.extend_from_slice(&VM_IP);
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&BR_IP);
    f.resize(60, 0); // minimum Ethernet frame without FCS
    f
}

/// If `f` is the kernel's ARP reply to [`arp_request`], the bridge's MAC.
fn parse_arp_reply(f: &[u8]) -> Option<[u8; 6]> {
    if f.len() < 42 || f[12..14] != [0x08, 0x06] || f[0..6] != FAKE_MAC {
        return None;
    }
    let a = &f[14..];
    if a[6..8] != [0, 2] || a[14..18] != BR_IP || a[18..24] != FAKE_MAC || a[24..28] != VM_IP {
        return None;
    }
    let mut mac = [0; 6];
    mac.copy_from_slice(&a[8..14]);
    (f[6..12] == mac).then_some(mac)
}

fn inet_checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn icmp_echo_request(dst_mac: [u8; 6], id: u16, seq: u16, payload: &[u8]) -> Vec<u8> {
    let mut icmp = vec![8, 0, 0, 0];
    icmp.extend_from_slice(&id.to_be_bytes());
    icmp.extend_from_slice(&seq.to_be_bytes());
    icmp.extend_from_slice(payload);
    let c = inet_checksum(&icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());

    let total = (20 + icmp.len()) as u16;
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&[0x12, 0x34, 0x40, 0x00, 64, 1, 0, 0]);
    ip.extend_from_slice(&VM_IP);
    ip.extend_from_slice(&BR_IP);
    let c = inet_checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());

    let mut f = Vec::new();
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&FAKE_MAC);
    f.extend_from_slice(&[0x08, 0x00]);
    f.extend_from_slice(&ip);
    f.extend_from_slice(&icmp);
    f
}

fn is_icmp_echo_reply(f: &[u8], br_mac: [u8; 6], id: u16, seq: u16, payload: &[u8]) -> bool {
    if f.len() < 14 + 20 + 8 || f[0..6] != FAKE_MAC || f[6..12] != br_mac || f[12..14] != [8, 0] {
        return false;
    }
    let ip = &f[14..];
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    if ip[0] >> 4 != 4 || ip[9] != 1 || ip[12..16] != BR_IP || ip[16..20] != VM_IP {
        return false;
    }
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    let Some(icmp) = ip.get(ihl..total) else {
        return false;
    };
    icmp.len() >= 8
        && icmp[0] == 0
        && icmp[4..6] == id.to_be_bytes()
        && icmp[6..8] == seq.to_be_bytes()
        && &icmp[8..] == payload
        && inet_checksum(icmp) == 0
}

// ------------------------------------------------------------ fake QEMU

fn send_frame(s: &mut UnixStream, f: &[u8]) {
    let mut wire = Vec::new();
    frame::encode(f, &mut wire).unwrap();
    s.write_all(&wire).expect("write to relay");
}

/// Reads frames (checking the framing of each) until `want` matches one,
/// or `timeout` passes. Unrelated frames (IPv6 noise from br0) are skipped.
fn recv_until<T>(
    s: &mut UnixStream,
    timeout: Duration,
    mut want: impl FnMut(&[u8]) -> Option<T>,
) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.checked_duration_since(Instant::now())?;
        s.set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .unwrap();
        let mut hdr = [0u8; 4];
        match s.read_exact(&mut hdr) {
            Ok(()) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return None;
            }
            Err(e) => panic!("reading from relay: {e}"),
        }
        let len = u32::from_be_bytes(hdr) as usize;
        assert!(
            (1..=MAX_FRAME_LEN).contains(&len),
            "bad length prefix {len}"
        );
        // The rest of a frame follows its prefix at once.
        s.set_read_timeout(Some(WAIT)).unwrap();
        let mut f = vec![0u8; len];
        s.read_exact(&mut f).expect("frame body after prefix");
        assert!(len >= 14, "runt Ethernet frame of {len} bytes");
        if let Some(v) = want(&f) {
            return Some(v);
        }
    }
}

fn arp_roundtrip(s: &mut UnixStream) -> [u8; 6] {
    send_frame(s, &arp_request());
    recv_until(s, WAIT, parse_arp_reply).expect("no ARP reply from the kernel")
}

fn connect(path: &Path) -> UnixStream {
    UnixStream::connect(path).expect("connect to relay socket")
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

// ------------------------------------------------------------------ tests

/// Runs `f` in a fresh namespace with a socket path for a relay (skipped
/// without root).
fn in_namespace(f: impl FnOnce(&Netns, &Path) + Send) {
    if !can_run() {
        return;
    }
    let ns = Netns::new();
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("n0.sock");
    ns.run_in(|| f(&ns, &sock));
}

#[test]
fn threads_spawned_after_setns_inherit_the_namespace() {
    if !can_run() {
        return;
    }
    let ns = Netns::new();
    let want = std::fs::metadata(format!("/run/netns/{}", ns.name))
        .unwrap()
        .st_ino();
    let host = netns_inode_of_current_thread();
    assert_ne!(host, want);
    let (mine, child) = ns.run_in(|| {
        let child = std::thread::spawn(netns_inode_of_current_thread)
            .join()
            .unwrap();
        (netns_inode_of_current_thread(), child)
    });
    assert_eq!(mine, want);
    assert_eq!(child, want);
    // The test thread itself never moved.
    assert_eq!(netns_inode_of_current_thread(), host);
}

#[test]
fn arp_and_icmp_round_trip_through_tap_and_bridge() {
    if !can_run() {
        return;
    }
    let ns = Netns::new();
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("n0.sock");
    let stats = ns.run_in(|| {
        let tap = ns.tap_on_bridge(Some("remus-t0"));
        assert_eq!(tap.name(), "remus-t0");
        let relay = Relay::start(&sock, tap).unwrap();
        assert!(sock.exists());
        let mut qemu = connect(&sock);

        let br_mac = arp_roundtrip(&mut qemu);

        let payload = b"remus-net echo payload 0123456789";
        send_frame(&mut qemu, &icmp_echo_request(br_mac, 0x4242, 7, payload));
        recv_until(&mut qemu, WAIT, |f| {
            is_icmp_echo_reply(f, br_mac, 0x4242, 7, payload).then_some(())
        })
        .expect("no ICMP echo reply from the kernel");

        // Counters are bumped right after the write that delivered the
        // reply, so they may trail our read by a moment.
        wait_for("counters", || {
            let s = relay.stats();
            s.frames_to_vm >= 2 && s.frames_to_tap == 2
        });
        let stats = relay.stats();
        assert_eq!(stats.connections, 1);
        assert_eq!(stats.frames_from_vm, 2);
        assert_eq!(stats.frames_to_tap, 2);
        assert_eq!(stats.drops.corrupt_streams, 0);
        let stats = relay.shutdown();
        assert!(!sock.exists(), "socket file not removed");
        stats
    });
    assert_eq!(stats.bytes_from_vm, stats.bytes_to_tap);
}

#[test]
fn qemu_can_disconnect_and_reconnect() {
    in_namespace(|ns, sock| {
        let relay = Relay::start(sock, ns.tap_on_bridge(None)).unwrap();
        assert!(relay.tap_name().starts_with("tap"), "{}", relay.tap_name());

        let mut first = connect(sock);
        let mac1 = arp_roundtrip(&mut first);
        wait_for("connection", || relay.is_vm_connected());
        // Leave half a frame behind: counted as truncated, nothing breaks.
        first.write_all(&[0, 0, 0, 60, 1, 2, 3]).unwrap();
        drop(first);
        wait_for("disconnect", || !relay.is_vm_connected());

        // A restored QEMU reconnects to the same path.
        let mut second = connect(sock);
        let mac2 = arp_roundtrip(&mut second);
        assert_eq!(mac1, mac2);
        drop(second);
        let mut third = connect(sock);
        arp_roundtrip(&mut third);

        let stats = relay.stats();
        assert_eq!(stats.connections, 3);
        assert_eq!(stats.drops.truncated_at_disconnect, 1);
        assert_eq!(stats.drops.corrupt_streams, 0);
    });
}

#[test]
fn garbage_length_closes_only_that_connection() {
    in_namespace(|ns, sock| {
        let relay = Relay::start(sock, ns.tap_on_bridge(None)).unwrap();
        for (i, garbage) in [
            &[0xff, 0xff, 0xff, 0xff, 1, 2, 3][..],
            &[0, 0, 0, 0][..],
            &[0, 1, 0, 15][..], // 65551: just above the limit
        ]
        .into_iter()
        .enumerate()
        {
            let mut bad = connect(sock);
            bad.write_all(garbage).unwrap();
            bad.set_read_timeout(Some(WAIT)).unwrap();
            let mut buf = [0u8; 64];
            // The relay closes the connection: EOF (skip any frames the
            // bridge pushed to us before that).
            loop {
                match bad.read(&mut buf) {
                    Ok(0) => break,
                    Ok(_) => continue,
                    Err(e) if e.kind() == io::ErrorKind::ConnectionReset => break,
                    Err(e) => panic!("expected the relay to close the connection: {e}"),
                }
            }
            assert_eq!(relay.stats().drops.corrupt_streams, i as u64 + 1);

            // The next QEMU is served normally.
            let mut good = connect(sock);
            arp_roundtrip(&mut good);
        }
        let stats = relay.stats();
        assert_eq!(stats.connections, 6);
        assert_eq!(stats.frames_from_vm, 3);
    });
}

#[test]
fn missing_or_wrong_bridge_is_a_clear_error() {
    if !can_run() {
        return;
    }
    let ns = Netns::new();
    ns.run_in(|| {
        let e = Tap::create_on_bridge(Some("remus-t1"), "br-x").unwrap_err();
        assert!(
            matches!(&e, TapError::NoSuchBridge(b) if b == "br-x"),
            "{e:?}"
        );
        assert_eq!(e.to_string(), "bridge 'br-x' does not exist");
        // Checked before creating anything: no tap left behind.
        assert_eq!(tap::ifindex("remus-t1").unwrap(), None);

        let t = Tap::create(Some("remus-t1")).unwrap();
        let e = t.attach_to_bridge("br-x").unwrap_err();
        assert!(matches!(e, TapError::NoSuchBridge(_)), "{e:?}");
        let e = t.attach_to_bridge("lo").unwrap_err();
        assert!(matches!(&e, TapError::NotABridge(b) if b == "lo"), "{e:?}");
        assert_eq!(e.to_string(), "'lo' is not a bridge");

        let e = Tap::create(Some("remus-tap-name-too-long")).unwrap_err();
        assert!(matches!(e, TapError::NameTooLong { len: 23, .. }), "{e:?}");
    });
}

#[test]
fn tap_lives_in_the_namespace_and_vanishes_when_closed() {
    if !can_run() {
        return;
    }
    let ns = Netns::new();
    let (idx, after) = ns.run_in(|| {
        let t = Tap::create_on_bridge(Some("remus-t2"), "br0").unwrap();
        let idx = t.ifindex().unwrap();
        assert_eq!(tap::ifindex("remus-t2").unwrap(), Some(idx));
        drop(t);
        // Not necessarily at once: another test thread may fork `ip` right
        // now, and the child holds a copy of our (CLOEXEC) fd until exec.
        let deadline = Instant::now() + WAIT;
        let mut after = tap::ifindex("remus-t2").unwrap();
        while after.is_some() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
            after = tap::ifindex("remus-t2").unwrap();
        }
        (idx, after)
    });
    assert!(idx > 0);
    assert_eq!(after, None, "non-persistent tap must disappear on close");
    // Not visible in the test's own namespace.
    assert_eq!(tap::ifindex("remus-t2").unwrap(), None);
}

/// An output buffer like Remus needs: holds VM frames until released.
struct Holding {
    held: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl Egress for Holding {
    fn frame_from_vm(&mut self, frame: &[u8], _tap: &TapSink) {
        self.held.lock().unwrap().push(frame.to_vec());
    }
}

#[test]
fn egress_seam_can_hold_and_release_vm_output() {
    in_namespace(|ns, sock| {
        let held = Arc::new(Mutex::new(Vec::new()));
        let relay = Relay::start_with_egress(
            sock,
            ns.tap_on_bridge(None),
            Box::new(Holding { held: held.clone() }),
        )
        .unwrap();
        let mut qemu = connect(sock);
        send_frame(&mut qemu, &arp_request());
        wait_for("frame held", || held.lock().unwrap().len() == 1);
        assert!(
            recv_until(&mut qemu, Duration::from_millis(500), parse_arp_reply).is_none(),
            "held frame reached the network"
        );
        let stats = relay.stats();
        assert_eq!((stats.frames_from_vm, stats.frames_to_tap), (1, 0));

        // "Checkpoint acked": release from another thread.
        let sink = relay.tap_sink();
        let frames = std::mem::take(&mut *held.lock().unwrap());
        std::thread::spawn(move || {
            for f in frames {
                sink.send(&f).unwrap();
            }
        })
        .join()
        .unwrap();
        recv_until(&mut qemu, WAIT, parse_arp_reply).expect("released frame got no reply");
        assert_eq!(relay.stats().frames_to_tap, 1);
    });
}

#[test]
fn shutdown_is_prompt_even_when_qemu_does_not_read() {
    in_namespace(|ns, sock| {
        let relay = Relay::start(sock, ns.tap_on_bridge(None)).unwrap();
        let mut qemu = connect(sock);
        // Provoke far more ARP replies than the socket buffer holds, and
        // never read them: the tap → VM writer ends up blocked.
        let mut burst = Vec::new();
        for _ in 0..20_000 {
            frame::encode(&arp_request(), &mut burst).unwrap();
        }
        let writer = {
            let mut q = qemu.try_clone().unwrap();
            std::thread::spawn(move || {
                let _ = q.write_all(&burst);
            })
        };
        // The relay writes while the socket is below a quarter of its
        // buffer (some 70 such small frames), then waits for room.
        wait_for("traffic towards the VM", || relay.stats().frames_to_vm > 50);
        std::thread::sleep(Duration::from_millis(200));

        let t0 = Instant::now();
        let stats = relay.shutdown();
        let took = t0.elapsed();
        assert!(took < Duration::from_secs(2), "shutdown took {took:?}");
        assert!(!sock.exists());
        assert!(stats.frames_to_vm > 50, "{stats:?}");
        writer.join().unwrap();
        // Our end sees the connection closed once the buffered data is read.
        qemu.set_read_timeout(Some(WAIT)).unwrap();
        let mut sink = Vec::new();
        let _ = qemu.read_to_end(&mut sink);
        assert!(!sink.is_empty());
    });
}

#[test]
fn stale_socket_file_is_replaced_and_other_files_are_not() {
    in_namespace(|ns, sock| {
        // A socket file left behind by a crashed agent.
        drop(std::os::unix::net::UnixListener::bind(sock).unwrap());
        assert!(sock.exists());
        let relay = Relay::start(sock, ns.tap_on_bridge(None)).unwrap();
        let mut qemu = connect(sock);
        arp_roundtrip(&mut qemu);
        drop(relay);
        assert!(!sock.exists());

        let file = sock.with_file_name("not-a-socket");
        std::fs::write(&file, b"x").unwrap();
        let e = Relay::start(&file, Tap::create(None).unwrap()).unwrap_err();
        assert!(matches!(e, remus_net::RelayError::PathOccupied(_)), "{e:?}");
        assert!(file.exists());
    });
}

// ------------------------------------------------------------ inbound gate

/// A sentinel frame the gate writes (see `remus_net::inbound`).
fn is_sentinel(f: &[u8]) -> bool {
    f.len() == 60 && f[0..6] == [0x01, 0x80, 0xc2, 0, 0, 0x0e] && f[12..14] == [0x88, 0xb5]
}

/// Packets `dev` transmitted, as this thread's namespace counts them.
fn tx_packets(dev: &str) -> u64 {
    let text = std::fs::read_to_string("/proc/thread-self/net/dev").unwrap();
    text.lines()
        .find_map(|l| {
            let (name, rest) = l.split_once(':')?;
            (name.trim() == dev).then(|| rest.split_whitespace().nth(9)?.parse().ok())?
        })
        .unwrap_or_else(|| panic!("{dev} not in /proc/net/dev"))
}

#[test]
fn inbound_gate_drains_qemu_then_holds_frames_in_the_tap_until_it_opens() {
    in_namespace(|ns, sock| {
        let relay = Relay::start(sock, ns.tap_on_bridge(Some("remus-g0"))).unwrap();
        let mut qemu = connect(sock);
        arp_roundtrip(&mut qemu);

        let gate = relay.inbound_gate();
        gate.close();
        let drainer = {
            let gate = gate.clone();
            std::thread::spawn(move || gate.wait_drained(Instant::now() + WAIT))
        };
        // Playing QEMU: read on; the sentinels come one after the other.
        for _ in 0..2 {
            recv_until(&mut qemu, WAIT, |f| is_sentinel(f).then_some(()))
                .expect("no sentinel from the gate");
        }
        assert_eq!(drainer.join().unwrap(), remus_net::Drain::Drained);
        let st = relay.stats();
        assert_eq!(
            (st.gate.drained, st.gate.sentinels, st.gate.timeouts),
            (1, 2, 0)
        );

        // Closed: frames the bridge sends the tap (its only port) stay in
        // the tap's queue. (A tap counts a frame when it is read, so the
        // bridge's count says the reply left.)
        let to_vm = st.frames_to_vm;
        let sent = tx_packets("br0");
        send_frame(&mut qemu, &arp_request());
        wait_for("the bridge's ARP reply", || tx_packets("br0") > sent);
        assert_eq!(
            relay.stats().frames_to_vm,
            to_vm,
            "a frame passed the closed gate"
        );

        gate.open();
        recv_until(&mut qemu, WAIT, parse_arp_reply).expect("no ARP reply after the gate opened");
    });
}

#[test]
fn inbound_gate_gives_up_at_its_deadline_when_qemu_does_not_read() {
    in_namespace(|ns, sock| {
        let relay = Relay::start(sock, ns.tap_on_bridge(None)).unwrap();
        let mut qemu = connect(sock);
        arp_roundtrip(&mut qemu);

        // QEMU does not read (the guest's ring is full): the first sentinel
        // stays in the socket and the wait ends at its deadline.
        let gate = relay.inbound_gate();
        gate.close();
        let budget = Duration::from_millis(50);
        let t0 = Instant::now();
        assert_eq!(gate.wait_drained(t0 + budget), remus_net::Drain::TimedOut);
        let took = t0.elapsed();
        assert!(took >= budget && took < budget * 20, "waited {took:?}");
        let st = relay.stats();
        assert_eq!(
            (st.gate.drained, st.gate.sentinels, st.gate.timeouts),
            (0, 1, 1)
        );

        // Open again, the stream is intact: the sentinel, then traffic.
        gate.open();
        recv_until(&mut qemu, WAIT, |f| is_sentinel(f).then_some(()))
            .expect("the sentinel left in the socket");
        arp_roundtrip(&mut qemu);

        // A relay shuts down promptly with its tap thread parked at a
        // closed gate.
        gate.close();
        assert_eq!(
            gate.wait_drained(Instant::now() + budget),
            remus_net::Drain::TimedOut
        );
        let t0 = Instant::now();
        relay.shutdown();
        assert!(
            t0.elapsed() < Duration::from_secs(2),
            "shutdown took {:?}",
            t0.elapsed()
        );
    });
}
