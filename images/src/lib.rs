//! Container images for deliverous: parsing references, pulling from OCI/Docker registries,
//! the content-addressed blob store, safe layer unpacking into overlay-ready directories, and
//! the local index of pulled images.
//!
//! On disk, under the data dir given to [`ImageStore::open`]:
//! - `blobs/sha256/<hex>`: compressed blobs exactly as the registry served them;
//! - `layers/<hex of diff_id>/`: one unpacked layer, whiteouts in overlayfs form;
//! - `images/<sha256 of reference>.json`: one [`Image`] record per pulled reference.
//!
//! Every write is a temporary name plus a rename, so a crash or a concurrent pull never leaves
//! something that looks complete but is not. While a blob is fetched, `blobs/sha256/.lock-<hex>`
//! is locked (`flock`), so pulls in other processes sharing the data dir wait and find it done.
//!
//! [`ImageStore::import`] brings images in from a file instead (`docker save` tarballs, OCI
//! layouts and OCI archives), for hosts that cannot reach a registry.
//!
//! Pulls use the registry credentials found by [`CredentialFiles`] (our `auth.json`, then
//! Docker's `config.json`); [`store_credentials`] and [`check_login`] are what a `registry login`
//! command needs.

pub mod credentials;
mod error;
mod import;
mod lock;
mod reference;
mod registry;
mod store;
pub mod unpack;

pub use credentials::{
    check_login, list_credentials, remove_credentials, store_credentials, Credential, CredentialFiles, LoginCheck,
    Secret, DEFAULT_AUTH_FILE,
};
pub use error::Error;
pub use reference::{is_loopback_host, Reference, DEFAULT_REGISTRY};
pub use store::{
    HealthTest, Healthcheck, Image, ImageConfig, ImageStore, ImportOptions, LayerSize, Progress, PruneReport,
    PullEvent, PullOptions,
};
pub use unpack::UnpackOptions;
