//! Declarative apps through the CLI: `deliverous apply -f FILE` creates, changes, starts, scales
//! and prunes apps to match a TOML file, shows what it does first, and does nothing the second
//! time; `deliverous app export` writes a file that applies back as "up to date".

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{http_get_retry, Daemon, Registry};
use serde_json::Value;

const PROXY_TIMEOUT: Duration = Duration::from_secs(30);

/// Two apps: `web` with the given greeting, memory and instances, and `api`.
fn two_apps(image: &str, greeting: &str, memory: &str, instances: u32) -> String {
    format!(
        r#"# web and api
[apps.web]
image = "{image}"
port = 8080
instances = {instances}
memory = "{memory}"
domains = ["www.example.test"]

[apps.web.env]
GREETING = "{greeting}"

[apps.web.health]
path = "/health"
interval = "500ms"

[apps.api]
image = "{image}"
port = 8080
cpus = 0.5
pids = 256

[apps.api.proxy]
read_timeout = "30s"
balance = "round-robin"
"#
    )
}

/// Writes `text` to `dir/name` and returns the path as a string for the CLI.
fn write(dir: &Path, name: &str, text: &str) -> String {
    let path: PathBuf = dir.join(name);
    std::fs::write(&path, text).expect("write the apps file");
    path.display().to_string()
}

/// Per app: the revision number, the desired count and the ids of its instances: what any
/// change of configuration or scale would move.
fn state(daemon: &Daemon) -> BTreeMap<String, (Value, Value, Vec<String>)> {
    let apps = daemon.cli_json(&["app", "ls", "--json"]);
    apps.as_array()
        .into_iter()
        .flatten()
        .map(|a| {
            let ids = a["instances"].as_array().into_iter().flatten().map(|i| i["id"].to_string()).collect();
            (
                a["name"].as_str().unwrap_or("").to_string(),
                (a["revision"]["number"].clone(), a["instances_desired"].clone(), ids),
            )
        })
        .collect()
}

fn lines(text: &str) -> Vec<&str> {
    text.lines().collect()
}

/// What `app show --json` says about an app's configuration (not its instances or times).
fn config(daemon: &Daemon, app: &str) -> Value {
    let mut show = daemon.cli_json(&["app", "show", app, "--json"]);
    let obj = show.as_object_mut().expect("an object");
    for key in ["instances", "revision", "restarts", "created_at", "updated_at", "hosts"] {
        obj.remove(key);
    }
    if let Some(domains) = obj.get_mut("domains").and_then(Value::as_array_mut) {
        domains.sort_by_key(|d| d.to_string());
    }
    show
}

#[test]
fn a_file_creates_starts_and_scales_apps_and_applying_it_again_changes_nothing() {
    let registry = Registry::start();
    let image = common::push_testapp(&registry, "demo/testapp:1");
    let daemon = Daemon::start(&registry);
    let dir = tempfile::tempdir().expect("temp dir");
    let file = write(dir.path(), "deliverous.toml", &two_apps(&image.reference, "hello", "128M", 2));

    let out = daemon.cli_ok(&["apply", "-f", &file]);
    for line in
        ["+ app api", "+ app web", "web: memory 128M", "web: + env GREETING=hello", "web: instances 2", "web: start"]
    {
        assert!(lines(&out).contains(&line), "no {line:?} in:\n{out}");
    }
    let web = daemon.cli_json(&["app", "show", "web", "--json"]);
    assert_eq!(
        (&web["state"], &web["instances_desired"], &web["memory"]),
        (&"running".into(), &2.into(), &"128M".into())
    );
    assert_eq!(web["instances"].as_array().map(Vec::len), Some(2), "{web}");
    assert_eq!(web["routing"]["health"]["path"], "/health");
    let api = daemon.cli_json(&["app", "show", "api", "--json"]);
    assert_eq!((&api["state"], &api["instances_desired"], &api["pids"]), (&"running".into(), &1.into(), &256.into()));
    assert_eq!(
        (&api["routing"]["balance"], &api["routing"]["read_timeout_ms"]),
        (&"round-robin".into(), &30_000.into())
    );

    // Both reachable through the proxy, by name and by domain, with their environment.
    http_get_retry(daemon.proxy_addr(), "web.localhost", "/", PROXY_TIMEOUT, |s, _| s == 200);
    http_get_retry(daemon.proxy_addr(), "api.localhost", "/", PROXY_TIMEOUT, |s, b| s == 200 && b.contains("api.1"));
    http_get_retry(daemon.proxy_addr(), "www.example.test", "/env/GREETING", PROXY_TIMEOUT, |s, b| {
        s == 200 && b.contains("hello")
    });

    // Idempotent: the same file again plans nothing and moves nothing.
    let before = state(&daemon);
    let again = daemon.cli_ok(&["apply", "-f", &file]);
    assert_eq!(lines(&again), ["api: up to date", "web: up to date"]);
    assert_eq!(state(&daemon), before);
}

