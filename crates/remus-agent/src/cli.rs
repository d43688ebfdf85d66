//! `remusd`'s settings: the command line, and the config file that can set
//! every flag of it.
//!
//! The config file (`/etc/remus/remusd.toml` when it exists, or
//! `--config FILE`) is TOML whose keys are the long names of the flags,
//! with the values the flags take: `listen = "198.18.0.1:7001"`,
//! `al-extents = 2048`, `arbiter = ["http://..."]`. It is read through the
//! same definitions as the command line, so every flag, its checks and its
//! help exist once. The command line (and an environment variable a flag
//! reads) overrides the file; the file overrides the defaults.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::parser::ValueSource;
use clap::{ArgAction, CommandFactory, FromArgMatches, Parser};

/// The config file read when `--config` is not given, if it exists.
pub const DEFAULT_CONFIG: &str = "/etc/remus/remusd.toml";

/// Longest config file read (a settings file is a few KiB).
const MAX_CONFIG_BYTES: u64 = 1024 * 1024;

/// remusd: the remus host agent.
///
/// One remusd runs per host. It owns that host's VMs: it starts their QEMU
/// processes, serves their disks over NBD, relays their network frames,
/// and checkpoints protected VMs to a backup agent (or is that backup).
/// The `remus` command talks to it over a unix socket.
#[derive(Debug, Parser)]
#[command(name = "remusd", version, about, long_about)]
pub struct Args {
    /// Config file: TOML whose keys are this command's long flag names
    /// (`state-dir = "/var/lib/remus"`); flags on the command line
    /// override it. Default: /etc/remus/remusd.toml, when it exists.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Check this host (kernel, QEMU, KVM, the preload library) and the
    /// settings, print what was found, and exit: 0 when the agent can
    /// start.
    #[arg(long)]
    pub check: bool,
    /// Directory for VM state (one subdirectory per VM) and logs.
    #[arg(long, default_value = "/var/lib/remus", value_name = "DIR")]
    pub state_dir: PathBuf,
    /// Unix socket the CLI talks to.
    #[arg(long, env = "REMUS_SOCKET", default_value = remus_api::DEFAULT_SOCKET, value_name = "PATH")]
    pub socket: PathBuf,
    /// A group whose members may use the API socket besides root and the
    /// agent's user (the API is root-equivalent: grant it with care).
    #[arg(long, value_name = "GROUP")]
    pub api_group: Option<String>,
    /// Address for replication from peer agents (HOST:PORT); this agent
    /// then serves as a backup or migration destination. Needs --key.
    #[arg(long, value_name = "HOST:PORT")]
    pub listen: Option<String>,
    /// Shared key file authenticating replication peers and keying the
    /// encrypted link (at least 32 bytes, the same file on both hosts:
    /// `head -c 32 /dev/urandom > KEY`).
    #[arg(long, value_name = "FILE")]
    pub key: Option<PathBuf>,
    /// As a backup, accept sessions in the clear: from agents that speak
    /// protocol 5 (before encryption), and `remus protect --unencrypted`.
    /// They are authenticated by the key but readable and alterable on the
    /// wire. Only for the length of a rolling upgrade (or on a link that is
    /// encrypted already); every such session is logged as a warning. A
    /// primary never steps down to the clear by itself.
    #[arg(long)]
    pub allow_unencrypted_peers: bool,
    /// Where this host creates the disk images of the copies it keeps for
    /// peers: DIR/VM/TARGET.img (default: STATE_DIR/images). A peer never
    /// chooses a path on this host; see --vm-config-dir to place a VM's
    /// images elsewhere.
    #[arg(long, value_name = "DIR")]
    pub image_dir: Option<PathBuf>,
    /// Where this host finds the kernel and initrd of a VM from a peer
    /// that boots one directly, by the file name the peer's config gives
    /// (default: STATE_DIR/boot).
    #[arg(long, value_name = "DIR")]
    pub boot_dir: Option<PathBuf>,
    /// Per-VM placement files for copies kept for peers: DIR/VM.toml with
    /// `kernel`, `initrd`, `[[disk]] target/path/format` and `[[vif]]
    /// index/bridge` (see remus.toml(5) and docs/operations.md).
    #[arg(long, default_value = "/etc/remus/vms", value_name = "DIR")]
    pub vm_config_dir: PathBuf,
    /// Bridges a VM from a peer may be plugged into under its own bridge
    /// name; other bridges need a placement file. Separate names by commas
    /// or repeat the flag.
    #[arg(long, value_delimiter = ',', value_name = "BRIDGE")]
    pub peer_bridges: Vec<String>,
    /// Where guest RAM files live; a tmpfs keeps them out of the page
    /// cache's writeback.
    #[arg(long, default_value = "/dev/shm", value_name = "DIR")]
    pub ram_dir: PathBuf,
    /// QEMU system emulator to run (version 10 or newer).
    #[arg(long, default_value = "qemu-system-x86_64", value_name = "PATH")]
    pub qemu: PathBuf,
    /// The dirty-tracking library QEMU is started with
    /// (libremus_dirty_preload.so). Default: next to remusd, in a cargo
    /// target directory, or where the package installs it
    /// (/usr/lib/remus).
    #[arg(long, value_name = "PATH")]
    pub preload: Option<PathBuf>,
    /// Log filter (tracing syntax, e.g. `info`, `remus_vm=debug`); RUST_LOG
    /// works too.
    #[arg(long, default_value = "info", value_name = "FILTER")]
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
    /// CA certificate (PEM) that signed the etcd members' certificates:
    /// required with https:// endpoints, and the only CA the arbiter
    /// trusts (not the system's). Each endpoint's host (name or IP
    /// address) must be in its member's certificate.
    #[arg(long, value_name = "FILE")]
    pub arbiter_ca: Option<PathBuf>,
    /// Client certificate (PEM) shown to etcd, for members started with
    /// --client-cert-auth; signed by a CA in their --trusted-ca-file.
    #[arg(long, value_name = "FILE", requires = "arbiter_key")]
    pub arbiter_cert: Option<PathBuf>,
    /// Key (PEM) of --arbiter-cert.
    #[arg(long, value_name = "FILE", requires = "arbiter_cert")]
    pub arbiter_key: Option<PathBuf>,
    /// etcd user the arbiter logs in as, when etcd has authentication on
    /// (etcdctl auth enable). Give it a role with readwrite on the prefix
    /// and nothing else. Needs --arbiter-password-file.
    #[arg(long, value_name = "NAME", requires = "arbiter_password_file")]
    pub arbiter_user: Option<String>,
    /// File holding --arbiter-user's password, alone on one line (a
    /// trailing newline is ignored). A regular file other users cannot
    /// read (chmod 600), like --key; a password is never taken from the
    /// command line.
    #[arg(long, value_name = "FILE", requires = "arbiter_user")]
    pub arbiter_password_file: Option<PathBuf>,
    /// This host's name in the arbiter's keys (default: the hostname).
    /// Each host of a cluster needs its own.
    #[arg(long, value_name = "NAME")]
    pub host_name: Option<String>,
    /// Largest spill file a backup keeps for the disk writes of epochs
    /// not yet committed (beyond the 128 MiB held in memory), per VM.
    /// Reaching it ends that session with a clear error; what committed
    /// last stays intact.
    #[arg(long, default_value_t = remus_disk::epochs::DEFAULT_SPILL_LIMIT >> 20, value_name = "MIB",
          value_parser = clap::value_parser!(u64).range(1..=1 << 30))]
    pub max_spill_mib: u64,
    /// Activity-log extents (4 MiB each) a primary keeps marked per disk
    /// after their writes are acknowledged (as DRBD's al-extents): more
    /// means fewer syncs for guests that rewrite the same areas, fewer
    /// means less to compare when resyncing this host after it crashed.
    #[arg(long, default_value_t = remus_disk::activity::DEFAULT_LIMIT as u64, value_name = "N",
          value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub al_extents: u64,
    /// Serve Prometheus metrics at http://ADDR:PORT/metrics (per VM: role,
    /// age of the last checkpoint, pause and ack histograms, held output;
    /// counters of failovers, lost backups, fences, refused connections).
    /// Unauthenticated and read-only: bind it to an address only the
    /// monitoring network reaches. See docs/operations.md, "What to
    /// monitor".
    #[arg(long, value_name = "ADDR:PORT")]
    pub metrics: Option<std::net::SocketAddr>,
    /// Run the executables in DIR on failover, backup-lost, fenced,
    /// fence-lifted, stale, split-brain-refused, resync-done and
    /// protection-restored, with REMUS_EVENT, REMUS_VM, REMUS_ROLE,
    /// REMUS_PEER, REMUS_EPOCH, REMUS_HOST and REMUS_REASON set (as DRBD's
    /// handlers). They run off the data path, one at a time, in name
    /// order; DIR and each hook must be owned by root or the agent's user
    /// and writable by nobody else.
    #[arg(long, value_name = "DIR")]
    pub hook_dir: Option<PathBuf>,
    /// A hook still running after this long is killed (with the processes
    /// it started).
    #[arg(long, default_value_t = 30, value_name = "SECONDS",
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub hook_timeout: u64,
    /// Default cap, in bytes per second, of the bulk transfers this host
    /// sends: the initial copy of a protection session (the disk sync's
    /// data and the copy of RAM, a resync too) and a migration's
    /// pre-copy, so that the checkpoints of other VMs sharing the link
    /// keep their pace. Checkpoints are never capped. K, M, G: KiB, MiB,
    /// GiB (50M, 1G, 800K); 0: no cap. `remus protect --max-rate` and
    /// `remus migrate --max-rate` set it per VM.
    #[arg(long, default_value = "0", value_name = "RATE",
          value_parser = remus_api::rate::parse_rate)]
    pub max_rate: u64,
    /// What stopping the agent (SIGTERM, SIGINT, `systemctl stop`) does to
    /// its VMs. `keep`: they run on, and the next agent adopts them, so a
    /// restart or an upgrade of remusd stops no VM. A protection session
    /// is suspended at a last checkpoint (its guest paused until the next
    /// agent resumes the session from it, with no new copy) when its
    /// backup keeps its standby across the restart, and ended in order
    /// otherwise (the next agent then protects the VM again). `destroy`:
    /// the VMs are stopped with the agent. Standby copies are dropped
    /// either way.
    #[arg(long, value_enum, default_value_t = OnStop::Keep, value_name = "WHAT")]
    pub on_stop: OnStop,
    /// With `--on-stop keep`: how long, in seconds (1 to 600), the backup
    /// of a suspended protection session keeps its standby for the next
    /// agent here to resume the session. The guest stays paused until
    /// then. Past it the backup takes the silence for a dead host and
    /// fails over, and the copy here never runs again.
    #[arg(long, default_value_t = 60, value_name = "SECS",
          value_parser = clap::value_parser!(u64).range(1..=600))]
    pub restart_grace: u64,
    /// Who decides that a protected VM runs on its backup once its
    /// primary is lost. `agent` (the default): the backup's agent
    /// resumes it by itself (asking the --arbiter first, if there is
    /// one). `cluster`: a cluster manager (Pacemaker, with fencing)
    /// decides, and the agent only carries it out: a backup whose
    /// primary is lost keeps its standby waiting, and a primary whose
    /// backup is lost without a word keeps its guest paused with its
    /// output held, each until `remus takeover VM` (the resource agent's
    /// promote, or its notify once the peer is fenced). Not with
    /// --arbiter: one of the two decides, never both. See
    /// docs/pacemaker.md.
    #[arg(long, value_enum, default_value_t = FailoverBy::Agent, value_name = "WHO",
          conflicts_with = "arbiter")]
    pub failover_by: FailoverBy,
}

