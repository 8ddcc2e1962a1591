//! CLI habits: every user-facing command's `--help` has examples, `deliverous --help` documents
//! the exit codes and they are the ones a script sees (2 bad usage, 3 no daemon, 1 refused,
//! the command's own for exec/run), every `--json` prints JSON that parses, tables line up, and
//! a stop timeout goes back to the daemon's default (`--stop-timeout default`, apply, export).

mod common;

use std::process::Command;
use std::time::Duration;

use common::{free_port, run_with_timeout, Daemon, Registry};
use serde_json::Value;

const BINARY: &str = env!("CARGO_BIN_EXE_deliverous");

/// `deliverous ARGS` without a daemon behind `--host` (help, usage errors, unreachable daemon).
fn run(args: &[&str]) -> (Option<i32>, String, String) {
    let mut cmd = Command::new(BINARY);
    cmd.args(args).env_remove("DELIVEROUS_HOST").env_remove("DELIVEROUS_TOKEN").env("NO_COLOR", "1");
    let out = run_with_timeout(&mut cmd, Duration::from_secs(60)).expect("run deliverous");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The names in the `Commands:` section of a help text (without `help`).
fn subcommands(help: &str) -> Vec<String> {
    let Some(start) = help.find("Commands:\n") else { return Vec::new() };
    help[start + "Commands:\n".len()..]
        .lines()
        .take_while(|l| !l.trim().is_empty())
        // Entries start with two spaces; wrapped descriptions are indented further.
        .filter(|l| l.starts_with("  ") && !l.starts_with("   "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| *name != "help")
        .map(str::to_string)
        .collect()
}

#[test]
fn every_command_has_examples_and_the_exit_codes_are_documented() {
    let (code, top, _) = run(&["--help"]);
    assert_eq!(code, Some(0));
    assert!(top.contains("Exit codes:"), "deliverous --help documents no exit codes:\n{top}");
    for line in ["0  done", "1  the daemon refused", "2  bad usage", "3  the daemon cannot be reached"] {
        assert!(top.contains(line), "deliverous --help lacks {line:?}:\n{top}");
    }
    let mut pending: Vec<Vec<String>> = subcommands(&top).into_iter().map(|c| vec![c]).collect();
    assert!(pending.len() > 10, "too few commands found in:\n{top}");
    let mut checked = 0;
    let mut missing = Vec::new();
    while let Some(path) = pending.pop() {
        let mut args: Vec<&str> = path.iter().map(String::as_str).collect();
        args.push("--help");
        let (code, help, stderr) = run(&args);
        assert_eq!(code, Some(0), "deliverous {}: {stderr}", args.join(" "));
        if !help.contains("Example") {
            missing.push(path.join(" "));
        }
        for sub in subcommands(&help) {
            let mut p = path.clone();
            p.push(sub);
            pending.push(p);
        }
        checked += 1;
    }
    assert!(checked > 30, "only {checked} commands checked");
    assert!(missing.is_empty(), "--help without examples: {missing:?}");
}

#[test]
fn bad_usage_exits_2_and_an_unreachable_daemon_exits_3() {
    let usage: [&[&str]; 6] = [
        &["app", "frobnicate"],
        &["app", "create", "web"],
        &["app", "scale", "web", "many"],
        &["app", "config", "web", "--stop-timeout", "soon"],
        &["--host", "ftp://example", "app", "ls"],
        &["app", "create", "web", "--image", "x", "--port", "80", "-e", "NOEQUALS", "--host", "unix:/nonexistent"],
    ];
    for args in usage {
        let (code, _, stderr) = run(args);
        assert_eq!(code, Some(2), "deliverous {}: {stderr}", args.join(" "));
        assert!(!stderr.trim().is_empty(), "deliverous {}: no message", args.join(" "));
    }
    let dir = tempfile::Builder::new().prefix("dlv-test-cli-").tempdir().expect("temp dir");
    let socket = format!("unix:{}", dir.path().join("no-daemon.sock").display());
    let file = dir.path().join("deliverous.toml");
    std::fs::write(&file, "[apps.web]\nimage = \"registry.example.com/web:1\"\nport = 8080\n").expect("write a file");
    let file = file.to_string_lossy().into_owned();
    let closed = format!("http://127.0.0.1:{}", free_port());
    for host in [&socket, &closed] {
        for args in [
            &["app", "ls", "--json"][..],
            &["app", "show", "web"],
            &["image", "ls"],
            &["events", "--json"],
            &["exec", "web", "--", "true"],
            &["apply", "-f", &file, "--dry-run"],
        ] {
            let mut all = vec!["--host", host.as_str()];
            all.extend_from_slice(args);
            let (code, stdout, stderr) = run(&all);
            assert_eq!(code, Some(3), "deliverous {}: {stdout}{stderr}", all.join(" "));
            assert!(stderr.contains("daemon"), "deliverous {}: {stderr}", all.join(" "));
        }
    }
}

#[test]
fn registry_ls_names_hosts_and_users_never_secrets() {
    let dir = tempfile::Builder::new().prefix("dlv-test-cli-").tempdir().expect("temp dir");
    let file = dir.path().join("auth.json");
    let file_arg = file.to_string_lossy().into_owned();
    // No file yet: nothing saved, not an error.
    let (code, stdout, stderr) = run(&["registry", "ls", "--json", "--auth-file", &file_arg]);
    assert_eq!((code, stdout.trim()), (Some(0), "[]"), "{stderr}");
    // "ci:s3cret-value" and "octo:other-secret", as Docker writes them.
    std::fs::write(
        &file,
        r#"{"auths": {"https://registry.example.com": {"auth": "Y2k6czNjcmV0LXZhbHVl"},
            "ghcr.io": {"auth": "b2N0bzpvdGhlci1zZWNyZXQ="}, "helper.example": {}}}"#,
    )
    .expect("write the auth file");
    let (code, stdout, stderr) = run(&["registry", "ls", "--json", "--auth-file", &file_arg]);
    assert_eq!(code, Some(0), "{stderr}");
    let listed: Value = serde_json::from_str(&stdout).expect("registry ls --json prints JSON");
    assert_eq!(
        listed,
        serde_json::json!([{"host": "ghcr.io", "username": "octo"}, {"host": "registry.example.com", "username": "ci"}])
    );
    let (code, table, _) = run(&["registry", "ls", "--auth-file", &file_arg]);
    assert_eq!(code, Some(0));
    assert!(table.starts_with("REGISTRY") && table.contains("registry.example.com  ci") && aligned(&table), "{table}");
    for out in [&stdout, &table] {
        assert!(!out.contains("s3cret") && !out.contains("other-secret") && !out.contains("Y2k6"), "{out}");
    }
    // A broken file is an error that says which file, exit 1.
    std::fs::write(&file, "{not json").expect("write the auth file");
    let (code, _, stderr) = run(&["registry", "ls", "--auth-file", &file_arg]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("auth.json"), "{stderr}");
}

