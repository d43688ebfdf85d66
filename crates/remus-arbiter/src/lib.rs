//! Split-brain protection: an etcd v3 lease per VM names the one host
//! allowed to run it (issue 9; `docs/arbiter-plan.md`).
//!
//! A VM's key `PREFIX/vms/NAME/runner` holds the name of the host that may
//! run it, attached to a lease of that host's. The holder renews the lease
//! while it runs the VM; the key disappears when the lease expires, and
//! only then can another host create it (a transaction that succeeds only
//! if the key does not exist).
//!
//! **Fencing on the holder's own clock.** etcd measures a lease from its
//! leader's last renewal; the holder cannot know exactly when that was, but
//! it knows when it *sent* each renewal, which is before. So after every
//! successful renewal it computes its fence deadline: send time + TTL −
//! margin ([`Lease::renew`]). Past that instant, without a newer renewal,
//! it must have paused its VM: the lease may already be gone, and another
//! host may hold the key. etcd never lets a lease expire before its TTL has
//! run from the leader's last renewal (a new leader even extends leases to
//! a full TTL), so the holder stops before anyone else can start. A leader
//! cut off from its quorum keeps answering renewals for about a second
//! before stepping down (measured with etcd 3.4, see the plan): the
//! deadline is therefore kept on the holder's clock, never inferred from
//! an error.
//!
//! **Endpoints.** One client per endpoint, tried in order, each call with
//! a timeout: etcd-client's balanced multi-endpoint channel fails calls
//! while one member is down (upstream etcd-client issue 39).
//!
//! The API is blocking, for the agent's replication threads; a small
//! tokio runtime of the arbiter's own runs the gRPC calls.
//!
//! Deadlines are `Instant`s (CLOCK_MONOTONIC), which stop while the host
//! is suspended: a host that suspends while holding a lease would wake
//! past etcd's expiry believing it still holds it. Suspending an agent's
//! host is not supported (as for any Remus host: its peer fails over).

use std::time::{Duration, Instant};

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, LeaseKeepAliveStream, LeaseKeeper, PutOptions, Txn,
    TxnOp, TxnOpResponse,
};

/// What went wrong talking to the arbiter.
#[derive(Debug, thiserror::Error)]
pub enum ArbiterError {
    #[error("no etcd endpoint answered ({tried}): {last}")]
    Unreachable { tried: String, last: String },
    #[error("{vm} is held by {holder} (lease {lease:x}, revision {revision})")]
    HeldByOther {
        vm: String,
        holder: String,
        lease: i64,
        revision: i64,
    },
    #[error("lease {lease:x} of {vm} has expired")]
    Expired { vm: String, lease: i64 },
    #[error("bad arbiter configuration: {0}")]
    Config(String),
    #[error("{0}")]
    Runtime(String),
}

/// An agent's arbiter settings.
#[derive(Debug, Clone)]
pub struct ArbiterConfig {
    /// etcd client URLs, e.g. `http://192.0.2.10:2379`.
    pub endpoints: Vec<String>,
    /// Key prefix, e.g. `/remus`.
    pub prefix: String,
    /// Timeout of each call to one endpoint.
    pub call_timeout: Duration,
    /// TLS settings for `https://` endpoints.
    pub tls: Option<etcd_client::TlsOptions>,
}

/// PEM files for talking TLS to etcd: the CA that signed the members'
/// certificates, and this host's client certificate and key when etcd
/// asks for one (`--client-cert-auth`).
#[derive(Debug, Clone, Default)]
pub struct TlsFiles {
    pub ca: Option<std::path::PathBuf>,
    pub cert: Option<std::path::PathBuf>,
    pub key: Option<std::path::PathBuf>,
}