/// Who decides a failover (`--failover-by`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FailoverBy {
    /// The backup's agent (with the arbiter, if any).
    Agent,
    /// A cluster manager, through `remus takeover`.
    Cluster,
}

/// What stopping the agent does to its VMs (`--on-stop`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OnStop {
    /// The VMs run on; the next agent adopts them.
    Keep,
    /// The VMs are stopped with the agent.
    Destroy,
}

/// Why the settings cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    /// A command-line error (or `--help`/`--version`): clap prints it.
    #[error(transparent)]
    Clap(#[from] clap::Error),
    #[error("config file {path}: {reason}")]
    File { path: PathBuf, reason: String },
}

impl SettingsError {
    /// Prints the error (clap's own way for command-line errors, help
    /// and version) and gives the process's exit code.
    pub fn report(&self) -> std::process::ExitCode {
        match self {
            SettingsError::Clap(e) => {
                let _ = e.print();
                std::process::ExitCode::from(e.exit_code() as u8)
            }
            other => {
                eprintln!("remusd: {other}");
                std::process::ExitCode::from(2)
            }
        }
    }
}

impl Args {
    /// The settings from this process's command line and config file.
    pub fn load() -> Result<Args, SettingsError> {
        Self::load_from(std::env::args_os())
    }

    /// The settings from `argv` and the config file it names (or the
    /// default one, when it exists).
    pub fn load_from<I, T>(argv: I) -> Result<Args, SettingsError>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
    {
        let argv: Vec<OsString> = argv.into_iter().map(Into::into).collect();
        let cmd = Args::command();
        let given = cmd.clone().try_get_matches_from(&argv)?;
        let (path, required) = match given.get_one::<PathBuf>("config") {
            Some(p) => (p.clone(), true),
            None => (PathBuf::from(DEFAULT_CONFIG), false),
        };
        let file_err = |reason: String| SettingsError::File {
            path: path.clone(),
            reason,
        };
        let text = match read_config(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => String::new(),
            Err(e) => return Err(file_err(e.to_string())),
        };
        let table: toml::Table = toml::from_str(&text).map_err(|e| file_err(e.to_string()))?;
        let program = argv.first().cloned().unwrap_or_else(|| "remusd".into());
        let from_file = file_args(&cmd, &table, &given).map_err(file_err)?;
        // The file's settings on their own first, so that a bad value is
        // reported as the file's, not the command line's.
        let mut file_only = vec![program.clone()];
        file_only.extend(from_file.iter().cloned());
        cmd.clone()
            .try_get_matches_from(&file_only)
            .map_err(|e| file_err(clap_reason(&e)))?;
        let mut all = vec![program];
        all.extend(from_file);
        all.extend(argv.into_iter().skip(1));
        let matches = cmd.try_get_matches_from(all)?;
        Ok(Args::from_arg_matches(&matches)?)
    }
}

