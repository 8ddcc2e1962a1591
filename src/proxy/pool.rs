//! Keep-alive connections to instances, one pool per proxy worker thread (so checkout never
//! contends with another core). A connection is taken for one exchange and comes back when the
//! response body has been read to its end; one that the instance closed is dropped on checkout.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper::client::conn::http1::{self, SendRequest};
use tokio::net::TcpStream;

use super::body::RequestBody;

/// Idle connections kept per instance; above that, a finished one is closed.
const MAX_IDLE: usize = 512;
/// An idle connection older than this is closed (instances often time out at 60–75 s).
const IDLE_TIMEOUT: Duration = Duration::from_secs(50);

/// A connection to an instance: where requests go in, and what its socket saw at its end.
pub struct Upstream {
    pub sender: SendRequest<RequestBody>,
    pub watch: Arc<EndWatch>,
}

pub struct Conn {
    pub up: Upstream,
    /// Came from the pool (it may have been closed by the instance meanwhile).
    pub reused: bool,
}

/// What the socket still had unacknowledged when the instance closed the connection (`-1`:
/// not closed by the instance). A close (FIN) acknowledges everything the instance's kernel
/// received; bytes still unacknowledged then arrived after the instance closed its socket, so
/// the app never read them.
pub struct EndWatch {
    unacked_at_eof: AtomicI64,
}

impl EndWatch {
    /// Whether the instance closed the connection before it received all that was sent.
    pub fn closed_before_receiving(&self) -> bool {
        self.unacked_at_eof.load(Ordering::Relaxed) > 0
    }
}

/// The instance socket, noting [`EndWatch`] when it reads the end of the stream.
struct Watched {
    stream: TcpStream,
    watch: Arc<EndWatch>,
}

impl hyper::rt::Read for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        mut buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        // SAFETY: as hyper-util's TokioIo: the uninitialised part is only written through
        // tokio's ReadBuf, and the cursor advances by what it filled.
        let n = unsafe {
            let mut tbuf = tokio::io::ReadBuf::uninit(buf.as_mut());
            match tokio::io::AsyncRead::poll_read(Pin::new(&mut self.stream), cx, &mut tbuf) {
                Poll::Ready(Ok(())) => tbuf.filled().len(),
                other => return other,
            }
        };
        if n == 0 {
            let mut queued: libc::c_int = 0;
            // SAFETY: SIOCOUTQ (TIOCOUTQ) on our own socket writes one int.
            if unsafe { libc::ioctl(self.stream.as_raw_fd(), libc::TIOCOUTQ, &mut queued) } == 0 {
                self.watch.unacked_at_eof.store(i64::from(queued), Ordering::Relaxed);
            }
        }
        // SAFETY: `n` bytes were just filled.
        unsafe { buf.advance(n) };
        Poll::Ready(Ok(()))
    }
}

impl hyper::rt::Write for Watched {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        tokio::io::AsyncWrite::poll_write(Pin::new(&mut self.stream), cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        tokio::io::AsyncWrite::poll_flush(Pin::new(&mut self.stream), cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        tokio::io::AsyncWrite::poll_shutdown(Pin::new(&mut self.stream), cx)
    }
    fn is_write_vectored(&self) -> bool {
        tokio::io::AsyncWrite::is_write_vectored(&self.stream)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        tokio::io::AsyncWrite::poll_write_vectored(Pin::new(&mut self.stream), cx, bufs)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connect to {0}: timed out after {1:?}")]
    Timeout(SocketAddr, Duration),
    #[error("connect to {0}: {1}")]
    Io(SocketAddr, std::io::Error),
    #[error("HTTP handshake with {0}: {1}")]
    Handshake(SocketAddr, hyper::Error),
}

/// Idle connections by instance address, each with the time it became idle.
type Idle = HashMap<SocketAddr, Vec<(Instant, Upstream)>>;

#[derive(Default)]
pub struct Pool {
    idle: Mutex<Idle>,
}

impl Pool {
    fn lock(&self) -> std::sync::MutexGuard<'_, Idle> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// An idle connection to `addr` ready for a request, or a new one.
    pub async fn checkout(&self, addr: SocketAddr, connect_timeout: Duration) -> Result<Conn, ConnectError> {
        loop {
            let Some((_, mut up)) = self.lock().get_mut(&addr).and_then(Vec::pop) else { break };
            if up.sender.is_closed() {
                continue;
            }
            if up.sender.is_ready() {
                return Ok(Conn { up, reused: true });
            }
            // Returned a moment before its connection task caught up; it will be ready at once
            // or report that it closed.
            if let Ok(Ok(())) = tokio::time::timeout(Duration::from_millis(50), up.sender.ready()).await {
                return Ok(Conn { up, reused: true });
            }
        }
        let stream = match tokio::time::timeout(connect_timeout, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(ConnectError::Io(addr, e)),
            Err(_) => return Err(ConnectError::Timeout(addr, connect_timeout)),
        };
        let _ = stream.set_nodelay(true);
        let watch = Arc::new(EndWatch { unacked_at_eof: AtomicI64::new(-1) });
        let io = Watched { stream, watch: watch.clone() };
        let (sender, conn) = http1::Builder::new()
            .max_buf_size(1 << 20)
            .handshake(io)
            .await
            .map_err(|e| ConnectError::Handshake(addr, e))?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::trace!("upstream connection to {addr}: {e}");
            }
        });
        Ok(Conn { up: Upstream { sender, watch }, reused: false })
    }

    /// Puts a connection back once its exchange is complete. Its task may not have caught up
    /// yet: it goes back anyway, and the checkout that takes it waits the moment it needs (a
    /// connection that is closing is dropped). With a context, readiness is polled in place.
    pub fn give_back(&self, addr: SocketAddr, mut up: Upstream, cx: Option<&mut Context<'_>>) {
        let state = match cx {
            Some(cx) => up.sender.poll_ready(cx).map(|r| r.is_ok()),
            None if up.sender.is_ready() => Poll::Ready(true),
            None if up.sender.is_closed() => Poll::Ready(false),
            None => Poll::Pending,
        };
        match state {
            Poll::Ready(true) | Poll::Pending => self.put(addr, up),
            Poll::Ready(false) => {}
        }
    }

    fn put(&self, addr: SocketAddr, up: Upstream) {
        let mut idle = self.lock();
        let list = idle.entry(addr).or_default();
        if list.len() < MAX_IDLE {
            list.push((Instant::now(), up));
        }
    }

    /// Closes connections that are closed, too old, or to instances no longer routed to.
    pub fn prune(&self, keep: impl Fn(&SocketAddr) -> bool) {
        let mut idle = self.lock();
        idle.retain(|addr, list| {
            if !keep(addr) {
                return false;
            }
            list.retain(|(since, u)| !u.sender.is_closed() && since.elapsed() < IDLE_TIMEOUT);
            !list.is_empty()
        });
    }
}
