//! `deliverous daemon`: opens the state, prepares the host network, re-attaches to running
//! instances, and serves the API (unix socket) and the proxy (TCP) until SIGTERM/SIGINT.

use std::future::IntoFuture;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use deliverous_images::ImageStore;
use deliverous_runtime::network::{HostNetwork, NetworkConfig};

use crate::apps::store::Store;
use crate::proxy::cli::ProxyFlags;
use crate::supervisor::{Settings, Supervisor};

#[derive(Debug, clap::Args)]
pub struct DaemonArgs {
    /// Where state, images and instance directories live.
    #[arg(long, default_value = "/var/lib/deliverous")]
    data_dir: PathBuf,
    /// Where sockets, namespaces and runtime state live.
    #[arg(long, default_value = "/run/deliverous")]
    run_dir: PathBuf,
    /// API socket (default: <run-dir>/api.sock).
    #[arg(long)]
    api_socket: Option<PathBuf>,
    /// Address the HTTP proxy listens on.
    #[arg(long, default_value = "0.0.0.0:80")]
    http_listen: SocketAddr,
    /// Bridge the instances are attached to.
    #[arg(long, default_value = "dlv0")]
    bridge: String,
    /// Subnet instances get their addresses from.
    #[arg(long, default_value = "10.88.0.0/16")]
    subnet: String,
    /// Prefix of host-side veth names.
    #[arg(long, default_value = "dlv")]
    veth_prefix: String,
    /// Parent cgroup of all instances.
    #[arg(long, default_value = "deliverous")]
    cgroup_parent: String,
    /// nftables table holding the masquerade rule.
    #[arg(long, default_value = "deliverous")]
    nft_table: String,
    /// Registry (HOST:PORT) reached over plain HTTP; loopback registries always are.
    #[arg(long = "insecure-registry", value_name = "HOST:PORT")]
    insecure_registries: Vec<String>,
    /// Size at which an instance's log file is rotated (e.g. 10M, 1G).
    #[arg(long = "log-max-size", default_value = "10M", value_parser = parse_size)]
    log_max_size: u64,
    /// Rotated log files kept per instance, besides the current one.
    #[arg(long = "log-keep", default_value_t = 3)]
    log_keep: u32,
    /// Revisions kept per app for rollback; images only older ones used are removed.
    #[arg(long = "keep-revisions", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    keep_revisions: u32,
    /// Host path apps may mount read-only with `--volume /host/path:/path` (repeatable; none by
    /// default).
    #[arg(long = "allow-bind", value_name = "PATH")]
    allow_binds: Vec<PathBuf>,
    /// Registry credentials (`deliverous registry login` writes them), read at every pull;
    /// Docker's `~/.docker/config.json` is read after it.
    #[arg(long, env = "DELIVEROUS_AUTH_FILE", default_value = deliverous_images::DEFAULT_AUTH_FILE)]
    auth_file: PathBuf,
    /// Apps are served at <name>.<suffix>.
    #[arg(long, default_value = "localhost")]
    domain_suffix: String,
    /// Seconds an instance gets to exit after its stop signal, before SIGKILL.
    #[arg(long, default_value_t = 10)]
    stop_timeout: u64,
    /// Longest wait before replacing an instance that keeps crashing (the wait starts at 100 ms
    /// and doubles per quick crash): 500ms to 1h.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = restart_max_delay)]
    restart_max_delay: u64,
    /// Take over from the daemon running on this --run-dir without refusing a connection: it
    /// hands over its API socket and exits, this one re-attaches to the instances and replaces
    /// the proxy process on the same listening sockets. For upgrades without systemd.
    #[arg(long)]
    upgrade: bool,
    /// Host ids (FIRST:COUNT) from which each `--userns` app gets a range of 65536 of its own,
    /// kept for the app's name for good.
    #[arg(long, value_name = "FIRST:COUNT", default_value = crate::supervisor::userns::DEFAULT_RANGE)]
    userns_range: crate::supervisor::userns::UsernsRange,
    #[command(flatten)]
    proxy: ProxyFlags,
    #[command(flatten)]
    remote_api: crate::api::remote::RemoteApiFlags,
}

fn restart_max_delay(text: &str) -> Result<u64, String> {
    let ms = crate::apps::parse_duration_ms(text)?;
    if (500..=3_600_000).contains(&ms) {
        Ok(ms)
    } else {
        Err(format!("invalid --restart-max-delay {text:?}: expected 500ms to 1h"))
    }
}

