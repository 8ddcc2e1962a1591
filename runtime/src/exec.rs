//! Runs a command inside a running container, as `runc exec` does: the new process joins the
//! container's cgroup and namespaces, and takes the user, working directory, environment,
//! capabilities, no_new_privs and seccomp filter of the container's `config.json` (each
//! overridable where `docker exec` allows it: user, directory, extra environment).
//!
//! It must run in a fresh single-threaded process (`deliverous shim-exec`, spawned by the
//! daemon): joining a mount namespace and forking are only sound there. libcontainer's tenant
//! builder is not used: in 0.7 it rebuilds the spec's `linux` section from the namespaces and
//! the cgroup path alone, so the container's seccomp profile would not apply to the new process,
//! and its failures come back as text, where we need "not found" (127) apart from "cannot run"
//! (126).
//!
//! The helper reports on its control socket (fd 3, a unix stream socket from the daemon), one
//! JSON object per line: `{"started":PID}` (in terminal mode with the pty master attached as
//! SCM_RIGHTS), then `{"exit":{"code":C}}` or `{"exit":{"signal":S}}`; or `{"error":MSG,
//! "code":126|127}` if the command could not be started. The command's stdin/stdout/stderr are
//! the helper's own (in terminal mode, a pty made inside the container's /dev/pts). When the
//! control socket closes (the daemon's client went away), the command is killed.

use std::ffi::CString;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use nix::sched::CloneFlags;
use nix::sys::signal::{kill, Signal};
use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{ForkResult, Pid};
use oci_spec::runtime::{LinuxNamespaceType, Spec};
use serde::{Deserialize, Serialize};

use crate::cgroup;
use crate::seccomp_bpf::{self, Program};
use crate::user;

/// The control socket's descriptor in the helper.
pub const CONTROL_FD: RawFd = 3;

/// What to run, and where.
#[derive(Debug, Clone)]
pub struct ExecConfig {
    /// The instance's bundle directory (its `config.json`).
    pub bundle: PathBuf,
    /// The container's init process, as the host sees it.
    pub pid: i32,
    pub args: Vec<String>,
    /// `KEY=VALUE` entries added to (or replacing those of) the container's environment.
    pub env: Vec<String>,
    /// `user`, `uid`, `user:group` or `uid:gid`, resolved in the container's /etc files.
    pub user: Option<String>,
    pub cwd: Option<String>,
    /// Give the command a pty (its master goes to the daemon over the control socket).
    pub tty: bool,
    /// The pty's rows and columns, set before the command runs.
    pub size: Option<(u16, u16)>,
    /// Where the shims cache compiled seccomp programs (`seccomp_bpf`): the filter is taken
    /// from there instead of compiled for every command (a health check runs one every few
    /// seconds). `None`: compiled here, by libcontainer.
    pub seccomp_cache: Option<PathBuf>,
}

/// One line the helper writes on its control socket.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Report {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit: Option<Exit>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<i32>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Exit {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
}

impl Exit {
    /// The shell's convention: the exit code, or 128 + the signal that ended it.
    pub fn shell_code(&self) -> i32 {
        match (self.code, self.signal) {
            (Some(c), _) => c,
            (None, Some(s)) => 128 + s,
            (None, None) => 255,
        }
    }
}

/// Exit codes of a command that could not run, as the shell and `docker exec` use them.
pub const CANNOT_EXECUTE: i32 = 126;
pub const NOT_FOUND: i32 = 127;

/// A failure in the child before or at exec: the code it exits with and why.
struct Failure {
    code: i32,
    message: String,
}

fn fail(code: i32, message: impl Into<String>) -> Failure {
    Failure { code, message: message.into() }
}

/// Everything read from the host before entering the container.
struct Plan {
    namespaces: Vec<(CloneFlags, std::fs::File)>,
    pid_ns: Option<std::fs::File>,
    cgroup_procs: Vec<std::fs::File>,
    uid: u32,
    gid: u32,
    additional_gids: Vec<u32>,
    cwd: String,
    env: Vec<String>,
    args: Vec<String>,
    capabilities: Option<oci_spec::runtime::LinuxCapabilities>,
    no_new_privs: bool,
    seccomp: Option<oci_spec::runtime::LinuxSeccomp>,
    /// `seccomp`, compiled (from the cache), when it can be.
    filter: Option<Program>,
    size: Option<(u16, u16)>,
}

