//! The CLI's HTTP client: one request per connection to the daemon's unix socket.

use std::path::PathBuf;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;

/// Where the daemon listens: `unix:/run/deliverous/api.sock` (or a bare path).
#[derive(Debug, Clone)]
pub struct Host {
    socket: PathBuf,
}

impl Host {
    pub fn parse(text: &str) -> Result<Host, String> {
        let path = text.strip_prefix("unix://").or_else(|| text.strip_prefix("unix:")).unwrap_or(text);
        if path.starts_with('/') {
            Ok(Host { socket: PathBuf::from(path) })
        } else {
            Err(format!("invalid --host {text:?}: expected unix:/path/to/api.sock"))
        }
    }
}

pub enum CallError {
    /// The daemon could not be reached at all.
    Unreachable(String),
    /// The daemon answered with an error.
    Api { status: StatusCode, message: String },
}

/// Sends one request over a fresh connection and returns the response head and body.
async fn send(
    host: &Host,
    method: Method,
    path: &str,
    body: Option<Value>,
    accept: &'static str,
) -> Result<hyper::Response<hyper::body::Incoming>, CallError> {
    let unreachable = |e: String| {
        CallError::Unreachable(format!(
            "cannot reach the deliverous daemon at unix:{}: {e}; is `deliverous daemon` running? (--host or DELIVEROUS_HOST point elsewhere)",
            host.socket.display()
        ))
    };
    let stream = tokio::net::UnixStream::connect(&host.socket).await.map_err(|e| unreachable(e.to_string()))?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| unreachable(e.to_string()))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let payload = match &body {
        Some(v) => Bytes::from(serde_json::to_vec(v).map_err(|e| unreachable(e.to_string()))?),
        None => Bytes::new(),
    };
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "deliverous")
        .header("content-type", "application/json")
        .header("accept", accept)
        .body(Full::new(payload))
        .map_err(|e| unreachable(e.to_string()))?;
    sender.send_request(req).await.map_err(|e| unreachable(e.to_string()))
}

fn broken(e: impl std::fmt::Display) -> CallError {
    CallError::Unreachable(format!("the connection to the deliverous daemon broke: {e}"))
}

/// The error a failed answer carries (`{"error": "..."}`), or its text.
fn api_error(status: StatusCode, bytes: &[u8]) -> CallError {
    let value: Value = serde_json::from_slice(bytes).unwrap_or(Value::Null);
    let message = value
        .get("error")
        .and_then(Value::as_str)
        .map(str::to_string)
        .unwrap_or_else(|| String::from_utf8_lossy(bytes).into_owned());
    CallError::Api { status, message }
}

pub async fn call(host: &Host, method: Method, path: &str, body: Option<Value>) -> Result<Value, CallError> {
    let resp = send(host, method, path, body, "application/json").await?;
    let status = resp.status();
    let bytes = resp.into_body().collect().await.map_err(broken)?.to_bytes();
    if !status.is_success() {
        return Err(api_error(status, &bytes));
    }
    Ok(if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
    })
}

/// Like [`call`], for endpoints answering a stream of JSON lines (`application/x-ndjson`):
/// `on_line` gets each line as it arrives. An error status is an error, as with `call`.
pub async fn call_stream(
    host: &Host,
    method: Method,
    path: &str,
    body: Option<Value>,
    mut on_line: impl FnMut(Value),
) -> Result<(), CallError> {
    let resp = send(host, method, path, body, "application/x-ndjson").await?;
    let status = resp.status();
    let mut body = resp.into_body();
    if !status.is_success() {
        let bytes = body.collect().await.map_err(broken)?.to_bytes();
        return Err(api_error(status, &bytes));
    }
    let mut pending: Vec<u8> = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(broken)?;
        let Some(data) = frame.data_ref() else { continue };
        pending.extend_from_slice(data);
        while let Some(end) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            if let Ok(value) = serde_json::from_slice::<Value>(&line) {
                on_line(value);
            }
        }
    }
    Ok(())
}

/// Sends `body` to `path` asking to switch to the attach protocol (src/attach.rs) and returns
/// the upgraded connection; an error answer is an error, as with `call`.
pub async fn upgrade(host: &Host, path: &str, body: Value) -> Result<TokioIo<hyper::upgrade::Upgraded>, CallError> {
    let unreachable = |e: String| {
        CallError::Unreachable(format!(
            "cannot reach the deliverous daemon at unix:{}: {e}; is `deliverous daemon` running? (--host or DELIVEROUS_HOST point elsewhere)",
            host.socket.display()
        ))
    };
    let stream = tokio::net::UnixStream::connect(&host.socket).await.map_err(|e| unreachable(e.to_string()))?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| unreachable(e.to_string()))?;
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    let payload = Bytes::from(serde_json::to_vec(&body).map_err(|e| unreachable(e.to_string()))?);
    let req = Request::builder()
        .method(Method::POST)
        .uri(path)
        .header("host", "deliverous")
        .header("content-type", "application/json")
        .header("connection", "Upgrade")
        .header("upgrade", crate::attach::UPGRADE)
        .body(Full::new(payload))
        .map_err(|e| unreachable(e.to_string()))?;
    let mut resp = sender.send_request(req).await.map_err(|e| unreachable(e.to_string()))?;
    let status = resp.status();
    if status != StatusCode::SWITCHING_PROTOCOLS {
        let bytes = resp.into_body().collect().await.map_err(broken)?.to_bytes();
        return Err(api_error(status, &bytes));
    }
    let upgraded = hyper::upgrade::on(&mut resp).await.map_err(broken)?;
    Ok(TokioIo::new(upgraded))
}
