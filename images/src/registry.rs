//! Talking to registries through `oci-client`: which protocol a host gets, which credentials a
//! pull presents, which manifest of an index fits this host, streaming blobs, and turning the
//! client's errors into ours.

use std::collections::HashMap;
use std::io;
use std::time::Duration;

use futures_util::StreamExt;
use oci_client::client::{BlobResponse, ClientConfig, ClientProtocol, SizedStream};
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::manifest::{ImageIndexEntry, OciDescriptor, OciImageManifest, OciManifest};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, RegistryOperation};
use sha2::{Digest, Sha256};

use crate::credentials::{self, Credential, Secret};
use crate::unpack::Chunk;
use crate::{Error, PullOptions, Reference};

/// An image config is a few KiB; anything this large is not one.
const MAX_CONFIG_SIZE: i64 = 16 << 20;

/// A client for one pull: plain HTTP for loopback and insecure hosts, HTTPS for the rest, and no
/// platform resolver because we select the manifest ourselves (to report what was offered).
pub(crate) fn client(reference: &Reference, opts: &PullOptions) -> Client {
    Client::new(ClientConfig {
        protocol: ClientProtocol::HttpsExcept(plain_http_hosts(reference, opts)),
        platform_resolver: None,
        connect_timeout: Some(Duration::from_secs(15)),
        read_timeout: Some(Duration::from_secs(120)),
        ..ClientConfig::default()
    })
}

/// The registries a pull of `reference` reaches over plain HTTP.
fn plain_http_hosts(reference: &Reference, opts: &PullOptions) -> Vec<String> {
    let mut plain_http = opts.insecure_registries.clone();
    if reference.is_plain_http(&opts.insecure_registries) {
        plain_http.push(reference.registry().to_string());
    }
    plain_http
}

/// Clients kept between pulls, so a pull does not build a new one (`oci-client` builds two HTTP
/// clients per client, each parsing the CA roots: 6–9 ms before the first request) and reuses
/// the previous pull's connections. One per way of reaching registries and per credentials: a
/// client remembers the credentials it first saw per registry, and the tokens they earned (until
/// they expire), so a pull under other credentials never gets a client that holds someone else's.
/// Bearer access tokens (exchanged from an identity token at each pull) get a fresh client.
#[derive(Default)]
pub(crate) struct Clients(std::sync::Mutex<HashMap<ClientKey, Client>>);

/// Plain-HTTP registries, and a digest of the credentials (never the secret itself).
type ClientKey = (Vec<String>, [u8; 32]);

/// Different credentials are rare: past this many, the cache starts again.
const MAX_CLIENTS: usize = 16;

impl Clients {
    /// A client for a pull of `reference` that authenticates with `auth`.
    pub(crate) fn get(&self, reference: &Reference, opts: &PullOptions, auth: &RegistryAuth) -> Client {
        let who = match auth {
            RegistryAuth::Anonymous => Sha256::digest(b"anonymous"),
            RegistryAuth::Basic(user, password) => {
                let mut h = Sha256::new();
                // Length-prefixed, so no two (user, password) pairs digest the same input.
                for part in [user.as_bytes(), password.as_bytes()] {
                    h.update((part.len() as u64).to_le_bytes());
                    h.update(part);
                }
                h.finalize()
            }
            RegistryAuth::Bearer(_) => return client(reference, opts),
        };
        let mut plain_http = plain_http_hosts(reference, opts);
        plain_http.sort();
        plain_http.dedup();
        let key = (plain_http, who.into());
        let mut clients = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(c) = clients.get(&key) {
            return c.clone();
        }
        if clients.len() >= MAX_CLIENTS {
            clients.clear();
        }
        let c = client(reference, opts);
        clients.insert(key, c.clone());
        c
    }
}

impl std::fmt::Debug for Clients {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.0.lock().map_or(0, |c| c.len());
        write!(f, "Clients({n})")
    }
}

