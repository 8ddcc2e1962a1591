//! Self-healing: an instance that exits on its own is replaced according to its app's restart
//! policy, with a backoff that grows while it keeps crashing; `app show` says how it ended and
//! `deliverous events` tells the story. And after a host reboot every app comes back as
//! declared, with nothing of the old instances left.

mod common;

use std::io::BufRead;
use std::time::{Duration, Instant};

use common::{http_get, try_http_get, wait_until, Daemon, Registry};
use serde_json::Value;

fn show(daemon: &Daemon, app: &str) -> Value {
    daemon.cli_json(&["app", "show", app, "--json"])
}

/// Polls `app show` until `done` holds; panics with the last answer otherwise.
fn wait_show(daemon: &Daemon, app: &str, timeout: Duration, done: impl Fn(&Value) -> bool) -> Value {
    let mut last = Value::Null;
    let ok = wait_until(timeout, || {
        last = show(daemon, app);
        done(&last)
    });
    assert!(ok, "timed out waiting on app {app}; last app show: {last:#}\n{}", daemon.log_tail(30));
    last
}

/// The app's events, oldest first (`deliverous events --app APP --json`).
fn events(daemon: &Daemon, app: &str) -> Vec<Value> {
    daemon
        .cli_ok(&["events", "--app", app, "--json"])
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("event line {l:?}: {e}")))
        .collect()
}

fn of_kind<'a>(events: &'a [Value], kind: &str) -> Vec<&'a Value> {
    events.iter().filter(|e| e["kind"] == kind).collect()
}

/// Milliseconds since midnight UTC of an event's `2026-11-24T21:40:01.123Z`.
fn millis(event: &Value) -> i64 {
    let time = event["time"].as_str().unwrap_or_else(|| panic!("event without time: {event}"));
    let clock = time.split('T').nth(1).and_then(|t| t.strip_suffix('Z')).expect("RFC 3339 UTC time");
    let mut parts = clock.split(':');
    let mut next = || parts.next().and_then(|p| p.parse::<f64>().ok()).expect("time field");
    let (h, m, s) = (next(), next(), next());
    ((h * 3600.0 + m * 60.0 + s) * 1000.0).round() as i64
}

/// The only instance of `app` (waits until there is exactly one, running).
fn the_instance(daemon: &Daemon, app: &str) -> Value {
    let show = wait_show(daemon, app, Duration::from_secs(30), |s| {
        s["instances"].as_array().is_some_and(|a| a.len() == 1 && a[0]["state"] == "running")
    });
    show["instances"][0].clone()
}

/// Asks instance `instance` to exit with `code` (straight to it: the proxy might replay the
/// request on another instance).
fn exit_with(instance: &Value, code: i32) {
    let ip = instance["ip"].as_str().expect("instance ip");
    let answer = try_http_get(&format!("{ip}:8080"), "x", &format!("/exit?code={code}"));
    assert!(matches!(answer, Ok((200, _))), "/exit?code={code}: {answer:?}");
}

