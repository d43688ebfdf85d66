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
//! Each endpoint's client is kept and reused (with authentication, a new
//! client would log in again: a bcrypt check and a raft round on etcd's
//! side); it is dropped after any failed call and made again on the next.
//!
//! **Security.** Over `http://` anyone on the network between the agents
//! and etcd can read and forge the VMs' keys, and so decide where a VM
//! runs: [`ArbiterConfig::plaintext_warning`] says so once. With
//! `https://` endpoints the arbiter trusts only the CA it is given
//! ([`ArbiterConfig::with_tls`]) and can show a client certificate (etcd's
//! `--client-cert-auth`); with etcd's authentication on it logs in as a
//! user ([`ArbiterConfig::with_user`]) whose role should grant read and
//! write on the prefix only. Refusals come back as typed errors naming
//! the endpoint, the file or the user ([`ArbiterError::Tls`],
//! [`ArbiterError::AuthFailed`], [`ArbiterError::PermissionDenied`]),
//! never the password.
//!
//! The API is blocking, for the agent's replication threads; a small
//! tokio runtime of the arbiter's own runs the gRPC calls.
//!
//! Deadlines are `Instant`s (CLOCK_MONOTONIC), which stop while the host
//! is suspended: a host that suspends while holding a lease would wake
//! past etcd's expiry believing it still holds it. Suspending an agent's
//! host is not supported (as for any Remus host: its peer fails over).

mod auth;
mod tls;

use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, LeaseKeepAliveStream, LeaseKeeper, PutOptions, Txn,
    TxnOp, TxnOpResponse,
};

pub use auth::{Credentials, Password};
pub use tls::Tls;

/// What went wrong talking to the arbiter.
#[derive(Debug, thiserror::Error)]
pub enum ArbiterError {
    #[error("no etcd endpoint answered ({tried}): {last}")]
    Unreachable { tried: String, last: String },
    /// No endpoint answered, and TLS failed with this one (the first such).
    #[error("TLS with etcd endpoint {endpoint} failed: {reason}")]
    Tls { endpoint: String, reason: String },
    /// etcd refused to log this user in (wrong password, no such user, or
    /// authentication off).
    #[error("etcd endpoint {endpoint} refused user '{user}': {reason}")]
    AuthFailed {
        endpoint: String,
        user: String,
        reason: String,
    },
    /// etcd refused an operation: the user's role does not cover the
    /// prefix, or authentication is on and no user was given.
    #[error("{}", denied(endpoint, user.as_deref(), what, prefix))]
    PermissionDenied {
        endpoint: String,
        user: Option<String>,
        what: String,
        prefix: String,
    },
    #[error("arbiter password file {}: {reason}", path.display())]
    PasswordFile { path: PathBuf, reason: String },
    #[error("arbiter TLS {what} file {}: {reason}", path.display())]
    TlsFile {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
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

fn denied(endpoint: &str, user: Option<&str>, what: &str, prefix: &str) -> String {
    match user {
        Some(u) => format!(
            "etcd endpoint {endpoint}: user '{u}' may not {what} (permission denied): its role \
             needs read and write on the keys under {prefix}/ (etcdctl role grant-permission \
             ROLE readwrite {prefix}/ --prefix=true)"
        ),
        None => format!(
            "etcd endpoint {endpoint}: {what}: permission denied: etcd has authentication on; \
             give the arbiter a user (--arbiter-user, --arbiter-password-file)"
        ),
    }
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
    /// TLS settings, needed by `https://` endpoints.
    pub tls: Option<Tls>,
    /// The user to log in as when etcd has authentication on.
    pub auth: Option<Credentials>,
}

/// PEM files for talking TLS to etcd: the CA that signed the members'
/// certificates (required: the arbiter trusts no other), and this host's
/// client certificate and key when etcd asks for one
/// (`--client-cert-auth`).
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
            auth: None,
        })
    }

    /// Uses TLS with these files, read and checked now (the CA is
    /// required; a certificate needs its key): errors name the file.
    /// Every endpoint must then be `https://`.
    pub fn with_tls(mut self, files: &TlsFiles) -> Result<ArbiterConfig, ArbiterError> {
        if let Some(e) = self.endpoints.iter().find(|e| !e.starts_with("https://")) {
            return Err(ArbiterError::Config(format!(
                "TLS files (--arbiter-ca, --arbiter-cert) were given but endpoint '{e}' is \
                 plain http: use https:// for every endpoint"
            )));
        }
        self.tls = Some(Tls::load(files)?);
        Ok(self)
    }

    /// Logs in to etcd as `user` (etcd's authentication on).
    pub fn with_user(
        mut self,
        user: &str,
        password: Password,
    ) -> Result<ArbiterConfig, ArbiterError> {
        if user.is_empty() || user.chars().any(char::is_control) {
            return Err(ArbiterError::Config(format!(
                "etcd user name {user:?} is empty or has control characters"
            )));
        }
        self.auth = Some(Credentials {
            user: user.to_string(),
            password,
        });
        Ok(self)
    }

    /// The one warning a configuration with `http://` endpoints deserves
    /// (none without): they are not encrypted, so whoever is on that
    /// network decides where VMs run (and reads the password, if any).
    pub fn plaintext_warning(&self) -> Option<String> {
        let plain: Vec<&str> = self
            .endpoints
            .iter()
            .filter(|e| e.starts_with("http://"))
            .map(String::as_str)
            .collect();
        if plain.is_empty() {
            return None;
        }
        let (what, verb) = match plain.len() {
            1 => ("endpoint", "is"),
            _ => ("endpoints", "are"),
        };
        let password = match &self.auth {
            Some(c) => format!(", and read the password of etcd user '{}'", c.user),
            None => String::new(),
        };
        Some(format!(
            "arbiter {what} {} {verb} not encrypted: anyone on that network can read and forge \
             the VMs' ownership{password}; use https:// with --arbiter-ca",
            plain.join(", ")
        ))
    }

    /// Refuses `https://` endpoints without TLS settings (they would
    /// trust no CA and fail every handshake).
    fn check(&self) -> Result<(), ArbiterError> {
        if self.tls.is_none()
            && let Some(e) = self.endpoints.iter().find(|e| e.starts_with("https://"))
        {
            return Err(ArbiterError::Config(format!(
                "endpoint '{e}' is https:// but no CA was given (--arbiter-ca): the arbiter \
                 trusts only the CA that signed the etcd members' certificates"
            )));
        }
        Ok(())
    }

    /// etcd-client's options for a connection to `endpoint`.
    fn connect_options(&self, endpoint: &str) -> ConnectOptions {
        let t = self.call_timeout;
        let mut opts = ConnectOptions::new()
            .with_connect_timeout(t)
            .with_timeout(t);
        if let Some(tls) = &self.tls {
            opts = opts.with_tls(tls.options_for(url_host(endpoint), t));
        }
        if let Some(c) = &self.auth {
            // A kept client's token lapses (etcd's --auth-token-ttl, or a
            // restarted member): log in again rather than fail.
            opts = opts
                .with_user(c.user.clone(), c.password.expose())
                .with_auto_token_refresh(true);
        }
        opts
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
    /// Each endpoint's client, once connected (and logged in). Dropped
    /// before the runtime that drives them.
    clients: Mutex<Vec<Option<Client>>>,
    rt: tokio::runtime::Runtime,
}

