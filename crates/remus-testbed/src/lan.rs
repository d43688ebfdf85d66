//! Several hosts on one LAN, on one machine: each host is a network
//! namespace, the LAN is a bridge in a namespace of its own, and every host
//! is plugged into it with a veth pair.
//!
//! ```text
//!  LAN namespace remus-<tag>-lan-<pid>     host namespaces remus-<tag>-<host>-<pid>
//!
//!  lan0 (bridge, no address)
//!    ├─ port-a ══ veth ══ eth0 ─ br0 198.18.0.1/24   vm host a (+ VM taps on br0)
//!    ├─ port-b ══ veth ══ eth0 ─ br0 198.18.0.2/24   vm host b (+ VM taps on br0)
//!    └─ port-c ══ veth ══ eth0 198.18.0.3/24         client host c
//! ```
//!
//! - A *vm host* has a bridge `br0` ([`HOST_BRIDGE`]) holding its address,
//!   with its LAN link `eth0` ([`UPLINK`]) enslaved to it: a VM whose vif
//!   says `bridge = "br0"` (its agent running in that host's namespace) is
//!   bridged onto the LAN, and the host's own address (the replication
//!   link) is reachable from every other host.
//! - A *client host* has its address on `eth0` itself.
//! - In the LAN namespace, the bridge is `lan0` ([`LAN_BRIDGE`]) and host
//!   `x`'s port is `port-x`. [`Lan::cut`] sets that port down (the cable
//!   is pulled: the host sees no carrier, its own configuration is
//!   untouched), [`Lan::restore`] sets it up again.
//!
//! Bridges are created with STP off and a forward delay of 0, so a port
//! forwards as soon as it is up; `br0` gets a fixed MAC address so that it
//! does not change when a VM's tap joins it (a bridge otherwise takes the
//! lowest MAC of its ports, and the peers' ARP caches would go stale). IPv6
//! is disabled in every namespace (no DAD, no router solicitations, no
//! noise on the wire). There are no routes out of the LAN.
//!
//! Addresses must lie in 198.18.0.0/15 (the benchmarking range, never a
//! private one). Namespace names are `remus-<tag>-<host>-<pid>` and
//! `remus-<tag>-lan-<pid>`, like [`Netns::new`]: a tag must be unique
//! within a process (a namespace of the same name is replaced).
//!
//! Dropping the [`Lan`] deletes every namespace it made, which deletes
//! their veths and bridges; nothing is ever created in the caller's
//! namespace. Drop sockets, threads and agents living in the hosts first
//! (declare the `Lan` before them): a namespace whose name is deleted lives
//! on, invisible, while something still holds it.
//!
//! Running Rust code in a host: [`Netns::run_in`] (blocking, may borrow)
//! and [`Netns::spawn`] (background thread). A socket created there belongs
//! to that namespace for its whole life, whichever thread uses it later.

use std::fs::File;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::Command;
use std::sync::mpsc;
use std::thread::JoinHandle;

use anyhow::{Context, Result, bail};

use crate::Netns;

/// The LAN bridge, in the LAN namespace.
pub const LAN_BRIDGE: &str = "lan0";
/// The bridge of a vm host, holding its address.
pub const HOST_BRIDGE: &str = "br0";
/// A host's end of its LAN link.
pub const UPLINK: &str = "eth0";
/// Longest host name: the LAN port `port-<name>` must fit the 15
/// characters Linux allows for an interface name.
pub const MAX_HOST_NAME: usize = 15 - "port-".len();

/// What a host is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostKind {
    /// Address on `br0`, LAN link enslaved to `br0`: VMs bridged there
    /// are on the LAN.
    Vm,
    /// Address on the LAN link `eth0` itself.
    Client,
}

/// One host to create: a name (letters, digits, `-`; at most
/// [`MAX_HOST_NAME`]; not `lan`), its kind and its address with prefix
/// length in 198.18.0.0/15.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostSpec {
    pub name: String,
    pub kind: HostKind,
    pub cidr: String,
}

impl HostSpec {
    /// A host for VMs, e.g. `HostSpec::vm("a", "198.18.0.1/24")`.
    pub fn vm(name: &str, cidr: &str) -> HostSpec {
        HostSpec {
            name: name.to_owned(),
            kind: HostKind::Vm,
            cidr: cidr.to_owned(),
        }
    }

    /// A client host, e.g. `HostSpec::client("c", "198.18.0.3/24")`.
    pub fn client(name: &str, cidr: &str) -> HostSpec {
        HostSpec {
            name: name.to_owned(),
            kind: HostKind::Client,
            cidr: cidr.to_owned(),
        }
    }
}

