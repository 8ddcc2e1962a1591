//! Faithfulness against umoci: a three-layer image with whiteouts, an opaque directory,
//! hardlinks, symlinks, setuid/setgid/sticky modes, assorted owners, a device, a fifo, a user
//! xattr and a sparse file is written as an OCI layout; we import it and mount our layer
//! directories read-only with overlayfs (as an instance's rootfs would see them), umoci unpacks
//! the same layout, and the two trees must agree on every path, type, mode, owner, symlink
//! target, size, content hash, device number, user xattr and hardlink grouping.
//!
//! Needs root (chown, mknod, overlay mount) and umoci (`apt-get install umoci`).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::write_layout;
use deliverous_images::{CredentialFiles, ImageStore, ImportOptions, Reference};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use sha2::{Digest, Sha256};
use tar::EntryType as T;

const UMOCI: &str = "/usr/bin/umoci";

/// A layer written header by header, as image builders write them (parents before children,
/// whiteouts as `.wh.` files, GNU sparse entries, PAX xattrs).
struct Layer {
    builder: tar::Builder<Vec<u8>>,
}

/// One entry's header fields.
struct E<'a> {
    path: &'a str,
    kind: T,
    mode: u32,
    owner: (u64, u64),
    data: &'a [u8],
    link: Option<&'a str>,
    dev: (u32, u32),
}

fn e(path: &str, kind: T) -> E<'_> {
    E {
        path,
        kind,
        mode: if kind == T::Directory { 0o755 } else { 0o644 },
        owner: (0, 0),
        data: b"",
        link: None,
        dev: (0, 0),
    }
}

fn dir(path: &str) -> E<'_> {
    e(path, T::Directory)
}

fn file<'a>(path: &'a str, data: &'a [u8]) -> E<'a> {
    E { data, ..e(path, T::Regular) }
}

fn link<'a>(path: &'a str, kind: T, target: &'a str) -> E<'a> {
    E { link: Some(target), mode: 0o777, ..e(path, kind) }
}

fn whiteout(path: &str) -> E<'_> {
    e(path, T::Regular)
}

impl<'a> E<'a> {
    fn mode(self, mode: u32) -> Self {
        E { mode, ..self }
    }
    fn owner(self, uid: u64, gid: u64) -> Self {
        E { owner: (uid, gid), ..self }
    }
}

fn set_raw(field: &mut [u8], value: &str) {
    assert!(value.len() < field.len(), "test path {value:?} too long");
    field.fill(0);
    field[..value.len()].copy_from_slice(value.as_bytes());
}

impl Layer {
    fn new() -> Layer {
        Layer { builder: tar::Builder::new(Vec::new()) }
    }

    fn header(e: &E<'_>, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        set_raw(&mut h.as_old_mut().name, e.path);
        if let Some(l) = e.link {
            set_raw(&mut h.as_old_mut().linkname, l);
        }
        h.set_entry_type(e.kind);
        h.set_size(size);
        h.set_mode(e.mode);
        h.set_uid(e.owner.0);
        h.set_gid(e.owner.1);
        h.set_mtime(1_700_000_000);
        h.set_device_major(e.dev.0).unwrap();
        h.set_device_minor(e.dev.1).unwrap();
        h
    }

    fn add(&mut self, e: E<'_>) -> &mut Self {
        let mut h = Layer::header(&e, e.data.len() as u64);
        h.set_cksum();
        self.builder.append(&h, e.data).unwrap();
        self
    }

    /// PAX records applying to the next entry.
    fn pax(&mut self, records: &[(&str, &[u8])]) -> &mut Self {
        let mut data = Vec::new();
        for (k, v) in records {
            let body = 1 + k.len() + 1 + v.len() + 1;
            let mut len = body + 1;
            while len.to_string().len() + body != len {
                len += 1;
            }
            data.extend_from_slice(format!("{len} {k}=").as_bytes());
            data.extend_from_slice(v);
            data.push(b'\n');
        }
        let mut h = tar::Header::new_ustar();
        set_raw(&mut h.as_old_mut().name, "PaxHeaders/x");
        h.set_entry_type(T::XHeader);
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        self.builder.append(&h, &data[..]).unwrap();
        self
    }

