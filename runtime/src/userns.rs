//! Host-side ownership for instances in a user namespace of their own: files the instance must
//! own are given the host ids its ids map to.

use std::io;
use std::os::unix::fs::{lchown, MetadataExt};
use std::path::Path;

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

#[cfg(test)]
mod tests {
    use super::*;

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
