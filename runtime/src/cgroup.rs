//! Finds an instance's cgroup directories on cgroup v1 (one per controller hierarchy) or v2
//! (one unified hierarchy), reads its resource usage ([`stats`]), kills what runs in it and
//! removes it: for a shim that died, and for the shim's own removal of an exited container
//! (`shim::remove`).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Mount points of cgroup hierarchies (v1 and v2), from `/proc/self/mountinfo`.
pub fn hierarchies() -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    parse_hierarchies(&text)
}

fn parse_hierarchies(mountinfo: &str) -> Vec<PathBuf> {
    mountinfo
        .lines()
        .filter_map(|line| {
            let (pre, post) = line.split_once(" - ")?;
            let fstype = post.split_whitespace().next()?;
            let mount_point = pre.split_whitespace().nth(4)?;
            (fstype == "cgroup" || fstype == "cgroup2").then(|| PathBuf::from(mount_point))
        })
        .collect()
}

/// Whether the host runs the unified cgroup v2 hierarchy at /sys/fs/cgroup (not v1 or the v1
/// hybrid, whose controllers are v1 even when a cgroup2 tree is mounted beside them).
pub fn unified() -> bool {
    Path::new("/sys/fs/cgroup/cgroup.controllers").exists()
}

/// The directories of `cgroups_path` (e.g. `/deliverous/abc`) that exist in any hierarchy.
pub fn dirs(cgroups_path: &str) -> Vec<PathBuf> {
    let rel = cgroups_path.trim_start_matches('/');
    hierarchies().into_iter().map(|h| h.join(rel)).filter(|d| d.is_dir()).collect()
}

fn pids(dir: &Path) -> Vec<i32> {
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// Puts the kernel's cgroup attach lock on its fast path ahead of a container's creation, off
/// the caller's critical path. Every write to a `cgroup.procs` takes one global lock whose writer
/// side first waits for an RCU grace period (4–15 ms measured here, the largest single wait in
/// a start), unless another writer passed it moments before. So a forked child moves itself into
/// the cgroup it is already in (a no-op move that pays the wait) while the caller goes on
/// preparing; libcontainer's own write, a few milliseconds later, then waits for that same grace
/// period's remainder instead of a new one. Best effort: without a writable `cgroup.procs` it
/// does nothing. The child is left for the caller's usual reaping (the shim reaps every child).
///
/// Must be called from a single-threaded process (the shim), as it forks.
pub fn prime_attach() {
    let Some(file) = own_procs_file() else { return };
    // SAFETY: the caller is single-threaded; the child only calls write(2) and _exit(2), both
    // async-signal-safe, on a descriptor opened before the fork.
    unsafe {
        if libc::fork() == 0 {
            // "0": the writing process itself.
            libc::write(std::os::fd::AsRawFd::as_raw_fd(&file), b"0".as_ptr().cast(), 1);
            libc::_exit(0);
        }
    }
}

/// [`prime_attach`] for a multi-threaded caller (the daemon, as an instance start begins): moves
/// the calling process into the cgroup it is already in, blocking the calling thread for the
/// grace period (run it on a thread that may block).
pub fn prime_attach_blocking() {
    if let Some(mut file) = own_procs_file() {
        let _ = std::io::Write::write_all(&mut file, b"0");
    }
}

fn own_procs_file() -> Option<std::fs::File> {
    let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    own_procs_files(&own).into_iter().find_map(|p| std::fs::OpenOptions::new().write(true).open(p).ok())
}

/// The `cgroup.procs` files of the cgroups `/proc/self/cgroup` (given) says we are in: v1
/// hierarchies first, then the unified one (mounted at `unified/` on a hybrid host).
fn own_procs_files(own: &str) -> Vec<PathBuf> {
    let root = Path::new("/sys/fs/cgroup");
    let mut v1 = Vec::new();
    let mut v2 = Vec::new();
    for line in own.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next()) else { continue };
        let rel = path.trim_start_matches('/');
        if controllers.is_empty() {
            v2.push(root.join("unified").join(rel).join("cgroup.procs"));
            v2.push(root.join(rel).join("cgroup.procs"));
        } else {
            let dir = controllers.strip_prefix("name=").unwrap_or(controllers);
            v1.push(root.join(dir).join(rel).join("cgroup.procs"));
        }
    }
    v1.extend(v2);
    v1
}

