//! The monitor's life: it replaces the shim (exec) once the container runs, inheriting the
//! container's init as its child, the pipes of its stdout and stderr, the bound control socket
//! and the shim's binary. Single-threaded and poll-driven, it writes the log, answers the
//! control socket, reaps, records how the instance ended (OOM included), has the binary delete
//! the container, writes the exit file and answers the waiters.

use std::ffi::{c_int, c_ulong};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::handoff::Handoff;
use super::json::{self, ExitStatus, Reply, Request};
use super::log::{LineBuffer, LogWriter};

/// The few libc calls std does not wrap, declared by hand (values of Linux on x86-64 and
/// arm64; a unit test compares them with the `libc` crate's).
pub mod sys {
    use std::ffi::{c_int, c_short, c_ulong};

    pub const SIGKILL: c_int = 9;
    pub const SIGCHLD: c_int = 17;
    pub const SIG_BLOCK: c_int = 0;
    pub const SFD_NONBLOCK: c_int = 0o4000;
    pub const SFD_CLOEXEC: c_int = 0o2_000_000;
    pub const POLLIN: c_short = 1;
    pub const WNOHANG: c_int = 1;
    pub const F_GETFD: c_int = 1;
    pub const F_SETFD: c_int = 2;
    pub const F_GETFL: c_int = 3;
    pub const F_SETFL: c_int = 4;
    pub const FD_CLOEXEC: c_int = 1;
    pub const O_NONBLOCK: c_int = 0o4000;
    pub const PR_SET_CHILD_SUBREAPER: c_int = 36;
    pub const EINTR: i32 = 4;

    #[repr(C)]
    pub struct PollFd {
        pub fd: c_int,
        pub events: c_short,
        pub revents: c_short,
    }

    /// glibc's `sigset_t`: 1024 bits.
    #[repr(C)]
    pub struct SigSet(pub [u64; 16]);

    extern "C" {
        pub fn poll(fds: *mut PollFd, nfds: c_ulong, timeout: c_int) -> c_int;
        pub fn sigemptyset(set: *mut SigSet) -> c_int;
        pub fn sigaddset(set: *mut SigSet, signum: c_int) -> c_int;
        pub fn sigprocmask(how: c_int, set: *const SigSet, old: *mut SigSet) -> c_int;
        pub fn signalfd(fd: c_int, mask: *const SigSet, flags: c_int) -> c_int;
        pub fn waitpid(pid: c_int, status: *mut c_int, options: c_int) -> c_int;
        pub fn kill(pid: c_int, sig: c_int) -> c_int;
        pub fn prctl(option: c_int, ...) -> c_int;
        pub fn fcntl(fd: c_int, cmd: c_int, ...) -> c_int;
        pub fn dup2(old: c_int, new: c_int) -> c_int;
    }
}

/// How long the log pipes may stay open after the init exited (a grandchild holding them).
const DRAIN: Duration = Duration::from_secs(2);

/// Runs the monitor to its end; returns the process exit code.
pub fn main() -> i32 {
    // Orphans of the container are ours to reap (the shim set it too; we say it again).
    // SAFETY: prctl with an integer argument; touches no memory.
    unsafe { sys::prctl(sys::PR_SET_CHILD_SUBREAPER, 1 as c_ulong, 0 as c_ulong, 0 as c_ulong, 0 as c_ulong) };
    let h = match Handoff::from_env(|k| std::env::var_os(k)) {
        Ok(h) => h,
        Err(e) => {
            // Not ours to clean up without the settings; the daemon's sweep removes the rest.
            let pid = std::env::var("DLV_SHIM_PID").ok().and_then(|p| p.parse::<c_int>().ok()).filter(|p| *p > 0);
            if let Some(pid) = pid {
                // SAFETY: kill takes integers only.
                unsafe { sys::kill(pid, sys::SIGKILL) };
            }
            report(&format!("error monitor hand-off: {e}"));
            return 1;
        }
    };
    match Monitor::new(h) {
        Ok(mut sup) => {
            report(&format!("ok {}", sup.h.pid));
            silence_stdio();
            sup.serve()
        }
        Err(failed) => {
            let (h, exe, msg) = *failed;
            abandon(&h, exe.as_ref());
            report(&format!("error {msg}"));
            1
        }
    }
}

/// The one line the daemon reads on our stdout: `ok PID` or `error MESSAGE`.
fn report(line: &str) {
    let mut out = std::io::stdout();
    let _ = writeln!(out, "{}", line.replace('\n', " "));
    let _ = out.flush();
}

