//! Command-line settings of the proxy, shared by `deliverous daemon` and the standalone
//! `deliverous proxy` (a route table from a file: benchmarks, or a proxy in front of anything).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use super::control::{ControlState, Hello, ListenerDesc};
use super::{metrics, tls::CertStore, Cidr, Listener, ProxyHandle, ProxyOptions, RouteConfig, RouteTable};

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

impl ProxyFlags {
    /// The flags for a `deliverous proxy` process, except its listening addresses.
    pub fn to_args(&self) -> Vec<String> {
        let mut out = vec!["--proxy-threads".to_string(), self.threads.to_string()];
        if let Some(dir) = &self.certs_dir {
            out.extend(["--certs-dir".to_string(), dir.display().to_string()]);
        }
        for c in &self.trusted_proxies {
            out.extend(["--trusted-proxy".to_string(), c.to_string()]);
        }
        if self.proxy_protocol {
            out.push("--proxy-protocol".into());
        }
        out.extend(["--client-timeout".to_string(), format!("{}ms", self.client_timeout_ms)]);
        if let Some(path) = &self.access_log {
            out.extend(["--access-log".to_string(), path.display().to_string()]);
        }
        // --metrics-listen stays with the daemon, which serves the proxy's figures with the
        // instances'.
        out
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
    /// Address the HTTP proxy listens on (repeatable; not needed when the daemon passes the
    /// listening sockets).
    #[arg(long = "listen", value_name = "ADDR")]
    listen: Vec<SocketAddr>,
    /// Route table (JSON, as the daemon publishes it); re-read on SIGHUP.
    #[arg(long, value_name = "FILE")]
    routes: Option<PathBuf>,
    /// Serve the control socket the daemon drives this proxy through (route tables, draining,
    /// metrics, hand-over of the listening sockets).
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,
    /// The daemon's summary of the settings it started this proxy with.
    #[arg(long, hide = true, default_value = "")]
    fingerprint: String,
    /// Write the proxy's PID here once it serves.
    #[arg(long = "pid-file", value_name = "FILE")]
    pid_file: Option<PathBuf>,
    /// Once retired (a newer proxy took over), how long open connections may take to finish.
    #[arg(long = "retire-grace", value_name = "DURATION", default_value = "30s", value_parser = crate::apps::parse_duration_ms)]
    retire_grace_ms: u64,
    #[command(flatten)]
    flags: ProxyFlags,
}

fn read_routes(path: &std::path::Path) -> anyhow::Result<RouteConfig> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("invalid route table in {}", path.display()))
}

/// Environment variable listing the listening sockets a proxy inherits (JSON list of
/// [`ListenerDesc`]), as descriptors 3, 4, … in that order.
pub const INHERITED_LISTENERS: &str = "DELIVEROUS_PROXY_LISTENERS";
/// First inherited descriptor.
pub const FIRST_INHERITED_FD: i32 = 3;

/// The listening sockets passed by the process that started us, if any.
fn inherited_listeners() -> anyhow::Result<Option<Vec<Listener>>> {
    use std::os::fd::FromRawFd;
    let Some(text) = std::env::var_os(INHERITED_LISTENERS) else { return Ok(None) };
    // SAFETY: called at start-up, before any other thread exists.
    unsafe { std::env::remove_var(INHERITED_LISTENERS) };
    let descs: Vec<ListenerDesc> = serde_json::from_str(&text.to_string_lossy())
        .with_context(|| format!("invalid {INHERITED_LISTENERS} from the daemon"))?;
    let mut out = Vec::with_capacity(descs.len());
    for (i, d) in descs.into_iter().enumerate() {
        let fd = FIRST_INHERITED_FD + i as i32;
        // SAFETY: fcntl on a descriptor number; it fails cleanly if nothing is open there.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            anyhow::bail!("listening socket {} for {} was not passed (descriptor {fd})", i + 1, d.addr);
        }
        // SAFETY: the daemon passed this descriptor to us and nothing else in this process owns it.
        let socket = unsafe { std::net::TcpListener::from_raw_fd(fd) };
        // SAFETY: as above; marks it close-on-exec now that it is ours.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
        socket.set_nonblocking(true).with_context(|| format!("listening socket for {}", d.addr))?;
        out.push(Listener { addr: d.addr, https: d.https, socket });
    }
    Ok(Some(out))
}

/// Tells the daemon (our stdout is its pipe) that we serve, or why we cannot; then points
/// stdout at stderr so that nothing else ends up in the pipe.
fn report_start(result: &Result<u32, String>) {
    use std::io::Write;
    let line = match result {
        Ok(pid) => serde_json::json!({ "ready": true, "pid": pid }),
        Err(e) => serde_json::json!({ "error": e }),
    };
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
    // SAFETY: dup2 of our own standard descriptors.
    unsafe { libc::dup2(2, 1) };
}

