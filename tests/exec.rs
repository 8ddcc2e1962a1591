//! `deliverous exec` (a command inside a running instance: its namespaces, cgroup, user,
//! environment and restrictions) and `deliverous run` (a one-off instance of the current
//! revision, removed afterwards whatever happens to its client).

mod common;

use std::collections::BTreeSet;
use std::io::Write;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{wait_until, Daemon, Registry};

/// A daemon running app `web` (the test app, GREETING=hello) with one instance: its id and pid.
fn web() -> (Registry, Daemon, String, u64) {
    let registry = Registry::start();
    let image = common::push_testapp(&registry, "demo/testapp:1");
    let daemon = Daemon::start(&registry);
    daemon.cli_ok(&["app", "create", "web", "--image", &image.reference, "--port", "8080", "-e", "GREETING=hello"]);
    daemon.cli_ok(&["app", "start", "web"]);
    let show = daemon.cli_json(&["app", "show", "web", "--json"]);
    let instance = &show["instances"][0];
    let id = instance["id"].as_str().expect("instance id").to_string();
    let pid = instance["pid"].as_u64().expect("instance pid");
    (registry, daemon, id, pid)
}

fn code(out: &common::CliOutput) -> Option<i32> {
    out.status.code()
}

/// Kills a CLI the test started (by its PID) if the test ends before it does.
struct CliChild(Child);

impl Drop for CliChild {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn exec_runs_inside_the_instance_with_its_environment_and_exit_code() {
    let (_registry, daemon, id, pid) = web();

    let out = daemon.cli(&["exec", "web.1", "--", "sh", "-c", "exit 3"]);
    assert_eq!(code(&out), Some(3), "{out:?}");

    let out = daemon.cli_ok(&["exec", "web", "--", "sh", "-c", "echo $GREETING; hostname; pwd; id -u; echo $HOME"]);
    assert_eq!(out, "hello\nweb.1\n/app\n0\n/root\n", "the app's env, hostname, the image's workdir and user");

    let out = daemon.cli_ok(&[
        "exec",
        "-e",
        "EXTRA=x",
        "-e",
        "GREETING=bye",
        "-w",
        "/tmp",
        "-u",
        "65534",
        "web.1",
        "--",
        "sh",
        "-c",
        "echo $EXTRA $GREETING; pwd; id -u",
    ]);
    assert_eq!(out, "x bye\n/tmp\n65534\n");

    // stdout and stderr stay apart.
    let out = daemon.cli(&["exec", "web.1", "--", "sh", "-c", "echo out; echo err >&2"]);
    assert_eq!((out.stdout.as_str(), out.stderr.as_str(), code(&out)), ("out\n", "err\n", Some(0)));

    // A background process that keeps the streams open does not hold the exit back for long.
    let started = std::time::Instant::now();
    let out = daemon.cli(&["exec", "web.1", "--", "sh", "-c", "sleep 304 & echo bg"]);
    assert_eq!((out.stdout.as_str(), code(&out)), ("bg\n", Some(0)), "{out:?}");
    assert!(started.elapsed() < Duration::from_secs(60), "exec waited for its background process");

    // A signal is 128 + its number, as in a shell.
    let out = daemon.cli(&["exec", "web.1", "--", "sh", "-c", "kill -9 $$"]);
    assert_eq!(code(&out), Some(137), "{out:?}");