/// From here on nobody reads our stdout: a write to the closed pipe must not kill us.
fn silence_stdio() {
    if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
        // SAFETY: dup2 onto the standard descriptors; `null` stays open for the call.
        unsafe {
            sys::dup2(null.as_raw_fd(), 1);
            sys::dup2(null.as_raw_fd(), 2);
        }
    }
}

/// Takes an inherited descriptor: it must be open, and is closed on exec from now on.
fn adopt(fd: RawFd, what: &str) -> Result<OwnedFd, String> {
    // SAFETY: fcntl on an integer descriptor; an invalid one only yields EBADF.
    let flags = unsafe { sys::fcntl(fd, sys::F_GETFD) };
    if flags < 0 {
        return Err(format!("{what} (descriptor {fd}) was not handed over: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: as above; the descriptor is open.
    unsafe { sys::fcntl(fd, sys::F_SETFD, flags | sys::FD_CLOEXEC) };
    // SAFETY: the shim handed this descriptor to us alone; nothing else in this process owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn set_nonblocking(fd: RawFd) {
    // SAFETY: fcntl on a descriptor we own.
    unsafe {
        let flags = sys::fcntl(fd, sys::F_GETFL);
        if flags >= 0 {
            sys::fcntl(fd, sys::F_SETFL, flags | sys::O_NONBLOCK);
        }
    }
}

/// The instance could not be supervised: kill it, reap it, and have it deleted.
fn abandon(h: &Handoff, exe: Option<&OwnedFd>) {
    kill_all(h);
    let mut status: c_int = 0;
    // SAFETY: waitpid writes the status into our local.
    unsafe { sys::waitpid(h.pid, &mut status, 0) };
    if let Some(exe) = exe {
        let _ = finish(h, exe);
    }
}

struct Client {
    stream: UnixStream,
    buf: Vec<u8>,
    /// Waiting for the exit (a `wait` or `stop` request).
    waiting: bool,
}

struct Pipe {
    file: Option<File>,
    stream: &'static str,
    lines: LineBuffer,
}

struct Monitor {
    h: Handoff,
    exe: OwnedFd,
    listener: UnixListener,
    signals: File,
    pipes: [Pipe; 2],
    log: LogWriter,
}

type SetupError = (Handoff, Option<OwnedFd>, String);

impl Monitor {
    fn new(h: Handoff) -> Result<Monitor, Box<SetupError>> {
        let exe = match adopt(h.exe_fd, "the deliverous binary") {
            Ok(fd) => fd,
            Err(e) => return Err(Box::new((h, None, e))),
        };
        macro_rules! try_setup {
            ($e:expr) => {
                match $e {
                    Ok(v) => v,
                    Err(e) => return Err(Box::new((h, Some(exe), e))),
                }
            };
        }
        let listener = UnixListener::from(try_setup!(adopt(h.listener_fd, "the control socket")));
        try_setup!(listener.set_nonblocking(true).map_err(|e| format!("control socket: {e}")));
        let pipe = |fd: Option<RawFd>, stream: &'static str| -> Result<Pipe, String> {
            let file = match fd {
                Some(fd) => {
                    let fd = adopt(fd, stream)?;
                    set_nonblocking(fd.as_raw_fd());
                    Some(File::from(fd))
                }
                None => None,
            };
            Ok(Pipe { file, stream, lines: LineBuffer::default() })
        };
        let pipes = [try_setup!(pipe(h.stdout_fd, "stdout")), try_setup!(pipe(h.stderr_fd, "stderr"))];
        let log = try_setup!(LogWriter::open(h.log.clone(), h.log_max_bytes, h.log_keep)
            .map_err(|e| format!("cannot open log {}: {e}", h.log.display())));
        let signals = try_setup!(child_signals());
        Ok(Monitor { h, exe, listener, signals, pipes, log })
    }

    fn serve(&mut self) -> i32 {
        let pid = self.h.pid;
        let mut clients: Vec<Client> = Vec::new();
        let mut exit: Option<ExitStatus> = None;
        let mut kill_deadline: Option<Instant> = None;
        let mut drain_deadline: Option<Instant> = None;
        let mut buf = vec![0u8; 16 * 1024];

        // The init may have exited before SIGCHLD was blocked.
        self.reap(&mut exit);
        loop {
            if exit.is_some() {
                let drained = self.pipes.iter().all(|p| p.file.is_none());
                let deadline = *drain_deadline.get_or_insert_with(|| Instant::now() + DRAIN);
                if drained || Instant::now() >= deadline {
                    break;
                }
            }
            if let Some(deadline) = kill_deadline {
                if exit.is_none() && Instant::now() >= deadline {
                    self.log.line("shim", b"stop timeout reached: sending SIGKILL to every process of the instance");
                    kill_all(&self.h);
                    kill_deadline = None;
                }
            }
            let timeout = [kill_deadline, drain_deadline]
                .into_iter()
                .flatten()
                .map(|d| d.saturating_duration_since(Instant::now()).as_millis().min(60_000) as c_int + 1)
                .min()
                .unwrap_or(-1);

            let mut fds = vec![poll_in(self.signals.as_raw_fd()), poll_in(self.listener.as_raw_fd())];
            let pipe_slots: Vec<usize> = (0..self.pipes.len()).filter(|i| self.pipes[*i].file.is_some()).collect();
            for i in &pipe_slots {
                if let Some(f) = &self.pipes[*i].file {
                    fds.push(poll_in(f.as_raw_fd()));
                }
            }
            for c in &clients {
                fds.push(poll_in(c.stream.as_raw_fd()));
            }
            // SAFETY: `fds` is a live, correctly sized array of pollfd for the whole call.
            let n = unsafe { sys::poll(fds.as_mut_ptr(), fds.len() as c_ulong, timeout) };
            if n < 0 {
                let err = std::io::Error::last_os_error();
                if err.raw_os_error() != Some(sys::EINTR) {
                    self.log.line("shim", format!("poll: {err}").as_bytes());
                    std::thread::sleep(Duration::from_millis(100));
                }
                continue;
            }
            let ready: Vec<bool> = fds.iter().map(|f| f.revents != 0).collect();

            if ready[0] {
                let mut info = [0u8; 128];
                while matches!(self.signals.read(&mut info), Ok(n) if n > 0) {}
                self.reap(&mut exit);
            }
            // Only clients that were polled have a slot in `ready`; new ones wait for the next round.
            let polled_clients = clients.len();
            if ready[1] {
                while let Ok((stream, _)) = self.listener.accept() {
                    if stream.set_nonblocking(true).is_ok() {
                        clients.push(Client { stream, buf: Vec::new(), waiting: false });
                    }
                }
            }
            for (k, i) in pipe_slots.iter().enumerate() {
                if !ready[2 + k] {
                    continue;
                }
                let pipe = &mut self.pipes[*i];
                let Some(file) = pipe.file.as_mut() else { continue };
                let log = &mut self.log;
                let stream = pipe.stream;
                match file.read(&mut buf) {
                    Ok(0) => {
                        pipe.lines.finish(|l| log.line(stream, l));
                        pipe.file = None;
                    }
                    Ok(n) => pipe.lines.feed(&buf[..n], |l| log.line(stream, l)),
                    Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted) => {}
                    Err(_) => pipe.file = None,
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
                            let reply = match json::parse_request(&line) {
                                Err(e) => Some(Reply::error(format!("bad request: {e}"))),
                                Ok(Request::State) => {
                                    Some(Reply { ok: true, error: None, pid: Some(pid), exit: exit.clone() })
                                }
                                Ok(Request::Signal { signal }) => {
                                    Some(match send_signal(pid, signal, exit.is_some()) {
                                        Ok(()) => Reply { ok: true, error: None, pid: Some(pid), exit: None },
                                        Err(e) => Reply::error(e),
                                    })
                                }
                                Ok(Request::Stop { signal, timeout_ms }) => {
                                    if exit.is_none() {
                                        if let Err(e) = send_signal(pid, signal, false) {
                                            self.log.line("shim", e.as_bytes());
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

        let status = exit.unwrap_or_else(|| ExitStatus {
            code: None,
            signal: None,
            oom: false,
            finished_at: super::clock::now_millis(),
        });
        self.log.line("shim", format!("instance ended: {}", status.reason()).as_bytes());
        if let Err(e) = finish(&self.h, &self.exe) {
            self.log.line("shim", format!("cannot delete container: {e}").as_bytes());
        }
        let tmp = self.h.exit_file.with_extension("tmp");
        if std::fs::write(&tmp, status.to_json()).is_ok() {
            let _ = std::fs::rename(&tmp, &self.h.exit_file);
        }
        let reply = Reply { ok: true, error: None, pid: Some(pid), exit: Some(status) };
        for client in clients.iter_mut().filter(|c| c.waiting) {
            let _ = write_reply(&mut client.stream, &reply);
        }
        let _ = std::fs::remove_file(&self.h.socket);
        0
    }

    /// Reaps every exited child; records the container init's status.
    fn reap(&mut self, exit: &mut Option<ExitStatus>) {
        loop {
            let mut status: c_int = 0;
            // SAFETY: waitpid writes the status into our local.
            let p = unsafe { sys::waitpid(-1, &mut status, sys::WNOHANG) };
            if p <= 0 {
                break;
            }
            if p != self.h.pid {
                continue;
            }
            match decode_wait(status) {
                Waited::Exited(code) => {
                    *exit = Some(ExitStatus {
                        code: Some(code),
                        signal: None,
                        oom: false,
                        finished_at: super::clock::now_millis(),
                    });
                }
                Waited::Signaled(sig) => {
                    let oom = sig == sys::SIGKILL && oom_kills(&self.h.cgroups_path) > 0;
                    *exit = Some(ExitStatus {
                        code: None,
                        signal: Some(sig),
                        oom,
                        finished_at: super::clock::now_millis(),
                    });
                }
                Waited::Other => {}
            }
        }
    }
}

fn poll_in(fd: RawFd) -> sys::PollFd {
    sys::PollFd { fd, events: sys::POLLIN, revents: 0 }
}

/// SIGCHLD blocked and delivered on a descriptor instead. Blocked only now: the container's
/// processes, created before the exec, did not inherit the mask.
fn child_signals() -> Result<File, String> {
    let mut set = sys::SigSet([0; 16]);
    // SAFETY: the calls write into `set`, a sigset_t-sized buffer we own, and read it back.
    let fd = unsafe {
        sys::sigemptyset(&mut set);
        sys::sigaddset(&mut set, sys::SIGCHLD);
        if sys::sigprocmask(sys::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            return Err(format!("cannot block SIGCHLD: {}", std::io::Error::last_os_error()));
        }
        sys::signalfd(-1, &set, sys::SFD_NONBLOCK | sys::SFD_CLOEXEC)
    };
    if fd < 0 {
        return Err(format!("signalfd: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: signalfd just returned this descriptor; it is ours alone.
    Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}

#[derive(Debug, PartialEq)]
enum Waited {
    Exited(i32),
    Signaled(i32),
    Other,
}

/// `WIFEXITED`/`WEXITSTATUS`, `WIFSIGNALED`/`WTERMSIG` of a wait status.
fn decode_wait(status: c_int) -> Waited {
    let sig = status & 0x7f;
    if sig == 0 {
        Waited::Exited((status >> 8) & 0xff)
    } else if sig != 0x7f {
        Waited::Signaled(sig)
    } else {
        Waited::Other
    }
}

fn write_reply(stream: &mut UnixStream, reply: &Reply) -> std::io::Result<()> {
    let mut line = reply.to_json().into_bytes();
    line.push(b'\n');
    // Replies are small; a client that does not read them is dropped.
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
    let result = stream.write_all(&line);
    let _ = stream.set_nonblocking(true);
    result
}

fn send_signal(pid: c_int, signal: i32, exited: bool) -> Result<(), String> {
    if exited {
        return Err("the instance has already exited".into());
    }
    if !(1..=31).contains(&signal) {
        return Err(format!("{signal} is not a signal number"));
    }
    // SAFETY: kill takes integers only.
    if unsafe { sys::kill(pid, signal) } != 0 {
        return Err(format!("kill({pid}, {signal}): {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

/// SIGKILL to the init and to every process of the instance's cgroup: cgroup v2's
/// `cgroup.kill` where the kernel has it, else each pid listed, a few rounds (a fork racing
/// the sweep is caught by the next one; the pid namespace dies with its init anyway).
fn kill_all(h: &Handoff) {
    // SAFETY: kill takes integers only.
    unsafe { sys::kill(h.pid, sys::SIGKILL) };
    let rel = h.cgroups_path.trim_start_matches('/');
    let root = Path::new("/sys/fs/cgroup");
    // Never created: only the kernel's own file counts.
    let killed = std::fs::OpenOptions::new()
        .write(true)
        .open(root.join(rel).join("cgroup.kill"))
        .and_then(|mut f| f.write_all(b"1"));
    if killed.is_ok() {
        return;
    }
    let mut dirs = vec![root.join(rel)];
    dirs.extend(std::fs::read_dir(root).into_iter().flatten().flatten().map(|e| e.path().join(rel)));
    for _ in 0..5 {
        let mut found = false;
        for dir in &dirs {
            let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) else { continue };
            for pid in procs.lines().filter_map(|l| l.trim().parse::<c_int>().ok()).filter(|p| *p > 0) {
                found = true;
                // SAFETY: kill takes integers only.
                unsafe { sys::kill(pid, sys::SIGKILL) };
            }
        }
        if !found {
            break;
        }
    }
}

/// Has the binary that created the container delete it (`deliverous shim-finish`): libcontainer
/// knows its state and cgroups; we run it once, at the end, so its memory costs nothing while
/// the instance runs.
fn finish(h: &Handoff, exe: &OwnedFd) -> Result<(), String> {
    let out = Command::new(format!("/proc/self/fd/{}", exe.as_raw_fd()))
        .arg("shim-finish")
        .arg("--id")
        .arg(&h.id)
        .arg("--state-root")
        .arg(&h.state_root)
        .env_clear()
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run shim-finish: {e}"))?;
    if out.status.success() {
        return Ok(());
    }
    let said = String::from_utf8_lossy(&out.stdout).trim().to_string();
    Err(if said.is_empty() { format!("shim-finish ended with {}", out.status) } else { said })
}

/// OOM kills recorded in the instance's memory cgroup (v1 `memory.oom_control`, v2 `memory.events`).
fn oom_kills(cgroups_path: &str) -> u64 {
    let rel = cgroups_path.trim_start_matches('/');
    [format!("/sys/fs/cgroup/memory/{rel}/memory.oom_control"), format!("/sys/fs/cgroup/{rel}/memory.events")]
        .iter()
        .filter_map(|path| std::fs::read_to_string(path).ok().map(|s| counter(&s, "oom_kill")))
        .max()
        .unwrap_or(0)
}

/// The value of `key` in a flat-keyed cgroup file (`key value` per line).
fn counter(text: &str, key: &str) -> u64 {
    text.lines()
        .filter_map(|l| l.split_once(' '))
        .find(|(k, _)| *k == key)
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::c_short;

    #[test]
    fn constants_match_libc() {
        assert_eq!(sys::SIGKILL, libc::SIGKILL);
        assert_eq!(sys::SIGCHLD, libc::SIGCHLD);
        assert_eq!(sys::SIG_BLOCK, libc::SIG_BLOCK);
        assert_eq!(sys::SFD_NONBLOCK, libc::SFD_NONBLOCK);
        assert_eq!(sys::SFD_CLOEXEC, libc::SFD_CLOEXEC);
        assert_eq!(sys::POLLIN, libc::POLLIN);
        assert_eq!(sys::WNOHANG, libc::WNOHANG);
        assert_eq!(
            [sys::F_GETFD, sys::F_SETFD, sys::F_GETFL, sys::F_SETFL, sys::FD_CLOEXEC],
            [libc::F_GETFD, libc::F_SETFD, libc::F_GETFL, libc::F_SETFL, libc::FD_CLOEXEC]
        );
        assert_eq!(sys::O_NONBLOCK, libc::O_NONBLOCK);
        assert_eq!(sys::PR_SET_CHILD_SUBREAPER, libc::PR_SET_CHILD_SUBREAPER);
        assert_eq!(sys::EINTR, libc::EINTR);
        assert_eq!(std::mem::size_of::<sys::SigSet>(), std::mem::size_of::<libc::sigset_t>());
        assert_eq!(std::mem::size_of::<sys::PollFd>(), std::mem::size_of::<libc::pollfd>());
        assert_eq!(std::mem::size_of::<c_ulong>(), std::mem::size_of::<libc::nfds_t>());
        assert_eq!(std::mem::size_of::<c_short>(), std::mem::size_of_val(&libc::POLLIN));
    }

    #[test]
    fn wait_statuses() {
        assert_eq!(decode_wait(0), Waited::Exited(0));
        assert_eq!(decode_wait(3 << 8), Waited::Exited(3));
        assert_eq!(decode_wait(9), Waited::Signaled(9));
        assert_eq!(decode_wait(9 | 0x80), Waited::Signaled(9), "core dumped");
        assert_eq!(decode_wait((19 << 8) | 0x7f), Waited::Other, "stopped");
        for (status, expect) in [(0, "exit 0"), (3 << 8, "exit 3"), (15, "signal 15")] {
            let w = decode_wait(status);
            assert_eq!(libc::WIFEXITED(status), matches!(w, Waited::Exited(_)), "{expect}");
            assert_eq!(libc::WIFSIGNALED(status), matches!(w, Waited::Signaled(_)), "{expect}");
        }
    }

    #[test]
    fn oom_counter_parsing() {
        assert_eq!(counter("oom_kill_disable 0\nunder_oom 0\noom_kill 2\n", "oom_kill"), 2);
        assert_eq!(counter("low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n", "oom_kill"), 1);
        assert_eq!(counter("", "oom_kill"), 0);
    }

    #[test]
    fn signals_are_checked() {
        assert_eq!(send_signal(1, 15, true), Err("the instance has already exited".into()));
        assert_eq!(send_signal(1, 0, false), Err("0 is not a signal number".into()));
        assert_eq!(send_signal(1, 64, false), Err("64 is not a signal number".into()));
    }
}
