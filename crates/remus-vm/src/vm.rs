//! One running VM: its QEMU process, QMP session, disk servers and NIC
//! relays, started together and torn down together.
//!
//! QEMU runs in the foreground, started by the agent in a process group of
//! its own, its stdout and stderr going straight to `qemu.log` (a
//! daemonized QEMU would lose them, and with them the reason a VM failed
//! to start). It outlives the agent: [`Vm::detach`] leaves it running and
//! the next agent [adopts](Vm::adopt) it, serving its disks, NICs and
//! console again at the same sockets, to which QEMU connects again by
//! itself. A watcher thread holds it by pidfd and records its exit, so the
//! VM's state can tell "QEMU died" from "QEMU is running".

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering::SeqCst;
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use remus_config::{DiskFormat, Firmware, VmConfig};
use remus_disk::DiskPort;
use remus_nbd::process::Proc;
use remus_nbd::{BlockBackend, FileBackend, NbdServer, NbdServerHandle, StorageDaemon};
use remus_net::{CommitEgress, InboundGate, OutputCommit, Relay, Tap};
use remus_qmp::{Qmp, QmpError};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::console::ConsoleHub;
use crate::paths::VmPaths;
use crate::qemu_args::{Launch, ResolvedAccel, qemu_args};
use crate::state::RunState;

/// How long QEMU may take to open its QMP socket.
const QMP_WAIT: Duration = Duration::from_secs(20);
/// How long `quit` may take before QEMU is killed.
const QUIT_WAIT: Duration = Duration::from_secs(5);

/// Errors from the VM supervisor, with the VM's name.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("VM '{vm}': {what}: {source}")]
    Io {
        vm: String,
        what: String,
        source: std::io::Error,
    },
    #[error("VM '{vm}': disk {target}: {reason}")]
    Disk {
        vm: String,
        target: String,
        reason: String,
    },
    #[error("VM '{vm}': vif {index} (bridge '{bridge}'): {reason}")]
    Vif {
        vm: String,
        index: usize,
        bridge: String,
        reason: String,
    },
    #[error("VM '{vm}': QEMU failed to start: {reason}{log}")]
    Start {
        vm: String,
        reason: String,
        log: String,
    },
    #[error("VM '{vm}': {source}")]
    Qmp { vm: String, source: QmpError },
    #[error("VM '{vm}': {msg}")]
    Invalid { vm: String, msg: String },
    #[error("VM '{vm}' is not running (QEMU exited: {status})")]
    Exited { vm: String, status: String },
}

/// Where QEMU lives and how to start it.
#[derive(Debug, Clone)]
pub struct QemuBinary {
    pub path: PathBuf,
    /// Extra environment for QEMU.
    pub env: Vec<(String, std::ffi::OsString)>,
    /// The dirty-tracking preload library QEMU is started with; without
    /// it a VM runs but cannot be protected or migrated.
    pub preload: Option<PathBuf>,
}

impl Default for QemuBinary {
    /// `qemu-system-x86_64` from `PATH`, with the preload found where a
    /// build or the package puts it.
    fn default() -> Self {
        QemuBinary {
            path: "qemu-system-x86_64".into(),
            env: Vec::new(),
            preload: remus_dirty::preload_path(),
        }
    }
}

/// What the agent decides for a VM it starts.
#[derive(Debug, Clone)]
pub struct StartOptions {
    pub qemu: QemuBinary,
    pub ram_file: PathBuf,
    pub accel: ResolvedAccel,
    /// Tap device names, one per vif.
    pub tap_names: Vec<String>,
    pub incoming: bool,
    /// With `incoming`: the standby loads device-only state (see
    /// [`crate::devstate`]).
    pub devices_only_state: bool,
}

/// How QEMU ended, once it has.
type ExitCell = Arc<(Mutex<Option<String>>, Condvar)>;

/// A process by PID and start time (see [`remus_nbd::process`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcId {
    pub pid: u32,
    pub start: u64,
}

/// The processes of a running VM that outlive the agent, recorded so
/// that the next agent can [adopt](Vm::adopt) them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Processes {
    pub qemu: ProcId,
    /// The qemu-storage-daemon of each qcow2 disk, by target.
    #[serde(default)]
    pub daemons: Vec<(String, ProcId)>,
    /// QEMU was started with the dirty-tracking preload.
    pub dirty_tracking: bool,
    /// QEMU was started to load device-only state (see
    /// [`crate::devstate`]). Absent (older agents): no.
    #[serde(default)]
    pub devices_only_state: bool,
}

/// A VM's disk servers, NIC relays and console hub: what the agent serves
/// QEMU, set up before QEMU starts, or again when an agent adopts it.
struct Plumbing {
    disks: Vec<(String, NbdServerHandle)>,
    daemons: Vec<(String, StorageDaemon)>,
    ports: Vec<Arc<DiskPort>>,
    relays: Vec<Relay>,
    commits: Vec<Arc<OutputCommit>>,
    gates: Vec<InboundGate>,
    console: ConsoleHub,
}