#[test]
fn a_crash_loop_backs_off_100_200_400_800ms_and_is_reported() {
    let registry = Registry::start();
    let image = common::push_testapp(&registry, "demo/testapp:1");
    let daemon = Daemon::start(&registry);
    daemon.cli_ok(&["app", "create", "loop", "--image", &image.reference, "--port", "8080", "-e", "EXIT_AT_START=3"]);
    daemon.cli_ok(&["app", "start", "loop"]);

    // Five replacements: 100 + 200 + 400 + 800 + 1600 ms of backoff, plus the starts.
    let mut seen = Vec::new();
    let ok = wait_until(Duration::from_secs(60), || {
        seen = events(&daemon, "loop");
        of_kind(&seen, "instance_restarting").len() >= 5
    });
    assert!(ok, "fewer than 5 restarts in 60 s: {seen:#?}");
    let restarting = of_kind(&seen, "instance_restarting");
    let expected = ["100ms", "200ms", "400ms", "800ms", "1.6s"];
    for (event, delay) in restarting.iter().zip(expected) {
        let message = event["message"].as_str().unwrap_or_default();
        assert!(message.starts_with(&format!("replaced in {delay} ")), "{message:?}, expected {delay}");
        assert_eq!(event["instance"], "loop.1");
    }
    // The waits really happen: from each exit to the next start at least the announced delay
    // (generous upper bound: a start takes its time on a loaded machine).
    let exited = of_kind(&seen, "instance_exited");
    let started = of_kind(&seen, "instance_started");
    assert!(started.len() >= 5 && exited.len() >= 5, "{seen:#?}");
    for (i, want) in [100i64, 200, 400, 800].into_iter().enumerate() {
        let gap = millis(started[i + 1]) - millis(exited[i]);
        assert!(gap >= want - 2, "restart {} came {gap} ms after the exit, before its {want} ms backoff", i + 1);
        assert!(gap < want + 10_000, "restart {} came {gap} ms after the exit (backoff {want} ms)", i + 1);
        let reason = exited[i]["message"].as_str().unwrap_or_default();
        assert!(reason.contains("exited with code 3"), "{reason:?}");
    }
    // From the third quick crash on, the slot is in a crash loop: said once as an event, and
    // shown by `app show` (JSON and table).
    let loops = of_kind(&seen, "crash_loop");
    assert_eq!(loops.len(), 1, "{seen:#?}");
    assert!(loops[0]["id"].as_u64() > restarting[1]["id"].as_u64(), "crash loop announced before the third crash");
    let s = show(&daemon, "loop");
    let r = &s["restarts"];
    assert_eq!(r["crash_loop"], true, "{s:#}");
    assert!(r["count"].as_u64() >= Some(5), "{s:#}");
    assert_eq!(r["last_exit_reason"], serde_json::json!({"code": 3}), "{s:#}");
    assert_eq!(r["last_exit"], "exit 3");
    assert!(r["last_exit_at"].is_string());
    let table = daemon.cli_ok(&["app", "show", "loop"]);
    assert!(table.contains("CRASH LOOP"), "{table}");
    assert!(table.contains("exited with code 3"), "{table}");

    // Stopping ends the loop: no replacement is pending any more.
    daemon.cli_ok(&["app", "stop", "loop"]);
    let stopped_at = events(&daemon, "loop").last().and_then(|e| e["id"].as_u64()).unwrap_or(0);
    std::thread::sleep(Duration::from_secs(4));
    let after = events(&daemon, "loop");
    let late: Vec<&Value> =
        after.iter().filter(|e| e["id"].as_u64() > Some(stopped_at) && e["kind"] == "instance_started").collect();
    assert!(late.is_empty(), "instances started after `app stop`: {late:#?}");
    assert_eq!(show(&daemon, "loop")["instances"], serde_json::json!([]));
}

#[test]
fn app_show_reports_exit_codes_signals_and_oom_kills() {
    let registry = Registry::start();
    let image = common::push_testapp(&registry, "demo/testapp:1");
    let daemon = Daemon::start(&registry);
    daemon.cli_ok(&["app", "create", "web", "--image", &image.reference, "--port", "8080"]);
    daemon.cli_ok(&["app", "start", "web"]);

    // An exit code.
    let first = the_instance(&daemon, "web");
    exit_with(&first, 7);
    let s = wait_show(&daemon, "web", Duration::from_secs(30), |s| {
        s["restarts"]["count"] == 1
            && s["instances"].as_array().is_some_and(|a| a.len() == 1 && a[0]["id"] != first["id"])
    });
    assert_eq!(s["restarts"]["last_exit_reason"], serde_json::json!({"code": 7}), "{s:#}");
    assert_eq!(s["restarts"]["last_exit_message"], "exited with code 7");
    assert_eq!(s["restarts"]["crash_loop"], false);
    let second = the_instance(&daemon, "web");
    assert_eq!(second["restarts"], 1, "{second:#}");
    assert_eq!(second["last_exit"]["reason"], serde_json::json!({"code": 7}), "{second:#}");
    assert_eq!(second["last_exit"]["message"], "exited with code 7");

    // A signal: kill -9 of the instance's process, as an operator or the kernel would.
    let pid = second["pid"].as_i64().expect("pid") as i32;
    // SAFETY: kill(2) on the container process of an instance this test's daemon started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    let s = wait_show(&daemon, "web", Duration::from_secs(30), |s| {
        s["restarts"]["count"] == 2
            && s["instances"].as_array().is_some_and(|a| a.len() == 1 && a[0]["id"] != second["id"])
    });
    assert_eq!(s["restarts"]["last_exit_reason"], serde_json::json!({"signal": "SIGKILL"}), "{s:#}");
    assert_eq!(s["restarts"]["last_exit"], "signal 9");
    let third = the_instance(&daemon, "web");
    assert_eq!(third["restarts"], 2);
    assert_eq!(third["last_exit"]["message"], "killed by SIGKILL");
    let table = daemon.cli_ok(&["app", "show", "web"]);
    assert!(table.contains("RESTARTS") && table.contains("killed by SIGKILL"), "{table}");
    let (status, body) = http_get(daemon.proxy_addr(), "web.localhost", "/");
    assert_eq!(status, 200, "{body}");

    // The OOM killer, under a memory limit.
    daemon.cli_ok(&["app", "create", "hog", "--image", &image.reference, "--port", "8080", "--memory", "64M"]);
    daemon.cli_ok(&["app", "start", "hog"]);
    let hog = the_instance(&daemon, "hog");
    let ip = hog["ip"].as_str().expect("ip");
    let hogged = try_http_get(&format!("{ip}:8080"), "hog", "/hog?mb=200");
    assert!(!matches!(hogged, Ok((200, _))), "allocating 200M under a 64M limit succeeded: {hogged:?}");
    let s = wait_show(&daemon, "hog", Duration::from_secs(30), |s| s["restarts"]["count"] == 1);
    assert_eq!(s["restarts"]["last_exit_reason"]["oom"], true, "{s:#}");
    assert_eq!(s["restarts"]["last_exit"], "oom");
    let exited = of_kind(&events(&daemon, "hog"), "instance_exited").len();
    assert_eq!(exited, 1);
}

