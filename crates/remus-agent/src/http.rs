//! The HTTP/JSON API on the agent's unix socket (routes in `remus_api`).

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use hyper_util::rt::TokioIo;
use remus_api::{CONSOLE_UPGRADE, CreateRequest, ErrorBody, PinRequest, SessionEvent};

use crate::agent::{Agent, AgentError, Published};
use crate::replication::ProtectRequest;

impl IntoResponse for AgentError {
    fn into_response(self) -> Response {
        let status = match &self {
            AgentError::BadRequest(_) | AgentError::PeerRefused { .. } => StatusCode::BAD_REQUEST,
            AgentError::NotFound(_) => StatusCode::NOT_FOUND,
            AgentError::Conflict(_) => StatusCode::CONFLICT,
            AgentError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        (
            status,
            Json(ErrorBody {
                error: self.to_string(),
            }),
        )
            .into_response()
    }
}

type AppState = Arc<Agent>;
type ApiResult<T> = Result<Json<T>, AgentError>;

/// Runs blocking agent work (QEMU, QMP, files) off the async runtime.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, AgentError> + Send + 'static,
) -> Result<T, AgentError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| AgentError::Internal(format!("agent task failed: {e}")))?
}

pub fn router(agent: Arc<Agent>) -> Router {
    Router::new()
        .route("/v1/host", get(host))
        .route("/v1/vms", get(list).post(create))
        .route("/v1/vms/{name}", get(show).delete(destroy))
        .route("/v1/vms/{name}/pause", post(pause))
        .route("/v1/vms/{name}/unpause", post(unpause))
        .route("/v1/vms/{name}/vcpu-pin", post(vcpu_pin))
        .route("/v1/vms/{name}/vcpus", get(vcpus))
        .route("/v1/vms/{name}/console/log", get(console_log))
        .route("/v1/vms/{name}/console", get(console_attach))
        .route("/v1/vms/{name}/migrate", post(migrate))
        .route("/v1/vms/{name}/failback", post(failback))
        .route("/v1/vms/{name}/takeover", post(takeover))
        .route(
            "/v1/vms/{name}/protection",
            post(protect)
                .get(protection_events)
                .delete(unprotect)
                .patch(retune),
        )
        .fallback(|| async {
            AgentError::NotFound("no such API endpoint (see the remus-api docs)".into())
        })
        .with_state(agent)
}

async fn host(State(a): State<AppState>) -> ApiResult<remus_api::HostInfo> {
    blocking(move || Ok(a.host_info())).await.map(Json)
}

async fn list(State(a): State<AppState>) -> ApiResult<Vec<remus_api::VmInfo>> {
    blocking(move || Ok(a.list())).await.map(Json)
}

async fn show(State(a): State<AppState>, Path(name): Path<String>) -> ApiResult<remus_api::VmInfo> {
    blocking(move || a.info(&name)).await.map(Json)
}

