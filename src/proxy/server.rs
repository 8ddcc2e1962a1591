//! Listeners and threads. The proxy runs on its own threads, one single-threaded runtime per
//! worker, each with its own `SO_REUSEPORT` listener socket and its own upstream pool (measured:
//! faster than one shared multi-threaded runtime, and nothing is shared per request but the route
//! table). A control thread runs health checks and the TCP passthrough listeners.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use super::forward::{ConnInfo, Forwarder};
use super::pool::Pool;
use super::proxy_protocol::{self, ProxyHeader};
use super::routes::{RouteTable, Table, TcpPort};
use super::timer::Wheel;
use super::tls::CertStore;
use super::{access, health, tcp};

/// How often the certificate directory is checked for changed files.
const CERT_POLL: Duration = Duration::from_secs(5);

/// An address range (`10.0.0.0/8`, `2001:db8::/32`, or one address).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    net: IpAddr,
    bits: u8,
}

impl std::str::FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Cidr, String> {
        let bad =
            || format!("invalid address range {s:?}: expected an IP address or CIDR, e.g. 10.0.0.0/8 or 2001:db8::/32");
        let (ip, bits) = match s.split_once('/') {
            Some((ip, bits)) => (ip, Some(bits.parse::<u8>().map_err(|_| bad())?)),
            None => (s, None),
        };
        let net: IpAddr = ip.trim().parse().map_err(|_| bad())?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        let bits = bits.unwrap_or(max);
        if bits > max {
            return Err(bad());
        }
        Ok(Cidr { net, bits })
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.net, self.bits)
    }
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.net, canonical_ip(ip)) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = if self.bits == 0 { 0 } else { u32::MAX << (32 - self.bits) };
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = if self.bits == 0 { 0 } else { u128::MAX << (128 - self.bits) };
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// `::ffff:192.0.2.1` (an IPv4 client on a dual-stack socket) is `192.0.2.1`.
fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(canonical_ip(addr.ip()), addr.port())
}

/// How the proxy listens.
#[derive(Clone)]
pub struct ProxyOptions {
    pub http: Vec<SocketAddr>,
    pub https: Vec<SocketAddr>,
    /// Worker threads; 0 = one per CPU.
    pub threads: usize,
    /// Peers whose forwarding headers (and PROXY protocol header) are believed.
    pub trusted: Vec<Cidr>,
    /// Connections from trusted peers start with a PROXY protocol (v1 or v2) header.
    pub proxy_protocol: bool,
    /// Certificates for the HTTPS listeners.
    pub certs: Option<Arc<CertStore>>,
    /// Address TCP passthrough ports listen on.
    pub tcp_ip: IpAddr,
    /// Time a client has to send its request head (and PROXY header, and TLS handshake), as
    /// nginx's `client_header_timeout`; also how long an idle keep-alive connection stays open.
    pub client_timeout: Duration,
}

