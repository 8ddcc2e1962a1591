//! The image store: owns the data dir layout (blobs, layers, index), runs a pull from manifest to
//! unpacked layers, and answers local lookups.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use futures_util::StreamExt;
use oci_spec::image::ImageConfiguration;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::credentials::CredentialFiles;
use crate::error::IoContext;
use crate::import::{Archive, PlannedLayer};
use crate::lock::FileLock;
use crate::registry::Session;
use crate::unpack::{self, digest_hex, sync_dir, unique_suffix, Compression, StreamedLayer, UnpackOptions};
use crate::{Error, Reference};

/// Layers downloaded (and unpacked) at the same time by one pull.
const PARALLEL_LAYERS: usize = 4;

/// Chunks buffered between a download and its unpacker. A chunk is what one socket read
/// brought: up to ~400 KiB on a fast link, so this is at most a few MiB. More does not speed up a
/// pull (the unpacker is the slower side) and costs fresh memory, a page fault per 4 KiB: with
/// 64, a pull of the bench image took about 12,400 minor faults in the daemon; with 8, 9,300.
const CHUNKS_IN_FLIGHT: usize = 8;

/// How to reach registries during a pull.
#[derive(Clone, Debug, Default)]
pub struct PullOptions {
    /// Registries (`host:port`, as written in references) reached over plain HTTP. Loopback
    /// registries always are.
    pub insecure_registries: Vec<String>,
    /// Told how the pull goes, layer by layer (for progress bars).
    pub progress: Option<Progress>,
}

/// What a pull reports as it goes.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum PullEvent {
    /// The manifest is read: the image is these layers (compressed digest and size).
    Layers { layers: Vec<LayerSize> },
    /// Bytes of layer `digest` downloaded so far (sent at most every 100 ms per layer, and at
    /// the end).
    Progress { digest: String, bytes: u64 },
    /// Layer `digest` is ready: downloaded, verified and unpacked, or already here (`cached`).
    Done { digest: String, cached: bool },
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LayerSize {
    pub digest: String,
    pub size: u64,
}

/// A callback for [`PullEvent`]s; called from the pull's tasks, so it must be quick.
#[derive(Clone)]
pub struct Progress(Arc<dyn Fn(PullEvent) + Send + Sync>);

impl Progress {
    pub fn new(f: impl Fn(PullEvent) + Send + Sync + 'static) -> Progress {
        Progress(Arc::new(f))
    }

    fn send(&self, event: PullEvent) {
        (self.0)(event)
    }
}

impl std::fmt::Debug for Progress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Progress(..)")
    }
}

/// How to import an image archive ([`ImageStore::import`]).
#[derive(Clone, Debug, Default)]
pub struct ImportOptions {
    /// Record the image under this name instead of the names the archive gives it. Required when
    /// the archive names no image (a `docker save` of an image ID, an OCI layout whose
    /// `org.opencontainers.image.ref.name` is only a tag); the archive must then hold one image.
    pub reference: Option<Reference>,
}

/// What the image's author set for the process, from the image config.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct ImageConfig {
    /// ENTRYPOINT.
    pub entrypoint: Vec<String>,
    /// CMD (arguments to the entrypoint, or the command when there is none).
    pub cmd: Vec<String>,
    /// `KEY=value` pairs.
    pub env: Vec<String>,
    /// WORKDIR.
    pub working_dir: Option<String>,
    /// USER (`name`, `uid`, `uid:gid`...), resolved by the runtime against the rootfs.
    pub user: Option<String>,
    /// EXPOSE, e.g. `8080/tcp`, sorted.
    pub exposed_ports: Vec<String>,
    /// STOPSIGNAL, e.g. `SIGQUIT`.
    pub stop_signal: Option<String>,
    /// LABEL.
    pub labels: BTreeMap<String, String>,
    /// HEALTHCHECK, as the image config has it (Docker's `config.Healthcheck`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthcheck: Option<Healthcheck>,
}

/// An image's `HEALTHCHECK`, as Docker writes it into the image config. The OCI image spec has
/// no such field; Docker and Buildah both write this one, and every runtime that honours it
/// reads it from here. Durations are as written (nanoseconds; 0 or absent means the runtime's
/// default).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Healthcheck {
    /// `["NONE"]`, `["CMD", arg...]` or `["CMD-SHELL", command]`; empty = inherit (none here).
    #[serde(default)]
    pub test: Vec<String>,
    #[serde(default)]
    pub interval_ns: u64,
    #[serde(default)]
    pub timeout_ns: u64,
    #[serde(default)]
    pub start_period_ns: u64,
    #[serde(default)]
    pub start_interval_ns: u64,
    /// Consecutive failures that make the container unhealthy; 0 = the runtime's default.
    #[serde(default)]
    pub retries: u32,
}

/// What a [`Healthcheck`]'s `test` asks to run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HealthTest {
    /// `["NONE"]`: the image disables any check inherited from its base.
    Disabled,
    /// The command to run, as an argv (`CMD-SHELL c` is `/bin/sh -c c`).
    Command(Vec<String>),
}

impl Healthcheck {
    /// `None` when the image sets no usable check (empty test, or an unknown kind).
    pub fn command(&self) -> Option<HealthTest> {
        let (kind, rest) = self.test.split_first()?;
        match kind.as_str() {
            "NONE" => Some(HealthTest::Disabled),
            "CMD" if !rest.is_empty() => Some(HealthTest::Command(rest.to_vec())),
            "CMD-SHELL" if !rest.is_empty() => {
                Some(HealthTest::Command(vec!["/bin/sh".into(), "-c".into(), rest.join(" ")]))
            }
            _ => None,
        }
    }

