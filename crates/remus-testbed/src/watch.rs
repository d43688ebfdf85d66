//! Watching for two running copies of one VM (split-brain tests).
//!
//! [`RunWatch`] samples each copy's run state through its agent's API
//! every 10 ms, one thread per agent, and records which switch port frames
//! from the VM's MAC address arrive on (an `AF_PACKET` socket per port in
//! the LAN's switch namespace). [`WatchReport::check_never_two`] then
//! asserts that at no moment could both copies have been running, and
//! that the VM's frames never came from both hosts at once.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::lan::Lan;

/// How often each copy's state is sampled.
pub const SAMPLE_EVERY: Duration = Duration::from_millis(10);

/// One look at one copy: the request went out at `from` and the answer
/// came at `to` (since the watch started).
#[derive(Debug, Clone)]
pub struct Sample {
    pub host: String,
    pub from: Duration,
    pub to: Duration,
    /// The xl state letter, or "-" when the agent has no such VM.
    pub state: String,
    pub running: bool,
}

/// A frame with the VM's source MAC, seen arriving from a host's port.
#[derive(Debug, Clone)]
pub struct Frame {
    pub host: String,
    pub at: Duration,
}

/// Samples run states and frames until [`RunWatch::stop`].
pub struct RunWatch {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    samples: Arc<Mutex<Vec<Sample>>>,
    frames: Arc<Mutex<Vec<Frame>>>,
    hosts: Vec<String>,
}

impl RunWatch {
    /// Watches `vm` on each `(host, agent socket)`, and the frames from
    /// `mac` arriving on those hosts' ports of `lan`.
    pub fn start(lan: &Lan, copies: &[(&str, &Path)], vm: &str, mac: [u8; 6]) -> Result<RunWatch> {
        let t0 = Instant::now();
        let stop = Arc::new(AtomicBool::new(false));
        let samples = Arc::new(Mutex::new(Vec::new()));
        let frames = Arc::new(Mutex::new(Vec::new()));
        let mut threads = Vec::new();
        for (host, socket) in copies {
            let (stop, samples) = (stop.clone(), samples.clone());
            let (host, socket, vm) = (host.to_string(), socket.to_path_buf(), vm.to_string());
            threads.push(std::thread::spawn(move || {
                sample_loop(&host, &socket, &vm, t0, &stop, &samples)
            }));
        }
        for (host, _) in copies {
            let port = lan.port(host);
            let (stop, frames) = (stop.clone(), frames.clone());
            let host = host.to_string();
            let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
            threads.push(
                lan.switch()
                    .spawn(move || sniff(&host, &port, mac, t0, &stop, &frames, ready_tx))?,
            );
            ready_rx
                .recv()
                .context("sniffer thread")?
                .map_err(anyhow::Error::msg)?;
        }
        Ok(RunWatch {
            stop,
            threads,
            samples,
            frames,
            hosts: copies.iter().map(|(h, _)| h.to_string()).collect(),
        })
    }

    /// Stops watching; what was seen.
    pub fn stop(self) -> WatchReport {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads {
            let _ = t.join();
        }
        fn take<T>(m: &Mutex<Vec<T>>) -> Vec<T> {
            std::mem::take(&mut *m.lock().unwrap_or_else(|p| p.into_inner()))
        }
        WatchReport {
            samples: take(&self.samples),
            frames: take(&self.frames),
            hosts: self.hosts,
        }
    }
}

/// What a [`RunWatch`] saw.
pub struct WatchReport {
    pub samples: Vec<Sample>,
    pub frames: Vec<Frame>,
    hosts: Vec<String>,
}

impl WatchReport {
    /// The spans in which `host`'s copy may have been running: from the
    /// answer of the last non-running sample before a running one to the
    /// request of the next non-running sample (a conservative bound).
    pub fn running_spans(&self, host: &str) -> Vec<(Duration, Duration)> {
        let s: Vec<&Sample> = self.samples.iter().filter(|s| s.host == host).collect();
        let mut spans = Vec::new();
        let mut open: Option<Duration> = None;
        let mut last_stopped = Duration::ZERO;
        for x in &s {
            match (x.running, open) {
                (true, None) => open = Some(last_stopped),
                (false, Some(from)) => {
                    spans.push((from, x.from));
                    open = None;
                }
                _ => {}
            }
            if !x.running {
                last_stopped = x.to;
            }
        }
        if let Some(from) = open {
            spans.push((from, Duration::MAX));
        }
        spans
    }

    /// Whether `host`'s copy was ever seen running.
    pub fn ever_ran(&self, host: &str) -> bool {
        self.samples.iter().any(|s| s.host == host && s.running)
    }

    /// Frames from the VM's MAC that arrived from `host`'s port.
    pub fn frames_from(&self, host: &str) -> Vec<Duration> {
        self.frames
            .iter()
            .filter(|f| f.host == host)
            .map(|f| f.at)
            .collect()
    }

    /// Sampling intervals per host: (median, max).
    pub fn intervals(&self, host: &str) -> (Duration, Duration) {
        let starts: Vec<Duration> = self
            .samples
            .iter()
            .filter(|s| s.host == host)
            .map(|s| s.from)
            .collect();
        let mut d: Vec<Duration> = starts.windows(2).map(|w| w[1] - w[0]).collect();
        d.sort_unstable();
        match d.len() {
            0 => (Duration::MAX, Duration::MAX),
            n => (d[n / 2], d[n - 1]),
        }
    }

