//! One request through the proxy: route it, rewrite the headers a reverse proxy owns, send it to
//! an instance (retrying elsewhere when that is safe), and stream the answer back. Upgrades
//! (WebSocket and any other protocol) become a byte tunnel between client and instance.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use hyper::body::{Body, Incoming};
use hyper::header::{HeaderMap, HeaderName, HeaderValue, CONNECTION, CONTENT_LENGTH, HOST, UPGRADE};
use hyper::{Method, Request, Response, StatusCode, Uri, Version};
use hyper_util::rt::TokioIo;

use super::body::{AccessInfo, Exchange, LeanBody, RequestBody, ResponseBody, Ticket};
use super::client::{self, OutBody, Outgoing, Sent};
use super::h1::{self, RequestFraming};
use super::pool::{connect_upgrade, Pool, UpConn, Upstream};
use super::routes::RouteTable;
use super::{access, normalize_host};

/// What the proxy knows about the client connection a request came on.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// The real client: the TCP peer, or what a trusted PROXY protocol header said.
    pub client: SocketAddr,
    /// The TCP peer is a trusted proxy: its `X-Forwarded-*` / `Forwarded` headers are kept.
    pub trusted: bool,
    pub https: bool,
    /// The client's IP address as text, formatted once per connection (each request's
    /// forwarding headers carry it).
    client_ip: HeaderValue,
}

impl ConnInfo {
    pub fn new(client: SocketAddr, trusted: bool, https: bool) -> ConnInfo {
        let client_ip = HeaderValue::from_maybe_shared(bytes::Bytes::from(client.ip().to_string()))
            .unwrap_or_else(|_| HeaderValue::from_static("unknown"));
        ConnInfo { client, trusted, https, client_ip }
    }
}

/// Headers that describe one hop, not the message (RFC 9110 §7.6.1).
const HOP_BY_HOP: [HeaderName; 6] = [
    CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    hyper::header::TE,
    hyper::header::TRANSFER_ENCODING,
    UPGRADE,
];

const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const FORWARDED: HeaderName = hyper::header::FORWARDED;

/// Removes hop-by-hop headers, and those the `Connection` header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One pass over the few headers a request has, instead of a hashed lookup per hop-by-hop
    // name: most requests have none, or only `Connection`.
    if !headers.keys().any(|name| HOP_BY_HOP.contains(name)) {
        return;
    }
    if headers.contains_key(CONNECTION) {
        let named: Vec<HeaderName> = headers
            .get_all(CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
}

/// The client asks to switch protocols (WebSocket, h2c upgrade, …) on an HTTP/1.1 connection.
fn upgrade_requested(req: &Request<Incoming>) -> Option<HeaderValue> {
    if req.version() != Version::HTTP_11 {
        return None;
    }
    let connection_says = req
        .headers()
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    connection_says.then(|| req.headers().get(UPGRADE).cloned()).flatten()
}

fn client_wants_trailers(headers: &HeaderMap) -> bool {
    headers
        .get_all(hyper::header::TE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().split(';').next().is_some_and(|t| t.trim().eq_ignore_ascii_case("trailers")))
}

/// Request bodies up to this size are read in full before they are sent to an instance.
const BUFFERED_BODY: u64 = 64 << 10;

/// Whether a failed exchange ended with a reset (or a write into a reset connection) from the
/// instance. A socket closed with unread data sends a reset, so the app had not read all of the
/// request; a clean close (EOF) instead may come after the app acted on it.
fn reset_unread(e: &hyper::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            return matches!(io.kind(), std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe);
        }
        source = s.source();
    }
    false
}

/// Methods a client may send twice without changing the outcome (RFC 9110 §9.2.2).
fn idempotent(m: &Method) -> bool {
    matches!(*m, Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE)
}

pub struct Forwarder {
    pub table: Arc<RouteTable>,
    pub pool: Arc<Pool>,
    /// The worker's timer, for timeouts that almost never fire.
    pub wheel: super::timer::Wheel,
}

