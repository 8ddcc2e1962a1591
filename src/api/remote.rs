//! The API over TCP (`--api-listen`): TLS from a certificate and key the operator gives, and a
//! bearer token (`deliverous token create`) on every request. The unix socket stays the way
//! in that needs no token; what only it may do (managing tokens) checks for [`Remote`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

use super::tokens::{constant_time_eq, expired, hash};
use super::ApiError;
use crate::supervisor::Supervisor;

#[derive(Debug, Clone, clap::Args)]
pub struct RemoteApiFlags {
    /// Also serve the API over TCP on ADDR:PORT (e.g. 0.0.0.0:7443), with TLS (--api-tls-cert,
    /// --api-tls-key) and a bearer token on every request (`deliverous token create`).
    #[arg(long = "api-listen", value_name = "ADDR:PORT", help_heading = "Remote API")]
    pub api_listen: Option<SocketAddr>,
    /// PEM certificate chain of the TCP API (the server's own certificate first).
    #[arg(long = "api-tls-cert", value_name = "FILE", requires = "api_tls_key", help_heading = "Remote API")]
    pub api_tls_cert: Option<PathBuf>,
    /// PEM private key of --api-tls-cert.
    #[arg(long = "api-tls-key", value_name = "FILE", requires = "api_tls_cert", help_heading = "Remote API")]
    pub api_tls_key: Option<PathBuf>,
    /// Serve the TCP API as plain HTTP, without TLS. Tokens then travel in clear text, so this
    /// is refused unless --api-listen is a loopback address (127.0.0.1, ::1): for an SSH tunnel
    /// or a TLS-terminating proxy on the same host. Tokens are still required.
    #[arg(long = "api-insecure", conflicts_with_all = ["api_tls_cert", "api_tls_key"], help_heading = "Remote API")]
    pub api_insecure: bool,
}

/// Marks a request that came over TCP (with a valid token, named here).
#[derive(Debug, Clone)]
pub struct Remote {
    pub token: String,
}

/// The client's address, on every request that came over TCP.
#[derive(Debug, Clone, Copy)]
struct Peer(SocketAddr);

/// The bound TCP listener, before the supervisor exists.
pub struct RemoteApi {
    listener: tokio::net::TcpListener,
    tls: Option<TlsAcceptor>,
    pub addr: SocketAddr,
}

/// Stops serving when dropped.
pub struct Serving(tokio::task::JoinHandle<()>);

impl Drop for Serving {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl RemoteApiFlags {
    /// Checks the flags, loads the certificate and binds; `None` without `--api-listen`.
    pub async fn bind(&self) -> anyhow::Result<Option<RemoteApi>> {
        let Some(addr) = self.api_listen else {
            if self.api_tls_cert.is_some() || self.api_insecure {
                bail!("--api-tls-cert/--api-tls-key/--api-insecure need --api-listen ADDR:PORT");
            }
            return Ok(None);
        };
        let tls = match (&self.api_tls_cert, &self.api_tls_key) {
            (Some(cert), Some(key)) => Some(acceptor(cert, key)?),
            _ if self.api_insecure => {
                if !addr.ip().is_loopback() {
                    bail!(
                        "--api-insecure serves tokens in clear text: only on a loopback address (127.0.0.1:PORT), not {addr}; give --api-tls-cert and --api-tls-key instead"
                    );
                }
                None
            }
            _ => bail!(
                "--api-listen needs --api-tls-cert FILE and --api-tls-key FILE (or --api-insecure on a loopback address)"
            ),
        };
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr} for the API (--api-listen)"))?;
        let addr = listener.local_addr().unwrap_or(addr);
        Ok(Some(RemoteApi { listener, tls, addr }))
    }
}

fn acceptor(cert: &std::path::Path, key: &std::path::Path) -> anyhow::Result<TlsAcceptor> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let loaded = load_cert(cert, key, &provider).map_err(anyhow::Error::msg)?;
    let files = CertFiles {
        cert: cert.to_path_buf(),
        key: key.to_path_buf(),
        provider: provider.clone(),
        current: arc_swap::ArcSwap::from_pointee(loaded),
        checked: std::sync::Mutex::new((Instant::now(), stamps(cert, key))),
    };
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(files));
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// How often a handshake may look at the certificate files for a renewal.
const RELOAD_CHECK: Duration = Duration::from_secs(5);

/// The API's certificate, re-read when its files change (a renewal needs no restart); a pair
/// that does not load (half written, mismatched) leaves the previous one in service.
#[derive(Debug)]
struct CertFiles {
    cert: PathBuf,
    key: PathBuf,
    provider: Arc<rustls::crypto::CryptoProvider>,
    current: arc_swap::ArcSwap<rustls::sign::CertifiedKey>,
    /// When the files were last looked at, and their modification times then.
    checked: std::sync::Mutex<(Instant, Stamps)>,
}

type Stamps = (Option<std::time::SystemTime>, Option<std::time::SystemTime>);

fn stamps(cert: &std::path::Path, key: &std::path::Path) -> Stamps {
    let mtime = |p: &std::path::Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    (mtime(cert), mtime(key))
}