    /// A sparse file of `real_size` bytes holding `blocks` (offset, data), in the PAX format GNU
    /// tar writes by default (`--format=posix --sparse`, version 1.0: the map leads the data, the
    /// real name is a record). umoci 0.4 cannot read old GNU `S` entries, so this is the sparse
    /// format both sides understand.
    fn sparse(&mut self, e: E<'_>, real_size: u64, blocks: &[(u64, &[u8])]) -> &mut Self {
        let size = real_size.to_string();
        self.pax(&[
            ("GNU.sparse.major", b"1"),
            ("GNU.sparse.minor", b"0"),
            ("GNU.sparse.name", e.path.as_bytes()),
            ("GNU.sparse.realsize", size.as_bytes()),
        ]);
        let mut map = format!("{}\n", blocks.len() + 1);
        for (off, d) in blocks {
            map.push_str(&format!("{off}\n{}\n", d.len()));
        }
        map.push_str(&format!("{real_size}\n0\n"));
        let mut data = map.into_bytes();
        data.resize(data.len().div_ceil(512) * 512, 0);
        for (_, d) in blocks {
            data.extend_from_slice(d);
        }
        let (dir, name) = e.path.rsplit_once('/').unwrap_or(("", e.path));
        let fake =
            if dir.is_empty() { format!("GNUSparseFile.0/{name}") } else { format!("{dir}/GNUSparseFile.0/{name}") };
        let mut h = Layer::header(&E { path: &fake, ..e }, data.len() as u64);
        h.set_cksum();
        self.builder.append(&h, &data[..]).unwrap();
        self
    }

    fn gzip(&mut self) -> Vec<u8> {
        let b = std::mem::replace(&mut self.builder, tar::Builder::new(Vec::new()));
        let tar = b.into_inner().unwrap();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &tar).unwrap();
        gz.finish().unwrap()
    }
}

/// The three layers. Parents are listed in every layer that touches their children, with the
/// metadata they already have, as Docker and BuildKit write layers.
fn layers() -> Vec<Vec<u8>> {
    let block = |byte: u8| vec![byte; 512];
    let (head, middle) = (block(b'H'), block(b'M'));

    let base = Layer::new()
        .add(dir("./"))
        .add(dir("bin/"))
        .add(file("bin/busybox", b"#!busybox multi-call binary\n").mode(0o755))
        .add(link("bin/ls", T::Link, "bin/busybox"))
        .add(link("bin/cat", T::Link, "bin/busybox"))
        .add(link("bin/sh", T::Symlink, "busybox"))
        .add(file("bin/su", b"setuid root\n").mode(0o4755))
        .add(file("bin/wall", b"setgid tty\n").mode(0o2755).owner(0, 5))
        .add(dir("dev/"))
        .add(E { dev: (1, 3), mode: 0o666, ..e("dev/null", T::Char) })
        .add(dir("etc/"))
        .add(file("etc/os-release", b"NAME=one\n"))
        .add(link("etc/abs-link", T::Symlink, "/etc/os-release"))
        .add(link("etc/dangling", T::Symlink, "../nonexistent/target"))
        .pax(&[("SCHILY.xattr.user.comment", b"hello xattr"), ("SCHILY.xattr.user.empty", b"")])
        .add(file("etc/xattr.txt", b"has xattrs\n"))
        .add(dir("tmp/").mode(0o1777))
        .add(dir("srv/").mode(0o750).owner(1000, 1000))
        .add(file("srv/owned", b"user file\n").mode(0o640).owner(1000, 100))
        .add(file("srv/nobody", b"nobody\n").mode(0o600).owner(65534, 65534))
        .add(file("srv/big-ids", b"big ids\n").owner(123_456, 654_321))
        .add(file("srv/group-sticky", b"odd modes\n").mode(0o3710).owner(7, 8))
        .add(dir("del/"))
        .add(file("del/gone.txt", b"deleted above\n"))
        .add(file("del/keep.txt", b"kept\n"))
        .add(dir("opaque/"))
        .add(file("opaque/a", b"hidden by the opaque marker\n"))
        .add(dir("opaque/sub/"))
        .add(file("opaque/sub/b", b"hidden too\n"))
        .add(dir("dir/"))
        .add(dir("dir/sub/"))
        .add(file("dir/sub/deep.txt", b"deep\n"))
        .add(dir("links/"))
        .add(file("links/a", b"linked\n"))
        .add(link("links/b", T::Link, "links/a"))
        .add(link("links/c", T::Link, "links/a"))
        .add(dir("var/"))
        .sparse(file("var/sparse.img", b"").mode(0o640), (1 << 20) + 100, &[(0, &head), (600 << 10, &middle)])
        .add(e("var/fifo", T::Fifo))
        .gzip();

    let middle_layer = Layer::new()
        .add(dir("del/"))
        .add(whiteout("del/.wh.gone.txt"))
        .add(dir("opaque/").mode(0o700))
        .add(whiteout("opaque/.wh..wh..opq"))
        .add(file("opaque/c", b"only this one\n"))
        .add(whiteout(".wh.dir"))
        .add(dir("etc/"))
        .add(file("etc/os-release", b"NAME=two\n"))
        .add(file("etc/abs-link", b"a file replaces the symlink\n"))
        .add(dir("bin/"))
        .add(file("bin/su", b"setuid root, v2\n").mode(0o4750))
        .add(dir("links/"))
        .add(whiteout("links/.wh.b"))
        .add(dir("srv/").mode(0o750).owner(1000, 1000))
        .add(file("srv/x", b"hardlinked in layer two\n").owner(1000, 1000))
        .add(link("srv/y", T::Link, "srv/x"))
        .gzip();

    let top = Layer::new()
        .add(dir("dir/").mode(0o711))
        .add(file("dir/new.txt", b"recreated after the whiteout\n"))
        .add(dir("srv/").mode(0o700).owner(1000, 1000))
        .add(dir("var/"))
        .add(whiteout("var/.wh.fifo"))
        .add(dir("etc/"))
        .add(link("etc/os-release", T::Symlink, "os-release.d/current"))
        .gzip();

    vec![base, middle_layer, top]
}

