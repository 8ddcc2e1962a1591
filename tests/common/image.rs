//! Test images: written as an OCI image layout (gzip tar layers built with `tar` + `flate2`,
//! config and manifest JSON) and pushed to a [`Registry`] with `skopeo copy`.
//!
//! Layers are deterministic (fixed mtimes, root-owned, gzip without timestamp), so images built
//! from the same [`busybox_rootfs`] share its layer digest, as real images share base layers.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use flate2::{write::GzEncoder, Compression};
use serde_json::json;
use sha2::{Digest, Sha256};

use super::{run_with_timeout, workspace_root, Registry};

const BUSYBOX: &str = "/bin/busybox";
const BUSYBOX_APPLETS: &[&str] =
    &["sh", "httpd", "hostname", "cat", "echo", "sleep", "ls", "env", "head", "tr", "id", "mount", "ps", "kill"];
const MTIME: u64 = 1_700_000_000;

const MEDIA_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const MEDIA_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const MEDIA_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const MEDIA_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

/// The `sh -c` command of the httpd image: the page shows the hostname and `$GREETING`.
/// httpd runs as a child of the shell, which as PID 1 stops it on SIGTERM (a PID 1 without a
/// handler ignores SIGTERM, and every stop would wait for the grace period).
pub const HTTPD_SCRIPT: &str = "echo \"host=$(hostname) greeting=$GREETING\" > /www/index.html \
                                && httpd -f -v -p \"$PORT\" -h /www & trap 'kill $!; exit 0' TERM; wait";

/// One image layer: a tar archive built entry by entry (paths relative to the rootfs, no `/`).
pub struct Layer {
    tar: tar::Builder<Vec<u8>>,
}

impl Default for Layer {
    fn default() -> Self {
        Self::new()
    }
}

impl Layer {
    pub fn new() -> Layer {
        let mut tar = tar::Builder::new(Vec::new());
        tar.mode(tar::HeaderMode::Deterministic);
        Layer { tar }
    }

    fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(size);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(MTIME);
        h
    }

    /// A directory entry (`mode` e.g. 0o755, 0o1777).
    pub fn dir(mut self, path: &str, mode: u32) -> Layer {
        let mut h = Self::header(tar::EntryType::Directory, mode, 0);
        let path = format!("{}/", path.trim_matches('/'));
        self.tar.append_data(&mut h, path, std::io::empty()).expect("append dir to layer");
        self
    }

    /// A regular file with `contents`.
    pub fn file(mut self, path: &str, mode: u32, contents: &[u8]) -> Layer {
        let mut h = Self::header(tar::EntryType::Regular, mode, contents.len() as u64);
        self.tar.append_data(&mut h, path.trim_start_matches('/'), contents).expect("append file to layer");
        self
    }

    /// A symbolic link `path` -> `target`.
    pub fn symlink(mut self, path: &str, target: &str) -> Layer {
        let mut h = Self::header(tar::EntryType::Symlink, 0o777, 0);
        self.tar.append_link(&mut h, path.trim_start_matches('/'), target).expect("append symlink to layer");
        self
    }

    /// A whiteout: this layer deletes `path` of the layers below (`dir/.wh.name`).
    pub fn whiteout(self, path: &str) -> Layer {
        let path = path.trim_matches('/');
        let (dir, name) = path.rsplit_once('/').unwrap_or(("", path));
        let entry = if dir.is_empty() { format!(".wh.{name}") } else { format!("{dir}/.wh.{name}") };
        self.file(&entry, 0o644, b"")
    }

    /// An opaque directory: `dir` hides everything the layers below had in it.
    pub fn opaque(self, dir: &str) -> Layer {
        let dir = dir.trim_matches('/');
        self.dir(dir, 0o755).file(&format!("{dir}/.wh..wh..opq"), 0o644, b"")
    }

    /// The uncompressed tar bytes.
    fn finish(self) -> Vec<u8> {
        self.tar.into_inner().expect("finish layer tar")
    }
}

