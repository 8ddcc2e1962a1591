//! Test fixtures for pulls against a real registry: Debian's `docker-registry` on a free
//! loopback port (optionally behind htpasswd), and OCI images built here and pushed to it with
//! `skopeo copy`. Each fixture removes what it made when dropped.
#![allow(dead_code)] // Each test file uses part of it.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use flate2::write::GzEncoder;
use serde_json::json;
use sha2::{Digest, Sha256};

const REGISTRY: &str = "/usr/bin/docker-registry";

/// A throw-away registry storing into a temp dir, with its access log kept for counting requests.
pub struct Registry {
    child: Child,
    addr: String,
    log: PathBuf,
    // Dropped after the process is gone (see Drop).
    dir: tempfile::TempDir,
}

impl Registry {
    /// Starts a registry; with `user` set, every request needs that user name and password
    /// (htpasswd, bcrypt). Waits until `GET /v2/` answers.
    pub fn start(user: Option<(&str, &str)>) -> Registry {
        Registry::start_with(user, "")
    }

    /// A registry that also accepts manifests whose layers list URLs on 127.0.0.1
    /// (non-distributable layers), which it refuses by default.
    pub fn start_allowing_layer_urls() -> Registry {
        Registry::start_with(
            None,
            "validation:\n  manifests:\n    urls:\n      allow:\n        - '^http://127\\.0\\.0\\.1:'\n",
        )
    }

    /// [`Registry::start`], with `extra` (top-level YAML sections) appended to its configuration.
    fn start_with(user: Option<(&str, &str)>, extra: &str) -> Registry {
        assert!(Path::new(REGISTRY).exists(), "{REGISTRY} is missing: apt-get install docker-registry");
        let dir = tempfile::Builder::new().prefix("images-registry-").tempdir().expect("registry temp dir");
        let log = dir.path().join("registry.log");
        let auth = match user {
            Some((name, password)) => {
                let hash = bcrypt::hash(password, 4).expect("bcrypt");
                let htpasswd = dir.path().join("htpasswd");
                std::fs::write(&htpasswd, format!("{name}:{hash}\n")).expect("write htpasswd");
                format!("auth:\n  htpasswd:\n    realm: test-registry\n    path: {}\n", htpasswd.display())
            }
            None => String::new(),
        };
        let mut last_error = String::new();
        for _attempt in 0..5 {
            let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
            let addr = format!("127.0.0.1:{port}");
            let config = dir.path().join("config.yml");
            std::fs::write(
                &config,
                format!(
                    "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: false\n\
                     storage:\n  filesystem:\n    rootdirectory: {}\n\
                     http:\n  addr: {addr}\n  secret: images-tests\n{auth}{extra}",
                    dir.path().join("storage").display()
                ),
            )
            .expect("write registry config");
            let logfile = std::fs::OpenOptions::new().create(true).append(true).open(&log).expect("open log");
            let mut child = Command::new(REGISTRY)
                .arg("serve")
                .arg(&config)
                .stdin(Stdio::null())
                .stdout(logfile.try_clone().expect("dup log"))
                .stderr(logfile)
                .spawn()
                .expect("spawn docker-registry");
            match wait_ready(&mut child, &addr) {
                Ok(()) => return Registry { child, addr, log, dir },
                Err(e) => {
                    last_error = e;
                    let _ = child.kill();
                    let _ = child.wait();
                }
            }
        }
        panic!("docker-registry did not come up: {last_error}\n{}", std::fs::read_to_string(&log).unwrap_or_default());
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// How many times each blob (`sha256:…`) was fetched (`GET …/blobs/…` answered 200, or 206
    /// to a range from byte 0, as pulls ask), whatever the repository. Waits briefly for the log
    /// to catch up with finished requests.
    pub fn blob_gets(&self) -> HashMap<String, usize> {
        std::thread::sleep(Duration::from_millis(300));
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let mut counts = HashMap::new();
        for line in text.lines() {
            // 127.0.0.1 - - [date] "GET /v2/demo/a/blobs/sha256:… HTTP/1.1" 200 123 "" "ua"
            let Some((_, request)) = line.split_once("\"GET /v2/") else { continue };
            let Some((path, rest)) = request.split_once(" HTTP/") else { continue };
            let Some((_, digest)) = path.split_once("/blobs/") else { continue };
            if rest.split_once("\" ").is_some_and(|(_, status)| status.starts_with("200") || status.starts_with("206"))
            {
                *counts.entry(digest.to_string()).or_insert(0) += 1;
            }
        }
        counts
    }

    /// The registry's storage root (its filesystem driver's `rootdirectory`).
    pub fn storage(&self) -> PathBuf {
        self.dir.path().join("storage")
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        // Only the process this fixture started.
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- registry {} log ---\n{}", self.addr, self.log_tail());
        }
    }
}

