//! Commands run inside running instances: `deliverous exec` (attached to a client through a
//! [`Session`]) and [`Supervisor::exec_capture`] (non-interactive, for image health checks).
//!
//! The daemon never enters a container itself (it is multi-threaded, see ARCHITECTURE.md): it
//! spawns `deliverous shim-exec`, a fresh single-threaded process that joins the instance's
//! cgroup and namespaces and execs the command (runtime/src/exec.rs). The command's stdio are
//! that process's pipes (or, with a terminal, a pty whose master comes back over the control
//! socket as SCM_RIGHTS); its exit comes back as a line on the control socket. Closing the
//! control socket kills the command.

use std::os::fd::{AsRawFd, OwnedFd};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use deliverous_runtime::exec::{Report, CONTROL_FD};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, BufReader};
use tokio::sync::oneshot;

use super::{lock, State, Supervisor, SupervisorError};

/// What `deliverous exec` (and `run`) asks for.
#[derive(Debug, Clone, Default)]
pub struct ExecOptions {
    pub argv: Vec<String>,
    /// `KEY=VALUE` entries added to the instance's environment.
    pub env: Vec<String>,
    pub user: Option<String>,
    pub workdir: Option<String>,
    /// Allocate a pty.
    pub tty: bool,
    /// Keep stdin open (else the command reads /dev/null).
    pub stdin: bool,
    /// The client terminal's rows and columns, for the pty.
    pub size: Option<(u16, u16)>,
    /// stdout and stderr on one pipe (the session's stdout), in the order they were written.
    pub combined_output: bool,
}

/// How an attached command ended, as the client's exit code: the command's own, 128 + signal,
/// or 125/126/127 when it could not run (with the reason in `message`).
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub code: i32,
    pub message: Option<String>,
}

/// Exit code for failures of ours rather than the command's (as `docker run` uses it).
pub const DAEMON_ERROR: i32 = 125;

pub type Reader = Box<dyn AsyncRead + Send + Unpin>;
pub type Writer = Box<dyn AsyncWrite + Send + Unpin>;

pub enum SessionIo {
    Pipes {
        stdin: Option<Writer>,
        stdout: Reader,
        stderr: Reader,
    },
    /// A pty master: the command's stdin, stdout and stderr all at once.
    Pty(OwnedFd),
}

/// A running attached command. Dropping it (with `hold`) ends the command early.
pub struct Session {
    pub io: SessionIo,
    /// Resolves once the command ended (for a one-off instance: once it is removed too).
    pub exit: oneshot::Receiver<Outcome>,
    pub hold: Box<dyn Send + Sync>,
}

/// Closes the control socket's write side when dropped: the helper then kills the command.
struct KillOnDrop(std::os::unix::net::UnixStream);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.shutdown(std::net::Shutdown::Write);
    }
}

/// Output of `exec_capture` is cut at this size (Docker keeps as much of a health check's).
pub const CAPTURE_LIMIT: usize = 4096;

impl Supervisor {
    /// The uid and init pid of the running instance `target`: `web.2`, or `web` for its first
    /// running instance.
    pub fn find_running(&self, target: &str) -> Result<(String, i32), SupervisorError> {
        let (app, slot) = match target.rsplit_once('.') {
            Some((app, slot)) if slot.parse::<u32>().is_ok() => (app, slot.parse::<u32>().ok()),
            _ => (target, None),
        };
        if self.store.app(app)?.is_none() {
            return Err(SupervisorError::NotFound(format!("app {app} not found: see `deliverous app ls`")));
        }
        let live = lock(&self.live);
        let mut candidates: Vec<_> = live
            .values()
            .filter(|l| l.row.app == app && l.state != State::Stopping && l.pid.is_some())
            .filter(|l| slot.is_none_or(|s| l.row.slot == s))
            .collect();
        // Ready before starting, then by slot.
        candidates.sort_by_key(|l| (l.state != State::Ready, l.row.slot, l.row.created_at.clone()));
        match candidates.first() {
            Some(l) => Ok((l.row.uid.clone(), l.pid.unwrap_or_default())),
            None => {
                let mut names: Vec<String> = live
                    .values()
                    .filter(|l| l.row.app == app && l.state != State::Stopping)
                    .map(|l| format!("{}.{}", l.row.app, l.row.slot))
                    .collect();
                names.sort();
                let have = if names.is_empty() {
                    format!("app {app} has no running instance: start it with `deliverous app start {app}`")
                } else {
                    format!("app {app} runs {}", names.join(", "))
                };
                Err(SupervisorError::NotFound(format!("instance {target} is not running: {have}")))
            }
        }
    }

