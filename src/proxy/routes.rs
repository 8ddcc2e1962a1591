//! The route table: what the supervisor tells the proxy (a serialisable [`RouteConfig`]) and what
//! the proxy reads per request (a [`Table`], built from the config off the hot path and swapped in
//! whole). Backends keep their identity across swaps, so in-flight counts, health and metrics
//! survive a rebuild, and an instance that left the table can be waited on until it drained.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};

use super::metrics::{AppMetrics, BackendMetrics};

/// How a route spreads requests over its backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Balance {
    /// Power of two random choices, the one with fewer requests in flight wins.
    #[default]
    LeastOutstanding,
    RoundRobin,
}

/// An active health check the proxy runs against every backend of a route.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthCheck {
    /// `GET` this path and expect a 2xx or 3xx; `None` checks that a TCP connection opens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    pub interval_ms: u64,
    pub timeout_ms: u64,
    /// Consecutive successes that bring an unhealthy backend back.
    pub rise: u32,
    /// Consecutive failures that take a backend out of rotation.
    pub fall: u32,
}

impl HealthCheck {
    pub fn http(path: &str) -> HealthCheck {
        HealthCheck { path: Some(path.to_string()), interval_ms: 2000, timeout_ms: 1000, rise: 2, fall: 3 }
    }
}

/// Per-route settings; every field has a default a production proxy would pick.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RouteOptions {
    pub balance: Balance,
    /// Opening a connection to an instance.
    pub connect_timeout_ms: u64,
    /// Waiting for the response head, and between two pieces of the response body.
    pub read_timeout_ms: u64,
    /// The whole exchange, body included; 0 = no limit (streams may run for hours).
    pub total_timeout_ms: u64,
    /// Largest request body accepted, in bytes; `None` = unlimited, streamed.
    pub max_body: Option<u64>,
    /// Extra attempts on other instances when a request can safely be sent again.
    pub retries: u32,
    /// Drop the matched path prefix before forwarding (`/api/users` → `/users`).
    pub strip_prefix: bool,
    /// Also send a non-idempotent request (POST, PATCH) again after its instance died before
    /// answering, even if the app may have read it: the operator says the app tolerates it
    /// (as nginx's `proxy_next_upstream non_idempotent`).
    #[serde(default)]
    pub retry_non_idempotent: bool,
    pub health: Option<HealthCheck>,
}

impl Default for RouteOptions {
    fn default() -> Self {
        RouteOptions {
            balance: Balance::LeastOutstanding,
            connect_timeout_ms: 5_000,
            read_timeout_ms: 60_000,
            total_timeout_ms: 0,
            max_body: None,
            retries: 2,
            strip_prefix: false,
            retry_non_idempotent: false,
            health: None,
        }
    }
}

impl RouteOptions {
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms.max(1))
    }
    pub fn read_timeout(&self) -> Duration {
        Duration::from_millis(self.read_timeout_ms.max(1))
    }
    pub fn total_timeout(&self) -> Option<Duration> {
        (self.total_timeout_ms > 0).then(|| Duration::from_millis(self.total_timeout_ms))
    }
}

/// One instance as the proxy reaches it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendSpec {
    /// Readable instance name (`web.2`), for logs and metrics.
    pub instance: String,
    pub addr: SocketAddr,
}

/// A raw TCP port published by an app: the proxy listens on `listen` and forwards each connection
/// to an instance's `target` port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TcpPort {
    pub listen: u16,
    pub target: u16,
}

/// Everything the proxy knows about one app.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AppRoute {
    pub app: String,
    /// `example.com`, `*.example.com` (any depth below), optionally with a path prefix:
    /// `example.com/api`.
    pub hosts: Vec<String>,
    pub backends: Vec<BackendSpec>,
    #[serde(default)]
    pub options: RouteOptions,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tcp: Vec<TcpPort>,
}

/// The whole routing state, as the supervisor publishes it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RouteConfig {
    pub apps: Vec<AppRoute>,
}

