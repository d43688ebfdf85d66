//! The agent's local API: HTTP/1.1 with JSON bodies over the agent's unix
//! socket, so that `curl --unix-socket /run/remus/remusd.sock
//! http://remus/v1/vms` works as well as the `remus` CLI does.
//!
//! | method | path                              | body / answer                  |
//! |--------|-----------------------------------|--------------------------------|
//! | GET    | /v1/host                          | → [`HostInfo`]                 |
//! | GET    | /v1/vms                           | → `[VmInfo]`                   |
//! | POST   | /v1/vms                           | [`CreateRequest`] → [`VmInfo`] |
//! | GET    | /v1/vms/NAME                      | → [`VmInfo`]                   |
//! | POST   | /v1/vms/NAME/pause                | → [`VmInfo`]                   |
//! | POST   | /v1/vms/NAME/unpause              | → [`VmInfo`]                   |
//! | DELETE | /v1/vms/NAME                      | → 204                          |
//! | POST   | /v1/vms/NAME/vcpu-pin             | [`PinRequest`] → `[VcpuInfo]`  |
//! | GET    | /v1/vms/NAME/vcpus                | → `[VcpuInfo]`                 |
//! | GET    | /v1/vms/NAME/console/log          | → the console output so far    |
//! | GET    | /v1/vms/NAME/console (Upgrade)    | → 101, then raw console bytes  |
//!
//! Errors are `{"error": "..."}` with 400 (bad input), 404 (no such VM),
//! 409 (conflict: name taken, console attached, wrong state) or 500.

use std::path::{Path, PathBuf};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize, de::DeserializeOwned};

pub use remus_config::VmConfig;

pub mod events;
pub mod rate;
pub use events::{
    CheckpointStats, DiskSyncProgress, DiskSyncStats, MigrateStats, PausePhases, SessionEvent,
    SyncMode,
};

/// Longest line of a session's event stream the client accepts.
const MAX_EVENT_LINE: usize = 1 << 20;

/// One event as streamed by the agent: decoded, and the line it came in
/// (for `--json`, which passes the agent's lines on as they are).
#[derive(Debug, Clone)]
pub struct Streamed {
    pub event: SessionEvent,
    pub line: String,
}

/// Default agent socket.
pub const DEFAULT_SOCKET: &str = "/run/remus/remusd.sock";
/// The `Upgrade:` protocol name of an interactive console.
pub const CONSOLE_UPGRADE: &str = "remus-console";

/// One VM as `remus list` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmInfo {
    pub name: String,
    pub id: u32,
    pub mem_mib: u64,
    pub vcpus: u32,
    /// xl state letter: r b p s c d.
    pub state: String,
    /// Long form of the state (running, blocked, paused, ...).
    pub state_name: String,
    /// unprotected, primary or backup.
    pub role: String,
    /// CPU seconds used.
    pub time_s: f64,
    /// tcg or kvm.
    pub accel: String,
    /// QEMU's pid on this host.
    pub pid: u32,
    /// Why the VM crashed (state `c`): what happened, how long after its
    /// start, and QEMU's last error line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crash: Option<String>,
    /// The protection or migration session, while one runs here (as
    /// primary or source).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protection: Option<ProtectionInfo>,
    /// Disks recording changed chunks since a failover here: target →
    /// chunks (64 KiB) changed so far.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub changed_chunks: std::collections::BTreeMap<String, u64>,
    /// The arbiter's view of this VM (agents with `--arbiter`, once this
    /// host has claimed the VM's key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arbiter: Option<ArbiterInfo>,
    /// The backup protection of this VM is wanted to (`remus protect`
    /// recorded it; the agent sets it up again when it is lost), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wanted: Option<String>,
    /// Set while the VM waits for a cluster manager's `remus takeover`
    /// (`remusd --failover-by cluster`): why. A standby (role backup)
    /// whose primary was lost, or a primary (held paused, its output
    /// held) whose backup was lost.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub awaiting_takeover: Option<String>,
}

