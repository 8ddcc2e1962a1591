//! Active health checks: every backend of a route that declares one is probed on its own
//! schedule; `fall` failures in a row take it out of rotation, `rise` successes bring it back.

use std::net::SocketAddr;
use std::sync::Weak;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::routes::{Backend, HealthCheck};

/// Probes `backend` until it is gone from every table.
pub async fn run(backend: Weak<Backend>, check: HealthCheck) {
    let interval = Duration::from_millis(check.interval_ms.max(100));
    let timeout = Duration::from_millis(check.timeout_ms.max(10));
    let (mut ups, mut downs) = (0u32, 0u32);
    loop {
        tokio::time::sleep(interval).await;
        let Some(addr) = backend.upgrade().filter(|b| !b.is_retired()).map(|b| b.addr) else { return };
        let result = tokio::time::timeout(timeout, probe(addr, check.path.as_deref())).await;
        let ok = matches!(result, Ok(Ok(())));
        if let Ok(Err(e)) | Err(e) = result.map_err(|_| format!("no answer within {timeout:?}")) {
            tracing::debug!(%addr, "health check failed: {e}");
        }
        let Some(b) = backend.upgrade() else { return };
        if ok {
            ups += 1;
            downs = 0;
            if ups >= check.rise.max(1) {
                b.set_healthy(true);
            }
        } else {
            downs += 1;
            ups = 0;
            if downs >= check.fall.max(1) {
                b.set_healthy(false);
            }
        }
    }
}

/// A TCP connect, and with a path a `GET` answered by a 2xx or 3xx status.
async fn probe(addr: SocketAddr, path: Option<&str>) -> Result<(), String> {
    let mut stream = TcpStream::connect(addr).await.map_err(|e| format!("connect: {e}"))?;
    let Some(path) = path else { return Ok(()) };
    http_get_ok(&mut stream, addr, path, "deliverous-health-check").await
}

/// `GET path` over `stream` (connected to `addr`), answered by a 2xx or 3xx status; the error
/// says what came instead. The proxy's checks and the supervisor's share it.
pub async fn http_get_ok(stream: &mut TcpStream, addr: SocketAddr, path: &str, agent: &str) -> Result<(), String> {
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: {agent}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.map_err(|e| format!("send: {e}"))?;
    let mut head = Vec::with_capacity(64);
    let mut buf = [0u8; 256];
    while !head.contains(&b'\n') && head.len() < 1024 {
        let n = stream.read(&mut buf).await.map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&head);
    match line.split_whitespace().nth(1).and_then(|s| s.parse::<u16>().ok()) {
        Some(200..=399) => Ok(()),
        Some(code) => Err(format!("GET {path}: status {code}")),
        None => Err(format!("GET {path}: not an HTTP answer: {:?}", line.lines().next().unwrap_or(""))),
    }
}