    /// Starts `opts.argv` inside the running instance `target` (see [`Self::find_running`]).
    pub async fn exec_session(&self, target: &str, opts: &ExecOptions) -> Result<Session, SupervisorError> {
        let (uid, pid) = self.find_running(target)?;
        self.exec_in(&uid, pid, opts).await
    }

    async fn exec_in(&self, uid: &str, pid: i32, opts: &ExecOptions) -> Result<Session, SupervisorError> {
        let failed = |m: String| SupervisorError::Instance(format!("cannot exec in instance {uid}: {m}"));
        if opts.argv.is_empty() {
            return Err(SupervisorError::Instance("no command given".into()));
        }
        let exe = std::env::current_exe().map_err(|e| failed(format!("cannot find our own binary: {e}")))?;
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().map_err(|e| failed(e.to_string()))?;
        let mut cmd = tokio::process::Command::new(exe);
        cmd.arg("shim-exec").arg("--bundle").arg(self.settings.instance_dir(uid)).arg("--pid").arg(pid.to_string());
        // The filter the instance's shim compiled, rather than compiling it again.
        cmd.arg("--seccomp-cache")
            .arg(deliverous_runtime::shim::launch::seccomp_cache(&self.settings.container_root()));
        for e in &opts.env {
            cmd.arg(format!("--env={e}"));
        }
        if let Some(u) = &opts.user {
            cmd.arg(format!("--user={u}"));
        }
        if let Some(w) = &opts.workdir {
            cmd.arg(format!("--cwd={w}"));
        }
        if opts.tty {
            cmd.arg("--tty");
            if let Some((rows, cols)) = opts.size {
                cmd.arg(format!("--rows={rows}")).arg(format!("--cols={cols}"));
            }
        }
        cmd.arg("--").args(&opts.argv);
        let piped = !opts.tty;
        let mut combined = None;
        let (out, err) = if piped && opts.combined_output {
            let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| failed(format!("pipe: {e}")))?;
            let w2 = w.try_clone().map_err(|e| failed(format!("pipe: {e}")))?;
            combined = Some(r);
            (Stdio::from(w), Stdio::from(w2))
        } else if piped {
            (Stdio::piped(), Stdio::piped())
        } else {
            (Stdio::null(), Stdio::null())
        };
        cmd.stdin(if piped && opts.stdin { Stdio::piped() } else { Stdio::null() })
            .stdout(out)
            .stderr(err)
            // Out of the daemon's process group: a ^C to a foreground daemon is not for it.
            .process_group(0)
            .kill_on_drop(false);
        let raw = theirs.as_raw_fd();
        // SAFETY: between fork and exec only dup2 runs, which is async-signal-safe; `theirs`
        // stays open until `spawn` returns.
        unsafe {
            cmd.pre_exec(move || {
                if libc::dup2(raw, CONTROL_FD) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(|e| failed(format!("cannot run the exec helper: {e}")))?;
        drop(theirs);
        let stdin = child.stdin.take().map(|s| Box::new(s) as Writer);
        let mut stdout = child.stdout.take().map(|s| Box::new(s) as Reader);
        if let Some(r) = combined {
            // Our copies of the write end went with `cmd`'s spawn; only the helper holds it now.
            drop(cmd);
            let receiver = crate::attach::nonblocking(&r)
                .and_then(|()| tokio::net::unix::pipe::Receiver::from_owned_fd_unchecked(r))
                .map_err(|e| failed(format!("pipe: {e}")))?;
            stdout = Some(Box::new(receiver));
        }
        let stderr = child.stderr.take().map(|s| Box::new(s) as Reader);
        // Reap the helper whenever it exits.
        tokio::spawn(async move {
            let _ = child.wait().await;
        });
        let hold = KillOnDrop(ours.try_clone().map_err(|e| failed(e.to_string()))?);

        // The first report: started (with the pty master) or could not start.
        let first = tokio::task::spawn_blocking(move || first_report(ours)).await;
        let (report, master, rest, stream) = first.map_err(|e| failed(e.to_string()))?.map_err(failed)?;
        let (tx, exit) = oneshot::channel();
        if report.started.is_none() {
            let outcome = outcome_of(&report);
            let _ = tx.send(outcome);
            let io = SessionIo::Pipes {
                stdin: None,
                stdout: Box::new(tokio::io::empty()),
                stderr: Box::new(tokio::io::empty()),
            };
            return Ok(Session { io, exit, hold: Box::new(hold) });
        }
        tokio::spawn(async move {
            let _ = tx.send(wait_report(rest, stream).await);
        });
        let io = match (opts.tty, master) {
            (true, Some(m)) => SessionIo::Pty(m),
            (true, None) => return Err(failed("the helper did not hand over the terminal".into())),
            (false, _) => SessionIo::Pipes {
                stdin,
                stdout: stdout.unwrap_or_else(|| Box::new(tokio::io::empty())),
                stderr: stderr.unwrap_or_else(|| Box::new(tokio::io::empty())),
            },
        };
        Ok(Session { io, exit, hold: Box::new(hold) })
    }

    /// Runs `argv` inside the running instance `instance_uid`, without stdin or terminal, for
    /// at most `timeout` (then it is killed): its exit code and its stdout and stderr together,
    /// cut at 4 KiB. For image `HEALTHCHECK CMD`.
    pub async fn exec_capture(
        &self,
        instance_uid: &str,
        argv: &[String],
        timeout: Duration,
    ) -> Result<(i32, Vec<u8>), String> {
        let pid = lock(&self.live)
            .get(instance_uid)
            .filter(|l| l.state != State::Stopping)
            .and_then(|l| l.pid)
            .ok_or_else(|| format!("instance {instance_uid} is not running"))?;
        let opts = ExecOptions { argv: argv.to_vec(), combined_output: true, ..Default::default() };
        let run = async {
            let session = self.exec_in(instance_uid, pid, &opts).await.map_err(|e| e.to_string())?;
            let Session { io, exit, hold } = session;
            let SessionIo::Pipes { stdout, stderr, .. } = io else {
                return Err("unexpected terminal".to_string());
            };
            let output = Arc::new(std::sync::Mutex::new(Vec::new()));
            let (a, b) = (collect(stdout, output.clone()), collect(stderr, output.clone()));
            let (_, _, outcome) = tokio::join!(a, b, exit);
            drop(hold);
            let outcome = outcome.map_err(|_| "the exec helper vanished".to_string())?;
            if outcome.code == DAEMON_ERROR && outcome.message.is_some() {
                return Err(outcome.message.unwrap_or_else(|| "exec failed".into()));
            }
            let mut out = std::mem::take(&mut *output.lock().unwrap_or_else(|p| p.into_inner()));
            if out.is_empty() {
                if let Some(m) = outcome.message {
                    out = m.into_bytes();
                    out.truncate(CAPTURE_LIMIT);
                }
            }
            Ok((outcome.code, out))
        };
        match tokio::time::timeout(timeout, run).await {
            Ok(result) => result,
            Err(_) => Err(format!("timed out after {timeout:?}")),
        }
    }
}

/// Reads a stream to its end, keeping what fits under [`CAPTURE_LIMIT`] in `into`.
async fn collect(mut from: Reader, into: Arc<std::sync::Mutex<Vec<u8>>>) {
    let mut buf = [0u8; 4096];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                let mut out = into.lock().unwrap_or_else(|p| p.into_inner());
                let room = CAPTURE_LIMIT.saturating_sub(out.len()).min(n);
                out.extend_from_slice(&buf[..room]);
            }
        }
    }
}

