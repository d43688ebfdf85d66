//! The `remus` command line. It follows Xen's `xl`: the same verbs, the
//! same `list` columns and state letters. It only ever talks to the local
//! agent (`remusd`) over its unix socket.

mod console;
pub mod format;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use remus_api::{Client, ClientError, MigrateStats, SessionEvent};
use remus_config::VmConfig;

/// remus: keep VMs running when their host dies (Remus for QEMU).
#[derive(Debug, Parser)]
#[command(name = "remus", version, about, long_about = None)]
pub struct Cli {
    /// The local agent's socket.
    #[arg(long, global = true, env = "REMUS_SOCKET", default_value = remus_api::DEFAULT_SOCKET)]
    pub socket: PathBuf,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create and start a VM from a config file (TOML, like xl.cfg).
    Create {
        /// The VM config file.
        #[arg(required_unless_present = "from_libvirt")]
        config: Option<PathBuf>,
        /// Convert a libvirt domain definition (`virsh dumpxml NAME`)
        /// instead: what cannot be carried over is refused with a list;
        /// what is dropped or changed is noted. With --dry-run, prints the
        /// resulting config (TOML).
        #[arg(long, value_name = "DOMAIN.xml", conflicts_with = "config")]
        from_libvirt: Option<PathBuf>,
        /// Only check the config; do not contact the agent.
        #[arg(long, short = 'n')]
        dry_run: bool,
        /// Attach to the console once the VM runs.
        #[arg(long, short = 'c')]
        console: bool,
    },
    /// List VMs (Name, ID, Mem, VCPUs, State, Time(s)).
    List {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        /// Only these VMs.
        vms: Vec<String>,
    },
    /// Attach to a VM's serial console (detach with Ctrl-]).
    Console {
        /// Print the console output so far and exit.
        #[arg(long)]
        dump: bool,
        vm: String,
    },
    /// Pause a VM.
    Pause { vm: String },
    /// Unpause a paused VM.
    Unpause { vm: String },
    /// The cluster manager's word, on an agent run with `remusd
    /// --failover-by cluster`: this host runs the VM from now on, because
    /// its peer's host is fenced (or its resource instance stopped).
    ///
    /// On a standby whose primary was lost: resume it from the last
    /// committed checkpoint (Pacemaker's promote; the resource agent
    /// ocf:remus:vm runs it). On a primary held paused since its backup
    /// was lost: run on unprotected, releasing the output it held. Only
    /// a VM that `remus list --json` shows with `awaiting_takeover` can
    /// take over. Never run it while the peer may still run the VM.
    Takeover {
        #[arg(long)]
        json: bool,
        vm: String,
    },
    /// Stop a VM at once and remove it (no guest shutdown). Its disk
    /// images stay. A stale copy is forgotten.
    Destroy {
        /// Split-brain resolution, on the host whose copy you give up:
        /// keep the copy's replication record, marked given up, so that
        /// the next `remus protect` to this host overwrites what this copy
        /// ran, copying only the blocks either copy changed.
        #[arg(long)]
        discard_this_copy: bool,
        vm: String,
    },
    /// Pin a vCPU (a number or `all`) to host CPUs (e.g. `0-1,3` or `all`).
    VcpuPin {
        vm: String,
        vcpu: String,
        cpus: String,
    },
    /// Show each vCPU's host thread and CPU affinity.
    VcpuList {
        #[arg(long)]
        json: bool,
        vm: String,
    },
    /// Live-migrate a VM to another host's agent.
    ///
    /// Pre-copy: the VM keeps running while its memory is copied, pauses
    /// briefly for the last pages and its device state, and ends running
    /// there and gone from here. Disks must be on storage both hosts see.
    Migrate {
        /// Print progress as JSON lines.
        #[arg(long)]
        json: bool,
        /// Cap the pre-copy at RATE bytes per second (K, M, G: KiB, MiB,
        /// GiB, e.g. 50M), so that the checkpoints of other VMs sharing
        /// the link keep their pace: the disk sync's data, the initial
        /// copy of RAM and each round. The last copy, made with the guest
        /// stopped, and the guest's disk writes sent along are not capped.
        /// 0 or absent: the agent's `remusd --max-rate` (none by default).
        #[arg(long, value_name = "RATE", default_value = "0", hide_default_value = true,
              value_parser = remus_api::rate::parse_rate)]
        max_rate: u64,
        /// The VM's name.
        vm: String,
        /// The destination agent's replication address (HOST:PORT).
        host: String,
    },
    /// Planned role swap of a protected VM: at the next checkpoint the
    /// backup takes the VM over (no data lost, TCP sessions intact; the
    /// guest pauses for one checkpoint plus the switch) and protects it
    /// back to this host, which becomes its backup.
    ///
    /// Run it on the primary. After a failover, first protect the VM
    /// from the host that took over back to the old primary (`remus
    /// protect VM OLD_PRIMARY:PORT`, which copies only the blocks either
    /// copy changed), then `remus failback VM` there to move it home.
    Failback {
        /// Print the session's events as JSON lines.
        #[arg(long)]
        json: bool,
        vm: String,
    },
    /// Protect a VM: checkpoint it to a backup host, which resumes it if
    /// this host dies.
    ///
    /// Checkpoints the VM's memory and device state to the backup agent at
    /// HOST:PORT every interval and prints a line per committed checkpoint
    /// (epoch, pause, dirty pages, bytes, ack latency). Ctrl-C stops
    /// following; protection goes on in the agent until `remus protect
    /// --stop VM`.
    ///
    /// The agent records that protection is wanted: when the backup is
    /// lost, it protects the VM again as soon as the backup answers
    /// (retrying every 1 s, doubling to a minute), and after a failover
    /// the host that took over protects the VM back to this one once its
    /// agent is back (see --no-reprotect). `remus list` shows it under
    /// Wanted.
    Protect {
        /// Checkpoint interval in milliseconds [default: 200].
        #[arg(short = 'i', long = "interval")]
        interval_ms: Option<u64>,
        /// Failover timeout in milliseconds: the backup resumes the VM when
        /// it hears nothing from this host for this long [default: 2000].
        #[arg(long = "timeout")]
        timeout_ms: Option<u64>,
        /// Change the running session's -i and/or --timeout, from the next
        /// checkpoint on, without a new copy (and what the agent sets up
        /// again after a loss).
        #[arg(long, conflicts_with_all = ["stop", "no_net", "no_disk", "no_compress", "unencrypted", "no_reprotect", "manual", "detach"])]
        set: bool,
        /// Do not hold network output until its checkpoint commits (lower
        /// latency; after a failover clients may have seen output the
        /// backup never had, and TCP sessions may break).
        #[arg(long)]
        no_net: bool,
        /// Do not replicate disk writes (a failover may then corrupt the
        /// guest's disk).
        #[arg(long)]
        no_disk: bool,
        /// Send checkpoints uncompressed. By default each dirty page
        /// travels as the XOR against the copy the backup already holds,
        /// LZ4-compressed (as `xl remus` does unless `-u`): less bandwidth
        /// for some CPU on this host.
        #[arg(short = 'u', long)]
        no_compress: bool,
        /// Cap the initial copy at RATE bytes per second (K, M, G: KiB,
        /// MiB, GiB, e.g. 50M), so that the checkpoints of other VMs
        /// sharing the link keep their pace: the data of the disk sync (a
        /// resync's too) and the copy of RAM. Checkpoints are never
        /// capped, nor are the guest's disk writes made meanwhile. 0 or
        /// absent: the agent's `remusd --max-rate` (none by default).
        #[arg(long, value_name = "RATE", default_value = "0", hide_default_value = true,
              value_parser = remus_api::rate::parse_rate)]
        max_rate: u64,
        /// Output-driven epochs: a checkpoint comes as soon as the guest
        /// has network output waiting (which output commit holds until the
        /// backup has the state that sent it), but never sooner than MS
        /// after the last one, so a guest that talks all the time is
        /// checkpointed at most every MS; -i stays the longest epoch, for
        /// a guest that says nothing. 0: every epoch lasts -i (the latency
        /// of every reply then grows with -i). Default: 10.
        #[arg(long = "min-interval", value_name = "MS")]
        min_interval_ms: Option<u64>,
        /// With output-driven epochs, the longest a frame should wait
        /// before it leaves. While the guest streams data (a bulk
        /// transfer it sends) checkpoints come further apart, up to MS
        /// less the checkpoint's own pause and ack, so that the guest is
        /// stopped less often; the first quiet epoch, or one whose output
        /// is small frames (the ACKs of a transfer it receives), brings
        /// them back to --min-interval, so replies to a quiet guest keep
        /// their short wait and a sender to the guest gets its ACKs soon.
        /// At or below --min-interval: the gap never grows.
        /// Default: 40.
        #[arg(long = "max-latency", value_name = "MS")]
        max_latency_ms: Option<u64>,
        /// Replicate in the clear instead of over the encrypted link: only
        /// for a link that is encrypted already (WireGuard, IPsec), to
        /// save the CPU. The key still authenticates the peers, but
        /// anyone on the wire can read the VM's memory and disks and alter
        /// them. The backup must allow it (remusd --allow-unencrypted-peers).
        #[arg(long)]
        unencrypted: bool,
        /// After a failover, do not let the host that took over protect
        /// the VM back to this one by itself (it does once this host's
        /// agent answers again, with a changed-only resync). Losing the
        /// backup is still healed: this host protects again as soon as
        /// the backup answers.
        #[arg(long)]
        no_reprotect: bool,
        /// Nothing is set up again by itself: no retry after a lost
        /// backup, no protection back after a failover (implies
        /// --no-reprotect). For a cluster manager or a script that drives
        /// every step.
        #[arg(long)]
        manual: bool,
        /// Stop protecting VM (the backup discards its standby copy) and
        /// forget that protection is wanted: the agent no longer sets it
        /// up again by itself.
        #[arg(long)]
        stop: bool,
        /// Print events as JSON lines.
        #[arg(long)]
        json: bool,
        /// Only start protection; do not follow it.
        #[arg(long, short = 'd')]
        detach: bool,
        /// The VM's name.
        vm: String,
        /// The backup agent's replication address (HOST:PORT).
        #[arg(required_unless_present_any = ["stop", "set"])]
        host: Option<String>,
    },
    /// Show what the local agent runs on (QEMU version, KVM).
    Info {
        #[arg(long)]
        json: bool,
    },
    /// Print a completion script for SHELL: `remus completions bash >
    /// /etc/bash_completion.d/remus` (the package installs them).
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
}