impl Default for ProxyOptions {
    fn default() -> Self {
        ProxyOptions {
            http: Vec::new(),
            https: Vec::new(),
            threads: 0,
            trusted: Vec::new(),
            proxy_protocol: false,
            certs: None,
            tcp_ip: IpAddr::from([0, 0, 0, 0]),
            client_timeout: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("cannot listen on {0} ({1}): is another server using it? choose another address")]
    Bind(SocketAddr, std::io::Error),
    #[error("{0}")]
    Config(String),
    #[error("cannot start the proxy's threads: {0}")]
    Thread(std::io::Error),
}

struct Shared {
    table: Arc<RouteTable>,
    trusted: Vec<Cidr>,
    proxy_protocol: bool,
    tls: Option<tokio_rustls::TlsAcceptor>,
    client_timeout: Duration,
    /// Client connections open, all workers together.
    open: std::sync::atomic::AtomicUsize,
    /// Set when a newer proxy has taken over the listeners: answers say `Connection: close`,
    /// and what stays open is closed gracefully a little later.
    retiring: watch::Receiver<bool>,
    /// The same, for the per-request check (a plain load, no lock).
    retired: std::sync::atomic::AtomicBool,
}

/// Gives freed memory back to the system after a wave of connections has closed. Each idle
/// connection holds about 30 KiB (hyper's read and write buffers, the connection task); glibc
/// keeps what they freed in its arenas unless asked, so 10,000 connections that came and went
/// would otherwise leave ~300 MiB resident for good.
struct Trim {
    peak: usize,
}

impl Trim {
    fn tick(&mut self, open: usize) {
        self.peak = self.peak.max(open);
        if self.peak >= open + 512 && open < self.peak / 2 {
            self.peak = open;
            #[cfg(target_env = "gnu")]
            // SAFETY: malloc_trim only releases free heap memory; it is thread-safe in glibc.
            unsafe {
                libc::malloc_trim(0);
            }
        }
    }
}

/// Counts a client connection as open until dropped.
struct OpenConn(Arc<Shared>);

impl Drop for OpenConn {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Shared {
    fn trusts(&self, ip: IpAddr) -> bool {
        self.trusted.iter().any(|c| c.contains(ip))
    }
}

/// The running proxy; stops (listeners closed, threads joined) when dropped.
pub struct ProxyHandle {
    pub http_addrs: Vec<SocketAddr>,
    pub https_addrs: Vec<SocketAddr>,
    shutdown: watch::Sender<bool>,
    retire: watch::Sender<bool>,
    /// One per worker thread, so that its connections wait on a channel no other core touches.
    retire_workers: Vec<watch::Sender<bool>>,
    shared: Arc<Shared>,
    threads: Vec<std::thread::JoinHandle<()>>,
    /// Reloads the HTTPS certificates when their files change, for as long as the proxy runs.
    _certs: Option<super::tls::CertWatch>,
}

impl ProxyHandle {
    /// Stops accepting (a newer proxy serves the same listening sockets) and winds the open
    /// connections down: HTTP/1 answers carry `Connection: close`, and after [`RETIRE_LINGER`]
    /// the connections still open are shut down gracefully (h2: GOAWAY; idle HTTP/1: closed).
    pub fn retire(&self) {
        self.shared.retired.store(true, std::sync::atomic::Ordering::Relaxed);
        let _ = self.retire.send(true);
        for w in &self.retire_workers {
            let _ = w.send(true);
        }
    }

