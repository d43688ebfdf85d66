//! `restart`: what restarting an agent costs its VM, per case, on a LAN of
//! network namespaces with a TCP client on host c (agents with
//! `--on-stop keep`). For each case: the client's wait for its next line
//! from the moment the agent is stopped or killed (the pause its users
//! see, the agent's own restart included), how long the agent took to
//! answer again, and, for a protected VM, how long until a checkpoint of
//! the new session committed (protection restored).

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use remus_testbed::{
    Agent, GuestImage, Lan, PairFiles, ProtectFollower, SeqClient, now_ms, start_records_vm,
};
use serde_json::{Value, json};

use crate::harness::accel_of;
use crate::report::stats;
use crate::suite::{Ctx, Report};

const VM: &str = "rs";
const VM_IP: &str = "198.18.0.10";
const REPL_PORT: u16 = 7300;
/// Rounds per case (the failover case runs once: it moves the VM).
const ROUNDS: usize = 3;
const TIMEOUT: Duration = Duration::from_secs(120);

/// The `restart` section of the suite.
pub(crate) fn run(cx: &Ctx, r: &mut Report) -> Result<()> {
    eprintln!("remus-bench: agent restarts under a running VM ...");
    let (cases, accel) = run_restarts(cx.img, cx)?;
    for c in &cases {
        eprintln!(
            "remus-bench:   {}: client waited p50 {:.0} ms; protection restored p50 {}",
            c.name,
            stats(&c.gap_ms).p50,
            if c.restored_ms.is_empty() {
                "-".to_string()
            } else {
                format!("{:.0} ms", stats(&c.restored_ms).p50)
            }
        );
    }
    r.sections.push(render(&cases));
    r.runs.insert(
        "restart".into(),
        json!({"rounds": ROUNDS, "cases": cases.iter().map(Case::json).collect::<Vec<_>>()}),
    );
    r.other_accel.push(accel);
    Ok(())
}

/// One case's rounds.
struct Case {
    name: &'static str,
    /// Stop or kill → the client's next line.
    gap_ms: Vec<f64>,
    /// Stop or kill → the agent answers again.
    back_ms: Vec<f64>,
    /// Stop or kill → a checkpoint of the new session committed.
    restored_ms: Vec<f64>,
}

impl Case {
    fn new(name: &'static str) -> Case {
        Case {
            name,
            gap_ms: Vec::new(),
            back_ms: Vec::new(),
            restored_ms: Vec::new(),
        }
    }

    fn json(&self) -> Value {
        json!({"case": self.name, "rounds": self.gap_ms.len(),
            "client_wait_ms": stats(&self.gap_ms).json(),
            "agent_back_ms": stats(&self.back_ms).json(),
            "protection_restored_ms": (!self.restored_ms.is_empty()).then(|| stats(&self.restored_ms).json())})
    }
}

fn agent(cx: &Ctx, lan: &Lan, h: &str, files: &PairFiles) -> Result<Agent> {
    let listen = format!("{}:{REPL_PORT}", lan.addr(h));
    let store = if h == "a" {
        &files.images
    } else {
        &files.store_b
    };
    Agent::start(
        cx.bins,
        Some(lan.host(h)),
        &[
            "--key",
            files.key.to_str().context("key path")?,
            "--listen",
            &listen,
            "--image-dir",
            store.to_str().context("store path")?,
            "--host-name",
            h,
            "--on-stop",
            "keep",
        ],
    )
}

/// How an agent goes away.
#[derive(Clone, Copy)]
enum Stop {
    Term,
    Kill,
}

/// Stops (or kills) `host`'s agent and starts it again: (ms until the
/// client's next line, ms until the agent answered, the Unix ms of the
/// stop).
fn bounce(host: &mut Agent, how: Stop, client: &SeqClient) -> Result<(f64, f64, u64)> {
    let n = client.received();
    let (t, at) = (Instant::now(), now_ms());
    match how {
        Stop::Term => host.stop_agent_only()?,
        Stop::Kill => host.kill_agent_only(),
    }
    host.restart()?;
    let back = t.elapsed().as_secs_f64() * 1e3;
    client.wait_received(n + 1, TIMEOUT)?;
    Ok((t.elapsed().as_secs_f64() * 1e3, back, at))
}

