//! The walking skeleton, as a new user drives it with the CLI against a daemon it started:
//! declare, configure, launch and scale an app, and see it all through the proxy.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{http_get, Daemon, Registry};

/// Sends `n` requests for `web.localhost` and returns the distinct bodies' hostnames.
fn hostnames(daemon: &Daemon, host: &str, n: usize) -> BTreeSet<String> {
    (0..n)
        .map(|_| {
            let (status, body) = http_get(daemon.proxy_addr(), host, "/");
            assert_eq!(status, 200, "body: {body}\n--- daemon log ---\n{}", daemon.log_tail(30));
            body.split_whitespace()
                .find_map(|w| w.strip_prefix("host="))
                .unwrap_or_else(|| panic!("no host= in {body:?}"))
                .to_string()
        })
        .collect()
}

/// The unique ids of the instances in an `app show --json` answer.
fn instance_ids(show: &serde_json::Value) -> BTreeSet<String> {
    show["instances"].as_array().into_iter().flatten().map(|i| i["id"].as_str().unwrap_or("").to_string()).collect()
}

fn instance_count(daemon: &Daemon, app: &str) -> usize {
    let show = daemon.cli_json(&["app", "show", app, "--json"]);
    show["instances"].as_array().map(|a| a.len()).unwrap_or(0)
}

#[test]
fn declare_configure_launch_scale_remove() {
    let registry = Registry::start();
    let image = common::push_busybox_httpd(&registry, "demo/httpd:1");
    let daemon = Daemon::start(&registry);

    daemon.cli_ok(&["app", "create", "web", "--image", &image.reference, "--port", "80"]);
    let ls = daemon.cli_ok(&["app", "ls"]);
    assert!(ls.contains("web") && ls.contains("stopped"), "{ls}");
    // Not started yet: the proxy knows the app but has nobody to send to.
    let (status, _) = http_get(daemon.proxy_addr(), "web.localhost", "/");
    assert_eq!(status, 503);

    daemon.cli_ok(&[
        "app",
        "config",
        "web",
        "-e",
        "GREETING=hello",
        "--memory",
        "128M",
        "--cpus",
        "0.5",
        "--port",
        "8080",
    ]);
    daemon.cli_ok(&["app", "start", "web"]);
    assert_eq!(hostnames(&daemon, "web.localhost", 5), BTreeSet::from(["web.1".to_string()]));

    daemon.cli_ok(&["app", "scale", "web", "3"]);
    let seen = hostnames(&daemon, "web.localhost", 30);
    assert_eq!(seen, (1..=3).map(|i| format!("web.{i}")).collect(), "30 requests after scale 3");

    daemon.cli_ok(&["app", "scale", "web", "7"]);
    // Sequential requests find every instance idle: the balancer picks at random among them, and
    // 30 requests miss one of 7 instances 7% of the time; 100 requests, once in a million.
    assert_eq!(hostnames(&daemon, "web.localhost", 100).len(), 7);
    assert_eq!(instance_count(&daemon, "web"), 7);

    daemon.cli_ok(&["app", "scale", "web", "1"]);
    assert_eq!(hostnames(&daemon, "web.localhost", 10), BTreeSet::from(["web.1".to_string()]));
    assert_eq!(instance_count(&daemon, "web"), 1);

    // The page shows the env var the instance was started with.
    let (_, body) = http_get(daemon.proxy_addr(), "web.localhost", "/");
    assert!(body.contains("greeting=hello"), "{body}");
    daemon.cli_ok(&["app", "config", "web", "-e", "GREETING=bonjour"]);
    let (_, body) = http_get(daemon.proxy_addr(), "web.localhost", "/");
    assert!(body.contains("greeting=bonjour"), "new instances see the new env: {body}");
    let show = daemon.cli_json(&["app", "show", "web", "--json"]);
    assert_eq!(show["revision"]["number"], 2, "{show}");
    assert_eq!(show["memory"], "128M");
    let inst = &show["instances"][0];
    assert_eq!(inst["name"], "web.1");
    assert_eq!(inst["state"], "running");
    assert!(inst["ip"].as_str().is_some_and(|ip| ip.starts_with("10.")), "{show}");

    // An extra domain routes too; an unknown host is a 404.
    daemon.cli_ok(&["app", "config", "web", "--domain", "shop.example.com"]);
    assert_eq!(http_get(daemon.proxy_addr(), "shop.example.com", "/").0, 200);
    let (status, body) = http_get(daemon.proxy_addr(), "nope.localhost", "/");
    assert_eq!(status, 404, "{body}");

    daemon.cli_ok(&["app", "rm", "web"]);
    let ls = daemon.cli_ok(&["app", "ls", "--json"]);
    assert_eq!(serde_json::from_str::<serde_json::Value>(&ls).expect("json"), serde_json::json!([]));
    assert_eq!(http_get(daemon.proxy_addr(), "web.localhost", "/").0, 404);
    // Everything the instances used is gone while the daemon still runs.
    let instances_dir = daemon.data_dir().join("instances");
    let left: Vec<_> =
        std::fs::read_dir(&instances_dir).map(|d| d.flatten().map(|e| e.path()).collect()).unwrap_or_default();
    assert!(left.is_empty(), "instance dirs left: {left:?}");
    let leaks = daemon.names().leaks();
    // While the daemon runs, its bridge, nft table and parent cgroup stay, as Docker's do.
    let parent = format!("/{}", daemon.names().cgroup_parent);
    let instance_leaks: Vec<&str> = leaks
        .lines()
        .filter(|l| !l.contains(&daemon.names().bridge) && !l.contains(&daemon.names().nft_table))
        .filter(|l| !(l.starts_with("cgroup:") && l.ends_with(&parent)))
        .filter(|l| !(l.starts_with("process:") && (l.contains(" daemon ") || l.contains(" proxy --control "))))
        .collect();
    assert!(instance_leaks.is_empty(), "left behind by removed instances:\n{leaks}");

    let mut daemon = daemon;
    daemon.terminate();
    assert_eq!(daemon.names().leaks(), "", "after the daemon stopped with no app left");
}

