//! Importing image archives without a registry: classic and OCI-format `docker save` tarballs,
//! OCI layout directories and OCI archives, built here by hand (as Docker lays them out) and by
//! skopeo; then corrupt and hostile archives, which must be refused with nothing kept.

mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use common::{arch, layer, leftovers, put_blob, sha256, skopeo_copy, tar_dir, write_image_blobs, write_layout};
use deliverous_images::{CredentialFiles, Error, Image, ImageStore, ImportOptions, Reference};
use serde_json::json;

struct Fixture {
    dir: tempfile::TempDir,
    store: ImageStore,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::Builder::new().prefix("images-import-").tempdir().unwrap();
        let store = ImageStore::open(dir.path().join("data")).unwrap().with_credentials(CredentialFiles::none());
        Fixture { dir, store }
    }

    /// Writes `bytes` as a file in the fixture's scratch space.
    fn file(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    }

    async fn import(&self, path: &Path, name: Option<&str>) -> Result<Vec<Image>, Error> {
        let opts = ImportOptions { reference: name.map(|n| Reference::parse(n).unwrap()) };
        self.store.import(path, &opts).await
    }

    fn get(&self, reference: &str) -> Image {
        self.store
            .get(&Reference::parse(reference).unwrap())
            .unwrap()
            .unwrap_or_else(|| panic!("{reference} is not in the store: {:?}", self.store.list().unwrap()))
    }

    /// The contents of `path` in the image's layers, top layer first, as overlay would show it
    /// (enough for these tests: no whiteouts).
    fn read(&self, image: &Image, path: &str) -> Vec<u8> {
        for dir in self.store.layer_dirs(image).iter().rev() {
            if let Ok(data) = std::fs::read(dir.join(path)) {
                return data;
            }
        }
        panic!("{path} is in no layer of {}", image.reference);
    }

    /// After a refused import: no layer, no record, no temporary file or lock.
    fn assert_nothing_kept(&self) {
        let data = self.dir.path().join("data");
        for sub in ["layers", "images"] {
            let names: Vec<_> = std::fs::read_dir(data.join(sub)).unwrap().map(|e| e.unwrap().file_name()).collect();
            assert!(names.is_empty(), "{sub}/ keeps {names:?}");
        }
        assert!(leftovers(&data).is_empty(), "leftovers: {:?}", leftovers(&data));
        assert!(self.store.list().unwrap().is_empty());
    }
}

/// A plain tar layer with the given files.
fn plain_layer(files: &[(&str, &[u8])]) -> Vec<u8> {
    let gz = layer(&files.iter().map(|(p, d)| (p.to_string(), d.to_vec())).collect::<Vec<_>>());
    gunzip(&gz)
}

fn gunzip(gz: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::MultiGzDecoder::new(gz).read_to_end(&mut out).unwrap();
    out
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(data).unwrap();
    gz.finish().unwrap()
}

/// A tar member: a file, or a symlink to another member.
#[derive(Clone)]
enum M {
    File(Vec<u8>),
    Symlink(String),
}

type Members = Vec<(String, M)>;

/// A tar written header by header, so member names can be what a hostile archive would use
/// (`../x`, `/etc/x`), which `tar::Builder`'s helpers refuse.
fn raw_tar(members: &[(String, M)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, m) in members {
        let mut h = tar::Header::new_ustar();
        let field = &mut h.as_old_mut().name;
        assert!(name.len() < field.len(), "test member name too long");
        field[..name.len()].copy_from_slice(name.as_bytes());
        h.set_mode(0o644);
        h.set_mtime(1_700_000_000);
        let data: &[u8] = match m {
            M::File(data) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_size(data.len() as u64);
                data
            }
            M::Symlink(target) => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_size(0);
                h.as_old_mut().linkname[..target.len()].copy_from_slice(target.as_bytes());
                &[]
            }
        };
        h.set_cksum();
        b.append(&h, data).unwrap();
    }
    b.into_inner().unwrap()
}

/// One image of a classic `docker save` archive.
struct Saved {
    /// Layer files as stored (plain or gzip tars), bottom first.
    layers: Vec<Vec<u8>>,
    /// Diff_ids the config declares; `None`: the right ones.
    diff_ids: Option<Vec<String>>,
    repo_tags: Option<Vec<String>>,
}

fn config_json(diff_ids: &[String], cmd: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "architecture": arch(), "os": "linux",
        "config": {"Cmd": [cmd], "Env": ["PATH=/bin"], "WorkingDir": "/srv"},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }))
    .unwrap()
}