impl Plumbing {
    /// Sets it all up; with `adopting`, the qemu-storage-daemons are the
    /// running ones recorded there instead of new ones. On failure what
    /// was set up so far is torn down again (dropped).
    fn build(
        config: &VmConfig,
        paths: &VmPaths,
        opts: &StartOptions,
        adopting: Option<&Processes>,
    ) -> Result<Plumbing, VmError> {
        let name = config.name.clone();
        let mut disks = Vec::new();
        let mut ports = Vec::new();
        let mut daemons = Vec::new();
        for d in config.disks_in_order() {
            let disk_err = |reason: String| VmError::Disk {
                vm: name.clone(),
                target: d.target.clone(),
                reason,
            };
            let backend: Arc<dyn BlockBackend> = match d.format {
                DiskFormat::Raw => Arc::new(
                    FileBackend::open(&d.path, d.readonly).map_err(|e| disk_err(e.to_string()))?,
                ),
                // QEMU's block layer serves the format; the agent's
                // replicating layer sits in front of it.
                DiskFormat::Qcow2 => {
                    let dir = paths.dir();
                    let socket = dir.join(format!("qsd-{}.sock", d.target));
                    let log = dir.join(format!("qsd-{}.log", d.target));
                    let daemon = match adopting {
                        Some(procs) => {
                            let id = procs
                                .daemons
                                .iter()
                                .find(|(t, _)| *t == d.target)
                                .map(|(_, id)| *id)
                                .ok_or_else(|| {
                                    disk_err("no qemu-storage-daemon recorded".into())
                                })?;
                            StorageDaemon::adopt(id.pid, id.start, &socket, &d.target, &log)
                                .map_err(|e| disk_err(format!("its qemu-storage-daemon: {e}")))?
                        }
                        None => {
                            // Read once, then pinned: the daemon opens
                            // exactly these files with these formats.
                            let chain = remus_nbd::qsd::backing_chain(
                                &qemu_tool(&opts.qemu.path, "qemu-img"),
                                &d.path,
                            )
                            .map_err(|e| disk_err(e.to_string()))?;
                            let daemon = StorageDaemon::start(
                                &qemu_tool(&opts.qemu.path, "qemu-storage-daemon"),
                                &d.path,
                                d.format.as_str(),
                                &chain,
                                d.readonly,
                                &socket,
                                &d.target,
                                &log,
                            )
                            .map_err(|e| disk_err(e.to_string()))?;
                            tracing::info!(vm = %name, disk = %d.target, path = %d.path.display(), pid = daemon.pid(), backing = ?chain, "qcow2 disk served by qemu-storage-daemon (backing chain pinned)");
                            daemon
                        }
                    };
                    let client = daemon.connect().map_err(|e| disk_err(e.to_string()))?;
                    daemons.push((d.target.clone(), daemon));
                    Arc::new(client)
                }
            };
            let port = Arc::new(DiskPort::new(&d.target, backend));
            ports.push(port.clone());
            let backend: Arc<dyn BlockBackend> = port;
            let server = NbdServer::start(&paths.disk_socket(&d.target), &d.target, backend)
                .map_err(|e| disk_err(e.to_string()))?;
            disks.push((d.target.clone(), server));
        }

        let mut relays = Vec::new();
        let mut commits = Vec::new();
        let mut gates = Vec::new();
        for (i, vif) in config.vifs.iter().enumerate() {
            let vif_err = |reason: String| VmError::Vif {
                vm: name.clone(),
                index: i,
                bridge: vif.bridge.clone(),
                reason,
            };
            let tap_name = opts
                .tap_names
                .get(i)
                .cloned()
                .ok_or_else(|| vif_err("no tap name assigned".into()))?;
            // A tap is deleted with its last descriptor, so an adopting
            // agent makes it again, of the same name, on the same bridge.
            let tap = Tap::create_on_bridge(Some(&tap_name), &vif.bridge)
                .map_err(|e| vif_err(e.to_string()))?;
            // Output passes through a commit buffer: live until the VM is
            // protected, then held per checkpoint epoch.
            let commit = Arc::new(OutputCommit::new(remus_net::commit::DEFAULT_LIMIT));
            let relay = Relay::start_with_egress(
                paths.vif_socket(i),
                tap,
                Box::new(CommitEgress(commit.clone())),
            )
            .map_err(|e| vif_err(e.to_string()))?;
            commit.set_sink(Arc::new(relay.tap_sink()));
            commits.push(commit);
            gates.push(relay.inbound_gate());
            relays.push(relay);
        }

        let console = ConsoleHub::start(
            &paths.console_socket(),
            &paths.console_attach_socket(),
            &paths.console_log(),
        )
        .map_err(io_err(&name, "start the console hub"))?;
        Ok(Plumbing {
            disks,
            daemons,
            ports,
            relays,
            commits,
            gates,
            console,
        })
    }
}

/// A running VM.
pub struct Vm {
    pub config: VmConfig,
    pub paths: VmPaths,
    pub accel: ResolvedAccel,
    pub ram_file: PathBuf,
    pub tap_names: Vec<String>,
    proc: Arc<Proc>,
    qmp: Arc<Qmp>,
    exit: ExitCell,
    /// QEMU's last error line and, once it crashed, why.
    watch: Arc<Watch>,
    disks: Mutex<Vec<(String, NbdServerHandle)>>,
    /// qemu-storage-daemons serving qcow2 disks, by target (killed on
    /// destroy, left running on detach).
    daemons: Mutex<Vec<(String, StorageDaemon)>>,
    /// The backend of every disk, in target order; the replicated ones
    /// journal their writes while the VM is protected.
    ports: Vec<Arc<DiskPort>>,
    relays: Mutex<Vec<Relay>>,
    /// Each NIC's output commit buffer, in NIC order.
    commits: Vec<Arc<OutputCommit>>,
    /// Each NIC's inbound gate, in NIC order.
    gates: Vec<InboundGate>,
    console: Mutex<Option<ConsoleHub>>,
    vcpu_tids: Vec<u32>,
    /// QEMU was started with the dirty-tracking preload.
    dirty_tracking: bool,
    /// QEMU was started to load device-only state: it saves and loads
    /// streams without a configuration section, so a peer must take
    /// device-only state from it (see [`crate::devstate`]).
    devices_only_state: bool,
    /// Serialises run-state changes (operator pause/unpause, checkpoint
    /// stop/cont).
    run_lock: Mutex<()>,
    operator_paused: std::sync::atomic::AtomicBool,
    /// The arbiter's fence holds the guest paused.
    fenced: std::sync::atomic::AtomicBool,
    pause_generation: std::sync::atomic::AtomicU64,
    pub started_at: Instant,
}

/// Removes a VM's RAM file and the device state files beside it (a VM
/// that goes); one already gone is fine.
pub fn remove_ram_file(vm: &str, ram_file: &Path) {
    if let Err(e) = std::fs::remove_file(ram_file)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(vm = %vm, file = %ram_file.display(), error = %e, "cannot remove RAM file");
    }
    crate::devstate::remove_save_files(ram_file);
}

fn io_err(vm: &str, what: impl Into<String>) -> impl FnOnce(std::io::Error) -> VmError {
    let vm = vm.to_string();
    let what = what.into();
    move |source| VmError::Io { vm, what, source }
}

