//! `NO_COLOR` and non-terminals: the CLI draws its redrawn progress bars (escape sequences) only
//! on a terminal without `NO_COLOR`; with `NO_COLOR` (any non-empty value), `TERM=dumb` or when
//! its output is a pipe or a file it prints plain lines; the daemon's log file has no colour.
//! A real terminal comes from `script(1)`, which runs the CLI on a pseudo-terminal.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{run_with_timeout, Daemon, Registry};

const BINARY: &str = env!("CARGO_BIN_EXE_deliverous");

fn have(tool: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(tool).is_file()))
}

/// Runs `deliverous image pull REFERENCE` on a pseudo-terminal with `env`; returns what the
/// terminal showed.
fn pull_on_terminal(daemon: &Daemon, reference: &str, env: &[(&str, &str)]) -> String {
    let command = format!("{BINARY} --host unix:{} image pull {reference}", daemon.socket().display());
    let mut cmd = Command::new("script");
    cmd.args(["-qefc", &command, "/dev/null"]).env_remove("NO_COLOR").env("TERM", "xterm-256color");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = run_with_timeout(&mut cmd, Duration::from_secs(180)).expect("run script");
    let shown = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "pull on a terminal ({env:?}) failed: {shown}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    shown
}

#[test]
fn progress_bars_only_on_terminals_without_no_color() {
    if !have("script") {
        eprintln!("SKIPPED: script(1) is missing (apt-get install bsdutils)");
        return;
    }
    let registry = Registry::start();
    let image = common::push_testapp(&registry, "demo/testapp:1");
    let daemon = Daemon::start(&registry);

    // A terminal: bars redrawn in place.
    let shown = pull_on_terminal(&daemon, &image.reference, &[]);
    assert!(shown.contains("\u{1b}["), "no escape sequence on a terminal:\n{shown:?}");
    // An empty NO_COLOR does not count (no-color.org).
    let shown = pull_on_terminal(&daemon, &image.reference, &[("NO_COLOR", "")]);
    assert!(shown.contains("\u{1b}["), "empty NO_COLOR disabled the bars:\n{shown:?}");

    for env in [[("NO_COLOR", "1")], [("NO_COLOR", "yes")], [("TERM", "dumb")]] {
        let shown = pull_on_terminal(&daemon, &image.reference, &env);
        assert!(!shown.contains('\u{1b}'), "escape sequence with {env:?}:\n{shown:?}");
        assert!(shown.contains("layer ") && shown.contains("already present"), "plain lines with {env:?}:\n{shown}");
    }

    // Not a terminal (a pipe), even without NO_COLOR.
    let out = run_with_timeout(
        Command::new(BINARY)
            .args(["--host", &format!("unix:{}", daemon.socket().display()), "image", "pull", &image.reference])
            .env_remove("NO_COLOR")
            .env("TERM", "xterm-256color"),
        Duration::from_secs(180),
    )
    .expect("run pull");
    assert!(out.status.success());
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!text.contains('\u{1b}'), "escape sequence into a pipe:\n{text:?}");
    assert!(text.contains("layer "), "{text}");

    // clap's help follows the same rules (it styles headings on a terminal).
    let help = |env: &[(&str, &str)]| {
        let mut cmd = Command::new("script");
        cmd.args(["-qefc", &format!("{BINARY} app --help"), "/dev/null"]).env_remove("NO_COLOR").env("TERM", "xterm");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = run_with_timeout(&mut cmd, Duration::from_secs(30)).expect("run script");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(help(&[]).contains("\u{1b}["), "help on a terminal is styled:\n{:?}", help(&[]));
    let plain = help(&[("NO_COLOR", "1")]);
    assert!(!plain.contains('\u{1b}') && plain.contains("Usage"), "help with NO_COLOR:\n{plain:?}");

    // Nor colours in the daemon's log file.
    let log = std::fs::read_to_string(daemon.log_path()).expect("read daemon log");
    assert!(!log.contains('\u{1b}'), "escape sequence in the daemon log:\n{log}");
}