/// Runs the helper to completion; returns its own exit code (0 once it reported on the socket).
pub fn run(cfg: ExecConfig) -> i32 {
    // SAFETY: fd 3 was set up by the daemon as our control socket; we take ownership once.
    let control = unsafe { OwnedFd::from_raw_fd(CONTROL_FD) };
    let _ = nix::fcntl::fcntl(control.as_raw_fd(), nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC));
    let mut control = UnixStream::from(control);
    let plan = match plan(&cfg) {
        Ok(p) => p,
        Err(f) => {
            send(&mut control, &Report { error: Some(f.message), code: Some(f.code), ..Default::default() }, None);
            return 1;
        }
    };
    match start(plan, cfg.tty) {
        Err(f) => {
            send(&mut control, &Report { error: Some(f.message), code: Some(f.code), ..Default::default() }, None);
            1
        }
        Ok((child, master)) => {
            // The command's streams are its own now: we must not hold them open past its end.
            if let Ok(null) = std::fs::OpenOptions::new().read(true).write(true).open("/dev/null") {
                for fd in 0..=2 {
                    let _ = nix::unistd::dup2(null.as_raw_fd(), fd);
                }
            }
            send(
                &mut control,
                &Report { started: Some(child.as_raw()), ..Default::default() },
                master.as_ref().map(|m| m.as_raw_fd()),
            );
            drop(master);
            let exit = supervise(child, &control);
            send(&mut control, &Report { exit: Some(exit), ..Default::default() }, None);
            0
        }
    }
}

fn send(control: &mut UnixStream, report: &Report, fd: Option<RawFd>) {
    let Ok(mut line) = serde_json::to_vec(report) else { return };
    line.push(b'\n');
    match fd {
        Some(fd) => {
            let fds = [fd];
            let cmsg = [ControlMessage::ScmRights(&fds)];
            let iov = [std::io::IoSlice::new(&line)];
            let _ = sendmsg::<()>(control.as_raw_fd(), &iov, &cmsg, MsgFlags::empty(), None);
        }
        None => {
            let _ = control.write_all(&line);
        }
    }
}

