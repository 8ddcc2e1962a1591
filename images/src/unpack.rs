//! Layer unpacking: turns one layer blob into a directory overlayfs can use as a lowerdir, with
//! whiteouts in overlay form, after checking its diff_id and that every entry stays beneath the
//! layer root.
//!
//! We do not use `tar::Archive::unpack`: a layer is untrusted input and we must decide ourselves
//! what a path means. Every entry is resolved component by component from the layer root; each
//! parent must be a real directory (never a symlink), `..` is refused, and the final component is
//! replaced, never followed. Extraction happens in `layers/.tmp-<hex>-<unique>`, renamed into
//! place only once the whole stream hashed to the expected diff_id, so a directory named by a
//! diff_id is always complete.
//!
//! A layer is also bounded in size ([`UnpackOptions`]): the decompressed stream and the files it
//! creates may not exceed `max_unpacked_bytes`, and what tar buffers in memory for one entry
//! (PAX records, GNU long names, sparse maps) may not exceed [`MAX_ENTRY_HEADER_BYTES`].

use std::cell::Cell;
use std::collections::BTreeMap;
use std::ffi::{CString, OsStr, OsString};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{lchown, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use nix::sys::stat::{makedev, mknod, utimensat, Mode, SFlag, UtimensatFlags};
use nix::sys::time::TimeSpec;
use sha2::{Digest, Sha256};

use crate::error::IoContext;
use crate::Error;

/// Prefix of an AUFS/OCI whiteout file name.
const WHITEOUT_PREFIX: &str = ".wh.";
/// Marks its directory as opaque: lower layers' contents are hidden.
const OPAQUE_MARKER: &str = ".wh..wh..opq";
/// The xattr overlayfs reads to treat a directory as opaque.
const OVERLAY_OPAQUE_XATTR: &str = "trusted.overlay.opaque";
/// Overlayfs interprets these itself (opaque, redirect, metacopy); a layer must not smuggle them in.
const OVERLAY_XATTR_PREFIX: &str = "trusted.overlay.";
const PAX_XATTR_PREFIX: &str = "SCHILY.xattr.";

/// Default for [`UnpackOptions::max_unpacked_bytes`]: 32 GiB. The largest single layers in public
/// images (CUDA and deep-learning stacks) unpack to around 10 GiB, so legitimate layers have
/// three times that headroom, while a bomb stops before it fills a typical host's disk.
pub const DEFAULT_MAX_UNPACKED_BYTES: u64 = 32 << 30;

/// Most bytes tar may read for one entry's headers, which it buffers in memory: PAX records, GNU
/// long names and links, GNU sparse maps. Real ones are a few KiB (a path is at most 4 KiB, an
/// xattr value at most 64 KiB); without a bound a hostile layer could make us allocate as much
/// memory as it has bytes.
pub const MAX_ENTRY_HEADER_BYTES: u64 = 4 << 20;

/// Limits applied to every layer unpacked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnpackOptions {
    /// Most bytes one layer may unpack to. It bounds both the decompressed tar stream (counted as
    /// it is read, so a gzip or zstd bomb stops early) and the total size of the files created (a
    /// sparse file counts at its full size, holes included). Going over it is
    /// [`Error::LayerTooLarge`].
    pub max_unpacked_bytes: u64,
}

impl Default for UnpackOptions {
    fn default() -> Self {
        UnpackOptions { max_unpacked_bytes: DEFAULT_MAX_UNPACKED_BYTES }
    }
}

/// How a layer blob is compressed, from its media type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    /// A bare tar stream.
    None,
    /// gzip (possibly multi-member).
    Gzip,
    /// zstd (possibly multi-frame).
    Zstd,
}

impl Compression {
    /// Maps OCI and Docker layer media types; `None` for anything we cannot unpack (encrypted,
    /// unknown). The `nondistributable` and Docker `foreign` variants compress the same way.
    pub fn from_media_type(media_type: &str) -> Option<Compression> {
        let mt = media_type.trim();
        if mt.ends_with("+gzip") || mt.ends_with(".tar.gzip") || mt.ends_with(".tar.gz") {
            Some(Compression::Gzip)
        } else if mt.ends_with("+zstd") || mt.ends_with(".tar.zstd") {
            Some(Compression::Zstd)
        } else if mt.ends_with(".tar") || mt.ends_with("+tar") {
            Some(Compression::None)
        } else {
            None
        }
    }
}

/// Splits `sha256:<hex>` and checks the hex part, so it is safe to use as a directory name.
pub fn digest_hex(digest: &str) -> Option<&str> {
    let hex = digest.strip_prefix("sha256:")?;
    (hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))).then_some(hex)
}

/// A name no other unpack (in this or another process) will pick.
pub(crate) fn unique_suffix() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    format!("{}-{}-{nanos}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed))
}

/// Unpacks the layer in `blob` into `layers_dir/<hex of diff_id>/` and returns that path, with the
/// default [`UnpackOptions`].
///
/// Already-present layers are left alone. When two pulls race on the same layer, both unpack to
/// their own temporary directory and the loser's rename fails harmlessly.
pub fn unpack_layer(blob: &Path, compression: Compression, diff_id: &str, layers_dir: &Path) -> Result<PathBuf, Error> {
    unpack_layer_with(blob, compression, diff_id, layers_dir, &UnpackOptions::default())
}

/// [`unpack_layer`] with explicit limits. On any error, nothing is left in `layers_dir`.
pub fn unpack_layer_with(
    blob: &Path,
    compression: Compression,
    diff_id: &str,
    layers_dir: &Path,
    options: &UnpackOptions,
) -> Result<PathBuf, Error> {
    let target = unpack_layer_unsynced(blob, compression, diff_id, layers_dir, options)?;
    sync_dir(layers_dir)?;
    Ok(target)
}

/// [`unpack_layer_with`] without making the final rename durable: the layer's contents are on
/// disk before its name appears, but a crash may lose the name (and the work). The image store
/// syncs the layers directory once per pull instead of once per layer.
pub(crate) fn unpack_layer_unsynced(
    blob: &Path,
    compression: Compression,
    diff_id: &str,
    layers_dir: &Path,
    options: &UnpackOptions,
) -> Result<PathBuf, Error> {
    let hex = layer_hex(diff_id)?;
    let target = layers_dir.join(hex);
    if target.is_dir() {
        return Ok(target);
    }
    let tmp = layers_dir.join(format!(".tmp-{hex}-{}", unique_suffix()));
    fs::create_dir(&tmp).context(|| format!("creating layer directory {}", tmp.display()))?;
    let result = unpack_into_with(blob, compression, diff_id, &tmp, options).and_then(|()| syncfs(&tmp));
    if let Err(e) = result {
        remove_tree(&tmp);
        return Err(e);
    }
    commit_layer(&tmp, &target)
}

fn layer_hex(diff_id: &str) -> Result<&str, Error> {
    digest_hex(diff_id).ok_or_else(|| Error::Unpack {
        layer: diff_id.to_string(),
        reason: "the diff_id is not \"sha256:\" followed by 64 lowercase hex digits".into(),
    })
}