#[test]
fn restart_policies_on_failure_never_and_always() {
    let registry = Registry::start();
    let image = common::push_testapp(&registry, "demo/testapp:1");
    let mut daemon = Daemon::start(&registry);
    for (app, policy) in [("onfail", "on-failure"), ("never", "never"), ("always", "always")] {
        daemon.cli_ok(&["app", "create", app, "--image", &image.reference, "--port", "8080", "--restart", policy]);
        daemon.cli_ok(&["app", "start", app]);
        assert_eq!(show(&daemon, app)["restart"], policy);
    }

    // on-failure: a clean exit leaves the slot empty, and says so.
    let first = the_instance(&daemon, "onfail");
    exit_with(&first, 0);
    let s = wait_show(&daemon, "onfail", Duration::from_secs(30), |s| {
        s["restarts"]["exited"].as_array().is_some_and(|e| e.len() == 1)
    });
    let exited = &s["restarts"]["exited"][0];
    assert_eq!((exited["name"].as_str(), exited["state"].as_str()), (Some("onfail.1"), Some("exited")), "{s:#}");
    assert_eq!(exited["last_exit"]["reason"], serde_json::json!({"code": 0}));
    assert_eq!(s["restarts"]["count"], 0, "not a restart");
    std::thread::sleep(Duration::from_secs(2));
    let s = show(&daemon, "onfail");
    assert_eq!(s["instances"], serde_json::json!([]), "on-failure replaced a clean exit: {s:#}");
    assert_eq!(s["state"], "running", "the app is still declared running");
    let exit_event = of_kind(&events(&daemon, "onfail"), "instance_exited")[0].clone();
    assert!(exit_event["message"].as_str().unwrap_or_default().contains("not replaced (restart policy on-failure)"));
    let table = daemon.cli_ok(&["app", "show", "onfail"]);
    assert!(table.contains("onfail.1") && table.contains("exited with code 0"), "{table}");
    // `app start` brings it back; a failure then is replaced.
    daemon.cli_ok(&["app", "start", "onfail"]);
    let back = the_instance(&daemon, "onfail");
    exit_with(&back, 5);
    let s = wait_show(&daemon, "onfail", Duration::from_secs(30), |s| {
        s["restarts"]["count"] == 1
            && s["instances"].as_array().is_some_and(|a| a.len() == 1 && a[0]["id"] != back["id"])
    });
    assert_eq!(s["restarts"]["last_exit_reason"], serde_json::json!({"code": 5}));

    // never: even a failure leaves the slot empty…
    let first = the_instance(&daemon, "never");
    let revision = show(&daemon, "never")["revision"]["number"].clone();
    exit_with(&first, 1);
    wait_show(&daemon, "never", Duration::from_secs(30), |s| {
        s["restarts"]["exited"].as_array().is_some_and(|e| e.len() == 1 && e[0]["last_exit"]["reason"]["code"] == 1)
    });
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(show(&daemon, "never")["instances"], serde_json::json!([]));
    // A restarted daemon does not silently bring it back either, and keeps the counts.
    daemon.restart();
    std::thread::sleep(Duration::from_secs(2));
    let s = show(&daemon, "never");
    assert_eq!(s["instances"], serde_json::json!([]), "the daemon restart refilled a `never` slot: {s:#}");
    assert_eq!(s["restarts"]["exited"][0]["state"], "exited", "{s:#}");
    assert_eq!(show(&daemon, "onfail")["restarts"]["count"], 1, "restart counts survive a daemon restart");
    // …until the configuration changes: switching to `always` is no new revision, and fills it.
    daemon.cli_ok(&["app", "config", "never", "--restart", "always"]);
    let back = the_instance(&daemon, "never");
    let s = show(&daemon, "never");
    assert_eq!(s["restart"], "always");
    assert_eq!(s["revision"]["number"], revision, "a restart policy change rolled out a new revision");
    assert_eq!(back["revision"], revision);
    // And a policy change on a healthy app replaces nothing.
    daemon.cli_ok(&["app", "config", "never", "--restart", "on-failure"]);
    assert_eq!(the_instance(&daemon, "never")["id"], back["id"]);

    // always: even a clean exit is replaced.
    let first = the_instance(&daemon, "always");
    exit_with(&first, 0);
    let s = wait_show(&daemon, "always", Duration::from_secs(30), |s| {
        s["restarts"]["count"] == 1
            && s["instances"].as_array().is_some_and(|a| a.len() == 1 && a[0]["id"] != first["id"])
    });
    assert_eq!(s["restarts"]["last_exit_reason"], serde_json::json!({"code": 0}));

    // An operator's stop is never "restarted", whatever the policy.
    daemon.cli_ok(&["app", "stop", "always"]);
    std::thread::sleep(Duration::from_secs(1));
    let s = show(&daemon, "always");
    assert_eq!((s["instances"].clone(), s["restarts"]["count"].clone()), (serde_json::json!([]), serde_json::json!(1)));
    let all = events(&daemon, "always");
    assert_eq!(of_kind(&all, "instance_stopped").len(), 1, "one stop event: {all:#?}");

    let bad = daemon.cli(&["app", "config", "always", "--restart", "sometimes"]);
    assert_eq!(bad.status.code(), Some(2), "{bad:?}");
}