/// Which host the arbiter (etcd) lets run a VM, as this agent knows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ArbiterInfo {
    /// `leased`: this host holds the VM's key on a lease it renews (the VM
    /// is protected; a backup may take over once the lease lapses).
    /// `pinned`: the key names this host without a lease (runs
    /// unprotected; nobody takes over). `fenced`: the lease could not be
    /// renewed in time, so the VM is held paused here. `stale`: another
    /// host holds the key; this copy never runs again (destroy it).
    pub state: String,
    /// The host the key names, as last read or written.
    pub holder: String,
    /// The etcd revision that justified the current state.
    pub revision: i64,
    /// The lease (hex), while leased or fenced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<String>,
    /// Whether the last call to etcd succeeded.
    pub healthy: bool,
    /// Milliseconds until this host must have paused the VM without a
    /// renewal (while leased).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fence_in_ms: Option<i64>,
    /// The last error talking to etcd, if the last call failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A running protection session, seen from the primary.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProtectionInfo {
    /// The backup (or migration destination) address.
    pub peer: String,
    /// The last committed checkpoint, if any yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_checkpoint: Option<CheckpointStats>,
    /// Network frames held right now, waiting for their checkpoint.
    pub held_frames: u64,
    /// The session's checkpoint interval and failover timeout now (they
    /// change with `remus protect --set`); absent during set-up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
}

/// `PATCH /v1/vms/NAME/protection` (`remus protect --set`): what to change
/// in the running session; absent fields stay.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TuneRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
}

/// What the agent runs on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostInfo {
    pub agent_version: String,
    pub qemu: String,
    /// Whether `accel = "auto"` uses KVM here: the agent booted a 64-bit
    /// test guest under KVM at start (see `remus_vm::kvm`).
    pub kvm: bool,
    /// Why `auto` means TCG here, when it does.
    pub kvm_reason: Option<String>,
    pub state_dir: PathBuf,
    pub replication_listen: Option<String>,
    /// The arbiter this agent consults (`remusd --arbiter`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arbiter: Option<ArbiterHost>,
}

/// An agent's arbiter settings and health.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ArbiterHost {
    pub endpoints: Vec<String>,
    pub prefix: String,
    /// The name this host writes into the keys it holds.
    pub host: String,
    pub ttl_s: u64,
    pub margin_ms: u64,
    /// The endpoint that answered a status request just now, or the
    /// error when none did.
    pub healthy: bool,
    pub answered_by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `POST /v1/vms`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CreateRequest {
    pub config: VmConfig,
}

/// `POST /v1/vms/NAME/vcpu-pin`: `vcpu` is a number or `all`, `cpus` an
/// xl CPU list (`0-2,5`, `all`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PinRequest {
    pub vcpu: String,
    pub cpus: String,
}

/// One vCPU, as `remus vcpu-list` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VcpuInfo {
    pub vcpu: u32,
    pub thread_id: u32,
    pub affinity: Vec<usize>,
}

/// `POST /v1/vms/NAME/protection`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProtectRequest {
    /// The backup agent's replication address, HOST:PORT.
    pub peer: String,
    #[serde(default = "default_interval_ms")]
    pub interval_ms: u64,
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    #[serde(default)]
    pub no_net: bool,
    #[serde(default)]
    pub no_disk: bool,
    /// Send checkpoints uncompressed (`remus protect -u`).
    #[serde(default)]
    pub no_compress: bool,
    /// Replicate in the clear (protocol 5), for a link that is encrypted
    /// already; the backup must allow it (`--allow-unencrypted-peers`).
    #[serde(default)]
    pub unencrypted: bool,
    /// After a failover, the host that took over does not protect the VM
    /// back to this one by itself (`remus protect --no-reprotect`).
    #[serde(default)]
    pub no_reprotect: bool,
    /// The agents set nothing up by themselves for this protection: no
    /// retry after a lost backup, no protection back after a failover
    /// (`remus protect --manual`, for a cluster manager or a script that
    /// drives every step).
    #[serde(default)]
    pub manual: bool,
    /// Cap of the initial copy (disk sync and RAM) in bytes per second;
    /// 0: the agent's `--max-rate` (see [`rate`]).
    #[serde(default)]
    pub max_rate: u64,
    /// Output-driven epochs: an epoch ends as soon as the guest has output
    /// waiting, but not sooner than this many ms after the last checkpoint
    /// began (`-i` stays the longest epoch); 0: every epoch lasts `-i`.
    /// Absent: [`DEFAULT_MIN_INTERVAL_MS`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_interval_ms: Option<u64>,
    /// With output-driven epochs, the longest a frame should be held: the
    /// gap between checkpoints grows toward it (less the checkpoint's
    /// pause and ack) while the guest streams data, and is back at
    /// `min_interval_ms` at the first quiet epoch or the first whose
    /// output is small frames (ACKs, short answers). At or below
    /// `min_interval_ms`: the gap never grows. Absent:
    /// [`DEFAULT_MAX_LATENCY_MS`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_latency_ms: Option<u64>,
}

