//! The promise: no failed request while the operator scales, deploys, and while instances, the
//! daemon and the proxy die or are upgraded. A load generator on loopback sends GETs and POSTs
//! through the proxy, over kept-alive and fresh connections, while the test does one thing after
//! another; not one request may fail.
//!
//! The clients are strict: no retries. A kept-alive connection is reused until the proxy says
//! `Connection: close`, as real clients do. Half of them mark their POSTs with an
//! `Idempotency-Key`, the other half send plain POSTs. A plain POST that an instance had read
//! when it was killed is replayed only because the app opts in (`--retry-non-idempotent`: its
//! writes tolerate it); without that, such a POST gets a 502, as from nginx, since the app may
//! have acted on it. Every request must succeed.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{wait_until, Conn, Daemon, Registry};

const HOST: &str = "web.localhost";
const KILL_PHASE: &str = "kill -9 of an instance";

#[derive(Default)]
struct Tally {
    ok_get: AtomicU64,
    ok_post: AtomicU64,
    failed: AtomicU64,
    errors: Mutex<Vec<String>>,
}

impl Tally {
    fn ok(&self) -> u64 {
        self.ok_get.load(Ordering::Relaxed) + self.ok_post.load(Ordering::Relaxed)
    }
    fn fail(&self, what: String) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        let mut e = self.errors.lock().unwrap_or_else(|p| p.into_inner());
        if e.len() < 20 {
            e.push(what);
        }
    }
}

/// One client thread: GET and POST in turn; `fresh` opens a connection per request.
fn client(
    addr: String,
    fresh: bool,
    keyed: bool,
    stop: Arc<AtomicBool>,
    tally: Arc<Tally>,
    phase: Arc<Mutex<&'static str>>,
) {
    let mut conn: Option<Conn> = None;
    let mut n: u64 = 0;
    let client_id = common::unique_hex(8);
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let post = n % 2 == 0;
        let body = format!("order {n}");
        let c = match conn.as_mut() {
            Some(c) => c,
            None => match Conn::open(&addr) {
                Ok(c) => conn.insert(c),
                Err(e) => {
                    tally.fail(format!("[{}] connect: {e}", phase.lock().map(|p| *p).unwrap_or("?")));
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
            },
        };
        let key = format!("{client_id}-{n}");
        let headers: &[(&str, &str)] = if keyed { &[("Idempotency-Key", key.as_str())] } else { &[] };
        let result = if post {
            c.request("POST", "/upload", HOST, headers, body.as_bytes())
        } else {
            c.request("GET", "/hostname", HOST, &[], b"")
        };
        let phase_now = || phase.lock().map(|p| *p).unwrap_or("?");
        match result {
            Ok(r) if r.status == 200 => {
                if post {
                    let expected = format!("bytes={} ", body.len());
                    if r.text().starts_with(&expected) {
                        tally.ok_post.fetch_add(1, Ordering::Relaxed);
                    } else {
                        tally.fail(format!("[{}] POST answered {:?}", phase_now(), r.text()));
                    }
                } else {
                    tally.ok_get.fetch_add(1, Ordering::Relaxed);
                }
                if fresh || r.header("connection").is_some_and(|v| v.eq_ignore_ascii_case("close")) {
                    conn = None;
                }
            }
            Ok(r) => {
                tally.fail(format!(
                    "[{}] {} {} → {} {}",
                    phase_now(),
                    if post { "POST" } else { "GET" },
                    n,
                    r.status,
                    r.text().trim()
                ));
                conn = None;
            }
            Err(e) => {
                tally.fail(format!("[{}] {} {}: {e}", phase_now(), if post { "POST" } else { "GET" }, n));
                conn = None;
            }
        }
    }
}

fn instances(daemon: &Daemon) -> Vec<serde_json::Value> {
    daemon.cli_json(&["app", "show", "web", "--json"])["instances"].as_array().cloned().unwrap_or_default()
}

fn running(daemon: &Daemon) -> usize {
    instances(daemon).iter().filter(|i| i["state"] == "running").count()
}

/// Waits until exactly `n` instances run (none starting or stopping).
fn settle(daemon: &Daemon, n: usize, what: &str) {
    assert!(
        wait_until(Duration::from_secs(60), || {
            let all = instances(daemon);
            all.len() == n && all.iter().all(|i| i["state"] == "running")
        }),
        "{what}: not {n} running instances: {:?}",
        instances(daemon)
    );
}

