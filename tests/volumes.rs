//! Volumes: a named volume starts with the image's content at its mount point, keeps its data
//! across deploys and restarts, and goes only with `volume rm`; host paths are mounted
//! read-only, and only those the operator allows.

mod common;

use common::{http_get, Daemon, Registry};

fn file(daemon: &Daemon, app: &str, path: &str) -> (u16, String) {
    http_get(daemon.proxy_addr(), &format!("{app}.localhost"), &format!("/file?path={path}"))
}

#[test]
fn named_volumes_keep_data_across_deploys_until_removed() {
    let registry = Registry::start();
    let image = common::push_testapp(&registry, "demo/testapp:1");
    let daemon = Daemon::start(&registry);
    // /app holds the test app itself: a new volume there must be seeded from the image, or the
    // instance could not even start.
    daemon.cli_ok(&[
        "app",
        "create",
        "web",
        "--image",
        &image.reference,
        "--port",
        "8080",
        "-v",
        "data:/data",
        "-v",
        "code:/app",
    ]);
    daemon.cli_ok(&["app", "start", "web"]);
    let (status, body) = http_get(daemon.proxy_addr(), "web.localhost", "/file?path=/data/note&content=kept");
    assert_eq!((status, body.trim()), (200, "written"));

    // A new revision (new instance, new rootfs) sees the same data.
    let before = daemon.cli_json(&["app", "show", "web", "--json"]);
    daemon.cli_ok(&["app", "config", "web", "-e", "REV=2"]);
    let after = daemon.cli_json(&["app", "show", "web", "--json"]);
    assert_ne!(before["instances"][0]["id"], after["instances"][0]["id"], "the deploy replaced the instance");
    assert_eq!(file(&daemon, "web", "/data/note"), (200, "kept".to_string()));

    let ls = daemon.cli_json(&["volume", "ls", "--json"]);
    let data = ls.as_array().and_then(|v| v.iter().find(|v| v["name"] == "data")).cloned().expect("volume data listed");
    assert_eq!(data["used_by"], serde_json::json!(["web"]), "{ls}");
    assert!(data["size"].as_u64() >= Some(4), "{ls}");

    let out = daemon.cli(&["volume", "rm", "data"]);
    assert!(!out.success() && out.stderr.contains("used by web"), "{out:?}");
    daemon.cli_ok(&["app", "rm", "web"]);
    let kept = daemon.data_dir().join("volumes/data/note");
    assert!(kept.exists(), "removing the app must keep its volumes");
    daemon.cli_ok(&["volume", "rm", "data"]);
    daemon.cli_ok(&["volume", "rm", "code"]);
    assert!(!kept.exists());
    let out = daemon.cli(&["volume", "rm", "data"]);
    assert!(!out.success() && out.stderr.contains("no volume named"), "{out:?}");
}

#[test]
fn host_paths_are_read_only_and_only_where_allowed() {
    let registry = Registry::start();
    let image = common::push_testapp(&registry, "demo/testapp:1");
    let shared = tempfile::Builder::new().prefix("shared-").tempdir().expect("temp dir");
    std::fs::write(shared.path().join("config"), "from the host").expect("write host file");
    let elsewhere = tempfile::Builder::new().prefix("elsewhere-").tempdir().expect("temp dir");
    let allow = shared.path().to_str().expect("utf-8 path").to_string();
    let daemon = Daemon::start_with_args(&registry, &["--allow-bind", &allow]);

    let bind = format!("{allow}:/shared");
    daemon.cli_ok(&["app", "create", "web", "--image", &image.reference, "--port", "8080", "-v", &bind]);
    daemon.cli_ok(&["app", "start", "web"]);
    assert_eq!(file(&daemon, "web", "/shared/config"), (200, "from the host".to_string()));
    let (status, body) = http_get(daemon.proxy_addr(), "web.localhost", "/file?path=/shared/config&content=x");
    assert_eq!((status, body.trim()), (500, "EROFS"), "a host path must be read-only");
    assert_eq!(std::fs::read_to_string(shared.path().join("config")).expect("read"), "from the host");

    let outside = format!("{}:/other", elsewhere.path().display());
    let out = daemon.cli(&["app", "config", "web", "-v", &outside]);
    assert!(!out.success() && out.stderr.contains("--allow-bind"), "{out:?}");
    let out = daemon.cli(&["app", "config", "web", "-v", &format!("{allow}:/shared:rw")]);
    assert!(!out.success() && out.stderr.contains("read-only"), "{out:?}");
    let out = daemon.cli(&["app", "config", "web", "-v", "data:/proc/x"]);
    assert!(!out.success() && out.stderr.contains("/proc"), "{out:?}");
}