/// Reads the container's configuration and opens its namespaces and cgroups.
fn plan(cfg: &ExecConfig) -> Result<Plan, Failure> {
    let internal = |m: String| fail(CANNOT_EXECUTE, m);
    if cfg.args.is_empty() {
        return Err(internal("no command given".into()));
    }
    let spec = Spec::load(cfg.bundle.join("config.json"))
        .map_err(|e| internal(format!("cannot read the instance's config.json: {e}")))?;
    let process = spec.process().as_ref().ok_or_else(|| internal("config.json has no process".into()))?;
    let linux = spec.linux().as_ref().ok_or_else(|| internal("config.json has no linux section".into()))?;
    let cgroups_path = linux.cgroups_path().as_ref().map(|p| p.to_string_lossy().into_owned()).unwrap_or_default();

    // The pid must still be the instance's init, not a recycled number.
    let own = std::fs::read_to_string(format!("/proc/{}/cgroup", cfg.pid))
        .map_err(|e| internal(format!("the instance's process {} is gone: {e}", cfg.pid)))?;
    if cgroups_path.is_empty() || !own.lines().any(|l| l.ends_with(cgroups_path.as_str())) {
        return Err(internal(format!("process {} is not the instance's (cgroup {cgroups_path})", cfg.pid)));
    }

    let mut namespaces = Vec::new();
    let mut pid_ns = None;
    for ns in linux.namespaces().as_deref().unwrap_or_default() {
        let (name, flag) = match ns.typ() {
            LinuxNamespaceType::Pid => ("pid", CloneFlags::CLONE_NEWPID),
            LinuxNamespaceType::Ipc => ("ipc", CloneFlags::CLONE_NEWIPC),
            LinuxNamespaceType::Uts => ("uts", CloneFlags::CLONE_NEWUTS),
            LinuxNamespaceType::Mount => ("mnt", CloneFlags::CLONE_NEWNS),
            LinuxNamespaceType::Network => ("net", CloneFlags::CLONE_NEWNET),
            LinuxNamespaceType::Cgroup => ("cgroup", CloneFlags::CLONE_NEWCGROUP),
            LinuxNamespaceType::User => ("user", CloneFlags::CLONE_NEWUSER),
            other => return Err(internal(format!("cannot join a {other:?} namespace"))),
        };
        let path = format!("/proc/{}/ns/{name}", cfg.pid);
        let file = std::fs::File::open(&path).map_err(|e| internal(format!("{path}: {e}")))?;
        if flag == CloneFlags::CLONE_NEWPID {
            pid_ns = Some(file);
        } else {
            namespaces.push((flag, file));
        }
    }
    // The user namespace first (the others are owned by it: inside it we hold every
    // capability over them), the mount namespace last: after it, host paths are out of sight.
    namespaces.sort_by_key(|(flag, _)| match *flag {
        CloneFlags::CLONE_NEWUSER => 0,
        CloneFlags::CLONE_NEWNS => 2,
        _ => 1,
    });

    let mut cgroup_procs = Vec::new();
    for dir in cgroup::dirs(&cgroups_path) {
        let path = dir.join("cgroup.procs");
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .map_err(|e| internal(format!("{}: {e}", path.display())))?;
        cgroup_procs.push(file);
    }
    if cgroup_procs.is_empty() {
        return Err(internal(format!("the instance's cgroup {cgroups_path} is gone")));
    }

    let (mut uid, mut gid) = (process.user().uid(), process.user().gid());
    let mut additional_gids = process.user().additional_gids().clone().unwrap_or_default();
    let rootfs = spec.root().as_ref().map(|r| r.path().clone()).unwrap_or_default();
    let rootfs = if rootfs.is_absolute() { rootfs } else { cfg.bundle.join(rootfs) };
    let passwd = user::read_etc_file(&rootfs, "passwd");
    if let Some(who) = cfg.user.as_deref().filter(|u| !u.trim().is_empty()) {
        let group = user::read_etc_file(&rootfs, "group");
        let resolved = user::resolve(Some(who), &passwd, &group).map_err(|e| internal(e.to_string()))?;
        (uid, gid, additional_gids) = (resolved.uid, resolved.gid, resolved.additional_gids);
    }
    // As `docker exec`: HOME from the user's passwd entry when the environment has none.
    let home = home_of(&passwd, uid);
    let env = merge_env(process.env().as_deref().unwrap_or_default(), &cfg.env, home.as_deref());
    let cwd = match cfg.cwd.as_deref().filter(|c| !c.is_empty()) {
        Some(c) if c.starts_with('/') => c.to_string(),
        Some(c) => return Err(internal(format!("working directory {c:?} must be an absolute path"))),
        None => process.cwd().to_string_lossy().into_owned(),
    };
    let no_new_privs = process.no_new_privileges().unwrap_or(true);
    let seccomp = linux.seccomp().clone();
    // Under no_new_privs, as the shim does; without it libcontainer's own path is kept.
    let filter = match (&seccomp, &cfg.seccomp_cache) {
        (Some(profile), Some(cache)) if no_new_privs && seccomp_bpf::precompilable(profile).is_ok() => {
            Some(seccomp_bpf::for_profile(profile, cache).map_err(|e| internal(format!("seccomp: {e}")))?)
        }
        _ => None,
    };
    Ok(Plan {
        namespaces,
        pid_ns,
        cgroup_procs,
        uid,
        gid,
        additional_gids,
        cwd,
        env,
        args: cfg.args.clone(),
        capabilities: process.capabilities().clone(),
        no_new_privs,
        seccomp,
        filter,
        size: cfg.size,
    })
}

/// The container's environment with `extra` (`KEY=VALUE`) added or replacing; `HOME` set to
/// the user's home when it was not set at all.
pub fn merge_env(base: &[String], extra: &[String], home: Option<&str>) -> Vec<String> {
    let key = |e: &str| e.split_once('=').map_or(e, |(k, _)| k).to_string();
    let mut env: Vec<String> = Vec::new();
    for e in base.iter().chain(extra) {
        let k = key(e);
        env.retain(|x| key(x) != k);
        env.push(e.clone());
    }
    if let Some(home) = home {
        if !env.iter().any(|e| key(e) == "HOME") {
            env.push(format!("HOME={home}"));
        }
    }
    env
}

fn home_of(passwd: &str, uid: u32) -> Option<String> {
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() >= 6 && f[2].parse::<u32>().ok() == Some(uid)).then(|| f[5].to_string())
    })
}