fn local(status: StatusCode, msg: String, ticket: Option<Ticket>) -> Response<ResponseBody> {
    let mut ticket = ticket;
    if let Some(t) = ticket.as_mut() {
        t.status = status.as_u16();
    }
    let mut resp = Response::new(ResponseBody::local(msg, ticket));
    *resp.status_mut() = status;
    resp.headers_mut().insert(hyper::header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    resp
}

/// 16 random bytes in hex: unique enough to follow one request through every log.
fn new_request_id() -> HeaderValue {
    let n: u128 = rand::random();
    let mut s = [0u8; 32];
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for (i, b) in s.iter_mut().enumerate() {
        *b = HEX[((n >> (4 * (31 - i))) & 0xf) as usize];
    }
    HeaderValue::from_bytes(&s).unwrap_or_else(|_| HeaderValue::from_static("0"))
}

/// An incoming id is kept when it is short and printable.
fn acceptable_request_id(v: &HeaderValue) -> bool {
    !v.is_empty() && v.len() <= 200 && v.as_bytes().iter().all(|b| b.is_ascii_graphic())
}

/// A trusted peer's own forwarding header `name` (nobody else's is even looked up).
fn previous<'a>(headers: &'a HeaderMap, name: &HeaderName, trusted: bool) -> Option<&'a str> {
    if !trusted {
        return None;
    }
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// Sets `X-Forwarded-*`, `Forwarded` and `X-Request-Id`. A trusted peer's forwarding headers are
/// extended; anyone else's are replaced (a client must not choose the IP the app sees). `host`:
/// the request's `Host`. Allocates little: these headers are built for every request.
fn add_forwarding(headers: &mut HeaderMap, info: &ConnInfo, host: &HeaderValue) -> HeaderValue {
    let proto = if info.https { "https" } else { "http" };
    let ip = info.client_ip.as_bytes();
    match previous(headers, &X_FORWARDED_FOR, info.trusted) {
        Some(prev) => {
            let mut xff = Vec::with_capacity(prev.len() + 2 + ip.len());
            xff.extend_from_slice(prev.as_bytes());
            xff.extend_from_slice(b", ");
            xff.extend_from_slice(ip);
            if let Ok(v) = HeaderValue::from_maybe_shared(bytes::Bytes::from(xff)) {
                headers.insert(X_FORWARDED_FOR, v);
            }
        }
        None => {
            headers.insert(X_FORWARDED_FOR, info.client_ip.clone());
        }
    }
    if !(info.trusted && headers.contains_key(X_FORWARDED_PROTO)) {
        headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(proto));
    }
    if !(info.trusted && headers.contains_key(X_FORWARDED_HOST)) {
        headers.insert(X_FORWARDED_HOST, host.clone());
    }
    // for=<ip>;host=<host>;proto=<proto>: IPv6 in quotes and brackets, a host that is not a
    // token quoted (RFC 7239 §4, §6).
    let host = host.as_bytes();
    let token = host.iter().all(|b| b.is_ascii_alphanumeric() || b".-".contains(b));
    let prev = previous(headers, &FORWARDED, info.trusted);
    let mut forwarded = Vec::with_capacity(prev.map_or(0, |p| p.len() + 2) + 30 + ip.len() + host.len());
    if let Some(prev) = prev {
        forwarded.extend_from_slice(prev.as_bytes());
        forwarded.extend_from_slice(b", ");
    }
    forwarded.extend_from_slice(b"for=");
    if info.client.ip().is_ipv6() {
        forwarded.extend_from_slice(b"\"[");
        forwarded.extend_from_slice(ip);
        forwarded.extend_from_slice(b"]\"");
    } else {
        forwarded.extend_from_slice(ip);
    }
    forwarded.extend_from_slice(b";host=");
    if token {
        forwarded.extend_from_slice(host);
    } else {
        forwarded.push(b'"');
        forwarded.extend(host.iter().filter(|b| **b != b'"'));
        forwarded.push(b'"');
    }
    forwarded.extend_from_slice(b";proto=");
    forwarded.extend_from_slice(proto.as_bytes());
    if let Ok(v) = HeaderValue::from_maybe_shared(bytes::Bytes::from(forwarded)) {
        headers.insert(FORWARDED, v);
    }
    match headers.get(X_REQUEST_ID).filter(|v| acceptable_request_id(v)) {
        Some(v) => v.clone(),
        None => {
            let id = new_request_id();
            headers.insert(X_REQUEST_ID, id.clone());
            id
        }
    }
}