    /// The `Healthcheck` of a raw image config JSON document, if it has a readable one. A
    /// malformed one is ignored (logged): the image stays usable, as with Docker.
    pub fn from_config_json(config: &[u8]) -> Option<Healthcheck> {
        #[derive(Deserialize)]
        struct Doc {
            #[serde(default)]
            config: Option<Inner>,
        }
        #[derive(Deserialize)]
        struct Inner {
            #[serde(rename = "Healthcheck", default)]
            healthcheck: Option<serde_json::Value>,
        }
        #[derive(Deserialize)]
        #[serde(rename_all = "PascalCase")]
        struct Raw {
            #[serde(default)]
            test: Option<Vec<String>>,
            #[serde(default)]
            interval: Option<i64>,
            #[serde(default)]
            timeout: Option<i64>,
            #[serde(default)]
            start_period: Option<i64>,
            #[serde(default)]
            start_interval: Option<i64>,
            #[serde(default)]
            retries: Option<i64>,
        }
        let value = serde_json::from_slice::<Doc>(config).ok()?.config?.healthcheck?;
        if value.is_null() {
            return None;
        }
        let raw: Raw = match serde_json::from_value(value) {
            Ok(raw) => raw,
            Err(e) => {
                tracing::warn!("ignoring the image's unreadable Healthcheck: {e}");
                return None;
            }
        };
        let ns = |v: Option<i64>| v.and_then(|v| u64::try_from(v).ok()).unwrap_or(0);
        Some(Healthcheck {
            test: raw.test.unwrap_or_default(),
            interval_ns: ns(raw.interval),
            timeout_ns: ns(raw.timeout),
            start_period_ns: ns(raw.start_period),
            start_interval_ns: ns(raw.start_interval),
            retries: raw.retries.and_then(|r| u32::try_from(r).ok()).unwrap_or(0),
        })
    }
}

/// A pulled image, as recorded in the local index.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Image {
    /// Normalised reference it was pulled as (`docker.io/library/busybox:latest`).
    pub reference: String,
    /// Digest of the platform image manifest (`sha256:…`); pulling `repository@digest` gets
    /// exactly this image again. An image imported from a classic `docker save` archive, which
    /// has no manifest, has its config digest here instead (Docker's image ID).
    pub digest: String,
    /// Process defaults from the image config.
    pub config: ImageConfig,
    /// Layer diff_ids (`sha256:…` of the uncompressed tar), bottom layer first.
    pub layers: Vec<String>,
    /// Total compressed size of the layers in bytes, as the manifest declares them (what a pull
    /// downloads, not the unpacked disk usage).
    pub size: u64,
    /// When the pull (or import) finished, RFC 3339 UTC.
    pub pulled_at: String,
    /// Blobs kept for this image in the blob store (compressed layers, config), so that
    /// [`ImageStore::prune`] knows which ones are still wanted.
    #[serde(default)]
    pub blobs: Vec<String>,
}

/// What [`ImageStore::prune`] removed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PruneReport {
    pub layers: usize,
    pub blobs: usize,
    /// Bytes of the files removed.
    pub bytes: u64,
}

/// The local image store under one data dir. Cheap to share (`Arc<ImageStore>`); all methods
/// take `&self`.
#[derive(Debug)]
pub struct ImageStore {
    blobs: PathBuf,
    layers: PathBuf,
    images: PathBuf,
    /// One async lock per blob being fetched, so concurrent pulls in this process download and
    /// unpack a shared layer once; [`BlobLock`] adds a file lock for other processes.
    blob_locks: BlobLocks,
    /// Limits for every layer this store unpacks.
    unpack_options: UnpackOptions,
    /// Where pulls find registry credentials.
    credentials: CredentialFiles,
    /// Pulls and imports hold it shared, [`ImageStore::prune`] exclusively: a layer unpacked
    /// for a record not written yet is never pruned.
    gc: tokio::sync::RwLock<()>,
    /// Keep compressed layer blobs after unpacking (off by default: they double the disk an
    /// image takes, and the verified layer is what instances use).
    keep_blobs: bool,
    /// Registry clients kept from one pull to the next.
    clients: crate::registry::Clients,
}

type BlobLocks = Arc<Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>>;

/// Exclusive right to fetch one blob (and unpack its layer): in this process (an async mutex per
/// digest) and across processes sharing the data dir (`flock` on `blobs/sha256/.lock-<hex>`).
/// Whoever gets it second finds the work done.
struct BlobLock {
    file: Option<FileLock>,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
    locks: BlobLocks,
    key: String,
}

impl Drop for BlobLock {
    fn drop(&mut self) {
        // Other processes first, then this one; forget the mutex if nobody else wants it.
        drop(self.file.take());
        drop(self.guard.take());
        let mut locks = self.locks.lock().unwrap_or_else(PoisonError::into_inner);
        if locks.get(&self.key).is_some_and(|m| Arc::strong_count(m) == 1) {
            locks.remove(&self.key);
        }
    }
}

