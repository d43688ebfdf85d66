//! Event hooks (`remusd --hook-dir DIR`), like DRBD's handlers: the
//! operator's executables, run for every [`Notice`] with what happened in
//! their environment, to page someone or to act.
//!
//! They never run on the data path: [`Hooks::fire`] only queues the call
//! (a full queue drops it, with a log line and a count); one thread runs
//! the queued calls in order, each hook in name order, each killed (with
//! its process group) after the timeout. A hanging hook delays later
//! hooks, never a checkpoint or a failover.
//!
//! Which files run, as run-parts(8) chooses them: regular executable files
//! whose names are made of letters, digits, `_` and `-` (so editor backups
//! and `.dpkg-old` files never run). A hook, and the directory, must be
//! owned by root or the agent's user and writable by nobody else: the
//! agent runs them with its own rights.

use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc::{SyncSender, TrySendError};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use wait_timeout::ChildExt;

use crate::metrics::HookLabels;
use crate::observe::Notice;

/// Calls waiting for the hook thread; more are dropped.
const QUEUE: usize = 64;
/// Output of a hook kept for the log (the rest is read and dropped).
const OUTPUT_LOGGED: usize = 2048;

/// Where the hooks are and how long each may run.
#[derive(Debug, Clone)]
pub struct HookSettings {
    pub dir: PathBuf,
    pub timeout: Duration,
    /// This host's name (`REMUS_HOST`).
    pub host: String,
}

/// One queued call.
#[derive(Debug, Clone)]
struct Call {
    event: &'static str,
    vm: String,
    role: String,
    peer: Option<String>,
    epoch: Option<u64>,
    reason: String,
}

/// The hooks of an agent.
pub struct Hooks {
    tx: SyncSender<Call>,
    runs: Family<HookLabels, Counter>,
}

impl Hooks {
    /// Checks the directory and starts the hook thread.
    pub fn start(
        settings: HookSettings,
        runs: Family<HookLabels, Counter>,
    ) -> Result<Hooks, String> {
        check_owner(&settings.dir, true)?;
        let (tx, rx) = std::sync::mpsc::sync_channel::<Call>(QUEUE);
        let runs2 = runs.clone();
        std::thread::Builder::new()
            .name("hooks".into())
            .spawn(move || {
                for call in rx {
                    run_all(&settings, &call, &runs2);
                }
            })
            .map_err(|e| format!("start the hook thread: {e}"))?;
        Ok(Hooks { tx, runs })
    }

    /// Queues the hooks for `notice` of `vm` (whose role here is `role`).
    pub fn fire(&self, vm: &str, role: &str, notice: &Notice) {
        let call = Call {
            event: notice.name(),
            vm: vm.to_string(),
            role: role.to_string(),
            peer: notice.peer().map(str::to_string),
            epoch: notice.epoch(),
            reason: notice.reason(),
        };
        match self.tx.try_send(call) {
            Ok(()) => {}
            Err(TrySendError::Full(c)) => {
                self.runs
                    .get_or_create(&HookLabels {
                        event: c.event,
                        result: "dropped",
                    })
                    .inc();
                tracing::warn!(vm = %c.vm, event = c.event, "hooks: {QUEUE} calls are waiting already (a hook hangs?); this one is dropped");
            }
            Err(TrySendError::Disconnected(c)) => {
                tracing::error!(vm = %c.vm, event = c.event, "hooks: the hook thread is gone; not run");
            }
        }
    }
}

/// `path` is owned by root or us and writable by nobody else.
fn check_owner(path: &Path, dir: bool) -> Result<(), String> {
    let md = std::fs::metadata(path).map_err(|e| format!("hook {}: {e}", path.display()))?;
    if dir != md.is_dir() {
        return Err(format!(
            "hook {}: not a {}",
            path.display(),
            if dir { "directory" } else { "regular file" }
        ));
    }
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if md.uid() != 0 && md.uid() != me {
        return Err(format!(
            "hook {}: owned by uid {}, not root or the agent's user: refused (it would run with the agent's rights)",
            path.display(),
            md.uid()
        ));
    }
    if md.mode() & 0o022 != 0 {
        return Err(format!(
            "hook {}: writable by group or others (mode {:o}): refused (chmod go-w)",
            path.display(),
            md.mode() & 0o7777
        ));
    }
    Ok(())
}

