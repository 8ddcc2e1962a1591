//! The reverse proxy: routes each request by `Host` to one of the app's ready instances,
//! round-robin, streaming bodies both ways. It reads only the route table, which the supervisor
//! rebuilds off the hot path and swaps atomically.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderMap, HeaderName, HeaderValue, HOST};
use hyper::{Request, Response, StatusCode, Uri};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

type ProxyBody = BoxBody<Bytes, hyper::Error>;

/// One app's place in the route table.
#[derive(Debug)]
pub struct Route {
    pub app: String,
    pub backends: Vec<SocketAddr>,
    next: AtomicUsize,
}

impl Route {
    pub fn new(app: String, backends: Vec<SocketAddr>) -> Route {
        Route { app, backends, next: AtomicUsize::new(0) }
    }

    /// Backends in the order to try them: round-robin start, then the others.
    fn order(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        let n = self.backends.len();
        let start = if n == 0 { 0 } else { self.next.fetch_add(1, Ordering::Relaxed) % n };
        (0..n).map(move |i| self.backends[(start + i) % n])
    }
}

/// Host name → route. Rebuilt whole and swapped; readers never wait.
#[derive(Default)]
pub struct RouteTable {
    routes: ArcSwap<HashMap<String, Arc<Route>>>,
}

impl RouteTable {
    pub fn publish(&self, routes: HashMap<String, Arc<Route>>) {
        self.routes.store(Arc::new(routes));
    }

    pub fn lookup(&self, host: &str) -> Option<Arc<Route>> {
        self.routes.load().get(host).cloned()
    }
}

/// `Web.Example.com:8080.` → `web.example.com`.
pub fn normalize_host(raw: &str) -> String {
    let host = if raw.starts_with('[') {
        raw.split(']').next().map(|h| format!("{h}]")).unwrap_or_default()
    } else {
        raw.rsplit_once(':')
            .filter(|(_, p)| p.chars().all(|c| c.is_ascii_digit()))
            .map(|(h, _)| h)
            .unwrap_or(raw)
            .to_string()
    };
    host.trim_end_matches('.').to_ascii_lowercase()
}

/// Headers that describe one hop, not the message (RFC 9110 §7.6.1).
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "upgrade",
];

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(hyper::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
    headers.remove(hyper::header::TRANSFER_ENCODING);
}

pub struct Proxy {
    table: Arc<RouteTable>,
    client: Client<HttpConnector, ProxyBody>,
}

impl Proxy {
    pub fn new(table: Arc<RouteTable>) -> Arc<Proxy> {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(5)));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(128)
            .build(connector);
        Arc::new(Proxy { table, client })
    }

    /// Accepts connections until the listener fails; each is served on its own task.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(conn) => conn,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!("proxy accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let proxy = self.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let proxy = proxy.clone();
                    async move { Ok::<_, Infallible>(proxy.handle(req, peer).await) }
                });
                let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                if let Err(e) = builder.serve_connection(TokioIo::new(stream), service).await {
                    tracing::debug!("proxy connection from {peer}: {e}");
                }
            });
        }
    }

    async fn handle(&self, req: Request<Incoming>, peer: SocketAddr) -> Response<ProxyBody> {
        let raw_host = req
            .headers()
            .get(HOST)
            .and_then(|h| h.to_str().ok())
            .map(str::to_string)
            .or_else(|| req.uri().authority().map(|a| a.to_string()));
        let Some(raw_host) = raw_host else {
            return text(StatusCode::BAD_REQUEST, "request has no Host header\n");
        };
        let host = normalize_host(&raw_host);
        tracing::trace!(%host, path = %req.uri(), "request");
        let Some(route) = self.table.lookup(&host) else {
            return text(StatusCode::NOT_FOUND, &format!("no app is served at {host}\n"));
        };
        if route.backends.is_empty() {
            return text(StatusCode::SERVICE_UNAVAILABLE, &format!("app {} has no running instance\n", route.app));
        }
        let (mut parts, body) = req.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        add_forwarded(&mut parts.headers, peer, &raw_host);
        let path = parts.uri.path_and_query().map(|p| p.as_str().to_string()).unwrap_or_else(|| "/".into());
        // A request without a body can be sent again to another instance if the first one
        // refused the connection: nothing reached the app.
        let bodiless = body_is_empty(&parts.headers, &body);
        let mut body = Some(body.boxed());
        let mut last_error = String::new();
        for backend in route.order().take(3) {
            let uri: Uri = match format!("http://{backend}{path}").parse() {
                Ok(u) => u,
                Err(_) => return text(StatusCode::BAD_REQUEST, "invalid request target\n"),
            };
            let mut upstream =
                Request::builder().method(parts.method.clone()).uri(uri).version(hyper::Version::HTTP_11);
            if let Some(h) = upstream.headers_mut() {
                *h = parts.headers.clone();
                h.insert(
                    HOST,
                    HeaderValue::from_str(&raw_host).unwrap_or_else(|_| HeaderValue::from_static("localhost")),
                );
            }
            let b = match body.take() {
                Some(b) => b,
                None => Full::new(Bytes::new()).map_err(|never| match never {}).boxed(),
            };
            let upstream = match upstream.body(b) {
                Ok(r) => r,
                Err(_) => return text(StatusCode::BAD_REQUEST, "invalid request\n"),
            };
            tracing::trace!(%backend, "forwarding");
            match self.client.request(upstream).await {
                Ok(resp) => {
                    let (mut rparts, rbody) = resp.into_parts();
                    strip_hop_by_hop(&mut rparts.headers);
                    return Response::from_parts(rparts, rbody.boxed());
                }
                Err(e) => {
                    last_error = format!("{backend}: {e}");
                    let retryable = e.is_connect() && bodiless;
                    tracing::debug!(app = %route.app, %backend, "upstream error: {e:?}");
                    if !retryable {
                        break;
                    }
                }
            }
        }
        tracing::warn!(app = %route.app, "bad gateway: {last_error}");
        text(StatusCode::BAD_GATEWAY, &format!("app {} did not answer\n", route.app))
    }
}

