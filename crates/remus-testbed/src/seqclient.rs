//! The client side of the "sequence" protocol a guest server speaks: over
//! one TCP connection each side sends ASCII lines `<n>\n`, n = 1, 2, 3, …
//! consecutive, independently of the other (the server one every ~5 ms).
//!
//! [`SeqClient`] connects from inside a namespace (a client host of a
//! [`Lan`](crate::lan::Lan)), sends its own numbers every `interval` and
//! checks the server's: no gap, no duplicate, nothing else. What it saw is
//! there to assert on and to report: the last number received and when, the
//! longest silence between two lines (the failover pause as a client sees
//! it), the first protocol violation and the first I/O error or EOF.
//!
//! ```no_run
//! # use std::time::Duration;
//! # use remus_testbed::{lan::Lan, seqclient::SeqClient};
//! # fn main() -> anyhow::Result<()> {
//! let lan = Lan::standard("demo")?;
//! let vm = "198.18.0.10:7000".parse()?;
//! let mut client = SeqClient::start(lan.host("c"), vm, Duration::from_millis(5))?;
//! client.wait_received(200, Duration::from_secs(10))?;
//! // … fail over …
//! let n = client.received();
//! client.wait_received(n + 200, Duration::from_secs(30))?;
//! assert_eq!(client.error(), None);
//! println!("longest pause seen: {:?}", client.longest_gap());
//! client.stop();
//! # Ok(()) }
//! ```

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, SocketAddrV4, TcpStream};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::Netns;

/// How long [`SeqClient::start`] waits for the connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A line longer than this (without its newline) is garbage: no u64 has
/// more than 20 digits.
const MAX_LINE: usize = 20;

#[derive(Default)]
struct State {
    received: u64,
    last_received_at: Option<Instant>,
    longest_gap: Duration,
    sent: u64,
    violation: Option<String>,
    io_error: Option<(ErrorKind, String)>,
    stopping: bool,
}

impl State {
    fn error(&self) -> Option<String> {
        self.violation
            .clone()
            .or_else(|| self.io_error.as_ref().map(|(_, m)| m.clone()))
    }

    fn record_io(&mut self, kind: ErrorKind, msg: String) {
        if !self.stopping && self.io_error.is_none() {
            self.io_error = Some((kind, msg));
        }
    }
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A running sequence-protocol client; stopped on drop.
pub struct SeqClient {
    peer: SocketAddrV4,
    stream: TcpStream,
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl SeqClient {
    /// Connects to `addr` from inside `ns` (TCP_NODELAY; at most
    /// [`CONNECT_TIMEOUT`]), then sends `1\n`, `2\n`, … every `interval`
    /// (a zero interval sends nothing) and checks what the server sends.
    pub fn start(ns: &Netns, addr: SocketAddrV4, interval: Duration) -> Result<SeqClient> {
        SeqClient::start_with(ns, addr, interval, CONNECT_TIMEOUT)
    }

    /// [`SeqClient::start`] with another connect timeout.
    pub fn start_with(
        ns: &Netns,
        addr: SocketAddrV4,
        interval: Duration,
        connect_timeout: Duration,
    ) -> Result<SeqClient> {
        let stream = ns
            .run_in(|| TcpStream::connect_timeout(&SocketAddr::V4(addr), connect_timeout))?
            .with_context(|| format!("connect to {addr} from {}", ns.name))?;
        SeqClient::from_stream(stream, interval)
    }

    /// Runs the protocol over a connection made elsewhere.
    pub fn from_stream(stream: TcpStream, interval: Duration) -> Result<SeqClient> {
        let peer = match stream.peer_addr().context("peer address")? {
            SocketAddr::V4(a) => a,
            SocketAddr::V6(a) => bail!("IPv6 peer {a}: the testbed is IPv4 only"),
        };
        stream.set_nodelay(true).context("TCP_NODELAY")?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
        });
        let mut client = SeqClient {
            peer,
            stream,
            shared,
            threads: Vec::new(),
        };
        // On an error below, drop stops whatever already started.
        let rx = client.stream.try_clone().context("clone socket")?;
        let shared = client.shared.clone();
        client.threads.push(
            std::thread::Builder::new()
                .name("seq-recv".into())
                .spawn(move || receive(rx, &shared))
                .context("spawn receiver")?,
        );
        // Always clone: the sender, if any, needs its own handle.
        let tx = client.stream.try_clone().context("clone socket")?;
        let shared = client.shared.clone();
        client.threads.push(
            std::thread::Builder::new()
                .name("seq-send".into())
                .spawn(move || send(tx, &shared, interval))
                .context("spawn sender")?,
        );
        Ok(client)
    }

    /// The server's address.
    pub fn peer(&self) -> SocketAddrV4 {
        self.peer
    }

    /// The last number received in order (0 before the first line). After
    /// a gap it follows the server's numbering; a duplicate or a step back
    /// leaves it where it was.
    pub fn received(&self) -> u64 {
        self.shared.lock().received
    }