/// Milliseconds since the table's epoch: cheap timestamps for atomics.
fn now_ms(epoch: Instant) -> u64 {
    epoch.elapsed().as_millis() as u64
}

/// One instance, shared by every table that routes to it.
#[derive(Debug)]
pub struct Backend {
    pub app: String,
    pub instance: String,
    pub addr: SocketAddr,
    in_flight: AtomicUsize,
    /// Set by the active health check; a backend starts healthy (the supervisor only publishes
    /// instances that answered).
    healthy: AtomicBool,
    /// Passive ejection after a connection failure: not chosen before this time (ms, table epoch).
    ejected_until: AtomicU64,
    /// When it was last chosen (ms + 1, table epoch; 0: never). Breaks ties between equally busy
    /// backends in favour of the one chosen longest ago, as nginx's `least_conn` does: a new
    /// instance gets the next request at once instead of by chance.
    last_pick: AtomicU64,
    /// No longer in the table: gets no new requests, finishes what it has.
    retired: AtomicBool,
    epoch: Instant,
    pub metrics: BackendMetrics,
}

/// How long a backend that refused or reset a connection sits out.
const EJECTION: Duration = Duration::from_secs(2);

impl Backend {
    fn new(app: &str, spec: &BackendSpec, epoch: Instant) -> Backend {
        Backend {
            app: app.to_string(),
            instance: spec.instance.clone(),
            addr: spec.addr,
            in_flight: AtomicUsize::new(0),
            healthy: AtomicBool::new(true),
            ejected_until: AtomicU64::new(0),
            last_pick: AtomicU64::new(0),
            retired: AtomicBool::new(false),
            epoch,
            metrics: BackendMetrics::default(),
        }
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Counts one request or connection until the guard is dropped.
    pub fn enter(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    pub fn set_healthy(&self, healthy: bool) {
        if self.healthy.swap(healthy, Ordering::Relaxed) != healthy {
            if healthy {
                tracing::info!(app = %self.app, instance = %self.instance, "instance healthy again, back in rotation");
            } else {
                tracing::warn!(app = %self.app, instance = %self.instance, "instance failed its health check, out of rotation");
            }
        }
    }

    pub fn eject(&self) {
        let until = now_ms(self.epoch) + EJECTION.as_millis() as u64;
        self.ejected_until.store(until, Ordering::Relaxed);
        self.metrics.ejections.fetch_add(1, Ordering::Relaxed);
    }

    pub fn is_retired(&self) -> bool {
        self.retired.load(Ordering::Relaxed)
    }

    /// May get new requests right now.
    fn available(&self, now: u64) -> bool {
        self.is_healthy() && self.ejected_until.load(Ordering::Relaxed) <= now
    }
}

/// A request or connection in flight on a backend.
#[derive(Debug)]
pub struct InFlight(Arc<Backend>);

impl InFlight {
    pub fn backend(&self) -> &Arc<Backend> {
        &self.0
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One app's place in the table.
#[derive(Debug)]
pub struct Route {
    pub app: String,
    pub backends: Vec<Arc<Backend>>,
    pub options: RouteOptions,
    pub metrics: Arc<AppMetrics>,
    next: AtomicU32,
    epoch: Instant,
}

impl Route {
    /// Picks a backend not in `tried`: available ones first; when none is available (all
    /// unhealthy or ejected), any of them rather than failing everything (as Envoy's panic mode).
    pub fn pick(&self, tried: &[usize]) -> Option<usize> {
        let n = self.backends.len();
        if tried.len() >= n {
            return None;
        }
        let now = now_ms(self.epoch);
        let fresh = |i: &usize| !tried.contains(i);
        let usable = |i: &usize| fresh(i) && self.backends[*i].available(now);
        let pick = match self.options.balance {
            Balance::RoundRobin => {
                let start = self.next.fetch_add(1, Ordering::Relaxed) as usize;
                (0..n).map(|k| (start + k) % n).find(usable)
            }
            Balance::LeastOutstanding => {
                let (a, b) = two_random(n);
                match (usable(&a), usable(&b)) {
                    (true, true) => {
                        let (ba, bb) = (&self.backends[a], &self.backends[b]);
                        Some(match bb.in_flight().cmp(&ba.in_flight()) {
                            std::cmp::Ordering::Less => b,
                            std::cmp::Ordering::Greater => a,
                            std::cmp::Ordering::Equal => {
                                if bb.last_pick.load(Ordering::Relaxed) < ba.last_pick.load(Ordering::Relaxed) {
                                    b
                                } else {
                                    a
                                }
                            }
                        })
                    }
                    (true, false) => Some(a),
                    (false, true) => Some(b),
                    (false, false) => (0..n).filter(usable).min_by_key(|i| self.backends[*i].in_flight()),
                }
            }
        };
        let pick = pick.or_else(|| (0..n).filter(fresh).min_by_key(|i| self.backends[*i].in_flight()));
        if let Some(i) = pick {
            // At most one write per backend and millisecond: the cache line stays shared.
            let last = &self.backends[i].last_pick;
            if last.load(Ordering::Relaxed) != now + 1 {
                last.store(now + 1, Ordering::Relaxed);
            }
        }
        pick
    }
}

/// Two distinct indexes below `n` (the same twice when `n` is 1).
fn two_random(n: usize) -> (usize, usize) {
    if n < 2 {
        return (0, 0);
    }
    let a = fastrand(n);
    let b = (a + 1 + fastrand(n - 1)) % n;
    (a, b)
}

/// A uniform index below `n` from a per-thread xorshift generator: no lock, no syscall.
fn fastrand(n: usize) -> usize {
    use std::cell::Cell;
    thread_local! {
        static STATE: Cell<u64> = Cell::new(rand::random::<u64>() | 1);
    }
    STATE.with(|s| {
        let mut x = s.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.set(x);
        (((x >> 32) * n as u64) >> 32) as usize
    })
}

/// A host's routes, longest path prefix first.
type Prefixed = Vec<(String, Arc<Route>)>;

/// What the hot path reads: exact host → routes, wildcard suffix → routes, TCP ports.
#[derive(Debug, Default)]
pub struct Table {
    exact: HashMap<String, Prefixed>,
    wildcard: HashMap<String, Prefixed>,
    pub tcp: Vec<(TcpPort, Arc<Route>)>,
}

/// A route matched for a request, and the path prefix it matched on.
pub struct Matched<'a> {
    pub route: &'a Arc<Route>,
    pub prefix: &'a str,
}

impl Table {
    /// The route for `host` (already normalised) and `path`.
    pub fn lookup<'a>(&'a self, host: &str, path: &str) -> Option<Matched<'a>> {
        if let Some(m) = self.exact.get(host).and_then(|r| by_prefix(r, path)) {
            return Some(m);
        }
        // `a.b.example.com` tries `b.example.com`, then `example.com`, …: the most specific
        // wildcard wins.
        let mut rest = host;
        while let Some((_, parent)) = rest.split_once('.') {
            if let Some(m) = self.wildcard.get(parent).and_then(|r| by_prefix(r, path)) {
                return Some(m);
            }
            rest = parent;
        }
        None
    }

    pub fn routes(&self) -> impl Iterator<Item = &Arc<Route>> {
        let mut seen = std::collections::HashSet::new();
        self.exact
            .values()
            .chain(self.wildcard.values())
            .flatten()
            .map(|(_, r)| r)
            .chain(self.tcp.iter().map(|(_, r)| r))
            .filter(move |r| seen.insert(Arc::as_ptr(r)))
    }
}

fn by_prefix<'a>(routes: &'a Prefixed, path: &str) -> Option<Matched<'a>> {
    routes.iter().find(|(p, _)| path_has_prefix(path, p)).map(|(p, route)| Matched { route, prefix: p })
}