/// Finds `program` as `execvp` would, in the container's `PATH` (the process already sees
/// the container's root): `Err(127)` when there is no such file.
pub fn find_program(program: &str, path_var: Option<&str>, exists: impl Fn(&Path) -> bool) -> Result<PathBuf, i32> {
    if program.contains('/') {
        return Ok(PathBuf::from(program));
    }
    let path_var = path_var.unwrap_or("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
    path_var
        .split(':')
        .filter(|d| !d.is_empty())
        .map(|d| Path::new(d).join(program))
        .find(|p| exists(p))
        .ok_or(NOT_FOUND)
}

/// Forks the command inside the container. Returns its pid (as the host sees it) and, in
/// terminal mode, the pty master.
fn start(plan: Plan, tty: bool) -> Result<(Pid, Option<OwnedFd>), Failure> {
    let internal = |m: String| fail(CANNOT_EXECUTE, m);
    let (err_r, err_w) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| internal(format!("pipe: {e}")))?;
    let pty_pair = if tty { Some(UnixStream::pair().map_err(|e| internal(format!("socketpair: {e}")))?) } else { None };
    if let Some(ns) = &plan.pid_ns {
        // Only our children enter it: this process stays where it is.
        nix::sched::setns(ns.as_fd(), CloneFlags::CLONE_NEWPID)
            .map_err(|e| internal(format!("joining the instance's pid namespace: {e}")))?;
    }
    // SAFETY: this process is single-threaded (see the module comment), so the child may run
    // any code.
    match unsafe { nix::unistd::fork() } {
        Err(e) => Err(internal(format!("fork: {e}"))),
        Ok(ForkResult::Child) => {
            drop(err_r);
            let pty_tx = pty_pair.map(|(_, tx)| tx);
            let failure = match child(&plan, pty_tx) {
                Ok(never) => match never {},
                Err(f) => f,
            };
            let mut err_w = std::fs::File::from(err_w);
            let _ = err_w.write_all(format!("{} {}", failure.code, failure.message).as_bytes());
            // SAFETY: _exit ends the forked child without running the parent's exit handlers.
            unsafe { libc::_exit(failure.code) }
        }
        Ok(ForkResult::Parent { child }) => {
            drop(err_w);
            let master = match pty_pair {
                Some((rx, tx)) => {
                    drop(tx);
                    receive_fd(&rx)
                }
                None => None,
            };
            let mut text = String::new();
            let _ = std::fs::File::from(err_r).read_to_string(&mut text);
            if !text.is_empty() {
                let _ = waitpid(child, None);
                let (code, message) = text.split_once(' ').unwrap_or(("126", text.as_str()));
                return Err(fail(code.parse().unwrap_or(CANNOT_EXECUTE), message.to_string()));
            }
            if tty && master.is_none() {
                let _ = kill(child, Signal::SIGKILL);
                let _ = waitpid(child, None);
                return Err(internal("the command's terminal was not handed over".into()));
            }
            Ok((child, master))
        }
    }
}