    // Namespaces: the same network, mount and pid namespaces as the instance's init.
    for ns in ["net", "mnt", "pid", "uts", "ipc"] {
        let inside = daemon.cli_ok(&["exec", "web.1", "--", "busybox", "readlink", &format!("/proc/self/ns/{ns}")]);
        let instance = std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).expect("instance namespace");
        assert_eq!(inside.trim(), instance.to_string_lossy(), "{ns} namespace");
    }
    let init = daemon.cli_ok(&["exec", "web.1", "--", "cat", "/proc/1/cmdline"]);
    assert!(init.starts_with("/app/testapp"), "pid 1 is the instance's init: {init:?}");
    // The cgroup: limits apply to the command too.
    let cgroup = daemon.cli_ok(&["exec", "web.1", "--", "cat", "/proc/self/cgroup"]);
    assert!(cgroup.lines().all(|l| l.contains(&id) || l.ends_with(":/")), "not in the instance's cgroup:\n{cgroup}");
    assert!(cgroup.contains(&id), "{cgroup}");
    // What the instance may not do, the command may not do either.
    let out = daemon.cli(&["exec", "web.1", "--", "mount", "-t", "tmpfs", "tmpfs", "/mnt"]);
    assert_ne!(code(&out), Some(0), "mount succeeded inside the instance: {out:?}");
    let status = daemon.cli_ok(&["exec", "web.1", "--", "cat", "/proc/self/status"]);
    let field = |name: &str| status.lines().find(|l| l.starts_with(name)).unwrap_or_default().to_string();
    assert!(field("NoNewPrivs:").ends_with('1'), "{status}");
    assert!(field("Seccomp:").ends_with('2'), "no seccomp filter: {status}");
    let host_bounding = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let instance_bounding = host_bounding.lines().find(|l| l.starts_with("CapBnd:")).unwrap_or_default();
    assert_eq!(field("CapBnd:"), instance_bounding, "the instance's capability bounding set");

    // Not found is 127, not executable 126, as in a shell.
    let out = daemon.cli(&["exec", "web.1", "--", "no-such-command"]);
    assert_eq!(code(&out), Some(127), "{out:?}");
    assert!(out.stderr.contains("no-such-command"), "{out:?}");
    let out = daemon.cli(&["exec", "web.1", "--", "/etc/passwd"]);
    assert_eq!(code(&out), Some(126), "{out:?}");

    // No such instance: a clear error and exit code 1.
    for target in ["web.7", "nope", "nope.1"] {
        let out = daemon.cli(&["exec", target, "--", "true"]);
        assert_eq!(code(&out), Some(1), "{target}: {out:?}");
        assert!(out.stderr.contains(target.split('.').next().unwrap_or(target)), "{target}: {out:?}");
    }
    let out = daemon.cli(&["exec", "-u", "nobody-here", "web.1", "--", "true"]);
    assert_eq!(code(&out), Some(126), "{out:?}");
    assert!(out.stderr.contains("nobody-here"), "{out:?}");
}

