//! Test and demo support: real agents, real guests, hosts as network
//! namespaces, all cleaned up on drop, even when a test fails.
//!
//! Only processes this module started are ended, by their PID.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

pub mod bootdisk;
pub mod etcd;
pub mod lan;
pub mod pacemaker;
pub mod pki;
pub mod seqclient;
pub mod watch;

pub use lan::{HostKind, HostSpec, Lan};
pub use seqclient::SeqClient;

/// The workspace root (from this crate's manifest location).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// The guest image (kernel + initramfs) built by `scripts/build-guest.sh`.
#[derive(Debug, Clone)]
pub struct GuestImage {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

impl GuestImage {
    /// Finds the built image, or says how to build it.
    /// Where the built image lives (`REMUS_GUEST_IMAGE`, else
    /// `target/guest-image`).
    pub fn dir() -> PathBuf {
        std::env::var_os("REMUS_GUEST_IMAGE")
            .map(PathBuf::from)
            .unwrap_or_else(|| workspace_root().join("target/guest-image"))
    }

    pub fn find() -> Result<GuestImage> {
        let dir = Self::dir();
        // The uncompressed kernel boots much faster under TCG (QEMU's PVH
        // entry, no decompression in emulated code).
        let vmlinux = dir.join("vmlinux");
        let img = GuestImage {
            kernel: if vmlinux.exists() {
                vmlinux
            } else {
                dir.join("vmlinuz")
            },
            initrd: dir.join("initrd.img"),
        };
        if !img.kernel.exists() || !img.initrd.exists() {
            bail!(
                "guest image not found in {} — build it with scripts/build-guest.sh (scripts/test.sh does this first)",
                dir.display()
            );
        }
        Ok(img)
    }

    /// A VM config (TOML) that boots from its first disk through the
    /// firmware (no kernel): `disk` (of `format`) is vda.
    pub fn disk_boot_config(name: &str, disk: &Path, format: &str, extra_toml: &str) -> String {
        format!(
            "name = \"{name}\"\nmemory = 256\nvcpus = 1\naccel = \"auto\"\n{extra_toml}\n[[disk]]\npath = \"{}\"\ntarget = \"vda\"\nformat = \"{format}\"\n",
            disk.display()
        )
    }