/// This host's platform in Go naming (`GOARCH`, arm variant), as indexes spell it.
pub(crate) fn host_platform() -> (&'static str, Option<&'static str>) {
    match std::env::consts::ARCH {
        "x86_64" => ("amd64", None),
        "aarch64" => ("arm64", Some("v8")),
        "arm" => ("arm", Some("v7")),
        "x86" => ("386", None),
        "powerpc64" if cfg!(target_endian = "little") => ("ppc64le", None),
        "powerpc64" => ("ppc64", None),
        "loongarch64" => ("loong64", None),
        other => (other, None),
    }
}

fn describe(entry: &ImageIndexEntry) -> String {
    match &entry.platform {
        Some(p) => match &p.variant {
            Some(v) => format!("{}/{}/{v}", p.os, p.architecture),
            None => format!("{}/{}", p.os, p.architecture),
        },
        None => "(no platform)".to_string(),
    }
}

/// Picks the index entry for linux on `arch`: the exact variant first, then an entry with no
/// variant, then (for 32-bit arm) older variants the CPU also runs. Err lists what was offered.
pub(crate) fn select_platform(
    entries: &[ImageIndexEntry],
    arch: &str,
    variant: Option<&str>,
) -> Result<String, Vec<String>> {
    let linux_arch: Vec<&ImageIndexEntry> = entries
        .iter()
        .filter(|e| {
            e.platform.as_ref().is_some_and(|p| p.os.to_string() == "linux" && p.architecture.to_string() == arch)
        })
        .collect();
    let variant_of = |e: &ImageIndexEntry| e.platform.as_ref().and_then(|p| p.variant.clone());
    let mut preference: Vec<Option<&str>> = vec![variant, None];
    if arch == "arm" {
        preference.extend([Some("v7"), Some("v6"), Some("v5")]);
    }
    for want in preference {
        if let Some(e) = linux_arch.iter().find(|e| variant_of(e).as_deref() == want) {
            return Ok(e.digest.clone());
        }
    }
    Err(entries.iter().map(describe).collect())
}

/// One pull's conversation with a registry: the client, the credentials it authenticates with
/// (none: anonymous), and the wording of its errors.
pub(crate) struct Session {
    client: Client,
    reference: Reference,
    oci: oci_client::Reference,
    auth: RegistryAuth,
    credential: Option<Credential>,
}

impl Session {
    /// Prepares a pull of `reference`. With credentials, authenticates at once, so a token service
    /// that refuses them says so (`oci-client` would otherwise fall back to anonymous requests and
    /// report a bare 401 later).
    pub(crate) async fn open(
        clients: &Clients,
        reference: &Reference,
        opts: &PullOptions,
        credential: Option<Credential>,
    ) -> Result<Session, Error> {
        let auth = match &credential {
            None => RegistryAuth::Anonymous,
            Some(c) => match &c.secret {
                Secret::Password(p) => RegistryAuth::Basic(c.username.clone(), p.clone()),
                Secret::IdentityToken(t) => {
                    let plain_http = reference.is_plain_http(&opts.insecure_registries);
                    match credentials::access_token(reference.registry(), reference.repository(), t, plain_http).await {
                        Ok(token) => RegistryAuth::Bearer(token),
                        Err(Error::Unauthorized { reason, .. }) => return Err(rejected(reference, c, reason)),
                        Err(e) => return Err(e),
                    }
                }
            },
        };
        let session = Session {
            client: clients.get(reference, opts, &auth),
            reference: reference.clone(),
            oci: reference.to_oci(),
            auth,
            credential,
        };
        if matches!(session.auth, RegistryAuth::Basic(..)) {
            session
                .client
                .auth(&session.oci, &session.auth, RegistryOperation::Pull)
                .await
                .map_err(|e| session.map_error(e))?;
        }
        Ok(session)
    }

    /// `map_error`, naming the credentials when the registry refused them.
    fn map_error(&self, e: OciDistributionError) -> Error {
        match (map_error(e, &self.reference), &self.credential) {
            (Error::Unauthorized { reason, .. }, Some(c)) => rejected(&self.reference, c, reason),
            (other, _) => other,
        }
    }

