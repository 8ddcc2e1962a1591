//! Non-distributable layers (OCI `…layer.nondistributable.v1.tar+gzip`, Docker's `…foreign.diff.tar.gzip`):
//! their descriptor lists URLs, and the registry may or may not hold the blob. One the registry
//! holds is pulled from it, one it does not is fetched from a URL (without credentials), and one
//! nobody serves is a clear error that leaves nothing behind.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use common::{layer, leftovers, noise, sha256, Registry};
use deliverous_images::{CredentialFiles, Error, ImageStore, PullOptions, Reference};
use serde_json::json;

/// Manifest and layer media types of one image format.
#[derive(Clone, Copy, Debug)]
enum Format {
    Oci,
    Docker,
}

impl Format {
    fn manifest(self) -> &'static str {
        match self {
            Format::Oci => "application/vnd.oci.image.manifest.v1+json",
            Format::Docker => "application/vnd.docker.distribution.manifest.v2+json",
        }
    }
    fn config(self) -> &'static str {
        match self {
            Format::Oci => "application/vnd.oci.image.config.v1+json",
            Format::Docker => "application/vnd.docker.container.image.v1+json",
        }
    }
    fn layer(self) -> &'static str {
        match self {
            Format::Oci => "application/vnd.oci.image.layer.v1.tar+gzip",
            Format::Docker => "application/vnd.docker.image.rootfs.diff.tar.gzip",
        }
    }
    fn foreign_layer(self) -> &'static str {
        match self {
            Format::Oci => "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
            Format::Docker => "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
        }
    }
}

/// Serves one blob over plain HTTP on 127.0.0.1, as a vendor's download server would, and counts
/// the requests. Stopped when dropped.
struct BlobServer {
    addr: String,
    requests: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl BlobServer {
    fn start(blob: Vec<u8>) -> BlobServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (requests, stop) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicBool::new(false)));
        let (count, stopped) = (requests.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            for stream in listener.incoming() {
                if stopped.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(mut stream) = stream else { continue };
                // The request line and headers, up to the blank line; any path gets the blob.
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut line = String::new();
                while reader.read_line(&mut line).is_ok_and(|n| n > 0) && line != "\r\n" {
                    line.clear();
                }
                count.fetch_add(1, Ordering::SeqCst);
                let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", blob.len());
                let _ = stream.write_all(head.as_bytes()).and_then(|()| stream.write_all(&blob));
            }
        });
        BlobServer { addr, requests, stop, thread: Some(thread) }
    }
}

impl Drop for BlobServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the accept loop, which then sees the flag.
        let _ = TcpStream::connect(&self.addr);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A URL nothing listens on.
fn dead_url() -> String {
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    format!("http://127.0.0.1:{port}/layers/foreign.tar.gz")
}

/// Uploads `data` as a blob of `repo` (monolithic upload, registry API v2).
async fn upload(client: &reqwest::Client, registry: &str, repo: &str, data: &[u8]) {
    let started = client.post(format!("http://{registry}/v2/{repo}/blobs/uploads/")).send().await.unwrap();
    assert_eq!(started.status(), 202, "starting an upload to {repo}");
    let location = started.headers()["location"].to_str().unwrap().to_string();
    let location = if location.starts_with("http") { location } else { format!("http://{registry}{location}") };
    let separator = if location.contains('?') { '&' } else { '?' };
    let done = client
        .put(format!("{location}{separator}digest={}", sha256(data)))
        .header("content-type", "application/octet-stream")
        .body(data.to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(done.status(), 201, "uploading a blob to {repo}: {}", done.text().await.unwrap_or_default());
}

/// The non-distributable layer's blob (the same bytes every time).
fn foreign_layer() -> Vec<u8> {
    layer(&[("opt/vendor/runtime.bin".into(), noise(31, 300_000))])
}

fn diff_id(gz: &[u8]) -> String {
    let mut tar = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::MultiGzDecoder::new(gz), &mut tar).unwrap();
    sha256(&tar)
}

/// Pushes an image of a regular base layer and the non-distributable [`foreign_layer`] listing
/// `urls`; its blob goes to the registry only with `push_foreign`. Returns the reference.
async fn push_image(
    registry: &Registry,
    repo_tag: &str,
    format: Format,
    urls: &[String],
    push_foreign: bool,
) -> String {
    let client = reqwest::Client::new();
    let (repo, tag) = repo_tag.rsplit_once(':').unwrap();
    let base = layer(&[("etc/os-release".into(), b"ID=test\n".to_vec())]);
    let foreign = foreign_layer();
    let config = serde_json::to_vec(&json!({
        "architecture": common::arch(), "os": "linux",
        "config": {"Cmd": ["/opt/vendor/runtime.bin"]},
        "rootfs": {"type": "layers", "diff_ids": [diff_id(&base), diff_id(&foreign)]},
    }))
    .unwrap();
    upload(&client, registry.addr(), repo, &base).await;
    upload(&client, registry.addr(), repo, &config).await;
    if push_foreign {
        upload(&client, registry.addr(), repo, &foreign).await;
    }
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": format.manifest(),
        "config": {"mediaType": format.config(), "digest": sha256(&config), "size": config.len()},
        "layers": [
            {"mediaType": format.layer(), "digest": sha256(&base), "size": base.len()},
            {"mediaType": format.foreign_layer(), "digest": sha256(&foreign), "size": foreign.len(), "urls": urls},
        ],
    }))
    .unwrap();
    let put = client
        .put(format!("http://{}/v2/{repo}/manifests/{tag}", registry.addr()))
        .header("content-type", format.manifest())
        .body(manifest)
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 201, "pushing the manifest: {}", put.text().await.unwrap_or_default());
    format!("{}/{repo_tag}", registry.addr())
}

