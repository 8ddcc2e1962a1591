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