struct Host {
    name: String,
    kind: HostKind,
    addr: Ipv4Addr,
    prefix: u8,
    ns: Netns,
}

/// Hosts as network namespaces on a bridged LAN; every namespace is
/// deleted on drop (see the module documentation).
pub struct Lan {
    tag: String,
    hosts: Vec<Host>,
    switch: Option<Netns>,
}

impl Lan {
    /// The usual three hosts: vm hosts `a` (198.18.0.1/24) and `b`
    /// (198.18.0.2/24), client host `c` (198.18.0.3/24).
    pub fn standard(tag: &str) -> Result<Lan> {
        Lan::new(
            tag,
            &[
                HostSpec::vm("a", "198.18.0.1/24"),
                HostSpec::vm("b", "198.18.0.2/24"),
                HostSpec::client("c", "198.18.0.3/24"),
            ],
        )
    }

    /// Creates the LAN and its hosts. Everything is checked before
    /// anything is created; on a failure part-way, what was made is
    /// deleted again.
    pub fn new(tag: &str, specs: &[HostSpec]) -> Result<Lan> {
        if tag.is_empty()
            || !tag
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            bail!("LAN tag '{tag}': use letters, digits, - and _");
        }
        let mut parsed = Vec::with_capacity(specs.len());
        for s in specs {
            check_host_name(&s.name)?;
            if parsed
                .iter()
                .any(|p: &(&str, HostKind, Ipv4Addr, u8)| p.0 == s.name)
            {
                bail!("host '{}' given twice", s.name);
            }
            let (addr, prefix) =
                parse_cidr(&s.cidr).with_context(|| format!("host '{}'", s.name))?;
            parsed.push((s.name.as_str(), s.kind, addr, prefix));
        }

        let switch = Netns::new(&format!("{tag}-lan"))?;
        let mut lan = Lan {
            tag: tag.to_owned(),
            hosts: Vec::new(),
            switch: None,
        };
        let switch = lan.switch.insert(switch);
        quiet(switch)?;
        add_bridge(switch, LAN_BRIDGE, None)?;
        ip(switch, &["link", "set", LAN_BRIDGE, "up"])?;

        for (i, (name, kind, addr, prefix)) in parsed.into_iter().enumerate() {
            let ns = Netns::new(&format!("{tag}-{name}"))?;
            // Owned by the Lan from here on, so deleted on any error.
            lan.hosts.push(Host {
                name: name.to_owned(),
                kind,
                addr,
                prefix,
                ns,
            });
            let host = &lan.hosts[i].ns;
            let switch = lan.switch.as_ref().expect("LAN namespace");
            quiet(host)?;
            let port = port_name(name);
            ip(
                switch,
                &[
                    "link", "add", &port, "type", "veth", "peer", "name", UPLINK, "netns",
                    &host.name,
                ],
            )?;
            ip(switch, &["link", "set", &port, "master", LAN_BRIDGE])?;
            ip(switch, &["link", "set", &port, "up"])?;
            let cidr = format!("{addr}/{prefix}");
            match kind {
                HostKind::Vm => {
                    // Locally administered, fixed per host index.
                    let mac = format!("02:72:65:6d:{:02x}:{:02x}", (i >> 8) & 0xff, i & 0xff);
                    add_bridge(host, HOST_BRIDGE, Some(&mac))?;
                    ip(host, &["link", "set", UPLINK, "master", HOST_BRIDGE])?;
                    ip(host, &["link", "set", UPLINK, "up"])?;
                    ip(host, &["addr", "add", &cidr, "dev", HOST_BRIDGE])?;
                    ip(host, &["link", "set", HOST_BRIDGE, "up"])?;
                }
                HostKind::Client => {
                    ip(host, &["addr", "add", &cidr, "dev", UPLINK])?;
                    ip(host, &["link", "set", UPLINK, "up"])?;
                }
            }
        }
        Ok(lan)
    }

    /// The tag given to [`Lan::new`].
    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// The hosts' names, in the order given.
    pub fn hosts(&self) -> Vec<&str> {
        self.hosts.iter().map(|h| h.name.as_str()).collect()
    }

    /// Host `name`'s namespace. Panics if there is no such host.
    pub fn host(&self, name: &str) -> &Netns {
        &self.get(name).ns
    }

    /// Host `name`'s own address (on `br0` for a vm host, on `eth0` for a
    /// client). Panics if there is no such host.
    pub fn addr(&self, name: &str) -> Ipv4Addr {
        self.get(name).addr
    }

    /// Host `name`'s prefix length. Panics if there is no such host.
    pub fn prefix_len(&self, name: &str) -> u8 {
        self.get(name).prefix
    }

    /// Host `name`'s kind. Panics if there is no such host.
    pub fn kind(&self, name: &str) -> HostKind {
        self.get(name).kind
    }

    /// The LAN's own namespace (holding `lan0` and the `port-*` ends).
    pub fn switch(&self) -> &Netns {
        self.switch.as_ref().expect("LAN namespace")
    }

    /// The name of host `name`'s port on the LAN bridge.
    pub fn port(&self, name: &str) -> String {
        port_name(&self.get(name).name)
    }

    /// Every namespace name this LAN made, the LAN's last.
    pub fn namespaces(&self) -> Vec<String> {
        self.hosts
            .iter()
            .map(|h| h.ns.name.clone())
            .chain(self.switch.iter().map(|s| s.name.clone()))
            .collect()
    }

    /// Pulls host `name`'s network plug: its LAN port goes down, the host
    /// sees no carrier on `eth0`. A VM bridged in that host is cut off too.
    pub fn cut(&self, name: &str) -> Result<()> {
        ip(self.switch(), &["link", "set", &self.port(name), "down"])
    }

    /// Plugs host `name` back in (forwarding at once: no forward delay).
    pub fn restore(&self, name: &str) -> Result<()> {
        ip(self.switch(), &["link", "set", &self.port(name), "up"])
    }

    /// Whether host `from` gets an answer to one ping of `to` within 2 s.
    pub fn ping(&self, from: &str, to: Ipv4Addr) -> bool {
        self.host(from)
            .exec("ping", &["-n", "-q", "-c", "1", "-W", "2", &to.to_string()])
            .is_ok_and(|o| o.status.success())
    }

    fn get(&self, name: &str) -> &Host {
        match self.hosts.iter().find(|h| h.name == name) {
            Some(h) => h,
            None => panic!(
                "no host '{name}' on LAN '{}' (hosts: {})",
                self.tag,
                self.hosts().join(", ")
            ),
        }
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        let names = self.namespaces();
        // Netns's own Drop deletes each namespace (and so its veth ends
        // and bridges).
        self.hosts.clear();
        self.switch = None;
        for n in names {
            if Path::new("/run/netns").join(&n).exists() {
                eprintln!("warning: network namespace {n} is still there after ip netns del");
            }
        }
    }
}

