//! `remusd`, the per-host agent: owns this host's VMs (stock QEMU
//! processes), serves their disks (NBD) and NICs (frame relay), and answers
//! the `remus` CLI on a unix socket.
//!
//! - [`agent`]: VM registry and operations.
//! - [`http`]: the local HTTP/JSON API.
//!
//! - [`cli`]: the settings (command line and config file).
//! - [`host`]: what the host must offer (kernel, QEMU, preload).
//!
//! Stopping the agent (SIGTERM, SIGINT) leaves its VMs running
//! (`--on-stop keep`, the default; protection sessions end in order
//! first): QEMU runs in a process group of its own, holds its guest's
//! disk requests and reconnects its disks, NICs and console when the next
//! agent serves them again, and that agent adopts the VM ([`adopt`]).

pub mod admission;
pub mod adopt;
pub mod agent;
pub mod apiauth;
pub mod arbiter;
pub mod cli;
pub mod cluster;
pub mod copies;
pub mod failover;
pub mod files;
pub mod hooks;
pub mod host;
pub mod http;
pub mod lifecycle;
pub mod metrics;
pub mod observe;
pub mod replication;
pub mod storage;
pub mod wishes;

use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;

use agent::{Agent, AgentOptions};
pub use cli::Args;

/// This host's name: `--host-name`, or the kernel's hostname.
fn host_name(args: &Args) -> anyhow::Result<String> {
    Ok(match &args.host_name {
        Some(h) => h.clone(),
        None => std::fs::read_to_string("/proc/sys/kernel/hostname")
            .context("read the hostname (or give --host-name)")?
            .trim()
            .to_string(),
    })
}

/// The etcd client of `--arbiter` and this host's name in it, if given:
/// its files (CA, certificate, key, password) read and checked.
fn arbiter_client(args: &Args) -> anyhow::Result<Option<(remus_arbiter::Arbiter, String)>> {
    if args.arbiter.is_empty() {
        if args.arbiter_ca.is_some() || args.arbiter_cert.is_some() || args.arbiter_user.is_some() {
            anyhow::bail!("--arbiter-ca/--arbiter-cert/--arbiter-user need --arbiter URL");
        }
        return Ok(None);
    }
    let mut cfg = remus_arbiter::ArbiterConfig::new(args.arbiter.clone(), &args.arbiter_prefix)?;
    if args.arbiter_ca.is_some() || args.arbiter_cert.is_some() {
        cfg = cfg.with_tls(&remus_arbiter::TlsFiles {
            ca: args.arbiter_ca.clone(),
            cert: args.arbiter_cert.clone(),
            key: args.arbiter_key.clone(),
        })?;
    }
    if let (Some(user), Some(file)) = (&args.arbiter_user, &args.arbiter_password_file) {
        cfg = cfg.with_user(user, remus_arbiter::Password::from_file(file)?)?;
    }
    if let Some(w) = cfg.plaintext_warning() {
        tracing::warn!("{w}");
    }
    let host = host_name(args)?;
    Ok(Some((remus_arbiter::Arbiter::new(cfg, &host)?, host)))
}

/// The arbiter of `--arbiter`, if given.
fn arbiter_of(args: &Args) -> anyhow::Result<Option<Arc<arbiter::AgentArbiter>>> {
    let Some((arb, host)) = arbiter_client(args)? else {
        return Ok(None);
    };
    let a = arbiter::AgentArbiter::new(
        arb,
        std::time::Duration::from_secs(args.arbiter_ttl),
        std::time::Duration::from_millis(args.arbiter_margin_ms),
    )
    .map_err(anyhow::Error::msg)?;
    match a.arb.health() {
        Ok(ep) => {
            tracing::info!(endpoint = %ep, host = %host, prefix = %args.arbiter_prefix, ttl_s = args.arbiter_ttl, "arbiter answers")
        }
        Err(e) => {
            tracing::warn!(error = %e, "the arbiter does not answer now; protection with it is refused until it does")
        }
    }
    Ok(Some(Arc::new(a)))
}

