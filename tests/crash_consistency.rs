//! Crash consistency: the daemon `kill -9`ed at any moment of a scale or a rolling deploy
//! leaves a state from which the next daemon converges — the desired number of instances,
//! all on the desired revision — and nothing is orphaned: every instance dir, netns file,
//! veth, cgroup, shim (and its socket and container state) and IP lease belongs to a live
//! instance.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{http_get_retry, wait_until, Daemon, PushedImage, Registry};
use serde_json::Value;

const HOST: &str = "web.localhost";
/// Moments after the command was sent at which the daemon dies: dense early on, where a
/// scale or a deploy step is still under way on a fast machine.
const DELAYS_MS: [u64; 10] = [0, 5, 10, 20, 35, 50, 100, 150, 400, 900];

fn setup(instances: u32) -> (Registry, PushedImage, Daemon) {
    let registry = Registry::start();
    let image = common::push_testapp(&registry, "demo/testapp:1");
    let daemon = Daemon::start(&registry);
    let n = instances.to_string();
    daemon.cli_ok(&[
        "app",
        "create",
        "web",
        "--image",
        &image.reference,
        "--port",
        "8080",
        "--instances",
        &n,
        "-e",
        "VERSION=0",
        "--health",
        "/health",
        "--health-interval",
        "200ms",
    ]);
    daemon.cli_ok(&["app", "start", "web"]);
    http_get_retry(daemon.proxy_addr(), HOST, "/env/VERSION", Duration::from_secs(30), |s, _| s == 200);
    (registry, image, daemon)
}

fn show(daemon: &Daemon) -> Value {
    daemon.cli_json(&["app", "show", "web", "--json"])
}

/// A `deliverous` CLI process started by a test; killed (by its PID) and reaped on drop.
struct CliProcess(std::process::Child);

impl Drop for CliProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_cli(daemon: &Daemon, args: &[&str]) -> CliProcess {
    let host = format!("unix:{}", daemon.socket().display());
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_deliverous"))
        .args(["--host", &host])
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("run the deliverous CLI");
    CliProcess(child)
}

/// Sends `args` to the daemon, kills it `delay` later, starts it again. Prints what the kill
/// interrupted: the instance dirs and instance records there were at that moment.
fn crash_during(daemon: &mut Daemon, args: &[&str], delay: Duration) {
    let cli = spawn_cli(daemon, args);
    std::thread::sleep(delay);
    daemon.kill9();
    drop(cli);
    let dirs = std::fs::read_dir(daemon.data_dir().join("instances")).map(|d| d.count()).unwrap_or(0);
    let records = leases(&daemon.data_dir().join("state.db")).len();
    eprintln!("{args:?} killed after {delay:?}: {dirs} instance dirs, {records} instance records");
    daemon.restart();
}

/// Whether the app runs as many instances as it wants (one per slot), all ready on its
/// current revision; `Some(count)` then.
fn converged(s: &Value) -> Option<usize> {
    let revision = s["revision"]["number"].as_u64()?;
    let desired = s["instances_desired"].as_u64()?;
    let instances = s["instances"].as_array().cloned().unwrap_or_default();
    let slots: BTreeSet<u64> = instances.iter().filter_map(|i| i["slot"].as_u64()).collect();
    let done = instances.len() as u64 == desired
        && slots == (1..=desired).collect()
        && instances.iter().all(|i| i["state"] == "running" && i["revision"].as_u64() == Some(revision));
    done.then_some(desired as usize)
}

