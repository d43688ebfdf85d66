//! `seqserver [--port 7000] [--bulk-port 7001] [--interval-ms 5]`: TCP
//! services for failover tests (does a TCP session survive the primary
//! dying, with no gap, duplicate or reset?) and throughput benchmarks.
//!
//! Sequence service (`--port`): per connection, each direction carries
//! ASCII lines `1\n`, `2\n`, `3\n`, ... independently. The server sends its
//! next line every `--interval-ms` (absolute schedule; slots missed while
//! the VM was paused or the write blocked are skipped, not sent in a burst;
//! a line is generated only once the previous one is fully written, so the
//! numbers stay consecutive). It checks that the client's lines are
//! consecutive from 1: canonical decimal (digits only, no sign, no leading
//! zero, no `\r`), at most 20 bytes. The first violation (gap, duplicate,
//! garbage, EOF, read or write error) prints one line and closes the
//! connection (shutdown both ways). A client that stops reading is never
//! given up on: the server's writes block (back-pressure) and it carries on
//! when the client reads again.
//!
//! Bulk service (`--bulk-port`): the client sends one request line:
//! `send SECONDS` (a number, fractions allowed): the server writes 64 KiB
//! buffers whose stream byte k is `k % 256` for that long, then closes;
//! `recv`: the server discards everything up to EOF (including bytes sent
//! right after the request line), then writes `received BYTES\n` and closes.
//!
//! Console lines (stdout):
//! * `seqserver: listening on PORT (bulk BULKPORT)` at start (the bound
//!   ports, so `--port 0` shows the one the kernel chose);
//! * `seqserver: conn N from ADDR` at accept (N = 1, 2, ...);
//! * `seqserver: conn N: sent S received R` about once a second;
//! * `seqserver: conn N: WHAT (expected E, got G)` once, when the connection
//!   ends: E is the next number expected from the client, WHAT one of `gap`,
//!   `duplicate`, `garbage` (G a number or a quoted string), `EOF` (clean
//!   close at a line boundary, G = `EOF`), `EOF inside a line` (G the
//!   quoted partial line), `read error: ...` / `write error: ...` (G =
//!   `error`);
//! * `seqserver: bulk conn from ADDR: send SECONDS` / `: recv`, then
//!   `seqserver: bulk conn from ADDR: done BYTES`, or `...: error after
//!   BYTES bytes: ...`, or `...: bad request "..."`; after a transfer,
//!   `seqserver: bulk conn from ADDR: guest drops: NAME=N ...`, the
//!   guest kernel's counters (since boot) of segments and frames it
//!   dropped on receive (see [`DROP_COUNTERS`]), for the bench to tell
//!   where a transfer loses data.

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Longest valid line (u64::MAX has 20 digits), without the newline.
pub const MAX_LINE: usize = 20;
/// Size of one bulk write.
pub const BULK_BUF: usize = 64 * 1024;
/// How long a stalled write waits before the sender looks around again
/// (to print its progress line or notice the connection closed).
const WRITE_POLL: Duration = Duration::from_millis(200);
const REPORT_EVERY: Duration = Duration::from_secs(1);
/// How much of an offending line is shown.
const SHOW_MAX: usize = 32;
const MAX_REQUEST: usize = 64;

/// Where console lines go (stdout in the guest; a channel in tests).
pub type Log = Arc<dyn Fn(&str) + Send + Sync>;

#[derive(Debug, Clone, PartialEq)]
struct Args {
    port: u16,
    bulk_port: u16,
    interval_ms: u64,
}

pub fn run(args: &[String]) -> Result<(), String> {
    let a = parse_args(args)?;
    let log: Log = Arc::new(say);
    let server = Server::bind(
        Ipv4Addr::UNSPECIFIED,
        a.port,
        a.bulk_port,
        Duration::from_millis(a.interval_ms),
        log.clone(),
    )?;
    let (port, bulk) = server.ports();
    log(&format!("seqserver: listening on {port} (bulk {bulk})"));
    server.serve()
}

/// Prints a line to the console; output errors are ignored.
fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}").and_then(|()| out.flush());
}

