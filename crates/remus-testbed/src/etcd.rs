//! A real etcd cluster for tests: one to a few members on one address,
//! each with its own ports and data directory, started with the Debian
//! package's `etcd` (`scripts/install-deps.sh` installs it) and ended by
//! PID. Election timing is shortened (heartbeat 50 ms, election 300 ms) so
//! that a dead leader is replaced in well under a second.
//!
//! By default clients talk plain http and etcd asks nobody who they are.
//! [`EtcdOptions`] turns on, separately or together, client TLS with
//! client certificates (certificates made at start, [`TestPki`]) and
//! user/password authentication (users with a role each, limited to a
//! key prefix). Peers always talk plain http among themselves: the tests
//! are about what clients see.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::pki::TestPki;
use crate::{Netns, free_port};

/// How to start an [`EtcdCluster`]; the default is plain http without
/// authentication.
#[derive(Debug, Clone, Default)]
pub struct EtcdOptions {
    /// Client URLs are https, with a server certificate for the listen
    /// IP made by a fresh test CA, and etcd refuses clients without a
    /// certificate from that CA (`--client-cert-auth`).
    pub tls: bool,
    /// Users to create (each with a role of its own) before
    /// authentication is turned on; `Some` turns it on, with a root user
    /// whose password only the cluster knows.
    pub auth: Option<Vec<EtcdUser>>,
    /// How long a login token lives unused (etcd's `--auth-token-ttl`,
    /// 300 s by default).
    pub auth_token_ttl: Option<Duration>,
}

/// An etcd user made for a test, with read and write rights on the keys
/// starting with `prefix` and nothing else (role `NAME-role`).
#[derive(Clone)]
pub struct EtcdUser {
    pub name: String,
    pub password: String,
    pub prefix: String,
}

impl std::fmt::Debug for EtcdUser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdUser")
            .field("name", &self.name)
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl EtcdUser {
    /// A user `name` limited to `prefix`, with a random password.
    pub fn new(name: &str, prefix: &str) -> EtcdUser {
        EtcdUser {
            name: name.to_string(),
            password: random_hex(16),
            prefix: prefix.to_string(),
        }
    }
}

/// `n` random bytes as hex (from the kernel).
fn random_hex(n: usize) -> String {
    use std::io::Read;
    let mut b = vec![0u8; n];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .expect("read /dev/urandom");
    b.iter().map(|x| format!("{x:02x}")).collect()
}

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
    pki: Option<TestPki>,
    token_ttl: Option<Duration>,
    /// Set once authentication is on: etcdctl then logs in as root.
    root_password: Option<String>,
    dir: tempfile::TempDir,
}

impl EtcdCluster {
    /// Starts `n` members listening on `ip` (IPv4 or IPv6; in `netns`,
    /// if given) and waits until every one reports healthy.
    pub fn start(n: usize, ip: &str, netns: Option<&Netns>) -> Result<EtcdCluster> {
        Self::start_with(n, ip, netns, &EtcdOptions::default())
    }

