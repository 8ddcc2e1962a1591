//! The seccomp filter is compiled once per profile and cached next to libcontainer's state
//! (`<run>/seccomp/`); libcontainer gets a copy of the instance's config without it and
//! the shim loads the cached program in the container's init. These tests pin down that the
//! cache is used, that the instance still runs filtered, and that a cached program the kernel
//! refuses fails the start with a clear error instead of running the instance unfiltered.

mod common;

use std::path::{Path, PathBuf};

use common::{http_get, Daemon, Registry};
use sha2::{Digest, Sha256};

fn cached_programs(daemon: &Daemon) -> Vec<PathBuf> {
    let dir = daemon.run_dir().join("seccomp");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map(|entries| {
            entries.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "bpf")).collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

fn instance_dirs(daemon: &Daemon) -> Vec<PathBuf> {
    std::fs::read_dir(daemon.data_dir().join("instances"))
        .map(|entries| entries.flatten().map(|e| e.path()).collect())
        .unwrap_or_default()
}

fn json(path: &Path) -> serde_json::Value {
    let text = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_slice(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn seccomp_mode(daemon: &Daemon, app: &str) -> String {
    let (status, body) = http_get(daemon.proxy_addr(), &format!("{app}.localhost"), "/probe");
    assert_eq!(status, 200, "{body}");
    body.lines().find_map(|l| l.strip_prefix("Seccomp=")).unwrap_or_default().to_string()
}

#[test]
fn instances_run_under_the_cached_program() {
    let registry = Registry::start();
    let image = common::push_testapp(&registry, "demo/testapp:1");
    let daemon = Daemon::start(&registry);
    daemon.cli_ok(&["app", "create", "box", "--image", &image.reference, "--port", "8080", "--instances", "2"]);
    daemon.cli_ok(&["app", "start", "box"]);
    assert_eq!(seccomp_mode(&daemon, "box"), "2", "the instance runs under a seccomp filter");
    // Two instances, one profile: one program.
    assert_eq!(cached_programs(&daemon).len(), 1, "{:?}", cached_programs(&daemon));
    let dirs = instance_dirs(&daemon);
    assert_eq!(dirs.len(), 2, "{dirs:?}");
    for dir in dirs {
        // The bundle keeps a complete OCI spec; libcontainer's copy has no profile to compile.
        assert_eq!(json(&dir.join("config.json"))["linux"]["seccomp"]["defaultAction"], "SCMP_ACT_ERRNO");
        assert!(json(&dir.join("launch/config.json"))["linux"].get("seccomp").is_none());
    }
    // `exec` takes the instance's program from the same cache (and still runs filtered).
    let status = daemon.cli_ok(&["exec", "box.1", "--", "cat", "/proc/self/status"]);
    assert!(status.lines().any(|l| l.starts_with("Seccomp:") && l.ends_with('2')), "{status}");
    assert_eq!(cached_programs(&daemon).len(), 1, "exec shares the shim's entry");
    // Another capability set is another profile, hence another program.
    daemon.cli_ok(&["app", "create", "admin", "--image", &image.reference, "--port", "8080", "--cap-add", "SYS_ADMIN"]);
    daemon.cli_ok(&["app", "start", "admin"]);
    assert_eq!(seccomp_mode(&daemon, "admin"), "2");
    assert_eq!(cached_programs(&daemon).len(), 2);
}

#[test]
fn a_program_the_kernel_refuses_fails_the_start() {
    let registry = Registry::start();
    let image = common::push_testapp(&registry, "demo/testapp:1");
    let daemon = Daemon::start(&registry);
    daemon.cli_ok(&["app", "create", "box", "--image", &image.reference, "--port", "8080", "--restart", "never"]);
    daemon.cli_ok(&["app", "start", "box"]);
    let programs = cached_programs(&daemon);
    assert_eq!(programs.len(), 1);
    // A well-formed cache entry (its checksum matches) holding an instruction the kernel rejects.
    let bad = [0xffu8, 0xff, 0, 0, 0, 0, 0, 0];
    let mut entry = b"DLVBPF1\n".to_vec();
    entry.extend_from_slice(&Sha256::digest(bad));
    entry.extend_from_slice(&bad);
    std::fs::write(&programs[0], entry).expect("poison the cache entry");

    let out = daemon.cli(&["app", "scale", "box", "2"]);
    let said = format!("{}{}", out.stdout, out.stderr);
    assert!(!out.success(), "scaling must fail: {said}");
    assert!(said.contains("seccomp filter"), "the error names the filter: {said}");
    // The first instance is untouched, the second never ran.
    assert_eq!(seccomp_mode(&daemon, "box"), "2");
    assert_eq!(instance_dirs(&daemon).len(), 1, "{:?}", instance_dirs(&daemon));
}