#[test]
fn the_plan_shows_exactly_the_changes_and_dry_run_makes_none() {
    let registry = Registry::start();
    let image = common::push_testapp(&registry, "demo/testapp:1");
    let daemon = Daemon::start(&registry);
    let dir = tempfile::tempdir().expect("temp dir");
    let v1 = write(dir.path(), "v1.toml", &two_apps(&image.reference, "hello", "128M", 2));
    let v2 = write(dir.path(), "v2.toml", &two_apps(&image.reference, "bonjour", "256M", 3));
    daemon.cli_ok(&["apply", "-f", &v1]);
    let before = state(&daemon);
    let web_before = daemon.cli_json(&["app", "show", "web", "--json"]);

    let expected =
        ["api: up to date", "web: env GREETING: hello → bonjour", "web: memory 128M → 256M", "web: instances 2 → 3"];
    let dry = daemon.cli_ok(&["apply", "-f", &v2, "--dry-run"]);
    assert_eq!(lines(&dry), [&expected[..], &["dry run: nothing changed"]].concat());
    let plan = daemon.cli_json(&["apply", "-f", &v2, "--dry-run", "--json"]);
    assert_eq!(plan["dry_run"], true);
    let web_plan = plan["apps"].as_array().and_then(|a| a.iter().find(|p| p["name"] == "web")).expect("web");
    assert_eq!(web_plan["action"], "update");
    let change = &web_plan["changes"][1];
    assert_eq!((&change["field"], &change["from"], &change["to"]), (&"memory".into(), &"128M".into(), &"256M".into()));
    assert_eq!(state(&daemon), before, "a dry run changed something");
    assert_eq!(daemon.cli_json(&["app", "show", "web", "--json"])["env"], web_before["env"]);

    let out = daemon.cli_ok(&["apply", "-f", &v2]);
    assert_eq!(lines(&out)[..4], expected, "{out}");
    let web = daemon.cli_json(&["app", "show", "web", "--json"]);
    assert_eq!(
        (&web["env"]["GREETING"], &web["memory"], &web["instances_desired"]),
        (&"bonjour".into(), &"256M".into(), &3.into())
    );
    let rev = |v: &Value| v["revision"]["number"].as_u64().unwrap_or(0);
    assert_eq!(rev(&web), rev(&web_before) + 1, "one new revision for the whole change: {web}");
    assert_eq!(web["instances"].as_array().map(Vec::len), Some(3), "{web}");
    assert_eq!(state(&daemon)["api"], before["api"], "api was not in the plan");
    http_get_retry(daemon.proxy_addr(), "web.localhost", "/env/GREETING", PROXY_TIMEOUT, |s, b| {
        s == 200 && b.contains("bonjour")
    });
    assert_eq!(lines(&daemon.cli_ok(&["apply", "-f", &v2])), ["api: up to date", "web: up to date"]);
}

#[test]
fn an_exported_file_applies_back_as_up_to_date_and_recreates_the_app() {
    let registry = Registry::start();
    let image = common::push_testapp(&registry, "demo/testapp:1");
    let daemon = Daemon::start(&registry);
    let tcp = format!("{}:7000", common::free_port());
    #[rustfmt::skip]
    daemon.cli_ok(&[
        "app", "create", "shop", "--image", &image.reference, "--port", "8080", "--instances", "2",
        "-e", "MODE=prod", "-e", "QUOTE=it's \"fine\"", "--memory", "64M", "--cpus", "0.25",
        "--cpu-weight", "50", "--pids", "128", "--stop-timeout", "5", "--cap-drop", "NET_RAW",
        "--cap-add", "sys_ptrace", "--domain", "shop.example.test", "--domain", "Example.test/api",
        "-v", "shopdata:/data", "--health", "/health", "--health-interval", "1s", "--health-rise", "1",
        "--balance", "round-robin", "--read-timeout", "90s", "--max-body", "10M", "--strip-prefix",
        "--drain-timeout", "5s", "--tcp", &tcp,
    ]);
    daemon.cli_ok(&["app", "start", "shop"]);
    daemon.cli_ok(&["app", "create", "idle", "--image", &image.reference, "--port", "8080", "--instances", "0"]);

    let exported = daemon.cli_ok(&["app", "export", "--all"]);
    assert!(exported.contains("[apps.shop]") && exported.contains("[apps.idle]"), "{exported}");
    assert!(exported.contains("running = false"), "idle is stopped:\n{exported}");
    let dir = tempfile::tempdir().expect("temp dir");
    let file = write(dir.path(), "exported.toml", &exported);
    let before = state(&daemon);
    let out = daemon.cli_ok(&["apply", "-f", &file]);
    assert_eq!(lines(&out), ["idle: up to date", "shop: up to date"], "exported:\n{exported}");
    assert_eq!(state(&daemon), before);

    let one = daemon.cli_ok(&["app", "export", "shop"]);
    assert!(one.contains("[apps.shop]") && !one.contains("[apps.idle]"), "{one}");
    let missing = daemon.cli(&["app", "export", "nope"]);
    assert_eq!(missing.status.code(), Some(1), "{missing:?}");

    // The file is the app: removed, it comes back with the same configuration.
    let shop = config(&daemon, "shop");
    daemon.cli_ok(&["app", "rm", "shop"]);
    let out = daemon.cli_ok(&["apply", "-f", &file]);
    assert!(lines(&out).contains(&"+ app shop"), "{out}");
    assert_eq!(config(&daemon, "shop"), shop);
    http_get_retry(daemon.proxy_addr(), "shop.localhost", "/env/QUOTE", PROXY_TIMEOUT, |s, b| {
        s == 200 && b.contains("it's \"fine\"")
    });
}