impl ArbiterConfig {
    pub fn new(endpoints: Vec<String>, prefix: &str) -> Result<ArbiterConfig, ArbiterError> {
        if endpoints.is_empty() {
            return Err(ArbiterError::Config("no etcd endpoint given".into()));
        }
        for e in &endpoints {
            if !(e.starts_with("http://") || e.starts_with("https://")) {
                return Err(ArbiterError::Config(format!(
                    "endpoint '{e}' is not an http:// or https:// URL"
                )));
            }
        }
        let prefix = prefix.trim_end_matches('/');
        if prefix.is_empty() || !prefix.starts_with('/') {
            return Err(ArbiterError::Config(format!(
                "key prefix '{prefix}' must start with '/' and not be '/' alone"
            )));
        }
        Ok(ArbiterConfig {
            endpoints,
            prefix: prefix.to_string(),
            call_timeout: Duration::from_millis(500),
            tls: None,
        })
    }

    /// Uses TLS with these files (read now: a missing or unreadable file
    /// is an error naming it). Every endpoint must then be `https://`.
    pub fn with_tls(mut self, files: &TlsFiles) -> Result<ArbiterConfig, ArbiterError> {
        let read = |p: &std::path::Path, what: &str| {
            std::fs::read(p).map_err(|e| {
                ArbiterError::Config(format!("arbiter TLS {what} {}: {e}", p.display()))
            })
        };
        if let Some(e) = self.endpoints.iter().find(|e| !e.starts_with("https://")) {
            return Err(ArbiterError::Config(format!(
                "TLS files were given but endpoint '{e}' is not https://"
            )));
        }
        let mut tls = etcd_client::TlsOptions::new();
        if let Some(ca) = &files.ca {
            tls = tls.ca_certificate(etcd_client::Certificate::from_pem(read(ca, "CA")?));
        }
        match (&files.cert, &files.key) {
            (Some(c), Some(k)) => {
                tls = tls.identity(etcd_client::Identity::from_pem(
                    read(c, "certificate")?,
                    read(k, "key")?,
                ));
            }
            (None, None) => {}
            _ => {
                return Err(ArbiterError::Config(
                    "a client certificate needs its key and the key its certificate".into(),
                ));
            }
        }
        self.tls = Some(tls);
        Ok(self)
    }

    /// The key naming the host that may run `vm`.
    pub fn runner_key(&self, vm: &str) -> String {
        format!("{}/vms/{vm}/runner", self.prefix)
    }
}

/// Who holds a VM's key, as etcd says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub host: String,
    pub lease: i64,
    /// The revision that created the key: it identifies this tenure.
    pub revision: i64,
}

/// A connection to the etcd cluster, on behalf of one host.
pub struct Arbiter {
    cfg: ArbiterConfig,
    host: String,
    rt: tokio::runtime::Runtime,
}

impl Arbiter {
    /// An arbiter for `host` (the name written into the keys it takes).
    /// Connects lazily: this fails only on a bad configuration.
    pub fn new(cfg: ArbiterConfig, host: &str) -> Result<Arbiter, ArbiterError> {
        if host.is_empty() {
            return Err(ArbiterError::Config("empty host name".into()));
        }
        // One worker drives the connections; every calling thread blocks
        // on its own call (several VMs' keepers call at once).
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("arbiter-io")
            .enable_all()
            .build()
            .map_err(|e| ArbiterError::Runtime(format!("start the arbiter's runtime: {e}")))?;
        Ok(Arbiter {
            cfg,
            host: host.to_string(),
            rt,
        })
    }

    pub fn host(&self) -> &str {
        &self.host
    }

    pub fn config(&self) -> &ArbiterConfig {
        &self.cfg
    }