#[test]
fn memory_limit_kills_only_the_hog() {
    let registry = Registry::start();
    let image = common::push_testapp(&registry, "demo/testapp:1");
    let daemon = Daemon::start(&registry);
    daemon.cli_ok(&["app", "create", "hog", "--image", &image.reference, "--port", "8080", "--memory", "64M"]);
    daemon.cli_ok(&["app", "start", "hog"]);
    daemon.cli_ok(&["app", "scale", "hog", "3"]);
    let before = daemon.cli_json(&["app", "show", "hog", "--json"]);
    let ids = instance_ids(&before);
    assert_eq!(ids.len(), 3);

    // One instance allocates past its limit and is OOM-killed; the answer never arrives. The
    // request goes to the instance directly: through the proxy, a GET whose instance died
    // before answering is replayed once on another one (which would then die too).
    let first_ip = before["instances"][0]["ip"].as_str().expect("instance ip").to_string();
    let hogged = common::try_http_get(&format!("{first_ip}:8080"), "hog.localhost", "/hog?mb=200");
    assert!(!matches!(hogged, Ok((200, _))), "allocating 200M under a 64M limit succeeded: {hogged:?}");
    // The others keep serving, every request.
    for _ in 0..20 {
        let (status, body) = http_get(daemon.proxy_addr(), "hog.localhost", "/");
        assert_eq!(status, 200, "{body}");
    }
    let show = wait_for(&daemon, |show| show["restarts"]["count"].as_u64() >= Some(1));
    assert_eq!(show["restarts"]["last_exit"], "oom", "{show}");
    // And the app heals: a replacement brings it back to 3.
    let show = wait_for(&daemon, |show| {
        show["instances"].as_array().is_some_and(|a| a.len() == 3 && a.iter().all(|i| i["state"] == "running"))
    });
    let after = instance_ids(&show);
    assert_eq!(ids.intersection(&after).count(), 2, "exactly one instance was replaced");
}

fn wait_for(daemon: &Daemon, done: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    let mut last = serde_json::Value::Null;
    let ok = common::wait_until(Duration::from_secs(30), || {
        last = daemon.cli_json(&["app", "show", "hog", "--json"]);
        done(&last)
    });
    assert!(ok, "timed out; last app show: {last}");
    last
}

#[test]
fn apps_survive_a_killed_daemon() {
    let registry = Registry::start();
    let image = common::push_busybox_httpd(&registry, "demo/httpd:1");
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
        "GREETING=kept",
        "--memory",
        "96M",
    ]);
    daemon.cli_ok(&["app", "start", "web"]);
    daemon.cli_ok(&["app", "scale", "web", "2"]);
    let before = daemon.cli_json(&["app", "show", "web", "--json"]);

    daemon.kill9();
    daemon.restart();
    let ls = daemon.cli_ok(&["app", "ls"]);
    assert!(ls.contains("web"), "{ls}");
    let after = daemon.cli_json(&["app", "show", "web", "--json"]);
    assert_eq!(after["env"]["GREETING"], "kept");
    assert_eq!(after["memory"], "96M");
    assert_eq!(after["instances_desired"], 2);
    assert_eq!(after["revision"], before["revision"]);
    // The instances lived on in their shims and were re-attached, not restarted.
    assert_eq!(instance_ids(&after), instance_ids(&before));
    let seen =
        common::http_get_retry(daemon.proxy_addr(), "web.localhost", "/", Duration::from_secs(20), |s, _| s == 200);
    assert!(seen.1.contains("greeting=kept"), "{seen:?}");
}

