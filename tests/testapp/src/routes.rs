//! Which route answers a request, and the routes that exercise HTTP itself for the proxy's
//! tests: bodies, streaming, trailers, WebSocket, slow and failing answers, health, resets.
//! The routes that act on the instance live in [`crate::instance`].

use std::io::{self, BufReader, Read};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::digest::Fnv1a64;
use crate::http::Body;
use crate::instance::{self, param};
use crate::server::Exchange;
use crate::websocket;

/// What the connection does once a route has answered.
pub enum After {
    /// Serve the next request, if the exchange kept the connection alive.
    Next,
    /// The connection was handed to another protocol, which has ended.
    Upgraded,
    /// Abort the connection with a RST.
    Reset,
    /// Exit the process with this code.
    Exit(i32),
}

/// What `/health` answers; `/health/set` changes it.
static HEALTHY: AtomicBool = AtomicBool::new(true);

pub fn set_healthy(ok: bool) {
    HEALTHY.store(ok, Ordering::Relaxed);
}

/// How long an upgraded WebSocket may stay silent.
const WEBSOCKET_IDLE: Duration = Duration::from_secs(300);

/// `/big` repeats these 64 bytes (a divisor of 1 MiB, so every MiB is the same).
pub const BIG_PATTERN: &[u8; 64] = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ-\n";

pub fn handle(ex: &mut Exchange, body: &mut Body<&mut BufReader<TcpStream>>) -> io::Result<After> {
    let head = ex.head;
    let (path, query) = (head.path(), head.query());
    match path {
        "/upload" if matches!(head.method.as_str(), "POST" | "PUT") => return upload(ex, body),
        "/reset" => {
            ex.log("reset");
            return Ok(After::Reset);
        }
        _ => {}
    }
    // The other routes ignore the body; read it away so that the next request starts where
    // the client thinks it does.
    if !body.is_done() {
        ex.continue_if_expected()?;
    }
    if let Err(e) = io::copy(body, &mut io::sink()) {
        ex.close_after();
        ex.reply(400, format!("bad request body: {e}\n"))?;
        return Ok(After::Next);
    }
    match path {
        "/ws" => return upgrade_websocket(ex, body),
        "/upload" => ex.reply_with(405, &[("Allow", "POST, PUT")], b"method not allowed: POST or PUT a body\n")?,
        "/headers" => headers(ex)?,
        "/sse" => events(ex, query)?,
        "/stream" => stream(ex, query)?,
        "/big" => big(ex, query)?,
        "/trailers" => trailers(ex)?,
        "/slow" => slow(ex, query)?,
        "/status" => status(ex, query)?,
        "/health" if HEALTHY.load(Ordering::Relaxed) => ex.reply(200, "ok\n")?,
        "/health" => ex.reply(503, "unhealthy\n")?,
        "/health/set" => match param(query, "ok") {
            Some(v @ ("0" | "1")) => {
                set_healthy(v == "1");
                ex.reply(200, format!("ok={v}\n"))?;
            }
            _ => ex.reply(400, "usage: /health/set?ok=0|1\n")?,
        },
        _ => {
            let (status, text, exit_code) = instance::route(&head.method, path, query);
            if let Some(code) = exit_code {
                ex.close_after();
                ex.reply(status, text)?;
                return Ok(After::Exit(code));
            }
            ex.reply(status, text)?;
        }
    }
    Ok(After::Next)
}

/// `POST|PUT /upload`: reads the body through and answers its size and FNV-1a 64.
fn upload(ex: &mut Exchange, body: &mut Body<&mut BufReader<TcpStream>>) -> io::Result<After> {
    if !body.is_done() {
        ex.continue_if_expected()?;
    }
    let mut hash = Fnv1a64::new();
    let mut total: u64 = 0;
    let mut buf = [0u8; 16 * 1024];
    loop {
        match body.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                hash.update(&buf[..n]);
                total += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                ex.close_after();
                ex.reply(400, format!("bad request body after {total} bytes: {e}\n"))?;
                return Ok(After::Next);
            }
        }
    }
    ex.reply(200, format!("bytes={total} fnv={:016x}\n", hash.finish()))?;
    Ok(After::Next)
}

/// `GET /headers`: the request's header fields as received (names lowercased), then the peer.
fn headers(ex: &mut Exchange) -> io::Result<()> {
    let mut text = Vec::new();
    for (name, value) in &ex.head.headers {
        text.extend_from_slice(name.as_bytes());
        text.extend_from_slice(b": ");
        text.extend_from_slice(value);
        text.push(b'\n');
    }
    text.extend_from_slice(format!("peer={}\n", ex.peer).as_bytes());
    ex.reply(200, text)
}

/// A number parameter, or `default` when it is absent; `None` when it is there but not a number.
fn number(query: &str, name: &str, default: Option<u64>) -> Option<u64> {
    match param(query, name) {
        Some(v) => v.parse().ok(),
        None => default,
    }
}

