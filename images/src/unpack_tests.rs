//! Unpack tests: layers built in memory, unpacked for real (needs root for chown/mknod/trusted
//! xattrs, as on our CI machines).

use std::ffi::CString;
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, MetadataExt};

use super::*;

/// A tar stream built entry by entry with raw headers, so tests can write the paths a hostile
/// layer would (`..`, absolute) that `tar::Builder`'s helpers refuse.
struct Layer {
    builder: tar::Builder<Vec<u8>>,
}

struct E<'a> {
    path: &'a str,
    kind: tar::EntryType,
    data: &'a [u8],
    link: Option<&'a str>,
    mode: u32,
    uid: u64,
    gid: u64,
    mtime: u64,
    dev: (u32, u32),
}

fn e(path: &str, kind: tar::EntryType) -> E<'_> {
    E {
        path,
        kind,
        data: b"",
        link: None,
        mode: if kind.is_dir() { 0o755 } else { 0o644 },
        uid: 0,
        gid: 0,
        mtime: 1_600_000_000,
        dev: (0, 0),
    }
}

fn set_raw(field: &mut [u8], value: &str) {
    assert!(value.len() < field.len(), "test path too long");
    field.fill(0);
    field[..value.len()].copy_from_slice(value.as_bytes());
}

impl Layer {
    fn new() -> Self {
        Layer { builder: tar::Builder::new(Vec::new()) }
    }

    fn add(&mut self, e: E<'_>) -> &mut Self {
        let mut h = tar::Header::new_ustar();
        set_raw(&mut h.as_old_mut().name, e.path);
        if let Some(link) = e.link {
            set_raw(&mut h.as_old_mut().linkname, link);
        }
        h.set_entry_type(e.kind);
        h.set_size(e.data.len() as u64);
        h.set_mode(e.mode);
        h.set_uid(e.uid);
        h.set_gid(e.gid);
        h.set_mtime(e.mtime);
        h.set_device_major(e.dev.0).unwrap();
        h.set_device_minor(e.dev.1).unwrap();
        h.set_cksum();
        self.builder.append(&h, e.data).unwrap();
        self
    }

    /// A PAX extended header applying to the next entry.
    fn pax(&mut self, records: &[(&str, &[u8])]) -> &mut Self {
        let mut data = Vec::new();
        for (k, v) in records {
            // "<len> <key>=<value>\n", where len counts itself.
            let body_len = 1 + k.len() + 1 + v.len() + 1;
            let mut len = body_len + 1;
            while len.to_string().len() + body_len != len {
                len += 1;
            }
            data.extend_from_slice(format!("{len} {k}=").as_bytes());
            data.extend_from_slice(v);
            data.push(b'\n');
        }
        let mut h = tar::Header::new_ustar();
        set_raw(&mut h.as_old_mut().name, "PaxHeaders/x");
        h.set_entry_type(tar::EntryType::XHeader);
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        self.builder.append(&h, &data[..]).unwrap();
        self
    }

    fn finish(&mut self) -> Vec<u8> {
        let b = std::mem::replace(&mut self.builder, tar::Builder::new(Vec::new()));
        b.into_inner().unwrap()
    }
}

fn diff_id(tar: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(tar)))
}

/// A scratch data dir with a `layers/` directory and a place for blobs.
struct Scratch {
    dir: tempfile::TempDir,
}

impl Scratch {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("layers")).unwrap();
        Scratch { dir }
    }
    fn layers(&self) -> PathBuf {
        self.dir.path().join("layers")
    }
    fn unpack(&self, blob: &[u8], c: Compression, diff_id: &str) -> Result<PathBuf, Error> {
        let path = self.dir.path().join(format!("blob-{}", unique_suffix()));
        fs::write(&path, blob).unwrap();
        unpack_layer(&path, c, diff_id, &self.layers())
    }
    fn unpack_tar(&self, tar: &[u8]) -> Result<PathBuf, Error> {
        self.unpack(tar, Compression::None, &diff_id(tar))
    }
    /// Nothing but complete layers in `layers/`: no temp dir left behind.
    fn layer_names(&self) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(self.layers())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }
}