/// One syncfs instead of an fsync per file: whatever is renamed into place afterwards must not
/// survive a crash that loses its contents. It covers every file on `dir`'s file system.
pub(crate) fn syncfs(dir: &Path) -> Result<(), Error> {
    let d = File::open(dir).context(|| format!("opening {}", dir.display()))?;
    nix::unistd::syncfs(std::os::fd::AsRawFd::as_raw_fd(&d))
        .map_err(|e| Error::io(format!("syncing the file system of {}", dir.display()), e.into()))
}

/// Renames a finished layer directory into place (its contents already synced).
fn commit_layer(tmp: &Path, target: &Path) -> Result<PathBuf, Error> {
    match fs::rename(tmp, target) {
        Ok(()) => Ok(target.to_path_buf()),
        // Another pull finished the same layer first: its copy is as good as ours.
        Err(_) if target.is_dir() => {
            remove_tree(tmp);
            Ok(target.to_path_buf())
        }
        Err(e) => {
            remove_tree(tmp);
            Err(Error::io(format!("moving {} to {}", tmp.display(), target.display()), e))
        }
    }
}

/// A layer blob as it downloads: chunks of the compressed stream, then `End` once the whole blob
/// was received (the downloader checked nothing more; the unpacker checks the digest).
pub(crate) enum Chunk {
    Data(bytes::Bytes),
    End,
}

/// What [`unpack_streamed`] writes and checks.
pub(crate) struct StreamedLayer<'a> {
    /// `sha256:…` of the compressed blob, from the manifest.
    pub(crate) blob_digest: &'a str,
    /// Where the blob is kept: `blobs_dir/<hex>`.
    pub(crate) blobs_dir: &'a Path,
    pub(crate) compression: Compression,
    pub(crate) diff_id: &'a str,
    pub(crate) layers_dir: &'a Path,
    pub(crate) options: &'a UnpackOptions,
    /// Also keep the compressed blob (it costs disk and writes; the unpacked layer, verified by
    /// its diff_id, is what instances use).
    pub(crate) keep_blob: bool,
}

/// Unpacks a layer while it downloads, in one pass: every chunk received is hashed (and
/// appended to the blob's temporary file if the blob is kept), and fed to the decompressor and
/// the unpacker. Runs on a blocking thread; `chunks` ends with [`Chunk::End`] when the download
/// succeeded.
///
/// Only when the whole stream was received, hashed to the blob digest and unpacked to the
/// diff_id are the layer (and the blob) renamed into place (after one syncfs, which covers both
/// when they share a file system). On any error neither is kept.
pub(crate) fn unpack_streamed(
    chunks: tokio::sync::mpsc::Receiver<Chunk>,
    layer: &StreamedLayer<'_>,
) -> Result<PathBuf, Error> {
    let hex = layer_hex(layer.diff_id)?;
    let blob_hex = digest_hex(layer.blob_digest).ok_or_else(|| Error::Unpack {
        layer: layer.diff_id.to_string(),
        reason: format!("blob digest {:?} is not \"sha256:\" followed by 64 lowercase hex digits", layer.blob_digest),
    })?;
    let target = layer.layers_dir.join(hex);
    let blob_target = layer.blobs_dir.join(blob_hex);
    let tmp = layer.layers_dir.join(format!(".tmp-{hex}-{}", unique_suffix()));
    let blob_tmp = layer.blobs_dir.join(format!(".tmp-{blob_hex}-{}", unique_suffix()));
    fs::create_dir(&tmp).context(|| format!("creating layer directory {}", tmp.display()))?;
    let staged = (|| {
        let file = if layer.keep_blob {
            let file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o644)
                .open(&blob_tmp)
                .context(|| format!("creating {}", blob_tmp.display()))?;
            Some(io::BufWriter::with_capacity(256 << 10, file))
        } else {
            None
        };
        let mut input = ChunkReader {
            chunks,
            current: bytes::Bytes::new(),
            ended: false,
            blob: file,
            blob_path: &blob_tmp,
            layer: layer.diff_id,
            hasher: Sha256::new(),
            failure: None,
        };
        let what = format!("layer blob {}", layer.blob_digest);
        let unpacked = unpack_stream(&mut input, layer.compression, layer.diff_id, &tmp, layer.options, &what);
        // A failure to write the blob or a download that stopped is the cause of whatever the
        // unpacker made of it.
        if let Some(failure) = input.failure.take() {
            return Err(failure);
        }
        unpacked?;
        // The compressed stream may go on past what the decompressor needed: the digest covers it.
        io::copy(&mut input, &mut io::sink()).map_err(|e| Error::Unpack {
            layer: layer.diff_id.to_string(),
            reason: format!("reading the end of the layer blob: {e}"),
        })?;
        if let Some(failure) = input.failure.take() {
            return Err(failure);
        }
        let actual = format!("sha256:{}", hex::encode(input.hasher.finalize_reset()));
        if actual != layer.blob_digest {
            return Err(Error::DigestMismatch {
                what: format!("layer blob of {}", layer.diff_id),
                expected: layer.blob_digest.to_string(),
                actual,
            });
        }
        if let Some(blob) = input.blob.take() {
            let file =
                blob.into_inner().map_err(|e| Error::io(format!("writing {}", blob_tmp.display()), e.into_error()))?;
            if !same_file_system(&blob_tmp, &tmp)? {
                file.sync_all().context(|| format!("syncing {}", blob_tmp.display()))?;
            }
        }
        syncfs(&tmp)
    })();
    if let Err(e) = staged {
        remove_tree(&tmp);
        if let Err(e) = fs::remove_file(&blob_tmp) {
            if e.kind() != io::ErrorKind::NotFound {
                tracing::warn!(file = %blob_tmp.display(), error = %e, "cannot remove unfinished blob");
            }
        }
        return Err(e);
    }
    if !layer.keep_blob {
        return commit_layer(&tmp, &target);
    }
    if let Err(e) = fs::rename(&blob_tmp, &blob_target) {
        remove_tree(&tmp);
        let _ = fs::remove_file(&blob_tmp);
        return Err(Error::io(format!("moving {} to {}", blob_tmp.display(), blob_target.display()), e));
    }
    commit_layer(&tmp, &target)
}

fn same_file_system(a: &Path, b: &Path) -> Result<bool, Error> {
    use std::os::unix::fs::MetadataExt;
    let dev = |p: &Path| fs::metadata(p).map(|m| m.dev()).context(|| format!("inspecting {}", p.display()));
    Ok(dev(a)? == dev(b)?)
}

/// The compressed layer as the unpacker reads it, from the download's chunks. Each chunk is
/// written to the blob file and hashed as it arrives.
struct ChunkReader<'p> {
    chunks: tokio::sync::mpsc::Receiver<Chunk>,
    current: bytes::Bytes,
    ended: bool,
    /// Where the blob is written as it arrives, if it is kept.
    blob: Option<io::BufWriter<File>>,
    blob_path: &'p Path,
    /// diff_id, for messages.
    layer: &'p str,
    hasher: Sha256,
    /// Why the stream stopped early, kept to be reported instead of the unpacker's reading error.
    failure: Option<Error>,
}