impl Vm {
    /// Starts the disk servers, NIC relays and QEMU, and connects QMP.
    /// On any failure everything started so far is stopped again.
    pub fn start(config: VmConfig, paths: VmPaths, opts: StartOptions) -> Result<Vm, VmError> {
        let name = config.name.clone();
        paths.check_socket_len().map_err(|msg| VmError::Invalid {
            vm: name.clone(),
            msg,
        })?;
        std::fs::create_dir_all(paths.dir())
            .map_err(io_err(&name, format!("create {}", paths.dir().display())))?;
        // A new QEMU holds nothing an earlier one did.
        for m in [paths.paused_marker(), paths.fenced_marker()] {
            let _ = std::fs::remove_file(m);
        }
        let plumbing = Plumbing::build(&config, &paths, &opts, None)?;
        // Only a standby loads state.
        let opts = StartOptions {
            devices_only_state: opts.incoming && opts.devices_only_state,
            ..opts
        };

        let uefi = match config.firmware {
            Firmware::Uefi => Some(uefi_firmware(&paths).map_err(|msg| VmError::Invalid {
                vm: name.clone(),
                msg,
            })?),
            Firmware::Bios => None,
        };
        let args = qemu_args(&Launch {
            config: &config,
            paths: &paths,
            ram_file: opts.ram_file.clone(),
            accel: opts.accel,
            incoming: opts.incoming,
            devices_only_state: opts.devices_only_state,
            uefi,
        });
        tracing::info!(vm = %name, qemu = %opts.qemu.path.display(), args = %args.join(" "), "starting QEMU");
        // QEMU's stdout and stderr go straight to qemu.log (capped in
        // place by the exit watcher), so that they outlive the agent.
        let log = crate::logfile::open_append(&paths.qemu_log()).map_err(io_err(
            &name,
            format!("create {}", paths.qemu_log().display()),
        ))?;
        let log2 = log
            .try_clone()
            .map_err(io_err(&name, "open qemu.log twice"))?;
        let mut env = opts.qemu.env.clone();
        let preload = opts.qemu.preload.clone();
        match &preload {
            Some(lib) => env.extend(
                remus_dirty::preload_env(lib, &opts.ram_file)
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), v)),
            ),
            None => {
                tracing::warn!(vm = %name, "dirty-tracking preload not found: this VM can run but not be protected or migrated")
            }
        }
        // A process group of its own: QEMU outlives the agent (see
        // `detach`), and a signal to the agent's group does not reach it.
        let proc = Proc::spawn(
            Command::new(&opts.qemu.path)
                .args(&args)
                .stdin(Stdio::null())
                .stdout(log)
                .stderr(log2)
                .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_os_str()))),
        )
        .map_err(|e| VmError::Start {
            vm: name.clone(),
            reason: format!("cannot run {}: {e}", opts.qemu.path.display()),
            log: String::new(),
        })?;
        let _ = std::fs::write(paths.pid_file(), format!("{}\n", proc.pid()));
        Self::attach(
            config,
            paths,
            opts,
            proc,
            plumbing,
            preload.is_some(),
            false,
        )
    }

    /// Takes over a VM a previous agent started and left running (see
    /// [`Vm::detach`]): QEMU (`procs.qemu`) and the qemu-storage-daemons
    /// of its qcow2 disks must still run and be the recorded processes;
    /// its disk servers, NIC relays (on fresh taps of the same names) and
    /// console hub are set up again at the same sockets, to which QEMU
    /// connects again by itself. On failure QEMU is killed (a VM whose
    /// disks nobody serves is of no use) and the error says why.
    pub fn adopt(
        config: VmConfig,
        paths: VmPaths,
        opts: StartOptions,
        procs: &Processes,
    ) -> Result<Vm, VmError> {
        let name = config.name.clone();
        let proc = Proc::adopt(procs.qemu.pid, procs.qemu.start)
            .map_err(io_err(&name, "find its QEMU"))?;
        let plumbing = match Plumbing::build(&config, &paths, &opts, Some(procs)) {
            Ok(p) => p,
            Err(e) => {
                proc.kill();
                return Err(e);
            }
        };
        tracing::info!(vm = %name, pid = proc.pid(), "adopting the running QEMU");
        let paused = paths.paused_marker().exists();
        // How this QEMU was started, not how a new one would be.
        let opts = StartOptions {
            devices_only_state: procs.devices_only_state,
            ..opts
        };
        let vm = Self::attach(
            config,
            paths,
            opts,
            proc,
            plumbing,
            procs.dirty_tracking,
            true,
        )?;
        if paused {
            vm.operator_paused.store(true, SeqCst);
        }
        Ok(vm)
    }

    /// The processes to record for a later [`Vm::adopt`].
    pub fn processes(&self) -> Processes {
        Processes {
            qemu: ProcId {
                pid: self.proc.pid(),
                start: self.proc.start_time(),
            },
            daemons: self
                .daemons
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .map(|(t, d)| {
                    (
                        t.clone(),
                        ProcId {
                            pid: d.pid(),
                            start: d.start_time(),
                        },
                    )
                })
                .collect(),
            dirty_tracking: self.dirty_tracking,
            devices_only_state: self.devices_only_state,
        }
    }

    /// The part [`Vm::start`] and [`Vm::adopt`] share: watches QEMU's exit,
    /// connects QMP and reads the vCPU threads.
    fn attach(
        config: VmConfig,
        paths: VmPaths,
        opts: StartOptions,
        proc: Proc,
        plumbing: Plumbing,
        dirty_tracking: bool,
        adopted: bool,
    ) -> Result<Vm, VmError> {
        let name = config.name.clone();
        let pid = proc.pid();
        let proc = Arc::new(proc);
        let watch = Arc::new(Watch {
            vm: name.clone(),
            started: Instant::now(),
            adopted,
            log: paths.qemu_log(),
            crash: OnceLock::new(),
            destroying: std::sync::atomic::AtomicBool::new(false),
        });
        let exit: ExitCell = Arc::new((Mutex::new(None), Condvar::new()));
        let (p2, exit2, watch2) = (proc.clone(), exit.clone(), watch.clone());
        if let Err(e) = std::thread::Builder::new()
            .name(format!("qemu-wait-{pid}"))
            .spawn(move || watch_exit(&p2, &exit2, &watch2))
        {
            proc.kill();
            return Err(io_err(&name, "spawn waiter thread")(e));
        }

        let fail = |reason: String, exit: &ExitCell| {
            proc.kill();
            wait_exit(exit, QUIT_WAIT);
            VmError::Start {
                vm: name.clone(),
                reason,
                log: log_tail(&paths.qemu_log()),
            }
        };
        let qmp = match connect_qmp(&paths.qmp_socket(), &exit) {
            Ok(q) => Arc::new(q),
            Err(reason) => return Err(fail(reason, &exit)),
        };
        if let Err(e) = watch_stops(&qmp, &watch) {
            return Err(fail(format!("watch QEMU's events: {e}"), &exit));
        }
        let vcpu_tids = match vcpu_threads(&qmp) {
            Ok(t) => t,
            Err(e) => return Err(fail(format!("query-cpus-fast: {e}"), &exit)),
        };
        // A standby loads device state once, when it resumes (a failover
        // or a switch-over): its migration capabilities are set and its
        // incoming migration listens from now on, so that the resume
        // waits for neither (0.7 ms and some 0.5 ms of QMP on the build
        // machine, all of it guest downtime). An adopted standby is set
        // again (both steps are idempotent): the agent that started it
        // may not have.
        if opts.incoming
            && let Err(e) = crate::devstate::prepare(&qmp)
                .and_then(|()| crate::devstate::listen(&qmp, &paths.incoming_socket()))
        {
            return Err(fail(format!("standby: {e}"), &exit));
        }
        tracing::info!(vm = %name, pid, adopted, accel = opts.accel.as_str(), vcpu_threads = ?vcpu_tids, "QEMU running");
        let Plumbing {
            disks,
            daemons,
            ports,
            relays,
            commits,
            gates,
            console,
        } = plumbing;
        Ok(Vm {
            config,
            paths,
            accel: opts.accel,
            ram_file: opts.ram_file,
            tap_names: opts.tap_names,
            devices_only_state: opts.devices_only_state,
            proc,
            qmp,
            exit,
            disks: Mutex::new(disks),
            daemons: Mutex::new(daemons),
            ports,
            relays: Mutex::new(relays),
            commits,
            gates,
            console: Mutex::new(Some(console)),
            vcpu_tids,
            watch,
            dirty_tracking,
            run_lock: Mutex::new(()),
            operator_paused: std::sync::atomic::AtomicBool::new(false),
            fenced: std::sync::atomic::AtomicBool::new(false),
            pause_generation: std::sync::atomic::AtomicU64::new(0),
            started_at: Instant::now(),
        })
    }

    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// QEMU's process id.
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// The QMP session (for checkpointing and migration).
    pub fn qmp(&self) -> &Qmp {
        &self.qmp
    }

    /// Has QEMU announce the VM's MACs (see [`announce_self`]) without
    /// waiting for its answer: a VM that has just been resumed runs
    /// meanwhile, and QEMU answered `announce-self` only 3.5 ms after a
    /// resume in the demo (its main loop busy with the guest that had
    /// just started), time a switch-over's confirmation and a failover's
    /// report would otherwise wait. A failure is logged.
    pub fn announce_in_background(&self) {
        let qmp = self.qmp.clone();
        let vm = self.config.name.clone();
        let spawned = std::thread::Builder::new()
            .name("announce-self".into())
            .spawn(move || {
                if let Err(e) = announce_self(&qmp) {
                    tracing::warn!(%vm, error = %e, "announce-self failed");
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(vm = %self.config.name, error = %e, "announce-self: no thread for it");
        }
    }

    /// Why the VM crashed, once it has (QEMU exited while nobody was
    /// destroying it, or stopped the guest with `internal-error` or
    /// `guest-panicked`), with how long after its start and QEMU's last
    /// error line: "QEMU stopped the guest (internal-error) 0.4 s after
    /// start; QEMU said: KVM internal error. Suberror: 1".
    pub fn crash_report(&self) -> Option<String> {
        self.watch.crash.get().cloned()
    }

    /// Whether the guest can still run here: QEMU has not exited, the
    /// agent is not destroying it, and its QMP connection is open (QMP
    /// closes as QEMU quits, a moment before the process is reaped).
    pub fn runs_on(&self) -> bool {
        self.exit_status().is_none() && !self.watch.destroying.load(SeqCst) && self.qmp.is_open()
    }

    /// How QEMU exited, if it has.
    pub fn exit_status(&self) -> Option<String> {
        let (lock, _) = &*self.exit;
        lock.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn check_alive(&self) -> Result<(), VmError> {
        match self.exit_status() {
            Some(status) => Err(VmError::Exited {
                vm: self.name().to_string(),
                status,
            }),
            None => Ok(()),
        }
    }

    fn qmp_err(&self) -> impl FnOnce(QmpError) -> VmError {
        let vm = self.name().to_string();
        move |source| VmError::Qmp { vm, source }
    }

    /// The current run state.
    pub fn run_state(&self) -> RunState {
        if self.exit_status().is_some() {
            return RunState::Crashed;
        }
        match self.qmp.status() {
            Ok(s) => RunState::from_qemu(&s, self.vcpu_busy()),
            // QMP broke but the process lives: it is on its way out.
            Err(_) => RunState::Crashed,
        }
    }

    /// Whether any vCPU thread is on a CPU right now (`r` vs `b`).
    fn vcpu_busy(&self) -> bool {
        self.vcpu_tids.iter().any(|tid| {
            std::fs::read_to_string(format!("/proc/{}/task/{tid}/stat", self.pid()))
                .ok()
                .and_then(|s| proc_stat_state(&s))
                == Some('R')
        })
    }

    /// CPU time QEMU has used, in seconds (xl's `Time(s)`).
    pub fn cpu_seconds(&self) -> f64 {
        std::fs::read_to_string(format!("/proc/{}/stat", self.pid()))
            .ok()
            .and_then(|s| proc_stat_cpu_ticks(&s))
            .map(|ticks| {
                // SAFETY: sysconf has no memory effects.
                let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1);
                ticks as f64 / hz as f64
            })
            .unwrap_or(0.0)
    }

    /// Pauses the guest (an operator's pause: checkpoints leave it paused).
    pub fn pause(&self) -> Result<(), VmError> {
        self.check_alive()?;
        let _g = self.run_lock.lock().unwrap_or_else(|p| p.into_inner());
        self.qmp.execute("stop", None).map_err(self.qmp_err())?;
        self.pause_generation.fetch_add(1, SeqCst);
        self.operator_paused.store(true, SeqCst);
        self.mark(&self.paths.paused_marker(), true);
        Ok(())
    }

    /// Records as an operator's pause a guest that is already stopped
    /// (the last checkpoint of a switch-over whose outcome is unknown
    /// left it so): listed paused, it runs again only on `unpause`.
    pub fn mark_operator_paused(&self) {
        let _g = self.run_lock.lock().unwrap_or_else(|p| p.into_inner());
        self.pause_generation.fetch_add(1, SeqCst);
        self.operator_paused.store(true, SeqCst);
        self.mark(&self.paths.paused_marker(), true);
    }

    /// Creates (`on`) or removes a hold marker (see [`VmPaths`]); a marker
    /// that cannot be written is logged: the next agent would then not
    /// know of this hold.
    fn mark(&self, path: &Path, on: bool) {
        let r = if on {
            std::fs::write(path, b"")
        } else {
            match std::fs::remove_file(path) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                r => r,
            }
        };
        if let Err(e) = r {
            tracing::error!(vm = %self.name(), file = %path.display(), error = %e, "cannot record the guest's hold for the next agent");
        }
    }

    /// Pauses the guest because this host may no longer run it (the
    /// arbiter's lease could not be renewed: self-fencing). Checkpoints
    /// leave it paused and [`Vm::unpause`] refuses until [`Vm::unfence`].
    ///
    /// The flag is raised before the run-state lock is taken: a checkpoint
    /// holding the lock sees it before its `cont` and leaves the guest
    /// stopped, so the guest never runs on past this call by more than
    /// the instant between that check and its `cont`.
    pub fn fence(&self) -> Result<(), VmError> {
        self.pause_generation.fetch_add(1, SeqCst);
        self.fenced.store(true, SeqCst);
        self.mark(&self.paths.fenced_marker(), true);
        self.check_alive()?;
        let _g = self.run_lock.lock().unwrap_or_else(|p| p.into_inner());
        self.qmp.execute("stop", None).map_err(self.qmp_err())?;
        Ok(())
    }

    /// Lifts the fence: the guest runs again unless the operator has it
    /// paused. No-op when not fenced.
    pub fn unfence(&self) -> Result<(), VmError> {
        self.check_alive()?;
        let _g = self.run_lock.lock().unwrap_or_else(|p| p.into_inner());
        if !self.fenced.load(SeqCst) {
            return Ok(());
        }
        if !self.operator_paused.load(SeqCst) {
            self.qmp.execute("cont", None).map_err(self.qmp_err())?;
        }
        self.pause_generation.fetch_add(1, SeqCst);
        self.fenced.store(false, SeqCst);
        self.mark(&self.paths.fenced_marker(), false);
        Ok(())
    }

    /// Whether the arbiter's fence holds the guest paused.
    pub fn is_fenced(&self) -> bool {
        self.fenced.load(SeqCst)
    }

    /// For a checkpoint: holds the run-state lock (so an operator's pause
    /// or unpause cannot interleave with the checkpoint's stop/cont) and
    /// says whether the guest is held paused (by the operator or the
    /// fence; then the checkpoint must neither stop nor resume it).
    pub fn checkpoint_guard(&self) -> (std::sync::MutexGuard<'_, ()>, bool) {
        let g = self.run_lock.lock().unwrap_or_else(|p| p.into_inner());
        (g, self.is_held())
    }

    /// Resumes the guest after an operator's pause. Refused while fenced:
    /// another host may be running this VM.
    pub fn unpause(&self) -> Result<(), VmError> {
        self.check_alive()?;
        let _g = self.run_lock.lock().unwrap_or_else(|p| p.into_inner());
        if self.is_fenced() {
            return Err(VmError::Invalid {
                vm: self.name().into(),
                msg: "a fence holds it paused (the arbiter's, or a cluster manager's hold): this host may not run it now (see `remus list --json`, fields arbiter and awaiting_takeover)".into(),
            });
        }
        let status = self.qmp.status().map_err(self.qmp_err())?;
        if status == "shutdown" {
            return Err(VmError::Invalid {
                vm: self.name().into(),
                msg: "the guest has shut down; destroy and create it again".into(),
            });
        }
        self.qmp.execute("cont", None).map_err(self.qmp_err())?;
        self.pause_generation.fetch_add(1, SeqCst);
        self.operator_paused.store(false, SeqCst);
        self.mark(&self.paths.paused_marker(), false);
        Ok(())
    }

    /// While the guest is held paused (operator pause or fence): which
    /// hold this is (every pause, unpause, fence and unfence makes a new
    /// one), else None.
    pub fn hold_generation(&self) -> Option<u64> {
        self.is_held().then(|| self.pause_generation.load(SeqCst))
    }

    /// Whether the guest is held paused, by the operator or the fence.
    pub fn is_held(&self) -> bool {
        self.operator_paused.load(SeqCst) || self.fenced.load(SeqCst)
    }

    /// Whether the operator has paused the guest.
    pub fn is_operator_paused(&self) -> bool {
        self.operator_paused.load(SeqCst)
    }

    /// Pins vCPU `vcpu` to the given host CPUs.
    pub fn pin_vcpu(&self, vcpu: u32, cpus: &[usize]) -> Result<(), VmError> {
        self.check_alive()?;
        let tid = self.vcpu_tid(vcpu)?;
        set_affinity(tid, cpus).map_err(io_err(
            self.name(),
            format!("pin vCPU {vcpu} (thread {tid})"),
        ))
    }

    fn vcpu_tid(&self, vcpu: u32) -> Result<u32, VmError> {
        self.vcpu_thread(vcpu).ok_or_else(|| VmError::Invalid {
            vm: self.name().into(),
            msg: format!("vCPU {vcpu} has no thread"),
        })
    }

    /// The host thread of vCPU `vcpu`.
    pub fn vcpu_thread(&self, vcpu: u32) -> Option<u32> {
        self.vcpu_tids.get(vcpu as usize).copied()
    }

    /// The host CPUs vCPU `vcpu` may run on.
    pub fn vcpu_affinity(&self, vcpu: u32) -> Result<Vec<usize>, VmError> {
        let tid = self.vcpu_tid(vcpu)?;
        get_affinity(tid).map_err(io_err(self.name(), format!("affinity of vCPU {vcpu}")))
    }

    /// Connects to the serial console (one client at a time, QEMU's rule).
    pub fn console(&self) -> Result<UnixStream, VmError> {
        self.check_alive()?;
        UnixStream::connect(self.paths.console_attach_socket())
            .map_err(io_err(self.name(), "connect to the console"))
    }

    /// QEMU was started to load device-only state: a peer must take that
    /// from it too, as its full stream lacks the configuration section
    /// (see [`crate::devstate`]).
    pub fn devices_only_state(&self) -> bool {
        self.devices_only_state
    }

    /// Attaches the dirty-page tracker to this VM's QEMU and checks that
    /// tracking is active (the preload library registered guest RAM). An
    /// error says why protection or migration cannot run.
    pub fn dirty_tracker(&self) -> Result<remus_dirty::DirtyTracker, VmError> {
        let invalid = |msg: String| VmError::Invalid {
            vm: self.name().to_string(),
            msg,
        };
        if !self.dirty_tracking {
            return Err(invalid(format!(
                "dirty-page tracking is off: QEMU was started without the preload library ({} not found next to remusd; build it with `cargo build --release -p remus-dirty-preload`)",
                remus_dirty::PRELOAD_FILE_NAME
            )));
        }
        let mut t = remus_dirty::DirtyTracker::attach(self.pid(), &self.ram_file)
            .map_err(|e| invalid(format!("dirty-page tracking: {e}")))?;
        t.verify_tracking()
            .map_err(|e| invalid(format!("dirty-page tracking: {e}")))?;
        Ok(t)
    }

    /// The disks whose writes are replicated while protected (`replicate`
    /// and not read-only), in target order: replicated disk number `i` on
    /// the wire is element `i`.
    pub fn replicated_disks(&self) -> Vec<Arc<DiskPort>> {
        let cfg = self.config.disks_in_order();
        self.ports
            .iter()
            .zip(cfg)
            .filter(|(_, c)| c.replicate && !c.readonly)
            .map(|(p, _)| p.clone())
            .collect()
    }

    /// Each NIC's output commit buffer, in NIC order (live unless the VM
    /// is protected with output buffering).
    pub fn output_commits(&self) -> &[Arc<OutputCommit>] {
        &self.commits
    }

    /// Each NIC's inbound gate, in NIC order: a checkpoint holds frames
    /// from the network back before it stops the guest.
    pub fn inbound_gates(&self) -> &[InboundGate] {
        &self.gates
    }

    /// Disk server counters, per target.
    pub fn disk_stats(&self) -> Vec<(String, remus_nbd::NbdStats)> {
        self.disks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(t, h)| (t.clone(), h.stats()))
            .collect()
    }

    /// Stops QEMU (politely, then by force), its disk servers and relays,
    /// and removes the RAM file. Safe to call more than once.
    pub fn destroy(&self) {
        let name = self.config.name.clone();
        self.watch.destroying.store(true, SeqCst);
        if self.exit_status().is_none() {
            let quit = self
                .qmp
                .execute_timeout("quit", None, Duration::from_secs(2));
            if let Err(e) = &quit {
                tracing::debug!(vm = %name, error = %e, "quit failed; killing QEMU");
            }
            if quit.is_err() || !wait_exit(&self.exit, QUIT_WAIT) {
                self.proc.kill();
                wait_exit(&self.exit, QUIT_WAIT);
            }
        }
        self.stop_serving();
        drop(std::mem::take(
            &mut *self.daemons.lock().unwrap_or_else(|p| p.into_inner()),
        ));
        remove_ram_file(&name, &self.ram_file);
        let _ = std::fs::remove_file(self.paths.pid_file());
        tracing::info!(vm = %name, "destroyed");
    }

    /// Leaves QEMU (and its qemu-storage-daemons, its RAM file and its
    /// PID file) running for the next agent to [adopt](Vm::adopt), and
    /// stops serving it: the disk servers, NIC relays (their taps go) and
    /// console hub close. QEMU holds the guest's disk requests until it
    /// reconnects (up to [`NBD_RECONNECT_DELAY_S`](crate::qemu_args::NBD_RECONNECT_DELAY_S));
    /// frames and console output meanwhile are dropped.
    pub fn detach(&self) {
        // Whatever QEMU does from here is the next agent's to see.
        self.watch.destroying.store(true, SeqCst);
        self.stop_serving();
        let daemons = std::mem::take(&mut *self.daemons.lock().unwrap_or_else(|p| p.into_inner()));
        for (_, d) in daemons {
            d.detach();
        }
        tracing::info!(vm = %self.name(), pid = self.pid(), "left running for the next agent");
    }

    /// Closes the NIC relays (their taps go), the console hub and the
    /// disk servers: what `destroy` and `detach` both end.
    fn stop_serving(&self) {
        // A relay waiting for room in its output buffer must not hold up
        // its shutdown.
        for c in &self.commits {
            c.close();
        }
        let relays = std::mem::take(&mut *self.relays.lock().unwrap_or_else(|p| p.into_inner()));
        for r in relays {
            r.shutdown();
        }
        let console = self
            .console
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(c) = console {
            c.shutdown();
        }
        let disks = std::mem::take(&mut *self.disks.lock().unwrap_or_else(|p| p.into_inner()));
        for (_, d) in disks {
            d.shutdown();
        }
    }
}

