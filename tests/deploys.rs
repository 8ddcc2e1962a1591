//! Deploys are revisions: a rolling deploy under a steady stream of requests drops none, the
//! history lists what was deployed and how it ended, a rollback goes back (again dropping
//! none), a revision that never becomes healthy is rolled back on its own while the old
//! instances serve, `--surge 2` moves two slots at a time, and an instance that stays unhealthy
//! is replaced while the others are left alone; a deploy cut short by a daemon crash is
//! finished by the next daemon.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::{http_get, http_get_retry, try_http_get, wait_until, Conn, Daemon, PushedImage, Registry};
use serde_json::Value;

const HOST: &str = "web.localhost";

fn setup() -> (Registry, PushedImage, Daemon) {
    let registry = Registry::start();
    let image = common::push_testapp(&registry, "demo/testapp:1");
    let daemon = Daemon::start(&registry);
    (registry, image, daemon)
}

/// Creates and starts `web` with `instances`, `VERSION=1` and a quick health check on
/// `/health`, plus `flags`; waits until it answers through the proxy.
fn launch(daemon: &Daemon, image: &PushedImage, instances: u32, flags: &[&str]) {
    let n = instances.to_string();
    let mut args = vec!["app", "create", "web", "--image", &image.reference, "--port", "8080", "--instances", &n];
    args.extend_from_slice(&["-e", "VERSION=1", "--health", "/health", "--health-interval", "200ms"]);
    args.extend_from_slice(flags);
    daemon.cli_ok(&args);
    daemon.cli_ok(&["app", "start", "web"]);
    http_get_retry(daemon.proxy_addr(), HOST, "/env/VERSION", Duration::from_secs(30), |s, _| s == 200);
}

fn show(daemon: &Daemon) -> Value {
    daemon.cli_json(&["app", "show", "web", "--json"])
}

fn instances(show: &Value) -> Vec<Value> {
    show["instances"].as_array().cloned().unwrap_or_default()
}