/// A request on its way: through the inline client, or (upgrades) through hyper's.
enum Pending {
    Plain(Outgoing),
    Upgrade(Request<RequestBody>),
}

/// How one attempt to send the request ended.
enum Attempt {
    /// The response head, whether the whole request went out, and the connection.
    Answered(h1::Head, bool, UpConn),
    Upgraded(Response<Incoming>, Upstream),
    /// Nothing reached the instance: the request comes back untouched.
    NotSent(Option<Pending>),
    /// The request was (maybe partly) sent, then the exchange failed; `true` when the instance
    /// reset the connection before answering anything (its kernel had unread data: the app
    /// never read the whole request).
    Failed(String, bool),
    TimedOut,
}

impl Forwarder {
    pub async fn handle(&self, mut req: Request<Incoming>, info: &ConnInfo) -> Response<ResponseBody> {
        let start = Instant::now();
        // A clone of the header's value shares its bytes (nothing copied).
        let host_value = match req.headers().get(HOST).filter(|h| h.to_str().is_ok()) {
            Some(h) => h.clone(),
            None => match req.uri().authority().and_then(|a| HeaderValue::from_str(a.as_str()).ok()) {
                Some(a) => a,
                None => return local(StatusCode::BAD_REQUEST, "request has no Host header\n".into(), None),
            },
        };
        let raw_host = host_value.to_str().unwrap_or_default();
        let host = normalize_host(raw_host);
        let access_info = access::enabled().then(|| {
            Box::new(AccessInfo {
                method: req.method().to_string(),
                host: host.to_string(),
                path: req.uri().path_and_query().map(|p| p.as_str()).unwrap_or("/").to_string(),
                client: info.client,
                request_id: String::new(),
            })
        });
        let mut ticket = Ticket::new(start, access_info);
        let table = self.table.load();
        let Some(matched) = table.lookup(&host, req.uri().path()) else {
            return local(StatusCode::NOT_FOUND, format!("no app is served at {host}\n"), Some(ticket));
        };
        let route = matched.route.clone();
        let prefix = matched.prefix.trim_end_matches('/').to_string();
        drop(table);
        ticket.set_route(route.clone());
        if route.backends.is_empty() {
            let msg = format!("app {} has no running instance\n", route.app);
            return local(StatusCode::SERVICE_UNAVAILABLE, msg, Some(ticket));
        }
        let opts = &route.options;
        let declared_len: Option<u64> =
            req.headers().get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse().ok());
        if let (Some(limit), Some(len)) = (opts.max_body, declared_len) {
            if len > limit {
                let msg = format!("request body of {len} bytes is larger than app {}'s limit of {limit}\n", route.app);
                return local(StatusCode::PAYLOAD_TOO_LARGE, msg, Some(ticket));
            }
        }
        let upgrade = upgrade_requested(&req);
        let client_upgrade = upgrade.as_ref().map(|_| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();
        let wants_trailers = client_wants_trailers(&parts.headers);
        strip_hop_by_hop(&mut parts.headers);
        parts.headers.remove(hyper::header::EXPECT);
        if let Some(proto) = &upgrade {
            parts.headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
            parts.headers.insert(UPGRADE, proto.clone());
        }
        if wants_trailers {
            parts.headers.insert(hyper::header::TE, HeaderValue::from_static("trailers"));
        }
        if !parts.headers.contains_key(HOST) {
            parts.headers.insert(HOST, host_value.clone());
        }
        let request_id = add_forwarding(&mut parts.headers, info, &host_value);
        if let Some(a) = ticket.access_mut() {
            a.request_id = request_id.to_str().unwrap_or("").to_string();
        }
        // Origin form for the instance: the client's own when it sent one (HTTP/1.1), the
        // path of an absolute one (HTTP/2), without the prefix when the app strips it.
        let path_and_query = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
        let uri: Result<Uri, _> = if opts.strip_prefix && !prefix.is_empty() {
            let rest = &path_and_query[prefix.len().min(path_and_query.len())..];
            if rest.starts_with('/') {
                rest.parse()
            } else {
                format!("/{rest}").parse()
            }
        } else if parts.uri.scheme().is_none() && parts.uri.authority().is_none() {
            Ok(parts.uri.clone())
        } else {
            path_and_query.parse()
        };
        let Ok(uri) = uri else {
            return local(StatusCode::BAD_REQUEST, "invalid request target\n".into(), Some(ticket));
        };
        let exchange = Exchange::new(start);
        ticket.set_exchange(exchange.clone());
        let bodiless = body.is_end_stream() || declared_len == Some(0);
        // A small body is read in full first (as nginx buffers request bodies), so that the
        // request can be sent again if its instance dies before reading it.
        let mut body = Some(body);
        let mut buffered: Option<bytes::Bytes> = None;
        let small = !bodiless && upgrade.is_none() && declared_len.is_some_and(|n| n <= BUFFERED_BODY);
        if let Some(incoming) = body.take_if(|_| small) {
            let read =
                Box::pin(tokio::time::timeout(opts.read_timeout(), http_body_util::BodyExt::collect(incoming))).await;
            match read {
                Ok(Ok(collected)) => buffered = Some(collected.to_bytes()),
                Ok(Err(e)) => {
                    return local(StatusCode::BAD_REQUEST, format!("cannot read the request body: {e}\n"), Some(ticket))
                }
                Err(_) => {
                    return local(
                        StatusCode::REQUEST_TIMEOUT,
                        "the request body did not arrive in time\n".into(),
                        Some(ticket),
                    )
                }
            }
        }
        // A client that sends an Idempotency-Key (draft-ietf-httpapi-idempotency-key-header)
        // says the request may be sent twice.
        let retry_safe =
            idempotent(&parts.method) || parts.headers.contains_key("idempotency-key") || opts.retry_non_idempotent;
        // A request can be sent again after a failure when it has no body or a buffered one;
        // otherwise only while nothing of it was sent. Upgrades go through hyper's client (the
        // connection becomes a tunnel); everything else through the inline client.
        let mut pending = Some(match &upgrade {
            Some(_) => {
                let streamed = if bodiless { None } else { body };
                let body = RequestBody::new(streamed, opts.max_body, exchange.clone());
                let mut r = Request::new(body);
                *r.method_mut() = parts.method.clone();
                *r.uri_mut() = uri;
                *r.version_mut() = Version::HTTP_11;
                *r.headers_mut() = std::mem::take(&mut parts.headers);
                Pending::Upgrade(r)
            }
            None => {
                let framing = match (&buffered, bodiless, declared_len) {
                    (Some(b), _, _) => RequestFraming::Length(b.len() as u64),
                    (None, true, Some(_)) => RequestFraming::Length(0),
                    (None, true, None) if matches!(parts.method, Method::POST | Method::PUT | Method::PATCH) => {
                        RequestFraming::Length(0)
                    }
                    (None, true, None) => RequestFraming::None,
                    (None, false, Some(n)) => RequestFraming::Length(n),
                    (None, false, None) => RequestFraming::Chunked,
                };
                let mut head = Vec::new();
                h1::encode_head(&parts.method, &uri, &parts.headers, framing, &mut head);
                let out_body = match (buffered, bodiless, body) {
                    (Some(full), _, _) => {
                        exchange.bytes_in.store(full.len() as u64, Ordering::Relaxed);
                        OutBody::Full(full)
                    }
                    (None, false, Some(incoming)) => OutBody::Stream {
                        body: RequestBody::new(Some(incoming), opts.max_body, exchange.clone()),
                        chunked: framing == RequestFraming::Chunked,
                    },
                    _ => OutBody::None,
                };
                Pending::Plain(Outgoing {
                    head: head.into(),
                    body: out_body,
                    head_request: parts.method == Method::HEAD,
                })
            }
        });
        let template = match &pending {
            Some(Pending::Plain(out)) => out.replica(),
            _ => None,
        };
        let deadline = opts.total_timeout().map(|t| tokio::time::Instant::now() + t);
        let mut tried: Vec<usize> = Vec::new();
        let mut last_error = String::from("no instance could be tried");
        let mut timed_out = false;
        let mut replayed = false;
        let attempts = 1 + opts.retries as usize;
        while tried.len() < attempts {
            let Some(req) =
                pending.take().or_else(|| template.as_ref().and_then(Outgoing::replica).map(Pending::Plain))
            else {
                break;
            };
            let Some(idx) = route.pick(&tried) else { break };
            tried.push(idx);
            if tried.len() > 1 {
                route.metrics.retries.fetch_add(1, Ordering::Relaxed);
            }
            let backend = route.backends[idx].clone();
            let in_flight = backend.enter();
            let attempt = match req {
                Pending::Plain(out) => self.attempt(&backend.addr, out, opts, &exchange, deadline).await,
                Pending::Upgrade(req) => {
                    Box::pin(self.attempt_upgrade(&backend.addr, req, opts, &exchange, deadline)).await
                }
            };
            match attempt {
                Attempt::Answered(head, complete, conn) => {
                    ticket.set_backend(in_flight);
                    return self.respond(head, complete, conn, backend.addr, ticket, request_id, opts, deadline);
                }
                Attempt::Upgraded(resp, sender) => {
                    ticket.set_backend(in_flight);
                    return self.respond_upgrade(resp, sender, ticket, client_upgrade, request_id, opts, deadline);
                }
                Attempt::NotSent(back) => {
                    backend.metrics.upstream_errors.fetch_add(1, Ordering::Relaxed);
                    backend.eject();
                    last_error = format!("{} ({}): could not connect", backend.instance, backend.addr);
                    pending = back;
                }
                Attempt::Failed(e, unread) => {
                    backend.metrics.upstream_errors.fetch_add(1, Ordering::Relaxed);
                    last_error = format!("{} ({}): {e}", backend.instance, backend.addr);
                    if exchange.too_large.load(Ordering::Relaxed) {
                        let limit = opts.max_body.unwrap_or(0);
                        let msg = format!("request body is larger than app {}'s limit of {limit} bytes\n", route.app);
                        return local(StatusCode::PAYLOAD_TOO_LARGE, msg, Some(ticket));
                    }
                    backend.eject();
                    // Replayed once at most: a request that itself kills instances (a memory
                    // bomb) must not take down every one.
                    // Any other request only when the instance never read all of it (it reset the
                    // connection, or closed it before receiving everything): it did nothing.
                    if template.is_none() || replayed || !(retry_safe || unread) {
                        break;
                    }
                    replayed = true;
                }
                Attempt::TimedOut => {
                    backend.metrics.upstream_errors.fetch_add(1, Ordering::Relaxed);
                    last_error = format!("{} ({}): no response in time", backend.instance, backend.addr);
                    timed_out = true;
                    break;
                }
            }
        }
        tracing::warn!(app = %route.app, "{}: {last_error}", if timed_out { "gateway timeout" } else { "bad gateway" });
        if timed_out {
            local(StatusCode::GATEWAY_TIMEOUT, format!("app {} did not answer in time\n", route.app), Some(ticket))
        } else {
            local(StatusCode::BAD_GATEWAY, format!("app {} did not answer\n", route.app), Some(ticket))
        }
    }

