//! The reverse proxy, the data plane: routes each request by `Host` (exact or wildcard) and path
//! prefix to one of the app's instances, streams bodies both ways, tunnels upgrades, and keeps
//! connections to instances alive. It reads only the route table, which the supervisor rebuilds
//! off the hot path and swaps in atomically.

pub mod access;
mod body;
pub mod cli;
mod client;
pub mod control;
mod forward;
mod h1;
pub mod health;
pub mod link;
pub mod metrics;
mod pool;
pub mod proxy_protocol;
pub mod routes;
mod server;
mod tcp;
mod timer;
pub mod tls;

pub use routes::{AppRoute, BackendSpec, Balance, HealthCheck, RouteConfig, RouteOptions, RouteTable, TcpPort};
pub use server::{bind_listeners, start_on, Cidr, Listener, ProxyHandle, ProxyOptions};

/// Resolves once the flag is (or has been) set; never if its sender is gone without setting it.
pub async fn set(flag: &mut tokio::sync::watch::Receiver<bool>) {
    if flag.wait_for(|v| *v).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// `Web.Example.com:8080.` → `web.example.com`; borrowed when already in that form (most are).
pub fn normalize_host(raw: &str) -> std::borrow::Cow<'_, str> {
    let plain = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.';
    if !raw.ends_with('.') && raw.bytes().all(plain) {
        return std::borrow::Cow::Borrowed(raw);
    }
    let host = if raw.starts_with('[') {
        raw.split(']').next().map(|h| format!("{h}]")).unwrap_or_default()
    } else {
        raw.rsplit_once(':')
            .filter(|(_, p)| p.chars().all(|c| c.is_ascii_digit()))
            .map(|(h, _)| h)
            .unwrap_or(raw)
            .to_string()
    };
    std::borrow::Cow::Owned(host.trim_end_matches('.').to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_are_normalized() {
        assert_eq!(normalize_host("Web.LocalHost:8080"), "web.localhost");
        assert_eq!(normalize_host("example.com."), "example.com");
        assert_eq!(normalize_host("[::1]:80"), "[::1]");
        assert!(matches!(normalize_host("web.localhost"), std::borrow::Cow::Borrowed(_)));
    }
}