    /// A VM config (TOML) booting this image.
    pub fn config(&self, name: &str, cmdline_extra: &str, extra_toml: &str) -> String {
        format!(
            "name = \"{name}\"\nmemory = 256\nvcpus = 1\naccel = \"auto\"\nkernel = \"{}\"\ninitrd = \"{}\"\ncmdline = \"console=ttyS0 quiet {cmdline_extra}\"\n{extra_toml}",
            self.kernel.display(),
            self.initrd.display()
        )
    }
}

/// A network namespace the test created; deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    /// Creates `remus-<tag>-<pid>` with loopback up and no routes out.
    pub fn new(tag: &str) -> Result<Netns> {
        let name = format!("remus-{tag}-{}", std::process::id());
        let _ = run("ip", &["netns", "del", &name]);
        run("ip", &["netns", "add", &name])?;
        let ns = Netns { name };
        ns.exec_ok("ip", &["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Runs a command inside the namespace.
    pub fn exec(&self, prog: &str, args: &[&str]) -> Result<Output> {
        let mut a = vec!["netns", "exec", &self.name, prog];
        a.extend_from_slice(args);
        Command::new("ip")
            .args(&a)
            .output()
            .with_context(|| format!("ip netns exec {} {prog}", self.name))
    }

    /// Runs a command inside the namespace; an error unless it succeeds.
    pub fn exec_ok(&self, prog: &str, args: &[&str]) -> Result<String> {
        let out = self.exec(prog, args)?;
        if !out.status.success() {
            bail!(
                "in {}: {prog} {}: {}",
                self.name,
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Adds a bridge with an address (from 198.18.0.0/15) inside.
    pub fn add_bridge(&self, bridge: &str, cidr: &str) -> Result<()> {
        self.exec_ok("ip", &["link", "add", bridge, "type", "bridge"])?;
        self.exec_ok("ip", &["addr", "add", cidr, "dev", bridge])?;
        self.exec_ok("ip", &["link", "set", bridge, "up"])?;
        Ok(())
    }

    /// A `Command` that runs inside the namespace.
    pub fn command(&self, prog: &Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(prog);
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = run("ip", &["netns", "del", &self.name]);
    }
}

fn run(prog: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(prog)
        .args(args)
        .output()
        .with_context(|| format!("run {prog}"))?;
    if !out.status.success() {
        bail!(
            "{prog} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Paths to the project's binaries (tests pass `env!("CARGO_BIN_EXE_…")`).
#[derive(Debug, Clone)]
pub struct Binaries {
    pub remus: PathBuf,
    pub remusd: PathBuf,
}

impl Binaries {
    /// `remus` and `remusd` next to the running executable (a tool built
    /// in the same profile, e.g. target/release), or a clear error.
    pub fn next_to_exe() -> Result<Binaries> {
        let exe = std::env::current_exe().context("current_exe")?;
        let dir = exe.parent().context("executable has no directory")?;
        let bins = Binaries {
            remus: dir.join("remus"),
            remusd: dir.join("remusd"),
        };
        for p in [&bins.remus, &bins.remusd] {
            if !p.exists() {
                bail!(
                    "{} not found: build the workspace in the same profile first (cargo build --release --workspace)",
                    p.display()
                );
            }
        }
        Ok(bins)
    }
}

/// Where test agents keep guest RAM: tmpfs, the agent's default RAM
/// directory. A RAM file on a disk filesystem (Debian's /tmp) would make
/// every device-state save, every backup write and every guest page fault
/// pay for the filesystem, and measure what no install runs.
pub const RAM_DIR_PARENT: &str = "/dev/shm";

/// A private directory for guest RAM under [`RAM_DIR_PARENT`], removed on
/// drop: a test agent's `--ram-dir`, or the bench's QEMU run alone.
pub fn ram_tempdir() -> Result<tempfile::TempDir> {
    tempfile::Builder::new()
        .prefix("remus-t")
        .tempdir_in(RAM_DIR_PARENT)
        .with_context(|| format!("a RAM directory in {RAM_DIR_PARENT}"))
}

/// A running `remusd` with its own state dir and socket; stopped on drop,
/// and any QEMU it started is killed by PID if it outlives it.
pub struct Agent {
    pub bins: Binaries,
    pub dir: tempfile::TempDir,
    /// The agent's `--ram-dir`: on tmpfs (`/dev/shm`), where the agent
    /// keeps guest RAM by default, not on the disk /tmp may be.
    pub ram_dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    pub log: PathBuf,
    child: Option<Child>,
    /// The command (program, arguments) and extra agent arguments it was
    /// started with, for [`Agent::restart`].
    launch: (std::ffi::OsString, Vec<std::ffi::OsString>),
    extra: Vec<String>,
}

impl Agent {
    /// Starts an agent on this host (optionally inside `netns`), waiting
    /// until it answers.
    pub fn start(bins: &Binaries, netns: Option<&Netns>, extra: &[&str]) -> Result<Agent> {
        let cmd = match netns {
            Some(ns) => ns.command(&bins.remusd),
            None => Command::new(&bins.remusd),
        };
        Self::start_with(bins, cmd, extra)
    }

    /// Starts an agent in a mount namespace of its own in which `over` is
    /// bind-mounted on `path`: the agent sees another file there, as a
    /// second host would. (`unshare` and `sh` exec in place, so the PID is
    /// the agent's.)
    pub fn start_seeing(
        bins: &Binaries,
        path: &Path,
        over: &Path,
        extra: &[&str],
    ) -> Result<Agent> {
        let (mount, bind) = (OsStr::new("mount"), OsStr::new("--bind"));
        Self::start_in_mount_ns(
            bins,
            &[&[mount, bind, over.as_os_str(), path.as_os_str()]],
            extra,
        )
    }

    /// Starts an agent in a mount namespace of its own after running each
    /// command of `mounts` there (e.g. `mount -t tmpfs -o size=8m tmpfs
    /// DIR`, or a read-only bind): the agent sees the storage a second host
    /// would.
    pub fn start_in_mount_ns(
        bins: &Binaries,
        mounts: &[&[&OsStr]],
        extra: &[&str],
    ) -> Result<Agent> {
        Self::start_in(bins, None, mounts, extra)
    }

    /// [`start_in_mount_ns`](Self::start_in_mount_ns), inside `netns` when
    /// given: a host with both its own network and its own storage.
    pub fn start_in(
        bins: &Binaries,
        netns: Option<&Netns>,
        mounts: &[&[&OsStr]],
        extra: &[&str],
    ) -> Result<Agent> {
        // sh -c '"$1" "$2" ... && ... && shift N && exec "$@"': every word is
        // passed positionally, never spliced into the script.
        let mut script = String::new();
        let mut args: Vec<&OsStr> = Vec::new();
        for command in mounts {
            for w in *command {
                args.push(w);
                script.push_str(&format!("\"${{{}}}\" ", args.len()));
            }
            script.push_str("&& ");
        }
        script.push_str(&format!("shift {} && exec \"$@\"", args.len()));
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", &ns.name, "unshare"]);
                c
            }
            None => Command::new("unshare"),
        };
        cmd.args(["--mount", "--propagation", "private", "sh", "-c"])
            .arg(&script)
            .arg("sh")
            .args(&args)
            .arg(&bins.remusd);
        Self::start_with(bins, cmd, extra)
    }

    fn start_with(bins: &Binaries, cmd: Command, extra: &[&str]) -> Result<Agent> {
        let dir = tempfile::Builder::new()
            .prefix("remus-t")
            .tempdir_in("/tmp")?;
        let ram_dir = ram_tempdir()?;
        // In a directory the agent creates (and so makes its own).
        let socket = dir.path().join("run/a.sock");
        let state_dir = dir.path().join("st");
        let log = dir.path().join("remusd.log");
        std::fs::File::create(&log)?;
        let mut agent = Agent {
            bins: bins.clone(),
            dir,
            ram_dir,
            socket,
            state_dir,
            log,
            child: None,
            launch: (
                cmd.get_program().to_owned(),
                cmd.get_args().map(ToOwned::to_owned).collect(),
            ),
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        agent.spawn()?;
        Ok(agent)
    }

    /// Starts the agent process on this agent's state dir, socket and
    /// namespaces, and waits until it answers (its log is appended to).
    fn spawn(&mut self) -> Result<()> {
        let mut cmd = Command::new(&self.launch.0);
        cmd.args(&self.launch.1)
            // Never the host's /etc/remus/remusd.toml: a test's agent is
            // exactly what the test says.
            .args(["--config", "/dev/null"])
            .arg("--state-dir")
            .arg(&self.state_dir)
            .arg("--socket")
            .arg(&self.socket)
            .arg("--ram-dir")
            .arg(self.ram_dir.path());
        // What a test host keeps for its peers: the guest image as its
        // boot files (peers name the kernel and initrd by file name), the
        // tests' bridges, and no placement files but the test's own.
        let given = |flag: &str| self.extra.iter().any(|a| a == flag);
        if !given("--boot-dir") {
            cmd.arg("--boot-dir").arg(GuestImage::dir());
        }
        if !given("--peer-bridges") {
            cmd.args(["--peer-bridges", "br0,br1"]);
        }
        if !given("--vm-config-dir") {
            cmd.arg("--vm-config-dir").arg(self.dir.path().join("vms"));
        }
        // A test's agent takes its VMs with it when it stops, unless the
        // test says otherwise (the restart tests keep them, as the agent
        // does by default).
        // (An agent of an earlier version, run by the compatibility test,
        // has no such flag and always did that.)
        if !given("--on-stop") && takes_flag(&self.bins.remusd, "--on-stop") {
            cmd.args(["--on-stop", "destroy"]);
        }
        cmd.args(&self.extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::OpenOptions::new().append(true).open(&self.log)?);
        let _ = std::fs::remove_file(&self.socket);
        self.child = Some(cmd.spawn().context("start remusd")?);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if std::os::unix::net::UnixStream::connect(&self.socket).is_ok() {
                return Ok(());
            }
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(st)) = c.try_wait()
            {
                bail!("remusd exited at start ({st}): {}", self.log_text());
            }
            if Instant::now() > deadline {
                bail!("remusd did not answer within 20 s: {}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts the agent again, on the same state dir, socket, namespaces
    /// and arguments, after [`kill_hard`](Self::kill_hard) or
    /// [`stop`](Self::stop): a host coming back after a crash.
    pub fn restart(&mut self) -> Result<()> {
        if self.child.is_some() {
            bail!("the agent still runs; kill or stop it first");
        }
        self.spawn()
    }

    /// The agent's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last `disk sync plan` line of this agent's log (it logs one as
    /// either side of a session that syncs disks); fails the test with
    /// the log if there is none.
    pub fn last_sync_plan(&self) -> String {
        self.last_log_line("disk sync plan")
    }

    /// The last line of this agent's log that contains `what`; fails the
    /// test with the log if there is none.
    pub fn last_log_line(&self, what: &str) -> String {
        let log = self.log_text();
        log.lines()
            .rfind(|l| l.contains(what))
            .map(str::to_string)
            .unwrap_or_else(|| panic!("no {what:?} in the agent's log:\n{log}"))
    }

    /// Runs the CLI against this agent.
    pub fn cli(&self, args: &[&str]) -> CliOutput {
        self.cli_stdin(args, None)
    }

    /// Runs the CLI with `input` on its standard input.
    pub fn cli_stdin(&self, args: &[&str], input: Option<&[u8]>) -> CliOutput {
        cli(&self.bins.remus, &self.socket, args, input)
    }

    /// Writes a file in the agent's temp dir.
    pub fn write_file(&self, name: &str, contents: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::write(&p, contents).expect("write test file");
        p
    }

    /// The console output of `vm` so far.
    pub fn console(&self, vm: &str) -> String {
        self.cli(&["console", "--dump", vm]).stdout
    }

    /// Waits until the console output satisfies `pred`.
    pub fn wait_console(
        &self,
        vm: &str,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&str) -> bool,
    ) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let text = self.console(vm);
            if pred(&text) {
                return Ok(text);
            }
            if Instant::now() > deadline {
                let tail: Vec<&str> = text.lines().rev().take(15).collect();
                bail!(
                    "timed out after {timeout:?} waiting for {what} on {vm}'s console; last lines:\n{}",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
            // The console log has no change notification over the API;
            // poll it at a modest rate.
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `list --json` as values.
    pub fn list(&self) -> Vec<serde_json::Value> {
        let out = self.cli(&["list", "--json"]);
        serde_json::from_str(&out.stdout).unwrap_or_default()
    }

    /// One VM's entry in `list --json`, if listed.
    pub fn vm(&self, name: &str) -> Option<serde_json::Value> {
        self.list().into_iter().find(|v| v["name"] == name)
    }

    /// Waits until this agent (a backup) runs `vm` as its own copy (role
    /// `unprotected`, state `r` or `b`), i.e. has failed over; returns the
    /// ms since `since` (when the primary was killed). An error after
    /// `timeout` gives the last listing and the agent's log.
    pub fn wait_failover(&self, vm: &str, since: Instant, timeout: Duration) -> Result<u64> {
        loop {
            let v = self.vm(vm);
            if let Some(v) = &v
                && v["role"] == "unprotected"
                && (v["state"] == "r" || v["state"] == "b")
            {
                return Ok(since.elapsed().as_millis() as u64);
            }
            if since.elapsed() > timeout {
                bail!(
                    "no failover of {vm} within {timeout:?}: {v:?}\n{}",
                    self.log_text()
                );
            }
            // Agent state has no change notification; poll the API.
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The PIDs of QEMU processes (VMs and qemu-storage-daemons) this
    /// agent started and that still run.
    pub fn qemu_pids(&self) -> Vec<u32> {
        let mut pids = Vec::new();
        let vms = std::fs::read_dir(self.state_dir.join("vms"));
        for vm in vms.into_iter().flatten().flatten() {
            // qemu.pid, and qsd-TARGET.pid of each qemu-storage-daemon.
            for f in std::fs::read_dir(vm.path()).into_iter().flatten().flatten() {
                let name = f.file_name();
                let name = name.to_string_lossy();
                if name != "qemu.pid" && !(name.starts_with("qsd-") && name.ends_with(".pid")) {
                    continue;
                }
                if let Some(pid) = std::fs::read_to_string(f.path())
                    .ok()
                    .and_then(|s| s.trim().parse().ok())
                    && process_alive(pid)
                {
                    pids.push(pid);
                }
            }
        }
        pids
    }

    /// Stops the agent (SIGTERM: it destroys its VMs), then kills by PID
    /// anything it left.
    pub fn stop(&mut self) {
        let leftovers = self.qemu_pids();
        if let Some(mut c) = self.child.take() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(15);
            loop {
                match c.try_wait() {
                    Ok(Some(_)) => break,
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(20))
                    }
                    _ => {
                        let _ = c.kill();
                        let _ = c.wait();
                        break;
                    }
                }
            }
        }
        // What it listed before it stopped, and what it may have started
        // while stopping (a standby whose session came in at that moment).
        let mut all = leftovers;
        all.extend(self.qemu_pids());
        for pid in all {
            if process_alive(pid) {
                // SAFETY: a QEMU this agent started (pid from its own
                // state dir, checked alive just now).
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            }
        }
    }

    /// Stops the agent process alone (SIGTERM) and waits until it has
    /// exited: with `--on-stop keep`, its VMs run on for
    /// [`restart`](Self::restart) to adopt.
    pub fn stop_agent_only(&mut self) -> Result<()> {
        let Some(mut c) = self.child.take() else {
            bail!("the agent does not run");
        };
        // SAFETY: signalling our own child.
        unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(st) = c.try_wait()? {
                if !st.success() {
                    bail!("remusd exited with {st}: {}", self.log_text());
                }
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                bail!("remusd did not stop within 60 s: {}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL of the agent process alone: an agent crash, its QEMUs
    /// untouched.
    pub fn kill_agent_only(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Pulls the plug: SIGKILL of the agent and of every QEMU it started,
    /// with no chance to say goodbye to a peer.
    pub fn kill_hard(&mut self) {
        let qemus = self.qemu_pids();
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        for pid in qemus {
            // SAFETY: a QEMU this agent started (pid from its state dir).
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        }
    }

    /// Freezes the host: SIGSTOP of the agent and its QEMUs. Their sockets
    /// stay open but say nothing, as with a hung host or a silent link.
    /// `kill_hard` (or drop) ends them later.
    pub fn freeze(&mut self) {
        let mut pids = self.qemu_pids();
        pids.extend(self.child.as_ref().map(Child::id));
        for pid in pids {
            // SAFETY: processes this agent (or this test) started.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGSTOP) };
        }
    }

    /// Lets what [`Agent::freeze`] stopped run again.
    pub fn thaw(&mut self) {
        let mut pids = self.qemu_pids();
        pids.extend(self.child.as_ref().map(Child::id));
        for pid in pids {
            // SAFETY: processes this agent (or this test) started.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGCONT) };
        }
    }

    /// The agent's own PID (when started directly, not via `ip netns exec`
    /// which execs in place, so the PID is the same).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The `remus` and `remusd` binaries cargo built for the calling
/// integration-test crate (`env!` is read there).
#[macro_export]
macro_rules! test_bins {
    () => {
        $crate::Binaries {
            remus: std::path::PathBuf::from(env!("CARGO_BIN_EXE_remus")),
            remusd: std::path::PathBuf::from(env!("CARGO_BIN_EXE_remusd")),
        }
    };
}

/// A cheap pseudo-random delay in `0..max_ms` for a test's random
/// moments, different per `seed` and per call time (no extra crate).
pub fn jitter(seed: u64, max_ms: u64) -> u64 {
    let x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(now_ms().wrapping_mul(1442695040888963407));
    (x >> 33) % max_ms.max(1)
}

/// Writes a fresh 32-byte replication key into `dir` and returns its path.
pub fn write_key(dir: &Path) -> PathBuf {
    use std::io::Read;
    let mut key = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut key))
        .expect("read /dev/urandom");
    let path = dir.join("remus.key");
    std::fs::write(&path, key).expect("write key");
    let _ = std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600));
    path
}

/// A TCP port on loopback that was free a moment ago, and never handed
/// out before in this process: the kernel may give a port it just gave
/// (and which is free again until its user binds it) to the next caller,
/// and an etcd cluster once got the same port for two members.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("free port");
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// `remus protect --json` running in the background, read event by event.
pub struct ProtectFollower {
    child: Child,
    /// Lines of the CLI's stdout, read on a thread of their own so that a
    /// wait for the next one has a deadline.
    lines: std::sync::mpsc::Receiver<String>,
    /// The longest [`ProtectFollower::next_event`] waits for a line.
    patience: Duration,
}

/// How long a follower waits for the next event by default: a session
/// sends a checkpoint event every interval, and every step a test waits
/// for (a lost backup, a failover) comes within seconds; a silent CLI
/// for this long is a hang, reported as such instead of eating the suite.
pub const FOLLOW_PATIENCE: Duration = Duration::from_secs(180);

impl ProtectFollower {
    /// Starts protecting `vm` on `agent` to `peer` with extra `args`
    /// (e.g. `-i 100 --timeout 1000`), following the events. By hand
    /// (`--manual`): the test drives every step, and no agent sets up a
    /// session by itself meanwhile; [`ProtectFollower::start_healing`]
    /// for protection the agents keep up themselves.
    pub fn start(agent: &Agent, vm: &str, peer: &str, args: &[&str]) -> Result<ProtectFollower> {
        let mut all = vec!["--manual"];
        all.extend_from_slice(args);
        Self::start_healing(agent, vm, peer, &all)
    }

    /// As [`ProtectFollower::start`], without `--manual`: the protection
    /// is wanted, and the agents set it up again when it is lost.
    pub fn start_healing(
        agent: &Agent,
        vm: &str,
        peer: &str,
        args: &[&str],
    ) -> Result<ProtectFollower> {
        use std::io::BufRead;
        let mut child = Command::new(&agent.bins.remus)
            .arg("--socket")
            .arg(&agent.socket)
            .arg("protect")
            .args(args)
            .args(["--json", vm, peer])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("run remus protect")?;
        let out = child.stdout.take().context("protect stdout")?;
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("protect-follow".into())
            .spawn(move || {
                for line in std::io::BufReader::new(out).lines() {
                    let Ok(line) = line else { break };
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            })
            .context("start the follower's reader")?;
        Ok(ProtectFollower {
            child,
            lines,
            patience: FOLLOW_PATIENCE,
        })
    }

    /// Sets how long each wait for an event may take (default
    /// [`FOLLOW_PATIENCE`]).
    pub fn patience(mut self, patience: Duration) -> ProtectFollower {
        self.patience = patience;
        self
    }

    /// The next event; an error when the stream ends (with the CLI's
    /// stderr, which says why) or when no event came within the
    /// follower's patience (the CLI is then killed, so its stderr ends).
    pub fn next_event(&mut self) -> Result<serde_json::Value> {
        use std::io::Read;
        use std::sync::mpsc::RecvTimeoutError;
        let why = match self.lines.recv_timeout(self.patience) {
            Ok(line) => {
                return serde_json::from_str(&line)
                    .with_context(|| format!("bad event line: {line}"));
            }
            Err(RecvTimeoutError::Disconnected) => "protect output ended".to_string(),
            Err(RecvTimeoutError::Timeout) => {
                let _ = self.child.kill();
                format!(
                    "no event from remus protect in {:?} (killed it)",
                    self.patience
                )
            }
        };
        let mut err = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        bail!("{why}: {}", err.trim())
    }

    /// Waits for the next event named `name` (failing on `backup_lost` or
    /// `failed` unless that is the one asked for).
    pub fn event(&mut self, name: &str) -> Result<serde_json::Value> {
        loop {
            let ev = self.next_event()?;
            if ev["event"] == name {
                return Ok(ev);
            }
            if ev["event"] == "backup_lost" || ev["event"] == "failed" {
                bail!("protection ended while waiting for {name}: {ev}");
            }
        }
    }

    /// Waits for a committed checkpoint whose pause began after `after_ms`
    /// (Unix ms); fails on `backup_lost`.
    pub fn checkpoint_after(&mut self, after_ms: u64) -> Result<serde_json::Value> {
        loop {
            let ev = self.next_event()?;
            if ev["event"] == "backup_lost" || ev["event"] == "failed" {
                bail!("protection ended: {ev}");
            }
            if ev["event"] == "checkpoint" && ev["taken_at_ms"].as_u64() > Some(after_ms) {
                return Ok(ev);
            }
        }
    }
}

impl Drop for ProtectFollower {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Two hosts on this machine for disk tests and benches: a shared key,
/// the primary's image directory, and the backup's own image directory
/// (`--image-dir`), where it keeps its copy of a VM `V`'s disk `T` as
/// `bdir/V/T.img` (see [`DiskHosts::backup_image`]), as a second host
/// would. The backup listens on a free loopback port.
pub struct DiskHosts {
    pub pdir: tempfile::TempDir,
    pub bdir: tempfile::TempDir,
    pub key: PathBuf,
    pub listen: String,
    _keydir: tempfile::TempDir,
}

impl DiskHosts {
    pub fn new() -> Result<DiskHosts> {
        let keydir = tempfile::tempdir()?;
        let key = write_key(keydir.path());
        Ok(DiskHosts {
            pdir: tempfile::tempdir_in("/tmp")?,
            bdir: tempfile::tempdir_in("/tmp")?,
            key,
            listen: format!("127.0.0.1:{}", free_port()),
            _keydir: keydir,
        })
    }

    /// The backup agent (listening, keeping its images in `bdir`).
    pub fn backup(&self, bins: &Binaries) -> Result<Agent> {
        self.backup_with(bins, &[])
    }

    /// The backup agent with more `remusd` arguments.
    pub fn backup_with(&self, bins: &Binaries, extra: &[&str]) -> Result<Agent> {
        let key = self.key.to_str().context("key path")?;
        let images = self.bdir.path().to_str().context("image dir")?;
        let mut args = vec![
            "--listen",
            &self.listen,
            "--key",
            key,
            "--image-dir",
            images,
        ];
        args.extend_from_slice(extra);
        Agent::start(bins, None, &args)
    }

    /// Where the backup keeps VM `vm`'s copy of disk `target` (its own
    /// image directory; the primary's path means nothing there). A test
    /// may put an image there before the first protect: the backup then
    /// syncs it (as raw) instead of creating one.
    pub fn backup_image(&self, vm: &str, target: &str) -> PathBuf {
        self.bdir.path().join(vm).join(format!("{target}.img"))
    }

    /// The primary agent.
    pub fn primary(&self, bins: &Binaries) -> Result<Agent> {
        let key = self.key.to_str().context("key path")?;
        Agent::start(bins, None, &["--key", key])
    }
}

/// Runs `prog` with `args` and returns its stdout and stderr; panics with
/// both when it fails (a tool a test relies on: qemu-img, mkfs, e2fsck).
pub fn run_ok<S: AsRef<OsStr>>(prog: &str, args: &[S]) -> String {
    let out = Command::new(prog)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{prog}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let shown: Vec<_> = args.iter().map(|a| a.as_ref().to_string_lossy()).collect();
    assert!(out.status.success(), "{prog} {shown:?}: {text}");
    text
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Output of one CLI run.
#[derive(Debug, Clone)]
pub struct CliOutput {
    pub ok: bool,
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

/// The longest one CLI call in a test may take (the longest legitimate
/// ones, a migration or a resync of a distribution's disk, take about a
/// minute here).
pub const CLI_PATIENCE: Duration = Duration::from_secs(600);

/// Runs the CLI against `socket` (killed after [`CLI_PATIENCE`]).
pub fn cli(remus: &Path, socket: &Path, args: &[&str], input: Option<&[u8]>) -> CliOutput {
    use std::io::Write;
    let mut cmd = Command::new(remus);
    cmd.arg("--socket")
        .arg(socket)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        });
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            return CliOutput {
                ok: false,
                code: None,
                stdout: String::new(),
                stderr: format!("cannot run remus: {e}"),
            };
        }
    };
    if let (Some(data), Some(mut stdin)) = (input, child.stdin.take()) {
        let _ = stdin.write_all(data);
    }
    // Both pipes drained on threads of their own, so that the wait below
    // can have a deadline: a CLI call that never returns (an agent that
    // stopped answering) fails its test instead of hanging the suite.
    let drain = |pipe: Option<Box<dyn std::io::Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut buf);
            }
            String::from_utf8_lossy(&buf).into_owned()
        })
    };
    let out = drain(child.stdout.take().map(|p| Box::new(p) as _));
    let err = drain(child.stderr.take().map(|p| Box::new(p) as _));
    let status = match wait_timeout::ChildExt::wait_timeout(&mut child, CLI_PATIENCE) {
        Ok(Some(status)) => Ok(status),
        Ok(None) => {
            let _ = child.kill();
            let _ = child.wait();
            Err(format!(
                "remus {} did not finish in {CLI_PATIENCE:?} (killed)",
                args.join(" ")
            ))
        }
        Err(e) => Err(e.to_string()),
    };
    let stdout = out.join().unwrap_or_default();
    let stderr = err.join().unwrap_or_default();
    match status {
        Ok(st) => CliOutput {
            ok: st.success(),
            code: st.code(),
            stdout,
            stderr,
        },
        Err(why) => CliOutput {
            ok: false,
            code: None,
            stdout,
            stderr: format!("{why}\n{stderr}"),
        },
    }
}

/// Whether a process exists (and is not a zombie).
pub fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => s
            .rsplit_once(')')
            .and_then(|(_, r)| r.trim_start().chars().next())
            .is_some_and(|st| st != 'Z'),
        Err(_) => false,
    }
}

/// The numbers `tick N` on a console, in order. A tick line may follow
/// other output that lacked a newline (the shell's prompt), so `tick N` is
/// taken from the end of each line.
pub fn ticks(console: &str) -> Vec<u64> {
    console
        .lines()
        .filter_map(|l| {
            let l = l.trim_end();
            let at = l.rfind("tick ")?;
            l[at + 5..].parse().ok()
        })
        .collect()
}

/// Asserts that the ticks on `console` go on from `before` (the last
/// tick seen where the guest ran until then) and follow each other: the
/// guest resumed from where it was, once.
pub fn assert_ticks_go_on(console: &str, before: u64) {
    let got = ticks(console);
    assert!(
        got.first().is_some_and(|&t| t >= before),
        "resumed after {before}: {got:?}"
    );
    assert!(got.windows(2).all(|w| w[1] == w[0] + 1), "{got:?}");
}

/// QEMU's RESUME timestamp (µs since the Unix epoch) of the last
/// switch-over in an agent's log (its `resumed_at_us` field).
pub fn resumed_at_us(log: &str) -> Option<u64> {
    let line = log
        .lines()
        .rfind(|l| l.contains("switch-over: VM resumed here"))?;
    let v = line.split_once("resumed_at_us=")?.1;
    v[..v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len())]
        .parse()
        .ok()
}

/// The last `tick N` on a console.
pub fn last_tick(console: &str) -> Option<u64> {
    ticks(console).last().copied()
}

/// The last `diskload: done K` on a console: the records the guest's
/// `diskload` workload has written so far (4 KiB each).
pub fn last_diskload_done(console: &str) -> Option<u64> {
    console
        .lines()
        .rev()
        .find_map(|l| l.rsplit_once("diskload: done ")?.1.trim().parse().ok())
}

/// The files of a two-host test: a replication key, the primary's image
/// directory holding a sparse raw disk `records.img`, and the backup's
/// store for its copies; all removed on drop.
pub struct PairFiles {
    pub key: PathBuf,
    pub images: PathBuf,
    pub store_b: PathBuf,
    pub disk: PathBuf,
    pub top: tempfile::TempDir,
    _key_dir: tempfile::TempDir,
}

impl PairFiles {
    /// Makes them, the disk `disk_bytes` long.
    pub fn new(disk_bytes: u64) -> PairFiles {
        let key_dir = tempfile::tempdir().expect("key dir");
        let key = write_key(key_dir.path());
        let top = tempfile::tempdir_in("/tmp").expect("test dir");
        let images = top.path().join("images");
        let store_b = top.path().join("b");
        for d in [&images, &store_b] {
            std::fs::create_dir_all(d).expect("test dirs");
        }
        let disk = images.join("records.img");
        std::fs::File::create(&disk)
            .and_then(|f| f.set_len(disk_bytes))
            .expect("disk image");
        PairFiles {
            key,
            images,
            store_b,
            disk,
            top,
            _key_dir: key_dir,
        }
    }
}

/// Whether the program at `bin` lists `flag` in its `--help` (asked once
/// per program).
pub fn takes_flag(bin: &Path, flag: &str) -> bool {
    static KNOWN: std::sync::Mutex<Vec<(PathBuf, String, bool)>> =
        std::sync::Mutex::new(Vec::new());
    let mut known = KNOWN.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, _, yes)) = known.iter().find(|(b, f, _)| b == bin && f == flag) {
        return *yes;
    }
    let yes = Command::new(bin)
        .arg("--help")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains(flag))
        .unwrap_or(false);
    known.push((bin.to_path_buf(), flag.to_string(), yes));
    yes
}