    /// Fetches the image manifest for this host, resolving an index or manifest list. Returns the
    /// manifest and its digest (the platform manifest's, not the index's).
    pub(crate) async fn manifest(&self) -> Result<(OciImageManifest, String), Error> {
        let reference = &self.reference;
        let (manifest, digest) =
            self.client.pull_manifest(&self.oci, &self.auth).await.map_err(|e| self.map_error(e))?;
        let index = match manifest {
            OciManifest::Image(m) => return Ok((m, digest)),
            OciManifest::ImageIndex(index) => index,
        };
        let (arch, variant) = host_platform();
        let chosen =
            select_platform(&index.manifests, arch, variant).map_err(|available| Error::NoMatchingPlatform {
                reference: reference.to_string(),
                wanted: match variant {
                    Some(v) => format!("linux/{arch}/{v}"),
                    None => format!("linux/{arch}"),
                },
                available,
            })?;
        let (manifest, digest) = self
            .client
            .pull_manifest(&self.oci.clone_with_digest(chosen.clone()), &self.auth)
            .await
            .map_err(|e| self.map_error(e))?;
        match manifest {
            OciManifest::Image(m) => Ok((m, digest)),
            OciManifest::ImageIndex(_) => Err(Error::Registry {
                registry: reference.registry().to_string(),
                message: format!("index entry {chosen} of {reference} is itself an index; expected an image manifest"),
            }),
        }
    }

    /// Fetches the (small) image config blob into memory, digest checked.
    pub(crate) async fn config(&self, desc: &OciDescriptor) -> Result<Vec<u8>, Error> {
        let reference = &self.reference;
        if desc.size > MAX_CONFIG_SIZE {
            return Err(Error::Registry {
                registry: reference.registry().to_string(),
                message: format!(
                    "config blob {} claims {} bytes; expected at most {MAX_CONFIG_SIZE}",
                    desc.digest, desc.size
                ),
            });
        }
        let mut buf = Vec::new();
        self.client.pull_blob(&self.oci, desc, &mut buf).await.map_err(|e| self.map_error(e))?;
        let actual = format!("sha256:{}", hex::encode(Sha256::digest(&buf)));
        if actual != desc.digest {
            return Err(Error::DigestMismatch {
                what: format!("config blob of {reference}"),
                expected: desc.digest.clone(),
                actual,
            });
        }
        Ok(buf)
    }

