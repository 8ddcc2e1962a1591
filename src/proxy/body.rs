//! Bodies as they pass through the proxy, streamed frame by frame: the request body on its way to
//! an instance (with the app's size limit) and the response body on its way back (with the read
//! timeout, and the upstream connection going back to the pool at its end). A [`Ticket`] rides
//! along and, when the exchange ends (or the client goes away), records metrics and the access
//! log line.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};

use super::access;
use super::h1::Decoder;
use super::pool::{Pool, UpConn, Upstream};
use super::routes::InFlight;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// State one exchange shares between the request body (driven by the upstream connection's
/// task) and the handler.
#[derive(Debug)]
pub struct Exchange {
    pub bytes_in: AtomicU64,
    pub too_large: AtomicBool,
    /// When the request body last made progress (ms since `start`): a slow upload is not a stuck
    /// instance.
    progress_ms: AtomicU64,
    start: Instant,
}

impl Exchange {
    pub fn new(start: Instant) -> Arc<Exchange> {
        Arc::new(Exchange {
            bytes_in: AtomicU64::new(0),
            too_large: AtomicBool::new(false),
            progress_ms: AtomicU64::new(0),
            start,
        })
    }

    /// Time since the request body last moved.
    pub fn idle(&self) -> Duration {
        let last = Duration::from_millis(self.progress_ms.load(Ordering::Relaxed));
        self.start.elapsed().saturating_sub(last)
    }
}

#[derive(Debug, thiserror::Error)]
#[error("request body larger than {0} bytes")]
pub struct TooLarge(pub u64);

#[derive(Debug, thiserror::Error)]
#[error("the instance sent nothing for {0:?}")]
pub struct ReadTimeout(pub Duration);

/// The client's request body, counted and limited.
pub struct RequestBody {
    inner: Option<Incoming>,
    limit: Option<u64>,
    seen: u64,
    exchange: Arc<Exchange>,
}

impl RequestBody {
    pub fn new(inner: Option<Incoming>, limit: Option<u64>, exchange: Arc<Exchange>) -> RequestBody {
        RequestBody { inner, limit, seen: 0, exchange }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let Some(inner) = this.inner.as_mut() else { return Poll::Ready(None) };
        match Pin::new(inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.seen += data.len() as u64;
                    this.exchange.bytes_in.store(this.seen, Ordering::Relaxed);
                    let now = this.exchange.start.elapsed().as_millis() as u64;
                    this.exchange.progress_ms.store(now, Ordering::Relaxed);
                    if let Some(limit) = this.limit.filter(|l| this.seen > *l) {
                        this.exchange.too_large.store(true, Ordering::Relaxed);
                        this.inner = None;
                        return Poll::Ready(Some(Err(Box::new(TooLarge(limit)))));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(Box::new(e)))),
            Poll::Ready(None) => {
                this.inner = None;
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.as_ref().map(|b| b.size_hint()).unwrap_or_else(|| SizeHint::with_exact(0))
    }
}

/// What the access log says about a request; only gathered when the log is on.
#[derive(Debug)]
pub struct AccessInfo {
    pub method: String,
    pub host: String,
    pub path: String,
    pub client: SocketAddr,
    pub request_id: String,
}

/// Accounting for one exchange, settled when it is dropped.
pub struct Ticket {
    start: Instant,
    app: Option<Arc<super::routes::Route>>,
    backend: Option<InFlight>,
    pub status: u16,
    exchange: Option<Arc<Exchange>>,
    bytes_out: u64,
    upstream_ms: Option<u64>,
    access: Option<Box<AccessInfo>>,
}

impl Ticket {
    pub fn new(start: Instant, access: Option<Box<AccessInfo>>) -> Ticket {
        Ticket { start, app: None, backend: None, status: 0, exchange: None, bytes_out: 0, upstream_ms: None, access }
    }

    pub fn set_route(&mut self, route: Arc<super::routes::Route>) {
        self.app = Some(route);
    }

    pub fn set_exchange(&mut self, exchange: Arc<Exchange>) {
        self.exchange = Some(exchange);
    }

    /// The backend that answers; counts as in flight until the ticket is settled.
    pub fn set_backend(&mut self, backend: InFlight) {
        self.backend = Some(backend);
        // Only the access log says when the instance answered (a clock read saved otherwise).
        if self.access.is_some() {
            self.upstream_ms = Some(self.start.elapsed().as_millis() as u64);
        }
    }