/// Everything of this daemon's that names an instance which is not one of `live`.
fn orphans(daemon: &Daemon, live: &BTreeSet<String>) -> Vec<String> {
    let names = daemon.names();
    let mut found = Vec::new();
    let dir_entries = |dir: PathBuf| -> Vec<String> {
        std::fs::read_dir(dir)
            .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default()
    };
    for (what, dir) in [
        ("instance dir", daemon.data_dir().join("instances")),
        ("netns", daemon.run_dir().join("netns")),
        ("container state", daemon.run_dir().join("containers")),
    ] {
        for name in dir_entries(dir) {
            if !live.contains(&name) {
                found.push(format!("{what} {name}"));
            }
        }
    }
    for name in dir_entries(daemon.run_dir().join("shims")) {
        let uid = name.strip_suffix(".sock").unwrap_or(&name);
        if !live.contains(uid) {
            found.push(format!("shim socket {name}"));
        }
    }
    let veths: BTreeSet<String> =
        live.iter().map(|uid| deliverous_runtime::network::veth_name(&names.veth_prefix, uid)).collect();
    for name in dir_entries(PathBuf::from("/sys/class/net")) {
        if name.starts_with(&names.veth_prefix) && name.len() > names.veth_prefix.len() && !veths.contains(&name) {
            found.push(format!("veth {name}"));
        }
    }
    for parent in cgroup_parents(&names.cgroup_parent) {
        for entry in std::fs::read_dir(&parent).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if entry.path().is_dir() && !live.contains(&name) {
                found.push(format!("cgroup {}", entry.path().display()));
            }
        }
    }
    let data_dir = names.dir.to_string_lossy().into_owned();
    let shims = common::pids_where(|argv| {
        argv.get(1).is_some_and(|a| a == "shim") && argv.iter().any(|a| a.contains(&data_dir))
    });
    for pid in shims {
        let raw = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let argv: Vec<String> = raw.split(|b| *b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
        let id = argv.windows(2).find(|w| w[0] == "--id").map(|w| w[1].clone()).unwrap_or_default();
        if !live.contains(&id) {
            found.push(format!("shim process {pid} (--id {id:?})"));
        }
    }
    // Root filesystems (overlay mounts) and network namespaces are mounts.
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    for point in mounts.lines().filter_map(|l| l.split_whitespace().nth(4)) {
        for base in [daemon.data_dir().join("instances"), daemon.run_dir().join("netns")] {
            let Some(rest) = Path::new(point).strip_prefix(&base).ok() else { continue };
            let uid = rest.components().next().map(|c| c.as_os_str().to_string_lossy().into_owned());
            if uid.is_some_and(|uid| !live.contains(&uid)) {
                found.push(format!("mount {point}"));
            }
        }
    }
    for uid in leases(&daemon.data_dir().join("state.db")) {
        if !live.contains(&uid) {
            found.push(format!("instance record / IP lease {uid}"));
        }
    }
    found
}

/// The instance cgroup parents of this daemon: one per v1 hierarchy, or the v2 one.
fn cgroup_parents(parent: &str) -> Vec<PathBuf> {
    if common::cgroup_v2() {
        return vec![Path::new("/sys/fs/cgroup").join(parent)];
    }
    std::fs::read_dir("/sys/fs/cgroup")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join(parent))
        .filter(|p| p.is_dir())
        .collect()
}

/// The instances the state database holds (each with its IP lease).
fn leases(db: &Path) -> Vec<String> {
    let flags = rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = rusqlite::Connection::open_with_flags(db, flags).expect("open the state database");
    conn.busy_timeout(Duration::from_secs(5)).expect("busy timeout");
    let mut stmt = conn.prepare("SELECT uid FROM instances").expect("query instances");
    let rows = stmt.query_map([], |r| r.get::<_, String>(0)).expect("read instances");
    rows.map(|r| r.expect("an instance row")).collect()
}

/// Waits until the app converged and nothing is orphaned, and returns its instance count,
/// which must be one of `counts` (a command the kill cut short is either recorded or not);
/// panics with what is wrong otherwise.
fn assert_converged_and_clean(daemon: &Daemon, counts: &[usize], what: &str) -> usize {
    let started = Instant::now();
    let mut last = (Value::Null, Vec::new());
    let mut count = None;
    let ok = wait_until(Duration::from_secs(60), || {
        let s = show(daemon);
        let live: BTreeSet<String> = s["instances"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|i| i["id"].as_str().map(String::from))
            .collect();
        let left = orphans(daemon, &live);
        count = converged(&s).filter(|_| left.is_empty());
        last = (s, left);
        count.is_some()
    });
    assert!(
        ok,
        "{what}: not converged without orphans after {:?}\norphans: {:#?}\napp: {:#}\ndaemon log:\n{}",
        started.elapsed(),
        last.1,
        last.0,
        daemon.log_tail(60)
    );
    let count = count.unwrap_or_default();
    assert!(counts.contains(&count), "{what}: {count} instances, expected one of {counts:?}: {:#}", last.0);
    eprintln!("{what}: converged to {count} instances in {:?}", started.elapsed());
    count
}