/// SIGKILLs every process in the cgroup (freezing is not needed: a pid namespace's processes
/// all die with its init) and removes its directories. Idempotent.
pub fn kill_and_remove(cgroups_path: &str) -> std::io::Result<()> {
    let dirs = dirs(cgroups_path);
    let deadline = Instant::now() + Duration::from_secs(5);
    for dir in &dirs {
        // cgroup v2 can kill the whole subtree atomically.
        let _ = std::fs::write(dir.join("cgroup.kill"), "1");
        for pid in pids(dir) {
            // SAFETY: kill(2) with a pid read from the cgroup; no memory is involved.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
    let mut last_err = None;
    for dir in dirs.iter().rev() {
        loop {
            match std::fs::remove_dir(dir) {
                Ok(()) => break,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    for pid in pids(dir) {
                        // SAFETY: as above.
                        unsafe { libc::kill(pid, libc::SIGKILL) };
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => {
                    last_err = Some(e);
                    break;
                }
            }
        }
    }
    last_err.map_or(Ok(()), Err)
}

/// Removes the (empty) parent cgroup, e.g. `/deliverous`, from every hierarchy.
pub fn remove_empty(cgroups_path: &str) {
    for dir in dirs(cgroups_path) {
        let _ = std::fs::remove_dir(dir);
    }
}

/// What an instance's cgroup has used, as the kernel counts it. `None`: the file is missing
/// or unreadable (controller not mounted, cgroup gone), never a guessed zero.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// CPU time used by every process of the cgroup, ever, in microseconds.
    pub cpu_usec: Option<u64>,
    /// Memory in use, page cache that can be dropped at once (inactive file pages) excluded,
    /// as `docker stats` counts it.
    pub memory_bytes: Option<u64>,
    /// The memory limit; `None` also when there is none.
    pub memory_limit: Option<u64>,
    /// Processes and threads.
    pub pids: Option<u64>,
}

/// Where the controllers this module reads are mounted: read once per process from
/// `/proc/self/mountinfo` (cgroup mounts do not move while the daemon runs), so a scrape of
/// many instances costs a few small reads per instance and nothing more.
#[derive(Debug, Clone, Default, PartialEq)]
struct Layout {
    /// The unified hierarchy when the host runs cgroup v2 only.
    unified: Option<PathBuf>,
    cpuacct: Option<PathBuf>,
    memory: Option<PathBuf>,
    pids: Option<PathBuf>,
}

fn layout() -> &'static Layout {
    static LAYOUT: std::sync::OnceLock<Layout> = std::sync::OnceLock::new();
    LAYOUT.get_or_init(|| {
        let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        parse_layout(&text, unified())
    })
}

fn parse_layout(mountinfo: &str, unified: bool) -> Layout {
    let mut layout = Layout::default();
    for line in mountinfo.lines() {
        let Some((pre, post)) = line.split_once(" - ") else { continue };
        let mut post = post.split_whitespace();
        let (Some(fstype), _, Some(options)) = (post.next(), post.next(), post.next()) else { continue };
        let Some(mount_point) = pre.split_whitespace().nth(4) else { continue };
        let path = PathBuf::from(mount_point);
        match fstype {
            "cgroup2" if unified && mount_point == "/sys/fs/cgroup" => layout.unified = Some(path),
            "cgroup" => {
                for controller in options.split(',') {
                    let slot = match controller {
                        "cpuacct" => &mut layout.cpuacct,
                        "memory" => &mut layout.memory,
                        "pids" => &mut layout.pids,
                        _ => continue,
                    };
                    slot.get_or_insert_with(|| path.clone());
                }
            }
            _ => {}
        }
    }
    layout
}

/// The resource usage of the cgroup at `cgroups_path` (e.g. `/deliverous/abc`), on v1 or v2.
pub fn stats(cgroups_path: &str) -> Stats {
    let rel = cgroups_path.trim_start_matches('/');
    let layout = layout();
    let read = |base: &Option<PathBuf>, file: &str| {
        base.as_ref().and_then(|b| std::fs::read_to_string(b.join(rel).join(file)).ok())
    };
    match &layout.unified {
        Some(root) => {
            let dir = root.join(rel);
            let read = |file: &str| std::fs::read_to_string(dir.join(file)).ok();
            Stats {
                cpu_usec: read("cpu.stat").and_then(|t| stat_field(&t, "usage_usec")),
                memory_bytes: read("memory.current").and_then(|t| number(&t)).map(|current| {
                    let inactive = read("memory.stat").and_then(|t| stat_field(&t, "inactive_file")).unwrap_or(0);
                    current.saturating_sub(inactive)
                }),
                memory_limit: read("memory.max").and_then(|t| limit(&t)),
                pids: read("pids.current").and_then(|t| number(&t)),
            }
        }
        None => Stats {
            cpu_usec: read(&layout.cpuacct, "cpuacct.usage").and_then(|t| number(&t)).map(|ns| ns / 1000),
            memory_bytes: read(&layout.memory, "memory.usage_in_bytes").and_then(|t| number(&t)).map(|usage| {
                let stat = read(&layout.memory, "memory.stat").unwrap_or_default();
                usage.saturating_sub(stat_field(&stat, "total_inactive_file").unwrap_or(0))
            }),
            memory_limit: read(&layout.memory, "memory.limit_in_bytes").and_then(|t| limit(&t)),
            pids: read(&layout.pids, "pids.current").and_then(|t| number(&t)),
        },
    }
}

fn number(text: &str) -> Option<u64> {
    text.trim().parse().ok()
}

/// `max` (v2) or the page-rounded `i64::MAX` v1 writes for "no limit" are no limit.
fn limit(text: &str) -> Option<u64> {
    let t = text.trim();
    if t == "max" {
        return None;
    }
    number(t).filter(|n| *n < (1 << 62))
}

/// The value of `key` in a flat keyed file (`cpu.stat`, `memory.stat`: `key value` lines).
fn stat_field(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| number(v)).flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_of_a_v1_hybrid_host() {
        let info = "30 23 0:26 / /sys/fs/cgroup/memory rw,nosuid - cgroup cgroup rw,memory\n\
                    32 23 0:28 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n\
                    33 23 0:29 / /sys/fs/cgroup/pids rw - cgroup cgroup rw,pids\n\
                    31 23 0:27 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw,nsdelegate\n";
        let l = parse_layout(info, false);
        assert_eq!(l.unified, None);
        assert_eq!(l.memory, Some(PathBuf::from("/sys/fs/cgroup/memory")));
        assert_eq!(l.cpuacct, Some(PathBuf::from("/sys/fs/cgroup/cpu,cpuacct")));
        assert_eq!(l.pids, Some(PathBuf::from("/sys/fs/cgroup/pids")));
    }

    #[test]
    fn layout_of_a_v2_host() {
        let info = "27 22 0:24 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot\n";
        let l = parse_layout(info, true);
        assert_eq!(l.unified, Some(PathBuf::from("/sys/fs/cgroup")));
        assert_eq!(l.memory, None);
    }

    #[test]
    fn v2_file_formats() {
        let cpu_stat = "usage_usec 1234567\nuser_usec 1000000\nsystem_usec 234567\nnr_periods 0\n";
        assert_eq!(stat_field(cpu_stat, "usage_usec"), Some(1_234_567));
        assert_eq!(stat_field(cpu_stat, "usage"), None);
        let memory_stat = "anon 4096\nfile 8192\ninactive_anon 0\nactive_file 4096\ninactive_file 4096\n";
        assert_eq!(stat_field(memory_stat, "inactive_file"), Some(4096));
        assert_eq!(stat_field(memory_stat, "file"), Some(8192));
        assert_eq!(limit("max\n"), None);
        assert_eq!(limit("134217728\n"), Some(134_217_728));
        assert_eq!(number("17\n"), Some(17));
        assert_eq!(number("garbage"), None);
    }

    #[test]
    fn v1_no_limit_is_none() {
        assert_eq!(limit("9223372036854771712\n"), None);
        assert_eq!(limit("268435456"), Some(268_435_456));
    }

    #[test]
    fn finds_v1_and_v2_mounts() {
        let info = "30 23 0:26 / /sys/fs/cgroup/memory rw,nosuid - cgroup cgroup rw,memory\n\
                    31 23 0:27 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n\
                    22 1 8:1 / / rw - ext4 /dev/vda rw\n";
        assert_eq!(
            parse_hierarchies(info),
            vec![PathBuf::from("/sys/fs/cgroup/memory"), PathBuf::from("/sys/fs/cgroup/unified")]
        );
    }
    #[test]
    fn own_cgroup_procs_files_v1_hybrid_and_v2() {
        let hybrid = "12:pids:/user.slice\n1:name=systemd:/user.slice/x\n0::/user.slice/x\n";
        let files = own_procs_files(hybrid);
        assert_eq!(files[0], Path::new("/sys/fs/cgroup/pids/user.slice/cgroup.procs"));
        assert_eq!(files[1], Path::new("/sys/fs/cgroup/systemd/user.slice/x/cgroup.procs"));
        assert_eq!(files[2], Path::new("/sys/fs/cgroup/unified/user.slice/x/cgroup.procs"));
        let v2 = own_procs_files("0::/system.slice/deliverous.service\n");
        assert_eq!(v2[1], Path::new("/sys/fs/cgroup/system.slice/deliverous.service/cgroup.procs"));
        assert_eq!(own_procs_files("0::/\n")[1], Path::new("/sys/fs/cgroup/cgroup.procs"));
        assert!(own_procs_files("garbage").is_empty());
    }
}