pub fn main(args: DaemonArgs) -> ExitCode {
    // Before anything opens a file or starts a thread: the activated descriptors start at 3, and
    // the environment is changed (the variables are for us, not for the shims we spawn).
    let activation = crate::systemd::Activation::from_env();
    let notifier = crate::systemd::Notifier::from_env();
    crate::init_logging();
    let activation = match activation {
        Ok(a) => a,
        Err(e) => {
            tracing::error!("socket activation: {e}");
            eprintln!("error: socket activation: {e}");
            return ExitCode::FAILURE;
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(args, activation, notifier.clone())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            notifier.send(&format!("STATUS=failed: {e:#}"));
            tracing::error!("{e:#}");
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(
    args: DaemonArgs,
    mut activation: crate::systemd::Activation,
    notifier: crate::systemd::Notifier,
) -> anyhow::Result<()> {
    notifier.send("STATUS=starting");
    if !args.cgroup_parent.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        || args.cgroup_parent.is_empty()
    {
        bail!("invalid --cgroup-parent {:?}: use letters, digits, '-' and '_'", args.cgroup_parent);
    }
    for dir in [&args.data_dir, &args.run_dir] {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711))
            .with_context(|| format!("cannot set permissions on {}", dir.display()))?;
    }
    // On --upgrade, the running daemon hands over its API socket, then exits and unlocks.
    let inherited_api = match args.upgrade {
        true => Some(crate::handover::request(&args.run_dir).await?),
        false => None,
    };
    let _lock = lock_data_dir(&args.data_dir, inherited_api.is_some()).await?;
    let api_socket = args.api_socket.clone().unwrap_or_else(|| args.run_dir.join("api.sock"));

    let store = Store::open(&args.data_dir.join("state.db")).context("cannot open the state database")?;
    let credentials = deliverous_images::CredentialFiles::new(
        std::iter::once(args.auth_file.clone()).chain(deliverous_images::credentials::docker_config_file()),
    );
    let images = Arc::new(
        ImageStore::open(&args.data_dir).context("cannot open the image store")?.with_credentials(credentials),
    );
    // This daemon owns the data dir (locked above): what an interrupted pull left can go.
    match images.sweep_interrupted() {
        Ok(0) => {}
        Ok(n) => tracing::info!("removed {n} leftovers of interrupted pulls"),
        Err(e) => tracing::warn!("cannot sweep leftovers of interrupted pulls: {e}"),
    }
    let net_config = NetworkConfig {
        bridge: args.bridge.clone(),
        subnet: args.subnet.parse().with_context(|| format!("invalid --subnet {:?}", args.subnet))?,
        nft_table: args.nft_table.clone(),
        veth_prefix: args.veth_prefix.clone(),
    };
    // Listeners of the daemon itself first: a bad flag or a taken port changes nothing.
    let remote_api = args.remote_api.bind().await?;
    // Served by the daemon (the proxy's figures and the instances'), not by the proxy process.
    let metrics_listener = match args.proxy.metrics_listen {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr} for metrics"))?,
        ),
        None => None,
    };
    // Sockets systemd passes for the proxy (deliverous-http.socket, deliverous-https.socket)
    // replace --http-listen / --https-listen: the proxy serves exactly those.
    let mut activated = Vec::new();
    let (mut http, mut https) = (vec![args.http_listen], args.proxy.https_listen.into_iter().collect::<Vec<_>>());
    for (name, is_https) in [("http", false), ("https", true)] {
        let listeners = activation.take_tcp(name)?;
        if listeners.is_empty() {
            continue;
        }
        let mut addrs = Vec::new();
        for l in listeners {
            let addr = l.local_addr().with_context(|| format!("the socket-activated {name:?} socket"))?;
            l.set_nonblocking(true)?;
            addrs.push(addr);
            activated
                .push((crate::proxy::control::ListenerDesc { addr, https: is_https }, std::os::fd::OwnedFd::from(l)));
        }
        tracing::info!("the proxy serves the socket-activated {name:?} sockets {addrs:?}");
        if is_https {
            https = addrs;
        } else {
            http = addrs;
        }
    }
    for name in activation.remaining() {
        tracing::warn!(
            "socket-activated {name:?} is not used: this daemon serves only \"api\", \"http\" and \"https\""
        );
    }
    // The proxy first: a port in use is reported at once and leaves no bridge or nft table
    // behind. A proxy still serving from before (daemon restart or crash) is re-attached.
    if !https.is_empty() && args.proxy.certs_dir.is_none() {
        bail!("an HTTPS listener needs a certificate directory (--certs-dir)");
    }
    let proxy = crate::proxy::link::ProxyLink::start(crate::proxy::link::LinkConfig {
        run_dir: args.run_dir.clone(),
        http,
        https,
        threads: args.proxy.threads,
        args: args.proxy.to_args(),
        replace: args.upgrade,
        activated,
    })
    .await
    .context("cannot start the proxy (choose other --http-listen / --https-listen addresses if the ports are taken)")?;
    // A proxy this daemon started is stopped again if the start fails from here on (one that was
    // already running serves instances and stays).
    let mut proxy_guard = StopProxyUnlessStarted { proxy: proxy.clone(), armed: proxy.started_here() };
    // The API socket: handed over by the previous daemon (--upgrade), passed by systemd, or
    // bound here.
    let (api_listener, api_activated) = match (inherited_api, activation.take_unix("api")?) {
        (Some(l), _) => (tokio::net::UnixListener::from_std(l).context("the handed-over API socket")?, false),
        (None, Some(listener)) => {
            // systemd owns this socket (path, mode, group): use it as it is, never remove it.
            listener.set_nonblocking(true).context("cannot use the socket-activated API socket")?;
            let listener =
                tokio::net::UnixListener::from_std(listener).context("cannot use the socket-activated API socket")?;
            (listener, true)
        }
        (None, None) => (bind_api_socket(&api_socket).await?, false),
    };
    drop(activation);
    let handed_over = Arc::new(tokio::sync::Notify::new());
    {
        use std::os::fd::AsFd;
        let copy = api_listener.as_fd().try_clone_to_owned().context("cannot duplicate the API socket")?;
        crate::handover::serve(&args.run_dir, copy, handed_over.clone())?;
    }

    let net = Arc::new(HostNetwork::new(net_config).context("invalid network settings")?);
    {
        let net = net.clone();
        tokio::task::spawn_blocking(move || net.ensure()).await?.context("cannot set up the host network")?;
    }

    let settings = Settings {
        data_dir: args.data_dir.clone(),
        run_dir: args.run_dir.clone(),
        cgroup_parent: args.cgroup_parent.clone(),
        domain_suffix: args.domain_suffix.trim_matches('.').to_ascii_lowercase(),
        insecure_registries: args.insecure_registries.clone(),
        stop_timeout: Duration::from_secs(args.stop_timeout),
        log_max_bytes: args.log_max_size,
        log_keep: args.log_keep,
        ready_timeout: Duration::from_secs(30),
        allow_binds: args.allow_binds.clone(),
        keep_revisions: args.keep_revisions,
        restart_max_delay: Duration::from_millis(args.restart_max_delay),
        proxy_ports: proxy.http_addrs.iter().chain(&proxy.https_addrs).map(|a| a.port()).collect(),
        userns_range: args.userns_range,
    };
    let events = Arc::new(crate::events::Events::open(&args.data_dir));
    let sup = Supervisor::new(settings, store, images, net, proxy.clone(), events);
    notifier.send("STATUS=re-attaching to running instances");
    sup.recover().await.context("cannot recover instances from the previous run")?;
    sup.publish_routes();
    proxy.finish_start().await.context("cannot replace the running proxy")?;
    sup.events().emit(
        crate::events::Kind::DaemonStarted,
        "",
        None,
        format!("daemon {} started", env!("CARGO_PKG_VERSION")),
    );

    if let Some(l) = metrics_listener {
        tokio::spawn(crate::api::stats::serve_metrics(l, sup.clone()));
    }
    let api_where = if api_activated {
        "API on the socket-activated descriptor \"api\"".to_string()
    } else {
        format!("API on {}", api_socket.display())
    };
    tracing::info!(
        "proxy (pid {}) listening on {:?} (https: {:?}), {api_where}",
        proxy.pid(),
        proxy.http_addrs,
        proxy.https_addrs
    );

    let app = crate::api::router(sup.clone());
    proxy_guard.armed = false;
    notifier.send(&format!(
        "READY=1\nSTATUS=serving: {api_where}, proxy on {}",
        proxy.http_addrs.iter().chain(&proxy.https_addrs).map(|a| a.to_string()).collect::<Vec<_>>().join(" ")
    ));
    if let Some(every) = notifier.watchdog_interval() {
        // The pings come from the async runtime that serves the API and supervises instances:
        // if it stops scheduling tasks, they stop, and systemd restarts the daemon.
        let notifier = notifier.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                notifier.send("WATCHDOG=1");
            }
        });
    }
    let _remote_api = remote_api.map(|r| r.serve(sup.clone(), app.clone()));
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let mut server = tokio::spawn(
        axum::serve(api_listener, app)
            .with_graceful_shutdown(async move { crate::proxy::set(&mut stop_rx).await })
            .into_future(),
    );
    let handing_over = tokio::select! {
        _ = shutdown_signal() => false,
        _ = handed_over.notified() => true,
        r = &mut server => {
            r?.context("API server failed")?;
            false
        }
    };
    notifier.send(if handing_over {
        "STOPPING=1\nSTATUS=handing over to a new daemon"
    } else {
        "STOPPING=1\nSTATUS=stopping; instances keep running"
    });
    let _ = stop_tx.send(true);
    // Requests in progress may finish; streams (`logs -f`, `events -f`) are cut after a while.
    if tokio::time::timeout(Duration::from_secs(10), &mut server).await.is_err() {
        server.abort();
    }

    if handing_over {
        tracing::info!("handed over to the new daemon; instances and the proxy keep running");
        return Ok(());
    }
    sup.shutdown();
    if sup.live_count() == 0 {
        tracing::info!("no instance runs: stopping the proxy too");
        proxy.stop().await;
    }
    if !api_activated {
        let _ = std::fs::remove_file(&api_socket);
    }
    let _ = std::fs::remove_file(crate::handover::socket_path(&args.run_dir));
    tracing::info!("daemon stopped");
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
    tracing::info!("shutting down; instances keep running");
}

