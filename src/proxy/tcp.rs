//! TCP passthrough: an app publishes a raw port (Redis, Postgres, MQTT…); each connection goes to
//! one of its instances, chosen as for HTTP, and bytes flow both ways until either side closes.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};

use super::routes::{RouteTable, TcpPort};

pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let s = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None)?;
    s.set_reuse_address(true)?;
    // A newer proxy taking over binds the port while the retiring one still holds it.
    s.set_reuse_port(true)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(1024)?;
    TcpListener::from_std(s.into())
}

/// Accepts on `listener` for as long as the task runs (the control thread aborts it when the port
/// leaves the table); open connections live on until they end.
pub async fn serve(listener: TcpListener, port: TcpPort, table: Arc<RouteTable>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("TCP port {}: accept: {e}", port.listen);
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        tokio::spawn(relay(stream, peer, port, table.clone()));
    }
}

async fn relay(mut client: TcpStream, peer: SocketAddr, port: TcpPort, table: Arc<RouteTable>) {
    let _ = client.set_nodelay(true);
    let route = {
        let t = table.load();
        t.tcp.iter().find(|(p, _)| p.listen == port.listen).map(|(_, r)| r.clone())
    };
    let Some(route) = route else { return };
    let mut tried = Vec::new();
    while let Some(idx) = route.pick(&tried) {
        tried.push(idx);
        let backend = route.backends[idx].clone();
        let addr = SocketAddr::new(backend.addr.ip(), port.target);
        let connected = tokio::time::timeout(route.options.connect_timeout(), TcpStream::connect(addr)).await;
        let mut upstream = match connected {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                tracing::debug!(app = %route.app, "TCP {addr}: {e}");
                backend.eject();
                continue;
            }
            Err(_) => {
                tracing::debug!(app = %route.app, "TCP {addr}: connect timed out");
                backend.eject();
                continue;
            }
        };
        let _ = upstream.set_nodelay(true);
        let _in_flight = backend.enter();
        route.metrics.connections.fetch_add(1, Ordering::Relaxed);
        backend.metrics.connections.fetch_add(1, Ordering::Relaxed);
        match tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
            Ok((up, down)) => {
                for m in [&route.metrics, &backend.metrics] {
                    m.bytes_in.fetch_add(up, Ordering::Relaxed);
                    m.bytes_out.fetch_add(down, Ordering::Relaxed);
                }
            }
            Err(e) => tracing::debug!(app = %route.app, "TCP connection from {peer}: {e}"),
        }
        return;
    }
    tracing::warn!(app = %route.app, "TCP port {}: no instance accepted the connection from {peer}", port.listen);
}