type FirstReport = (Report, Option<OwnedFd>, Vec<u8>, std::os::unix::net::UnixStream);

/// Blocking: the helper's first report line, the descriptor sent with it, and what came after.
fn first_report(stream: std::os::unix::net::UnixStream) -> Result<FirstReport, String> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    use std::os::fd::FromRawFd;
    stream.set_read_timeout(Some(Duration::from_secs(60))).map_err(|e| e.to_string())?;
    let mut data = Vec::new();
    let mut fd = None;
    loop {
        if let Some(end) = data.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = data.drain(..=end).collect();
            let report: Report =
                serde_json::from_slice(&line).map_err(|e| format!("bad report from the exec helper: {e}"))?;
            return Ok((report, fd, data, stream));
        }
        let mut buf = [0u8; 1024];
        let mut iov = [std::io::IoSliceMut::new(&mut buf)];
        let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
        let msg = recvmsg::<()>(stream.as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)
            .map_err(|e| format!("reading the exec helper's report: {e}"))?;
        let n = msg.bytes;
        for cmsg in msg.cmsgs().map_err(|e| e.to_string())? {
            if let ControlMessageOwned::ScmRights(fds) = cmsg {
                for raw in fds {
                    // SAFETY: the kernel just installed this descriptor for us.
                    let owned = unsafe { OwnedFd::from_raw_fd(raw) };
                    fd.get_or_insert(owned);
                }
            }
        }
        if n == 0 {
            return Err("the exec helper ended without a report".into());
        }
        data.extend_from_slice(&buf[..n]);
    }
}

