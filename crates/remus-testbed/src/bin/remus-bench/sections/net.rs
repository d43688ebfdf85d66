//! The network cases, the `net` section of the suite and the `--net` run
//! (only them): ping round-trip time and TCP throughput between a client
//! and the guest, unprotected, protected with `--no-net` and protected with
//! output buffering (output commit), in one run on one VM. Three network
//! namespaces on one bridged LAN ([`Lan::standard`]): the primary agent in
//! host a, the backup in b (listening on 198.18.0.2), the client in c. The
//! guest (256 MiB) has a NIC on a's br0 and 198.18.0.10, and runs
//! `tick,seqserver`. Cases, in order: unprotected; `remus protect -i I
//! --no-net` at the first `--intervals` value; `remus protect -i I`
//! (buffered) at each value; protection is stopped in between and the
//! backup's standby awaited. Each protected case first lets `--warmup`
//! checkpoints pass. Per case, from c, one after the other: `ping -c N -i
//! 0.02` (N = `--seconds` × 50; RTT p50/p90/max over the replies, loss),
//! then TCP guest→client (`send S` on the guest's bulk port 7001, read to
//! EOF: bytes over request-to-EOF time), then TCP client→guest (`recv`, S
//! seconds of writes, the guest's byte count over request-to-answer time),
//! S = `--seconds`; and the pause and ack of the checkpoints taken
//! meanwhile. Reported: RTT increase over unprotected against the issue's
//! target (buffered: p50 increase at most interval/2 + 2 ms), throughput
//! and its ratio to unprotected. Needs root (namespaces, bridges, taps).

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use remus_testbed::{Agent, Binaries, GuestImage, Lan, Netns, now_ms, write_key};
use serde_json::{Value, json};

use crate::harness::{
    Protecting, accel_of, achieved_interval_ms, create_vm, destroy_or_warn, event_col, event_phase,
    logs_of, tail, wait_standby_gone,
};
use crate::opts::Opts;
use crate::report::{Machine, Target, emit, merge_json, percentile, r3, ratio, stats};
use crate::suite::{Ctx, Report};

/// Net cases: the guest's address and MAC (hosts a, b, c are those of
/// [`Lan::standard`]), seqserver's bulk port, the backup's replication port
/// in host b.
pub(crate) const NET_VM_IP: &str = "198.18.0.10";
const NET_VM_MAC: &str = "52:54:00:c6:12:0a";
const NET_BULK_PORT: u16 = 7001;
pub(crate) const NET_REPL_PORT: u16 = 7100;
/// `ping -i 0.02`: 50 pings a second.
const PING_INTERVAL: &str = "0.02";
const PINGS_PER_S: u64 = 50;
/// The first network issue's target, for fixed epochs: with buffering,
/// the median RTT at most interval/2 + this over unprotected.
const NET_TARGET_SLACK_MS: f64 = 2.0;
/// The performance issue's target, with output-driven epochs (the
/// default): the median RTT at most this over unprotected.
const NET_TARGET_OUTPUT_DRIVEN_MS: f64 = 15.0;

/// The performance issue's target for bulk TCP through the output
/// buffer, each way: at least this fraction of unprotected.
const NET_TARGET_BULK_RATIO: f64 = 0.5;

/// The `net` section of the suite.
pub(crate) fn run(cx: &Ctx, r: &mut Report) -> Result<()> {
    let Ctx {
        o,
        bins,
        profile,
        img,
        m,
        date,
    } = *cx;
    let Report {
        sections,
        runs,
        targets,
        ..
    } = r;
    eprintln!("remus-bench: network cases ...");
    let run = run_net(bins, img, o)?;
    sections.push(render_net_md(date, m, profile, o, &run).replacen("## ", "### Network: ", 1));
    runs.insert(
        "net".into(),
        json!(
            run.cases
                .iter()
                .map(|c| net_case_json(&run, c))
                .collect::<Vec<_>>()
        ),
    );
    for c in &run.cases {
        if let Some(t) = c.mode.target_ms() {
            let (p50, _) = run.rtt_increase(c);
            targets.push(Target::at_most(
                format!("ping RTT p50 increase ≤ {t:.0} ms ({})", c.mode.name()),
                format!("+{p50:.1} ms"),
                p50,
                t,
                " ms",
                1,
            ));
        }
        // Bulk TCP through the output buffer at the defaults, each way.
        if let (NetMode::Buffered(_), Some(b)) = (c.mode, run.base()) {
            for (way, t, bt) in [
                ("guest → client", &c.down, &b.down),
                ("client → guest", &c.up, &b.up),
            ] {
                let r = ratio(t.mb_s(), bt.mb_s());
                targets.push(Target::at_least(
                    format!(
                        "bulk TCP {way} ≥ {NET_TARGET_BULK_RATIO}× unprotected ({})",
                        c.mode.name()
                    ),
                    format!("{r:.2}× ({:.1} against {:.1} MiB/s)", t.mb_s(), bt.mb_s()),
                    r,
                    NET_TARGET_BULK_RATIO,
                    "×",
                    2,
                ));
            }
        }
    }
    Ok(())
}

pub(crate) fn net_main(
    o: &Opts,
    bins: &Binaries,
    profile: &str,
    img: &GuestImage,
    m: &Machine,
    date: &str,
) -> Result<()> {
    let run = run_net(bins, img, o)?;
    let (md, json_run) = net_report(date, m, profile, o, &run);
    emit(o, &md, json_run)
}

