//! Image `HEALTHCHECK`s (Docker semantics): with no check of its own, an app is checked by
//! the command its image declares, run inside each instance. An instance that fails it
//! `Retries` times leaves the route table (the proxy cannot run commands; the supervisor
//! leaves it out) and is replaced if it stays unhealthy; a deploy of an image whose check
//! never passes is rolled back; the app's own `--health` overrides the image's, `--health
//! none` disables both, and an image's `HEALTHCHECK NONE` means none.

mod common;

use std::time::Duration;

use common::{http_get, http_get_retry, testapp_image, wait_until, Daemon, Layer, PushedImage, Registry};
use serde_json::{json, Value};

const HOST: &str = "web.localhost";
const MS: u64 = 1_000_000;

/// The testapp image plus busybox's `wget`, checked by `check` (a Docker `Healthcheck`).
fn push_checked(registry: &Registry, repo_tag: &str, check: Value) -> PushedImage {
    testapp_image()
        .layer(Layer::new().dir("bin", 0o755).symlink("bin/wget", "busybox"))
        .healthcheck(check)
        .push(registry, repo_tag)
}

/// `GET /health` on the instance's own port, every 300 ms, unhealthy after 2 failures.
fn wget_check() -> Value {
    json!({
        "Test": ["CMD-SHELL", "wget -qO- http://127.0.0.1:$PORT/health"],
        "Interval": 300 * MS,
        "Timeout": 5000 * MS,
        "Retries": 2
    })
}

fn show(daemon: &Daemon, app: &str) -> Value {
    daemon.cli_json(&["app", "show", app, "--json"])
}

fn instances(show: &Value) -> Vec<Value> {
    show["instances"].as_array().cloned().unwrap_or_default()
}

/// The app's events, oldest first.
fn events(daemon: &Daemon, app: &str) -> Vec<Value> {
    let out = std::process::Command::new("curl")
        .args(["-sS", "--unix-socket"])
        .arg(daemon.socket())
        .arg(format!("http://localhost/v1/events?app={app}"))
        .output()
        .expect("run curl");
    String::from_utf8_lossy(&out.stdout).lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
}

fn launch(daemon: &Daemon, app: &str, image: &PushedImage, instances: u32, flags: &[&str]) {
    let n = instances.to_string();
    let mut args = vec!["app", "create", app, "--image", &image.reference, "--port", "8080", "--instances", &n];
    args.extend_from_slice(flags);
    daemon.cli_ok(&args);
    daemon.cli_ok(&["app", "start", app]);
}

