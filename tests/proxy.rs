//! The proxy, end to end: real HTTP through the daemon's proxy to real instances of the testapp
//! (see tests/testapp), for each behaviour the proxy promises.

mod common;

use std::io::{BufRead, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Conn, Daemon, PushedImage, Registry};

/// A registry with the testapp pushed, and a daemon started with `daemon_args`.
fn setup(daemon_args: &[&str]) -> (Registry, PushedImage, Daemon) {
    let registry = Registry::start();
    let image = common::push_testapp(&registry, "demo/testapp:1");
    let daemon = Daemon::start_with_args(&registry, daemon_args);
    (registry, image, daemon)
}

/// Creates and starts app `name` with `instances`, extra `app create` flags, and waits until
/// every instance answers through the proxy.
fn launch(daemon: &Daemon, image: &PushedImage, name: &str, instances: u32, flags: &[&str]) -> serde_json::Value {
    let mut args = vec!["app", "create", name, "--image", &image.reference, "--port", "8080"];
    args.extend_from_slice(flags);
    daemon.cli_ok(&args);
    daemon.cli_ok(&["app", "start", name]);
    if instances != 1 {
        daemon.cli_ok(&["app", "scale", name, &instances.to_string()]);
    }
    let host = format!("{name}.localhost");
    common::http_get_retry(daemon.proxy_addr(), &host, "/", Duration::from_secs(20), |s, _| s == 200);
    daemon.cli_json(&["app", "show", name, "--json"])
}

fn instance_ips(show: &serde_json::Value) -> Vec<String> {
    show["instances"].as_array().into_iter().flatten().filter_map(|i| i["ip"].as_str().map(String::from)).collect()
}

fn get(daemon: &Daemon, host: &str, path: &str, headers: &[(&str, &str)]) -> common::Response {
    let mut c = Conn::open(daemon.proxy_addr()).expect("connect to the proxy");
    c.request("GET", path, host, headers, b"").expect("request through the proxy")
}

