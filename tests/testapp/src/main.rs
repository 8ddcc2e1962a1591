//! A tiny HTTP/1.1 server that integration tests run as an app instance.
//!
//! It makes an instance's inside observable and controllable over HTTP, and gives the proxy's
//! tests an upstream with every HTTP behaviour they need. Routes (query values are not decoded):
//!
//! About the instance (GET or HEAD only; see `instance.rs`):
//! - `/` and `/hostname`: the hostname (= instance name); `/env/NAME`: an environment variable
//! - `/hog?mb=N`: grows the process by N MiB (to get the instance OOM-killed)
//! - `/exit?code=N`: answers, then the process exits with that code
//! - `/spawn?n=N&secs=S`: starts N `sleep S` children (stopping at the first failure, e.g. the
//!   pids limit); `/bomb`: starts a shell fork bomb
//! - `/spin?ms=N`: burns CPU for N ms of wall time and answers the CPU time it got
//! - `/file?path=P[&content=C]`: reads (or writes) a file
//! - `/probe`: what the instance may do to the kernel (capabilities, seccomp, masked and
//!   read-only paths, devices), one `key=value` per line
//!
//! About HTTP (any method unless said; see `routes.rs`):
//! - `POST|PUT /upload`: reads the body (Content-Length or chunked, `Expect: 100-continue`
//!   honoured) and answers `bytes=N fnv=<FNV-1a 64, 16 hex digits>`
//! - `/headers`: the request's header fields as received, names lowercased, then `peer=IP:PORT`
//! - `/sse?n=N[&ms=M]`: N server-sent events `data: event I`, M ms apart, chunked
//! - `/stream?chunks=N&size=S[&ms=M]`: N chunks of S bytes of `x`, M ms apart
//! - `/big?mb=N`: N MiB of a 64-byte pattern (`0-9a-zA-Z-\n`) with a Content-Length
//! - `/trailers`: chunked `hello\n` with trailer fields `X-Checksum: abc123`, `X-Count: 1`
//! - `GET /ws` with `Upgrade: websocket`: RFC 6455 handshake, then an echo of every message
//!   (ping → pong, close → close); 400 without the upgrade headers
//! - `/slow?ms=N`: answers `slept N` after N ms; `/status?code=N`: status N, body `status N`
//! - `/health`: 200 `ok` or 503 `unhealthy`; `/health/set?ok=0|1` switches it (healthy at
//!   start, unless `UNHEALTHY_AT_START=1`)
//! - `/reset`: no answer, the connection is aborted with a RST
//!
//! Every answer carries `X-Instance: <hostname>`; every request prints an access-log line
//! `PEER METHOD TARGET STATUS` on stdout. Connections are kept alive between requests (HTTP/1.1
//! unless `Connection: close`; HTTP/1.0 with `Connection: keep-alive`) and closed after 30 s idle.
//! One thread per connection. With `TCP_PORT` set, that port also serves a TCP echo that first
//! sends `<hostname>\n` (see `tcp_echo.rs`). `PORT` (default 8080) is the HTTP port. With
//! `EXIT_AT_START=N` it exits with code N at once, serving nothing.

mod digest;
mod http;
mod instance;
mod routes;
mod server;
mod tcp_echo;
mod websocket;

#[cfg(test)]
mod tests;

use std::ffi::c_void;
use std::net::TcpListener;
use std::sync::OnceLock;

extern "C" {
    fn signal(signum: i32, handler: usize) -> usize;
    fn _exit(code: i32) -> !;
    fn syscall(num: i64, ...) -> i64;
    fn mount(source: *const u8, target: *const u8, fstype: *const u8, flags: u64, data: *const u8) -> i32;
    fn mknod(path: *const u8, mode: u32, dev: u64) -> i32;
    fn unshare(flags: i32) -> i32;
    fn setsockopt(fd: i32, level: i32, name: i32, value: *const c_void, len: u32) -> i32;
}

const SIGINT: i32 = 2;
const SIGTERM: i32 = 15;

/// As PID 1 of a container the default SIGTERM action is "ignore": we must install a handler.
extern "C" fn on_terminate(_signum: i32) {
    // SAFETY: `_exit` is async-signal-safe; nothing else runs in the handler.
    unsafe { _exit(0) }
}

fn main() {
    // SAFETY: installs a handler that only calls an async-signal-safe function.
    unsafe {
        signal(SIGTERM, on_terminate as extern "C" fn(i32) as usize);
        signal(SIGINT, on_terminate as extern "C" fn(i32) as usize);
    }
    // A process that cannot start (crash-loop tests).
    if let Some(code) = std::env::var("EXIT_AT_START").ok().and_then(|c| c.parse::<i32>().ok()) {
        println!("testapp: exiting at start with code {code} (EXIT_AT_START)");
        std::process::exit(code);
    }
    if std::env::var("UNHEALTHY_AT_START").as_deref() == Ok("1") {
        routes::set_healthy(false);
    }
    if let Ok(port) = std::env::var("TCP_PORT") {
        let listener = bind(&format!("0.0.0.0:{port}"));
        println!("testapp: TCP echo on 0.0.0.0:{port}");
        std::thread::spawn(move || tcp_echo::serve_forever(listener));
    }
    let addr = listen_addr();
    let listener = bind(&addr);
    println!("testapp: listening on {addr}");
    server::serve_forever(listener);
}

/// Where the HTTP server listens: all addresses, port `$PORT` (8080 by default).
fn listen_addr() -> String {
    let port = std::env::var("PORT").unwrap_or_else(|_| "8080".to_string());
    format!("0.0.0.0:{port}")
}

fn bind(addr: &str) -> TcpListener {
    TcpListener::bind(addr).unwrap_or_else(|e| {
        eprintln!("testapp: cannot listen on {addr}: {e}");
        std::process::exit(2);
    })
}

/// The hostname (= instance name), read once.
pub fn hostname() -> &'static str {
    static HOSTNAME: OnceLock<String> = OnceLock::new();
    HOSTNAME.get_or_init(|| std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default().trim().to_string())
}