#[test]
fn a_failing_image_check_takes_an_instance_out_of_rotation_then_replaces_it() {
    let registry = Registry::start();
    let image = push_checked(&registry, "demo/checked:1", wget_check());
    let daemon = Daemon::start(&registry);
    launch(&daemon, "web", &image, 2, &["--unhealthy-timeout", "3s"]);
    http_get_retry(daemon.proxy_addr(), HOST, "/hostname", Duration::from_secs(30), |s, _| s == 200);
    assert!(
        wait_until(Duration::from_secs(20), || {
            let all = instances(&show(&daemon, "web"));
            all.len() == 2 && all.iter().all(|i| i["health"] == "healthy")
        }),
        "the image check never passed: {:#}",
        show(&daemon, "web")
    );
    let s = show(&daemon, "web");
    assert_eq!(s["health_check"]["source"], "image", "{s:#}");
    let description = s["health_check"]["description"].as_str().unwrap_or_default();
    assert!(description.contains("CMD-SHELL wget -qO- http://127.0.0.1:$PORT/health"), "{description}");
    assert!(description.contains("image HEALTHCHECK") && description.contains("2 failures"), "{description}");
    let first = instances(&s);
    assert!(
        first.iter().all(|i| i["health_output"]["output"].as_str().is_some_and(|o| o.contains("ok"))),
        "the check's output is kept: {s:#}"
    );
    let text = daemon.cli_ok(&["app", "show", "web"]);
    assert!(text.contains("image HEALTHCHECK"), "app show names the check in force:\n{text}");

    // web.2 starts failing its check: out of rotation, then replaced; web.1 is left alone.
    let sick = first.iter().find(|i| i["name"] == "web.2").expect("web.2").clone();
    let ip = sick["ip"].as_str().expect("ip");
    let (status, body) = http_get(&format!("{ip}:8080"), "web", "/health/set?ok=0");
    assert_eq!(status, 200, "{body}");
    assert!(
        wait_until(Duration::from_secs(15), || {
            instances(&show(&daemon, "web"))
                .iter()
                .any(|i| i["id"] == sick["id"] && i["health"] == "unhealthy" && i["in_rotation"] == false)
        }),
        "web.2 never left rotation: {:#}",
        show(&daemon, "web")
    );
    let only_web1 = wait_until(Duration::from_secs(5), || {
        (0..10).all(|_| http_get(daemon.proxy_addr(), HOST, "/hostname").1.trim() == "web.1")
    });
    assert!(only_web1, "the proxy still sends requests to the unhealthy web.2");
    let s = show(&daemon, "web");
    let output = instances(&s)
        .iter()
        .find(|i| i["id"] == sick["id"])
        .and_then(|i| i["health_output"]["output"].as_str().map(String::from))
        .unwrap_or_default();
    assert!(output.contains("exit"), "the failing check's output is kept: {s:#}");
    let text = daemon.cli_ok(&["app", "show", "web"]);
    assert!(text.contains("last health check of web.2 (unhealthy"), "app show prints the last output:\n{text}");
    let unhealthy = events(&daemon, "web").iter().any(|e| {
        e["kind"] == "instance_unhealthy"
            && e["instance"] == "web.2"
            && e["message"].as_str().is_some_and(|m| m.contains("CMD-SHELL") && m.contains("out of rotation"))
    });
    assert!(unhealthy, "no instance_unhealthy event for web.2: {:#?}", events(&daemon, "web"));

    let replaced = wait_until(Duration::from_secs(40), || {
        let all = instances(&show(&daemon, "web"));
        all.len() == 2
            && !all.iter().any(|i| i["id"] == sick["id"])
            && all.iter().all(|i| i["state"] == "running" && i["in_rotation"] == true)
    });
    assert!(replaced, "web.2 was not replaced: {:#}", show(&daemon, "web"));
    let after = instances(&show(&daemon, "web"));
    let id = |list: &[Value], name: &str| list.iter().find(|i| i["name"] == name).map(|i| i["id"].clone());
    assert_eq!(id(&first, "web.1"), id(&after, "web.1"), "web.1 was touched");
    let both = wait_until(Duration::from_secs(10), || {
        let names: std::collections::BTreeSet<String> =
            (0..20).map(|_| http_get(daemon.proxy_addr(), HOST, "/hostname").1.trim().to_string()).collect();
        names.contains("web.1") && names.contains("web.2")
    });
    assert!(both, "the new web.2 is not in rotation");
}

#[test]
fn a_deploy_whose_image_check_never_passes_is_rolled_back() {
    let registry = Registry::start();
    let good = push_checked(&registry, "demo/checked:1", wget_check());
    let bad = push_checked(
        &registry,
        "demo/checked:2",
        json!({"Test": ["CMD", "/bin/sh", "-c", "echo database unreachable; exit 1"], "Interval": 200 * MS}),
    );
    let daemon = Daemon::start(&registry);
    launch(&daemon, "web", &good, 2, &["--deploy-timeout", "4s"]);
    http_get_retry(daemon.proxy_addr(), HOST, "/hostname", Duration::from_secs(30), |s, _| s == 200);
    let before: Vec<Value> = instances(&show(&daemon, "web")).iter().map(|i| i["id"].clone()).collect();

    let out = daemon.cli(&["app", "deploy", "web", "--image", &bad.reference]);
    assert!(!out.success(), "the deploy must fail: {}", out.stdout);
    assert!(
        out.stderr.contains("deploy of revision 2 failed")
            && out.stderr.contains("database unreachable")
            && out.stderr.contains("rolled back to revision 1"),
        "{}",
        out.stderr
    );
    let s = show(&daemon, "web");
    let after: Vec<Value> = instances(&s).iter().map(|i| i["id"].clone()).collect();
    assert_eq!(before, after, "the old instances were never stopped: {s:#}");
    assert!(instances(&s).iter().all(|i| i["revision"] == 1), "{s:#}");
    assert_eq!(s["image"], good.reference.as_str(), "the app's image went back too");
    assert_eq!(s["health_check"]["source"], "image");
    let (status, _) = http_get(daemon.proxy_addr(), HOST, "/hostname");
    assert_eq!(status, 200);
}

