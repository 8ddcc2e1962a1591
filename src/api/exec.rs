//! `POST /v1/exec` and `POST /v1/apps/{name}/run`: validate the request, start the command,
//! and hand the upgraded connection to the attach protocol (src/attach.rs).

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{header, StatusCode};
use axum::response::Response;
use serde::Deserialize;

use super::ApiError;
use crate::supervisor::{ExecOptions, Session, Supervisor};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttachBody {
    /// `web.2`, or `web` for its first running instance (exec only).
    #[serde(default)]
    pub instance: Option<String>,
    pub cmd: Vec<String>,
    #[serde(default)]
    pub env: Vec<String>,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub workdir: Option<String>,
    #[serde(default)]
    pub tty: bool,
    #[serde(default)]
    pub stdin: bool,
    #[serde(default)]
    pub rows: u16,
    #[serde(default)]
    pub cols: u16,
    /// Without an upgrade (exec only): kill the command after this long (default 30 s).
    #[serde(default)]
    pub timeout_ms: Option<u64>,
}

/// Longest a captured (non-attached) exec may run.
const MAX_CAPTURE: std::time::Duration = std::time::Duration::from_secs(600);

/// Splits the request into its upgrade handle (if it asks for one) and its parsed body.
async fn parts(req: Request) -> Result<(Option<hyper::upgrade::OnUpgrade>, AttachBody), ApiError> {
    let (mut head, body) = req.into_parts();
    let wants_upgrade = head
        .headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case(crate::attach::UPGRADE));
    let on_upgrade = head.extensions.remove::<hyper::upgrade::OnUpgrade>().filter(|_| wants_upgrade);
    let bytes = axum::body::to_bytes(body, 1 << 20)
        .await
        .map_err(|e| ApiError::bad_request(format!("cannot read the request body: {e}")))?;
    let body: AttachBody =
        serde_json::from_slice(&bytes).map_err(|e| ApiError::bad_request(format!("invalid request body: {e}")))?;
    if body.cmd.is_empty() || body.cmd[0].is_empty() {
        return Err(ApiError::bad_request("no command given: expected e.g. [\"sh\", \"-c\", \"ls\"]"));
    }
    for e in &body.env {
        let valid = e.split_once('=').is_some_and(|(k, _)| !k.is_empty() && !k.contains('\0'));
        if !valid {
            return Err(ApiError::bad_request(format!("invalid environment entry {e:?}: expected KEY=VALUE")));
        }
    }
    if body.cmd.iter().chain(&body.env).any(|a| a.contains('\0')) {
        return Err(ApiError::bad_request("command and environment cannot contain NUL bytes"));
    }
    if let Some(w) = body.workdir.as_deref().filter(|w| !w.starts_with('/')) {
        return Err(ApiError::bad_request(format!("invalid working directory {w:?}: expected an absolute path")));
    }
    Ok((on_upgrade, body))
}

fn options(body: &AttachBody) -> ExecOptions {
    ExecOptions {
        argv: body.cmd.clone(),
        env: body.env.clone(),
        user: body.user.clone().filter(|u| !u.is_empty()),
        workdir: body.workdir.clone().filter(|w| !w.is_empty()),
        tty: body.tty,
        stdin: body.stdin,
        size: (body.rows > 0 && body.cols > 0).then_some((body.rows, body.cols)),
        combined_output: false,
    }
}

/// Answers 101 and serves `session` on the upgraded connection.
fn switch(on_upgrade: hyper::upgrade::OnUpgrade, session: Session, size: (u16, u16)) -> Response {
    if let crate::supervisor::SessionIo::Pty(master) = &session.io {
        crate::attach::set_window_size(master, size.0, size.1);
    }
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => crate::attach::serve(hyper_util::rt::TokioIo::new(upgraded), session).await,
            // Dropping the session ends the command.
            Err(e) => tracing::debug!("attach upgrade failed: {e}"),
        }
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "Upgrade")
        .header(header::UPGRADE, crate::attach::UPGRADE)
        .body(Body::empty())
        .unwrap_or_default()
}

pub async fn exec(State(sup): State<Arc<Supervisor>>, req: Request) -> Result<Response, ApiError> {
    let (on_upgrade, body) = parts(req).await?;
    let target = body
        .instance
        .clone()
        .filter(|i| !i.is_empty())
        .ok_or_else(|| ApiError::bad_request("no instance given: expected e.g. \"web.2\" or \"web\""))?;
    let Some(on_upgrade) = on_upgrade else {
        return capture(&sup, &target, &body).await;
    };
    let session = sup.exec_session(&target, &options(&body)).await?;
    Ok(switch(on_upgrade, session, (body.rows, body.cols)))
}

/// Without an upgrade: runs the command to its end (no stdin, no terminal) and answers its exit
/// code and its output (stdout and stderr together, cut at 4 KiB).
async fn capture(sup: &Supervisor, target: &str, body: &AttachBody) -> Result<Response, ApiError> {
    if body.tty || body.stdin || body.user.is_some() || body.workdir.is_some() || !body.env.is_empty() {
        return Err(ApiError::bad_request(format!(
            "tty, stdin, user, workdir and env need the attach protocol: send `Connection: Upgrade` and `Upgrade: {}`",
            crate::attach::UPGRADE
        )));
    }
    let timeout = std::time::Duration::from_millis(body.timeout_ms.unwrap_or(30_000));
    if timeout.is_zero() || timeout > MAX_CAPTURE {
        return Err(ApiError::bad_request(format!("invalid timeout_ms: expected 1 to {}", MAX_CAPTURE.as_millis())));
    }
    let (uid, _) = sup.find_running(target)?;
    let (code, output) = sup.exec_capture(&uid, &body.cmd, timeout).await.map_err(|e| {
        let status = if e.starts_with("timed out") {
            StatusCode::GATEWAY_TIMEOUT
        } else if e.ends_with("is not running") {
            // It stopped between the lookup and the exec: the operator's state, not our failure.
            StatusCode::CONFLICT
        } else {
            StatusCode::INTERNAL_SERVER_ERROR
        };
        ApiError::new(status, format!("exec in {target}: {e}"))
    })?;
    let answer = serde_json::json!({"exit_code": code, "output": String::from_utf8_lossy(&output)});
    Ok(axum::response::IntoResponse::into_response(axum::Json(answer)))
}

pub async fn run(
    State(sup): State<Arc<Supervisor>>,
    Path(name): Path<String>,
    req: Request,
) -> Result<Response, ApiError> {
    let (on_upgrade, body) = parts(req).await?;
    let on_upgrade = on_upgrade.ok_or_else(|| {
        ApiError::bad_request(format!(
            "this endpoint streams over an upgraded connection: send `Connection: Upgrade` and `Upgrade: {}`",
            crate::attach::UPGRADE
        ))
    })?;
    if body.user.is_some() || body.workdir.is_some() {
        return Err(ApiError::bad_request("run takes neither user nor workdir: the app's image decides them"));
    }
    if super::find(&sup, &name)?.revision.is_none() {
        // Nothing to run yet: the operator's to fix, not the daemon's failure.
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("app {name} has no revision yet: start or deploy it first (`deliverous app start {name}`)"),
        ));
    }
    let session = sup.run_session(&name, &options(&body)).await?;
    Ok(switch(on_upgrade, session, (body.rows, body.cols)))
}