    pub fn access_mut(&mut self) -> Option<&mut AccessInfo> {
        self.access.as_deref_mut()
    }

    pub fn add_bytes_out(&mut self, n: u64) {
        self.bytes_out += n;
    }

    pub fn add_bytes_in(&mut self, n: u64) {
        if let Some(e) = &self.exchange {
            e.bytes_in.fetch_add(n, Ordering::Relaxed);
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let elapsed = self.start.elapsed();
        let bytes_in = self.exchange.as_ref().map(|e| e.bytes_in.load(Ordering::Relaxed)).unwrap_or(0);
        if let Some(route) = &self.app {
            route.metrics.record(self.status, elapsed, bytes_in, self.bytes_out);
        }
        if let Some(b) = &self.backend {
            b.backend().metrics.record(self.status, elapsed, bytes_in, self.bytes_out);
        }
        let Some(info) = self.access.take() else { return };
        access::line(|out| {
            use std::io::Write;
            let ts = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
            let _ = write!(out, "{{\"ts\":\"{ts}\",\"app\":");
            match &self.app {
                Some(route) => access::json_str(out, &route.app),
                None => out.extend_from_slice(b"null"),
            }
            out.extend_from_slice(b",\"instance\":");
            match &self.backend {
                Some(b) => access::json_str(out, &b.backend().instance),
                None => out.extend_from_slice(b"null"),
            }
            let _ = write!(out, ",\"client\":\"{}\",\"method\":", info.client.ip());
            access::json_str(out, &info.method);
            out.extend_from_slice(b",\"host\":");
            access::json_str(out, &info.host);
            out.extend_from_slice(b",\"path\":");
            access::json_str(out, &info.path);
            let _ = write!(
                out,
                ",\"status\":{},\"bytes_in\":{bytes_in},\"bytes_out\":{},\"duration_ms\":{:.3}",
                self.status,
                self.bytes_out,
                elapsed.as_secs_f64() * 1000.0
            );
            if let Some(ms) = self.upstream_ms {
                let _ = write!(out, ",\"upstream_after_ms\":{ms}");
            }
            out.extend_from_slice(b",\"request_id\":");
            access::json_str(out, &info.request_id);
            out.push(b'}');
        });
    }
}

/// A response body read by the inline client from its connection, which goes back to the pool
/// (when it may be reused) the moment the body's last byte has been read.
pub struct LeanBody {
    conn: Option<UpConn>,
    decoder: Decoder,
    pool: Option<(Arc<Pool>, SocketAddr)>,
}

impl LeanBody {
    /// `pool`: where the connection goes back at the end; `None` when it may not be reused.
    pub fn new(conn: UpConn, decoder: Decoder, pool: Option<(Arc<Pool>, SocketAddr)>) -> LeanBody {
        let mut body = LeanBody { conn: Some(conn), decoder, pool };
        if body.decoder.is_done() {
            body.finish();
        }
        body
    }

