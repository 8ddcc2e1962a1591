//! The daemon can die at any moment: instances keep running and logging under their shims, the
//! next daemon re-attaches to them, and whatever a crash left half-alive is cleaned up.

mod common;

use std::time::Duration;

use common::{http_get, wait_until, Daemon, Registry};

fn only_instance(daemon: &Daemon, app: &str) -> serde_json::Value {
    let show = daemon.cli_json(&["app", "show", app, "--json"]);
    let instances = show["instances"].as_array().cloned().unwrap_or_default();
    assert_eq!(instances.len(), 1, "{show}");
    instances[0].clone()
}

/// A daemon running app `web` (the test app) with one instance, and that instance's view.
fn web_with_one_instance() -> (Registry, Daemon, serde_json::Value) {
    let registry = Registry::start();
    let image = common::push_testapp(&registry, "demo/testapp:1");
    let daemon = Daemon::start(&registry);
    daemon.cli_ok(&["app", "create", "web", "--image", &image.reference, "--port", "8080"]);
    daemon.cli_ok(&["app", "start", "web"]);
    let instance = only_instance(&daemon, "web");
    (registry, daemon, instance)
}

#[test]
fn logs_keep_flowing_while_the_daemon_is_down_and_the_next_one_reattaches() {
    let (_registry, mut daemon, instance) = web_with_one_instance();
    let id = instance["id"].as_str().expect("id").to_string();
    let ip = instance["ip"].as_str().expect("ip").to_string();

    daemon.kill9();
    // Straight to the instance: the test app logs every request on stdout, which its shim writes.
    let marker = format!("/while-the-daemon-is-down-{}", common::unique_hex(8));
    let (status, _) = http_get(&format!("{ip}:8080"), "web", &marker);
    assert_eq!(status, 404);
    let log = daemon.data_dir().join("instances").join(&id).join("log");
    assert!(
        wait_until(Duration::from_secs(10), || std::fs::read_to_string(&log).unwrap_or_default().contains(&marker)),
        "the shim did not log the request while the daemon was down; log tail:\n{}",
        common::tail(&log, 10)
    );

    daemon.restart();
    let after = only_instance(&daemon, "web");
    assert_eq!(after["id"], id.as_str(), "the instance was re-attached, not replaced");
    let (status, body) = http_get(daemon.proxy_addr(), "web.localhost", "/");
    assert_eq!(status, 200, "{body}");
}

#[test]
fn what_a_crash_leaves_half_alive_is_cleaned_at_the_next_start() {
    let (_registry, mut daemon, instance) = web_with_one_instance();
    let id = instance["id"].as_str().expect("id").to_string();
    let pid = instance["pid"].as_u64().expect("pid") as i32;

    // Daemon and shim both die (a crash of both, an OOM kill of the shim…): the container is
    // orphaned with its cgroup, mount, netns and veth.
    let shim = daemon.shim_pid(&id).expect("shim runs");
    daemon.kill9();
    // SAFETY: kill(2) on the shim this test's daemon started.
    assert_eq!(unsafe { libc::kill(shim as i32, libc::SIGKILL) }, 0);
    assert!(std::path::Path::new(&format!("/proc/{pid}")).exists(), "the container outlived its shim");

    daemon.restart();
    assert!(
        wait_until(Duration::from_secs(30), || {
            let now = daemon.cli_json(&["app", "show", "web", "--json"]);
            now["instances"].as_array().is_some_and(|a| a.len() == 1 && a[0]["id"] != id.as_str())
        }),
        "no replacement instance"
    );
    let (status, body) = http_get(daemon.proxy_addr(), "web.localhost", "/");
    assert_eq!(status, 200, "{body}");

    // Nothing of the orphan is left.
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    assert!(stat.is_empty() || stat.contains(") Z "), "the orphaned container still runs: {stat}");
    let names = daemon.names();
    let veth = deliverous_runtime::network::veth_name(&names.veth_prefix, &id);
    assert!(!std::path::Path::new("/sys/class/net").join(&veth).exists(), "veth {veth} left");
    assert!(!daemon.run_dir().join("netns").join(&id).exists(), "netns left");
    assert!(!daemon.data_dir().join("instances").join(&id).exists(), "instance dir left");
    let cgroup = daemon.cgroup_file(&id, "pids", "");
    assert!(!cgroup.exists(), "cgroup {} left", cgroup.display());
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    assert!(!mounts.contains(&id), "a mount of {id} is left");
}