/// The members of a classic `docker save` archive, in Docker's order: a directory per layer
/// (`<id>/layer.tar`, `VERSION`, `json`), the configs (`<hex>.json`), `manifest.json` and
/// `repositories`. A layer stored twice becomes a symlink to its first copy, as Docker does.
fn docker_save(images: &[Saved]) -> Vec<(String, M)> {
    let mut members = Vec::new();
    let mut manifest = Vec::new();
    let mut seen: Vec<(Vec<u8>, String)> = Vec::new();
    for (n, img) in images.iter().enumerate() {
        let mut layer_names = Vec::new();
        let mut diff_ids = Vec::new();
        for (i, data) in img.layers.iter().enumerate() {
            let plain = if data.starts_with(&[0x1f, 0x8b]) { gunzip(data) } else { data.clone() };
            diff_ids.push(sha256(&plain));
            let id = &sha256(format!("v1 id {n} {i}").as_bytes())[7..];
            let name = format!("{id}/layer.tar");
            match seen.iter().find(|(d, _)| d == data) {
                Some((_, first)) => members.push((name.clone(), M::Symlink(format!("../{first}")))),
                None => {
                    members.push((name.clone(), M::File(data.clone())));
                    seen.push((data.clone(), name.clone()));
                }
            }
            members.push((format!("{id}/VERSION"), M::File(b"1.0".to_vec())));
            members.push((format!("{id}/json"), M::File(format!("{{\"id\":\"{id}\"}}").into_bytes())));
            layer_names.push(name);
        }
        let config = config_json(img.diff_ids.as_ref().unwrap_or(&diff_ids), &format!("/bin/app{n}"));
        let config_name = format!("{}.json", &sha256(&config)[7..]);
        members.push((config_name.clone(), M::File(config)));
        manifest.push(json!({"Config": config_name, "RepoTags": img.repo_tags, "Layers": layer_names}));
    }
    members.push(("manifest.json".into(), M::File(serde_json::to_vec(&manifest).unwrap())));
    members.push(("repositories".into(), M::File(b"{}".to_vec())));
    members
}

fn invalid_archive(r: Result<Vec<Image>, Error>) -> String {
    match r {
        Err(e @ Error::InvalidArchive { .. }) => {
            assert!(e.is_user_error());
            e.to_string()
        }
        Err(e) => panic!("expected InvalidArchive, got {e:?}"),
        Ok(images) => panic!("import succeeded: {images:?}"),
    }
}

fn two_layers() -> (Vec<u8>, Vec<u8>) {
    (
        plain_layer(&[("etc/os-release", b"NAME=test\n"), ("bin/app", b"#!/bin/sh\necho base\n")]),
        gzip(&plain_layer(&[("srv/data.txt", b"top layer\n"), ("bin/app", b"#!/bin/sh\necho top\n")])),
    )
}

#[tokio::test]
async fn docker_save_classic_plain_gzip_and_shared_layers() {
    let f = Fixture::new();
    let (base, top) = two_layers();
    let other_top = plain_layer(&[("srv/other", b"other\n")]);
    let members = docker_save(&[
        Saved {
            layers: vec![base.clone(), top.clone()],
            diff_ids: None,
            repo_tags: Some(vec!["busybox:1".into(), "registry.local:5000/team/app:2".into()]),
        },
        // Shares the base layer, stored once (the second copy is a symlink).
        Saved { layers: vec![base.clone(), other_top], diff_ids: None, repo_tags: Some(vec!["other:3".into()]) },
    ]);
    assert!(matches!(members.iter().filter(|(_, m)| matches!(m, M::Symlink(_))).count(), 1));
    let path = f.file("save.tar", &raw_tar(&members));

    let images = f.import(&path, None).await.unwrap();
    let mut names: Vec<_> = images.iter().map(|i| i.reference.as_str()).collect();
    names.sort();
    assert_eq!(names, ["docker.io/library/busybox:1", "docker.io/library/other:3", "registry.local:5000/team/app:2"]);

    let busybox = f.get("busybox:1");
    let config_digest = sha256(&config_json(&[sha256(&base), sha256(&gunzip(&top))], "/bin/app0"));
    assert_eq!(busybox.digest, config_digest, "a classic docker save image is known by its config digest");
    assert_eq!(busybox.layers, vec![sha256(&base), sha256(&gunzip(&top))]);
    assert_eq!(busybox.config.cmd, vec!["/bin/app0".to_string()]);
    assert_eq!(busybox.config.working_dir.as_deref(), Some("/srv"));
    assert_eq!(busybox.size, (base.len() + top.len()) as u64);
    assert_eq!(f.read(&busybox, "bin/app"), b"#!/bin/sh\necho top\n");
    assert_eq!(f.read(&busybox, "etc/os-release"), b"NAME=test\n");
    assert_eq!(f.get("registry.local:5000/team/app:2").digest, config_digest);
    let other = f.get("other:3");
    assert_eq!(f.store.layer_dirs(&other)[0], f.store.layer_dirs(&busybox)[0]);
    assert_eq!(f.read(&other, "srv/other"), b"other\n");
    assert!(f.store.blob_path(&config_digest).unwrap().is_file(), "the config blob is kept");
    assert!(leftovers(&f.dir.path().join("data")).is_empty());

    // Importing again changes nothing and succeeds.
    assert_eq!(f.import(&path, None).await.unwrap().len(), 3);
}