#[test]
fn a_bad_file_is_refused_with_where_and_why_and_changes_nothing() {
    let registry = Registry::start();
    let daemon = Daemon::start(&registry);
    let image = registry.reference("demo/testapp:1");
    daemon.cli_ok(&["app", "create", "web", "--image", &image, "--port", "8080"]);
    let before = daemon.cli_ok(&["app", "ls", "--json"]);
    let dir = tempfile::tempdir().expect("temp dir");
    // A good app beside the bad one: it is not created either.
    let good = format!("[apps.fresh]\nimage = \"{image}\"\nport = 8080\nrunning = false\n");
    let cases = [
        (
            "unknown.toml",
            format!("[apps.web]\nimage = \"{image}\"\nport = 8080\ncolour = \"blue\"\n"),
            vec!["unknown.toml:4:1: app web: unknown field `colour`"],
        ),
        (
            "size.toml",
            format!("[apps.web]\nimage = \"{image}\"\nport = 8080\nmemory = \"12X\"\n"),
            vec!["size.toml:4:10: app web: invalid size \"12X\""],
        ),
        (
            "restart.toml",
            format!("[apps.web]\nimage = \"{image}\"\nport = 8080\nrestart = \"sometimes\"\n"),
            vec!["restart.toml:4:11: app web: unknown variant `sometimes`, expected one of `always`, `on-failure`, `never`"],
        ),
        ("syntax.toml", format!("[apps.web]\nimage = \"{image}\nport = 8080\n"), vec!["syntax.toml:2:"]),
        (
            "two.toml",
            format!("[apps.web]\nimage = \"{image}\"\nport = 0\n[apps.b]\nport = 1\n"),
            vec!["app b: missing field `image`", "app web: invalid port 0"],
        ),
    ];
    for (name, text, messages) in cases {
        let path = write(dir.path(), name, &format!("{text}{good}"));
        let out = daemon.cli(&["apply", "-f", &path]);
        assert_eq!(out.status.code(), Some(2), "{name}: {out:?}");
        for m in messages {
            assert!(out.stderr.contains(m), "{name}: no {m:?} in:\n{}", out.stderr);
        }
        assert_eq!(out.stdout, "", "{name}: no plan for a bad file");
        assert_eq!(daemon.cli_ok(&["app", "ls", "--json"]), before, "{name} changed something");
    }
    let out = daemon.cli(&["apply", "-f", &dir.path().join("absent.toml").display().to_string()]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(out.stderr.contains("cannot read"), "{}", out.stderr);
}

#[test]
fn prune_removes_undeclared_apps_only_when_asked_and_stdin_works() {
    let registry = Registry::start();
    let daemon = Daemon::start(&registry);
    let image = registry.reference("demo/testapp:1");
    let app = |name: &str, instances: u32| {
        format!("[apps.{name}]\nimage = \"{image}\"\nport = 8080\ninstances = {instances}\nrunning = false\n")
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let both = write(dir.path(), "both.toml", &format!("{}{}", app("keep", 1), app("old", 1)));
    let out = daemon.cli_ok(&["apply", "-f", &both]);
    assert!(lines(&out).contains(&"+ app old") && !out.contains("start"), "{out}");
    let names = |d: &Daemon| state(d).into_keys().collect::<Vec<_>>();
    assert_eq!(names(&daemon), ["keep", "old"]);

    let one = write(dir.path(), "one.toml", &app("keep", 1));
    assert_eq!(lines(&daemon.cli_ok(&["apply", "-f", &one])), ["keep: up to date"]);
    assert_eq!(names(&daemon), ["keep", "old"], "removed without --prune");
    let dry = daemon.cli_ok(&["apply", "-f", &one, "--prune", "--dry-run"]);
    assert_eq!(lines(&dry), ["keep: up to date", "- app old", "dry run: nothing changed"]);
    assert_eq!(names(&daemon), ["keep", "old"]);
    let out = daemon.cli_ok(&["apply", "-f", &one, "--prune"]);
    assert_eq!(lines(&out), ["keep: up to date", "- app old", "removed app old"]);
    assert_eq!(names(&daemon), ["keep"]);

    // `-f -` reads the file from standard input.
    let mut child = Command::new(env!("CARGO_BIN_EXE_deliverous"))
        .args(["--host", &format!("unix:{}", daemon.socket().display()), "apply", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run deliverous apply");
    child.stdin.take().expect("stdin").write_all(app("keep", 4).as_bytes()).expect("write stdin");
    let out = child.wait_with_output().expect("wait for deliverous apply");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(lines(&stdout)[0], "keep: instances 1 → 4", "{stdout}");
    assert_eq!(state(&daemon)["keep"].1, 4);
}