fn body_is_empty(headers: &HeaderMap, body: &Incoming) -> bool {
    use hyper::body::Body;
    let declared_zero = headers.get(hyper::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()) == Some("0");
    body.is_end_stream() || declared_zero
}

fn add_forwarded(headers: &mut HeaderMap, peer: SocketAddr, host: &str) {
    let client = peer.ip().to_string();
    let xff = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(prev) => format!("{prev}, {client}"),
        None => client,
    };
    if let Ok(v) = HeaderValue::from_str(&xff) {
        headers.insert("x-forwarded-for", v);
    }
    headers.insert("x-forwarded-proto", HeaderValue::from_static("http"));
    if let Ok(v) = HeaderValue::from_str(host) {
        headers.insert("x-forwarded-host", v);
    }
}

fn text(status: StatusCode, msg: &str) -> Response<ProxyBody> {
    let mut resp = Response::new(Full::new(Bytes::from(msg.to_string())).map_err(|never| match never {}).boxed());
    *resp.status_mut() = status;
    resp.headers_mut().insert(hyper::header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_are_normalized() {
        assert_eq!(normalize_host("Web.LocalHost:8080"), "web.localhost");
        assert_eq!(normalize_host("example.com."), "example.com");
        assert_eq!(normalize_host("[::1]:80"), "[::1]");
    }

    #[test]
    fn round_robin_visits_every_backend() {
        let backends: Vec<SocketAddr> = (1..=3).map(|i| SocketAddr::from(([10, 0, 0, i], 80))).collect();
        let route = Route::new("web".into(), backends.clone());
        let firsts: Vec<SocketAddr> = (0..6).filter_map(|_| route.order().next()).collect();
        assert_eq!(firsts[..3], backends[..]);
        assert_eq!(firsts[3..], backends[..]);
        assert_eq!(route.order().count(), 3);
    }

    #[test]
    fn hop_by_hop_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("keep-alive, x-secret"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-kept"));
    }
}

/// The proxy in front of a real backend, driven by a client that writes each request in several
/// small segments (as many simple clients do).
#[cfg(test)]
mod fragmented_requests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn fragmented_requests_are_served() {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("rt");
        let (proxy_addr, backend) = rt.block_on(async {
            let backend = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            let backend_addr = backend.local_addr().expect("addr");
            std::thread::spawn(move || {
                for s in backend.incoming().flatten() {
                    std::thread::spawn(move || {
                        let mut s = s;
                        let mut buf = [0u8; 4096];
                        let mut got = Vec::new();
                        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                            match s.read(&mut buf) {
                                Ok(0) | Err(_) => return,
                                Ok(n) => got.extend_from_slice(&buf[..n]),
                            }
                        }
                        let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok");
                    });
                }
            });
            let table = Arc::new(RouteTable::default());
            table.publish(HashMap::from([(
                "a.localhost".to_string(),
                Arc::new(Route::new("a".into(), vec![backend_addr])),
            )]));
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let addr = listener.local_addr().expect("addr");
            tokio::spawn(Proxy::new(table).serve(listener));
            (addr, backend_addr)
        });
        let _ = backend;
        let _guard = rt.enter();
        let mut stuck = 0;
        for i in 0..300 {
            let mut s = std::net::TcpStream::connect(proxy_addr).expect("connect");
            s.set_read_timeout(Some(Duration::from_secs(2))).expect("timeout");
            for piece in ["GET ", "/", " HTTP/1.1\r\nHost: ", "a.localhost", "\r\nConnection: close\r\n\r\n"] {
                s.write_all(piece.as_bytes()).expect("write");
            }
            let mut out = Vec::new();
            if let Err(e) = s.read_to_end(&mut out) {
                stuck += 1;
                eprintln!("request {i}: {e}");
            }
        }
        assert_eq!(stuck, 0);
    }
}
