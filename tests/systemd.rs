//! Running under systemd, without systemd as PID 1: the units pass `systemd-analyze verify`,
//! the daemon speaks sd_notify (READY, STATUS, WATCHDOG, STOPPING) to a socket the test holds,
//! writes journald's format when its stderr is the journal stream, serves the API from a socket
//! passed by `systemd-socket-activate`, and `deliverous install` stages, re-stages (changing
//! nothing) and removes its files.

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use common::{run_with_timeout, workspace_root, Daemon, DaemonOptions, Registry};

const BINARY: &str = env!("CARGO_BIN_EXE_deliverous");
const UNITS: [&str; 4] =
    ["deliverous.service", "deliverous.socket", "deliverous-http.socket", "deliverous-https.socket"];

fn have(tool: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(tool).is_file()))
}

#[test]
fn units_pass_systemd_analyze_verify() {
    if !have("systemd-analyze") {
        eprintln!("SKIPPED: systemd-analyze is missing (apt-get install systemd; scripts/test does)");
        return;
    }
    // verify also checks that ExecStart exists: point it at the binary under test.
    let dir = tempfile::Builder::new().prefix("dlv-units-").tempdir().expect("temp dir");
    let mut paths = Vec::new();
    for unit in UNITS {
        let text = std::fs::read_to_string(workspace_root().join("systemd").join(unit)).expect("read unit");
        let path = dir.path().join(unit);
        std::fs::write(&path, text.replace("/usr/local/bin/deliverous", BINARY)).expect("write unit");
        paths.push(path);
    }
    let out = run_with_timeout(Command::new("systemd-analyze").arg("verify").args(&paths), Duration::from_secs(60))
        .expect("run systemd-analyze verify");
    let stderr = String::from_utf8_lossy(&out.stderr);
    // It exits 0 on some errors (an unknown value is "ignored"): any message is a finding.
    assert!(out.status.success() && stderr.trim().is_empty(), "systemd-analyze verify: {}\n{stderr}", out.status);
}

/// Datagrams received on the test's notify socket, in order.
struct NotifySocket {
    socket: UnixDatagram,
    path: PathBuf,
    _dir: tempfile::TempDir,
    seen: Vec<String>,
}

impl NotifySocket {
    fn bind() -> NotifySocket {
        let dir = tempfile::Builder::new().prefix("dlv-notify-").tempdir().expect("temp dir");
        let path = dir.path().join("notify.sock");
        let socket = UnixDatagram::bind(&path).expect("bind notify socket");
        socket.set_read_timeout(Some(Duration::from_millis(200))).expect("set timeout");
        NotifySocket { socket, path, _dir: dir, seen: Vec::new() }
    }

    /// Reads messages (queued ones first) until one satisfies `wanted`; returns it.
    fn wait_for(&mut self, timeout: Duration, wanted: impl Fn(&str) -> bool) -> Option<String> {
        let deadline = Instant::now() + timeout;
        let mut buf = vec![0u8; 4096];
        while Instant::now() < deadline {
            if let Ok(n) = self.socket.recv(&mut buf) {
                let message = String::from_utf8_lossy(&buf[..n]).into_owned();
                self.seen.push(message.clone());
                if wanted(&message) {
                    return Some(message);
                }
            }
        }
        None
    }
}

/// The `deliverous` group for the test's duration: created (and removed afterwards) if the
/// machine has none.
struct ApiGroup {
    gid: u32,
    created: bool,
}

impl ApiGroup {
    fn ensure() -> ApiGroup {
        if let Some(gid) = group_gid("deliverous") {
            return ApiGroup { gid, created: false };
        }
        let out = run_with_timeout(Command::new("groupadd").args(["--system", "deliverous"]), Duration::from_secs(30))
            .expect("run groupadd");
        assert!(out.status.success(), "groupadd deliverous: {}", String::from_utf8_lossy(&out.stderr));
        ApiGroup { gid: group_gid("deliverous").expect("group deliverous after groupadd"), created: true }
    }
}

impl Drop for ApiGroup {
    fn drop(&mut self) {
        if self.created {
            let _ = run_with_timeout(Command::new("groupdel").arg("deliverous"), Duration::from_secs(30));
        }
    }
}

fn group_gid(name: &str) -> Option<u32> {
    let groups = std::fs::read_to_string("/etc/group").ok()?;
    groups.lines().find_map(|l| {
        let fields: Vec<&str> = l.split(':').collect();
        (fields.first() == Some(&name)).then(|| fields.get(2)?.parse().ok()).flatten()
    })
}