fn wait_ready(child: &mut Child, addr: &str) -> Result<(), String> {
    use std::io::Write;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("docker-registry exited with {status}"));
        }
        // Any HTTP answer (200, or 401 behind htpasswd) means it is serving.
        let answered = std::net::TcpStream::connect(addr).ok().and_then(|mut s| {
            s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
            s.write_all(format!("GET /v2/ HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes()).ok()?;
            let mut buf = [0u8; 12];
            s.read_exact(&mut buf).ok()?;
            buf.starts_with(b"HTTP/").then_some(())
        });
        if answered.is_some() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!("{addr} did not answer GET /v2/ within 15 s"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Deterministic pseudo-random bytes (xorshift), so layers are reproducible and hardly compress.
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Text-like bytes that compress about 3:1, as binaries and libraries do.
pub fn compressible(seed: u64, len: usize) -> Vec<u8> {
    let words: Vec<Vec<u8>> = (0..64).map(|i| noise(seed ^ (i + 1), 4 + (i as usize % 9))).collect();
    let picks = noise(seed.rotate_left(17), len / 4 + 1);
    let mut out = Vec::with_capacity(len + 16);
    let mut i = 0;
    while out.len() < len {
        out.extend_from_slice(&words[usize::from(picks[i % picks.len()]) % 64]);
        out.push(b' ');
        i += 1;
    }
    out.truncate(len);
    out
}

/// A gzip tar layer: regular files at the given paths (directories implied), fixed metadata.
pub fn layer(files: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut tar = tar::Builder::new(Vec::new());
    let mut dirs = std::collections::BTreeSet::new();
    for (path, data) in files {
        let mut parent = Path::new(path).parent();
        let mut missing = Vec::new();
        while let Some(p) = parent.filter(|p| !p.as_os_str().is_empty()) {
            if dirs.insert(p.to_path_buf()) {
                missing.push(p.to_path_buf());
            }
            parent = p.parent();
        }
        for dir in missing.into_iter().rev() {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::Directory);
            h.set_mode(0o755);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(1_700_000_000);
            h.set_size(0);
            tar.append_data(&mut h, format!("{}/", dir.display()), std::io::empty()).unwrap();
        }
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        h.set_size(data.len() as u64);
        tar.append_data(&mut h, path, data.as_slice()).unwrap();
    }
    let tar = tar.into_inner().unwrap();
    let mut gz = GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, &tar).unwrap();
    gz.finish().unwrap()
}

/// What was pushed.
#[derive(Clone, Debug)]
pub struct Pushed {
    /// `127.0.0.1:PORT/repo:tag`.
    pub reference: String,
    /// `sha256:…` of each compressed layer, bottom first.
    pub layer_digests: Vec<String>,
    pub config_digest: String,
}

pub fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// Writes an OCI layout with `layers` (gzip tars, bottom first) and pushes it to
/// `registry/repo_tag` with skopeo, as `creds` (`user:password`) if given.
pub fn push(registry: &Registry, repo_tag: &str, layers: &[Vec<u8>], creds: Option<&str>) -> Pushed {
    push_to(registry.addr(), repo_tag, layers, creds)
}

/// An OCI image layout written by [`write_layout`].
#[derive(Clone, Debug)]
pub struct Layout {
    /// `sha256:…` of the image manifest.
    pub manifest_digest: String,
    /// `sha256:…` of each compressed layer, bottom first.
    pub layer_digests: Vec<String>,
    /// `sha256:…` of each uncompressed layer, bottom first.
    pub diff_ids: Vec<String>,
    pub config_digest: String,
}

/// Writes `data` as `blobs/sha256/<hex>` of the layout at `dir`; returns its digest.
pub fn put_blob(dir: &Path, data: &[u8]) -> String {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let digest = sha256(data);
    std::fs::write(blobs.join(&digest[7..]), data).unwrap();
    digest
}

/// Writes the blobs of an image (`layers`: gzip tars, bottom first) into the OCI layout at `dir`
/// (manifest, config, layers) without touching `index.json`. `platform` is `(os, arch)` for the
/// config (default: this host's).
pub fn write_image_blobs(dir: &Path, layers: &[Vec<u8>], platform: Option<(&str, &str)>) -> Layout {
    let mut diff_ids = Vec::new();
    let mut descriptors = Vec::new();
    let mut layer_digests = Vec::new();
    for l in layers {
        let mut tar = Vec::new();
        flate2::read::MultiGzDecoder::new(l.as_slice()).read_to_end(&mut tar).unwrap();
        diff_ids.push(sha256(&tar));
        let digest = put_blob(dir, l);
        descriptors.push(json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": digest, "size": l.len()
        }));
        layer_digests.push(digest);
    }
    let (os, architecture) = platform.unwrap_or(("linux", arch()));
    let config = serde_json::to_vec(&json!({
        "architecture": architecture, "os": os,
        "config": {"Cmd": ["/bin/sh"], "Env": ["PATH=/bin"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }))
    .unwrap();
    let config_digest = put_blob(dir, &config);
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config.len()},
        "layers": descriptors,
    }))
    .unwrap();
    let manifest_digest = put_blob(dir, &manifest);
    Layout { manifest_digest, layer_digests, diff_ids, config_digest }
}