fn parse_args(args: &[String]) -> Result<Args, String> {
    let (mut port, mut bulk_port, mut interval_ms) = (7000, 7001, 5);
    crate::options::parse_u64(
        args,
        &mut [
            ("--port", &mut port),
            ("--bulk-port", &mut bulk_port),
            ("--interval-ms", &mut interval_ms),
        ],
    )?;
    let port16 = |name: &str, v: u64| u16::try_from(v).map_err(|_| format!("bad {name} '{v}'"));
    if interval_ms == 0 {
        return Err("--interval-ms must be > 0".into());
    }
    Ok(Args {
        port: port16("--port", port)?,
        bulk_port: port16("--bulk-port", bulk_port)?,
        interval_ms,
    })
}

// ---------------------------------------------------------------------------
// Pure protocol logic.

/// The sequence line for `n`.
pub fn seq_line(n: u64) -> String {
    format!("{n}\n")
}

/// A number in canonical form (`0` is canonical but never valid in the
/// protocol; the checker calls it garbage).
pub fn parse_number(line: &[u8]) -> Option<u64> {
    let canonical = !line.is_empty()
        && line.len() <= MAX_LINE
        && line.iter().all(u8::is_ascii_digit)
        && (line[0] != b'0' || line.len() == 1);
    if !canonical {
        return None;
    }
    std::str::from_utf8(line).ok()?.parse().ok()
}

/// `bytes` quoted and escaped for a console line, cut at [`SHOW_MAX`].
fn show(bytes: &[u8]) -> String {
    let cut = &bytes[..bytes.len().min(SHOW_MAX)];
    let more = if bytes.len() > SHOW_MAX { "..." } else { "" };
    format!("\"{}{more}\"", cut.escape_ascii())
}

/// Why a connection ended: `WHAT (expected E, got G)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub what: String,
    pub expected: u64,
    pub got: String,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} (expected {}, got {})",
            self.what, self.expected, self.got
        )
    }
}

/// Checks a byte stream of sequence lines as it arrives, in pieces of any
/// size (lines may be split across reads).
#[derive(Debug, Default)]
pub struct SeqChecker {
    /// The last number received in order (0: none yet).
    received: u64,
    /// Bytes of the current line so far (never more than MAX_LINE).
    partial: Vec<u8>,
}

impl SeqChecker {
    pub fn new() -> SeqChecker {
        SeqChecker::default()
    }

    /// Lines received in order so far (= the last number).
    pub fn received(&self) -> u64 {
        self.received
    }

    pub fn expected(&self) -> u64 {
        self.received + 1
    }

    fn violation(&self, what: &str, got: String) -> Violation {
        Violation {
            what: what.into(),
            expected: self.expected(),
            got,
        }
    }

    /// Takes the next bytes of the stream; the first violation in them is
    /// an error (after which the checker must not be fed again).
    pub fn feed(&mut self, mut data: &[u8]) -> Result<(), Violation> {
        while !data.is_empty() {
            let (piece, complete) = match data.iter().position(|&b| b == b'\n') {
                Some(i) => (&data[..i], true),
                None => (data, false),
            };
            data = &data[piece.len() + complete as usize..];
            self.partial.extend_from_slice(piece);
            if self.partial.len() > MAX_LINE {
                return Err(self.violation("garbage", show(&self.partial)));
            }
            if complete {
                let line = std::mem::take(&mut self.partial);
                self.line(&line)?;
            }
        }
        Ok(())
    }

    fn line(&mut self, line: &[u8]) -> Result<(), Violation> {
        match parse_number(line) {
            Some(n) if n == self.expected() => {
                self.received = n;
                Ok(())
            }
            Some(n) if n > self.expected() => Err(self.violation("gap", n.to_string())),
            Some(n) if n > 0 => Err(self.violation("duplicate", n.to_string())),
            _ => Err(self.violation("garbage", show(line))),
        }
    }

    /// The violation for the peer closing its side now.
    pub fn eof(&self) -> Violation {
        if self.partial.is_empty() {
            self.violation("EOF", "EOF".into())
        } else {
            self.violation("EOF inside a line", show(&self.partial))
        }
    }
}