/// An agent on host `h` of `lan` that takes peers' sessions (`--listen`
/// on its LAN address at `port`), keeps their disks in `store`, with the
/// replication key `key` and `extra` arguments.
pub fn lan_agent(
    bins: &Binaries,
    lan: &Lan,
    (h, port): (&str, u16),
    store: &Path,
    key: &Path,
    extra: &[&str],
) -> Agent {
    let listen = format!("{}:{port}", lan.addr(h));
    let mut args = vec![
        "--key",
        key.to_str().expect("key path"),
        "--listen",
        &listen,
        "--image-dir",
        store.to_str().expect("store path"),
    ];
    args.extend_from_slice(extra);
    Agent::start(bins, Some(lan.host(h)), &args).unwrap_or_else(|e| panic!("agent on {h}: {e}"))
}

/// Asks the guest of [`start_records_vm`] to check every record it wrote
/// (its `diskload verify` line) and returns how many it checked; a failed
/// check fails the test with `what` and the guest's line.
pub fn records_intact(host: &Agent, vm: &str, what: &str) -> u64 {
    let before = host.console(vm).matches("diskload verify").count();
    let out = host.cli_stdin(&["console", vm], Some(b"\ntouch /run/diskload.verify\n"));
    assert!(out.ok, "{what}: console: {}", out.stderr);
    let text = host
        .wait_console(vm, Duration::from_secs(60), "diskload verify", |c| {
            c.matches("diskload verify").count() > before
        })
        .unwrap();
    let line = text
        .lines()
        .rev()
        .find(|l| l.contains("diskload verify"))
        .unwrap_or_default()
        .to_string();
    let n = line
        .split_once("diskload verify ok: ")
        .and_then(|(_, r)| r.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("{what}: {line}"));
    assert!(n > 0, "{what}: {line}");
    n
}