fn get_xattr(path: &Path, name: &str) -> Option<Vec<u8>> {
    let p = CString::new(path.as_os_str().as_bytes()).unwrap();
    let n = CString::new(name).unwrap();
    let mut buf = vec![0u8; 256];
    // SAFETY: valid NUL-terminated strings and a buffer whose length is passed with it.
    let rc = unsafe { libc::lgetxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if rc < 0 {
        return None;
    }
    buf.truncate(rc as usize);
    Some(buf)
}

fn unpack_error(r: Result<PathBuf, Error>) -> String {
    match r {
        Err(e @ Error::Unpack { .. }) => e.to_string(),
        other => panic!("expected an Unpack error, got {other:?}"),
    }
}

use tar::EntryType as T;

#[test]
fn files_dirs_links_modes_owners() {
    let s = Scratch::new();
    let tar = Layer::new()
        .add(E { mode: 0o750, uid: 1000, gid: 1001, ..e("app/", T::Directory) })
        .pax(&[("SCHILY.xattr.user.deliverous", b"hello"), ("uid", b"70000")])
        .add(E { data: b"#!/bin/sh\n", mode: 0o4755, gid: 50, mtime: 1_234_567_890, ..e("app/run", T::Regular) })
        .add(E { data: b"x", mode: 0o2640, uid: 7, gid: 8, ..e("app/sgid", T::Regular) })
        .add(E { mode: 0o1777, ..e("tmp/", T::Directory) })
        .add(E { link: Some("run"), ..e("app/alias", T::Symlink) })
        .add(E { link: Some("/etc/does-not-matter"), ..e("abs-link", T::Symlink) })
        .add(E { link: Some("app/run"), ..e("app/hard", T::Link) })
        .add(E { mode: 0o600, ..e("app/fifo", T::Fifo) })
        .add(E { dev: (1, 3), mode: 0o666, ..e("dev/null", T::Char) })
        .add(E { data: b"implicit", ..e("deep/er/file", T::Regular) })
        .finish();
    let root = s.unpack_tar(&tar).unwrap();
    assert_eq!(root, s.layers().join(&diff_id(&tar)["sha256:".len()..]));
    assert_eq!(s.layer_names().len(), 1);

    let app = fs::symlink_metadata(root.join("app")).unwrap();
    assert!(app.is_dir());
    assert_eq!((app.mode() & 0o7777, app.uid(), app.gid()), (0o750, 1000, 1001));
    assert_eq!(app.mtime(), 1_600_000_000, "dir mtime set after its children");

    let run = fs::symlink_metadata(root.join("app/run")).unwrap();
    assert_eq!(fs::read(root.join("app/run")).unwrap(), b"#!/bin/sh\n");
    assert_eq!(run.mode() & 0o7777, 0o4755, "setuid kept after chown");
    assert_eq!((run.uid(), run.gid()), (70000, 50), "PAX uid wins over ustar");
    assert_eq!(run.mtime(), 1_234_567_890);
    assert_eq!(run.nlink(), 2);
    assert_eq!(get_xattr(&root.join("app/run"), "user.deliverous").as_deref(), Some(&b"hello"[..]));

    let sgid = fs::symlink_metadata(root.join("app/sgid")).unwrap();
    assert_eq!((sgid.mode() & 0o7777, sgid.uid(), sgid.gid()), (0o2640, 7, 8));
    let tmp = fs::symlink_metadata(root.join("tmp")).unwrap();
    assert_eq!(tmp.mode() & 0o7777, 0o1777);

    assert_eq!(fs::read_link(root.join("app/alias")).unwrap(), Path::new("run"));
    assert_eq!(fs::read_link(root.join("abs-link")).unwrap(), Path::new("/etc/does-not-matter"));
    let hard = fs::symlink_metadata(root.join("app/hard")).unwrap();
    assert_eq!(hard.ino(), run.ino());

    assert!(fs::symlink_metadata(root.join("app/fifo")).unwrap().file_type().is_fifo());
    let null = fs::symlink_metadata(root.join("dev/null")).unwrap();
    assert!(null.file_type().is_char_device());
    assert_eq!(null.rdev(), makedev(1, 3));
    assert_eq!(null.mode() & 0o777, 0o666);

    let deep = fs::symlink_metadata(root.join("deep/er")).unwrap();
    assert_eq!(deep.mode() & 0o7777, 0o755, "implicit parents get 0755");
    assert_eq!(fs::read(root.join("deep/er/file")).unwrap(), b"implicit");

    // Unpacking again is a no-op on the complete layer.
    assert_eq!(s.unpack_tar(&tar).unwrap(), root);
}

#[test]
fn whiteout_becomes_char_device() {
    let s = Scratch::new();
    let tar = Layer::new()
        .add(e("etc/", T::Directory))
        .add(e("etc/.wh.motd", T::Regular))
        .add(e(".wh.toplevel", T::Regular))
        .finish();
    let root = s.unpack_tar(&tar).unwrap();
    for p in ["etc/motd", "toplevel"] {
        let m = fs::symlink_metadata(root.join(p)).unwrap();
        assert!(m.file_type().is_char_device(), "{p}");
        assert_eq!(m.rdev(), makedev(0, 0), "{p}");
    }
    assert!(!root.join("etc/.wh.motd").exists());
}

#[test]
fn opaque_marker_sets_xattr() {
    let s = Scratch::new();
    let tar = Layer::new()
        .add(e("var/", T::Directory))
        .add(e("var/cache/.wh..wh..opq", T::Regular))
        .add(E { data: b"new", ..e("var/cache/fresh", T::Regular) })
        .finish();
    let root = s.unpack_tar(&tar).unwrap();
    assert_eq!(get_xattr(&root.join("var/cache"), "trusted.overlay.opaque").as_deref(), Some(&b"y"[..]));
    assert!(get_xattr(&root.join("var"), "trusted.overlay.opaque").is_none());
    assert!(!root.join("var/cache/.wh..wh..opq").exists());
    assert_eq!(fs::read(root.join("var/cache/fresh")).unwrap(), b"new");
}

#[test]
fn layer_cannot_set_overlay_xattrs() {
    let s = Scratch::new();
    let tar =
        Layer::new().pax(&[("SCHILY.xattr.trusted.overlay.redirect", b"/etc")]).add(e("d/", T::Directory)).finish();
    let root = s.unpack_tar(&tar).unwrap();
    assert!(get_xattr(&root.join("d"), "trusted.overlay.redirect").is_none());
}

#[test]
fn parent_dir_escape_rejected() {
    let s = Scratch::new();
    let tar = Layer::new().add(E { data: b"pwned", ..e("../escape", T::Regular) }).finish();
    let msg = unpack_error(s.unpack_tar(&tar));
    assert!(msg.contains("../escape") && msg.contains(".."), "{msg}");
    assert!(!s.dir.path().join("escape").exists());
    assert!(s.layer_names().is_empty(), "temp dir removed: {:?}", s.layer_names());

    let tar = Layer::new().add(E { data: b"pwned", ..e("a/../../escape2", T::Regular) }).finish();
    unpack_error(s.unpack_tar(&tar));
    assert!(!s.dir.path().join("escape2").exists());
}

/// Decision: absolute paths are taken relative to the layer root (as Docker does), not refused.
#[test]
fn absolute_path_lands_inside_root() {
    let s = Scratch::new();
    let tar = Layer::new().add(E { data: b"inside", ..e("/etc/deliverous-test-x", T::Regular) }).finish();
    let root = s.unpack_tar(&tar).unwrap();
    assert_eq!(fs::read(root.join("etc/deliverous-test-x")).unwrap(), b"inside");
    assert!(!Path::new("/etc/deliverous-test-x").exists());
}

#[test]
fn symlink_parent_not_followed() {
    let s = Scratch::new();
    let outside = tempfile::tempdir().unwrap();
    let outside_str = outside.path().to_str().unwrap().to_string();

    // evil -> /  then evil/etc/passwd
    let tar = Layer::new()
        .add(E { link: Some("/"), ..e("evil", T::Symlink) })
        .add(E { data: b"root::0:0::/:/bin/sh\n", ..e("evil/etc/passwd", T::Regular) })
        .finish();
    let msg = unpack_error(s.unpack_tar(&tar));
    assert!(msg.contains("evil/etc/passwd") && msg.contains("symlink"), "{msg}");
    assert!(s.layer_names().is_empty());

    // The same through a symlink to a directory we can inspect: nothing appears there.
    let tar = Layer::new()
        .add(E { link: Some(&outside_str), ..e("evil", T::Symlink) })
        .add(E { data: b"x", ..e("evil/planted", T::Regular) })
        .add(e("evil/sub/", T::Directory))
        .finish();
    unpack_error(s.unpack_tar(&tar));
    assert_eq!(fs::read_dir(outside.path()).unwrap().count(), 0);

    // A relative symlink climbing out is no better.
    let tar = Layer::new()
        .add(E { link: Some("../../../../../../.."), ..e("up", T::Symlink) })
        .add(E { data: b"x", ..e("up/tmp/planted", T::Regular) })
        .finish();
    unpack_error(s.unpack_tar(&tar));
    assert!(s.layer_names().is_empty());
}

#[test]
fn file_replaces_symlink_instead_of_writing_through_it() {
    let s = Scratch::new();
    let outside = tempfile::tempdir().unwrap();
    let victim = outside.path().join("victim");
    fs::write(&victim, b"original").unwrap();
    let victim_str = victim.to_str().unwrap().to_string();
    let tar = Layer::new()
        .add(E { link: Some(&victim_str), ..e("f", T::Symlink) })
        .add(E { data: b"overwritten", ..e("f", T::Regular) })
        .finish();
    let root = s.unpack_tar(&tar).unwrap();
    assert_eq!(fs::read(&victim).unwrap(), b"original");
    assert_eq!(fs::read(root.join("f")).unwrap(), b"overwritten");
    assert!(fs::symlink_metadata(root.join("f")).unwrap().is_file());
}

#[test]
fn hardlink_escape_rejected() {
    let s = Scratch::new();
    let tar = Layer::new().add(E { link: Some("../../x"), ..e("h", T::Link) }).finish();
    let msg = unpack_error(s.unpack_tar(&tar));
    assert!(msg.contains("hardlink target") && msg.contains(".."), "{msg}");

    // Through a symlinked directory (evil -> /etc) to a host file.
    let tar = Layer::new()
        .add(E { link: Some("/etc"), ..e("evil", T::Symlink) })
        .add(E { link: Some("evil/passwd"), ..e("h", T::Link) })
        .finish();
    let msg = unpack_error(s.unpack_tar(&tar));
    assert!(msg.contains("not a real directory"), "{msg}");

    // Absolute target: resolved beneath the root, where it does not exist yet.
    let tar = Layer::new().add(E { link: Some("/etc/passwd"), ..e("h", T::Link) }).finish();
    let msg = unpack_error(s.unpack_tar(&tar));
    assert!(msg.contains("not been extracted"), "{msg}");
    assert!(s.layer_names().is_empty());
}

fn simple_tar() -> Vec<u8> {
    Layer::new()
        .add(e("bin/", T::Directory))
        .add(E { data: b"hello world", mode: 0o755, ..e("bin/hello", T::Regular) })
        .finish()
}

#[test]
fn gzip_zstd_and_plain() {
    let tar = simple_tar();
    let id = diff_id(&tar);

    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&tar).unwrap();
    let gz = gz.finish().unwrap();
    let zst = zstd::encode_all(&tar[..], 3).unwrap();

    for (blob, c) in [(&tar, Compression::None), (&gz, Compression::Gzip), (&zst, Compression::Zstd)] {
        let s = Scratch::new();
        let root = s.unpack(blob, c, &id).unwrap_or_else(|e| panic!("{c:?}: {e}"));
        assert_eq!(fs::read(root.join("bin/hello")).unwrap(), b"hello world", "{c:?}");
    }

    // The wrong decompressor is an error, not garbage.
    let s = Scratch::new();
    assert!(s.unpack(&tar, Compression::Gzip, &id).is_err());
    assert!(s.layer_names().is_empty());
}