/// A read-only overlay mount, unmounted when dropped (lazily if it is busy).
struct Overlay {
    target: PathBuf,
}

impl Overlay {
    /// `layers` bottom first, as `ImageStore::layer_dirs` gives them.
    fn mount(layers: &[PathBuf], target: &Path) -> Overlay {
        assert!(layers.len() >= 2, "a read-only overlay needs at least two lower dirs");
        let lower: Vec<String> = layers.iter().rev().map(|p| p.display().to_string()).collect();
        let options = format!("lowerdir={}", lower.join(":"));
        mount(Some("overlay"), target, Some("overlay"), MsFlags::MS_RDONLY, Some(options.as_str()))
            .unwrap_or_else(|e| panic!("mount -t overlay -o {options} {}: {e} (needs root)", target.display()));
        Overlay { target: target.to_path_buf() }
    }
}

impl Drop for Overlay {
    fn drop(&mut self) {
        if umount2(&self.target, MntFlags::empty()).is_err() {
            let _ = umount2(&self.target, MntFlags::MNT_DETACH);
        }
    }
}

/// Everything the test makes. Fields drop in order: the mount goes before the directories.
struct Workspace {
    overlay: Option<Overlay>,
    dir: tempfile::TempDir,
}

/// What is compared for one path.
#[derive(Debug, PartialEq, Eq)]
struct Node {
    kind: &'static str,
    /// Permission bits with setuid/setgid/sticky (not compared for symlinks).
    mode: Option<u32>,
    uid: u32,
    gid: u32,
    /// Regular files: size and sha256 of the content.
    size: Option<u64>,
    sha256: Option<String>,
    symlink: Option<PathBuf>,
    /// Devices: (major, minor).
    rdev: Option<(u64, u64)>,
    /// `user.*` xattrs.
    xattrs: BTreeMap<String, Vec<u8>>,
}

/// A tree: every path beneath the root (the root itself is the unpacker's, not the image's),
/// and the groups of paths that are one inode.
struct Tree {
    nodes: BTreeMap<PathBuf, Node>,
    hardlinks: BTreeSet<Vec<PathBuf>>,
}