/// What the agent knows of how a VM's QEMU is doing, shared by the
/// threads that watch it (exit, events).
struct Watch {
    vm: String,
    started: Instant,
    /// Taken over from a previous agent (`started` is then the adoption).
    adopted: bool,
    /// QEMU's own output, for the last error line of a crash report.
    log: PathBuf,
    /// Set once, by whoever sees the crash first.
    crash: OnceLock<String>,
    /// The agent is stopping QEMU itself (or leaving it to the next
    /// agent): its exit is no crash of this agent's to report.
    destroying: std::sync::atomic::AtomicBool,
}

impl Watch {
    /// Records a crash (the first report wins) and logs it once, quoting
    /// QEMU's last error line.
    fn crashed(&self, what: &str) {
        if self.destroying.load(SeqCst) {
            return;
        }
        let after = self.started.elapsed().as_secs_f64();
        let since = if self.adopted {
            "after this agent adopted it"
        } else {
            "after start"
        };
        let said = match crate::qemu_log::last_error_line_of(&self.log) {
            Some(l) => format!("; QEMU said: {l}"),
            None => String::new(),
        };
        let report = format!("{what} {after:.1} s {since}{said}");
        if self.crash.set(report.clone()).is_ok() {
            tracing::error!(vm = %self.vm, "VM crashed: {report}");
        }
    }
}