impl Netns {
    /// Runs `f` on a fresh thread that has joined this namespace (only
    /// that thread: the caller's stays where it is), and returns its
    /// result; a panic in `f` is passed on. Sockets created in `f` belong
    /// to this namespace; so do threads `f` spawns.
    pub fn run_in<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        let handle = self.handle()?;
        let name = self.name.clone();
        std::thread::scope(|s| {
            let t = std::thread::Builder::new()
                .name(thread_name(&name))
                .spawn_scoped(s, move || -> Result<T> {
                    enter(&handle, &name)?;
                    drop(handle);
                    Ok(f())
                })
                .context("spawn a thread")?;
            match t.join() {
                Ok(r) => r,
                Err(p) => std::panic::resume_unwind(p),
            }
        })
    }

    /// Starts `f` on a background thread that has joined this namespace;
    /// returns once the thread is in it (or why it could not get there).
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<JoinHandle<T>> {
        let handle = self.handle()?;
        let name = self.name.clone();
        let (tx, rx) = mpsc::sync_channel(1);
        let t = std::thread::Builder::new()
            .name(thread_name(&name))
            .spawn(move || {
                let entered = enter(&handle, &name);
                drop(handle);
                if let Err(e) = entered {
                    let _ = tx.send(Err(e));
                    // Ends the thread without running `f` (and without the
                    // panic hook's message); spawn reports the error.
                    std::panic::resume_unwind(Box::new(()));
                }
                let _ = tx.send(Ok(()));
                f()
            })
            .context("spawn a thread")?;
        match rx.recv() {
            Ok(Ok(())) => Ok(t),
            Ok(Err(e)) => {
                let _ = t.join();
                Err(e)
            }
            Err(_) => {
                let _ = t.join();
                bail!("thread for namespace {} ended early", self.name)
            }
        }
    }

    fn handle(&self) -> Result<File> {
        let path = Path::new("/run/netns").join(&self.name);
        File::open(&path).with_context(|| format!("open {}", path.display()))
    }
}