    /// [`EtcdCluster::start`] with TLS and/or authentication as `opts`
    /// says. With authentication, returns once it is on.
    pub fn start_with(
        n: usize,
        ip: &str,
        netns: Option<&Netns>,
        opts: &EtcdOptions,
    ) -> Result<EtcdCluster> {
        let dir = tempfile::tempdir().context("etcd temp dir")?;
        let pki = if opts.tls {
            let addr = ip
                .parse()
                .with_context(|| format!("TLS needs an IP address to listen on, not {ip}"))?;
            Some(TestPki::generate(&dir.path().join("pki"), &[addr])?)
        } else {
            None
        };
        let scheme = if opts.tls { "https" } else { "http" };
        // An IPv6 address goes in brackets in a URL.
        let host = if ip.contains(':') {
            format!("[{ip}]")
        } else {
            ip.to_string()
        };
        let members: Vec<Member> = (0..n)
            .map(|i| Member {
                name: format!("m{i}"),
                client_url: format!("{scheme}://{host}:{}", free_port()),
                peer_url: format!("http://{host}:{}", free_port()),
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
            token_ttl: opts.auth_token_ttl,
            initial_cluster,
            token: format!("remus-test-{}", std::process::id()),
            netns: netns.map(|n| n.name.clone()),
            pki,
            root_password: None,
            dir,
        };
        for i in 0..n {
            c.spawn(i)?;
        }
        for i in 0..n {
            c.wait_healthy(i, Duration::from_secs(30))?;
        }
        if let Some(users) = &opts.auth {
            c.enable_auth(users)?;
        }
        Ok(c)
    }

    /// Creates root and `users` (each with a role limited to its prefix),
    /// then turns authentication on.
    fn enable_auth(&mut self, users: &[EtcdUser]) -> Result<()> {
        let root = random_hex(16);
        self.ctl(&["user", "add", "root", "--interactive=false"], Some(&root))?;
        self.ctl(&["user", "grant-role", "root", "root"], None)?;
        for u in users {
            let role = format!("{}-role", u.name);
            self.ctl(&["role", "add", &role], None)?;
            self.ctl(
                &[
                    "role",
                    "grant-permission",
                    &role,
                    "readwrite",
                    &u.prefix,
                    "--prefix=true",
                ],
                None,
            )?;
            self.ctl(
                &["user", "add", &u.name, "--interactive=false"],
                Some(&u.password),
            )?;
            self.ctl(&["user", "grant-role", &u.name, &role], None)?;
        }
        self.ctl(&["auth", "enable"], None)?;
        self.root_password = Some(root);
        Ok(())
    }

    /// etcdctl (API v3) against member `i`, with the test's admin
    /// certificate when TLS is on and as root when authentication is.
    /// The root password goes in the environment, not the command line.
    fn etcdctl(&self, i: usize) -> Command {
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "etcdctl"]);
                c
            }
            None => Command::new("etcdctl"),
        };
        cmd.env("ETCDCTL_API", "3")
            .arg("--endpoints")
            .arg(&self.members[i].client_url);
        if let Some(pki) = &self.pki {
            cmd.arg("--cacert")
                .arg(&pki.ca)
                .arg("--cert")
                .arg(&pki.admin.cert)
                .arg("--key")
                .arg(&pki.admin.key);
        }
        if let Some(pw) = &self.root_password {
            cmd.env("ETCDCTL_USER", format!("root:{pw}"));
        }
        cmd
    }

    /// Runs etcdctl with `args` against the first live member (see
    /// [`EtcdCluster::etcdctl`]), `stdin` fed to it; returns its output.
    pub fn ctl(&self, args: &[&str], stdin: Option<&str>) -> Result<String> {
        let i = (0..self.members.len())
            .find(|&i| self.members[i].child.is_some())
            .context("no etcd member is running")?;
        let mut child = self
            .etcdctl(i)
            .arg("--command-timeout=5s")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("start etcdctl")?;
        let mut input = child.stdin.take().expect("piped stdin");
        if let Some(text) = stdin {
            input
                .write_all(format!("{text}\n").as_bytes())
                .context("etcdctl stdin")?;
        }
        drop(input);
        let out = child.wait_with_output().context("etcdctl")?;
        if !out.status.success() {
            bail!(
                "etcdctl {} failed ({}): {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
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
            .args(["--heartbeat-interval", "50", "--election-timeout", "300"]);
        if let Some(ttl) = self.token_ttl {
            cmd.arg(format!("--auth-token-ttl={}", ttl.as_secs().max(1)));
        }
        if let Some(pki) = &self.pki {
            cmd.arg("--cert-file")
                .arg(&pki.server.cert)
                .arg("--key-file")
                .arg(&pki.server.key)
                .arg("--trusted-ca-file")
                .arg(&pki.ca)
                .arg("--client-cert-auth");
        }
        cmd.stdin(Stdio::null())
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
            let ok = self
                .etcdctl(i)
                .args(["--command-timeout=1s", "endpoint", "health"])
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

    /// The certificates, when the cluster talks TLS.
    pub fn pki(&self) -> Option<&TestPki> {
        self.pki.as_ref()
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