/// `GET /sse?n=N&ms=M`: N server-sent events, M ms apart, each flushed as it is written.
fn events(ex: &mut Exchange, query: &str) -> io::Result<()> {
    let (Some(n), Some(ms)) = (number(query, "n", None), number(query, "ms", Some(0))) else {
        return ex.reply(400, "usage: /sse?n=N[&ms=M]\n");
    };
    ex.start(200, "text/event-stream", &[("Cache-Control", "no-cache")], None)?;
    ex.flush()?;
    for i in 0..n {
        if !ex.has_body() {
            break;
        }
        if i > 0 {
            std::thread::sleep(Duration::from_millis(ms));
        }
        ex.send(format!("data: event {i}\n\n").as_bytes())?;
        ex.flush()?;
    }
    ex.finish(&[])
}

/// `GET /stream?chunks=N&size=S&ms=M`: N chunks of S bytes of `x`, M ms apart.
fn stream(ex: &mut Exchange, query: &str) -> io::Result<()> {
    let (Some(chunks), Some(size), Some(ms)) =
        (number(query, "chunks", None), number(query, "size", None), number(query, "ms", Some(0)))
    else {
        return ex.reply(400, "usage: /stream?chunks=N&size=S[&ms=M]\n");
    };
    ex.start(200, "text/plain", &[], None)?;
    ex.flush()?;
    for i in 0..chunks {
        if !ex.has_body() {
            break;
        }
        if i > 0 {
            std::thread::sleep(Duration::from_millis(ms));
        }
        ex.send_from(size, &mut io::repeat(b'x'))?;
        ex.flush()?;
    }
    ex.finish(&[])
}

/// An endless [`BIG_PATTERN`].
struct Pattern {
    at: usize,
}

impl Read for Pattern {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut filled = 0;
        while filled < buf.len() {
            let piece = (BIG_PATTERN.len() - self.at).min(buf.len() - filled);
            buf[filled..filled + piece].copy_from_slice(&BIG_PATTERN[self.at..self.at + piece]);
            filled += piece;
            self.at = (self.at + piece) % BIG_PATTERN.len();
        }
        Ok(filled)
    }
}

/// `GET /big?mb=N`: N MiB of [`BIG_PATTERN`] with a Content-Length.
fn big(ex: &mut Exchange, query: &str) -> io::Result<()> {
    let Some(len) = number(query, "mb", None).and_then(|mb| mb.checked_mul(1024 * 1024)) else {
        return ex.reply(400, "usage: /big?mb=N\n");
    };
    ex.start(200, "application/octet-stream", &[], Some(len))?;
    ex.send_from(len, &mut Pattern { at: 0 })?;
    ex.finish(&[])
}

/// `GET /trailers`: a chunked `hello\n` followed by two trailer fields.
fn trailers(ex: &mut Exchange) -> io::Result<()> {
    ex.start(200, "text/plain", &[("Trailer", "X-Checksum, X-Count")], None)?;
    ex.send(b"hello\n")?;
    ex.finish(&[("X-Checksum", "abc123"), ("X-Count", "1")])
}

/// `GET /slow?ms=N`: answers after N ms.
fn slow(ex: &mut Exchange, query: &str) -> io::Result<()> {
    let Some(ms) = number(query, "ms", None) else {
        return ex.reply(400, "usage: /slow?ms=N\n");
    };
    std::thread::sleep(Duration::from_millis(ms));
    ex.reply(200, format!("slept {ms}\n"))
}

/// `GET /status?code=N`: answers with status N (200 to 599).
fn status(ex: &mut Exchange, query: &str) -> io::Result<()> {
    match param(query, "code").and_then(|v| v.parse::<u16>().ok()) {
        Some(code @ 200..=599) => ex.reply(code, format!("status {code}\n")),
        _ => ex.reply(400, "usage: /status?code=N with 200 <= N <= 599\n"),
    }
}

/// `GET /ws`: the WebSocket handshake (RFC 6455 §4.2), then an echo until the client closes.
fn upgrade_websocket(ex: &mut Exchange, body: &mut Body<&mut BufReader<TcpStream>>) -> io::Result<After> {
    let head = ex.head;
    let key = head.header("sec-websocket-key").map(str::trim).filter(|k| !k.is_empty());
    let Some(key) = key.filter(|_| {
        head.method == "GET" && head.has_token("upgrade", "websocket") && head.has_token("connection", "upgrade")
    }) else {
        ex.reply(
            400,
            "expected a WebSocket handshake: GET with Upgrade: websocket, Connection: Upgrade and Sec-WebSocket-Key\n",
        )?;
        return Ok(After::Next);
    };
    if head.header("sec-websocket-version").map(str::trim) != Some("13") {
        ex.reply_with(426, &[("Sec-WebSocket-Version", "13")], b"only WebSocket version 13 is spoken\n")?;
        return Ok(After::Next);
    }
    let accept = websocket::accept_key(key);
    let reader = body.connection();
    let _ = reader.get_ref().set_read_timeout(Some(WEBSOCKET_IDLE));
    let writer =
        ex.switch_protocols(&[("Upgrade", "websocket"), ("Connection", "Upgrade"), ("Sec-WebSocket-Accept", &accept)])?;
    // Frames the client sent right behind the handshake are already in the reader's buffer.
    websocket::echo(reader, writer)?;
    Ok(After::Upgraded)
}
