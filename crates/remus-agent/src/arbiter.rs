//! Split-brain protection in the agent (issue 9): an etcd key per VM names
//! the one host that may run it (`remus-arbiter`).
//!
//! The key's life follows the VM's:
//! - **Protected** (`leased`): the primary holds the key on a lease of
//!   its own, renewed every TTL/4 by a keeper thread. A fencer thread
//!   pauses the VM ([`remus_vm::Vm::fence`]) when the lease's fence
//!   deadline passes without a renewal: send time of the last renewal +
//!   TTL − margin, on this host's clock, so the VM is paused before etcd
//!   can let the lease lapse. A later renewal (or, once the lease has
//!   lapsed, a new lease on a key nobody took) lifts the fence.
//! - **Failover**: the backup resumes only after it has created the key
//!   with a lease of its own, which etcd allows only once the primary's
//!   lease has lapsed ([`take_over`]).
//! - **Unprotected** (`pinned`): when a session ends, and on the backup
//!   right after a failover, the key is rewritten without a lease. Nobody
//!   can take over a pinned key by waiting: the VM runs on unprotected, as
//!   without an arbiter, and an arbiter outage does not pause it.
//! - **Stale**: the key names another host (it took over): this copy
//!   stays fenced for good; `remus destroy` removes it.
//! - **Destroyed**: the key is deleted if it still names this host.
//!
//! Every decision is logged with the etcd revision that justified it.

use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::{Duration, Instant};

use remus_api::{ArbiterHost, ArbiterInfo};
use remus_arbiter::{Arbiter, ArbiterError, Lease};

/// What a [`Guard`] needs of the VM it keeps the key for (the agent's
/// `VmSlot`). The guard's threads hold it weakly: the VM may go first.
pub trait Guarded: Send + Sync {
    fn vm(&self) -> &remus_vm::Vm;
    /// Tells the VM's followers (`remus protect`'s output) what happened.
    fn publish(&self, event: remus_api::SessionEvent);
    /// Lets out the network output a session left held while fenced.
    fn release_held_output(&self);
    /// Whether a protection session runs (its output is its own to
    /// release or drop).
    fn protected(&self) -> bool;
    /// Reports what happened to the metrics and the event hooks.
    fn notice(&self, notice: crate::observe::Notice);
}

/// The agent's arbiter: the etcd cluster, this host's name in it, and the
/// lease timing.
pub struct AgentArbiter {
    pub arb: Arbiter,
    pub ttl: Duration,
    pub margin: Duration,
}

impl AgentArbiter {
    /// Checks the timing: the margin must leave room for renewals.
    pub fn new(arb: Arbiter, ttl: Duration, margin: Duration) -> Result<AgentArbiter, String> {
        if ttl < Duration::from_secs(2) || ttl.subsec_nanos() != 0 {
            return Err(format!(
                "arbiter TTL {ttl:?} must be a whole number of seconds, at least 2 (etcd's minimum is 1.5 × its election timeout)"
            ));
        }
        if margin.is_zero() || margin * 2 > ttl {
            return Err(format!(
                "arbiter margin {margin:?} must be above 0 and at most half the TTL ({ttl:?})"
            ));
        }
        Ok(AgentArbiter { arb, ttl, margin })
    }

    /// How often the holder renews: four tries before the fence deadline
    /// even with the largest margin.
    pub fn renew_every(&self) -> Duration {
        self.ttl / 4
    }

    /// How long a backup that lost its primary keeps trying to take the
    /// key. The primary's lease lapses at most a TTL after its last
    /// renewal; a change of etcd leader can add a TTL (a new leader
    /// extends every lease to a full TTL); etcd checks for expired leases
    /// about twice a second.
    pub fn takeover_window(&self) -> Duration {
        self.ttl * 2 + Duration::from_secs(1)
    }

    /// Settings and health, for `GET /v1/host`.
    pub fn host_info(&self) -> ArbiterHost {
        let cfg = self.arb.config();
        let health = self.arb.health();
        ArbiterHost {
            endpoints: cfg.endpoints.clone(),
            prefix: cfg.prefix.clone(),
            host: self.arb.host().to_string(),
            ttl_s: self.ttl.as_secs(),
            margin_ms: self.margin.as_millis() as u64,
            healthy: health.is_ok(),
            answered_by: health.as_ref().ok().cloned(),
            error: health.err().map(|e| e.to_string()),
        }
    }
}

