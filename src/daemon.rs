//! `deliverous daemon`: opens the state, prepares the host network, re-attaches to running
//! instances, and serves the API (unix socket) and the proxy (TCP) until SIGTERM/SIGINT.

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
use crate::proxy::RouteTable;
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
    #[command(flatten)]
    proxy: ProxyFlags,
    #[command(flatten)]
    remote_api: crate::api::remote::RemoteApiFlags,
}

pub fn main(args: DaemonArgs) -> ExitCode {
    crate::init_logging();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: DaemonArgs) -> anyhow::Result<()> {
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
    let _lock = lock_data_dir(&args.data_dir)?;
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
    // Bind every listener before touching the host: a port in use is reported at once and
    // leaves no bridge or nft table behind.
    let routes = Arc::new(RouteTable::default());
    let proxy_options = args.proxy.options(vec![args.http_listen])?;
    let proxy = crate::proxy::start(proxy_options, routes.clone()).context(
        "cannot start the proxy (choose other --http-listen / --https-listen addresses if the ports are taken)",
    )?;
    let metrics_listener = match args.proxy.metrics_listen {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr} for metrics"))?,
        ),
        None => None,
    };
    let remote_api = args.remote_api.bind().await?;
    if let Some(parent) = api_socket.parent() {
        std::fs::create_dir_all(parent)?;
    }
    if tokio::net::UnixStream::connect(&api_socket).await.is_ok() {
        bail!("another daemon already serves {}", api_socket.display());
    }
    let _ = std::fs::remove_file(&api_socket);
    let api_listener = tokio::net::UnixListener::bind(&api_socket)
        .with_context(|| format!("cannot listen on {}", api_socket.display()))?;
    std::fs::set_permissions(&api_socket, std::fs::Permissions::from_mode(0o660))?;

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
        proxy_ports: proxy.http_addrs.iter().chain(&proxy.https_addrs).map(|a| a.port()).collect(),
    };
    let events = Arc::new(crate::events::Events::open(&args.data_dir));
    let sup = Supervisor::new(settings, store, images, net, routes.clone(), events);
    sup.recover().await.context("cannot recover instances from the previous run")?;
    sup.events().emit(
        crate::events::Kind::DaemonStarted,
        "",
        None,
        format!("daemon {} started", env!("CARGO_PKG_VERSION")),
    );

    if let Some(l) = metrics_listener {
        tokio::spawn(crate::api::stats::serve_metrics(l, sup.clone()));
    }
    tracing::info!(
        "proxy listening on {:?} (https: {:?}), API on {}",
        proxy.http_addrs,
        proxy.https_addrs,
        api_socket.display()
    );

    let app = crate::api::router(sup.clone());
    let _remote_api = remote_api.map(|r| r.serve(sup.clone(), app.clone()));
    axum::serve(api_listener, app).with_graceful_shutdown(shutdown_signal()).await.context("API server failed")?;

    drop(proxy);
    sup.shutdown();
    let _ = std::fs::remove_file(&api_socket);
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

/// One daemon per data dir: a second one would fight the first over every instance.
fn lock_data_dir(dir: &std::path::Path) -> anyhow::Result<std::fs::File> {
    use std::os::fd::AsRawFd;
    let path = dir.join("daemon.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    // SAFETY: flock on a descriptor we own; no memory is passed.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        bail!("another deliverous daemon is using {}", dir.display());
    }
    Ok(file)
}

/// `10M`, `512K`, `1G` or plain bytes, at least 4 KiB.
fn parse_size(text: &str) -> Result<u64, String> {
    let bytes = crate::apps::parse_bytes(text)?;
    if bytes < 4096 {
        return Err(format!("size {text:?} is too small: give at least 4K"));
    }
    Ok(bytes)
}