/// Debian's static busybox at /bin/busybox with applet symlinks, /www, /tmp (1777), and /etc
/// with root and nobody. Enough for `sh -c ...` and `httpd`.
pub fn busybox_rootfs() -> Layer {
    let busybox = std::fs::read(BUSYBOX).unwrap_or_else(|e| {
        panic!("cannot read {BUSYBOX} ({e}): apt-get install busybox-static (scripts/test does it)")
    });
    let mut layer = Layer::new().dir("bin", 0o755).file("bin/busybox", 0o755, &busybox);
    for applet in BUSYBOX_APPLETS {
        layer = layer.symlink(&format!("bin/{applet}"), "busybox");
    }
    layer
        .dir("dev", 0o755)
        .dir("proc", 0o555)
        .dir("sys", 0o555)
        .dir("www", 0o755)
        .dir("tmp", 0o1777)
        .dir("etc", 0o755)
        .file(
            "etc/passwd",
            0o644,
            b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
        )
        .file("etc/group", 0o644, b"root:x:0:\nnogroup:x:65534:\n")
        .dir("root", 0o700)
}

/// What was pushed, and where.
#[derive(Debug, Clone)]
pub struct PushedImage {
    /// Full reference to pull: `127.0.0.1:PORT/demo/httpd:1`.
    pub reference: String,
    /// `demo/httpd:1`.
    pub repo_tag: String,
    /// `sha256:...` of the manifest as written (skopeo copies it unchanged).
    pub manifest_digest: String,
    pub config_digest: String,
    /// `sha256:...` of each compressed layer, bottom first.
    pub layer_digests: Vec<String>,
    /// `sha256:...` of each uncompressed layer (the config's `rootfs.diff_ids`), bottom first.
    pub diff_ids: Vec<String>,
}

/// An image under construction: layers bottom first, plus the runtime config.
pub struct TestImage {
    layers: Vec<Layer>,
    env: Vec<String>,
    cmd: Option<Vec<String>>,
    entrypoint: Option<Vec<String>>,
    working_dir: Option<String>,
    exposed_ports: Vec<u16>,
    user: Option<String>,
    stop_signal: Option<String>,
    /// The config's `Healthcheck`, as Docker writes it.
    healthcheck: Option<serde_json::Value>,
    /// (architecture, variant) offered by an index; empty: a single amd64 manifest.
    platforms: Vec<(String, String)>,
    /// Push as Docker v2 schema 2 (manifest list for an index) instead of OCI.
    docker_format: bool,
}

impl Default for TestImage {
    fn default() -> Self {
        Self::new()
    }
}

impl TestImage {
    pub fn new() -> TestImage {
        TestImage {
            layers: Vec::new(),
            env: Vec::new(),
            cmd: None,
            entrypoint: None,
            working_dir: None,
            exposed_ports: Vec::new(),
            user: None,
            stop_signal: None,
            healthcheck: None,
            platforms: Vec::new(),
            docker_format: false,
        }
    }

    /// Adds a layer on top of those already added.
    pub fn layer(mut self, layer: Layer) -> TestImage {
        self.layers.push(layer);
        self
    }

    /// Adds `KEY=VALUE` to the config's `Env`.
    pub fn env(mut self, key_value: &str) -> TestImage {
        self.env.push(key_value.to_string());
        self
    }

    pub fn cmd(mut self, cmd: &[&str]) -> TestImage {
        self.cmd = Some(cmd.iter().map(|s| s.to_string()).collect());
        self
    }

    pub fn entrypoint(mut self, entrypoint: &[&str]) -> TestImage {
        self.entrypoint = Some(entrypoint.iter().map(|s| s.to_string()).collect());
        self
    }

    pub fn working_dir(mut self, dir: &str) -> TestImage {
        self.working_dir = Some(dir.to_string());
        self
    }

    /// The config's `User` (`1000`, `nobody`, `1000:1000`).
    pub fn user(mut self, user: &str) -> TestImage {
        self.user = Some(user.to_string());
        self
    }

    /// Publishes an index offering these (architecture, variant) builds (variant "" for none),
    /// all with the same layers; only an `amd64` one can really run here.
    pub fn platforms(mut self, platforms: &[(&str, &str)]) -> TestImage {
        self.platforms = platforms.iter().map(|(a, v)| (a.to_string(), v.to_string())).collect();
        self
    }

    /// Pushes Docker v2 schema 2 manifests (and a Docker manifest list for an index).
    pub fn docker_format(mut self) -> TestImage {
        self.docker_format = true;
        self
    }