/// run-parts' rule for names that run.
fn runs_by_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// The hooks to run now, in name order (the directory is read at each
/// event: hooks can be added without restarting the agent).
fn hooks_in(dir: &Path) -> Result<Vec<PathBuf>, String> {
    check_owner(dir, true)?;
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| format!("hook dir {}: {e}", dir.display()))? {
        let Ok(entry) = entry else { continue };
        let name = entry.file_name();
        let Some(name) = name.to_str().filter(|n| runs_by_name(n)) else {
            continue;
        };
        let path = dir.join(name);
        // Not following a symlink's target for the checks would let a
        // link point anywhere: metadata() follows it, and the target is
        // what must be ours.
        let Ok(md) = std::fs::metadata(&path) else {
            continue;
        };
        if !md.is_file() || md.permissions().mode() & 0o111 == 0 {
            continue;
        }
        match check_owner(&path, false) {
            Ok(()) => out.push(path),
            Err(e) => tracing::error!("{e}"),
        }
    }
    out.sort();
    Ok(out)
}

fn run_all(settings: &HookSettings, call: &Call, runs: &Family<HookLabels, Counter>) {
    let hooks = match hooks_in(&settings.dir) {
        Ok(h) => h,
        Err(e) => {
            tracing::error!(vm = %call.vm, event = call.event, "hooks not run: {e}");
            return;
        }
    };
    for hook in hooks {
        let result = run_one(settings, &hook, call);
        runs.get_or_create(&HookLabels {
            event: call.event,
            result,
        })
        .inc();
    }
}

/// Runs one hook; its result for the metrics.
fn run_one(settings: &HookSettings, hook: &Path, call: &Call) -> &'static str {
    let mut cmd = Command::new(hook);
    cmd.arg(call.event)
        .env_clear()
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .env("REMUS_EVENT", call.event)
        .env("REMUS_VM", &call.vm)
        .env("REMUS_ROLE", &call.role)
        .env("REMUS_HOST", &settings.host)
        .env("REMUS_REASON", &call.reason)
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group: a timeout kills what it started too.
        .process_group(0);
    if let Some(p) = &call.peer {
        cmd.env("REMUS_PEER", p);
    }
    if let Some(e) = call.epoch {
        cmd.env("REMUS_EPOCH", e.to_string());
    }
    let started = Instant::now();
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(hook = %hook.display(), vm = %call.vm, event = call.event, error = %e, "hook could not start");
            return "failed";
        }
    };
    // Both pipes drained on threads of their own, so that a chatty hook
    // never blocks on a full pipe while we wait for it.
    let out = child.stdout.take().map(drain);
    let err = child.stderr.take().map(drain);
    let status = match child.wait_timeout(settings.timeout) {
        Ok(Some(s)) => Some(s),
        Ok(None) => None,
        Err(e) => {
            tracing::error!(hook = %hook.display(), error = %e, "waiting for the hook failed");
            None
        }
    };
    if status.is_none() {
        // SAFETY: kill(2) on the hook's own process group (its pid, by
        // process_group(0) above), a group we created.
        unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
        let _ = child.wait();
    }
    // A daemon the hook left behind may hold its pipes open: its output
    // is not waited for beyond a second.
    let output = [out, err]
        .into_iter()
        .flatten()
        .filter_map(|rx| rx.recv_timeout(Duration::from_secs(1)).ok())
        .collect::<Vec<_>>()
        .join("");
    let output = output.trim();
    let ms = started.elapsed().as_millis() as u64;
    match status {
        Some(s) if s.success() => {
            tracing::info!(hook = %hook.display(), vm = %call.vm, event = call.event, ms, output, "hook ran");
            "ok"
        }
        Some(s) => {
            let how = match (s.code(), s.signal()) {
                (Some(c), _) => format!("exit code {c}"),
                (None, Some(sig)) => format!("signal {sig}"),
                _ => "unknown status".into(),
            };
            tracing::warn!(hook = %hook.display(), vm = %call.vm, event = call.event, ms, output, "hook failed: {how}");
            "failed"
        }
        None => {
            tracing::warn!(hook = %hook.display(), vm = %call.vm, event = call.event, timeout_s = settings.timeout.as_secs_f64(), output, "hook KILLED: it ran past the timeout (--hook-timeout)");
            "timeout"
        }
    }
}