/// The net run's report: markdown and JSON run.
fn net_report(date: &str, m: &Machine, profile: &str, o: &Opts, run: &NetRun) -> (String, Value) {
    let md = render_net_md(date, m, profile, o, run);
    let target: Vec<Value> = run
        .cases
        .iter()
        .filter_map(|c| {
            let t = c.mode.target_ms()?;
            Some(json!({
                "interval_ms": c.mode.interval_ms(),
                "rtt_p50_increase_max_ms": t,
                "measured_ms": r3(run.rtt_increase(c).0),
                "met": run.target_met(c),
            }))
        })
        .collect();
    let json_run = json!({
        "date": date,
        "kind": "net",
        "machine": m.json(),
        "profile": profile,
        "settings": {
            "seconds": o.seconds, "warmup_checkpoints": o.warmup, "timeout_ms": o.timeout_ms,
            "memory_mib": 256, "workload": net_workload(), "vm_ip": NET_VM_IP,
            "pings": o.seconds * PINGS_PER_S, "ping_interval_ms": 1000 / PINGS_PER_S,
            "intervals_ms": o.intervals, "no_net_interval_ms": o.intervals.first(),
        },
        "target": target,
        "cases": run.cases.iter().map(|c| net_case_json(run, c)).collect::<Vec<_>>(),
    });
    (md, json_run)
}

fn net_workload() -> String {
    format!("remus.workload=tick,seqserver remus.ip={NET_VM_IP}/24")
}

/// The net cases' VM: seqserver, an address on the LAN, a NIC on the
/// host's br0 with a fixed MAC (it keeps MAC and IP across hosts).
pub(crate) fn net_vm_config(img: &GuestImage, vm: &str) -> String {
    let vif = format!("[[vif]]\nbridge = \"br0\"\nmac = \"{NET_VM_MAC}\"\n");
    img.config(vm, &net_workload(), &vif)
}

/// How a net case runs the VM.
#[derive(Debug, Clone, Copy, PartialEq)]
enum NetMode {
    Unprotected,
    /// `remus protect -i I --no-net`: checkpoints, output not held.
    NoNet(u64),
    /// `remus protect -i I`: output held until the backup acks the
    /// checkpoint holding the state that sent it; epochs end early when
    /// output waits (output-driven, the default `--min-interval`).
    Buffered(u64),
    /// The same with `--min-interval 0`: every epoch lasts `-i` (the
    /// behaviour before output-driven epochs, as the baseline of the run).
    Fixed(u64),
    /// Buffered with `--max-latency 0`: the gap between checkpoints stays
    /// at `--min-interval` while the guest streams (the behaviour before
    /// the adaptive gap, as its baseline in the run).
    FixedGap(u64),
}

impl NetMode {
    fn name(&self) -> String {
        match self {
            NetMode::Unprotected => "unprotected".into(),
            NetMode::NoNet(i) => format!("protected -i {i} --no-net"),
            NetMode::Buffered(i) => format!("protected -i {i}, buffered"),
            NetMode::Fixed(i) => format!("protected -i {i}, buffered, --min-interval 0"),
            NetMode::FixedGap(i) => format!("protected -i {i}, buffered, --max-latency 0"),
        }
    }
    fn key(&self) -> &'static str {
        match self {
            NetMode::Unprotected => "unprotected",
            NetMode::NoNet(_) => "no_net",
            NetMode::Buffered(_) => "buffered",
            NetMode::Fixed(_) => "buffered_fixed_epochs",
            NetMode::FixedGap(_) => "buffered_fixed_gap",
        }
    }
    fn interval_ms(&self) -> Option<u64> {
        match *self {
            NetMode::Unprotected => None,
            NetMode::NoNet(i) | NetMode::Buffered(i) | NetMode::Fixed(i) | NetMode::FixedGap(i) => {
                Some(i)
            }
        }
    }
    /// The most the RTT p50 may rise over unprotected (buffered only).
    fn target_ms(&self) -> Option<f64> {
        match *self {
            // The adaptive gap's baseline row is there to compare with,
            // not a target.
            NetMode::Buffered(_) => Some(NET_TARGET_OUTPUT_DRIVEN_MS),
            NetMode::Fixed(i) => Some(i as f64 / 2.0 + NET_TARGET_SLACK_MS),
            _ => None,
        }
    }
    /// Extra `remus protect` arguments.
    fn protect_args(&self) -> &'static [&'static str] {
        match self {
            NetMode::NoNet(_) => &["--no-net"],
            NetMode::Fixed(_) => &["--min-interval", "0"],
            NetMode::FixedGap(_) => &["--max-latency", "0"],
            _ => &[],
        }
    }
}

/// The cases of a run, in order: unprotected, `--no-net` at the first
/// interval, buffered at each, and buffered with fixed epochs at the
/// first (the baseline of output-driven epochs), and buffered with the
/// gap fixed at the first (the baseline of the adaptive gap).
fn net_modes(intervals: &[u64]) -> Vec<NetMode> {
    let mut v = vec![NetMode::Unprotected];
    v.extend(intervals.first().map(|&i| NetMode::NoNet(i)));
    v.extend(intervals.iter().map(|&i| NetMode::Buffered(i)));
    v.extend(intervals.first().map(|&i| NetMode::Fixed(i)));
    v.extend(intervals.first().map(|&i| NetMode::FixedGap(i)));
    v
}

/// What `ping` printed: each reply's RTT in ms (duplicates left out) and
/// the summary's counts (0 when it has none).
#[derive(Debug, Clone, Default, PartialEq)]
struct Ping {
    rtts: Vec<f64>,
    transmitted: u64,
    received: u64,
    duplicates: u64,
}

impl Ping {
    /// Unanswered pings, % of those sent (from the summary).
    fn loss_pct(&self) -> f64 {
        if self.transmitted > 0 {
            100.0 * self.transmitted.saturating_sub(self.received) as f64 / self.transmitted as f64
        } else {
            f64::NAN
        }
    }
}

/// iputils ping's output: `64 bytes from A: icmp_seq=1 ttl=64 time=0.345 ms`
/// per reply (`(DUP!)` appended to duplicates) and the summary
/// `N packets transmitted, M received, [+D duplicates, ]X% packet loss, ...`.
fn parse_ping(out: &str) -> Ping {
    let mut p = Ping::default();
    for line in out.lines() {
        if let Some(at) = line.find(" time=") {
            if line.contains("DUP!") {
                continue;
            }
            let v = line[at + 6..].split_whitespace().next().unwrap_or("");
            if let Ok(ms) = v.trim_end_matches("ms").parse::<f64>() {
                p.rtts.push(ms);
            }
        } else if line.contains("packets transmitted") {
            for part in line.split(',') {
                let w: Vec<&str> = part.split_whitespace().collect();
                let n = |s: &str| s.trim_start_matches('+').parse::<u64>().ok();
                match w.as_slice() {
                    [n_, "packets", "transmitted"] => p.transmitted = n(n_).unwrap_or(0),
                    [n_, "received"] => p.received = n(n_).unwrap_or(0),
                    [n_, "duplicates"] => p.duplicates = n(n_).unwrap_or(0),
                    _ => {}
                }
            }
        }
    }
    p
}

