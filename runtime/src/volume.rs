//! Volumes: named directories that outlive instances (`data:/var/lib/app`) and read-only bind
//! mounts of host paths (`/srv/shared:/shared:ro`). Parsing is pure; `copy_up` gives a new named
//! volume what the image has at its mount point, as Docker does.

use std::io;
use std::os::unix::fs::{lchown, MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

/// Where a volume's data comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A directory the daemon keeps under its data dir, by name.
    Named(String),
    /// A path of the host, bind-mounted read-only.
    Host(PathBuf),
}

/// One `SOURCE:TARGET[:ro|rw]` of an app.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Volume {
    pub source: Source,
    /// Absolute path inside the instance.
    pub target: String,
    pub read_only: bool,
}

/// Parses `NAME:/path[:ro|rw]` (named volume, read-write by default) or `/host/path:/path[:ro]`
/// (host path, always read-only). Errors say what is wrong and show the expected form.
pub fn parse(spec: &str) -> Result<Volume, String> {
    let bad = |why: &str| format!("invalid volume {spec:?}: {why}; expected NAME:/path[:ro] or /host/path:/path[:ro]");
    let parts: Vec<&str> = spec.split(':').collect();
    let (source, target, mode) = match parts[..] {
        [s, t] => (s, t, None),
        [s, t, m] => (s, t, Some(m)),
        _ => return Err(bad("it needs a source and a target separated by ':'")),
    };
    let read_only = match mode {
        None => None,
        Some("ro") => Some(true),
        Some("rw") => Some(false),
        Some(m) => return Err(bad(&format!("unknown mode {m:?} (ro or rw)"))),
    };
    check_target(target).map_err(|why| bad(&why))?;
    if source.starts_with('/') {
        let path = Path::new(source);
        if path.components().any(|c| c == Component::ParentDir) {
            return Err(bad("the host path contains '..'"));
        }
        if read_only == Some(false) {
            return Err(bad("host paths are mounted read-only: use a named volume for data the app writes"));
        }
        return Ok(Volume { source: Source::Host(path.to_path_buf()), target: target.to_string(), read_only: true });
    }
    check_name(source).map_err(|why| bad(&why))?;
    Ok(Volume {
        source: Source::Named(source.to_string()),
        target: target.to_string(),
        read_only: read_only == Some(true),
    })
}

/// Volume names: a letter or digit, then letters, digits, `_`, `.`, `-`; at most 64.
pub fn check_name(name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
    if !first_ok || name.len() > 64 || !chars.all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c)) {
        return Err(format!(
            "volume name {name:?} must start with a letter or digit and hold only letters, digits, '_', '.', '-' (64 at most)"
        ));
    }
    Ok(())
}

fn check_target(target: &str) -> Result<(), String> {
    if !target.starts_with('/') {
        return Err(format!("the target {target:?} must be an absolute path"));
    }
    let path = Path::new(target);
    if path.components().any(|c| c == Component::ParentDir) {
        return Err(format!("the target {target:?} contains '..'"));
    }
    if path.components().count() < 2 {
        return Err("the target cannot be '/'".into());
    }
    for reserved in ["/proc", "/sys", "/dev"] {
        if path.starts_with(reserved) {
            return Err(format!("the target {target:?} is under {reserved}, which the runtime owns"));
        }
    }
    Ok(())
}

/// Bytes of the regular files below `path` (symlinks not followed); 0 if it cannot be read.
pub fn disk_usage(path: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(path) else { return 0 };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => disk_usage(&e.path()),
            Ok(t) if t.is_file() => e.metadata().map(|m| m.len()).unwrap_or(0),
            _ => 0,
        })
        .sum()
}

/// Copies the tree at `from` into the empty directory `to`: files, directories and symlinks with
/// their owners, modes and contents; the root of `to` takes `from`'s owner and mode. Device
/// nodes, sockets and fifos are skipped. Symlinks are copied, never followed.
pub fn copy_up(from: &Path, to: &Path) -> io::Result<()> {
    let meta = std::fs::symlink_metadata(from)?;
    if !meta.is_dir() {
        return Ok(());
    }
    copy_dir(from, to)?;
    apply_owner_mode(to, &meta)
}

fn copy_dir(from: &Path, to: &Path) -> io::Result<()> {
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let src = entry.path();
        let dst = to.join(entry.file_name());
        let meta = std::fs::symlink_metadata(&src)?;
        let kind = meta.file_type();
        if kind.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(&src)?, &dst)?;
            lchown(&dst, Some(meta.uid()), Some(meta.gid()))?;
        } else if kind.is_dir() {
            std::fs::create_dir(&dst)?;
            copy_dir(&src, &dst)?;
            apply_owner_mode(&dst, &meta)?;
        } else if kind.is_file() {
            std::fs::copy(&src, &dst)?;
            apply_owner_mode(&dst, &meta)?;
        }
    }
    Ok(())
}

fn apply_owner_mode(path: &Path, meta: &std::fs::Metadata) -> io::Result<()> {
    lchown(path, Some(meta.uid()), Some(meta.gid()))?;
    // After chown, which clears setuid/setgid bits.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(meta.mode() & 0o7777))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn named_and_host_volumes() {
        assert_eq!(
            parse("data:/var/lib/app").unwrap(),
            Volume { source: Source::Named("data".into()), target: "/var/lib/app".into(), read_only: false }
        );
        assert!(parse("data:/var/lib/app:ro").unwrap().read_only);
        let host = parse("/srv/shared:/shared").unwrap();
        assert_eq!(host.source, Source::Host("/srv/shared".into()));
        assert!(host.read_only, "host paths are always read-only");
        assert!(parse("/srv/shared:/shared:ro").unwrap().read_only);
    }

    #[test]
    fn bad_volumes_say_why() {
        for (spec, why) in [
            ("data", "source and a target"),
            ("data:relative", "absolute"),
            ("data:/", "cannot be '/'"),
            ("data:/proc/x", "/proc"),
            ("data:/a/../b", ".."),
            ("/srv/../etc:/x", ".."),
            ("/srv:/x:rw", "read-only"),
            ("data:/x:rx", "unknown mode"),
            ("-data:/x", "must start"),
            ("da ta:/x", "must start"),
            ("a:b:c:d", "source and a target"),
        ] {
            let err = parse(spec).unwrap_err();
            assert!(err.contains(why), "{spec}: {err}");
        }
    }

    #[test]
    fn copy_up_keeps_tree_owners_and_modes() {
        let dir = tempfile::tempdir().unwrap();
        let from = dir.path().join("from");
        std::fs::create_dir_all(from.join("sub")).unwrap();
        std::fs::write(from.join("sub/file"), b"content").unwrap();
        std::fs::set_permissions(from.join("sub/file"), std::fs::Permissions::from_mode(0o640)).unwrap();
        std::os::unix::fs::symlink("sub/file", from.join("link")).unwrap();
        std::fs::set_permissions(&from, std::fs::Permissions::from_mode(0o700)).unwrap();
        let to = dir.path().join("to");
        std::fs::create_dir(&to).unwrap();
        copy_up(&from, &to).unwrap();
        assert_eq!(std::fs::read(to.join("sub/file")).unwrap(), b"content");
        assert_eq!(std::fs::metadata(to.join("sub/file")).unwrap().mode() & 0o7777, 0o640);
        assert_eq!(std::fs::read_link(to.join("link")).unwrap(), Path::new("sub/file"));
        assert_eq!(std::fs::metadata(&to).unwrap().mode() & 0o7777, 0o700);
        // A missing source is nothing to copy.
        copy_up(&dir.path().join("missing-is-an-error"), &to).unwrap_err();
    }
}