#[test]
fn bad_input_is_refused_and_nothing_is_half_created() {
    let registry = Registry::start();
    let image = common::push_busybox_httpd(&registry, "demo/httpd:1");
    let daemon = Daemon::start(&registry);
    let fails = |args: &[&str], expect: &str| {
        let out = daemon.cli(args);
        assert!(!out.success(), "`{}` should fail; stdout: {}", args.join(" "), out.stdout);
        assert!(
            out.stderr.to_lowercase().contains(&expect.to_lowercase()),
            "`{}`: stderr {:?} lacks {expect:?}",
            args.join(" "),
            out.stderr
        );
    };

    fails(&["app", "create", "Bad_Name", "--image", &image.reference, "--port", "80"], "invalid app name");
    fails(&["app", "create", "web", "--image", "UPPER/Case::x", "--port", "80"], "invalid");
    daemon.cli_ok(&["app", "create", "web", "--image", &image.reference, "--port", "8080"]);
    fails(&["app", "create", "web", "--image", &image.reference, "--port", "80"], "already exists");
    fails(&["app", "scale", "web", "-1"], "instance count");
    fails(&["app", "show", "ghost"], "no app named");

    // An image that is not in the registry: declared fine, but start fails and runs nothing.
    let missing = format!("{}/demo/missing:1", registry.addr());
    daemon.cli_ok(&["app", "create", "ghost", "--image", &missing, "--port", "80"]);
    fails(&["app", "start", "ghost"], "not found");
    let ghost = daemon.cli_json(&["app", "show", "ghost", "--json"]);
    assert_eq!(ghost["state"], "stopped", "{ghost}");
    assert_eq!(ghost["instances"], serde_json::json!([]));

    // A registry nobody listens on.
    let port = common::free_port();
    daemon.cli_ok(&["app", "create", "far", "--image", &format!("127.0.0.1:{port}/x/y:1"), "--port", "80"]);
    fails(&["app", "start", "far"], "127.0.0.1");
    fails(&["image", "pull", &format!("127.0.0.1:{port}/x/y:1")], "127.0.0.1");

    // Malformed JSON straight to the API.
    let raw = raw_api(&daemon.socket(), "POST /v1/apps", "{not json");
    assert!(raw.starts_with("HTTP/1.1 400"), "{raw}");
    assert!(raw.contains("invalid request body"), "{raw}");
    let raw = raw_api(&daemon.socket(), "PUT /v1/apps/web/scale", r#"{"instances": "seven"}"#);
    assert!(raw.starts_with("HTTP/1.1 400"), "{raw}");

    // Nothing was started by any of it.
    for app in ["web", "ghost", "far"] {
        assert_eq!(instance_count(&daemon, app), 0, "{app}");
    }
    let instances_dir = daemon.data_dir().join("instances");
    assert!(std::fs::read_dir(&instances_dir).map(|d| d.count() == 0).unwrap_or(true));
}

fn raw_api(socket: &std::path::Path, request_line: &str, body: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(socket).expect("connect to API socket");
    let (method_path, _) = (request_line, ());
    write!(
        s,
        "{method_path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read");
    out
}

#[test]
fn a_busy_proxy_port_is_a_clear_error_and_creates_nothing() {
    let registry = Registry::start();
    let daemon = Daemon::start(&registry);
    let id = common::unique_hex(6);
    let dir = tempfile::Builder::new().prefix("dlv-busy-").tempdir().expect("tempdir");
    let (bridge, table, cgroup) = (format!("dlvb{id}"), format!("dlv_busy_{id}"), format!("dlv-busy-{id}"));
    // If the product regresses and creates them, they still go away.
    struct Removed(String, String);
    impl Drop for Removed {
        fn drop(&mut self) {
            let quiet = |args: &[&str]| {
                let _ = std::process::Command::new(args[0]).args(&args[1..]).output();
            };
            quiet(&["ip", "link", "del", &self.0]);
            quiet(&["nft", "delete", "table", "ip", &self.1]);
        }
    }
    let _guard = Removed(bridge.clone(), table.clone());
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_deliverous"))
        .args(["daemon", "--http-listen", daemon.proxy_addr(), "--bridge", &bridge, "--nft-table", &table])
        .args(["--cgroup-parent", &cgroup, "--subnet", "10.199.254.0/24"])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .arg("--run-dir")
        .arg(dir.path().join("run"))
        .output()
        .expect("run a second daemon");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("Address already in use") && stderr.contains("--http-listen"), "{stderr}");
    let leaks = common::leaks();
    assert!(!leaks.contains(&bridge) && !leaks.contains(&table) && !leaks.contains(&cgroup), "{leaks}");
}