impl ImageStore {
    /// Opens (creating if needed) the store rooted at `root`, the data dir.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, Error> {
        let root = root.into();
        let store = ImageStore {
            blobs: root.join("blobs").join("sha256"),
            layers: root.join("layers"),
            images: root.join("images"),
            blob_locks: BlobLocks::default(),
            unpack_options: UnpackOptions::default(),
            credentials: CredentialFiles::default(),
            gc: tokio::sync::RwLock::new(()),
            keep_blobs: false,
            clients: crate::registry::Clients::default(),
        };
        for dir in [&store.blobs, &store.layers, &store.images] {
            fs::create_dir_all(dir).context(|| format!("creating {}", dir.display()))?;
        }
        Ok(store)
    }

    /// Keeps compressed layer blobs after unpacking them (for tools that re-export images).
    pub fn with_keep_blobs(mut self, keep: bool) -> Self {
        self.keep_blobs = keep;
        self
    }

    /// Sets the limits applied to layers unpacked from now on (default: [`UnpackOptions::default`]).
    pub fn with_unpack_options(mut self, options: UnpackOptions) -> Self {
        self.unpack_options = options;
        self
    }

    /// The limits applied to every layer this store unpacks.
    pub fn unpack_options(&self) -> UnpackOptions {
        self.unpack_options
    }

    /// Sets where pulls look for registry credentials (default: [`CredentialFiles::default`],
    /// i.e. `/etc/deliverous/auth.json` then Docker's `config.json`).
    pub fn with_credentials(mut self, credentials: CredentialFiles) -> Self {
        self.credentials = credentials;
        self
    }

    /// Where pulls look for registry credentials.
    pub fn credentials(&self) -> &CredentialFiles {
        &self.credentials
    }

    /// Pulls `reference` for this host's platform: manifest, config, every layer not already
    /// unpacked (up to four at a time, each unpacked while it downloads); then records the image
    /// in the index and returns it. Uses the credentials stored for the registry, if any (read at
    /// each pull, so a new login needs no restart), and pulls anonymously otherwise.
    pub async fn pull(&self, reference: &Reference, opts: &PullOptions) -> Result<Image, Error> {
        tracing::debug!(%reference, "pull started");
        let _gc = self.gc.read().await;
        let credentials = self.credentials.clone();
        let registry = reference.registry().to_string();
        let credential = blocking(move || credentials.lookup(&registry)).await?;
        if let Some(c) = &credential {
            tracing::debug!(%reference, user = %c.username, file = %c.file.display(), "pulling with credentials");
        }
        let session = Session::open(&self.clients, reference, opts, credential).await?;
        tracing::debug!(%reference, "registry session open");
        let (manifest, digest) = session.manifest().await?;
        tracing::debug!(%reference, %digest, layers = manifest.layers.len(), "pulled manifest");

        let config_bytes = session.config(&manifest.config).await?;
        let config: ImageConfiguration = serde_json::from_slice(&config_bytes).map_err(|e| Error::Registry {
            registry: reference.registry().to_string(),
            message: format!("config blob {} of {reference} is not an image config: {e}", manifest.config.digest),
        })?;
        // Kept while the layers download: its fsyncs need not delay them.
        let process = image_config(&config, &config_bytes);
        let config_stored = self.store_small_blob(&manifest.config.digest, config_bytes);

        let diff_ids = config.rootfs().diff_ids().clone();
        if diff_ids.len() != manifest.layers.len() {
            return Err(Error::Registry {
                registry: reference.registry().to_string(),
                message: format!(
                    "{reference}: manifest lists {} layers but its config lists {} diff_ids; \
                     the image is malformed",
                    manifest.layers.len(),
                    diff_ids.len()
                ),
            });
        }

        let size = manifest.layers.iter().map(|d| u64::try_from(d.size).unwrap_or(0)).fold(0, u64::saturating_add);
        let progress = opts.progress.as_ref();
        if let Some(p) = progress {
            let layers = manifest
                .layers
                .iter()
                .map(|d| LayerSize { digest: d.digest.clone(), size: u64::try_from(d.size).unwrap_or(0) })
                .collect();
            p.send(PullEvent::Layers { layers });
        }
        let image = Image {
            reference: reference.to_string(),
            digest,
            config: process,
            layers: diff_ids.clone(),
            size,
            pulled_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            blobs: manifest
                .layers
                .iter()
                .filter(|_| self.keep_blobs)
                .chain([&manifest.config])
                .map(|d| d.digest.clone())
                .collect(),
        };
        // The record is written and synced under a temporary name while the layers download:
        // after them, only its rename (and one sync of its directory) is left to wait for.
        let staged = {
            let (images, record) = (self.images.clone(), image.clone());
            blocking(move || StagedRecord::write(&images, &record))
        };
        // Every layer runs to its end (or its error) before the first error is reported, so no
        // half-done layer is still being cleaned up when the caller hears about it.
        // The futures are made first: a stream that maps borrowed items would not be `Send`.
        let layers: Vec<_> = manifest
            .layers
            .iter()
            .zip(&diff_ids)
            .map(|(desc, diff_id)| {
                let session = &session;
                async move {
                    let cached = self.ensure_layer(session, reference, desc, diff_id, progress).await?;
                    if let Some(p) = progress {
                        p.send(PullEvent::Done { digest: desc.digest.clone(), cached });
                    }
                    Ok(())
                }
            })
            .collect();
        let (config_stored, staged, results): (_, _, Vec<Result<(), Error>>) =
            tokio::join!(config_stored, staged, futures_util::stream::iter(layers).buffered(PARALLEL_LAYERS).collect());
        config_stored?;
        results.into_iter().collect::<Result<Vec<()>, Error>>()?;
        let staged = staged?;
        // Layers and blobs were renamed into place without syncing their directories (their
        // contents were synced): make the names durable before the record that points to them.
        let (layers, blobs) = (self.layers.clone(), self.blobs.clone());
        blocking(move || {
            sync_dir(&layers)?;
            sync_dir(&blobs)?;
            staged.commit()
        })
        .await?;
        tracing::debug!(%reference, "pull done");
        Ok(image)
    }

    /// Makes sure layer `diff_id` is unpacked: from its blob if it is already here, otherwise
    /// downloading the blob and unpacking it in the same pass. Returns whether nothing had to
    /// be downloaded.
    async fn ensure_layer(
        &self,
        session: &Session,
        reference: &Reference,
        desc: &oci_client::manifest::OciDescriptor,
        diff_id: &str,
        progress: Option<&Progress>,
    ) -> Result<bool, Error> {
        let layer_hex = digest_hex(diff_id).ok_or_else(|| Error::Registry {
            registry: reference.registry().to_string(),
            message: format!("diff_id {diff_id:?} of {reference} is not sha256:<64 hex>"),
        })?;
        let compression = Compression::from_media_type(&desc.media_type).ok_or_else(|| Error::Unpack {
            layer: diff_id.to_string(),
            reason: format!("layer media type {:?} is not a tar, tar+gzip or tar+zstd layer", desc.media_type),
        })?;
        let blob_hex = digest_hex(&desc.digest).ok_or_else(|| Error::Registry {
            registry: reference.registry().to_string(),
            message: format!(
                "layer digest {:?} of {reference} is not sha256:<64 hex>; only sha256 is supported",
                desc.digest
            ),
        })?;
        let layer_dir = self.layers.join(layer_hex);
        if layer_dir.is_dir() {
            return Ok(true);
        }
        let lock = self.lock_blob(blob_hex).await?;
        if layer_dir.is_dir() {
            return Ok(true);
        }
        let blob = self.blobs.join(blob_hex);
        let layers = self.layers.clone();
        let options = self.unpack_options;
        let diff_id = diff_id.to_string();
        if blob.is_file() {
            // A blob only ever has its final name complete and verified.
            return blocking(move || {
                let _lock = lock;
                unpack::unpack_layer_unsynced(&blob, compression, &diff_id, &layers, &options).map(|_| true)
            })
            .await;
        }

        tracing::info!(%reference, digest = %desc.digest, size = desc.size, "downloading layer");
        let (sink, chunks) = tokio::sync::mpsc::channel(CHUNKS_IN_FLIGHT);
        let blobs = self.blobs.clone();
        let blob_digest = desc.digest.clone();
        let keep_blob = self.keep_blobs;
        // The locks travel with the unpacker: if this pull is dropped mid-way, they are held
        // until its thread has cleaned up.
        let unpacker = tokio::task::spawn_blocking(move || {
            let _lock = lock;
            let layer = StreamedLayer {
                blob_digest: &blob_digest,
                blobs_dir: &blobs,
                compression,
                diff_id: &diff_id,
                layers_dir: &layers,
                options: &options,
                keep_blob,
            };
            unpack::unpack_streamed(chunks, &layer)
        });
        let report = |bytes: u64| {
            if let Some(p) = progress {
                p.send(PullEvent::Progress { digest: desc.digest.clone(), bytes });
            }
        };
        let downloaded = session.stream_blob(desc, sink, &report).await;
        let unpacked = unpacker.await.map_err(|e| Error::io("unpacking a layer: task failed", io::Error::other(e)))?;
        // A failed download is the cause of whatever the unpacker then reports.
        downloaded?;
        unpacked.map(|_| false)
    }

    /// Imports the images in an archive made on another machine, for hosts that cannot reach a
    /// registry: a `docker save` tarball (classic, or Docker 25's with an OCI layout inside), an
    /// OCI image layout directory, or an OCI archive (a tar of a layout). An index is resolved to
    /// this host's platform as a pull does.
    ///
    /// Every digest the format carries is checked (manifests, configs, layer blobs; diff_ids
    /// always), and layers go through the same unpacker as pulled ones. The whole archive is
    /// staged before anything is renamed into place: a corrupt or hostile archive is an
    /// [`Error::InvalidArchive`] and leaves nothing behind. Images are recorded under the names
    /// the archive gives them (`RepoTags`, `io.containerd.image.name`, a full
    /// `org.opencontainers.image.ref.name`; normalised like references), or under
    /// `opts.reference`. Returns one [`Image`] per name recorded.
    pub async fn import(&self, path: &Path, opts: &ImportOptions) -> Result<Vec<Image>, Error> {
        let _gc = self.gc.read().await;
        let archive_path = path.to_path_buf();
        let name = opts.reference.clone();
        let (archive, planned) = blocking(move || {
            let archive = Archive::open(&archive_path)?;
            let planned = archive.plan(name.as_ref())?;
            Ok((archive, planned))
        })
        .await?;

        // Each layer once, even when several images share it; only those not unpacked yet.
        let mut todo: BTreeMap<String, PlannedLayer> = BTreeMap::new();
        for layer in planned.iter().flat_map(|i| &i.layers) {
            let Some(hex) = digest_hex(&layer.diff_id) else { continue };
            if !self.layers.join(hex).is_dir() {
                todo.entry(layer.diff_id.clone()).or_insert_with(|| layer.clone());
            }
        }
        // Locked as a pull locks them (by blob digest, else by diff_id), all before any is
        // staged, in sorted order: two imports cannot deadlock, and a pull holds one at a time.
        let mut keys: Vec<String> = todo
            .values()
            .filter_map(|l| {
                l.blob.as_ref().and_then(|b| digest_hex(&b.digest)).or_else(|| digest_hex(&l.diff_id)).map(String::from)
            })
            .collect();
        keys.sort();
        keys.dedup();
        let mut locks = Vec::with_capacity(keys.len());
        for key in &keys {
            locks.push(self.lock_blob(key).await?);
        }

        let (layers_dir, blobs_dir, images_dir) = (self.layers.clone(), self.blobs.clone(), self.images.clone());
        let options = self.unpack_options;
        tracing::info!(archive = %path.display(), images = planned.len(), layers = todo.len(), "importing");
        blocking(move || {
            // Released only once every layer is in place (or removed), even if the caller gave up.
            let _locks = locks;
            let writeback = unpack::Writeback::open(&layers_dir)?;
            let mut staged = Vec::new();
            for layer in todo.values() {
                let Some(hex) = digest_hex(&layer.diff_id) else { continue };
                if layers_dir.join(hex).is_dir() {
                    continue;
                }
                let (input, _) = archive.open_member(&layer.member)?;
                let what = format!("layer {:?} of {}", layer.member, archive.display());
                let s = unpack::stage_layer(
                    input,
                    layer.blob.as_ref(),
                    layer.compression,
                    &layer.diff_id,
                    &layers_dir,
                    &options,
                    &what,
                )
                .map_err(|e| archive.content_error(e))?;
                staged.push(s);
            }
            // Every layer verified: make their contents durable, then their names.
            if !staged.is_empty() {
                writeback.sync()?;
            }
            for s in staged {
                s.commit()?;
            }
            sync_dir(&layers_dir)?;
            let pulled_at = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
            let mut images = Vec::new();
            for p in planned {
                if let Some(hex) = digest_hex(&p.config_digest) {
                    let blob = blobs_dir.join(hex);
                    if !blob.is_file() {
                        atomic_write(&blob, &p.config_bytes)?;
                    }
                }
                for reference in &p.references {
                    images.push(Image {
                        reference: reference.to_string(),
                        digest: p.digest.clone(),
                        config: image_config(&p.config, &p.config_bytes),
                        layers: p.layers.iter().map(|l| l.diff_id.clone()).collect(),
                        size: p.size,
                        pulled_at: pulled_at.clone(),
                        blobs: vec![p.config_digest.clone()],
                    });
                }
            }
            for image in &images {
                write_record(&images_dir, image)?;
            }
            Ok(images)
        })
        .await
    }

    /// Waits for the exclusive right to fetch blob `hex` (see [`BlobLock`]).
    async fn lock_blob(&self, hex: &str) -> Result<BlobLock, Error> {
        let mutex = {
            let mut locks = self.blob_locks.lock().unwrap_or_else(PoisonError::into_inner);
            locks.entry(hex.to_string()).or_default().clone()
        };
        let mut lock = BlobLock {
            file: None,
            guard: Some(mutex.lock_owned().await),
            locks: self.blob_locks.clone(),
            key: hex.to_string(),
        };
        let path = self.blobs.join(format!(".lock-{hex}"));
        lock.file = Some(blocking(move || FileLock::acquire(&path)).await?);
        Ok(lock)
    }

    /// Writes an in-memory blob (the config) under its digest, if not already there.
    async fn store_small_blob(&self, digest: &str, bytes: Vec<u8>) -> Result<(), Error> {
        let Some(hex) = digest_hex(digest) else {
            // Only sha256 blobs are kept; a config under another algorithm is still usable.
            return Ok(());
        };
        let path = self.blobs.join(hex);
        blocking(move || {
            if path.is_file() {
                return Ok(());
            }
            atomic_write(&path, &bytes)
        })
        .await
    }

    /// The locally recorded image for `reference`, without touching the network. A reference
    /// with a digest also matches an image pulled by tag whose manifest has that digest.
    pub fn get(&self, reference: &Reference) -> Result<Option<Image>, Error> {
        if let Some(image) = read_record(&record_path(&self.images, &reference.to_string()))? {
            return Ok(Some(image));
        }
        let Some(digest) = reference.digest() else {
            return Ok(None);
        };
        let prefix = format!("{}/{}", reference.registry(), reference.repository());
        Ok(self.list()?.into_iter().find(|img| {
            img.digest == digest
                && Reference::parse(&img.reference)
                    .is_ok_and(|r| format!("{}/{}", r.registry(), r.repository()) == prefix)
        }))
    }

    /// Every image in the index, sorted by reference. Unreadable records are skipped and logged.
    pub fn list(&self) -> Result<Vec<Image>, Error> {
        let entries = fs::read_dir(&self.images).context(|| format!("listing {}", self.images.display()))?;
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry.context(|| format!("listing {}", self.images.display()))?;
            let path = entry.path();
            if path.extension().is_none_or(|e| e != "json") || entry.file_name().to_string_lossy().starts_with('.') {
                continue;
            }
            match read_record(&path) {
                Ok(Some(image)) => out.push(image),
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %e, "skipping unreadable image record"),
            }
        }
        out.sort_by(|a, b| a.reference.cmp(&b.reference));
        Ok(out)
    }

    /// Unpacked layer directories of `image`, bottom first (overlay's lowerdir wants them top
    /// first: reverse). Paths are computed, not checked: a pulled image has all of them.
    pub fn layer_dirs(&self, image: &Image) -> Vec<PathBuf> {
        image.layers.iter().filter_map(|d| digest_hex(d)).map(|hex| self.layers.join(hex)).collect()
    }

    /// Removes what interrupted pulls and imports left (`.tmp-*` layer and blob files, stale
    /// lock files). Only for a process that owns the store alone (the daemon, under its data
    /// dir lock), before it starts pulling: another process's pull in progress would lose its
    /// temporary files. Returns how many entries went.
    pub fn sweep_interrupted(&self) -> Result<usize, Error> {
        let mut removed = 0;
        for dir in [&self.layers, &self.blobs, &self.images] {
            for entry in fs::read_dir(dir).context(|| format!("listing {}", dir.display()))?.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if !(name.starts_with(".tmp-") || name.starts_with(".lock-")) {
                    continue;
                }
                let path = entry.path();
                let result = if path.is_dir() { fs::remove_dir_all(&path) } else { fs::remove_file(&path) };
                result.context(|| format!("removing {}", path.display()))?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Forgets the image recorded under exactly `reference` (its layers stay until
    /// [`ImageStore::prune`]). Returns it, or `None` if there was none.
    pub fn remove(&self, reference: &Reference) -> Result<Option<Image>, Error> {
        let path = record_path(&self.images, &reference.to_string());
        let Some(image) = read_record(&path)? else {
            return Ok(None);
        };
        fs::remove_file(&path).context(|| format!("removing {}", path.display()))?;
        Ok(Some(image))
    }

    /// Removes every layer and blob no image record refers to, and what interrupted pulls left
    /// (`.tmp-*`). Layers still mounted (a lower dir of an overlay) are kept whatever the records
    /// say. Waits for running pulls and imports, and holds off new ones meanwhile.
    pub async fn prune(&self) -> Result<PruneReport, Error> {
        let _gc = self.gc.write().await;
        let images = self.list()?;
        let (layers_dir, blobs_dir) = (self.layers.clone(), self.blobs.clone());
        blocking(move || {
            let wanted_layers: HashSet<String> =
                images.iter().flat_map(|i| &i.layers).filter_map(|d| digest_hex(d)).map(String::from).collect();
            let wanted_blobs: HashSet<String> =
                images.iter().flat_map(|i| &i.blobs).filter_map(|d| digest_hex(d)).map(String::from).collect();
            let mounted = mounted_lower_dirs();
            let mut report = PruneReport::default();
            for entry in fs::read_dir(&layers_dir).context(|| format!("listing {}", layers_dir.display()))?.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let path = entry.path();
                if wanted_layers.contains(&name) || mounted.contains(&path) {
                    continue;
                }
                let bytes = tree_size(&path);
                fs::remove_dir_all(&path).context(|| format!("removing layer {}", path.display()))?;
                report.layers += 1;
                report.bytes += bytes;
            }
            for entry in fs::read_dir(&blobs_dir).context(|| format!("listing {}", blobs_dir.display()))?.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                // Lock files belong to whoever holds them; they remove them.
                if wanted_blobs.contains(&name) || name.starts_with(".lock-") {
                    continue;
                }
                let path = entry.path();
                let bytes = entry.metadata().map(|m| m.len()).unwrap_or(0);
                let removed = if path.is_dir() { fs::remove_dir_all(&path) } else { fs::remove_file(&path) };
                removed.context(|| format!("removing blob {}", path.display()))?;
                report.blobs += 1;
                report.bytes += bytes;
            }
            Ok(report)
        })
        .await
    }

    /// Where blob `digest` is (or would be) stored.
    pub fn blob_path(&self, digest: &str) -> Option<PathBuf> {
        digest_hex(digest).map(|hex| self.blobs.join(hex))
    }
}