#[test]
fn the_apps_own_check_overrides_the_images_and_none_disables_both() {
    let registry = Registry::start();
    let failing = json!({"Test": ["CMD-SHELL", "echo never healthy; exit 1"], "Interval": 200 * MS, "Retries": 1});
    let broken = push_checked(&registry, "demo/broken:1", failing);
    let disabled = push_checked(&registry, "demo/nocheck:1", json!({"Test": ["NONE"]}));
    let daemon = Daemon::start(&registry);
    launch(&daemon, "web", &broken, 1, &["--health", "none", "--unhealthy-timeout", "1s"]);
    launch(&daemon, "api", &broken, 1, &["--health", "/health", "--health-interval", "200ms"]);
    launch(&daemon, "plain", &disabled, 1, &[]);
    for host in ["web.localhost", "api.localhost", "plain.localhost"] {
        http_get_retry(daemon.proxy_addr(), host, "/hostname", Duration::from_secs(30), |s, _| s == 200);
    }
    let web = show(&daemon, "web");
    assert_eq!(web["health_check"]["source"], "none", "{web:#}");
    assert!(web["health_check"]["description"].as_str().is_some_and(|d| d.contains("--health none")), "{web:#}");
    assert!(daemon.cli_ok(&["app", "show", "web"]).contains("health=none"));
    let api = show(&daemon, "api");
    assert_eq!(api["health_check"]["source"], "app", "{api:#}");
    let plain = show(&daemon, "plain");
    assert_eq!(plain["health_check"]["source"], "none", "{plain:#}");
    assert!(plain["health_check"]["description"].as_str().is_some_and(|d| d.contains("HEALTHCHECK NONE")), "{plain:#}");

    // Several intervals (and the unhealthy timeout) later, nobody ran the failing command.
    let ids = |app: &str| instances(&show(&daemon, app)).iter().map(|i| i["id"].clone()).collect::<Vec<_>>();
    let (web_ids, api_ids) = (ids("web"), ids("api"));
    assert!(
        wait_until(Duration::from_secs(10), || instances(&show(&daemon, "api"))
            .iter()
            .all(|i| i["health"] == "healthy")),
        "the app's HTTP check passes: {:#}",
        show(&daemon, "api")
    );
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(ids("web"), web_ids, "an instance of an app with --health none was replaced");
    assert_eq!(ids("api"), api_ids, "the image's check replaced an instance the app's check finds healthy");
    for app in ["web", "api", "plain"] {
        let s = show(&daemon, app);
        for i in instances(&s) {
            assert_ne!(i["health"], "unhealthy", "{s:#}");
            assert_eq!(i["in_rotation"], true, "{s:#}");
            let output = i["health_output"]["output"].as_str().unwrap_or_default();
            assert!(!output.contains("never healthy"), "the image's command ran: {s:#}");
        }
        let host = format!("{app}.localhost");
        assert_eq!(http_get(daemon.proxy_addr(), &host, "/hostname").0, 200);
    }
    let web_unhealthy = events(&daemon, "web").iter().any(|e| e["kind"] == "instance_unhealthy");
    assert!(!web_unhealthy, "{:#?}", events(&daemon, "web"));

    // An app not started yet already says which check it will get, from its (pulled) image.
    daemon.cli_ok(&["app", "create", "later", "--image", &broken.reference, "--port", "8080"]);
    let later = show(&daemon, "later");
    assert_eq!(later["health_check"]["source"], "image", "{later:#}");
    assert!(
        later["health_check"]["description"].as_str().is_some_and(|d| d.contains("unhealthy after 1 failure)")),
        "{later:#}"
    );
}

