//! The CLI's HTTP client: one request per connection to the daemon, over its unix socket or,
//! for a remote daemon, over TCP with TLS and a bearer token (`DELIVEROUS_TOKEN`).

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use serde_json::Value;

/// Where the daemon listens: `unix:/run/deliverous/api.sock` (or a bare path),
/// `https://host:port` (`--api-listen` with TLS) or `http://127.0.0.1:port` (`--api-insecure`).
#[derive(Debug, Clone)]
pub struct Host {
    target: Target,
    /// `DELIVEROUS_TOKEN`, sent as a bearer token over TCP (never over the unix socket).
    token: Option<String>,
}

#[derive(Debug, Clone)]
enum Target {
    Unix(PathBuf),
    Tcp {
        /// `host:port`, as given.
        authority: String,
        tls: Option<(Arc<rustls::ClientConfig>, ServerName<'static>)>,
    },
}

/// The CA file of `--ca` / `DELIVEROUS_CA`, set once by `main` before any [`Host::parse`].
static CA_FILE: OnceLock<Option<PathBuf>> = OnceLock::new();

pub fn set_ca_file(path: Option<PathBuf>) {
    let _ = CA_FILE.set(path);
}

/// Where Debian and its kin keep the system's trusted CAs.
const SYSTEM_ROOTS: &str = "/etc/ssl/certs/ca-certificates.crt";

fn client_config() -> Result<Arc<rustls::ClientConfig>, String> {
    let given = CA_FILE.get().cloned().flatten();
    let path = given.clone().unwrap_or_else(|| PathBuf::from(SYSTEM_ROOTS));
    let certs = CertificateDer::pem_file_iter(&path)
        .and_then(|i| i.collect::<Result<Vec<_>, _>>())
        .map_err(|e| match given {
            Some(_) => format!("--ca {}: cannot read PEM certificates: {e}", path.display()),
            None => format!(
                "cannot read the system's CA certificates ({}: {e}): give the daemon's CA with --ca FILE or DELIVEROUS_CA",
                path.display()
            ),
        })?;
    let mut roots = rustls::RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(certs);
    if added == 0 {
        return Err(format!("{}: no usable CA certificate", path.display()));
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| format!("TLS: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

impl Host {
    pub fn parse(text: &str) -> Result<Host, String> {
        let token = std::env::var("DELIVEROUS_TOKEN").ok().map(|t| t.trim().to_string()).filter(|t| !t.is_empty());
        let tcp = |rest: &str, tls: bool| -> Result<Host, String> {
            let authority = rest.trim_end_matches('/');
            let (name, _port) = authority
                .rsplit_once(':')
                .filter(|(n, p)| !n.is_empty() && p.parse::<u16>().is_ok())
                .ok_or_else(|| format!("invalid --host {text:?}: expected https://HOST:PORT"))?;
            if authority.contains('/') || authority.contains('@') {
                return Err(format!("invalid --host {text:?}: expected https://HOST:PORT, no path"));
            }
            let name = name.trim_start_matches('[').trim_end_matches(']');
            let loopback = name.eq_ignore_ascii_case("localhost")
                || name.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
            if !tls && !loopback {
                return Err(format!(
                    "invalid --host {text:?}: plain http:// would send the token in clear over the network; use https://, or http:// to a loopback address only"
                ));
            }
            let tls = if tls {
                let server = ServerName::try_from(name.to_string())
                    .map_err(|e| format!("invalid --host {text:?}: {name:?} is no host name or address: {e}"))?;
                Some((client_config()?, server))
            } else {
                None
            };
            Ok(Host { target: Target::Tcp { authority: authority.to_string(), tls }, token: token.clone() })
        };
        if let Some(rest) = text.strip_prefix("https://") {
            return tcp(rest, true);
        }
        if let Some(rest) = text.strip_prefix("http://") {
            return tcp(rest, false);
        }
        let path = text.strip_prefix("unix://").or_else(|| text.strip_prefix("unix:")).unwrap_or(text);
        if path.starts_with('/') {
            Ok(Host { target: Target::Unix(PathBuf::from(path)), token: None })
        } else {
            Err(format!("invalid --host {text:?}: expected unix:/path/to/api.sock or https://HOST:PORT"))
        }
    }

    fn describe(&self) -> String {
        match &self.target {
            Target::Unix(p) => format!("unix:{}", p.display()),
            Target::Tcp { authority, tls: Some(_) } => format!("https://{authority}"),
            Target::Tcp { authority, tls: None } => format!("http://{authority}"),
        }
    }
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn handshake<I>(io: I) -> Result<Sender, String>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await.map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        // With upgrades: `exec` and `run` switch the connection to the attach protocol.
        let _ = conn.with_upgrades().await;
    });
    Ok(sender)
}

async fn connect(host: &Host) -> Result<Sender, String> {
    match &host.target {
        Target::Unix(path) => {
            let stream = tokio::net::UnixStream::connect(path).await.map_err(|e| e.to_string())?;
            handshake(stream).await
        }
        Target::Tcp { authority, tls } => {
            let stream = tokio::time::timeout(
                std::time::Duration::from_secs(10),
                tokio::net::TcpStream::connect(authority.as_str()),
            )
            .await
            .map_err(|_| "no answer within 10s".to_string())?
            .map_err(|e| e.to_string())?;
            match tls {
                Some((config, name)) => {
                    let tls = tokio_rustls::TlsConnector::from(config.clone())
                        .connect(name.clone(), stream)
                        .await
                        .map_err(|e| format!("TLS: {e}"))?;
                    handshake(tls).await
                }
                None => handshake(stream).await,
            }
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
            "cannot reach the deliverous daemon at {}: {e}; is `deliverous daemon` running? (--host or DELIVEROUS_HOST point elsewhere)",
            host.describe()
        ))
    };
    let mut sender = connect(host).await.map_err(unreachable)?;
    let payload = match &body {
        Some(v) => Bytes::from(serde_json::to_vec(v).map_err(|e| unreachable(e.to_string()))?),
        None => Bytes::new(),
    };
    let req = request_builder(host, method, path)
        .header("content-type", "application/json")
        .header("accept", accept)
        .body(Full::new(payload))
        .map_err(|e| unreachable(e.to_string()))?;
    sender.send_request(req).await.map_err(|e| unreachable(e.to_string()))
}

/// A request to `path` with the host's `Host` and credentials.
fn request_builder(host: &Host, method: Method, path: &str) -> hyper::http::request::Builder {
    let req = Request::builder().method(method).uri(path);
    match &host.target {
        Target::Unix(_) => req.header("host", "deliverous"),
        Target::Tcp { authority, .. } => {
            let req = req.header("host", authority.as_str());
            match &host.token {
                Some(token) => req.header("authorization", format!("Bearer {token}")),
                None => req,
            }
        }
    }
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
    let message = if status == StatusCode::UNAUTHORIZED && std::env::var_os("DELIVEROUS_TOKEN").is_none() {
        format!("{message} (DELIVEROUS_TOKEN is not set)")
    } else {
        message
    };
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
            "cannot reach the deliverous daemon at {}: {e}; is `deliverous daemon` running? (--host or DELIVEROUS_HOST point elsewhere)",
            host.describe()
        ))
    };
    let mut sender = connect(host).await.map_err(unreachable)?;
    let payload = Bytes::from(serde_json::to_vec(&body).map_err(|e| unreachable(e.to_string()))?);
    let req = request_builder(host, Method::POST, path)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts() {
        assert!(matches!(Host::parse("unix:/run/x.sock").map(|h| h.target), Ok(Target::Unix(_))));
        assert!(matches!(Host::parse("/run/x.sock").map(|h| h.target), Ok(Target::Unix(_))));
        for ok in ["http://127.0.0.1:7443", "http://localhost:7443/", "http://[::1]:7443"] {
            let host = Host::parse(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
            assert!(matches!(host.target, Target::Tcp { tls: None, .. }), "{ok}");
        }
        for bad in [
            "http://10.0.0.1:7443",
            "http://example.com:7443",
            "https://example.com",
            "https://:7443",
            "https://example.com:99999",
            "https://example.com:7443/v1",
            "https://user@example.com:7443",
            "ftp://example.com:21",
            "relative/api.sock",
        ] {
            assert!(Host::parse(bad).is_err(), "{bad} accepted");
        }
    }
}