    /// The config's `StopSignal` (`SIGINT`, `SIGQUIT`, `3`).
    pub fn stop_signal(mut self, signal: &str) -> TestImage {
        self.stop_signal = Some(signal.to_string());
        self
    }

    /// The config's `Healthcheck` (`{"Test": ["CMD-SHELL", "..."], "Interval": ns, ...}`).
    pub fn healthcheck(mut self, healthcheck: serde_json::Value) -> TestImage {
        self.healthcheck = Some(healthcheck);
        self
    }

    /// Declares `port/tcp` in `ExposedPorts`.
    pub fn expose(mut self, port: u16) -> TestImage {
        self.exposed_ports.push(port);
        self
    }

    /// Writes an OCI image layout into `dir` with the manifest named `tag` in index.json.
    pub fn write_layout(self, dir: &Path, tag: &str) -> PushedImage {
        let blobs = dir.join("blobs/sha256");
        std::fs::create_dir_all(&blobs).expect("create blobs/sha256");
        let write_blob = |bytes: &[u8]| -> (String, usize) {
            let hex = hex::encode(Sha256::digest(bytes));
            std::fs::write(blobs.join(&hex), bytes).expect("write blob");
            (format!("sha256:{hex}"), bytes.len())
        };

        let mut layer_descriptors = Vec::new();
        let mut layer_digests = Vec::new();
        let mut diff_ids = Vec::new();
        for layer in self.layers {
            let tar = layer.finish();
            diff_ids.push(format!("sha256:{}", hex::encode(Sha256::digest(&tar))));
            let mut gz = GzEncoder::new(Vec::new(), Compression::default());
            std::io::Write::write_all(&mut gz, &tar).expect("gzip layer");
            let gz = gz.finish().expect("gzip layer");
            let (digest, size) = write_blob(&gz);
            layer_descriptors.push(json!({"mediaType": MEDIA_LAYER_GZIP, "digest": digest, "size": size}));
            layer_digests.push(digest);
        }

        let mut config = serde_json::Map::new();
        config.insert("Env".into(), json!(self.env));
        if let Some(cmd) = &self.cmd {
            config.insert("Cmd".into(), json!(cmd));
        }
        if let Some(entrypoint) = &self.entrypoint {
            config.insert("Entrypoint".into(), json!(entrypoint));
        }
        if let Some(dir) = &self.working_dir {
            config.insert("WorkingDir".into(), json!(dir));
        }
        if let Some(user) = &self.user {
            config.insert("User".into(), json!(user));
        }
        if let Some(signal) = &self.stop_signal {
            config.insert("StopSignal".into(), json!(signal));
        }
        if let Some(healthcheck) = &self.healthcheck {
            config.insert("Healthcheck".into(), healthcheck.clone());
        }
        if !self.exposed_ports.is_empty() {
            let ports: serde_json::Map<String, serde_json::Value> =
                self.exposed_ports.iter().map(|p| (format!("{p}/tcp"), json!({}))).collect();
            config.insert("ExposedPorts".into(), serde_json::Value::Object(ports));
        }
        let history: Vec<_> = diff_ids
            .iter()
            .map(|_| json!({"created": "2023-11-14T22:13:20Z", "created_by": "deliverous test harness"}))
            .collect();
        let config_json = json!({
            "created": "2023-11-14T22:13:20Z",
            "architecture": "amd64",
            "os": "linux",
            "config": config,
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "history": history,
        });
        let (config_digest, config_size) = write_blob(&serde_json::to_vec(&config_json).expect("config json"));

        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": MEDIA_MANIFEST,
            "config": {"mediaType": MEDIA_CONFIG, "digest": config_digest, "size": config_size},
            "layers": layer_descriptors,
        });
        let (manifest_digest, manifest_size) = write_blob(&serde_json::to_vec(&manifest).expect("manifest json"));

        let index = if self.platforms.is_empty() {
            json!({
                "schemaVersion": 2,
                "mediaType": MEDIA_INDEX,
                "manifests": [{
                    "mediaType": MEDIA_MANIFEST,
                    "digest": manifest_digest,
                    "size": manifest_size,
                    "platform": {"architecture": "amd64", "os": "linux"},
                    "annotations": {"org.opencontainers.image.ref.name": tag},
                }],
            })
        } else {
            // One manifest per platform, same layers, the config naming the platform.
            let mut entries = Vec::new();
            for (arch, variant) in &self.platforms {
                let (digest, size) = if arch == "amd64" && variant.is_empty() {
                    (manifest_digest.clone(), manifest_size)
                } else {
                    let mut config = config_json.clone();
                    config["architecture"] = json!(arch);
                    if !variant.is_empty() {
                        config["variant"] = json!(variant);
                    }
                    let (c_digest, c_size) = write_blob(&serde_json::to_vec(&config).expect("config json"));
                    let mut m = manifest.clone();
                    m["config"] = json!({"mediaType": MEDIA_CONFIG, "digest": c_digest, "size": c_size});
                    write_blob(&serde_json::to_vec(&m).expect("manifest json"))
                };
                let mut platform = json!({"architecture": arch, "os": "linux"});
                if !variant.is_empty() {
                    platform["variant"] = json!(variant);
                }
                entries
                    .push(json!({"mediaType": MEDIA_MANIFEST, "digest": digest, "size": size, "platform": platform}));
            }
            let nested = json!({"schemaVersion": 2, "mediaType": MEDIA_INDEX, "manifests": entries});
            let (index_digest, index_size) = write_blob(&serde_json::to_vec(&nested).expect("index json"));
            json!({
                "schemaVersion": 2,
                "mediaType": MEDIA_INDEX,
                "manifests": [{
                    "mediaType": MEDIA_INDEX,
                    "digest": index_digest,
                    "size": index_size,
                    "annotations": {"org.opencontainers.image.ref.name": tag},
                }],
            })
        };
        std::fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).expect("write index.json");
        std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).expect("write oci-layout");

        PushedImage {
            reference: String::new(),
            repo_tag: String::new(),
            manifest_digest,
            config_digest,
            layer_digests,
            diff_ids,
        }
    }

    /// Writes the image and pushes it as `repo_tag` (`demo/httpd:1`) to `registry`.
    pub fn push(self, registry: &Registry, repo_tag: &str) -> PushedImage {
        let (repo, tag) = repo_tag
            .rsplit_once(':')
            .filter(|(repo, _)| !repo.is_empty())
            .unwrap_or_else(|| panic!("expected REPO:TAG like demo/httpd:1, got {repo_tag:?}"));
        let layout = tempfile::Builder::new().prefix("oci-layout-").tempdir().expect("create layout temp dir");
        let (all, docker_format) = (!self.platforms.is_empty(), self.docker_format);
        let mut image = self.write_layout(layout.path(), tag);
        image.reference = registry.reference(repo_tag);
        image.repo_tag = repo_tag.to_string();
        let src = format!("oci:{}:{tag}", layout.path().display());
        let dest = format!("docker://{}/{repo}:{tag}", registry.addr());
        let out = run_with_timeout(
            Command::new("skopeo")
                .args(["--insecure-policy", "copy", "--dest-tls-verify=false"])
                .args(["--retry-times", "3"])
                .args(if all { &["--all"][..] } else { &[][..] })
                .args(if docker_format { &["--format", "v2s2"][..] } else { &[][..] })
                .args(registry.login().map(|l| vec!["--dest-creds".to_string(), l]).unwrap_or_default())
                .arg(&src)
                .arg(&dest),
            Duration::from_secs(180),
        )
        .unwrap_or_else(|e| panic!("skopeo copy {src} {dest}: {e} (apt-get install skopeo)"));
        assert!(
            out.status.success(),
            "skopeo copy {src} {dest} failed ({}):\n{}{}\n--- registry log ---\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            registry.log_tail(20)
        );
        image
    }
}