#[test]
fn events_follow_sees_app_and_instance_events_as_they_happen() {
    let registry = Registry::start();
    let image = common::push_testapp(&registry, "demo/testapp:1");
    let daemon = Daemon::start(&registry);
    let mut follower = daemon.cli_spawn(&["events", "--follow", "--app", "web", "--json"]);
    let stdout = follower.stdout.take().expect("piped stdout");
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });

    daemon.cli_ok(&["app", "create", "web", "--image", &image.reference, "--port", "8080"]);
    daemon.cli_ok(&["app", "start", "web"]);
    let instance = the_instance(&daemon, "web");
    exit_with(&instance, 4);

    let wanted =
        ["app_created", "instance_started", "instance_ready", "app_started", "instance_exited", "instance_restarting"];
    let mut got: Vec<Value> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !wanted.iter().all(|k| got.iter().any(|e| e["kind"] == *k)) && Instant::now() < deadline {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
            got.push(serde_json::from_str(&line).unwrap_or_else(|e| panic!("event line {line:?}: {e}")));
        }
    }
    let _ = follower.kill();
    let _ = follower.wait();
    let _ = reader.join();
    for k in wanted {
        assert!(got.iter().any(|e| e["kind"] == k), "no {k} event followed; got {got:#?}");
    }
    let exit = got.iter().find(|e| e["kind"] == "instance_exited").expect("exit event");
    assert_eq!(exit["instance"], "web.1");
    assert!(exit["message"].as_str().unwrap_or_default().contains("exited with code 4"), "{exit}");
    assert!(got.iter().all(|e| e["app"] == "web"), "--app web only: {got:#?}");
    let ids: Vec<u64> = got.iter().filter_map(|e| e["id"].as_u64()).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "events out of order: {ids:?}");

    // The plain form: time, kind, instance or app, message; --tail and --since filter.
    daemon.cli_ok(&["app", "scale", "web", "2"]);
    let text = daemon.cli_ok(&["events", "--app", "web", "--tail", "3"]);
    assert_eq!(text.lines().count(), 3, "{text}");
    let all = daemon.cli_ok(&["events", "--since", "10m"]);
    let scaled = all.lines().find(|l| l.contains(" scaled ")).unwrap_or_else(|| panic!("no scaled line:\n{all}"));
    assert!(scaled.contains("  web  ") && scaled.contains("scaled from 1 to 2 instances"), "{scaled:?}");
    assert!(all.lines().any(|l| l.contains("instance_exited") && l.contains("web.1")), "{all}");
    let help = daemon.cli_ok(&["events", "--help"]);
    assert!(help.contains("deliverous events -f --app web"), "{help}");
    let bad = daemon.cli(&["events", "--since", "yesterday-ish"]);
    assert_eq!(bad.status.code(), Some(1), "{bad:?}");
}