/// Waits until `h` runs the VM protected with a checkpoint taken after
/// `after` (Unix ms) committed; ms since `since`.
fn restored(h: &Agent, after: u64, since: Instant) -> Result<f64> {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        if let Some(v) = h.vm(VM)
            && v["role"] == "primary"
            && v["protection"]["last_checkpoint"]["taken_at_ms"]
                .as_u64()
                .is_some_and(|t| t > after)
        {
            return Ok(since.elapsed().as_secs_f64() * 1e3);
        }
        if Instant::now() > deadline {
            bail!("protection not restored within {TIMEOUT:?}");
        }
        // Agent state has no change notification; poll.
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The cases, and the accelerator the VM ran on.
fn run_restarts(img: &GuestImage, cx: &Ctx) -> Result<(Vec<Case>, String)> {
    let lan = Lan::standard("brs")?;
    let files = PairFiles::new(256 << 20);
    let mut a = agent(cx, &lan, "a", &files)?;
    let mut b = agent(cx, &lan, "b", &files)?;
    let client = start_records_vm(
        &a,
        img,
        VM,
        (VM_IP, "52:54:00:c6:12:4a"),
        &files.disk,
        lan.host("c"),
    );
    let accel = accel_of(&a, VM);
    let mut cases = Vec::new();
    for (name, how) in [
        ("unprotected, agent stopped (SIGTERM)", Stop::Term),
        ("unprotected, agent killed (SIGKILL)", Stop::Kill),
    ] {
        let mut c = Case::new(name);
        for _ in 0..ROUNDS {
            let (gap, back, _) = bounce(&mut a, how, &client)?;
            c.gap_ms.push(gap);
            c.back_ms.push(back);
        }
        cases.push(c);
    }

    let b_listen = format!("{}:{REPL_PORT}", lan.addr("b"));
    let mut follow =
        ProtectFollower::start_healing(&a, VM, &b_listen, &["-i", "100", "--timeout", "1000"])?;
    follow.checkpoint_after(0)?;
    drop(follow);
    // A backup's restart is suspended for once in ten minutes per VM: its
    // first round is that, the next ones (within ten minutes) end the
    // session in order and make a new copy, the baseline in the same run.
    for (name, primary, how, rounds) in [
        (
            "protected, primary's agent stopped (SIGTERM)",
            true,
            Stop::Term,
            ROUNDS,
        ),
        (
            "protected, backup's agent stopped (SIGTERM): standby kept",
            false,
            Stop::Term,
            1,
        ),
        (
            "protected, backup's agent stopped again within 10 min (SIGTERM): new copy",
            false,
            Stop::Term,
            ROUNDS,
        ),
        (
            "protected, backup's agent killed (SIGKILL)",
            false,
            Stop::Kill,
            ROUNDS,
        ),
    ] {
        let mut c = Case::new(name);
        for _ in 0..rounds {
            let t = Instant::now();
            let host = if primary { &mut a } else { &mut b };
            let (gap, back, at) = bounce(host, how, &client)?;
            c.gap_ms.push(gap);
            c.back_ms.push(back);
            c.restored_ms.push(restored(&a, at, t)?);
        }
        cases.push(c);
    }

    // Last, once: the primary's agent killed while protected. The backup
    // takes over, the new agent stops the old QEMU, and the backup
    // protects the VM back to it.
    let mut c = Case::new("protected, primary's agent killed (SIGKILL): failover");
    let t = Instant::now();
    let (gap, back, at) = bounce(&mut a, Stop::Kill, &client)?;
    c.gap_ms.push(gap);
    c.back_ms.push(back);
    c.restored_ms.push(restored(&b, at, t)?);
    cases.push(c);
    if let Some(e) = client.error() {
        bail!("the TCP session broke: {e}");
    }
    let out = b.cli(&["protect", "--stop", VM]);
    if !out.ok {
        eprintln!("remus-bench:   protect --stop: {}", out.stderr.trim());
    }
    Ok((cases, accel))
}

fn render(cases: &[Case]) -> String {
    let mut s = String::from(
        "### Agent restarts under a running VM\n\n\
         A VM (256 MiB, writing checked records to its disk and serving a TCP session to a client on \
         host c, which sends a line every 5 ms and gets each back) runs on host a; both agents run \
         with `--on-stop keep` in network namespaces. Each case stops (SIGTERM, as `systemctl \
         restart`) or kills (SIGKILL) one agent and starts it again at once. *Client wait*: from the \
         stop to the client's next line (what its users see, the agent's own stop and start \
         included). *Agent back*: from the stop to the new agent answering. *Protection restored*: \
         from the stop to the first committed checkpoint of the session the agents set up again \
         (-i 100, --timeout 1000): when the primary's or the backup's agent is stopped (SIGTERM), \
         the session is suspended and resumed from the checkpoint the guest stopped at (the same \
         standby, no copy; the guest is paused from that checkpoint until the resume; a backup's \
         restart is suspended for once in ten minutes per VM, so its later rounds end the session \
         and make a new copy: the baseline); when one is killed, a new session with a new RAM \
         copy and a changed-only disk resync. The last case moves the VM: its backup takes over, \
         the new agent on a stops the old QEMU, and b protects the VM back to a.\n\n\
         | case | rounds | client wait p50 ms | max | agent back p50 ms | protection restored p50 ms | max |\n\
         |---|---:|---:|---:|---:|---:|---:|\n",
    );
    for c in cases {
        let (g, b) = (stats(&c.gap_ms), stats(&c.back_ms));
        let (rp, rm) = if c.restored_ms.is_empty() {
            ("–".to_string(), "–".to_string())
        } else {
            let r = stats(&c.restored_ms);
            (format!("{:.0}", r.p50), format!("{:.0}", r.max))
        };
        s.push_str(&format!(
            "| {} | {} | {:.0} | {:.0} | {:.0} | {rp} | {rm} |\n",
            c.name,
            c.gap_ms.len(),
            g.p50,
            g.max,
            b.p50,
        ));
    }
    s.push('\n');
    s
}