/// How often the exit watcher also caps QEMU's log.
const LOG_CHECK: Duration = Duration::from_secs(5);

/// Waits for QEMU to exit (capping its log meanwhile), then records how.
fn watch_exit(proc: &Proc, exit: &ExitCell, watch: &Watch) {
    loop {
        match proc.poll(Some(LOG_CHECK)) {
            Ok(true) => break,
            Ok(false) => {
                if let Err(e) = crate::logfile::cap_in_place(
                    &watch.log,
                    crate::logfile::MAX_SIZE,
                    crate::logfile::BACKUPS,
                ) {
                    tracing::warn!(vm = %watch.vm, error = %e, "cannot cap qemu.log");
                }
            }
            Err(e) => {
                tracing::error!(vm = %watch.vm, error = %e, "waiting for QEMU failed");
                std::thread::sleep(LOG_CHECK);
            }
        }
    }
    let how = proc.reap().0;
    tracing::info!(vm = %watch.vm, pid = proc.pid(), status = %how, "QEMU exited");
    watch.crashed(&format!("QEMU exited ({how})"));
    let (lock, cv) = &**exit;
    *lock.lock().unwrap_or_else(|p| p.into_inner()) = Some(how);
    cv.notify_all();
}

/// How long a stopped guest may stay stopped before the watcher asks why.
const STOP_SETTLE: Duration = Duration::from_secs(1);

