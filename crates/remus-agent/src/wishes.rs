//! Protection that heals itself: what the operator wants (`remus protect`
//! records it, `remus protect --stop` clears it), kept in the state dir,
//! and a reconciler that makes it so.
//!
//! A wish says "while this VM runs on this host, protect it to PEER with
//! these settings". The healer thread compares it with what is: a VM that
//! runs here unprotected (its backup was lost, its session failed, it was
//! just taken over) is protected again, with a backoff between tries
//! (1 s doubling to 60 s) so that a dead peer costs a connection attempt a
//! minute. A wish for a VM that does not run here (a standby, a stale
//! copy, a VM that migrated away) waits: it applies again if the VM comes
//! back. The first checkpoint acknowledged after protection was lost is
//! reported as `protection-restored`.
//!
//! After a failover, the host that took over records a wish of its own:
//! protect back to the old primary (its address from the session setup),
//! unless the primary said `--no-reprotect`. The old primary's agent,
//! when it is back, lists its copy stale and takes the session as its
//! standby: a changed-only resync.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::{Duration, Instant};

use remus_api::ProtectRequest;
use serde::{Deserialize, Serialize};

use crate::agent::{Agent, AgentError};
use crate::lifecycle::Stage;

/// Longest wish file read (a wish is a few hundred bytes).
const MAX_WISH_BYTES: u64 = 64 * 1024;
/// First wait after a failed try, doubled per failure up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// The healer looks at every wish at least this often.
const SWEEP: Duration = Duration::from_secs(5);

/// The protection wanted for one VM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Wish {
    pub request: ProtectRequest,
    /// After a failover, the host that took over protects back here.
    #[serde(default = "yes")]
    pub reprotect: bool,
}

fn yes() -> bool {
    true
}

/// Where a wish stands.
#[derive(Debug)]
struct Entry {
    wish: Wish,
    /// Failed tries since the last success.
    failures: u32,
    /// Not before this instant.
    next_try: Instant,
}

/// The wishes of an agent and the healer's state.
pub struct Wishes {
    dir: PathBuf,
    map: Mutex<BTreeMap<String, Entry>>,
    wake: Condvar,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Wishes {
    /// Reads the wishes recorded in `dir` (created if missing). A file
    /// that cannot be read is logged and skipped, never fatal.
    pub fn load(dir: &Path) -> std::io::Result<Wishes> {
        std::fs::create_dir_all(dir)?;
        let mut map = BTreeMap::new();
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let path = entry.path();
            let Some(name) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".json"))
            else {
                continue;
            };
            if remus_config::validate_name(name).is_err() {
                tracing::warn!(file = %path.display(), "protection wish with a file name that is no VM name: ignored");
                continue;
            }
            match read_wish(&path) {
                Ok(wish) => {
                    tracing::info!(vm = %name, peer = %wish.request.peer, "protection wanted (recorded): applies while the VM runs here");
                    map.insert(
                        name.to_string(),
                        Entry {
                            wish,
                            failures: 0,
                            next_try: Instant::now(),
                        },
                    );
                }
                Err(e) => {
                    tracing::error!(file = %path.display(), error = %e, "protection wish unreadable: ignored (remus protect records it again)")
                }
            }
        }
        Ok(Wishes {
            dir: dir.to_path_buf(),
            map: Mutex::new(map),
            wake: Condvar::new(),
        })
    }

    pub fn get(&self, vm: &str) -> Option<Wish> {
        lock(&self.map).get(vm).map(|e| e.wish.clone())
    }

    /// Records (or replaces) the wish for `vm`.
    pub fn set(&self, vm: &str, wish: Wish) -> Result<(), String> {
        let path = self.dir.join(format!("{vm}.json"));
        let text = serde_json::to_vec_pretty(&wish).map_err(|e| e.to_string())?;
        write_atomic(&path, &text)
            .map_err(|e| format!("record the protection wish {}: {e}", path.display()))?;
        lock(&self.map).insert(
            vm.to_string(),
            Entry {
                wish,
                failures: 0,
                next_try: Instant::now(),
            },
        );
        self.wake.notify_all();
        Ok(())
    }

    /// Forgets the wish for `vm` (`remus protect --stop`, `remus
    /// destroy`, a VM that migrated away).
    pub fn clear(&self, vm: &str) {
        if lock(&self.map).remove(vm).is_some() {
            let path = self.dir.join(format!("{vm}.json"));
            if let Err(e) = std::fs::remove_file(&path)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                tracing::error!(file = %path.display(), error = %e, "cannot remove the protection wish");
            }
            tracing::info!(vm = %vm, "protection no longer wanted");
        }
    }

    /// Something changed (a session ended, a VM was taken over): look now.
    pub fn poke(&self) {
        self.wake.notify_all();
    }

    /// Starts the healer thread; it ends when the agent goes.
    pub fn start_healer(agent: &Arc<Agent>) -> std::io::Result<()> {
        let weak = Arc::downgrade(agent);
        std::thread::Builder::new()
            .name("healer".into())
            .spawn(move || heal(weak))
            .map(|_| ())
    }
}

fn read_wish(path: &Path) -> Result<Wish, String> {
    let text = crate::files::read_bounded(path, MAX_WISH_BYTES).map_err(|e| e.to_string())?;
    serde_json::from_str(&text).map_err(|e| e.to_string())
}