/// In the forked child: enter the container, become its user, exec. Returns only on failure.
fn child(plan: &Plan, pty_tx: Option<UnixStream>) -> Result<std::convert::Infallible, Failure> {
    let internal = |m: String| fail(CANNOT_EXECUTE, m);
    for procs in &plan.cgroup_procs {
        // "0" is the writing process itself.
        (&*procs).write_all(b"0").map_err(|e| internal(format!("joining the instance's cgroup: {e}")))?;
    }
    for (flag, file) in &plan.namespaces {
        nix::sched::setns(file.as_fd(), *flag)
            .map_err(|e| internal(format!("joining the instance's {flag:?} namespace: {e}")))?;
    }
    nix::unistd::setsid().map_err(|e| internal(format!("setsid: {e}")))?;
    if let Some(tx) = pty_tx {
        let slave = open_pty(&tx, plan.uid)?;
        if let Some((rows, cols)) = plan.size {
            let ws = libc::winsize { ws_row: rows, ws_col: cols, ws_xpixel: 0, ws_ypixel: 0 };
            // SAFETY: TIOCSWINSZ reads a winsize struct that lives for the call.
            unsafe { libc::ioctl(slave.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
        }
        for target in 0..=2 {
            nix::unistd::dup2(slave.as_raw_fd(), target).map_err(|e| internal(format!("dup2: {e}")))?;
        }
    }
    std::env::set_current_dir(&plan.cwd)
        .map_err(|e| internal(format!("cannot enter working directory {}: {e}", plan.cwd)))?;
    let path_var = plan.env.iter().find_map(|e| e.strip_prefix("PATH="));
    let program = find_program(&plan.args[0], path_var, |p| p.is_file())
        .map_err(|code| fail(code, format!("{}: executable file not found in $PATH", plan.args[0])))?;

    let sys = libcontainer::syscall::syscall::create_syscall();
    let gids: Vec<nix::unistd::Gid> = plan.additional_gids.iter().map(|g| nix::unistd::Gid::from_raw(*g)).collect();
    sys.set_groups(&gids).map_err(|e| internal(format!("setgroups: {e}")))?;
    sys.set_id(nix::unistd::Uid::from_raw(plan.uid), nix::unistd::Gid::from_raw(plan.gid))
        .map_err(|e| internal(format!("becoming uid {} gid {}: {e}", plan.uid, plan.gid)))?;
    if plan.uid != 0 {
        libcontainer::capabilities::reset_effective(&*sys).map_err(|e| internal(format!("capabilities: {e}")))?;
    }
    if let Some(caps) = &plan.capabilities {
        libcontainer::capabilities::drop_privileges(caps, &*sys).map_err(|e| internal(format!("capabilities: {e}")))?;
    }
    if plan.no_new_privs {
        // SAFETY: prctl with integer arguments only.
        if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
            return Err(internal(format!("no_new_privs: {}", std::io::Error::last_os_error())));
        }
    }
    let cstr = |s: &str| CString::new(s).map_err(|_| internal(format!("{s:?} contains a NUL byte")));
    let path = cstr(&program.to_string_lossy())?;
    let args = plan.args.iter().map(|a| cstr(a)).collect::<Result<Vec<_>, _>>()?;
    let env = plan.env.iter().map(|e| cstr(e)).collect::<Result<Vec<_>, _>>()?;
    // The filter last: nothing but execve runs under it.
    if let Some(filter) = &plan.filter {
        filter.install().map_err(|e| internal(format!("seccomp: {e}")))?;
    } else if let Some(seccomp) = &plan.seccomp {
        libcontainer::seccomp::initialize_seccomp(seccomp).map_err(|e| internal(format!("seccomp: {e}")))?;
    }
    let err = match nix::unistd::execve(&path, &args, &env) {
        Err(e) => e,
        Ok(never) => match never {},
    };
    let code = match err {
        nix::Error::ENOENT => NOT_FOUND,
        _ => CANNOT_EXECUTE,
    };
    Err(fail(code, format!("cannot run {}: {err}", program.display())))
}

/// Makes a pty in the container's /dev/pts (so `tty` names it as the container sees it), hands
/// its master to the helper, and makes the slave our controlling terminal.
fn open_pty(tx: &UnixStream, uid: u32) -> Result<OwnedFd, Failure> {
    use nix::fcntl::OFlag;
    let internal = |m: String| fail(CANNOT_EXECUTE, m);
    let master = nix::pty::posix_openpt(OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC)
        .map_err(|e| internal(format!("/dev/ptmx in the instance: {e}")))?;
    nix::pty::grantpt(&master).map_err(|e| internal(format!("grantpt: {e}")))?;
    nix::pty::unlockpt(&master).map_err(|e| internal(format!("unlockpt: {e}")))?;
    let name = nix::pty::ptsname_r(&master).map_err(|e| internal(format!("ptsname: {e}")))?;
    let slave = nix::fcntl::open(name.as_str(), OFlag::O_RDWR, nix::sys::stat::Mode::empty())
        .map_err(|e| internal(format!("{name}: {e}")))?;
    // SAFETY: open returned a new descriptor that nothing else owns.
    let slave = unsafe { OwnedFd::from_raw_fd(slave) };
    // SAFETY: TIOCSCTTY on a descriptor we own, from a session leader.
    unsafe { libc::ioctl(slave.as_raw_fd(), libc::TIOCSCTTY, 0) };
    let _ = nix::unistd::fchown(slave.as_raw_fd(), Some(nix::unistd::Uid::from_raw(uid)), None);
    let fds = [master.as_raw_fd()];
    let cmsg = [ControlMessage::ScmRights(&fds)];
    let iov = [std::io::IoSlice::new(b"m")];
    sendmsg::<()>(tx.as_raw_fd(), &iov, &cmsg, MsgFlags::empty(), None)
        .map_err(|e| internal(format!("handing over the terminal: {e}")))?;
    Ok(slave)
}

/// Receives one descriptor sent with SCM_RIGHTS (and at least one byte of data).
pub fn receive_fd(stream: &UnixStream) -> Option<OwnedFd> {
    let mut byte = [0u8; 512];
    let mut iov = [std::io::IoSliceMut::new(&mut byte)];
    let mut space = nix::cmsg_space!([RawFd; 1]);
    let msg = recvmsg::<()>(stream.as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC).ok()?;
    for cmsg in msg.cmsgs().ok()? {
        if let ControlMessageOwned::ScmRights(fds) = cmsg {
            let mut owned: Vec<OwnedFd> = fds
                .into_iter()
                // SAFETY: the kernel just installed these descriptors for us.
                .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) })
                .collect();
            if !owned.is_empty() {
                return Some(owned.swap_remove(0));
            }
        }
    }
    None
}