    /// No two copies running at once (by run state), and the VM's frames
    /// never coming from two hosts at once: once frames come from a new
    /// host, none come from the previous one again.
    pub fn check_never_two(&self) -> Result<()> {
        for (i, a) in self.hosts.iter().enumerate() {
            for b in &self.hosts[i + 1..] {
                for sa in self.running_spans(a) {
                    for sb in self.running_spans(b) {
                        if sa.0 < sb.1 && sb.0 < sa.1 {
                            bail!(
                                "two running copies: {a} may have run during {sa:?} and {b} during {sb:?}"
                            );
                        }
                    }
                }
            }
        }
        let mut last: Option<&Frame> = None;
        let mut left: Vec<&str> = Vec::new();
        for f in &self.frames {
            if let Some(l) = last
                && l.host != f.host
            {
                if left.contains(&f.host.as_str()) {
                    bail!(
                        "the VM's frames came from {} again at {:?} after they had moved to {}",
                        f.host,
                        f.at,
                        l.host
                    );
                }
                left.push(&l.host);
            }
            last = Some(f);
        }
        Ok(())
    }

    /// One line per host: samples, intervals, running spans, frames.
    pub fn summary(&self) -> String {
        let mut out = String::new();
        for h in &self.hosts {
            let n = self.samples.iter().filter(|s| s.host == *h).count();
            let (p50, max) = self.intervals(h);
            let frames = self.frames_from(h);
            out.push_str(&format!(
                "{h}: {n} samples (interval p50 {p50:?}, max {max:?}); running {:?}; {} frames{}\n",
                self.running_spans(h),
                frames.len(),
                match (frames.first(), frames.last()) {
                    (Some(a), Some(b)) => format!(" from {a:?} to {b:?}"),
                    _ => String::new(),
                }
            ));
        }
        out
    }
}

fn sample_loop(
    host: &str,
    socket: &Path,
    vm: &str,
    t0: Instant,
    stop: &AtomicBool,
    out: &Mutex<Vec<Sample>>,
) {
    let mut next = Instant::now();
    while !stop.load(Ordering::SeqCst) {
        let from = t0.elapsed();
        if let Some((state, role)) = vm_state(socket, vm) {
            let to = t0.elapsed();
            // A standby is paused by design; a primary's checkpoint
            // pauses are shown as running by its agent.
            let running = (state == "r" || state == "b") && role != "backup";
            out.lock().unwrap_or_else(|p| p.into_inner()).push(Sample {
                host: host.to_string(),
                from,
                to,
                state,
                running,
            });
        }
        next += SAMPLE_EVERY;
        match next.checked_duration_since(Instant::now()) {
            Some(d) => std::thread::sleep(d),
            None => next = Instant::now(),
        }
    }
}

/// `GET /v1/vms/NAME` on the agent's socket: (state letter, role), or
/// ("-", "") when the agent has no such VM; None when it did not answer.
fn vm_state(socket: &Path, vm: &str) -> Option<(String, String)> {
    let mut s = UnixStream::connect(socket).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        s,
        "GET /v1/vms/{vm} HTTP/1.1\r\nHost: remusd\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).ok()?;
    let status = resp.split_whitespace().nth(1)?;
    if status == "404" {
        return Some(("-".into(), String::new()));
    }
    let body = resp.split("\r\n\r\n").nth(1)?;
    let v: serde_json::Value = serde_json::from_str(body).ok()?;
    Some((
        v["state"].as_str()?.to_string(),
        v["role"].as_str()?.to_string(),
    ))
}

/// Records frames with source `mac` arriving on `port` (in the switch's
/// namespace: this thread has joined it).
fn sniff(
    host: &str,
    port: &str,
    mac: [u8; 6],
    t0: Instant,
    stop: &AtomicBool,
    out: &Mutex<Vec<Frame>>,
    ready: std::sync::mpsc::SyncSender<Result<(), String>>,
) {
    let fd = match packet_socket(port) {
        Ok(fd) => {
            let _ = ready.send(Ok(()));
            fd
        }
        Err(e) => {
            let _ = ready.send(Err(format!("sniff {port}: {e}")));
            return;
        }
    };
    let mut buf = [0u8; 2048];
    while !stop.load(Ordering::SeqCst) {
        // SAFETY: plain recvfrom into our buffer and address.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        let mut alen = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
        let n = unsafe {
            libc::recvfrom(
                fd.0,
                buf.as_mut_ptr().cast(),
                buf.len(),
                0,
                (&mut addr as *mut libc::sockaddr_ll).cast(),
                &mut alen,
            )
        };
        if n < 14 {
            continue;
        }
        // Frames the switch sends towards the host are not the host's.
        if addr.sll_pkttype == libc::PACKET_OUTGOING {
            continue;
        }
        if buf[6..12] == mac {
            out.lock().unwrap_or_else(|p| p.into_inner()).push(Frame {
                host: host.to_string(),
                at: t0.elapsed(),
            });
        }
    }
}

struct Fd(i32);

impl Drop for Fd {
    fn drop(&mut self) {
        // SAFETY: we own the descriptor.
        unsafe { libc::close(self.0) };
    }
}

fn packet_socket(ifname: &str) -> std::io::Result<Fd> {
    let proto = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: socket/setsockopt/bind with valid arguments; the fd is owned
    // by Fd from here on.
    unsafe {
        let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto));
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let fd = Fd(fd);
        let name = std::ffi::CString::new(ifname)?;
        let idx = libc::if_nametoindex(name.as_ptr());
        if idx == 0 {
            return Err(std::io::Error::last_os_error());
        }
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 100_000,
        };
        libc::setsockopt(
            fd.0,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        );
        let mut sll: libc::sockaddr_ll = std::mem::zeroed();
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = proto;
        sll.sll_ifindex = idx as i32;
        if libc::bind(
            fd.0,
            (&sll as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        ) < 0
        {
            return Err(std::io::Error::last_os_error());
        }
        Ok(fd)
    }
}