impl ChunkReader<'_> {
    fn fail(&mut self, e: Error) -> io::Error {
        let message = e.to_string();
        self.failure.get_or_insert(e);
        io::Error::other(message)
    }
}

impl Read for ChunkReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let available = self.fill_buf()?;
        let n = available.len().min(buf.len());
        buf[..n].copy_from_slice(&available[..n]);
        self.consume(n);
        Ok(n)
    }
}

impl io::BufRead for ChunkReader<'_> {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        while self.current.is_empty() && !self.ended {
            match self.chunks.blocking_recv() {
                Some(Chunk::Data(data)) => {
                    if let Some(Err(e)) = self.blob.as_mut().map(|b| b.write_all(&data)) {
                        let e = Error::io(format!("writing {}", self.blob_path.display()), e);
                        return Err(self.fail(e));
                    }
                    self.hasher.update(&data);
                    self.current = data;
                }
                Some(Chunk::End) => self.ended = true,
                None => {
                    let e = Error::Unpack {
                        layer: self.layer.to_string(),
                        reason: "the download stopped before the end of the layer blob".into(),
                    };
                    return Err(self.fail(e));
                }
            }
        }
        Ok(&self.current)
    }

    fn consume(&mut self, amt: usize) {
        let _ = self.current.split_to(amt.min(self.current.len()));
    }
}

/// Removes an unfinished layer directory; failures are logged because the caller is already
/// reporting the error that matters.
fn remove_tree(dir: &Path) {
    if let Err(e) = fs::remove_dir_all(dir) {
        tracing::warn!(dir = %dir.display(), error = %e, "cannot remove unfinished layer directory");
    }
}

pub(crate) fn sync_dir(dir: &Path) -> Result<(), Error> {
    File::open(dir).and_then(|d| d.sync_all()).context(|| format!("syncing directory {}", dir.display()))
}

/// Extracts `blob` into the empty directory `root` and checks the uncompressed stream's sha256,
/// with the default [`UnpackOptions`].
pub fn unpack_into(blob: &Path, compression: Compression, diff_id: &str, root: &Path) -> Result<(), Error> {
    unpack_into_with(blob, compression, diff_id, root, &UnpackOptions::default())
}

/// [`unpack_into`] with explicit limits. On error, `root` may hold part of the layer: the caller
/// removes it.
pub fn unpack_into_with(
    blob: &Path,
    compression: Compression,
    diff_id: &str,
    root: &Path,
    options: &UnpackOptions,
) -> Result<(), Error> {
    let file = File::open(blob).context(|| format!("opening layer blob {}", blob.display()))?;
    let mut input = BufReader::with_capacity(256 << 10, file);
    unpack_stream(&mut input, compression, diff_id, root, options, &blob.display().to_string())
}

impl Compression {
    /// Guesses the compression of a layer that comes without a media type (a `docker save`
    /// `layer.tar`) from its first bytes: gzip and zstd have magic numbers, a tar does not.
    pub fn sniff(start: &[u8]) -> Compression {
        if start.starts_with(&[0x1f, 0x8b]) {
            Compression::Gzip
        } else if start.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Compression::Zstd
        } else {
            Compression::None
        }
    }
}

/// What a staged layer's compressed blob must be, when the archive says.
#[derive(Clone, Debug)]
pub(crate) struct ExpectedBlob {
    /// `sha256:…` of the blob.
    pub(crate) digest: String,
    /// Its size in bytes, if declared.
    pub(crate) size: Option<u64>,
}

/// A layer unpacked and verified in a temporary directory beneath the layers dir, not yet under
/// its diff_id name. Dropping it without [`StagedLayer::commit`] removes the directory, so a
/// caller that stages several layers and fails half-way keeps none of them.
#[derive(Debug)]
pub(crate) struct StagedLayer {
    tmp: Option<PathBuf>,
    target: PathBuf,
}

impl StagedLayer {
    /// Renames the layer into place (another copy that got there first is as good). Its contents
    /// must have been synced (one syncfs of the layers dir covers every staged layer).
    pub(crate) fn commit(mut self) -> Result<PathBuf, Error> {
        match self.tmp.take() {
            Some(tmp) => commit_layer(&tmp, &self.target),
            None => Ok(self.target.clone()),
        }
    }
}

impl Drop for StagedLayer {
    fn drop(&mut self) {
        if let Some(tmp) = self.tmp.take() {
            remove_tree(&tmp);
        }
    }
}

/// Unpacks the layer read from `input` into a new temporary directory of `layers_dir`: the
/// compressed stream is hashed (and counted) as it is read and must match `blob` when given, the
/// decompressed stream must hash to `diff_id`. `compression: None` sniffs it from the first
/// bytes. `what` names the layer's source in messages. On error nothing is left behind.
pub(crate) fn stage_layer(
    input: impl Read + Send,
    blob: Option<&ExpectedBlob>,
    compression: Option<Compression>,
    diff_id: &str,
    layers_dir: &Path,
    options: &UnpackOptions,
    what: &str,
) -> Result<StagedLayer, Error> {
    let hex = layer_hex(diff_id)?;
    let tmp = layers_dir.join(format!(".tmp-{hex}-{}", unique_suffix()));
    fs::create_dir(&tmp).context(|| format!("creating layer directory {}", tmp.display()))?;
    // From here on the guard owns the directory.
    let staged = StagedLayer { tmp: Some(tmp.clone()), target: layers_dir.join(hex) };
    let mut input =
        BufReader::with_capacity(256 << 10, HashingReader { inner: input, hasher: Sha256::new(), bytes: 0 });
    let compression = match compression {
        Some(c) => c,
        None => Compression::sniff(input.fill_buf().context(|| format!("reading {what}"))?),
    };
    unpack_stream(&mut input, compression, diff_id, &tmp, options, what)?;
    if let Some(blob) = blob {
        // The compressed stream may go on past what the decompressor needed: the digest covers it.
        io::copy(&mut input, &mut io::sink()).map_err(|e| Error::Unpack {
            layer: diff_id.to_string(),
            reason: format!("reading the end of {what}: {e}"),
        })?;
        let hashing = input.into_inner();
        if let Some(size) = blob.size.filter(|s| *s != hashing.bytes) {
            return Err(Error::Unpack {
                layer: diff_id.to_string(),
                reason: format!("{what} is {} bytes long but its descriptor declares {size}", hashing.bytes),
            });
        }
        let actual = format!("sha256:{}", hex::encode(hashing.hasher.finalize()));
        if actual != blob.digest {
            return Err(Error::DigestMismatch { what: what.to_string(), expected: blob.digest.clone(), actual });
        }
    }
    Ok(staged)
}

/// Hashes and counts the bytes read through it.
struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    bytes: u64,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes = self.bytes.saturating_add(n as u64);
        Ok(n)
    }
}