async fn create(
    State(a): State<AppState>,
    body: Result<Json<CreateRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<(StatusCode, Json<remus_api::VmInfo>), AgentError> {
    let Json(req) = body.map_err(|e| AgentError::BadRequest(format!("bad create request: {e}")))?;
    let info = blocking(move || a.create(req.config)).await?;
    Ok((StatusCode::CREATED, Json(info)))
}

async fn pause(
    State(a): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult<remus_api::VmInfo> {
    blocking(move || a.pause(&name)).await.map(Json)
}

async fn takeover(
    State(a): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult<remus_api::VmInfo> {
    blocking(move || a.takeover(&name)).await.map(Json)
}

async fn unpause(
    State(a): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult<remus_api::VmInfo> {
    blocking(move || a.unpause(&name)).await.map(Json)
}

/// `?discard_this_copy=true`: keep the copy's record, marked given up.
#[derive(Debug, Default, serde::Deserialize)]
struct DestroyParams {
    #[serde(default)]
    discard_this_copy: bool,
}

async fn destroy(
    State(a): State<AppState>,
    Path(name): Path<String>,
    params: Result<axum::extract::Query<DestroyParams>, axum::extract::rejection::QueryRejection>,
) -> Result<StatusCode, AgentError> {
    let axum::extract::Query(p) =
        params.map_err(|e| AgentError::BadRequest(format!("bad destroy request: {e}")))?;
    blocking(move || a.destroy(&name, p.discard_this_copy)).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn vcpu_pin(
    State(a): State<AppState>,
    Path(name): Path<String>,
    body: Result<Json<PinRequest>, axum::extract::rejection::JsonRejection>,
) -> ApiResult<Vec<remus_api::VcpuInfo>> {
    let Json(req) =
        body.map_err(|e| AgentError::BadRequest(format!("bad vcpu-pin request: {e}")))?;
    blocking(move || a.vcpu_pin(&name, &req.vcpu, &req.cpus))
        .await
        .map(Json)
}

async fn vcpus(
    State(a): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult<Vec<remus_api::VcpuInfo>> {
    blocking(move || a.vcpus(&name)).await.map(Json)
}

async fn console_log(
    State(a): State<AppState>,
    Path(name): Path<String>,
) -> Result<Response, AgentError> {
    let slot = a.slot(&name)?;
    let path = slot.vm.paths.console_log();
    let read = path.clone();
    let bytes = tokio::task::spawn_blocking(move || remus_vm::logfile::read_all(&read))
        .await
        .map_err(|e| AgentError::Internal(format!("read {}: {e}", path.display())))?
        .map_err(|e| AgentError::Internal(format!("read {}: {e}", path.display())))?;
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response())
}

/// Interactive console: an HTTP upgrade to a raw byte stream, bridged to
/// QEMU's console socket. One client at a time (QEMU's chardev serves one).
async fn console_attach(
    State(a): State<AppState>,
    Path(name): Path<String>,
    req: Request,
) -> Result<Response, AgentError> {
    let wants = req
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case(CONSOLE_UPGRADE));
    if !wants {
        return Err(AgentError::BadRequest(format!(
            "the console needs 'Connection: upgrade' and 'Upgrade: {CONSOLE_UPGRADE}'; for the output so far use /console/log"
        )));
    }
    let slot = a.slot(&name)?;
    if !slot.claim_console() {
        return Err(AgentError::Conflict(format!(
            "the console of '{name}' is already attached elsewhere (one client at a time)"
        )));
    }
    let path = slot.vm.paths.console_attach_socket();
    let qemu_side = match tokio::net::UnixStream::connect(&path).await {
        Ok(s) => s,
        Err(e) => {
            slot.release_console();
            return Err(AgentError::Conflict(format!("console of '{name}': {e}")));
        }
    };
    tracing::info!(vm = %name, "console attached");
    let on_upgrade = hyper::upgrade::on(req);
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => {
                let mut client = TokioIo::new(upgraded);
                let mut qemu_side = qemu_side;
                let r = tokio::io::copy_bidirectional(&mut client, &mut qemu_side).await;
                tracing::info!(vm = %name, result = ?r, "console detached");
            }
            Err(e) => tracing::warn!(vm = %name, error = %e, "console upgrade failed"),
        }
        slot.release_console();
    });

    let mut resp = Response::new(Body::empty());
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    resp.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    resp.headers_mut()
        .insert(header::UPGRADE, HeaderValue::from_static(CONSOLE_UPGRADE));
    Ok(resp)
}

async fn protect(
    State(a): State<AppState>,
    Path(name): Path<String>,
    body: Result<Json<ProtectRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<StatusCode, AgentError> {
    let Json(req) =
        body.map_err(|e| AgentError::BadRequest(format!("bad protect request: {e}")))?;
    blocking(move || {
        // The session the last agent suspended resumes by itself (with
        // no copy); a new one now would discard the backup's kept
        // standby and leave the guest paused at the suspended epoch.
        if a.resuming(&name) {
            return Err(AgentError::Conflict(format!(
                "VM '{name}' is resuming the protection session this agent's restart suspended; try again once it has (remus list shows its protection)"
            )));
        }
        crate::replication::start_protect(&a, &name, req.clone())?;
        if req.manual {
            a.wishes().clear(&name);
            return Ok(());
        }
        // Wanted from now on: the agent sets it up again when it is lost.
        let wish = crate::wishes::Wish {
            reprotect: !req.no_reprotect,
            request: req,
        };
        a.wishes().set(&name, wish).map_err(AgentError::Internal)
    })
    .await?;
    Ok(StatusCode::ACCEPTED)
}

/// `{"peer": "HOST:PORT"}`; answers with the migration's progress as
/// JSON lines until it ends.
async fn migrate(
    State(a): State<AppState>,
    Path(name): Path<String>,
    body: Result<Json<remus_api::MigrateRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, AgentError> {
    let Json(req) =
        body.map_err(|e| AgentError::BadRequest(format!("bad migrate request: {e}")))?;
    let slot = a.slot(&name)?;
    let rx = slot.subscribe();
    blocking(move || crate::replication::start_migrate(&a, &name, &req.peer, req.max_rate)).await?;
    Ok(ndjson(rx))
}

/// Planned role swap of a protected VM; answers with the session's
/// events as JSON lines until it ends (at the switch-over).
async fn failback(
    State(a): State<AppState>,
    Path(name): Path<String>,
) -> Result<Response, AgentError> {
    let slot = a.slot(&name)?;
    let rx = slot.subscribe();
    blocking(move || crate::replication::start_failback(&a, &name)).await?;
    Ok(ndjson(rx))
}

/// A response streaming the event channel as JSON lines until the end of
/// the session.
fn ndjson(rx: tokio::sync::broadcast::Receiver<Published>) -> Response {
    ndjson_replay(Vec::new(), rx)
}

/// One event as a line of the stream.
fn line(event: &SessionEvent) -> Result<String, std::convert::Infallible> {
    // An event is plain data: it always serialises.
    Ok(serde_json::to_string(event).unwrap_or_default() + "\n")
}

/// `replay` first, then what arrives on `rx`.
fn ndjson_replay(
    replay: Vec<SessionEvent>,
    rx: tokio::sync::broadcast::Receiver<Published>,
) -> Response {
    let replay = futures_util::stream::iter(replay.iter().map(line).collect::<Vec<_>>());
    let live = futures_util::stream::unfold(rx, |mut rx| async move {
        loop {
            match rx.recv().await {
                Ok(Published::End) => return None,
                Ok(Published::Event(ev)) => return Some((line(&ev), rx)),
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
            }
        }
    });
    let stream = futures_util::StreamExt::chain(replay, live);
    (
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(stream),
    )
        .into_response()
}

/// Follows a VM's replication events: one JSON object per line, until the
/// session ends.
async fn protection_events(
    State(a): State<AppState>,
    Path(name): Path<String>,
) -> Result<Response, AgentError> {
    let slot = a.slot(&name)?;
    if slot.protected_to().is_none() {
        return Err(AgentError::Conflict(format!(
            "VM '{name}' is not being protected"
        )));
    }
    let (replay, rx) = slot.follow();
    Ok(ndjson_replay(replay, rx))
}

/// `remus protect --set`: answers with the session's settings now.
async fn retune(
    State(a): State<AppState>,
    Path(name): Path<String>,
    body: Result<Json<remus_api::TuneRequest>, axum::extract::rejection::JsonRejection>,
) -> ApiResult<remus_api::TuneRequest> {
    let Json(req) = body.map_err(|e| AgentError::BadRequest(format!("bad tune request: {e}")))?;
    let (interval_ms, timeout_ms) =
        blocking(move || crate::replication::tune(&a, &name, &req)).await?;
    Ok(Json(remus_api::TuneRequest {
        interval_ms: Some(interval_ms),
        timeout_ms: Some(timeout_ms),
    }))
}

async fn unprotect(
    State(a): State<AppState>,
    Path(name): Path<String>,
) -> Result<StatusCode, AgentError> {
    // The wish goes first: the healer must not set up again what is being
    // stopped.
    let wanted = a.wish(&name).is_some();
    a.wishes().clear(&name);
    let stopped = a.slot(&name).is_ok_and(|s| s.life.stop());
    if !stopped && !wanted {
        a.slot(&name)?;
        return Err(AgentError::Conflict(format!(
            "VM '{name}' is not being protected"
        )));
    }
    Ok(StatusCode::ACCEPTED)
}