/// `/api` covers `/api`, `/api/x` and `/api?q`, not `/apix`.
pub fn path_has_prefix(path: &str, prefix: &str) -> bool {
    if prefix.is_empty() || prefix == "/" {
        return true;
    }
    let prefix = prefix.trim_end_matches('/');
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/') || rest.starts_with('?'),
        None => false,
    }
}

/// Splits `example.com/api` into host and path prefix.
pub fn split_host_prefix(entry: &str) -> (&str, &str) {
    match entry.find('/') {
        Some(i) => (&entry[..i], &entry[i..]),
        None => (entry, ""),
    }
}

type Watcher = Box<dyn Fn(&Arc<Table>) + Send + Sync>;

/// Every backend known and every app's metrics, sorted, for `/metrics`.
pub struct Snapshot {
    pub backends: Vec<Arc<Backend>>,
    pub apps: Vec<(String, Arc<AppMetrics>)>,
}

/// The proxy's view of the routes, swapped whole.
pub struct RouteTable {
    table: ArcSwap<Table>,
    /// Every backend that is in the table or still has requests in flight.
    backends: Mutex<HashMap<(String, SocketAddr), Arc<Backend>>>,
    app_metrics: Mutex<HashMap<String, Arc<AppMetrics>>>,
    epoch: Instant,
    /// Called with each new table (health checks, TCP listeners follow it).
    watchers: Mutex<Vec<Watcher>>,
}

