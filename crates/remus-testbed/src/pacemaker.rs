//! A real corosync + Pacemaker cluster for tests, one node per namespace
//! host of a [`crate::Lan`], with the Debian packages' daemons
//! (`scripts/install-deps.sh` installs them).
//!
//! Each node runs in its host's network namespace and in a mount and UTS
//! namespace of its own, held by a `sleep` started with `unshare` (its
//! "holder"), so that its daemons find their own state where the packages
//! put it:
//!
//! - a private `/run` (corosync's pid lock is fixed at
//!   `/run/corosync.pid`; Pacemaker keeps `/run/crm` and the resource
//!   agents' `/run/resource-agents` there), a private `/dev/shm` (libqb's
//!   ring buffers), and `/etc/corosync`, `/var/lib/corosync`,
//!   `/var/lib/pacemaker`, `/var/log/pacemaker` bound from the node's
//!   directory (no option moves them);
//! - `/usr/lib/ocf/resource.d` bound from a copy with the resource agents
//!   the test installs ([`Cluster::start`]'s `agents`), the system's
//!   untouched;
//! - libqb's IPC sockets are abstract, so they are per network namespace
//!   already.
//!
//! Everything a node runs is in its mount namespace: [`ClusterNode::kill`]
//! ends all of it by PID (found through `/proc/PID/ns/mnt`), which is what
//! a host's power loss does to it; [`ClusterNode::start`] boots it again
//! with the state it had on disk. Dropping the [`Cluster`] kills every
//! node. Node names are the LAN's host names; corosync's token timeout is
//! 1 s, so a dead node is noticed within about two.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::Lan;

/// One cluster node (see the module's text).
pub struct ClusterNode {
    pub name: String,
    netns: String,
    dir: PathBuf,
    ocf: PathBuf,
    holder: Option<Child>,
    /// Symlinks made in `/run` at every boot (path in /run, target).
    run_links: Vec<(PathBuf, PathBuf)>,
}

/// A cluster of namespace hosts; every node is killed on drop.
pub struct Cluster {
    pub nodes: Vec<ClusterNode>,
    _dir: tempfile::TempDir,
}

fn corosync_conf(nodes: &[(String, String)]) -> String {
    let mut s = String::from(
        "totem {\n    version: 2\n    cluster_name: remustest\n    transport: knet\n    crypto_cipher: none\n    crypto_hash: none\n    token: 1000\n}\nnodelist {\n",
    );
    for (i, (name, addr)) in nodes.iter().enumerate() {
        s += &format!(
            "    node {{\n        ring0_addr: {addr}\n        name: {name}\n        nodeid: {}\n    }}\n",
            i + 1
        );
    }
    s += "}\nquorum {\n    provider: corosync_votequorum\n}\nlogging {\n    to_stderr: no\n    to_logfile: yes\n    logfile: /var/log/corosync/corosync.log\n    to_syslog: no\n}\n";
    s
}