    /// Sends `out` to `addr` over a pooled or new connection and waits for the response head.
    async fn attempt(
        &self,
        addr: &SocketAddr,
        out: Outgoing,
        opts: &super::routes::RouteOptions,
        exchange: &Exchange,
        deadline: Option<tokio::time::Instant>,
    ) -> Attempt {
        let mut out = out;
        // A reused connection may turn out closed: then the request goes out again on a fresh
        // one (a bounded number of times), when the instance provably did not read it.
        for _ in 0..3 {
            let mut conn = match self.pool.checkout(*addr, opts.connect_timeout()).await {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!("{e}");
                    return Attempt::NotSent(Some(Pending::Plain(out)));
                }
            };
            match client::send(&mut conn, &mut out, exchange, opts.read_timeout(), deadline, &self.wheel).await {
                Sent::Head(head, complete) => return Attempt::Answered(head, complete, conn),
                Sent::TimedOut => return Attempt::TimedOut,
                Sent::Failed(f) if conn.reused && f.unread && f.intact => {
                    tracing::debug!("pooled connection to {addr} was closed: {}", f.error);
                }
                Sent::Failed(f) => return Attempt::Failed(f.error, f.unread),
            }
        }
        Attempt::NotSent(Some(Pending::Plain(out)))
    }

    /// Sends an upgrade request over a fresh hyper connection and waits for the response head.
    async fn attempt_upgrade(
        &self,
        addr: &SocketAddr,
        req: Request<RequestBody>,
        opts: &super::routes::RouteOptions,
        exchange: &Exchange,
        deadline: Option<tokio::time::Instant>,
    ) -> Attempt {
        let Upstream { mut sender, watch } = match connect_upgrade(*addr, opts.connect_timeout()).await {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!("{e}");
                return Attempt::NotSent(Some(Pending::Upgrade(req)));
            }
        };
        let send = sender.try_send_request(req);
        tokio::pin!(send);
        let read_timeout = opts.read_timeout();
        let result = loop {
            let mut wait = read_timeout;
            if let Some(d) = deadline {
                wait = wait.min(d.saturating_duration_since(tokio::time::Instant::now()));
            }
            match tokio::time::timeout(wait, &mut send).await {
                Ok(r) => break Some(r),
                // Still uploading: the clock runs from the body's last progress.
                Err(_)
                    if exchange.idle() < read_timeout && deadline.is_none_or(|d| tokio::time::Instant::now() < d) => {}
                Err(_) => break None,
            }
        };
        match result {
            None => Attempt::TimedOut,
            Some(Ok(resp)) => Attempt::Upgraded(resp, Upstream { sender, watch }),
            Some(Err(mut e)) => match e.take_message() {
                Some(back) => Attempt::NotSent(Some(Pending::Upgrade(back))),
                None => {
                    let unread = reset_unread(e.error()) || watch.closed_before_receiving();
                    Attempt::Failed(e.error().to_string(), unread)
                }
            },
        }
    }

    /// The instance's answer on its way to the client; the connection goes back to the pool as
    /// soon as the body has been read (at once when it came with the head).
    #[allow(clippy::too_many_arguments)]
    fn respond(
        &self,
        head: h1::Head,
        complete: bool,
        conn: UpConn,
        addr: SocketAddr,
        mut ticket: Ticket,
        request_id: HeaderValue,
        opts: &super::routes::RouteOptions,
        deadline: Option<tokio::time::Instant>,
    ) -> Response<ResponseBody> {
        let mut conn = conn;
        ticket.status = head.status.as_u16();
        let reusable = head.keep_alive && complete;
        let mut resp = Response::new(());
        *resp.status_mut() = head.status;
        *resp.headers_mut() = head.headers;
        let (mut parts, ()) = resp.into_parts();
        for name in head.hop_named {
            parts.headers.remove(name);
        }
        parts.headers.entry(X_REQUEST_ID).or_insert(request_id);
        let mut decoder = head.body;
        // The whole body came with the head (most small answers): no body state to keep.
        let whole = decoder.remaining().is_some_and(|n| n as usize <= conn.buf.len());
        if whole {
            let data = match decoder.decode(&mut conn.buf) {
                Ok(Some(frame)) => frame.into_data().ok(),
                _ => None,
            };
            if reusable && decoder.is_done() {
                self.pool.give_back(addr, conn);
            }
            return Response::from_parts(parts, ResponseBody::Local(data, Some(ticket)));
        }
        let body = ResponseBody::lean(
            LeanBody::new(conn, decoder, reusable.then(|| (self.pool.clone(), addr))),
            opts.read_timeout(),
            deadline,
            ticket,
        );
        Response::from_parts(parts, body)
    }

    /// The answer to an upgrade request: a tunnel when the instance switched protocols, else
    /// an ordinary response over the (unpooled) hyper connection.
    #[allow(clippy::too_many_arguments)]
    fn respond_upgrade(
        &self,
        resp: Response<Incoming>,
        sender: Upstream,
        mut ticket: Ticket,
        client_upgrade: Option<hyper::upgrade::OnUpgrade>,
        request_id: HeaderValue,
        opts: &super::routes::RouteOptions,
        deadline: Option<tokio::time::Instant>,
    ) -> Response<ResponseBody> {
        let mut resp = resp;
        ticket.status = resp.status().as_u16();
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            if let Some(client_side) = client_upgrade {
                let upstream_side = hyper::upgrade::on(&mut resp);
                let (mut parts, _) = resp.into_parts();
                let proto = parts.headers.get(UPGRADE).cloned();
                strip_hop_by_hop(&mut parts.headers);
                if let Some(p) = proto {
                    parts.headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
                    parts.headers.insert(UPGRADE, p);
                }
                tokio::spawn(tunnel(client_side, upstream_side, ticket));
                return Response::from_parts(parts, ResponseBody::empty());
            }
        }
        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        parts.headers.entry(X_REQUEST_ID).or_insert(request_id);
        let body = ResponseBody::upstream(body, opts.read_timeout(), deadline, sender, ticket);
        Response::from_parts(parts, body)
    }
}

