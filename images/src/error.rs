//! The crate's error type: one enum for every operation, so the daemon can tell a caller's mistake
//! (bad name, unknown image, private image, wrong platform) from a failure on our side.

use std::io;

/// Everything that can go wrong while naming, pulling, storing or unpacking an image.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The text given as an image reference does not follow the Docker reference grammar.
    #[error("invalid image reference {input:?}: {reason}")]
    InvalidReference {
        /// The text as given.
        input: String,
        /// What is wrong with it and what was expected.
        reason: String,
    },

    /// The registry answered but has no such repository, tag or digest.
    #[error("image {reference} not found in {registry}: check the name and tag")]
    NotFound {
        /// Normalised reference that was asked for.
        reference: String,
        /// Registry host that was asked.
        registry: String,
    },

    /// The registry could not be reached at all (DNS failure, connection refused, timeout, TLS).
    #[error(
        "registry {registry} is unreachable: {reason}; check the address and that it is running \
         (a registry served over plain HTTP must be listed as insecure)"
    )]
    Unreachable {
        /// Registry host that was tried.
        registry: String,
        /// The underlying cause, with its whole chain.
        reason: String,
    },

    /// The registry refused an anonymous pull: no credentials are stored for it.
    #[error(
        "registry {registry} refused access to {reference}: {reason}; the image may not exist, or it is \
         private and needs credentials: run `deliverous registry login {registry}`"
    )]
    Unauthorized {
        /// Normalised reference that was asked for.
        reference: String,
        /// Registry host that refused.
        registry: String,
        /// What the registry said.
        reason: String,
    },

    /// The registry refused the credentials stored for it, or the user they name may not pull this
    /// image.
    #[error(
        "registry {registry} refused access to {reference} with the credentials of user {username:?} \
         (from {file}): {reason}; check that this user may pull the image, or run \
         `deliverous registry login {registry}` again if the password or token has changed"
    )]
    CredentialsRejected {
        /// Normalised reference that was asked for.
        reference: String,
        /// Registry host that refused.
        registry: String,
        /// User name of the stored credentials.
        username: String,
        /// The file the credentials came from.
        file: String,
        /// What the registry said.
        reason: String,
    },

    /// A login check: the registry (or its token service) refused this user name and secret.
    #[error(
        "registry {registry} refused the login of user {username:?}: {reason}; check the user name and the \
         password or access token"
    )]
    LoginFailed {
        /// Registry host that refused.
        registry: String,
        /// The user name that was tried.
        username: String,
        /// What the registry said.
        reason: String,
    },

    /// Credentials given to store or check cannot be used as they are (empty, or a user name with
    /// a colon, which HTTP basic authentication cannot carry).
    #[error("invalid registry credentials: {reason}")]
    InvalidCredentials {
        /// What is wrong and what was expected.
        reason: String,
    },

    /// A credentials file (ours or Docker's) exists but cannot be used; nothing in it was trusted.
    #[error("credentials file {file}: {reason}; fix the file or remove it")]
    CredentialsFile {
        /// The file's path.
        file: String,
        /// What is wrong with it and what was expected.
        reason: String,
    },

    /// The reference names a multi-platform index that has no entry for this host.
    #[error("image {reference} has no variant for {wanted}; it offers: {}", available.join(", "))]
    NoMatchingPlatform {
        /// Normalised reference that was asked for.
        reference: String,
        /// The platform this host needs, e.g. `linux/amd64`.
        wanted: String,
        /// The platforms the index lists.
        available: Vec<String>,
    },

    /// Content did not hash to the digest it was fetched or recorded under; nothing was kept.
    #[error(
        "{what}: expected digest {expected}, found {actual}; the registry or the network corrupted it, retry the pull"
    )]
    DigestMismatch {
        /// Which object (blob digest, layer diff_id).
        what: String,
        /// Digest we were promised.
        expected: String,
        /// Digest of what we received.
        actual: String,
    },

    /// A layer could not be unpacked safely; its temporary directory was removed.
    #[error("cannot unpack layer {layer}: {reason}")]
    Unpack {
        /// diff_id or blob digest of the layer.
        layer: String,
        /// Which entry failed and why.
        reason: String,
    },

    /// A layer unpacks to more than the per-layer limit (`UnpackOptions::max_unpacked_bytes`): a
    /// decompression bomb, or an image larger than this host accepts. Nothing was kept.
    #[error(
        "layer {layer} is larger than the limit of {limit} bytes per layer: {what}; it may be a decompression \
         bomb. If the image is trusted, raise the limit (max_unpacked_bytes)"
    )]
    LayerTooLarge {
        /// diff_id of the layer.
        layer: String,
        /// The limit in bytes.
        limit: u64,
        /// What went over it (the decompressed stream, or which entry).
        what: String,
    },

    /// An image archive given to import (`docker save` tarball, OCI layout or OCI archive) cannot
    /// be imported as it is: malformed, truncated, corrupt (a digest does not match), hostile, or
    /// it names no image and no name was given. Nothing from it was kept.
    #[error("cannot import {archive}: {reason}")]
    InvalidArchive {
        /// The archive's path.
        archive: String,
        /// What is wrong, and what to do about it.
        reason: String,
    },

    /// A local file system operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What we were doing, with the path.
        context: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },

    /// Any other registry or protocol failure (bad manifest, server error, rate limit...).
    #[error("registry {registry}: {message}")]
    Registry {
        /// Registry host involved.
        registry: String,
        /// What happened.
        message: String,
    },
}

impl Error {
    /// True when the caller asked for something that cannot work (answer 4xx), false when the
    /// failure is on our side or the network's (answer 5xx, maybe retry).
    pub fn is_user_error(&self) -> bool {
        matches!(
            self,
            Error::InvalidReference { .. }
                | Error::NotFound { .. }
                | Error::Unauthorized { .. }
                | Error::CredentialsRejected { .. }
                | Error::LoginFailed { .. }
                | Error::InvalidCredentials { .. }
                | Error::NoMatchingPlatform { .. }
                | Error::LayerTooLarge { .. }
                | Error::InvalidArchive { .. }
        )
    }

    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error::Io { context: context.into(), source }
    }
}

/// Adds a description of what we were doing to an `io::Result`.
pub(crate) trait IoContext<T> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T, Error>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T, Error> {
        self.map_err(|e| Error::io(what(), e))
    }
}
