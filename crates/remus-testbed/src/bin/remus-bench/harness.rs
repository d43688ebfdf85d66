//! Running the cases: agents and VMs, `remus protect --json` in the
//! background and its checkpoint events, a QEMU of our own, the guests'
//! consoles.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use remus_testbed::{Agent, Binaries, GuestImage};
use serde_json::{Value, json};

use crate::opts::Opts;
use crate::report::stats;

/// The numbers that follow `label` on a console's lines (the last
/// occurrence on a line: a guest's lines can run into each other), those
/// that parse.
pub(crate) fn console_numbers<T: std::str::FromStr>(console: &str, label: &str) -> Vec<T> {
    console
        .lines()
        .filter_map(|l| {
            let at = l.rfind(label)?;
            l[at + label.len()..]
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect()
}

pub(crate) fn tail(s: &str, n: usize) -> String {
    let v: Vec<&str> = s.lines().rev().take(n).collect();
    v.into_iter().rev().collect::<Vec<_>>().join("\n")
}

/// Column `k` of checkpoint events (NaN where missing).
pub(crate) fn event_col(cps: &[Value], k: &str) -> Vec<f64> {
    cps.iter()
        .map(|e| e[k].as_f64().unwrap_or(f64::NAN))
        .collect()
}

/// Pause phase `k` of checkpoint events (NaN where missing).
pub(crate) fn event_phase(cps: &[Value], k: &str) -> Vec<f64> {
    cps.iter()
        .map(|e| e["phases"][k].as_f64().unwrap_or(f64::NAN))
        .collect()
}

/// Mean time between checkpoint events, ms (NaN with fewer than two).
pub(crate) fn achieved_interval_ms(cps: &[Value]) -> f64 {
    let times = event_col(cps, "taken_at_ms");
    if times.len() > 1 {
        (times[times.len() - 1] - times[0]) / (times.len() - 1) as f64
    } else {
        f64::NAN
    }
}

/// The accelerator `agent` runs `vm` with, as it lists it ("?" if not).
pub(crate) fn accel_of(agent: &Agent, vm: &str) -> String {
    agent
        .vm(vm)
        .and_then(|v| v["accel"].as_str().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

/// `remus create CONFIG` on `agent`, the VM named `vm`.
pub(crate) fn create_vm(agent: &Agent, vm: &str, cfg: &Path) -> Result<()> {
    let out = agent.cli(&["create", cfg.to_str().context("config path")?]);
    if !out.ok {
        bail!("create {vm}: {}", out.stderr.trim());
    }
    Ok(())
}

/// `remus destroy VM`, a warning if it fails.
pub(crate) fn destroy_or_warn(agent: &Agent, vm: &str) {
    let out = agent.cli(&["destroy", vm]);
    if !out.ok {
        eprintln!("remus-bench: warning: destroy {vm}: {}", out.stderr.trim());
    }
}

/// Waits (60 s at most) until the backup has dropped its standby, as it
/// does when protection stops; the next protect needs it gone.
pub(crate) fn wait_standby_gone(backup: &Agent, vm: &str) -> Result<()> {
    let t = Instant::now();
    while backup.vm(vm).is_some() {
        if t.elapsed() > Duration::from_secs(60) {
            bail!("the backup still has {vm} 60 s after protect --stop");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

/// An error with the tails of `vm`'s console and both agents' logs.
pub(crate) fn logs_of<'a>(
    primary: &'a Agent,
    backup: &'a Agent,
    vm: &'a str,
) -> impl Fn(anyhow::Error) -> anyhow::Error + Copy + 'a {
    move |e: anyhow::Error| {
        anyhow::anyhow!(
            "{e:#}\nconsole (tail):\n{}\nprimary log (tail):\n{}\nbackup log (tail):\n{}",
            tail(&primary.console(vm), 10),
            tail(&primary.log_text(), 15),
            tail(&backup.log_text(), 15)
        )
    }
}

/// Starts `remus protect --json` on `primary`, its stdout lines sent to
/// the returned channel by the returned thread (which ends with stdout).
pub(crate) fn spawn_protect(
    bins: &Binaries,
    primary: &Agent,
    vm: &str,
    peer: &str,
    interval_ms: u64,
    o: &Opts,
    extra: &[impl AsRef<std::ffi::OsStr>],
) -> Result<(
    std::process::Child,
    mpsc::Receiver<String>,
    std::thread::JoinHandle<()>,
)> {
    let mut child = Command::new(&bins.remus)
        .arg("--socket")
        .arg(&primary.socket)
        .args(["protect", "-i", &interval_ms.to_string()])
        .args(["--timeout", &o.timeout_ms.to_string(), "--json"])
        .args(extra)
        .args([vm, peer])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("run remus protect")?;
    let stdout = child.stdout.take().context("protect stdout")?;
    let (tx, rx) = mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    Ok((child, rx, reader))
}

/// `remus protect --json` in the background, its events on a channel.
pub(crate) struct Protecting {
    child: std::process::Child,
    rx: mpsc::Receiver<String>,
    reader: Option<std::thread::JoinHandle<()>>,
    pub(crate) cps: Vec<Value>,
    pub(crate) initial_sync: Value,
    pub(crate) disk_synced: Value,
    pub(crate) sync_plan: Value,
}

impl Protecting {
    pub(crate) fn start(
        bins: &Binaries,
        primary: &Agent,
        vm: &str,
        peer: &str,
        interval_ms: u64,
        o: &Opts,
        extra: &[&str],
    ) -> Result<Protecting> {
        let (child, rx, reader) = spawn_protect(bins, primary, vm, peer, interval_ms, o, extra)?;
        Ok(Protecting {
            child,
            rx,
            reader: Some(reader),
            cps: Vec::new(),
            initial_sync: Value::Null,
            disk_synced: Value::Null,
            sync_plan: Value::Null,
        })
    }

    fn handle(&mut self, line: &str) -> Result<()> {
        let ev: Value = serde_json::from_str(line)
            .with_context(|| format!("remus protect printed a non-JSON line: {line}"))?;
        match ev["event"].as_str() {
            Some("initial_sync") => self.initial_sync = ev,
            Some("disk_synced") => self.disk_synced = ev,
            Some("sync_plan") => self.sync_plan = ev,
            Some("checkpoint") => self.cps.push(ev),
            Some("backup_lost") | Some("failed") => bail!("protection ended: {ev}"),
            _ => {}
        }
        Ok(())
    }

    /// Takes every event printed so far.
    pub(crate) fn drain(&mut self) -> Result<()> {
        loop {
            match self.rx.try_recv() {
                Ok(l) => self.handle(&l)?,
                Err(mpsc::TryRecvError::Empty) => return Ok(()),
                Err(mpsc::TryRecvError::Disconnected) => {
                    bail!("remus protect ended after {} checkpoints", self.cps.len())
                }
            }
        }
    }

    /// Waits for the first checkpoint (after the initial RAM and disk sync).
    pub(crate) fn first_checkpoint(&mut self, timeout: Duration) -> Result<()> {
        self.wait_checkpoints(1, timeout)
    }

    /// Waits until `n` checkpoints have been reported.
    pub(crate) fn wait_checkpoints(&mut self, n: usize, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while self.cps.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!("{} of {n} checkpoints within {timeout:?}", self.cps.len());
            }
            match self.rx.recv_timeout(left) {
                Ok(l) => self.handle(&l)?,
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    bail!("remus protect ended after {} checkpoints", self.cps.len())
                }
            }
        }
        Ok(())
    }

    /// `protect --stop`, then waits for the CLI to end (killing it after
    /// 10 s); its stderr.
    pub(crate) fn stop(mut self, primary: &Agent, vm: &str) -> String {
        let stop = primary.cli(&["protect", "--stop", vm]);
        if !stop.ok {
            eprintln!(
                "remus-bench: warning: protect --stop {vm}: {}",
                stop.stderr.trim()
            );
        }
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(10) && matches!(self.child.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(50));
        }
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        let mut err = String::new();
        if let Some(mut se) = self.child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut se, &mut err);
        }
        drop(std::mem::replace(&mut self.rx, mpsc::channel().1));
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        err
    }

    /// Ends the CLI at once (no `--stop`: protection goes on in the agent
    /// unless its session is over) and returns its stderr, which says why
    /// a session ended.
    pub(crate) fn abort(mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let mut err = String::new();
        if let Some(mut se) = self.child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut se, &mut err);
        }
        err
    }
}