/// Decompresses `input` and extracts it into `root`, checking the uncompressed stream's sha256.
/// Reads the decompressed stream to its end; `input` may have bytes left after the compressed
/// data (the caller decides what they mean). `what` names the blob in messages.
fn unpack_stream<R: BufRead + Send>(
    input: &mut R,
    compression: Compression,
    diff_id: &str,
    root: &Path,
    options: &UnpackOptions,
    what: &str,
) -> Result<(), Error> {
    if compression == Compression::None {
        return extract_verified(input, Some(diff_id), diff_id, root, options, what);
    }
    // Two threads: one inflates and hashes the result for the diff_id (and, reading the input,
    // hashes and stores the compressed stream), the other parses the tar and writes files. Each
    // is about half the work, so a layer takes the longer of the two instead of their sum.
    std::thread::scope(|scope| {
        let (tx, rx) = std::sync::mpsc::sync_channel::<io::Result<Vec<u8>>>(DECOMPRESSED_IN_FLIGHT);
        let inflater = scope.spawn(move || -> Result<Option<String>, Error> {
            let mut decompressed: Box<dyn Read + '_> = match compression {
                Compression::Zstd => Box::new(
                    zstd::stream::read::Decoder::with_buffer(input)
                        .context(|| format!("starting zstd decoder for {what}"))?,
                ),
                _ => Box::new(flate2::bufread::MultiGzDecoder::new(input)),
            };
            let mut hasher = Sha256::new();
            loop {
                let mut buf = vec![0u8; DECOMPRESSED_CHUNK];
                match decompressed.read(&mut buf) {
                    Ok(0) => return Ok(Some(format!("sha256:{}", hex::encode(hasher.finalize())))),
                    Ok(n) => {
                        buf.truncate(n);
                        hasher.update(&buf);
                        // The extractor stopped (an error, a limit): it reports why.
                        if tx.send(Ok(buf)).is_err() {
                            return Ok(None);
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        let _ = tx.send(Err(io::Error::new(e.kind(), e.to_string())));
                        return Ok(None);
                    }
                }
            }
        });
        let reader = ChannelReader { rx, current: Vec::new(), pos: 0 };
        let result = extract_verified(reader, None, diff_id, root, options, what);
        // The receiver is gone with the reader: a still-running inflater stops at its next send.
        let inflated = inflater.join().unwrap_or_else(|_| {
            Err(Error::Unpack { layer: diff_id.to_string(), reason: "the decompressing thread panicked".into() })
        });
        result?;
        // The extractor read the stream to its end, so the inflater hashed all of it.
        match inflated? {
            Some(actual) if actual == diff_id => Ok(()),
            Some(actual) => Err(Error::DigestMismatch {
                what: format!("uncompressed layer {what}"),
                expected: diff_id.to_string(),
                actual,
            }),
            None => Err(Error::Unpack {
                layer: diff_id.to_string(),
                reason: "the decompressed stream ended before the end of the layer".into(),
            }),
        }
    })
}

/// Decompressed bytes handed from the inflating thread to the extracting one.
const DECOMPRESSED_CHUNK: usize = 128 << 10;
/// At most this many chunks wait between them (4 MiB): also how far decompression can run past
/// the size limit before the extractor notices.
const DECOMPRESSED_IN_FLIGHT: usize = 32;

/// The extracting side of [`unpack_stream`]'s two threads.
struct ChannelReader {
    rx: std::sync::mpsc::Receiver<io::Result<Vec<u8>>>,
    current: Vec<u8>,
    pos: usize,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.current.len() {
            match self.rx.recv() {
                Ok(Ok(chunk)) => {
                    self.current = chunk;
                    self.pos = 0;
                }
                Ok(Err(e)) => return Err(e),
                // The inflater finished: end of stream.
                Err(_) => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len() - self.pos);
        buf[..n].copy_from_slice(&self.current[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Extracts the uncompressed tar stream `input` into `root` within the size limit, reading it
/// to its end; with `check` set, verifies that the whole stream hashes to it (else the caller
/// hashes it). `diff_id` names the layer in messages.
fn extract_verified(
    input: impl Read,
    check: Option<&str>,
    diff_id: &str,
    root: &Path,
    options: &UnpackOptions,
    what: &str,
) -> Result<(), Error> {
    let meter = Meter::new(options.max_unpacked_bytes);
    let mut metered = MeteredReader { inner: input, hasher: check.map(|_| Sha256::new()), meter: &meter };
    let stop_err = |stop: Stop| match stop {
        Stop::Invalid(reason) => Error::Unpack { layer: diff_id.to_string(), reason: elide(reason) },
        Stop::TooLarge(what) => {
            Error::LayerTooLarge { layer: diff_id.to_string(), limit: options.max_unpacked_bytes, what: elide(what) }
        }
    };

    extract(&mut tar::Archive::new(&mut metered), root, &meter).map_err(stop_err)?;
    // The diff_id covers the whole stream, including the end-of-archive padding tar stops at,
    // and whatever follows it: a bomb can hide there too, so this is metered like the rest.
    io::copy(&mut metered, &mut io::sink())
        .map_err(|e| stop_err(meter.stop(format!("reading the end of the layer stream: {e}"))))?;
    if let (Some(expected), Some(hasher)) = (check, metered.hasher) {
        let actual = format!("sha256:{}", hex::encode(hasher.finalize()));
        if actual != expected {
            return Err(Error::DigestMismatch {
                what: format!("uncompressed layer {what}"),
                expected: expected.to_string(),
                actual,
            });
        }
    }
    Ok(())
}

/// Why extraction stopped.
enum Stop {
    /// The layer is malformed or hostile, or the file system refused: which entry and why.
    Invalid(String),
    /// A size limit was reached: what went over it.
    TooLarge(String),
}

/// Which limit the stream reader tripped.
#[derive(Clone, Copy)]
enum Tripped {
    Stream,
    EntryHeaders,
}

/// Counts the decompressed bytes as tar reads them. Shared (through `Cell`s) between the reader,
/// which tar owns while it iterates, and the extraction loop, which says when tar is reading
/// headers rather than file data.
struct Meter {
    limit: u64,
    total: Cell<u64>,
    /// `Some(bytes read so far)` while tar looks for the next entry.
    headers: Cell<Option<u64>>,
    tripped: Cell<Option<Tripped>>,
}

impl Meter {
    fn new(limit: u64) -> Self {
        Meter { limit, total: Cell::new(0), headers: Cell::new(None), tripped: Cell::new(None) }
    }

    /// Turns a read error into the limit it really was, if the reader tripped one.
    fn stop(&self, message: String) -> Stop {
        match self.tripped.get() {
            Some(Tripped::Stream) => Stop::TooLarge("its decompressed tar stream is longer".into()),
            Some(Tripped::EntryHeaders) => Stop::Invalid(format!(
                "the headers of one entry (PAX records, GNU long names, sparse maps) take more than \
                 {MAX_ENTRY_HEADER_BYTES} bytes; a real layer needs a few KiB, refusing to buffer them"
            )),
            None => Stop::Invalid(message),
        }
    }
}

/// Shortens a message that quotes a hostile entry name (which can be megabytes long) to its start
/// and its end, where the cause is.
fn elide(message: String) -> String {
    const HEAD: usize = 600;
    const TAIL: usize = 400;
    if message.len() <= HEAD + TAIL {
        return message;
    }
    let head_end = (0..=HEAD).rev().find(|&i| message.is_char_boundary(i)).unwrap_or(0);
    let tail_start =
        (message.len() - TAIL..message.len()).find(|&i| message.is_char_boundary(i)).unwrap_or(message.len());
    format!("{}[…{} bytes…]{}", &message[..head_end], tail_start - head_end, &message[tail_start..])
}

/// Hashes the decompressed stream for the diff_id check and enforces the [`Meter`]'s limits.
struct MeteredReader<'m, R> {
    inner: R,
    /// Hashes the stream for the diff_id, unless another thread does.
    hasher: Option<Sha256>,
    meter: &'m Meter,
}

impl<R: Read> Read for MeteredReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let m = self.meter;
        // One byte past the limit at most: enough to notice it is exceeded, without reading on.
        let allowed = m.limit.saturating_sub(m.total.get()).saturating_add(1);
        let len = buf.len().min(usize::try_from(allowed).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..len])?;
        if let Some(h) = self.hasher.as_mut() {
            h.update(&buf[..n]);
        }
        let total = m.total.get().saturating_add(n as u64);
        m.total.set(total);
        if total > m.limit {
            m.tripped.set(Some(Tripped::Stream));
            return Err(io::Error::other(format!("the layer is larger than {} bytes", m.limit)));
        }
        if let Some(h) = m.headers.get() {
            let h = h.saturating_add(n as u64);
            m.headers.set(Some(h));
            if h > MAX_ENTRY_HEADER_BYTES {
                m.tripped.set(Some(Tripped::EntryHeaders));
                return Err(io::Error::other("entry headers too large"));
            }
        }
        Ok(n)
    }
}

