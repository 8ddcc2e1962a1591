//! Host-side ownership for instances in a user namespace of their own: files the instance must
//! own are given the host ids its ids map to.

use std::io;
use std::os::unix::fs::{lchown, MetadataExt};
use std::path::{Path, PathBuf};

use crate::spec::IdMap;

/// Gives `path` (not following a symlink) the host ids of container uid and gid 0.
pub fn own_as_root(path: &Path, map: &IdMap) -> io::Result<()> {
    lchown(path, Some(map.host_first), Some(map.host_first))
}

/// Shifts the owner of everything under `dir` (itself included, symlinks not followed, other
/// file systems not crossed) from container ids to the host ids `map` gives them: a tree that
/// holds what an image ships (owned by host ids 0..size) becomes the instance's. Ids outside the
/// map are left as they are (they show up as `nobody` inside).
pub fn shift_tree(dir: &Path, map: &IdMap) -> io::Result<()> {
    let meta = std::fs::symlink_metadata(dir)?;
    shift_one(dir, &meta, map)?;
    if meta.is_dir() {
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            let child = std::fs::symlink_metadata(&path)?;
            if child.dev() != meta.dev() {
                continue;
            }
            if child.is_dir() {
                shift_tree(&path, map)?;
            } else {
                shift_one(&path, &child, map)?;
            }
        }
    }
    Ok(())
}