#[test]
fn exec_attaches_stdin_and_a_terminal() {
    let (_registry, daemon, _id, _pid) = web();

    // -i: stdin reaches the command, and its end ends `cat`.
    let mut cli = CliChild(
        daemon
            .command(&["exec", "-i", "web.1", "--", "cat"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run the CLI"),
    );
    let data: Vec<u8> = (0..200_000u32).flat_map(|i| format!("line {i}\n").into_bytes()).collect();
    let mut stdin = cli.0.stdin.take().expect("stdin");
    let writer = {
        let data = data.clone();
        std::thread::spawn(move || {
            let _ = stdin.write_all(&data);
        })
    };
    let mut out = Vec::new();
    std::io::Read::read_to_end(cli.0.stdout.as_mut().expect("stdout"), &mut out).expect("read");
    let _ = writer.join();
    let status = cli.0.wait().expect("wait");
    assert!(status.success(), "{status}");
    assert!(out == data, "cat echoed {} bytes of {}", out.len(), data.len());

    // The client killed: the command and its children are killed.
    let mut cli = CliChild(
        daemon
            .command(&["exec", "web.1", "--", "sh", "-c", "echo started; sleep 305; echo never"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("run the CLI"),
    );
    let mut reader = std::io::BufReader::new(cli.0.stdout.take().expect("stdout"));
    let mut first = String::new();
    std::io::BufRead::read_line(&mut reader, &mut first).expect("read");
    assert_eq!(first, "started\n");
    // `sh` has printed, but its `sleep` may not have been exec'd yet.
    assert!(
        wait_until(Duration::from_secs(10), || ours(&daemon, |a| a.iter().any(|x| x == "305")).len() == 1),
        "the exec'd command's child is not running"
    );
    let _ = cli.0.kill();
    let _ = cli.0.wait();
    assert!(
        wait_until(Duration::from_secs(10), || ours(&daemon, |a| a.iter().any(|x| x.contains("305"))).is_empty()),
        "the exec'd command outlived its client"
    );

    // Without -i the command reads nothing.
    let out = daemon.cli_ok(&["exec", "web.1", "--", "sh", "-c", "cat; echo done"]);
    assert_eq!(out, "done\n");

    // -t: a pty of the instance's own /dev/pts, driven through `script`'s pty.
    let cli_line = format!(
        "{} --host unix:{} exec -it web.1 -- sh -c 'busybox tty; busybox stty size; exit 5'",
        env!("CARGO_BIN_EXE_deliverous"),
        daemon.socket().display()
    );
    let out = common::run_with_timeout(
        Command::new("script").args([
            "-qec",
            &format!("stty rows 33 cols 101; {cli_line}; code=$?; stty -a; exit $code"),
            "/dev/null",
        ]),
        Duration::from_secs(60),
    )
    .expect("script");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("/dev/pts/"), "{text:?}");
    assert!(text.contains("33 101"), "the window size reaches the command: {text:?}");
    assert_eq!(out.status.code(), Some(5), "{text:?}");
    // The terminal left raw mode when the CLI ended.
    let settings = text.rsplit("speed").next().unwrap_or_default();
    let flags: Vec<&str> = settings.split(|c: char| c.is_whitespace() || c == ';').collect();
    for flag in ["icanon", "echo", "isig"] {
        assert!(flags.contains(&flag), "{flag} is off after the CLI: {settings}");
    }
}

#[test]
fn exec_without_upgrade_captures_output_for_health_checks() {
    let (_registry, daemon, _id, _pid) = web();
    let post = |body: &str| {
        let out = common::run_with_timeout(
            Command::new("curl").args([
                "-s",
                "--unix-socket",
                &daemon.socket().to_string_lossy(),
                "-X",
                "POST",
                "-H",
                "content-type: application/json",
                "-d",
                body,
                "-w",
                "\n%{http_code}",
                "http://deliverous/v1/exec",
            ]),
            Duration::from_secs(60),
        )
        .expect("curl");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (json, status) = text.rsplit_once('\n').expect("status line");
        (status.to_string(), serde_json::from_str::<serde_json::Value>(json).unwrap_or_default())
    };
    let (status, v) = post(r#"{"instance":"web.1","cmd":["sh","-c","echo ok; echo bad >&2; exit 2"]}"#);
    assert_eq!(status, "200", "{v}");
    assert_eq!(v["exit_code"], 2);
    assert_eq!(v["output"], "ok\nbad\n");
    // Output is cut at 4 KiB; the command still runs to its end.
    let (_, v) = post(r#"{"instance":"web.1","cmd":["sh","-c","busybox yes | head -c 100000; exit 0"]}"#);
    assert_eq!((v["exit_code"].as_i64(), v["output"].as_str().map(str::len)), (Some(0), Some(4096)), "{v}");
    // A command that outlives its timeout is killed.
    let (status, v) = post(r#"{"instance":"web.1","cmd":["sleep","30"],"timeout_ms":500}"#);
    assert_eq!(status, "504", "{v}");
    assert!(wait_until(Duration::from_secs(10), || {
        daemon.cli_ok(&["exec", "web.1", "--", "ps", "-o", "args"]).lines().all(|l| !l.contains("sleep 30"))
    }));
    let (status, _) = post(r#"{"instance":"web.1","cmd":[]}"#);
    assert_eq!(status, "400");
}

/// What the daemon has of its instances on the machine: instance dirs, netns files, cgroups,
/// veths, and the instances it lists.
fn traces(daemon: &Daemon, id: &str) -> (BTreeSet<String>, BTreeSet<String>, BTreeSet<String>, usize, usize) {
    let names_in = |dir: &Path| -> BTreeSet<String> {
        std::fs::read_dir(dir)
            .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default()
    };
    let instances = names_in(&daemon.data_dir().join("instances"));
    let netns = names_in(&daemon.run_dir().join("netns"));
    let cgroup_parent = daemon.cgroup_file(id, "pids", "");
    let cgroups: BTreeSet<String> = names_in(cgroup_parent.parent().expect("cgroup parent"))
        .into_iter()
        .filter(|n| n.len() == 12 && n.bytes().all(|b| b.is_ascii_hexdigit()))
        .collect();
    let prefix = &daemon.names().veth_prefix;
    let veths = names_in(Path::new("/sys/class/net")).iter().filter(|n| n.starts_with(prefix.as_str())).count();
    let show = daemon.cli_json(&["app", "show", "web", "--json"]);
    let listed = show["instances"].as_array().map_or(0, Vec::len);
    (instances, netns, cgroups, veths, listed)
}

/// Processes matching `matches` in this daemon's cgroups (tests run side by side).
fn ours(daemon: &Daemon, matches: impl Fn(&[String]) -> bool) -> Vec<u32> {
    let parent = format!("/{}/", daemon.names().cgroup_parent);
    common::pids_where(matches)
        .into_iter()
        .filter(|pid| std::fs::read_to_string(format!("/proc/{pid}/cgroup")).is_ok_and(|c| c.contains(&parent)))
        .collect()
}

fn assert_only_the_app_instance_is_left(daemon: &Daemon, id: &str) {
    let only: BTreeSet<String> = [id.to_string()].into();
    let clean = wait_until(Duration::from_secs(30), || {
        let (instances, netns, cgroups, veths, listed) = traces(daemon, id);
        instances == only && netns == only && cgroups == only && veths == 1 && listed == 1
    });
    assert!(clean, "a one-off instance left traces: {:?}\n{}", traces(daemon, id), daemon.log_tail(30));
}

#[test]
fn run_starts_a_one_off_instance_and_removes_it() {
    let (_registry, daemon, id, _pid) = web();

    let out = daemon.cli(&["run", "web", "-e", "EXTRA=x", "--", "sh", "-c", "echo $GREETING $EXTRA; hostname; exit 4"]);
    assert_eq!(code(&out), Some(4), "{out:?}\n{}", daemon.log_tail(30));
    let mut lines = out.stdout.lines();
    assert_eq!(lines.next(), Some("hello x"), "{out:?}");
    let host = lines.next().unwrap_or_default();
    assert!(host.starts_with("web.run.") && host.len() == "web.run.".len() + 6, "{out:?}");
    assert_only_the_app_instance_is_left(&daemon, &id);

    // stdin and a missing command.
    let mut cli = CliChild(
        daemon
            .command(&["run", "-i", "web", "--", "sh", "-c", "tr a-z A-Z"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run the CLI"),
    );
    cli.0.stdin.take().expect("stdin").write_all(b"one-off\n").expect("write");
    let mut out = String::new();
    std::io::Read::read_to_string(cli.0.stdout.as_mut().expect("stdout"), &mut out).expect("read");
    assert_eq!(out, "ONE-OFF\n");
    assert!(cli.0.wait().expect("wait").success());
    let out = daemon.cli(&["run", "web", "--", "no-such-command"]);
    assert_eq!(code(&out), Some(127), "{out:?}");
    let out = daemon.cli(&["run", "nope", "--", "true"]);
    assert_eq!(code(&out), Some(1), "{out:?}");
    assert_only_the_app_instance_is_left(&daemon, &id);

    // A one-off instance running the app's own server is never routed to.
    let mut cli = CliChild(
        daemon
            .command(&["run", "web", "--", "/app/testapp"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("run the CLI"),
    );
    let mut reader = std::io::BufReader::new(cli.0.stdout.take().expect("stdout"));
    let mut first = String::new();
    std::io::BufRead::read_line(&mut reader, &mut first).expect("read");
    assert!(first.contains("listening"), "{first:?}");
    for _ in 0..20 {
        let (status, body) = common::http_get(daemon.proxy_addr(), "web.localhost", "/hostname");
        assert_eq!((status, body.trim()), (200, "web.1"));
    }
    // Its client killed: the command is killed and the instance removed.
    let _ = cli.0.kill();
    let _ = cli.0.wait();
    assert_only_the_app_instance_is_left(&daemon, &id);
    let procs = ours(&daemon, |argv| argv.first().is_some_and(|a| a == "/app/testapp"));
    assert_eq!(procs.len(), 1, "the one-off server still runs: {procs:?}");
}

#[test]
fn a_one_off_instance_is_collected_by_the_next_daemon() {
    let (_registry, mut daemon, id, _pid) = web();
    let mut cli = CliChild(
        daemon
            .command(&["run", "web", "--", "sh", "-c", "echo started; sleep 300"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("run the CLI"),
    );
    let mut reader = std::io::BufReader::new(cli.0.stdout.take().expect("stdout"));
    let mut first = String::new();
    std::io::BufRead::read_line(&mut reader, &mut first).expect("read");
    assert_eq!(first, "started\n");
    daemon.kill9();
    let _ = cli.0.wait();
    daemon.restart();
    assert_only_the_app_instance_is_left(&daemon, &id);
    let sleeping = ours(&daemon, |argv| argv.len() == 2 && argv[0] == "sleep" && argv[1] == "300");
    assert!(sleeping.is_empty(), "the one-off command outlived the cleanup: {sleeping:?}");
}

#[test]
fn run_with_a_terminal() {
    let (_registry, daemon, id, _pid) = web();
    let cli_line = format!(
        "{} --host unix:{} run -it web -- sh -c 'busybox tty; busybox stty size; echo $GREETING; exit 6'",
        env!("CARGO_BIN_EXE_deliverous"),
        daemon.socket().display()
    );
    let out = common::run_with_timeout(
        Command::new("script").args(["-qec", &format!("stty rows 21 cols 77; {cli_line}"), "/dev/null"]),
        Duration::from_secs(60),
    )
    .expect("script");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("/dev/pts/"), "{text:?}\n{}", daemon.log_tail(20));
    assert!(text.contains("21 77"), "the window size reaches the command: {text:?}");
    assert!(text.contains("hello"), "{text:?}");
    assert_eq!(out.status.code(), Some(6), "{text:?}");
    assert_only_the_app_instance_is_left(&daemon, &id);
}

#[test]
fn a_daemon_stops_promptly_with_attached_sessions_and_leaves_nothing() {
    let (_registry, mut daemon, id, _pid) = web();
    let spawn = |args: &[&str]| {
        let mut child = CliChild(
            daemon
                .command(args)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .expect("CLI"),
        );
        let mut reader = std::io::BufReader::new(child.0.stdout.take().expect("stdout"));
        let mut first = String::new();
        std::io::BufRead::read_line(&mut reader, &mut first).expect("read");
        assert_eq!(first, "started\n");
        child
    };
    let mut exec = spawn(&["exec", "web.1", "--", "sh", "-c", "echo started; exec sleep 301"]);
    let mut run = spawn(&["run", "web", "--", "sh", "-c", "echo started; exec sleep 302"]);
    let started = std::time::Instant::now();
    let status = daemon.terminate().expect("the daemon ran");
    assert!(status.success(), "{status}");
    assert!(started.elapsed() < Duration::from_secs(14), "the daemon waited for its attached clients");
    // Both clients learn that the daemon went away.
    assert_ne!(exec.0.wait().expect("wait").code(), Some(0));
    assert_ne!(run.0.wait().expect("wait").code(), Some(0));
    // The exec'd command dies with its helper's connection; the one-off instance is collected
    // by the next daemon.
    assert!(wait_until(Duration::from_secs(10), || ours(&daemon, |a| a.iter().any(|x| x == "301")).is_empty()));
    daemon.restart();
    assert_only_the_app_instance_is_left(&daemon, &id);
    assert!(ours(&daemon, |a| a.iter().any(|x| x == "302")).is_empty());
}

#[test]
fn removing_an_app_ends_its_one_off_instances() {
    let (_registry, daemon, id, _pid) = web();
    let mut run = CliChild(
        daemon
            .command(&["run", "web", "--", "sh", "-c", "echo started; exec sleep 303"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("CLI"),
    );
    let mut reader = std::io::BufReader::new(run.0.stdout.take().expect("stdout"));
    let mut first = String::new();
    std::io::BufRead::read_line(&mut reader, &mut first).expect("read");
    assert_eq!(first, "started\n");
    daemon.cli_ok(&["app", "rm", "web"]);
    assert_eq!(run.0.wait().expect("wait").code(), Some(137), "killed: 128 + 9");
    assert!(ours(&daemon, |a| a.iter().any(|x| x == "303")).is_empty());
    let instances = daemon.data_dir().join("instances");
    let left: Vec<_> =
        std::fs::read_dir(&instances).map(|d| d.flatten().map(|e| e.file_name()).collect()).unwrap_or_default();
    assert!(left.is_empty(), "instance dirs left: {left:?} (app instance was {id})");
}

#[test]
fn a_one_off_instance_shares_the_apps_volumes_and_limits() {
    let registry = Registry::start();
    let image = common::push_testapp(&registry, "demo/testapp:1");
    let daemon = Daemon::start(&registry);
    daemon.cli_ok(&[
        "app",
        "create",
        "web",
        "--image",
        &image.reference,
        "--port",
        "8080",
        "-v",
        "data:/data",
        "--memory",
        "64M",
    ]);
    daemon.cli_ok(&["app", "start", "web"]);
    daemon.cli_ok(&["exec", "web.1", "--", "sh", "-c", "echo from-exec > /data/note"]);
    let out = daemon.cli_ok(&["run", "web", "--", "sh", "-c", "cat /data/note; echo from-run >> /data/note"]);
    assert_eq!(out, "from-exec\n");
    let out = daemon.cli_ok(&["exec", "web", "--", "cat", "/data/note"]);
    assert_eq!(out, "from-exec\nfrom-run\n");
    // The memory limit is the app's: read from the one-off instance's cgroup while it runs.
    let mut cli = CliChild(
        daemon
            .command(&["run", "web", "--", "sh", "-c", "cat /proc/self/cgroup; echo end; exec sleep 306"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("run the CLI"),
    );
    let mut reader = std::io::BufReader::new(cli.0.stdout.take().expect("stdout"));
    let mut uid = None;
    loop {
        let mut line = String::new();
        if std::io::BufRead::read_line(&mut reader, &mut line).expect("read") == 0 || line == "end\n" {
            break;
        }
        let parent = format!("/{}/", daemon.names().cgroup_parent);
        if let Some((_, rest)) = line.trim().split_once(&parent) {
            uid = Some(rest.to_string());
        }
    }
    let uid = uid.expect("the one-off instance's cgroup");
    let file = if common::cgroup_v2() {
        daemon.cgroup_file(&uid, "memory", "memory.max")
    } else {
        daemon.cgroup_file(&uid, "memory", "memory.limit_in_bytes")
    };
    let limit = std::fs::read_to_string(&file).unwrap_or_default();
    assert_eq!(limit.trim(), (64u64 << 20).to_string(), "{}", file.display());
    drop(cli);
    assert!(wait_until(Duration::from_secs(30), || !file.exists()), "the one-off cgroup was left");
}