/// `deliverous proxy`: the proxy alone (routes from a file) or driven by the daemon through its
/// control socket.
pub fn standalone(args: StandaloneArgs) -> ExitCode {
    crate::init_logging();
    let managed = args.control.is_some();
    match run_proxy(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if managed {
                report_start(&Err(format!("{e:#}")));
            }
            eprintln!("deliverous proxy: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run_proxy(args: StandaloneArgs) -> anyhow::Result<()> {
    let table = Arc::new(RouteTable::default());
    if let Some(path) = &args.routes {
        table.publish(read_routes(path)?);
    }
    let options = args.flags.options(args.listen.clone())?;
    let listeners = match inherited_listeners()? {
        Some(l) => l,
        None if args.listen.is_empty() && args.flags.https_listen.is_none() => {
            anyhow::bail!("nothing to listen on: give --listen ADDR")
        }
        None => super::bind_listeners(&options)?,
    };
    let mut copies = Vec::with_capacity(listeners.len());
    for l in &listeners {
        let fd = l.socket.try_clone().with_context(|| format!("cannot duplicate the socket of {}", l.addr))?;
        copies.push((ListenerDesc { addr: l.addr, https: l.https }, std::os::fd::OwnedFd::from(fd)));
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let handle: ProxyHandle = super::start_on(options, table.clone(), listeners)?;
    tracing::info!("proxy listening on {:?} (https {:?})", handle.http_addrs, handle.https_addrs);
    let (retire, mut retired) = tokio::sync::watch::channel(false);
    rt.block_on(async {
        if let Some(addr) = args.flags.metrics_listen {
            let l = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("cannot listen on {addr}"))?;
            tokio::spawn(serve_metrics(l, table.clone()));
        }
        if let Some(path) = &args.control {
            let state = Arc::new(ControlState {
                table: table.clone(),
                hello: Hello {
                    pid: std::process::id(),
                    version: env!("CARGO_PKG_VERSION").to_string(),
                    exe: super::control::exe_identity(),
                    fingerprint: args.fingerprint.clone(),
                    http: handle.http_addrs.clone(),
                    https: handle.https_addrs.clone(),
                },
                listeners: copies,
                retire,
            });
            // Bound beside the final path, then renamed over it: the daemon always finds a
            // proxy there, the old one until the new one serves.
            let mut tmp = path.as_os_str().to_owned();
            tmp.push(format!(".{}", std::process::id()));
            let tmp = PathBuf::from(tmp);
            let _ = std::fs::remove_file(&tmp);
            let listener =
                tokio::net::UnixListener::bind(&tmp).with_context(|| format!("cannot listen on {}", tmp.display()))?;
            std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
            std::fs::rename(&tmp, path)
                .with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))?;
            tokio::spawn(super::control::serve(listener, state));
        }
        if let Some(pid_file) = &args.pid_file {
            std::fs::write(pid_file, format!("{}\n", std::process::id()))
                .with_context(|| format!("cannot write {}", pid_file.display()))?;
        }
        if args.control.is_some() {
            report_start(&Ok(std::process::id()));
        }
        use tokio::signal::unix::{signal, SignalKind};
        let mut hup = signal(SignalKind::hangup())?;
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        loop {
            tokio::select! {
                _ = hup.recv() => match &args.routes {
                    Some(path) => match read_routes(path) {
                        Ok(config) => { table.publish(config); tracing::info!("routes reloaded"); }
                        Err(e) => tracing::error!("routes not reloaded: {e:#}"),
                    },
                    None => tracing::info!("SIGHUP ignored: no --routes file"),
                },
                _ = term.recv() => return anyhow::Ok(()),
                _ = int.recv() => return anyhow::Ok(()),
                _ = super::set(&mut retired) => break,
            }
        }
        // Retired: the newer proxy accepts on the same sockets; finish what is open.
        handle.retire();
        let deadline = tokio::time::Instant::now() + Duration::from_millis(args.retire_grace_ms);
        while handle.open_connections() > 0 && tokio::time::Instant::now() < deadline {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                _ = term.recv() => break,
            }
        }
        tracing::info!(open = handle.open_connections(), "retired proxy exits");
        anyhow::Ok(())
    })?;
    if let Some(pid_file) = &args.pid_file {
        // Only ours: a newer proxy may have written its own PID there.
        if std::fs::read_to_string(pid_file).is_ok_and(|t| t.trim() == std::process::id().to_string()) {
            let _ = std::fs::remove_file(pid_file);
        }
    }
    drop(handle);
    Ok(())
}
