//! Finds an instance's cgroup directories on cgroup v1 (one per controller hierarchy) or v2
//! (one unified hierarchy), kills what runs in them and removes them. Used to clean up after
//! a shim that died; the shim's normal path lets libcontainer do this.

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

#[cfg(test)]
mod tests {
    use super::*;

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
}
