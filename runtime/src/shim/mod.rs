//! The shim: one small single-threaded process per instance. It builds and starts the
//! container with libcontainer (which must not run in a multi-threaded process), owns the
//! container's stdout/stderr and writes them to the instance log, reaps the container's init,
//! records how it ended, and answers a control socket. Instances thus outlive the daemon.
//!
//! Lifecycle: start (build + start, report `ok PID` or `error MSG` on stdout) → serve (poll
//! loop) → exit recorded → container deleted → reply to waiters → exit.

pub mod launch;
pub mod log;
pub mod protocol;
pub mod remove;

use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use libcontainer::container::builder::ContainerBuilder;
use libcontainer::container::Container;
use libcontainer::syscall::syscall::SyscallType;
use nix::fcntl::OFlag;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{kill, SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use self::log::{LineBuffer, LogWriter};
use self::protocol::{ExitStatus, Reply, Request};

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

/// Runs the shim to completion and returns the process exit code.
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
    let _ = writeln!(report, "ok {}", started.pid);
    let _ = report.flush();
    // From here on nobody reads our stdout: point it and stderr at /dev/null so a write to a
    // closed pipe cannot kill us.
    silence_stdio();
    serve(&cfg, started, listener, log)
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

fn silence_stdio() {
    if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
        // SAFETY: dup2 onto the standard descriptors; `null` stays open for the call.
        unsafe {
            libc::dup2(null.as_raw_fd(), 1);
            libc::dup2(null.as_raw_fd(), 2);
        }
    }
}

struct Client {
    stream: UnixStream,
    buf: Vec<u8>,
    /// Waiting for the exit (a `wait` or `stop` request).
    waiting: bool,
}

struct Pipe {
    fd: Option<OwnedFd>,
    stream: &'static str,
    lines: LineBuffer,
}