fn read_config(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    let f = std::fs::File::open(path)?;
    let mut text = String::new();
    f.take(MAX_CONFIG_BYTES + 1).read_to_string(&mut text)?;
    if text.len() as u64 > MAX_CONFIG_BYTES {
        return Err(std::io::Error::other(format!(
            "larger than {} KiB; not a settings file",
            MAX_CONFIG_BYTES / 1024
        )));
    }
    Ok(text)
}

/// A clap error in one line, without its "error: " prefix and its usage
/// and help hints (which speak of the command line, not the file).
fn clap_reason(e: &clap::Error) -> String {
    let text = e.to_string();
    let said: Vec<&str> = text
        .lines()
        .map(str::trim)
        .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
        .filter(|l| !l.is_empty() && !l.starts_with("tip:"))
        .collect();
    let joined = said.join(" ");
    joined
        .strip_prefix("error: ")
        .unwrap_or(&joined)
        .to_string()
}

/// Keys a config file may not set: they choose the file or end the run.
const NOT_IN_FILE: &[&str] = &["config", "check", "help", "version"];

/// The file's settings as command-line arguments, for every key not given
/// on the command line (or by its environment variable).
fn file_args(
    cmd: &clap::Command,
    table: &toml::Table,
    given: &clap::ArgMatches,
) -> Result<Vec<OsString>, String> {
    let mut out = Vec::new();
    for (key, value) in table {
        let arg = cmd
            .get_arguments()
            .find(|a| a.get_long() == Some(key.as_str()))
            .filter(|a| !NOT_IN_FILE.contains(&a.get_id().as_str()))
            .ok_or_else(|| {
                let known: Vec<&str> = cmd
                    .get_arguments()
                    .filter(|a| !NOT_IN_FILE.contains(&a.get_id().as_str()))
                    .filter_map(|a| a.get_long())
                    .collect();
                format!("unknown setting '{key}' (settings: {})", known.join(", "))
            })?;
        let overridden = matches!(
            given.value_source(arg.get_id().as_str()),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        );
        if overridden {
            continue;
        }
        let flag = format!("--{key}");
        match arg.get_action() {
            ArgAction::SetTrue => match value {
                toml::Value::Boolean(true) => out.push(flag.into()),
                toml::Value::Boolean(false) => {}
                other => return Err(format!("'{key}' is true or false, not {other}")),
            },
            ArgAction::Append => {
                let items: Vec<&toml::Value> = match value {
                    toml::Value::Array(a) => a.iter().collect(),
                    one => vec![one],
                };
                for v in items {
                    out.push(format!("{flag}={}", scalar(key, v)?).into());
                }
            }
            _ => out.push(format!("{flag}={}", scalar(key, value)?).into()),
        }
    }
    Ok(out)
}

