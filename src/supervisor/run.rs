//! One-off instances (`deliverous run`, Twelve-Factor admin processes): a fresh instance of an
//! app's current revision (same image, environment, volumes, limits, its own IP on the bridge)
//! that runs the given command instead of the image's, attached to the client, never in the
//! proxy's rotation, and removed once the command ends or the client goes away.
//!
//! Its record has slot [`RUN_SLOT`], which no regular instance uses: a daemon that starts and
//! finds one (its client's connection died with the previous daemon) removes it.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use deliverous_runtime::shim::protocol::Request;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::oneshot;

use super::exec::{ExecOptions, Outcome, Reader, Session, SessionIo, Writer, DAEMON_ERROR};
use super::instance::send_request;
use super::{Supervisor, SupervisorError};
use crate::apps::store::InstanceRow;

/// The slot of one-off instances.
pub const RUN_SLOT: u32 = 0;

/// The name a one-off instance shows (its hostname): `web.run.1a2b3c`.
pub fn run_name(app: &str, uid: &str) -> String {
    format!("{app}.run.{}", &uid[..uid.len().min(6)])
}

/// Stops a one-off instance when dropped (the client went away).
struct StopOnDrop(Option<oneshot::Sender<()>>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        if let Some(tx) = self.0.take() {
            let _ = tx.send(());
        }
    }
}

/// The daemon's ends of a one-off instance's streams.
enum Ends {
    Pipes { stdin: Option<OwnedFd>, stdout: OwnedFd, stderr: OwnedFd },
    Pty(OwnedFd),
}

impl Supervisor {
    /// Starts `opts.argv` in a fresh instance of `app`'s current revision.
    pub async fn run_session(self: &Arc<Self>, app: &str, opts: &ExecOptions) -> Result<Session, SupervisorError> {
        let app = self.store.app(app)?.ok_or_else(|| SupervisorError::NotFound(format!("app {app} not found")))?;
        let number = app.revision.ok_or_else(|| {
            SupervisorError::Instance(format!("app {} has no revision yet: deploy it first", app.name))
        })?;
        let rev = self
            .store
            .revision(&app.name, number)?
            .ok_or_else(|| SupervisorError::Instance(format!("revision {number} of app {} is missing", app.name)))?;
        let image = self.image_for(&rev)?;
        let n: u64 = rand::random();
        let uid = format!("{:012x}", n & 0xffff_ffff_ffff);
        let row = self.store.insert_instance(&uid, &app.name, RUN_SLOT, rev.number, self.hosts())?;
        let name = run_name(&app.name, &uid);
        let prepared = {
            let me = self.clone();
            let (row, rev, opts, name) = (row.clone(), rev.clone(), opts.clone(), name.clone());
            tokio::task::spawn_blocking(move || {
                me.prepare(&row, &rev, &image)?;
                me.adapt_for_run(&row, &name, &opts)
            })
            .await
            .unwrap_or_else(|e| Err(format!("preparation task failed: {e}")))
        };
        if let Err(msg) = prepared {
            self.release(&row, false).await;
            return Err(SupervisorError::Instance(format!("cannot prepare one-off instance {name}: {msg}")));
        }
        let ends = match self.spawn_run_shim(&row, opts).await {
            Ok(ends) => ends,
            Err(msg) => {
                self.release(&row, true).await;
                // The command itself could not be started: that is the command's exit code.
                let (tx, exit) = oneshot::channel();
                let code = if msg.contains("not found") {
                    deliverous_runtime::exec::NOT_FOUND
                } else if msg.contains("executable") || msg.contains("ermission denied") {
                    deliverous_runtime::exec::CANNOT_EXECUTE
                } else {
                    DAEMON_ERROR
                };
                let _ =
                    tx.send(Outcome { code, message: Some(format!("one-off instance {name} did not start: {msg}")) });
                let io = SessionIo::Pipes {
                    stdin: None,
                    stdout: Box::new(tokio::io::empty()),
                    stderr: Box::new(tokio::io::empty()),
                };
                return Ok(Session { io, exit, hold: Box::new(()) });
            }
        };
        tracing::info!(app = %app.name, "one-off instance {name} ({uid}) runs {:?}", opts.argv);
        let (stop_tx, stop_rx) = oneshot::channel();
        let (exit_tx, exit) = oneshot::channel();
        let me = self.clone();
        tokio::spawn(async move {
            let outcome = me.watch_run(&row, stop_rx).await;
            tracing::info!(app = %row.app, "one-off instance {} ended with exit code {}", run_name(&row.app, &row.uid), outcome.code);
            let _ = exit_tx.send(outcome);
        });
        let hold = StopOnDrop(Some(stop_tx));
        let io = match ends {
            Ends::Pty(master) => SessionIo::Pty(master),
            Ends::Pipes { stdin, stdout, stderr } => {
                let reader = |fd: OwnedFd| -> Result<Reader, std::io::Error> {
                    set_nonblocking(&fd)?;
                    Ok(Box::new(tokio::net::unix::pipe::Receiver::from_owned_fd_unchecked(fd)?))
                };
                let stdin = match stdin {
                    Some(fd) => {
                        let w = set_nonblocking(&fd)
                            .and_then(|()| tokio::net::unix::pipe::Sender::from_owned_fd_unchecked(fd))
                            .map_err(|e| SupervisorError::Instance(format!("stdin of {name}: {e}")))?;
                        Some(Box::new(w) as Writer)
                    }
                    None => None,
                };
                let stdout = reader(stdout).map_err(|e| SupervisorError::Instance(format!("stdout of {name}: {e}")))?;
                let stderr = reader(stderr).map_err(|e| SupervisorError::Instance(format!("stderr of {name}: {e}")))?;
                SessionIo::Pipes { stdin, stdout, stderr }
            }
        };
        Ok(Session { io, exit, hold: Box::new(hold) })
    }