/// A bulk-service request.
#[derive(Debug, Clone, PartialEq)]
pub enum BulkMode {
    Send(Duration),
    Recv,
}

impl std::fmt::Display for BulkMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BulkMode::Send(d) => write!(f, "send {}", d.as_secs_f64()),
            BulkMode::Recv => write!(f, "recv"),
        }
    }
}

/// Parses a bulk request line (without its newline).
pub fn parse_bulk_request(line: &[u8]) -> Result<BulkMode, String> {
    let bad = || format!("bad request {}", show(line));
    let text = std::str::from_utf8(line).map_err(|_| bad())?.trim();
    match text.split_ascii_whitespace().collect::<Vec<_>>().as_slice() {
        ["recv"] => Ok(BulkMode::Recv),
        ["send", secs] => match secs.parse::<f64>() {
            Ok(s) if (0.0..=86400.0).contains(&s) => Ok(BulkMode::Send(Duration::from_secs_f64(s))),
            _ => Err(bad()),
        },
        _ => Err(bad()),
    }
}

/// The bulk send buffer: byte k of the stream is k % 256 (BULK_BUF is a
/// multiple of 256, so every buffer is the same).
pub fn bulk_pattern() -> Vec<u8> {
    (0..BULK_BUF).map(|i| i as u8).collect()
}

// ---------------------------------------------------------------------------
// The server.

pub struct Server {
    seq: TcpListener,
    bulk: TcpListener,
    interval: Duration,
    log: Log,
}

impl Server {
    /// Binds both services on `ip` (port 0: any free port, see [`Server::ports`]).
    pub fn bind(
        ip: Ipv4Addr,
        port: u16,
        bulk_port: u16,
        interval: Duration,
        log: Log,
    ) -> Result<Server, String> {
        let listen = |p: u16| {
            TcpListener::bind(SocketAddr::from((ip, p))).map_err(|e| format!("bind {ip}:{p}: {e}"))
        };
        Ok(Server {
            seq: listen(port)?,
            bulk: listen(bulk_port)?,
            interval,
            log,
        })
    }

    /// The bound (sequence, bulk) ports.
    pub fn ports(&self) -> (u16, u16) {
        let port = |l: &TcpListener| l.local_addr().map(|a| a.port()).unwrap_or(0);
        (port(&self.seq), port(&self.bulk))
    }

    /// Accepts connections on both services forever, a thread per connection.
    pub fn serve(self) -> Result<(), String> {
        let Server {
            seq,
            bulk,
            interval,
            log,
        } = self;
        let bulk_log = log.clone();
        std::thread::Builder::new()
            .name("bulk-accept".into())
            .spawn(move || {
                accept_loop(&bulk, &bulk_log, |stream, addr| {
                    let log = bulk_log.clone();
                    move || bulk_conn(stream, addr, &log)
                })
            })
            .map_err(|e| format!("spawn: {e}"))?;
        let mut id = 0;
        accept_loop(&seq, &log, |stream, addr| {
            id += 1;
            let (id, log) = (id, log.clone());
            move || seq_conn(id, stream, addr, interval, &log)
        });
        Ok(())
    }
}