#[tokio::test]
async fn docker_save_written_by_skopeo() {
    let f = Fixture::new();
    let layout = f.dir.path().join("layout");
    let l1 = layer(&[("usr/bin/tool".into(), b"tool v1".to_vec())]);
    let l2 = layer(&[("etc/config".into(), b"key=value".to_vec())]);
    let written = write_layout(&layout, &[l1, l2], Some("1"));
    let archive = f.dir.path().join("docker.tar");
    skopeo_copy(&format!("oci:{}:1", layout.display()), &format!("docker-archive:{}:demo/app:1", archive.display()));

    let images = f.import(&archive, None).await.unwrap();
    assert_eq!(images.len(), 1);
    let image = f.get("demo/app:1");
    assert_eq!(image.reference, "docker.io/demo/app:1");
    assert_eq!(image.layers, written.diff_ids);
    assert_eq!(image.config.cmd, vec!["/bin/sh".to_string()]);
    assert_eq!(f.read(&image, "usr/bin/tool"), b"tool v1");
    assert_eq!(f.read(&image, "etc/config"), b"key=value");
}

#[tokio::test]
async fn docker_save_oci_format() {
    // Docker 25+: an OCI layout inside the tar (uncompressed layers under blobs/sha256), named
    // by io.containerd.image.name, plus a manifest.json pointing into blobs/ for older readers.
    let f = Fixture::new();
    let layout = f.dir.path().join("layout");
    let (base, top) = two_layers();
    let top = gunzip(&top);
    let (base_digest, top_digest) = (put_blob(&layout, &base), put_blob(&layout, &top));
    let config = config_json(&[base_digest.clone(), top_digest.clone()], "/bin/app");
    let config_digest = put_blob(&layout, &config);
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config.len()},
        "layers": [
            {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": base_digest, "size": base.len()},
            {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": top_digest, "size": top.len()},
        ],
    }))
    .unwrap();
    let manifest_digest = put_blob(&layout, &manifest);
    std::fs::write(
        layout.join("index.json"),
        serde_json::to_vec(&json!({"schemaVersion": 2, "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": manifest_digest, "size": manifest.len(),
            "annotations": {"io.containerd.image.name": "docker.io/library/app:3", "org.opencontainers.image.ref.name": "3"},
        }]}))
        .unwrap(),
    )
    .unwrap();
    std::fs::write(layout.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let blob = |d: &str| format!("blobs/sha256/{}", &d[7..]);
    std::fs::write(
        layout.join("manifest.json"),
        serde_json::to_vec(&json!([{
            "Config": blob(&config_digest), "RepoTags": ["app:3", "mirror.example/app:3"],
            "Layers": [blob(&base_digest), blob(&top_digest)],
        }]))
        .unwrap(),
    )
    .unwrap();
    let path = f.file("docker25.tar", &tar_dir(&layout));

    let images = f.import(&path, None).await.unwrap();
    let mut names: Vec<_> = images.iter().map(|i| i.reference.clone()).collect();
    names.sort();
    assert_eq!(names, ["docker.io/library/app:3", "mirror.example/app:3"]);
    let image = f.get("app:3");
    assert_eq!(image.digest, manifest_digest, "an OCI-format archive is known by its manifest digest");
    assert_eq!(f.read(&image, "srv/data.txt"), b"top layer\n");
    assert_eq!(f.read(&image, "bin/app"), b"#!/bin/sh\necho top\n");
}