/// Moves the calling thread into the namespace `handle` refers to.
fn enter(handle: &File, name: &str) -> Result<()> {
    // SAFETY: a valid namespace fd; CLONE_NEWNET affects only this thread.
    let rc = unsafe { libc::setns(handle.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        bail!("setns into {name}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

fn thread_name(ns: &str) -> String {
    // Linux keeps 15 bytes of a thread name; keep the informative end.
    let tail: String = ns.chars().rev().take(12).collect();
    format!("ns:{}", tail.chars().rev().collect::<String>())
}

fn port_name(host: &str) -> String {
    format!("port-{host}")
}

fn check_host_name(name: &str) -> Result<()> {
    if name.is_empty()
        || name.len() > MAX_HOST_NAME
        || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
    {
        bail!(
            "host name '{name}': 1 to {MAX_HOST_NAME} letters, digits or - (the LAN port is named port-<host>, and interface names have at most 15 characters)"
        );
    }
    if name == "lan" {
        bail!("host name 'lan' is taken by the LAN's own namespace");
    }
    Ok(())
}

/// `198.18.0.1/24` → address and prefix length, in 198.18.0.0/15 only.
fn parse_cidr(cidr: &str) -> Result<(Ipv4Addr, u8)> {
    let (a, p) = cidr
        .split_once('/')
        .with_context(|| format!("'{cidr}': want ADDRESS/PREFIX, e.g. 198.18.0.1/24"))?;
    let addr: Ipv4Addr = a
        .parse()
        .with_context(|| format!("'{cidr}': bad IPv4 address"))?;
    let prefix: u8 = p
        .parse()
        .ok()
        .filter(|p| (15..=30).contains(p))
        .with_context(|| format!("'{cidr}': prefix length must be 15 to 30"))?;
    let o = addr.octets();
    if o[0] != 198 || (o[1] & 0xfe) != 18 {
        bail!("'{cidr}': test addresses must lie in 198.18.0.0/15");
    }
    let host_bits = u32::from(addr) & (u32::MAX >> prefix);
    if host_bits == 0 || host_bits == u32::MAX >> prefix {
        bail!("'{cidr}': network or broadcast address");
    }
    Ok((addr, prefix))
}

/// Turns IPv6 off in `ns` (before any interface exists there): no
/// link-local addresses, DAD or solicitations.
fn quiet(ns: &Netns) -> Result<()> {
    ns.run_in(|| -> Result<()> {
        for conf in ["all", "default"] {
            let p = format!("/proc/sys/net/ipv6/conf/{conf}/disable_ipv6");
            match std::fs::write(&p, "1") {
                Ok(()) => {}
                // A kernel without IPv6 makes no noise either.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).with_context(|| format!("in {}: write {p}", ns.name)),
            }
        }
        Ok(())
    })?
}

/// `ip -n NS ARGS`, an error with ip's message unless it succeeds.
/// Adds bridge `name` in `ns` (with MAC `mac` if given), STP off and no
/// forward delay: its ports forward as soon as they are up.
fn add_bridge(ns: &Netns, name: &str, mac: Option<&str>) -> Result<()> {
    let mut args = vec!["link", "add", name];
    if let Some(mac) = mac {
        args.extend(["address", mac]);
    }
    args.extend(["type", "bridge", "stp_state", "0", "forward_delay", "0"]);
    ip(ns, &args)
}

fn ip(ns: &Netns, args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .arg("-n")
        .arg(&ns.name)
        .args(args)
        .output()
        .context("run ip")?;
    if !out.status.success() {
        bail!(
            "ip -n {} {}: {}",
            ns.name,
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs_outside_the_test_range_are_refused() {
        assert_eq!(
            parse_cidr("198.18.0.1/24").unwrap(),
            (Ipv4Addr::new(198, 18, 0, 1), 24)
        );
        assert_eq!(
            parse_cidr("198.19.255.1/16").unwrap(),
            (Ipv4Addr::new(198, 19, 255, 1), 16)
        );
        for bad in [
            "203.0.113.1/24",
            "198.51.100.1/24",
            "198.20.0.1/24",
            "198.17.0.1/24",
            "198.18.0.1",
            "198.18.0.1/8",
            "198.18.0.1/31",
            "198.18.0.0/24",
            "198.18.0.255/24",
            "x/24",
        ] {
            assert!(parse_cidr(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn host_names_fit_interface_names() {
        assert!(check_host_name("a").is_ok());
        assert!(check_host_name("backup-1").is_ok());
        assert!(check_host_name(&"x".repeat(MAX_HOST_NAME)).is_ok());
        assert_eq!(port_name(&"x".repeat(MAX_HOST_NAME)).len(), 15);
        for bad in ["", "lan", "a b", "a/b", "elevenchars"] {
            assert!(check_host_name(bad).is_err(), "{bad}");
        }
        assert!(thread_name("remus-tag-a-1234567").len() <= 15);
    }
}