#[test]
fn instance_logs_rotate_at_the_configured_size() {
    let registry = Registry::start();
    let image = common::push_testapp(&registry, "demo/testapp:1");
    let daemon = Daemon::start_with_args(&registry, &["--log-max-size", "4K", "--log-keep", "2"]);
    daemon.cli_ok(&["app", "create", "web", "--image", &image.reference, "--port", "8080"]);
    daemon.cli_ok(&["app", "start", "web"]);
    let id = only_instance(&daemon, "web")["id"].as_str().expect("id").to_string();
    // Each request logs a line of ~80 bytes: 300 of them are ~24 KiB, six rotations' worth.
    for i in 0..300 {
        let (status, _) = http_get(daemon.proxy_addr(), "web.localhost", &format!("/env/REQUEST_{i}"));
        assert_eq!(status, 404);
    }
    let dir = daemon.data_dir().join("instances").join(&id);
    let log = dir.join("log");
    assert!(wait_until(Duration::from_secs(10), || dir.join("log.2").exists()), "no second rotated file");
    assert!(!dir.join("log.3").exists(), "--log-keep 2 keeps two rotated files");
    for file in [dir.join("log"), dir.join("log.1"), dir.join("log.2")] {
        let size = std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0);
        assert!(size <= 4096 + 512, "{} is {size} bytes, over the 4K limit", file.display());
    }
    // The newest requests are in the current file, timestamped and tagged (the app logs a request
    // after answering it: the last line may take a moment).
    let last_line = || std::fs::read_to_string(&log).unwrap_or_default().lines().last().unwrap_or_default().to_string();
    assert!(wait_until(Duration::from_secs(5), || last_line().contains("REQUEST_299")), "last line: {:?}", last_line());
    assert!(last_line().contains(" stdout "), "last line: {:?}", last_line());
}

#[test]
fn leftovers_without_an_instance_record_or_dir_are_swept_at_start() {
    let registry = Registry::start();
    let image = common::push_busybox_httpd(&registry, "demo/httpd:1");
    let mut daemon = Daemon::start(&registry);
    // One instance, so the bridge and the cgroup parent exist.
    daemon.cli_ok(&["app", "create", "web", "--image", &image.reference, "--port", "8080"]);
    daemon.cli_ok(&["app", "start", "web"]);
    daemon.kill9();

    // What a crash between two steps of an instance's creation leaves, for an instance the
    // database never recorded: a cgroup, libcontainer state, a network namespace, a veth on the
    // bridge. No instance directory.
    let uid = common::unique_hex(12);
    let names = daemon.names().clone();
    let cgroup = daemon.cgroup_file(&uid, "pids", "");
    std::fs::create_dir_all(&cgroup).expect("create cgroup");
    let state = daemon.run_dir().join("containers").join(&uid);
    std::fs::create_dir_all(&state).expect("create state dir");
    let netns = daemon.run_dir().join("netns").join(&uid);
    std::fs::write(&netns, b"").expect("netns mount point");
    let run = |args: &[&str]| {
        let out = std::process::Command::new(args[0]).args(&args[1..]).output().expect("run");
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    run(&["unshare", &format!("--net={}", netns.display()), "true"]);
    let veth = deliverous_runtime::network::veth_name(&names.veth_prefix, &uid);
    let peer = format!("dlvp{}", common::unique_hex(8));
    run(&["ip", "link", "add", &veth, "type", "veth", "peer", "name", &peer]);
    run(&["ip", "link", "set", &veth, "master", &names.bridge]);

    daemon.restart();
    assert!(!cgroup.exists(), "cgroup {} left", cgroup.display());
    assert!(!state.exists(), "libcontainer state {} left", state.display());
    assert!(!netns.exists(), "netns {} left", netns.display());
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    assert!(!mounts.contains(&uid), "the netns mount of {uid} is left");
    assert!(!std::path::Path::new("/sys/class/net").join(&veth).exists(), "veth {veth} left");
    assert!(!std::path::Path::new("/sys/class/net").join(&peer).exists(), "its peer {peer} left");
    // The real instance was re-attached, untouched.
    let (status, body) = http_get(daemon.proxy_addr(), "web.localhost", "/");
    assert_eq!(status, 200, "{body}");
}