/// RTT percentiles (nearest-rank), ms.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Rtt {
    p50: f64,
    p90: f64,
    max: f64,
    mean: f64,
}

fn rtt_stats(rtts: &[f64]) -> Rtt {
    let mut s = rtts.to_vec();
    s.sort_by(f64::total_cmp);
    let st = stats(&s);
    Rtt {
        p50: st.p50,
        p90: percentile(&s, 90.0),
        max: st.max,
        mean: st.mean,
    }
}

impl Rtt {
    fn json(&self) -> Value {
        json!({"p50": r3(self.p50), "p90": r3(self.p90), "max": r3(self.max), "mean": r3(self.mean)})
    }
}

/// One TCP bulk transfer.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Transfer {
    bytes: u64,
    secs: f64,
}

impl Transfer {
    /// MiB per second.
    fn mb_s(&self) -> f64 {
        if self.secs > 0.0 {
            self.bytes as f64 / 1048576.0 / self.secs
        } else {
            f64::NAN
        }
    }
    fn json(&self, base: Option<&Transfer>) -> Value {
        json!({
            "bytes": self.bytes,
            "secs": r3(self.secs),
            "mb_s": r3(self.mb_s()),
            "vs_unprotected": base.map(|b| r3(ratio(self.mb_s(), b.mb_s()))),
        })
    }
}

/// `ping -n -c COUNT -i 0.02 -W 2 VM` in `ns`.
fn ping_from(ns: &Netns, count: u64) -> Result<Ping> {
    let n = count.to_string();
    let out = ns.exec(
        "ping",
        &["-n", "-c", &n, "-i", PING_INTERVAL, "-W", "2", NET_VM_IP],
    )?;
    let text = String::from_utf8_lossy(&out.stdout);
    let p = parse_ping(&text);
    if p.rtts.is_empty() {
        bail!(
            "no reply to {count} pings of {NET_VM_IP} ({}): {}{}",
            out.status,
            tail(&text, 3),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(p)
}

fn connect_vm(port: u16) -> Result<TcpStream> {
    let ip: Ipv4Addr = NET_VM_IP.parse().context("VM address")?;
    let s = TcpStream::connect_timeout(&SocketAddr::from((ip, port)), Duration::from_secs(10))
        .with_context(|| format!("connect to {NET_VM_IP}:{port}"))?;
    if let Some(cc) = client_cc() {
        set_congestion_control(&s, &cc)?;
    }
    Ok(s)
}

/// The client's TCP congestion control shapes bulk transfer through held
/// ACKs (BBR paces at the rate it measured, CUBIC grows a window):
/// REMUS_BENCH_CLIENT_CC picks one for the client's sockets instead of the
/// host's default.
fn client_cc() -> Option<String> {
    std::env::var("REMUS_BENCH_CLIENT_CC")
        .ok()
        .filter(|c| !c.is_empty())
}

fn set_congestion_control(s: &TcpStream, cc: &str) -> Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: setsockopt reads cc.len() bytes from a valid buffer.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_CONGESTION,
            cc.as_ptr().cast(),
            cc.len() as libc::socklen_t,
        )
    };
    if rc != 0 {
        bail!(
            "TCP congestion control {cc:?}: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// Guest → client: `send SECONDS`, read to EOF; the bytes over the time
/// from the request to EOF.
fn tcp_from_guest(ns: &Netns, seconds: u64) -> Result<Transfer> {
    ns.run_in(|| -> Result<Transfer> {
        let mut s = connect_vm(NET_BULK_PORT)?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        let t = Instant::now();
        s.write_all(format!("send {seconds}\n").as_bytes())
            .context("send request")?;
        let mut buf = vec![0u8; 256 << 10];
        let mut bytes = 0u64;
        loop {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => bytes += n as u64,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e).with_context(|| format!("read after {bytes} bytes")),
            }
        }
        let secs = t.elapsed().as_secs_f64();
        if bytes == 0 {
            bail!("the guest sent nothing");
        }
        Ok(Transfer { bytes, secs })
    })?
}

/// Client → guest: `recv`, SECONDS of writes, half-close; the guest's
/// count of bytes over the time from the request to its answer.
fn tcp_to_guest(ns: &Netns, seconds: u64) -> Result<Transfer> {
    ns.run_in(|| -> Result<Transfer> {
        let mut s = connect_vm(NET_BULK_PORT)?;
        let t = Instant::now();
        s.write_all(b"recv\n").context("recv request")?;
        s.set_write_timeout(Some(Duration::from_millis(200)))?;
        let buf = vec![0x5au8; 256 << 10];
        let d = Duration::from_secs(seconds);
        let mut looked = false;
        while t.elapsed() < d {
            if !looked && t.elapsed() >= d / 2 {
                // What limits the sender halfway: its window, the guest's
                // advertised window, its send buffer (the kernel's view).
                looked = true;
                if let Ok(out) = std::process::Command::new("ss")
                    .args(["-tinH", "dst", NET_VM_IP])
                    .output()
                {
                    eprintln!(
                        "remus-bench:   client→guest halfway, ss: {}",
                        String::from_utf8_lossy(&out.stdout)
                            .split_whitespace()
                            .collect::<Vec<_>>()
                            .join(" ")
                    );
                }
            }
            match s.write(&buf) {
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                    ) => {}
                Err(e) => return Err(e).context("write"),
            }
        }
        s.shutdown(Shutdown::Write).context("half-close")?;
        s.set_read_timeout(Some(Duration::from_secs(60)))?;
        let mut reply = String::new();
        s.read_to_string(&mut reply)
            .context("read the guest's answer")?;
        let secs = t.elapsed().as_secs_f64();
        let bytes = reply
            .trim()
            .strip_prefix("received ")
            .and_then(|n| n.parse().ok())
            .with_context(|| format!("the guest answered {reply:?}"))?;
        Ok(Transfer { bytes, secs })
    })?
}