impl Default for RouteTable {
    fn default() -> Self {
        RouteTable {
            table: ArcSwap::from_pointee(Table::default()),
            backends: Mutex::new(HashMap::new()),
            app_metrics: Mutex::new(HashMap::new()),
            epoch: Instant::now(),
            watchers: Mutex::new(Vec::new()),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl RouteTable {
    /// The current table; lock-free.
    pub fn load(&self) -> arc_swap::Guard<Arc<Table>> {
        self.table.load()
    }

    /// Builds a table from `config` and swaps it in. Backends already known keep their state;
    /// those left out are retired: they finish their requests and get no new ones.
    pub fn publish(&self, config: RouteConfig) {
        let mut backends = lock(&self.backends);
        let mut metrics = lock(&self.app_metrics);
        let mut table = Table::default();
        let mut live = std::collections::HashSet::new();
        for app in &config.apps {
            let app_metrics = metrics.entry(app.app.clone()).or_insert_with(|| Arc::new(AppMetrics::default())).clone();
            let route_backends: Vec<Arc<Backend>> = app
                .backends
                .iter()
                .map(|spec| {
                    let key = (spec.instance.clone(), spec.addr);
                    live.insert(key.clone());
                    let b = backends.entry(key).or_insert_with(|| Arc::new(Backend::new(&app.app, spec, self.epoch)));
                    b.retired.store(false, Ordering::Relaxed);
                    b.clone()
                })
                .collect();
            let route = Arc::new(Route {
                app: app.app.clone(),
                backends: route_backends,
                options: app.options.clone(),
                metrics: app_metrics,
                next: AtomicU32::new(0),
                epoch: self.epoch,
            });
            for entry in &app.hosts {
                let (host, prefix) = split_host_prefix(entry);
                let host = host.trim_end_matches('.').to_ascii_lowercase();
                let (map, key) = match host.strip_prefix("*.") {
                    Some(suffix) => (&mut table.wildcard, suffix.to_string()),
                    None => (&mut table.exact, host),
                };
                map.entry(key).or_default().push((prefix.to_string(), route.clone()));
            }
            for port in &app.tcp {
                table.tcp.push((*port, route.clone()));
            }
        }
        for routes in table.exact.values_mut().chain(table.wildcard.values_mut()) {
            routes.sort_by_key(|(p, _)| std::cmp::Reverse(p.trim_end_matches('/').len()));
        }
        // Retire what left; forget retired backends once they have nothing in flight.
        backends.retain(|key, b| {
            if live.contains(key) {
                return true;
            }
            b.retired.store(true, Ordering::Relaxed);
            b.in_flight() > 0
        });
        metrics.retain(|name, _| config.apps.iter().any(|a| &a.app == name));
        drop(backends);
        drop(metrics);
        let table = Arc::new(table);
        self.table.store(table.clone());
        for watcher in lock(&self.watchers).iter() {
            watcher(&table);
        }
    }

    /// Runs `f` with every new table, starting with the current one.
    pub fn watch(&self, f: impl Fn(&Arc<Table>) + Send + Sync + 'static) {
        f(&self.table.load_full());
        lock(&self.watchers).push(Box::new(f));
    }

    /// Requests (and TCP connections) in flight on the instance at `ip`.
    pub fn in_flight(&self, ip: std::net::IpAddr) -> usize {
        lock(&self.backends).values().filter(|b| b.addr.ip() == ip).map(|b| b.in_flight()).sum()
    }

    /// Waits until the instance at `ip` has nothing in flight, or `timeout`. Returns what was
    /// left.
    pub async fn drain(&self, ip: std::net::IpAddr, timeout: Duration) -> usize {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = self.in_flight(ip);
            if left == 0 || tokio::time::Instant::now() >= deadline {
                self.forget_idle();
                return left;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn forget_idle(&self) {
        lock(&self.backends).retain(|_, b| !b.is_retired() || b.in_flight() > 0);
    }

    /// Every backend known, live or draining, and every app's metrics, for `/metrics`.
    pub fn snapshot(&self) -> Snapshot {
        let mut backends: Vec<Arc<Backend>> = lock(&self.backends).values().cloned().collect();
        backends.sort_by(|a, b| (&a.app, &a.instance).cmp(&(&b.app, &b.instance)));
        let mut apps: Vec<(String, Arc<AppMetrics>)> =
            lock(&self.app_metrics).iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        apps.sort_by(|a, b| a.0.cmp(&b.0));
        Snapshot { backends, apps }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn app(name: &str, hosts: &[&str], n: u8) -> AppRoute {
        AppRoute {
            app: name.into(),
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
            backends: (1..=n)
                .map(|i| BackendSpec { instance: format!("{name}.{i}"), addr: SocketAddr::from(([10, 0, 0, i], 80)) })
                .collect(),
            options: RouteOptions::default(),
            tcp: Vec::new(),
        }
    }

    fn app_at<'a>(t: &'a Table, host: &str, path: &str) -> Option<&'a str> {
        t.lookup(host, path).map(|m| m.route.app.as_str())
    }

    #[test]
    fn hosts_wildcards_and_prefixes() {
        let rt = RouteTable::default();
        rt.publish(RouteConfig {
            apps: vec![
                app("site", &["example.com", "*.example.com"], 1),
                app("api", &["example.com/api", "*.example.com/api/"], 1),
                app("deep", &["*.eu.example.com"], 1),
            ],
        });
        let t = rt.load();
        assert_eq!(app_at(&t, "example.com", "/"), Some("site"));
        assert_eq!(app_at(&t, "example.com", "/api"), Some("api"));
        assert_eq!(app_at(&t, "example.com", "/api/v1?x"), Some("api"));
        assert_eq!(app_at(&t, "example.com", "/api?x"), Some("api"));
        assert_eq!(app_at(&t, "example.com", "/apix"), Some("site"));
        assert_eq!(app_at(&t, "www.example.com", "/"), Some("site"));
        assert_eq!(app_at(&t, "a.b.example.com", "/api/x"), Some("api"));
        assert_eq!(app_at(&t, "x.eu.example.com", "/"), Some("deep"));
        assert_eq!(app_at(&t, "eu.example.com", "/"), Some("site"));
        assert_eq!(app_at(&t, "example.org", "/"), None);
    }

    #[test]
    fn backends_survive_a_rebuild_and_retire_when_gone() {
        let rt = RouteTable::default();
        rt.publish(RouteConfig { apps: vec![app("web", &["web.localhost"], 2)] });
        let first = rt.load().lookup("web.localhost", "/").map(|m| m.route.backends[1].clone()).expect("route");
        let guard = first.enter();
        rt.publish(RouteConfig { apps: vec![app("web", &["web.localhost"], 2)] });
        let again = rt.load().lookup("web.localhost", "/").map(|m| m.route.backends[1].clone()).expect("route");
        assert!(Arc::ptr_eq(&first, &again));
        rt.publish(RouteConfig { apps: vec![app("web", &["web.localhost"], 1)] });
        assert!(first.is_retired());
        let ip = first.addr.ip();
        assert_eq!(rt.in_flight(ip), 1);
        drop(guard);
        assert_eq!(rt.in_flight(ip), 0);
    }

    #[test]
    fn least_outstanding_prefers_the_idle_backend() {
        let rt = RouteTable::default();
        rt.publish(RouteConfig { apps: vec![app("web", &["w"], 2)] });
        let t = rt.load();
        let route = t.lookup("w", "/").expect("route").route;
        let _busy: Vec<InFlight> = (0..5).map(|_| route.backends[0].enter()).collect();
        for _ in 0..50 {
            assert_eq!(route.pick(&[]), Some(1));
        }
        assert_eq!(route.pick(&[1]), Some(0));
        assert_eq!(route.pick(&[0, 1]), None);
    }

    #[test]
    fn a_tie_goes_to_the_backend_chosen_longest_ago() {
        let rt = RouteTable::default();
        rt.publish(RouteConfig { apps: vec![app("web", &["w"], 1)] });
        for _ in 0..20 {
            rt.load().lookup("w", "/").expect("route").route.pick(&[]);
        }
        // A second instance joins, both idle: the newcomer, never chosen, gets the next request.
        rt.publish(RouteConfig { apps: vec![app("web", &["w"], 2)] });
        let t = rt.load();
        let route = t.lookup("w", "/").expect("route").route;
        assert_eq!(route.backends[1].last_pick.load(Ordering::Relaxed), 0);
        assert_eq!(route.pick(&[]), Some(1));
    }

    #[test]
    fn ejected_and_unhealthy_backends_are_skipped_unless_nothing_else_is_left() {
        let rt = RouteTable::default();
        rt.publish(RouteConfig { apps: vec![app("web", &["w"], 3)] });
        let t = rt.load();
        let route = t.lookup("w", "/").expect("route").route;
        route.backends[0].eject();
        route.backends[1].set_healthy(false);
        for _ in 0..50 {
            assert_eq!(route.pick(&[]), Some(2));
        }
        // Only the two unavailable ones left: still served.
        assert!(route.pick(&[2]).is_some());
    }

    #[test]
    fn round_robin_visits_every_backend() {
        let rt = RouteTable::default();
        let mut a = app("web", &["w"], 3);
        a.options.balance = Balance::RoundRobin;
        rt.publish(RouteConfig { apps: vec![a] });
        let t = rt.load();
        let route = t.lookup("w", "/").expect("route").route;
        let picks: Vec<usize> = (0..6).filter_map(|_| route.pick(&[])).collect();
        assert_eq!(picks, vec![0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn random_pairs_are_distinct_and_in_range() {
        for n in 2..6 {
            for _ in 0..200 {
                let (a, b) = two_random(n);
                assert!(a < n && b < n && a != b);
            }
        }
    }

    #[test]
    fn prefixes_match_whole_segments() {
        assert!(path_has_prefix("/api", "/api"));
        assert!(path_has_prefix("/api/", "/api/"));
        assert!(path_has_prefix("/api/x", "/api/"));
        assert!(!path_has_prefix("/apix", "/api"));
        assert!(path_has_prefix("/anything", ""));
        assert_eq!(split_host_prefix("example.com/api/v1"), ("example.com", "/api/v1"));
    }
}