/// Polls `f` every 100 ms until it gives a value, failing the test with
/// `what` after `timeout` (for agent state, which has no change
/// notification to wait on).
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < timeout, "no {what} within {timeout:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The config of a guest that writes checked records to its disk `disk`
/// (as `vda`, `diskload` over 200 MiB, or what the disk holds) and serves
/// the TCP sequence session on `ip`:7000 from a NIC on `br0` with `mac`,
/// written to `agent`'s directory as `vm`.toml; its path.
pub fn records_vm_config(
    agent: &Agent,
    img: &GuestImage,
    vm: &str,
    (ip, mac): (&str, &str),
    disk: &Path,
) -> PathBuf {
    let region_mb =
        std::fs::metadata(disk).map_or(200, |m| (m.len() >> 20).saturating_sub(16).min(200));
    agent.write_file(
        &format!("{vm}.toml"),
        &img.config(
            vm,
            &format!(
                "remus.workload=tick,diskload:/dev/vda:--region-mb:{region_mb},seqserver remus.ip={ip}/24"
            ),
            &format!(
                "[[disk]]\npath = \"{}\"\ntarget = \"vda\"\n[[vif]]\nbridge = \"br0\"\nmac = \"{mac}\"\n",
                disk.display()
            ),
        ),
    )
}