fn store(dir: &std::path::Path) -> ImageStore {
    ImageStore::open(dir).unwrap().with_credentials(CredentialFiles::none())
}

#[tokio::test]
async fn nondistributable_layer_in_the_registry_is_pulled_from_it() {
    let registry = Registry::start_allowing_layer_urls();
    for format in [Format::Oci, Format::Docker] {
        // Its URL is dead: the registry's copy is the one used.
        let repo_tag = format!("vendor/{format:?}-pushed:1").to_lowercase();
        let reference = push_image(&registry, &repo_tag, format, &[dead_url()], true).await;
        let data = tempfile::tempdir().unwrap();
        let store = store(data.path());
        let before = registry.blob_gets().get(&sha256(&foreign_layer())).copied().unwrap_or(0);
        let image = store.pull(&Reference::parse(&reference).unwrap(), &PullOptions::default()).await.unwrap();
        let dirs = store.layer_dirs(&image);
        assert_eq!(std::fs::read(dirs[0].join("etc/os-release")).unwrap(), b"ID=test\n", "{format:?}");
        assert_eq!(std::fs::read(dirs[1].join("opt/vendor/runtime.bin")).unwrap(), noise(31, 300_000));
        assert_eq!(registry.blob_gets().get(&sha256(&foreign_layer())), Some(&(before + 1)), "{format:?}");
        assert!(leftovers(data.path()).is_empty(), "{:?}", leftovers(data.path()));
    }
}

#[tokio::test]
async fn nondistributable_layer_not_in_the_registry_comes_from_its_url() {
    let registry = Registry::start_allowing_layer_urls();
    for format in [Format::Oci, Format::Docker] {
        let repo_tag = format!("vendor/{format:?}-url:1").to_lowercase();
        let server = BlobServer::start(foreign_layer());
        // Listed after one that is down: each is tried in turn.
        let urls = [dead_url(), format!("http://{}/layers/runtime.tar.gz", server.addr)];
        let reference = push_image(&registry, &repo_tag, format, &urls, false).await;
        let data = tempfile::tempdir().unwrap();
        let store = store(data.path());
        let image = store.pull(&Reference::parse(&reference).unwrap(), &PullOptions::default()).await.unwrap();
        assert_eq!(image.layers[1], diff_id(&foreign_layer()));
        let dirs = store.layer_dirs(&image);
        assert_eq!(std::fs::read(dirs[1].join("opt/vendor/runtime.bin")).unwrap(), noise(31, 300_000));
        assert_eq!(server.requests.load(Ordering::SeqCst), 1, "{format:?}");
        assert!(leftovers(data.path()).is_empty(), "{:?}", leftovers(data.path()));
    }
}

#[tokio::test]
async fn nondistributable_layer_nobody_serves_is_a_clear_error() {
    let registry = Registry::start_allowing_layer_urls();
    for format in [Format::Oci, Format::Docker] {
        let repo_tag = format!("vendor/{format:?}-missing:1").to_lowercase();
        let url = dead_url();
        let reference = push_image(&registry, &repo_tag, format, std::slice::from_ref(&url), false).await;
        let foreign = foreign_layer();
        let data = tempfile::tempdir().unwrap();
        let store = store(data.path());
        let reference = Reference::parse(&reference).unwrap();
        let err = store.pull(&reference, &PullOptions::default()).await.unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, Error::Registry { .. }), "{format:?}: {msg}");
        assert!(
            msg.contains(&sha256(&foreign)) && msg.contains(format.foreign_layer()) && msg.contains(&url),
            "the message names the layer, its media type and where it was looked for: {msg}"
        );
        assert!(!msg.contains("check the name and tag"), "the image is there, one of its layers is not: {msg}");
        assert!(store.get(&reference).unwrap().is_none());
        let layer = data.path().join("layers").join(&diff_id(&foreign)[7..]);
        assert!(!layer.exists(), "{format:?}: the missing layer is not there");
        assert!(leftovers(data.path()).is_empty(), "{:?}", leftovers(data.path()));
    }
}