/// When an entry was last modified, as precisely as the archive says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Mtime {
    secs: i64,
    nanos: u32,
}

/// Owner, mode, mtime and xattrs of one entry, applied after it is created.
struct Meta {
    uid: u64,
    gid: u64,
    mode: u32,
    mtime: Mtime,
    xattrs: Vec<(String, Vec<u8>)>,
}

/// Directory mtimes, set once every entry is in place (creating children changes them). Keyed by
/// path beneath the root, so the last entry for a directory wins.
type DirTimes = BTreeMap<Vec<OsString>, Mtime>;

fn extract<R: Read>(archive: &mut tar::Archive<R>, root: &Path, meter: &Meter) -> Result<(), Stop> {
    let mut dir_times = DirTimes::new();
    // Bytes the files of this layer take, holes of sparse files included.
    let mut file_bytes: u64 = 0;
    let mut entries = archive.entries().map_err(|e| meter.stop(format!("not a tar stream: {e}")))?;
    loop {
        // tar buffers whatever it reads before yielding the next entry: bound it.
        meter.headers.set(Some(0));
        let next = entries.next();
        meter.headers.set(None);
        let Some(entry) = next else { break };
        let mut entry = entry.map_err(|e| meter.stop(format!("reading the next tar entry: {e}")))?;
        let sparse = pax_sparse(&mut entry).map_err(|e| {
            let path = entry.path().map(|p| p.display().to_string()).unwrap_or_default();
            Stop::Invalid(format!("entry {path:?}: {e}"))
        })?;
        // A PAX sparse file's header carries a made-up name (`GNUSparseFile.<pid>/name`, so tars
        // that do not know the format extract something harmless); the real one is a record.
        let raw = match sparse.as_ref().and_then(|s| s.name.clone()) {
            Some(name) => name,
            None => {
                entry.path().map_err(|e| Stop::Invalid(format!("entry with an unreadable path: {e}")))?.into_owned()
            }
        };
        let name = raw.display().to_string();

        let kind = entry.header().entry_type();
        if matches!(kind, tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse) {
            let size = sparse.as_ref().map_or_else(|| entry.size(), |s| s.real_size);
            file_bytes = file_bytes.saturating_add(size);
            if file_bytes > meter.limit {
                return Err(Stop::TooLarge(format!(
                    "entry {name:?} declares {size} bytes, which brings its files over the limit"
                )));
            }
        }
        extract_entry(&mut entry, &raw, root, &mut dir_times, sparse.as_ref())
            .map_err(|e| meter.stop(format!("entry {name:?}: {e}")))?;
        // Data the entry's kind does not use (a directory with a size, say) is skipped here, so
        // it counts as data, not as the next entry's headers.
        io::copy(&mut entry, &mut io::sink())
            .map_err(|e| meter.stop(format!("entry {name:?}: skipping its data: {e}")))?;
    }
    set_dir_times(root, &dir_times).map_err(Stop::Invalid)
}

