//! schemathesis (from PyPI, in a venv under the target dir) against the OpenAPI document and a
//! real daemon's TCP API: generated and mutated requests to every operation, and no answer may
//! be a 5xx or break the connection. Needs python3 with venv (`python3-venv`, which
//! scripts/test installs) and PyPI.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{free_port, run_with_timeout, Daemon, Registry};
use serde_json::Value;

/// Pinned: the same checks and generated cases on every run (with the fixed seed below).
const SCHEMATHESIS_VERSION: &str = "4.32.5";

/// `schemathesis` of a venv under the target dir, installed on first use.
fn schemathesis() -> PathBuf {
    // The tests of this file run in parallel: one installs, the others wait for it.
    static INSTALL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _once = INSTALL.lock().unwrap_or_else(|p| p.into_inner());
    let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("schemathesis-{SCHEMATHESIS_VERSION}"));
    let bin = venv.join("bin/schemathesis");
    // Written last: a venv without it is an interrupted install, made again.
    let installed = venv.join("installed");
    if installed.exists() {
        return bin;
    }
    let _ = std::fs::remove_dir_all(&venv);
    let out = run_with_timeout(Command::new("python3").args(["-m", "venv"]).arg(&venv), Duration::from_secs(120))
        .expect("run python3 -m venv");
    assert!(
        out.status.success(),
        "python3 -m venv failed (install python3-venv): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run_with_timeout(
        Command::new(venv.join("bin/pip"))
            .args(["install", "--quiet", "--disable-pip-version-check"])
            .arg(format!("schemathesis=={SCHEMATHESIS_VERSION}")),
        Duration::from_secs(600),
    )
    .expect("run pip install");
    assert!(
        out.status.success(),
        "pip install schemathesis=={SCHEMATHESIS_VERSION} failed (is PyPI reachable?): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(&installed, SCHEMATHESIS_VERSION).expect("mark the venv installed");
    bin
}

/// The document without the `follow` parameters: a followed stream never ends, which a tool
/// that waits for whole responses can only report as a timeout.
fn without_follow(doc: &str) -> String {
    let mut doc: Value = serde_json::from_str(doc).expect("the document is JSON");
    if let Some(paths) = doc["paths"].as_object_mut() {
        for item in paths.values_mut() {
            let drop_follow = |params: Option<&mut Value>| {
                if let Some(params) = params.and_then(Value::as_array_mut) {
                    params.retain(|p| p["name"] != "follow");
                }
            };
            // Parameters of the path item, and of each operation.
            drop_follow(item.get_mut("parameters"));
            let Some(item) = item.as_object_mut() else { continue };
            for op in item.values_mut() {
                drop_follow(op.get_mut("parameters"));
            }
        }
    }
    doc.to_string()
}

#[test]
fn schemathesis_finds_no_server_error_and_responses_match_the_document() {
    let bin = schemathesis();
    let registry = Registry::start();
    let port = free_port();
    let daemon = Daemon::start_with_args(&registry, &["--api-listen", &format!("127.0.0.1:{port}"), "--api-insecure"]);
    let token = daemon.cli_ok(&["token", "create", "--name", "schemathesis"]).trim().to_string();
    // Something for the operations on an app to find.
    daemon.cli_ok(&["app", "create", "web", "--image", &registry.reference("demo/none:1"), "--port", "8080"]);

    // The served document is the one in the repository.
    let served = Command::new("curl")
        .args(["-sS", "--max-time", "10", "-H", &format!("Authorization: Bearer {token}")])
        .arg(format!("http://127.0.0.1:{port}/v1/openapi.json"))
        .output()
        .expect("run curl");
    let served = String::from_utf8_lossy(&served.stdout).into_owned();
    let file = std::fs::read_to_string(common::workspace_root().join("src/api/openapi.json")).expect("read document");
    assert_eq!(served, file, "GET /v1/openapi.json is not src/api/openapi.json");

    let work = tempfile::Builder::new().prefix("dlv-test-schemathesis-").tempdir().expect("temp dir");
    std::fs::write(work.path().join("openapi.json"), without_follow(&file)).expect("write the document");
    // A registry that cannot be reached (here: any but the test's) is a 502, as documented:
    // the daemon's answer, not its failure.
    let config = work.path().join("schemathesis.toml");
    std::fs::write(
        &config,
        "[[operations]]\n\
         include-operation-id-regex = \"^(pullImage|startApp|configApp|deployApp)$\"\n\
         checks.not_a_server_error.expected-statuses = [\"2xx\", \"3xx\", \"4xx\", \"502\"]\n",
    )
    .expect("write the schemathesis config");
    run_schemathesis(&bin, &daemon, work.path(), &config, port, &token, &[]);
    // The daemon is still there, and answers.
    daemon.cli_ok(&["app", "ls"]);
}