/// Accepts forever; runs `make(stream, addr)`'s job on a new thread.
fn accept_loop<F: FnOnce() + Send + 'static>(
    listener: &TcpListener,
    log: &Log,
    mut make: impl FnMut(TcpStream, SocketAddr) -> F,
) {
    loop {
        match listener.accept() {
            Ok((stream, addr)) => {
                let job = make(stream, addr);
                if let Err(e) = std::thread::Builder::new().spawn(job) {
                    log(&format!("seqserver: spawn for {addr}: {e}"));
                }
            }
            Err(e) => {
                log(&format!("seqserver: accept: {e}"));
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// State shared by a sequence connection's reader and sender.
struct Conn<'a> {
    id: u64,
    stream: &'a TcpStream,
    log: &'a Log,
    /// Set by whichever side ends the connection first (it prints the line).
    closed: AtomicBool,
    /// Lines received in order from the client.
    received: AtomicU64,
}

impl Conn<'_> {
    fn say(&self, what: &str) {
        (self.log)(&format!("seqserver: conn {}: {what}", self.id));
    }

    /// Ends the connection because of `v`; only the first call prints.
    fn end(&self, v: &Violation) {
        if !self.closed.swap(true, Ordering::SeqCst) {
            self.say(&v.to_string());
        }
        let _ = self.stream.shutdown(Shutdown::Both);
    }

    fn error(&self, what: String) -> Violation {
        Violation {
            what,
            expected: self.received.load(Ordering::SeqCst) + 1,
            got: "error".into(),
        }
    }
}

fn seq_conn(id: u64, stream: TcpStream, addr: SocketAddr, interval: Duration, log: &Log) {
    log(&format!("seqserver: conn {id} from {addr}"));
    let conn = Conn {
        id,
        stream: &stream,
        log,
        closed: AtomicBool::new(false),
        received: AtomicU64::new(0),
    };
    if let Err(e) = stream
        .set_nodelay(true)
        .and_then(|()| stream.set_write_timeout(Some(WRITE_POLL)))
    {
        conn.end(&conn.error(format!("setsockopt error: {e}")));
        return;
    }
    std::thread::scope(|s| {
        s.spawn(|| send_loop(&conn, interval));
        receive_loop(&conn);
    });
}

/// Reads and checks the client's lines until the connection ends.
fn receive_loop(conn: &Conn) {
    let mut checker = SeqChecker::new();
    let mut buf = [0u8; 4096];
    loop {
        let result = match (&*conn.stream).read(&mut buf) {
            Ok(0) => Err(checker.eof()),
            Ok(n) => checker.feed(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => Ok(()),
            Err(e) => Err(Violation {
                what: format!("read error: {e}"),
                expected: checker.expected(),
                got: "error".into(),
            }),
        };
        conn.received.store(checker.received(), Ordering::SeqCst);
        if let Err(v) = result {
            conn.end(&v);
            return;
        }
    }
}

/// Sends `1\n`, `2\n`, ... every `interval`, and the progress line about
/// once a second, until the connection ends.
fn send_loop(conn: &Conn, interval: Duration) {
    let mut next = Instant::now();
    let mut report_at = next + REPORT_EVERY;
    let (mut n, mut sent) = (0u64, 0u64);
    let (mut pending, mut off) = (Vec::new(), 0);
    while !conn.closed.load(Ordering::SeqCst) {
        let now = Instant::now();
        if now >= report_at {
            let received = conn.received.load(Ordering::SeqCst);
            conn.say(&format!("sent {sent} received {received}"));
            report_at = now + REPORT_EVERY;
        }
        if off == pending.len() {
            if now < next {
                std::thread::sleep(next.min(report_at) - now);
                continue;
            }
            n += 1;
            pending = seq_line(n).into_bytes();
            off = 0;
            next += interval;
            while next <= now {
                next += interval;
            }
        }
        match (&*conn.stream).write(&pending[off..]) {
            Ok(0) => conn.end(&conn.error("write error: wrote 0 bytes".into())),
            Ok(k) => {
                off += k;
                if off == pending.len() {
                    sent = n;
                }
            }
            // The write timeout: a stalled client; look around and retry.
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => conn.end(&conn.error(format!("write error: {e}"))),
        }
    }
}

fn bulk_conn(mut stream: TcpStream, addr: SocketAddr, log: &Log) {
    let say = |what: &str| log(&format!("seqserver: bulk conn from {addr}: {what}"));
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    let (line, leftover) = match read_request(&mut stream) {
        Ok(r) => r,
        Err(e) => return say(&e),
    };
    let mode = match parse_bulk_request(&line) {
        Ok(m) => m,
        Err(e) => return say(&e),
    };
    say(&mode.to_string());
    let _ = stream.set_read_timeout(None);
    let mut bytes = 0u64;
    let result = match mode {
        BulkMode::Send(duration) => bulk_send(&mut stream, duration, &mut bytes),
        BulkMode::Recv => {
            bytes = leftover as u64;
            bulk_recv(&mut stream, &mut bytes)
        }
    };
    match result {
        Ok(()) => say(&format!("done {bytes}")),
        Err(e) => say(&format!("error after {bytes} bytes: {e}")),
    }
    drain(&mut stream);
    let netstat = std::fs::read_to_string("/proc/net/netstat").unwrap_or_default();
    let dev = std::fs::read_to_string("/proc/net/dev").unwrap_or_default();
    say(&format!("guest drops: {}", drop_counters(&netstat, &dev)));
}

/// The guest kernel's receive-side drop counters the bulk service
/// reports: TcpExt fields of /proc/net/netstat.
const DROP_COUNTERS: [&str; 6] = [
    "TCPBacklogDrop",
    "TCPRcvQDrop",
    "TCPOFODrop",
    "PruneCalled",
    "TCPZeroWindowDrop",
    "TCPOFOQueue",
];

/// `NAME=N` for each of [`DROP_COUNTERS`] found in `netstat` (a header
/// line `TcpExt: names...` then `TcpExt: values...`), then the receive
/// drops and packets of every interface but `lo` in `dev` (/proc/net/dev:
/// the fourth and second numbers after `NAME:`), as `rx_drop=N
/// rx_packets=N`.
fn drop_counters(netstat: &str, dev: &str) -> String {
    let mut out = Vec::new();
    let mut ext = netstat.lines().filter(|l| l.starts_with("TcpExt:"));
    if let (Some(names), Some(values)) = (ext.next(), ext.next()) {
        let pairs: Vec<(&str, &str)> = names
            .split_whitespace()
            .zip(values.split_whitespace())
            .collect();
        for want in DROP_COUNTERS {
            if let Some((_, v)) = pairs.iter().find(|(n, _)| *n == want) {
                out.push(format!("{want}={v}"));
            }
        }
    }
    let field = |n: usize| -> u64 {
        dev.lines()
            .filter_map(|l| l.split_once(':'))
            .filter(|(name, _)| name.trim() != "lo")
            .filter_map(|(_, rest)| rest.split_whitespace().nth(n)?.parse::<u64>().ok())
            .sum()
    };
    out.push(format!("rx_drop={}", field(3)));
    out.push(format!("rx_packets={}", field(1)));
    out.join(" ")
}

/// Reads the request line; returns it and how many bytes came after it.
fn read_request(stream: &mut TcpStream) -> Result<(Vec<u8>, usize), String> {
    let mut buf = [0u8; 4096];
    let mut have = 0;
    loop {
        if let Some(i) = buf[..have].iter().position(|&b| b == b'\n') {
            return Ok((buf[..i].to_vec(), have - i - 1));
        }
        if have > MAX_REQUEST {
            return Err(format!("bad request {}", show(&buf[..have])));
        }
        match stream.read(&mut buf[have..]) {
            Ok(0) => return Err(format!("EOF before the request ({})", show(&buf[..have]))),
            Ok(k) => have += k,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("reading the request: {e}")),
        }
    }
}

fn bulk_send(stream: &mut TcpStream, duration: Duration, bytes: &mut u64) -> std::io::Result<()> {
    let buf = bulk_pattern();
    let start = Instant::now();
    while start.elapsed() < duration {
        stream.write_all(&buf)?;
        *bytes += buf.len() as u64;
    }
    stream.shutdown(Shutdown::Write)
}

/// Waits (a while) for the client to close, discarding what it sends, so
/// that closing with unread input cannot turn into a reset that loses the
/// tail of what was sent.
fn drain(stream: &mut TcpStream) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let mut sink = [0u8; 4096];
    while matches!(stream.read(&mut sink), Ok(k) if k > 0) {}
}

fn bulk_recv(stream: &mut TcpStream, bytes: &mut u64) -> std::io::Result<()> {
    let mut buf = vec![0u8; BULK_BUF];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(k) => *bytes += k as u64,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    stream.write_all(format!("received {bytes}\n").as_bytes())?;
    stream.shutdown(Shutdown::Write)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::{Receiver, channel};

    #[test]
    fn drop_counters_reads_tcpext_and_the_interfaces_rx_drops_and_packets() {
        let netstat = "TcpExt: SyncookiesSent TCPBacklogDrop TCPOFODrop\nTcpExt: 0 12 3\nIpExt: InNoRoutes\nIpExt: 0\n";
        let dev = "Inter-|   Receive\n face |bytes    packets errs drop\n    lo: 100 1 0 9 0 0 0 0 0 0 0 0 0 0 0 0\n  eth0: 5000 40 0 7 0 0 0 0 0 0 0 0 0 0 0 0\n";
        assert_eq!(
            drop_counters(netstat, dev),
            "TCPBacklogDrop=12 TCPOFODrop=3 rx_drop=7 rx_packets=40"
        );
        assert_eq!(drop_counters("", ""), "rx_drop=0 rx_packets=0");
    }

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    fn lines(from: u64, to: u64) -> String {
        (from..=to).map(seq_line).collect()
    }

    #[test]
    fn args() {
        let d = Args {
            port: 7000,
            bulk_port: 7001,
            interval_ms: 5,
        };
        assert_eq!(parse_args(&s(&[])), Ok(d.clone()));
        assert_eq!(
            parse_args(&s(&["--port", "0", "--bulk-port=9", "--interval-ms", "1"])),
            Ok(Args {
                port: 0,
                bulk_port: 9,
                interval_ms: 1
            })
        );
        assert!(parse_args(&s(&["--port", "65536"])).is_err());
        assert!(parse_args(&s(&["--interval-ms", "0"])).is_err());
        assert!(parse_args(&s(&["7000"])).is_err());
    }

    #[test]
    fn numbers() {
        assert_eq!(parse_number(b"1"), Some(1));
        assert_eq!(parse_number(b"18446744073709551615"), Some(u64::MAX));
        assert_eq!(parse_number(b"18446744073709551616"), None);
        assert_eq!(parse_number(b"0"), Some(0));
        for bad in [&b""[..], b"01", b"+1", b"-1", b" 1", b"1 ", b"1\r", b"x"] {
            assert_eq!(parse_number(bad), None, "{bad:?}");
        }
        assert_eq!(seq_line(42), "42\n");
    }

    #[test]
    fn consecutive_ok() {
        let mut c = SeqChecker::new();
        assert_eq!(c.feed(lines(1, 1000).as_bytes()), Ok(()));
        assert_eq!(c.feed(b""), Ok(()));
        assert_eq!((c.received(), c.expected()), (1000, 1001));
        let eof = c.eof();
        assert_eq!(eof.to_string(), "EOF (expected 1001, got EOF)");
    }

    #[test]
    fn split_lines_across_reads() {
        let stream = lines(1, 300);
        for size in [1, 2, 3, 7, 64] {
            let mut c = SeqChecker::new();
            for piece in stream.as_bytes().chunks(size) {
                assert_eq!(c.feed(piece), Ok(()), "chunk size {size}");
            }
            assert_eq!(c.received(), 300);
        }
        let mut c = SeqChecker::new();
        assert_eq!(c.feed(b"1\n2\n1"), Ok(()));
        assert_eq!(c.received(), 2);
        assert_eq!(
            c.eof().to_string(),
            "EOF inside a line (expected 3, got \"1\")"
        );
        assert_eq!(c.feed(b"0"), Ok(()));
        assert_eq!(c.feed(b"\n"), Err(gap(3, "10")));
        let mut c = SeqChecker::new();
        assert_eq!(c.feed(b"1\n2"), Ok(()));
        assert_eq!(c.feed(b"\n3\n"), Ok(()));
        assert_eq!(c.received(), 3);
    }

    fn gap(expected: u64, got: &str) -> Violation {
        Violation {
            what: "gap".into(),
            expected,
            got: got.into(),
        }
    }

    #[test]
    fn gap_detected() {
        let mut c = SeqChecker::new();
        let v = c.feed(b"1\n2\n4\n5\n").unwrap_err();
        assert_eq!(v, gap(3, "4"));
        assert_eq!(v.to_string(), "gap (expected 3, got 4)");
        assert_eq!(SeqChecker::new().feed(b"2\n"), Err(gap(1, "2")));
    }

    #[test]
    fn duplicate_detected() {
        let mut c = SeqChecker::new();
        let v = c.feed(b"1\n2\n3\n3\n").unwrap_err();
        assert_eq!(v.to_string(), "duplicate (expected 4, got 3)");
        let mut c = SeqChecker::new();
        let v = c.feed(b"1\n2\n1\n").unwrap_err();
        assert_eq!(v.to_string(), "duplicate (expected 3, got 1)");
    }

    #[test]
    fn garbage_detected() {
        let cases: [(&[u8], &str); 6] = [
            (b"1\nx\n", "garbage (expected 2, got \"x\")"),
            (b"1\n\n", "garbage (expected 2, got \"\")"),
            (b"0\n", "garbage (expected 1, got \"0\")"),
            (b"1\r\n", "garbage (expected 1, got \"1\\r\")"),
            (b"01\n", "garbage (expected 1, got \"01\")"),
            (b"1\n\x00\xff\n", "garbage (expected 2, got \"\\x00\\xff\")"),
        ];
        for (input, want) in cases {
            let v = SeqChecker::new().feed(input).unwrap_err();
            assert_eq!(v.to_string(), want);
        }
        // A line with no end is garbage as soon as it is too long.
        let mut c = SeqChecker::new();
        assert_eq!(c.feed(&[b'7'; MAX_LINE]), Ok(()));
        let v = c.feed(b"7").unwrap_err();
        assert_eq!(v.what, "garbage");
        assert_eq!(v.got, format!("\"{}\"", "7".repeat(MAX_LINE + 1)));
        let v = SeqChecker::new().feed(&[b'a'; 100]).unwrap_err();
        assert_eq!(v.got, format!("\"{}...\"", "a".repeat(SHOW_MAX)));
    }

    #[test]
    fn bulk_requests() {
        assert_eq!(parse_bulk_request(b"recv"), Ok(BulkMode::Recv));
        assert_eq!(
            parse_bulk_request(b"send 10"),
            Ok(BulkMode::Send(Duration::from_secs(10)))
        );
        assert_eq!(
            parse_bulk_request(b"send 0.25\r"),
            Ok(BulkMode::Send(Duration::from_millis(250)))
        );
        assert_eq!(BulkMode::Send(Duration::from_secs(3)).to_string(), "send 3");
        for bad in [
            &b"send"[..],
            b"send x",
            b"send -1",
            b"send inf",
            b"get",
            b"",
        ] {
            assert!(parse_bulk_request(bad).is_err(), "{bad:?}");
        }
        let p = bulk_pattern();
        assert_eq!(p.len(), BULK_BUF);
        assert!(p.iter().enumerate().all(|(k, &b)| b == k as u8));
    }

    /// A server on 127.0.0.1 with ephemeral ports, its console lines sent
    /// to the returned channel.
    fn start(interval_ms: u64) -> (u16, u16, Receiver<String>) {
        let (tx, rx) = channel();
        let log: Log = Arc::new(move |l: &str| {
            let _ = tx.send(l.to_string());
        });
        let server = Server::bind(
            Ipv4Addr::LOCALHOST,
            0,
            0,
            Duration::from_millis(interval_ms),
            log,
        )
        .unwrap();
        let (port, bulk) = server.ports();
        assert!(port != 0 && bulk != 0 && port != bulk);
        std::thread::spawn(move || server.serve());
        (port, bulk, rx)
    }

    /// Waits for a console line starting with `prefix`; returns it.
    fn wait_for(rx: &Receiver<String>, prefix: &str) -> String {
        loop {
            match rx.recv_timeout(Duration::from_secs(20)) {
                Ok(l) if l.starts_with(prefix) => return l,
                Ok(_) => {}
                Err(e) => panic!("no line '{prefix}...': {e}"),
            }
        }
    }

    fn connect(port: u16) -> TcpStream {
        let c = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        c
    }

    #[test]
    fn server_exchanges_lines_both_ways() {
        const N: u64 = 200;
        let (port, _, rx) = start(1);
        let mut client = connect(port);
        client.set_nodelay(true).unwrap();
        let from = wait_for(&rx, "seqserver: conn 1 from 127.0.0.1:");
        assert_eq!(
            from,
            format!("seqserver: conn 1 from {}", client.local_addr().unwrap())
        );
        // The client sends its lines split at odd places.
        let mut w = client.try_clone().unwrap();
        let writer = std::thread::spawn(move || {
            for n in 1..=N {
                let l = seq_line(n);
                let (a, b) = l.as_bytes().split_at(l.len() / 2);
                w.write_all(a).unwrap();
                w.write_all(b).unwrap();
            }
        });
        let mut got = SeqChecker::new();
        let mut buf = [0u8; 256];
        while got.received() < N {
            let k = client.read(&mut buf).unwrap();
            assert!(k > 0, "EOF after {} lines", got.received());
            got.feed(&buf[..k]).unwrap();
        }
        writer.join().unwrap();
        client.shutdown(Shutdown::Write).unwrap();
        assert_eq!(
            wait_for(&rx, "seqserver: conn 1: EOF"),
            format!("seqserver: conn 1: EOF (expected {}, got EOF)", N + 1)
        );
        // The server closed: the rest of its stream, then EOF.
        loop {
            match client.read(&mut buf).unwrap() {
                0 => break,
                k => got.feed(&buf[..k]).unwrap(),
            }
        }
        assert!(got.received() >= N);
    }

    #[test]
    fn server_reports_a_gap_and_closes() {
        let (port, _, rx) = start(5);
        let _first = connect(port);
        let mut client = connect(port);
        client.write_all(b"1\n2\n4\n").unwrap();
        wait_for(&rx, "seqserver: conn 2 from ");
        assert_eq!(
            wait_for(&rx, "seqserver: conn 2: "),
            "seqserver: conn 2: gap (expected 3, got 4)"
        );
        let mut rest = Vec::new();
        let _ = client.read_to_end(&mut rest); // EOF (or a reset)
        assert!(rest.starts_with(b"1\n") || rest.is_empty());
    }

    #[test]
    fn bulk_recv_and_send() {
        let (_, bulk, rx) = start(5);
        let mut c = connect(bulk);
        let data = vec![7u8; 1 << 20];
        c.write_all(b"recv\n").unwrap();
        c.write_all(&data).unwrap();
        c.shutdown(Shutdown::Write).unwrap();
        let mut reply = String::new();
        c.read_to_string(&mut reply).unwrap();
        assert_eq!(reply, "received 1048576\n");
        let addr = c.local_addr().unwrap();
        let prefix = format!("seqserver: bulk conn from {addr}: ");
        assert_eq!(wait_for(&rx, &prefix), format!("{prefix}recv"));
        assert_eq!(wait_for(&rx, &prefix), format!("{prefix}done 1048576"));

        let mut c = connect(bulk);
        c.write_all(b"send 0.1\n").unwrap();
        let pattern = [bulk_pattern(), bulk_pattern()].concat();
        let mut buf = vec![0u8; BULK_BUF];
        let mut total = 0;
        loop {
            let k = c.read(&mut buf).unwrap();
            if k == 0 {
                break;
            }
            let at = total % 256;
            assert!(buf[..k] == pattern[at..at + k], "pattern at {total}");
            total += k;
        }
        assert!(total > 0 && total % BULK_BUF == 0, "{total}");
        let prefix = format!("seqserver: bulk conn from {}: ", c.local_addr().unwrap());
        assert_eq!(wait_for(&rx, &prefix), format!("{prefix}send 0.1"));
        assert_eq!(wait_for(&rx, &prefix), format!("{prefix}done {total}"));

        let mut c = connect(bulk);
        c.write_all(b"dance\n").unwrap();
        let mut got = Vec::new();
        let _ = c.read_to_end(&mut got);
        assert!(got.is_empty());
        let prefix = format!("seqserver: bulk conn from {}: ", c.local_addr().unwrap());
        assert_eq!(
            wait_for(&rx, &prefix),
            format!("{prefix}bad request \"dance\"")
        );
    }
}