fn chown_pacemaker(p: &Path) -> Result<()> {
    let out = Command::new("chown")
        .args(["-R", "hacluster:haclient"])
        .arg(p)
        .output()?;
    if !out.status.success() {
        bail!(
            "chown hacluster:haclient {}: {} (is pacemaker installed?)",
            p.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

impl Cluster {
    /// Sets up and boots a node on each of `hosts` (LAN host names), with
    /// the resource agents `agents` (provider, type, script) installed.
    /// Returns once every node's Pacemaker has joined the cluster.
    pub fn start(lan: &Lan, hosts: &[&str], agents: &[(&str, &str, &Path)]) -> Result<Cluster> {
        let dir = tempfile::tempdir_in("/tmp").context("cluster dir")?;
        // The resource agents: the system's, plus ours.
        let ocf = dir.path().join("resource.d");
        let out = Command::new("cp")
            .args(["-a", "/usr/lib/ocf/resource.d"])
            .arg(&ocf)
            .output()?;
        if !out.status.success() {
            bail!(
                "copy /usr/lib/ocf/resource.d (is resource-agents installed?): {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        for (provider, kind, script) in agents {
            let d = ocf.join(provider);
            std::fs::create_dir_all(&d)?;
            let to = d.join(kind);
            std::fs::copy(script, &to).with_context(|| format!("{}", script.display()))?;
            std::fs::set_permissions(&to, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
        }
        let members: Vec<(String, String)> = hosts
            .iter()
            .map(|h| (h.to_string(), lan.addr(h).to_string()))
            .collect();
        let conf = corosync_conf(&members);
        let mut nodes = Vec::new();
        for h in hosts {
            let nd = dir.path().join(h);
            for sub in [
                "run",
                "etc-corosync",
                "var-lib-corosync",
                "log-corosync",
                "var-lib-pacemaker/cib",
                "var-lib-pacemaker/pengine",
                "var-lib-pacemaker/blackbox",
                "var-lib-pacemaker/cores",
                "log-pacemaker",
            ] {
                std::fs::create_dir_all(nd.join(sub))?;
            }
            std::fs::write(nd.join("etc-corosync/corosync.conf"), &conf)?;
            chown_pacemaker(&nd.join("var-lib-pacemaker"))?;
            chown_pacemaker(&nd.join("log-pacemaker"))?;
            nodes.push(ClusterNode {
                name: h.to_string(),
                netns: lan.host(h).name.clone(),
                dir: nd,
                ocf: ocf.clone(),
                holder: None,
                run_links: Vec::new(),
            });
        }
        let mut cluster = Cluster { nodes, _dir: dir };
        for n in &mut cluster.nodes {
            n.boot_corosync()?;
        }
        for n in &mut cluster.nodes {
            n.boot_pacemaker()?;
        }
        let all: Vec<&str> = hosts.to_vec();
        if let Err(e) = cluster.nodes[0].wait_online(&all, Duration::from_secs(120)) {
            bail!("{e}\n{}", cluster.log_tails(40));
        }
        Ok(cluster)
    }

    /// The last `n` lines of every node's corosync and Pacemaker logs.
    pub fn log_tails(&self, n: usize) -> String {
        let tail = |text: String| {
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(n)..].join("\n")
        };
        self.nodes
            .iter()
            .map(|nd| {
                format!(
                    "--- corosync on {0}:\n{1}\n--- pacemaker on {0}:\n{2}\n",
                    nd.name,
                    tail(nd.corosync_log()),
                    tail(nd.pacemaker_log())
                )
            })
            .collect()
    }

    pub fn node(&self, name: &str) -> &ClusterNode {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("no cluster node {name}"))
    }

    pub fn node_mut(&mut self, name: &str) -> &mut ClusterNode {
        self.nodes
            .iter_mut()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("no cluster node {name}"))
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            n.kill();
        }
    }
}

impl ClusterNode {
    /// A command run inside this node's namespaces.
    pub fn command(&self, prog: &str) -> Command {
        let pid = self.holder.as_ref().map_or(0, |c| c.id());
        let mut c = Command::new("nsenter");
        c.arg("-t")
            .arg(pid.to_string())
            .args(["-n", "-m", "-u", "--"])
            .arg(prog);
        c
    }

    /// Runs `prog args` in this node; its output (any exit status).
    pub fn run(&self, prog: &str, args: &[&str]) -> Result<Output> {
        if self.holder.is_none() {
            bail!("node {} is down", self.name);
        }
        self.command(prog)
            .args(args)
            .output()
            .with_context(|| format!("{prog} on node {}", self.name))
    }

    /// Runs `prog args` in this node and gives its stdout; fails with its
    /// output if it fails.
    pub fn run_ok(&self, prog: &str, args: &[&str]) -> Result<String> {
        let out = self.run(prog, args)?;
        if !out.status.success() {
            bail!(
                "{prog} {} on node {}: {}{}",
                args.join(" "),
                self.name,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The holder: a `sleep` in new mount and UTS namespaces inside the
    /// host's network namespace, with the node's private mounts.
    fn boot_holder(&mut self) -> Result<()> {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.netns, "unshare"]);
        let child = cmd
            .args([
                "--mount",
                "--uts",
                "--propagation",
                "private",
                "sleep",
                "infinity",
            ])
            .stdin(Stdio::null())
            .spawn()
            .context("unshare (util-linux)")?;
        self.holder = Some(child);
        // A boot starts with an empty /run, as a reboot does (a marker a
        // resource agent left there must not outlive it).
        let run = self.dir.join("run");
        let _ = std::fs::remove_dir_all(&run);
        std::fs::create_dir_all(&run)?;
        for (at, target) in &self.run_links {
            let at = run.join(at);
            if let Some(parent) = at.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::os::unix::fs::symlink(target, &at)?;
        }
        let d = |s: &str| self.dir.join(s).to_string_lossy().into_owned();
        let script = format!(
            "set -e
             # Never touch the machine's own host name or mounts.
             [ \"$(readlink /proc/self/ns/uts)\" != \"$(readlink /proc/1/ns/uts)\" ]
             [ \"$(readlink /proc/self/ns/mnt)\" != \"$(readlink /proc/1/ns/mnt)\" ]
             hostname {name}
             mount --bind {run} /run
             mkdir -p /run/resource-agents /run/remus
             mount -t tmpfs -o mode=1777 tmpfs /dev/shm
             mount --bind {etc} /etc/corosync
             mount --bind {vlc} /var/lib/corosync
             mkdir -p /var/log/corosync /var/log/pacemaker
             mount --bind {lc} /var/log/corosync
             mount --bind {vlp} /var/lib/pacemaker
             mount --bind {lp} /var/log/pacemaker
             mount --bind {ocf} /usr/lib/ocf/resource.d",
            name = self.name,
            run = d("run"),
            etc = d("etc-corosync"),
            vlc = d("var-lib-corosync"),
            lc = d("log-corosync"),
            vlp = d("var-lib-pacemaker"),
            lp = d("log-pacemaker"),
            ocf = self.ocf.display(),
        );
        // The holder has entered its namespaces once it runs `sleep`
        // (`ip netns exec` and `unshare` exec, so the PID stays): before
        // that, its PID may still be in `ip`'s namespaces, and the host's
        // own UTS namespace.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let pid = self.holder.as_ref().map_or(0, |c| c.id());
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            if comm.trim() == "sleep" {
                break;
            }
            if Instant::now() > deadline {
                bail!("node {}: the namespace holder did not start", self.name);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.run_ok("sh", &["-c", &script])?;
        Ok(())
    }

    fn spawn_daemon(&self, prog: &str, args: &[&str], env: &[(&str, &str)]) -> Result<()> {
        let mut cmd = self.command(prog);
        cmd.args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // Reaped by a thread of its own; ended by kill() with the rest.
        let mut child = cmd
            .spawn()
            .with_context(|| format!("{prog} on {}", self.name))?;
        std::thread::spawn(move || child.wait());
        Ok(())
    }

    fn boot_corosync(&mut self) -> Result<()> {
        self.boot_holder()?;
        self.spawn_daemon("corosync", &["-f"], &[])?;
        Ok(())
    }

    fn boot_pacemaker(&mut self) -> Result<()> {
        // Until corosync answers here.
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self
            .run("corosync-cfgtool", &["-s"])
            .map(|o| o.status.success())
            .unwrap_or(false)
        {
            if Instant::now() > deadline {
                bail!(
                    "node {}: corosync did not start:\n{}",
                    self.name,
                    self.corosync_log()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        self.spawn_daemon(
            "pacemakerd",
            &[],
            &[("PCMK_logfile", "/var/log/pacemaker/pacemaker.log")],
        )
    }

    /// Boots a node that was killed, with the state it has on disk.
    pub fn start(&mut self) -> Result<()> {
        if self.holder.is_some() {
            bail!("node {} runs already", self.name);
        }
        self.boot_corosync()?;
        self.boot_pacemaker()
    }

    /// Waits until this node's Pacemaker sees `nodes` online (and a DC).
    pub fn wait_online(&self, nodes: &[&str], within: Duration) -> Result<()> {
        let deadline = Instant::now() + within;
        loop {
            if let Ok(out) = self.run("crm_mon", &["-1", "--output-as=xml"]) {
                let xml = String::from_utf8_lossy(&out.stdout);
                let online = nodes
                    .iter()
                    .all(|n| xml.contains(&format!("name=\"{n}\" id=")) && node_online(&xml, n));
                if out.status.success() && online && xml.contains("current_dc present=\"true\"") {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                let mon = self
                    .run("crm_mon", &["-1"])
                    .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                    .unwrap_or_default();
                bail!(
                    "nodes {nodes:?} not online from {} in {within:?}:\n{mon}",
                    self.name
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Ends everything running in this node's namespaces (SIGKILL, by
    /// PID): what a power loss does to its daemons.
    pub fn kill(&mut self) {
        let Some(mut holder) = self.holder.take() else {
            return;
        };
        let mnt = std::fs::metadata(format!("/proc/{}/ns/mnt", holder.id())).map(|m| m.ino());
        let ours = std::fs::metadata("/proc/self/ns/mnt").map(|m| m.ino());
        // Only a namespace of the node's own: never this process's.
        if let (Ok(mnt), Ok(ours)) = (mnt, ours)
            && mnt != ours
        {
            for pid in pids_in_mount_ns(mnt) {
                // SAFETY: kill(2) with a PID of a process in our own
                // namespace; no memory is touched.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
        }
        let _ = holder.kill();
        let _ = holder.wait();
    }

    pub fn is_up(&self) -> bool {
        self.holder.is_some()
    }

    pub fn pacemaker_log(&self) -> String {
        std::fs::read_to_string(self.pacemaker_log_path()).unwrap_or_default()
    }

    pub fn pacemaker_log_path(&self) -> PathBuf {
        self.dir.join("log-pacemaker/pacemaker.log")
    }

    pub fn corosync_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("log-corosync/corosync.log")).unwrap_or_default()
    }

    /// Makes `/run/AT` a symlink to `target` in this node, now and at
    /// every boot (e.g. the remus agent's socket at its default path).
    pub fn link_in_run(&mut self, at: &str, target: &Path) -> Result<()> {
        let path = self.dir.join("run").join(at);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let _ = std::fs::remove_file(&path);
        std::os::unix::fs::symlink(target, &path)?;
        self.run_links.push((at.into(), target.to_path_buf()));
        Ok(())
    }
}

/// Whether `crm_mon --output-as=xml` says node `name` is online.
fn node_online(xml: &str, name: &str) -> bool {
    xml.lines()
        .find(|l| l.contains("<node ") && l.contains(&format!("name=\"{name}\"")))
        .is_some_and(|l| l.contains("online=\"true\""))
}

/// The processes whose mount namespace is `mnt`.
fn pids_in_mount_ns(mnt: u64) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::metadata(format!("/proc/{pid}/ns/mnt")).is_ok_and(|m| m.ino() == mnt)
        })
        .collect()
}
