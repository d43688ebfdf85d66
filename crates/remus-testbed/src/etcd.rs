//! A real etcd cluster for tests: one to a few members on one address,
//! each with its own ports and data directory, started with the Debian
//! package's `etcd` (`scripts/install-deps.sh` installs it) and ended by
//! PID. Election timing is shortened (heartbeat 50 ms, election 300 ms) so
//! that a dead leader is replaced in well under a second.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::{Netns, free_port};

struct Member {
    name: String,
    client_url: String,
    peer_url: String,
    data: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

/// Members of one etcd cluster; all are killed (by PID) and their data
/// removed on drop.
pub struct EtcdCluster {
    members: Vec<Member>,
    initial_cluster: String,
    token: String,
    netns: Option<String>,
    dir: tempfile::TempDir,
}

impl EtcdCluster {
    /// Starts `n` members listening on `ip` (in `netns`, if given) and
    /// waits until every one reports healthy.
    pub fn start(n: usize, ip: &str, netns: Option<&Netns>) -> Result<EtcdCluster> {
        let dir = tempfile::tempdir().context("etcd temp dir")?;
        let members: Vec<Member> = (0..n)
            .map(|i| Member {
                name: format!("m{i}"),
                client_url: format!("http://{ip}:{}", free_port()),
                peer_url: format!("http://{ip}:{}", free_port()),
                data: dir.path().join(format!("m{i}.data")),
                log: dir.path().join(format!("m{i}.log")),
                child: None,
            })
            .collect();
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}={}", m.name, m.peer_url))
            .collect::<Vec<_>>()
            .join(",");
        let mut c = EtcdCluster {
            members,
            initial_cluster,
            token: format!("remus-test-{}", std::process::id()),
            netns: netns.map(|n| n.name.clone()),
            dir,
        };
        for i in 0..n {
            c.spawn(i)?;
        }
        for i in 0..n {
            c.wait_healthy(i, Duration::from_secs(30))?;
        }
        Ok(c)
    }

    fn spawn(&mut self, i: usize) -> Result<()> {
        let m = &self.members[i];
        let log = std::fs::File::create(&m.log).context("etcd log file")?;
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "etcd"]);
                c
            }
            None => Command::new("etcd"),
        };
        cmd.args(["--name", &m.name])
            .arg("--data-dir")
            .arg(&m.data)
            .args(["--listen-client-urls", &m.client_url])
            .args(["--advertise-client-urls", &m.client_url])
            .args(["--listen-peer-urls", &m.peer_url])
            .args(["--initial-advertise-peer-urls", &m.peer_url])
            .args(["--initial-cluster", &self.initial_cluster])
            .args(["--initial-cluster-token", &self.token])
            .args(["--initial-cluster-state", "new"])
            .args(["--heartbeat-interval", "50", "--election-timeout", "300"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = cmd.spawn().context(
            "start etcd (is etcd-server installed? scripts/install-deps.sh installs it)",
        )?;
        self.members[i].child = Some(child);
        Ok(())
    }

    fn wait_healthy(&mut self, i: usize, timeout: Duration) -> Result<()> {
        let t = Instant::now();
        loop {
            let url = self.members[i].client_url.clone();
            let mut cmd = match &self.netns {
                Some(ns) => {
                    let mut c = Command::new("ip");
                    c.args(["netns", "exec", ns, "etcdctl"]);
                    c
                }
                None => Command::new("etcdctl"),
            };
            let ok = cmd
                .args([
                    "--endpoints",
                    &url,
                    "--command-timeout=1s",
                    "endpoint",
                    "health",
                ])
                .env("ETCDCTL_API", "3")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ok {
                return Ok(());
            }
            if let Some(Ok(Some(st))) = self.members[i].child.as_mut().map(|c| c.try_wait()) {
                bail!(
                    "etcd member {} exited ({st}):\n{}",
                    self.members[i].name,
                    self.log(i)
                );
            }
            if t.elapsed() > timeout {
                bail!(
                    "etcd member {} not healthy after {timeout:?}:\n{}",
                    self.members[i].name,
                    self.log(i)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Client URLs, member order.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(|m| m.client_url.clone()).collect()
    }

    /// Member `i`'s log so far.
    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(&self.members[i].log).unwrap_or_default()
    }

    /// SIGKILL of member `i` (it keeps its data and can be restarted).
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts member `i` again on its data and waits until it is healthy.
    pub fn restart(&mut self, i: usize) -> Result<()> {
        self.kill(i);
        self.spawn(i)?;
        self.wait_healthy(i, Duration::from_secs(30))
    }

    /// The directory holding the members' data and logs.
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        // Kill and reap first: removing a live member's data dir made it
        // crash noisily (docs/arbiter-plan.md). The TempDir goes after.
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}