/// The shortest gap between two checkpoints when output waits, by default
/// (`remus protect --min-interval`): chosen from the bench's `net`
/// section (bench/results.md).
pub const DEFAULT_MIN_INTERVAL_MS: u64 = 10;

/// The latency budget of a streaming guest's output, by default
/// (`remus protect --max-latency`): chosen from the bench's `net` section
/// (bench/results.md).
pub const DEFAULT_MAX_LATENCY_MS: u64 = 40;

fn default_interval_ms() -> u64 {
    200
}

fn default_timeout_ms() -> u64 {
    2000
}

/// `POST /v1/vms/NAME/migrate`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MigrateRequest {
    /// The destination agent's replication address, HOST:PORT.
    pub peer: String,
    /// Cap of the pre-copy (disk sync and rounds) in bytes per second;
    /// 0: the agent's `--max-rate` (see [`rate`]).
    #[serde(default)]
    pub max_rate: u64,
}

/// An error body.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

/// Client errors.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing listens on the socket.
    #[error(
        "no remus agent at {}: {reason} (start one with `remusd --state-dir DIR --socket {}`, or point --socket / REMUS_SOCKET at it)",
        .socket.display(),
        .socket.display()
    )]
    NoAgent { socket: PathBuf, reason: String },
    /// The agent answered with an error.
    #[error("{message}")]
    Api { status: u16, message: String },
    #[error("talking to the agent: {0}")]
    Transport(String),
}

/// A client of one agent.
#[derive(Debug, Clone)]
pub struct Client {
    socket: PathBuf,
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

impl Client {
    pub fn new(socket: impl Into<PathBuf>) -> Client {
        Client {
            socket: socket.into(),
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    async fn connect(&self) -> Result<Sender, ClientError> {
        let stream = tokio::net::UnixStream::connect(&self.socket)
            .await
            .map_err(|e| ClientError::NoAgent {
                socket: self.socket.clone(),
                reason: e.to_string(),
            })?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| ClientError::Transport(e.to_string()))?;
        tokio::spawn(async move {
            let _ = conn.with_upgrades().await;
        });
        Ok(sender)
    }

    /// Sends one request on a fresh connection (with upgrades enabled).
    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        headers: &[(&str, &str)],
    ) -> Result<hyper::Response<hyper::body::Incoming>, ClientError> {
        let mut sender = self.connect().await?;
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "remus");
        if body.is_some() {
            req = req.header("content-type", "application/json");
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| ClientError::Transport(e.to_string()))?;
        sender
            .send_request(req)
            .await
            .map_err(|e| ClientError::Transport(e.to_string()))
    }