    /// Kills `app`'s one-off instances and waits (10 s at most) until they are removed: the
    /// app is being removed, with the images they run.
    pub async fn stop_runs(&self, app: &str) {
        let rows = |store: &crate::apps::store::Store| -> Vec<InstanceRow> {
            store.instances().unwrap_or_default().into_iter().filter(|r| r.app == app && r.slot == RUN_SLOT).collect()
        };
        let runs = rows(&self.store);
        if runs.is_empty() {
            return;
        }
        let kill = Request::Stop { signal: libc::SIGKILL, timeout_ms: 0 };
        for row in &runs {
            tracing::info!(app, "stopping one-off instance {}: its app is removed", run_name(&row.app, &row.uid));
            let _ = send_request(&self.settings.shim_socket(&row.uid), &kill, Some(Duration::from_secs(10))).await;
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !rows(&self.store).is_empty() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Blocking: turns a prepared instance into a one-off one: the command instead of the
    /// image's, the extra environment, its own host name, a terminal if asked.
    fn adapt_for_run(&self, row: &InstanceRow, name: &str, opts: &ExecOptions) -> Result<(), String> {
        let dir = self.settings.instance_dir(&row.uid);
        let path = dir.join("config.json");
        let text = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut spec: Value = serde_json::from_slice(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        let old_host = spec["hostname"].as_str().unwrap_or_default().to_string();
        spec["hostname"] = Value::from(name);
        let process = spec.get_mut("process").and_then(Value::as_object_mut).ok_or("config.json has no process")?;
        process.insert("args".into(), Value::from(opts.argv.clone()));
        process.insert("terminal".into(), Value::from(opts.tty));
        let base: Vec<String> = process
            .get("env")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect())
            .unwrap_or_default();
        let mut extra = opts.env.clone();
        if base.iter().any(|e| e.starts_with("HOSTNAME=")) {
            extra.insert(0, format!("HOSTNAME={name}"));
        }
        let env = deliverous_runtime::exec::merge_env(&base, &extra, None);
        process.insert("env".into(), Value::from(env));
        let out = serde_json::to_vec_pretty(&spec).map_err(|e| e.to_string())?;
        std::fs::write(&path, out).map_err(|e| format!("{}: {e}", path.display()))?;
        std::fs::write(dir.join("hostname"), format!("{name}\n")).map_err(|e| format!("hostname: {e}"))?;
        let hosts = dir.join("hosts");
        if let Ok(text) = std::fs::read_to_string(&hosts) {
            let renamed: Vec<String> = text
                .lines()
                .map(|l| {
                    l.split_whitespace().map(|w| if w == old_host { name } else { w }).collect::<Vec<_>>().join("\t")
                })
                .collect();
            std::fs::write(&hosts, renamed.join("\n") + "\n").map_err(|e| format!("hosts: {e}"))?;
        }
        Ok(())
    }

    /// Runs the shim of a one-off instance with the container's streams on our pipes (or a
    /// terminal); returns our ends.
    async fn spawn_run_shim(&self, row: &InstanceRow, opts: &ExecOptions) -> Result<Ends, String> {
        let dir = self.settings.instance_dir(&row.uid);
        let mut cmd = self.shim_command(row)?;
        let pipe = || nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| format!("pipe: {e}"));
        let mut console = None;
        let (ends, theirs) = if opts.tty {
            let path = dir.join("console.sock");
            let _ = std::fs::remove_file(&path);
            let listener = tokio::net::UnixListener::bind(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            cmd.arg("--console-socket").arg(&path);
            console = Some(listener);
            (None, Vec::new())
        } else {
            let stdin = if opts.stdin {
                let (r, w) = pipe()?;
                (r, Some(w))
            } else {
                (OwnedFd::from(std::fs::File::open("/dev/null").map_err(|e| format!("/dev/null: {e}"))?), None)
            };
            let (out_r, out_w) = pipe()?;
            let (err_r, err_w) = pipe()?;
            let theirs = vec![stdin.0, out_w, err_w];
            (Some(Ends::Pipes { stdin: stdin.1, stdout: out_r, stderr: err_r }), theirs)
        };
        if !theirs.is_empty() {
            let raw: Vec<i32> = theirs.iter().map(|f| f.as_raw_fd()).collect();
            if raw.iter().any(|fd| *fd < 6) {
                return Err("unexpected low descriptor numbers for the instance's streams".into());
            }
            cmd.arg("--inherit-stdio");
            // SAFETY: between fork and exec only dup2 runs, which is async-signal-safe; the
            // descriptors stay open until `spawn` returns.
            unsafe {
                cmd.pre_exec(move || {
                    for (target, fd) in raw.iter().enumerate() {
                        if libc::dup2(*fd, target as i32 + 3) < 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                    }
                    Ok(())
                });
            }
        }
        let mut child = cmd.spawn().map_err(|e| format!("cannot run the shim: {e}"))?;
        drop(theirs);
        let stdout = child.stdout.take().ok_or("shim has no stdout")?;
        tokio::spawn(async move {
            let _ = child.wait().await;
        });
        let size = opts.size;
        let master = console.map(|listener| {
            tokio::spawn(async move {
                let (stream, _) = listener.accept().await.map_err(|e| format!("console socket: {e}"))?;
                let stream = stream.into_std().map_err(|e| e.to_string())?;
                stream.set_nonblocking(false).map_err(|e| e.to_string())?;
                let fd = tokio::task::spawn_blocking(move || deliverous_runtime::exec::receive_fd(&stream))
                    .await
                    .map_err(|e| e.to_string())?
                    .ok_or_else(|| "no terminal came over the console socket".to_string())?;
                // Sized while the container is still being created, before its command runs.
                if let Some((rows, cols)) = size {
                    crate::attach::set_window_size(&fd, rows, cols);
                }
                Ok::<_, String>(fd)
            })
        });
        let mut line = String::new();
        let read = tokio::time::timeout(Duration::from_secs(60), BufReader::new(stdout).read_line(&mut line)).await;
        let report = match read {
            Err(_) => Err("the shim did not report within 60 s".to_string()),
            Ok(Err(e)) => Err(format!("reading the shim's report: {e}")),
            Ok(Ok(_)) => match line.trim().split_once(' ') {
                Some(("ok", _)) => Ok(()),
                Some(("error", msg)) => Err(msg.to_string()),
                _ => Err(format!("the shim exited without a report ({:?})", line.trim())),
            },
        };
        if let Err(e) = report {
            if let Some(task) = master {
                task.abort();
            }
            return Err(e);
        }
        match (ends, master) {
            (Some(ends), _) => Ok(ends),
            (None, Some(task)) => {
                let fd = tokio::time::timeout(Duration::from_secs(10), task)
                    .await
                    .map_err(|_| "the terminal did not come over the console socket".to_string())?
                    .map_err(|e| e.to_string())??;
                Ok(Ends::Pty(fd))
            }
            (None, None) => Err("no streams for the instance".into()),
        }
    }

    /// Waits until the one-off command ends (or `stop` fires: then it is killed), removes the
    /// instance, and says how the command ended.
    async fn watch_run(self: &Arc<Self>, row: &InstanceRow, stop: oneshot::Receiver<()>) -> Outcome {
        let socket = self.settings.shim_socket(&row.uid);
        let wait = send_request(&socket, &Request::Wait, None);
        tokio::pin!(wait);
        let reply = tokio::select! {
            r = &mut wait => r,
            _ = stop => {
                tracing::info!(app = %row.app, "the client of one-off instance {} went away: stopping it", run_name(&row.app, &row.uid));
                let kill = Request::Stop { signal: libc::SIGKILL, timeout_ms: 0 };
                let _ = send_request(&socket, &kill, Some(Duration::from_secs(10))).await;
                tokio::time::timeout(Duration::from_secs(10), wait).await.unwrap_or_else(|_| Err("no exit".into()))
            }
        };
        let exit = match reply.ok().and_then(|r| r.exit) {
            Some(e) => Some(e),
            // The command ended before we asked, and the shim with it: it left the exit file.
            None => super::instance::read_exit_file(&self.settings.instance_dir(&row.uid).join("exit.json")),
        };
        // Without a word from the shim, its processes may still be there: force.
        self.release(row, exit.is_none()).await;
        let _ = std::fs::remove_file(self.settings.instance_dir(&row.uid).join("console.sock"));
        match exit {
            Some(e) if e.oom => {
                Outcome { code: 137, message: Some("the command ran out of memory (OOM-killed)".into()) }
            }
            Some(e) => Outcome {
                code: deliverous_runtime::exec::Exit { code: e.code, signal: e.signal }.shell_code(),
                message: None,
            },
            None => Outcome { code: DAEMON_ERROR, message: Some("lost track of the one-off instance".into()) },
        }
    }
}

fn set_nonblocking(fd: &OwnedFd) -> std::io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let flags = OFlag::from_bits_truncate(fcntl(fd.as_raw_fd(), FcntlArg::F_GETFL)?);
    fcntl(fd.as_raw_fd(), FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_off_names() {
        assert_eq!(run_name("web", "0a1b2c3d4e5f"), "web.run.0a1b2c");
    }
}