fn extract_entry<R: Read>(
    entry: &mut tar::Entry<'_, R>,
    raw: &Path,
    root: &Path,
    dir_times: &mut DirTimes,
    sparse: Option<&PaxSparse>,
) -> Result<(), String> {
    let kind = entry.header().entry_type();
    if sparse.is_some() && !matches!(kind, tar::EntryType::Regular | tar::EntryType::Continuous) {
        return Err(format!("GNU sparse PAX records on a {kind:?} entry; only regular files can be sparse"));
    }
    let components = sanitize(raw)?;
    let meta = read_meta(entry)?;

    let Some((last, parents)) = components.split_last() else {
        // "./" or "/": the layer root itself. Only its metadata can be set.
        if kind.is_dir() {
            apply_meta(root, &meta, false)?;
            dir_times.insert(Vec::new(), meta.mtime);
        }
        return Ok(());
    };
    let parent = ensure_parents(root, parents)?;
    let path = parent.join(last);

    let last_str = last.to_string_lossy();
    if let Some(hidden) = last_str.strip_prefix(WHITEOUT_PREFIX) {
        if *last == OsStr::new(OPAQUE_MARKER) {
            return set_xattr(&parent, OVERLAY_OPAQUE_XATTR, b"y")
                .map_err(|e| format!("marking {} opaque: {e}", parent.display()));
        }
        if hidden.starts_with(WHITEOUT_PREFIX) {
            // Other ".wh..wh." names are AUFS bookkeeping (hard link dirs): nothing to unpack.
            tracing::debug!(path = %raw.display(), "skipping AUFS metadata entry");
            return Ok(());
        }
        if hidden.is_empty() || hidden == "." || hidden == ".." {
            return Err(format!("whiteout names nothing (hidden name {hidden:?})"));
        }
        let target = parent.join(OsStr::from_bytes(&last.as_bytes()[WHITEOUT_PREFIX.len()..]));
        clear(&target, false)?;
        return mknod(&target, SFlag::S_IFCHR, Mode::empty(), makedev(0, 0))
            .map_err(|e| format!("creating whiteout device {}: {e}", target.display()));
    }

    use tar::EntryType as T;
    // Pre-POSIX tars mark directories only by a trailing slash on a regular-file entry.
    let old_style_dir = kind == T::Regular && raw.as_os_str().as_bytes().ends_with(b"/");
    match kind {
        _ if old_style_dir || kind == T::Directory => {
            if !clear(&path, true)? {
                fs::create_dir(&path).map_err(|e| format!("creating directory: {e}"))?;
            }
            apply_meta(&path, &meta, false)?;
            dir_times.insert(components, meta.mtime);
        }
        T::Regular | T::Continuous | T::GNUSparse => {
            clear(&path, false)?;
            // O_NOFOLLOW + create_new: we only ever write a file we just created.
            let mut file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&path)
                .map_err(|e| format!("creating file: {e}"))?;
            let size = sparse.map_or_else(|| entry.size(), |s| s.real_size);
            let written = match sparse {
                Some(s) => write_pax_sparse(entry, &mut file, s),
                None if kind == T::GNUSparse => write_sparse(entry, &mut file),
                None => io::copy(entry, &mut file),
            }
            .map_err(|e| format!("writing file contents: {e}"))?;
            if written != size {
                return Err(format!("the layer stream ends inside this entry, after {written} of its {size} bytes"));
            }
            drop(file);
            apply_meta(&path, &meta, false)?;
            set_mtime(&path, meta.mtime)?;
        }
        T::Symlink => {
            let target = entry
                .link_name()
                .map_err(|e| format!("unreadable symlink target: {e}"))?
                .ok_or("symlink without a target")?;
            // The target is data interpreted inside the container, never by us.
            clear(&path, false)?;
            std::os::unix::fs::symlink(&target, &path).map_err(|e| format!("creating symlink: {e}"))?;
            apply_meta(&path, &meta, true)?;
            set_mtime(&path, meta.mtime)?;
        }
        T::Link => {
            let target = entry
                .link_name()
                .map_err(|e| format!("unreadable hardlink target: {e}"))?
                .ok_or("hardlink without a target")?;
            let target_components =
                sanitize(&target).map_err(|e| format!("hardlink target {:?}: {e}", target.display()))?;
            let source = existing_path(root, &target_components)
                .map_err(|e| format!("hardlink target {:?}: {e}", target.display()))?;
            if source == path {
                return Ok(());
            }
            clear(&path, false)?;
            // link(2) does not follow a symlink source: the link shares the symlink's inode.
            fs::hard_link(&source, &path).map_err(|e| format!("creating hardlink: {e}"))?;
        }
        T::Char | T::Block | T::Fifo => {
            let sflag = match kind {
                T::Char => SFlag::S_IFCHR,
                T::Block => SFlag::S_IFBLK,
                _ => SFlag::S_IFIFO,
            };
            // A misread number must not silently become 0/0, which overlayfs reads as a whiteout.
            let (major, minor) = match kind {
                T::Fifo => (0, 0),
                _ => {
                    let h = entry.header();
                    let major = h.device_major().map_err(|e| format!("bad device major field: {e}"))?;
                    let minor = h.device_minor().map_err(|e| format!("bad device minor field: {e}"))?;
                    major.zip(minor).ok_or("device entry without device numbers (pre-POSIX tar header)")?
                }
            };
            clear(&path, false)?;
            mknod(&path, sflag, Mode::from_bits_truncate(0o600), makedev(u64::from(major), u64::from(minor)))
                .map_err(|e| format!("creating device node: {e}"))?;
            apply_meta(&path, &meta, false)?;
            set_mtime(&path, meta.mtime)?;
        }
        T::XGlobalHeader => {}
        other => {
            tracing::warn!(path = %raw.display(), kind = ?other, "skipping unsupported tar entry type");
        }
    }
    Ok(())
}

/// Copies a GNU sparse entry, seeking over runs of zeros instead of writing them, so the holes the
/// archive described stay holes on disk. Returns the file's size.
fn write_sparse(entry: &mut impl Read, file: &mut File) -> io::Result<u64> {
    const CHUNK: usize = 64 * 1024;
    static ZEROS: [u8; CHUNK] = [0; CHUNK];
    let mut buf = vec![0u8; CHUNK];
    let mut size: u64 = 0;
    loop {
        let n = match entry.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        // Slice equality is a memcmp: fast even in unoptimised builds.
        if buf[..n] == ZEROS[..n] {
            file.seek(SeekFrom::Current(n as i64))?;
        } else {
            file.write_all(&buf[..n])?;
        }
        size += n as u64;
    }
    // A trailing hole: seeking alone does not extend the file.
    file.set_len(size)?;
    Ok(size)
}

/// A sparse file in one of the PAX formats GNU tar writes (`--format=posix --sparse`; 1.0 is its
/// default, 0.0 and 0.1 are older). The `tar` crate only decodes the old GNU `S` entries; Go's
/// `archive/tar` (Docker, containerd, umoci) decodes these too, so we must, or we would extract
/// a file under a made-up name holding the sparse map.
#[derive(Debug)]
struct PaxSparse {
    /// `GNU.sparse.name`: the real path.
    name: Option<PathBuf>,
    /// The file's size, holes included.
    real_size: u64,
    /// (offset, length) of each data extent; `None` for 1.0, which stores it at the start of the
    /// entry's data.
    map: Option<Vec<(u64, u64)>>,
}

/// Most extents one sparse file may list; the map of a real one is a few lines.
const MAX_SPARSE_EXTENTS: usize = 1 << 16;

const PAX_SPARSE_PREFIX: &str = "GNU.sparse.";

/// Reads the `GNU.sparse.*` PAX records of an entry, if it has any.
fn pax_sparse<R: Read>(entry: &mut tar::Entry<'_, R>) -> Result<Option<PaxSparse>, String> {
    let Some(pax) = entry.pax_extensions().map_err(|e| format!("bad PAX header: {e}"))? else {
        return Ok(None);
    };
    let number = |key: &str, v: &[u8]| -> Result<u64, String> {
        std::str::from_utf8(v)
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .ok_or_else(|| format!("PAX record {PAX_SPARSE_PREFIX}{key} is not a number"))
    };
    let (mut seen, mut major, mut minor, mut name) = (false, None, None, None);
    let (mut real_size, mut size, mut map, mut offsets, mut lengths) = (None, None, None, Vec::new(), Vec::new());
    for ext in pax {
        let ext = ext.map_err(|e| format!("bad PAX record: {e}"))?;
        let Some(key) = ext.key().ok().and_then(|k| k.strip_prefix(PAX_SPARSE_PREFIX)) else { continue };
        seen = true;
        let v = ext.value_bytes();
        match key {
            "major" => major = Some(number(key, v)?),
            "minor" => minor = Some(number(key, v)?),
            "name" => name = Some(PathBuf::from(OsStr::from_bytes(v))),
            "realsize" => real_size = Some(number(key, v)?),
            "size" => size = Some(number(key, v)?),
            "map" => {
                let numbers = std::str::from_utf8(v)
                    .ok()
                    .map(|v| v.split(',').map(|n| n.trim().parse::<u64>().ok()).collect::<Option<Vec<_>>>())
                    .and_then(|n| n.filter(|n| n.len() % 2 == 0))
                    .ok_or("PAX record GNU.sparse.map is not a list of offset,length pairs")?;
                map = Some(numbers.chunks(2).map(|p| (p[0], p[1])).collect::<Vec<_>>());
            }
            "offset" => offsets.push(number(key, v)?),
            "numbytes" => lengths.push(number(key, v)?),
            _ => {}
        }
    }
    if !seen {
        return Ok(None);
    }
    let map = match (major, minor) {
        (Some(1), Some(0)) => None,
        (Some(1), _) | (Some(2..), _) => {
            return Err(format!("GNU sparse format {major:?}.{minor:?} is unknown; expected 0.0, 0.1 or 1.0"))
        }
        _ => match map {
            Some(map) => Some(map),
            None if offsets.len() == lengths.len() => Some(offsets.into_iter().zip(lengths).collect()),
            None => return Err("GNU sparse 0.0 records list offsets and lengths in different numbers".into()),
        },
    };
    let real_size = real_size.or(size).ok_or("GNU sparse PAX records without the file's size")?;
    if let Some(map) = &map {
        check_sparse_map(map, real_size)?;
    }
    Ok(Some(PaxSparse { name, real_size, map }))
}

