//! The embedded monitor program on its own, without a container: a shell stands in for the
//! container's init (its child, writing to the pipes it watches), so the log, the control
//! protocol, the stop timeout, the exit file and the final `shim-finish` are seen end to end,
//! as an unprivileged user can run them.

use std::io::{BufRead, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use deliverous_runtime::shim::handoff::Handoff;
use deliverous_runtime::shim::monitor;

fn request(socket: &Path, line: &str) -> String {
    let mut stream = UnixStream::connect(socket).expect("connect");
    stream.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
    stream.write_all(line.as_bytes()).expect("send");
    let mut reply = String::new();
    std::io::BufReader::new(stream).read_line(&mut reply).expect("reply");
    reply
}

/// Kills the stand-in init if the test fails half-way (the monitor ends with it).
struct KillOnDrop(Option<i32>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            // SAFETY: kill takes integers only; the pid is the stand-in we started.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

fn pipe() -> (OwnedFd, OwnedFd) {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).expect("pipe")
}

#[test]
fn the_monitor_logs_answers_stops_and_records_the_exit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let program = monitor::install(&dir.path().join("bin")).expect("install the monitor");
    let socket = dir.path().join("ctl.sock");
    let listener = UnixListener::bind(&socket).expect("bind");
    let (out_r, out_w) = pipe();
    let (err_r, err_w) = pipe();
    let (report_r, report_w) = pipe();
    // `true` stands in for the deliverous binary: its `shim-finish` succeeds.
    let exe = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_PATH).open(which_true()).expect("open true");
    let handoff = Handoff {
        id: "dlv-monitor-test".into(),
        state_root: dir.path().join("containers"),
        log: dir.path().join("log"),
        log_max_bytes: 1 << 20,
        log_keep: 1,
        socket: socket.clone(),
        exit_file: dir.path().join("exit.json"),
        cgroups_path: "/dlv-monitor-test-none".into(),
        pid: 0, // set by the shell below
        stdout_fd: Some(out_r.as_raw_fd()),
        stderr_fd: Some(err_r.as_raw_fd()),
        listener_fd: listener.as_raw_fd(),
        exe_fd: exe.as_raw_fd(),
    };
    // The shell starts the stand-in init (deaf to SIGTERM, so that the stop times out) and
    // execs the monitor, which thus inherits it as its child, as it inherits a container's.
    let script = r#"
        sh -c 'trap "" TERM; echo hello; echo oops >&2; printf "no newline"; exec sleep 300' \
            >&{OUT_W} 2>&{ERR_W} {OUT_W}>&- {ERR_W}>&- &
        export DLV_SHIM_PID=$!
        exec "$MONITOR" shim --id dlv-monitor-test {OUT_W}>&- {ERR_W}>&- 2>/dev/null
    "#;
    let script =
        script.replace("{OUT_W}", &out_w.as_raw_fd().to_string()).replace("{ERR_W}", &err_w.as_raw_fd().to_string());
    let inherited = [
        out_r.as_raw_fd(),
        err_r.as_raw_fd(),
        out_w.as_raw_fd(),
        err_w.as_raw_fd(),
        listener.as_raw_fd(),
        exe.as_raw_fd(),
    ];
    let mut cmd = Command::new("bash");
    cmd.arg("-c")
        .arg(&script)
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .envs(handoff.to_env().into_iter().filter(|(k, _)| k != "DLV_SHIM_PID"))
        .env("MONITOR", &program)
        .stdin(Stdio::null())
        .stdout(std::fs::File::from(report_w.try_clone().expect("dup")));
    // SAFETY: between fork and exec we only call fcntl, which is async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            for fd in inherited {
                if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let mut monitor_process = cmd.spawn().expect("start the shell");
    drop((out_w, err_w, report_w, out_r, err_r, listener, exe));

    let mut report = String::new();
    std::io::BufReader::new(std::fs::File::from(report_r)).read_line(&mut report).expect("report");
    let init: i32 =
        report.trim().strip_prefix("ok ").and_then(|p| p.parse().ok()).unwrap_or_else(|| panic!("report {report:?}"));
    let guard = KillOnDrop(Some(init));

    let state = request(&socket, "{\"op\":\"state\"}\n");
    assert_eq!(state.trim(), format!("{{\"ok\":true,\"pid\":{init}}}"));
    let bad = request(&socket, "{\"op\":\"reboot\"}\n");
    assert!(bad.starts_with("{\"ok\":false,\"error\":\"bad request: unknown op"), "{bad}");

    // Once it has spoken, the stand-in ignores SIGTERM.
    let log_path = dir.path().join("log");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !std::fs::read_to_string(&log_path).unwrap_or_default().contains(" stdout hello\n") {
        assert!(Instant::now() < deadline, "the stand-in's first line never reached the log");
        std::thread::sleep(Duration::from_millis(10));
    }
    // Stop: SIGTERM is ignored, so SIGKILL follows after the timeout; the reply comes at exit.
    let asked = Instant::now();
    let stopped = request(&socket, "{\"op\":\"stop\",\"signal\":15,\"timeout_ms\":300}\n");
    assert!(asked.elapsed() >= Duration::from_millis(300), "replied before the stop timeout");
    let reply: serde_json::Value = serde_json::from_str(&stopped).expect("JSON");
    assert_eq!(reply["ok"], true, "{reply}");
    assert_eq!(reply["pid"], init, "{reply}");
    assert_eq!(reply["exit"]["signal"], 9, "{reply}");
    assert_eq!(reply["exit"]["oom"], false, "{reply}");
    let status = monitor_process.wait().expect("wait for the monitor");
    assert!(status.success(), "{status}");
    drop(guard);

    let exit: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("exit.json")).expect("exit file")).expect("JSON");
    assert_eq!(exit, reply["exit"]);
    assert!(!socket.exists(), "the socket outlived the monitor");
    let log = std::fs::read_to_string(dir.path().join("log")).expect("log");
    let lines: Vec<(&str, &str)> = log.lines().filter_map(|l| l.split_once(' ')).collect();
    let tagged: Vec<&str> = lines.iter().map(|(_, rest)| *rest).collect();
    for expected in [
        "stdout hello",
        "stderr oops",
        "stdout no newline",
        "shim stop timeout reached: sending SIGKILL to every process of the instance",
        "shim instance ended: signal 9",
    ] {
        assert!(tagged.contains(&expected), "{expected:?} missing from the log:\n{log}");
    }
    assert!(!log.contains("cannot delete container"), "{log}");
    for (stamp, _) in lines {
        assert!(stamp.len() == 27 && stamp.ends_with('Z') && stamp.as_bytes()[10] == b'T', "stamp {stamp:?}");
    }
}

fn which_true() -> &'static str {
    ["/usr/bin/true", "/bin/true"].into_iter().find(|p| Path::new(p).exists()).expect("a `true` binary")
}
