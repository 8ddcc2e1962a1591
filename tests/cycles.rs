//! 200 start/stop cycles of an instance leave nothing behind: no kernel object, mount, process
//! or file descriptor accumulates, and the daemon's memory stays flat.

mod common;

use common::{http_get, Daemon, Registry};

const CYCLES: usize = 200;
const WARM_UP: usize = 20;

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

/// What of one daemon's per-instance objects exist now: veths, netns files, instance cgroups,
/// mounts under its data dir, instance dirs.
fn instance_objects(daemon: &Daemon) -> Vec<String> {
    let names = daemon.names();
    let mut found = Vec::new();
    if let Ok(links) = std::fs::read_dir("/sys/class/net") {
        for l in links.flatten() {
            let name = l.file_name().to_string_lossy().into_owned();
            if name.starts_with(&names.veth_prefix) && name.len() > names.veth_prefix.len() {
                found.push(format!("veth {name}"));
            }
        }
    }
    for (what, dir) in
        [("netns", daemon.run_dir().join("netns")), ("instance dir", daemon.data_dir().join("instances"))]
    {
        if let Ok(entries) = std::fs::read_dir(&dir) {
            found.extend(entries.flatten().map(|e| format!("{what} {}", e.path().display())));
        }
    }
    let data = daemon.data_dir();
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    for line in mounts.lines() {
        if let Some(point) = line.split_whitespace().nth(4) {
            if point.starts_with(data.to_str().unwrap_or("\u{0}"))
                || point.starts_with(daemon.run_dir().to_str().unwrap_or("\u{0}"))
            {
                found.push(format!("mount {point}"));
            }
        }
    }
    let cgroups = if common::cgroup_v2() {
        std::path::PathBuf::from("/sys/fs/cgroup").join(&names.cgroup_parent)
    } else {
        std::path::Path::new("/sys/fs/cgroup/pids").join(&names.cgroup_parent)
    };
    if let Ok(entries) = std::fs::read_dir(&cgroups) {
        found.extend(entries.flatten().filter(|e| e.path().is_dir()).map(|e| format!("cgroup {}", e.path().display())));
    }
    found
}

#[test]
fn two_hundred_start_stop_cycles_leave_nothing_behind_and_memory_flat() {
    let registry = Registry::start();
    let image = common::push_busybox_httpd(&registry, "demo/httpd:1");
    let daemon = Daemon::start(&registry);
    let pid = daemon.pid().expect("daemon runs");
    daemon.cli_ok(&["app", "create", "web", "--image", &image.reference, "--port", "8080", "--instances", "0"]);
    daemon.cli_ok(&["app", "start", "web"]);

    let mut baseline = (0, 0);
    for cycle in 1..=CYCLES {
        daemon.cli_ok(&["app", "scale", "web", "1"]);
        if cycle % 50 == 0 {
            let (status, body) = http_get(daemon.proxy_addr(), "web.localhost", "/");
            assert_eq!(status, 200, "cycle {cycle}: {body}");
        }
        daemon.cli_ok(&["app", "scale", "web", "0"]);
        let left = instance_objects(&daemon);
        assert!(left.is_empty(), "cycle {cycle} left: {left:#?}");
        if cycle == WARM_UP {
            baseline = (rss_kib(pid), open_fds(pid));
        }
    }
    let (rss, fds) = (rss_kib(pid), open_fds(pid));
    eprintln!(
        "daemon after {WARM_UP} cycles: {} KiB RSS, {} fds; after {CYCLES}: {rss} KiB, {fds} fds",
        baseline.0, baseline.1
    );
    assert!(fds <= baseline.1 + 4, "open descriptors grew from {} to {fds}", baseline.1);
    // Allocator noise is a few hundred KiB; a leak per cycle would show as megabytes.
    assert!(
        rss <= baseline.0 + 8 * 1024,
        "daemon RSS grew from {} KiB to {rss} KiB over {} cycles",
        baseline.0,
        CYCLES - WARM_UP
    );
    let shims =
        common::pids_where(|argv| argv.get(1).is_some_and(|a| a == "shim") && daemon.names().matches(&argv.join(" ")));
    assert!(shims.is_empty(), "shims left running: {shims:?}");
}
