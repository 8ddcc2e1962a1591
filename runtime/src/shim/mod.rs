//! The shim: one process per instance. It builds and starts the container with libcontainer
//! (which must not run in a multi-threaded process), then execs the instance monitor (a small
//! separate program, embedded: see [`monitor`]) that inherits the container's init as its
//! child, the pipes of its stdout and stderr and the bound control socket. The monitor writes
//! the log, answers the control socket, reaps, records how the instance ended, has this binary
//! delete the container (`shim-finish`, [`finish`]) and replies to waiters. Instances thus
//! outlive the daemon, and what stays resident per instance is the monitor alone.
//!
//! Lifecycle: start (build + start) → exec the monitor, which reports `ok PID` (or `error MSG`)
//! on stdout → poll loop → exit recorded → container deleted → reply to waiters → exit.

#[allow(dead_code)] // Shared with the monitor program, which uses all of it.
#[path = "../../monitor/clock.rs"]
mod clock;
#[path = "../../monitor/handoff.rs"]
pub mod handoff;
#[cfg(test)]
#[allow(dead_code)] // The monitor's; compiled here for its unit tests and for clippy.
#[path = "../../monitor/json.rs"]
mod json;
pub mod launch;
#[path = "../../monitor/log.rs"]
pub mod log;
pub mod monitor;
pub mod protocol;
#[path = "../../monitor/reason.rs"]
mod reason;
pub mod remove;
#[cfg(test)]
#[allow(dead_code)] // The monitor's loop (entry: monitor/main.rs); here for its unit tests and clippy.
#[path = "../../monitor/serve.rs"]
mod serve;

use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use libcontainer::container::builder::ContainerBuilder;
use libcontainer::container::Container;
use libcontainer::syscall::syscall::SyscallType;
use nix::fcntl::OFlag;
use nix::unistd::Pid;

use self::handoff::Handoff;
use self::log::LogWriter;
use self::protocol::{Reply, Request};

/// Everything the shim is told on its command line.
#[derive(Debug, Clone)]
pub struct ShimConfig {
    /// Container id (the instance's unique id).
    pub id: String,
    /// Bundle directory holding `config.json`.
    pub bundle: PathBuf,
    /// libcontainer's state root.
    pub state_root: PathBuf,
    pub log: PathBuf,
    pub log_max_bytes: u64,
    pub log_keep: u32,
    pub socket: PathBuf,
    pub exit_file: PathBuf,
    /// The container's cgroup path, to read OOM kills from.
    pub cgroups_path: String,
    /// Where the container's stdin, stdout and stderr go.
    pub stdio: ContainerStdio,
}

/// Where a container's standard streams go.
#[derive(Debug, Clone, Default, PartialEq)]
pub enum ContainerStdio {
    /// stdin on /dev/null, stdout and stderr into the instance log.
    #[default]
    Log,
    /// The shim's descriptors 3, 4 and 5 are the container's stdin, stdout and stderr: a
    /// one-off instance attached to a client (`deliverous run`).
    Inherit,
    /// A terminal: libcontainer sends the pty master to the unix socket at this path.
    Console(PathBuf),
}

/// Starts the container and becomes its monitor (exec); returns only if either fails, with the
/// process exit code, having reported `error MSG` on stdout and removed what it made.
pub fn run(cfg: ShimConfig) -> i32 {
    // Orphans of the container (its init is our child, grandchildren may be reparented) are ours
    // to reap; without this they would go to PID 1 and we could miss init's exit.
    // SAFETY: prctl with PR_SET_CHILD_SUBREAPER takes an integer argument and touches no memory.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    let mut report = std::io::stdout();
    let mut log = match LogWriter::open(cfg.log.clone(), cfg.log_max_bytes, cfg.log_keep) {
        Ok(log) => log,
        Err(err) => {
            let _ = writeln!(report, "error cannot open log {}: {err}", cfg.log.display());
            return 1;
        }
    };
    // Before the container exists: a monitor we cannot write fails the start, not the instance.
    let program = match monitor::install(&monitor::program_dir(&cfg.state_root)) {
        Ok(path) => path,
        Err(msg) => {
            log.line("shim", msg.as_bytes());
            let _ = writeln!(report, "error {msg}");
            return 1;
        }
    };
    let started = match start_container_with(&cfg.id, &cfg.bundle, &cfg.state_root, &cfg.stdio) {
        Ok(started) => started,
        Err(msg) => {
            log.line("shim", msg.as_bytes());
            cleanup_failed_start(&cfg);
            let _ = writeln!(report, "error {}", msg.replace('\n', " "));
            return 1;
        }
    };
    let listener = match bind_socket(&cfg.socket) {
        Ok(l) => l,
        Err(err) => {
            let msg = format!("cannot listen on {}: {err}", cfg.socket.display());
            let mut container = started.container;
            let _ = container.delete(true);
            let _ = writeln!(report, "error {msg}");
            return 1;
        }
    };
    let msg = hand_over(&cfg, &program, &started, &listener);
    // Still here: the monitor did not start. Nobody would watch the container: remove it.
    log.line("shim", msg.as_bytes());
    let mut container = started.container;
    let _ = container.delete(true);
    let _ = std::fs::remove_file(&cfg.socket);
    let _ = writeln!(report, "error {msg}");
    1
}

