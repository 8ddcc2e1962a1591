//! An instance's root filesystem: an overlay of the image's unpacked layers (read-only, shared)
//! under the instance's own upper and work directories.

use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};

#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    #[error("an image needs at least one layer to make a root filesystem")]
    NoLayers,
    #[error("overlay options for {layers} layers are {len} bytes, over the kernel's page-size limit")]
    OptionsTooLong { layers: usize, len: usize },
    #[error("cannot prepare {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("cannot mount the overlay at {path}: {errno}")]
    Mount { path: PathBuf, errno: nix::Error },
    #[error("cannot unmount {path}: {errno}")]
    Unmount { path: PathBuf, errno: nix::Error },
}

/// The overlay `lowerdir=…` option value: the topmost layer first.
pub fn overlay_options(layers_bottom_first: &[PathBuf], upper: &Path, work: &Path) -> Result<String, RootfsError> {
    if layers_bottom_first.is_empty() {
        return Err(RootfsError::NoLayers);
    }
    let lower: Vec<String> = layers_bottom_first.iter().rev().map(|p| p.display().to_string()).collect();
    let options = format!("lowerdir={},upperdir={},workdir={}", lower.join(":"), upper.display(), work.display());
    // The kernel copies mount data into one page.
    if options.len() >= 4096 {
        return Err(RootfsError::OptionsTooLong { layers: layers_bottom_first.len(), len: options.len() });
    }
    Ok(options)
}

/// Creates `dir/upper`, `dir/work`, `dir/rootfs` and mounts the overlay on `dir/rootfs`.
pub fn mount_overlay(dir: &Path, layers_bottom_first: &[PathBuf]) -> Result<PathBuf, RootfsError> {
    let (upper, work, target) = (dir.join("upper"), dir.join("work"), dir.join("rootfs"));
    for d in [&upper, &work, &target] {
        std::fs::create_dir_all(d).map_err(|source| RootfsError::Io { path: d.clone(), source })?;
    }
    let options = overlay_options(layers_bottom_first, &upper, &work)?;
    mount(Some("overlay"), &target, Some("overlay"), MsFlags::empty(), Some(options.as_str()))
        .map_err(|errno| RootfsError::Mount { path: target.clone(), errno })?;
    Ok(target)
}

/// Unmounts `dir/rootfs` if mounted; a missing mount is not an error.
pub fn unmount_overlay(dir: &Path) -> Result<(), RootfsError> {
    let target = dir.join("rootfs");
    match umount2(&target, MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::Error::EINVAL) | Err(nix::Error::ENOENT) => Ok(()),
        Err(errno) => Err(RootfsError::Unmount { path: target, errno }),
    }
}

/// Contents of the instance's `/etc/hosts`.
pub fn hosts_file(hostname: &str, ip: Option<std::net::Ipv4Addr>) -> String {
    let mut s = String::from("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n");
    if let Some(ip) = ip {
        s.push_str(&format!("{ip}\t{hostname}\n"));
    }
    s
}

/// The host's resolv.conf without loopback resolvers, which cannot work from another network
/// namespace. No resolver the operator did not configure is ever added (no public fallback).
pub fn resolv_conf(host: &str) -> String {
    host.lines()
        .filter(|line| {
            let mut words = line.split_whitespace();
            match (words.next(), words.next()) {
                (Some("nameserver"), Some(addr)) => {
                    !(addr.starts_with("127.") || addr == "::1" || addr.starts_with("0."))
                }
                _ => true,
            }
        })
        .map(|l| format!("{l}\n"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lowerdir_is_top_first() {
        let layers = vec![PathBuf::from("/l/a"), PathBuf::from("/l/b")];
        let o = overlay_options(&layers, Path::new("/i/upper"), Path::new("/i/work")).expect("fits");
        assert_eq!(o, "lowerdir=/l/b:/l/a,upperdir=/i/upper,workdir=/i/work");
        assert!(matches!(overlay_options(&[], Path::new("u"), Path::new("w")), Err(RootfsError::NoLayers)));
        let many: Vec<PathBuf> =
            (0..200).map(|i| PathBuf::from(format!("/var/lib/deliverous/layers/{i:064}"))).collect();
        assert!(matches!(
            overlay_options(&many, Path::new("u"), Path::new("w")),
            Err(RootfsError::OptionsTooLong { .. })
        ));
    }

    #[test]
    fn loopback_resolvers_are_dropped() {
        let host = "search lan\nnameserver 127.0.0.53\nnameserver 192.0.2.1\nnameserver ::1\noptions edns0\n";
        assert_eq!(resolv_conf(host), "search lan\nnameserver 192.0.2.1\noptions edns0\n");
    }

    #[test]
    fn hosts_names_the_instance() {
        assert!(hosts_file("web.1", Some([10, 0, 0, 2].into())).contains("10.0.0.2\tweb.1\n"));
    }
}
