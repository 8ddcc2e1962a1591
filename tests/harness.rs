//! Smoke test of the harness itself: the registry comes up, test images are pushed, and
//! skopeo sees them with the configuration the harness wrote.

mod common;

use std::process::Command;

fn inspect(reference: &str, raw_config: bool) -> serde_json::Value {
    let mut cmd = Command::new("skopeo");
    cmd.args(["inspect", "--tls-verify=false"]);
    if raw_config {
        cmd.arg("--config");
    }
    let out = cmd.arg(format!("docker://{reference}")).output().expect("run skopeo inspect");
    assert!(out.status.success(), "skopeo inspect {reference}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("skopeo inspect prints JSON")
}

fn strings(value: &serde_json::Value) -> Vec<String> {
    value
        .as_array()
        .unwrap_or_else(|| panic!("expected an array, got {value}"))
        .iter()
        .map(|v| v.as_str().expect("string").to_string())
        .collect()
}

#[test]
fn registry_answers_v2() {
    let registry = common::Registry::start();
    let (status, _) = common::http_get(registry.addr(), registry.addr(), "/v2/");
    assert_eq!(status, 200);
    assert!(registry.addr().starts_with("127.0.0.1:"));
}

#[test]
fn pushed_images_are_visible_to_skopeo() {
    let registry = common::Registry::start();

    let httpd = common::push_busybox_httpd(&registry, "demo/httpd:1");
    assert_eq!(httpd.reference, format!("{}/demo/httpd:1", registry.addr()));
    let info = inspect(&httpd.reference, false);
    assert_eq!(info["Digest"], httpd.manifest_digest.as_str(), "skopeo copied the manifest unchanged");
    assert_eq!(info["Architecture"], "amd64");
    assert_eq!(info["Os"], "linux");
    assert_eq!(strings(&info["Layers"]), httpd.layer_digests);
    let config = inspect(&httpd.reference, true);
    assert_eq!(strings(&config["config"]["Env"]), ["PATH=/bin"]);
    let cmd = strings(&config["config"]["Cmd"]);
    assert_eq!(cmd[..2], ["sh", "-c"]);
    assert!(cmd[2].contains("httpd -f -v -p \"$PORT\" -h /www"), "{cmd:?}");
    assert_eq!(strings(&config["rootfs"]["diff_ids"]), httpd.diff_ids);
    assert!(config["config"]["ExposedPorts"]["8080/tcp"].is_object(), "{config}");

    let testapp = common::push_testapp(&registry, "demo/testapp:1");
    let config = inspect(&testapp.reference, true);
    assert_eq!(strings(&config["config"]["Entrypoint"]), ["/app/testapp"]);
    assert_eq!(testapp.layer_digests.len(), 2);
    assert_eq!(
        testapp.layer_digests[0], httpd.layer_digests[0],
        "the busybox base layer is deterministic, so shared between images"
    );

    let layered = common::push_layered(&registry, "demo/layered:1");
    let info = inspect(&layered.reference, false);
    assert_eq!(strings(&info["Layers"]).len(), 3);

    // The registry lists the three repositories.
    let (status, body) = common::http_get(registry.addr(), registry.addr(), "/v2/_catalog");
    assert_eq!(status, 200);
    let catalog: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(strings(&catalog["repositories"]), ["demo/httpd", "demo/layered", "demo/testapp"]);
}

#[test]
fn layers_carry_whiteouts_and_busybox() {
    // Inspect the layout as written (before pushing) rather than trusting the builder.
    let dir = tempfile::tempdir().unwrap();
    let image = common::TestImage::new()
        .layer(common::busybox_rootfs())
        .layer(common::Layer::new().whiteout("www/gone.txt").opaque("www/opaque").file(
            "www/opaque/new.txt",
            0o644,
            b"new\n",
        ))
        .cmd(&["sh"])
        .write_layout(dir.path(), "t");
    let entries = |digest: &str| -> Vec<(String, tar::EntryType, u32)> {
        let blob = dir.path().join("blobs/sha256").join(digest.trim_start_matches("sha256:"));
        let gz = flate2::read::GzDecoder::new(std::fs::File::open(blob).unwrap());
        tar::Archive::new(gz)
            .entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let h = e.header();
                (e.path().unwrap().to_string_lossy().into_owned(), h.entry_type(), h.mode().unwrap())
            })
            .collect()
    };
    let base = entries(&image.layer_digests[0]);
    assert!(base.contains(&("bin/busybox".into(), tar::EntryType::Regular, 0o755)));
    assert!(base.contains(&("bin/httpd".into(), tar::EntryType::Symlink, 0o777)));
    assert!(base.contains(&("tmp/".into(), tar::EntryType::Directory, 0o1777)));
    let top: Vec<String> = entries(&image.layer_digests[1]).into_iter().map(|e| e.0).collect();
    assert!(top.contains(&"www/.wh.gone.txt".to_string()), "{top:?}");
    assert!(top.contains(&"www/opaque/.wh..wh..opq".to_string()), "{top:?}");
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("index.json")).unwrap()).unwrap();
    assert_eq!(index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"], "t");
}

#[test]
fn testapp_is_a_static_binary_that_serves() {
    let binary = common::testapp_binary();
    let out = Command::new("file").arg(&binary).output().expect("run file");
    let description = String::from_utf8_lossy(&out.stdout);
    assert!(description.contains("statically linked") || description.contains("static-pie linked"), "{description}");

    // Run it directly on the host (not in a container) to check its routes.
    let port = common::free_port();
    let mut child = Command::new(&binary)
        .env("PORT", port.to_string())
        .env("GREETING", "hello")
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("start testapp");
    let addr = format!("127.0.0.1:{port}");
    let (status, body) =
        common::http_get_retry(&addr, "testapp", "/", std::time::Duration::from_secs(10), |s, _| s == 200);
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    assert_eq!((status, body.as_str()), (200, format!("{}\n", hostname.trim()).as_str()));
    assert_eq!(common::http_get(&addr, "t", "/env/GREETING"), (200, "hello".to_string()));
    assert_eq!(common::http_get(&addr, "t", "/env/NOT_SET_ANYWHERE").0, 404);
    assert_eq!(common::http_get(&addr, "t", "/hog?mb=8").0, 200);
    assert_eq!(common::http_get(&addr, "t", "/exit?code=3").0, 200);
    let status = child.wait().expect("wait testapp");
    assert_eq!(status.code(), Some(3));
}

/// The Daemon fixture starts the product and leaves nothing behind.
#[test]
fn daemon_fixture_starts_and_cleans_up() {
    let registry = common::Registry::start();
    let names;
    {
        let daemon = common::Daemon::start(&registry);
        names = daemon.names().clone();
        daemon.cli_ok(&["app", "ls"]);
    }
    assert_eq!(names.leaks(), "");
}

#[test]
fn shell_completions_are_printed_for_bash_zsh_and_fish() {
    for (shell, marker) in
        [("bash", "complete -F _deliverous"), ("zsh", "#compdef deliverous"), ("fish", "complete -c deliverous")]
    {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_deliverous"))
            .args(["completions", shell])
            .output()
            .expect("run deliverous completions");
        let script = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success() && script.contains(marker), "{shell}: {script}");
        assert!(script.contains("logs") && script.contains("registry"), "{shell}: subcommands missing");
    }
}