/// Pushes the busybox httpd image: serves /www on `$PORT`, with an index page showing
/// `host=<hostname> greeting=<$GREETING>`.
pub fn push_busybox_httpd(registry: &Registry, repo_tag: &str) -> PushedImage {
    TestImage::new()
        .layer(busybox_rootfs())
        .env("PATH=/bin")
        .cmd(&["sh", "-c", HTTPD_SCRIPT])
        .working_dir("/")
        .expose(8080)
        .push(registry, repo_tag)
}

/// Pushes the testapp image: the busybox layer plus a layer with /app/testapp (see
/// tests/testapp), Entrypoint `/app/testapp`. Routes: `/`, `/env/NAME`, `/hog?mb=N`, `/exit?code=N`,
/// `/spawn`, `/bomb`, `/spin`, `/probe`.
pub fn push_testapp(registry: &Registry, repo_tag: &str) -> PushedImage {
    testapp_image().push(registry, repo_tag)
}

/// The testapp image before it is pushed, to adjust (`.user(..)`, `.stop_signal(..)`).
pub fn testapp_image() -> TestImage {
    let binary = std::fs::read(testapp_binary()).expect("read testapp binary");
    TestImage::new()
        .layer(busybox_rootfs())
        .layer(Layer::new().dir("app", 0o755).file("app/testapp", 0o755, &binary))
        .env("PATH=/bin:/app")
        .entrypoint(&["/app/testapp"])
        .working_dir("/app")
        .expose(8080)
}