/// Scales to `to`, the daemon killed `delay` after the command; checks the outcome, and
/// scales again if the kill came before the daemon recorded the command (as its user would).
fn scale_through_a_crash(daemon: &mut Daemon, from: usize, to: usize, delay: u64) {
    let n = to.to_string();
    crash_during(daemon, &["app", "scale", "web", &n], Duration::from_millis(delay));
    let what = format!("scale {from}→{to} killed after {delay} ms");
    if assert_converged_and_clean(daemon, &[from, to], &what) != to {
        daemon.cli_ok(&["app", "scale", "web", &n]);
        assert_converged_and_clean(daemon, &[to], &format!("{what}, then sent again"));
    }
}

#[test]
fn a_daemon_killed_at_any_moment_of_a_scale_converges_and_leaves_nothing_behind() {
    let (_registry, _image, mut daemon) = setup(1);
    let began = Instant::now();
    for delay in DELAYS_MS {
        scale_through_a_crash(&mut daemon, 1, 6, delay);
        scale_through_a_crash(&mut daemon, 6, 1, delay);
    }
    let (status, body) = common::http_get(daemon.proxy_addr(), HOST, "/env/VERSION");
    assert_eq!((status, body.trim()), (200, "0"));
    eprintln!("scale crashes: {:?} in all", began.elapsed());
}

#[test]
fn a_daemon_killed_at_any_moment_of_a_rolling_deploy_converges_and_leaves_nothing_behind() {
    let (_registry, _image, mut daemon) = setup(3);
    let began = Instant::now();
    for (i, delay) in DELAYS_MS.into_iter().enumerate() {
        let version = format!("VERSION={}", i + 1);
        crash_during(&mut daemon, &["app", "deploy", "web", "-e", &version], Duration::from_millis(delay));
        assert_converged_and_clean(&daemon, &[3], &format!("deploy killed after {delay} ms"));
        // Converged on the revision the app records: the new one if the deploy was recorded
        // before the kill, else the old one; never a mix. The proxy agrees.
        let s = show(&daemon);
        let env = s["env"]["VERSION"].as_str().unwrap_or_default().to_string();
        for _ in 0..10 {
            let (status, body) = common::http_get(daemon.proxy_addr(), HOST, "/env/VERSION");
            assert_eq!((status, body.trim()), (200, env.as_str()), "after the deploy killed at {delay} ms: {s:#}");
        }
        let finished = wait_until(Duration::from_secs(10), || show(&daemon)["last_deploy"]["state"] != "in_progress");
        assert!(finished, "the deploy is still marked in progress: {:#}", show(&daemon));
    }
    // A revision that never becomes ready, the daemon killed while it is tried: the next
    // daemon tries it again and rolls it back, to the same version as before.
    let before = show(&daemon)["env"]["VERSION"].as_str().unwrap_or_default().to_string();
    for delay in [300, 1500] {
        let args =
            ["app", "deploy", "web", "-e", "VERSION=bad", "-e", "UNHEALTHY_AT_START=1", "--deploy-timeout", "2s"];
        crash_during(&mut daemon, &args, Duration::from_millis(delay));
        let finished = wait_until(Duration::from_secs(30), || show(&daemon)["last_deploy"]["state"] != "in_progress");
        assert!(finished, "the failed deploy is still marked in progress: {:#}", show(&daemon));
        assert_converged_and_clean(&daemon, &[3], &format!("failing deploy killed after {delay} ms"));
        let s = show(&daemon);
        assert_eq!(s["env"]["VERSION"], before.as_str(), "not back on the previous configuration: {s:#}");
        for _ in 0..10 {
            let (status, body) = common::http_get(daemon.proxy_addr(), HOST, "/env/VERSION");
            assert_eq!((status, body.trim()), (200, before.as_str()), "{s:#}");
        }
    }
    eprintln!("deploy crashes: {:?} in all", began.elapsed());
}
