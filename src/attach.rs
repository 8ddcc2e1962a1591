//! The attach protocol of `deliverous exec` and `deliverous run`: a bidirectional byte stream
//! between the CLI and a command the daemon started, over an upgraded HTTP connection.
//!
//! The client sends `POST /v1/exec` (or `/v1/apps/{app}/run`) with a JSON body and the headers
//! `Connection: Upgrade` and `Upgrade: deliverous-attach`. An error (no such instance, bad
//! request) is an ordinary JSON error response. Otherwise the daemon answers
//! `101 Switching Protocols`, and from then on both sides exchange frames:
//!
//! ```text
//! +--------+----------------------+-----------------+
//! | kind u8| length u32 big-endian| payload         |
//! +--------+----------------------+-----------------+
//! client → daemon: 0 stdin bytes (an empty payload closes the command's stdin)
//!                  4 resize: rows u16, cols u16 (big-endian), for a terminal
//! daemon → client: 1 stdout bytes, 2 stderr bytes (with a terminal, everything is stdout)
//!                  3 exit: the exit code, i32 big-endian; the last frame
//! ```
//!
//! When the client's connection ends before the exit frame, the daemon kills the command.

use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::supervisor::{Outcome, Session, SessionIo};

pub const UPGRADE: &str = "deliverous-attach";

pub const STDIN: u8 = 0;
pub const STDOUT: u8 = 1;
pub const STDERR: u8 = 2;
pub const EXIT: u8 = 3;
pub const RESIZE: u8 = 4;

/// Frames larger than this are a protocol error.
const MAX_FRAME: u32 = 1 << 20;

pub async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, kind: u8, payload: &[u8]) -> std::io::Result<()> {
    let len = u32::try_from(payload.len()).map_err(std::io::Error::other)?;
    let mut frame = Vec::with_capacity(5 + payload.len());
    frame.push(kind);
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(payload);
    w.write_all(&frame).await?;
    w.flush().await
}

/// The next frame, or `None` at the end of the stream.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> std::io::Result<Option<(u8, Vec<u8>)>> {
    let mut head = [0u8; 5];
    match r.read_exact(&mut head).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]);
    if len > MAX_FRAME {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, format!("frame of {len} bytes")));
    }
    let mut payload = vec![0u8; len as usize];
    r.read_exact(&mut payload).await?;
    Ok(Some((head[0], payload)))
}

pub fn resize_payload(rows: u16, cols: u16) -> [u8; 4] {
    let (r, c) = (rows.to_be_bytes(), cols.to_be_bytes());
    [r[0], r[1], c[0], c[1]]
}

pub fn parse_resize(payload: &[u8]) -> Option<(u16, u16)> {
    match payload {
        [r0, r1, c0, c1] => Some((u16::from_be_bytes([*r0, *r1]), u16::from_be_bytes([*c0, *c1]))),
        _ => None,
    }
}