/// Creates the mount point `destination` (a directory if `dir`, else an empty file) and any
/// missing directory above it in `rootfs`, owned by the instance's root. Inside a user
/// namespace the container cannot create them itself where the image's directories (owned by
/// host root, unmapped) are in the way, e.g. `/etc/hosts` when the image has none. Nothing is
/// created through a symlink or below a non-directory (the image is untrusted): the container's
/// runtime then resolves those itself, inside the root filesystem.
pub fn make_mount_point(rootfs: &Path, destination: &str, dir: bool, map: &IdMap) -> io::Result<()> {
    let parts: Vec<_> = Path::new(destination)
        .components()
        .filter_map(|c| match c {
            std::path::Component::Normal(name) => Some(name),
            _ => None,
        })
        .collect();
    let mut path = rootfs.to_path_buf();
    for (i, name) in parts.iter().enumerate() {
        path.push(name);
        let last = i + 1 == parts.len();
        match std::fs::symlink_metadata(&path) {
            Ok(meta) if meta.is_dir() => continue,
            Ok(_) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if last && !dir {
                    std::fs::OpenOptions::new().write(true).create_new(true).open(&path)?;
                } else {
                    std::fs::create_dir(&path)?;
                }
                own_as_root(&path, map)?;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn shift_one(path: &Path, meta: &std::fs::Metadata, map: &IdMap) -> io::Result<()> {
    let (uid, gid) = (map.to_host(meta.uid()), map.to_host(meta.gid()));
    if uid.is_none() && gid.is_none() {
        return Ok(());
    }
    // chown clears setuid/setgid bits of a file: put them back.
    let mode = meta.mode() & 0o7777;
    lchown(path, uid, gid)?;
    if !meta.file_type().is_symlink() && mode & 0o6000 != 0 {
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(mode))?;
    }
    Ok(())
}

// From <linux/mount.h>.
const OPEN_TREE_CLONE: libc::c_uint = 1;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;
const MOUNT_ATTR_IDMAP: u64 = 0x0010_0000;

/// `struct mount_attr` of `mount_setattr(2)`.
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

/// A user namespace with `map` for its uids and gids, as a descriptor for idmapped mounts. A
/// child made with `clone(CLONE_NEWUSER)` (it only waits, so cloning from a multi-threaded
/// process is sound) holds it while its maps are written and it is opened, then is killed.
fn mapped_userns(map: &IdMap) -> io::Result<std::fs::File> {
    // SAFETY: a fork-like clone (no new stack, SIGCHLD on exit); the child runs only pause(2)
    // in a loop, no code that could need a lock another thread holds.
    let pid = unsafe { libc::syscall(libc::SYS_clone, libc::CLONE_NEWUSER | libc::SIGCHLD, 0, 0, 0, 0) };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    if pid == 0 {
        loop {
            // SAFETY: pause takes no arguments; the child waits here until killed.
            unsafe { libc::pause() };
        }
    }
    let pid = pid as libc::pid_t;
    let line = format!("0 {} {}\n", map.host_first, map.size);
    let result = std::fs::write(format!("/proc/{pid}/uid_map"), &line)
        .and_then(|()| std::fs::write(format!("/proc/{pid}/gid_map"), &line))
        .and_then(|()| std::fs::File::open(format!("/proc/{pid}/ns/user")));
    // SAFETY: kill and waitpid on the child made above, which nothing else reaps.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
        libc::waitpid(pid, std::ptr::null_mut(), 0);
    }
    result
}

/// Attaches an idmapped copy of the mount tree at `source` on `target` (an empty directory).
fn idmapped_bind(source: &Path, target: &Path, userns: &std::fs::File) -> io::Result<()> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let cpath = |p: &Path| {
        std::ffi::CString::new(p.as_os_str().as_encoded_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a path with a NUL byte"))
    };
    let src = cpath(source)?;
    // SAFETY: open_tree with a valid C path; returns a new descriptor or -1.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            libc::AT_FDCWD,
            src.as_ptr(),
            OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint | libc::AT_RECURSIVE as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: open_tree just returned this descriptor; it is ours.
    let tree = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let attr =
        MountAttr { attr_set: MOUNT_ATTR_IDMAP, attr_clr: 0, propagation: 0, userns_fd: userns.as_raw_fd() as u64 };
    let empty = c"";
    // SAFETY: mount_setattr on our detached tree with a mount_attr that lives for the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_EMPTY_PATH as libc::c_uint,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    let dst = cpath(target)?;
    // SAFETY: move_mount of our detached tree onto a valid C path.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_FDCWD,
            dst.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// [`crate::rootfs::mount_overlay`] with the image's layers seen through idmapped mounts, so
/// that inside the instance they belong to its own ids (host root's files are its root's) and
/// copy-up gives them the mapped owners on the host. The layers themselves are not changed
/// (they are shared). The idmapped layer mounts exist only while the overlay is mounted (the
/// overlay keeps its own references). Needs idmapped mount support in the layers' file
/// system and overlayfs (Linux 5.19+); the error says what failed, for a fallback.
pub fn mount_overlay_idmapped(dir: &Path, layers_bottom_first: &[PathBuf], map: &IdMap) -> Result<PathBuf, String> {
    let userns = mapped_userns(map).map_err(|e| format!("user namespace for idmapped layers: {e}"))?;
    let lowers = dir.join("lowers");
    let _ = std::fs::remove_dir_all(&lowers);
    std::fs::create_dir_all(&lowers).map_err(|e| format!("{}: {e}", lowers.display()))?;
    let mut attached: Vec<PathBuf> = Vec::new();
    let mut result = Ok(());
    for (i, layer) in layers_bottom_first.iter().enumerate() {
        let target = lowers.join(i.to_string());
        let made = std::fs::create_dir(&target)
            .and_then(|()| idmapped_bind(layer, &target, &userns))
            .map_err(|e| format!("idmapped mount of layer {}: {e}", layer.display()));
        match made {
            Ok(()) => attached.push(target),
            Err(e) => {
                result = Err(e);
                break;
            }
        }
    }
    let mounted = result.and_then(|()| {
        let (upper, work, target) = (dir.join("upper"), dir.join("work"), dir.join("rootfs"));
        for d in [&upper, &work, &target] {
            std::fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
        }
        let options = crate::rootfs::overlay_options(&attached, &upper, &work).map_err(|e| e.to_string())?;
        nix::mount::mount(
            Some("overlay"),
            &target,
            Some("overlay"),
            nix::mount::MsFlags::empty(),
            Some(options.as_str()),
        )
        .map_err(|e| format!("overlay on idmapped layers at {}: {e}", target.display()))?;
        Ok(target)
    });
    for path in attached.iter().rev() {
        let _ = nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH);
    }
    let _ = std::fs::remove_dir_all(&lowers);
    mounted
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layers_are_seen_through_the_map_and_stay_unchanged() {
        if !nix::unistd::Uid::effective().is_root() {
            eprintln!("skipped: needs root to mount");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let layer = dir.path().join("layer");
        std::fs::create_dir_all(layer.join("etc")).unwrap();
        std::fs::write(layer.join("etc/passwd"), b"root\n").unwrap();
        lchown(layer.join("etc/passwd"), Some(33), Some(33)).unwrap();
        let instance = dir.path().join("instance");
        std::fs::create_dir_all(&instance).unwrap();
        let map = IdMap { host_first: 3_000_000, size: 65536 };
        let rootfs = match mount_overlay_idmapped(&instance, std::slice::from_ref(&layer), &map) {
            Ok(rootfs) => rootfs,
            Err(e) => {
                eprintln!("skipped: no idmapped overlay layers here: {e}");
                return;
            }
        };
        let seen = std::fs::metadata(rootfs.join("etc/passwd")).map(|m| (m.uid(), m.gid()));
        let etc = std::fs::metadata(rootfs.join("etc")).map(|m| m.uid());
        let lowers_left = instance.join("lowers").exists();
        let _ = crate::rootfs::unmount_overlay(&instance);
        assert_eq!(seen.unwrap(), (3_000_033, 3_000_033));
        assert_eq!(etc.unwrap(), 3_000_000);
        assert!(!lowers_left, "the idmapped layer mounts are gone once the overlay holds them");
        assert_eq!(std::fs::metadata(layer.join("etc/passwd")).unwrap().uid(), 33, "the layer is untouched");
    }

    #[test]
    fn mount_points_are_made_but_never_through_a_symlink() {
        if !nix::unistd::Uid::effective().is_root() {
            eprintln!("skipped: needs root to chown");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let rootfs = dir.path().join("rootfs");
        let outside = dir.path().join("outside");
        std::fs::create_dir_all(rootfs.join("etc")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::os::unix::fs::symlink(&outside, rootfs.join("var")).unwrap();
        let map = IdMap { host_first: 3_000_000, size: 65536 };
        make_mount_point(&rootfs, "/etc/hosts", false, &map).unwrap();
        assert!(rootfs.join("etc/hosts").is_file());
        assert_eq!(std::fs::metadata(rootfs.join("etc/hosts")).unwrap().uid(), 3_000_000);
        assert_eq!(std::fs::metadata(rootfs.join("etc")).unwrap().uid(), 0, "existing directories are left alone");
        make_mount_point(&rootfs, "/srv/data/db", true, &map).unwrap();
        assert!(rootfs.join("srv/data/db").is_dir());
        make_mount_point(&rootfs, "/var/lib/db", true, &map).unwrap();
        assert!(std::fs::read_dir(&outside).unwrap().next().is_none(), "nothing made through the symlink");
        make_mount_point(&rootfs, "/etc/hosts/x", true, &map).unwrap();
    }

    #[test]
    fn a_tree_is_shifted_into_the_range() {
        if !nix::unistd::Uid::effective().is_root() {
            eprintln!("skipped: needs root to chown");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("v");
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::fs::write(root.join("sub/f"), b"x").unwrap();
        lchown(root.join("sub/f"), Some(33), Some(33)).unwrap();
        std::os::unix::fs::symlink("/etc", root.join("link")).unwrap();
        let map = IdMap { host_first: 3_000_000, size: 65536 };
        shift_tree(&root, &map).unwrap();
        let owner = |p: &Path| {
            let m = std::fs::symlink_metadata(p).unwrap();
            (m.uid(), m.gid())
        };
        assert_eq!(owner(&root), (3_000_000, 3_000_000));
        assert_eq!(owner(&root.join("sub/f")), (3_000_033, 3_000_033));
        assert_eq!(owner(&root.join("link")), (3_000_000, 3_000_000), "the link itself, not /etc");
        assert_eq!(owner(Path::new("/etc")), (0, 0));
    }
}