/// `GET path` on the daemon's API socket.
fn api_get(daemon: &Daemon, path: &str) -> String {
    let out = std::process::Command::new("curl")
        .args(["-sS", "--unix-socket"])
        .arg(daemon.socket())
        .arg(format!("http://localhost{path}"))
        .output()
        .expect("run curl");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The app's events, oldest first.
fn events(daemon: &Daemon) -> Vec<Value> {
    api_get(daemon, "/v1/events?app=web").lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
}

/// A steady stream of `GET /env/VERSION` through the proxy: two clients on keep-alive
/// connections, two opening a fresh connection per request. Counts answers and failures.
struct Load {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    ok: Arc<Mutex<u64>>,
    failures: Arc<Mutex<Vec<String>>>,
    versions: Arc<Mutex<std::collections::BTreeMap<String, u64>>>,
}

impl Load {
    fn start(proxy: &str) -> Load {
        let mut load = Load {
            stop: Arc::new(AtomicBool::new(false)),
            threads: Vec::new(),
            ok: Arc::default(),
            failures: Arc::default(),
            versions: Arc::default(),
        };
        for keep_alive in [true, true, false, false] {
            let (stop, ok, failures, versions) =
                (load.stop.clone(), load.ok.clone(), load.failures.clone(), load.versions.clone());
            let proxy = proxy.to_string();
            load.threads.push(std::thread::spawn(move || {
                let mut conn: Option<Conn> = None;
                while !stop.load(Ordering::Relaxed) {
                    let answer = if keep_alive {
                        let c = match conn.as_mut() {
                            Some(c) => c,
                            None => match Conn::open(&proxy) {
                                Ok(c) => conn.insert(c),
                                Err(e) => {
                                    failures.lock().unwrap().push(format!("connect: {e}"));
                                    continue;
                                }
                            },
                        };
                        c.request("GET", "/env/VERSION", HOST, &[], b"").map(|r| (r.status, r.text()))
                    } else {
                        try_http_get(&proxy, HOST, "/env/VERSION")
                    };
                    match answer {
                        Ok((200, body)) => {
                            *ok.lock().unwrap() += 1;
                            *versions.lock().unwrap().entry(body.trim().to_string()).or_default() += 1;
                        }
                        Ok((status, body)) => failures.lock().unwrap().push(format!("{status} {body:?}")),
                        Err(e) => {
                            failures.lock().unwrap().push(format!("keep-alive {keep_alive}: {e}"));
                            conn = None;
                        }
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
            }));
        }
        load
    }

    /// Stops the clients; returns (answered, failures, answers per VERSION).
    fn finish(mut self) -> (u64, Vec<String>, std::collections::BTreeMap<String, u64>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        let ok = *self.ok.lock().unwrap();
        let failures = self.failures.lock().unwrap().clone();
        let versions = self.versions.lock().unwrap().clone();
        (ok, failures, versions)
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Every instance runs `revision`, there are `count` of them, and they answer `VERSION`.
fn assert_all_on(daemon: &Daemon, revision: u64, count: usize, version: &str) {
    let s = show(daemon);
    let all = instances(&s);
    assert_eq!(all.len(), count, "{s:#}");
    assert!(all.iter().all(|i| i["revision"] == revision && i["state"] == "running"), "{s:#}");
    assert_eq!(s["revision"]["number"], revision, "{s:#}");
    for _ in 0..count * 2 {
        let (status, body) = http_get(daemon.proxy_addr(), HOST, "/env/VERSION");
        assert_eq!((status, body.trim()), (200, version));
    }
}

fn history(daemon: &Daemon) -> Vec<Value> {
    daemon.cli_json(&["app", "history", "web", "--json"]).as_array().cloned().unwrap_or_default()
}

fn entry(history: &[Value], number: u64) -> Value {
    history.iter().find(|r| r["number"] == number).cloned().unwrap_or_else(|| panic!("no revision {number}"))
}

#[test]
fn a_rolling_deploy_and_a_rollback_under_load_drop_no_request() {
    let (_registry, image, daemon) = setup();
    launch(&daemon, &image, 3, &[]);

    let load = Load::start(daemon.proxy_addr());
    std::thread::sleep(Duration::from_millis(500));
    let out = daemon.cli_ok(&["app", "deploy", "web", "-e", "VERSION=2"]);
    std::thread::sleep(Duration::from_millis(500));
    let (ok, failures, versions) = load.finish();
    eprintln!("deploy under load: {ok} answered, {} failed, versions {versions:?}", failures.len());
    assert!(failures.is_empty(), "failed requests during the deploy: {failures:?}");
    assert!(ok > 50 && versions.contains_key("1") && versions.contains_key("2"), "{versions:?}");
    assert!(out.contains("revision 2 deployed (was revision 1)"), "{out}");
    assert_all_on(&daemon, 2, 3, "2");

    let h = history(&daemon);
    assert_eq!(h.len(), 2, "{h:#?}");
    let (r1, r2) = (entry(&h, 1), entry(&h, 2));
    assert_eq!((r2["current"].clone(), r2["outcome"].clone()), (Value::Bool(true), Value::from("deployed")));
    assert_eq!((r1["current"].clone(), r1["outcome"].clone()), (Value::Bool(false), Value::from("deployed")));
    assert!(r2["changes"].as_array().is_some_and(|c| c.contains(&Value::from("env VERSION: 1 → 2"))), "{r2:#}");
    let table = daemon.cli_ok(&["app", "history", "web"]);
    assert!(table.contains("*2") && table.contains("env VERSION: 1 → 2"), "{table}");
    let text = daemon.cli_ok(&["app", "show", "web"]);
    assert!(text.contains("HEALTH") && text.contains("revision 2 (deploy, deployed)"), "{text}");

    let load = Load::start(daemon.proxy_addr());
    std::thread::sleep(Duration::from_millis(500));
    let out = daemon.cli_ok(&["app", "rollback", "web"]);
    std::thread::sleep(Duration::from_millis(500));
    let (ok, failures, versions) = load.finish();
    eprintln!("rollback under load: {ok} answered, {} failed, versions {versions:?}", failures.len());
    assert!(failures.is_empty(), "failed requests during the rollback: {failures:?}");
    assert!(out.contains("revision 1 deployed (was revision 2)"), "{out}");
    assert_all_on(&daemon, 1, 3, "1");
    let h = history(&daemon);
    assert_eq!(h.len(), 2, "a rollback reuses the revision: {h:#?}");
    assert_eq!(entry(&h, 1)["current"], true);
    assert_eq!(entry(&h, 2)["outcome"], "rolled back");

    // Nothing earlier than revision 1 to go back to from it; an unknown revision is a 404.
    let none = daemon.cli(&["app", "rollback", "web", "--to", "9"]);
    assert!(!none.success() && none.stderr.contains("no revision 9"), "{}", none.stderr);
    let same = daemon.cli(&["app", "rollback", "web", "--to", "1"]);
    assert!(!same.success() && same.stderr.contains("already runs revision 1"), "{}", same.stderr);
}

#[test]
fn a_revision_that_never_becomes_healthy_is_rolled_back_while_the_old_one_serves() {
    let (_registry, image, daemon) = setup();
    launch(&daemon, &image, 2, &["--deploy-timeout", "4s"]);
    let before: Vec<Value> = instances(&show(&daemon)).iter().map(|i| i["id"].clone()).collect();

    let load = Load::start(daemon.proxy_addr());
    let started = Instant::now();
    let out = daemon.cli(&["app", "deploy", "web", "-e", "VERSION=2", "-e", "UNHEALTHY_AT_START=1"]);
    let took = started.elapsed();
    std::thread::sleep(Duration::from_millis(300));
    let (ok, failures, versions) = load.finish();
    eprintln!("failed deploy under load: {ok} answered, {} failed, versions {versions:?}", failures.len());
    assert!(!out.success(), "the deploy must fail: {}", out.stdout);
    assert!(
        out.stderr.contains("deploy of revision 2 failed")
            && out.stderr.contains("status 503")
            && out.stderr.contains("rolled back to revision 1"),
        "{}",
        out.stderr
    );
    assert!(out.stderr.contains("deploy failed") && out.stderr.contains("rolled back"), "progress: {}", out.stderr);
    assert!(took >= Duration::from_secs(4), "it waited the deploy timeout: {took:?}");
    assert!(failures.is_empty(), "failed requests: {failures:?}");
    assert_eq!(versions.keys().collect::<Vec<_>>(), ["1"], "only the old revision answered");

    assert_all_on(&daemon, 1, 2, "1");
    let after: Vec<Value> = instances(&show(&daemon)).iter().map(|i| i["id"].clone()).collect();
    assert_eq!(before, after, "the old instances were never stopped");
    let s = show(&daemon);
    assert_eq!(s["last_deploy"]["state"], "failed", "{s:#}");
    assert_eq!(s["env"]["VERSION"], "1", "the app's configuration went back too");
    let h = history(&daemon);
    let r2 = entry(&h, 2);
    assert_eq!(r2["outcome"], "failed", "{r2:#}");
    assert!(r2["reason"].as_str().is_some_and(|r| r.contains("status 503")), "{r2:#}");
    assert_eq!(entry(&h, 1)["current"], true);
    let kinds: Vec<String> = events(&daemon).iter().filter_map(|e| e["kind"].as_str().map(String::from)).collect();
    for kind in ["deploy_started", "deploy_failed", "rolled_back"] {
        assert!(kinds.iter().any(|k| k == kind), "no {kind} event in {kinds:?}");
    }

    // A revision whose process exits at once (it cannot listen on that port) fails as well.
    let out = daemon.cli(&["app", "deploy", "web", "-e", "PORT=not-a-port"]);
    assert!(!out.success(), "the deploy must fail: {}", out.stdout);
    assert!(
        out.stderr.contains("deploy of revision 3 failed") && out.stderr.contains("exited before it became ready"),
        "{}",
        out.stderr
    );
    assert_all_on(&daemon, 1, 2, "1");
    let after: Vec<Value> = instances(&show(&daemon)).iter().map(|i| i["id"].clone()).collect();
    assert_eq!(before, after, "the old instances were never stopped");
    assert_eq!(entry(&history(&daemon), 3)["outcome"], "failed");
}

/// Counts the app's instances every 30 ms from another thread; `finish` gives (fewest, most).
struct Census {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<(usize, usize)>>,
}

impl Census {
    fn start(daemon: &Daemon) -> Census {
        let stop = Arc::new(AtomicBool::new(false));
        let (stop2, socket) = (stop.clone(), daemon.socket());
        let thread = std::thread::spawn(move || {
            let (mut fewest, mut most) = (usize::MAX, 0);
            while !stop2.load(Ordering::Relaxed) {
                let out = std::process::Command::new("curl")
                    .args(["-sS", "--unix-socket"])
                    .arg(&socket)
                    .arg("http://localhost/v1/apps/web")
                    .output();
                if let Ok(v) = out.map(|o| serde_json::from_slice::<Value>(&o.stdout).unwrap_or_default()) {
                    if v["instances"].is_array() {
                        let n = instances(&v).len();
                        (fewest, most) = (fewest.min(n), most.max(n));
                    }
                }
                std::thread::sleep(Duration::from_millis(30));
            }
            (fewest, most)
        });
        Census { stop, thread: Some(thread) }
    }

    fn finish(mut self) -> (usize, usize) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().map(|t| t.join().expect("census thread")).unwrap_or_default()
    }
}

impl Drop for Census {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

#[test]
fn surge_two_moves_two_slots_at_a_time_and_max_unavailable_stops_first() {
    let (_registry, image, daemon) = setup();
    launch(&daemon, &image, 4, &["--surge", "2"]);

    let census = Census::start(&daemon);
    daemon.cli_ok(&["app", "deploy", "web", "-e", "VERSION=2"]);
    let (_, most) = census.finish();
    assert_all_on(&daemon, 2, 4, "2");
    assert_eq!(most, 6, "4 instances plus a surge of 2");

    let progress: Vec<String> = events(&daemon)
        .iter()
        .filter(|e| e["kind"] == "deploy_progress")
        .filter_map(|e| e["message"].as_str().map(String::from))
        .collect();
    let batches: Vec<&String> = progress.iter().filter(|m| m.starts_with("batch ")).collect();
    assert_eq!(
        batches,
        ["batch 1/2: starting web.1, web.2 on revision 2", "batch 2/2: starting web.3, web.4 on revision 2"],
        "{progress:#?}"
    );

    // No room for more: old instances go first, never more than 2 at a time.
    let census = Census::start(&daemon);
    daemon.cli_ok(&["app", "deploy", "web", "-e", "VERSION=3", "--surge", "0", "--max-unavailable", "2"]);
    let (fewest, most) = census.finish();
    assert_all_on(&daemon, 3, 4, "3");
    assert_eq!(most, 4, "never more than the desired count");
    assert!((2..4).contains(&fewest), "old instances stopped first, at most 2: fewest {fewest}");
}

#[test]
fn an_instance_that_stays_unhealthy_is_replaced_and_the_others_are_untouched() {
    let (_registry, image, daemon) = setup();
    launch(&daemon, &image, 3, &["--health-fall", "2", "--unhealthy-timeout", "2s"]);
    let before = instances(&show(&daemon));
    assert!(
        wait_until(Duration::from_secs(10), || instances(&show(&daemon)).iter().all(|i| i["health"] == "healthy")),
        "{:#}",
        show(&daemon)
    );
    let sick = before.iter().find(|i| i["name"] == "web.2").expect("web.2").clone();
    let ip = sick["ip"].as_str().expect("ip");
    let marked = Instant::now();
    let (status, body) = http_get(&format!("{ip}:8080"), "web", "/health/set?ok=0");
    assert_eq!(status, 200, "{body}");

    assert!(
        wait_until(Duration::from_secs(10), || {
            instances(&show(&daemon)).iter().any(|i| i["id"] == sick["id"] && i["health"] == "unhealthy")
        }),
        "web.2 never shown unhealthy: {:#}",
        show(&daemon)
    );
    let replaced = wait_until(Duration::from_secs(40), || {
        let now = instances(&show(&daemon));
        now.len() == 3 && !now.iter().any(|i| i["id"] == sick["id"])
    });
    let took = marked.elapsed();
    assert!(replaced, "web.2 was not replaced: {:#}", show(&daemon));
    // fall (2 × 200 ms) + the 2 s grace + a new instance's start: never before the grace.
    assert!(took >= Duration::from_secs(2), "replaced before its grace period: {took:?}");
    eprintln!("unhealthy web.2 replaced {took:?} after it started failing");

    let after = instances(&show(&daemon));
    for name in ["web.1", "web.3"] {
        let id = |list: &[Value]| list.iter().find(|i| i["name"] == name).map(|i| i["id"].clone());
        assert_eq!(id(&before), id(&after), "{name} was touched");
    }
    let new = after.iter().find(|i| i["name"] == "web.2").expect("a new web.2");
    assert_eq!(new["state"], "running");
    let (status, _) = http_get(&format!("{}:8080", new["ip"].as_str().expect("ip")), "web", "/health");
    assert_eq!(status, 200);
    let unhealthy = events(&daemon)
        .iter()
        .any(|e| e["kind"] == "instance_unhealthy" && e["instance"] == "web.2" && e["message"].is_string());
    assert!(unhealthy, "no instance_unhealthy event for web.2");
}

/// A `deliverous` CLI process started by a test; killed (by its PID) and reaped on drop.
struct CliProcess(std::process::Child);

impl Drop for CliProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_deploy_cut_short_by_a_daemon_crash_is_finished_by_the_next_daemon() {
    let (_registry, image, mut daemon) = setup();
    launch(&daemon, &image, 3, &[]);

    let host = format!("unix:{}", daemon.socket().display());
    let cli = std::process::Command::new(env!("CARGO_BIN_EXE_deliverous"))
        .args(["--host", &host, "app", "deploy", "web", "-e", "VERSION=2"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("run deliverous app deploy");
    let cli = CliProcess(cli);
    // Killed once the first new instance is up, before the rollout is through.
    let underway = wait_until(Duration::from_secs(30), || {
        events(&daemon)
            .iter()
            .any(|e| e["kind"] == "instance_started" && e["message"].as_str().is_some_and(|m| m.contains("revision 2")))
    });
    assert!(underway, "the deploy never started a new instance");
    daemon.kill9();
    drop(cli);

    daemon.restart();
    let done = wait_until(Duration::from_secs(60), || {
        let s = show(&daemon);
        let all = instances(&s);
        s["last_deploy"]["state"] == "deployed"
            && all.len() == 3
            && all.iter().all(|i| i["revision"] == 2 && i["state"] == "running")
    });
    assert!(done, "the interrupted deploy was not finished: {:#}", show(&daemon));
    assert_all_on(&daemon, 2, 3, "2");
    let resumed = events(&daemon).iter().any(|e| {
        e["kind"] == "deploy_progress" && e["message"].as_str().is_some_and(|m| m.starts_with("resuming the deploy"))
    });
    assert!(resumed, "no resume event");
    assert_eq!(entry(&history(&daemon), 2)["outcome"], "deployed");
}
