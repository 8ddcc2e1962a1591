//! `deliverous`: one binary that is the daemon, its CLI, and the per-instance shim.
//! The shim must stay single-threaded (libcontainer forks), so it is dispatched before any
//! async runtime exists.

mod alloc;
mod api;
mod apps;
mod attach;
mod cli;
mod daemon;
mod events;
mod handover;
mod install;
mod logs;
mod proxy;
mod stats;
mod supervisor;
mod systemd;
mod terminal;

/// Every process of the binary (daemon, proxy, shim, CLI) allocates through it: see src/alloc.rs.
#[global_allocator]
static GLOBAL: alloc::CachedMalloc = alloc::CachedMalloc;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "deliverous",
    version,
    about = "Run Twelve-Factor apps from OCI images on one host: no Docker daemon, built-in reverse proxy",
    after_help = "Examples:\n  deliverous app create web --image registry.example.com/shop/web:1.4 --port 8080\n  \
        deliverous app start web\n  deliverous app ls --json\n  deliverous logs web -f\n\n\
        Commands that print data take --json (one JSON document; logs and events: one object per line).\n\n\
        Exit codes:\n  \
        0  done\n  \
        1  the daemon refused or failed (unknown app: 404, conflict, failed deploy...); the message says why\n  \
        2  bad usage: unknown flag, missing or invalid argument, unreadable apply file\n  \
        3  the daemon cannot be reached (not running, wrong --host, connection broken)\n  \
        exec and run exit with the command's own code once it has started."
)]
struct Cli {
    /// Daemon API address: unix:/path/api.sock, or https://HOST:PORT for a daemon started with
    /// --api-listen (the token comes from DELIVEROUS_TOKEN).
    #[arg(long, global = true, env = "DELIVEROUS_HOST", default_value = "unix:/run/deliverous/api.sock")]
    host: String,
    /// PEM file of the CA that issued the remote daemon's certificate (default: the system's CAs).
    #[arg(long, global = true, env = "DELIVEROUS_CA", value_name = "FILE")]
    ca: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Manage apps: create, config, deploy, rollback, history, start, scale, stop, rm, ls, show, export.
    #[command(
        subcommand,
        after_help = "Examples:\n  deliverous app create web --image registry.example.com/shop/web:1.4 --port 8080\n  \
            deliverous app start web\n  deliverous app show web"
    )]
    App(cli::AppCommand),
    /// Create, change, start, scale and (with --prune) remove apps to match a TOML file.
    #[command(
        after_help = "Examples:\n  deliverous apply -f deliverous.toml --dry-run\n  deliverous apply -f deliverous.toml"
    )]
    Apply(cli::ApplyArgs),
    /// Manage images: pull, ls, import, rm, prune.
    #[command(
        subcommand,
        after_help = "Examples:\n  deliverous image pull registry.example.com/shop/web:1.4\n  deliverous image ls --json"
    )]
    Image(cli::ImageCommand),
    /// Show an app's logs: all instances merged in time order, each line prefixed by its instance.
    #[command(after_help = "Examples:\n  deliverous logs web --tail 100\n  deliverous logs web -f --since 10m\n  \
        deliverous logs web --instance web.2 --timestamps")]
    Logs(cli::LogsArgs),
    /// What happened to apps and instances: created, started, ready, exited (and why),
    /// restarting (and when), crash loops, stopped, scaled, changed.
    #[command(after_help = "Examples:\n  deliverous events --tail 20\n  deliverous events -f --app web\n  \
        deliverous events --since 10m --json")]
    Events(cli::EventsArgs),
    /// Run a command inside a running instance, attached to this terminal; exits with its code.
    Exec(cli::ExecArgs),
    /// Run a one-off command (migrations, consoles) in a fresh instance of an app's current
    /// revision, attached to this terminal; the instance is removed afterwards. Exits with the
    /// command's code.
    Run(cli::RunArgs),
    /// Print a shell completion script: `deliverous completions bash > /etc/bash_completion.d/deliverous`.
    #[command(after_help = "Examples:\n  deliverous completions bash > /etc/bash_completion.d/deliverous\n  \
        deliverous completions zsh > \"${fpath[1]}/_deliverous\"\n  \
        deliverous completions fish > ~/.config/fish/completions/deliverous.fish")]
    Completions { shell: clap_complete::Shell },
    /// Named volumes: ls, rm.
    #[command(subcommand, after_help = "Examples:\n  deliverous volume ls\n  deliverous volume rm web-data")]
    Volume(cli::VolumeCommand),
    /// Live CPU, memory, pids, restarts and requests/s of every instance.
    #[command(after_help = "Examples:\n  deliverous top\n  deliverous top web --once\n  deliverous top --json")]
    Top(cli::TopArgs),
    /// Tokens for the remote API (daemon flag --api-listen): create, ls, rm.
    #[command(subcommand, after_help = "Examples:\n  deliverous token create --name ci\n  deliverous token ls --json")]
    Token(cli::TokenCommand),
    /// Registry credentials: login, ls, logout.
    #[command(
        subcommand,
        after_help = "Examples:\n  deliverous registry login ghcr.io -u octocat\n  deliverous registry logout ghcr.io"
    )]
    Registry(cli::RegistryCommand),
    /// Run the daemon (API, supervisor, proxy).
    #[command(after_help = "Examples:\n  sudo deliverous daemon\n  \
        sudo deliverous daemon --api-listen 0.0.0.0:7443 --api-tls-cert cert.pem --api-tls-key key.pem")]
    Daemon(daemon::DaemonArgs),
    /// Run the reverse proxy alone, with a route table from a file (re-read on SIGHUP).
    #[command(after_help = "Example:\n  deliverous proxy --routes routes.json --listen 127.0.0.1:8080")]
    Proxy(proxy::cli::StandaloneArgs),
    /// Install the binary and the systemd units, and enable them (or remove them: --uninstall).
    #[command(after_help = "Examples:\n  sudo deliverous install\n  deliverous install --root ./pkgroot   \
        # stage the files for a package\n  sudo deliverous install --uninstall --dry-run")]
    Install(install::InstallArgs),
    /// Run one instance's shim (started by the daemon).
    #[command(hide = true)]
    Shim(ShimArgs),
    /// Run a command inside a running instance (started by the daemon, control socket on fd 3).
    #[command(hide = true, name = "shim-exec")]
    ShimExec(ShimExecArgs),
    /// Delete an instance's ended container (run by its monitor, at the end).
    #[command(hide = true, name = "shim-finish")]
    ShimFinish(ShimFinishArgs),
}