fn load_cert(
    cert: &std::path::Path,
    key: &std::path::Path,
    provider: &rustls::crypto::CryptoProvider,
) -> Result<rustls::sign::CertifiedKey, String> {
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|i| i.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{}: cannot read a PEM certificate chain: {e}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!("{}: no CERTIFICATE block", cert.display()));
    }
    let key_der = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("{}: cannot read a PEM private key: {e}", key.display()))?;
    let signing_key = provider
        .key_provider
        .load_private_key(key_der)
        .map_err(|e| format!("{}: unusable private key: {e}", key.display()))?;
    let loaded = rustls::sign::CertifiedKey::new(chain, signing_key);
    match loaded.keys_match() {
        // Unknown: the key cannot tell its public half; rustls accepts that too.
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => Ok(loaded),
        Err(e) => Err(format!("{} does not belong to {}: {e}", key.display(), cert.display())),
    }
}

impl CertFiles {
    fn refresh(&self) {
        let mut checked = self.checked.lock().unwrap_or_else(|p| p.into_inner());
        if checked.0.elapsed() < RELOAD_CHECK {
            return;
        }
        checked.0 = Instant::now();
        let now = stamps(&self.cert, &self.key);
        if now == checked.1 {
            return;
        }
        // Remembered also when the load fails: one warning per change, not one per handshake.
        checked.1 = now;
        match load_cert(&self.cert, &self.key, &self.provider) {
            Ok(loaded) => {
                self.current.store(Arc::new(loaded));
                tracing::info!("API certificate reloaded from {}", self.cert.display());
            }
            Err(e) => tracing::warn!("API certificate not reloaded, the previous one stays in service: {e}"),
        }
    }
}

impl rustls::server::ResolvesServerCert for CertFiles {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<rustls::sign::CertifiedKey>> {
        self.refresh();
        Some(self.current.load_full())
    }
}

impl RemoteApi {
    /// Serves `router` behind the token check until the returned guard is dropped.
    pub fn serve(self, sup: Arc<Supervisor>, router: Router) -> Serving {
        let app = router.layer(axum::middleware::from_fn_with_state(sup, authenticate));
        let RemoteApi { listener, tls, addr } = self;
        tracing::info!("API also on {} {addr} (bearer tokens)", if tls.is_some() { "https" } else { "http" });
        Serving(tokio::spawn(async move {
            loop {
                let (stream, peer) = match listener.accept().await {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // Out of descriptors, most likely: wait rather than spin.
                        tracing::warn!("API listener: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let (app, tls) = (app.clone(), tls.clone());
                tokio::spawn(async move {
                    let app = hyper_util::service::TowerToHyperService::new(app);
                    // Each request knows where it came from, for the log of refused ones.
                    let service = hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
                        req.extensions_mut().insert(Peer(peer));
                        hyper::service::Service::call(&app, req)
                    });
                    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    // A client gets 30 s to send a request head: idle or trickling connections
                    // cannot pile up.
                    builder.http1().timer(TokioTimer::new()).header_read_timeout(Duration::from_secs(30));
                    builder.http2().timer(TokioTimer::new()).keep_alive_interval(Duration::from_secs(30));
                    let result = match tls {
                        Some(tls) => match tokio::time::timeout(Duration::from_secs(10), tls.accept(stream)).await {
                            Ok(Ok(s)) => builder.serve_connection_with_upgrades(TokioIo::new(s), service).await,
                            Ok(Err(e)) => {
                                tracing::debug!("API TLS handshake failed: {e}");
                                return;
                            }
                            Err(_) => return,
                        },
                        None => builder.serve_connection_with_upgrades(TokioIo::new(stream), service).await,
                    };
                    if let Err(e) = result {
                        tracing::debug!("API connection: {e}");
                    }
                });
            }
        }))
    }
}

fn unauthorized(req: &Request, message: &str) -> Response {
    let peer = req.extensions().get::<Peer>().map_or_else(|| "?".to_string(), |p| p.0.to_string());
    tracing::warn!(%peer, method = %req.method(), path = %req.uri().path(), "API request refused: {message}");
    let mut r = ApiError::new(StatusCode::UNAUTHORIZED, message).into_response();
    r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer realm=\"deliverous\""));
    r
}

/// Lets a request through only with `Authorization: Bearer TOKEN` of a token that exists and
/// has not expired. Every stored hash is compared, in constant time, whatever matches.
async fn authenticate(State(sup): State<Arc<Supervisor>>, mut req: Request, next: Next) -> Response {
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim())
        .filter(|t| !t.is_empty());
    let Some(given) = given else {
        return unauthorized(
            &req,
            "this API needs a token: send `Authorization: Bearer TOKEN` (`deliverous token create` on the host makes one; the CLI reads DELIVEROUS_TOKEN)",
        );
    };
    let given = hash(given);
    let rows = match sup.store().tokens() {
        Ok(rows) => rows,
        Err(e) => return ApiError::from(e).into_response(),
    };
    let mut found = None;
    for row in &rows {
        if constant_time_eq(row.hash.as_bytes(), given.as_bytes()) {
            found = Some(row);
        }
    }
    let Some(row) = found else {
        return unauthorized(&req, "invalid token: it was never issued or has been removed");
    };
    if expired(row, chrono::Utc::now()) {
        return unauthorized(
            &req,
            &format!("token {} expired at {}: create a new one", row.name, row.expires_at.as_deref().unwrap_or("?")),
        );
    }
    if let Err(e) = sup.store().token_used(&row.name, &crate::apps::now()) {
        tracing::warn!("cannot record the use of token {}: {e}", row.name);
    }
    req.extensions_mut().insert(Remote { token: row.name.clone() });
    next.run(req).await
}
