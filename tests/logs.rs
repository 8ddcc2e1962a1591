//! `deliverous logs`: an app's instance logs merged in time order with instance prefixes,
//! filtered by instance, time and count, and followed live through new instances.

mod common;

use std::io::BufRead;
use std::time::{Duration, Instant};

use common::{http_get, Daemon, Registry};

fn instance_ips(daemon: &Daemon) -> Vec<(String, String)> {
    let show = daemon.cli_json(&["app", "show", "web", "--json"]);
    show["instances"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|i| (i["name"].as_str().unwrap_or_default().to_string(), i["ip"].as_str().unwrap_or_default().to_string()))
        .collect()
}

#[test]
fn logs_merge_filter_and_follow() {
    let registry = Registry::start();
    let image = common::push_testapp(&registry, "demo/testapp:1");
    let daemon = Daemon::start(&registry);
    daemon.cli_ok(&["app", "create", "web", "--image", &image.reference, "--port", "8080", "--instances", "2"]);
    daemon.cli_ok(&["app", "start", "web"]);
    let mut ips = instance_ips(&daemon);
    ips.sort();
    assert_eq!(ips.len(), 2);
    // web.1, then web.2, then web.1 again: each request is a line in that instance's log.
    for (n, (_, ip)) in [&ips[0], &ips[1], &ips[0]].iter().enumerate() {
        let (status, _) = http_get(&format!("{ip}:8080"), "web", &format!("/env/MARK_{n}"));
        assert_eq!(status, 404);
        std::thread::sleep(Duration::from_millis(20));
    }

    let all = daemon.cli_ok(&["logs", "web"]);
    let marks: Vec<&str> = all.lines().filter(|l| l.contains("/env/MARK_")).collect();
    assert_eq!(marks.len(), 3, "{all}");
    assert!(marks[0].starts_with("web.1 | ") && marks[0].contains("MARK_0"), "{all}");
    assert!(marks[1].starts_with("web.2 | ") && marks[1].contains("MARK_1"), "{all}");
    assert!(marks[2].starts_with("web.1 | ") && marks[2].contains("MARK_2"), "in time order: {all}");

    let only = daemon.cli_ok(&["logs", "web", "--instance", "web.2"]);
    assert!(only.lines().all(|l| l.starts_with("web.2 | ")) && only.contains("MARK_1"), "{only}");
    let tail = daemon.cli_ok(&["logs", "web", "--tail", "1", "--timestamps"]);
    assert_eq!(tail.lines().count(), 1, "{tail}");
    assert!(tail.contains("MARK_2") && tail.starts_with("20"), "{tail}");
    let future = daemon.cli_ok(&["logs", "web", "--since", "2999-01-01T00:00:00Z"]);
    assert!(future.trim().is_empty(), "{future}");
    assert!(daemon.cli_ok(&["logs", "web", "--since", "1h"]).contains("MARK_0"));
    let json = daemon.cli_ok(&["logs", "web", "--json", "--tail", "2"]);
    for line in json.lines() {
        let v: serde_json::Value = serde_json::from_str(line).expect("a JSON line");
        assert!(v["ts"].is_string() && v["instance"].is_string() && v["stream"] == "stdout", "{v}");
    }
    let bad = daemon.cli(&["logs", "web", "--since", "yesterday"]);
    assert!(!bad.success() && bad.stderr.contains("--since"), "{bad:?}");
    let bad = daemon.cli(&["logs", "nope"]);
    assert!(!bad.success() && bad.stderr.contains("no app named"), "{bad:?}");

    // Following: new lines as they come, and a new instance's lines too.
    let mut follow = std::process::Command::new(env!("CARGO_BIN_EXE_deliverous"))
        .args(["--host", &format!("unix:{}", daemon.socket().display()), "logs", "web", "-f", "--tail", "0"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start logs -f");
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let stdout = follow.stdout.take().expect("stdout");
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    std::thread::sleep(Duration::from_millis(300));
    let (status, _) = http_get(&format!("{}:8080", ips[1].1), "web", "/env/LIVE_MARK");
    assert_eq!(status, 404);
    daemon.cli_ok(&["app", "scale", "web", "3"]);
    let (mut saw_live, mut saw_new) = (false, false);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !(saw_live && saw_new) && Instant::now() < deadline {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
            saw_live |= line.starts_with("web.2 | ") && line.contains("LIVE_MARK");
            saw_new |= line.starts_with("web.3 | ") && line.contains("listening");
        }
    }
    let _ = follow.kill();
    let _ = follow.wait();
    assert!(saw_live, "logs -f did not show the new request");
    assert!(saw_new, "logs -f did not pick up the new instance web.3");
}