/// The agent's `main`: settings, logging, then `--check` or the agent.
pub fn main() -> ExitCode {
    let args = match Args::load() {
        Ok(a) => a,
        Err(e) => return e.report(),
    };
    init_logging(&args.log);
    if args.check {
        return check(&args);
    }
    match start(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("remusd: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Logs to stderr: colours only on a terminal, and no timestamps of our
/// own under systemd's journal (which stamps every line itself).
fn init_logging(default_filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        fmt.without_time().init();
    } else {
        fmt.init();
    }
}

/// `remusd --check`: what the agent would find at start, one line each.
fn check(args: &Args) -> ExitCode {
    let mut ok = true;
    let mut line = |what: &str, r: Result<String, String>, required: bool| match r {
        Ok(v) if required => println!("{what:<9} ok: {v}"),
        Ok(v) => println!("{what:<9} {v}"),
        Err(e) if required => {
            ok = false;
            println!("{what:<9} FAILED: {e}")
        }
        Err(e) => println!("{what:<9} {e}"),
    };
    let config = match &args.config {
        Some(p) => p.display().to_string(),
        None if std::path::Path::new(cli::DEFAULT_CONFIG).exists() => cli::DEFAULT_CONFIG.into(),
        None => "none (defaults and the command line)".into(),
    };
    line("settings", Ok(format!("config file {config}")), true);
    line("kernel", host::check_kernel(), true);
    line("qemu", qemu_version(&args.qemu), true);
    line(
        "preload",
        host::find_preload(args.preload.as_deref()).map(|p| p.display().to_string()),
        true,
    );
    let kvm =
        remus_vm::kvm::qemu_kvm_usable(&args.qemu, remus_vm::qemu_args::DEFAULT_KVM_CPU, "q35");
    line(
        "accel",
        Ok(match kvm {
            Ok(()) => "kvm (a 64-bit test guest ran under KVM)".into(),
            Err(why) => format!("tcg ({why})"),
        }),
        false,
    );
    match (&args.listen, &args.key) {
        (_, Some(k)) => line(
            "key",
            remus_proto::Key::load(k)
                .map(|_| k.display().to_string())
                .map_err(|e| format!("{}: {e}", k.display())),
            true,
        ),
        (Some(_), None) => line("key", Err("--listen needs --key FILE".into()), true),
        (None, None) => line(
            "key",
            Ok("none (this agent cannot be a backup)".into()),
            false,
        ),
    }
    match arbiter_client(args) {
        Ok(None) => line(
            "arbiter",
            Ok("none (split-brain protection needs --arbiter)".into()),
            false,
        ),
        Ok(Some((arb, host))) => line(
            "arbiter",
            arb.health()
                .map(|ep| {
                    format!(
                        "{ep} answers; this host is {host:?} under {:?}",
                        args.arbiter_prefix
                    )
                })
                .map_err(|e| e.to_string()),
            true,
        ),
        Err(e) => line("arbiter", Err(format!("{e:#}")), true),
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// QEMU's version, if it is new enough.
fn qemu_version(qemu: &std::path::Path) -> Result<String, String> {
    match remus_vm::qemu_version(qemu)? {
        v if v >= remus_vm::MIN_QEMU => Ok(format!("{} {}.{}", qemu.display(), v.0, v.1)),
        v => Err(format!(
            "QEMU {}.{} at {} is too old: remus needs QEMU {}.{} or newer (Debian 12: from bookworm-backports)",
            v.0,
            v.1,
            qemu.display(),
            remus_vm::MIN_QEMU.0,
            remus_vm::MIN_QEMU.1
        )),
    }
}

/// Checks the host, then runs the agent until SIGTERM or SIGINT.
fn start(args: Args) -> anyhow::Result<()> {
    // Everything the agent and its QEMUs create (RAM files, replicas,
    // device state, sockets, logs) is for this user only.
    // SAFETY: umask has no preconditions; set before any thread starts.
    unsafe { libc::umask(0o077) };
    host::check_kernel().map_err(anyhow::Error::msg)?;
    let preload = host::find_preload(args.preload.as_deref()).map_err(anyhow::Error::msg)?;
    tracing::info!(preload = %preload.display(), kernel = %host::kernel_release(), "host checked");
    // Made (and finally dropped) outside the async runtime: the arbiter
    // runs a small runtime of its own.
    let arbiter = arbiter_of(&args)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start the async runtime")?;
    let r = rt.block_on(run(args, preload, arbiter.clone()));
    drop(rt);
    drop(arbiter);
    r
}

async fn run(
    args: Args,
    preload: std::path::PathBuf,
    arbiter: Option<Arc<arbiter::AgentArbiter>>,
) -> anyhow::Result<()> {
    let state_dir = std::path::absolute(&args.state_dir)
        .with_context(|| format!("state dir {}", args.state_dir.display()))?;
    let key = match &args.key {
        Some(path) => Some(
            remus_proto::Key::load(path)
                .with_context(|| format!("replication key {}", path.display()))?,
        ),
        None => None,
    };
    if args.listen.is_some() && key.is_none() {
        anyhow::bail!(
            "--listen needs --key FILE: replication peers must authenticate (the same key file on both hosts)"
        );
    }
    let hooks = match &args.hook_dir {
        Some(dir) => Some(hooks::HookSettings {
            dir: std::path::absolute(dir).context("--hook-dir")?,
            timeout: std::time::Duration::from_secs(args.hook_timeout),
            host: host_name(&args)?,
        }),
        None => None,
    };
    let observer = observe::Observer::new(hooks).map_err(anyhow::Error::msg)?;
    let agent = Arc::new(Agent::new(AgentOptions {
        observer,
        state_dir: state_dir.clone(),
        ram_dir: args.ram_dir.clone(),
        qemu: remus_vm::QemuBinary {
            path: args.qemu.clone(),
            env: Vec::new(),
            preload: Some(preload),
        },
        replication_listen: args.listen.clone(),
        key,
        arbiter,
        al_extents: args.al_extents as usize,
        allow_unencrypted: args.allow_unencrypted_peers,
        max_spill_mib: args.max_spill_mib,
        max_rate: args.max_rate,
        on_stop: args.on_stop,
        restart_grace: std::time::Duration::from_secs(args.restart_grace),
        failover_by: args.failover_by,
        storage: storage::Storage {
            image_dir: args
                .image_dir
                .clone()
                .map(std::path::absolute)
                .transpose()
                .context("--image-dir")?
                .unwrap_or_else(|| state_dir.join("images")),
            boot_dir: args
                .boot_dir
                .clone()
                .map(std::path::absolute)
                .transpose()
                .context("--boot-dir")?
                .unwrap_or_else(|| state_dir.join("boot")),
            vm_config_dir: args.vm_config_dir.clone(),
            peer_bridges: args.peer_bridges.clone(),
        },
    })?);

    // The socket's directory is made private only if it is the agent's
    // own: created now, or the default one (systemd's RuntimeDirectory).
    // A directory the operator pointed --socket into (say /tmp) keeps its
    // modes; the socket's own mode and SO_PEERCRED still guard the API.
    let mut own_socket_dir = false;
    if let Some(dir) = args.socket.parent() {
        own_socket_dir =
            !dir.exists() || std::path::Path::new(remus_api::DEFAULT_SOCKET).parent() == Some(dir);
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    // SAFETY: geteuid has no preconditions.
    let allowed = apiauth::Allowed {
        uid: unsafe { libc::geteuid() },
        gid: args
            .api_group
            .as_deref()
            .map(apiauth::group_id)
            .transpose()
            .map_err(anyhow::Error::msg)
            .context("--api-group")?,
    };
    // A socket file nobody answers on is stale; one that answers belongs to
    // a running agent, which we must not steal from.
    if args.socket.exists() {
        if std::os::unix::net::UnixStream::connect(&args.socket).is_ok() {
            anyhow::bail!(
                "another agent already listens on {}; give this one its own --socket and --state-dir",
                args.socket.display()
            );
        }
        std::fs::remove_file(&args.socket)
            .with_context(|| format!("remove stale socket {}", args.socket.display()))?;
    }
    // The replication port before the API socket: whoever can connect to
    // the socket finds an agent that will stay (a port taken by another
    // agent ends this one before it answers anybody).
    if let Some(addr) = &args.listen {
        let l = std::net::TcpListener::bind(addr)
            .with_context(|| format!("bind replication address {addr}"))?;
        tracing::info!(%addr, "replication port bound");
        let a = agent.clone();
        std::thread::Builder::new()
            .name("repl-listen".into())
            .spawn(move || replication::serve(a, l))
            .context("start the replication listener")?;
    }
    if let Some(addr) = args.metrics {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("bind the metrics address {addr} (--metrics)"))?;
        tracing::info!(%addr, "metrics served at /metrics");
        tokio::spawn(metrics::serve(l, agent.clone()));
    }
    // Standbys the last agent kept wait for their primaries; sessions it
    // suspended resume before the healer looks.
    replication::suspend::park_adopted(&agent);
    replication::resume_suspended(&agent);
    wishes::Wishes::start_healer(&agent).context("start the healer thread")?;
    let listener = tokio::net::UnixListener::bind(&args.socket)
        .with_context(|| format!("bind {}", args.socket.display()))?;
    apiauth::set_socket_access(&args.socket, &allowed, own_socket_dir)
        .with_context(|| format!("permissions of {}", args.socket.display()))?;
    let listener = apiauth::CheckedListener {
        inner: listener,
        allowed,
        refusals: Default::default(),
        observer: agent.opts.observer.clone(),
    };

    tracing::info!(socket = %args.socket.display(), state_dir = %state_dir.display(), "remusd ready");
    // systemd (Type=notify) starts the units ordered after us only now.
    let _ = sd_notify::notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(&format!("serving {}", args.socket.display())),
    ]);
    let app = http::router(agent.clone());
    // The agent's own shutdown starts with the signal, beside the API
    // server's: the server waits for its open responses, and a client
    // following a session's events (a `remus protect` printing them) is
    // answered until that session ends, which only the agent's shutdown
    // does. Waiting for the server first would wait for good.
    let (stopped_tx, stopped) = tokio::sync::watch::channel(false);
    let began = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let shutdown = {
        let (agent, began) = (agent.clone(), began.clone());
        async move {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("SIGTERM handler");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
                _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            }
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
            began.store(true, std::sync::atomic::Ordering::SeqCst);
            tokio::task::spawn_blocking(move || {
                agent.shutdown();
                let _ = stopped_tx.send(true);
            });
        }
    };
    let server = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .into_future();
    // Once the agent has stopped, responses still open get 2 s to end.
    let mut done = stopped.clone();
    let agent_done = async move {
        let _ = done.wait_for(|d| *d).await;
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    };
    let served = tokio::select! {
        served = server => served.context("API server"),
        _ = agent_done => {
            tracing::warn!("API responses still open after the agent stopped; closing them");
            Ok(())
        }
    };
    // The agent's shutdown ends before the process does (or runs now, if
    // the server ended without a signal).
    if began.load(std::sync::atomic::Ordering::SeqCst) {
        let mut done = stopped;
        let _ = done.wait_for(|d| *d).await;
    } else {
        let a = agent.clone();
        tokio::task::spawn_blocking(move || a.shutdown()).await.ok();
    }
    served?;
    let _ = std::fs::remove_file(&args.socket);
    tracing::info!("remusd stopped");
    Ok(())
}
