//! Unpack tests: layers built in memory, unpacked for real (needs root for chown/mknod/trusted
//! xattrs, as on our CI machines).

use std::collections::{BTreeMap, BTreeSet};
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

/// A header with every numeric field set, for tests that then break one of them on purpose.
fn raw_header(h: tar::Header, path: &str, kind: tar::EntryType, size: u64) -> tar::Header {
    let mut h = h;
    set_raw(&mut h.as_old_mut().name, path);
    h.set_entry_type(kind);
    h.set_size(size);
    h.set_mode(if kind.is_dir() { 0o755 } else { 0o644 });
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1_600_000_000);
    h.set_cksum();
    h
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

    /// Any header, with its data, exactly as given.
    fn raw(&mut self, h: &tar::Header, data: &[u8]) -> &mut Self {
        self.builder.append(h, data).unwrap();
        self
    }

    /// A GNU long name (`L`) or long link (`K`) member applying to the next entry.
    fn gnu_long(&mut self, kind: tar::EntryType, value: &[u8]) -> &mut Self {
        let mut data = value.to_vec();
        data.push(0);
        let mut h = tar::Header::new_gnu();
        set_raw(&mut h.as_old_mut().name, "././@LongLink");
        h.set_entry_type(kind);
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        self.raw(&h, &data)
    }

    fn finish(&mut self) -> Vec<u8> {
        let b = std::mem::replace(&mut self.builder, tar::Builder::new(Vec::new()));
        b.into_inner().unwrap()
    }
}

fn diff_id(tar: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(tar)))
}

/// A scratch data dir with a `layers/` directory, a place for blobs, and a `sentinel/` directory
/// beside the layers that hostile layers aim at. Every unpack checks that nothing outside
/// `layers/` changed and that `layers/` gained the finished layer or nothing.
struct Scratch {
    dir: tempfile::TempDir,
}