/// Lower dirs of the overlay mounts of this host (from /proc/self/mountinfo).
fn mounted_lower_dirs() -> HashSet<PathBuf> {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    info.lines()
        .filter_map(|line| line.split_once(" - "))
        .filter(|(_, post)| post.starts_with("overlay "))
        .flat_map(|(_, post)| {
            post.split([',', ' '])
                .filter_map(|opt| opt.strip_prefix("lowerdir="))
                .flat_map(|dirs| dirs.split(':'))
                .map(|d| PathBuf::from(d.replace("\\040", " ")))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Bytes of the regular files below `path` (symlinks not followed).
fn tree_size(path: &Path) -> u64 {
    let Ok(entries) = fs::read_dir(path) else { return 0 };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => tree_size(&e.path()),
            Ok(t) if t.is_file() => e.metadata().map(|m| m.len()).unwrap_or(0),
            _ => 0,
        })
        .sum()
}

fn image_config(config: &ImageConfiguration, raw: &[u8]) -> ImageConfig {
    let Some(c) = config.config() else {
        return ImageConfig::default();
    };
    let mut exposed_ports = c.exposed_ports().clone().unwrap_or_default();
    exposed_ports.sort();
    ImageConfig {
        entrypoint: c.entrypoint().clone().unwrap_or_default(),
        cmd: c.cmd().clone().unwrap_or_default(),
        env: c.env().clone().unwrap_or_default(),
        working_dir: c.working_dir().clone().filter(|s| !s.is_empty()),
        user: c.user().clone().filter(|s| !s.is_empty()),
        exposed_ports,
        stop_signal: c.stop_signal().clone().filter(|s| !s.is_empty()),
        labels: c.labels().clone().unwrap_or_default().into_iter().collect(),
        healthcheck: Healthcheck::from_config_json(raw),
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, Error> + Send + 'static) -> Result<T, Error> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::io("background file system task failed", io::Error::other(e)))?
}

/// Index file name: a hash of the normalised reference, so any tag is a safe file name.
fn record_path(images: &Path, reference: &str) -> PathBuf {
    images.join(format!("{}.json", hex::encode(Sha256::digest(reference.as_bytes()))))
}

fn write_record(images: &Path, image: &Image) -> Result<(), Error> {
    let json =
        serde_json::to_vec_pretty(image).map_err(|e| Error::io("serialising image record", io::Error::other(e)))?;
    atomic_write(&record_path(images, &image.reference), &json)
}

/// An image record written and synced under a temporary name in the index, not yet in it.
/// Removed if dropped uncommitted (a failed or abandoned pull).
struct StagedRecord {
    tmp: PathBuf,
    path: PathBuf,
    committed: bool,
}

impl StagedRecord {
    fn write(images: &Path, image: &Image) -> Result<StagedRecord, Error> {
        use std::io::Write;
        let json =
            serde_json::to_vec_pretty(image).map_err(|e| Error::io("serialising image record", io::Error::other(e)))?;
        let path = record_path(images, &image.reference);
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let staged =
            StagedRecord { tmp: images.join(format!(".tmp-{name}-{}", unique_suffix())), path, committed: false };
        let mut f = fs::File::create(&staged.tmp).context(|| format!("creating {}", staged.tmp.display()))?;
        f.write_all(&json).and_then(|()| f.sync_all()).context(|| format!("writing {}", staged.tmp.display()))?;
        Ok(staged)
    }

    /// Puts the record in the index, durably.
    fn commit(mut self) -> Result<(), Error> {
        fs::rename(&self.tmp, &self.path)
            .context(|| format!("moving {} to {}", self.tmp.display(), self.path.display()))?;
        self.committed = true;
        sync_dir(self.path.parent().unwrap_or(Path::new(".")))
    }
}

impl Drop for StagedRecord {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

fn read_record(path: &Path) -> Result<Option<Image>, Error> {
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(format!("reading {}", path.display()), e)),
    };
    serde_json::from_slice(&bytes).map(Some).map_err(|e| {
        Error::io(
            format!("image record {} is corrupt (delete it and pull again)", path.display()),
            io::Error::new(io::ErrorKind::InvalidData, e),
        )
    })
}

/// temp file in the same directory, fsync, rename, fsync the directory.
fn atomic_write(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".tmp-{name}-{}", unique_suffix()));
    let result = (|| {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(Error::io(format!("writing {}", path.display()), e));
    }
    sync_dir(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(reference: &str, digest: &str) -> Image {
        Image {
            reference: reference.to_string(),
            digest: digest.to_string(),
            config: ImageConfig { cmd: vec!["sh".into()], ..ImageConfig::default() },
            layers: vec![format!("sha256:{}", "a".repeat(64))],
            size: 42,
            pulled_at: "2024-01-01T00:00:00Z".into(),
            blobs: vec![],
        }
    }

    #[tokio::test]
    async fn prune_keeps_what_records_use_and_remove_forgets_a_record() {
        let dir = tempfile::tempdir().unwrap();
        let store = ImageStore::open(dir.path()).unwrap();
        let mut image = sample("docker.io/library/busybox:1", &format!("sha256:{}", "d".repeat(64)));
        image.blobs = vec![format!("sha256:{}", "c".repeat(64))];
        write_record(&store.images, &image).unwrap();
        for hex in ["a", "b"] {
            fs::create_dir_all(store.layers.join(hex.repeat(64)).join("etc")).unwrap();
            fs::write(store.layers.join(hex.repeat(64)).join("etc/f"), b"12345").unwrap();
        }
        fs::create_dir_all(store.layers.join(".tmp-x-1")).unwrap();
        for hex in ["c", "e"] {
            fs::write(store.blobs.join(hex.repeat(64)), b"blob").unwrap();
        }
        let report = store.prune().await.unwrap();
        assert_eq!(report, PruneReport { layers: 2, blobs: 1, bytes: 5 + 4 });
        assert!(store.layers.join("a".repeat(64)).is_dir() && !store.layers.join("b".repeat(64)).exists());
        assert!(store.blobs.join("c".repeat(64)).is_file() && !store.blobs.join("e".repeat(64)).exists());

        let reference = Reference::parse("busybox:1").unwrap();
        assert_eq!(store.remove(&reference).unwrap().map(|i| i.digest), Some(image.digest.clone()));
        assert!(store.remove(&reference).unwrap().is_none());
        let report = store.prune().await.unwrap();
        assert_eq!((report.layers, report.blobs), (1, 1), "nothing refers to them any more");
    }

    #[test]
    fn index_survives_reopen_and_finds_by_digest() {
        let dir = tempfile::tempdir().unwrap();
        let store = ImageStore::open(dir.path()).unwrap();
        let d = format!("sha256:{}", "b".repeat(64));
        write_record(&store.images, &sample("docker.io/library/busybox:latest", &d)).unwrap();
        write_record(&store.images, &sample("ghcr.io/o/r:1", &d)).unwrap();
        fs::write(store.images.join("garbage.json"), b"{").unwrap();

        let store = ImageStore::open(dir.path()).unwrap();
        let got = store.get(&Reference::parse("busybox").unwrap()).unwrap().unwrap();
        assert_eq!(got.digest, d);
        assert_eq!(got.config.cmd, vec!["sh".to_string()]);
        assert!(store.get(&Reference::parse("busybox:2").unwrap()).unwrap().is_none());
        let by_digest = store.get(&Reference::parse(&format!("busybox@{d}")).unwrap()).unwrap().unwrap();
        assert_eq!(by_digest.reference, "docker.io/library/busybox:latest");
        // Same digest in another repository is not a match.
        assert!(store.get(&Reference::parse(&format!("other@{d}")).unwrap()).unwrap().is_none());

        let all = store.list().unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].reference, "docker.io/library/busybox:latest");
        assert_eq!(store.layer_dirs(&all[0]), vec![dir.path().join("layers").join("a".repeat(64))]);
    }

    /// Concurrent pulls of one image from a real registry, when one is given:
    /// `DELIVEROUS_TEST_IMAGE=127.0.0.1:5000/demo/app:1 cargo test -p deliverous-images`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_pulls_from_registry() {
        let Ok(image) = std::env::var("DELIVEROUS_TEST_IMAGE") else {
            eprintln!("DELIVEROUS_TEST_IMAGE not set: skipping the registry pull test");
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(ImageStore::open(dir.path()).unwrap());
        let reference = Reference::parse(&image).unwrap();
        let mut tasks = Vec::new();
        for _ in 0..4 {
            let (store, reference) = (store.clone(), reference.clone());
            tasks.push(tokio::spawn(async move { store.pull(&reference, &PullOptions::default()).await }));
        }
        let mut digests = Vec::new();
        for t in tasks {
            digests.push(t.await.unwrap().unwrap().digest);
        }
        digests.dedup();
        assert_eq!(digests.len(), 1);
        let image = store.get(&reference).unwrap().unwrap();
        for layer in store.layer_dirs(&image) {
            assert!(layer.is_dir(), "{}", layer.display());
        }
        let leftovers: Vec<_> = [store.blobs.clone(), store.layers.clone(), store.images.clone()]
            .iter()
            .flat_map(|d| fs::read_dir(d).unwrap())
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(".tmp-"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    #[test]
    fn store_is_send_sync() {
        fn check<T: Send + Sync>() {}
        check::<ImageStore>();
    }

    #[test]
    fn unpack_limit_defaults_and_can_be_set() {
        let dir = tempfile::tempdir().unwrap();
        let store = ImageStore::open(dir.path()).unwrap();
        assert_eq!(store.unpack_options(), UnpackOptions::default());
        let small = UnpackOptions { max_unpacked_bytes: 1 << 20 };
        assert_eq!(store.with_unpack_options(small).unpack_options(), small);
    }

    #[test]
    fn healthcheck_is_read_from_the_raw_config() {
        let doc = br#"{"config":{"Healthcheck":{"Test":["CMD-SHELL","wget -qO- http://127.0.0.1/ || exit 1"],
            "Interval":5000000000,"Timeout":2000000000,"StartPeriod":1000000000,"Retries":2}},
            "rootfs":{"type":"layers","diff_ids":[]}}"#;
        let h = Healthcheck::from_config_json(doc).expect("a healthcheck");
        assert_eq!(
            (h.interval_ns, h.timeout_ns, h.start_period_ns, h.retries),
            (5_000_000_000, 2_000_000_000, 1_000_000_000, 2)
        );
        assert_eq!(
            h.command(),
            Some(HealthTest::Command(vec![
                "/bin/sh".into(),
                "-c".into(),
                "wget -qO- http://127.0.0.1/ || exit 1".into()
            ]))
        );
        let none = br#"{"config":{"Healthcheck":{"Test":["NONE"]}}}"#;
        assert_eq!(Healthcheck::from_config_json(none).and_then(|h| h.command()), Some(HealthTest::Disabled));
        let cmd = br#"{"config":{"Healthcheck":{"Test":["CMD","/bin/true","x"],"Retries":-1}}}"#;
        let h = Healthcheck::from_config_json(cmd).expect("a healthcheck");
        assert_eq!(h.command(), Some(HealthTest::Command(vec!["/bin/true".into(), "x".into()])));
        assert_eq!(h.retries, 0, "a negative count is the default");
        assert_eq!(Healthcheck::from_config_json(br#"{"config":{}}"#), None);
        assert_eq!(Healthcheck::from_config_json(br#"{"config":{"Healthcheck":{"Test":"bad"}}}"#), None);
        assert_eq!(Healthcheck::from_config_json(b"not json"), None);
        let empty = Healthcheck::from_config_json(br#"{"config":{"Healthcheck":{"Test":[]}}}"#).expect("parsed");
        assert_eq!(empty.command(), None, "an empty test inherits: nothing here");
    }
}