/// Once `vm`'s sequence server (see [`records_vm_config`]) listens on
/// `host`, a [`SeqClient`] connected to it from `client` that has had its
/// first 50 lines.
pub fn connect_seq_client(host: &Agent, vm: &str, ip: &str, client: &Netns) -> SeqClient {
    host.wait_console(vm, Duration::from_secs(90), "seqserver", |c| {
        c.contains("seqserver: listening")
    })
    .unwrap();
    let c = SeqClient::start(
        client,
        format!("{ip}:7000").parse().unwrap(),
        Duration::from_millis(5),
    )
    .unwrap_or_else(|e| panic!("connect: {e}\n{}", host.console(vm)));
    c.wait_received(50, Duration::from_secs(30)).unwrap();
    c
}

/// A guest of [`records_vm_config`] created on `agent` as `vm`, with a
/// [`SeqClient`] connected from `client` that has had its first 50 lines.
/// What the tests of long-lived sessions (failovers, restarts) watch.
pub fn start_records_vm(
    agent: &Agent,
    img: &GuestImage,
    vm: &str,
    net: (&str, &str),
    disk: &Path,
    client: &Netns,
) -> SeqClient {
    let cfg = records_vm_config(agent, img, vm, net, disk);
    let out = agent.cli(&["create", cfg.to_str().unwrap()]);
    assert!(out.ok, "create: {}", out.stderr);
    connect_seq_client(agent, vm, net.0, client)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_resume_timestamp_is_read_from_the_last_switch_over_line() {
        let log = "2026-12-05T07:00:00Z  INFO remus_agent: switch-over: VM resumed here vm=a epoch=3 load_ms=1.9 resumed_at_us=1000\n\
                   2026-12-05T07:00:01Z  INFO remus_agent: something else resumed_at_us=5\n\
                   2026-12-05T07:00:02Z  INFO remus_agent: switch-over: VM resumed here vm=a epoch=9 load_ms=2.1 resumed_at_us=1764918000123456\n";
        assert_eq!(super::resumed_at_us(log), Some(1764918000123456));
        assert_eq!(
            super::resumed_at_us("switch-over: VM resumed here vm=a epoch=1 load_ms=2.0"),
            None
        );
        assert_eq!(super::resumed_at_us(""), None);
    }

    #[test]
    fn ticks_after_a_prompt_count() {
        let c = "tick 1\r\ntick 2\nremus-guest# \x1b[6ntick 3\nnot a tick 4x\ntick 5\n";
        assert_eq!(super::ticks(c), vec![1, 2, 3, 5]);
        assert_eq!(super::last_tick(c), Some(5));
    }
}