#[test]
fn diff_id_mismatch_rejected_and_cleaned() {
    let s = Scratch::new();
    let tar = simple_tar();
    let wrong = format!("sha256:{}", "0".repeat(64));
    match s.unpack(&tar, Compression::None, &wrong) {
        Err(Error::DigestMismatch { expected, actual, .. }) => {
            assert_eq!(expected, wrong);
            assert_eq!(actual, diff_id(&tar));
        }
        other => panic!("expected DigestMismatch, got {other:?}"),
    }
    assert!(s.layer_names().is_empty(), "{:?}", s.layer_names());

    let msg = unpack_error(s.unpack(&tar, Compression::None, "sha256:xyz"));
    assert!(msg.contains("64 lowercase hex"), "{msg}");
}

#[test]
fn garbage_is_an_unpack_error() {
    let s = Scratch::new();
    let junk = vec![0x42u8; 1500];
    unpack_error(s.unpack(&junk, Compression::None, &diff_id(&junk)));
    assert!(s.layer_names().is_empty());
}

#[test]
fn media_types() {
    let table = [
        ("application/vnd.oci.image.layer.v1.tar", Some(Compression::None)),
        ("application/vnd.oci.image.layer.v1.tar+gzip", Some(Compression::Gzip)),
        ("application/vnd.oci.image.layer.v1.tar+zstd", Some(Compression::Zstd)),
        ("application/vnd.oci.image.layer.nondistributable.v1.tar+gzip", Some(Compression::Gzip)),
        ("application/vnd.docker.image.rootfs.diff.tar.gzip", Some(Compression::Gzip)),
        ("application/vnd.docker.image.rootfs.foreign.diff.tar.gzip", Some(Compression::Gzip)),
        ("application/vnd.docker.image.rootfs.diff.tar", Some(Compression::None)),
        ("application/vnd.oci.image.layer.v1.tar+gzip+encrypted", None),
        ("application/vnd.wasm.content.layer.v1+wasm", None),
    ];
    for (mt, want) in table {
        assert_eq!(Compression::from_media_type(mt), want, "{mt}");
    }
}

#[test]
fn sanitize_paths() {
    let ok = |p: &str| sanitize(Path::new(p)).map(|v| v.join(OsStr::new("/")).to_string_lossy().into_owned());
    assert_eq!(ok("./a/b").unwrap(), "a/b");
    assert_eq!(ok("/a//b/./c/").unwrap(), "a/b/c");
    assert_eq!(ok("./").unwrap(), "");
    assert!(ok("a/../b").is_err());
    assert!(ok("..").is_err());
}

#[test]
fn old_style_directory_entry() {
    let s = Scratch::new();
    let tar = Layer::new()
        .add(E { mode: 0o700, ..e("olddir/", T::Regular) })
        .add(E { data: b"x", ..e("olddir/f", T::Regular) })
        .finish();
    let root = s.unpack_tar(&tar).unwrap();
    let m = fs::symlink_metadata(root.join("olddir")).unwrap();
    assert!(m.is_dir());
    assert_eq!(m.mode() & 0o7777, 0o700);
}
