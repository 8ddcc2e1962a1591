//! Instances are confined to their cgroup on the real kernel (cgroup v1 here, v2 in the test VM:
//! tests/vm/run): the pids limit stops a fork bomb, `--cpus` caps a CPU hog, and no process
//! outlives its instance, whether it is stopped or its shim is killed.

mod common;

use std::time::Duration;

use common::{http_get, wait_until, Daemon, Registry};

fn instance_ids(daemon: &Daemon, app: &str) -> Vec<String> {
    let show = daemon.cli_json(&["app", "show", app, "--json"]);
    show["instances"]
        .as_array()
        .map(|a| a.iter().filter_map(|i| i["id"].as_str().map(String::from)).collect())
        .unwrap_or_default()
}

/// `name N` from a flat-keyed cgroup file (`pids.events`, `memory.events`); 0 if absent.
fn counter(path: &std::path::Path, name: &str) -> u64 {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once(' '))
        .find(|(k, _)| *k == name)
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0)
}

/// `sleep <secs>` processes anywhere on the host (tests pick a unique `secs`).
fn sleepers(secs: u64) -> usize {
    let secs = secs.to_string();
    common::pids_where(|argv| argv.len() == 2 && argv[0].ends_with("sleep") && argv[1] == secs).len()
}

fn unique_secs() -> u64 {
    900_000 + u64::from_str_radix(&common::unique_hex(4), 16).expect("hex")
}

#[test]
fn a_fork_bomb_stops_at_the_pids_limit_and_the_host_stays_responsive() {
    let registry = Registry::start();
    let image = common::push_testapp(&registry, "demo/testapp:1");
    let daemon = Daemon::start(&registry);
    daemon.cli_ok(&["app", "create", "bomb", "--image", &image.reference, "--port", "8080", "--pids", "40"]);
    daemon.cli_ok(&["app", "create", "calm", "--image", &image.reference, "--port", "8080"]);
    daemon.cli_ok(&["app", "start", "bomb"]);
    daemon.cli_ok(&["app", "start", "calm"]);
    let show = daemon.cli_json(&["app", "show", "bomb", "--json"]);
    assert_eq!(show["pids"], 40, "{show}");
    let id = instance_ids(&daemon, "bomb").pop().expect("one bomb instance");

    let (status, body) = http_get(daemon.proxy_addr(), "bomb.localhost", "/bomb");
    assert_eq!(status, 200, "{body}");
    let events = daemon.cgroup_file(&id, "pids", "pids.events");
    let current = daemon.cgroup_file(&id, "pids", "pids.current");
    assert!(
        wait_until(Duration::from_secs(30), || counter(&events, "max") > 0),
        "the fork bomb never hit the limit: {} = {:?}",
        events.display(),
        std::fs::read_to_string(&events)
    );
    for _ in 0..10 {
        let n: u64 = std::fs::read_to_string(&current).unwrap_or_default().trim().parse().unwrap_or(0);
        assert!(n <= 40, "{n} processes in an instance limited to 40");
        std::thread::sleep(Duration::from_millis(100));
    }
    // The rest of the host goes on: another app serves every request, the API answers.
    for _ in 0..10 {
        let (status, body) = http_get(daemon.proxy_addr(), "calm.localhost", "/");
        assert_eq!(status, 200, "{body}");
    }
    daemon.cli_ok(&["app", "ls"]);

    // Stopping the app ends the whole bomb and removes its cgroup.
    daemon.cli_ok(&["app", "stop", "bomb"]);
    let dir = current.parent().expect("cgroup dir").to_path_buf();
    assert!(wait_until(Duration::from_secs(10), || !dir.exists()), "{} survived the stop", dir.display());
}

#[test]
fn a_cpu_hog_gets_its_quota_and_its_weight() {
    let registry = Registry::start();
    let image = common::push_testapp(&registry, "demo/testapp:1");
    let daemon = Daemon::start(&registry);
    daemon.cli_ok(&[
        "app",
        "create",
        "spin",
        "--image",
        &image.reference,
        "--port",
        "8080",
        "--cpus",
        "0.25",
        "--cpu-weight",
        "500",
    ]);
    daemon.cli_ok(&["app", "start", "spin"]);
    let id = instance_ids(&daemon, "spin").pop().expect("one instance");
    let expected = if common::cgroup_v2() {
        [
            (daemon.cgroup_file(&id, "cpu", "cpu.max"), "25000 100000"),
            (daemon.cgroup_file(&id, "cpu", "cpu.weight"), "500"),
        ]
    } else {
        [
            (daemon.cgroup_file(&id, "cpu", "cpu.cfs_quota_us"), "25000"),
            (daemon.cgroup_file(&id, "cpu", "cpu.shares"), "5120"),
        ]
    };
    for (file, value) in expected {
        assert_eq!(std::fs::read_to_string(&file).unwrap_or_default().trim(), value, "{}", file.display());
    }

    // 3 s of busy loop under a quarter of a CPU: about 750 ms of CPU time, never the whole 3 s.
    let (status, body) = http_get(daemon.proxy_addr(), "spin.localhost", "/spin?ms=3000");
    assert_eq!(status, 200, "{body}");
    let cpu_ms: u64 = body
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix("cpu_ms="))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("unexpected answer {body:?}"));
    assert!(cpu_ms <= 1_200, "a 0.25 CPU instance got {cpu_ms} ms of CPU in 3 s");
    assert!(cpu_ms >= 100, "the hog hardly ran ({cpu_ms} ms): the test proves nothing");
}