#[tokio::test]
async fn oci_layout_directory() {
    let f = Fixture::new();
    let layout = f.dir.path().join("layout");
    let written = write_layout(
        &layout,
        &[layer(&[("a/b/c.txt".into(), b"deep".to_vec())]), layer(&[("a/top".into(), b"top".to_vec())])],
        Some("example.com/team/web:1.2"),
    );
    let images = f.import(&layout, None).await.unwrap();
    assert_eq!(images.len(), 1);
    let image = f.get("example.com/team/web:1.2");
    assert_eq!(image.digest, written.manifest_digest);
    assert_eq!(image.layers, written.diff_ids);
    assert_eq!(f.read(&image, "a/b/c.txt"), b"deep");
    assert_eq!(f.read(&image, "a/top"), b"top");
    // Found by digest too, as a pulled image is.
    f.get(&format!("example.com/team/web@{}", written.manifest_digest));
    // A layout's blobs are read, not moved.
    assert!(layout.join("blobs/sha256").join(&written.layer_digests[0][7..]).is_file());
}

#[tokio::test]
async fn oci_archive_written_by_skopeo() {
    let f = Fixture::new();
    let layout = f.dir.path().join("layout");
    let written = write_layout(&layout, &[layer(&[("hello".into(), b"world".to_vec())])], Some("1"));
    let archive = f.dir.path().join("oci.tar");
    skopeo_copy(&format!("oci:{}:1", layout.display()), &format!("oci-archive:{}:busybox:1", archive.display()));
    f.import(&archive, None).await.unwrap();
    let image = f.get("docker.io/library/busybox:1");
    assert_eq!(image.digest, written.manifest_digest);
    assert_eq!(f.read(&image, "hello"), b"world");

    // The same layout tarred by hand, its entry named only by a tag: a name must be given.
    let g = Fixture::new();
    let path = g.file("tagged.tar", &tar_dir(&layout));
    let message = invalid_archive(g.import(&path, None).await);
    assert!(message.contains("only by tag (1)") && message.contains("give a name"), "{message}");
    g.assert_nothing_kept();
    let images = g.import(&path, Some("myapp:1.0")).await.unwrap();
    assert_eq!(images[0].reference, "docker.io/library/myapp:1.0");
    assert_eq!(g.read(&g.get("myapp:1.0"), "hello"), b"world");
}

/// An index.json whose entry is a multi-platform index: this host's manifest and one for
/// another architecture (or only the other one).
fn multi_platform_layout(dir: &Path, with_host: bool) -> (String, String) {
    let other_arch = if arch() == "arm64" { "amd64" } else { "arm64" };
    let host = write_image_blobs(dir, &[layer(&[("which".into(), b"host".to_vec())])], None);
    let other = write_image_blobs(dir, &[layer(&[("which".into(), b"other".to_vec())])], Some(("linux", other_arch)));
    let size = |d: &str| std::fs::metadata(dir.join("blobs/sha256").join(&d[7..])).unwrap().len();
    let mut manifests = vec![json!({
        "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": other.manifest_digest,
        "size": size(&other.manifest_digest), "platform": {"os": "linux", "architecture": other_arch},
    })];
    if with_host {
        manifests.push(json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": host.manifest_digest,
            "size": size(&host.manifest_digest), "platform": {"os": "linux", "architecture": arch()},
        }));
    }
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": manifests,
    }))
    .unwrap();
    let index_digest = put_blob(dir, &index);
    std::fs::write(
        dir.join("index.json"),
        serde_json::to_vec(&json!({"schemaVersion": 2, "manifests": [{
            "mediaType": "application/vnd.oci.image.index.v1+json", "digest": index_digest, "size": index.len(),
            "annotations": {"org.opencontainers.image.ref.name": "example.com/multi:1"},
        }]}))
        .unwrap(),
    )
    .unwrap();
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    (host.manifest_digest, other.manifest_digest)
}

#[tokio::test]
async fn oci_index_selects_this_host_platform() {
    let f = Fixture::new();
    let layout = f.dir.path().join("layout");
    let (host, _) = multi_platform_layout(&layout, true);
    f.import(&layout, None).await.unwrap();
    let image = f.get("example.com/multi:1");
    assert_eq!(image.digest, host);
    assert_eq!(f.read(&image, "which"), b"host");

    let g = Fixture::new();
    let layout = g.dir.path().join("layout");
    multi_platform_layout(&layout, false);
    match g.import(&layout, None).await {
        Err(e @ Error::NoMatchingPlatform { .. }) => {
            let message = e.to_string();
            assert!(message.contains(&format!("linux/{}", arch())), "{message}");
        }
        other => panic!("expected NoMatchingPlatform, got {other:?}"),
    }
    g.assert_nothing_kept();
}