/// Stops the proxy process when dropped while armed: a daemon that fails to start must not leave
/// a proxy it started behind.
struct StopProxyUnlessStarted {
    proxy: Arc<crate::proxy::link::ProxyLink>,
    armed: bool,
}

impl Drop for StopProxyUnlessStarted {
    fn drop(&mut self) {
        if self.armed {
            self.proxy.stop_now();
        }
    }
}

/// Binds the API socket at `path`: mode 0660, group `deliverous` when that group exists (its
/// members may use the API without root).
async fn bind_api_socket(path: &std::path::Path) -> anyhow::Result<tokio::net::UnixListener> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    if tokio::net::UnixStream::connect(path).await.is_ok() {
        bail!("another daemon already serves {} (to replace it, start this one with --upgrade)", path.display());
    }
    let _ = std::fs::remove_file(path);
    let listener =
        tokio::net::UnixListener::bind(path).with_context(|| format!("cannot listen on {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
    match nix::unistd::Group::from_name(API_GROUP) {
        Ok(Some(group)) => nix::unistd::chown(path, None, Some(group.gid))
            .with_context(|| format!("cannot give {} to group {API_GROUP}", path.display()))?,
        Ok(None) => tracing::debug!("no group {API_GROUP}: the API socket is for root only"),
        Err(e) => tracing::warn!("cannot look up group {API_GROUP}: {e}; the API socket is for root only"),
    }
    Ok(listener)
}

/// Members of this group may use the API socket.
const API_GROUP: &str = "deliverous";

/// One daemon per data dir: a second one would fight the first over every instance. With
/// `wait`, waits for the daemon that is handing over to exit.
async fn lock_data_dir(dir: &std::path::Path, wait: bool) -> anyhow::Result<std::fs::File> {
    use std::os::fd::AsRawFd;
    let path = dir.join("daemon.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        // SAFETY: flock on a descriptor we own; no memory is passed.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc == 0 {
            return Ok(file);
        }
        if !wait {
            bail!(
                "another deliverous daemon is using {} (to replace it, start this one with --upgrade)",
                dir.display()
            );
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("the previous daemon did not exit within 60 s of handing over");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `10M`, `512K`, `1G` or plain bytes, at least 4 KiB.
fn parse_size(text: &str) -> Result<u64, String> {
    let bytes = crate::apps::parse_bytes(text)?;
    if bytes < 4096 {
        return Err(format!("size {text:?} is too small: give at least 4K"));
    }
    Ok(bytes)
}