    /// When the last in-order number arrived.
    pub fn last_received_at(&self) -> Option<Instant> {
        self.shared.lock().last_received_at
    }

    /// The last number sent (fully written to the socket).
    pub fn sent(&self) -> u64 {
        self.shared.lock().sent
    }

    /// The longest time between two received in-order lines (lines that
    /// arrived in the same read count as no time apart). A silence still
    /// going on is not included: see [`SeqClient::last_received_at`].
    pub fn longest_gap(&self) -> Duration {
        self.shared.lock().longest_gap
    }

    /// The first violation of the protocol (gap, duplicate, garbage) if
    /// any, else the first I/O error or EOF, if any.
    pub fn error(&self) -> Option<String> {
        self.shared.lock().error()
    }

    /// The first violation of the protocol, e.g. `gap: expected 50, got
    /// 51`.
    pub fn violation(&self) -> Option<String> {
        self.shared.lock().violation.clone()
    }

    /// The first I/O error on the connection: a reset is
    /// `ErrorKind::ConnectionReset`, the server closing it
    /// `ErrorKind::UnexpectedEof`. Errors caused by [`SeqClient::stop`]
    /// are not recorded.
    pub fn io_error(&self) -> Option<(ErrorKind, String)> {
        self.shared.lock().io_error.clone()
    }

