//! Shared harness for the integration tests: a local OCI registry, test images pushed to it,
//! the `deliverous` daemon as a subprocess, and plain HTTP through its proxy.
//!
//! Every fixture is an RAII guard: dropping it removes what it created, also when the test
//! panicked. Names are unique per fixture, and only processes the harness started (by PID) or
//! that carry a fixture's unique names are ever killed. Use it with `mod common;`.
#![allow(dead_code, unused_imports)]

mod daemon;
mod http;
mod image;
mod netns;
mod registry;

pub use daemon::{CliOutput, Daemon, DaemonNames, DaemonOptions};
pub use http::{http_get, http_get_retry, try_http_get, Conn, Response};
pub use image::{
    busybox_rootfs, push_busybox_httpd, push_layered, push_testapp, testapp_binary, testapp_image, Layer, PushedImage,
    TestImage,
};
pub use netns::Netns;
pub use registry::Registry;

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The workspace root (where the root `Cargo.toml` is).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `n` random lowercase hex digits, different on every call (also across threads).
pub fn unique_hex(n: usize) -> String {
    static CALLS: AtomicU64 = AtomicU64::new(0);
    let mut out = String::new();
    while out.len() < n {
        let mut h = RandomState::new().build_hasher();
        h.write_u64(CALLS.fetch_add(1, Ordering::Relaxed));
        h.write_u32(std::process::id());
        out.push_str(&format!("{:016x}", h.finish()));
    }
    out.truncate(n);
    out
}

/// A TCP port on 127.0.0.1 that was free a moment ago (the kernel picked it).
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local_addr").port()
}

/// Polls `done` every 100 ms until it returns true or `timeout` passes; returns whether it did.
pub fn wait_until(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The last `n` lines of a (log) file; empty if it cannot be read. Reads at most the last 256 KiB.
pub fn tail(path: &Path, n: usize) -> String {
    let Ok(mut f) = std::fs::File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(256 * 1024)));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Runs `cmd` with stdout/stderr captured; kills it (by its PID) if it outlives `timeout`.
pub fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> std::io::Result<Output> {
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
    // Drain both pipes in threads so a chatty child cannot block on a full pipe.
    let mut stdout = child.stdout.take().expect("piped stdout");
    let mut stderr = child.stderr.take().expect("piped stderr");
    let out_reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = stdout.read_to_end(&mut v);
        v
    });
    let err_reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = stderr.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("{cmd:?} did not finish within {timeout:?}; killed it"),
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Ok(Output { status, stdout: out_reader.join().unwrap_or_default(), stderr: err_reader.join().unwrap_or_default() })
}

/// What `/work/shared/tools/leaks` reports: kernel objects and processes named `deliverous`/`dlv`
/// left on the machine, one per line. Empty when clean or when the tool is not there.
///
/// It sees the whole machine, including fixtures of tests still running in parallel; to check
/// one daemon's leftovers use [`DaemonNames::leaks`].
pub fn leaks() -> String {
    let tool = workspace_root().join("../shared/tools/leaks");
    if !tool.exists() {
        return String::new();
    }
    match run_with_timeout(Command::new("bash").arg(&tool), Duration::from_secs(60)) {
        Ok(out) => String::from_utf8_lossy(&out.stdout).trim_end().to_string(),
        Err(e) => format!("leaks tool failed to run: {e}"),
    }
}

/// Sends `signal` to `pid` (a process the harness started or identified by its unique names).
pub(crate) fn send_signal(pid: u32, signal: i32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    if pid <= 1 {
        return false;
    }
    // SAFETY: kill(2) has no memory-safety preconditions; pid > 1 so it targets one process.
    unsafe { libc::kill(pid, signal) == 0 }
}

/// PIDs of the processes whose argv satisfies `matches` (read from /proc; racy by nature).
pub fn pids_where(matches: impl Fn(&[String]) -> bool) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let Ok(raw) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                return false;
            };
            let argv: Vec<String> = raw
                .split(|b| *b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            !argv.is_empty() && matches(&argv)
        })
        .collect()
}

/// Whether the host mounts pure cgroup v2 at /sys/fs/cgroup (else v1 or the v1 hybrid).
pub fn cgroup_v2() -> bool {
    Path::new("/sys/fs/cgroup/cgroup.controllers").exists()
}