/// Watches QEMU's run-state events for a guest that stops for good with
/// an error. A checkpoint stops and resumes the guest within milliseconds,
/// so a STOP is looked into (one `query-status`) only when no RESUME
/// follows within [`STOP_SETTLE`]; a GUEST_PANICKED says it at once.
fn watch_stops(qmp: &Arc<Qmp>, watch: &Arc<Watch>) -> std::io::Result<()> {
    let events = qmp.subscribe();
    let qmp = Arc::downgrade(qmp);
    let watch = watch.clone();
    std::thread::Builder::new()
        .name("qemu-events".into())
        .spawn(move || watch_events(&events, &qmp, &watch))
        .map(|_| ())
}

/// The loop of [`watch_stops`]'s thread; returns when QMP closes.
fn watch_events(
    events: &std::sync::mpsc::Receiver<remus_qmp::Event>,
    qmp: &std::sync::Weak<Qmp>,
    watch: &Watch,
) {
    use std::sync::mpsc::RecvTimeoutError;
    while let Ok(ev) = events.recv() {
        match ev.name.as_str() {
            "GUEST_PANICKED" => watch.crashed("the guest panicked"),
            "STOP" => loop {
                match events.recv_timeout(STOP_SETTLE) {
                    Ok(ev) if ev.name == "RESUME" => break,
                    Ok(ev) if ev.name == "GUEST_PANICKED" => {
                        watch.crashed("the guest panicked");
                        break;
                    }
                    Ok(_) => {}
                    Err(RecvTimeoutError::Disconnected) => return,
                    Err(RecvTimeoutError::Timeout) => {
                        let Some(q) = qmp.upgrade() else { return };
                        if let Ok(st) = q.status()
                            && matches!(st.as_str(), "internal-error" | "guest-panicked")
                        {
                            watch.crashed(&format!("QEMU stopped the guest ({st})"));
                        }
                        break;
                    }
                }
            },
            _ => {}
        }
    }
}