/// What the keeper is asked to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Want {
    /// Keep the lease (the VM is protected).
    Lease,
    /// Rewrite the key without a lease (the VM runs unprotected).
    Pin,
    /// Stop: the VM is being destroyed.
    Stop,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tenure {
    Leased,
    Fenced,
    Pinned,
    Stale,
}

impl Tenure {
    fn name(self) -> &'static str {
        match self {
            Tenure::Leased => "leased",
            Tenure::Fenced => "fenced",
            Tenure::Pinned => "pinned",
            Tenure::Stale => "stale",
        }
    }
}

struct State {
    want: Want,
    tenure: Tenure,
    holder: String,
    revision: i64,
    lease: Option<i64>,
    /// While leased: pause the VM at this instant without a renewal.
    fence_at: Option<Instant>,
    error: Option<String>,
    /// The keeper has ended (pinned, stale or stopped).
    done: bool,
    /// Given up for a planned switch-over ([`Guard::hand_over`]).
    handed_over: bool,
}

/// One VM's key, as held by this host, and the threads that keep it.
pub struct Guard {
    vm: String,
    arb: Arc<AgentArbiter>,
    state: Mutex<State>,
    cv: Condvar,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Guard {
    /// The primary, before protecting: takes the VM's key on a new lease
    /// (refused when another host holds it) and starts keeping it.
    pub fn acquire(
        arb: &Arc<AgentArbiter>,
        slot: &Arc<impl Guarded + 'static>,
    ) -> Result<Arc<Guard>, ArbiterError> {
        let lease = arb.arb.acquire(slot.vm().name(), arb.ttl, arb.margin)?;
        Ok(Guard::start(arb, slot, lease, Want::Lease))
    }

    /// Keeps `lease` for the VM of `slot`: renewing it and fencing the VM
    /// when it cannot, until asked to pin or stop. `want` Pin rewrites the
    /// key without a lease as soon as etcd answers (a backup that has just
    /// taken over).
    fn start(
        arb: &Arc<AgentArbiter>,
        slot: &Arc<impl Guarded + 'static>,
        lease: Lease,
        want: Want,
    ) -> Arc<Guard> {
        let weak = || -> Weak<dyn Guarded> { Arc::downgrade(slot) as Weak<dyn Guarded> };
        let g = Arc::new(Guard {
            vm: slot.vm().name().to_string(),
            arb: arb.clone(),
            state: Mutex::new(State {
                want,
                tenure: Tenure::Leased,
                holder: arb.arb.host().to_string(),
                revision: lease.revision,
                lease: Some(lease.id),
                fence_at: Some(lease.fence_at()),
                error: None,
                done: false,
                handed_over: false,
            }),
            cv: Condvar::new(),
        });
        let (g1, s1) = (g.clone(), weak());
        let (g2, s2) = (g.clone(), weak());
        let name = g.vm.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("lease-{name}"))
            .spawn(move || g1.keeper(s1, Some(lease)))
            .and_then(|_| {
                std::thread::Builder::new()
                    .name(format!("fence-{name}"))
                    .spawn(move || g2.fencer(s2))
            });
        if let Err(e) = spawned {
            // Without its threads nobody renews the lease: fence now.
            tracing::error!(vm = %name, error = %e, "cannot start the arbiter threads; pausing the VM");
            let _ = slot.vm().fence();
            lock(&g.state).tenure = Tenure::Fenced;
        }
        g
    }

    /// The session ended: the VM runs on unprotected here. The key is
    /// pinned to this host as soon as etcd answers; until then the lease
    /// is kept (and the fence with it).
    pub fn pin(&self) {
        let mut st = lock(&self.state);
        if st.want == Want::Lease {
            st.want = Want::Pin;
        }
        self.cv.notify_all();
    }

    /// The VM is going away: the threads end (the caller deletes the key).
    pub fn stop(&self) {
        lock(&self.state).want = Want::Stop;
        self.cv.notify_all();
    }