    /// Client connections open now, all workers together.
    pub fn open_connections(&self) -> usize {
        self.shared.open.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Drop for ProxyHandle {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// One socket per worker on `addr`, all with `SO_REUSEPORT`. A plain bind first tells whether
/// anyone else holds the port (with `SO_REUSEPORT` alone, a second server would silently share it).
pub fn bind_all(addr: SocketAddr, n: usize) -> Result<(SocketAddr, Vec<std::net::TcpListener>), ProxyError> {
    use socket2::{Domain, Protocol, Socket, Type};
    let err = |e| ProxyError::Bind(addr, e);
    let probe = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP)).map_err(err)?;
    // SO_REUSEADDR lets a restarted proxy bind past its old connections in TIME_WAIT; it does
    // not let two servers listen on one port.
    probe.set_reuse_address(true).map_err(err)?;
    probe.bind(&addr.into()).map_err(err)?;
    probe.listen(1).map_err(err)?;
    let bound =
        probe.local_addr().map_err(err)?.as_socket().ok_or_else(|| err(std::io::ErrorKind::InvalidInput.into()))?;
    drop(probe);
    let mut sockets = Vec::with_capacity(n);
    for _ in 0..n {
        let s = Socket::new(Domain::for_address(bound), Type::STREAM, Some(Protocol::TCP)).map_err(err)?;
        s.set_reuse_address(true).map_err(err)?;
        s.set_reuse_port(true).map_err(err)?;
        if bound.is_ipv6() {
            s.set_only_v6(false).map_err(err)?;
        }
        s.set_nonblocking(true).map_err(err)?;
        s.set_nodelay(true).map_err(err)?;
        s.bind(&bound.into()).map_err(err)?;
        s.listen(4096).map_err(err)?;
        sockets.push(std::net::TcpListener::from(s));
    }
    Ok((bound, sockets))
}

/// A listening socket of the proxy and what it serves.
pub struct Listener {
    pub addr: SocketAddr,
    pub https: bool,
    pub socket: std::net::TcpListener,
}

/// How long a retiring proxy lets its connections finish their exchange (each HTTP/1 answer
/// closes its connection) before it closes what is left gracefully.
pub const RETIRE_LINGER: Duration = Duration::from_secs(2);

/// Worker threads for `options`: as given, or one per CPU.
pub fn worker_count(options: &ProxyOptions) -> usize {
    match options.threads {
        0 => std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        n => n,
    }
}

/// Binds every listener of `options`: one `SO_REUSEPORT` socket per worker and address.
pub fn bind_listeners(options: &ProxyOptions) -> Result<Vec<Listener>, ProxyError> {
    let threads = worker_count(options);
    let mut out = Vec::new();
    for (addrs, https) in [(&options.http, false), (&options.https, true)] {
        for addr in addrs {
            let (bound, sockets) = bind_all(*addr, threads)?;
            out.extend(sockets.into_iter().map(|socket| Listener { addr: bound, https, socket }));
        }
    }
    Ok(out)
}

/// Starts the proxy's threads on freshly bound listeners.
#[cfg(test)]
pub fn start(options: ProxyOptions, table: Arc<RouteTable>) -> Result<ProxyHandle, ProxyError> {
    let listeners = bind_listeners(&options)?;
    start_on(options, table, listeners)
}

/// Starts the proxy's threads on listeners bound elsewhere (inherited from the daemon or from
/// systemd). Every socket is served: with fewer sockets than workers for an address, workers
/// share one; with more, a worker takes several.
pub fn start_on(
    options: ProxyOptions,
    table: Arc<RouteTable>,
    listeners: Vec<Listener>,
) -> Result<ProxyHandle, ProxyError> {
    if options.proxy_protocol && options.trusted.is_empty() {
        return Err(ProxyError::Config(
            "PROXY protocol needs the addresses of the load balancers that send it (--trusted-proxy)".into(),
        ));
    }
    let tls = options.certs.as_ref().map(|certs| tokio_rustls::TlsAcceptor::from(certs.server_config()));
    let threads = worker_count(&options);
    let mut per_worker: Vec<Vec<(std::net::TcpListener, bool)>> = (0..threads).map(|_| Vec::new()).collect();
    let mut http_addrs = Vec::new();
    let mut https_addrs = Vec::new();
    let mut groups: Vec<(SocketAddr, bool, Vec<std::net::TcpListener>)> = Vec::new();
    for l in listeners {
        let (addrs, https) = if l.https { (&mut https_addrs, true) } else { (&mut http_addrs, false) };
        if !addrs.contains(&l.addr) {
            addrs.push(l.addr);
        }
        match groups.iter_mut().find(|g| g.0 == l.addr && g.1 == https) {
            Some(g) => g.2.push(l.socket),
            None => groups.push((l.addr, https, vec![l.socket])),
        }
    }
    if !https_addrs.is_empty() && tls.is_none() {
        return Err(ProxyError::Config("an HTTPS listener needs a certificate directory (--certs-dir)".into()));
    }
    for (addr, https, sockets) in groups {
        let n = sockets.len();
        if n >= threads {
            for (i, s) in sockets.into_iter().enumerate() {
                per_worker[i % threads].push((s, https));
            }
        } else {
            for (w, list) in per_worker.iter_mut().enumerate() {
                let s = sockets[w % n].try_clone().map_err(|e| ProxyError::Bind(addr, e))?;
                list.push((s, https));
            }
        }
    }
    let (retire, retire_rx) = watch::channel(false);
    let shared = Arc::new(Shared {
        table: table.clone(),
        trusted: options.trusted.clone(),
        proxy_protocol: options.proxy_protocol,
        tls,
        client_timeout: options.client_timeout,
        open: std::sync::atomic::AtomicUsize::new(0),
        retiring: retire_rx,
        retired: std::sync::atomic::AtomicBool::new(false),
    });
    let (shutdown, rx) = watch::channel(false);
    let _certs = options.certs.as_ref().map(|c| c.watch(CERT_POLL));
    let mut handle = ProxyHandle {
        http_addrs,
        https_addrs,
        shutdown,
        retire,
        retire_workers: Vec::new(),
        shared: shared.clone(),
        threads: Vec::new(),
        _certs,
    };
    for (i, listeners) in per_worker.into_iter().enumerate() {
        let shared = shared.clone();
        let rx = rx.clone();
        let (retire_tx, retiring) = watch::channel(false);
        handle.retire_workers.push(retire_tx);
        let t = std::thread::Builder::new()
            .name(format!("dlv-proxy-{i}"))
            .spawn(move || worker(i == 0, listeners, shared, rx, retiring))
            .map_err(ProxyError::Thread)?;
        handle.threads.push(t);
    }
    let tcp_ip = options.tcp_ip;
    let retiring = shared.retiring.clone();
    let t = std::thread::Builder::new()
        .name("dlv-proxy-ctl".into())
        .spawn(move || control(table, tcp_ip, rx, retiring))
        .map_err(ProxyError::Thread)?;
    handle.threads.push(t);
    Ok(handle)
}

fn runtime() -> Option<tokio::runtime::Runtime> {
    match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => Some(rt),
        Err(e) => {
            tracing::error!("proxy thread cannot start its runtime: {e}");
            None
        }
    }
}

/// One worker thread; the `first` also returns freed memory to the system now and then.
fn worker(
    first: bool,
    listeners: Vec<(std::net::TcpListener, bool)>,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
    retiring: watch::Receiver<bool>,
) {
    let Some(rt) = runtime() else { return };
    rt.block_on(async move {
        let wheel = Wheel::new();
        tokio::spawn(wheel.clone().run());
        let forwarder =
            Arc::new(Forwarder { table: shared.table.clone(), pool: Arc::new(Pool::new(wheel.clone())), wheel });
        for (listener, https) in listeners {
            let listener = match TcpListener::from_std(listener) {
                Ok(l) => l,
                Err(e) => {
                    tracing::error!("proxy listener: {e}");
                    continue;
                }
            };
            tokio::spawn(accept_loop(listener, https, forwarder.clone(), shared.clone(), retiring.clone()));
        }
        let housekeeping = {
            let forwarder = forwarder.clone();
            let shared = shared.clone();
            let mut trim = Trim { peak: 0 };
            async move {
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                loop {
                    tick.tick().await;
                    access::flush();
                    if first {
                        trim.tick(shared.open.load(std::sync::atomic::Ordering::Relaxed));
                    }
                    let table = forwarder.table.load();
                    let live: std::collections::HashSet<SocketAddr> =
                        table.routes().flat_map(|r| r.backends.iter().map(|b| b.addr)).collect();
                    forwarder.pool.prune(|a| live.contains(a));
                }
            }
        };
        tokio::select! {
            _ = housekeeping => {}
            _ = shutdown.wait_for(|stop| *stop) => {}
        }
        access::flush();
    });
}

async fn accept_loop(
    listener: TcpListener,
    https: bool,
    forwarder: Arc<Forwarder>,
    shared: Arc<Shared>,
    retiring: watch::Receiver<bool>,
) {
    let mut stop = retiring.clone();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            // The socket stays open in the newer proxy (and the daemon): nothing queued is lost.
            _ = super::set(&mut stop) => return,
        };
        match accepted {
            Ok((stream, peer)) => {
                tokio::spawn(serve_conn(
                    stream,
                    canonical(peer),
                    https,
                    forwarder.clone(),
                    shared.clone(),
                    retiring.clone(),
                ));
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!("proxy accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn serve_conn(
    mut stream: TcpStream,
    peer: SocketAddr,
    https: bool,
    forwarder: Arc<Forwarder>,
    shared: Arc<Shared>,
    retiring: watch::Receiver<bool>,
) {
    shared.open.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let _open = OpenConn(shared.clone());
    let _ = stream.set_nodelay(true);
    let trusted = shared.trusts(peer.ip());
    let mut client = peer;
    if shared.proxy_protocol && trusted {
        match proxy_protocol::read_header(&mut stream, shared.client_timeout).await {
            Ok(ProxyHeader::Proxied { source, .. }) => client = canonical(source),
            Ok(ProxyHeader::Local) => {}
            Err(e) => {
                tracing::debug!("PROXY header from {peer}: {e}");
                return;
            }
        }
    }
    let info = ConnInfo::new(client, trusted, https);
    match (https, &shared.tls) {
        (true, Some(acceptor)) => match tokio::time::timeout(shared.client_timeout, acceptor.accept(stream)).await {
            Ok(Ok(tls)) => {
                // Over TLS the client names HTTP/2 in ALPN (RFC 9113 §3.2); anything else is HTTP/1.
                let http2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
                serve_http(TokioIo::new(tls), http2, info, forwarder, shared.clone(), retiring).await
            }
            Ok(Err(e)) => tracing::debug!("TLS handshake with {peer}: {e}"),
            Err(_) => tracing::debug!("TLS handshake with {peer}: timed out"),
        },
        _ => match tokio::time::timeout(shared.client_timeout, speaks_h2c(&stream)).await {
            Ok(Ok(http2)) => serve_http(TokioIo::new(stream), http2, info, forwarder, shared.clone(), retiring).await,
            Ok(Err(e)) => tracing::debug!("proxy connection from {peer}: {e}"),
            Err(_) => tracing::debug!("proxy connection from {peer}: no request before the header-read timeout"),
        },
    }
}

/// What an HTTP/2 client with prior knowledge (h2c) sends first (RFC 9113 §3.4).
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Whether the client opens with the HTTP/2 connection preface, seen with `MSG_PEEK` so the
/// bytes stay for the protocol's own reader. (A reader that takes them and hands them back, as
/// hyper-util's `auto` builder does, makes hyper's first read return 24 bytes and its read
/// buffer grow from 8 to 16 KiB for the connection's lifetime.)
async fn speaks_h2c(stream: &TcpStream) -> std::io::Result<bool> {
    let mut head = [0u8; 24];
    loop {
        let n = stream.peek(&mut head).await?;
        if n == 0 || head[..n] != H2_PREFACE[..n] {
            // Closed before a byte (HTTP/1 then sees the end), or not the preface.
            return Ok(false);
        }
        if n == H2_PREFACE.len() {
            return Ok(true);
        }
        // A preface in pieces: the rest is already on its way.
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

async fn serve_http<I>(
    io: I,
    http2: bool,
    info: ConnInfo,
    forwarder: Arc<Forwarder>,
    shared: Arc<Shared>,
    retiring: watch::Receiver<bool>,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let peer = info.client;
    let client_timeout = shared.client_timeout;
    let forwarder_wheel = forwarder.wheel.clone();
    let service = {
        hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
            let forwarder = forwarder.clone();
            let info = info.clone();
            let shared = shared.clone();
            async move {
                let http1 = req.version() < hyper::Version::HTTP_2;
                // Boxed: hyper keeps room for one service future per connection for as long as the
                // connection lives, and a request's state is large (3.3 KiB): idle connections
                // stay small.
                let handling = async move { forwarder.handle(req, &info).await };
                let mut resp = Box::pin(handling).await;
                // A retiring proxy ends each HTTP/1 connection after its current answer: the
                // client's next request opens a connection to the newer proxy.
                let retired = shared.retired.load(std::sync::atomic::Ordering::Relaxed);
                if http1 && retired && resp.status() != hyper::StatusCode::SWITCHING_PROTOCOLS {
                    resp.headers_mut()
                        .insert(hyper::header::CONNECTION, hyper::header::HeaderValue::from_static("close"));
                }
                Ok::<_, Infallible>(resp)
            }
        })
    };
    let result = if http2 {
        let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        // An idle connection is pinged, and closed when the client stops answering.
        builder
            .timer(forwarder_wheel)
            .max_concurrent_streams(250)
            .keep_alive_interval(client_timeout)
            .keep_alive_timeout(Duration::from_secs(20));
        let conn = builder.serve_connection(io, service);
        tokio::pin!(conn);
        until_retired(conn.as_mut(), retiring, |c| c.graceful_shutdown()).await
    } else {
        let mut builder = hyper::server::conn::http1::Builder::new();
        // The worker's coarse timer: every request arms and disarms the header-read timeout.
        builder.timer(forwarder_wheel).header_read_timeout(client_timeout);
        let conn = builder.serve_connection(io, service).with_upgrades();
        tokio::pin!(conn);
        until_retired(conn.as_mut(), retiring, |c| c.graceful_shutdown()).await
    };
    if let Err(e) = result {
        tracing::debug!("proxy connection from {peer}: {e}");
    }
}

/// Serves `conn` to its end; once the proxy retires, lets it linger for [`RETIRE_LINGER`], then
/// shuts it down gracefully (in-flight requests finish).
async fn until_retired<C>(
    mut conn: std::pin::Pin<&mut C>,
    mut retiring: watch::Receiver<bool>,
    shutdown: impl FnOnce(std::pin::Pin<&mut C>),
) -> hyper::Result<()>
where
    C: std::future::Future<Output = hyper::Result<()>>,
{
    let linger = async move {
        super::set(&mut retiring).await;
        tokio::time::sleep(RETIRE_LINGER).await;
    };
    tokio::select! {
        r = conn.as_mut() => r,
        _ = linger => {
            shutdown(conn.as_mut());
            conn.await
        }
    }
}

/// Follows the route table: a health check per backend that has one, a listener per TCP port.
fn control(
    table: Arc<RouteTable>,
    tcp_ip: IpAddr,
    mut shutdown: watch::Receiver<bool>,
    mut retiring: watch::Receiver<bool>,
) {
    let Some(rt) = runtime() else { return };
    rt.block_on(async move {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Arc<Table>>();
        table.watch(move |t| {
            let _ = tx.send(t.clone());
        });
        let mut checks: HashMap<(String, SocketAddr), tokio::task::JoinHandle<()>> = HashMap::new();
        let mut ports: HashMap<u16, (TcpPort, tokio::task::JoinHandle<()>)> = HashMap::new();
        let mut current: Arc<Table> = Arc::clone(&table.load());
        let mut retry = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                t = rx.recv() => match t { Some(t) => current = t, None => break },
                // A TCP port still held by a retiring proxy is bound again a moment later.
                _ = retry.tick(), if current.tcp.iter().any(|(p, _)| !ports.contains_key(&p.listen)) => {}
                _ = super::set(&mut retiring), if !*retiring.borrow() => {}
                _ = shutdown.wait_for(|stop| *stop) => break,
            };
            if *retiring.borrow() {
                // The newer proxy binds the TCP ports next to ours (SO_REUSEPORT): stop accepting.
                for (_, (_, task)) in ports.drain() {
                    task.abort();
                }
                for (_, task) in checks.drain() {
                    task.abort();
                }
                let _ = shutdown.wait_for(|stop| *stop).await;
                break;
            }
            let mut wanted = HashMap::new();
            for route in current.routes() {
                let Some(check) = &route.options.health else { continue };
                for b in &route.backends {
                    wanted.insert((b.instance.clone(), b.addr), (Arc::downgrade(b), check.clone()));
                }
            }
            checks.retain(|key, task| {
                let keep = wanted.contains_key(key) && !task.is_finished();
                if !keep {
                    task.abort();
                }
                keep
            });
            for (key, (backend, check)) in wanted {
                checks.entry(key).or_insert_with(|| tokio::spawn(health::run(backend, check)));
            }
            let wanted_ports: HashMap<u16, TcpPort> = current.tcp.iter().map(|(p, _)| (p.listen, *p)).collect();
            ports.retain(|port, (spec, task)| {
                let keep = wanted_ports.get(port) == Some(spec) && !task.is_finished();
                if !keep {
                    task.abort();
                }
                keep
            });
            for (port, spec) in wanted_ports {
                if ports.contains_key(&port) {
                    continue;
                }
                match tcp::bind(SocketAddr::new(tcp_ip, port)) {
                    Ok(listener) => {
                        ports.insert(port, (spec, tokio::spawn(tcp::serve(listener, spec, table.clone()))));
                    }
                    Err(e) => tracing::error!("TCP port {port}: cannot listen on {tcp_ip}:{port}: {e}"),
                }
            }
        }
        for (_, task) in checks {
            task.abort();
        }
        for (_, (_, task)) in ports {
            task.abort();
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs_parse_and_match() {
        let c: Cidr = "10.0.0.0/8".parse().expect("cidr");
        assert!(c.contains("10.1.2.3".parse().expect("ip")));
        assert!(c.contains("::ffff:10.1.2.3".parse().expect("ip")));
        assert!(!c.contains("11.0.0.1".parse().expect("ip")));
        let one: Cidr = "192.0.2.7".parse().expect("cidr");
        assert!(one.contains("192.0.2.7".parse().expect("ip")));
        assert!(!one.contains("192.0.2.8".parse().expect("ip")));
        let v6: Cidr = "2001:db8::/32".parse().expect("cidr");
        assert!(v6.contains("2001:db8:1::5".parse().expect("ip")));
        assert!(!v6.contains("10.0.0.1".parse().expect("ip")));
        let all: Cidr = "0.0.0.0/0".parse().expect("cidr");
        assert!(all.contains("203.0.113.9".parse().expect("ip")));
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("nope".parse::<Cidr>().is_err());
    }
}

/// A one-worker proxy on 127.0.0.1 routing `a.localhost` to `backend`.
#[cfg(test)]
pub(super) fn proxy_to(backend: SocketAddr) -> ProxyHandle {
    use crate::proxy::{AppRoute, BackendSpec, RouteConfig};
    let table = Arc::new(RouteTable::default());
    table.publish(RouteConfig {
        apps: vec![AppRoute {
            app: "a".into(),
            hosts: vec!["a.localhost".into()],
            backends: vec![BackendSpec { instance: "a.1".into(), addr: backend }],
            options: Default::default(),
            tcp: Vec::new(),
        }],
    });
    let options = ProxyOptions { http: vec![SocketAddr::from(([127, 0, 0, 1], 0))], threads: 1, ..Default::default() };
    start(options, table).expect("start the proxy")
}

/// The proxy in front of a real backend, driven by a client that writes each request in several
/// small segments (as many simple clients do: HTTP/1 must not be mistaken for an h2 preface).
#[cfg(test)]
mod fragmented_requests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn fragmented_requests_are_served() {
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
        let handle = proxy_to(backend_addr);
        let proxy_addr = handle.http_addrs[0];
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
            } else {
                assert!(out.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&out));
            }
        }
        assert_eq!(stuck, 0);
    }
}

/// Upstream connections are kept and reused, whatever the response body's framing.
#[cfg(test)]
mod keep_alive {
    use super::*;
    use std::io::{BufRead, BufReader, Read, Write};
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A keep-alive backend that counts the connections it accepts; `/empty` answers 204,
    /// `/chunked` a chunked body, anything else `ok` with a length.
    fn backend(accepted: Arc<AtomicUsize>) -> SocketAddr {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        std::thread::spawn(move || {
            for s in listener.incoming().flatten() {
                accepted.fetch_add(1, Ordering::Relaxed);
                std::thread::spawn(move || {
                    let mut w = s.try_clone().expect("clone");
                    let mut r = BufReader::new(s);
                    loop {
                        let mut line = String::new();
                        if r.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
                        let head = line.starts_with("HEAD");
                        loop {
                            let mut h = String::new();
                            if r.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                                break;
                            }
                        }
                        let answer: &[u8] = match (path.as_str(), head) {
                            ("/empty", _) => b"HTTP/1.1 204 No Content\r\n\r\n",
                            ("/chunked", _) => {
                                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"
                            }
                            (_, true) => b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n",
                            _ => b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
                        };
                        if w.write_all(answer).is_err() {
                            return;
                        }
                    }
                });
            }
        });
        addr
    }