/// Execs the monitor with the running container; returns only on failure, with the reason.
fn hand_over(cfg: &ShimConfig, program: &Path, started: &Started, listener: &UnixListener) -> String {
    let exe = match monitor::own_binary() {
        Ok(fd) => fd,
        Err(e) => return format!("cannot open our own binary for the monitor: {e}"),
    };
    let handoff = Handoff {
        id: cfg.id.clone(),
        state_root: cfg.state_root.clone(),
        log: cfg.log.clone(),
        log_max_bytes: cfg.log_max_bytes,
        log_keep: cfg.log_keep,
        socket: cfg.socket.clone(),
        exit_file: cfg.exit_file.clone(),
        cgroups_path: cfg.cgroups_path.clone(),
        pid: started.pid.as_raw(),
        stdout_fd: started.stdout.as_ref().map(|fd| fd.as_raw_fd()),
        stderr_fd: started.stderr.as_ref().map(|fd| fd.as_raw_fd()),
        listener_fd: listener.as_raw_fd(),
        exe_fd: exe.as_raw_fd(),
    };
    monitor::exec(program, &handoff)
}

/// `deliverous shim-finish`: deletes container `id` once its init has ended (the monitor runs
/// it, being too small to know libcontainer's state and cgroups).
pub fn finish(id: &str, state_root: &Path) -> Result<(), String> {
    let dir = state_root.join(id);
    if !dir.exists() {
        return Ok(());
    }
    let mut container = Container::load(dir.clone()).map_err(|e| format!("cannot load container {id}: {e}"))?;
    remove::remove_exited(&mut container).map_err(|e| format!("cannot delete container {id}: {e}"))
}

/// A running container and the read ends of its stdout and stderr pipes (none when its
/// streams go elsewhere, see [`ContainerStdio`]).
pub struct Started {
    pub container: Container,
    pub pid: Pid,
    pub stdout: Option<OwnedFd>,
    pub stderr: Option<OwnedFd>,
}

/// Builds and starts container `id` from `bundle` (its `config.json`), its stdin on /dev/null
/// and its stdout/stderr on pipes; libcontainer keeps its state under `state_root`. Must run in
/// a single-threaded process (see ARCHITECTURE.md); the container's init is our child.
pub fn start_container(id: &str, bundle: &Path, state_root: &Path) -> Result<Started, String> {
    start_container_with(id, bundle, state_root, &ContainerStdio::Log)
}