#[test]
fn no_request_fails_through_scaling_deploys_kills_restarts_and_upgrades() {
    let registry = Registry::start();
    let image = common::push_testapp(&registry, "demo/testapp:1");
    let mut daemon = Daemon::start(&registry);
    daemon.cli_ok(&[
        "app",
        "create",
        "web",
        "--image",
        &image.reference,
        "--port",
        "8080",
        "-e",
        "VERSION=1",
        "--retry-non-idempotent",
    ]);
    daemon.cli_ok(&["app", "start", "web"]);
    daemon.cli_ok(&["app", "scale", "web", "2"]);
    settle(&daemon, 2, "start");

    let addr = daemon.proxy_addr().to_string();
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let phase = Arc::new(Mutex::new("warm-up"));
    let clients: Vec<_> = (0..4)
        .map(|i| {
            let (addr, stop, tally, phase) = (addr.clone(), stop.clone(), tally.clone(), phase.clone());
            std::thread::spawn(move || client(addr, i % 2 == 1, i < 2, stop, tally, phase))
        })
        .collect();
    let set_phase = |p: &'static str| {
        *phase.lock().unwrap_or_else(|e| e.into_inner()) = p;
    };
    let mut report = Vec::new();
    let mut mark = |name: &str, tally: &Tally, since: &mut (u64, Instant)| {
        let ok = tally.ok();
        report.push(format!(
            "{name}: {} ok in {:.1}s, {} failed so far",
            ok - since.0,
            since.1.elapsed().as_secs_f64(),
            tally.failed.load(Ordering::Relaxed)
        ));
        *since = (ok, Instant::now());
    };
    let mut since = (0, Instant::now());
    std::thread::sleep(Duration::from_secs(1));
    mark("warm-up", &tally, &mut since);

    set_phase("scale 2→7");
    daemon.cli_ok(&["app", "scale", "web", "7"]);
    settle(&daemon, 7, "scale up");
    std::thread::sleep(Duration::from_millis(500));
    set_phase("scale 7→2");
    daemon.cli_ok(&["app", "scale", "web", "2"]);
    settle(&daemon, 2, "scale down");
    mark("scale 2→7→2", &tally, &mut since);

    set_phase("rolling deploy");
    let before = instances(&daemon).iter().map(|i| i["revision"].clone()).collect::<Vec<_>>();
    daemon.cli_ok(&["app", "config", "web", "-e", "VERSION=2"]);
    assert!(
        wait_until(Duration::from_secs(60), || {
            let all = instances(&daemon);
            all.len() == 2 && all.iter().all(|i| i["state"] == "running" && !before.contains(&i["revision"]))
        }),
        "the deploy did not finish: {:?}",
        instances(&daemon)
    );
    mark("rolling deploy", &tally, &mut since);

    set_phase(KILL_PHASE);
    let victim = instances(&daemon)[0]["pid"].as_i64().expect("instance pid") as i32;
    // SAFETY: kill(2) on the PID of an instance this test started.
    assert_eq!(unsafe { libc::kill(victim, libc::SIGKILL) }, 0);
    assert!(
        wait_until(Duration::from_secs(30), || {
            let all = instances(&daemon);
            all.len() == 2 && all.iter().all(|i| i["state"] == "running" && i["pid"].as_i64() != Some(victim as i64))
        }),
        "the killed instance was not replaced: {:?}",
        instances(&daemon)
    );
    mark("kill -9 of an instance", &tally, &mut since);

    set_phase("kill -9 of the daemon");
    daemon.kill9();
    std::thread::sleep(Duration::from_secs(1));
    set_phase("daemon restart");
    daemon.restart();
    assert_eq!(running(&daemon), 2);
    std::thread::sleep(Duration::from_millis(500));
    mark("kill -9 of the daemon, restart", &tally, &mut since);

    set_phase("upgrade hand-over");
    let proxy_before = daemon.proxy_pid().expect("proxy runs");
    daemon.upgrade();
    assert!(
        wait_until(Duration::from_secs(10), || daemon.proxy_pid().is_some_and(|p| p != proxy_before)),
        "the proxy was not replaced on upgrade"
    );
    assert_eq!(running(&daemon), 2);
    // The old proxy winds down: its connections move to the new one.
    assert!(
        wait_until(Duration::from_secs(40), || !std::path::Path::new(&format!("/proc/{proxy_before}")).exists()
            || std::fs::read_to_string(format!("/proc/{proxy_before}/stat")).is_ok_and(|s| s.contains(") Z "))),
        "the old proxy (pid {proxy_before}) did not exit"
    );
    mark("upgrade hand-over", &tally, &mut since);

    set_phase("cool-down");
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().expect("client thread");
    }
    mark("cool-down", &tally, &mut since);
    let (get, post, failed) = (
        tally.ok_get.load(Ordering::Relaxed),
        tally.ok_post.load(Ordering::Relaxed),
        tally.failed.load(Ordering::Relaxed),
    );
    eprintln!("zero-downtime run:\n  {}\n  total: {get} GET ok, {post} POST ok, {failed} failed", report.join("\n  "));
    let errors = tally.errors.lock().map(|e| e.clone()).unwrap_or_default();
    assert_eq!(failed, 0, "failed requests: {errors:#?}\n{}", report.join("\n"));
    assert!(get > 500 && post > 500, "too little load to tell: {get} GET, {post} POST");
}

#[test]
fn a_killed_proxy_is_started_again_and_connections_wait_instead_of_being_refused() {
    let registry = Registry::start();
    let image = common::push_testapp(&registry, "demo/testapp:1");
    let daemon = Daemon::start(&registry);
    daemon.cli_ok(&["app", "create", "web", "--image", &image.reference, "--port", "8080"]);
    daemon.cli_ok(&["app", "start", "web"]);
    settle(&daemon, 1, "start");
    let (status, _) = common::http_get(daemon.proxy_addr(), HOST, "/hostname");
    assert_eq!(status, 200);

    let first = daemon.proxy_pid().expect("proxy runs");
    // SAFETY: kill(2) on the proxy process this test's daemon started.
    assert_eq!(unsafe { libc::kill(first as i32, libc::SIGKILL) }, 0);
    // At once, before a new proxy can be up: the daemon still holds the listening socket, so
    // the connection is accepted by the kernel and answered once the new proxy runs.
    let mut c = Conn::open(daemon.proxy_addr()).expect("the connection is not refused");
    let r = c.request("GET", "/hostname", HOST, &[], b"").expect("answered by the new proxy");
    assert_eq!(r.status, 200, "{}", r.text());
    // It may answer a moment before it has written its PID file.
    assert!(wait_until(Duration::from_secs(5), || daemon.proxy_pid().is_some_and(|p| p != first)), "no new proxy PID");
    // The new proxy got the whole route table.
    let r = c.request("GET", "/hostname", HOST, &[], b"").expect("second request");
    assert_eq!(r.status, 200, "{}", r.text());
}