#[tokio::test]
async fn corrupt_wrong_diff_id() {
    let f = Fixture::new();
    let (base, top) = two_layers();
    // The first layer is right, the second's diff_id is not: neither may be kept.
    let members = docker_save(&[Saved {
        layers: vec![base.clone(), top],
        diff_ids: Some(vec![sha256(&base), sha256(b"something else")]),
        repo_tags: Some(vec!["app:1".into()]),
    }]);
    let path = f.file("bad.tar", &raw_tar(&members));
    let message = invalid_archive(f.import(&path, None).await);
    assert!(message.contains(&format!("expected digest {}", sha256(b"something else"))), "{message}");
    f.assert_nothing_kept();
}

#[tokio::test]
async fn corrupt_layer_blob_digest() {
    let f = Fixture::new();
    let layout = f.dir.path().join("layout");
    let written = write_layout(&layout, &[layer(&[("x".into(), b"data".to_vec())])], Some("example.com/x:1"));
    // Rewritten with the same length and still valid gzip, but not the blob the manifest names.
    let blob = layout.join("blobs/sha256").join(&written.layer_digests[0][7..]);
    let mut bytes = std::fs::read(&blob).unwrap();
    bytes[4] ^= 0xff; // gzip header MTIME field: ignored by decoders, covered by the digest
    std::fs::write(&blob, &bytes).unwrap();
    let message = invalid_archive(f.import(&layout, None).await);
    assert!(message.contains(&format!("expected digest {}", written.layer_digests[0])), "{message}");
    f.assert_nothing_kept();
}

#[tokio::test]
async fn corrupt_truncated_archive() {
    let f = Fixture::new();
    let (base, top) = two_layers();
    let tar = raw_tar(&docker_save(&[Saved {
        layers: vec![base, top],
        diff_ids: None,
        repo_tags: Some(vec!["app:1".into()]),
    }]));
    // Cut inside the first layer's data (it starts after the first 512-byte header).
    let path = f.file("truncated.tar", &tar[..1024]);
    let message = invalid_archive(f.import(&path, None).await);
    assert!(message.contains("truncated"), "{message}");
    f.assert_nothing_kept();

    // Cut at the end of the tar's data, before manifest.json: the archive is incomplete.
    let path = f.file("short.tar", &tar[..tar.len() / 2 / 512 * 512]);
    let message = invalid_archive(f.import(&path, None).await);
    assert!(message.contains("truncated") || message.contains("neither index.json"), "{message}");
    f.assert_nothing_kept();
}

#[tokio::test]
async fn hostile_member_names() {
    let (base, _) = two_layers();
    let good = docker_save(&[Saved { layers: vec![base], diff_ids: None, repo_tags: Some(vec!["app:1".into()]) }]);
    let cases: Vec<(&str, Members, &str)> = vec![
        ("dot-dot member", vec![("../x".into(), M::File(b"escape".to_vec()))], "\"..\""),
        ("nested dot-dot member", vec![("a/../../x".into(), M::File(b"escape".to_vec()))], "\"..\""),
        ("absolute member", vec![("/tmp/x".into(), M::File(b"escape".to_vec()))], "absolute"),
        ("escaping symlink", vec![("evil".into(), M::Symlink("../../etc/passwd".into()))], "leaves the archive"),
    ];
    for (what, extra, expected) in cases {
        let f = Fixture::new();
        let mut members = extra;
        members.extend(good.iter().cloned());
        let path = f.file("hostile.tar", &raw_tar(&members));
        let message = invalid_archive(f.import(&path, None).await);
        assert!(message.contains(expected), "{what}: {message}");
        assert!(!f.dir.path().join("x").exists() && !Path::new("/tmp/x").exists(), "{what}");
        f.assert_nothing_kept();
    }

    // manifest.json pointing outside the archive.
    let f = Fixture::new();
    let mut members = good;
    let manifest =
        serde_json::to_vec(&json!([{"Config": "../../etc/passwd", "RepoTags": ["app:1"], "Layers": []}])).unwrap();
    let last = members.iter_mut().find(|(n, _)| n == "manifest.json").unwrap();
    last.1 = M::File(manifest);
    let path = f.file("hostile-manifest.tar", &raw_tar(&members));
    let message = invalid_archive(f.import(&path, None).await);
    assert!(message.contains("\"..\""), "{message}");
    f.assert_nothing_kept();
}