impl Drop for Protecting {
    /// The CLI never outlives its follower (a no-op after `stop`/`abort`).
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A QEMU we started ourselves; killed (by its PID) on drop.
pub(crate) struct OwnQemu {
    child: std::process::Child,
    pub(crate) qmp: PathBuf,
    pub(crate) serial: PathBuf,
}

impl Drop for OwnQemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The same guest as the agents run it (q35 on `accel`, the accelerator
/// the agents chose for the protected guest, with their default CPU model
/// for it; RAM in a shared file), started directly with `cmdline` on its
/// kernel command line; `incoming` adds `-incoming URI`.
pub(crate) fn own_qemu(
    dir: &Path,
    tag: &str,
    img: &GuestImage,
    accel: &str,
    cmdline: &str,
    incoming: Option<&str>,
) -> Result<OwnQemu> {
    // remus-vm's DEFAULT_TCG_CPU and DEFAULT_KVM_CPU.
    let cpu = match accel {
        "tcg" => "max",
        "kvm" => "host",
        other => bail!("the agents ran the guest on {other:?}: no baseline for that"),
    };
    let qmp = dir.join(format!("{tag}.qmp"));
    let serial = dir.join(format!("{tag}.serial"));
    let ram = dir.join(format!("{tag}.ram"));
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-nodefaults", "-no-user-config", "-display", "none"])
        .args(["-accel", accel, "-cpu", cpu])
        .arg("-object")
        .arg(format!(
            "memory-backend-file,id=ram0,size=256M,mem-path={},share=on",
            ram.display()
        ))
        .args([
            "-machine",
            "q35,memory-backend=ram0",
            "-m",
            "256M",
            "-smp",
            "1",
        ])
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp.display()))
        .arg("-serial")
        .arg(format!("file:{}", serial.display()))
        .arg("-kernel")
        .arg(&img.kernel)
        .arg("-initrd")
        .arg(&img.initrd)
        .arg("-append")
        .arg(format!("console=ttyS0 quiet {cmdline}"));
    if let Some(uri) = incoming {
        cmd.args(["-incoming", uri]);
    }
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("start qemu-system-x86_64")?;
    Ok(OwnQemu { child, qmp, serial })
}

/// One VM's checkpoints in some windows of time (pause and ack, ms).
#[derive(Debug, Clone, Default)]
pub(crate) struct Window {
    pub(crate) pause: Vec<f64>,
    pub(crate) ack: Vec<f64>,
}

impl Window {
    /// The checkpoints of `cps` whose pause began in one of `spans`
    /// (Unix ms, start..end).
    pub(crate) fn of(cps: &[Value], spans: &[(f64, f64)]) -> Window {
        let mut w = Window::default();
        for c in cps {
            let t = c["taken_at_ms"].as_f64().unwrap_or(f64::NAN);
            if spans.iter().any(|&(a, b)| t >= a && t < b) {
                w.pause.push(c["pause_ms"].as_f64().unwrap_or(f64::NAN));
                w.ack.push(c["ack_ms"].as_f64().unwrap_or(f64::NAN));
            }
        }
        w
    }

    pub(crate) fn json(&self) -> Value {
        json!({"checkpoints": self.pause.len(), "pause_ms": stats(&self.pause).json(),
            "ack_ms": stats(&self.ack).json()})
    }
}