fn serve(cfg: &ShimConfig, started: Started, listener: UnixListener, mut log: LogWriter) -> i32 {
    let Started { mut container, pid, stdout, stderr } = started;
    let mut mask = SigSet::empty();
    mask.add(Signal::SIGCHLD);
    // Blocked only now, after the container's processes were created: they must not inherit it.
    let sigfd =
        mask.thread_block().and_then(|_| SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC));
    let sigfd = match sigfd {
        Ok(fd) => fd,
        Err(e) => {
            log.line("shim", format!("signalfd: {e}; stopping the container").as_bytes());
            let _ = container.delete(true);
            return 1;
        }
    };
    let mut pipes = [
        Pipe { fd: stdout, stream: "stdout", lines: LineBuffer::default() },
        Pipe { fd: stderr, stream: "stderr", lines: LineBuffer::default() },
    ];
    for p in &pipes {
        if let Some(fd) = &p.fd {
            let _ = nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_SETFL(OFlag::O_NONBLOCK));
        }
    }
    let mut clients: Vec<Client> = Vec::new();
    let mut exit: Option<ExitStatus> = None;
    let mut kill_deadline: Option<Instant> = None;
    let mut drain_deadline: Option<Instant> = None;
    let mut buf = vec![0u8; 64 * 1024];

    // A child may have exited before the signal was blocked.
    reap(pid, &mut exit, cfg);
    loop {
        if exit.is_some() {
            let drained = pipes.iter().all(|p| p.fd.is_none());
            let deadline = *drain_deadline.get_or_insert_with(|| Instant::now() + Duration::from_secs(2));
            if drained || Instant::now() >= deadline {
                break;
            }
        }
        if let Some(deadline) = kill_deadline {
            if exit.is_none() && Instant::now() >= deadline {
                log.line("shim", b"stop timeout reached: sending SIGKILL to every process of the instance");
                let _ = container.kill(Signal::SIGKILL, true);
                let _ = kill(pid, Signal::SIGKILL);
                kill_deadline = None;
            }
        }
        let timeout = [kill_deadline, drain_deadline]
            .into_iter()
            .flatten()
            .map(|d| d.saturating_duration_since(Instant::now()))
            .min()
            .map(|d| PollTimeout::try_from(d.as_millis().min(60_000) as i32 + 1).unwrap_or(PollTimeout::MAX))
            .unwrap_or(PollTimeout::NONE);

        let mut fds: Vec<PollFd> =
            vec![PollFd::new(sigfd.as_fd(), PollFlags::POLLIN), PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
        let pipe_slots: Vec<usize> = (0..pipes.len()).filter(|i| pipes[*i].fd.is_some()).collect();
        for i in &pipe_slots {
            if let Some(fd) = &pipes[*i].fd {
                fds.push(PollFd::new(fd.as_fd(), PollFlags::POLLIN));
            }
        }
        for c in &clients {
            fds.push(PollFd::new(c.stream.as_fd(), PollFlags::POLLIN));
        }
        match poll(&mut fds, timeout) {
            Ok(_) => {}
            Err(nix::Error::EINTR) => continue,
            Err(e) => {
                log.line("shim", format!("poll: {e}").as_bytes());
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        }
        let ready: Vec<bool> = fds.iter().map(|f| f.revents().is_some_and(|r| !r.is_empty())).collect();
        drop(fds);

        if ready[0] {
            while let Ok(Some(_)) = sigfd.read_signal() {}
            reap(pid, &mut exit, cfg);
        }
        // Only clients that were polled have a slot in `ready`; new ones wait for the next round.
        let polled_clients = clients.len();
        if ready[1] {
            while let Ok((stream, _)) = listener.accept() {
                if stream.set_nonblocking(true).is_ok() {
                    clients.push(Client { stream, buf: Vec::new(), waiting: false });
                }
            }
        }
        for (k, i) in pipe_slots.iter().enumerate() {
            if !ready[2 + k] {
                continue;
            }
            let pipe = &mut pipes[*i];
            let Some(fd) = pipe.fd.as_ref() else { continue };
            match nix::unistd::read(fd.as_raw_fd(), &mut buf) {
                Ok(0) => {
                    let stream = pipe.stream;
                    pipe.lines.finish(|l| log.line(stream, l));
                    pipe.fd = None;
                }
                Ok(n) => {
                    let stream = pipe.stream;
                    pipe.lines.feed(&buf[..n], |l| log.line(stream, l));
                }
                Err(nix::Error::EAGAIN) | Err(nix::Error::EINTR) => {}
                Err(_) => pipe.fd = None,
            }
        }
        let client_base = 2 + pipe_slots.len();
        let mut closed = Vec::new();
        for (k, client) in clients.iter_mut().enumerate().take(polled_clients) {
            if !ready[client_base + k] {
                continue;
            }
            match client.stream.read(&mut buf) {
                Ok(0) => closed.push(k),
                Ok(n) => {
                    client.buf.extend_from_slice(&buf[..n]);
                    while let Some(pos) = client.buf.iter().position(|b| *b == b'\n') {
                        let line: Vec<u8> = client.buf.drain(..=pos).collect();
                        let reply = match serde_json::from_slice::<Request>(&line) {
                            Err(e) => Some(error_reply(format!("bad request: {e}"))),
                            Ok(Request::State) => {
                                Some(Reply { ok: true, error: None, pid: Some(pid.as_raw()), exit: exit.clone() })
                            }
                            Ok(Request::Signal { signal }) => Some(match send_signal(pid, signal, exit.is_some()) {
                                Ok(()) => Reply { ok: true, error: None, pid: Some(pid.as_raw()), exit: None },
                                Err(e) => error_reply(e),
                            }),
                            Ok(Request::Stop { signal, timeout_ms }) => {
                                if exit.is_none() {
                                    if let Err(e) = send_signal(pid, signal, false) {
                                        log.line("shim", e.as_bytes());
                                    }
                                    let deadline = Instant::now() + Duration::from_millis(timeout_ms);
                                    kill_deadline = Some(kill_deadline.map_or(deadline, |d| d.min(deadline)));
                                }
                                client.waiting = true;
                                None
                            }
                            Ok(Request::Wait) => {
                                client.waiting = true;
                                None
                            }
                        };
                        if let Some(reply) = reply {
                            if write_reply(&mut client.stream, &reply).is_err() {
                                closed.push(k);
                                break;
                            }
                        }
                    }
                    if client.buf.len() > 64 * 1024 {
                        closed.push(k);
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => closed.push(k),
            }
        }
        closed.sort_unstable();
        closed.dedup();
        for k in closed.into_iter().rev() {
            clients.remove(k);
        }
    }

    let status = exit.unwrap_or_else(|| ExitStatus { code: None, signal: None, oom: false, finished_at: now() });
    log.line("shim", format!("instance ended: {}", status.reason()).as_bytes());
    if let Err(e) = remove::remove_exited(&mut container) {
        log.line("shim", format!("cannot delete container: {e}").as_bytes());
    }
    if let Ok(json) = serde_json::to_vec(&status) {
        let tmp = cfg.exit_file.with_extension("tmp");
        if std::fs::write(&tmp, json).is_ok() {
            let _ = std::fs::rename(&tmp, &cfg.exit_file);
        }
    }
    let reply = Reply { ok: true, error: None, pid: Some(pid.as_raw()), exit: Some(status) };
    for client in clients.iter_mut().filter(|c| c.waiting) {
        let _ = client.stream.set_nonblocking(false);
        let _ = client.stream.set_write_timeout(Some(Duration::from_secs(1)));
        let _ = write_reply(&mut client.stream, &reply);
    }
    let _ = std::fs::remove_file(&cfg.socket);
    0
}

fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

fn error_reply(msg: String) -> Reply {
    Reply { ok: false, error: Some(msg), pid: None, exit: None }
}

fn write_reply(stream: &mut UnixStream, reply: &Reply) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(reply).map_err(std::io::Error::other)?;
    line.push(b'\n');
    // Replies are small; a client that does not read them is dropped.
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
    let result = stream.write_all(&line);
    let _ = stream.set_nonblocking(true);
    result
}

fn send_signal(pid: Pid, signal: i32, exited: bool) -> Result<(), String> {
    if exited {
        return Err("the instance has already exited".into());
    }
    let sig = Signal::try_from(signal).map_err(|_| format!("{signal} is not a signal number"))?;
    kill(pid, sig).map_err(|e| format!("kill({pid}, {sig}): {e}"))
}

/// Reaps every exited child; records the container init's status.
fn reap(init: Pid, exit: &mut Option<ExitStatus>, cfg: &ShimConfig) {
    loop {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(p, code)) if p == init => {
                *exit = Some(ExitStatus { code: Some(code), signal: None, oom: false, finished_at: now() });
            }
            Ok(WaitStatus::Signaled(p, sig, _)) if p == init => {
                let oom = sig == Signal::SIGKILL && oom_kills(&cfg.cgroups_path) > 0;
                *exit = Some(ExitStatus { code: None, signal: Some(sig as i32), oom, finished_at: now() });
            }
            Ok(WaitStatus::StillAlive) | Err(_) => break,
            Ok(_) => {}
        }
    }
}