/// Reads a pipe to its end, keeping the first [`OUTPUT_LOGGED`] bytes,
/// and sends them.
fn drain<R: Read + Send + 'static>(mut r: R) -> std::sync::mpsc::Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut kept = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = r.read(&mut buf) {
            if n == 0 {
                break;
            }
            let room = OUTPUT_LOGGED.saturating_sub(kept.len());
            kept.extend_from_slice(&buf[..n.min(room)]);
        }
        let _ = tx.send(String::from_utf8_lossy(&kept).into_owned());
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn script(dir: &Path, name: &str, body: &str, mode: u32) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    fn settings(dir: &Path, timeout: Duration) -> HookSettings {
        HookSettings {
            dir: dir.to_path_buf(),
            timeout,
            host: "hostA".into(),
        }
    }

    fn call() -> Call {
        Call {
            event: "failover",
            vm: "web".into(),
            role: "primary".into(),
            peer: Some("198.18.0.1:7001".into()),
            epoch: Some(42),
            reason: "primary lost".into(),
        }
    }

    #[test]
    fn runs_the_eligible_hooks_in_order_with_the_event_in_their_environment() {
        let d = tempfile::tempdir().unwrap();
        std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let log = d.path().join("log");
        let body = format!(
            "echo \"$0 $1 $REMUS_EVENT $REMUS_VM $REMUS_ROLE $REMUS_PEER $REMUS_EPOCH $REMUS_HOST $REMUS_REASON\" >> {}",
            log.display()
        );
        script(d.path(), "20-second", &body, 0o755);
        script(d.path(), "10-first", &body, 0o700);
        // Not run: not executable, a backup name, writable by others.
        script(d.path(), "30-noexec", &body, 0o644);
        script(d.path(), "40-edit~", &body, 0o755);
        script(d.path(), "50-open", &body, 0o757);
        let runs: Family<HookLabels, Counter> = Family::default();
        run_all(&settings(d.path(), Duration::from_secs(10)), &call(), &runs);
        let text = std::fs::read_to_string(&log).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(
            lines[0].contains(
                "10-first failover failover web primary 198.18.0.1:7001 42 hostA primary lost"
            ),
            "{text}"
        );
        assert!(lines[1].contains("20-second"), "{text}");
        let ok = runs
            .get_or_create(&HookLabels {
                event: "failover",
                result: "ok",
            })
            .get();
        assert_eq!(ok, 2);
    }

    #[test]
    fn a_hook_past_its_timeout_is_killed_with_what_it_started() {
        let d = tempfile::tempdir().unwrap();
        std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let pidfile = d.path().join("child.pid");
        // The hook starts a child that would outlive it, then hangs.
        script(
            d.path(),
            "hang",
            &format!("sleep 300 & echo $! > {}; wait", pidfile.display()),
            0o700,
        );
        script(d.path(), "fails", "echo no >&2; exit 3", 0o700);
        let runs: Family<HookLabels, Counter> = Family::default();
        let t = Instant::now();
        run_all(
            &settings(d.path(), Duration::from_millis(500)),
            &call(),
            &runs,
        );
        assert!(t.elapsed() < Duration::from_secs(30));
        let get = |result| {
            runs.get_or_create(&HookLabels {
                event: "failover",
                result,
            })
            .get()
        };
        assert_eq!(get("timeout"), 1);
        assert_eq!(get("failed"), 1);
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // The group's SIGKILL reached the child; it is a zombie of init
        // at most, not a running process. The signal is delivered
        // asynchronously: its end is looked for for up to 5 s.
        let state = || std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let running = |state: &str| {
            state
                .rsplit(')')
                .next()
                .and_then(|s| s.split_whitespace().next())
                .is_some_and(|s| s != "Z")
        };
        let until = Instant::now() + Duration::from_secs(5);
        while running(&state()) && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(10));
        }
        let last = state();
        assert!(!running(&last), "the hook's child still runs: {last}");
    }

    #[test]
    fn a_directory_others_can_write_is_refused() {
        let d = tempfile::tempdir().unwrap();
        std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = Hooks::start(
            settings(d.path(), Duration::from_secs(1)),
            Family::default(),
        )
        .err()
        .unwrap();
        assert!(e.contains("writable by group or others"), "{e}");
        assert!(runs_by_name("50-page_me"));
        assert!(!runs_by_name("page.sh") && !runs_by_name("x.dpkg-old") && !runs_by_name(""));
    }
}
