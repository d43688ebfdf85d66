//! `remus-demo`: the whole remus story on one machine, narrated (the
//! README's first command, `scripts/demo.sh`, runs it).
//!
//! Three hosts on one LAN, each a network namespace: a (the primary),
//! b (the backup, with its own disk directory) and c (a client). A guest
//! on a serves a TCP session to c and writes checksummed records to its
//! replicated disk; a protects it to b; then a's plug is pulled (SIGKILL
//! of its agent and QEMU). The VM carries on at b from its last
//! checkpoint: the client's TCP session goes on without a gap, and the
//! guest finds every record it completed on b's disk. Then a comes back
//! (its agent restarts on its old state dir and lists the VM as stale),
//! b protects the VM back to a, copying only the blocks either side
//! changed, and `remus failback` moves it home to a at a checkpoint, the
//! session still whole. A summary ends it.
//!
//! It uses `remus`/`remusd` next to its own executable and the guest
//! image from `scripts/build-guest.sh`; it needs root (namespaces).

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use remus_testbed::{Agent, Binaries, GuestImage, Lan, ProtectFollower, SeqClient};

const VM: &str = "demo";
const VM_IP: &str = "198.18.0.10";
const REPL_PORT: u16 = 7100;

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("remus-demo: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Bytes of the lines `1\n` ..= `n\n`.
fn seq_bytes(n: u64) -> u64 {
    let mut total = 0;
    let (mut lo, mut digits) = (1u64, 1u64);
    while lo <= n {
        let hi = (lo * 10 - 1).min(n);
        total += (hi - lo + 1) * (digits + 1);
        lo *= 10;
        digits += 1;
    }
    total
}

fn say(s: &str) {
    println!("{s}");
}

fn indent(text: &str) -> String {
    text.lines()
        .map(|l| format!("   {l}\n"))
        .collect::<String>()
        .trim_end()
        .to_string()
}

fn run() -> Result<()> {
    let bins = Binaries::next_to_exe()?;
    let img = GuestImage::find()?;
    // Declared first, dropped last (after the agents living in its hosts).
    let lan = Lan::standard("demo").context("create the namespace hosts (needs root)")?;
    let keydir = tempfile::tempdir()?;
    let key = remus_testbed::write_key(keydir.path());
    let key = key.to_str().context("key path")?;
    let a_disks = tempfile::Builder::new()
        .prefix("remus-demo-a")
        .tempdir_in("/tmp")?;
    let b_disks = tempfile::Builder::new()
        .prefix("remus-demo-b")
        .tempdir_in("/tmp")?;
    let disk = a_disks.path().join("demo-disk.img");
    std::fs::File::create(&disk)?.set_len(64 << 20)?;

    say("== three hosts on one LAN (network namespaces on this machine)");
    say(&format!(
        "   a {} (primary)   b {} (backup, its own disks)   c {} (a client)",
        lan.addr("a"),
        lan.addr("b"),
        lan.addr("c")
    ));
    let a_listen = format!("{}:{REPL_PORT}", lan.addr("a"));
    let mut a = Agent::start(
        &bins,
        Some(lan.host("a")),
        &["--listen", &a_listen, "--key", key],
    )?;
    let listen = format!("{}:{REPL_PORT}", lan.addr("b"));
    // b keeps its copy of the VM's disk in its own image directory.
    let b_images = b_disks.path().to_str().context("image dir")?;
    let b = Agent::start(
        &bins,
        Some(lan.host("b")),
        &["--listen", &listen, "--key", key, "--image-dir", b_images],
    )?;

    say("");
    say("== host a: remus create demo.toml");
    say(&format!(
        "   256 MiB guest; a 64 MiB disk (vda, replicated) it writes numbered, checksummed records to;\n   a NIC on the LAN at {VM_IP} with a TCP service on port 7000"
    ));
    let cfg = a.write_file(
        "demo.toml",
        &img.config(
            VM,
            &format!(
                "remus.workload=tick,seqserver,diskload:/dev/vda:--region-mb:60 remus.ip={VM_IP}/24"
            ),
            &format!(
                "[[disk]]\npath = \"{}\"\ntarget = \"vda\"\n[[vif]]\nbridge = \"br0\"\nmac = \"52:54:00:c6:12:0a\"\n",
                disk.display()
            ),
        ),
    );
    let t = Instant::now();
    let out = a.cli(&["create", cfg.to_str().context("config path")?]);
    if !out.ok {
        bail!("create: {}", out.stderr.trim());
    }
    a.wait_console(VM, Duration::from_secs(120), "the guest's services", |c| {
        c.contains("seqserver: listening") && c.contains("diskload: done")
    })?;
    say(&format!("   booted in {:.1} s", t.elapsed().as_secs_f64()));
    say(&indent(&a.cli(&["list"]).stdout));

    say("");
    say(&format!(
        "== host c: a TCP session to {VM_IP}:7000, numbered lines both ways every 5 ms"
    ));
    let client = SeqClient::start(
        lan.host("c"),
        format!("{VM_IP}:7000").parse()?,
        Duration::from_millis(5),
    )?;
    client.wait_received(100, Duration::from_secs(30))?;
    say(&format!("   {} lines received", client.received()));

    say("");
    say(&format!(
        "== host a: remus protect --manual -i 100 --timeout 1000 {VM} {listen}"
    ));
    say(
        "   (--manual: this demo takes each step itself; without it the agents set protection up again by themselves after a loss)",
    );
    let mut follow = ProtectFollower::start(&a, VM, &listen, &["-i", "100", "--timeout", "1000"])?;
    let mut pauses = Vec::new();
    while pauses.len() < 30 {
        let ev = follow.next_event()?;
        match ev["event"].as_str().unwrap_or("") {
            "disk_synced" => say(&format!(
                "   disk sync: {} of {} chunks differed from b's copy (b had none: created); {:.1} MiB sent",
                ev["differing_chunks"],
                ev["chunks"],
                ev["sent_bytes"].as_f64().unwrap_or(0.0) / 1048576.0
            )),
            "warning" => say(&format!(
                "   warning: {}",
                ev["message"].as_str().unwrap_or("?")
            )),
            "initial_sync" => say(&format!(
                "   initial sync: {} pages of RAM in {:.0} ms",
                ev["pages"],
                ev["ms"].as_f64().unwrap_or(0.0)
            )),
            "checkpoint" => {
                let p = ev["pause_ms"].as_f64().unwrap_or(0.0);
                if pauses.len() < 5 {
                    say(&format!(
                        "   epoch {:>3}  pause {:>5.2} ms  dirty {:>5} pages  disk {:>3} ops  ack {:>5.2} ms",
                        ev["epoch"],
                        p,
                        ev["dirty_pages"],
                        ev["disk_records"],
                        ev["ack_ms"].as_f64().unwrap_or(0.0)
                    ));
                } else if pauses.len() == 5 {
                    say("   ...");
                }
                pauses.push(p);
            }
            "backup_lost" | "failed" => bail!("protection ended: {ev}"),
            _ => {}
        }
    }
    say("== host b: remus list (the standby copy is paused)");
    say(&indent(&b.cli(&["list"]).stdout));

    say("");
    let at_kill = client.received();
    say(&format!(
        "== pulling host a's plug (SIGKILL of its agent and its QEMU) at client line {at_kill}"
    ));
    let killed = Instant::now();
    a.kill_hard();
    drop(follow);
    let failover_ms = b
        .wait_failover(VM, killed, Duration::from_secs(30))
        .context("b did not resume the VM")?;
    say(&format!("   b resumed the VM after {failover_ms} ms"));
    client
        .wait_received(at_kill + 200, Duration::from_secs(60))
        .context("the client's session after the failover")?;
    say("== host b: remus list");
    say(&indent(&b.cli(&["list"]).stdout));
    say(&format!(
        "== host c: the same TCP session carries on: line {at_kill} → {}, longest pause {} ms, {}",
        client.received(),
        client.longest_gap().as_millis(),
        match client.error() {
            None => "no gap, no duplicate, no reset".to_string(),
            Some(e) => format!("ERROR: {e}"),
        }
    ));

    let out = b.cli_stdin(&["console", VM], Some(b"\ntouch /run/diskload.verify\n"));
    if !out.ok {
        bail!("console: {}", out.stderr.trim());
    }
    let text = b.wait_console(VM, Duration::from_secs(60), "the guest's disk check", |c| {
        c.contains("diskload verify ok") || c.contains("diskload verify FAILED")
    })?;
    let verdict = text
        .lines()
        .find(|l| l.contains("diskload verify"))
        .unwrap_or_default()
        .trim()
        .to_string();
    say(&format!(
        "== guest on b checks its disk against its own memory: {verdict}"
    ));

    say("");
    say("== host a comes back: its agent restarts on its old state dir");
    a.restart()?;
    say(
        "   a's copy ran when its agent died and b has taken over since: it is stale and never runs on its own",
    );
    say(&indent(&a.cli(&["list"]).stdout));
    say("");
    say(&format!(
        "== host b: remus protect --manual -i 100 --timeout 1000 {VM} {a_listen}   (resync back to a)"
    ));
    let mut back = ProtectFollower::start(&b, VM, &a_listen, &["-i", "100", "--timeout", "1000"])?;
    let plan = back.event("sync_plan")?;
    say(&format!(
        "   plan: {} ({})",
        plan["mode"].as_str().unwrap_or("?"),
        plan["reason"].as_str().unwrap_or("")
    ));
    let synced = back.event("disk_synced")?;
    say(&format!(
        "   compared {} of {} chunks (those a's activity log or b's change map mark), {} differed, {:.1} MiB sent",
        synced["chunks"],
        synced["disk_chunks"],
        synced["differing_chunks"],
        synced["sent_bytes"].as_f64().unwrap_or(0.0) / 1048576.0
    ));
    back.checkpoint_after(0)?;
    say("   checkpoints run b → a");
    drop(back);
    say("");
    say(&format!(
        "== host b: remus failback {VM}   (planned switch back to a)"
    ));
    let out = b.cli(&["failback", VM]);
    if !out.ok {
        bail!("failback: {}", out.stderr.trim());
    }
    say(&indent(out.stderr.trim()));
    let deadline = Instant::now() + Duration::from_secs(60);
    while !a.vm(VM).is_some_and(|v| v["role"] == "primary") {
        if Instant::now() > deadline {
            bail!("a does not protect the VM back to b: {}", a.log_text());
        }
        // Agent state has no change notification; poll the API.
        std::thread::sleep(Duration::from_millis(50));
    }
    let at = client.received();
    client
        .wait_received(at + 200, Duration::from_secs(60))
        .context("the client's session after the failback")?;
    say("== host a: remus list (runs the VM again, protected to b)");
    say(&indent(&a.cli(&["list"]).stdout));

    pauses.sort_by(f64::total_cmp);
    say("");
    say("== summary");
    say(&format!(
        "   checkpoints: {} followed here, pause p50 {:.2} ms",
        pauses.len(),
        pauses[pauses.len() / 2]
    ));
    say(&format!(
        "   failover: {failover_ms} ms from the kill to the VM running on b"
    ));
    say(&format!(
        "   client: {} lines ({} bytes) received in order across the failover, the resync and the failback, longest pause {} ms",
        client.received(),
        seq_bytes(client.received()),
        client.longest_gap().as_millis()
    ));
    let ok = client.error().is_none() && verdict.contains("verify ok");
    drop(client);
    let _ = a.cli(&["protect", "--stop", VM]);
    let _ = a.cli(&["destroy", VM]);
    if !ok {
        bail!("the demo's checks failed (see above)");
    }
    say("demo: done");
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn seq_bytes_counts_digits_and_newlines() {
        assert_eq!(super::seq_bytes(0), 0);
        assert_eq!(super::seq_bytes(9), 18);
        assert_eq!(super::seq_bytes(10), 21);
        assert_eq!(super::seq_bytes(1000), 9 * 2 + 90 * 3 + 900 * 4 + 5);
    }
}