/// A single value of the file as the flag's text.
fn scalar(key: &str, v: &toml::Value) -> Result<String, String> {
    match v {
        toml::Value::String(s) => Ok(s.clone()),
        toml::Value::Integer(i) => Ok(i.to_string()),
        toml::Value::Float(f) => Ok(f.to_string()),
        toml::Value::Boolean(b) => Ok(b.to_string()),
        other => Err(format!(
            "'{key}' takes one value (a string or a number), not {}",
            other.type_str()
        )),
    }
}

/// A commented `remusd.toml` with every setting, its help and its
/// default: what the package installs in /etc/remus.
pub fn example_config() -> String {
    let cmd = Args::command();
    let mut out = String::from(
        "# remusd settings. Every key is the long name of a remusd flag (see\n\
         # remusd(8)); a flag on the command line overrides the key here.\n\
         # Uncomment a line to change it from its default.\n",
    );
    for arg in cmd.get_arguments() {
        let id = arg.get_id().as_str();
        let Some(long) = arg.get_long() else { continue };
        if NOT_IN_FILE.contains(&id) {
            continue;
        }
        out.push('\n');
        let help = arg
            .get_long_help()
            .or(arg.get_help())
            .map(|h| h.to_string())
            .unwrap_or_default();
        for line in wrap(&help, 74) {
            out.push_str(&format!("# {line}\n"));
        }
        let defaults: Vec<String> = arg
            .get_default_values()
            .iter()
            .map(|v| v.to_string_lossy().into_owned())
            .collect();
        let placeholder = arg
            .get_value_names()
            .and_then(|n| n.first())
            .map(|n| n.to_string())
            .unwrap_or_else(|| "VALUE".into());
        let example = match (arg.get_action(), defaults.as_slice()) {
            (ArgAction::SetTrue, _) => "false".to_string(),
            (ArgAction::Append, _) => format!("[{placeholder:?}]    # none by default"),
            (_, [d]) if d.parse::<i64>().is_ok() => d.clone(),
            (_, [d]) => format!("{d:?}"),
            // No default: a placeholder to replace, and say so.
            _ => format!("{placeholder:?}    # no default"),
        };
        out.push_str(&format!("#{long} = {example}\n"));
    }
    out
}