fn scan(root: &Path) -> Tree {
    fn walk(root: &Path, dir: &Path, nodes: &mut BTreeMap<PathBuf, Node>, inodes: &mut BTreeMap<u64, Vec<PathBuf>>) {
        let mut entries: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
        entries.sort();
        for path in entries {
            let rel = path.strip_prefix(root).unwrap().to_path_buf();
            let m = std::fs::symlink_metadata(&path).unwrap();
            let ft = m.file_type();
            let kind = if ft.is_dir() {
                "directory"
            } else if ft.is_file() {
                "file"
            } else if ft.is_symlink() {
                "symlink"
            } else if ft.is_char_device() {
                "char device"
            } else if ft.is_block_device() {
                "block device"
            } else if ft.is_fifo() {
                "fifo"
            } else {
                "socket"
            };
            let (size, sha256) = if ft.is_file() {
                let data = std::fs::read(&path).unwrap();
                (Some(m.len()), Some(hex::encode(Sha256::digest(&data))))
            } else {
                (None, None)
            };
            let rdev = (ft.is_char_device() || ft.is_block_device())
                .then(|| (nix::sys::stat::major(m.rdev()), nix::sys::stat::minor(m.rdev())));
            nodes.insert(
                rel.clone(),
                Node {
                    kind,
                    mode: (!ft.is_symlink()).then_some(m.mode() & 0o7777),
                    uid: m.uid(),
                    gid: m.gid(),
                    size,
                    sha256,
                    symlink: ft.is_symlink().then(|| std::fs::read_link(&path).unwrap()),
                    rdev,
                    xattrs: user_xattrs(&path),
                },
            );
            if !ft.is_dir() {
                inodes.entry(m.ino()).or_default().push(rel);
            } else {
                walk(root, &path, nodes, inodes);
            }
        }
    }
    let mut nodes = BTreeMap::new();
    let mut inodes = BTreeMap::new();
    walk(root, root, &mut nodes, &mut inodes);
    let hardlinks = inodes
        .into_values()
        .filter(|paths| paths.len() > 1)
        .map(|mut paths| {
            paths.sort();
            paths
        })
        .collect();
    Tree { nodes, hardlinks }
}

