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
//! something that looks complete but is not.

mod error;
mod reference;
mod registry;
mod store;
pub mod unpack;

pub use error::Error;
pub use reference::{is_loopback_host, Reference, DEFAULT_REGISTRY};
pub use store::{Image, ImageConfig, ImageStore, PullOptions};
pub use unpack::UnpackOptions;