/// Runs schemathesis on `work/openapi.json` against the daemon's TCP API; fails the test with
/// its report (and the daemon's log) unless it passes.
fn run_schemathesis(bin: &Path, daemon: &Daemon, work: &Path, config: &Path, port: u16, token: &str, extra: &[&str]) {
    let started = Instant::now();
    let mut cmd = Command::new(bin);
    cmd.arg("--config-file")
        .arg(config)
        .arg("run")
        .arg(work.join("openapi.json"))
        .args(["--url", &format!("http://127.0.0.1:{port}")])
        .args(["-H", &format!("Authorization: Bearer {token}")])
        .args(["--checks", "not_a_server_error,response_schema_conformance,content_type_conformance"])
        .args(["--max-examples", "100", "--seed", "7", "--workers", "1", "--request-timeout", "60"])
        .args(["--phases", "examples,coverage,fuzzing"])
        .args(["--suppress-health-check", "all", "--no-color"])
        .args(extra)
        // More flags when investigating, e.g. `--include-path /v1/apps/{name}/logs`.
        .args(std::env::var("DLV_SCHEMATHESIS_ARGS").unwrap_or_default().split_whitespace())
        .current_dir(work)
        .env("HOME", work)
        .env("SCHEMATHESIS_TELEMETRY", "false");
    let out = run_with_timeout(&mut cmd, Duration::from_secs(600)).expect("run schemathesis");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "schemathesis failed ({}):\n{stdout}\n{}\n--- daemon log ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        daemon.log_tail(40)
    );
    eprintln!(
        "schemathesis passed in {:?}:\n{}",
        started.elapsed(),
        stdout.lines().rev().take(30).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n")
    );
}

/// The document with `example` set on every `name` path parameter: the examples phase then
/// asks about that app, which exists, and its real answers are checked against the schemas.
fn with_app_examples(doc: &str, app: &str) -> String {
    let mut doc: Value = serde_json::from_str(doc).expect("the document is JSON");
    if let Some(paths) = doc["paths"].as_object_mut() {
        for (path, item) in paths.iter_mut() {
            if !path.starts_with("/v1/apps/{name}") {
                continue;
            }
            for p in item["parameters"].as_array_mut().into_iter().flatten() {
                if p["name"] == "name" {
                    p["example"] = Value::String(app.to_string());
                }
            }
        }
    }
    doc.to_string()
}

/// Read-only operations against an app with real instances, a deploy behind it and an exit
/// the supervisor recovered from: the answers (instances with health, restarts and last exit,
/// the last deploy, revisions, events of every kind so far) match the document. Only `GET`s:
/// generated changes to a running app would start real work (up to 1000 instances).
#[test]
fn answers_about_a_running_app_match_the_document() {
    let bin = schemathesis();
    let registry = Registry::start();
    let image = common::push_testapp(&registry, "demo/testapp:1");
    let port = free_port();
    let daemon = Daemon::start_with_args(&registry, &["--api-listen", &format!("127.0.0.1:{port}"), "--api-insecure"]);
    let token = daemon.cli_ok(&["token", "create", "--name", "schemathesis"]).trim().to_string();
    daemon.cli_ok(&[
        "app",
        "create",
        "web",
        "--image",
        &image.reference,
        "--port",
        "8080",
        "--instances",
        "2",
        "--health",
        "/health",
        "--stop-timeout",
        "5",
        "--restart",
        "on-failure",
    ]);
    daemon.cli_ok(&["app", "start", "web"]);
    daemon.cli_ok(&["app", "deploy", "web", "-e", "MODE=two"]);
    // One instance exits on its own with code 3; the policy replaces it.
    let (status, _) = common::http_get(daemon.proxy_addr(), "web.localhost", "/exit?code=3");
    assert_eq!(status, 200);
    let recovered = common::wait_until(Duration::from_secs(60), || {
        let app = daemon.cli_json(&["app", "show", "web", "--json"]);
        let running = app["instances"].as_array().map_or(0, |i| i.iter().filter(|i| i["state"] == "running").count());
        app["restarts"]["count"].as_u64() >= Some(1) && running == 2
    });
    assert!(recovered, "the exited instance was not replaced: {}", daemon.cli_ok(&["app", "show", "web"]));
    let shown = daemon.cli_json(&["app", "show", "web", "--json"]);
    assert!(shown["last_deploy"].is_object() && shown["restarts"]["last_exit_reason"]["code"] == 3, "{shown}");

    let work = tempfile::Builder::new().prefix("dlv-test-schemathesis-").tempdir().expect("temp dir");
    let file = std::fs::read_to_string(common::workspace_root().join("src/api/openapi.json")).expect("read document");
    std::fs::write(work.path().join("openapi.json"), with_app_examples(&without_follow(&file), "web"))
        .expect("write the document");
    let config = work.path().join("schemathesis.toml");
    std::fs::write(&config, "").expect("write the schemathesis config");
    run_schemathesis(&bin, &daemon, work.path(), &config, port, &token, &["--include-method", "GET"]);
    daemon.cli_ok(&["app", "rm", "web"]);
}