#[derive(Debug, clap::Args)]
struct ShimFinishArgs {
    #[arg(long)]
    id: String,
    #[arg(long)]
    state_root: PathBuf,
}

#[derive(Debug, clap::Args)]
struct ShimExecArgs {
    #[arg(long)]
    bundle: PathBuf,
    /// Cache of compiled seccomp programs (the shims').
    #[arg(long)]
    seccomp_cache: Option<PathBuf>,
    #[arg(long)]
    pid: i32,
    #[arg(long)]
    env: Vec<String>,
    #[arg(long)]
    user: Option<String>,
    #[arg(long)]
    cwd: Option<String>,
    #[arg(long)]
    tty: bool,
    #[arg(long, default_value_t = 0)]
    rows: u16,
    #[arg(long, default_value_t = 0)]
    cols: u16,
    #[arg(last = true, required = true)]
    args: Vec<String>,
}

#[derive(Debug, clap::Args)]
struct ShimArgs {
    #[arg(long)]
    id: String,
    #[arg(long)]
    bundle: PathBuf,
    #[arg(long)]
    state_root: PathBuf,
    #[arg(long)]
    log: PathBuf,
    #[arg(long, default_value_t = 10 << 20)]
    log_max_bytes: u64,
    #[arg(long, default_value_t = 3)]
    log_keep: u32,
    #[arg(long)]
    socket: PathBuf,
    #[arg(long)]
    exit_file: PathBuf,
    #[arg(long)]
    cgroups_path: String,
    /// The container's stdin, stdout and stderr are our descriptors 3, 4 and 5.
    #[arg(long)]
    inherit_stdio: bool,
    /// Give the container a terminal; its master goes to this unix socket.
    #[arg(long)]
    console_socket: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    cli::set_ca_file(cli.ca.clone());
    match cli.command {
        Command::Shim(a) => {
            // Until it reports, the shim's stderr is the daemon's: libcontainer's reasons for a
            // failed start end up in the daemon log. Its seccomp module warns about every
            // syscall of our profile that this libseccomp predates; those are skipped on purpose.
            init_logging_with("warn,libcgroups=error,libcontainer::seccomp=error");
            let code = deliverous_runtime::shim::run(deliverous_runtime::shim::ShimConfig {
                id: a.id,
                bundle: a.bundle,
                state_root: a.state_root,
                log: a.log,
                log_max_bytes: a.log_max_bytes,
                log_keep: a.log_keep,
                socket: a.socket,
                exit_file: a.exit_file,
                cgroups_path: a.cgroups_path,
                stdio: match (a.console_socket, a.inherit_stdio) {
                    (Some(path), _) => deliverous_runtime::shim::ContainerStdio::Console(path),
                    (None, true) => deliverous_runtime::shim::ContainerStdio::Inherit,
                    (None, false) => deliverous_runtime::shim::ContainerStdio::Log,
                },
            });
            ExitCode::from(code.clamp(0, 255) as u8)
        }
        Command::ShimFinish(a) => match deliverous_runtime::shim::finish(&a.id, &a.state_root) {
            Ok(()) => ExitCode::SUCCESS,
            Err(msg) => {
                // The monitor reads our stdout into the instance log.
                println!("{msg}");
                ExitCode::FAILURE
            }
        },
        Command::ShimExec(a) => {
            let code = deliverous_runtime::exec::run(deliverous_runtime::exec::ExecConfig {
                bundle: a.bundle,
                pid: a.pid,
                args: a.args,
                env: a.env,
                user: a.user,
                cwd: a.cwd,
                tty: a.tty,
                size: (a.rows > 0 && a.cols > 0).then_some((a.rows, a.cols)),
                seccomp_cache: a.seccomp_cache,
            });
            ExitCode::from(code.clamp(0, 255) as u8)
        }
        Command::Daemon(args) => daemon::main(args),
        Command::Proxy(args) => proxy::cli::standalone(args),
        Command::Install(args) => install::main(args),
        Command::App(cmd) => with_client(&cli.host, |host| async move { cli::run_app(&host, cmd).await }),
        Command::Apply(args) => with_client(&cli.host, |host| async move { cli::run_apply(&host, args).await }),
        Command::Image(cmd) => with_client(&cli.host, |host| async move { cli::run_image(&host, cmd).await }),
        Command::Completions { shell } => {
            let mut command = <Cli as clap::CommandFactory>::command();
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut command, "deliverous", &mut script);
            // A closed pipe (`| head`) is not an error worth a message.
            let _ = std::io::Write::write_all(&mut std::io::stdout(), &script);
            ExitCode::SUCCESS
        }
        Command::Logs(args) => with_client(&cli.host, |host| async move { cli::run_logs(&host, args).await }),
        Command::Events(args) => with_client(&cli.host, |host| async move { cli::run_events(&host, args).await }),
        Command::Exec(args) => with_client(&cli.host, |host| async move { cli::run_exec(&host, args).await }),
        Command::Run(args) => with_client(&cli.host, |host| async move { cli::run_run(&host, args).await }),
        Command::Top(args) => with_client(&cli.host, |host| async move { cli::run_top(&host, args).await }),
        Command::Token(cmd) => with_client(&cli.host, |host| async move { cli::run_token(&host, cmd).await }),
        Command::Volume(cmd) => with_client(&cli.host, |host| async move { cli::run_volume(&host, cmd).await }),
        Command::Registry(cmd) => match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(rt) => rt.block_on(cli::run_registry(cmd)),
            Err(e) => {
                eprintln!("error: cannot start: {e}");
                ExitCode::FAILURE
            }
        },
    }
}

/// Logs to stderr, filtered by `DELIVEROUS_LOG` (default `info`).
pub fn init_logging() {
    init_logging_with("info");
}

/// Logs to stderr, filtered by `DELIVEROUS_LOG` (else `default_filter`). When stderr is the
/// journal (run by systemd), lines carry `<N>` priorities and no timestamp; elsewhere colours
/// only on a terminal and without `NO_COLOR`.
fn init_logging_with(default_filter: &str) {
    let filter =
        tracing_subscriber::EnvFilter::try_from_env("DELIVEROUS_LOG").unwrap_or_else(|_| default_filter.into());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if systemd::stderr_is_journal() {
        builder.with_ansi(false).event_format(systemd::JournalFormat).init();
    } else {
        builder.with_ansi(terminal::stderr_escapes()).init();
    }
}

fn with_client<F, Fut>(host: &str, f: F) -> ExitCode
where
    F: FnOnce(cli::Host) -> Fut,
    Fut: std::future::Future<Output = ExitCode>,
{
    let host = match cli::Host::parse(host) {
        Ok(h) => h,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt.block_on(f(host)),
        Err(e) => {
            eprintln!("error: cannot start: {e}");
            ExitCode::FAILURE
        }
    }
}