#[test]
fn notifies_ready_watchdog_and_stopping_and_logs_for_journald() {
    let registry = Registry::start();
    let group = ApiGroup::ensure();
    let mut notify = NotifySocket::bind();
    let mut daemon = Daemon::start_with(
        &registry,
        DaemonOptions {
            env: vec![
                ("NOTIFY_SOCKET".into(), notify.path.to_string_lossy().into_owned()),
                // A ping every 300 ms.
                ("WATCHDOG_USEC".into(), "600000".into()),
            ],
            journal_stream: true,
            ..Default::default()
        },
    );

    let ready = notify.wait_for(Duration::from_secs(20), |m| m.lines().any(|l| l == "READY=1"));
    let ready = ready.unwrap_or_else(|| panic!("no READY=1; got {:?}\n{}", notify.seen, daemon.log_tail(30)));
    assert!(ready.contains("STATUS=serving"), "READY comes with a status: {ready:?}");
    assert!(
        notify.seen.iter().any(|m| m.starts_with("STATUS=") && !m.contains("READY=1")),
        "a STATUS while starting: {:?}",
        notify.seen
    );
    // The API answers once READY was sent (the harness waited for `app ls`).
    daemon.cli_ok(&["app", "ls"]);

    // Pings keep coming while it runs (every 300 ms asked; generous bounds).
    for _ in 0..3 {
        assert!(notify.wait_for(Duration::from_secs(10), |m| m == "WATCHDOG=1").is_some(), "{:?}", notify.seen);
    }

    // The API socket: 0660, group deliverous.
    let meta = std::fs::metadata(daemon.socket()).expect("stat api socket");
    assert_eq!(meta.permissions().mode() & 0o7777, 0o660, "api socket mode");
    assert_eq!(meta.gid(), group.gid, "api socket group");

    let status = daemon.terminate().expect("daemon was running");
    assert!(status.success(), "daemon exit on SIGTERM: {status}");
    let stopping = notify.wait_for(Duration::from_secs(5), |m| m.lines().any(|l| l == "STOPPING=1"));
    assert!(stopping.is_some(), "no STOPPING=1; got {:?}", notify.seen);

    // journald's format: every daemon line starts with a priority, none with a timestamp.
    let log = std::fs::read_to_string(daemon.log_path()).expect("read daemon log");
    let lines: Vec<&str> = log.lines().filter(|l| !l.starts_with("=== harness")).collect();
    assert!(!lines.is_empty(), "the daemon logged nothing");
    for line in &lines {
        let priority = line.strip_prefix('<').and_then(|l| l.split_once('>')).map(|(p, _)| p);
        assert!(
            priority.is_some_and(|p| ["3", "4", "6", "7"].contains(&p)),
            "line without a syslog priority prefix: {line:?}\n{log}"
        );
        assert!(!line.contains('\u{1b}'), "escape sequence in a journal line: {line:?}");
    }
    assert!(
        lines.iter().any(|l| l.starts_with("<6>deliverous::daemon: proxy (pid ")),
        "info lines at priority 6:\n{log}"
    );
}

#[test]
fn serves_the_api_from_a_socket_passed_by_systemd() {
    if !have("systemd-socket-activate") {
        eprintln!("SKIPPED: systemd-socket-activate is missing (apt-get install systemd; scripts/test does)");
        return;
    }
    let registry = Registry::start();
    let image = common::push_testapp(&registry, "demo/testapp:1");
    // Also a proxy port, as deliverous-http.socket passes it: the proxy serves that one.
    let http = format!("127.0.0.1:{}", common::free_port());
    let mut daemon = Daemon::start_with(
        &registry,
        DaemonOptions {
            socket_activate: true,
            also_activate: vec![(http.clone(), "http".into())],
            ..Default::default()
        },
    );
    // The whole CLI works through the passed socket.
    daemon.cli_ok(&["image", "pull", &image.reference]);
    daemon.cli_ok(&["app", "create", "web", "--image", &image.reference, "--port", "8080"]);
    daemon.cli_ok(&["app", "start", "web"]);
    let (status, body) = common::http_get_retry(&http, "web.localhost", "/", Duration::from_secs(20), |s, _| s == 200);
    assert_eq!(status, 200, "{body}");
    daemon.cli_ok(&["app", "rm", "web"]);
    let log = std::fs::read_to_string(daemon.log_path()).unwrap_or_default();
    assert!(log.contains("API on the socket-activated descriptor"), "the daemon used the passed socket:\n{log}");
    assert!(
        log.contains(&format!("the proxy serves the socket-activated \"http\" sockets [{http}]")),
        "the proxy serves the passed socket:\n{log}"
    );

    // The socket belongs to whoever passed it: the daemon leaves it in place when it stops.
    let status = daemon.terminate().expect("daemon was running");
    assert!(status.success(), "{status}");
    assert!(daemon.socket().exists(), "the daemon removed the activated socket");
}