/// Sets a pty's window size.
pub fn set_window_size(fd: &impl AsRawFd, rows: u16, cols: u16) {
    if rows == 0 || cols == 0 {
        return;
    }
    let ws = libc::winsize { ws_row: rows, ws_col: cols, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: TIOCSWINSZ reads a winsize struct that lives for the call.
    unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
}

pub fn nonblocking(fd: &OwnedFd) -> std::io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let flags = OFlag::from_bits_truncate(fcntl(fd.as_raw_fd(), FcntlArg::F_GETFL)?);
    fcntl(fd.as_raw_fd(), FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    Ok(())
}

type Reader = Box<dyn AsyncRead + Send + Unpin>;
type Writer = Box<dyn AsyncWrite + Send + Unpin>;

/// Daemon side: connects `session` to the client on `io` until the command ends (then sends
/// its exit code) or the client goes away (then the command is killed by dropping the session).
pub async fn serve<IO: AsyncRead + AsyncWrite + Send + 'static>(io: IO, session: Session) {
    let Session { io: session_io, mut exit, hold } = session;
    let (mut from_client, mut to_client) = tokio::io::split(io);
    let (out_tx, mut out_rx) = mpsc::channel::<(u8, Vec<u8>)>(16);
    let mut pty_ctl = None;
    let stdin: Option<Writer> = match session_io {
        SessionIo::Pipes { stdin, stdout, stderr } => {
            tokio::spawn(pump_output(stdout, STDOUT, out_tx.clone()));
            tokio::spawn(pump_output(stderr, STDERR, out_tx));
            stdin
        }
        SessionIo::Pty(master) => {
            let opened = nonblocking(&master).and_then(|()| Ok((master.try_clone()?, master.try_clone()?))).and_then(
                |(w, c)| {
                    let reader = tokio::net::unix::pipe::Receiver::from_owned_fd_unchecked(master)?;
                    let writer = tokio::net::unix::pipe::Sender::from_owned_fd_unchecked(w)?;
                    Ok((reader, writer, c))
                },
            );
            match opened {
                Ok((reader, writer, ctl)) => {
                    tokio::spawn(pump_output(Box::new(reader), STDOUT, out_tx));
                    pty_ctl = Some(ctl);
                    Some(Box::new(writer) as Writer)
                }
                Err(e) => {
                    let _ = write_frame(&mut to_client, STDERR, format!("error: terminal: {e}\n").as_bytes()).await;
                    let _ = write_frame(&mut to_client, EXIT, &crate::supervisor::DAEMON_ERROR.to_be_bytes()).await;
                    return;
                }
            }
        }
    };
    // Client → command; ends when the client's side of the connection does.
    let (gone_tx, mut gone) = tokio::sync::oneshot::channel::<()>();
    let input = tokio::spawn(async move {
        let mut stdin = stdin;
        loop {
            match read_frame(&mut from_client).await {
                Ok(Some((STDIN, data))) if data.is_empty() => {
                    // A pty has no end of input of its own: the client's terminal sends ^D.
                    if pty_ctl.is_none() {
                        stdin = None;
                    }
                }
                Ok(Some((STDIN, data))) => {
                    if let Some(w) = stdin.as_mut() {
                        if w.write_all(&data).await.is_err() || w.flush().await.is_err() {
                            stdin = None;
                        }
                    }
                }
                Ok(Some((RESIZE, data))) => {
                    if let (Some(ctl), Some((rows, cols))) = (pty_ctl.as_ref(), parse_resize(&data)) {
                        set_window_size(ctl, rows, cols);
                    }
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            }
        }
        let _ = gone_tx.send(());
    });

    let mut outcome: Option<Outcome> = None;
    let mut output_done = false;
    let mut drain_deadline = None;
    loop {
        if outcome.is_some() && output_done {
            break;
        }
        let deadline = drain_deadline.unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            frame = out_rx.recv(), if !output_done => match frame {
                Some((kind, data)) => {
                    if write_frame(&mut to_client, kind, &data).await.is_err() {
                        // The client is gone: dropping `hold` kills the command.
                        break;
                    }
                }
                None => output_done = true,
            },
            o = &mut exit, if outcome.is_none() => {
                outcome = Some(o.unwrap_or(Outcome {
                    code: crate::supervisor::DAEMON_ERROR,
                    message: Some("the command's supervisor went away".into()),
                }));
                // Output still in flight is sent; a background process holding the streams
                // open does not hold the exit back for long.
                drain_deadline = Some(tokio::time::Instant::now() + Duration::from_secs(2));
            }
            _ = tokio::time::sleep_until(deadline), if drain_deadline.is_some() => break,
            _ = &mut gone, if outcome.is_none() => {
                // The client went away first: the command is killed.
                input.abort();
                drop(hold);
                return;
            }
        }
    }
    input.abort();
    if let Some(outcome) = outcome {
        if let Some(m) = &outcome.message {
            let _ = write_frame(&mut to_client, STDERR, format!("deliverous: {m}\n").as_bytes()).await;
        }
        let _ = write_frame(&mut to_client, EXIT, &outcome.code.to_be_bytes()).await;
        let _ = to_client.shutdown().await;
    }
    drop(hold);
}

async fn pump_output(mut from: Reader, kind: u8, to: mpsc::Sender<(u8, Vec<u8>)>) {
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        match from.read(&mut buf).await {
            // EIO: a pty master whose slave side is closed everywhere.
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if to.send((kind, buf[..n].to_vec())).await.is_err() {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_round_trip() {
        let (mut a, mut b) = tokio::io::duplex(64);
        write_frame(&mut a, STDOUT, b"hello").await.unwrap();
        write_frame(&mut a, RESIZE, &resize_payload(40, 120)).await.unwrap();
        write_frame(&mut a, EXIT, &3i32.to_be_bytes()).await.unwrap();
        drop(a);
        assert_eq!(read_frame(&mut b).await.unwrap(), Some((STDOUT, b"hello".to_vec())));
        let (kind, payload) = read_frame(&mut b).await.unwrap().unwrap();
        assert_eq!((kind, parse_resize(&payload)), (RESIZE, Some((40, 120))));
        assert_eq!(read_frame(&mut b).await.unwrap(), Some((EXIT, 3i32.to_be_bytes().to_vec())));
        assert_eq!(read_frame(&mut b).await.unwrap(), None);
    }

    #[tokio::test]
    async fn oversized_frames_are_refused() {
        let (mut a, mut b) = tokio::io::duplex(64);
        a.write_all(&[STDIN, 0xff, 0xff, 0xff, 0xff]).await.unwrap();
        assert!(read_frame(&mut b).await.is_err());
    }
}