    /// Waits until number `n` has been received. Fails at once on a
    /// violation, an I/O error or EOF (the error says which), and after
    /// `timeout` (saying what arrived last and when).
    pub fn wait_received(&self, n: u64, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        let deadline = start + timeout;
        let mut st = self.shared.lock();
        loop {
            if st.received >= n {
                return Ok(());
            }
            if let Some(e) = st.error() {
                bail!(
                    "{}: waiting for line {n}, got {} in order: {e}",
                    self.peer,
                    st.received
                );
            }
            if st.stopping {
                bail!("{}: client stopped while waiting for line {n}", self.peer);
            }
            let now = Instant::now();
            if now >= deadline {
                let last = match st.last_received_at {
                    Some(t) => format!("{:?} ago", now - t),
                    None => "never".into(),
                };
                bail!(
                    "{}: timed out after {timeout:?} waiting for line {n}: last in-order line {} arrived {last}",
                    self.peer,
                    st.received
                );
            }
            st = self
                .shared
                .changed
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Waits up to `timeout` for an error (violation, I/O error or EOF);
    /// the error, or `None` if there was none.
    pub fn wait_error(&self, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        let mut st = self.shared.lock();
        loop {
            if let Some(e) = st.error() {
                return Some(e);
            }
            let now = Instant::now();
            if now >= deadline || st.stopping {
                return None;
            }
            st = self
                .shared
                .changed
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Shuts the connection down and joins both threads. What was seen
    /// stays readable; errors caused by stopping are not recorded.
    pub fn stop(&mut self) {
        {
            let mut st = self.shared.lock();
            st.stopping = true;
            self.shared.changed.notify_all();
        }
        let _ = self.stream.shutdown(Shutdown::Both);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for SeqClient {
    fn drop(&mut self) {
        self.stop();
    }
}

fn send(mut stream: TcpStream, shared: &Shared, interval: Duration) {
    if interval.is_zero() {
        return;
    }
    let mut next = Instant::now();
    let mut n: u64 = 0;
    loop {
        {
            // Pacing, and a prompt exit on stop.
            let mut st = shared.lock();
            loop {
                if st.stopping {
                    return;
                }
                let now = Instant::now();
                if now >= next {
                    break;
                }
                st = shared
                    .changed
                    .wait_timeout(st, next - now)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
        }
        n += 1;
        let r = stream.write_all(format!("{n}\n").as_bytes());
        let mut st = shared.lock();
        match r {
            Ok(()) => st.sent = n,
            Err(e) => {
                st.record_io(e.kind(), format!("send of line {n}: {e}"));
                shared.changed.notify_all();
                return;
            }
        }
        drop(st);
        // After a stall (a blocked write) carry on from now, no burst.
        next = (next + interval).max(Instant::now());
    }
}

fn receive(mut stream: TcpStream, shared: &Shared) {
    let mut checker = Checker::default();
    let mut buf = [0u8; 4096];
    loop {
        let r = stream.read(&mut buf);
        let now = Instant::now();
        let mut st = shared.lock();
        match r {
            Ok(0) => {
                let msg = format!(
                    "EOF: the server closed the connection after line {}",
                    st.received
                );
                st.record_io(ErrorKind::UnexpectedEof, msg);
                shared.changed.notify_all();
                return;
            }
            Ok(len) => {
                checker.feed(&buf[..len], |ev| match ev {
                    Line::InOrder(n) => {
                        st.received = n;
                        if let Some(prev) = st.last_received_at {
                            st.longest_gap = st.longest_gap.max(now - prev);
                        }
                        st.last_received_at = Some(now);
                    }
                    Line::Violation(v) => {
                        if st.violation.is_none() {
                            st.violation = Some(v);
                        }
                    }
                });
                shared.changed.notify_all();
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => {
                let msg = format!("receive after line {}: {e}", st.received);
                st.record_io(e.kind(), msg);
                shared.changed.notify_all();
                return;
            }
        }
    }
}

/// What one complete line meant.
#[derive(Debug, PartialEq, Eq)]
enum Line {
    /// The next number (or, after a gap, the number the server went on
    /// with).
    InOrder(u64),
    /// A gap, duplicate or garbage, described.
    Violation(String),
}

/// Splits the received bytes into lines (whatever the read boundaries)
/// and checks the numbers.
#[derive(Default)]
struct Checker {
    last: u64,
    partial: Vec<u8>,
    too_long: bool,
}

impl Checker {
    fn feed(&mut self, data: &[u8], mut on: impl FnMut(Line)) {
        for &b in data {
            if b != b'\n' {
                if self.partial.len() < MAX_LINE {
                    self.partial.push(b);
                } else {
                    self.too_long = true;
                }
                continue;
            }
            let expected = self.last + 1;
            let line = std::mem::take(&mut self.partial);
            if std::mem::take(&mut self.too_long) {
                on(Line::Violation(format!(
                    "garbage: expected {expected}, got a line of more than {MAX_LINE} bytes starting {:?}",
                    String::from_utf8_lossy(&line)
                )));
                continue;
            }
            // Canonical decimal only: digits, no sign, no leading zero.
            let canonical =
                line.first().is_some_and(|&d| d != b'0') && line.iter().all(u8::is_ascii_digit);
            let n = canonical
                .then(|| std::str::from_utf8(&line).ok()?.parse::<u64>().ok())
                .flatten();
            match n {
                None => on(Line::Violation(format!(
                    "garbage: expected {expected}, got {:?}",
                    String::from_utf8_lossy(&line)
                ))),
                Some(n) if n == expected => {
                    self.last = n;
                    on(Line::InOrder(n));
                }
                Some(n) if n > expected => {
                    on(Line::Violation(format!(
                        "gap: expected {expected}, got {n}"
                    )));
                    self.last = n;
                    on(Line::InOrder(n));
                }
                Some(n) => on(Line::Violation(format!(
                    "duplicate: expected {expected}, got {n}"
                ))),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(chunks: &[&[u8]]) -> Vec<Line> {
        let mut c = Checker::default();
        let mut out = Vec::new();
        for ch in chunks {
            c.feed(ch, |l| out.push(l));
        }
        out
    }

    #[test]
    fn lines_split_anyhow_are_counted() {
        let all = b"1\n2\n3\n10\n".to_vec();
        let want: Vec<Line> = [1, 2, 3]
            .into_iter()
            .map(Line::InOrder)
            .chain([
                Line::Violation("gap: expected 4, got 10".into()),
                Line::InOrder(10),
            ])
            .collect();
        // Every split into two or three reads gives the same lines.
        for i in 0..=all.len() {
            for j in i..=all.len() {
                assert_eq!(run(&[&all[..i], &all[i..j], &all[j..]]), want, "{i} {j}");
            }
        }
        let bytes: Vec<&[u8]> = all.chunks(1).collect();
        assert_eq!(run(&bytes), want);
    }

    #[test]
    fn duplicates_and_garbage_are_violations() {
        assert_eq!(
            run(&[b"1\n2\n2\n3\n"]),
            vec![
                Line::InOrder(1),
                Line::InOrder(2),
                Line::Violation("duplicate: expected 3, got 2".into()),
                Line::InOrder(3)
            ]
        );
        assert_eq!(
            run(&[b"1\n", b"x2\n", b"\n", b"2\r\n", b"-3\n", b"02\n", b"2\n"]),
            vec![
                Line::InOrder(1),
                Line::Violation("garbage: expected 2, got \"x2\"".into()),
                Line::Violation("garbage: expected 2, got \"\"".into()),
                Line::Violation("garbage: expected 2, got \"2\\r\"".into()),
                Line::Violation("garbage: expected 2, got \"-3\"".into()),
                Line::Violation("garbage: expected 2, got \"02\"".into()),
                Line::InOrder(2),
            ]
        );
        let long = [b'7'; 40];
        let v = run(&[&long, b"\n1\n"]);
        assert!(
            matches!(&v[0], Line::Violation(m) if m.starts_with("garbage: expected 1, got a line of more than 20 bytes")),
            "{v:?}"
        );
        assert_eq!(v[1], Line::InOrder(1));
        // Too large for a u64.
        assert!(matches!(
            &run(&[b"99999999999999999999\n"])[0],
            Line::Violation(_)
        ));
    }
}