/// OVMF's code and variable-store template, as Debian's `ovmf` package
/// installs them.
const OVMF: &[(&str, &str)] = &[
    (
        "/usr/share/OVMF/OVMF_CODE_4M.fd",
        "/usr/share/OVMF/OVMF_VARS_4M.fd",
    ),
    (
        "/usr/share/OVMF/OVMF_CODE.fd",
        "/usr/share/OVMF/OVMF_VARS.fd",
    ),
];

/// The UEFI code file, and this VM's variable store (a copy of the
/// template, made once per VM directory).
fn uefi_firmware(paths: &VmPaths) -> Result<(PathBuf, PathBuf), String> {
    let Some((code, vars)) = OVMF
        .iter()
        .find(|(c, v)| Path::new(c).is_file() && Path::new(v).is_file())
    else {
        return Err(format!(
            "firmware = \"uefi\" needs OVMF, which is not installed (looked for {}): apt-get install ovmf",
            OVMF.iter().map(|(c, _)| *c).collect::<Vec<_>>().join(", ")
        ));
    };
    let store = paths.dir().join("uefi-vars.fd");
    if !store.exists() {
        std::fs::copy(vars, &store)
            .map_err(|e| format!("copy the UEFI variable store {vars}: {e}"))?;
    }
    Ok((PathBuf::from(code), store))
}

/// A tool (`qemu-storage-daemon`, `qemu-img`) from the same installation
/// as `qemu`: its directory when `qemu` is a path, else `PATH`.
pub fn qemu_tool(qemu: &Path, tool: &str) -> PathBuf {
    match qemu.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.join(tool),
        _ => PathBuf::from(tool),
    }
}

fn connect_qmp(path: &Path, exit: &ExitCell) -> Result<Qmp, String> {
    let deadline = Instant::now() + QMP_WAIT;
    loop {
        if let Some(s) = exit.0.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            return Err(format!("QEMU exited ({s})"));
        }
        match Qmp::connect(path, Duration::from_millis(200)) {
            Ok(q) => return Ok(q),
            Err(e) if Instant::now() > deadline => {
                return Err(format!("no QMP within {QMP_WAIT:?}: {e}"));
            }
            Err(_) => {}
        }
    }
}

fn vcpu_threads(qmp: &Qmp) -> Result<Vec<u32>, QmpError> {
    let v = qmp.execute("query-cpus-fast", None)?;
    let mut cpus: Vec<(u64, u32)> = v
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|c| {
                    Some((
                        c.get("cpu-index")?.as_u64()?,
                        u32::try_from(c.get("thread-id")?.as_u64()?).ok()?,
                    ))
                })
                .collect()
        })
        .unwrap_or_default();
    cpus.sort_unstable();
    Ok(cpus.into_iter().map(|(_, t)| t).collect())
}

/// Waits until QEMU has exited; false on timeout.
fn wait_exit(exit: &ExitCell, timeout: Duration) -> bool {
    let (lock, cv) = &**exit;
    let guard = lock.lock().unwrap_or_else(|p| p.into_inner());
    let (guard, _) = cv
        .wait_timeout_while(guard, timeout, |s| s.is_none())
        .unwrap_or_else(|p| p.into_inner());
    guard.is_some()
}

