//! The routes that look at or act on the instance itself: its hostname and environment, its
//! memory, pids and CPU limits, its files, its exit, and what the kernel lets it do (`/probe`).
//! They answer GET and HEAD only, with a whole `text/plain` body.

use std::time::Duration;

use crate::{mknod, mount, syscall, unshare};

#[cfg(target_arch = "x86_64")]
const SYS_KEYCTL: i64 = 250;
#[cfg(target_arch = "aarch64")]
const SYS_KEYCTL: i64 = 219;
const SYS_CLONE3: i64 = 435;

/// Decides the answer: (status, body, exit code to exit with after answering).
pub fn route(method: &str, path: &str, query: &str) -> (u16, String, Option<i32>) {
    if method != "GET" && method != "HEAD" {
        return (405, "method not allowed\n".into(), None);
    }
    match path {
        "/" | "/hostname" => (200, format!("{}\n", crate::hostname()), None),
        "/hog" => match param(query, "mb").and_then(|v| v.parse::<usize>().ok()) {
            Some(mb) => {
                hog(mb);
                (200, format!("allocated {mb} MiB\n"), None)
            }
            None => (400, "usage: /hog?mb=N\n".into(), None),
        },
        "/spawn" => {
            let n = param(query, "n").and_then(|v| v.parse::<usize>().ok());
            let secs = param(query, "secs").and_then(|v| v.parse::<u64>().ok());
            match (n, secs) {
                (Some(n), Some(secs)) => (200, spawn_sleepers(n, secs), None),
                _ => (400, "usage: /spawn?n=N&secs=S\n".into(), None),
            }
        }
        "/bomb" => match std::process::Command::new("/bin/sh").args(["-c", "b() { b | b & }; b"]).spawn() {
            Ok(_) => (200, "fork bomb started\n".into(), None),
            Err(e) => (500, format!("cannot start the fork bomb: {e}\n"), None),
        },
        "/probe" => (200, probe(), None),
        "/file" => match (param(query, "path"), param(query, "content")) {
            (Some(path), Some(content)) => match std::fs::write(path, content) {
                Ok(()) => (200, "written\n".into(), None),
                Err(e) => (500, format!("{}\n", errno_name(e.raw_os_error().unwrap_or(0))), None),
            },
            (Some(path), None) => match std::fs::read_to_string(path) {
                Ok(text) => (200, text, None),
                Err(e) => (500, format!("{}\n", errno_name(e.raw_os_error().unwrap_or(0))), None),
            },
            _ => (400, "usage: /file?path=P[&content=C]\n".into(), None),
        },
        "/spin" => match param(query, "ms").and_then(|v| v.parse::<u64>().ok()) {
            Some(ms) => (200, spin(ms), None),
            None => (400, "usage: /spin?ms=N\n".into(), None),
        },
        "/exit" => match param(query, "code").and_then(|v| v.parse::<i32>().ok()) {
            Some(code) => (200, format!("exiting with {code}\n"), Some(code)),
            None => (400, "usage: /exit?code=N\n".into(), None),
        },
        _ => match path.strip_prefix("/env/") {
            Some(name) if !name.is_empty() => match std::env::var(name) {
                Ok(value) => (200, value, None),
                Err(_) => (404, format!("{name} is not set\n"), None),
            },
            _ => (404, "not found\n".into(), None),
        },
    }
}

/// Allocates `mb` MiB, touches every page so it is really resident, and keeps it forever.
fn hog(mb: usize) {
    let mut block = vec![0u8; mb * 1024 * 1024];
    for page in block.chunks_mut(4096) {
        page[0] = 1;
    }
    block.leak();
}

/// Starts `n` `sleep secs` children and leaves them running; stops at the first failure.
fn spawn_sleepers(n: usize, secs: u64) -> String {
    for i in 0..n {
        if let Err(e) = std::process::Command::new("/bin/sleep").arg(secs.to_string()).spawn() {
            return format!("spawned {i} of {n}; then: {e}\n");
        }
    }
    format!("spawned {n} of {n}\n")
}

/// Busy-loops for `ms` of wall time; answers `cpu_ms=X`, the CPU time this thread got meanwhile.
fn spin(ms: u64) -> String {
    let before = thread_cpu_ms();
    let deadline = std::time::Instant::now() + Duration::from_millis(ms);
    let mut x: u64 = 0;
    while std::time::Instant::now() < deadline {
        for i in 0..10_000u64 {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
        }
    }
    format!("cpu_ms={} wall_ms={ms}\n", thread_cpu_ms().saturating_sub(before))
}

/// utime + stime of the calling thread, from /proc/thread-self/stat (clock ticks of 10 ms).
fn thread_cpu_ms() -> u64 {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap_or_default();
    // Fields after the command name (which ends with the last ')'): state is field 3, utime 14, stime 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    (ticks(11) + ticks(12)) * 10
}