/// One net case.
#[derive(Debug, Clone)]
struct NetCase {
    mode: NetMode,
    ping: Ping,
    /// Guest → client and client → guest.
    down: Transfer,
    up: Transfer,
    /// Host wall time of the measurements, ms.
    window_ms: f64,
    /// Checkpoint events taken during the measurements.
    cps: Vec<Value>,
    initial_sync: Value,
}

impl NetCase {
    fn col(&self, k: &str) -> Vec<f64> {
        event_col(&self.cps, k)
    }
    fn rtt(&self) -> Rtt {
        rtt_stats(&self.ping.rtts)
    }
    fn achieved_interval_ms(&self) -> f64 {
        achieved_interval_ms(&self.cps)
    }
}

struct NetRun {
    accel: String,
    /// The client's TCP congestion control.
    client_cc: String,
    cases: Vec<NetCase>,
}

impl NetRun {
    fn base(&self) -> Option<&NetCase> {
        self.cases.iter().find(|c| c.mode == NetMode::Unprotected)
    }
    /// RTT p50 and p90 over the unprotected case's, ms.
    fn rtt_increase(&self, c: &NetCase) -> (f64, f64) {
        match self.base() {
            Some(b) => {
                let (r, br) = (c.rtt(), b.rtt());
                (r.p50 - br.p50, r.p90 - br.p90)
            }
            None => (f64::NAN, f64::NAN),
        }
    }
    /// Whether a buffered case met the target (None: no target).
    fn target_met(&self, c: &NetCase) -> Option<bool> {
        c.mode.target_ms().map(|t| self.rtt_increase(c).0 <= t)
    }
}

/// Pings, then TCP each way, calling `poll` between them: the results and
/// the host's window (Unix ms).
fn measure_net(
    (client, switch): (&Netns, &Netns),
    (vm_host, console): (&Netns, &dyn Fn() -> String),
    seconds: u64,
    poll: &mut dyn FnMut() -> Result<()>,
) -> Result<(Ping, Transfer, Transfer, u64, u64)> {
    let t0 = now_ms();
    let ping = ping_from(client, seconds * PINGS_PER_S).context("ping")?;
    poll()?;
    let before = TcpDiag::read((client, switch, vm_host));
    let drops_before = guest_drops(console, 0);
    let down = tcp_from_guest(client, seconds).context("TCP guest → client")?;
    let mid = TcpDiag::read((client, switch, vm_host));
    let drops_mid = guest_drops(console, drops_before.0 + 1);
    poll()?;
    let up = tcp_to_guest(client, seconds).context("TCP client → guest")?;
    let after = TcpDiag::read((client, switch, vm_host));
    let drops_after = guest_drops(console, drops_mid.0 + 1);
    poll()?;
    eprintln!(
        "remus-bench:   during guest→client: {}; during client→guest: {}",
        mid.since(&before),
        after.since(&mid)
    );
    eprintln!(
        "remus-bench:   guest's receive drops since boot: before {}; after guest→client {}; after client→guest {}",
        drops_before.1, drops_mid.1, drops_after.1
    );
    Ok((ping, down, up, t0, now_ms()))
}