/// The last lines of QEMU's log, to explain a failed start.
fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().rev().take(8).collect();
    if lines.is_empty() {
        return String::new();
    }
    let mut out = String::from("; QEMU said: ");
    out.push_str(&lines.into_iter().rev().collect::<Vec<_>>().join(" | "));
    out
}

/// The state letter of a `/proc/.../stat` line (after the `(comm)`).
fn proc_stat_state(stat: &str) -> Option<char> {
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

/// utime + stime from a `/proc/PID/stat` line.
fn proc_stat_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields after comm start at field 3 (state); utime is 14, stime 15.
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some(utime + stime)
}

fn set_affinity(tid: u32, cpus: &[usize]) -> std::io::Result<()> {
    // SAFETY: cpu_set_t is plain data; CPU_SET stays within its bounds for
    // cpu < CPU_SETSIZE, which we check.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for &c in cpus {
            if c >= libc::CPU_SETSIZE as usize {
                return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
            }
            libc::CPU_SET(c, &mut set);
        }
        if libc::sched_setaffinity(tid as libc::pid_t, std::mem::size_of_val(&set), &set) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

fn get_affinity(tid: u32) -> std::io::Result<Vec<usize>> {
    // SAFETY: as above.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(tid as libc::pid_t, std::mem::size_of_val(&set), &mut set) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok((0..libc::CPU_SETSIZE as usize)
            .filter(|&c| libc::CPU_ISSET(c, &set))
            .collect())
    }
}

/// Reads a pid file written by [`Vm::start`].
pub fn read_pid_file(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Used by tests and the agent to announce a VM's MAC after a move.
pub fn announce_self(qmp: &Qmp) -> Result<(), QmpError> {
    qmp.execute(
        "announce-self",
        Some(json!({"initial": 50, "max": 550, "rounds": 5, "step": 100})),
    )
    .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scripted QEMU for the event watcher: greets, takes the
    /// capabilities, waits for `go`, sends `events`, answers query-status
    /// with `status`, then hangs up.
    fn scripted_qemu(
        events: &'static [&'static str],
        status: &'static str,
    ) -> (
        Arc<Qmp>,
        std::sync::mpsc::Sender<()>,
        std::thread::JoinHandle<u32>,
    ) {
        use std::io::{BufRead, Write};
        let (a, b) = UnixStream::pair().unwrap();
        let (go, wait) = std::sync::mpsc::channel::<()>();
        let peer = std::thread::spawn(move || {
            let mut w = b.try_clone().unwrap();
            let mut r = std::io::BufReader::new(b);
            writeln!(w, r#"{{"QMP": {{"version": {{"qemu": {{"micro": 0, "minor": 0, "major": 10}}}}, "capabilities": []}}}}"#).unwrap();
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            let id = serde_json::from_str::<serde_json::Value>(&line).unwrap()["id"].clone();
            writeln!(w, r#"{{"return": {{}}, "id": {id}}}"#).unwrap();
            wait.recv().unwrap();
            for ev in events {
                writeln!(w, r#"{{"event": "{ev}", "data": {{}}}}"#).unwrap();
            }
            // Count the status queries until the watcher has had its say.
            let mut queries = 0;
            r.get_ref().set_read_timeout(Some(STOP_SETTLE * 3)).unwrap();
            loop {
                line.clear();
                match r.read_line(&mut line) {
                    Ok(n) if n > 0 => {
                        let id =
                            serde_json::from_str::<serde_json::Value>(&line).unwrap()["id"].clone();
                        queries += 1;
                        writeln!(w, r#"{{"return": {{"status": "{status}", "running": false}}, "id": {id}}}"#).unwrap();
                    }
                    _ => break,
                }
            }
            queries
        });
        let qmp = Arc::new(Qmp::from_stream(a).unwrap());
        (qmp, go, peer)
    }

    /// A watch whose QEMU log says what a KVM failure says (the returned
    /// directory holds the log).
    fn watch_for_test() -> (Watch, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("qemu.log");
        std::fs::write(
            &log,
            "qemu-system-x86_64: warning: something\nKVM internal error. Suberror: 1\nRAX=0\n",
        )
        .unwrap();
        let w = Watch {
            vm: "t".into(),
            started: Instant::now(),
            adopted: false,
            log,
            crash: OnceLock::new(),
            destroying: std::sync::atomic::AtomicBool::new(false),
        };
        (w, dir)
    }

    #[test]
    fn a_guest_stopped_with_an_internal_error_is_a_crash() {
        let (qmp, go, peer) = scripted_qemu(&["STOP"], "internal-error");
        let events = qmp.subscribe();
        go.send(()).unwrap();
        let (watch, _dir) = watch_for_test();
        let weak = Arc::downgrade(&qmp);
        // Returns once the scripted QEMU hangs up.
        watch_events(&events, &weak, &watch);
        assert_eq!(
            peer.join().unwrap(),
            1,
            "one query-status after the STOP settled"
        );
        let report = watch.crash.get().expect("a crash report");
        assert!(
            report.starts_with("QEMU stopped the guest (internal-error)")
                && report.ends_with("; QEMU said: KVM internal error. Suberror: 1"),
            "{report}"
        );
    }

    #[test]
    fn a_checkpoint_stop_is_not_looked_into() {
        let (qmp, go, peer) = scripted_qemu(&["STOP", "RESUME"], "running");
        let events = qmp.subscribe();
        go.send(()).unwrap();
        let (watch, _dir) = watch_for_test();
        watch_events(&events, &Arc::downgrade(&qmp), &watch);
        assert_eq!(
            peer.join().unwrap(),
            0,
            "a STOP with its RESUME costs no query"
        );
        assert!(watch.crash.get().is_none());
    }

    #[test]
    fn proc_stat_parsing_handles_spaces_in_comm() {
        let s = "1234 (CPU 0/TCG) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0";
        assert_eq!(proc_stat_state(s), Some('S'));
        assert_eq!(proc_stat_cpu_ticks(s), Some(300));
        assert_eq!(proc_stat_state("garbage"), None);
        assert_eq!(proc_stat_cpu_ticks("1 (x) R"), None);
    }

    #[test]
    fn affinity_round_trip_on_this_thread() {
        let tid = unsafe { libc::gettid() } as u32;
        let before = get_affinity(tid).unwrap();
        set_affinity(tid, &[0]).unwrap();
        assert_eq!(get_affinity(tid).unwrap(), vec![0]);
        set_affinity(tid, &before).unwrap();
    }
}