    fn finish(&mut self) {
        if let (Some(conn), Some((pool, addr))) = (self.conn.take(), self.pool.take()) {
            pool.give_back(addr, conn);
        }
    }

    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        loop {
            let Some(conn) = self.conn.as_mut() else { return Poll::Ready(None) };
            match self.decoder.decode(&mut conn.buf) {
                Ok(Some(frame)) => {
                    if self.decoder.is_done() {
                        self.finish();
                    }
                    return Poll::Ready(Some(Ok(frame)));
                }
                Ok(None) if self.decoder.is_done() => {
                    self.finish();
                    return Poll::Ready(None);
                }
                Ok(None) => {}
                Err(e) => {
                    self.conn = None;
                    return Poll::Ready(Some(Err(Box::new(e))));
                }
            }
            // Large bodies are read in large pieces (each becomes one frame, without a copy).
            let want = match self.decoder.remaining() {
                Some(n) => (n as usize).clamp(super::client::READ_CHUNK, 64 << 10),
                None => 32 << 10,
            };
            match conn.poll_fill(cx, want) {
                Poll::Ready(Ok(0)) => {
                    self.conn = None;
                    return match self.decoder.at_eof() {
                        Ok(()) => Poll::Ready(None),
                        Err(e) => Poll::Ready(Some(Err(Box::new(e)))),
                    };
                }
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => {
                    self.conn = None;
                    return Poll::Ready(Some(Err(Box::new(e))));
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self.decoder.remaining() {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}

/// Where a response body comes from: the inline client, or hyper's (after an upgrade request
/// the instance did not accept; the connection is kept until the body's end, then closed).
enum Source {
    Lean(LeanBody),
    Hyper(Incoming, Option<Upstream>),
}

impl Source {
    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self {
            Source::Lean(b) => b.poll_frame(cx),
            Source::Hyper(b, conn) => match Pin::new(b).poll_frame(cx) {
                Poll::Ready(None) => {
                    conn.take();
                    Poll::Ready(None)
                }
                Poll::Ready(Some(r)) => Poll::Ready(Some(r.map_err(|e| Box::new(e) as BoxError))),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Source::Lean(b) => b.decoder.is_done(),
            Source::Hyper(b, _) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Source::Lean(b) => b.size_hint(),
            Source::Hyper(b, _) => b.size_hint(),
        }
    }
}

/// A response body from an instance on its way to the client.
pub struct UpstreamBody {
    inner: Source,
    read_timeout: Duration,
    /// Armed the first time the instance makes us wait.
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    deadline: Option<tokio::time::Instant>,
    ticket: Ticket,
}

pub enum ResponseBody {
    Local(Option<Bytes>, Option<Ticket>),
    Upstream(Box<UpstreamBody>),
}

impl ResponseBody {
    pub fn local(bytes: impl Into<Bytes>, ticket: Option<Ticket>) -> ResponseBody {
        ResponseBody::Local(Some(bytes.into()), ticket)
    }

    pub fn empty() -> ResponseBody {
        ResponseBody::Local(None, None)
    }

    /// A body from hyper's client (the answer to an upgrade request that was not accepted).
    pub fn upstream(
        inner: Incoming,
        read_timeout: Duration,
        deadline: Option<tokio::time::Instant>,
        conn: Upstream,
        ticket: Ticket,
    ) -> ResponseBody {
        let inner = Source::Hyper(inner, Some(conn));
        ResponseBody::Upstream(Box::new(UpstreamBody { inner, read_timeout, timer: None, deadline, ticket }))
    }

    /// A body the inline client reads from its connection.
    pub fn lean(
        inner: LeanBody,
        read_timeout: Duration,
        deadline: Option<tokio::time::Instant>,
        ticket: Ticket,
    ) -> ResponseBody {
        let inner = Source::Lean(inner);
        ResponseBody::Upstream(Box::new(UpstreamBody { inner, read_timeout, timer: None, deadline, ticket }))
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ResponseBody::Local(bytes, ticket) => {
                let frame = bytes.take().map(|b| {
                    if let Some(t) = ticket.as_mut() {
                        t.add_bytes_out(b.len() as u64);
                    }
                    Ok(Frame::data(b))
                });
                if frame.is_none() {
                    ticket.take();
                }
                Poll::Ready(frame)
            }
            ResponseBody::Upstream(up) => up.poll(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ResponseBody::Local(bytes, _) => bytes.is_none(),
            ResponseBody::Upstream(up) => up.inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ResponseBody::Local(Some(b), _) => SizeHint::with_exact(b.len() as u64),
            ResponseBody::Local(None, _) => SizeHint::with_exact(0),
            ResponseBody::Upstream(up) => up.inner.size_hint(),
        }
    }
}

impl UpstreamBody {
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.inner.poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.ticket.add_bytes_out(data.len() as u64);
                }
                if !self.inner.is_end_stream() && self.timer.is_some() {
                    let next = self.next_deadline();
                    if let Some(timer) = self.timer.as_mut() {
                        timer.as_mut().reset(next);
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                if let Some(b) = &self.ticket.backend {
                    b.backend().metrics.upstream_errors.fetch_add(1, Ordering::Relaxed);
                }
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => {
                let deadline = self.next_deadline();
                let timer = self.timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                match timer.as_mut().poll(cx) {
                    Poll::Ready(()) => {
                        // The connection is dropped with the body (never pooled mid-response).
                        tracing::debug!("response body from the instance stalled for {:?}", self.read_timeout);
                        Poll::Ready(Some(Err(Box::new(ReadTimeout(self.read_timeout)))))
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn next_deadline(&self) -> tokio::time::Instant {
        let idle = tokio::time::Instant::now() + self.read_timeout;
        match self.deadline {
            Some(d) if d < idle => d,
            _ => idle,
        }
    }
}
