//! The monitor a shim becomes once its container runs: a small std-only program
//! (`runtime/monitor/`, compiled by build.rs and embedded here) that does the rest of the
//! instance's life in a fraction of this binary's memory. Written once per version to a
//! content-addressed file under the run dir, so every instance shares its pages.

use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::handoff::Handoff;

/// The monitor program, built for our target.
pub const PROGRAM: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/dlv-monitor"));
/// SHA-256 of [`PROGRAM`], hex.
pub const DIGEST: &str = include_str!(concat!(env!("OUT_DIR"), "/dlv-monitor.sha256"));

/// Where the monitor program goes: `bin/` next to libcontainer's state root, in the run dir
/// (a tmpfs in production, emptied at boot like the instances it serves).
pub fn program_dir(state_root: &Path) -> PathBuf {
    state_root.parent().unwrap_or(state_root).join("bin")
}

/// Writes the program to `dir/dlv-monitor-<digest>` unless it is already there, whole; returns
/// its path. Another shim may write it at the same moment: each writes its own temporary file
/// and renames it into place, so nobody ever runs a half-written program.
pub fn install(dir: &Path) -> Result<PathBuf, String> {
    let path = dir.join(format!("dlv-monitor-{}", &DIGEST[..DIGEST.len().min(16)]));
    if std::fs::read(&path).is_ok_and(|bytes| bytes == PROGRAM) {
        return Ok(path);
    }
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let tmp = dir.join(format!(".dlv-monitor.{}.tmp", std::process::id()));
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o755)
        .open(&tmp)
        .and_then(|mut f| f.write_all(PROGRAM))
        .and_then(|()| std::fs::rename(&tmp, &path));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(format!("cannot write the instance monitor {}: {e}", path.display()));
    }
    Ok(path)
}

/// Replaces this process with the monitor at `program`, handing it `handoff` (its descriptors
/// stay open across the exec). Keeps our command line, so the process still reads as
/// `deliverous shim --id …`. Returns only on failure, with the reason.
pub fn exec(program: &Path, handoff: &Handoff) -> String {
    let fds = [Some(handoff.listener_fd), Some(handoff.exe_fd), handoff.stdout_fd, handoff.stderr_fd];
    for fd in fds.into_iter().flatten() {
        if let Err(e) = inherit(fd) {
            return format!("cannot hand descriptor {fd} to the monitor: {e}");
        }
    }
    let err = command(program, handoff).exec();
    // A run dir on a `noexec` file system: run the same program from a sealed memfd (its pages
    // are then this instance's own, but it runs).
    if err.kind() == std::io::ErrorKind::PermissionDenied {
        match sealed_copy() {
            Ok(fd) => {
                let err = command(Path::new(&format!("/proc/self/fd/{}", fd.as_raw_fd())), handoff).exec();
                return format!("cannot run the instance monitor from memory: {err}");
            }
            Err(e) => return format!("cannot run the instance monitor {} ({err}) nor copy it: {e}", program.display()),
        }
    }
    format!("cannot run the instance monitor {}: {err}", program.display())
}

fn command(program: &Path, handoff: &Handoff) -> Command {
    let mut args = std::env::args_os();
    let mut cmd = Command::new(program);
    cmd.arg0(args.next().unwrap_or_else(|| "deliverous".into())).args(args).env_clear().envs(handoff.to_env());
    cmd
}

/// An `O_PATH` descriptor of our own binary, kept across the exec, for the monitor's final
/// `shim-finish` (it stays valid when an upgrade replaces the file).
pub fn own_binary() -> std::io::Result<OwnedFd> {
    let f = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_PATH).open("/proc/self/exe")?;
    Ok(f.into())
}

fn inherit(fd: RawFd) -> std::io::Result<()> {
    // SAFETY: fcntl on a descriptor this process owns; clears only its close-on-exec flag.
    let r = unsafe { libc::fcntl(fd, libc::F_SETFD, 0) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn sealed_copy() -> std::io::Result<OwnedFd> {
    // SAFETY: memfd_create reads the NUL-terminated name and returns a new descriptor or -1.
    let fd = unsafe { libc::memfd_create(c"dlv-monitor".as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: memfd_create just returned this descriptor; nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut file = std::fs::File::from(fd);
    file.write_all(PROGRAM)?;
    let seals = libc::F_SEAL_SEAL | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE;
    // SAFETY: fcntl on the memfd we own.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(file.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn installs_once_per_version() {
        let dir = tempfile::tempdir().expect("tempdir");
        let bin = dir.path().join("bin");
        let path = install(&bin).expect("install");
        assert_eq!(std::fs::read(&path).expect("read"), PROGRAM);
        assert!(path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("dlv-monitor-")));
        // A damaged copy is replaced; a whole one is left as it is.
        std::fs::write(&path, b"half").expect("damage");
        assert_eq!(install(&bin).expect("again"), path);
        assert_eq!(std::fs::read(&path).expect("read"), PROGRAM);
        let names: Vec<_> = std::fs::read_dir(&bin).expect("list").flatten().map(|e| e.file_name()).collect();
        assert_eq!(names.len(), 1, "no temporary file left: {names:?}");
        assert_eq!(program_dir(Path::new("/run/deliverous/containers")), Path::new("/run/deliverous/bin"));
    }

    #[test]
    fn the_embedded_program_is_an_executable() {
        assert!(PROGRAM.starts_with(b"\x7fELF"));
        assert_eq!(DIGEST.len(), 64);
    }
}