/// Why one call to one endpoint failed.
enum Failure {
    Timeout(String),
    Etcd(&'static str, etcd_client::Error),
}

/// What a failure means for the call.
enum Verdict {
    /// etcd's own answer, the same from every member: stop here.
    Final(ArbiterError),
    /// A TLS failure with this endpoint: try the next.
    Tls(String),
    /// Down, slow or unreachable: try the next.
    Other(String),
}

/// The host of an `http(s)://HOST:PORT/...` URL, an IPv6 address without
/// its brackets (as a TLS server name wants it).
fn url_host(url: &str) -> &str {
    let authority = url_authority(url);
    match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(v6),
        None => authority.split(':').next().unwrap_or(authority),
    }
}

/// The `HOST:PORT` of a URL.
fn url_authority(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    rest.split('/').next().unwrap_or(rest)
}

/// `e` and its sources, one after the other.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(x) = cur {
        let t = x.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = x.source();
    }
    s
}

/// Whether `e` is etcd's own answer (a gRPC status without a local
/// cause), rather than a failure to reach it.
fn is_answer(e: &etcd_client::Error) -> bool {
    matches!(e, etcd_client::Error::GRpcStatus(s) if std::error::Error::source(s).is_none())
}

/// The error inside an etcd-client error, for its chain of sources.
fn inner(e: &etcd_client::Error) -> Option<&(dyn std::error::Error + 'static)> {
    match e {
        etcd_client::Error::GRpcStatus(s) => Some(s),
        etcd_client::Error::TransportError(t) => Some(t),
        etcd_client::Error::IoError(io) => Some(io),
        _ => None,
    }
}