    /// [`Guard::stop`], then waits (at most a TTL) for the keeper to end:
    /// a call of its still in flight (a pin, a renewal) must not land
    /// after the caller's own write of the key.
    pub fn stop_and_wait(&self) {
        self.stop();
        drop(self.wait_done());
    }

    /// The agent stops while the VM stays running (for the next agent to
    /// adopt): a pin asked for by a session that just ended is waited for
    /// first (until `until`, shared by all the agent's VMs), so that the
    /// VM is not left fenced for want of one etcd write; then as
    /// [`Guard::stop`].
    pub fn stop_after_pin(&self, until: Instant) {
        let st = lock(&self.state);
        let wait = until.saturating_duration_since(Instant::now());
        let (st, waited) = self
            .cv
            .wait_timeout_while(st, wait, |st| st.want == Want::Pin && !st.done)
            .unwrap_or_else(|p| p.into_inner());
        if waited.timed_out() {
            tracing::warn!(vm = %self.vm, "arbiter: the agent stops before the VM's key was pinned (etcd did not answer in time); a VM the session left fenced stays so, and the next agent does not adopt it");
        }
        drop(st);
        self.stop();
    }

    /// Waits, at most a TTL, until the keeper has ended; returns the state.
    fn wait_done(&self) -> std::sync::MutexGuard<'_, State> {
        let (st, waited) = self
            .cv
            .wait_timeout_while(lock(&self.state), self.arb.ttl, |st| !st.done)
            .unwrap_or_else(|p| p.into_inner());
        if waited.timed_out() {
            tracing::warn!(vm = %self.vm, "arbiter: the keeper did not end within the TTL");
        }
        st
    }

    /// A planned switch-over, the last checkpoint acknowledged and the
    /// guest stopped: this host gives up its right to run the VM so that
    /// the backup can take the key at once. The VM is fenced first (and
    /// under the state lock, so a renewal in flight cannot lift the fence
    /// afterwards): from here it runs on this host again only once the key
    /// is this host's again ([`reclaim`]). The keeper is stopped, then the
    /// key deleted. If etcd does not answer, the lease, no longer renewed,
    /// lapses within a TTL and the backup's takeover waits for that.
    pub fn hand_over(&self, slot: &dyn Guarded) {
        {
            let mut st = lock(&self.state);
            st.want = Want::Stop;
            st.handed_over = true;
            if let Err(e) = slot.vm().fence() {
                tracing::error!(vm = %self.vm, error = %e, "arbiter: cannot fence the VM for the switch-over");
            }
            st.tenure = Tenure::Fenced;
            self.cv.notify_all();
        }
        // The keeper may be in an etcd call: wait for it to end, so that
        // it cannot write the key again after the delete.
        let mut st = self.wait_done();
        let lease = st.lease.take();
        st.fence_at = None;
        drop(st);
        let t = Instant::now();
        match self.arb.arb.clear(&self.vm) {
            Ok(deleted) => {
                tracing::warn!(vm = %self.vm, deleted, ms = t.elapsed().as_secs_f64() * 1e3, "arbiter: switch-over: this host gave up the VM's key; the backup takes it");
            }
            Err(e) => {
                tracing::error!(vm = %self.vm, error = %e, lease = ?lease.map(|l| format!("{l:x}")), "arbiter: switch-over: cannot delete the VM's key; the backup takes it once this host's lease lapses (within the TTL)");
            }
        }
    }

    /// Whether [`Guard::hand_over`] gave the key up.
    pub fn handed_over(&self) -> bool {
        lock(&self.state).handed_over
    }

    /// Whether the key is still held on a lease (protection ended but the
    /// key is not pinned yet).
    pub fn is_leased(&self) -> bool {
        let st = lock(&self.state);
        matches!(st.tenure, Tenure::Leased | Tenure::Fenced) && st.lease.is_some()
    }

    pub fn is_stale(&self) -> bool {
        lock(&self.state).tenure == Tenure::Stale
    }

    pub fn info(&self) -> ArbiterInfo {
        let st = lock(&self.state);
        ArbiterInfo {
            state: st.tenure.name().into(),
            holder: st.holder.clone(),
            revision: st.revision,
            lease: st.lease.map(|l| format!("{l:x}")),
            healthy: st.error.is_none(),
            fence_in_ms: match (st.tenure, st.fence_at) {
                (Tenure::Leased, Some(t)) => Some(match t.checked_duration_since(Instant::now()) {
                    Some(d) => d.as_millis() as i64,
                    None => -(Instant::now().duration_since(t).as_millis() as i64),
                }),
                _ => None,
            },
            error: st.error.clone(),
        }
    }

    fn publish(&self, slot: &dyn Guarded, state: &str, message: &str) {
        slot.publish(remus_api::SessionEvent::Arbiter {
            state: state.to_string(),
            message: message.to_string(),
        });
    }

    /// Renews the lease, re-takes the key once it has lapsed, pins it when
    /// asked, and lifts the fence when the key is ours again.
    fn keeper(self: Arc<Guard>, slot: Weak<dyn Guarded>, mut lease: Option<Lease>) {
        let a = &*self.arb;
        let mut next = Instant::now() + a.renew_every();
        // A new wish (pin, stop) is acted on at once; otherwise one round
        // of calls per renewal period, failed pins included.
        let mut seen = Want::Lease;
        loop {
            let want = self
                .cv
                .wait_timeout_while(
                    lock(&self.state),
                    next.saturating_duration_since(Instant::now()),
                    |st| st.want == seen,
                )
                .unwrap_or_else(|p| p.into_inner())
                .0
                .want;
            seen = want;
            let Some(slot) = slot.upgrade() else {
                return self.finish();
            };
            if want == Want::Stop {
                return self.finish();
            }
            if want == Want::Pin {
                match a.arb.pin(&self.vm, lease.as_ref().map(|l| l.id)) {
                    Ok(revision) => {
                        self.lift_fence(&*slot, revision, "the key is pinned to this host", true);
                        let mut st = lock(&self.state);
                        st.tenure = Tenure::Pinned;
                        st.revision = revision;
                        st.lease = None;
                        st.fence_at = None;
                        st.error = None;
                        drop(st);
                        return self.finish();
                    }
                    Err(ArbiterError::HeldByOther {
                        holder, revision, ..
                    }) => return self.go_stale(&*slot, holder, revision),
                    Err(e) => self.failed(&e),
                }
            }
            // Renew; after a lapse, take the key again (if nobody else did).
            let lapsed = match lease.as_mut() {
                Some(l) => match a.arb.renew(l, a.margin) {
                    Ok(_) => {
                        self.leased(l);
                        if slot.vm().is_fenced() {
                            self.lift_fence(&*slot, l.revision, "the lease was renewed", false);
                        }
                        false
                    }
                    Err(ArbiterError::Expired { .. }) => true,
                    Err(e) => {
                        self.failed(&e);
                        false
                    }
                },
                None => true,
            };
            if lapsed {
                if lease.take().is_some() {
                    tracing::error!(vm = %self.vm, "arbiter: this host's lease has lapsed; taking the key again unless another host has");
                }
                match a.arb.acquire(&self.vm, a.ttl, a.margin) {
                    Ok(l) => {
                        self.leased(&l);
                        self.lift_fence(
                            &*slot,
                            l.revision,
                            "the key was taken again on a new lease",
                            false,
                        );
                        lease = Some(l);
                    }
                    Err(ArbiterError::HeldByOther {
                        holder, revision, ..
                    }) => return self.go_stale(&*slot, holder, revision),
                    Err(e) => self.failed(&e),
                }
            }
            next = Instant::now() + a.renew_every();
        }
    }

    /// A renewed or newly taken lease: its tenure and fence deadline
    /// (the fencer wakes to the new deadline).
    fn leased(&self, l: &Lease) {
        let mut st = lock(&self.state);
        st.revision = l.revision;
        st.lease = Some(l.id);
        st.fence_at = Some(l.fence_at());
        st.error = None;
        self.cv.notify_all();
    }

    /// Pauses the VM when the fence deadline passes without a renewal.
    fn fencer(self: Arc<Guard>, slot: Weak<dyn Guarded>) {
        let mut st = lock(&self.state);
        loop {
            if st.done || st.want == Want::Stop {
                return;
            }
            let now = Instant::now();
            let wait = match (st.tenure, st.fence_at) {
                (Tenure::Leased, Some(at)) if now >= at => {
                    let Some(slot) = slot.upgrade() else { return };
                    // Under the state lock: a renewal cannot land between
                    // the check and the pause.
                    let late = now.duration_since(at);
                    match slot.vm().fence() {
                        Ok(()) => {
                            let msg = format!(
                                "FENCED: the lease (revision {}) was not renewed in time; the VM is paused here (held output stays held) until the arbiter answers",
                                st.revision
                            );
                            tracing::error!(vm = %self.vm, revision = st.revision, lease = ?st.lease.map(|l| format!("{l:x}")), late_ms = late.as_millis() as u64, last_error = ?st.error, "{msg}");
                            self.publish(&*slot, "fenced", &msg);
                            slot.notice(crate::observe::Notice::Fenced { reason: msg });
                        }
                        Err(e) => {
                            tracing::error!(vm = %self.vm, error = %e, "arbiter: cannot pause the VM at its fence deadline");
                        }
                    }
                    st.tenure = Tenure::Fenced;
                    Duration::from_secs(1)
                }
                (Tenure::Leased, Some(at)) => at - now,
                _ => Duration::from_secs(1),
            };
            st = self
                .cv
                .wait_timeout(st, wait)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Resumes a fenced VM once the key is this host's again (checked in
    /// etcd: our host name, and our lease or none). Once the session has
    /// ended (the key is to be pinned), only the pin lifts it: while the
    /// key is on a lease the backup may still take it when the lease
    /// lapses, and resume from its last checkpoint, so no output it does
    /// not hold may leave here meanwhile.
    fn lift_fence(&self, slot: &dyn Guarded, revision: i64, why: &str, pinned: bool) {
        if !slot.vm().is_fenced() {
            let mut st = lock(&self.state);
            if st.tenure == Tenure::Fenced {
                st.tenure = Tenure::Leased;
            }
            return;
        }
        let lease = lock(&self.state).lease;
        match self.arb.arb.holder(&self.vm) {
            Ok(Some(h))
                if h.host == self.arb.arb.host() && (h.lease == 0 || Some(h.lease) == lease) => {}
            Ok(h) => {
                tracing::error!(vm = %self.vm, holder = ?h, "arbiter: the key is not this host's; the VM stays fenced");
                return;
            }
            Err(e) => {
                self.failed(&e);
                return;
            }
        }
        // Checked and acted on under the state lock: a hand-over (or a
        // stop) that fenced the VM since the etcd call above wins.
        let st = lock(&self.state);
        if st.want == Want::Stop {
            return;
        }
        if st.want == Want::Pin && !pinned {
            tracing::info!(vm = %self.vm, revision, "arbiter: {why}, but the session has ended: the VM stays fenced until its key is pinned to this host");
            return;
        }
        let unfenced = slot.vm().unfence();
        drop(st);
        match unfenced {
            Ok(()) => {
                // Output a session left held while fenced (see protect's
                // end) is this VM's own history: it goes out now.
                slot.release_held_output();
                let msg = format!("fence lifted: {why} (revision {revision}); the VM runs again");
                tracing::warn!(vm = %self.vm, revision, "{msg}");
                self.publish(slot, "leased", &msg);
                slot.notice(crate::observe::Notice::FenceLifted { reason: msg });
                let mut st = lock(&self.state);
                st.tenure = Tenure::Leased;
                st.revision = revision;
            }
            Err(e) => {
                tracing::error!(vm = %self.vm, error = %e, "arbiter: cannot resume the fenced VM")
            }
        }
    }

    /// Another host holds the key: this copy must never run again.
    fn go_stale(&self, slot: &dyn Guarded, holder: String, revision: i64) {
        if !slot.vm().is_fenced()
            && let Err(e) = slot.vm().fence()
        {
            tracing::error!(vm = %self.vm, error = %e, "arbiter: cannot pause the stale copy");
        }
        // Output it still holds came from a state the other host never
        // had: it must never leave.
        if !slot.protected() {
            for n in slot.vm().output_commits() {
                n.close();
            }
        }
        let msg = format!(
            "STALE: {holder} holds the VM's key (revision {revision}): it runs the VM now; this copy stays paused for good (remus destroy removes it)"
        );
        tracing::error!(vm = %self.vm, %holder, revision, "{msg}");
        self.publish(slot, "stale", &msg);
        slot.notice(crate::observe::Notice::Stale { reason: msg });
        {
            let mut st = lock(&self.state);
            st.tenure = Tenure::Stale;
            st.holder = holder;
            st.revision = revision;
            st.lease = None;
            st.fence_at = None;
        }
        self.finish();
    }

    fn failed(&self, e: &ArbiterError) {
        let mut st = lock(&self.state);
        if st.error.is_none() {
            tracing::warn!(vm = %self.vm, error = %e, "arbiter: etcd call failed; retrying");
        }
        st.error = Some(e.to_string());
    }

    fn finish(&self) {
        lock(&self.state).done = true;
        self.cv.notify_all();
    }
}

/// Why a standby may not take a VM over ([`take_over`]).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TakeOverRefused {
    /// Another host holds the key pinned: it runs the VM unprotected.
    #[error(
        "the arbiter says {holder} runs the VM unprotected (key pinned at revision {revision})"
    )]
    RunsElsewhere { holder: String, revision: i64 },
    /// etcd did not grant the key within the window: the primary's lease
    /// is still being renewed, or etcd cannot be reached.
    #[error("the arbiter did not let this host take the VM within {window:?} ({last})")]
    NotGranted { window: Duration, last: String },
}

