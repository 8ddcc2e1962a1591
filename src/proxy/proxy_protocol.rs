//! Placeholder until the PROXY protocol reader lands.
use std::time::Duration;
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProxyHeader {
    Local,
    Proxied { source: std::net::SocketAddr, destination: std::net::SocketAddr },
}
#[derive(Debug, thiserror::Error)]
#[error("PROXY protocol: not supported yet")]
pub struct ProxyProtocolError;
pub async fn read_header(
    _stream: &mut tokio::net::TcpStream,
    _timeout: Duration,
) -> Result<ProxyHeader, ProxyProtocolError> {
    Err(ProxyProtocolError)
}