/// Path → (mode, mtime, content) of every file under `root`.
fn snapshot(root: &Path) -> BTreeMap<PathBuf, (u32, SystemTime, Vec<u8>)> {
    fn walk(dir: &Path, out: &mut BTreeMap<PathBuf, (u32, SystemTime, Vec<u8>)>) {
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let path = entry.path();
            let meta = entry.metadata().expect("stat");
            if meta.is_dir() {
                walk(&path, out);
            } else {
                let content = std::fs::read(&path).expect("read");
                out.insert(path, (meta.permissions().mode() & 0o7777, meta.modified().expect("mtime"), content));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, &mut out);
    out
}

fn install(root: &Path, extra: &[&str]) -> (bool, String, String) {
    let out = run_with_timeout(
        Command::new(BINARY).arg("install").arg("--root").arg(root).args(extra),
        Duration::from_secs(60),
    )
    .expect("run deliverous install");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn install_stages_files_once_and_uninstall_removes_them() {
    let root = tempfile::Builder::new().prefix("dlv-install-").tempdir().expect("temp dir");
    let root = root.path();

    // --dry-run changes nothing.
    let (ok, stdout, stderr) = install(root, &["--dry-run"]);
    assert!(ok, "{stdout}{stderr}");
    assert!(stdout.contains("would install"), "{stdout}");
    assert!(snapshot(root).is_empty(), "dry run wrote files");

    let (ok, stdout, stderr) = install(root, &[]);
    assert!(ok, "{stdout}{stderr}");
    let mut expected: BTreeMap<PathBuf, (u32, Vec<u8>)> = BTreeMap::new();
    expected.insert(root.join("usr/local/bin/deliverous"), (0o755, std::fs::read(BINARY).expect("read binary")));
    for unit in UNITS {
        let text = std::fs::read(workspace_root().join("systemd").join(unit)).expect("read unit");
        expected.insert(root.join("etc/systemd/system").join(unit), (0o644, text));
    }
    expected.insert(
        root.join("etc/sysusers.d/deliverous.conf"),
        (0o644, std::fs::read(workspace_root().join("systemd/deliverous.sysusers")).expect("read sysusers")),
    );
    let first = snapshot(root);
    let got: BTreeMap<PathBuf, (u32, Vec<u8>)> =
        first.iter().map(|(p, (mode, _, content))| (p.clone(), (*mode, content.clone()))).collect();
    assert_eq!(got.keys().collect::<Vec<_>>(), expected.keys().collect::<Vec<_>>(), "installed files");
    for (path, (mode, content)) in &expected {
        assert_eq!(got[path].0, *mode, "mode of {}", path.display());
        assert!(got[path].1 == *content, "content of {}", path.display());
    }
    assert!(stdout.contains("staged under"), "says what to do on the target: {stdout}");

    // Again: nothing changes, and it says so.
    std::thread::sleep(Duration::from_millis(20));
    let (ok, stdout, stderr) = install(root, &[]);
    assert!(ok, "{stdout}{stderr}");
    assert_eq!(snapshot(root), first, "a second install changed files");
    let file_lines: Vec<&str> = stdout.lines().filter(|l| l.contains(root.to_str().unwrap_or("\u{0}"))).collect();
    assert!(file_lines.iter().filter(|l| !l.starts_with("staged")).all(|l| l.starts_with("unchanged ")), "{stdout}");

    // A changed unit is put back.
    let service = root.join("etc/systemd/system/deliverous.service");
    std::fs::write(&service, "edited\n").expect("edit unit");
    let (ok, stdout, _) = install(root, &[]);
    assert!(ok && stdout.contains(&format!("update {}", service.display())), "{stdout}");
    assert_eq!(std::fs::read(&service).expect("read"), expected[&service].1);

    let (ok, stdout, _) = install(root, &["--uninstall", "--dry-run"]);
    assert!(ok && stdout.contains("would remove"), "{stdout}");
    assert_eq!(snapshot(root).len(), expected.len(), "dry-run uninstall removed files");

    let (ok, stdout, stderr) = install(root, &["--uninstall"]);
    assert!(ok, "{stdout}{stderr}");
    assert!(snapshot(root).is_empty(), "files left after --uninstall: {:?}", snapshot(root).keys());
    let (ok, stdout, _) = install(root, &["--uninstall"]);
    assert!(ok && stdout.contains("nothing to remove"), "{stdout}");

    // Bad input: a clear error, nothing written.
    let out =
        run_with_timeout(Command::new(BINARY).args(["install", "--root", "relative/dir"]), Duration::from_secs(30))
            .expect("run install");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("must be an absolute path"));
    assert!(!Path::new("relative").exists());
}

#[test]
fn install_dry_run_on_this_host_changes_nothing_and_says_what_to_do() {
    let watched =
        ["/usr/local/bin/deliverous", "/etc/systemd/system/deliverous.service", "/etc/sysusers.d/deliverous.conf"];
    let before: Vec<bool> = watched.iter().map(|p| Path::new(p).exists()).collect();
    let had_group = group_gid("deliverous").is_some();
    let out = run_with_timeout(Command::new(BINARY).args(["install", "--dry-run"]), Duration::from_secs(60))
        .expect("run install --dry-run");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(watched.iter().map(|p| Path::new(p).exists()).collect::<Vec<_>>(), before, "dry run wrote files");
    assert_eq!(group_gid("deliverous").is_some(), had_group, "dry run changed the groups");
    assert!(
        stdout.contains("/usr/local/bin/deliverous") && stdout.contains("/etc/systemd/system/deliverous.socket"),
        "{stdout}"
    );
    if Path::new("/run/systemd/system").is_dir() {
        assert!(stdout.contains("would run: systemctl enable --now deliverous.socket deliverous.service"), "{stdout}");
    } else {
        // Like this test machine: PID 1 is not systemd, so nothing would be enabled.
        assert!(stdout.contains("systemd is not running"), "{stdout}");
    }
}