    /// Runs `op` against each endpoint in turn until one answers within
    /// the call timeout.
    fn call<T, F, Fut>(&self, what: &str, op: F) -> Result<T, ArbiterError>
    where
        F: FnMut(Client) -> Fut,
        Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        self.call_at(what, op).map(|(v, _)| v)
    }

    /// [`Arbiter::call`], also saying which endpoint answered.
    fn call_at<T, F, Fut>(&self, what: &str, mut op: F) -> Result<(T, String), ArbiterError>
    where
        F: FnMut(Client) -> Fut,
        Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        let t = self.cfg.call_timeout;
        let mut last = String::new();
        for ep in &self.cfg.endpoints {
            let r = self.rt.block_on(async {
                let mut opts = ConnectOptions::new()
                    .with_connect_timeout(t)
                    .with_timeout(t);
                if let Some(tls) = &self.cfg.tls {
                    opts = opts.with_tls(tls.clone());
                }
                let client = tokio::time::timeout(t, Client::connect([ep.as_str()], Some(opts)))
                    .await
                    .map_err(|_| format!("{ep}: connect timed out after {t:?}"))?
                    .map_err(|e| format!("{ep}: {e}"))?;
                tokio::time::timeout(t, op(client))
                    .await
                    .map_err(|_| format!("{ep}: {what} timed out after {t:?}"))?
                    .map_err(|e| format!("{ep}: {what}: {e}"))
            });
            match r {
                Ok(v) => return Ok((v, ep.clone())),
                Err(e) => {
                    tracing::debug!(endpoint = %ep, error = %e, "etcd call failed; trying the next endpoint");
                    last = e;
                }
            }
        }
        Err(ArbiterError::Unreachable {
            tried: self.cfg.endpoints.join(", "),
            last,
        })
    }

    /// The first endpoint that answers a linearizable read (which needs
    /// the cluster's quorum: a member cut off from it still answers a
    /// status request, so that would say nothing).
    pub fn health(&self) -> Result<String, ArbiterError> {
        let key = format!("{}/health", self.cfg.prefix);
        self.call_at("read", |mut c| {
            let key = key.clone();
            async move { c.get(key, None).await }
        })
        .map(|(_, ep)| ep)
    }

    /// Who holds `vm`'s key now, if anyone.
    pub fn holder(&self, vm: &str) -> Result<Option<Holder>, ArbiterError> {
        let key = self.cfg.runner_key(vm);
        let resp = self.call("get", |mut c| {
            let key = key.clone();
            async move { c.get(key, None).await }
        })?;
        Ok(resp.kvs().first().map(Holder::of))
    }

    /// Takes `vm`'s key with a new lease of `ttl` (whole seconds, at least
    /// one) if nobody holds it, or if this host does (an earlier tenure of
    /// its own, leased or pinned). Another holder is an error naming it.
    /// The fence deadline counts from the moment the grant was sent, less
    /// `margin`.
    pub fn acquire(
        &self,
        vm: &str,
        ttl: Duration,
        margin: Duration,
    ) -> Result<Lease, ArbiterError> {
        let ttl_s = ttl.as_secs().max(1) as i64;
        let sent = Instant::now();
        let grant = self.call("lease grant", |mut c| async move {
            c.lease_grant(ttl_s, None).await
        })?;
        let id = grant.id();
        let revision = match self.take(vm, id) {
            Ok(r) => r,
            Err(e) => {
                let _ = self.revoke(id);
                return Err(e);
            }
        };
        tracing::info!(vm, lease = format!("{id:x}"), revision, ttl_s, host = %self.host, "took the VM's arbiter key");
        Ok(Lease {
            vm: vm.to_string(),
            id,
            ttl: Duration::from_secs(ttl_s as u64),
            revision,
            fence_at: sent + Duration::from_secs(ttl_s as u64).saturating_sub(margin),
            stream: None,
        })
    }

    /// Pins `vm`'s key to this host without a lease: the VM runs here
    /// unprotected and nobody may take it over by waiting (the key never
    /// expires). Succeeds if the key is this host's (under any lease) or
    /// absent; then revokes lease `revoke`, if given. Returns the revision
    /// of the write.
    pub fn pin(&self, vm: &str, revoke: Option<i64>) -> Result<i64, ArbiterError> {
        let revision = self.take(vm, 0)?;
        if let Some(id) = revoke {
            // The key no longer uses it; a failed revoke only lets it lapse.
            let _ = self.revoke(id);
        }
        tracing::info!(vm, revision, host = %self.host, "pinned the VM's arbiter key to this host (runs unprotected)");
        Ok(revision)
    }

    /// Deletes `vm`'s key if this host holds it (the VM is gone from
    /// here). Returns whether a key of ours was deleted.
    pub fn clear(&self, vm: &str) -> Result<bool, ArbiterError> {
        let key = self.cfg.runner_key(vm);
        let host = self.host.clone();
        let resp = self.call("delete the VM's key", |mut c| {
            let (key, host) = (key.clone(), host.clone());
            async move {
                let txn = Txn::new()
                    .when([Compare::value(key.clone(), CompareOp::Equal, host)])
                    .and_then([TxnOp::delete(key, None)]);
                c.txn(txn).await
            }
        })?;
        if resp.succeeded() {
            tracing::info!(vm, host = %self.host, "deleted the VM's arbiter key");
        }
        Ok(resp.succeeded())
    }

    /// The etcd cluster's ID: two agents that must agree on a VM's runner
    /// check that they talk to the same cluster.
    pub fn cluster_id(&self) -> Result<u64, ArbiterError> {
        let s = self.call("status", |mut c| async move { c.status().await })?;
        s.header()
            .map(|h| h.cluster_id())
            .ok_or_else(|| ArbiterError::Runtime("etcd status without a header".into()))
    }

    /// Makes `vm`'s key this host's, on lease `lease` (0: no lease), if it
    /// is absent or already this host's. Returns the write's revision.
    fn take(&self, vm: &str, lease: i64) -> Result<i64, ArbiterError> {
        let key = self.cfg.runner_key(vm);
        // Absent, or ours at the mod revision last seen. A key that keeps
        // changing between tries is contended: give up after three.
        let mut ours_at: Option<i64> = None;
        for _ in 0..3 {
            let cond = match ours_at {
                None => Compare::create_revision(key.clone(), CompareOp::Equal, 0),
                Some(modrev) => Compare::mod_revision(key.clone(), CompareOp::Equal, modrev),
            };
            let host = self.host.clone();
            let resp = self.call("take the VM's key", |mut c| {
                let (key, host, cond) = (key.clone(), host.clone(), cond.clone());
                async move {
                    let opts = (lease != 0).then(|| PutOptions::new().with_lease(lease));
                    let txn = Txn::new()
                        .when([cond])
                        .and_then([TxnOp::put(key.clone(), host, opts)])
                        .or_else([TxnOp::get(key, None)]);
                    c.txn(txn).await
                }
            })?;
            let now = holder_of(&resp);
            // A retry on another endpoint after a timeout can find the
            // write of our own first attempt: that is success.
            let ours_now = now
                .as_ref()
                .is_some_and(|(h, _)| h.host == self.host && h.lease == lease);
            if resp.succeeded() || ours_now {
                let revision = match (resp.succeeded(), now) {
                    (false, Some((_, modrev))) => modrev,
                    _ => resp.header().map(|h| h.revision()).unwrap_or(0),
                };
                return Ok(revision);
            }
            match now {
                Some((h, modrev)) if h.host == self.host => ours_at = Some(modrev),
                Some((h, _)) => {
                    return Err(ArbiterError::HeldByOther {
                        vm: vm.to_string(),
                        holder: h.host,
                        lease: h.lease,
                        revision: h.revision,
                    });
                }
                // Gone since we looked: try "absent" again.
                None => ours_at = None,
            }
        }
        Err(ArbiterError::Runtime(format!(
            "the key of {vm} kept changing while this host tried to take it"
        )))
    }

    /// Renews `lease` once. On success returns the new fence deadline:
    /// the send time of this renewal + TTL − `margin`.
    pub fn renew(&self, lease: &mut Lease, margin: Duration) -> Result<Instant, ArbiterError> {
        let sent = Instant::now();
        let id = lease.id;
        let t = self.cfg.call_timeout;
        // Reuse the keep-alive stream while it works; on any error start
        // a new one on the next endpoint that answers.
        if let Some((keeper, stream)) = lease.stream.as_mut() {
            let r = self.rt.block_on(async {
                tokio::time::timeout(t, async {
                    keeper.keep_alive().await?;
                    stream.message().await
                })
                .await
            });
            if let Ok(Ok(Some(m))) = r {
                return lease.renewed(m.ttl(), sent, margin);
            }
            lease.stream = None;
        }
        let (keeper, stream, ttl) = self.call("lease keep-alive", |mut c| async move {
            let (mut keeper, mut stream) = c.lease_keep_alive(id).await?;
            keeper.keep_alive().await?;
            let ttl = match stream.message().await? {
                Some(m) => m.ttl(),
                // A closed stream says nothing about the lease: try the
                // next endpoint rather than call it expired.
                None => {
                    return Err(etcd_client::Error::LeaseKeepAliveError(
                        "keep-alive stream closed without an answer".into(),
                    ));
                }
            };
            Ok((keeper, stream, ttl))
        })?;
        lease.stream = Some((keeper, stream));
        lease.renewed(ttl, sent, margin)
    }

    /// Gives the key up at once (orderly stop or handover).
    pub fn release(&self, lease: Lease) -> Result<(), ArbiterError> {
        let id = lease.id;
        self.revoke(id)?;
        tracing::info!(vm = %lease.vm, lease = format!("{id:x}"), "released the VM's arbiter key");
        Ok(())
    }

    /// Revokes lease `id` (its keys go with it).
    fn revoke(&self, id: i64) -> Result<(), ArbiterError> {
        self.call(
            "lease revoke",
            |mut c| async move { c.lease_revoke(id).await },
        )
        .map(|_| ())
    }
}