/// OOM kills recorded in the instance's memory cgroup (v1 `memory.oom_control`, v2 `memory.events`).
pub fn oom_kills(cgroups_path: &str) -> u64 {
    let rel = cgroups_path.trim_start_matches('/');
    let candidates = [
        (format!("/sys/fs/cgroup/memory/{rel}/memory.oom_control"), "oom_kill"),
        (format!("/sys/fs/cgroup/{rel}/memory.events"), "oom_kill"),
    ];
    candidates
        .iter()
        .filter_map(|(path, key)| std::fs::read_to_string(path).ok().map(|s| parse_counter(&s, key)))
        .max()
        .unwrap_or(0)
}

fn parse_counter(text: &str, key: &str) -> u64 {
    text.lines()
        .filter_map(|l| l.split_once(' '))
        .find(|(k, _)| *k == key)
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0)
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
    use super::*;

    #[test]
    fn oom_counter_parsing() {
        assert_eq!(parse_counter("oom_kill_disable 0\nunder_oom 0\noom_kill 2\n", "oom_kill"), 2);
        assert_eq!(parse_counter("low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n", "oom_kill"), 1);
        assert_eq!(parse_counter("", "oom_kill"), 0);
    }

    #[test]
    fn protocol_round_trip() {
        let r: Request = serde_json::from_str(r#"{"op":"stop","signal":15,"timeout_ms":10000}"#).expect("parse");
        assert_eq!(r, Request::Stop { signal: 15, timeout_ms: 10_000 });
        let e = ExitStatus { code: None, signal: Some(9), oom: true, finished_at: "t".into() };
        assert_eq!(e.reason(), "oom");
    }
}