/// Pushes a three-layer image for layer semantics, served by busybox httpd from /www on `$PORT`:
/// - `/` → `layered v2` (layer 2 replaces layer 1's index.html)
/// - `/keep.txt` → `keep` (layer 1, untouched)
/// - `/gone.txt` → 404 (layer 1's file, deleted by a `.wh.gone.txt` whiteout in layer 2)
/// - `/opaque/old.txt` → 404 (layer 1's, hidden: layer 2 makes `/www/opaque` opaque)
/// - `/opaque/new.txt` → `new` (layer 2)
pub fn push_layered(registry: &Registry, repo_tag: &str) -> PushedImage {
    let layer1 = Layer::new()
        .dir("www", 0o755)
        .file("www/index.html", 0o644, b"layered v1\n")
        .file("www/keep.txt", 0o644, b"keep\n")
        .file("www/gone.txt", 0o644, b"gone\n")
        .dir("www/opaque", 0o755)
        .file("www/opaque/old.txt", 0o644, b"old\n");
    let layer2 = Layer::new()
        .dir("www", 0o755)
        .file("www/index.html", 0o644, b"layered v2\n")
        .whiteout("www/gone.txt")
        .opaque("www/opaque")
        .file("www/opaque/new.txt", 0o644, b"new\n");
    TestImage::new()
        .layer(busybox_rootfs())
        .layer(layer1)
        .layer(layer2)
        .env("PATH=/bin")
        .cmd(&["sh", "-c", "httpd -f -v -p \"$PORT\" -h /www & trap 'kill $!; exit 0' TERM; wait"])
        .working_dir("/")
        .expose(8080)
        .push(registry, repo_tag)
}

/// Builds tests/testapp as a fully static binary, once per test process; returns its path.
/// `DELIVEROUS_TESTAPP` names a prebuilt one instead (the cgroup v2 VM has no cargo).
pub fn testapp_binary() -> PathBuf {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY
        .get_or_init(|| {
            if let Some(prebuilt) = std::env::var_os("DELIVEROUS_TESTAPP") {
                let prebuilt = PathBuf::from(prebuilt);
                assert!(prebuilt.is_file(), "DELIVEROUS_TESTAPP={} is not a file", prebuilt.display());
                return prebuilt;
            }
            let root = workspace_root();
            let target_dir = root.join("target/testapp");
            let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
            let out = run_with_timeout(
                Command::new(cargo)
                    .current_dir(&root)
                    .env("RUSTFLAGS", "-C target-feature=+crt-static")
                    .env_remove("CARGO_ENCODED_RUSTFLAGS")
                    .env_remove("CARGO_BUILD_RUSTFLAGS")
                    .env_remove("CARGO_TARGET_DIR")
                    .args(["build", "--release", "--manifest-path"])
                    .arg(root.join("tests/testapp/Cargo.toml"))
                    .args(["--target", "x86_64-unknown-linux-gnu", "--target-dir"])
                    .arg(&target_dir),
                Duration::from_secs(300),
            )
            .unwrap_or_else(|e| panic!("building tests/testapp: {e}"));
            assert!(
                out.status.success(),
                "building tests/testapp failed ({}):\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
            let binary = target_dir.join("x86_64-unknown-linux-gnu/release/testapp");
            assert!(binary.exists(), "{} missing after the build", binary.display());
            binary
        })
        .clone()
}
