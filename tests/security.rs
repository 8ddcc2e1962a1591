//! Instances are locked down like Docker's, checked from the inside by the test app's `/probe`:
//! capabilities, no_new_privs, the seccomp filter, masked and read-only paths, `/dev` and the
//! device cgroup. Runs on this host (cgroup v1) and in the cgroup v2 VM (tests/vm/run).

mod common;

use std::collections::BTreeMap;

use common::{http_get, Daemon, Registry};

/// Docker's 14 default capabilities as a /proc/<pid>/status mask.
const DOCKER_CAPS: &str = "00000000a80425fb";
const NO_CAPS: &str = "0000000000000000";

fn probe(daemon: &Daemon, app: &str) -> BTreeMap<String, String> {
    let (status, body) = http_get(daemon.proxy_addr(), &format!("{app}.localhost"), "/probe");
    assert_eq!(status, 200, "{body}");
    body.lines().filter_map(|l| l.split_once('=')).map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

/// `expected` if the host's kernel has `path` (the instance runs on the same kernel), else ENOENT.
fn if_present(path: &str, expected: &'static str) -> &'static str {
    if std::path::Path::new(path).exists() {
        expected
    } else {
        "ENOENT"
    }
}

fn check(probe: &BTreeMap<String, String>, expected: &[(&str, &str)]) {
    let wrong: Vec<String> = expected
        .iter()
        .filter(|(k, v)| probe.get(*k).map(String::as_str) != Some(*v))
        .map(|(k, v)| format!("{k}: expected {v}, got {:?}", probe.get(*k)))
        .collect();
    assert!(wrong.is_empty(), "inside the instance:\n  {}\nfull probe: {probe:#?}", wrong.join("\n  "));
}

#[test]
fn an_instance_is_locked_down_like_docker() {
    let registry = Registry::start();
    let image = common::push_testapp(&registry, "demo/testapp:1");
    let daemon = Daemon::start(&registry);
    daemon.cli_ok(&["app", "create", "box", "--image", &image.reference, "--port", "8080"]);
    daemon.cli_ok(&["app", "start", "box"]);
    let p = probe(&daemon, "box");
    check(
        &p,
        &[
            ("CapEff", DOCKER_CAPS),
            ("CapPrm", DOCKER_CAPS),
            ("CapBnd", DOCKER_CAPS),
            ("CapInh", NO_CAPS),
            ("CapAmb", NO_CAPS),
            ("NoNewPrivs", "1"),
            ("Seccomp", "2"),
            // No CAP_SYS_ADMIN, and seccomp refuses them anyway.
            ("mount", "EPERM"),
            ("unshare_user", "EPERM"),
            // Blocked by seccomp whatever the capabilities.
            ("keyctl", "EPERM"),
            // clone3 hides its flags from seccomp: libcs must fall back to clone.
            ("clone3", "ENOSYS"),
            // Masked paths read as empty (where this kernel has them at all).
            ("read:/proc/kcore", if_present("/proc/kcore", "0")),
            ("read:/proc/keys", if_present("/proc/keys", "0")),
            ("read:/proc/timer_list", if_present("/proc/timer_list", "0")),
            ("read:/proc/sched_debug", if_present("/proc/sched_debug", "0")),
            ("ls:/sys/firmware", "0"),
            // Read-only paths, and /sys.
            ("write:/proc/sys/kernel/domainname", "EROFS"),
            ("write:/proc/sysrq-trigger", if_present("/proc/sysrq-trigger", "EROFS")),
            ("write:/sys/class/net/lo/mtu", "EROFS"),
            ("shm_size", "65536k"),
            // CAP_MKNOD makes nodes; the device cgroup lets only the standard ones open.
            ("mknod_kmsg", "ok"),
            ("open_kmsg", "EPERM"),
            ("mknod_null", "ok"),
            ("open_null", "ok"),
        ],
    );
    let dev: Vec<&str> = p["dev"].split(',').collect();
    // libcontainer links /dev/kcore to /proc/kcore (masked) where the kernel has one.
    let standard = [
        "console", "core", "fd", "full", "kcore", "mqueue", "null", "ptmx", "pts", "random", "shm", "stderr", "stdin",
        "stdout", "tty", "urandom", "zero",
    ];
    let extra: Vec<&&str> = dev.iter().filter(|d| !standard.contains(d)).collect();
    assert!(extra.is_empty(), "/dev holds more than the standard nodes: {extra:?} (all: {dev:?})");
    for needed in ["null", "zero", "full", "random", "urandom", "tty", "pts", "shm"] {
        assert!(dev.contains(&needed), "/dev/{needed} is missing: {dev:?}");
    }
}

#[test]
fn capabilities_are_added_and_dropped_per_app() {
    let registry = Registry::start();
    let image = common::push_testapp(&registry, "demo/testapp:1");
    let daemon = Daemon::start(&registry);
    let img = image.reference.as_str();
    daemon.cli_ok(&[
        "app",
        "create",
        "min",
        "--image",
        img,
        "--port",
        "8080",
        "--cap-drop",
        "ALL",
        "--cap-add",
        "net_bind_service",
    ]);
    daemon.cli_ok(&["app", "create", "admin", "--image", img, "--port", "8080", "--cap-add", "SYS_ADMIN"]);
    daemon.cli_ok(&["app", "start", "min"]);
    daemon.cli_ok(&["app", "start", "admin"]);
    let show = daemon.cli_json(&["app", "show", "min", "--json"]);
    assert_eq!(show["cap_add"], serde_json::json!(["CAP_NET_BIND_SERVICE"]), "{show}");
    assert_eq!(show["cap_drop"], serde_json::json!(["ALL"]), "{show}");

    // Only CAP_NET_BIND_SERVICE (bit 10) is left: no MKNOD any more.
    check(
        &probe(&daemon, "min"),
        &[("CapEff", "0000000000000400"), ("CapBnd", "0000000000000400"), ("mknod_null", "EPERM")],
    );
    // CAP_SYS_ADMIN (bit 21) also opens the seccomp filter for mount(2).
    check(&probe(&daemon, "admin"), &[("CapEff", "00000000a82425fb"), ("mount", "ok"), ("keyctl", "EPERM")]);

    let out = daemon.cli(&["app", "config", "min", "--cap-add", "FLY"]);
    assert!(!out.success() && out.stderr.contains("unknown capability"), "{out:?}");
}

#[test]
fn a_non_root_user_gets_no_capabilities() {
    let registry = Registry::start();
    let image = common::testapp_image().user("1000:1000").push(&registry, "demo/testapp-user:1");
    let daemon = Daemon::start(&registry);
    daemon.cli_ok(&["app", "create", "user", "--image", &image.reference, "--port", "8080"]);
    daemon.cli_ok(&["app", "start", "user"]);
    check(
        &probe(&daemon, "user"),
        &[("CapEff", NO_CAPS), ("CapPrm", NO_CAPS), ("CapAmb", NO_CAPS), ("CapBnd", DOCKER_CAPS), ("NoNewPrivs", "1")],
    );
}
