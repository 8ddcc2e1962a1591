//! Once its container runs, an instance's shim is the small monitor (runtime/monitor/): it keeps
//! the shim's command line and control protocol, maps nothing of the big binary, survives a
//! daemon upgrade, and at the end has the binary that started it delete the container.

mod common;

use std::io::{BufRead, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{http_get, wait_until, Daemon, Registry};

const BINARY: &str = env!("CARGO_BIN_EXE_deliverous");

/// One request line on a shim's control socket, its reply parsed.
fn request(socket: &Path, line: &str) -> serde_json::Value {
    let mut stream = UnixStream::connect(socket).expect("connect to the control socket");
    stream.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    stream.write_all(line.as_bytes()).expect("send");
    let mut reply = String::new();
    std::io::BufReader::new(stream).read_line(&mut reply).expect("reply");
    serde_json::from_str(&reply).unwrap_or_else(|e| panic!("reply {reply:?} is not JSON: {e}"))
}

/// A `Name:  N kB` field of `/proc/PID/smaps_rollup`.
fn smaps_kb(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field)?.trim().strip_suffix("kB")?.trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn an_instance_is_watched_by_the_monitor_with_the_shims_command_line_and_protocol() {
    let registry = Registry::start();
    let image = common::push_testapp(&registry, "demo/testapp:1");
    let mut daemon = Daemon::start(&registry);
    daemon.cli_ok(&["app", "create", "web", "--image", &image.reference, "--port", "8080"]);
    daemon.cli_ok(&["app", "start", "web"]);
    let show = daemon.cli_json(&["app", "show", "web", "--json"]);
    let instance = &show["instances"][0];
    let id = instance["id"].as_str().expect("instance id").to_string();
    let init = instance["pid"].as_i64().expect("instance pid");

    // Found as before, by its command line (`deliverous shim --id ID …`); it runs the monitor.
    let shim = daemon.shim_pid(&id).expect("the instance's shim");
    let exe = std::fs::read_link(format!("/proc/{shim}/exe")).expect("exe");
    assert_eq!(exe.parent(), Some(daemon.run_dir().join("bin").as_path()), "{}", exe.display());
    assert!(exe.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("dlv-monitor-")), "{exe:?}");
    let binary = std::fs::canonicalize(BINARY).expect("binary");
    let maps = std::fs::read_to_string(format!("/proc/{shim}/maps")).expect("maps");
    assert!(!maps.contains(binary.to_string_lossy().as_ref()), "the monitor maps the big binary:\n{maps}");
    // It holds the binary that started it, to delete the container at the end.
    let fds: Vec<PathBuf> = std::fs::read_dir(format!("/proc/{shim}/fd"))
        .expect("fds")
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .collect();
    assert!(fds.contains(&binary), "{fds:?}");
    let (rss, pss, anon) = (smaps_kb(shim, "Rss:"), smaps_kb(shim, "Pss:"), smaps_kb(shim, "Pss_Anon:"));
    eprintln!("monitor of {id}: RSS {rss} kB, PSS {pss} kB, anonymous PSS {anon} kB");
    assert!(rss > 0 && pss <= rss, "RSS {rss} kB, PSS {pss} kB");

    // The same protocol, answered by the monitor's own JSON.
    let socket = daemon.run_dir().join("shims").join(format!("{id}.sock"));
    let state = request(&socket, "{\"op\":\"state\"}\n");
    assert_eq!(state, serde_json::json!({"ok": true, "pid": init}));
    let bad = request(&socket, "{\"op\":\"state\"\n");
    assert_eq!(bad["ok"], false, "{bad}");
    assert!(bad["error"].as_str().is_some_and(|e| e.starts_with("bad request: ")), "{bad}");
    let bad = request(&socket, "{\"op\":\"signal\",\"signal\":0}\n");
    assert_eq!(bad, serde_json::json!({"ok": false, "error": "0 is not a signal number"}));
    let (status, body) = http_get(daemon.proxy_addr(), "web.localhost", "/");
    assert_eq!(status, 200, "{body}");

    // A new daemon drives the same monitor.
    daemon.upgrade();
    assert_eq!(daemon.shim_pid(&id), Some(shim), "the instance kept its monitor");
    let (status, body) = http_get(daemon.proxy_addr(), "web.localhost", "/");
    assert_eq!(status, 200, "{body}");

    // Stopped: the monitor ends and the container is deleted (state, cgroup, socket).
    daemon.cli_ok(&["app", "stop", "web"]);
    assert!(
        wait_until(Duration::from_secs(15), || daemon.shim_pid(&id).is_none()),
        "the monitor outlived its instance"
    );
    let state_dir = daemon.run_dir().join("containers").join(&id);
    assert!(!state_dir.exists(), "{} survived", state_dir.display());
    let cgroup = daemon.cgroup_file(&id, "memory", "cgroup.procs");
    assert!(!cgroup.parent().expect("cgroup dir").exists(), "{} survived", cgroup.display());
    assert!(!socket.exists(), "{} survived", socket.display());
}
