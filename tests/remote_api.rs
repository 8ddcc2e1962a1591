//! The API over TCP: TLS with the operator's certificate, a bearer token on every request,
//! tokens managed over the unix socket only, plain HTTP only on loopback with --api-insecure.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{free_port, run_with_timeout, Daemon, Registry};

const BINARY: &str = env!("CARGO_BIN_EXE_deliverous");

/// A test CA (`DIR/ca.pem`) and a certificate it signed for localhost and 127.0.0.1
/// (`DIR/api.crt`, `DIR/api.key`).
fn issue_cert(dir: &Path) {
    let script = "set -e; \
        openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
           -keyout ca.key -out ca.pem -days 2 -subj /CN=dlv-test-ca 2>/dev/null; \
        openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout api.key \
           -out api.csr -subj /CN=api 2>/dev/null; \
        printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\\n' > api.ext; \
        openssl x509 -req -in api.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out api.crt -days 2 \
           -extfile api.ext 2>/dev/null; \
        chmod 600 api.key";
    let status = Command::new("bash").args(["-c", script]).current_dir(dir).status().expect("run openssl");
    assert!(status.success(), "openssl failed");
}

/// The CLI pointed at `host` (not at the daemon's socket), with `token` if given.
fn remote_cli(host: &str, ca: &Path, token: Option<&str>, args: &[&str]) -> common::CliOutput {
    let mut cmd = Command::new(BINARY);
    cmd.args(["--host", host, "--ca"]).arg(ca).args(args).env_remove("DELIVEROUS_HOST").env("NO_COLOR", "1");
    match token {
        Some(t) => cmd.env("DELIVEROUS_TOKEN", t),
        None => cmd.env_remove("DELIVEROUS_TOKEN"),
    };
    let out = run_with_timeout(&mut cmd, Duration::from_secs(60)).expect("run the CLI");
    common::CliOutput {
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `curl` over TLS trusting the test CA: (status, body).
fn curl(url: &str, ca: &Path, headers: &[&str]) -> (String, String) {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--max-time", "10", "--cacert"]).arg(ca).args(["-w", "\n%{http_code}"]);
    for h in headers {
        cmd.args(["-H", h]);
    }
    let out = cmd.arg(url).output().expect("run curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.to_string(), format!("{body}{}", String::from_utf8_lossy(&out.stderr)))
}

fn rfc3339_in(secs: i64) -> String {
    let out = Command::new("date").args(["-u", "-d", &format!("+{secs} seconds"), "+%Y-%m-%dT%H:%M:%SZ"]).output();
    String::from_utf8_lossy(&out.expect("run date").stdout).trim().to_string()
}

#[test]
fn tcp_api_needs_tls_and_a_valid_token() {
    let certs = tempfile::Builder::new().prefix("dlv-test-certs-").tempdir().expect("temp dir");
    issue_cert(certs.path());
    let (cert, key, ca) = (certs.path().join("api.crt"), certs.path().join("api.key"), certs.path().join("ca.pem"));
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let registry = Registry::start();
    let daemon = Daemon::start_with_args(
        &registry,
        &[
            "--api-listen",
            &listen,
            "--api-tls-cert",
            cert.to_str().expect("utf-8 path"),
            "--api-tls-key",
            key.to_str().expect("utf-8 path"),
        ],
    );
    let host = format!("https://localhost:{port}");

    // No token: 401 with a JSON error, for known and unknown paths alike.
    let (code, body) = curl(&format!("{host}/v1/apps"), &ca, &[]);
    assert_eq!(code, "401", "{body}");
    let error: serde_json::Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    assert!(error["error"].as_str().is_some_and(|e| e.contains("token")), "{body}");
    let (code, body) = curl(&format!("{host}/nowhere"), &ca, &[]);
    assert_eq!(code, "401", "{body}");
    let (code, body) = curl(&format!("{host}/v1/apps"), &ca, &["Authorization: Basic YTpi"]);
    assert_eq!(code, "401", "{body}");
    let log = std::fs::read_to_string(daemon.log_path()).unwrap_or_default();
    assert!(
        log.lines().any(|l| l.contains("API request refused") && l.contains("127.0.0.1:") && l.contains("/nowhere")),
        "refusals are not logged with the client's address:\n{log}"
    );
    let out = remote_cli(&host, &ca, None, &["app", "ls"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(out.stderr.contains("401") && out.stderr.contains("DELIVEROUS_TOKEN"), "{}", out.stderr);

    // Tokens are made over the socket; the secret is printed once, only its hash is kept.
    let token = daemon.cli_ok(&["token", "create", "--name", "ci"]).trim().to_string();
    assert!(token.starts_with("dlv_") && token.len() > 40, "{token:?}");
    let db = std::fs::read(daemon.data_dir().join("state.db")).unwrap_or_default();
    assert!(!String::from_utf8_lossy(&db).contains(&token), "the token is stored in clear");
    let again = daemon.cli(&["token", "create", "--name", "ci"]);
    assert_eq!(again.status.code(), Some(1), "{again:?}");

    // With it, over TLS, the CLI works.
    let apps = remote_cli(&host, &ca, Some(&token), &["app", "ls", "--json"]);
    assert!(apps.success(), "{apps:?}");
    assert_eq!(apps.stdout.trim(), "[]");
    let (code, body) = curl(&format!("{host}/v1/openapi.json"), &ca, &[&format!("Authorization: Bearer {token}")]);
    assert_eq!(code, "200", "{body}");
    assert!(body.contains("\"openapi\""), "{body}");
    let (code, body) = curl(&format!("{host}/metrics"), &ca, &[&format!("Authorization: bearer {token}")]);
    assert_eq!(code, "200", "{body}");

    // Without the CA, the certificate is not trusted.
    let mut cmd = Command::new(BINARY);
    cmd.args(["--host", &host, "app", "ls"]).env("DELIVEROUS_TOKEN", &token).env_remove("DELIVEROUS_CA");
    let out = run_with_timeout(&mut cmd, Duration::from_secs(30)).expect("run the CLI");
    assert_eq!(out.status.code(), Some(3), "{}", String::from_utf8_lossy(&out.stderr));

    // A wrong token, or one of the right length with one character changed.
    let wrong = remote_cli(&host, &ca, Some("dlv_0000"), &["app", "ls"]);
    assert_eq!(wrong.status.code(), Some(1), "{wrong:?}");
    assert!(wrong.stderr.contains("401"), "{}", wrong.stderr);
    let mut altered = token.clone().into_bytes();
    let last = altered.len() - 1;
    altered[last] = if altered[last] == b'0' { b'1' } else { b'0' };
    let altered = String::from_utf8(altered).expect("ascii");
    let (code, body) = curl(&format!("{host}/v1/apps"), &ca, &[&format!("Authorization: Bearer {altered}")]);
    assert_eq!(code, "401", "{body}");

    // Token management is refused over TCP, even with a valid token.
    for args in [&["token", "create", "--name", "more"][..], &["token", "ls"], &["token", "rm", "ci"]] {
        let out = remote_cli(&host, &ca, Some(&token), args);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {out:?}");
        assert!(out.stderr.contains("403") && out.stderr.contains("unix socket"), "{args:?}: {}", out.stderr);
    }

    // Listed with its last use; expired and removed tokens are refused.
    let tokens = daemon.cli_json(&["token", "ls", "--json"]);
    let ci = tokens.as_array().and_then(|t| t.iter().find(|t| t["name"] == "ci")).expect("token ci listed");
    assert!(ci["last_used_at"].is_string(), "{ci}");
    assert_eq!(ci["expires_at"], serde_json::Value::Null);
    assert!(ci.get("hash").is_none() && ci.get("token").is_none(), "{ci}");
    let table = daemon.cli_ok(&["token", "ls"]);
    assert!(table.contains("NAME") && table.contains("ci") && table.contains("never"), "{table}");

    let soon = daemon.cli_json(&["token", "create", "--name", "soon", "--expires", &rfc3339_in(3), "--json"]);
    let short = soon["token"].as_str().expect("token").to_string();
    assert!(remote_cli(&host, &ca, Some(&short), &["app", "ls"]).success());
    std::thread::sleep(Duration::from_secs(4));
    let out = remote_cli(&host, &ca, Some(&short), &["app", "ls"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(out.stderr.contains("expired"), "{}", out.stderr);
    let table = daemon.cli_ok(&["token", "ls"]);
    assert!(table.contains("(expired)"), "{table}");
    let bad = daemon.cli(&["token", "create", "--expires", "soon"]);
    assert_eq!(bad.status.code(), Some(1), "{bad:?}");
    assert!(bad.stderr.contains("invalid expiry"), "{}", bad.stderr);

    daemon.cli_ok(&["token", "rm", "ci"]);
    let out = remote_cli(&host, &ca, Some(&token), &["app", "ls"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(out.stderr.contains("401"), "{}", out.stderr);
    let gone = daemon.cli(&["token", "rm", "ci"]);
    assert_eq!(gone.status.code(), Some(1), "{gone:?}");

    // The unix socket needs no token.
    daemon.cli_ok(&["app", "ls"]);
    // Creations and removals are events.
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10", "--unix-socket"])
        .arg(daemon.socket())
        .arg("http://localhost/v1/events")
        .output()
        .expect("run curl");
    let events = String::from_utf8_lossy(&out.stdout);
    assert!(events.lines().any(|l| l.contains("token_created") && l.contains("API token ci ")), "{events}");
    assert!(events.lines().any(|l| l.contains("token_removed") && l.contains("API token ci ")), "{events}");

    // A renewed certificate (here from another CA) is served without a restart; a handshake
    // answers at all (401: no token) only when the client trusts the CA that signed it.
    let renewed = tempfile::Builder::new().prefix("dlv-test-certs-").tempdir().expect("temp dir");
    issue_cert(renewed.path());
    let new_ca = renewed.path().join("ca.pem");
    assert_eq!(curl(&format!("{host}/v1/apps"), &new_ca, &[]).0, "000", "the new CA is trusted before the renewal");
    std::fs::copy(renewed.path().join("api.key"), &key).expect("renew the key");
    std::fs::copy(renewed.path().join("api.crt"), &cert).expect("renew the certificate");
    assert!(
        common::wait_until(Duration::from_secs(20), || curl(&format!("{host}/v1/apps"), &new_ca, &[]).0 == "401"),
        "the renewed certificate was not picked up:\n{}",
        daemon.log_tail(20)
    );
    assert_eq!(curl(&format!("{host}/v1/apps"), &ca, &[]).0, "000", "the old certificate is still served");
}

/// `deliverous daemon` with its own dirs and `extra` flags; what it printed, if it exited.
fn daemon_refuses(dir: &Path, extra: &[&str]) -> String {
    let mut cmd = Command::new(BINARY);
    cmd.arg("daemon")
        .arg("--data-dir")
        .arg(dir.join("data"))
        .arg("--run-dir")
        .arg(dir.join("run"))
        .args(["--http-listen", &format!("127.0.0.1:{}", free_port())])
        .args(["--bridge", "dlvtnever", "--nft-table", "dlv_never", "--cgroup-parent", "dlv-never"])
        .args(extra);
    let out = run_with_timeout(&mut cmd, Duration::from_secs(30)).expect("the daemon exits at once");
    assert!(!out.status.success(), "the daemon started with {extra:?}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn plain_tcp_only_on_loopback_and_only_when_asked() {
    let dir = tempfile::Builder::new().prefix("dlv-test-flags-").tempdir().expect("temp dir");
    let any = format!("0.0.0.0:{}", free_port());
    let err = daemon_refuses(dir.path(), &["--api-listen", &any, "--api-insecure"]);
    assert!(err.contains("loopback"), "{err}");
    let err = daemon_refuses(dir.path(), &["--api-listen", &format!("127.0.0.1:{}", free_port())]);
    assert!(err.contains("--api-tls-cert"), "{err}");
    let missing: PathBuf = dir.path().join("missing.pem");
    let missing = missing.to_str().expect("utf-8 path");
    let err = daemon_refuses(
        dir.path(),
        &["--api-listen", &format!("127.0.0.1:{}", free_port()), "--api-tls-cert", missing, "--api-tls-key", missing],
    );
    assert!(err.contains("missing.pem"), "{err}");
    let err = daemon_refuses(dir.path(), &["--api-insecure"]);
    assert!(err.contains("--api-listen"), "{err}");
    // Nothing was left behind: no socket, no bridge.
    assert!(!dir.path().join("run/api.sock").exists());
    assert!(common::leaks().lines().all(|l| !l.contains("dlvtnever") && !l.contains("dlv_never")));
}
