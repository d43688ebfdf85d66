//! `remusd`, the per-host agent: owns this host's VMs (stock QEMU
//! processes), serves their disks (NBD) and NICs (frame relay), and answers
//! the `remus` CLI on a unix socket.
//!
//! - [`agent`]: VM registry and operations.
//! - [`http`]: the local HTTP/JSON API.
//!
//! Stopping the agent (SIGTERM, SIGINT) stops its VMs: the agent carries
//! their disk and network I/O, so a VM cannot outlive it usefully.

pub mod agent;
pub mod arbiter;
pub mod copies;
pub mod http;
pub mod replication;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;

use agent::{Agent, AgentOptions};

/// remusd: the remus host agent.
#[derive(Debug, Parser)]
#[command(name = "remusd", version, about, long_about = None)]
pub struct Args {
    /// Directory for VM state (one subdirectory per VM) and logs.
    #[arg(long, default_value = "/var/lib/remus")]
    pub state_dir: PathBuf,
    /// Unix socket the CLI talks to.
    #[arg(long, env = "REMUS_SOCKET", default_value = remus_api::DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// Address for replication from peer agents (HOST:PORT); this agent
    /// then serves as a backup or migration destination. Needs --key.
    #[arg(long)]
    pub listen: Option<String>,
    /// Shared key file authenticating replication peers (at least 32
    /// bytes, the same file on both hosts: `head -c 32 /dev/urandom > KEY`).
    #[arg(long)]
    pub key: Option<PathBuf>,
    /// Where guest RAM files live; a tmpfs keeps them out of the page
    /// cache's writeback.
    #[arg(long, default_value = "/dev/shm")]
    pub ram_dir: PathBuf,
    /// QEMU system emulator to run.
    #[arg(long, default_value = "qemu-system-x86_64")]
    pub qemu: PathBuf,
    /// Log filter (tracing syntax, e.g. `info`, `remus_vm=debug`); RUST_LOG
    /// works too.
    #[arg(long, default_value = "info")]
    pub log: String,
    /// etcd client URL of the arbiter that decides which host may run a
    /// protected VM (split-brain protection); repeat it, or separate URLs
    /// by commas, for each member. Both agents of a VM need the same
    /// cluster and prefix. See docs/operations.md, "Split brain".
    #[arg(long, value_delimiter = ',', value_name = "URL")]
    pub arbiter: Vec<String>,
    /// Key prefix under which the arbiter keeps VM keys.
    #[arg(long, default_value = "/remus", value_name = "PREFIX")]
    pub arbiter_prefix: String,
    /// Lease time in seconds: a failover waits for the primary's lease to
    /// lapse (up to this long after the primary's last renewal).
    #[arg(long, default_value_t = 5, value_name = "SECONDS")]
    pub arbiter_ttl: u64,
    /// A primary that cannot renew pauses its VM this long before its
    /// lease can lapse (covers the time to pause the VM).
    #[arg(long, default_value_t = 1000, value_name = "MS")]
    pub arbiter_margin_ms: u64,
    /// CA certificate (PEM) of the etcd members, for https:// endpoints.
    #[arg(long, value_name = "FILE")]
    pub arbiter_ca: Option<PathBuf>,
    /// Client certificate (PEM) when etcd asks for one.
    #[arg(long, value_name = "FILE", requires = "arbiter_key")]
    pub arbiter_cert: Option<PathBuf>,
    /// Key (PEM) of --arbiter-cert.
    #[arg(long, value_name = "FILE", requires = "arbiter_cert")]
    pub arbiter_key: Option<PathBuf>,
    /// This host's name in the arbiter's keys (default: the hostname).
    /// Each host of a cluster needs its own.
    #[arg(long, value_name = "NAME")]
    pub host_name: Option<String>,
    /// Activity-log extents (4 MiB each) a primary keeps marked per disk
    /// after their writes are acknowledged (as DRBD's al-extents): more
    /// means fewer syncs for guests that rewrite the same areas, fewer
    /// means less to compare when resyncing this host after it crashed.
    #[arg(long, default_value_t = remus_disk::activity::DEFAULT_LIMIT as u64, value_name = "N",
          value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub al_extents: u64,
}

/// The arbiter of `--arbiter`, if given.
fn arbiter_of(args: &Args) -> anyhow::Result<Option<Arc<arbiter::AgentArbiter>>> {
    if args.arbiter.is_empty() {
        if args.arbiter_ca.is_some() || args.arbiter_cert.is_some() {
            anyhow::bail!("--arbiter-ca/--arbiter-cert need --arbiter URL");
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
    let host = match &args.host_name {
        Some(h) => h.clone(),
        None => std::fs::read_to_string("/proc/sys/kernel/hostname")
            .context("read the hostname (or give --host-name)")?
            .trim()
            .to_string(),
    };
    let arb = remus_arbiter::Arbiter::new(cfg, &host)?;
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

/// The agent's `main`.
pub fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&args.log));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    // Made (and finally dropped) outside the async runtime: the arbiter
    // runs a small runtime of its own.
    let arbiter = arbiter_of(&args)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start the async runtime")?;
    let r = rt.block_on(run(args, arbiter.clone()));
    drop(rt);
    drop(arbiter);
    r
}

async fn run(args: Args, arbiter: Option<Arc<arbiter::AgentArbiter>>) -> anyhow::Result<()> {
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
    let agent = Arc::new(Agent::new(AgentOptions {
        state_dir: state_dir.clone(),
        ram_dir: args.ram_dir.clone(),
        qemu: remus_vm::QemuBinary {
            path: args.qemu.clone(),
            env: Vec::new(),
        },
        replication_listen: args.listen.clone(),
        key,
        arbiter,
        al_extents: args.al_extents as usize,
    })?);

    if let Some(dir) = args.socket.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
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
    let listener = tokio::net::UnixListener::bind(&args.socket)
        .with_context(|| format!("bind {}", args.socket.display()))?;

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

    tracing::info!(socket = %args.socket.display(), state_dir = %state_dir.display(), "remusd ready");
    let app = http::router(agent.clone());
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        }
    };
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
        .context("API server")?;
    let a = agent.clone();
    tokio::task::spawn_blocking(move || a.shutdown()).await.ok();
    let _ = std::fs::remove_file(&args.socket);
    tracing::info!("remusd stopped");
    Ok(())
}