/// The CLI's `main`.
pub fn main() -> ExitCode {
    // Like other Unix tools, end quietly when the reader of our output goes
    // away (`remus list | head`), instead of failing to print (Rust
    // ignores SIGPIPE by default, which turns that into a panic).
    // SAFETY: setting a signal disposition at start, before any thread.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("remus: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("remus: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let client = Client::new(&cli.socket);
    match cli.command {
        Command::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(shell, &mut Cli::command(), "remus", &mut std::io::stdout());
        }
        Command::Create {
            config,
            from_libvirt,
            dry_run,
            console,
        } => {
            let converted = from_libvirt.is_some();
            let (cfg, source) = match (config, from_libvirt) {
                (_, Some(xml)) => {
                    let text = std::fs::read_to_string(&xml)
                        .map_err(|e| anyhow::anyhow!("{}: {e}", xml.display()))?;
                    let base = xml.parent().unwrap_or(std::path::Path::new("."));
                    let conv = remus_config::libvirt::from_libvirt_xml(&text, base)
                        .map_err(|e| anyhow::anyhow!("{}: {e}", xml.display()))?;
                    for n in &conv.notes {
                        eprintln!("note: {n}");
                    }
                    if dry_run {
                        print!("{}", toml::to_string(&conv.config)?);
                    }
                    (conv.config, xml)
                }
                (Some(path), None) => (
                    VmConfig::load(&path)
                        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?,
                    path,
                ),
                (None, None) => anyhow::bail!("give a config file or --from-libvirt DOMAIN.xml"),
            };
            cfg.check_host()
                .map_err(|e| anyhow::anyhow!("{}: {e}", source.display()))?;
            if dry_run {
                // Converted: stdout holds the TOML; the verdict goes beside.
                let ok = format!("{}: config OK for VM '{}'", source.display(), cfg.name);
                if converted {
                    eprintln!("{ok}");
                } else {
                    println!("{ok}");
                }
                return Ok(ExitCode::SUCCESS);
            }
            let name = cfg.name.clone();
            let info = client.create(cfg).await.map_err(api)?;
            eprintln!(
                "Started VM '{}' (id {}, {} MiB, {} vCPUs, {})",
                info.name, info.id, info.mem_mib, info.vcpus, info.accel
            );
            if console {
                return console::attach(&client, &name).await;
            }
        }
        Command::List { json, vms } => {
            let mut all = client.list().await.map_err(api)?;
            if !vms.is_empty() {
                for v in &vms {
                    if !all.iter().any(|i| &i.name == v) {
                        anyhow::bail!("no VM named '{v}' on this host");
                    }
                }
                all.retain(|i| vms.contains(&i.name));
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&all)?);
            } else {
                print!("{}", format::list_table(&all));
            }
        }
        Command::Console { dump, vm } => {
            if dump {
                let bytes = client.console_log(&vm).await.map_err(api)?;
                use std::io::Write;
                let mut out = std::io::stdout().lock();
                out.write_all(&bytes)?;
                out.flush()?;
            } else {
                return console::attach(&client, &vm).await;
            }
        }
        Command::Pause { vm } => {
            client.pause(&vm).await.map_err(api)?;
        }
        Command::Unpause { vm } => {
            client.unpause(&vm).await.map_err(api)?;
        }
        Command::Takeover { json, vm } => {
            let info = client.takeover(&vm).await.map_err(api)?;
            if json {
                println!("{}", serde_json::to_string(&info)?);
            } else {
                println!("{vm}: runs on this host ({})", info.state_name);
            }
        }
        Command::Destroy {
            vm,
            discard_this_copy,
        } => {
            if discard_this_copy {
                client.destroy_discarding(&vm).await.map_err(api)?;
            } else {
                client.destroy(&vm).await.map_err(api)?;
            }
        }
        Command::VcpuPin { vm, vcpu, cpus } => {
            client.vcpu_pin(&vm, &vcpu, &cpus).await.map_err(api)?;
        }
        Command::VcpuList { json, vm } => {
            let v = client.vcpus(&vm).await.map_err(api)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print!("{}", format::vcpu_table(&vm, &v));
            }
        }
        Command::Migrate {
            json,
            max_rate,
            vm,
            host,
        } => {
            return migrate(&client, &vm, &host, max_rate, json).await;
        }
        Command::Failback { json, vm } => {
            return failback(&client, &vm, json).await;
        }
        Command::Protect {
            interval_ms,
            timeout_ms,
            set,
            no_net,
            no_disk,
            no_compress,
            max_rate,
            min_interval_ms,
            max_latency_ms,
            unencrypted,
            no_reprotect,
            manual,
            stop,
            json,
            detach,
            vm,
            host,
        } => {
            if stop {
                client.unprotect(&vm).await.map_err(api)?;
                eprintln!("Stopping protection of '{vm}'.");
                return Ok(ExitCode::SUCCESS);
            }
            if set {
                if host.is_some() {
                    anyhow::bail!(
                        "--set changes the running session: give no HOST (stop and protect again to change the backup)"
                    );
                }
                let now = client
                    .tune(
                        &vm,
                        &remus_api::TuneRequest {
                            interval_ms,
                            timeout_ms,
                        },
                    )
                    .await
                    .map_err(api)?;
                if json {
                    println!("{}", serde_json::to_string(&now)?);
                } else {
                    eprintln!(
                        "Protection of '{vm}' now: every {} ms, failover after {} ms of silence (from the next checkpoint).",
                        now.interval_ms.unwrap_or_default(),
                        now.timeout_ms.unwrap_or_default()
                    );
                }
                return Ok(ExitCode::SUCCESS);
            }
            let interval_ms = interval_ms.unwrap_or(200);
            let timeout_ms = timeout_ms.unwrap_or(2000);
            let peer = host.unwrap_or_default();
            if no_net {
                eprintln!(
                    "remus: warning: --no-net: network output is not held until its checkpoint commits; after a failover clients may have seen output the backup never had, and TCP sessions may stall or reset"
                );
            }
            if no_disk {
                eprintln!(
                    "remus: warning: --no-disk: disk writes are not replicated; after a failover the guest's disk may not match its memory"
                );
            }
            if unencrypted {
                eprintln!(
                    "remus: warning: --unencrypted: the VM's memory and disk writes cross the link in the clear; use it only on a link that is encrypted already"
                );
            }
            let req = remus_api::ProtectRequest {
                peer: peer.clone(),
                interval_ms,
                timeout_ms,
                no_net,
                no_disk,
                no_compress,
                unencrypted,
                no_reprotect,
                manual,
                max_rate,
                min_interval_ms,
                max_latency_ms,
            };
            client.protect(&vm, &req).await.map_err(api)?;
            eprintln!(
                "Protecting '{vm}' to {peer} every {interval_ms} ms (failover after {timeout_ms} ms of silence){}.",
                capped(max_rate, "initial copy")
            );
            if detach {
                return Ok(ExitCode::SUCCESS);
            }
            let mut n = 0u64;
            let mut pause_sum = 0.0;
            let mut pause_max: f64 = 0.0;
            // The initial disk sync as a progress bar on a terminal.
            let bar = indicatif::ProgressBar::new(0);
            let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
            if json || !tty {
                bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
            }
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "disk sync {msg:6} [{bar:40}] {binary_bytes}/{binary_total_bytes} {eta}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            let follow = client.follow_protection(&vm, |s| {
                if json {
                    println!("{}", s.line);
                    return;
                }
                match &s.event {
                    SessionEvent::DiskSync(p) if tty => {
                        bar.set_message(p.disk.clone());
                        bar.set_length(p.disk_bytes);
                        bar.set_position(p.compared_bytes);
                        return;
                    }
                    SessionEvent::DiskSynced(_) => bar.finish_and_clear(),
                    SessionEvent::Checkpoint(c) => {
                        n += 1;
                        pause_sum += c.pause_ms;
                        pause_max = pause_max.max(c.pause_ms);
                    }
                    _ => {}
                }
                println!("{}", format::protect_event(&s.event));
            });
            tokio::select! {
                r = follow => r.map_err(api)?,
                _ = tokio::signal::ctrl_c() => {
                    eprintln!("\nStopped following; protection of '{vm}' continues (remus protect --stop {vm} ends it).");
                }
            }
            if n > 0 && !json {
                eprintln!(
                    "{n} checkpoints, pause mean {:.2} ms, max {:.2} ms",
                    pause_sum / n as f64,
                    pause_max
                );
            }
        }
        Command::Info { json } => {
            let h = client.host().await.map_err(api)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&h)?);
            } else {
                println!("agent      : remusd {}", h.agent_version);
                println!("qemu       : {}", h.qemu);
                match &h.kvm_reason {
                    None => println!(
                        "accel      : kvm (a 64-bit test guest ran under KVM: accel = \"auto\" uses it)"
                    ),
                    Some(r) => println!("accel      : tcg (accel = \"auto\" uses TCG: {r})"),
                }
                println!("state dir  : {}", h.state_dir.display());
                if let Some(l) = &h.replication_listen {
                    println!("replication: {l}");
                }
                match &h.arbiter {
                    None => {
                        println!("arbiter    : none (a partition can leave two running copies)")
                    }
                    Some(a) => {
                        let health = match (&a.answered_by, &a.error) {
                            (Some(ep), _) => format!("answers ({ep})"),
                            (None, Some(e)) => format!("UNREACHABLE: {e}"),
                            (None, None) => "unknown".into(),
                        };
                        println!(
                            "arbiter    : {} as '{}', prefix {}, lease {} s, margin {} ms: {health}",
                            a.endpoints.join(","),
                            a.host,
                            a.prefix,
                            a.ttl_s,
                            a.margin_ms
                        );
                    }
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn failback(client: &Client, vm: &str, json: bool) -> anyhow::Result<ExitCode> {
    // (epoch, guest pause; None when the arbiter confirmed it)
    let mut switched: Option<(u64, Option<f64>)> = None;
    let mut failed: Option<String> = None;
    if !json {
        eprintln!("Switching '{vm}' over to its backup at the next checkpoint...");
    }
    client
        .failback(vm, |s| {
            if json {
                println!("{}", s.line);
            }
            match s.event {
                SessionEvent::SwitchedOver {
                    epoch, downtime_ms, ..
                } => switched = Some((epoch, downtime_ms)),
                SessionEvent::Failed { reason } => failed = Some(reason),
                SessionEvent::BackupLost { reason } => {
                    failed = Some(format!(
                        "the backup was lost ({reason}); the VM runs on here unprotected"
                    ))
                }
                _ => {}
            }
        })
        .await
        .map_err(api)?;
    if let Some(reason) = failed {
        anyhow::bail!("failback of '{vm}' failed: {reason}");
    }
    let Some((epoch, downtime_ms)) = switched else {
        anyhow::bail!("failback of '{vm}' ended without a switch-over; check both agents' logs");
    };
    if !json {
        let paused = match downtime_ms {
            Some(ms) => format!("the guest was paused {ms:.1} ms"),
            // The backup's answer was lost; the arbiter's key says it runs
            // the VM.
            None => "the backup's answer was lost, but the arbiter says it runs the VM".into(),
        };
        eprintln!(
            "Switched over at epoch {epoch}: {paused}. The backup runs '{vm}' now and protects it back to this host (see `remus list` there).",
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `, initial copy capped at 20 MiB/s` for a cap given; nothing for the
/// agent's default.
fn capped(rate: u64, what: &str) -> String {
    if rate == 0 {
        String::new()
    } else {
        format!(", {what} capped at {}", remus_api::rate::format_rate(rate))
    }
}

async fn migrate(
    client: &Client,
    vm: &str,
    host: &str,
    max_rate: u64,
    json: bool,
) -> anyhow::Result<ExitCode> {
    use indicatif::{ProgressBar, ProgressStyle};
    let bar = ProgressBar::new(0);
    if json || !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    bar.set_style(
        ProgressStyle::with_template(
            "{msg:18} [{bar:40}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.set_message("initial copy");
    let mut done: Option<MigrateStats> = None;
    let mut failed: Option<String> = None;
    if !json && max_rate != 0 {
        eprintln!(
            "Migrating '{vm}' to {host}{}.",
            capped(max_rate, "pre-copy")
        );
    }
    let req = remus_api::MigrateRequest {
        peer: host.to_string(),
        max_rate,
    };
    client
        .migrate_with(vm, &req, |s| {
            if json {
                println!("{}", s.line);
            }
            match s.event {
                SessionEvent::DiskSync(p) => {
                    bar.set_message(format!("disk sync {}", p.disk));
                    bar.set_length(p.disk_bytes);
                    bar.set_position(p.compared_bytes);
                }
                ev @ SessionEvent::DiskSynced(_) if !json => {
                    bar.suspend(|| eprintln!("{}", format::protect_event(&ev)));
                }
                SessionEvent::Start { bytes, .. } => {
                    bar.set_message("initial copy");
                    bar.set_position(0);
                    bar.set_length(bytes);
                }
                SessionEvent::Round { round, bytes, .. } => {
                    if bytes > bar.length().unwrap_or(0) {
                        bar.set_length(bytes);
                    }
                    bar.set_position(bytes);
                    bar.set_message(format!("round {}", round + 1));
                }
                SessionEvent::Done(stats) => done = Some(stats),
                SessionEvent::Failed { reason } => failed = Some(reason),
                _ => {}
            }
        })
        .await
        .map_err(api)?;
    bar.finish_and_clear();
    if let Some(reason) = failed {
        anyhow::bail!("migration of '{vm}' failed: {reason}");
    }
    let Some(d) = done else {
        anyhow::bail!("migration of '{vm}' ended without a result; check both agents' logs");
    };
    if !json {
        eprintln!(
            "Migrated '{vm}' to {host} in {:.2} s: downtime {:.1} ms, {:.1} MiB sent in {} pre-copy rounds (last copy {} pages).",
            d.total_ms / 1e3,
            d.downtime_ms,
            d.bytes as f64 / 1048576.0,
            d.rounds,
            d.final_pages
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Agent errors print as one line; the API message already says what
/// went wrong and with what.
fn api(e: ClientError) -> anyhow::Error {
    anyhow::anyhow!("{e}")
}
