//! Who may take a thread of the agent before proving it holds the key.
//!
//! Every connection to `--listen` is unauthenticated until its handshake
//! completes, and anyone who can reach the port can open one. So at most
//! [`MAX_UNAUTHENTICATED`] handshakes run at once, at most
//! [`MAX_PER_ADDRESS`] from one source (an IPv4 address, or an IPv6 /64,
//! which one host usually holds whole) (as sshd's `MaxStartups` and
//! per-source limits do); a connection beyond either is closed at once,
//! without a thread, and counted. Refusals are logged in one line per
//! [`LOG_EVERY`], with their number, and so are failed handshakes (the
//! first of each period in full), so a flood cannot flood the log.
//! Each admitted handshake has one deadline for all of it
//! (`remus_proto::HANDSHAKE_TIMEOUT`) and reads at most a few KiB before
//! authentication, so the whole pre-authentication surface costs a few
//! dozen threads and well under a MiB, however many peers knock.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Handshakes in progress at once, from all addresses.
pub const MAX_UNAUTHENTICATED: usize = 32;
/// Handshakes in progress at once from one source address.
pub const MAX_PER_ADDRESS: usize = 4;
/// How often refusals are logged at most.
pub const LOG_EVERY: Duration = Duration::from_secs(10);

/// The counts of unauthenticated connections.
pub struct Admission {
    max: usize,
    per_address: usize,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    total: usize,
    by_address: HashMap<IpAddr, usize>,
    refused_total: u64,
    refused_unlogged: u64,
    last_log: Option<Instant>,
    failed_unlogged: u64,
    last_failure_log: Option<Instant>,
}

/// The source a connection is counted against: an IPv4 address (also when
/// it arrives IPv4-mapped), or the /64 of an IPv6 one.
fn source(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V4(a) => IpAddr::V4(a),
        IpAddr::V6(a) => match a.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = a.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

/// A place among the unauthenticated connections, given back on drop
/// (when the handshake has ended, whichever way).
pub struct Admitted {
    admission: Arc<Admission>,
    address: IpAddr,
}

impl Admitted {
    /// This connection's handshake failed: logged, rate-limited (see
    /// [`Admission`]).
    pub fn handshake_failed(&self, peer: &str, error: &str) {
        self.admission.handshake_failed(peer, error);
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut st = self.admission.lock();
        st.total = st.total.saturating_sub(1);
        if let Some(n) = st.by_address.get_mut(&self.address) {
            *n -= 1;
            if *n == 0 {
                st.by_address.remove(&self.address);
            }
        }
    }
}

impl Admission {
    pub fn new(max: usize, per_address: usize) -> Arc<Admission> {
        Arc::new(Admission {
            max,
            per_address,
            state: Mutex::new(State::default()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A place for a connection from `address`, or `None` (and the
    /// refusal counted and, at most every [`LOG_EVERY`], logged).
    pub fn admit(self: &Arc<Self>, address: IpAddr) -> Option<Admitted> {
        let address = source(address);
        let mut st = self.lock();
        let from_here = st.by_address.get(&address).copied().unwrap_or(0);
        if st.total >= self.max || from_here >= self.per_address {
            st.refused_total += 1;
            st.refused_unlogged += 1;
            let due = st.last_log.is_none_or(|t| t.elapsed() >= LOG_EVERY);
            if due {
                tracing::warn!(
                    refused = st.refused_unlogged,
                    refused_since_start = st.refused_total,
                    last_from = %address,
                    "replication port: closed {} connection(s) at once since the last report: {} handshakes already in progress (at most {} at once, {} per address)",
                    st.refused_unlogged,
                    st.total,
                    self.max,
                    self.per_address
                );
                st.refused_unlogged = 0;
                st.last_log = Some(Instant::now());
            }
            return None;
        }
        st.total += 1;
        *st.by_address.entry(address).or_default() += 1;
        Some(Admitted {
            admission: self.clone(),
            address,
        })
    }

    /// Logs a failed handshake: the first of each [`LOG_EVERY`] in full,
    /// the others counted into the next line.
    fn handshake_failed(&self, peer: &str, error: &str) {
        let mut st = self.lock();
        if st.last_failure_log.is_none_or(|t| t.elapsed() >= LOG_EVERY) {
            tracing::warn!(
                %peer,
                error = %remus_proto::printable(error),
                failed_since_last_report = st.failed_unlogged,
                "replication handshake failed"
            );
            st.failed_unlogged = 0;
            st.last_failure_log = Some(Instant::now());
        } else {
            st.failed_unlogged += 1;
        }
    }

    /// Connections refused since the agent started.
    pub fn refused(&self) -> u64 {
        self.lock().refused_total
    }

    /// Handshakes in progress now.
    pub fn in_progress(&self) -> usize {
        self.lock().total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_hold_globally_and_per_address_and_places_come_back() {
        let a = Admission::new(3, 2);
        let x: IpAddr = "198.18.0.1".parse().unwrap();
        let y: IpAddr = "198.18.0.2".parse().unwrap();
        let z: IpAddr = "198.18.0.3".parse().unwrap();
        let x1 = a.admit(x).unwrap();
        let _x2 = a.admit(x).unwrap();
        assert!(a.admit(x).is_none(), "per address");
        let _y1 = a.admit(y).unwrap();
        assert!(a.admit(z).is_none(), "global");
        assert_eq!((a.in_progress(), a.refused()), (3, 2));
        drop(x1);
        let _z = a.admit(z).expect("a place came back");
        assert!(a.admit(x).is_none(), "the global cap is full again");
        assert_eq!(a.refused(), 3);
    }

    /// One host with an IPv6 /64 cannot take more places by changing its
    /// address; IPv4-mapped addresses count as IPv4.
    #[test]
    fn an_ipv6_slash_64_is_one_source() {
        let a = Admission::new(10, 2);
        let one: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let two: IpAddr = "2001:db8:1:2:ffff::7".parse().unwrap();
        let other: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        let _p1 = a.admit(one).unwrap();
        let _p2 = a.admit(two).unwrap();
        assert!(a.admit("2001:db8:1:2::99".parse().unwrap()).is_none());
        let _p3 = a.admit(other).expect("another /64");
        let _v4 = a.admit("198.18.0.9".parse().unwrap()).unwrap();
        let _v4b = a.admit("::ffff:198.18.0.9".parse().unwrap()).unwrap();
        assert!(
            a.admit("198.18.0.9".parse().unwrap()).is_none(),
            "mapped counts as v4"
        );
    }
}
