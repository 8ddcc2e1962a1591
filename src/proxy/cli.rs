//! Command-line settings of the proxy, shared by `deliverous daemon` and the standalone
//! `deliverous proxy` (a route table from a file: benchmarks, or a proxy in front of anything).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use super::{metrics, start, tls::CertStore, Cidr, ProxyHandle, ProxyOptions, RouteConfig, RouteTable};

#[derive(Debug, Clone, clap::Args)]
pub struct ProxyFlags {
    /// Address the HTTPS proxy listens on (TLS terminated with the certificates of --certs-dir).
    #[arg(long = "https-listen", value_name = "ADDR")]
    pub https_listen: Option<SocketAddr>,
    /// Directory of certificates: NAME.crt + NAME.key, NAME.pem, or certbot's NAME/fullchain.pem +
    /// NAME/privkey.pem; each is served for the names it declares, and reloaded when it changes.
    #[arg(long = "certs-dir", value_name = "DIR")]
    pub certs_dir: Option<PathBuf>,
    /// Proxy worker threads (0: one per CPU).
    #[arg(long = "proxy-threads", default_value_t = 0)]
    pub threads: usize,
    /// Address or range of a load balancer in front of us whose X-Forwarded-For, Forwarded and
    /// PROXY protocol headers are believed (repeatable; e.g. 10.0.0.0/8).
    #[arg(long = "trusted-proxy", value_name = "CIDR")]
    pub trusted_proxies: Vec<Cidr>,
    /// Connections from --trusted-proxy addresses start with a PROXY protocol v1/v2 header.
    #[arg(long = "proxy-protocol")]
    pub proxy_protocol: bool,
    /// Time a client has to send a request head, and that an idle keep-alive connection stays
    /// open (as nginx's client_header_timeout / keepalive_timeout).
    #[arg(long = "client-timeout", value_name = "DURATION", default_value = "30s", value_parser = crate::apps::parse_duration_ms)]
    pub client_timeout_ms: u64,
    /// Append one JSON line per request to this file (off by default).
    #[arg(long = "access-log", value_name = "FILE")]
    pub access_log: Option<PathBuf>,
    /// Also serve Prometheus metrics at http://ADDR/metrics (they are always on the API socket).
    #[arg(long = "metrics-listen", value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,
}

impl ProxyFlags {
    /// Loads certificates and opens the access log; then the proxy can start.
    pub fn options(&self, http: Vec<SocketAddr>) -> anyhow::Result<ProxyOptions> {
        let certs = match &self.certs_dir {
            Some(dir) => {
                let store =
                    CertStore::load(dir).with_context(|| format!("cannot read certificates in {}", dir.display()))?;
                Some(store)
            }
            None => None,
        };
        if let Some(path) = &self.access_log {
            super::access::open(path).with_context(|| format!("cannot open the access log {}", path.display()))?;
        }
        let tcp_ip = http.first().map(|a| a.ip()).unwrap_or(std::net::IpAddr::from([0, 0, 0, 0]));
        Ok(ProxyOptions {
            http,
            https: self.https_listen.into_iter().collect(),
            threads: self.threads,
            trusted: self.trusted_proxies.clone(),
            proxy_protocol: self.proxy_protocol,
            certs,
            tcp_ip,
            client_timeout: Duration::from_millis(self.client_timeout_ms.max(1)),
        })
    }
}

/// Serves `GET /metrics` on its own TCP listener.
pub async fn serve_metrics(listener: tokio::net::TcpListener, table: Arc<RouteTable>) {
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let table = table.clone();
            async move { ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], metrics::render(&table)) }
        }),
    );
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!("metrics listener: {e}");
    }
}

#[derive(Debug, clap::Args)]
pub struct StandaloneArgs {
    /// Address the HTTP proxy listens on (repeatable).
    #[arg(long = "listen", value_name = "ADDR", required = true)]
    listen: Vec<SocketAddr>,
    /// Route table (JSON, as the daemon publishes it); re-read on SIGHUP.
    #[arg(long, value_name = "FILE")]
    routes: PathBuf,
    #[command(flatten)]
    flags: ProxyFlags,
}

fn read_routes(path: &std::path::Path) -> anyhow::Result<RouteConfig> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("invalid route table in {}", path.display()))
}

/// `deliverous proxy`: the proxy alone, with routes from a file.
pub fn standalone(args: StandaloneArgs) -> ExitCode {
    crate::init_logging();
    let run = || -> anyhow::Result<()> {
        let table = Arc::new(RouteTable::default());
        table.publish(read_routes(&args.routes)?);
        let options = args.flags.options(args.listen.clone())?;
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let handle: ProxyHandle = start(options, table.clone())?;
        tracing::info!("proxy listening on {:?} (https {:?})", handle.http_addrs, handle.https_addrs);
        rt.block_on(async {
            if let Some(addr) = args.flags.metrics_listen {
                let l =
                    tokio::net::TcpListener::bind(addr).await.with_context(|| format!("cannot listen on {addr}"))?;
                tokio::spawn(serve_metrics(l, table.clone()));
            }
            use tokio::signal::unix::{signal, SignalKind};
            let mut hup = signal(SignalKind::hangup())?;
            let mut term = signal(SignalKind::terminate())?;
            let mut int = signal(SignalKind::interrupt())?;
            loop {
                tokio::select! {
                    _ = hup.recv() => match read_routes(&args.routes) {
                        Ok(config) => { table.publish(config); tracing::info!("routes reloaded"); }
                        Err(e) => tracing::error!("routes not reloaded: {e:#}"),
                    },
                    _ = term.recv() => break,
                    _ = int.recv() => break,
                }
            }
            anyhow::Ok(())
        })?;
        drop(handle);
        Ok(())
    };
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("deliverous proxy: {e:#}");
            ExitCode::FAILURE
        }
    }
}