/// Reads the helper's reports until the exit.
async fn wait_report(rest: Vec<u8>, stream: std::os::unix::net::UnixStream) -> Outcome {
    let lost = Outcome { code: DAEMON_ERROR, message: Some("the exec helper ended without reporting an exit".into()) };
    let mut lines = rest;
    loop {
        if let Some(end) = lines.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = lines.drain(..=end).collect();
            if let Ok(report) = serde_json::from_slice::<Report>(&line) {
                if report.exit.is_some() || report.error.is_some() {
                    return outcome_of(&report);
                }
            }
            continue;
        }
        break;
    }
    if stream.set_nonblocking(true).is_err() {
        return lost;
    }
    let Ok(stream) = tokio::net::UnixStream::from_std(stream) else { return lost };
    let mut reader = BufReader::new(stream);
    let mut line = String::from_utf8_lossy(&lines).into_owned();
    loop {
        match reader.read_line(&mut line).await {
            Ok(0) | Err(_) => return lost,
            Ok(_) if line.ends_with('\n') => {
                if let Ok(report) = serde_json::from_str::<Report>(&line) {
                    if report.exit.is_some() || report.error.is_some() {
                        return outcome_of(&report);
                    }
                }
                line.clear();
            }
            Ok(_) => {}
        }
    }
}

fn outcome_of(report: &Report) -> Outcome {
    match (&report.exit, &report.error) {
        (Some(exit), _) => Outcome { code: exit.shell_code(), message: None },
        (None, Some(e)) => Outcome { code: report.code.unwrap_or(DAEMON_ERROR), message: Some(e.clone()) },
        (None, None) => Outcome { code: DAEMON_ERROR, message: Some("the exec helper sent an empty report".into()) },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use deliverous_runtime::exec::Exit;

    #[test]
    fn reports_become_exit_codes() {
        let exited = Report { exit: Some(Exit { code: Some(3), signal: None }), ..Default::default() };
        assert_eq!(outcome_of(&exited), Outcome { code: 3, message: None });
        let killed = Report { exit: Some(Exit { code: None, signal: Some(15) }), ..Default::default() };
        assert_eq!(outcome_of(&killed).code, 143);
        let missing = Report { error: Some("nope: not found".into()), code: Some(127), ..Default::default() };
        assert_eq!(outcome_of(&missing), Outcome { code: 127, message: Some("nope: not found".into()) });
    }
}
