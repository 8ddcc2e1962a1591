//! Images on the host: import for air-gapped boxes, `image ls` with the apps using each,
//! `image rm` refused while in use, and automatic collection of images only old revisions used.

mod common;

use std::time::Duration;

use common::{http_get, wait_until, Daemon, Registry};

fn image_refs(daemon: &Daemon) -> Vec<(String, serde_json::Value)> {
    let ls = daemon.cli_json(&["image", "ls", "--json"]);
    ls.as_array()
        .into_iter()
        .flatten()
        .map(|i| (i["reference"].as_str().unwrap_or_default().to_string(), i["used_by"].clone()))
        .collect()
}

fn layer_count(daemon: &Daemon) -> usize {
    std::fs::read_dir(daemon.data_dir().join("layers")).map(|d| d.count()).unwrap_or(0)
}

#[test]
fn an_imported_image_runs_and_images_only_old_revisions_used_are_collected() {
    let registry = Registry::start();
    let daemon = Daemon::start_with_args(&registry, &["--keep-revisions", "1"]);

    // Air-gapped: an OCI layout on disk, named on import; no registry involved.
    let layout = tempfile::Builder::new().prefix("oci-import-").tempdir().expect("temp dir");
    common::testapp_image().write_layout(layout.path(), "1");
    let out =
        daemon.cli_ok(&["image", "import", layout.path().to_str().expect("utf-8"), "--name", "airgap.example/web:1"]);
    assert!(out.contains("imported airgap.example/web:1@sha256:"), "{out}");
    assert_eq!(image_refs(&daemon), [("airgap.example/web:1".to_string(), serde_json::json!([]))]);
    assert_eq!(layer_count(&daemon), 2, "busybox and the test app");

    daemon.cli_ok(&["app", "create", "web", "--image", "airgap.example/web:1", "--port", "8080"]);
    daemon.cli_ok(&["app", "start", "web"]);
    let (status, body) = http_get(daemon.proxy_addr(), "web.localhost", "/");
    assert_eq!(status, 200, "{body}");
    assert_eq!(image_refs(&daemon), [("airgap.example/web:1".to_string(), serde_json::json!(["web"]))]);
    let out = daemon.cli(&["image", "rm", "airgap.example/web:1"]);
    assert!(!out.success() && out.stderr.contains("used by web"), "{out:?}");

    // Deploy another image: with --keep-revisions 1 the first revision goes, and with it the
    // imported image and the layer only it had (busybox is shared and stays).
    let httpd = common::push_busybox_httpd(&registry, "demo/httpd:1");
    daemon.cli_ok(&["app", "config", "web", "--image", &httpd.reference]);
    assert!(
        wait_until(Duration::from_secs(15), || image_refs(&daemon).iter().all(|(r, _)| r != "airgap.example/web:1")),
        "the image of the forgotten revision is still there: {:?}",
        image_refs(&daemon)
    );
    assert!(wait_until(Duration::from_secs(10), || layer_count(&daemon) == 1), "layers: {}", layer_count(&daemon));
    let (status, body) = http_get(daemon.proxy_addr(), "web.localhost", "/");
    assert_eq!(status, 200, "{body}");

    // A pulled image no revision uses is removed on request, with its layers.
    daemon.cli_ok(&["app", "rm", "web"]);
    assert!(wait_until(Duration::from_secs(15), || image_refs(&daemon).is_empty()), "{:?}", image_refs(&daemon));
    daemon.cli_ok(&["image", "pull", &httpd.reference]);
    let out = daemon.cli_ok(&["image", "rm", &httpd.reference]);
    assert!(out.contains("removed") && out.contains("1 layers"), "{out}");
    assert_eq!(layer_count(&daemon), 0);
    let out = daemon.cli_ok(&["image", "prune"]);
    assert!(out.contains("0 layers, 0 blobs"), "{out}");
    let out = daemon.cli(&["image", "import", "/nonexistent/archive.tar"]);
    assert!(!out.success() && out.stderr.contains("/nonexistent/archive.tar"), "{out:?}");
}

#[test]
fn pull_reports_each_layer_plainly_in_logs_and_as_bars_on_a_terminal() {
    let registry = Registry::start();
    let image = common::push_testapp(&registry, "demo/testapp:1");
    let daemon = Daemon::start(&registry);
    let shorts: Vec<String> =
        image.layer_digests.iter().map(|d| d.trim_start_matches("sha256:")[..12].to_string()).collect();

    // Not a terminal (as in CI logs): one line per layer once it is ready, the result on stdout.
    let out = daemon.cli(&["image", "pull", &image.reference]);
    assert!(out.success(), "{out:?}");
    assert!(out.stdout.trim().starts_with(&format!("{}@sha256:", image.reference)), "{}", out.stdout);
    for short in &shorts {
        assert!(out.stderr.contains(&format!("layer {short}: ")), "no line for layer {short}:\n{}", out.stderr);
    }
    assert!(!out.stderr.contains('\u{1b}'), "no terminal escapes in logs:\n{}", out.stderr);
    let again = daemon.cli(&["image", "pull", &image.reference]);
    assert_eq!(again.stderr.matches("already present").count(), shorts.len(), "{}", again.stderr);

    // On a terminal: bars redrawn in place.
    daemon.cli_ok(&["image", "rm", &image.reference]);
    let command = format!(
        "{} --host unix:{} image pull {}",
        env!("CARGO_BIN_EXE_deliverous"),
        daemon.socket().display(),
        image.reference
    );
    let out = std::process::Command::new("script").args(["-qec", &command, "/dev/null"]).output().expect("run script");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("\u{1b}[2K"), "no redrawn lines:\n{text:?}");
    for short in &shorts {
        assert!(text.contains(&format!("{short}  done")), "layer {short} not shown done:\n{text}");
    }
}