#[test]
fn a_killed_shim_takes_its_whole_instance_down_and_it_is_replaced() {
    let registry = Registry::start();
    let image = common::push_testapp(&registry, "demo/testapp:1");
    let daemon = Daemon::start(&registry);
    daemon.cli_ok(&["app", "create", "web", "--image", &image.reference, "--port", "8080"]);
    daemon.cli_ok(&["app", "start", "web"]);
    let id = instance_ids(&daemon, "web").pop().expect("one instance");
    let secs = unique_secs();
    let (status, body) = http_get(daemon.proxy_addr(), "web.localhost", &format!("/spawn?n=3&secs={secs}"));
    assert_eq!((status, body.trim()), (200, "spawned 3 of 3"));
    // A child shows `sleep` as its command line only once it has exec'd.
    assert!(wait_until(Duration::from_secs(10), || sleepers(secs) == 3), "{} sleepers, not 3", sleepers(secs));
    let cgroup = daemon.cgroup_file(&id, "pids", "");

    let shim = daemon.shim_pid(&id).expect("the instance's shim runs");
    // SAFETY: kill(2) on the PID of the shim this test's daemon started.
    assert_eq!(unsafe { libc::kill(shim as i32, libc::SIGKILL) }, 0);

    // Nothing of the old instance survives its shim: processes, cgroup.
    assert!(wait_until(Duration::from_secs(20), || sleepers(secs) == 0), "processes outlived their shim");
    assert!(wait_until(Duration::from_secs(20), || !cgroup.exists()), "{} survived", cgroup.display());
    // And the app heals with a new instance.
    assert!(
        wait_until(Duration::from_secs(30), || {
            let ids = instance_ids(&daemon, "web");
            ids.len() == 1 && ids[0] != id
        }),
        "no replacement: {}",
        daemon.cli_ok(&["app", "show", "web"])
    );
    assert!(
        wait_until(Duration::from_secs(20), || common::try_http_get(daemon.proxy_addr(), "web.localhost", "/")
            .is_ok_and(|(s, _)| s == 200)),
        "the replacement never served"
    );
}

/// busybox httpd on $PORT in the background, the shell as PID 1 reacting to signals per `traps`.
fn signal_image(registry: &Registry, repo_tag: &str, traps: &str, stop_signal: Option<&str>) -> String {
    let script = format!(
        "{traps}; mkdir -p /www; echo ok > /www/index.html; httpd -p \"$PORT\" -h /www; while :; do sleep 1; done"
    );
    let mut image = common::TestImage::new()
        .layer(common::busybox_rootfs())
        .env("PATH=/bin")
        .cmd(&["sh", "-c", &script])
        .expose(8080);
    if let Some(signal) = stop_signal {
        image = image.stop_signal(signal);
    }
    image.push(registry, repo_tag).reference
}

#[test]
fn stop_sends_the_image_stop_signal_then_sigkill_after_the_app_grace_period() {
    let registry = Registry::start();
    // Exits on SIGINT (its StopSignal), ignores SIGTERM.
    let polite = signal_image(&registry, "demo/polite:1", "trap 'exit 42' INT; trap '' TERM", Some("SIGINT"));
    // Ignores everything but SIGKILL.
    let stubborn = signal_image(&registry, "demo/stubborn:1", "trap '' TERM INT", None);
    let daemon = Daemon::start(&registry);
    daemon.cli_ok(&["app", "create", "polite", "--image", &polite, "--port", "8080", "--stop-timeout", "30"]);
    daemon.cli_ok(&["app", "create", "stubborn", "--image", &stubborn, "--port", "8080", "--stop-timeout", "1"]);
    daemon.cli_ok(&["app", "start", "polite"]);
    daemon.cli_ok(&["app", "start", "stubborn"]);
    let show = daemon.cli_json(&["app", "show", "stubborn", "--json"]);
    assert_eq!(show["stop_timeout"], 1, "{show}");
    let polite_id = instance_ids(&daemon, "polite").pop().expect("one instance");
    let stubborn_id = instance_ids(&daemon, "stubborn").pop().expect("one instance");

    // SIGINT ends it at once: nowhere near its 30 s grace period.
    let started = std::time::Instant::now();
    daemon.cli_ok(&["app", "stop", "polite"]);
    let took = started.elapsed();
    assert!(took < Duration::from_secs(15), "stopping with the image's StopSignal took {took:?}");

    // SIGTERM is ignored: SIGKILL comes after the app's 1 s, not the daemon's default 10 s.
    let started = std::time::Instant::now();
    daemon.cli_ok(&["app", "stop", "stubborn"]);
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(900), "stopped after {took:?}: the grace period was skipped");
    assert!(took < Duration::from_secs(8), "stopping after a 1 s grace period took {took:?}");

    for id in [polite_id, stubborn_id] {
        let dir = daemon.cgroup_file(&id, "pids", "");
        assert!(!dir.exists(), "{} survived the stop", dir.display());
    }
}