/// Writes an OCI image layout at `dir` holding one image (`layers`: gzip tars, bottom first),
/// its index entry annotated with `org.opencontainers.image.ref.name` = `ref_name` if given.
pub fn write_layout(dir: &Path, layers: &[Vec<u8>], ref_name: Option<&str>) -> Layout {
    let layout = write_image_blobs(dir, layers, None);
    let size = std::fs::metadata(dir.join("blobs/sha256").join(&layout.manifest_digest[7..])).unwrap().len();
    let mut entry = json!({
        "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": layout.manifest_digest, "size": size,
    });
    if let Some(name) = ref_name {
        entry["annotations"] = json!({"org.opencontainers.image.ref.name": name});
    }
    std::fs::write(
        dir.join("index.json"),
        serde_json::to_vec(&json!({"schemaVersion": 2, "manifests": [entry]})).unwrap(),
    )
    .unwrap();
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    layout
}

/// [`push`] to a registry at `addr` (`127.0.0.1:PORT`) that this process did not start.
pub fn push_to(addr: &str, repo_tag: &str, layers: &[Vec<u8>], creds: Option<&str>) -> Pushed {
    let layout = tempfile::tempdir().unwrap();
    let (repo, tag) = repo_tag.rsplit_once(':').expect("repo:tag");
    let written = write_layout(layout.path(), layers, Some(tag));

    let src = format!("oci:{}:{tag}", layout.path().display());
    let dest = format!("docker://{addr}/{repo}:{tag}");
    let mut cmd = Command::new("skopeo");
    cmd.args(["--insecure-policy", "copy", "--quiet", "--dest-tls-verify=false"]);
    if let Some(creds) = creds {
        cmd.args(["--dest-creds", creds]);
    }
    let out = run(cmd.arg(&src).arg(&dest), Duration::from_secs(180));
    assert!(
        out.status.success(),
        "skopeo copy {src} {dest} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Pushed {
        reference: format!("{addr}/{repo_tag}"),
        layer_digests: written.layer_digests,
        config_digest: written.config_digest,
    }
}

/// Runs `skopeo copy SRC DEST` (no signature policy), panicking with its output if it fails.
pub fn skopeo_copy(src: &str, dest: &str) {
    let mut cmd = Command::new("skopeo");
    cmd.args(["--insecure-policy", "copy", "--quiet"]);
    let out = run(cmd.arg(src).arg(dest), Duration::from_secs(180));
    assert!(
        out.status.success(),
        "skopeo copy {src} {dest} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A tar of every file under `dir`, named relative to it (an OCI archive of a layout).
pub fn tar_dir(dir: &Path) -> Vec<u8> {
    let mut tar = tar::Builder::new(Vec::new());
    tar.append_dir_all(".", dir).unwrap();
    tar.into_inner().unwrap()
}

pub fn arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// Runs a command to completion (killing it after `timeout`), capturing its output.
fn run(cmd: &mut Command, timeout: Duration) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e} (apt-get install skopeo)"));
    let deadline = Instant::now() + timeout;
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Names of temporary leftovers (`.tmp-*`, `.lock-*`) anywhere under `root`.
pub fn leftovers(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for sub in ["blobs/sha256", "layers", "images"] {
        if let Ok(entries) = std::fs::read_dir(root.join(sub)) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with(".tmp-") || name.starts_with(".lock-") {
                    out.push(format!("{sub}/{name}"));
                }
            }
        }
    }
    out
}