/// Bytes that do not compress (xorshift), so a pull of them takes a while even on loopback.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
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

#[test]
fn a_pull_killed_at_any_moment_leaves_nothing_that_looks_complete() {
    use sha2::Digest;
    let registry = Registry::start();
    let big = noise(48 << 20, 0x5eed);
    let big_sha = hex::encode(sha2::Sha256::digest(&big));
    let image = common::TestImage::new()
        .layer(common::busybox_rootfs())
        .layer(common::Layer::new().dir("data", 0o755).file("data/big", 0o644, &big))
        .layer(common::Layer::new().dir("data2", 0o755).file("data2/more", 0o644, &noise(16 << 20, 7)))
        .cmd(&["sh"])
        .push(&registry, "demo/big:1");
    let mut daemon = Daemon::start(&registry);
    let layers = daemon.data_dir().join("layers");
    let layer_dir = |diff_id: &str| layers.join(diff_id.trim_start_matches("sha256:"));
    let big_layer = layer_dir(&image.diff_ids[1]);

    let mut interrupted = 0;
    for delay_ms in [30u64, 80, 150, 300, 600] {
        let mut pull = std::process::Command::new(env!("CARGO_BIN_EXE_deliverous"))
            .args(["--host", &format!("unix:{}", daemon.socket().display()), "image", "pull", &image.reference])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start pull");
        std::thread::sleep(Duration::from_millis(delay_ms));
        daemon.kill9();
        let _ = pull.wait();
        if !image.diff_ids.iter().all(|d| layer_dir(d).is_dir()) {
            interrupted += 1;
        }
        // What the killed daemon left: a layer is either absent or complete.
        if big_layer.exists() {
            let content = std::fs::read(big_layer.join("data/big")).expect("a complete layer has its file");
            assert_eq!(hex::encode(sha2::Sha256::digest(&content)), big_sha, "layer complete-looking but wrong");
        }
        daemon.restart();
        let leftovers: Vec<String> = ["layers", "blobs/sha256", "images"]
            .iter()
            .flat_map(|d| std::fs::read_dir(daemon.data_dir().join(d)).into_iter().flatten().flatten())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(".tmp-"))
            .collect();
        assert!(leftovers.is_empty(), "after a kill at {delay_ms} ms, the restart left {leftovers:?}");
    }
    assert!(interrupted >= 2, "only {interrupted} kills landed mid-pull: the test proves little");
    // The next pull finishes the job, whatever was there.
    daemon.cli_ok(&["image", "pull", &image.reference]);
    let content = std::fs::read(big_layer.join("data/big")).expect("big file");
    assert_eq!(hex::encode(sha2::Sha256::digest(&content)), big_sha);
    for diff_id in &image.diff_ids {
        assert!(layer_dir(diff_id).is_dir(), "layer {diff_id} missing");
    }
}

#[test]
fn docker_and_oci_manifests_and_indexes_resolve_to_this_host_s_build() {
    let registry = Registry::start();
    let daemon = Daemon::start(&registry);
    let base = || common::TestImage::new().layer(common::busybox_rootfs()).cmd(&["sh"]);
    let builds = [("arm", "v7"), ("arm64", "v8"), ("amd64", "")];

    let v2s2 = base().docker_format().push(&registry, "demo/v2s2:1");
    let oci_index = base().platforms(&builds).push(&registry, "demo/oci-index:1");
    let manifest_list = base().platforms(&builds).docker_format().push(&registry, "demo/list:1");
    for image in [&v2s2, &oci_index, &manifest_list] {
        let out = daemon.cli(&["image", "pull", &image.reference]);
        assert!(out.success(), "pulling {}: {out:?}", image.repo_tag);
    }
    // From the index, the amd64 build: its config (skopeo may re-encode manifests, not configs).
    let ls = daemon.cli_json(&["image", "ls", "--json"]);
    for image in [&oci_index, &manifest_list] {
        let pulled = ls.as_array().and_then(|a| a.iter().find(|i| i["reference"] == image.reference.as_str()));
        let pulled = pulled.unwrap_or_else(|| panic!("{} not listed: {ls}", image.reference));
        assert_eq!(pulled["layers"], serde_json::json!(image.diff_ids), "{pulled}");
        let blobs = pulled["blobs"].as_array().cloned().unwrap_or_default();
        assert!(blobs.contains(&serde_json::json!(image.config_digest)), "not the amd64 build: {pulled}");
    }

    let foreign = base().platforms(&[("arm64", "v8"), ("s390x", "")]).push(&registry, "demo/foreign:1");
    let out = daemon.cli(&["image", "pull", &foreign.reference]);
    assert!(!out.success(), "{out:?}");
    assert!(
        out.stderr.contains("amd64") && out.stderr.contains("arm64") && out.stderr.contains("s390x"),
        "the error should say what this host needs and what the image offers: {}",
        out.stderr
    );
}