/// The proxy process's resident and peak memory, in KiB.
fn proxy_memory(daemon: &Daemon) -> (u64, u64) {
    let pid = daemon.proxy_pid().expect("proxy pid");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proxy status");
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

#[test]
fn routes_by_exact_and_wildcard_host_then_longest_path_prefix() {
    let (_registry, image, daemon) = setup(&[]);
    launch(&daemon, &image, "site", 1, &["--domain", "example.test", "--domain", "*.example.test"]);
    launch(&daemon, &image, "api", 1, &["--domain", "example.test/api", "--strip-prefix"]);
    let who = |host: &str, path: &str| {
        let r = get(&daemon, host, path, &[]);
        (r.status, r.header("x-instance").unwrap_or("").to_string(), r.text())
    };
    assert_eq!(who("example.test", "/hostname").1, "site.1");
    assert_eq!(who("www.example.test", "/hostname").1, "site.1");
    assert_eq!(who("a.b.example.test", "/hostname").1, "site.1");
    // The prefix is matched on whole segments and, with --strip-prefix, removed.
    let (status, instance, body) = who("example.test", "/api/hostname");
    assert_eq!((status, instance.as_str(), body.trim()), (200, "api.1", "api.1"));
    assert_eq!(who("example.test", "/apihostname").1, "site.1");
    assert_eq!(who("EXAMPLE.test.", "/api/hostname").1, "api.1");
    assert_eq!(who("other.test", "/").0, 404);
}

#[test]
fn forwarding_headers_and_request_id() {
    let (_registry, image, daemon) = setup(&[]);
    launch(&daemon, &image, "web", 1, &[]);
    // An untrusted client cannot choose the address the app sees.
    let r = get(&daemon, "web.localhost", "/headers", &[("X-Forwarded-For", "6.6.6.6"), ("Forwarded", "for=6.6.6.6")]);
    let seen = r.text();
    assert!(seen.contains("x-forwarded-for: 127.0.0.1\n"), "{seen}");
    assert!(seen.contains("x-forwarded-proto: http\n"), "{seen}");
    assert!(seen.contains("x-forwarded-host: web.localhost\n"), "{seen}");
    assert!(seen.contains("forwarded: for=127.0.0.1;host=web.localhost;proto=http\n"), "{seen}");
    assert!(!seen.contains("6.6.6.6"), "{seen}");
    let id = r.header("x-request-id").expect("a request id is generated and returned").to_string();
    assert_eq!(id.len(), 32);
    assert!(seen.contains(&format!("x-request-id: {id}\n")), "{seen}");
    // One given by the client is kept.
    let r = get(&daemon, "web.localhost", "/headers", &[("X-Request-Id", "trace-42")]);
    assert!(r.text().contains("x-request-id: trace-42\n"));
    assert_eq!(r.header("x-request-id"), Some("trace-42"));
    // Hop-by-hop headers stop at the proxy.
    let r = get(&daemon, "web.localhost", "/headers", &[("Connection", "keep-alive, X-Secret"), ("X-Secret", "1")]);
    assert!(!r.text().contains("x-secret"), "{}", r.text());
}

#[test]
fn a_trusted_load_balancer_passes_the_client_ip_by_proxy_protocol_and_headers() {
    let (_registry, image, daemon) = setup(&["--trusted-proxy", "127.0.0.0/8", "--proxy-protocol"]);
    let show_addr = daemon.proxy_addr().to_string();
    // The app is launched through the PROXY protocol too: every connection from 127.0.0.0/8 must
    // start with a header. `Conn` cannot, so wait with raw requests.
    daemon.cli_ok(&["app", "create", "web", "--image", &image.reference, "--port", "8080"]);
    daemon.cli_ok(&["app", "start", "web"]);
    let v2 = proxy_v2_header([203, 0, 113, 7], 40000, [127, 0, 0, 1], 80);
    let ask = |header: &[u8], extra: &str| -> String {
        let mut s = TcpStream::connect(&show_addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        let mut raw = header.to_vec();
        raw.extend_from_slice(
            format!("GET /headers HTTP/1.1\r\nHost: web.localhost\r\n{extra}Connection: close\r\n\r\n").as_bytes(),
        );
        s.write_all(&raw).expect("write");
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    };
    let ok = common::wait_until(Duration::from_secs(20), || ask(&v2, "").starts_with("HTTP/1.1 200"));
    assert!(ok, "no answer through the PROXY protocol: {}", ask(&v2, ""));
    let seen = ask(&v2, "");
    assert!(
        seen.contains("x-forwarded-for: 203.0.113.7\r\n") || seen.contains("x-forwarded-for: 203.0.113.7\n"),
        "{seen}"
    );
    assert!(seen.contains("for=203.0.113.7"), "{seen}");
    // Version 1 too; and the balancer's own X-Forwarded-For chain is kept (it is trusted).
    let v1 = b"PROXY TCP4 198.51.100.9 127.0.0.1 41000 80\r\n";
    let seen = ask(v1, "X-Forwarded-For: 192.0.2.1\r\n");
    assert!(seen.contains("x-forwarded-for: 192.0.2.1, 198.51.100.9"), "{seen}");
    // A trusted peer that sends no header is refused rather than misattributed.
    let seen = ask(b"", "");
    assert!(!seen.contains("200 OK"), "{seen}");
}

fn proxy_v2_header(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.push(0x21); // version 2, PROXY
    h.push(0x11); // AF_INET, STREAM
    h.extend_from_slice(&12u16.to_be_bytes());
    h.extend_from_slice(&src);
    h.extend_from_slice(&dst);
    h.extend_from_slice(&sport.to_be_bytes());
    h.extend_from_slice(&dport.to_be_bytes());
    h
}

#[test]
fn websocket_echo_through_the_proxy() {
    let (_registry, image, daemon) = setup(&[]);
    launch(&daemon, &image, "ws", 1, &[]);
    let mut c = Conn::open(daemon.proxy_addr()).expect("connect");
    let head = "GET /ws HTTP/1.1\r\nHost: ws.localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";
    c.stream().write_all(head.as_bytes()).expect("write");
    let (status, headers) = c.read_head().expect("handshake answer");
    assert_eq!(status, 101, "{headers:?}");
    let accept = headers.iter().find(|(n, _)| n == "sec-websocket-accept").map(|(_, v)| v.as_str());
    assert_eq!(accept, Some("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="));
    for message in ["hello", "through the proxy", &"x".repeat(70_000)] {
        c.stream().write_all(&ws_frame(message.as_bytes())).expect("send frame");
        let (opcode, payload) = read_ws_frame(c.reader());
        assert_eq!(opcode, 1);
        assert_eq!(payload, message.as_bytes());
    }
}

/// A masked text frame, as a client sends it.
fn ws_frame(payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0x81];
    match payload.len() {
        n if n < 126 => f.push(0x80 | n as u8),
        n if n < 65536 => {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(0x80 | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    let mask = [0x12, 0x34, 0x56, 0x78];
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

fn read_ws_frame(r: &mut impl Read) -> (u8, Vec<u8>) {
    let mut h = [0u8; 2];
    r.read_exact(&mut h).expect("frame head");
    let len = match h[1] & 0x7f {
        126 => {
            let mut b = [0u8; 2];
            r.read_exact(&mut b).expect("len16");
            u16::from_be_bytes(b) as usize
        }
        127 => {
            let mut b = [0u8; 8];
            r.read_exact(&mut b).expect("len64");
            u64::from_be_bytes(b) as usize
        }
        n => n as usize,
    };
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).expect("payload");
    (h[0] & 0x0f, payload)
}

#[test]
fn server_sent_events_flow_as_they_are_produced() {
    let (_registry, image, daemon) = setup(&[]);
    launch(&daemon, &image, "sse", 1, &[]);
    let mut c = Conn::open(daemon.proxy_addr()).expect("connect");
    let start = Instant::now();
    c.stream()
        .write_all(b"GET /sse?n=3&ms=1500 HTTP/1.1\r\nHost: sse.localhost\r\nAccept: text/event-stream\r\n\r\n")
        .expect("write");
    let (status, _) = c.read_head().expect("head");
    assert_eq!(status, 200);
    // The first event is read while the instance is still producing the rest.
    let mut line = String::new();
    loop {
        line.clear();
        c.reader().read_line(&mut line).expect("read");
        if line.contains("data: event 0") {
            break;
        }
    }
    let first = start.elapsed();
    assert!(first < Duration::from_millis(1400), "first event after {first:?}: buffered");
    let mut rest = String::new();
    loop {
        line.clear();
        if c.reader().read_line(&mut line).expect("read") == 0 || line.trim() == "0" {
            break;
        }
        rest.push_str(&line);
        if rest.contains("data: event 2") {
            break;
        }
    }
    assert!(rest.contains("data: event 2"), "{rest}");
    assert!(start.elapsed() >= Duration::from_millis(2900));
}

#[test]
fn a_1gb_upload_streams_through_without_growing_the_proxy() {
    let (_registry, image, daemon) = setup(&[]);
    launch(&daemon, &image, "up", 1, &[]);
    let (rss_before, _) = proxy_memory(&daemon);
    let mut c = Conn::open(daemon.proxy_addr()).expect("connect");
    c.stream().set_write_timeout(Some(Duration::from_secs(60))).expect("timeout");
    let size: u64 = 1 << 30;
    let head = format!(
        "POST /upload HTTP/1.1\r\nHost: up.localhost\r\nContent-Length: {size}\r\nExpect: 100-continue\r\n\r\n"
    );
    c.stream().write_all(head.as_bytes()).expect("write head");
    let (status, _) = c.read_head().expect("interim answer");
    assert_eq!(status, 100, "Expect: 100-continue is answered before the body is sent");
    let chunk = vec![b'u'; 1 << 20];
    let mut peak_during = 0;
    for i in 0..(size >> 20) {
        c.stream().write_all(&chunk).expect("upload");
        if i % 128 == 0 {
            peak_during = peak_during.max(proxy_memory(&daemon).0);
        }
    }
    let r = c.read_response(false).expect("answer");
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.text().starts_with(&format!("bytes={size} ")), "{}", r.text());
    let (rss_after, _) = proxy_memory(&daemon);
    let grown = peak_during.max(rss_after).saturating_sub(rss_before);
    assert!(grown < 64 * 1024, "proxy RSS grew by {grown} KiB during a 1 GiB upload ({rss_before} KiB before)");
}

#[test]
fn large_downloads_are_streamed() {
    let (_registry, image, daemon) = setup(&[]);
    launch(&daemon, &image, "down", 1, &[]);
    let (rss_before, _) = proxy_memory(&daemon);
    let mut c = Conn::open(daemon.proxy_addr()).expect("connect");
    c.stream().write_all(b"GET /big?mb=512 HTTP/1.1\r\nHost: down.localhost\r\n\r\n").expect("write");
    let (status, headers) = c.read_head().expect("head");
    assert_eq!(status, 200);
    let len: u64 =
        headers.iter().find(|(n, _)| n == "content-length").and_then(|(_, v)| v.parse().ok()).expect("length");
    assert_eq!(len, 512 << 20);
    let mut left = len;
    let mut buf = vec![0u8; 1 << 20];
    let mut peak = 0;
    while left > 0 {
        let n = c.reader().read(&mut buf[..(left.min(1 << 20)) as usize]).expect("read");
        assert!(n > 0, "connection closed with {left} bytes left");
        left -= n as u64;
        if left % (64 << 20) < n as u64 {
            peak = peak.max(proxy_memory(&daemon).0);
        }
    }
    let grown = peak.saturating_sub(rss_before);
    assert!(grown < 64 * 1024, "daemon RSS grew by {grown} KiB during a 512 MiB download");
}

#[test]
fn h2c_trailers_expect_continue_and_the_body_limit() {
    let (_registry, image, daemon) = setup(&[]);
    launch(&daemon, &image, "web", 1, &["--max-body", "1M"]);
    // HTTP/2 from the client (prior knowledge, cleartext), HTTP/1.1 to the instance.
    let out = std::process::Command::new("curl")
        .args(["-sS", "--http2-prior-knowledge", "-o", "/dev/null", "-w", "%{http_version} %{http_code}"])
        .args(["-H", "Host: web.localhost", &format!("http://{}/hostname", daemon.proxy_addr())])
        .output()
        .expect("run curl");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "2 200", "{}", String::from_utf8_lossy(&out.stderr));
    // Trailers reach a client that accepts them.
    let r = get(&daemon, "web.localhost", "/trailers", &[("TE", "trailers")]);
    assert_eq!(r.text(), "hello\n");
    assert!(r.trailers.contains(&("x-checksum".into(), "abc123".into())), "{:?}", r.trailers);
    // A body over the limit is refused before it is sent: no 100 Continue.
    let mut c = Conn::open(daemon.proxy_addr()).expect("connect");
    let head =
        "POST /upload HTTP/1.1\r\nHost: web.localhost\r\nContent-Length: 2097152\r\nExpect: 100-continue\r\n\r\n";
    c.stream().write_all(head.as_bytes()).expect("write");
    let (status, _) = c.read_head().expect("answer");
    assert_eq!(status, 413);
    // A chunked body that turns out too large is cut off with 413.
    let mut c = Conn::open(daemon.proxy_addr()).expect("connect");
    c.stream()
        .write_all(b"POST /upload HTTP/1.1\r\nHost: web.localhost\r\nTransfer-Encoding: chunked\r\n\r\n")
        .expect("write");
    let chunk = vec![b'c'; 64 * 1024];
    for _ in 0..32 {
        let mut framed = format!("{:x}\r\n", chunk.len()).into_bytes();
        framed.extend_from_slice(&chunk);
        framed.extend_from_slice(b"\r\n");
        if c.stream().write_all(&framed).is_err() {
            break;
        }
    }
    let _ = c.stream().write_all(b"0\r\n\r\n");
    let r = c.read_response(false).expect("answer");
    assert_eq!(r.status, 413, "{}", r.text());
    // Under the limit, with Expect: 100 Continue, then the answer.
    let mut c = Conn::open(daemon.proxy_addr()).expect("connect");
    let head = "POST /upload HTTP/1.1\r\nHost: web.localhost\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n";
    c.stream().write_all(head.as_bytes()).expect("write");
    assert_eq!(c.read_head().expect("interim").0, 100);
    c.stream().write_all(b"hello").expect("body");
    let r = c.read_response(false).expect("answer");
    assert_eq!(r.status, 200);
    assert!(r.text().starts_with("bytes=5 "), "{}", r.text());
}

#[test]
fn timeouts_cut_silent_and_endless_exchanges() {
    let (_registry, image, daemon) = setup(&[]);
    launch(&daemon, &image, "slow", 1, &["--read-timeout", "500ms"]);
    // No response head in time: 504.
    let start = Instant::now();
    let r = get(&daemon, "slow.localhost", "/slow?ms=3000", &[]);
    assert_eq!(r.status, 504, "{}", r.text());
    assert!(start.elapsed() < Duration::from_millis(2500));
    assert_eq!(get(&daemon, "slow.localhost", "/slow?ms=100", &[]).status, 200);
    // A body that goes quiet for longer than the read timeout is cut.
    let mut c = Conn::open(daemon.proxy_addr()).expect("connect");
    let cut = c.request("GET", "/stream?chunks=3&size=10&ms=1500", "slow.localhost", &[], b"");
    assert!(cut.is_err(), "a stalled body was not cut: {cut:?}");
    // A body that keeps flowing is cut at the total timeout, and only there.
    daemon.cli_ok(&["app", "config", "slow", "--read-timeout", "5s", "--total-timeout", "1s"]);
    let start = Instant::now();
    let mut c = Conn::open(daemon.proxy_addr()).expect("connect");
    let cut = c.request("GET", "/stream?chunks=40&size=10&ms=100", "slow.localhost", &[], b"");
    assert!(cut.is_err(), "a 4 s stream outlived a 1 s total timeout: {cut:?}");
    assert!(start.elapsed() < Duration::from_millis(2500), "cut after {:?}", start.elapsed());
    let r = get(&daemon, "slow.localhost", "/stream?chunks=3&size=10&ms=100", &[]);
    assert_eq!((r.status, r.body.len()), (200, 30));
    // An app with no instance running.
    daemon.cli_ok(&["app", "create", "idle", "--image", &image.reference, "--port", "8080"]);
    let r = get(&daemon, "idle.localhost", "/", &[]);
    assert_eq!(r.status, 503, "{}", r.text());
}

#[test]
fn health_checks_take_a_failing_instance_out_and_bring_it_back() {
    let (_registry, image, daemon) = setup(&[]);
    let show = launch(
        &daemon,
        &image,
        "hc",
        2,
        &["--health", "/health", "--health-interval", "200ms", "--health-fall", "2", "--health-rise", "2"],
    );
    let ips = instance_ips(&show);
    assert_eq!(ips.len(), 2);
    let name_of = |ip: &str| common::http_get(&format!("{ip}:8080"), "x", "/hostname").1.trim().to_string();
    let sick = name_of(&ips[0]);
    common::http_get(&format!("{}:8080", ips[0]), "x", "/health/set?ok=0");
    std::thread::sleep(Duration::from_millis(1200));
    for _ in 0..30 {
        let r = get(&daemon, "hc.localhost", "/hostname", &[]);
        assert_ne!(r.header("x-instance"), Some(sick.as_str()), "an unhealthy instance got traffic");
    }
    let metrics = api_get(&daemon, "/metrics");
    assert!(
        metrics.contains(&format!("deliverous_proxy_instance_healthy{{app=\"hc\",instance=\"{sick}\"}} 0")),
        "{metrics}"
    );
    common::http_get(&format!("{}:8080", ips[0]), "x", "/health/set?ok=1");
    let back = common::wait_until(Duration::from_secs(5), || {
        (0..10).any(|_| get(&daemon, "hc.localhost", "/hostname", &[]).header("x-instance") == Some(sick.as_str()))
    });
    assert!(back, "the instance did not come back after passing its checks");
}

/// `GET path` on the daemon's API socket.
fn api_get(daemon: &Daemon, path: &str) -> String {
    let out = std::process::Command::new("curl")
        .args(["-sS", "--unix-socket"])
        .arg(daemon.socket())
        .arg(format!("http://localhost{path}"))
        .output()
        .expect("run curl");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn round_robin_and_least_outstanding_spread_requests() {
    let (_registry, image, daemon) = setup(&[]);
    launch(&daemon, &image, "rr", 3, &["--balance", "round-robin"]);
    let mut seen = Vec::new();
    for _ in 0..6 {
        seen.push(get(&daemon, "rr.localhost", "/hostname", &[]).header("x-instance").unwrap_or("").to_string());
    }
    for i in 0..3 {
        assert_eq!(seen[i], seen[i + 3], "round robin repeats every 3: {seen:?}");
    }
    assert_eq!(seen[..3].iter().collect::<std::collections::HashSet<_>>().len(), 3, "{seen:?}");
    // Least outstanding: with one instance busy on a slow request, the others get the rest.
    daemon.cli_ok(&["app", "config", "rr", "--balance", "least-outstanding"]);
    let addr = daemon.proxy_addr().to_string();
    let slow: Vec<_> = (0..2)
        .map(|_| {
            let addr = addr.clone();
            std::thread::spawn(move || {
                let mut c = Conn::open(&addr).expect("connect");
                c.request("GET", "/slow?ms=1500", "rr.localhost", &[], b"")
                    .expect("slow")
                    .header("x-instance")
                    .map(String::from)
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let mut counts = std::collections::HashMap::new();
    for _ in 0..20 {
        let who = get(&daemon, "rr.localhost", "/hostname", &[]).header("x-instance").unwrap_or("").to_string();
        *counts.entry(who).or_insert(0) += 1;
    }
    let busy: Vec<String> = slow.into_iter().filter_map(|t| t.join().ok().flatten()).collect();
    assert!(!counts.is_empty(), "{counts:?}");
    for b in &busy {
        // A busy instance is only picked when both random choices are busy.
        assert!(counts.get(b).copied().unwrap_or(0) <= 10, "busy {b} got {counts:?}");
    }
}

#[test]
fn tcp_passthrough_balances_connections() {
    let (_registry, image, daemon) = setup(&[]);
    let port = common::free_port().to_string();
    let publish = format!("{port}:7000");
    launch(&daemon, &image, "echo", 2, &["-e", "TCP_PORT=7000", "--tcp", &publish]);
    let mut names = std::collections::HashSet::new();
    let ok = common::wait_until(Duration::from_secs(10), || {
        let Ok(mut s) = TcpStream::connect(format!("127.0.0.1:{port}")) else { return false };
        s.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
        let mut r = std::io::BufReader::new(s.try_clone().expect("clone"));
        let mut hello = String::new();
        if r.read_line(&mut hello).is_err() || hello.is_empty() {
            return false;
        }
        s.write_all(b"ping\n").expect("write");
        let mut echo = String::new();
        r.read_line(&mut echo).expect("echo");
        assert_eq!(echo, "ping\n");
        names.insert(hello.trim().to_string());
        names.len() == 2
    });
    assert!(ok, "connections reached {names:?}");
    // Another app cannot take the port.
    let out = daemon.cli(&["app", "create", "other", "--image", &image.reference, "--port", "8080", "--tcp", &port]);
    assert!(!out.success() && out.stderr.contains("already published"), "{}", out.stderr);
}

#[test]
fn draining_lets_in_flight_requests_finish_on_scale_down() {
    let (_registry, image, daemon) = setup(&[]);
    launch(&daemon, &image, "drain", 2, &[]);
    let addr = daemon.proxy_addr().to_string();
    let slow: Vec<_> = (0..6)
        .map(|_| {
            let addr = addr.clone();
            std::thread::spawn(move || {
                let mut c = Conn::open(&addr).expect("connect");
                let r = c.request("GET", "/slow?ms=2000", "drain.localhost", &[], b"").expect("slow request");
                (r.status, r.header("x-instance").map(String::from))
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(400));
    daemon.cli_ok(&["app", "scale", "drain", "1"]);
    let results: Vec<(u16, Option<String>)> = slow.into_iter().map(|t| t.join().expect("thread")).collect();
    assert!(results.iter().all(|(s, _)| *s == 200), "{results:?}");
    assert!(
        results.iter().any(|(_, i)| i.as_deref() == Some("drain.2")),
        "no request landed on the drained one: {results:?}"
    );
}

#[test]
fn a_killed_instance_fails_no_idempotent_request_under_load() {
    let (_registry, image, daemon) = setup(&[]);
    let show = launch(&daemon, &image, "load", 3, &[]);
    let victim = show["instances"][1]["pid"].as_i64().expect("instance pid");
    let addr = daemon.proxy_addr().to_string();
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let workers: Vec<_> = (0..4)
        .map(|_| {
            let (addr, stop, ok, failed) = (addr.clone(), stop.clone(), ok.clone(), failed.clone());
            std::thread::spawn(move || {
                let mut errors = Vec::new();
                let mut conn: Option<Conn> = None;
                while !stop.load(Ordering::Relaxed) {
                    let c = match conn.as_mut() {
                        Some(c) => c,
                        None => conn.insert(Conn::open(&addr).expect("connect to the proxy")),
                    };
                    match c.request("GET", "/hostname", "load.localhost", &[], b"") {
                        Ok(r) if r.status == 200 => {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(r) => {
                            failed.fetch_add(1, Ordering::Relaxed);
                            errors.push(format!("{} {}", r.status, r.text()));
                        }
                        Err(e) => {
                            failed.fetch_add(1, Ordering::Relaxed);
                            errors.push(e.to_string());
                            conn = None;
                        }
                    }
                }
                errors
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(2));
    let before = ok.load(Ordering::Relaxed);
    // SAFETY: kill(2) on the PID of an instance this test started; no memory is involved.
    assert_eq!(unsafe { libc::kill(victim as i32, libc::SIGKILL) }, 0);
    std::thread::sleep(Duration::from_secs(3));
    stop.store(true, Ordering::Relaxed);
    let errors: Vec<String> = workers.into_iter().flat_map(|w| w.join().expect("worker")).collect();
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    eprintln!("requests: {ok} ok ({before} before the kill), {failed} failed");
    assert!(ok > before && before > 50, "too little load: {before} before, {ok} in all");
    assert_eq!(failed, 0, "{errors:?}");
}

#[test]
fn metrics_and_access_log() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("access.log");
    let log_arg = log.to_string_lossy().into_owned();
    let (_registry, image, daemon) = setup(&["--access-log", &log_arg]);
    launch(&daemon, &image, "web", 1, &[]);
    for _ in 0..5 {
        assert_eq!(get(&daemon, "web.localhost", "/status?code=503", &[]).status, 503);
    }
    let metrics = api_get(&daemon, "/metrics");
    assert!(metrics.contains("deliverous_proxy_requests_total{app=\"web\",code=\"5xx\"} 5"), "{metrics}");
    assert!(
        metrics.contains("deliverous_proxy_requests_total{app=\"web\",instance=\"web.1\",code=\"5xx\"} 5"),
        "{metrics}"
    );
    assert!(metrics.contains("deliverous_proxy_request_duration_seconds_bucket{app=\"web\",le=\"+Inf\"}"), "{metrics}");
    let ok = common::wait_until(Duration::from_secs(5), || {
        std::fs::read_to_string(&log).is_ok_and(|t| t.lines().filter(|l| l.contains("\"status\":503")).count() >= 5)
    });
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(ok, "access log: {text}");
    let line: serde_json::Value = serde_json::from_str(text.lines().last().unwrap_or("")).expect("JSON line");
    assert_eq!(line["app"], "web");
    assert_eq!(line["instance"], "web.1");
    assert_eq!(line["path"], "/status?code=503");
    assert_eq!(line["request_id"].as_str().map(str::len), Some(32));
}

/// A test CA and a certificate signed by it for `names`, written as `DIR/FILE.crt` + `.key`.
fn issue_cert(dir: &std::path::Path, ca: &std::path::Path, file: &str, names: &[&str]) {
    let san = names.iter().map(|n| format!("DNS:{n}")).collect::<Vec<_>>().join(",");
    let script = format!(
        "set -e; cd {work}; \
         [ -f ca.pem ] || openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
            -keyout ca.key -out ca.pem -days 2 -subj /CN=dlv-test-ca 2>/dev/null; \
         openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout {file}.key \
            -out {file}.csr -subj /CN={file} 2>/dev/null; \
         printf 'subjectAltName={san}\\n' > {file}.ext; \
         openssl x509 -req -in {file}.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out {file}.crt -days 2 \
            -extfile {file}.ext 2>/dev/null; \
         chmod 600 {file}.key; mv {file}.key {file}.crt {out}/",
        work = ca.display(),
        out = dir.display(),
    );
    let status = std::process::Command::new("bash").args(["-c", &script]).status().expect("run openssl");
    assert!(status.success(), "openssl failed");
}

/// `curl` over TLS with SNI `name`, trusting the test CA; (HTTP version, status, body).
fn curl_tls(port: u16, name: &str, ca: &std::path::Path, path: &str) -> (String, String, String) {
    let out = std::process::Command::new("curl")
        .args(["-sS", "--max-time", "10", "--resolve", &format!("{name}:{port}:127.0.0.1"), "--cacert"])
        .arg(ca.join("ca.pem"))
        .args(["-w", "\n%{http_version} %{http_code}", &format!("https://{name}:{port}{path}")])
        .output()
        .expect("run curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, last) = text.rsplit_once('\n').unwrap_or(("", &text));
    let (version, code) = last.split_once(' ').unwrap_or(("", ""));
    (version.to_string(), code.to_string(), format!("{body}{}", String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn tls_termination_with_sni_http2_and_certificates_reloaded_in_place() {
    let certs = tempfile::tempdir().expect("tempdir");
    let ca = tempfile::tempdir().expect("tempdir");
    issue_cert(certs.path(), ca.path(), "wild", &["*.tls.test"]);
    let port = common::free_port();
    let https = format!("127.0.0.1:{port}");
    let certs_arg = certs.path().to_string_lossy().into_owned();
    let (_registry, image, daemon) = setup(&["--https-listen", &https, "--certs-dir", &certs_arg]);
    launch(&daemon, &image, "web", 1, &["--domain", "*.tls.test", "--domain", "new.example.test"]);
    // ALPN picks HTTP/2; the app learns the request came over HTTPS.
    let (version, code, body) = curl_tls(port, "a.tls.test", ca.path(), "/headers");
    assert_eq!((version.as_str(), code.as_str()), ("2", "200"), "{body}");
    assert!(body.contains("x-forwarded-proto: https"), "{body}");
    // No certificate for this name yet: the default one (for *.tls.test) fails the name check.
    let (_, code, body) = curl_tls(port, "new.example.test", ca.path(), "/hostname");
    assert_ne!(code, "200", "{body}");
    // A certificate dropped into the directory is served without a restart.
    issue_cert(certs.path(), ca.path(), "new", &["new.example.test"]);
    let ok = common::wait_until(Duration::from_secs(15), || {
        curl_tls(port, "new.example.test", ca.path(), "/hostname").1 == "200"
    });
    assert!(ok, "new certificate not picked up: {:?}", curl_tls(port, "new.example.test", ca.path(), "/hostname"));
    assert_eq!(curl_tls(port, "b.tls.test", ca.path(), "/hostname").1, "200");
}

#[test]
fn idle_and_slow_clients_are_cut_at_the_client_timeout() {
    let (_registry, image, daemon) = setup(&["--client-timeout", "1s"]);
    launch(&daemon, &image, "web", 1, &[]);
    let closed_within = |mut s: TcpStream| {
        let start = Instant::now();
        s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        let mut buf = [0u8; 1024];
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => return start.elapsed(),
                Ok(_) => {}
            }
        }
    };
    // A client that connects and sends half a request head.
    let mut s = TcpStream::connect(daemon.proxy_addr()).expect("connect");
    s.write_all(b"GET / HTTP/1.1\r\nHost: web.local").expect("write");
    let t = closed_within(s);
    assert!(t < Duration::from_secs(4), "half a head kept for {t:?}");
    // An idle keep-alive connection after one request.
    let mut c = Conn::open(daemon.proxy_addr()).expect("connect");
    assert_eq!(c.request("GET", "/hostname", "web.localhost", &[], b"").expect("request").status, 200);
    let t = closed_within(c.stream().try_clone().expect("clone"));
    assert!(t < Duration::from_secs(4), "idle keep-alive connection kept for {t:?}");
}

/// Kills (by PID) and reaps a child when dropped.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_proxy_runs_alone_with_routes_from_a_file_reloaded_on_sighup() {
    let dir = tempfile::tempdir().expect("tempdir");
    let app_port = common::free_port();
    let _app = Child(
        std::process::Command::new(common::testapp_binary())
            .env("PORT", app_port.to_string())
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("start the testapp on the host"),
    );
    let routes = dir.path().join("routes.json");
    let write_routes = |host: &str| {
        let config = serde_json::json!({"apps": [{"app": "solo", "hosts": [host],
            "backends": [{"instance": "solo.1", "addr": format!("127.0.0.1:{app_port}")}]}]});
        std::fs::write(&routes, config.to_string()).expect("write routes");
    };
    write_routes("one.test");
    let listen = format!("127.0.0.1:{}", common::free_port());
    let proxy = Child(
        std::process::Command::new(env!("CARGO_BIN_EXE_deliverous"))
            .args(["proxy", "--listen", &listen, "--proxy-threads", "1", "--routes"])
            .arg(&routes)
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start deliverous proxy"),
    );
    common::http_get_retry(&listen, "one.test", "/hostname", Duration::from_secs(10), |s, _| s == 200);
    write_routes("two.test");
    // SAFETY: kill(2) on the PID of the proxy this test started.
    assert_eq!(unsafe { libc::kill(proxy.0.id() as i32, libc::SIGHUP) }, 0);
    common::http_get_retry(&listen, "two.test", "/hostname", Duration::from_secs(10), |s, _| s == 200);
    assert_eq!(common::http_get(&listen, "one.test", "/").0, 404);
    // A broken file keeps the routes it had.
    std::fs::write(&routes, "{not json").expect("write");
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(proxy.0.id() as i32, libc::SIGHUP) }, 0);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(common::http_get(&listen, "two.test", "/hostname").0, 200);
}
