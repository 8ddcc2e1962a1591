//! Keep-alive connections to instances, one pool per proxy worker thread (so checkout never
//! contends with another core). A connection is taken for one exchange and comes back when the
//! response body has been read to its end; one that the instance closed is dropped on checkout.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::body::RequestBody;

/// Idle connections kept per instance; above that, a finished one is closed.
const MAX_IDLE: usize = 512;
/// An idle connection older than this is closed (instances often time out at 60–75 s).
const IDLE_TIMEOUT: Duration = Duration::from_secs(50);

pub struct Conn {
    pub sender: SendRequest<RequestBody>,
    /// Came from the pool (it may have been closed by the instance meanwhile).
    pub reused: bool,
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
type Idle = HashMap<SocketAddr, Vec<(Instant, SendRequest<RequestBody>)>>;

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
            let Some((_, mut sender)) = self.lock().get_mut(&addr).and_then(Vec::pop) else { break };
            if sender.is_closed() {
                continue;
            }
            if sender.is_ready() {
                return Ok(Conn { sender, reused: true });
            }
            // Returned a moment before its connection task caught up; it will be ready at once
            // or report that it closed.
            if let Ok(Ok(())) = tokio::time::timeout(Duration::from_millis(50), sender.ready()).await {
                return Ok(Conn { sender, reused: true });
            }
        }
        let stream = match tokio::time::timeout(connect_timeout, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(ConnectError::Io(addr, e)),
            Err(_) => return Err(ConnectError::Timeout(addr, connect_timeout)),
        };
        let _ = stream.set_nodelay(true);
        let (sender, conn) = http1::Builder::new()
            .max_buf_size(1 << 20)
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| ConnectError::Handshake(addr, e))?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::trace!("upstream connection to {addr}: {e}");
            }
        });
        Ok(Conn { sender, reused: false })
    }

    /// Puts a connection back once its exchange is complete. Its task may not have caught up
    /// yet: it goes back anyway, and the checkout that takes it waits the moment it needs (a
    /// connection that is closing is dropped). With a context, readiness is polled in place.
    pub fn give_back(&self, addr: SocketAddr, mut sender: SendRequest<RequestBody>, cx: Option<&mut Context<'_>>) {
        let state = match cx {
            Some(cx) => sender.poll_ready(cx).map(|r| r.is_ok()),
            None if sender.is_ready() => Poll::Ready(true),
            None if sender.is_closed() => Poll::Ready(false),
            None => Poll::Pending,
        };
        match state {
            Poll::Ready(true) | Poll::Pending => self.put(addr, sender),
            Poll::Ready(false) => {}
        }
    }

    fn put(&self, addr: SocketAddr, sender: SendRequest<RequestBody>) {
        let mut idle = self.lock();
        let list = idle.entry(addr).or_default();
        if list.len() < MAX_IDLE {
            list.push((Instant::now(), sender));
        }
    }

    /// Closes connections that are closed, too old, or to instances no longer routed to.
    pub fn prune(&self, keep: impl Fn(&SocketAddr) -> bool) {
        let mut idle = self.lock();
        idle.retain(|addr, list| {
            if !keep(addr) {
                return false;
            }
            list.retain(|(since, s)| !s.is_closed() && since.elapsed() < IDLE_TIMEOUT);
            !list.is_empty()
        });
    }
}