/// Copies bytes both ways between an upgraded client connection and the instance.
async fn tunnel(client: hyper::upgrade::OnUpgrade, upstream: hyper::upgrade::OnUpgrade, mut ticket: Ticket) {
    let (client, upstream) = match tokio::try_join!(client, upstream) {
        Ok(pair) => pair,
        Err(e) => {
            tracing::debug!("upgrade failed: {e}");
            return;
        }
    };
    let mut client = TokioIo::new(client);
    let mut upstream = TokioIo::new(upstream);
    match tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        Ok((to_upstream, to_client)) => {
            ticket.add_bytes_in(to_upstream);
            ticket.add_bytes_out(to_client);
        }
        Err(e) => tracing::debug!("upgraded connection: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("keep-alive, x-secret"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("te", HeaderValue::from_static("trailers"));
        h.insert("trailer", HeaderValue::from_static("x-checksum"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 2);
        assert!(h.contains_key("x-kept"));
        assert!(h.contains_key("trailer"));
    }

    fn info(ip: [u8; 4], trusted: bool) -> ConnInfo {
        ConnInfo::new(SocketAddr::from((ip, 5555)), trusted, false)
    }

    #[test]
    fn untrusted_forwarding_headers_are_replaced() {
        let mut h = HeaderMap::new();
        h.insert(X_FORWARDED_FOR, HeaderValue::from_static("6.6.6.6"));
        h.insert(X_FORWARDED_PROTO, HeaderValue::from_static("https"));
        h.insert(FORWARDED, HeaderValue::from_static("for=6.6.6.6"));
        add_forwarding(&mut h, &info([192, 0, 2, 7], false), &HeaderValue::from_static("web.example.com"));
        assert_eq!(h[X_FORWARDED_FOR], "192.0.2.7");
        assert_eq!(h[X_FORWARDED_PROTO], "http");
        assert_eq!(h[X_FORWARDED_HOST], "web.example.com");
        assert_eq!(h[FORWARDED], "for=192.0.2.7;host=web.example.com;proto=http");
        assert_eq!(h[X_REQUEST_ID].len(), 32);
    }

    #[test]
    fn trusted_forwarding_headers_are_extended() {
        let mut h = HeaderMap::new();
        h.insert(X_FORWARDED_FOR, HeaderValue::from_static("198.51.100.1"));
        h.insert(X_FORWARDED_PROTO, HeaderValue::from_static("https"));
        h.insert(FORWARDED, HeaderValue::from_static("for=198.51.100.1"));
        h.insert(X_REQUEST_ID, HeaderValue::from_static("abc-123"));
        let id = add_forwarding(&mut h, &info([10, 0, 0, 2], true), &HeaderValue::from_static("web.example.com:8080"));
        assert_eq!(h[X_FORWARDED_FOR], "198.51.100.1, 10.0.0.2");
        assert_eq!(h[X_FORWARDED_PROTO], "https");
        assert_eq!(h[FORWARDED], "for=198.51.100.1, for=10.0.0.2;host=\"web.example.com:8080\";proto=http");
        assert_eq!(id, "abc-123");
    }

    #[test]
    fn ipv6_clients_are_quoted_in_forwarded() {
        let mut h = HeaderMap::new();
        let v6 = ConnInfo::new("[2001:db8::1]:443".parse().expect("addr"), false, true);
        add_forwarding(&mut h, &v6, &HeaderValue::from_static("Web\"x"));
        assert_eq!(h[X_FORWARDED_FOR], "2001:db8::1");
        assert_eq!(h[FORWARDED], "for=\"[2001:db8::1]\";host=\"Webx\";proto=https");
    }
}