#[test]
fn failures_during_the_start_period_do_not_count() {
    let registry = Registry::start();
    // Fails until /tmp/up exists: created by the test a while after the start.
    let check = json!({
        "Test": ["CMD-SHELL", "test -f /tmp/up || { echo not up yet; exit 1; }"],
        "Interval": 200 * MS,
        "StartPeriod": 30_000 * MS,
        "Retries": 1
    });
    let image = push_checked(&registry, "demo/slow:1", check);
    let daemon = Daemon::start(&registry);
    launch(&daemon, "web", &image, 1, &["--unhealthy-timeout", "1s"]);
    http_get_retry(daemon.proxy_addr(), HOST, "/hostname", Duration::from_secs(30), |s, _| s == 200);
    let first = instances(&show(&daemon, "web"));
    std::thread::sleep(Duration::from_secs(2));
    let s = show(&daemon, "web");
    let now = instances(&s);
    assert_eq!(
        first.iter().map(|i| i["id"].clone()).collect::<Vec<_>>(),
        now.iter().map(|i| i["id"].clone()).collect::<Vec<_>>(),
        "replaced during its start period: {s:#}"
    );
    assert!(now.iter().all(|i| i["health"] == "unknown"), "{s:#}");
    assert!(
        now.iter().all(|i| i["health_output"]["output"].as_str().is_some_and(|o| o.contains("not up yet"))),
        "the check ran: {s:#}"
    );
    let ip = now[0]["ip"].as_str().expect("ip");
    let (status, body) = http_get(&format!("{ip}:8080"), "web", "/file?path=/tmp/up&content=1");
    assert_eq!(status, 200, "{body}");
    assert!(
        wait_until(Duration::from_secs(10), || instances(&show(&daemon, "web"))
            .iter()
            .all(|i| i["health"] == "healthy")),
        "{:#}",
        show(&daemon, "web")
    );
}

#[test]
fn instances_a_restarted_daemon_reattaches_to_are_still_checked() {
    let registry = Registry::start();
    let image = push_checked(&registry, "demo/checked:1", wget_check());
    let mut daemon = Daemon::start(&registry);
    launch(&daemon, "web", &image, 2, &["--unhealthy-timeout", "2s"]);
    http_get_retry(daemon.proxy_addr(), HOST, "/hostname", Duration::from_secs(30), |s, _| s == 200);
    daemon.kill9();
    daemon.restart();
    let first = instances(&show(&daemon, "web"));
    assert!(
        wait_until(Duration::from_secs(10), || instances(&show(&daemon, "web"))
            .iter()
            .all(|i| i["health"] == "healthy")),
        "the re-attached instances are not checked: {:#}",
        show(&daemon, "web")
    );
    let sick = first.iter().find(|i| i["name"] == "web.2").expect("web.2").clone();
    let ip = sick["ip"].as_str().expect("ip");
    assert_eq!(http_get(&format!("{ip}:8080"), "web", "/health/set?ok=0").0, 200);
    assert!(
        wait_until(Duration::from_secs(15), || {
            instances(&show(&daemon, "web")).iter().any(|i| i["id"] == sick["id"] && i["in_rotation"] == false)
        }),
        "web.2 never left rotation: {:#}",
        show(&daemon, "web")
    );
    let replaced = wait_until(Duration::from_secs(40), || {
        let all = instances(&show(&daemon, "web"));
        all.len() == 2 && !all.iter().any(|i| i["id"] == sick["id"]) && all.iter().all(|i| i["in_rotation"] == true)
    });
    assert!(replaced, "web.2 was not replaced: {:#}", show(&daemon, "web"));
}

#[test]
fn a_check_that_outlives_its_timeout_fails_and_is_killed() {
    let registry = Registry::start();
    let check = json!({"Test": ["CMD", "sleep", "7"], "Interval": 200 * MS, "Timeout": 300 * MS, "Retries": 2});
    let image = push_checked(&registry, "demo/stuck:1", check);
    let daemon = Daemon::start(&registry);
    launch(&daemon, "web", &image, 1, &["--unhealthy-timeout", "1h"]);
    http_get_retry(daemon.proxy_addr(), HOST, "/hostname", Duration::from_secs(30), |s, _| s == 200);
    assert!(
        wait_until(Duration::from_secs(15), || instances(&show(&daemon, "web"))
            .iter()
            .all(|i| i["health"] == "unhealthy")),
        "{:#}",
        show(&daemon, "web")
    );
    let s = show(&daemon, "web");
    let output = instances(&s)[0]["health_output"]["output"].as_str().unwrap_or_default().to_string();
    assert!(output.contains("timed out"), "{s:#}");
    // Every timed-out check was killed: at most the one running now is left.
    let parent = format!("/{}/", daemon.names().cgroup_parent);
    let sleeping = || {
        common::pids_where(|argv| argv.len() == 2 && argv[0] == "sleep" && argv[1] == "7")
            .into_iter()
            .filter(|pid| std::fs::read_to_string(format!("/proc/{pid}/cgroup")).is_ok_and(|c| c.contains(&parent)))
            .count()
    };
    std::thread::sleep(Duration::from_secs(2));
    assert!(sleeping() <= 1, "{} timed-out checks still run", sleeping());
}
