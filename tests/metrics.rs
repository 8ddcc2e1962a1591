//! Per-instance resource usage read from the instance cgroups (v1 here, v2 in the test VM):
//! `/metrics` in the Prometheus format, `deliverous top` and the usage columns of `app show`.

mod common;

use std::time::Duration;

use common::{http_get, wait_until, Daemon, Registry};
use serde_json::Value;

/// `GET path` on the daemon's API socket.
fn api_get(daemon: &Daemon, path: &str) -> String {
    let out = std::process::Command::new("curl")
        .args(["-sS", "--max-time", "20", "--unix-socket"])
        .arg(daemon.socket())
        .arg(format!("http://localhost{path}"))
        .output()
        .expect("run curl");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The value of the sample `name{labels}` in a Prometheus text.
fn sample(text: &str, name: &str, labels: &str) -> Option<f64> {
    let prefix = format!("{name}{{{labels}}} ");
    text.lines().find_map(|l| l.strip_prefix(&prefix)).and_then(|v| v.trim().parse().ok())
}

/// What `deliverous top --interval 300ms` draws on a terminal (a pty from `script`) until it
/// has redrawn twice (at most 60 s).
fn live_top(daemon: &Daemon) -> String {
    use std::io::Read;
    use std::sync::{Arc, Mutex};
    let command =
        format!("{} --host unix:{} top --interval 300ms", env!("CARGO_BIN_EXE_deliverous"), daemon.socket().display());
    let mut child = std::process::Command::new("script")
        .args(["-qfec", &command, "/dev/null"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("run script (util-linux)");
    let mut stdout = child.stdout.take().expect("piped stdout");
    let screen = Arc::new(Mutex::new(Vec::new()));
    let reader = std::thread::spawn({
        let screen = screen.clone();
        move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 {
                    break;
                }
                screen.lock().unwrap_or_else(|p| p.into_inner()).extend_from_slice(&buf[..n]);
            }
        }
    });
    let text = || String::from_utf8_lossy(&screen.lock().unwrap_or_else(|p| p.into_inner())).into_owned();
    wait_until(Duration::from_secs(60), || text().matches("INSTANCE").count() >= 2);
    // Closing the pty hangs up top (SIGHUP); the kill is for script itself.
    let _ = child.kill();
    let _ = child.wait();
    let socket = daemon.socket().display().to_string();
    for pid in common::pids_where(|argv| argv.iter().any(|a| a == "top") && argv.iter().any(|a| a.contains(&socket))) {
        // SAFETY: kill(2) of a `top` this test started (its argv names this daemon's socket).
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    }
    let _ = reader.join();
    text()
}

fn instance<'a>(top: &'a Value, name: &str) -> &'a Value {
    top.as_array()
        .and_then(|a| a.iter().find(|i| i["instance"] == name))
        .unwrap_or_else(|| panic!("no {name} in {top}"))
}