    /// Streams blob `desc` into `sink` chunk by chunk, then sends [`Chunk::End`]. Refuses more
    /// bytes than the descriptor declares. The digest is checked by whoever consumes the chunks.
    /// Returns early, without error, if the consumer went away: it has its own error to report.
    /// `progress` hears the bytes received so far, at most every 100 ms and once at the end.
    pub(crate) async fn stream_blob(
        &self,
        desc: &OciDescriptor,
        sink: tokio::sync::mpsc::Sender<Chunk>,
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<(), Error> {
        let registry = || self.reference.registry().to_string();
        let mut stream = self.open_blob(desc).await?;
        let limit = u64::try_from(desc.size).ok().filter(|s| *s > 0).unwrap_or(u64::MAX);
        let mut received: u64 = 0;
        let mut reported = std::time::Instant::now();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| self.map_stream_error(desc, e))?;
            received = received.saturating_add(chunk.len() as u64);
            if received > limit {
                return Err(Error::Registry {
                    registry: registry(),
                    message: format!(
                        "blob {} is larger than the {} bytes its descriptor declares",
                        desc.digest, desc.size
                    ),
                });
            }
            if sink.send(Chunk::Data(chunk)).await.is_err() {
                return Ok(());
            }
            if reported.elapsed() >= std::time::Duration::from_millis(100) {
                progress(received);
                reported = std::time::Instant::now();
            }
        }
        progress(received);
        let _ = sink.send(Chunk::End).await;
        Ok(())
    }

    /// Starts the download of blob `desc`: from the registry, or, for a non-distributable layer
    /// it does not hold, from each URL its descriptor lists in turn (`oci-client` sends no
    /// credentials there). Whoever serves it, the consumer checks the digest.
    async fn open_blob(&self, desc: &OciDescriptor) -> Result<SizedStream, Error> {
        // Asked for from byte 0: registries answer with a partial response, which `oci-client`
        // does not hash (it hashes a full one, and ends it with an error on a mismatch). The
        // consumer hashes every byte anyway: the blob is hashed once, not twice.
        let fetch = |urls: Option<Vec<String>>| {
            let desc = OciDescriptor { urls, ..desc.clone() };
            async move {
                match self.client.pull_blob_stream_partial(&self.oci, &desc, 0, None).await? {
                    BlobResponse::Full(stream) | BlobResponse::Partial(stream) => Ok(stream),
                }
            }
        };
        let urls = desc.urls.clone().unwrap_or_default();
        let registry_failure = match fetch(None).await {
            Ok(stream) => return Ok(stream),
            Err(e) if urls.is_empty() => {
                return Err(match self.map_error(e) {
                    // The manifest was there: "image not found, check the name" would mislead.
                    Error::NotFound { registry, .. } => Error::Registry {
                        registry,
                        message: format!(
                            "it has no blob {} ({}), which the manifest of {} lists: the image is incomplete there",
                            desc.digest, desc.media_type, self.reference
                        ),
                    },
                    other => other,
                });
            }
            Err(e) => chain(&e),
        };
        // `oci-client` tries the listed URLs after the registry, but gives up at the first one
        // that does not answer: one at a time, so each is tried.
        let mut failures = Vec::new();
        for url in urls {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                failures.push(format!("{url}: not an http(s) URL, skipped"));
                continue;
            }
            match fetch(Some(vec![url.clone()])).await {
                Ok(stream) => return Ok(stream),
                Err(e) => failures.push(format!("{url}: {}", chain(&e))),
            }
        }
        Err(Error::Registry {
            registry: self.reference.registry().to_string(),
            message: format!(
                "layer blob {} ({}) of {} is neither in the registry ({registry_failure}) nor at the URLs its \
                 descriptor lists ({})",
                desc.digest,
                desc.media_type,
                self.reference,
                failures.join("; ")
            ),
        })
    }

    fn map_stream_error(&self, desc: &OciDescriptor, e: io::Error) -> Error {
        let registry = self.reference.registry().to_string();
        if let Some(oci_client::errors::DigestError::VerificationError { expected, actual }) =
            e.get_ref().and_then(|inner| inner.downcast_ref::<oci_client::errors::DigestError>())
        {
            return Error::DigestMismatch {
                what: format!("layer blob of {}", self.reference),
                expected: expected.clone(),
                actual: actual.clone(),
            };
        }
        if let Some(re) = e.get_ref().and_then(|inner| inner.downcast_ref::<reqwest::Error>()) {
            if re.is_connect() || re.is_timeout() {
                return Error::Unreachable { registry, reason: chain(re) };
            }
        }
        Error::Registry { registry, message: format!("downloading blob {}: {}", desc.digest, chain(&e)) }
    }
}

fn rejected(reference: &Reference, credential: &Credential, reason: String) -> Error {
    Error::CredentialsRejected {
        reference: reference.to_string(),
        registry: reference.registry().to_string(),
        username: credential.username.clone(),
        file: credential.file.display().to_string(),
        reason,
    }
}

/// The error and all its causes, because reqwest's top-level message ("error sending request")
/// hides the useful part ("Connection refused").
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}