/// Words of `text` in lines of at most `width` characters.
fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = Vec::new();
    let mut line = String::new();
    for word in text.split_whitespace() {
        if !line.is_empty() && line.len() + 1 + word.len() > width {
            lines.push(std::mem::take(&mut line));
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    if !line.is_empty() {
        lines.push(line);
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn load(file: &str, argv: &[&str]) -> Result<Args, SettingsError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("remusd.toml");
        std::fs::write(&path, file).unwrap();
        let mut full = vec!["remusd".to_string(), format!("--config={}", path.display())];
        full.extend(argv.iter().map(|s| s.to_string()));
        Args::load_from(full)
    }

    #[test]
    fn the_file_sets_flags_and_the_command_line_wins() {
        let a = load(
            "state-dir = \"/srv/remus\"\nlisten = \"198.18.0.1:7001\"\nal-extents = 2048\n\
             arbiter = [\"http://198.18.0.9:2379\", \"http://198.18.0.10:2379\"]\n",
            &["--listen", "198.18.0.1:7002"],
        )
        .unwrap();
        assert_eq!(a.state_dir, PathBuf::from("/srv/remus"));
        assert_eq!(a.listen.as_deref(), Some("198.18.0.1:7002"));
        assert_eq!(a.al_extents, 2048);
        assert_eq!(a.arbiter.len(), 2);
        // Defaults stay where neither sets a value.
        assert_eq!(a.ram_dir, PathBuf::from("/dev/shm"));
    }

    #[test]
    fn the_cluster_and_the_arbiter_never_both_decide() {
        assert_eq!(load("", &[]).unwrap().failover_by, FailoverBy::Agent);
        let a = load("failover-by = \"cluster\"\n", &[]).unwrap();
        assert_eq!(a.failover_by, FailoverBy::Cluster);
        for (file, args) in [
            (
                "",
                &[
                    "--failover-by",
                    "cluster",
                    "--arbiter",
                    "http://198.18.0.9:2379",
                ][..],
            ),
            (
                "arbiter = [\"http://198.18.0.9:2379\"]\n",
                &["--failover-by", "cluster"][..],
            ),
        ] {
            let e = load(file, args).unwrap_err().to_string();
            assert!(e.contains("cannot be used with"), "{e}");
        }
    }

    #[test]
    fn a_list_on_the_command_line_replaces_the_files() {
        let a = load(
            "arbiter = [\"http://198.18.0.9:2379\"]\n",
            &["--arbiter", "http://198.18.0.20:2379"],
        )
        .unwrap();
        assert_eq!(a.arbiter, vec!["http://198.18.0.20:2379".to_string()]);
    }

    #[test]
    fn the_host_rate_cap_comes_as_a_rate_from_the_file_or_the_flag() {
        assert_eq!(load("", &[]).unwrap().max_rate, 0);
        assert_eq!(
            load("max-rate = \"50M\"\n", &[]).unwrap().max_rate,
            50 << 20
        );
        assert_eq!(load("max-rate = 1048576\n", &[]).unwrap().max_rate, 1 << 20);
        let a = load("max-rate = \"50M\"\n", &["--max-rate", "1G"]).unwrap();
        assert_eq!(a.max_rate, 1 << 30);
        let e = load("max-rate = \"fast\"\n", &[]).unwrap_err().to_string();
        assert!(
            e.contains("config file") && e.contains("is not a rate"),
            "{e}"
        );
        let e = load("", &["--max-rate", "50"]).unwrap_err().to_string();
        assert!(e.contains("below the least rate cap"), "{e}");
    }

    #[test]
    fn bad_files_are_refused_with_the_key() {
        let msg = |file: &str| load(file, &[]).unwrap_err().to_string();
        let e = msg("listn = \"x\"\n");
        assert!(
            e.contains("unknown setting 'listn'") && e.contains("listen"),
            "{e}"
        );
        let e = msg("al-extents = 0\n");
        assert!(e.contains("config file") && e.contains("al-extents"), "{e}");
        let e = msg("check = true\n");
        assert!(e.contains("unknown setting 'check'"), "{e}");
        let e = msg("state-dir = [\"a\", \"b\"]\n");
        assert!(e.contains("'state-dir' takes one value"), "{e}");
        let e = msg("state-dir = \n");
        assert!(e.contains("config file"), "{e}");
        let e = msg("arbiter-cert = \"/etc/remus/c.pem\"\n");
        assert!(e.contains("arbiter-key"), "{e}");
    }

    #[test]
    fn arbiter_credentials_come_from_the_file_or_flags_in_pairs() {
        let a = load(
            "arbiter = [\"https://198.18.0.9:2379\"]\narbiter-user = \"remus\"\n\
             arbiter-password-file = \"/etc/remus/etcd-password\"\n",
            &[],
        )
        .unwrap();
        assert_eq!(a.arbiter_user.as_deref(), Some("remus"));
        assert_eq!(
            a.arbiter_password_file.as_deref(),
            Some(Path::new("/etc/remus/etcd-password"))
        );
        let e = load("arbiter-user = \"remus\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("arbiter-password-file"), "{e}");
        let e = load("", &["--arbiter-password-file", "/p"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("arbiter-user"), "{e}");
    }

    /// What [`crate::arbiter_of`] logs and returns for these flags.
    fn arbiter_of(argv: &[&str]) -> (anyhow::Result<bool>, String) {
        use std::sync::{Arc, Mutex};
        #[derive(Clone)]
        struct Buf(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Buf {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buf = Buf(Arc::new(Mutex::new(Vec::new())));
        let writer = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        let args = load("", argv).unwrap();
        let r = tracing::subscriber::with_default(subscriber, || crate::arbiter_of(&args));
        let logged = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        (r.map(|a| a.is_some()), logged)
    }

    #[test]
    fn a_plain_http_arbiter_draws_exactly_one_warning() {
        // Two plain endpoints, nobody listening: one warning names both.
        let (r, logged) = arbiter_of(&[
            "--arbiter",
            "http://127.0.0.1:9,http://127.0.0.1:11",
            "--host-name",
            "h",
        ]);
        assert!(r.unwrap(), "an arbiter is made (etcd may answer later)");
        let warnings: Vec<&str> = logged
            .lines()
            .filter(|l| l.contains("not encrypted"))
            .collect();
        assert_eq!(warnings.len(), 1, "{logged}");
        assert!(
            warnings[0].contains("WARN")
                && warnings[0].contains("http://127.0.0.1:9, http://127.0.0.1:11")
                && warnings[0].contains("use https:// with --arbiter-ca"),
            "{logged}"
        );
    }

    #[test]
    fn unsafe_arbiter_settings_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let refused = |argv: &[&str]| {
            let (r, logged) = arbiter_of(argv);
            assert!(!logged.contains("not encrypted"), "{logged}");
            r.unwrap_err().to_string()
        };
        // https without the CA that signed etcd's certificates.
        let e = refused(&["--arbiter", "https://127.0.0.1:9", "--host-name", "h"]);
        assert!(e.contains("--arbiter-ca"), "{e}");
        // TLS files with a plain http endpoint.
        let ca = dir.path().join("ca.pem");
        let e = refused(&[
            "--arbiter",
            "http://127.0.0.1:9",
            "--arbiter-ca",
            ca.to_str().unwrap(),
        ]);
        assert!(e.contains("plain http"), "{e}");
        // A password file others can read: refused, named, not quoted.
        let pw = dir.path().join("password");
        std::fs::write(&pw, "hunter2\n").unwrap();
        std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = refused(&[
            "--arbiter",
            "http://127.0.0.1:9",
            "--arbiter-user",
            "remus",
            "--arbiter-password-file",
            pw.to_str().unwrap(),
        ]);
        assert!(
            e.contains(pw.to_str().unwrap()) && e.contains("chmod 600") && !e.contains("hunter2"),
            "{e}"
        );
        // Arbiter settings without an arbiter.
        let e = refused(&["--arbiter-user", "remus", "--arbiter-password-file", "/p"]);
        assert!(e.contains("need --arbiter URL"), "{e}");
    }

    #[test]
    fn a_named_config_file_must_exist() {
        let e = Args::load_from(["remusd", "--config", "/nonexistent/remusd.toml"]).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/remusd.toml"), "{e}");
    }

    #[test]
    fn the_example_config_is_valid_and_sets_nothing() {
        let text = example_config();
        // Every setting is there, commented out.
        for long in ["state-dir", "listen", "arbiter", "al-extents", "preload"] {
            assert!(text.contains(&format!("#{long} = ")), "{long}");
        }
        let without_config = |mut a: Args| {
            a.config = None;
            format!("{a:?}")
        };
        let commented = load(&text, &[]).unwrap();
        let empty = Args::load_from(["remusd", "--config", "/dev/null"]).unwrap();
        assert_eq!(without_config(commented), without_config(empty));
        // The settings that have defaults, uncommented, give the defaults.
        let uncommented: String = text
            .lines()
            .map(|l| match l.strip_prefix('#') {
                Some(rest)
                    if rest.contains(" = ")
                        && !rest.contains(" by default")
                        && !rest.contains("# no default") =>
                {
                    rest.to_string()
                }
                _ => l.to_string(),
            })
            .collect::<Vec<_>>()
            .join("\n");
        let a = load(&uncommented, &[]).unwrap();
        assert_eq!(a.state_dir, PathBuf::from("/var/lib/remus"));
        assert_eq!(a.al_extents, remus_disk::activity::DEFAULT_LIMIT as u64);
    }
}