/// `user.*` xattrs of `path`, not following a symlink.
fn user_xattrs(path: &Path) -> BTreeMap<String, Vec<u8>> {
    let c_path = CString::new(path.as_os_str().as_bytes()).unwrap();
    let mut names = vec![0u8; 64 * 1024];
    // SAFETY: c_path is NUL-terminated and outlives the call; the buffer pointer and length
    // describe `names`, which the kernel writes at most `len` bytes into.
    let n = unsafe { libc::llistxattr(c_path.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    assert!(n >= 0, "llistxattr {}: {}", path.display(), std::io::Error::last_os_error());
    let mut out = BTreeMap::new();
    for name in names[..n as usize].split(|b| *b == 0).filter(|n| n.starts_with(b"user.")) {
        let c_name = CString::new(name).unwrap();
        let mut value = vec![0u8; 64 * 1024];
        // SAFETY: both strings are NUL-terminated and outlive the call; the buffer pointer and
        // length describe `value`.
        let len = unsafe { libc::lgetxattr(c_path.as_ptr(), c_name.as_ptr(), value.as_mut_ptr().cast(), value.len()) };
        assert!(len >= 0, "lgetxattr {}: {}", path.display(), std::io::Error::last_os_error());
        value.truncate(len as usize);
        out.insert(String::from_utf8_lossy(name).into_owned(), value);
    }
    out
}

fn octal(mode: Option<u32>) -> String {
    mode.map_or_else(|| "-".into(), |m| format!("{m:04o}"))
}

/// Every difference between the two trees, one line each.
fn differences(ours: &Tree, umoci: &Tree) -> Vec<String> {
    let mut out = Vec::new();
    let paths: BTreeSet<&PathBuf> = ours.nodes.keys().chain(umoci.nodes.keys()).collect();
    for path in paths {
        match (ours.nodes.get(path), umoci.nodes.get(path)) {
            (Some(a), None) => out.push(format!("{}: only in ours ({})", path.display(), a.kind)),
            (None, Some(b)) => out.push(format!("{}: only in umoci's ({})", path.display(), b.kind)),
            (Some(a), Some(b)) if a != b => {
                let mut fields = Vec::new();
                if a.kind != b.kind {
                    fields.push(format!("type {} vs {}", a.kind, b.kind));
                }
                if a.mode != b.mode {
                    fields.push(format!("mode {} vs {}", octal(a.mode), octal(b.mode)));
                }
                if (a.uid, a.gid) != (b.uid, b.gid) {
                    fields.push(format!("owner {}:{} vs {}:{}", a.uid, a.gid, b.uid, b.gid));
                }
                if a.size != b.size {
                    fields.push(format!("size {:?} vs {:?}", a.size, b.size));
                }
                if a.sha256 != b.sha256 {
                    fields.push(format!("sha256 {:?} vs {:?}", a.sha256, b.sha256));
                }
                if a.symlink != b.symlink {
                    fields.push(format!("symlink target {:?} vs {:?}", a.symlink, b.symlink));
                }
                if a.rdev != b.rdev {
                    fields.push(format!("device {:?} vs {:?}", a.rdev, b.rdev));
                }
                if a.xattrs != b.xattrs {
                    fields.push(format!("user xattrs {:?} vs {:?}", a.xattrs, b.xattrs));
                }
                out.push(format!("{}: {} (ours vs umoci's)", path.display(), fields.join(", ")));
            }
            _ => {}
        }
    }
    for group in ours.hardlinks.symmetric_difference(&umoci.hardlinks) {
        let whose = if ours.hardlinks.contains(group) { "ours only" } else { "umoci's only" };
        out.push(format!("hardlink group {group:?}: in {whose}"));
    }
    out
}

#[tokio::test]
async fn unpack_matches_umoci() {
    assert!(Path::new(UMOCI).exists(), "{UMOCI} is missing: apt-get install umoci");
    let dir = tempfile::Builder::new().prefix("images-umoci-").tempdir().unwrap();
    let mut ws = Workspace { overlay: None, dir };
    let root = ws.dir.path().to_path_buf();

    let layout = root.join("layout");
    write_layout(&layout, &layers(), Some("test"));

    // Ours: import the layout, then look at the layers through overlayfs.
    let store = ImageStore::open(root.join("data")).unwrap().with_credentials(CredentialFiles::none());
    let name = Reference::parse("example.com/umoci/compare:test").unwrap();
    let images = store.import(&layout, &ImportOptions { reference: Some(name) }).await.unwrap();
    let merged = root.join("merged");
    std::fs::create_dir(&merged).unwrap();
    ws.overlay = Some(Overlay::mount(&store.layer_dirs(&images[0]), &merged));

    // umoci's: the same layout, unpacked into a bundle.
    let bundle = root.join("bundle");
    let out = Command::new(UMOCI)
        .args(["unpack", "--image", &format!("{}:test", layout.display())])
        .arg(&bundle)
        .output()
        .unwrap();
    assert!(out.status.success(), "umoci unpack failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr));

    let ours = scan(&merged);
    let theirs = scan(&bundle.join("rootfs"));

    // The image is what it should be, so agreeing is not agreeing on nothing.
    for present in ["bin/ls", "opaque/c", "dir/new.txt", "srv/y", "var/sparse.img", "etc/xattr.txt", "links/c"] {
        assert!(ours.nodes.contains_key(Path::new(present)), "{present} is missing from our tree");
    }
    for absent in ["del/gone.txt", "opaque/a", "opaque/sub", "dir/sub", "links/b", "var/fifo"] {
        assert!(!ours.nodes.contains_key(Path::new(absent)), "{absent} should be gone from our tree");
    }
    let xattrs = &ours.nodes[Path::new("etc/xattr.txt")].xattrs;
    assert_eq!(xattrs.get("user.comment").map(Vec::as_slice), Some(&b"hello xattr"[..]), "{xattrs:?}");
    assert_eq!(ours.nodes[Path::new("var/sparse.img")].size, Some((1 << 20) + 100));
    assert!(ours.hardlinks.contains(&vec![PathBuf::from("bin/busybox"), "bin/cat".into(), "bin/ls".into()]));

    let diffs = differences(&ours, &theirs);
    assert!(
        diffs.is_empty(),
        "{} differences between our unpack (overlay view of the layers) and umoci's:\n{}",
        diffs.len(),
        diffs.join("\n")
    );

    // Our sparse file kept its holes in the layer (umoci writes it out in full).
    let layer = &store.layer_dirs(&images[0])[0];
    let sparse = std::fs::metadata(layer.join("var/sparse.img")).unwrap();
    assert!(sparse.blocks() * 512 < sparse.len() / 2, "sparse file has {} blocks", sparse.blocks());
}
