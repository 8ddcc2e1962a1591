//! `deliverous daemon --upgrade`: a new daemon takes over from the running one without refusing
//! a connection. The old daemon hands over its API listening socket (`SCM_RIGHTS` over
//! `<run-dir>/handover.sock`) and exits as on SIGTERM (instances keep running); API clients that
//! connect meanwhile wait in the socket's queue. The new daemon waits for the data dir's lock,
//! re-attaches to the instances, and replaces the proxy process (see `proxy::link`), whose
//! listening sockets stay open throughout.

use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::proxy::control::{recv_line_with_fds, send_with_fds};

const REQUEST: &str = "handover";

pub fn socket_path(run_dir: &Path) -> PathBuf {
    run_dir.join("handover.sock")
}

/// Asks the daemon running on `run_dir` to hand over; returns its API listening socket.
pub async fn request(run_dir: &Path) -> anyhow::Result<std::os::unix::net::UnixListener> {
    let path = socket_path(run_dir);
    let (line, mut fds) = tokio::task::spawn_blocking(move || -> std::io::Result<_> {
        let mut stream = std::os::unix::net::UnixStream::connect(&path)?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        stream.write_all(format!("{REQUEST}\n").as_bytes())?;
        recv_line_with_fds(&stream)
    })
    .await?
    .with_context(|| {
        format!("no daemon to take over from at {} (is one running on this --run-dir?)", socket_path(run_dir).display())
    })?;
    let answer: serde_json::Value = serde_json::from_slice(&line).context("invalid hand-over answer")?;
    if let Some(e) = answer["error"].as_str() {
        bail!("the running daemon refused to hand over: {e}");
    }
    let Some(fd) = fds.pop() else { bail!("the running daemon passed no API socket") };
    tracing::info!(pid = answer["pid"].as_u64().unwrap_or(0), "the running daemon handed over its API socket");
    let listener = std::os::unix::net::UnixListener::from(fd);
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// Serves hand-over requests: passes a copy of `api` and wakes `handed_over`.
pub fn serve(run_dir: &Path, api: OwnedFd, handed_over: Arc<tokio::sync::Notify>) -> anyhow::Result<()> {
    let path = socket_path(run_dir);
    let _ = std::fs::remove_file(&path);
    let listener =
        tokio::net::UnixListener::bind(&path).with_context(|| format!("cannot listen on {}", path.display()))?;
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            let mut reader = BufReader::new(stream);
            let mut line = String::new();
            let read = tokio::time::timeout(Duration::from_secs(5), reader.read_line(&mut line)).await;
            if !matches!(read, Ok(Ok(_))) || line.trim() != REQUEST {
                continue;
            }
            let stream = reader.into_inner();
            let answer = format!("{}\n", serde_json::json!({ "pid": std::process::id() }));
            let _ = stream.writable().await;
            let sent = stream.try_io(tokio::io::Interest::WRITABLE, || {
                send_with_fds(stream.as_raw_fd(), answer.as_bytes(), &[api.as_raw_fd()])
            });
            match sent {
                Ok(()) => {
                    tracing::info!("handing over to a new daemon");
                    handed_over.notify_one();
                    return;
                }
                Err(e) => tracing::warn!("hand-over failed: {e}"),
            }
        }
    });
    Ok(())
}