impl Holder {
    fn of(kv: &etcd_client::KeyValue) -> Holder {
        Holder {
            host: String::from_utf8_lossy(kv.value()).into_owned(),
            lease: kv.lease(),
            revision: kv.create_revision(),
        }
    }
}

/// The holder a transaction's `get` found, with the key's mod revision.
fn holder_of(resp: &etcd_client::TxnResponse) -> Option<(Holder, i64)> {
    resp.op_responses().into_iter().find_map(|r| match r {
        TxnOpResponse::Get(g) => g
            .kvs()
            .first()
            .map(|kv| (Holder::of(kv), kv.mod_revision())),
        _ => None,
    })
}

/// A held VM key: the lease behind it and the fence deadline.
pub struct Lease {
    pub vm: String,
    pub id: i64,
    pub ttl: Duration,
    /// The etcd revision at which this tenure began.
    pub revision: i64,
    fence_at: Instant,
    stream: Option<(LeaseKeeper, LeaseKeepAliveStream)>,
}

impl Lease {
    /// The last instant at which this host may still run the VM.
    pub fn fence_at(&self) -> Instant {
        self.fence_at
    }

    fn renewed(
        &mut self,
        ttl_s: i64,
        sent: Instant,
        margin: Duration,
    ) -> Result<Instant, ArbiterError> {
        if ttl_s <= 0 {
            return Err(ArbiterError::Expired {
                vm: self.vm.clone(),
                lease: self.id,
            });
        }
        let deadline = sent + Duration::from_secs(ttl_s as u64).saturating_sub(margin);
        // Never move the deadline back (a slow answer to an old renewal).
        self.fence_at = self.fence_at.max(deadline);
        Ok(self.fence_at)
    }
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("vm", &self.vm)
            .field("id", &format_args!("{:x}", self.id))
            .field("revision", &self.revision)
            .finish_non_exhaustive()
    }
}