#[tokio::test]
async fn hostile_layer_contents() {
    // The archive is well-formed; a layer in it tries to escape: the unpacker refuses it.
    let f = Fixture::new();
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_ustar();
    h.as_old_mut().name[..15].copy_from_slice(b"../../escape.sh");
    h.set_entry_type(tar::EntryType::Regular);
    h.set_size(4);
    h.set_mode(0o755);
    h.set_cksum();
    b.append(&h, &b"evil"[..]).unwrap();
    let evil = b.into_inner().unwrap();
    let members = docker_save(&[Saved { layers: vec![evil], diff_ids: None, repo_tags: Some(vec!["app:1".into()]) }]);
    let path = f.file("evil-layer.tar", &raw_tar(&members));
    let message = invalid_archive(f.import(&path, None).await);
    assert!(message.contains("contains \"..\""), "{message}");
    assert!(!f.dir.path().join("escape.sh").exists());
    f.assert_nothing_kept();
}

#[tokio::test]
async fn corrupt_missing_config() {
    let f = Fixture::new();
    let (base, _) = two_layers();
    let members: Vec<_> =
        docker_save(&[Saved { layers: vec![base], diff_ids: None, repo_tags: Some(vec!["app:1".into()]) }])
            .into_iter()
            .filter(|(n, _)| !(n.ends_with(".json") && n != "manifest.json"))
            .collect();
    let path = f.file("no-config.tar", &raw_tar(&members));
    let message = invalid_archive(f.import(&path, None).await);
    assert!(message.contains(".json\" is missing from the archive"), "{message}");
    f.assert_nothing_kept();

    // An OCI layout whose config blob is gone.
    let g = Fixture::new();
    let layout = g.dir.path().join("layout");
    let written = write_layout(&layout, &[layer(&[("x".into(), b"x".to_vec())])], Some("example.com/x:1"));
    std::fs::remove_file(layout.join("blobs/sha256").join(&written.config_digest[7..])).unwrap();
    let message = invalid_archive(g.import(&layout, None).await);
    assert!(message.contains("missing"), "{message}");
    g.assert_nothing_kept();
}

#[tokio::test]
async fn names_and_formats_refused_clearly() {
    let (base, _) = two_layers();
    let unnamed = raw_tar(&docker_save(&[Saved { layers: vec![base.clone()], diff_ids: None, repo_tags: None }]));

    // No name in the archive, none given.
    let f = Fixture::new();
    let path = f.file("unnamed.tar", &unnamed);
    let message = invalid_archive(f.import(&path, None).await);
    assert!(message.contains("gives the image no name") && message.contains("give a name"), "{message}");
    f.assert_nothing_kept();
    // Given one: recorded under it.
    let images = f.import(&path, Some("local/app:7")).await.unwrap();
    assert_eq!(images[0].reference, "docker.io/local/app:7");

    // A name for an archive with two images.
    let g = Fixture::new();
    let two = raw_tar(&docker_save(&[
        Saved { layers: vec![base.clone()], diff_ids: None, repo_tags: Some(vec!["a:1".into()]) },
        Saved { layers: vec![plain_layer(&[("b", b"b")])], diff_ids: None, repo_tags: Some(vec!["b:1".into()]) },
    ]));
    let path = g.file("two.tar", &two);
    let message = invalid_archive(g.import(&path, Some("x:1")).await);
    assert!(message.contains("holds 2 images"), "{message}");
    g.assert_nothing_kept();

    // A compressed archive, garbage, an empty directory.
    let path = g.file("save.tar.gz", &gzip(&two));
    let message = invalid_archive(g.import(&path, None).await);
    assert!(message.contains("gzip-compressed") && message.contains("gunzip"), "{message}");
    let path = g.file("garbage.tar", &common::noise(7, 4096));
    invalid_archive(g.import(&path, None).await);
    let empty = g.dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let message = invalid_archive(g.import(&empty, None).await);
    assert!(message.contains("neither index.json"), "{message}");
    g.assert_nothing_kept();

    // A path that does not exist is not the archive's fault.
    assert!(matches!(g.import(&g.dir.path().join("nope.tar"), None).await, Err(Error::Io { .. })));
}