/// Writes `path` whole or not at all (a crash leaves the old file).
fn write_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("json.tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)
}

/// What the healer should do about one wish now.
#[derive(Debug, PartialEq, Eq)]
enum Step {
    /// Nothing: the VM is protected, being set up, not here, or cannot be
    /// protected in its state.
    Wait,
    /// Protect it.
    Protect,
}

fn step(agent: &Agent, vm: &str) -> Step {
    let Ok(slot) = agent.slot(vm) else {
        return Step::Wait;
    };
    // A suspended session is resumed by its own thread, not the healer.
    if !matches!(slot.life.stage(), Stage::Unprotected) || slot.vm.is_fenced() || agent.resuming(vm)
    {
        return Step::Wait;
    }
    match slot.vm.run_state() {
        remus_vm::RunState::Running | remus_vm::RunState::Blocked | remus_vm::RunState::Paused => {
            Step::Protect
        }
        _ => Step::Wait,
    }
}

fn backoff(failures: u32) -> Duration {
    FIRST_BACKOFF
        .saturating_mul(1u32 << failures.saturating_sub(1).min(16))
        .min(MAX_BACKOFF)
}

fn heal(agent: Weak<Agent>) {
    loop {
        let Some(a) = agent.upgrade() else { return };
        if a.stopping() {
            return;
        }
        let held = a.wishes();
        let wishes = &*held;
        // Each due wish whose VM runs here unprotected: try it (outside
        // the lock: a try connects to the peer and takes seconds).
        let due: Vec<(String, Wish)> = {
            let now = Instant::now();
            lock(&wishes.map)
                .iter()
                .filter(|(_, e)| e.next_try <= now)
                .map(|(n, e)| (n.clone(), e.wish.clone()))
                .collect()
        };
        for (vm, wish) in due {
            if a.stopping() {
                return;
            }
            if step(&a, &vm) == Step::Protect {
                try_protect(&a, wishes, &vm, &wish);
            }
        }
        // Sleep until the next due try, a poke, or the sweep.
        let m = lock(&wishes.map);
        let now = Instant::now();
        let wait = m
            .values()
            .map(|e| e.next_try.saturating_duration_since(now))
            .filter(|d| !d.is_zero())
            .min()
            .unwrap_or(SWEEP)
            .min(SWEEP);
        drop(a);
        let _ = wishes
            .wake
            .wait_timeout(m, wait)
            .unwrap_or_else(|p| p.into_inner());
    }
}

/// Sets up the protection `wish` describes for `vm`, which runs here
/// unprotected although protection is wanted: a success restores it.
fn try_protect(agent: &Arc<Agent>, wishes: &Wishes, vm: &str, wish: &Wish) {
    let r = crate::replication::start_protect(agent, vm, wish.request.clone());
    let mut m = lock(&wishes.map);
    let Some(e) = m.get_mut(vm) else {
        return; // cleared meanwhile
    };
    match r {
        Ok(()) => {
            e.failures = 0;
            tracing::info!(vm = %vm, peer = %wish.request.peer, "protection set up again by the agent (protection wanted); restored at its first acknowledged checkpoint");
            drop(m);
            if let Ok(slot) = agent.slot(vm) {
                slot.expect_restoration();
            }
        }
        Err(err) => {
            e.failures = e.failures.saturating_add(1);
            let wait = backoff(e.failures);
            e.next_try = Instant::now() + wait;
            let failures = e.failures;
            drop(m);
            match &err {
                // Someone else started a session meanwhile: not a failure.
                AgentError::Conflict(_)
                    if agent.slot(vm).is_ok_and(|s| s.protected_to().is_some()) => {}
                _ => {
                    tracing::warn!(vm = %vm, peer = %wish.request.peer, tries = failures, retry_in_s = wait.as_secs(), error = %err, "the VM runs UNPROTECTED; protecting it again failed; retrying")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_one_second_to_a_minute() {
        let s: Vec<u64> = (1..=9).map(|f| backoff(f).as_secs()).collect();
        assert_eq!(s, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(backoff(u32::MAX), MAX_BACKOFF);
    }

    #[test]
    fn wishes_survive_a_reload_and_bad_files_are_skipped() {
        let d = tempfile::tempdir().unwrap();
        let w = Wishes::load(d.path()).unwrap();
        let wish = Wish {
            request: serde_json::from_str(r#"{"peer":"198.18.0.2:7001","interval_ms":100}"#)
                .unwrap(),
            reprotect: false,
        };
        w.set("web", wish.clone()).unwrap();
        std::fs::write(d.path().join("db.json"), b"{not json").unwrap();
        std::fs::write(d.path().join("../x.json"), b"{}").ok();
        std::fs::write(d.path().join("Bad Name!.json"), b"{}").unwrap();
        let big = vec![b' '; MAX_WISH_BYTES as usize + 10];
        std::fs::write(d.path().join("big.json"), big).unwrap();
        let again = Wishes::load(d.path()).unwrap();
        assert_eq!(again.get("web"), Some(wish));
        assert!(again.get("db").is_none() && again.get("big").is_none());
        again.clear("web");
        assert!(!d.path().join("web.json").exists());
        assert!(Wishes::load(d.path()).unwrap().get("web").is_none());
    }
}