/// The guest's last `guest drops:` console line once there are at least
/// `n` of them (the bulk service prints one after each transfer; waited
/// for up to 15 s): their count and the counters ("?" if it never came).
fn guest_drops(console: &dyn Fn() -> String, n: usize) -> (usize, String) {
    let t = Instant::now();
    loop {
        let text = console();
        let lines: Vec<&str> = text
            .lines()
            .filter_map(|l| l.split_once("guest drops: ").map(|(_, v)| v))
            .collect();
        if lines.len() >= n || t.elapsed() > Duration::from_secs(15) {
            return (
                lines.len(),
                lines.last().map_or("?".into(), |l| l.trim().to_string()),
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// What may throttle a bulk transfer, as counters: the client's TCP
/// retransmissions and retransmission timeouts (its /proc/net/snmp and
/// netstat); frames the VM's host dropped on the way to the VM (the
/// `tx_dropped` of its links: the tap's queue overflows when the relay
/// cannot hand frames to a stopped QEMU); frames dropped anywhere else
/// on the path (every link's `rx_dropped` and `tx_dropped` and every
/// queueing discipline's drops in the client, the LAN's switch and the
/// VM's host); and the frames the VM's taps handed to the agent's relay
/// (their `tx_packets`), to set against the guest's own receive count.
/// Printed per transfer as differences; a counter that cannot be read
/// counts 0.
#[derive(Debug, Default, Clone, Copy)]
struct TcpDiag {
    retrans_segs: u64,
    rto: u64,
    /// Tail-loss probes sent, and retransmissions the receiver reported
    /// as duplicates (D-SACK: spurious).
    probes: u64,
    dsack: u64,
    host_tx_dropped: u64,
    path_dropped: u64,
    tap_frames: u64,
}

/// Sums the numbers of `text` (whitespace-separated; others skipped).
fn sum_numbers(text: &str) -> u64 {
    text.split_whitespace()
        .filter_map(|v| v.parse::<u64>().ok())
        .sum()
}

/// The `dropped N` counts of `tc -s qdisc show` output, summed.
fn qdisc_drops(text: &str) -> u64 {
    text.split("dropped ")
        .skip(1)
        .filter_map(|rest| {
            rest.split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum()
}

impl TcpDiag {
    fn read((client, switch, vm_host): (&Netns, &Netns, &Netns)) -> TcpDiag {
        let cat = |ns: &Netns, script: &str| ns.exec_ok("sh", &["-c", script]).unwrap_or_default();
        let counters = cat(client, "cat /proc/net/snmp /proc/net/netstat");
        let dropped = cat(vm_host, "cat /sys/class/net/*/statistics/tx_dropped");
        let links =
            "cat /sys/class/net/*/statistics/rx_dropped /sys/class/net/*/statistics/tx_dropped";
        let path_dropped = [client, switch, vm_host]
            .into_iter()
            .map(|ns| sum_numbers(&cat(ns, links)) + qdisc_drops(&cat(ns, "tc -s qdisc show")))
            .sum();
        TcpDiag {
            retrans_segs: proc_counter(&counters, "Tcp:", "RetransSegs"),
            rto: proc_counter(&counters, "TcpExt:", "TCPTimeouts"),
            probes: proc_counter(&counters, "TcpExt:", "TCPLossProbes"),
            dsack: proc_counter(&counters, "TcpExt:", "TCPDSACKRecv"),
            host_tx_dropped: sum_numbers(&dropped),
            path_dropped,
            tap_frames: sum_numbers(&cat(
                vm_host,
                "cat /sys/class/net/rm*/statistics/tx_packets",
            )),
        }
    }

    fn since(&self, earlier: &TcpDiag) -> String {
        format!(
            "client retransmitted {} segments ({} timeouts, {} tail-loss probes, {} reported duplicate); {} frames dropped toward the VM, {} anywhere on the path; the taps handed {} frames to the relay",
            self.retrans_segs.saturating_sub(earlier.retrans_segs),
            self.rto.saturating_sub(earlier.rto),
            self.probes.saturating_sub(earlier.probes),
            self.dsack.saturating_sub(earlier.dsack),
            self.host_tx_dropped.saturating_sub(earlier.host_tx_dropped),
            self.path_dropped.saturating_sub(earlier.path_dropped),
            self.tap_frames.saturating_sub(earlier.tap_frames)
        )
    }
}

/// A counter of /proc/net/snmp or /proc/net/netstat: a header line
/// `PREFIX name name ...` followed by a value line `PREFIX v v ...`.
fn proc_counter(text: &str, prefix: &str, name: &str) -> u64 {
    let mut lines = text.lines().filter(|l| l.starts_with(prefix));
    while let (Some(head), Some(vals)) = (lines.next(), lines.next()) {
        if let Some(i) = head.split_whitespace().position(|w| w == name) {
            return vals
                .split_whitespace()
                .nth(i)
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
        }
    }
    0
}

fn run_net(bins: &Binaries, img: &GuestImage, o: &Opts) -> Result<NetRun> {
    // Declared first, dropped last: after the agents living in its hosts.
    let lan = Lan::standard("bench")
        .context("LAN of network namespaces (needs root, ip and bridge support)")?;
    let keydir = tempfile::tempdir()?;
    let key = write_key(keydir.path());
    let key_s = key.to_str().context("key path")?;
    let peer = format!("{}:{NET_REPL_PORT}", lan.addr("b"));
    let backup = Agent::start(
        bins,
        Some(lan.host("b")),
        &["--listen", &peer, "--key", key_s],
    )
    .context("start backup agent in host b")?;
    let primary = Agent::start(bins, Some(lan.host("a")), &["--key", key_s])
        .context("start primary agent in host a")?;
    let vm = "bench-net";
    let cfg = primary.write_file("vm.toml", &net_vm_config(img, vm));
    create_vm(&primary, vm, &cfg)?;
    let logs = logs_of(&primary, &backup, vm);
    primary
        .wait_console(vm, Duration::from_secs(180), "seqserver: listening", |c| {
            c.contains("seqserver: listening")
        })
        .map_err(logs)?;
    let ip: Ipv4Addr = NET_VM_IP.parse().context("VM address")?;
    let t = Instant::now();
    while !lan.ping("c", ip) {
        if t.elapsed() > Duration::from_secs(60) {
            return Err(logs(anyhow::anyhow!(
                "{NET_VM_IP} does not answer pings from host c"
            )));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let accel = accel_of(&primary, vm);
    let client = lan.host("c");
    let vm_host = lan.host("a");
    let cc = client_cc().map_or_else(
        || {
            client
                .exec_ok("sysctl", &["-n", "net.ipv4.tcp_congestion_control"])
                .map_or_else(|e| format!("? ({e})"), |c| c.trim().to_string())
        },
        |c| format!("{c} (REMUS_BENCH_CLIENT_CC)"),
    );
    eprintln!("remus-bench: net: the client's TCP congestion control is {cc}");
    let console = || primary.console(vm);
    let mut cases: Vec<NetCase> = Vec::new();
    for mode in net_modes(&o.intervals) {
        eprintln!("remus-bench: net, {} ...", mode.name());
        let c = match mode.interval_ms() {
            None => {
                let (ping, down, up, t0, t1) = measure_net(
                    (client, lan.switch()),
                    (vm_host, &console),
                    o.seconds,
                    &mut || Ok(()),
                )
                .map_err(logs)?;
                NetCase {
                    mode,
                    ping,
                    down,
                    up,
                    window_ms: (t1 - t0) as f64,
                    cps: Vec::new(),
                    initial_sync: Value::Null,
                }
            }
            Some(i) => {
                let extra = mode.protect_args();
                let settle =
                    Duration::from_secs(60) + Duration::from_millis(5 * i * o.warmup as u64);
                // The backup may still be tearing down the last case's
                // standby (it answers "busy, try again"): a few tries.
                let mut attempt = 0;
                let (measured, initial_sync, cps, err) = loop {
                    attempt += 1;
                    let mut p = Protecting::start(bins, &primary, vm, &peer, i, o, extra)?;
                    if let Err(e) = p.first_checkpoint(Duration::from_secs(300)) {
                        let err = p.stop(&primary, vm);
                        if err.contains("try again") && attempt < 3 {
                            eprintln!("remus-bench:   the backup was busy; trying again");
                            std::thread::sleep(Duration::from_millis(500));
                            continue;
                        }
                        break (Err(e), Value::Null, Vec::new(), err);
                    }
                    let measured = p
                        .wait_checkpoints(1 + o.warmup, settle)
                        .and_then(|()| {
                            measure_net(
                                (client, lan.switch()),
                                (vm_host, &console),
                                o.seconds,
                                &mut || p.drain(),
                            )
                        })
                        .and_then(|m| {
                            // Checkpoints of the window's end are reported at their ack.
                            std::thread::sleep(Duration::from_millis(2 * i + 500));
                            p.drain().map(|()| m)
                        });
                    let initial_sync = p.initial_sync.clone();
                    let cps = std::mem::take(&mut p.cps);
                    let err = p.stop(&primary, vm);
                    break (measured, initial_sync, cps, err);
                };
                let (ping, down, up, t0, t1) = measured.map_err(|e| {
                    logs(e.context(format!("{}: remus protect: {}", mode.name(), err.trim())))
                })?;
                // The backup drops its standby when protection stops; the
                // next protect needs it gone.
                wait_standby_gone(&backup, vm).map_err(logs)?;
                NetCase {
                    mode,
                    ping,
                    down,
                    up,
                    window_ms: (t1 - t0) as f64,
                    cps: cps
                        .into_iter()
                        .filter(|e| (t0..=t1).contains(&e["taken_at_ms"].as_u64().unwrap_or(0)))
                        .collect(),
                    initial_sync,
                }
            }
        };
        report_net_case(&c, cases.first());
        cases.push(c);
    }
    destroy_or_warn(&primary, vm);
    drop(primary);
    drop(backup);
    drop(lan);
    Ok(NetRun {
        accel,
        client_cc: cc,
        cases,
    })
}

fn report_net_case(c: &NetCase, unprotected: Option<&NetCase>) {
    let r = c.rtt();
    let mut line = format!(
        "remus-bench:   RTT p50 {:.2} p90 {:.2} max {:.2} ms ({} replies, loss {:.1}%), TCP guest→client {:.1} MB/s, client→guest {:.1} MB/s",
        r.p50,
        r.p90,
        r.max,
        c.ping.rtts.len(),
        c.ping.loss_pct(),
        c.down.mb_s(),
        c.up.mb_s()
    );
    if let Some(u) = unprotected {
        line.push_str(&format!(
            "; RTT p50 +{:.2} ms, TCP {:.2}× / {:.2}× unprotected; {} checkpoints, pause p50 {:.2} ms, ack p50 {:.2} ms",
            r.p50 - u.rtt().p50,
            ratio(c.down.mb_s(), u.down.mb_s()),
            ratio(c.up.mb_s(), u.up.mb_s()),
            c.cps.len(),
            stats(&c.col("pause_ms")).p50,
            stats(&c.col("ack_ms")).p50
        ));
    }
    if !c.cps.is_empty() {
        // The wait before each stop for the guest to take the frames QEMU
        // held for it (remus_net::inbound).
        let hold = stats(&event_phase(&c.cps, "inbound"));
        let timed_out = c
            .cps
            .iter()
            .filter(|e| e["phases"]["inbound_timed_out"].as_bool() == Some(true))
            .count();
        line.push_str(&format!(
            "; inbound hold before stop p50 {:.2} p99 {:.2} ms, {timed_out} of {} ran out of time",
            hold.p50,
            hold.p99,
            c.cps.len()
        ));
    }
    eprintln!("{line}");
}

/// A throughput ratio: two decimals, three below 0.1 (so that a collapse
/// does not read as zero).
fn fmt_ratio(r: f64) -> String {
    if r < 0.1 {
        format!("{r:.3}")
    } else {
        format!("{r:.2}")
    }
}

/// The one-line verdict of a buffered case.
fn net_verdict(increase: f64, target: f64) -> String {
    if increase <= target {
        format!("met (+{increase:.2} ms ≤ {target} ms)")
    } else {
        format!(
            "**MISSED** by {:.2} ms (+{increase:.2} ms > {target} ms)",
            increase - target
        )
    }
}

fn render_net_md(date: &str, m: &Machine, profile: &str, o: &Opts, run: &NetRun) -> String {
    let mut s = format!(
        "## {date}: network RTT and TCP throughput, unprotected vs protected (--no-net, buffered)\n\n\
         {}\
         - three network namespaces on one bridged LAN: primary agent in host a, backup in b \
         (listening on 198.18.0.2), client c; one VM for the whole run: 256 MiB, 1 vCPU, a NIC on a's br0 \
         (through the agent's frame relay), {NET_VM_IP}, `{}`; cases in order: unprotected, \
         `remus protect -i I --timeout {} --no-net` at the first interval, `remus protect -i I --timeout {}` \
         (output buffered until the backup acks its checkpoint; an epoch ends early once output waits, \
         output-driven epochs at the default `--min-interval`, the gap growing toward the default `--max-latency` while the guest streams) at each, \
         the same with `--min-interval 0` (every epoch lasts -i: the behaviour before, as this run's baseline) at the first, \
         and with `--max-latency 0` (the gap stays at `--min-interval`: the baseline of the adaptive gap) at the first; protection stopped in between; \
         a protected case is measured from its checkpoint {}\n\
         - per case, from c (TCP congestion control {}), one after the other: `ping -c {} -i {PING_INTERVAL}` (RTT percentiles nearest-rank \
         over the replies; loss = unanswered / sent); TCP guest→client: `send {}` to port {NET_BULK_PORT}, read \
         to EOF, bytes / time from request to EOF; TCP client→guest: `recv`, {} s of writes, the guest's byte \
         count / time from request to its answer (1 MB = 1 MiB); checkpoint columns over the checkpoints taken \
         meanwhile\n\
         - targets: buffered with output-driven epochs (the default), RTT p50 at most {NET_TARGET_OUTPUT_DRIVEN_MS} ms \
         over unprotected (the performance issue); with fixed epochs, at most interval/2 + {NET_TARGET_SLACK_MS} ms \
         (the first network issue)\n\n",
        m.md(&run.accel, profile),
        net_workload(),
        o.timeout_ms,
        o.timeout_ms,
        o.warmup + 1,
        run.client_cc,
        o.seconds * PINGS_PER_S,
        o.seconds,
        o.seconds,
    );
    s.push_str("| case | RTT p50 ms | p90 | max | loss % | RTT p50 increase ms | target ms | target | guest→client MB/s | ×unprotected | client→guest MB/s | ×unprotected | checkpoints | pause p50 ms | ack p50 ms |\n");
    s.push_str("|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|\n");
    let dash = || "—".to_string();
    let base = run.base();
    for c in &run.cases {
        let r = c.rtt();
        let protected = c.mode.interval_ms().is_some();
        let cp = |f: &dyn Fn() -> String| if protected { f() } else { dash() };
        let vs = |t: &Transfer, b: Option<&Transfer>| {
            b.map(|b| fmt_ratio(ratio(t.mb_s(), b.mb_s())))
                .unwrap_or_else(dash)
        };
        let (inc, _) = run.rtt_increase(c);
        s.push_str(&format!(
            "| {} | {:.2} | {:.2} | {:.2} | {:.1} | {} | {} | {} | {:.1} | {} | {:.1} | {} | {} | {} | {} |\n",
            c.mode.name(),
            r.p50,
            r.p90,
            r.max,
            c.ping.loss_pct(),
            cp(&|| format!("{inc:+.2}")),
            c.mode.target_ms().map(|t| format!("{t}")).unwrap_or_else(dash),
            match run.target_met(c) {
                Some(true) => "met".to_string(),
                Some(false) => "**missed**".to_string(),
                None => dash(),
            },
            c.down.mb_s(),
            vs(&c.down, base.map(|b| &b.down)),
            c.up.mb_s(),
            vs(&c.up, base.map(|b| &b.up)),
            cp(&|| c.cps.len().to_string()),
            cp(&|| format!("{:.2}", stats(&c.col("pause_ms")).p50)),
            cp(&|| format!("{:.2}", stats(&c.col("ack_ms")).p50)),
        ));
    }
    s.push_str(
        "\n`--no-net` trades safety for latency: the guest's output leaves before the backup holds the state \
         that sent it, so after a failover clients may have seen output the backup never produced and TCP \
         sessions can stall or reset (the project saw a session stall in the first `--no-net` failover round).\n",
    );
    let verdicts: Vec<String> = run
        .cases
        .iter()
        .filter_map(|c| {
            let t = c.mode.target_ms()?;
            Some(format!(
                "{}: {} (its pause p50 + ack p50: {:.2} ms)",
                c.mode.name(),
                net_verdict(run.rtt_increase(c).0, t),
                stats(&c.col("pause_ms")).p50 + stats(&c.col("ack_ms")).p50
            ))
        })
        .collect();
    s.push_str(&format!(
        "\nTargets: {}. A buffered reply waits for the end of its epoch (with fixed epochs interval/2 on \
         average; with output-driven ones until --min-interval after the last checkpoint at most), then for \
         the checkpoint's pause and the backup's ack.\n\n",
        if verdicts.is_empty() {
            "not measured".to_string()
        } else {
            verdicts.join("; ")
        }
    ));
    s
}

fn net_case_json(run: &NetRun, c: &NetCase) -> Value {
    let base = run.base();
    let (inc50, inc90) = run.rtt_increase(c);
    let mut v = json!({
        "name": c.mode.name(),
        "mode": c.mode.key(),
        "protected": c.mode.interval_ms().is_some(),
        "interval_ms": c.mode.interval_ms(),
        "accel": run.accel,
        "client_cc": run.client_cc,
        "window_ms": c.window_ms,
        "ping": {
            "replies": c.ping.rtts.len(),
            "transmitted": c.ping.transmitted,
            "received": c.ping.received,
            "duplicates": c.ping.duplicates,
            "loss_pct": r3(c.ping.loss_pct()),
            "rtt_ms": c.rtt().json(),
        },
        "rtt_increase_ms": base.map(|_| json!({"p50": r3(inc50), "p90": r3(inc90)})),
        "tcp": {
            "guest_to_client": c.down.json(base.map(|b| &b.down)),
            "client_to_guest": c.up.json(base.map(|b| &b.up)),
        },
    });
    if c.mode.interval_ms().is_some() {
        let extra = json!({
            "checkpoints": c.cps.len(),
            "achieved_interval_ms": r3(c.achieved_interval_ms()),
            "pause_ms": stats(&c.col("pause_ms")).json(),
            "ack_ms": stats(&c.col("ack_ms")).json(),
            "dirty_pages": stats(&c.col("dirty_pages")).json(),
            "bytes": stats(&c.col("bytes")).json(),
            "initial_sync": c.initial_sync,
            "target": c.mode.target_ms().map(|t| json!({"rtt_p50_increase_max_ms": t, "met": run.target_met(c)})),
        });
        merge_json(&mut v, extra);
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_counter_reads_the_value_under_its_name() {
        let text = "Ip: Forwarding DefaultTTL\nIp: 1 64\nTcp: RtoAlgorithm RetransSegs InErrs\nTcp: 1 42 0\nTcpExt: SyncookiesSent TCPTimeouts\nTcpExt: 0 7\n";
        assert_eq!(proc_counter(text, "Tcp:", "RetransSegs"), 42);
        assert_eq!(proc_counter(text, "TcpExt:", "TCPTimeouts"), 7);
        assert_eq!(proc_counter(text, "Tcp:", "Missing"), 0);
        assert_eq!(proc_counter("", "Tcp:", "RetransSegs"), 0);
    }

    #[test]
    fn qdisc_drops_sums_every_discipline() {
        let text = "qdisc noqueue 0: dev lo root refcnt 2\n Sent 0 bytes 0 pkt (dropped 0, overlimits 0 requeues 0)\nqdisc fq_codel 0: dev eth0 root refcnt 2 limit 10240p\n Sent 9 bytes 3 pkt (dropped 17, overlimits 0 requeues 2)\nqdisc pfifo 1: dev t0 parent 1:1\n Sent 1 bytes 1 pkt (dropped 4, overlimits 0 requeues 0)\n";
        assert_eq!(qdisc_drops(text), 21);
        assert_eq!(qdisc_drops(""), 0);
        assert_eq!(sum_numbers("3\n4\nx\n"), 7);
    }
    use crate::report::test_machine;

    #[test]
    fn ping_output() {
        let out = "PING 198.18.0.10 (198.18.0.10) 56(84) bytes of data.\n\
            64 bytes from 198.18.0.10: icmp_seq=1 ttl=64 time=0.345 ms\n\
            64 bytes from 198.18.0.10: icmp_seq=2 ttl=64 time=51.2 ms\n\
            64 bytes from 198.18.0.10: icmp_seq=2 ttl=64 time=52.0 ms (DUP!)\n\
            From 198.18.0.3 icmp_seq=3 Destination Host Unreachable\n\
            64 bytes from 198.18.0.10: icmp_seq=4 ttl=64 time=7 ms\n\
            \n\
            --- 198.18.0.10 ping statistics ---\n\
            4 packets transmitted, 3 received, +1 duplicates, 25% packet loss, time 61ms\n\
            rtt min/avg/max/mdev = 0.345/19.5/51.2/22.6 ms\n";
        let p = parse_ping(out);
        assert_eq!(p.rtts, vec![0.345, 51.2, 7.0]);
        assert_eq!((p.transmitted, p.received, p.duplicates), (4, 3, 1));
        assert_eq!(p.loss_pct(), 25.0);
        let p = parse_ping(
            "64 bytes from 198.18.0.10: icmp_seq=1 ttl=64 time=1.5 ms\n\
             2 packets transmitted, 1 received, +1 errors, 50% packet loss, time 20ms\n",
        );
        assert_eq!((p.rtts.len(), p.transmitted, p.received), (1, 2, 1));
        assert!(parse_ping("").loss_pct().is_nan());
        let v: Vec<f64> = (1..=200).rev().map(f64::from).collect();
        let r = rtt_stats(&v);
        assert_eq!((r.p50, r.p90, r.max), (100.0, 180.0, 200.0));
        let t = Transfer {
            bytes: 50 << 20,
            secs: 2.0,
        };
        assert_eq!(t.mb_s(), 25.0);
    }

    #[test]
    fn net_report() {
        assert_eq!(
            net_modes(&[100, 200]),
            vec![
                NetMode::Unprotected,
                NetMode::NoNet(100),
                NetMode::Buffered(100),
                NetMode::Buffered(200),
                NetMode::Fixed(100),
                NetMode::FixedGap(100)
            ]
        );
        assert_eq!(NetMode::Fixed(100).target_ms(), Some(52.0));
        assert_eq!(NetMode::Buffered(100).target_ms(), Some(15.0));
        assert_eq!(NetMode::NoNet(100).target_ms(), None);
        let o = Opts::try_parse_from(["remus-bench", "--net"]).unwrap();
        assert!(o.net && !o.disk);
        assert!(Opts::try_parse_from(["remus-bench", "--net", "--disk"]).is_err());
        let cp = |t: u64| {
            json!({"event": "checkpoint", "taken_at_ms": t, "pause_ms": 3.0, "dirty_pages": 100,
                   "bytes": 500000, "ack_ms": 1.5})
        };
        let case = |mode, rtt: f64, mb_s: u64| NetCase {
            mode,
            ping: Ping {
                rtts: vec![rtt; 10],
                transmitted: 10,
                received: 10,
                duplicates: 0,
            },
            down: Transfer {
                bytes: mb_s << 20,
                secs: 1.0,
            },
            up: Transfer {
                bytes: mb_s << 19,
                secs: 1.0,
            },
            window_ms: 1000.0,
            cps: if mode == NetMode::Unprotected {
                vec![]
            } else {
                vec![cp(100), cp(200)]
            },
            initial_sync: Value::Null,
        };
        let run = NetRun {
            accel: "kvm".into(),
            client_cc: "cubic".into(),
            cases: vec![
                case(NetMode::Unprotected, 0.5, 100),
                case(NetMode::NoNet(100), 1.0, 90),
                case(NetMode::Fixed(100), 50.5, 20),
                case(NetMode::Fixed(200), 105.0, 10),
            ],
        };
        assert_eq!(run.rtt_increase(&run.cases[2]), (50.0, 50.0));
        assert_eq!(run.target_met(&run.cases[1]), None);
        assert_eq!(run.target_met(&run.cases[2]), Some(true));
        assert_eq!(run.target_met(&run.cases[3]), Some(false));
        let m = test_machine();
        let md = render_net_md("2026-01-01 00:00 UTC", &m, "release", &o, &run);
        assert!(
            md.contains("| protected -i 100, buffered, --min-interval 0 | 50.50 | 50.50 | 50.50 | 0.0 | +50.00 | 52 | met | 20.0 | 0.20 | 10.0 | 0.20 | 2 | 3.00 | 1.50 |"),
            "{md}"
        );
        assert!(
            md.contains("| unprotected | 0.50 | 0.50 | 0.50 | 0.0 | — | — | — | 100.0 | 1.00 |"),
            "{md}"
        );
        assert!(
            md.contains("protected -i 100, buffered, --min-interval 0: met (+50.00 ms ≤ 52 ms) (its pause p50 + ack p50: 4.50 ms); protected -i 200, buffered, --min-interval 0: **MISSED** by 2.50 ms (+104.50 ms > 102 ms)"),
            "{md}"
        );
        let j = net_case_json(&run, &run.cases[3]);
        assert_eq!(j["mode"], "buffered_fixed_epochs");
        assert_eq!(j["target"]["met"], false);
        assert_eq!(j["rtt_increase_ms"]["p50"], 104.5);
        assert_eq!(j["tcp"]["guest_to_client"]["vs_unprotected"], 0.1);
        assert_eq!(
            (fmt_ratio(0.005), fmt_ratio(0.38)),
            ("0.005".into(), "0.38".into())
        );
        let j = net_case_json(&run, &run.cases[0]);
        assert!(j["pause_ms"].is_null() && j["target"].is_null());
    }
}