    #[test]
    fn upstream_connections_are_reused() {
        let accepted = Arc::new(AtomicUsize::new(0));
        let backend_addr = backend(accepted.clone());
        let handle = proxy_to(backend_addr);
        let mut client = std::net::TcpStream::connect(handle.http_addrs[0]).expect("connect");
        client.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
        let mut reader = BufReader::new(client.try_clone().expect("clone"));
        for i in 0..200 {
            let (method, path) = match i % 4 {
                0 => ("GET", "/"),
                1 => ("HEAD", "/"),
                2 => ("GET", "/empty"),
                _ => ("GET", "/chunked"),
            };
            let request = format!("{method} {path} HTTP/1.1\r\nHost: a.localhost\r\n\r\n");
            client.write_all(request.as_bytes()).expect("write");
            let mut length = 0;
            let mut chunked = false;
            let mut status = String::new();
            reader.read_line(&mut status).expect("status");
            assert!(status.contains(" 20"), "{status}");
            loop {
                let mut h = String::new();
                reader.read_line(&mut h).expect("header");
                let lower = h.to_ascii_lowercase();
                if let Some(v) = lower.strip_prefix("content-length:") {
                    length = v.trim().parse().expect("length");
                }
                chunked |= lower.starts_with("transfer-encoding: chunked");
                if h == "\r\n" {
                    break;
                }
            }
            if chunked {
                let mut rest = Vec::new();
                while !rest.ends_with(b"0\r\n\r\n") {
                    let mut b = [0u8; 1];
                    reader.read_exact(&mut b).expect("chunked body");
                    rest.push(b[0]);
                }
            } else if method != "HEAD" {
                let mut body = vec![0u8; length];
                reader.read_exact(&mut body).expect("body");
            }
        }
        let n = accepted.load(Ordering::Relaxed);
        assert!(n <= 3, "200 sequential requests opened {n} connections to the instance");
    }
}
