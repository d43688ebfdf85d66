//! A process the agent starts that may outlive the agent (QEMU, a
//! `qemu-storage-daemon`), held by a pidfd so that it can be signalled and
//! waited for without the pid-reuse race, whether this agent process
//! started it or a later one adopted it after a restart.
//!
//! Spawned in a process group of its own: a signal to the agent's group (a
//! terminal's Ctrl-C, a service manager signalling the whole group) does not
//! reach it. Dropping a [`Proc`] neither kills nor waits for the process.
//!
//! A process is identified across agent restarts by its PID *and* its
//! start time (field 22 of `/proc/PID/stat`, in clock ticks since boot): a
//! PID file alone could name another process after a reboot or a wrap.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::Duration;

use rustix::event::{PollFd, PollFlags, poll};
use rustix::process::{
    Pid, PidfdFlags, Signal, WaitId, WaitIdOptions, pidfd_open, pidfd_send_signal, waitid,
};

/// A running (or exited, not yet noticed) process; see the module docs.
#[derive(Debug)]
pub struct Proc {
    pid: u32,
    start: u64,
    fd: OwnedFd,
}

/// How a process ended, as the agent can tell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exit(pub String);

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl Proc {
    /// Spawns `cmd` in a process group of its own and holds it by pidfd.
    pub fn spawn(cmd: &mut Command) -> io::Result<Proc> {
        cmd.process_group(0);
        // The Child handle is dropped at once: dropping it neither kills
        // nor reaps; the pidfd does both from here.
        let child = cmd.spawn()?;
        let pid = child.id();
        let fd = open(pid)?;
        let start = start_time(pid)?;
        Ok(Proc { pid, start, fd })
    }

    /// Takes hold of a process a previous agent started: `pid` must still
    /// run and have started at `start` (see [`Proc::start_time`]);
    /// otherwise an error saying which.
    pub fn adopt(pid: u32, start: u64) -> io::Result<Proc> {
        // The pidfd first, then the check: once the pidfd is open, the PID
        // cannot name another process while we hold it.
        let fd = open(pid)?;
        let now = start_time(pid)?;
        if now != start {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!(
                    "process {pid} is not the one recorded (started at tick {now}, recorded {start})"
                ),
            ));
        }
        let p = Proc { pid, start, fd };
        if p.poll(Some(Duration::ZERO))? {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("process {pid} has exited"),
            ));
        }
        Ok(p)
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// When the process started (clock ticks since boot): with the PID,
    /// what an adoption checks.
    pub fn start_time(&self) -> u64 {
        self.start
    }

    /// Sends `sig`; an exited process is no error.
    pub fn signal(&self, sig: Signal) {
        if let Err(e) = pidfd_send_signal(&self.fd, sig)
            && e != rustix::io::Errno::SRCH
        {
            tracing::debug!(pid = self.pid, error = %e, "signal");
        }
    }

    /// SIGKILL.
    pub fn kill(&self) {
        self.signal(Signal::KILL);
    }

    /// Whether the process has exited, waiting at most `timeout` (`None`:
    /// for ever) for it to.
    pub fn poll(&self, timeout: Option<Duration>) -> io::Result<bool> {
        let ts = timeout.map(|t| rustix::time::Timespec {
            tv_sec: t.as_secs().min(i64::MAX as u64) as i64,
            tv_nsec: i64::from(t.subsec_nanos()),
        });
        let mut fds = [PollFd::new(&self.fd, PollFlags::IN)];
        loop {
            match poll(&mut fds, ts.as_ref()) {
                Ok(n) => return Ok(n > 0),
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Once [`Proc::poll`] said it exited: reaps it if this agent process
    /// started it and says how it ended.
    pub fn reap(&self) -> Exit {
        match waitid(
            WaitId::PidFd(self.fd.as_fd()),
            WaitIdOptions::EXITED | WaitIdOptions::NOHANG,
        ) {
            Ok(Some(st)) => Exit(describe(&st)),
            Ok(None) => Exit("exited".into()),
            // Not our child: a previous agent started it, and whoever
            // inherited it reaps it.
            Err(rustix::io::Errno::CHILD) => {
                Exit("exited (adopted: its exit status went to its parent)".into())
            }
            Err(e) => Exit(format!("exited (status unknown: {e})")),
        }
    }
}

fn describe(st: &rustix::process::WaitIdStatus) -> String {
    if let Some(code) = st.exit_status() {
        format!("exit code {code}")
    } else if let Some(sig) = st.terminating_signal() {
        format!("killed by signal {sig}")
    } else {
        "exited".into()
    }
}

fn open(pid: u32) -> io::Result<OwnedFd> {
    let p = i32::try_from(pid)
        .ok()
        .and_then(Pid::from_raw)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("bad pid {pid}")))?;
    pidfd_open(p, PidfdFlags::empty()).map_err(|e| {
        io::Error::new(
            io::Error::from(e).kind(),
            format!("process {pid}: pidfd_open: {e}"),
        )
    })
}

/// A process's start time (clock ticks since boot), from
/// `/proc/PID/stat`.
pub fn start_time(pid: u32) -> io::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    parse_start_time(&stat).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("/proc/{pid}/stat: no start time"),
        )
    })
}

/// Field 22 (starttime) of a `/proc/PID/stat` line; the command name
/// (field 2, in parentheses) may hold spaces and parentheses itself, so
/// fields are counted after its last `)`.
fn parse_start_time(stat: &str) -> Option<u64> {
    let rest = stat.rsplit_once(')')?.1;
    // After ")" come fields 3 (state) onwards; starttime is field 22.
    rest.split_whitespace().nth(22 - 3)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_is_field_22_even_with_odd_names() {
        let line = "1234 (qemu (x) y) S 1 1234 1234 0 -1 4194560 100 0 0 0 5 6 0 0 20 0 3 0 987654 1000 50";
        assert_eq!(parse_start_time(line), Some(987654));
        assert_eq!(parse_start_time("1 (x) S"), None);
    }

    #[test]
    fn spawn_adopt_kill_reap() {
        let p = Proc::spawn(Command::new("sleep").arg("30")).unwrap();
        assert!(!p.poll(Some(Duration::ZERO)).unwrap());
        // Another handle on the same process, as an agent after a restart.
        let q = Proc::adopt(p.pid(), p.start_time()).unwrap();
        let wrong = Proc::adopt(p.pid(), p.start_time() + 1).unwrap_err();
        assert!(
            wrong.to_string().contains("not the one recorded"),
            "{wrong}"
        );
        q.kill();
        assert!(p.poll(Some(Duration::from_secs(10))).unwrap());
        assert_eq!(p.reap(), Exit("killed by signal 9".into()));
        assert!(Proc::adopt(p.pid(), p.start_time()).is_err());
    }
}