/// Every line of `text` is a JSON object.
fn json_lines(what: &str, text: &str) -> Vec<Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{what}: a line is no JSON ({e}): {l}")))
        .collect()
}

/// Whether every row of a table has a blank just before the column (in characters) where each
/// header starts: cells are left-aligned under their headers, none runs into the next.
fn aligned(table: &str) -> bool {
    let mut lines = table.lines().map(|l| l.chars().collect::<Vec<char>>());
    let Some(head) = lines.next() else { return false };
    let columns: Vec<usize> =
        (1..head.len()).filter(|&i| head[i] != ' ' && i >= 2 && head[i - 1] == ' ' && head[i - 2] == ' ').collect();
    lines.all(|row| columns.iter().all(|&c| row.len() <= c || row[c - 1] == ' '))
}

#[test]
fn json_parses_everywhere_errors_exit_1_and_exec_passes_the_command_code() {
    let registry = Registry::start();
    let image = common::push_testapp(&registry, "demo/testapp:1");
    let spare = common::TestImage::new()
        .layer(common::Layer::new().file("hello", 0o644, b"a spare image nobody runs\n"))
        .push(&registry, "demo/spare:1");
    let daemon = Daemon::start(&registry);

    let app = daemon.cli_json(&["app", "create", "web", "--image", &image.reference, "--port", "8080", "--json"]);
    assert_eq!(app["name"], "web");
    assert_eq!(app["stop_timeout"], Value::Null);
    let app = daemon.cli_json(&["app", "config", "web", "--stop-timeout", "30", "--json"]);
    assert_eq!(app["stop_timeout"], 30);
    assert!(daemon.cli_ok(&["app", "export", "web"]).contains("stop_timeout = 30"));
    // Back to the daemon's default: from the CLI, and from an apply file that does not set it.
    let app = daemon.cli_json(&["app", "config", "web", "--stop-timeout", "default", "--json"]);
    assert_eq!(app["stop_timeout"], Value::Null, "{app}");
    daemon.cli_ok(&["app", "config", "web", "--stop-timeout", "45"]);
    let exported = daemon.cli_json(&["app", "export", "web", "--json"]);
    assert_eq!(exported["apps"]["web"]["stop_timeout"], 45, "{exported}");
    let dir = tempfile::Builder::new().prefix("dlv-test-cli-").tempdir().expect("temp dir");
    let file = dir.path().join("deliverous.toml");
    let text = daemon.cli_ok(&["app", "export", "web"]).replace("stop_timeout = 45\n", "");
    std::fs::write(&file, &text).expect("write the apply file");
    let file = file.to_string_lossy().into_owned();
    let plan = daemon.cli_json(&["apply", "-f", &file, "--dry-run", "--json"]);
    assert!(plan.to_string().contains("stop_timeout"), "the plan does not say stop_timeout goes back: {plan}");
    let applied = daemon.cli(&["apply", "-f", &file]);
    assert!(applied.success() && !applied.stderr.contains("warning"), "{applied:?}");
    assert_eq!(daemon.cli_json(&["app", "show", "web", "--json"])["stop_timeout"], Value::Null);
    assert!(!daemon.cli_ok(&["app", "export", "web"]).contains("stop_timeout"));

    let app = daemon.cli_json(&["app", "start", "web", "--json"]);
    assert_eq!(app["state"], "running", "{app}");
    let app = daemon.cli_json(&["app", "scale", "web", "2", "--json"]);
    assert_eq!(app["instances_desired"], 2);
    let deployed = daemon.cli_json(&["app", "deploy", "web", "-e", "MODE=two", "--json"]);
    assert_eq!(deployed["outcome"], "deployed", "{deployed}");
    let history = daemon.cli_json(&["app", "history", "web", "--json"]);
    assert!(history.as_array().is_some_and(|h| h.len() >= 2), "{history}");
    let back = daemon.cli_json(&["app", "rollback", "web", "--json"]);
    assert_eq!(back["outcome"], "deployed", "{back}");
    for args in [
        &["app", "ls", "--json"][..],
        &["image", "ls", "--json"],
        &["volume", "ls", "--json"],
        &["token", "ls", "--json"],
        &["top", "--once", "--json"],
    ] {
        assert!(daemon.cli_json(args).is_array(), "{args:?}");
    }
    assert!(daemon.cli_json(&["app", "show", "web", "--json"])["instances"].is_array());
    assert!(daemon.cli_json(&["token", "create", "--name", "cli-test", "--json"])["token"].is_string());
    let pulled = daemon.cli_json(&["image", "pull", &spare.reference, "--json"]);
    assert_eq!(pulled["reference"], spare.reference.as_str(), "{pulled}");
    let removed = daemon.cli_json(&["image", "rm", &spare.reference, "--json"]);
    assert!(removed["pruned"].is_object(), "{removed}");
    assert!(daemon.cli_json(&["image", "prune", "--json"]).is_object());
    assert!(!json_lines("events", &daemon.cli_ok(&["events", "--json"])).is_empty());
    json_lines("logs", &daemon.cli_ok(&["logs", "web", "--json", "--tail", "5"]));
    let stopped = daemon.cli_json(&["app", "stop", "web", "--json"]);
    assert_eq!(stopped["state"], "stopped");
    daemon.cli_ok(&["app", "start", "web"]);

    // Tables line up: every cell starts under its header.
    for args in [&["app", "ls"][..], &["image", "ls"], &["app", "history", "web"], &["token", "ls"]] {
        let out = daemon.cli_ok(args);
        assert!(aligned(&out), "deliverous {}: columns not aligned:\n{out}", args.join(" "));
    }
    // `app show`: the values start in one column.
    let show = daemon.cli_ok(&["app", "show", "web"]);
    let head: Vec<&str> = show.lines().take_while(|l| !l.is_empty()).collect();
    let value_columns: std::collections::BTreeSet<usize> = head
        .iter()
        .filter_map(|l| {
            let colon = l.find(':')?;
            let rest = &l[colon + 1..];
            (!rest.trim().is_empty()).then(|| colon + 1 + rest.len() - rest.trim_start().len())
        })
        .collect();
    assert_eq!(value_columns.len(), 1, "app show's values are not in one column:\n{show}");

    // Refusals exit 1 with the daemon's message; exec and run exit with the command's code.
    for args in [&["app", "show", "nosuch"][..], &["app", "show", "nosuch", "--json"], &["app", "rm", "nosuch"]] {
        let out = daemon.cli(args);
        assert_eq!(out.status.code(), Some(1), "deliverous {}: {out:?}", args.join(" "));
        assert!(out.stderr.contains("404"), "deliverous {}: {}", args.join(" "), out.stderr);
    }
    let out = daemon.cli(&["exec", "nosuch", "--", "true"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let out = daemon.cli(&["exec", "web", "--", "sh", "-c", "exit 7"]);
    assert_eq!(out.status.code(), Some(7), "{out:?}");
    let out = daemon.cli(&["run", "web", "--", "sh", "-c", "exit 5"]);
    assert_eq!(out.status.code(), Some(5), "{out:?}");

    daemon.cli_ok(&["app", "rm", "web"]);
}