/// Waits for the command; kills it when the control socket closes first.
fn supervise(child: Pid, control: &UnixStream) -> Exit {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    // SAFETY: pidfd_open takes a pid and flags; it returns a new descriptor or -1.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, child.as_raw(), 0) };
    // SAFETY: a descriptor pidfd_open just returned, owned by nobody else.
    let pidfd = (pidfd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(pidfd as RawFd) });
    let mut killed = false;
    let mut buf = [0u8; 256];
    loop {
        match waitpid(child, Some(nix::sys::wait::WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(_, code)) => return Exit { code: Some(code), signal: None },
            Ok(WaitStatus::Signaled(_, sig, _)) => return Exit { code: None, signal: Some(sig as i32) },
            Ok(_) => {}
            Err(nix::Error::EINTR) => continue,
            Err(_) => return Exit::default(),
        }
        let mut fds = vec![];
        if !killed {
            fds.push(PollFd::new(control.as_fd(), PollFlags::POLLIN));
        }
        if let Some(p) = &pidfd {
            fds.push(PollFd::new(p.as_fd(), PollFlags::POLLIN));
        }
        let timeout = if pidfd.is_some() { PollTimeout::NONE } else { PollTimeout::from(100u8) };
        let _ = poll(&mut fds, timeout);
        let control_ready = !killed && fds[0].revents().is_some_and(|r| !r.is_empty());
        drop(fds);
        if control_ready {
            // Nothing is expected from the daemon but the end of the connection.
            let gone = matches!(nix::unistd::read(control.as_raw_fd(), &mut buf), Ok(0) | Err(_));
            if gone {
                // Its whole process group (it leads its own session): `sh -c` and its children.
                let _ = nix::sys::signal::killpg(child, Signal::SIGKILL);
                let _ = kill(child, Signal::SIGKILL);
                killed = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn environment_overrides_and_home() {
        let base = vec!["PATH=/bin".to_string(), "A=1".to_string()];
        let env = merge_env(&base, &["A=2".to_string(), "B=3".to_string()], Some("/root"));
        assert_eq!(env, vec!["PATH=/bin", "A=2", "B=3", "HOME=/root"]);
        let env = merge_env(&["HOME=/app".to_string()], &[], Some("/root"));
        assert_eq!(env, vec!["HOME=/app"]);
    }

    #[test]
    fn programs_are_found_in_path() {
        let exists = |p: &Path| p == Path::new("/usr/bin/cat");
        assert_eq!(find_program("cat", Some("/bin:/usr/bin"), exists), Ok(PathBuf::from("/usr/bin/cat")));
        assert_eq!(find_program("nope", Some("/bin:/usr/bin"), exists), Err(NOT_FOUND));
        assert_eq!(find_program("./x", Some("/bin"), exists), Ok(PathBuf::from("./x")));
    }

    #[test]
    fn exit_codes_follow_the_shell() {
        assert_eq!(Exit { code: Some(3), signal: None }.shell_code(), 3);
        assert_eq!(Exit { code: None, signal: Some(9) }.shell_code(), 137);
    }

    #[test]
    fn home_comes_from_passwd() {
        let passwd = "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n";
        assert_eq!(home_of(passwd, 1000).as_deref(), Some("/home/app"));
        assert_eq!(home_of(passwd, 5), None);
    }
}
