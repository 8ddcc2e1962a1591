//! Keep-alive connections to instances, one pool per proxy worker thread (so checkout never
//! contends with another core). A connection is taken for one exchange and comes back when the
//! response body has been read to its end; one that the instance closed is dropped on checkout.
//! Requests go out through the inline client (`h1.rs`, [`UpConn`]); upgrades (WebSocket…) use
//! a fresh hyper connection each, never pooled ([`connect_upgrade`]).

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

/// A hyper connection to an instance for an upgrade: where the request goes in, and what its
/// socket saw at its end.
pub struct Upstream {
    pub sender: SendRequest<RequestBody>,
    pub watch: Arc<EndWatch>,
}

/// A connection to an instance for the inline client: the socket, the bytes read from it and not
/// yet consumed, and what it saw at its end.
pub struct UpConn {
    pub stream: TcpStream,
    pub buf: bytes::BytesMut,
    /// Unacknowledged bytes when the instance closed the connection (`-1`: not closed).
    pub unacked_at_eof: i64,
    /// Came from the pool (it may have been closed by the instance meanwhile).
    pub reused: bool,
}

impl UpConn {
    /// Reads more into `buf`; `Ok(0)` at the end of the stream (with [`UpConn::unacked_at_eof`]
    /// noted then).
    pub fn poll_fill(&mut self, cx: &mut Context<'_>, want: usize) -> Poll<std::io::Result<usize>> {
        if self.buf.capacity() - self.buf.len() < want / 2 {
            self.buf.reserve(want);
        }
        let spare = self.buf.spare_capacity_mut();
        let mut rb = tokio::io::ReadBuf::uninit(spare);
        match tokio::io::AsyncRead::poll_read(Pin::new(&mut self.stream), cx, &mut rb) {
            Poll::Ready(Ok(())) => {
                let n = rb.filled().len();
                // SAFETY: `n` bytes of the spare capacity were just initialised by the read.
                unsafe { self.buf.set_len(self.buf.len() + n) };
                if n == 0 {
                    self.unacked_at_eof = unacked(&self.stream).unwrap_or(-1);
                }
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    }

    /// The instance provably never read all that was sent: it closed with our bytes still
    /// unacknowledged.
    pub fn closed_before_receiving(&self) -> bool {
        self.unacked_at_eof > 0
    }

    /// Still usable for another exchange: nothing arrived since the last response (neither the
    /// end of the stream nor stray bytes). No system call unless the socket became readable.
    fn still_open(&mut self) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        let mut probe = [0u8; 1];
        matches!(self.stream.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
    }
}

/// Bytes sent on `stream` and not yet acknowledged by the peer (SIOCOUTQ).
fn unacked(stream: &TcpStream) -> Option<i64> {
    unacked_fd(stream.as_raw_fd())
}

/// [`unacked`] for a socket known by its descriptor (while its stream is split in halves).
pub fn unacked_fd(fd: std::os::fd::RawFd) -> Option<i64> {
    let mut queued: libc::c_int = 0;
    // SAFETY: SIOCOUTQ (TIOCOUTQ) on a socket we own writes one int.
    (unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut queued) } == 0).then_some(i64::from(queued))
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
            if let Some(queued) = unacked(&self.stream) {
                self.watch.unacked_at_eof.store(queued, Ordering::Relaxed);
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

/// Opens a connection to `addr` (Nagle off: a request head goes out at once).
async fn connect(addr: SocketAddr, connect_timeout: Duration) -> Result<TcpStream, ConnectError> {
    let stream = match tokio::time::timeout(connect_timeout, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(ConnectError::Io(addr, e)),
        Err(_) => return Err(ConnectError::Timeout(addr, connect_timeout)),
    };
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// A fresh hyper connection for a request that asks for an upgrade; never pooled.
pub async fn connect_upgrade(addr: SocketAddr, connect_timeout: Duration) -> Result<Upstream, ConnectError> {
    let stream = connect(addr, connect_timeout).await?;
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
    Ok(Upstream { sender, watch })
}

/// Idle connections by instance address, each with the time it became idle.
type Idle = HashMap<SocketAddr, Vec<(Instant, UpConn)>>;

pub struct Pool {
    idle: Mutex<Idle>,
    /// The worker's clock (idle times are coarse: no clock read per request).
    wheel: super::timer::Wheel,
}

impl Pool {
    pub fn new(wheel: super::timer::Wheel) -> Pool {
        Pool { idle: Mutex::default(), wheel }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Idle> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// An idle connection to `addr` ready for a request, or a new one.
    pub async fn checkout(&self, addr: SocketAddr, connect_timeout: Duration) -> Result<UpConn, ConnectError> {
        loop {
            let Some((_, mut conn)) = self.lock().get_mut(&addr).and_then(Vec::pop) else { break };
            if conn.still_open() {
                conn.reused = true;
                return Ok(conn);
            }
        }
        // Boxed: rare (keep-alive), and it would make every request's state larger.
        let stream = Box::pin(connect(addr, connect_timeout)).await?;
        Ok(UpConn { stream, buf: bytes::BytesMut::new(), unacked_at_eof: -1, reused: false })
    }

    /// Puts a connection back once its exchange is complete (the response read to its end).
    pub fn give_back(&self, addr: SocketAddr, conn: UpConn) {
        let mut conn = conn;
        if !conn.buf.is_empty() || conn.unacked_at_eof >= 0 {
            return;
        }
        // The read buffer stays with the connection (allocating one per request costs more),
        // unless a large body made it grow.
        if conn.buf.capacity() > 2 * super::client::READ_CHUNK {
            conn.buf = bytes::BytesMut::new();
        }
        let mut idle = self.lock();
        let list = idle.entry(addr).or_default();
        if list.len() < MAX_IDLE {
            list.push((self.wheel.now(), conn));
        }
    }

    /// Closes connections that are closed, too old, or to instances no longer routed to.
    pub fn prune(&self, keep: impl Fn(&SocketAddr) -> bool) {
        let mut idle = self.lock();
        idle.retain(|addr, list| {
            if !keep(addr) {
                return false;
            }
            list.retain_mut(|(since, c)| since.elapsed() < IDLE_TIMEOUT && c.still_open());
            !list.is_empty()
        });
    }
}