impl Scratch {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("layers")).unwrap();
        let sentinel = dir.path().join("sentinel");
        fs::create_dir_all(sentinel.join("sub")).unwrap();
        fs::write(sentinel.join("canary"), b"canary").unwrap();
        fs::write(sentinel.join("sub/inner"), b"inner").unwrap();
        std::os::unix::fs::symlink("canary", sentinel.join("link")).unwrap();
        Scratch { dir }
    }
    fn layers(&self) -> PathBuf {
        self.dir.path().join("layers")
    }
    /// Absolute path of the sentinel directory, for link targets and absolute entry paths.
    fn sentinel(&self) -> String {
        self.dir.path().join("sentinel").to_str().unwrap().to_string()
    }
    fn unpack(&self, blob: &[u8], c: Compression, diff_id: &str) -> Result<PathBuf, Error> {
        self.unpack_with(blob, c, diff_id, &UnpackOptions::default())
    }
    fn unpack_with(&self, blob: &[u8], c: Compression, diff_id: &str, opts: &UnpackOptions) -> Result<PathBuf, Error> {
        let path = self.dir.path().join(format!("blob-{}", unique_suffix()));
        fs::write(&path, blob).unwrap();
        let outside_before = outside_snapshot(self.dir.path());
        let layers_before: BTreeSet<String> = self.layer_names().into_iter().collect();

        let result = unpack_layer_with(&path, c, diff_id, &self.layers(), opts);

        let outside_after = outside_snapshot(self.dir.path());
        for (p, before) in &outside_before {
            assert_eq!(outside_after.get(p), Some(before), "{} changed outside the layer root", p.display());
        }
        let created: Vec<_> = outside_after.keys().filter(|p| !outside_before.contains_key(*p)).collect();
        assert!(created.is_empty(), "created outside the layer root: {created:?}");
        let layers_after: BTreeSet<String> = self.layer_names().into_iter().collect();
        let mut expected = layers_before;
        if let Ok(root) = &result {
            assert_eq!(root.parent(), Some(self.layers().as_path()));
            expected.insert(root.file_name().unwrap().to_string_lossy().into_owned());
        }
        assert_eq!(layers_after, expected, "layers/ holds the finished layer or nothing new (no temp dir)");
        result
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

fn list_xattrs(path: &Path) -> Vec<(String, Vec<u8>)> {
    let p = CString::new(path.as_os_str().as_bytes()).unwrap();
    let mut names = vec![0u8; 4096];
    // SAFETY: a valid NUL-terminated path and a buffer whose length is passed with it.
    let rc = unsafe { libc::llistxattr(p.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    assert!(rc >= 0, "llistxattr {}: {}", path.display(), io::Error::last_os_error());
    names.truncate(rc as usize);
    names
        .split(|b| *b == 0)
        .filter(|n| !n.is_empty())
        .map(|n| {
            let name = String::from_utf8_lossy(n).into_owned();
            let value = get_xattr(path, &name).unwrap_or_default();
            (name, value)
        })
        .collect()
}

/// Everything in the scratch dir except `layers/`: every byte and every bit of metadata a hostile
/// layer could change (ctime catches a chmod, chown or xattr change even if undone).
fn outside_snapshot(dir: &Path) -> BTreeMap<PathBuf, String> {
    fn walk(base: &Path, p: &Path, out: &mut BTreeMap<PathBuf, String>) {
        let m = fs::symlink_metadata(p).unwrap();
        let content = if m.is_file() {
            hex::encode(Sha256::digest(fs::read(p).unwrap()))
        } else if m.file_type().is_symlink() {
            fs::read_link(p).unwrap().display().to_string()
        } else {
            String::new()
        };
        let desc = format!(
            "{:o} {}:{} size={} mtime={}.{} ctime={}.{} rdev={} nlink={} {content} {:?}",
            m.mode(),
            m.uid(),
            m.gid(),
            m.size(),
            m.mtime(),
            m.mtime_nsec(),
            m.ctime(),
            m.ctime_nsec(),
            m.rdev(),
            m.nlink(),
            list_xattrs(p),
        );
        out.insert(p.strip_prefix(base).unwrap().to_path_buf(), desc);
        if m.is_dir() {
            for entry in fs::read_dir(p).unwrap() {
                let child = entry.unwrap().path();
                if child != base.join("layers") {
                    walk(base, &child, out);
                }
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
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

/// A layer larger than `SYNC_EVERY`, so its file system is also synced while it is written,
/// in files larger and smaller than the copy buffer.
#[test]
fn large_layer_synced_as_it_is_written() {
    let mut l = Layer::new();
    let data: Vec<Vec<u8>> = (0..24u8).map(|i| vec![i; (i as usize % 3) << 20 | 1000]).collect();
    let names: Vec<String> = (0..data.len()).map(|i| format!("d{}/f{i}", i % 4)).collect();
    for (name, data) in names.iter().zip(&data) {
        l.add(E { data, ..e(name, T::Regular) });
    }
    let tar = l.finish();
    assert!(tar.len() as u64 > SYNC_EVERY);
    let s = Scratch::new();
    let root = s.unpack(&zstd::encode_all(&tar[..], 1).unwrap(), Compression::Zstd, &diff_id(&tar)).unwrap();
    for (name, data) in names.iter().zip(&data) {
        assert!(fs::read(root.join(name)).unwrap() == *data, "{name}");
    }
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

    // Compressed layers are hashed by the inflating thread: the same check, the same cleanup.
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, &tar).unwrap();
    let gz = gz.finish().unwrap();
    match s.unpack(&gz, Compression::Gzip, &wrong) {
        Err(Error::DigestMismatch { expected, actual, .. }) => {
            assert_eq!(expected, wrong);
            assert_eq!(actual, diff_id(&tar));
        }
        other => panic!("expected DigestMismatch, got {other:?}"),
    }
    assert!(s.layer_names().is_empty(), "{:?}", s.layer_names());
    s.unpack(&gz, Compression::Gzip, &diff_id(&tar)).expect("the right diff_id unpacks");
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

// ---- The hostile corpus: one layer (or a few variants of one trick) per case. Every unpack runs
// through `Scratch::unpack_with`, which fails the test if anything outside the layer root changed.

fn too_large(r: Result<PathBuf, Error>) -> String {
    match r {
        Err(e @ Error::LayerTooLarge { .. }) => {
            assert!(e.is_user_error(), "a layer over the limit is the image's fault: {e}");
            e.to_string()
        }
        other => panic!("expected LayerTooLarge, got {other:?}"),
    }
}

/// Absolute paths, even ones naming the sentinel, land beneath the root; so do absolute hardlink
/// targets and whiteouts.
#[test]
fn hostile_absolute_paths() {
    let s = Scratch::new();
    let sentinel = s.sentinel();
    let (canary, sub, whiteout, hard) = (
        format!("{sentinel}/canary"),
        format!("{sentinel}/sub/"),
        format!("{sentinel}/.wh.link"),
        format!("{sentinel}/hard"),
    );
    let tar = Layer::new()
        .add(E { data: b"overwritten?", ..e(&canary, T::Regular) })
        .add(E { mode: 0o700, ..e(&sub, T::Directory) })
        .add(e(&whiteout, T::Regular))
        .add(E { link: Some(&canary), ..e(&hard, T::Link) })
        .finish();
    let root = s.unpack_tar(&tar).unwrap();
    let inside = root.join(sentinel.trim_start_matches('/'));
    assert_eq!(fs::read(inside.join("canary")).unwrap(), b"overwritten?");
    assert_eq!(fs::symlink_metadata(inside.join("sub")).unwrap().mode() & 0o7777, 0o700);
    assert!(fs::symlink_metadata(inside.join("link")).unwrap().file_type().is_char_device());
    let ino = |p: &str| fs::symlink_metadata(inside.join(p)).unwrap().ino();
    assert_eq!(ino("hard"), ino("canary"));
}

/// A ustar `prefix` field is part of the path: `..` there is refused like anywhere else.
#[test]
fn hostile_dotdot_in_ustar_prefix() {
    let s = Scratch::new();
    let mut h = raw_header(tar::Header::new_ustar(), "canary", T::Regular, 5);
    set_raw(&mut h.as_ustar_mut().unwrap().prefix, "../../sentinel");
    h.set_cksum();
    let tar = Layer::new().raw(&h, b"pwned").finish();
    let msg = unpack_error(s.unpack_tar(&tar));
    assert!(msg.contains("../../sentinel/canary") && msg.contains("\"..\""), "{msg}");
}

/// a -> b -> c -> ../../sentinel: writing through the first link of the chain is refused, whatever
/// the chain's length or where its links live.
#[test]
fn hostile_symlink_chain_escaping() {
    let s = Scratch::new();
    let sentinel = s.sentinel();
    let chain = |l: &mut Layer| {
        l.add(E { link: Some("b"), ..e("a", T::Symlink) })
            .add(E { link: Some("c"), ..e("b", T::Symlink) })
            .add(E { link: Some("../../sentinel"), ..e("c", T::Symlink) });
    };
    for victim in ["a/canary", "a/planted", "a/sub/inner", "a/sub/new/deeper", "a/.wh.canary", "a/.wh..wh..opq"] {
        let mut l = Layer::new();
        chain(&mut l);
        let tar = l.add(E { data: b"pwned", ..e(victim, T::Regular) }).finish();
        let msg = unpack_error(s.unpack_tar(&tar));
        assert!(msg.contains("parent \"a\" is a symlink"), "{victim}: {msg}");
    }
    let mut l = Layer::new();
    chain(&mut l);
    let tar = l.add(e("a/newdir/", T::Directory)).finish();
    unpack_error(s.unpack_tar(&tar));

    // A chain through a real directory, mixing absolute and relative links.
    let tar = Layer::new()
        .add(e("d/", T::Directory))
        .add(E { link: Some("../x"), ..e("d/l", T::Symlink) })
        .add(E { link: Some(&sentinel), ..e("x", T::Symlink) })
        .add(E { data: b"pwned", ..e("d/l/canary", T::Regular) })
        .finish();
    let msg = unpack_error(s.unpack_tar(&tar));
    assert!(msg.contains("parent \"d/l\" is a symlink"), "{msg}");

    // The chain itself is only data: unpacked as is, it is harmless.
    let mut l = Layer::new();
    chain(&mut l);
    let root = s.unpack_tar(&l.finish()).unwrap();
    assert_eq!(fs::read_link(root.join("c")).unwrap(), Path::new("../../sentinel"));
}

/// A hardlink to a symlink that points outside shares the symlink's inode: it is itself such a
/// symlink, inside the root, never followed. Writing through it is refused; replacing it is fine.
#[test]
fn hostile_hardlink_to_escaping_symlink() {
    let s = Scratch::new();
    let sentinel = s.sentinel();
    let canary = format!("{sentinel}/canary");
    let tar = Layer::new()
        .add(E { link: Some(&canary), ..e("evil", T::Symlink) })
        .add(E { link: Some("evil"), ..e("h", T::Link) })
        .add(E { link: Some("../../sentinel"), ..e("evil-dir", T::Symlink) })
        .add(E { link: Some("evil-dir"), ..e("h-dir", T::Link) })
        .finish();
    let root = s.unpack_tar(&tar).unwrap();
    let h = fs::symlink_metadata(root.join("h")).unwrap();
    assert!(h.file_type().is_symlink());
    assert_eq!(h.ino(), fs::symlink_metadata(root.join("evil")).unwrap().ino());
    assert_eq!(fs::read_link(root.join("h")).unwrap(), Path::new(&canary));
    assert!(fs::symlink_metadata(root.join("h-dir")).unwrap().file_type().is_symlink());

    // Content for the hardlink's path replaces the link; the file it pointed to is untouched.
    let tar = Layer::new()
        .add(E { link: Some(&canary), ..e("evil", T::Symlink) })
        .add(E { link: Some("evil"), ..e("h", T::Link) })
        .add(E { data: b"pwned", ..e("h", T::Regular) })
        .finish();
    let root = s.unpack_tar(&tar).unwrap();
    assert_eq!(fs::read(root.join("h")).unwrap(), b"pwned");

    // Through it as a directory: refused.
    let tar = Layer::new()
        .add(E { link: Some(&sentinel), ..e("evil", T::Symlink) })
        .add(E { link: Some("evil"), ..e("h", T::Link) })
        .add(E { data: b"pwned", ..e("h/canary", T::Regular) })
        .finish();
    let msg = unpack_error(s.unpack_tar(&tar));
    assert!(msg.contains("parent \"h\" is a symlink"), "{msg}");

    // A hardlink whose target goes through the escaping symlink: refused.
    let tar = Layer::new()
        .add(E { link: Some(&sentinel), ..e("evil", T::Symlink) })
        .add(E { link: Some("evil/canary"), ..e("h", T::Link) })
        .finish();
    let msg = unpack_error(s.unpack_tar(&tar));
    assert!(msg.contains("hardlink target") && msg.contains("not a real directory"), "{msg}");
}

/// Whiteouts only ever remove (and mark) things beneath the root.
#[test]
fn hostile_whiteout_outside() {
    let s = Scratch::new();
    let sentinel = s.sentinel();
    let refused = [
        ("../.wh.sentinel", "\"..\""),
        ("../../sentinel/.wh.canary", "\"..\""),
        ("evil/.wh.canary", "parent \"evil\" is a symlink"),
        ("evil/.wh..wh..opq", "parent \"evil\" is a symlink"),
        ("evil/sub/.wh.inner", "parent \"evil\" is a symlink"),
        (".wh..", "whiteout names nothing"),
        ("d/.wh.", "whiteout names nothing"),
    ];
    for (path, want) in refused {
        let tar = Layer::new()
            .add(E { link: Some(&sentinel), ..e("evil", T::Symlink) })
            .add(e("d/", T::Directory))
            .add(e(path, T::Regular))
            .finish();
        let msg = unpack_error(s.unpack_tar(&tar));
        assert!(msg.contains(want), "{path}: {msg}");
    }

    // Whiting out a symlink that points outside removes the symlink, not what it points to; the
    // same for a real directory (recursively, inside the root only).
    let tar = Layer::new()
        .add(E { link: Some(&sentinel), ..e("evil", T::Symlink) })
        .add(E { link: Some("../../sentinel/canary"), ..e("evil-file", T::Symlink) })
        .add(e("dir/", T::Directory))
        .add(E { link: Some(&sentinel), ..e("dir/evil", T::Symlink) })
        .add(e(".wh.evil", T::Regular))
        .add(e(".wh.evil-file", T::Regular))
        .add(e(".wh.dir", T::Regular))
        .finish();
    let root = s.unpack_tar(&tar).unwrap();
    for p in ["evil", "evil-file", "dir"] {
        let m = fs::symlink_metadata(root.join(p)).unwrap();
        assert!(m.file_type().is_char_device() && m.rdev() == 0, "{p}");
    }
}

/// Device nodes are created as the layer says (as Docker does), inside the root only; access to
/// them from a container is the device cgroup's business. A node replaces a symlink at its path
/// rather than following it, and a misread device number is an error, never a 0/0 whiteout.
#[test]
fn hostile_device_nodes() {
    let s = Scratch::new();
    let sentinel = s.sentinel();
    let tar = Layer::new()
        .add(E { link: Some(&format!("{sentinel}/canary")), ..e("dev/sda", T::Symlink) })
        .add(E { dev: (8, 0), mode: 0o660, ..e("dev/sda", T::Block) })
        .add(E { dev: (1, 1), mode: 0o640, ..e("dev/mem", T::Char) })
        .add(E { mode: 0o4755, ..e("dev/fifo", T::Fifo) })
        .finish();
    let root = s.unpack_tar(&tar).unwrap();
    let sda = fs::symlink_metadata(root.join("dev/sda")).unwrap();
    assert!(sda.file_type().is_block_device());
    assert_eq!((sda.rdev(), sda.mode() & 0o7777), (makedev(8, 0), 0o660));
    let mem = fs::symlink_metadata(root.join("dev/mem")).unwrap();
    assert!(mem.file_type().is_char_device());
    assert_eq!(mem.rdev(), makedev(1, 1));
    assert!(fs::symlink_metadata(root.join("dev/fifo")).unwrap().file_type().is_fifo());

    // Through a symlinked parent: refused.
    let tar = Layer::new()
        .add(E { link: Some(&sentinel), ..e("evil", T::Symlink) })
        .add(E { dev: (1, 3), ..e("evil/null", T::Char) })
        .finish();
    let msg = unpack_error(s.unpack_tar(&tar));
    assert!(msg.contains("parent \"evil\" is a symlink"), "{msg}");

    // Garbage in the device number field.
    let mut h = raw_header(tar::Header::new_ustar(), "dev/bad", T::Char, 0);
    h.as_ustar_mut().unwrap().dev_major = *b"zzzzzzz\0";
    h.set_cksum();
    let msg = unpack_error(s.unpack_tar(&Layer::new().raw(&h, b"").finish()));
    assert!(msg.contains("bad device major field"), "{msg}");
}

/// The same path several times: the last entry wins, whatever the kinds, as with `tar -x`.
#[test]
fn hostile_duplicate_entries() {
    let s = Scratch::new();
    let sentinel = s.sentinel();
    let tar = Layer::new()
        // file, file
        .add(E { data: b"first", ..e("f", T::Regular) })
        .add(E { data: b"second", mode: 0o600, ..e("f", T::Regular) })
        // directory with contents, then file
        .add(e("d2f/", T::Directory))
        .add(E { data: b"child", ..e("d2f/child", T::Regular) })
        .add(E { data: b"now a file", ..e("d2f", T::Regular) })
        // file, then directory
        .add(E { data: b"file", ..e("f2d", T::Regular) })
        .add(E { mode: 0o711, ..e("f2d/", T::Directory) })
        // symlink out, then directory, then a file in it
        .add(E { link: Some(&sentinel), ..e("l2d", T::Symlink) })
        .add(e("l2d/", T::Directory))
        .add(E { data: b"inside", ..e("l2d/canary", T::Regular) })
        // directory twice: the second's mode, owner and mtime win
        .add(E { mode: 0o755, uid: 1, mtime: 1_000_000_000, ..e("dd/", T::Directory) })
        .add(E { mode: 0o700, uid: 2, mtime: 1_100_000_000, ..e("dd/", T::Directory) })
        // a file and its hardlink, then the file again: the link keeps the old content
        .add(E { data: b"old", ..e("orig", T::Regular) })
        .add(E { link: Some("orig"), ..e("link", T::Link) })
        .add(E { data: b"new", ..e("orig", T::Regular) })
        .finish();
    let root = s.unpack_tar(&tar).unwrap();
    let meta = |p: &str| fs::symlink_metadata(root.join(p)).unwrap();
    assert_eq!(fs::read(root.join("f")).unwrap(), b"second");
    assert_eq!(meta("f").mode() & 0o7777, 0o600);
    assert_eq!(fs::read(root.join("d2f")).unwrap(), b"now a file");
    assert!(meta("f2d").is_dir() && meta("f2d").mode() & 0o7777 == 0o711);
    assert!(meta("l2d").is_dir());
    assert_eq!(fs::read(root.join("l2d/canary")).unwrap(), b"inside");
    assert_eq!((meta("dd").mode() & 0o7777, meta("dd").uid(), meta("dd").mtime()), (0o700, 2, 1_100_000_000));
    assert_eq!(fs::read(root.join("link")).unwrap(), b"old");
    assert_eq!(fs::read(root.join("orig")).unwrap(), b"new");
}

/// A directory (and its subdirectory) replaced later in the stream by a symlink pointing outside:
/// the directory mtimes, set at the end, must not be set through the symlink. (They were: the
/// sentinel's `sub` got the layer's mtime.)
#[test]
fn hostile_dir_replaced_by_symlink_before_mtimes_are_set() {
    let s = Scratch::new();
    let sentinel = s.sentinel();
    let tar = Layer::new()
        .add(E { mtime: 1_000, ..e("x/", T::Directory) })
        .add(E { mtime: 2_000, ..e("x/sub/", T::Directory) })
        .add(E { link: Some(&sentinel), mtime: 3_000, ..e("x", T::Symlink) })
        .finish();
    let root = s.unpack_tar(&tar).unwrap();
    let x = fs::symlink_metadata(root.join("x")).unwrap();
    assert!(x.file_type().is_symlink());
    assert_eq!(x.mtime(), 3_000);
}

/// A directory the previous entries went into (its descriptor kept open for the next ones), then
/// replaced by a symlink out, then written through: refused, as for a symlink planted first.
#[test]
fn hostile_dir_replaced_by_symlink_then_written_through() {
    let s = Scratch::new();
    let sentinel = s.sentinel();
    let marker = format!("deliverous-test-{}", unique_suffix());
    for link in [sentinel.as_str(), "/", "../../sentinel"] {
        for victim in ["a/canary", &format!("a/{marker}"), "a/sub/file", "a/.wh.canary"] {
            let tar = Layer::new()
                .add(e("a/", T::Directory))
                .add(E { data: b"first", ..e("a/f", T::Regular) })
                .add(E { link: Some(link), ..e("a", T::Symlink) })
                .add(E { data: b"pwned", ..e(victim, T::Regular) })
                .finish();
            let msg = unpack_error(s.unpack_tar(&tar));
            assert!(msg.contains("parent \"a\" is a symlink"), "{link} {victim}: {msg}");
        }
    }
    assert!(!Path::new("/").join(&marker).exists());

    // Removed by a whiteout, replaced by a file: not a directory any more either.
    for replacement in [e(".wh.a", T::Regular), E { data: b"file", ..e("a", T::Regular) }] {
        let tar = Layer::new()
            .add(e("a/", T::Directory))
            .add(E { data: b"first", ..e("a/f", T::Regular) })
            .add(replacement)
            .add(E { data: b"pwned", ..e("a/x", T::Regular) })
            .finish();
        let msg = unpack_error(s.unpack_tar(&tar));
        assert!(msg.contains("parent \"a\" is not a directory"), "{msg}");
    }

    // Replaced by a new directory: later entries go into the new one.
    let tar = Layer::new()
        .add(e("a/", T::Directory))
        .add(E { data: b"first", ..e("a/f", T::Regular) })
        .add(E { data: b"file", ..e("a", T::Regular) })
        .add(E { mode: 0o700, ..e("a/", T::Directory) })
        .add(E { data: b"second", ..e("a/g", T::Regular) })
        .finish();
    let root = s.unpack_tar(&tar).unwrap();
    assert_eq!(fs::read(root.join("a/g")).unwrap(), b"second");
    assert!(!root.join("a/f").exists());
    assert_eq!(fs::symlink_metadata(root.join("a")).unwrap().mode() & 0o7777, 0o700);
}

/// Directories are reached the same way with or without `openat2(2)` (kernels before 5.6): one
/// `O_NOFOLLOW` component at a time, never through a symlink.
#[test]
fn tree_refuses_symlinks_with_and_without_openat2() {
    let dir = tempfile::tempdir().unwrap();
    fs::create_dir_all(dir.path().join("d/e")).unwrap();
    std::os::unix::fs::symlink("/", dir.path().join("l")).unwrap();
    std::os::unix::fs::symlink("e", dir.path().join("d/m")).unwrap();
    fs::write(dir.path().join("f"), b"").unwrap();
    let c = |p: &str| p.split('/').map(OsString::from).collect::<Vec<_>>();
    for openat2 in [true, false] {
        let mut tree = tree::Tree::open(dir.path()).unwrap();
        if !openat2 {
            tree = tree.without_openat2();
        }
        assert!(tree.dir(&c("d/e")).is_ok());
        assert!(tree.dir(&c("d/new/deeper")).is_ok() && dir.path().join("d/new/deeper").is_dir());
        let err = |r: Result<_, String>| r.err().unwrap_or_default();
        assert!(err(tree.dir(&c("l/tmp"))).contains("parent \"l\" is a symlink"), "openat2 {openat2}");
        assert!(err(tree.dir(&c("d/m/x"))).contains("parent \"d/m\" is a symlink"), "openat2 {openat2}");
        assert!(err(tree.dir(&c("f/x"))).contains("parent \"f\" is not a directory"), "openat2 {openat2}");
        for path in ["l", "d/m", "l/tmp", "nope"] {
            let got = tree.open_beneath(&c(path), OFlag::O_RDONLY | OFlag::O_DIRECTORY).err();
            // A symlink is "not a directory" to O_DIRECTORY, or a loop to O_NOFOLLOW and openat2.
            let want: &[Errno] = if path == "nope" { &[Errno::ENOENT] } else { &[Errno::ELOOP, Errno::ENOTDIR] };
            assert!(got.is_some_and(|e| want.contains(&e)), "{path} {openat2}: {got:?}");
        }
        assert!(matches!(tree.existing_dir(&c("l/x")), Err(tree::Unreachable::NotDir { at: 0, symlink: true })));
        assert!(matches!(tree.existing_dir(&c("d/none/x")), Err(tree::Unreachable::Missing)));
    }
}

/// Sizes no real layer has: rejected before anything is written, or as soon as the stream
/// contradicts them.
#[test]
fn hostile_huge_sizes() {
    let s = Scratch::new();
    // A file declaring 1 TiB: over the (default) limit, refused before writing a byte.
    let mut h = raw_header(tar::Header::new_gnu(), "big", T::Regular, 1 << 40);
    let mut tar = Layer::new().raw(&h, b"").finish();
    tar.truncate(512 + 512);
    let msg = too_large(s.unpack_tar(&tar));
    assert!(msg.contains("entry \"big\" declares 1099511627776 bytes"), "{msg}");

    // Within the limit, but the stream ends first.
    h.set_size(10 << 20);
    h.set_cksum();
    let mut tar = Layer::new().raw(&h, b"").finish();
    tar.truncate(512 + 512);
    let msg = unpack_error(s.unpack_tar(&tar));
    assert!(msg.contains("the layer stream ends inside this entry, after 512 of its 10485760 bytes"), "{msg}");

    // A base-256 size of 2^64-1: tar itself refuses it.
    h.as_old_mut().size = [0x80, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff];
    h.set_cksum();
    assert_eq!(h.size().unwrap(), u64::MAX);
    let tar = Layer::new().raw(&h, b"").finish();
    let msg = unpack_error(s.unpack_tar(&tar));
    assert!(msg.contains("size overflow"), "{msg}");

    // A directory declaring data it does not have.
    let h = raw_header(tar::Header::new_ustar(), "dir/", T::Directory, 1 << 30);
    let mut tar = Layer::new().raw(&h, b"").finish();
    tar.truncate(512);
    let msg = unpack_error(s.unpack_tar(&tar));
    assert!(msg.contains("EOF"), "{msg}");
}

/// GNU long names (`L`) and long links (`K`) are paths like any other.
#[test]
fn hostile_gnu_long_name() {
    let s = Scratch::new();
    let long = format!("{}/file", "d".repeat(200));
    let tar = Layer::new()
        .gnu_long(T::GNULongName, long.as_bytes())
        .add(E { data: b"long", ..e("truncated-name", T::Regular) })
        .gnu_long(T::GNULongName, b"long-symlink")
        .gnu_long(T::GNULongLink, format!("../../{}", "x".repeat(200)).as_bytes())
        .add(E { link: Some("truncated"), ..e("t", T::Symlink) })
        .finish();
    let root = s.unpack_tar(&tar).unwrap();
    assert_eq!(fs::read(root.join(&long)).unwrap(), b"long");
    let target = fs::read_link(root.join("long-symlink")).unwrap();
    assert_eq!(target.to_str().unwrap(), format!("../../{}", "x".repeat(200)));

    let dotdot = format!("{}/../../../sentinel/canary", "d".repeat(120));
    let tar = Layer::new()
        .gnu_long(T::GNULongName, dotdot.as_bytes())
        .add(E { data: b"pwned", ..e("ok", T::Regular) })
        .finish();
    let msg = unpack_error(s.unpack_tar(&tar));
    assert!(msg.contains("sentinel/canary") && msg.contains("\"..\""), "{msg}");

    let tar = Layer::new()
        .gnu_long(T::GNULongLink, format!("{}/../../../../sentinel/canary", "d".repeat(120)).as_bytes())
        .add(E { link: Some("ok"), ..e("h", T::Link) })
        .finish();
    let msg = unpack_error(s.unpack_tar(&tar));
    assert!(msg.contains("hardlink target") && msg.contains("\"..\""), "{msg}");
}

/// A GNU long name tar would buffer whole: bounded, so a layer cannot make us allocate its size.
#[test]
fn hostile_huge_gnu_long_name() {
    let s = Scratch::new();
    let name = vec![b'a'; usize::try_from(MAX_ENTRY_HEADER_BYTES).unwrap() + 1];
    let tar = Layer::new().gnu_long(T::GNULongName, &name).add(e("x", T::Regular)).finish();
    let msg = unpack_error(s.unpack_tar(&tar));
    assert!(msg.contains("headers of one entry") && msg.contains("refusing to buffer"), "{msg}");
    assert!(msg.len() < 2048, "a hostile name is not echoed whole: {} bytes", msg.len());

    let tar = Layer::new().pax(&[("comment", &name)]).add(e("x", T::Regular)).finish();
    let msg = unpack_error(s.unpack_tar(&tar));
    assert!(msg.contains("headers of one entry"), "{msg}");
}

/// PAX `path` and `linkpath` override the ustar fields, and are checked the same way.
#[test]
fn hostile_pax_long_name_with_dotdot() {
    let s = Scratch::new();
    let long = format!("{}/file", ["p"; 150].join("/"));
    let tar = Layer::new()
        .pax(&[("path", long.as_bytes())])
        .add(E { data: b"pax", ..e("short", T::Regular) })
        .pax(&[("linkpath", long.as_bytes())])
        .add(E { link: Some("short"), ..e("hard", T::Link) })
        .finish();
    let root = s.unpack_tar(&tar).unwrap();
    assert_eq!(fs::read(root.join(&long)).unwrap(), b"pax");
    assert_eq!(fs::symlink_metadata(root.join("hard")).unwrap().ino(), fs::metadata(root.join(&long)).unwrap().ino());
    assert!(!root.join("short").exists(), "the PAX path wins over the ustar name");

    let tar = Layer::new()
        .pax(&[("path", b"innocent/../../../sentinel/canary")])
        .add(E { data: b"pwned", ..e("innocent", T::Regular) })
        .finish();
    let msg = unpack_error(s.unpack_tar(&tar));
    assert!(msg.contains("../../../sentinel/canary") && msg.contains("\"..\""), "{msg}");

    let tar = Layer::new()
        .add(E { data: b"x", ..e("innocent", T::Regular) })
        .pax(&[("linkpath", b"../../sentinel/canary")])
        .add(E { link: Some("innocent"), ..e("h", T::Link) })
        .finish();
    let msg = unpack_error(s.unpack_tar(&tar));
    assert!(msg.contains("hardlink target") && msg.contains("\"..\""), "{msg}");
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    gz.write_all(data).unwrap();
    gz.finish().unwrap()
}

/// A small gzip blob that decompresses to gigabytes of zeros after a valid tar: counted on the
/// decompressed stream, it stops at the limit, long before the digest check would have read it
/// all, and leaves nothing behind.
#[test]
fn decompression_bomb_hits_quota() {
    let s = Scratch::new();
    let limit = UnpackOptions { max_unpacked_bytes: 8 << 20 };
    let mut tar = simple_tar();
    tar.resize(16 << 20, 0);
    // Gzip members concatenate: 256 copies of 16 MiB is 4 GiB from a blob of about 4 MiB.
    let member = gzip(&tar);
    let zeros = gzip(&vec![0u8; 16 << 20]);
    let mut bomb = member.clone();
    for _ in 0..255 {
        bomb.extend_from_slice(&zeros);
    }
    // The diff_id is never reached; any well-formed one will do.
    let fake_id = format!("sha256:{}", "a".repeat(64));
    let started = std::time::Instant::now();
    let msg = too_large(s.unpack_with(&bomb, Compression::Gzip, &fake_id, &limit));
    assert!(msg.contains("decompressed tar stream") && msg.contains("8388608 bytes"), "{msg}");
    assert!(started.elapsed() < std::time::Duration::from_secs(30), "stopped early: {:?}", started.elapsed());

    // The same for file contents, in zstd: refused from the entry's declared size.
    let big = Layer::new().add(E { data: &vec![0u8; 9 << 20], ..e("zeros", T::Regular) }).finish();
    let zst = zstd::encode_all(&big[..], 3).unwrap();
    let msg = too_large(s.unpack_with(&zst, Compression::Zstd, &diff_id(&big), &limit));
    assert!(msg.contains("entry \"zeros\" declares 9437184 bytes"), "{msg}");

    // Many small files count together.
    let mut l = Layer::new();
    let chunk = vec![1u8; 1 << 20];
    let names: Vec<String> = (0..9).map(|i| format!("f{i}")).collect();
    for n in &names {
        l.add(E { data: &chunk, ..e(n, T::Regular) });
    }
    let many = l.finish();
    too_large(s.unpack_with(&many, Compression::None, &diff_id(&many), &limit));
}

/// A name longer than any file system accepts fails cleanly, and the message stays readable.
#[test]
fn hostile_overlong_name_is_elided_in_errors() {
    let s = Scratch::new();
    let name = vec!["n".repeat(250); 400].join("/");
    let tar = Layer::new().pax(&[("path", name.as_bytes())]).add(E { data: b"x", ..e("short", T::Regular) }).finish();
    let msg = unpack_error(s.unpack_tar(&tar));
    assert!(msg.len() < 2048 && msg.contains("bytes…]") && msg.contains("File name too long"), "{msg}");
}

/// The limit is exact and configurable; the default is documented.
#[test]
fn quota_is_exact_and_configurable() {
    assert_eq!(UnpackOptions::default().max_unpacked_bytes, 32 << 30);
    let tar = simple_tar();
    let len = tar.len() as u64;
    let s = Scratch::new();
    let msg = too_large(s.unpack_with(
        &tar,
        Compression::None,
        &diff_id(&tar),
        &UnpackOptions { max_unpacked_bytes: len - 1 },
    ));
    assert!(msg.contains(&format!("limit of {} bytes", len - 1)), "{msg}");
    s.unpack_with(&tar, Compression::None, &diff_id(&tar), &UnpackOptions { max_unpacked_bytes: len }).unwrap();
}

/// A GNU sparse header: `blocks` are (offset, data) in the file of `real_size` bytes. More than
/// four blocks go into extension headers, as GNU tar writes them.
fn sparse_entry(l: &mut Layer, path: &str, real_size: u64, blocks: &[(u64, &[u8])]) {
    let stored: u64 = blocks.iter().map(|(_, d)| d.len() as u64).sum();
    let mut h = raw_header(tar::Header::new_gnu(), path, T::GNUSparse, stored);
    h.set_mode(0o640);
    let gnu = h.as_gnu_mut().unwrap();
    gnu.set_real_size(real_size);
    let mut data = Vec::new();
    let (first, rest) = blocks.split_at(blocks.len().min(4));
    for (slot, (off, d)) in gnu.sparse.iter_mut().zip(first) {
        slot.set_offset(*off);
        slot.set_length(d.len() as u64);
    }
    gnu.isextended[0] = u8::from(!rest.is_empty());
    for (i, group) in rest.chunks(21).enumerate() {
        let mut ext = tar::GnuExtSparseHeader::new();
        for (slot, (off, d)) in ext.sparse.iter_mut().zip(group) {
            slot.set_offset(*off);
            slot.set_length(d.len() as u64);
        }
        ext.isextended[0] = u8::from((i + 1) * 21 < rest.len());
        data.extend_from_slice(ext.as_bytes());
    }
    for (_, d) in blocks {
        assert_eq!(d.len() % 512, 0, "sparse blocks are whole 512-byte blocks in the archive");
        data.extend_from_slice(d);
    }
    h.set_cksum();
    l.raw(&h, &data);
}

/// A sparse file declaring a petabyte: counted at its full size, refused before writing.
#[test]
fn hostile_sparse_file_bomb() {
    let s = Scratch::new();
    let block = [7u8; 512];
    let mut l = Layer::new();
    sparse_entry(&mut l, "bomb", 1 << 50, &[(0, &block), ((1 << 50) - 512, &block)]);
    let msg = too_large(s.unpack_tar(&l.finish()));
    assert!(msg.contains("entry \"bomb\" declares 1125899906842624 bytes"), "{msg}");
}

// ---- Faithfulness: what the layer says is what the container sees.

#[test]
fn faithful_setuid_setgid_sticky() {
    let s = Scratch::new();
    let tar = Layer::new()
        .add(E { mode: 0o4755, uid: 1000, gid: 1000, ..e("setuid", T::Regular) })
        .add(E { mode: 0o2711, uid: 1000, gid: 1001, ..e("setgid", T::Regular) })
        .add(E { mode: 0o7777, uid: 1234, gid: 5678, ..e("all-bits", T::Regular) })
        .add(E { mode: 0o1777, ..e("tmp/", T::Directory) })
        .add(E { mode: 0o2775, uid: 1000, gid: 1000, ..e("shared/", T::Directory) })
        .add(E { mode: 0o3770, uid: 33, gid: 33, ..e("sticky-setgid/", T::Directory) })
        .add(E { data: b"child", ..e("shared/child", T::Regular) })
        .finish();
    let root = s.unpack_tar(&tar).unwrap();
    for (p, mode, uid, gid) in [
        ("setuid", 0o4755, 1000, 1000),
        ("setgid", 0o2711, 1000, 1001),
        ("all-bits", 0o7777, 1234, 5678),
        ("tmp", 0o1777, 0, 0),
        ("shared", 0o2775, 1000, 1000),
        ("sticky-setgid", 0o3770, 33, 33),
        ("shared/child", 0o644, 0, 0),
    ] {
        let m = fs::symlink_metadata(root.join(p)).unwrap();
        assert_eq!((m.mode() & 0o7777, m.uid(), m.gid()), (mode, uid, gid), "{p}");
    }
}

/// What we make needs no chown when it already has the owner wanted, which we only count on when
/// its directory's group is ours (setgid or not): else, and whenever a directory's owner changed
/// since its entries were made, the owner is set. Files made with their mode (in the thread of
/// a compressed layer, whose umask is cleared) have it exactly, whatever the process's umask.
#[test]
fn faithful_owner_and_mode_without_needless_chown_or_chmod() {
    assert_eq!(tree::new_owner((0, 0), 0), Some((0, 0)));
    assert_eq!(tree::new_owner((0, 0), 1000), None, "a setgid directory would pass its group on");
    assert_eq!(tree::new_owner((1000, 100), 100), Some((1000, 100)));

    let tar = Layer::new()
        .add(E { mode: 0o2775, ..e("d/", T::Directory) })
        .add(E { data: b"a", ..e("d/a", T::Regular) })
        // The same directory again, now of another group (setgid): its new entries would get it.
        .add(E { mode: 0o2775, gid: 1000, ..e("d/", T::Directory) })
        .add(E { data: b"b", ..e("d/b", T::Regular) })
        .add(E { link: Some("b"), ..e("d/l", T::Symlink) })
        .add(E { mode: 0o755, ..e("d/sub/", T::Directory) })
        .add(E { mode: 0o640, gid: 1000, ..e("d/own", T::Regular) })
        .add(E { mode: 0o640, uid: 7, gid: 0, ..e("d/sub/other", T::Regular) })
        .add(E { mode: 0o2750, uid: 0, gid: 50, ..e("./", T::Directory) })
        .add(E { data: b"r", ..e("r", T::Regular) })
        .add(E { data: b"w", mode: 0o666, ..e("world-writable", T::Regular) })
        .add(E { data: b"x", mode: 0o777, uid: 5, gid: 5, ..e("all", T::Regular) })
        .add(E { data: b"s", mode: 0o4755, ..e("setuid", T::Regular) })
        .add(E { data: b"n", mode: 0o000, ..e("none", T::Regular) })
        .finish();
    let gz = gzip(&tar);
    let umask = || {
        let status = fs::read_to_string("/proc/thread-self/status").unwrap();
        status.lines().find(|l| l.starts_with("Umask:")).map(str::to_string)
    };
    let before = umask();
    for (blob, c) in [(&tar, Compression::None), (&gz, Compression::Gzip)] {
        let s = Scratch::new();
        let root = s.unpack(blob, c, &diff_id(&tar)).unwrap();
        for (p, mode, uid, gid) in [
            ("d", 0o2775, 0, 1000),
            ("d/a", 0o644, 0, 0),
            ("d/b", 0o644, 0, 0),
            ("d/l", 0o777, 0, 0),
            ("d/sub", 0o755, 0, 0),
            ("d/own", 0o640, 0, 1000),
            ("d/sub/other", 0o640, 7, 0),
            ("", 0o2750, 0, 50),
            ("r", 0o644, 0, 0),
            ("world-writable", 0o666, 0, 0),
            ("all", 0o777, 5, 5),
            ("setuid", 0o4755, 0, 0),
            ("none", 0o000, 0, 0),
        ] {
            let m = fs::symlink_metadata(root.join(p)).unwrap();
            assert_eq!((m.mode() & 0o7777, m.uid(), m.gid()), (mode, uid, gid), "{c:?} {p:?}");
        }
        assert_eq!(fs::read(root.join("none")).unwrap(), b"n");
    }
    assert_eq!(umask(), before, "only the unpacking thread's umask is cleared");
}

#[test]
fn faithful_mtime() {
    let s = Scratch::new();
    let tar = Layer::new()
        .add(E { mtime: 1_000_000_001, ..e("a/", T::Directory) })
        .add(E { mtime: 1_000_000_002, ..e("a/b/", T::Directory) })
        .add(E { data: b"x", mtime: 1_000_000_003, ..e("a/b/file", T::Regular) })
        .pax(&[("mtime", b"1234567890.123456789")])
        .add(E { data: b"x", ..e("a/precise", T::Regular) })
        .pax(&[("mtime", b"-1.25")])
        .add(E { data: b"x", ..e("a/before-epoch", T::Regular) })
        .add(E { link: Some("file"), mtime: 1_000_000_004, ..e("a/b/link", T::Symlink) })
        .add(E { mtime: 1_000_000_005, ..e("a/fifo", T::Fifo) })
        .add(E { mtime: 1_000_000_006, ..e("a/b/later/", T::Directory) })
        .add(E { data: b"y", mtime: 1_000_000_007, ..e("a/b/later/f", T::Regular) })
        .add(E { mtime: 1_000_000_008, ..e("./", T::Directory) })
        .finish();
    let root = s.unpack_tar(&tar).unwrap();
    let t = |p: &str| {
        let m = fs::symlink_metadata(root.join(p)).unwrap();
        (m.mtime(), m.mtime_nsec())
    };
    assert_eq!(t("a"), (1_000_000_001, 0), "directories get their time after their children");
    assert_eq!(t("a/b"), (1_000_000_002, 0));
    assert_eq!(t("a/b/file"), (1_000_000_003, 0));
    assert_eq!(t("a/precise"), (1_234_567_890, 123_456_789), "PAX sub-second mtime");
    assert_eq!(t("a/before-epoch"), (-2, 750_000_000), "-1.25 s");
    assert_eq!(t("a/b/link"), (1_000_000_004, 0), "the symlink's own time");
    assert_eq!(t("a/fifo"), (1_000_000_005, 0));
    assert_eq!(t("a/b/later"), (1_000_000_006, 0));
    assert_eq!(t("a/b/later/f"), (1_000_000_007, 0));
    assert_eq!(t(""), (1_000_000_008, 0), "the layer root's own entry");
}

#[test]
fn parse_pax_times() {
    let t = |secs, nanos| Some(Mtime { secs, nanos });
    assert_eq!(parse_pax_time("1234567890"), t(1_234_567_890, 0));
    assert_eq!(parse_pax_time("1234567890.5"), t(1_234_567_890, 500_000_000));
    assert_eq!(parse_pax_time("1.1234567899"), t(1, 123_456_789), "beyond nanoseconds is dropped");
    assert_eq!(parse_pax_time("-1.25"), t(-2, 750_000_000));
    assert_eq!(parse_pax_time("-0.5"), t(-1, 500_000_000));
    assert_eq!(parse_pax_time("-3"), t(-3, 0));
    assert_eq!(parse_pax_time("1.2x"), None);
    assert_eq!(parse_pax_time("soon"), None);
}

/// A `security.capability` xattr survives the chown (which clears it: xattrs go last) and sits
/// beside other namespaces' xattrs, on files, directories and symlinks.
#[test]
fn faithful_security_capability_xattr() {
    // VFS_CAP_REVISION_2 | VFS_CAP_FLAGS_EFFECTIVE, permitted = CAP_NET_BIND_SERVICE (bit 10).
    let mut cap = Vec::new();
    for word in [0x0200_0001u32, 1 << 10, 0, 0, 0] {
        cap.extend_from_slice(&word.to_le_bytes());
    }
    let s = Scratch::new();
    let tar = Layer::new()
        .pax(&[
            ("SCHILY.xattr.security.capability", &cap),
            ("SCHILY.xattr.user.mime_type", b"application/x-executable"),
            ("SCHILY.xattr.trusted.note", b"\x00binary\xff"),
        ])
        .add(E { data: b"\x7fELF", mode: 0o4755, uid: 1000, gid: 1000, ..e("bin/ping", T::Regular) })
        .add(E { link: Some("bin/ping"), ..e("bin/ping-hard", T::Link) })
        .pax(&[("SCHILY.xattr.user.dir", b"d")])
        .add(E { uid: 1000, ..e("data/", T::Directory) })
        .pax(&[("SCHILY.xattr.trusted.link", b"l")])
        .add(E { link: Some("ping"), uid: 1000, ..e("bin/alias", T::Symlink) })
        .finish();
    let root = s.unpack_tar(&tar).unwrap();
    let ping = root.join("bin/ping");
    assert_eq!(get_xattr(&ping, "security.capability"), Some(cap));
    assert_eq!(get_xattr(&ping, "user.mime_type").as_deref(), Some(&b"application/x-executable"[..]));
    assert_eq!(get_xattr(&ping, "trusted.note").as_deref(), Some(&b"\x00binary\xff"[..]));
    let m = fs::symlink_metadata(&ping).unwrap();
    assert_eq!((m.mode() & 0o7777, m.uid(), m.nlink()), (0o4755, 1000, 2));
    assert_eq!(get_xattr(&root.join("data"), "user.dir").as_deref(), Some(&b"d"[..]));
    assert_eq!(get_xattr(&root.join("bin/alias"), "trusted.link").as_deref(), Some(&b"l"[..]));
}

/// Hardlinks share one inode (content, owner, mode, xattrs), across directories and through a
/// link to a link.
#[test]
fn faithful_hardlinks() {
    let s = Scratch::new();
    let tar = Layer::new()
        .pax(&[("SCHILY.xattr.user.k", b"v")])
        .add(E { data: b"shared", mode: 0o750, uid: 5, ..e("a/orig", T::Regular) })
        .add(E { link: Some("a/orig"), ..e("b/one", T::Link) })
        .add(E { link: Some("./b/one"), ..e("two", T::Link) })
        .add(E { link: Some("/a/orig"), ..e("a/three", T::Link) })
        .finish();
    let root = s.unpack_tar(&tar).unwrap();
    let orig = fs::symlink_metadata(root.join("a/orig")).unwrap();
    assert_eq!(orig.nlink(), 4);
    for p in ["b/one", "two", "a/three"] {
        let m = fs::symlink_metadata(root.join(p)).unwrap();
        assert_eq!((m.ino(), m.mode() & 0o7777, m.uid()), (orig.ino(), 0o750, 5), "{p}");
        assert_eq!(fs::read(root.join(p)).unwrap(), b"shared");
        assert_eq!(get_xattr(&root.join(p), "user.k").as_deref(), Some(&b"v"[..]));
    }
}

/// GNU sparse entries (with an extension header): the content is exact and the holes stay holes.
#[test]
fn faithful_sparse_file() {
    let s = Scratch::new();
    let real_size: u64 = 64 << 20;
    let mk = |b: u8| vec![b; 4096];
    let (b1, b2, b3, b4, b5, b6) = (mk(1), mk(2), mk(3), mk(4), mk(5), mk(6));
    let blocks: Vec<(u64, &[u8])> = vec![
        (0, &b1),
        (8 << 20, &b2),
        ((8 << 20) + 4096, &b3),
        (20 << 20, &b4),
        (40 << 20, &b5),
        (real_size - 4096, &b6),
    ];
    let mut l = Layer::new();
    sparse_entry(&mut l, "disk.img", real_size, &blocks);
    // A sparse file whose data ends before its size: a trailing hole.
    sparse_entry(&mut l, "tail-hole", 1 << 20, &[(0, &b1), (1 << 20, &[])]);
    let root = s.unpack_tar(&l.finish()).unwrap();

    let mut expected = vec![0u8; usize::try_from(real_size).unwrap()];
    for (off, d) in &blocks {
        let off = usize::try_from(*off).unwrap();
        expected[off..off + d.len()].copy_from_slice(d);
    }
    let path = root.join("disk.img");
    assert!(fs::read(&path).unwrap() == expected, "sparse content differs");
    let m = fs::symlink_metadata(&path).unwrap();
    assert_eq!((m.len(), m.mode() & 0o7777, m.mtime()), (real_size, 0o640, 1_600_000_000));
    assert!(m.blocks() * 512 < 1 << 20, "holes preserved: {} bytes allocated for 24 KiB of data", m.blocks() * 512);

    let tail = fs::symlink_metadata(root.join("tail-hole")).unwrap();
    assert_eq!(tail.len(), 1 << 20);
    assert!(tail.blocks() * 512 <= 64 * 1024, "{}", tail.blocks());
    let content = fs::read(root.join("tail-hole")).unwrap();
    assert!(content[..4096] == b1[..] && content[4096..].iter().all(|b| *b == 0));
}

/// A PAX sparse entry as GNU tar writes it: the records, then a regular header under a made-up
/// name whose data is the 1.0 map (unless `map_in_data` is empty) followed by the extents' data.
fn pax_sparse_entry(l: &mut Layer, records: &[(&str, &[u8])], fake_name: &str, map_in_data: &str, data: &[u8]) {
    l.pax(records);
    let mut body = map_in_data.as_bytes().to_vec();
    if !body.is_empty() {
        body.resize(body.len().div_ceil(512) * 512, 0);
    }
    body.extend_from_slice(data);
    let mut h = raw_header(tar::Header::new_ustar(), fake_name, T::Regular, body.len() as u64);
    h.set_mode(0o640);
    h.set_cksum();
    l.raw(&h, &body);
}

/// GNU tar's `--format=posix --sparse` (sparse format 1.0, its default), and the older 0.1 and
/// 0.0 PAX formats: the file gets its real name, its content, and its holes. (Go's archive/tar,
/// so Docker and umoci, decodes these; the `tar` crate alone would extract the map under
/// `GNUSparseFile.<pid>/`.)
#[test]
fn faithful_pax_sparse_formats() {
    let s = Scratch::new();
    let size: u64 = 1 << 20;
    let (a, b) = (vec![b'a'; 512], vec![b'b'; 1024]);
    let data = [a.clone(), b.clone()].concat();
    let size_text = size.to_string();
    let mut l = Layer::new();
    pax_sparse_entry(
        &mut l,
        &[
            ("GNU.sparse.major", b"1"),
            ("GNU.sparse.minor", b"0"),
            ("GNU.sparse.name", b"v10/disk.img"),
            ("GNU.sparse.realsize", size_text.as_bytes()),
        ],
        "v10/GNUSparseFile.42/disk.img",
        "3\n0\n512\n600000\n1024\n1048576\n0\n",
        &data,
    );
    pax_sparse_entry(
        &mut l,
        &[
            ("GNU.sparse.size", size_text.as_bytes()),
            ("GNU.sparse.numblocks", b"2"),
            ("GNU.sparse.map", b"0,512,600000,1024"),
            ("GNU.sparse.name", b"v01.img"),
        ],
        "GNUSparseFile.1/v01.img",
        "",
        &data,
    );
    pax_sparse_entry(
        &mut l,
        &[
            ("GNU.sparse.size", size_text.as_bytes()),
            ("GNU.sparse.numblocks", b"2"),
            ("GNU.sparse.offset", b"0"),
            ("GNU.sparse.numbytes", b"512"),
            ("GNU.sparse.offset", b"600000"),
            ("GNU.sparse.numbytes", b"1024"),
            ("path", b"v00.img"),
        ],
        "GNUSparseFile.0/v00.img",
        "",
        &data,
    );
    let root = s.unpack_tar(&l.finish()).unwrap();
    let mut expected = vec![0u8; size as usize];
    expected[..512].copy_from_slice(&a);
    expected[600_000..601_024].copy_from_slice(&b);
    for name in ["v10/disk.img", "v01.img", "v00.img"] {
        let path = root.join(name);
        assert!(fs::read(&path).unwrap() == expected, "{name}: content differs");
        let m = fs::symlink_metadata(&path).unwrap();
        assert_eq!((m.len(), m.mode() & 0o7777), (size, 0o640), "{name}");
        assert!(m.blocks() * 512 < size / 4, "{name}: holes not kept ({} blocks)", m.blocks());
    }
    assert!(!root.join("v10/GNUSparseFile.42").exists() && !root.join("GNUSparseFile.1").exists());
}

/// The real thing: a sparse file archived by GNU tar in its POSIX format.
#[test]
fn faithful_gnu_tar_posix_sparse() {
    let s = Scratch::new();
    let src = s.dir.path().join("src");
    fs::create_dir(&src).unwrap();
    let file = src.join("sparse.bin");
    let mut f = fs::File::create(&file).unwrap();
    f.write_all(b"HEAD").unwrap();
    f.seek(SeekFrom::Start(700_000)).unwrap();
    f.write_all(b"MIDDLE").unwrap();
    f.set_len((2 << 20) + 3).unwrap();
    drop(f);
    let tar_path = s.dir.path().join("gnu.tar");
    let status = std::process::Command::new("tar")
        .args(["--format=posix", "--sparse", "--numeric-owner", "-cf"])
        .arg(&tar_path)
        .arg("-C")
        .arg(&src)
        .arg("sparse.bin")
        .status()
        .expect("GNU tar");
    assert!(status.success());
    let tar = fs::read(&tar_path).unwrap();
    assert!(tar.windows(16).any(|w| w == b"GNU.sparse.major"), "GNU tar did not write a PAX sparse entry");
    let root = s.unpack_tar(&tar).unwrap();
    assert!(fs::read(root.join("sparse.bin")).unwrap() == fs::read(&file).unwrap());
    assert_eq!(fs::read_dir(&root).unwrap().count(), 1, "only sparse.bin, no GNUSparseFile.* directory");
}

#[test]
fn hostile_pax_sparse_maps() {
    let size = b"4096";
    type Records<'a> = Vec<(&'a str, &'a [u8])>;
    let cases: Vec<(&str, Records<'_>, &str, Vec<u8>, &str)> = vec![
        (
            "extent past the end",
            vec![("GNU.sparse.size", size), ("GNU.sparse.map", b"4000,512")],
            "",
            vec![1; 512],
            "ends past",
        ),
        (
            "overlapping extents",
            vec![("GNU.sparse.size", size), ("GNU.sparse.map", b"0,512,100,512")],
            "",
            vec![1; 1024],
            "overlaps",
        ),
        ("odd map", vec![("GNU.sparse.size", size), ("GNU.sparse.map", b"0,512,100")], "", vec![1; 512], "pairs"),
        ("no size", vec![("GNU.sparse.map", b"0,512")], "", vec![1; 512], "without the file's size"),
        (
            "more data than the map",
            vec![("GNU.sparse.size", size), ("GNU.sparse.map", b"0,512")],
            "",
            vec![1; 1024],
            "lists 512 bytes of data",
        ),
        (
            "huge extent count",
            vec![("GNU.sparse.major", b"1"), ("GNU.sparse.minor", b"0"), ("GNU.sparse.realsize", size)],
            "99999999999\n",
            vec![],
            "extents; at most",
        ),
        (
            "garbage map",
            vec![("GNU.sparse.major", b"1"), ("GNU.sparse.minor", b"0"), ("GNU.sparse.realsize", size)],
            "1\nzero\n",
            vec![],
            "not decimal numbers",
        ),
        (
            "unknown version",
            vec![("GNU.sparse.major", b"2"), ("GNU.sparse.minor", b"0"), ("GNU.sparse.realsize", size)],
            "",
            vec![],
            "unknown",
        ),
        (
            "escaping real name",
            vec![("GNU.sparse.size", size), ("GNU.sparse.map", b"0,512"), ("GNU.sparse.name", b"../escape")],
            "",
            vec![1; 512],
            "\"..\"",
        ),
    ];
    for (what, records, map, data, expected) in cases {
        let s = Scratch::new();
        let mut l = Layer::new();
        pax_sparse_entry(&mut l, &records, "GNUSparseFile.0/f", map, &data);
        let msg = unpack_error(s.unpack_tar(&l.finish()));
        assert!(msg.contains(expected), "{what}: {msg}");
    }
}

/// A PAX xattr record with an empty value deletes the keyword (POSIX), as Go's archive/tar and so
/// Docker and umoci read it: no xattr, and an earlier record of the same name is undone.
#[test]
fn faithful_empty_pax_xattr_sets_nothing() {
    let s = Scratch::new();
    let mut l = Layer::new();
    l.pax(&[
        ("SCHILY.xattr.user.kept", b"value"),
        ("SCHILY.xattr.user.undone", b"first"),
        ("SCHILY.xattr.user.undone", b""),
        ("SCHILY.xattr.user.empty", b""),
    ]);
    l.add(E { data: b"x", ..e("f", T::Regular) });
    let root = s.unpack_tar(&l.finish()).unwrap();
    assert_eq!(list_xattrs(&root.join("f")), vec![("user.kept".to_string(), b"value".to_vec())]);
}