/// Extents must be in order, not overlap, and end within the file.
fn check_sparse_map(map: &[(u64, u64)], real_size: u64) -> Result<(), String> {
    if map.len() > MAX_SPARSE_EXTENTS {
        return Err(format!("the sparse map lists {} extents; at most {MAX_SPARSE_EXTENTS} are accepted", map.len()));
    }
    let mut end = 0u64;
    for (offset, length) in map {
        if *offset < end {
            return Err(format!("sparse extent at {offset} overlaps or precedes the one before it"));
        }
        end = offset.checked_add(*length).filter(|e| *e <= real_size).ok_or_else(|| {
            format!("sparse extent at {offset} of {length} bytes ends past the file's size of {real_size}")
        })?;
    }
    Ok(())
}

/// Reads the map GNU sparse 1.0 keeps at the start of the entry's data: decimal numbers, one per
/// line (the number of extents, then offset and length of each), padded to a 512-byte block.
fn read_sparse_map_1_0(entry: &mut impl Read, real_size: u64) -> io::Result<(Vec<(u64, u64)>, u64)> {
    let invalid = |m: String| io::Error::new(io::ErrorKind::InvalidData, m);
    let mut consumed: u64 = 0;
    let mut numbers: Vec<u64> = Vec::new();
    let mut wanted: Option<usize> = None;
    let mut digits = String::new();
    let mut block = [0u8; 512];
    while wanted.is_none_or(|w| numbers.len() < w) {
        if consumed >= MAX_ENTRY_HEADER_BYTES {
            return Err(invalid(format!("the sparse map is longer than {MAX_ENTRY_HEADER_BYTES} bytes")));
        }
        entry.read_exact(&mut block).map_err(|e| invalid(format!("reading the sparse map: {e}")))?;
        consumed += 512;
        for &b in &block {
            if wanted.is_some_and(|w| numbers.len() >= w) {
                break;
            }
            match b {
                b'0'..=b'9' if digits.len() < 20 => digits.push(char::from(b)),
                b'\n' if !digits.is_empty() => {
                    let n: u64 =
                        digits.parse().map_err(|_| invalid(format!("bad number {digits:?} in the sparse map")))?;
                    digits.clear();
                    numbers.push(n);
                    if wanted.is_none() {
                        let count = usize::try_from(n).ok().filter(|c| *c <= MAX_SPARSE_EXTENTS).ok_or_else(|| {
                            invalid(format!(
                                "the sparse map lists {n} extents; at most {MAX_SPARSE_EXTENTS} are accepted"
                            ))
                        })?;
                        wanted = Some(1 + 2 * count);
                    }
                }
                _ => return Err(invalid("the sparse map is not decimal numbers, one per line".into())),
            }
        }
    }
    let map: Vec<(u64, u64)> = numbers[1..].chunks(2).map(|p| (p[0], p[1])).collect();
    check_sparse_map(&map, real_size).map_err(invalid)?;
    Ok((map, consumed))
}

/// Writes a PAX sparse file: each extent's data at its offset, holes left as holes. Returns the
/// file's size; fails if the entry's data is not exactly the extents' (after the 1.0 map).
fn write_pax_sparse(entry: &mut tar::Entry<'_, impl Read>, file: &mut File, sparse: &PaxSparse) -> io::Result<u64> {
    let stored = entry.size();
    let (map, map_bytes) = match &sparse.map {
        Some(map) => (map.clone(), 0),
        None => read_sparse_map_1_0(entry, sparse.real_size)?,
    };
    let data: u64 = map.iter().map(|(_, l)| *l).sum();
    if map_bytes.checked_add(data) != Some(stored) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "the sparse map lists {data} bytes of data but the entry holds {}",
                stored.saturating_sub(map_bytes)
            ),
        ));
    }
    for (offset, length) in map {
        file.seek(SeekFrom::Start(offset))?;
        let copied = io::copy(&mut entry.take(length), file)?;
        if copied != length {
            return Ok(offset + copied);
        }
    }
    file.set_len(sparse.real_size)?;
    Ok(sparse.real_size)
}

/// Turns a tar path into components relative to the layer root. A leading `/` is dropped (tar
/// paths are relative to the layer root whatever they say), `.` is ignored, `..` is refused:
/// it is never needed in a well-formed layer and only serves to escape.
pub(crate) fn sanitize(path: &Path) -> Result<Vec<OsString>, String> {
    let mut out = Vec::new();
    for c in path.components() {
        match c {
            Component::Normal(n) => out.push(n.to_os_string()),
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir => {
                return Err(format!(
                    "path {:?} contains \"..\"; layer paths must stay beneath the layer root",
                    path.display()
                ))
            }
            Component::Prefix(_) => return Err("path has a Windows prefix".into()),
        }
    }
    Ok(out)
}

/// Walks `parents` from `root`, creating missing directories, and refuses any component that
/// exists as something other than a real directory (a symlink there could point anywhere).
fn ensure_parents(root: &Path, parents: &[OsString]) -> Result<PathBuf, String> {
    let mut p = root.to_path_buf();
    for c in parents {
        p.push(c);
        match fs::symlink_metadata(&p) {
            Ok(m) if m.file_type().is_dir() => {}
            Ok(m) => {
                let what = if m.file_type().is_symlink() { "a symlink" } else { "not a directory" };
                return Err(format!("parent {:?} is {what}; refusing to write through it", relative(root, &p)));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                // Implicit parents get Docker's default mode; a later entry may fix it.
                fs::create_dir(&p).map_err(|e| format!("creating parent {}: {e}", p.display()))?;
                fs::set_permissions(&p, fs::Permissions::from_mode(0o755))
                    .map_err(|e| format!("setting mode of {}: {e}", p.display()))?;
            }
            Err(e) => return Err(format!("inspecting {}: {e}", p.display())),
        }
    }
    Ok(p)
}

