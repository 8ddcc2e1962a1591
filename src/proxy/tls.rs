//! Placeholder until the certificate store lands.
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
#[derive(Debug)]
pub struct CertStore;
#[derive(Debug, thiserror::Error)]
#[error("TLS is not supported yet")]
pub struct TlsError;
pub struct CertWatch;
impl CertStore {
    pub fn load(_dir: &Path) -> Result<Arc<CertStore>, TlsError> {
        Err(TlsError)
    }
    pub fn server_config(self: &Arc<Self>) -> Arc<rustls::ServerConfig> {
        unimplemented!()
    }
    pub fn watch(self: &Arc<Self>, _interval: Duration) -> CertWatch {
        CertWatch
    }
}
