//! Named network namespaces: a file bind-mounted over `/proc/thread-self/ns/net`. Namespace
//! switches happen only on a short-lived thread spawned here, never on the caller's thread.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{setns, unshare, CloneFlags};
use nix::sys::statfs::{statfs, NSFS_MAGIC};

use super::rtnl::Rtnl;
use super::NetworkError;

/// Creates the namespace file at `path` (which must not exist) and a new network namespace
/// bound to it; returns the namespace (as an open file, for `IFLA_NET_NS_FD`) and an rtnetlink
/// socket acting inside it. On failure nothing is left behind (or the cleanup error is kept).
pub(super) fn create(path: &Path) -> Result<(File, Rtnl), NetworkError> {
    OpenOptions::new().write(true).create_new(true).mode(0o444).open(path).map_err(|e| {
        if e.kind() == io::ErrorKind::AlreadyExists {
            NetworkError::SandboxExists { path: path.to_path_buf() }
        } else {
            NetworkError::kernel(format!("create namespace file {path:?}"), e)
        }
    })?;
    let result = std::thread::scope(|scope| {
        std::thread::Builder::new()
            .name("dlv-netns".into())
            .spawn_scoped(scope, || enter_new_namespace(path))
            .map_err(|e| NetworkError::kernel("spawn network namespace thread", e))?
            .join()
            .unwrap_or_else(|_| {
                Err(NetworkError::ThreadPanicked { operation: format!("create network namespace {path:?}") })
            })
    });
    let opened = result.and_then(|rtnl| {
        File::open(path)
            .map(|file| (file, rtnl))
            .map_err(|e| NetworkError::kernel(format!("open network namespace {path:?}"), e))
    });
    opened.map_err(|error| error.with_cleanup(remove(path)))
}

/// Binds the existing network namespace `source` (e.g. `/proc/<pid>/ns/net` of a container
/// that made its own) at `path` (which must not exist), so that it outlives that process and
/// is removed like one made by [`create`]; returns it as [`create`] does. Nothing is left behind
/// on failure.
pub(super) fn adopt(path: &Path, source: &Path) -> Result<(File, Rtnl), NetworkError> {
    OpenOptions::new().write(true).create_new(true).mode(0o444).open(path).map_err(|e| {
        if e.kind() == io::ErrorKind::AlreadyExists {
            NetworkError::SandboxExists { path: path.to_path_buf() }
        } else {
            NetworkError::kernel(format!("create namespace file {path:?}"), e)
        }
    })?;
    let result = mount(Some(source), path, None::<&str>, MsFlags::MS_BIND, None::<&str>)
        .map_err(|e| NetworkError::from_nix(format!("bind-mount network namespace {source:?} on {path:?}"), e))
        .and_then(|()| {
            File::open(path).map_err(|e| NetworkError::kernel(format!("open network namespace {path:?}"), e))
        })
        .and_then(|file| {
            let rtnl = std::thread::scope(|scope| {
                std::thread::Builder::new()
                    .name("dlv-netns".into())
                    .spawn_scoped(scope, || {
                        setns(&file, CloneFlags::CLONE_NEWNET)
                            .map_err(|e| NetworkError::from_nix(format!("setns into {path:?}"), e))?;
                        Rtnl::open()
                            .map_err(|e| e.during(format!("open rtnetlink socket in network namespace {path:?}")))
                    })
                    .map_err(|e| NetworkError::kernel("spawn network namespace thread", e))?
                    .join()
                    .unwrap_or_else(|_| {
                        Err(NetworkError::ThreadPanicked { operation: format!("enter network namespace {path:?}") })
                    })
            })?;
            Ok((file, rtnl))
        });
    result.map_err(|error| error.with_cleanup(remove(path)))
}

/// Runs on the dedicated thread: after `unshare` this thread lives in the new namespace until
/// it exits; the bind mount keeps the namespace alive after that.
fn enter_new_namespace(path: &Path) -> Result<Rtnl, NetworkError> {
    unshare(CloneFlags::CLONE_NEWNET).map_err(|e| NetworkError::from_nix("unshare(CLONE_NEWNET)", e))?;
    mount(Some("/proc/thread-self/ns/net"), path, None::<&str>, MsFlags::MS_BIND, None::<&str>)
        .map_err(|e| NetworkError::from_nix(format!("bind-mount the new network namespace on {path:?}"), e))?;
    Rtnl::open().map_err(|e| e.during(format!("open rtnetlink socket in network namespace {path:?}")))
}

/// Unmounts and removes the namespace file; missing is fine.
pub(super) fn remove(path: &Path) -> Result<(), NetworkError> {
    match umount2(path, MntFlags::MNT_DETACH) {
        // EINVAL: not a mount point (never mounted, or already unmounted).
        Ok(()) | Err(nix::errno::Errno::EINVAL | nix::errno::Errno::ENOENT) => {}
        Err(e) => return Err(NetworkError::from_nix(format!("unmount network namespace {path:?}"), e)),
    }
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(NetworkError::kernel(format!("remove network namespace file {path:?}"), e)),
    }
}

/// Whether `path` is a mounted network namespace file.
pub(super) fn exists(path: &Path) -> bool {
    statfs(path).is_ok_and(|fs| fs.filesystem_type() == NSFS_MAGIC)
}