/// Resolves a hardlink target: it must already be extracted in this layer, reached through real
/// directories only, and must not be a directory.
fn existing_path(root: &Path, components: &[OsString]) -> Result<PathBuf, String> {
    let Some((last, parents)) = components.split_last() else {
        return Err("it is the layer root".into());
    };
    let mut p = root.to_path_buf();
    for c in parents {
        p.push(c);
        match fs::symlink_metadata(&p) {
            Ok(m) if m.file_type().is_dir() => {}
            Ok(_) => return Err(format!("{:?} is not a real directory", relative(root, &p))),
            Err(_) => return Err("it has not been extracted (earlier in this layer)".into()),
        }
    }
    p.push(last);
    match fs::symlink_metadata(&p) {
        Ok(m) if m.file_type().is_dir() => Err("it is a directory".into()),
        Ok(_) => Ok(p),
        Err(_) => Err("it has not been extracted (earlier in this layer)".into()),
    }
}

/// Sets the recorded directory mtimes. A later entry may have replaced a directory, or one of its
/// parents, with a symlink or a file: each path is resolved again through real directories only,
/// and what is no longer a directory is skipped, so no time is ever set outside the root.
fn set_dir_times(root: &Path, dir_times: &DirTimes) -> Result<(), String> {
    'dirs: for (components, mtime) in dir_times {
        let mut p = root.to_path_buf();
        for c in components {
            p.push(c);
            if !fs::symlink_metadata(&p).is_ok_and(|m| m.file_type().is_dir()) {
                continue 'dirs;
            }
        }
        set_mtime(&p, *mtime)?;
    }
    Ok(())
}

fn relative(root: &Path, p: &Path) -> String {
    p.strip_prefix(root).unwrap_or(p).display().to_string()
}

/// Makes room for a new entry at `path` without following anything. Returns true when `path`
/// is a directory that was kept because `keep_dir` asked for it.
fn clear(path: &Path, keep_dir: bool) -> Result<bool, String> {
    match fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(format!("inspecting {}: {e}", path.display())),
        Ok(m) if m.file_type().is_dir() => {
            if keep_dir {
                Ok(true)
            } else {
                fs::remove_dir_all(path).map_err(|e| format!("replacing directory {}: {e}", path.display()))?;
                Ok(false)
            }
        }
        Ok(_) => {
            fs::remove_file(path).map_err(|e| format!("replacing {}: {e}", path.display()))?;
            Ok(false)
        }
    }
}

fn read_meta<R: Read>(entry: &mut tar::Entry<'_, R>) -> Result<Meta, String> {
    let h = entry.header();
    let mut meta = Meta {
        uid: h.uid().map_err(|e| format!("bad uid field: {e}"))?,
        gid: h.gid().map_err(|e| format!("bad gid field: {e}"))?,
        mode: h.mode().map_err(|e| format!("bad mode field: {e}"))? & 0o7777,
        mtime: Mtime {
            secs: i64::try_from(h.mtime().map_err(|e| format!("bad mtime field: {e}"))?).unwrap_or(i64::MAX),
            nanos: 0,
        },
        xattrs: Vec::new(),
    };
    let Some(pax) = entry.pax_extensions().map_err(|e| format!("bad PAX header: {e}"))? else {
        return Ok(meta);
    };
    for ext in pax {
        let ext = ext.map_err(|e| format!("bad PAX record: {e}"))?;
        let Ok(key) = ext.key() else { continue };
        if let Some(name) = key.strip_prefix(PAX_XATTR_PREFIX) {
            // POSIX: a record with an empty value deletes the keyword, it sets nothing. Go's
            // archive/tar (Docker, containerd, umoci) reads it so: no xattr.
            meta.xattrs.retain(|(n, _)| n != name);
            if !ext.value_bytes().is_empty() {
                meta.xattrs.push((name.to_string(), ext.value_bytes().to_vec()));
            }
            continue;
        }
        // PAX carries ids and times that do not fit the ustar fields.
        let value = ext.value().ok();
        match key {
            "uid" => meta.uid = value.and_then(|v| v.parse().ok()).unwrap_or(meta.uid),
            "gid" => meta.gid = value.and_then(|v| v.parse().ok()).unwrap_or(meta.gid),
            "mtime" => meta.mtime = value.and_then(parse_pax_time).unwrap_or(meta.mtime),
            _ => {}
        }
    }
    Ok(meta)
}

/// A PAX time: decimal seconds since the epoch with an optional fraction (`1234567890.5`,
/// `-1.25`).
fn parse_pax_time(v: &str) -> Option<Mtime> {
    let (secs, frac) = v.split_once('.').unwrap_or((v, ""));
    let secs: i64 = secs.parse().ok()?;
    if !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    // Nanoseconds: the first nine digits, right-padded with zeros.
    let nanos = frac.bytes().chain(std::iter::repeat(b'0')).take(9).fold(0u32, |n, d| n * 10 + u32::from(d - b'0'));
    if v.starts_with('-') && nanos > 0 {
        // "-1.25" is 1.25 s before the epoch: -2 s + 0.75 s.
        Some(Mtime { secs: secs.checked_sub(1)?, nanos: 1_000_000_000 - nanos })
    } else {
        Some(Mtime { secs, nanos })
    }
}

/// Owner first, then mode (chown clears setuid/setgid), then xattrs (chown also clears
/// `security.capability`).
fn apply_meta(path: &Path, meta: &Meta, is_symlink: bool) -> Result<(), String> {
    let uid = u32::try_from(meta.uid).map_err(|_| format!("uid {} out of range", meta.uid))?;
    let gid = u32::try_from(meta.gid).map_err(|_| format!("gid {} out of range", meta.gid))?;
    lchown(path, Some(uid), Some(gid)).map_err(|e| format!("chown {uid}:{gid}: {e}"))?;
    if !is_symlink {
        // `path` was just created by us or checked to be a real directory: no symlink to follow.
        fs::set_permissions(path, fs::Permissions::from_mode(meta.mode))
            .map_err(|e| format!("chmod {:o}: {e}", meta.mode))?;
    }
    for (name, value) in &meta.xattrs {
        if name.starts_with(OVERLAY_XATTR_PREFIX) {
            tracing::warn!(path = %path.display(), xattr = %name, "ignoring overlay xattr from layer");
            continue;
        }
        set_xattr(path, name, value).map_err(|e| format!("setting xattr {name}: {e}"))?;
    }
    Ok(())
}

fn set_mtime(path: &Path, mtime: Mtime) -> Result<(), String> {
    let t = TimeSpec::new(mtime.secs, i64::from(mtime.nanos));
    utimensat(None, path, &t, &t, UtimensatFlags::NoFollowSymlink)
        .map_err(|e| format!("setting mtime of {}: {e}", path.display()))
}

/// lsetxattr(2): never follows a symlink at `path`.
fn set_xattr(path: &Path, name: &str, value: &[u8]) -> io::Result<()> {
    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))?;
    let c_name =
        CString::new(name).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "xattr name contains NUL"))?;
    // SAFETY: both strings are NUL-terminated CStrings that outlive the call, and `value` is a
    // valid slice whose pointer and length are passed together.
    let rc = unsafe { libc::lsetxattr(c_path.as_ptr(), c_name.as_ptr(), value.as_ptr().cast(), value.len(), 0) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
#[path = "unpack_tests.rs"]
mod tests;
