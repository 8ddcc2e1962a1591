//! `deliverous exec` and `deliverous run`: attach the terminal to a command in an instance
//! (src/attach.rs is the protocol). The CLI exits with the command's exit code.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::process::ExitCode;

use clap::Args;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::client::{self, Host};
use crate::attach::{self, EXIT, RESIZE, STDERR, STDIN, STDOUT};

#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  deliverous exec web.2 -it -- sh\n  deliverous exec web -- cat /etc/hostname\n  \
    echo data | deliverous exec -i web.1 -- sh -c 'cat > /tmp/x'")]
pub struct ExecArgs {
    /// The instance: web.2, or web for the app's first running instance.
    instance: String,
    /// Keep stdin open and send it to the command.
    #[arg(short, long)]
    interactive: bool,
    /// Allocate a terminal (pty) for the command.
    #[arg(short, long)]
    tty: bool,
    /// Set an environment variable (KEY=VALUE), added to the instance's.
    #[arg(short, long = "env", value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// Run as this user: name, uid, user:group or uid:gid (default: the image's).
    #[arg(short, long)]
    user: Option<String>,
    /// Working directory inside the instance (default: the image's).
    #[arg(short, long)]
    workdir: Option<String>,
    /// The command and its arguments.
    #[arg(last = true, required = true, value_name = "CMD")]
    cmd: Vec<String>,
}

#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  deliverous run web -- ./manage.py migrate\n  deliverous run web -it -- sh")]
pub struct RunArgs {
    /// The app: the command runs in a fresh instance of its current revision.
    app: String,
    /// Keep stdin open and send it to the command.
    #[arg(short, long)]
    interactive: bool,
    /// Allocate a terminal (pty) for the command.
    #[arg(short, long)]
    tty: bool,
    /// Set an environment variable (KEY=VALUE), added to the app's.
    #[arg(short, long = "env", value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// The command and its arguments (instead of the image's entrypoint and command).
    #[arg(last = true, required = true, value_name = "CMD")]
    cmd: Vec<String>,
}

pub async fn run_exec(host: &Host, args: ExecArgs) -> ExitCode {
    let (rows, cols) = window_size().unwrap_or((0, 0));
    let body = json!({
        "instance": args.instance,
        "cmd": args.cmd,
        "env": args.env,
        "user": args.user,
        "workdir": args.workdir,
        "tty": args.tty,
        "stdin": args.interactive,
        "rows": rows,
        "cols": cols,
    });
    attach(host, "/v1/exec", body, args.interactive, args.tty).await
}

pub async fn run_run(host: &Host, args: RunArgs) -> ExitCode {
    let (rows, cols) = window_size().unwrap_or((0, 0));
    let body = json!({
        "cmd": args.cmd,
        "env": args.env,
        "tty": args.tty,
        "stdin": args.interactive,
        "rows": rows,
        "cols": cols,
    });
    attach(host, &format!("/v1/apps/{}/run", args.app), body, args.interactive, args.tty).await
}

/// The terminal's size, if stdout (or stdin) is one.
fn window_size() -> Option<(u16, u16)> {
    [1, 0].into_iter().find_map(|fd| {
        let mut ws = libc::winsize { ws_row: 0, ws_col: 0, ws_xpixel: 0, ws_ypixel: 0 };
        // SAFETY: TIOCGWINSZ writes a winsize struct that lives for the call.
        let ok = unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) } == 0;
        (ok && ws.ws_row > 0).then_some((ws.ws_row, ws.ws_col))
    })
}

/// Puts the terminal on stdin in raw mode and restores it when dropped.
struct RawMode(Option<nix::sys::termios::Termios>);

impl RawMode {
    fn enter() -> RawMode {
        use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};
        let stdin = std::io::stdin();
        let Ok(saved) = tcgetattr(&stdin) else { return RawMode(None) };
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        if tcsetattr(&stdin, SetArg::TCSANOW, &raw).is_err() {
            return RawMode(None);
        }
        RawMode(Some(saved))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        if let Some(saved) = self.0.take() {
            let _ = nix::sys::termios::tcsetattr(std::io::stdin(), nix::sys::termios::SetArg::TCSANOW, &saved);
        }
    }
}

async fn attach(host: &Host, path: &str, body: serde_json::Value, interactive: bool, tty: bool) -> ExitCode {
    let stream = match client::upgrade(host, path, body).await {
        Ok(s) => s,
        Err(e) => return super::fail(e),
    };
    let raw =
        (tty && interactive && nix::unistd::isatty(std::io::stdin().as_raw_fd()).unwrap_or(false)).then(RawMode::enter);
    let code = pump(stream, interactive, tty).await;
    drop(raw);
    // Leave now: a blocked read of stdin must not hold the exit back.
    std::process::exit(code)
}

/// Runs the session; returns the exit code to leave with.
async fn pump<S>(stream: S, interactive: bool, tty: bool) -> i32
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + 'static,
{
    let (mut from_daemon, to_daemon) = tokio::io::split(stream);
    let to_daemon = std::sync::Arc::new(tokio::sync::Mutex::new(to_daemon));
    if interactive {
        let to = to_daemon.clone();
        tokio::spawn(async move {
            let mut stdin = tokio::io::stdin();
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                let n = stdin.read(&mut buf).await.unwrap_or(0);
                let mut w = to.lock().await;
                if attach::write_frame(&mut *w, STDIN, &buf[..n]).await.is_err() || n == 0 {
                    return;
                }
            }
        });
    }
    if tty {
        let to = to_daemon.clone();
        tokio::spawn(async move {
            let Ok(mut winch) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change()) else {
                return;
            };
            while winch.recv().await.is_some() {
                if let Some((rows, cols)) = window_size() {
                    let mut w = to.lock().await;
                    if attach::write_frame(&mut *w, RESIZE, &attach::resize_payload(rows, cols)).await.is_err() {
                        return;
                    }
                }
            }
        });
    }
    // With the terminal in raw mode, a signal must not end us before it is restored (the
    // caller restores it whatever we return).
    let mut signals = Vec::new();
    if tty {
        use tokio::signal::unix::{signal, SignalKind};
        for kind in [SignalKind::terminate(), SignalKind::hangup(), SignalKind::interrupt()] {
            if let Ok(s) = signal(kind) {
                signals.push((kind.as_raw_value(), s));
            }
        }
    }
    let stopped = async {
        if signals.is_empty() {
            return std::future::pending::<i32>().await;
        }
        let waits = signals.iter_mut().map(|(n, s)| {
            let n = *n;
            Box::pin(async move {
                s.recv().await;
                n
            })
        });
        futures_util::future::select_all(waits).await.0
    };
    tokio::pin!(stopped);
    let mut stdout = tokio::io::stdout();
    loop {
        let frame = tokio::select! {
            f = attach::read_frame(&mut from_daemon) => f,
            n = &mut stopped => return 128 + n,
        };
        match frame {
            Ok(Some((STDOUT, data))) => {
                if stdout.write_all(&data).await.is_err() || stdout.flush().await.is_err() {
                    // Our reader is gone (`| head`): nothing more to show.
                    return 0;
                }
            }
            Ok(Some((STDERR, data))) => {
                let mut err = std::io::stderr().lock();
                let _ = err.write_all(&data);
                let _ = err.flush();
            }
            Ok(Some((EXIT, data))) => {
                let code = <[u8; 4]>::try_from(data.as_slice()).map(i32::from_be_bytes).unwrap_or(255);
                return code.clamp(0, 255);
            }
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => {
                eprintln!("error: the connection to the deliverous daemon ended before the command did");
                return 255;
            }
        }
    }
}