#[test]
fn after_a_host_reboot_every_app_comes_back_as_declared() {
    let registry = Registry::start();
    let image = common::push_testapp(&registry, "demo/testapp:1");
    let mut daemon = Daemon::start(&registry);
    daemon.cli_ok(&["app", "create", "web", "--image", &image.reference, "--port", "8080", "--instances", "3"]);
    daemon.cli_ok(&["app", "start", "web"]);
    daemon.cli_ok(&["app", "create", "idle", "--image", &image.reference, "--port", "8080"]);
    daemon.cli_ok(&["app", "start", "idle"]);
    daemon.cli_ok(&["app", "stop", "idle"]);
    let before = wait_show(&daemon, "web", Duration::from_secs(30), |s| {
        s["instances"].as_array().is_some_and(|a| a.len() == 3 && a.iter().all(|i| i["state"] == "running"))
    });
    let old_ids: Vec<String> = before["instances"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| i["id"].as_str().map(String::from))
        .collect();

    daemon.reboot();

    let after = wait_show(&daemon, "web", Duration::from_secs(60), |s| {
        s["instances"].as_array().is_some_and(|a| a.len() == 3 && a.iter().all(|i| i["state"] == "running"))
    });
    let new_ids: Vec<String> = after["instances"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| i["id"].as_str().map(String::from))
        .collect();
    assert!(new_ids.iter().all(|id| !old_ids.contains(id)), "old instances survived a reboot: {old_ids:?} {new_ids:?}");
    let mut hosts = std::collections::BTreeSet::new();
    for _ in 0..30 {
        let (status, body) = http_get(daemon.proxy_addr(), "web.localhost", "/hostname");
        assert_eq!(status, 200, "{body}");
        hosts.insert(body.trim().to_string());
    }
    assert_eq!(hosts.len(), 3, "all three instances serve: {hosts:?}");
    let idle = show(&daemon, "idle");
    assert_eq!((idle["state"].as_str(), idle["instances"].clone()), (Some("stopped"), serde_json::json!([])));

    // Nothing of the old instances is left: no directory, no namespace, no lease.
    let mut dirs: Vec<String> = std::fs::read_dir(daemon.data_dir().join("instances"))
        .expect("instances dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    dirs.sort();
    let mut expected = new_ids.clone();
    expected.sort();
    assert_eq!(dirs, expected, "instance dirs after the reboot");
    let netns: Vec<String> = std::fs::read_dir(daemon.run_dir().join("netns"))
        .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    assert!(netns.iter().all(|n| new_ids.contains(n)), "stale namespaces: {netns:?}");
    let cgroups: Vec<String> = daemon
        .cgroup_file("", "pids", "")
        .read_dir()
        .map(|d| {
            d.flatten().filter(|e| e.path().is_dir()).map(|e| e.file_name().to_string_lossy().into_owned()).collect()
        })
        .unwrap_or_default();
    assert!(cgroups.len() == 3 && cgroups.iter().all(|c| new_ids.contains(c)), "instance cgroups: {cgroups:?}");
    let prefix = daemon.names().veth_prefix.clone();
    let veths = std::fs::read_dir("/sys/class/net")
        .map(|d| d.flatten().filter(|e| e.file_name().to_string_lossy().starts_with(&prefix)).count())
        .unwrap_or(0);
    assert_eq!(veths, 3, "one veth per live instance");
    // The old leases are free again: a fourth instance gets an address, and the four differ.
    daemon.cli_ok(&["app", "scale", "web", "4"]);
    let four =
        wait_show(&daemon, "web", Duration::from_secs(30), |s| s["instances"].as_array().is_some_and(|a| a.len() == 4));
    let ips: std::collections::BTreeSet<&str> =
        four["instances"].as_array().into_iter().flatten().filter_map(|i| i["ip"].as_str()).collect();
    assert_eq!(ips.len(), 4, "{four:#}");
    assert!(daemon.log_tail(400).contains("did not survive"), "the new daemon cleaned up the dead instances");
    let gone = of_kind(&events(&daemon, "web"), "instance_exited").len();
    assert_eq!(gone, 3, "each dead instance is reported once");
}

#[test]
fn a_replacement_that_cannot_start_is_tried_again_with_backoff() {
    let registry = Registry::start();
    let image = common::push_testapp(&registry, "demo/testapp:1");
    let daemon = Daemon::start(&registry);
    daemon.cli_ok(&["app", "create", "web", "--image", &image.reference, "--port", "8080"]);
    daemon.cli_ok(&["app", "start", "web"]);
    let first = the_instance(&daemon, "web");

    // The image's unpacked layers vanish (a disk mishap): no replacement can be prepared.
    let layers = daemon.data_dir().join("layers");
    let away = daemon.data_dir().join("layers.away");
    std::fs::rename(&layers, &away).expect("move the layers away");
    struct PutBack(std::path::PathBuf, std::path::PathBuf);
    impl Drop for PutBack {
        fn drop(&mut self) {
            if self.1.exists() {
                let _ = std::fs::rename(&self.1, &self.0);
            }
        }
    }
    let put_back = PutBack(layers, away);
    exit_with(&first, 1);
    let mut seen = Vec::new();
    let ok = wait_until(Duration::from_secs(30), || {
        seen = events(&daemon, "web");
        seen.iter().filter(|e| e["message"].as_str().is_some_and(|m| m.starts_with("could not start"))).count() >= 2
    });
    assert!(ok, "failed replacements are not retried: {seen:#?}");
    let retries: Vec<&str> =
        seen.iter().filter_map(|e| e["message"].as_str()).filter(|m| m.starts_with("could not start")).collect();
    assert!(retries[0].ends_with("next try in 200ms") && retries[1].ends_with("next try in 400ms"), "{retries:#?}");
    let s = show(&daemon, "web");
    assert_eq!(s["restarts"]["exited"][0]["state"], "restarting", "{s:#}");

    // Back in place: the next try succeeds, and the app serves again.
    drop(put_back);
    the_instance(&daemon, "web");
    let (status, body) = http_get(daemon.proxy_addr(), "web.localhost", "/");
    assert_eq!(status, 200, "{body}");
}

#[test]
fn the_daemon_caps_the_backoff_where_it_is_told() {
    let registry = Registry::start();
    let image = common::push_testapp(&registry, "demo/testapp:1");
    let daemon = Daemon::start_with_args(&registry, &["--restart-max-delay", "500ms"]);
    daemon.cli_ok(&["app", "create", "loop", "--image", &image.reference, "--port", "8080", "-e", "EXIT_AT_START=1"]);
    daemon.cli_ok(&["app", "start", "loop"]);
    let mut seen = Vec::new();
    let ok = wait_until(Duration::from_secs(60), || {
        seen = events(&daemon, "loop");
        of_kind(&seen, "instance_restarting").len() >= 6
    });
    assert!(ok, "fewer than 6 restarts in 60 s: {seen:#?}");
    let delays: Vec<String> = of_kind(&seen, "instance_restarting")
        .iter()
        .take(6)
        .filter_map(|e| e["message"].as_str()?.strip_prefix("replaced in ")?.split(' ').next().map(String::from))
        .collect();
    assert_eq!(delays, ["100ms", "200ms", "400ms", "500ms", "500ms", "500ms"]);
    daemon.cli_ok(&["app", "stop", "loop"]);
}