#[test]
fn instance_usage_in_metrics_top_and_app_show() {
    let registry = Registry::start();
    let image = common::push_testapp(&registry, "demo/testapp:1");
    let metrics_addr = format!("127.0.0.1:{}", common::free_port());
    let daemon = Daemon::start_with_args(&registry, &["--metrics-listen", &metrics_addr]);
    daemon.cli_ok(&["app", "create", "web", "--image", &image.reference, "--port", "8080", "--memory", "64M"]);
    daemon.cli_ok(&["app", "create", "free", "--image", &image.reference, "--port", "8080"]);
    daemon.cli_ok(&["app", "start", "web"]);
    daemon.cli_ok(&["app", "start", "free"]);

    let top = daemon.cli_json(&["top", "--once", "--json"]);
    let web = instance(&top, "web.1");
    assert_eq!(web["app"], "web");
    assert_eq!(web["state"], "running", "{web}");
    assert_eq!(web["memory_limit_bytes"], 64 << 20, "{web}");
    assert!(web["memory_bytes"].as_u64().is_some_and(|m| m > 0), "{web}");
    assert!(web["pids"].as_u64().is_some_and(|p| p >= 1), "{web}");
    // A first look waits for a second one: the rate is there at once.
    assert!(web["cpu_percent"].as_f64().is_some_and(|c| c >= 0.0), "{web}");
    let free = instance(&top, "free.1");
    assert_eq!(free["memory_limit_bytes"], Value::Null, "no limit is no number: {free}");

    // CPU time grows while the app spins; memory follows what it allocates.
    let cpu_before = web["cpu_seconds"].as_f64().expect("cpu_seconds");
    let mem_before = web["memory_bytes"].as_u64().unwrap_or(0);
    // The app reports the CPU time its thread got while spinning (how much depends on the
    // host's load): the cgroup must have counted at least that.
    let mut spun_ms = 0;
    for _ in 0..20 {
        let (status, body) = http_get(daemon.proxy_addr(), "web.localhost", "/spin?ms=500");
        assert_eq!(status, 200, "{body}");
        spun_ms += body
            .split_whitespace()
            .find_map(|w| w.strip_prefix("cpu_ms="))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
        if spun_ms >= 300 {
            break;
        }
    }
    assert!(spun_ms > 0, "the app never got the CPU");
    let (status, body) = http_get(daemon.proxy_addr(), "web.localhost", "/hog?mb=16");
    assert_eq!(status, 200, "{body}");
    let top = daemon.cli_json(&["top", "web", "--once", "--json"]);
    assert_eq!(top.as_array().map(Vec::len), Some(1), "only web's instances: {top}");
    let web = instance(&top, "web.1");
    let cpu_after = web["cpu_seconds"].as_f64().expect("cpu_seconds");
    // Less 20 ms: the app counts in clock ticks of 10 ms.
    assert!(
        cpu_after - cpu_before >= spun_ms as f64 / 1000.0 - 0.02,
        "cpu {cpu_before} -> {cpu_after} s after the app spun for {spun_ms} ms of CPU"
    );
    let mem_after = web["memory_bytes"].as_u64().unwrap_or(0);
    assert!(mem_after >= mem_before + (12 << 20), "memory {mem_before} -> {mem_after} after /hog?mb=16");
    assert!(web["requests_total"].as_u64().is_some_and(|n| n >= 2), "{web}");

    // /metrics: the proxy's figures and the instances'.
    let metrics = api_get(&daemon, "/metrics");
    let labels = "app=\"web\",instance=\"web.1\"";
    assert!(metrics.contains("deliverous_proxy_requests_total{app=\"web\""), "{metrics}");
    assert_eq!(sample(&metrics, "deliverous_instance_up", labels), Some(1.0), "{metrics}");
    assert_eq!(sample(&metrics, "deliverous_instance_memory_limit_bytes", labels), Some(67_108_864.0), "{metrics}");
    assert!(sample(&metrics, "deliverous_instance_memory_bytes", labels).is_some_and(|m| m > 0.0), "{metrics}");
    assert!(
        sample(&metrics, "deliverous_instance_cpu_seconds_total", labels).is_some_and(|c| c >= cpu_after),
        "{metrics}"
    );
    assert!(sample(&metrics, "deliverous_instance_pids", labels).is_some_and(|p| p >= 1.0), "{metrics}");
    assert_eq!(sample(&metrics, "deliverous_instance_restarts_total", labels), Some(0.0), "{metrics}");
    assert!(sample(&metrics, "deliverous_instance_up", "app=\"free\",instance=\"free.1\"").is_some(), "{metrics}");
    // The same on --metrics-listen.
    let (status, body) = http_get(&metrics_addr, "localhost", "/metrics");
    assert_eq!(status, 200, "{body}");
    assert_eq!(sample(&body, "deliverous_instance_memory_limit_bytes", labels), Some(67_108_864.0), "{body}");
    assert!(body.contains("deliverous_proxy_requests_total{app=\"web\""), "{body}");

    // A crash counts as a restart of web.1.
    let _ = common::try_http_get(daemon.proxy_addr(), "web.localhost", "/exit?code=3");
    assert!(
        wait_until(Duration::from_secs(20), || {
            sample(&api_get(&daemon, "/metrics"), "deliverous_instance_restarts_total", labels) == Some(1.0)
        }),
        "no restart counted:\n{}",
        api_get(&daemon, "/metrics")
    );
    assert!(
        wait_until(Duration::from_secs(20), || {
            sample(&api_get(&daemon, "/metrics"), "deliverous_instance_up", labels) == Some(1.0)
        }),
        "web.1 did not come back"
    );

    // People's views.
    let table = daemon.cli_ok(&["top", "--once"]);
    let header = table.lines().next().unwrap_or_default();
    for column in ["APP", "INSTANCE", "STATE", "CPU %", "MEMORY / LIMIT", "PIDS", "RESTARTS", "REQ/S"] {
        assert!(header.contains(column), "no {column} in:\n{table}");
    }
    assert!(table.lines().any(|l| l.starts_with("web ") && l.contains("web.1") && l.contains("/ 64")), "{table}");
    let show = daemon.cli_ok(&["app", "show", "web"]);
    eprintln!("{table}\n{show}");
    assert!(show.contains("CPU %") && show.contains("MEMORY / LIMIT"), "{show}");
    let row = show.lines().find(|l| l.starts_with("web.1")).unwrap_or_else(|| panic!("no web.1 row:\n{show}"));
    assert!(row.contains('%') && row.contains("/ 64"), "{row}");

    // On a terminal, top redraws in place until stopped.
    let screen = live_top(&daemon);
    assert!(screen.matches("\x1b[H\x1b[2J").count() >= 2, "no redraw in:\n{screen:?}");
    assert!(screen.matches("INSTANCE").count() >= 2, "{screen:?}");
    assert!(screen.contains("web.1"), "{screen:?}");

    // Bad input is a clear error.
    let out = daemon.cli(&["top", "nope", "--once"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(out.stderr.contains("no app named"), "{}", out.stderr);
}
