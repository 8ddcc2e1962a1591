//! Private registries: a pull without credentials says how to log in, `deliverous registry
//! login` checks the credentials and keeps them (0600) for the daemon, `logout` forgets them.

mod common;

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};

use common::{http_get, Daemon, Registry};

/// `deliverous registry login HOST -u USER --password-stdin`, with the daemon's auth file.
fn login(daemon: &Daemon, host: &str, user: &str, password: &str) -> (bool, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_deliverous"))
        .args(["registry", "login", host, "-u", user, "--password-stdin"])
        .env("DELIVEROUS_AUTH_FILE", daemon.auth_file())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run deliverous registry login");
    child.stdin.take().expect("stdin").write_all(format!("{password}\n").as_bytes()).expect("write password");
    let out = child.wait_with_output().expect("wait for login");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

#[test]
fn a_private_registry_needs_a_login_and_the_daemon_uses_it() {
    let registry = Registry::start_with_login("deploy", "s3cret-Pa55");
    let image = common::push_busybox_httpd(&registry, "private/httpd:1");
    let daemon = Daemon::start(&registry);
    let host = registry.addr();

    let out = daemon.cli(&["image", "pull", &image.reference]);
    assert!(!out.success(), "pulled without credentials: {out:?}");
    assert!(out.stderr.contains("registry login"), "the error should say how to log in: {}", out.stderr);

    let (ok, text) = login(&daemon, host, "deploy", "wrong");
    assert!(!ok, "a wrong password was accepted: {text}");
    assert!(text.contains("deploy"), "the refusal should name the user: {text}");
    assert!(!daemon.auth_file().exists(), "refused credentials were saved");

    let (ok, text) = login(&daemon, host, "deploy", "s3cret-Pa55");
    assert!(ok, "login failed: {text}");
    let mode = std::fs::metadata(daemon.auth_file()).expect("auth file written").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the auth file must be readable by root only");
    let saved = std::fs::read_to_string(daemon.auth_file()).expect("read auth file");
    assert!(saved.contains(host) && !saved.contains("s3cret-Pa55"), "expected a base64 entry for {host}: {saved}");

    // The running daemon picks the credentials up at the next pull: no restart.
    daemon.cli_ok(&["app", "create", "web", "--image", &image.reference, "--port", "8080"]);
    daemon.cli_ok(&["app", "start", "web"]);
    let (status, body) = http_get(daemon.proxy_addr(), "web.localhost", "/");
    assert_eq!(status, 200, "{body}");

    let out = Command::new(env!("CARGO_BIN_EXE_deliverous"))
        .args(["registry", "logout", host])
        .env("DELIVEROUS_AUTH_FILE", daemon.auth_file())
        .output()
        .expect("run logout");
    assert!(out.status.success(), "{out:?}");
    assert!(!std::fs::read_to_string(daemon.auth_file()).unwrap_or_default().contains(host));
}

#[test]
fn login_without_a_password_source_is_a_usage_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_deliverous"))
        .args(["registry", "login", "127.0.0.1:1", "-u", "x"])
        .env("DELIVEROUS_AUTH_FILE", "/nonexistent/auth.json")
        .stdin(Stdio::null())
        .output()
        .expect("run login");
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--password-stdin"));
}