    async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(StatusCode, Bytes), ClientError> {
        let resp = self.send(method, path, body, &[]).await?;
        let status = resp.status();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| ClientError::Transport(e.to_string()))?
            .to_bytes();
        if !status.is_success() {
            return Err(api_error(status, &bytes));
        }
        Ok((status, bytes))
    }

    async fn json<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<T, ClientError> {
        let (_, bytes) = self.request(method, path, body).await?;
        serde_json::from_slice(&bytes)
            .map_err(|e| ClientError::Transport(format!("bad answer from the agent: {e}")))
    }

    fn body<T: Serialize>(v: &T) -> Result<Option<Vec<u8>>, ClientError> {
        serde_json::to_vec(v)
            .map(Some)
            .map_err(|e| ClientError::Transport(e.to_string()))
    }

    pub async fn host(&self) -> Result<HostInfo, ClientError> {
        self.json(Method::GET, "/v1/host", None).await
    }

    pub async fn list(&self) -> Result<Vec<VmInfo>, ClientError> {
        self.json(Method::GET, "/v1/vms", None).await
    }

    pub async fn get(&self, name: &str) -> Result<VmInfo, ClientError> {
        self.json(Method::GET, &vm_path(name, ""), None).await
    }

    pub async fn create(&self, config: VmConfig) -> Result<VmInfo, ClientError> {
        let body = Self::body(&CreateRequest { config })?;
        self.json(Method::POST, "/v1/vms", body).await
    }

    pub async fn pause(&self, name: &str) -> Result<VmInfo, ClientError> {
        self.json(Method::POST, &vm_path(name, "/pause"), None)
            .await
    }

    pub async fn unpause(&self, name: &str) -> Result<VmInfo, ClientError> {
        self.json(Method::POST, &vm_path(name, "/unpause"), None)
            .await
    }

    /// The cluster manager's word (`remusd --failover-by cluster`): this
    /// host runs the VM now (see `remus takeover`).
    pub async fn takeover(&self, name: &str) -> Result<VmInfo, ClientError> {
        self.json(Method::POST, &vm_path(name, "/takeover"), None)
            .await
    }

    pub async fn destroy(&self, name: &str) -> Result<(), ClientError> {
        self.request(Method::DELETE, &vm_path(name, ""), None)
            .await
            .map(|_| ())
    }

    /// Destroys a VM or a stale copy but keeps its copy record, marked
    /// given up, so that a resync may overwrite what it ran (the
    /// resolution of a split brain).
    pub async fn destroy_discarding(&self, name: &str) -> Result<(), ClientError> {
        let path = format!("{}?discard_this_copy=true", vm_path(name, ""));
        self.request(Method::DELETE, &path, None).await.map(|_| ())
    }

    pub async fn vcpu_pin(
        &self,
        name: &str,
        vcpu: &str,
        cpus: &str,
    ) -> Result<Vec<VcpuInfo>, ClientError> {
        let body = Self::body(&PinRequest {
            vcpu: vcpu.into(),
            cpus: cpus.into(),
        })?;
        self.json(Method::POST, &vm_path(name, "/vcpu-pin"), body)
            .await
    }

    pub async fn vcpus(&self, name: &str) -> Result<Vec<VcpuInfo>, ClientError> {
        self.json(Method::GET, &vm_path(name, "/vcpus"), None).await
    }

    /// Starts protecting a VM to the backup agent at `req.peer`.
    pub async fn protect(&self, name: &str, req: &ProtectRequest) -> Result<(), ClientError> {
        let body = Self::body(req)?;
        self.request(Method::POST, &vm_path(name, "/protection"), body)
            .await
            .map(|_| ())
    }

    /// Changes a running protection session's interval and timeout;
    /// answers with the settings now in force.
    pub async fn tune(&self, name: &str, req: &TuneRequest) -> Result<TuneRequest, ClientError> {
        let body = Self::body(req)?;
        self.json(Method::PATCH, &vm_path(name, "/protection"), body)
            .await
    }

    /// Stops protecting a VM (the backup discards its standby).
    pub async fn unprotect(&self, name: &str) -> Result<(), ClientError> {
        self.request(Method::DELETE, &vm_path(name, "/protection"), None)
            .await
            .map(|_| ())
    }

    /// Follows a VM's replication events, calling `each` per JSON line,
    /// until the session ends.
    pub async fn follow_protection(
        &self,
        name: &str,
        each: impl FnMut(Streamed),
    ) -> Result<(), ClientError> {
        self.stream_lines(Method::GET, &vm_path(name, "/protection"), None, each)
            .await
    }

    /// Migrates a VM to the agent at `peer`, calling `each` per progress
    /// event until it ends.
    pub async fn migrate(
        &self,
        name: &str,
        peer: &str,
        each: impl FnMut(Streamed),
    ) -> Result<(), ClientError> {
        let req = MigrateRequest {
            peer: peer.into(),
            max_rate: 0,
        };
        self.migrate_with(name, &req, each).await
    }

    /// [`migrate`](Self::migrate) with all of a request's settings.
    pub async fn migrate_with(
        &self,
        name: &str,
        req: &MigrateRequest,
        each: impl FnMut(Streamed),
    ) -> Result<(), ClientError> {
        let body = Self::body(req)?;
        self.stream_lines(Method::POST, &vm_path(name, "/migrate"), body, each)
            .await
    }

    /// Planned role swap of a protected VM (`remus failback`): `each`
    /// gets the session's events until it ends at the switch-over.
    pub async fn failback(
        &self,
        name: &str,
        each: impl FnMut(Streamed),
    ) -> Result<(), ClientError> {
        self.stream_lines(Method::POST, &vm_path(name, "/failback"), None, each)
            .await
    }

    async fn stream_lines(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        mut each: impl FnMut(Streamed),
    ) -> Result<(), ClientError> {
        let resp = self.send(method, path, body, &[]).await?;
        let status = resp.status();
        let mut body = resp.into_body();
        if !status.is_success() {
            let bytes = body
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            return Err(api_error(status, &bytes));
        }
        let mut buf: Vec<u8> = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| ClientError::Transport(e.to_string()))?;
            if let Ok(data) = frame.into_data() {
                buf.extend_from_slice(&data);
                while let Some(nl) = buf.iter().position(|&b| b == b'\n') {
                    let raw: Vec<u8> = buf.drain(..=nl).collect();
                    let line = String::from_utf8_lossy(&raw[..raw.len() - 1]).into_owned();
                    let event = serde_json::from_str(&line).map_err(|e| {
                        ClientError::Transport(format!(
                            "the agent sent a line that is not a session event ({e}): {}",
                            line.chars().take(200).collect::<String>()
                        ))
                    })?;
                    each(Streamed { event, line });
                }
                if buf.len() > MAX_EVENT_LINE {
                    return Err(ClientError::Transport(format!(
                        "the agent sent an event line over {MAX_EVENT_LINE} bytes"
                    )));
                }
            }
        }
        Ok(())
    }

    /// The console output so far.
    pub async fn console_log(&self, name: &str) -> Result<Bytes, ClientError> {
        self.request(Method::GET, &vm_path(name, "/console/log"), None)
            .await
            .map(|(_, b)| b)
    }

    /// Attaches to the console: the returned stream carries raw console
    /// bytes both ways.
    pub async fn console_attach(
        &self,
        name: &str,
    ) -> Result<TokioIo<hyper::upgrade::Upgraded>, ClientError> {
        let resp = self
            .send(
                Method::GET,
                &vm_path(name, "/console"),
                None,
                &[("connection", "upgrade"), ("upgrade", CONSOLE_UPGRADE)],
            )
            .await?;
        let status = resp.status();
        if status != StatusCode::SWITCHING_PROTOCOLS {
            let bytes = resp
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            return Err(api_error(status, &bytes));
        }
        let upgraded = hyper::upgrade::on(resp)
            .await
            .map_err(|e| ClientError::Transport(e.to_string()))?;
        Ok(TokioIo::new(upgraded))
    }
}

/// The agent's error answer as a client error (its JSON `error`, or the
/// body as text if it is not JSON).
fn api_error(status: StatusCode, bytes: &[u8]) -> ClientError {
    let message = serde_json::from_slice::<ErrorBody>(bytes)
        .map(|e| e.error)
        .unwrap_or_else(|_| String::from_utf8_lossy(bytes).into_owned());
    ClientError::Api {
        status: status.as_u16(),
        message,
    }
}

/// `/v1/vms/NAME{suffix}`, with the name percent-encoded where needed.
/// VM names are restricted to `[A-Za-z0-9_.-]`, but a user can type any
/// name on the command line; encoding keeps the request well formed so
/// the agent answers "no such VM" rather than "bad request".
fn vm_path(name: &str, suffix: &str) -> String {
    let mut out = String::from("/v1/vms/");
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out.push_str(suffix);
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn names_are_encoded_in_paths() {
        assert_eq!(super::vm_path("demo-1", "/pause"), "/v1/vms/demo-1/pause");
        assert_eq!(super::vm_path("a b/c", ""), "/v1/vms/a%20b%2Fc");
    }
}