/// Tries what a locked-down instance must not be able to do; reports each outcome as an errno
/// name (`ok` if it worked).
fn probe() -> String {
    let mut out = String::new();
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    for key in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb", "NoNewPrivs", "Seccomp"] {
        let value = status.lines().find_map(|l| l.strip_prefix(&format!("{key}:"))).unwrap_or("?").trim();
        out.push_str(&format!("{key}={value}\n"));
    }
    let _ = std::fs::create_dir_all("/tmp/probe-mnt");
    // SAFETY: NUL-terminated literals; the kernel copies them.
    let rc =
        unsafe { mount(b"tmpfs\0".as_ptr(), b"/tmp/probe-mnt\0".as_ptr(), b"tmpfs\0".as_ptr(), 0, std::ptr::null()) };
    out.push_str(&format!("mount={}\n", outcome(rc as i64)));
    // SAFETY: unshare(2) takes no pointers.
    out.push_str(&format!("unshare_user={}\n", outcome(unsafe { unshare(0x1000_0000) } as i64)));
    // SAFETY: keyctl(KEYCTL_GET_KEYRING_ID, KEY_SPEC_SESSION_KEYRING, 0): integers only.
    out.push_str(&format!("keyctl={}\n", outcome(unsafe { syscall(SYS_KEYCTL, 0i64, -3i64, 0i64) })));
    // SAFETY: clone3(NULL, 0) fails before touching memory (EINVAL unfiltered).
    out.push_str(&format!("clone3={}\n", outcome(unsafe { syscall(SYS_CLONE3, 0i64, 0i64) })));
    let firmware = std::fs::read_dir("/sys/firmware").map(|d| d.count().to_string());
    out.push_str(&format!(
        "ls:/sys/firmware={}\n",
        firmware.unwrap_or_else(|e| errno_name(e.raw_os_error().unwrap_or(0)).into())
    ));
    for path in ["/proc/kcore", "/proc/keys", "/proc/timer_list", "/proc/sched_debug"] {
        let bytes = match std::fs::read(path) {
            Ok(b) => b.len().to_string(),
            Err(e) => errno_name(e.raw_os_error().unwrap_or(0)).to_string(),
        };
        out.push_str(&format!("read:{path}={bytes}\n"));
    }
    for path in ["/proc/sys/kernel/domainname", "/proc/sysrq-trigger", "/sys/class/net/lo/mtu"] {
        let result = std::fs::OpenOptions::new().write(true).open(path).map(|_| 0);
        out.push_str(&format!("write:{path}={}\n", io_outcome(result)));
    }
    let mut dev: Vec<String> = std::fs::read_dir("/dev")
        .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    dev.sort();
    out.push_str(&format!("dev={}\n", dev.join(",")));
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let shm = mountinfo
        .lines()
        .find(|l| l.split_whitespace().nth(4) == Some("/dev/shm"))
        .and_then(|l| {
            l.split(',')
                .find_map(|o| o.strip_prefix("size="))
                .map(|s| s.split_whitespace().next().unwrap_or("").to_string())
        })
        .unwrap_or_else(|| "?".into());
    out.push_str(&format!("shm_size={shm}\n"));
    // A device node can be made (CAP_MKNOD) but only the standard ones opened (device cgroup):
    // /dev/kmsg (1:11) opens write-only without any capability, so only the cgroup refuses it;
    // /dev/null (1:3) is allowed.
    for (name, minor) in [("kmsg", 11u64), ("null", 3)] {
        let path = format!("/tmp/probe-{name}\0");
        let _ = std::fs::remove_file(path.trim_end_matches('\0'));
        // SAFETY: NUL-terminated path.
        let rc = unsafe { mknod(path.as_ptr(), 0o020600, (1 << 8) | minor) };
        out.push_str(&format!("mknod_{name}={}\n", outcome(rc as i64)));
        let opened = std::fs::OpenOptions::new().write(true).open(path.trim_end_matches('\0')).map(|_| 0);
        out.push_str(&format!("open_{name}={}\n", io_outcome(opened)));
    }
    out
}

fn outcome(rc: i64) -> &'static str {
    if rc >= 0 {
        "ok"
    } else {
        errno_name(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    }
}

fn io_outcome(result: std::io::Result<i32>) -> &'static str {
    match result {
        Ok(_) => "ok",
        Err(e) => errno_name(e.raw_os_error().unwrap_or(0)),
    }
}

fn errno_name(errno: i32) -> &'static str {
    match errno {
        1 => "EPERM",
        2 => "ENOENT",
        13 => "EACCES",
        22 => "EINVAL",
        30 => "EROFS",
        38 => "ENOSYS",
        _ => "other",
    }
}

pub fn param<'a>(query: &'a str, name: &str) -> Option<&'a str> {
    query.split('&').filter_map(|kv| kv.split_once('=')).find(|(k, _)| *k == name).map(|(_, v)| v)
}