/// The fast takeover's terms: the primary's tenure as its session setup
/// named it ([`remus_proto::setup::ArbiterSetup::fast_takeover`]).
#[derive(Debug, Clone, Copy)]
pub struct FromTenure {
    /// The revision the primary's key was written at.
    pub revision: i64,
    /// How long to wait before taking the key (see [`grace`]).
    pub grace: Duration,
}

/// How long a backup that lost its primary by silence waits before it
/// takes the key from the primary's tenure: a primary alive behind a cut
/// link notices the loss by the same timeout and pins its key at once, so
/// it keeps the VM (no needless failover); a primary that is gone loses
/// this much more. The session's timeout, within 250 ms to 1 s. None for
/// a closed connection: a primary whose process died closes it.
pub fn grace(timeout: Duration, silent: bool) -> Duration {
    if silent {
        timeout.clamp(Duration::from_millis(250), Duration::from_secs(1))
    } else {
        Duration::ZERO
    }
}

/// The backup, having lost its primary: takes the VM's key within the
/// takeover window. With `from` (the session allowed it), first from the
/// primary's tenure at once, after the grace: that wins unless the
/// primary pinned (or re-took) its key first. Otherwise, or once the key
/// has changed since the session began, by waiting for the primary's
/// lease to lapse. `Err` says why the copy must not run.
pub fn take_over(
    arb: &AgentArbiter,
    vm: &str,
    from: Option<FromTenure>,
) -> Result<Lease, TakeOverRefused> {
    let t = Instant::now();
    let deadline = t + arb.takeover_window();
    if let Some(f) = from.filter(|f| !f.grace.is_zero()) {
        tracing::info!(
            vm,
            grace_ms = f.grace.as_millis() as u64,
            revision = f.revision,
            "the primary went silent: waiting the grace before taking its key, so that a primary alive behind a cut link keeps the VM"
        );
        std::thread::sleep(f.grace);
    }
    let mut fast = from;
    loop {
        // Each try either settles it or fails with etcd's error.
        let failed = match fast {
            Some(f) => match arb.arb.take_from(vm, f.revision, arb.ttl, arb.margin) {
                Ok(Ok(l)) => {
                    tracing::warn!(
                        vm,
                        lease = format!("{:x}", l.id),
                        from_revision = f.revision,
                        revision = l.revision,
                        waited_ms = t.elapsed().as_millis() as u64,
                        "arbiter: took the VM's key from the primary's tenure without waiting for its lease (nobody had written it since the session began): this host may run it"
                    );
                    return Ok(l);
                }
                Ok(Err(Some(h))) if h.lease == 0 && h.host != arb.arb.host() => {
                    return Err(TakeOverRefused::RunsElsewhere {
                        holder: h.host,
                        revision: h.revision,
                    });
                }
                Ok(Err(now)) => {
                    tracing::warn!(vm, from_revision = f.revision, now = ?now, "arbiter: the VM's key changed since the session began; waiting for its holder's lease to lapse instead");
                    fast = None;
                    continue;
                }
                Err(e) => e,
            },
            None => match arb.arb.acquire(vm, arb.ttl, arb.margin) {
                Ok(l) => {
                    tracing::warn!(
                        vm,
                        lease = format!("{:x}", l.id),
                        revision = l.revision,
                        waited_ms = t.elapsed().as_millis() as u64,
                        "arbiter: took the VM's key (the primary's lease had lapsed): this host may run it"
                    );
                    return Ok(l);
                }
                Err(ArbiterError::HeldByOther {
                    holder,
                    lease: 0,
                    revision,
                    ..
                }) => return Err(TakeOverRefused::RunsElsewhere { holder, revision }),
                Err(e) => e,
            },
        };
        if Instant::now() >= deadline {
            return Err(TakeOverRefused::NotGranted {
                window: arb.takeover_window(),
                last: failed.to_string(),
            });
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Where the VM runs after a switch-over the backup did not confirm
/// ([`reclaim`]).
pub enum Reclaimed {
    /// The key is pinned to this host now (at this revision): the backup
    /// had not taken it, and cannot any more. The VM may run here.
    Here(i64),
    /// Another host holds the key: it took the VM over.
    There { holder: String, revision: i64 },
}

/// After a planned switch-over that the backup did not confirm, or
/// refused: the arbiter decides where the VM runs. Takes the key, pinned,
/// if it is absent or still this host's; etcd serialises this with the
/// backup's takeover, so exactly one of the two gets it.
///
/// The backup holds the key while it takes the VM over, on a lease of its
/// own, and pins it once the VM runs there (or gives the lease back if it
/// could not resume it). So a key pinned to the backup means it runs the
/// VM; a key it holds on a lease means so only once that lease has lived
/// longer than a takeover window (somebody renews it: only a running
/// copy's keeper does); until then this host asks again. Retries while
/// etcd does not answer (the VM stays fenced meanwhile) until `give_up`
/// says so (None).
pub fn reclaim(arb: &AgentArbiter, vm: &str, give_up: &dyn Fn() -> bool) -> Option<Reclaimed> {
    let mut said = false;
    let mut leased_since: Option<(String, Instant)> = None;
    loop {
        match arb.arb.pin(vm, None) {
            Ok(revision) => return Some(Reclaimed::Here(revision)),
            Err(ArbiterError::HeldByOther {
                holder,
                lease,
                revision,
                ..
            }) => {
                let since = match &leased_since {
                    Some((h, t)) if *h == holder => *t,
                    _ => Instant::now(),
                };
                if lease == 0 || since.elapsed() >= arb.takeover_window() {
                    return Some(Reclaimed::There { holder, revision });
                }
                leased_since = Some((holder, since));
            }
            Err(e) => {
                if !said {
                    tracing::error!(vm, error = %e, "arbiter: cannot learn who runs the VM after the switch-over; it stays paused here, retrying");
                    said = true;
                }
            }
        }
        if give_up() {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

impl Guard {
    /// A key already pinned to this host (nothing to keep).
    pub fn pinned(arb: &Arc<AgentArbiter>, slot: &dyn Guarded, revision: i64) -> Arc<Guard> {
        Arc::new(Guard {
            vm: slot.vm().name().to_string(),
            arb: arb.clone(),
            state: Mutex::new(State {
                want: Want::Pin,
                tenure: Tenure::Pinned,
                holder: arb.arb.host().to_string(),
                revision,
                lease: None,
                fence_at: None,
                error: None,
                done: true,
                handed_over: false,
            }),
            cv: Condvar::new(),
        })
    }
}

/// The backup, after resuming: keeps the lease it took until the key is
/// pinned (the VM now runs here unprotected).
pub fn keep_taken(
    arb: &Arc<AgentArbiter>,
    slot: &Arc<impl Guarded + 'static>,
    lease: Lease,
) -> Arc<Guard> {
    Guard::start(arb, slot, lease, Want::Pin)
}