/// [`start_container`] with the container's streams where `stdio` says.
pub fn start_container_with(
    id: &str,
    bundle: &Path,
    state_root: &Path,
    stdio: &ContainerStdio,
) -> Result<Started, String> {
    // The cgroup attach lock's RCU wait starts now, while we prepare, not at libcontainer's write.
    crate::cgroup::prime_attach();
    let inherited = |fd: i32| -> Result<OwnedFd, String> {
        // SAFETY: duplicating a descriptor the daemon handed us; the copy is ours.
        let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 10) };
        if dup < 0 {
            return Err(format!("descriptor {fd} from the daemon: {}", std::io::Error::last_os_error()));
        }
        // SAFETY: fcntl just returned this new descriptor.
        Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(dup) })
    };
    let devnull = || std::fs::File::open("/dev/null").map(OwnedFd::from).map_err(|e| format!("/dev/null: {e}"));
    let (stdin, out_w, err_w, out_r, err_r, console) = match stdio {
        ContainerStdio::Log => {
            let (out_r, out_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| format!("pipe: {e}"))?;
            let (err_r, err_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| format!("pipe: {e}"))?;
            (devnull()?, out_w, err_w, Some(out_r), Some(err_r), None)
        }
        ContainerStdio::Inherit => (inherited(3)?, inherited(4)?, inherited(5)?, None, None, None),
        ContainerStdio::Console(path) => (devnull()?, devnull()?, devnull()?, None, None, Some(path.clone())),
    };
    // The daemon's descriptors are the container's now; ours must not keep its pipes open.
    if *stdio == ContainerStdio::Inherit {
        for fd in 3..=5 {
            // SAFETY: closing descriptors we were handed and just duplicated.
            unsafe { libc::close(fd) };
        }
    }
    // Seccomp programs are compiled once per profile and kept beside libcontainer's state.
    let launch = launch::prepare(bundle, &launch::seccomp_cache(state_root))?;
    let mut builder = ContainerBuilder::new(id.to_string(), SyscallType::default());
    if let Some(executor) = launch.executor {
        builder = builder.with_executor(executor);
    }
    let mut container = builder
        .with_root_path(state_root)
        .map_err(|e| format!("libcontainer state root {}: {e}", state_root.display()))?
        .with_stdin(stdin)
        .with_stdout(out_w)
        .with_stderr(err_w)
        .with_console_socket(console)
        .as_init(&launch.bundle)
        .with_systemd(false)
        .with_detach(true)
        .build()
        .map_err(|e| format!("cannot create container: {e}"))?;
    // A container with a user namespace of its own made its own network namespace too (one
    // owned by the host's user namespace could not be joined from inside it): plug it now,
    // while its init waits for `start()`. We are root on the host and single-threaded; no
    // round trip to the daemon is needed.
    let plugged = crate::network::SandboxPlan::load(bundle).and_then(|plan| match (plan, container.pid()) {
        (None, _) => Ok(()),
        (Some(_), None) => Err("the created container has no pid to plug its network into".into()),
        (Some(plan), Some(pid)) => {
            plan.apply(pid.as_raw()).map_err(|e| format!("cannot plug the instance's network namespace: {e}"))
        }
    });
    if let Err(e) = plugged {
        let _ = container.delete(true);
        return Err(e);
    }
    if let Err(e) = container.start() {
        let _ = container.delete(true);
        return Err(format!("cannot start container: {e}"));
    }
    let pid = container.pid().ok_or("container started but has no pid")?;
    Ok(Started { container, pid, stdout: out_r, stderr: err_r })
}

/// A failed build can leave libcontainer's state dir and a cgroup behind: remove them.
fn cleanup_failed_start(cfg: &ShimConfig) {
    let dir = cfg.state_root.join(&cfg.id);
    if let Ok(mut c) = Container::load(dir.clone()) {
        let _ = c.delete(true);
    }
    let _ = std::fs::remove_dir_all(dir);
}

fn bind_socket(path: &Path) -> std::io::Result<UnixListener> {
    let _ = std::fs::remove_file(path);
    let l = UnixListener::bind(path)?;
    l.set_nonblocking(true)?;
    Ok(l)
}

/// Blocking client for the control socket, for tools and tests (the daemon uses its own async one).
pub fn request(socket: &Path, req: &Request, timeout: Duration) -> std::io::Result<Reply> {
    let mut stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(timeout))?;
    let mut line = serde_json::to_vec(req).map_err(std::io::Error::other)?;
    line.push(b'\n');
    stream.write_all(&line)?;
    let mut reader = std::io::BufReader::new(stream);
    let mut answer = String::new();
    std::io::BufRead::read_line(&mut reader, &mut answer)?;
    if answer.is_empty() {
        return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "shim closed the connection"));
    }
    serde_json::from_str(&answer).map_err(std::io::Error::other)
}

#[cfg(test)]
mod tests {
    use super::protocol::ExitStatus;
    use super::*;

    #[test]
    fn protocol_round_trip() {
        let r: Request = serde_json::from_str(r#"{"op":"stop","signal":15,"timeout_ms":10000}"#).expect("parse");
        assert_eq!(r, Request::Stop { signal: 15, timeout_ms: 10_000 });
        let e = ExitStatus { code: None, signal: Some(9), oom: true, finished_at: "t".into() };
        assert_eq!(e.reason(), "oom");
    }

    /// The monitor stamps log lines and exit statuses as chrono would.
    #[test]
    fn timestamps_match_chrono() {
        use chrono::{DateTime, SecondsFormat};
        for (secs, nanos) in [(0, 0), (951_782_400, 5_000), (1_764_028_800, 999_999_999), (4_102_444_799, 123_456_000)]
        {
            let t = DateTime::from_timestamp(secs, nanos).expect("in range");
            let s = u64::try_from(secs).expect("positive");
            assert_eq!(clock::format(s, nanos / 1_000, 6), t.to_rfc3339_opts(SecondsFormat::Micros, true));
            assert_eq!(clock::format(s, nanos / 1_000_000, 3), t.to_rfc3339_opts(SecondsFormat::Millis, true));
        }
        for day in (0..200_000u64).step_by(97) {
            let t = DateTime::from_timestamp(i64::try_from(day * 86_400 + 3_723).expect("fits"), 0).expect("in range");
            assert_eq!(clock::format(day * 86_400 + 3_723, 0, 3), t.to_rfc3339_opts(SecondsFormat::Millis, true));
        }
    }
}