impl Arbiter {
    /// An arbiter for `host` (the name written into the keys it takes).
    /// Connects lazily: this fails only on a bad configuration.
    pub fn new(cfg: ArbiterConfig, host: &str) -> Result<Arbiter, ArbiterError> {
        if host.is_empty() {
            return Err(ArbiterError::Config("empty host name".into()));
        }
        cfg.check()?;
        // One worker drives the connections; every calling thread blocks
        // on its own call (several VMs' keepers call at once).
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("arbiter-io")
            .enable_all()
            .build()
            .map_err(|e| ArbiterError::Runtime(format!("start the arbiter's runtime: {e}")))?;
        let clients = Mutex::new(vec![None; cfg.endpoints.len()]);
        Ok(Arbiter {
            cfg,
            host: host.to_string(),
            clients,
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

    /// [`Arbiter::call`], also saying which endpoint answered. etcd's
    /// refusals (login, permissions) end the call at once: every member
    /// would say the same.
    fn call_at<T, F, Fut>(&self, what: &str, mut op: F) -> Result<(T, String), ArbiterError>
    where
        F: FnMut(Client) -> Fut,
        Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        let t = self.cfg.call_timeout;
        let mut last = String::new();
        let mut tls_failed: Option<(String, String)> = None;
        for (i, ep) in self.cfg.endpoints.iter().enumerate() {
            let mut first = true;
            let failure = loop {
                let (r, kept) = self.rt.block_on(async {
                    let (client, kept) = match self.client(i).await {
                        Ok(c) => c,
                        Err(f) => return (Err(f), false),
                    };
                    let r = match tokio::time::timeout(t, op(client)).await {
                        Err(_) => Err(Failure::Timeout(format!("{what} timed out after {t:?}"))),
                        Ok(Err(e)) => Err(Failure::Etcd("call", e)),
                        Ok(Ok(v)) => Ok(v),
                    };
                    (r, kept)
                });
                let f = match r {
                    Ok(v) => return Ok((v, ep.clone())),
                    Err(f) => f,
                };
                self.forget(i);
                // A kept connection may have died since its last call (a
                // restarted member): once more on a new one, unless it
                // timed out or etcd itself answered.
                let local = matches!(&f, Failure::Etcd(_, e) if !is_answer(e));
                if !(first && kept && local) {
                    break f;
                }
                first = false;
            };
            match self.rt.block_on(self.verdict(ep, what, failure)) {
                Verdict::Final(e) => return Err(e),
                Verdict::Tls(reason) => {
                    tracing::debug!(endpoint = %ep, error = %reason, "TLS with etcd failed; trying the next endpoint");
                    last = format!("{ep}: {reason}");
                    tls_failed.get_or_insert((ep.clone(), reason));
                }
                Verdict::Other(e) => {
                    tracing::debug!(endpoint = %ep, error = %e, "etcd call failed; trying the next endpoint");
                    last = format!("{ep}: {e}");
                }
            }
        }
        if let Some((endpoint, reason)) = tls_failed {
            return Err(ArbiterError::Tls { endpoint, reason });
        }
        Err(ArbiterError::Unreachable {
            tried: self.cfg.endpoints.join(", "),
            last,
        })
    }

    fn clients(&self) -> MutexGuard<'_, Vec<Option<Client>>> {
        self.clients.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Endpoint `i`'s client: the kept one (`true`), or a new one (logged
    /// in, with a user), kept for the next calls.
    async fn client(&self, i: usize) -> Result<(Client, bool), Failure> {
        let cached = self.clients()[i].clone();
        if let Some(c) = cached {
            return Ok((c, true));
        }
        let t = self.cfg.call_timeout;
        let ep = &self.cfg.endpoints[i];
        let opts = self.cfg.connect_options(ep);
        let c = tokio::time::timeout(t, Client::connect([ep.as_str()], Some(opts)))
            .await
            .map_err(|_| Failure::Timeout(format!("connect timed out after {t:?}")))?
            .map_err(|e| Failure::Etcd("connect", e))?;
        self.clients()[i] = Some(c.clone());
        Ok((c, false))
    }

    /// Drops endpoint `i`'s client (after a failure): the next call
    /// connects again.
    fn forget(&self, i: usize) {
        self.clients()[i] = None;
    }

    /// What a failed call to `ep` means.
    async fn verdict(&self, ep: &str, what: &str, f: Failure) -> Verdict {
        let (stage, e) = match f {
            Failure::Timeout(m) => return Verdict::Other(m),
            Failure::Etcd(stage, e) => (stage, e),
        };
        let step = if stage == "connect" { "connect" } else { what };
        let source = inner(&e);
        if let (Some(tls), Some(r)) = (&self.cfg.tls, source.and_then(tls::rustls_error)) {
            return Verdict::Tls(tls.describe(r));
        }
        if let etcd_client::Error::GRpcStatus(s) = &e
            && is_answer(&e)
        {
            use tonic::Code;
            let msg = s.message();
            let user = self.cfg.auth.as_ref().map(|c| c.user.clone());
            let auth_failed = |reason: &str| {
                Verdict::Final(ArbiterError::AuthFailed {
                    endpoint: ep.to_string(),
                    user: user.clone().unwrap_or_default(),
                    reason: reason.to_string(),
                })
            };
            let code = s.code();
            if code == Code::InvalidArgument && msg.contains("authentication failed") {
                return auth_failed("wrong password, or no such user");
            }
            if code == Code::FailedPrecondition && msg.contains("authentication is not enabled") {
                return auth_failed(
                    "etcd has authentication off (etcdctl auth enable), so a user cannot log in",
                );
            }
            // With authentication on and no user given, etcd takes a
            // client certificate's CN as the user (and finds it may do
            // nothing), or without one has no name at all.
            if code == Code::PermissionDenied
                || (code == Code::InvalidArgument && msg.contains("user name is empty"))
            {
                return Verdict::Final(ArbiterError::PermissionDenied {
                    endpoint: ep.to_string(),
                    user,
                    what: step.to_string(),
                    prefix: self.cfg.prefix.clone(),
                });
            }
            return Verdict::Other(format!("{step}: {msg}"));
        }
        let said = format!("{step}: {}", source.map_or_else(|| e.to_string(), chain));
        // A member that refuses our client certificate just closes the
        // connection as tonic sees it: ask it ourselves why.
        if let Some(tls) = &self.cfg.tls
            && source.is_some()
            && let Some(reason) = tls
                .probe(url_host(ep), url_authority(ep), self.cfg.call_timeout)
                .await
        {
            return Verdict::Tls(reason);
        }
        Verdict::Other(said)
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
        let grant = self.grant(ttl)?;
        let revision = match self.take(vm, grant.id) {
            Ok(r) => r,
            Err(e) => {
                let _ = self.revoke(grant.id);
                return Err(e);
            }
        };
        tracing::info!(vm, lease = format!("{:x}", grant.id), revision, ttl_s = grant.ttl.as_secs(), host = %self.host, "took the VM's arbiter key");
        Ok(grant.lease(vm, revision, margin))
    }

    /// The fast takeover: takes `vm`'s key, on a new lease of this host,
    /// from the tenure that wrote it at `revision`, without waiting for
    /// that tenure's lease to lapse. etcd does it only if nobody has
    /// written the key since (its mod revision is still `revision`), in one
    /// transaction: if the tenure's holder pins or re-takes the key, or a
    /// third host takes it, this fails, and exactly one of the racers wins.
    ///
    /// `Ok(Err(_))`: the key is no longer at `revision`; the holder it has
    /// now, or `None` for no key at all.
    pub fn take_from(
        &self,
        vm: &str,
        revision: i64,
        ttl: Duration,
        margin: Duration,
    ) -> Result<Result<Lease, Option<Holder>>, ArbiterError> {
        let grant = self.grant(ttl)?;
        let key = self.cfg.runner_key(vm);
        let cond = Compare::mod_revision(key.clone(), CompareOp::Equal, revision);
        let put = self.put_if("take the VM's key from its tenure", &key, cond, grant.id);
        let written = match put {
            Ok(Ok(written)) => written,
            Ok(Err(now)) => {
                let _ = self.revoke(grant.id);
                return Ok(Err(now.map(|(h, _)| h)));
            }
            Err(e) => {
                let _ = self.revoke(grant.id);
                return Err(e);
            }
        };
        tracing::info!(vm, lease = format!("{:x}", grant.id), from_revision = revision, revision = written, ttl_s = grant.ttl.as_secs(), host = %self.host, "took the VM's arbiter key from the tenure at its revision");
        Ok(Ok(grant.lease(vm, written, margin)))
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
            match self.put_if("take the VM's key", &key, cond, lease)? {
                Ok(revision) => return Ok(revision),
                Err(Some((h, modrev))) if h.host == self.host => ours_at = Some(modrev),
                Err(Some((h, _))) => {
                    return Err(ArbiterError::HeldByOther {
                        vm: vm.to_string(),
                        holder: h.host,
                        lease: h.lease,
                        revision: h.revision,
                    });
                }
                // Gone since we looked: try "absent" again.
                Err(None) => ours_at = None,
            }
        }
        Err(ArbiterError::Runtime(format!(
            "the key of {vm} kept changing while this host tried to take it"
        )))
    }

    /// Writes `key` = this host, on lease `lease` (0: none), if `cond`
    /// holds, in one transaction. `Ok(revision)` of the write; otherwise
    /// the holder the key has now, with its mod revision (`None`: no key).
    fn put_if(
        &self,
        what: &str,
        key: &str,
        cond: Compare,
        lease: i64,
    ) -> Result<Result<i64, Option<(Holder, i64)>>, ArbiterError> {
        let host = self.host.clone();
        let resp = self.call(what, |mut c| {
            let (key, host, cond) = (key.to_string(), host.clone(), cond.clone());
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
        // A retry on another endpoint after a timeout can find the write
        // of our own first attempt: that is success.
        let ours_now = now
            .as_ref()
            .is_some_and(|(h, _)| h.host == self.host && h.lease == lease);
        Ok(match (resp.succeeded(), now) {
            (true, _) => Ok(resp.header().map(|h| h.revision()).unwrap_or(0)),
            (false, Some((_, modrev))) if ours_now => Ok(modrev),
            (false, now) => Err(now),
        })
    }

    /// A new lease of `ttl` (whole seconds, at least one), not yet on any
    /// key.
    fn grant(&self, ttl: Duration) -> Result<Grant, ArbiterError> {
        let ttl_s = ttl.as_secs().max(1) as i64;
        let sent = Instant::now();
        let grant = self.call("lease grant", |mut c| async move {
            c.lease_grant(ttl_s, None).await
        })?;
        Ok(Grant {
            id: grant.id(),
            ttl: Duration::from_secs(ttl_s as u64),
            sent,
        })
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

/// A lease just granted: its fence deadline counts from when the grant
/// was sent.
struct Grant {
    id: i64,
    ttl: Duration,
    sent: Instant,
}

impl Grant {
    /// The lease, now holding `vm`'s key (written at `revision`).
    fn lease(self, vm: &str, revision: i64, margin: Duration) -> Lease {
        Lease {
            vm: vm.to_string(),
            id: self.id,
            ttl: self.ttl,
            revision,
            fence_at: self.sent + self.ttl.saturating_sub(margin),
            stream: None,
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_http_draws_one_warning_naming_every_plain_endpoint() {
        let cfg = ArbiterConfig::new(
            vec![
                "http://192.0.2.1:2379".into(),
                "http://192.0.2.2:2379".into(),
            ],
            "/remus",
        )
        .unwrap();
        let w = cfg.plaintext_warning().expect("a warning");
        assert_eq!(w.lines().count(), 1);
        assert!(
            w.starts_with(
                "arbiter endpoints http://192.0.2.1:2379, http://192.0.2.2:2379 are not encrypted"
            ) && w.contains("use https:// with --arbiter-ca"),
            "{w}"
        );
        let cfg = cfg
            .with_user("remus", Password::new("hunter2").unwrap())
            .unwrap();
        let w = cfg.plaintext_warning().unwrap();
        assert!(
            w.contains("password of etcd user 'remus'") && !w.contains("hunter2"),
            "{w}"
        );
        assert!(
            !format!("{cfg:?}").contains("hunter2"),
            "Debug shows no password"
        );
        let https = ArbiterConfig::new(vec!["https://192.0.2.1:2379".into()], "/remus").unwrap();
        assert_eq!(https.plaintext_warning(), None);
    }

    #[test]
    fn user_names_are_checked() {
        let cfg = || ArbiterConfig::new(vec!["http://192.0.2.1:2379".into()], "/remus").unwrap();
        let pw = || Password::new("x").unwrap();
        assert!(cfg().with_user("", pw()).is_err());
        assert!(cfg().with_user("re\nmus", pw()).is_err());
        assert!(cfg().with_user("remus", pw()).is_ok());
        assert!(Password::new("").is_err());
    }

    #[test]
    fn url_hosts_lose_ports_and_brackets() {
        assert_eq!(url_host("https://192.0.2.1:2379"), "192.0.2.1");
        assert_eq!(url_host("https://[2001:db8::1]:2379/"), "2001:db8::1");
        assert_eq!(url_host("https://etcd1.example:2379"), "etcd1.example");
        assert_eq!(url_host("https://etcd1"), "etcd1");
        assert_eq!(url_authority("https://[::1]:2379/x"), "[::1]:2379");
    }
}