/// Classifies an `oci-client` error so the caller can tell "your mistake" from "our problem".
pub(crate) fn map_error(e: OciDistributionError, reference: &Reference) -> Error {
    let registry = reference.registry().to_string();
    let not_found = || Error::NotFound { reference: reference.to_string(), registry: registry.clone() };
    let unauthorized =
        |reason: String| Error::Unauthorized { reference: reference.to_string(), registry: registry.clone(), reason };
    match e {
        OciDistributionError::RegistryError { ref envelope, .. } => {
            let codes: Vec<&OciErrorCode> = envelope.errors.iter().map(|e| &e.code).collect();
            if codes.iter().any(|c| {
                matches!(
                    c,
                    OciErrorCode::ManifestUnknown
                        | OciErrorCode::NameUnknown
                        | OciErrorCode::NotFound
                        | OciErrorCode::BlobUnknown
                )
            }) {
                not_found()
            } else if codes.iter().any(|c| matches!(c, OciErrorCode::Unauthorized | OciErrorCode::Denied)) {
                unauthorized(envelope.to_string())
            } else if codes.iter().any(|c| matches!(c, OciErrorCode::Toomanyrequests)) {
                Error::Registry { registry, message: format!("rate limited, retry later: {envelope}") }
            } else {
                Error::Registry { registry, message: e.to_string() }
            }
        }
        OciDistributionError::ServerError { code: 404, .. } | OciDistributionError::ImageManifestNotFoundError(_) => {
            not_found()
        }
        OciDistributionError::ServerError { code: 401 | 403, ref message, .. } => unauthorized(message.clone()),
        OciDistributionError::UnauthorizedError { ref url } => unauthorized(format!("401 Unauthorized for {url}")),
        OciDistributionError::AuthenticationFailure(ref m) => unauthorized(m.clone()),
        OciDistributionError::RequestError(ref re) if re.is_connect() || re.is_timeout() => {
            Error::Unreachable { registry, reason: chain(re) }
        }
        OciDistributionError::DigestError(oci_client::errors::DigestError::VerificationError { expected, actual }) => {
            Error::DigestMismatch { what: format!("content from {reference}"), expected, actual }
        }
        OciDistributionError::UnsupportedSchemaVersionError(v) => Error::Registry {
            registry,
            message: format!(
                "{reference} uses manifest schema version {v}; only schema 2 (Docker v2.2 and OCI) \
                 is supported: re-push the image with a recent tool"
            ),
        },
        other => Error::Registry { registry, message: chain(&other) },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clients_are_kept_per_credentials_and_protocol() {
        let clients = Clients::default();
        let count = || clients.0.lock().map(|c| c.len()).unwrap_or(0);
        let local = Reference::parse("127.0.0.1:5000/app:1").unwrap();
        let remote = Reference::parse("registry.example/app:1").unwrap();
        let opts = PullOptions::default();
        let basic = |p: &str| RegistryAuth::Basic("me".into(), p.into());
        clients.get(&local, &opts, &RegistryAuth::Anonymous);
        clients.get(&local, &opts, &RegistryAuth::Anonymous);
        assert_eq!(count(), 1, "the same way in, the same credentials: one client");
        clients.get(&local, &opts, &basic("a"));
        clients.get(&local, &opts, &basic("a"));
        assert_eq!(count(), 2);
        clients.get(&local, &opts, &basic("b"));
        assert_eq!(count(), 3, "other credentials never share a client");
        clients.get(&remote, &opts, &RegistryAuth::Anonymous);
        assert_eq!(count(), 4, "HTTPS and plain HTTP never share a client");
        let insecure = PullOptions { insecure_registries: vec!["registry.example".into()], ..PullOptions::default() };
        clients.get(&remote, &insecure, &RegistryAuth::Anonymous);
        assert_eq!(count(), 5);
        clients.get(&local, &opts, &RegistryAuth::Bearer("t".into()));
        assert_eq!(count(), 5, "an access token of one pull is not kept");
        for i in 0..MAX_CLIENTS {
            clients.get(&local, &opts, &basic(&i.to_string()));
        }
        assert!(count() <= MAX_CLIENTS);
    }

    fn entry(digest: &str, json_platform: serde_json::Value) -> ImageIndexEntry {
        serde_json::from_value(serde_json::json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": digest,
            "size": 1,
            "platform": json_platform,
        }))
        .unwrap()
    }

    #[test]
    fn classifies_registry_errors() {
        use oci_client::errors::{OciEnvelope, OciError};
        let r = Reference::parse("127.0.0.1:5000/demo/app:1").unwrap();
        let envelope = |code: OciErrorCode| OciDistributionError::RegistryError {
            envelope: OciEnvelope {
                errors: vec![OciError { code, message: "m".into(), detail: serde_json::Value::Null }],
            },
            url: "http://x".into(),
        };
        let kind = |e: Error| match e {
            Error::NotFound { .. } => "not_found",
            Error::Unauthorized { .. } => "unauthorized",
            Error::Unreachable { .. } => "unreachable",
            Error::DigestMismatch { .. } => "digest",
            Error::Registry { .. } => "registry",
            _ => "other",
        };
        let table = vec![
            (envelope(OciErrorCode::ManifestUnknown), "not_found"),
            (envelope(OciErrorCode::NameUnknown), "not_found"),
            (envelope(OciErrorCode::Unauthorized), "unauthorized"),
            (envelope(OciErrorCode::Denied), "unauthorized"),
            (envelope(OciErrorCode::Toomanyrequests), "registry"),
            (OciDistributionError::ServerError { code: 404, url: "u".into(), message: "".into() }, "not_found"),
            (OciDistributionError::ServerError { code: 403, url: "u".into(), message: "".into() }, "unauthorized"),
            (OciDistributionError::ServerError { code: 500, url: "u".into(), message: "".into() }, "registry"),
            (OciDistributionError::UnauthorizedError { url: "u".into() }, "unauthorized"),
            (
                OciDistributionError::DigestError(oci_client::errors::DigestError::VerificationError {
                    expected: "a".into(),
                    actual: "b".into(),
                }),
                "digest",
            ),
            (OciDistributionError::UnsupportedSchemaVersionError(1), "registry"),
        ];
        for (e, want) in table {
            let text = e.to_string();
            assert_eq!(kind(map_error(e, &r)), want, "{text}");
        }
        let msg = map_error(envelope(OciErrorCode::ManifestUnknown), &r).to_string();
        assert_eq!(msg, "image 127.0.0.1:5000/demo/app:1 not found in 127.0.0.1:5000: check the name and tag");
    }

    #[test]
    fn selects_host_platform() {
        let entries = vec![
            entry("d-amd64", serde_json::json!({"os": "linux", "architecture": "amd64"})),
            entry("d-arm6", serde_json::json!({"os": "linux", "architecture": "arm", "variant": "v6"})),
            entry("d-arm7", serde_json::json!({"os": "linux", "architecture": "arm", "variant": "v7"})),
            entry("d-arm64", serde_json::json!({"os": "linux", "architecture": "arm64", "variant": "v8"})),
            entry("d-win", serde_json::json!({"os": "windows", "architecture": "amd64"})),
            entry("d-att", serde_json::json!({"os": "unknown", "architecture": "unknown"})),
        ];
        assert_eq!(select_platform(&entries, "amd64", None), Ok("d-amd64".into()));
        assert_eq!(select_platform(&entries, "arm64", Some("v8")), Ok("d-arm64".into()));
        assert_eq!(select_platform(&entries, "arm", Some("v7")), Ok("d-arm7".into()));
        // arm64 without variant in the index still matches an arm64/v8 host.
        let no_variant = vec![entry("x", serde_json::json!({"os": "linux", "architecture": "arm64"}))];
        assert_eq!(select_platform(&no_variant, "arm64", Some("v8")), Ok("x".into()));
        // An armv7 host falls back to v6.
        let v6 = vec![entries[1].clone()];
        assert_eq!(select_platform(&v6, "arm", Some("v7")), Ok("d-arm6".into()));
        let err = select_platform(&entries[4..], "amd64", None).unwrap_err();
        assert_eq!(err, vec!["windows/amd64".to_string(), "unknown/unknown".to_string()]);
        let (arch, _) = host_platform();
        assert!(!arch.is_empty());
    }
}
