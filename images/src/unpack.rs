//! Layer unpacking: turns one layer blob into a directory overlayfs can use as a lowerdir, with
//! whiteouts in overlay form, after checking its diff_id and that every entry stays beneath the
//! layer root.
//!
//! We do not use `tar::Archive::unpack`: a layer is untrusted input and we must decide ourselves
//! what a path means. `..` is refused; every entry is made relative to a descriptor of its parent
//! directory, opened with the kernel refusing a symlink anywhere beneath the layer root (each
//! parent must be a real directory), and its final component is replaced, never followed (see
//! `tree`). Extraction happens in `layers/.tmp-<hex>-<unique>`, renamed into place only once the
//! whole stream hashed to the expected diff_id, so a directory named by a diff_id is always
//! complete.
//!
//! A layer is also bounded in size ([`UnpackOptions`]): the decompressed stream and the files it
//! creates may not exceed `max_unpacked_bytes`, and what tar buffers in memory for one entry
//! (PAX records, GNU long names, sparse maps) may not exceed [`MAX_ENTRY_HEADER_BYTES`].

use std::cell::Cell;
use std::collections::BTreeMap;
use std::ffi::{CString, OsStr, OsString};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::{
    fchmod, fchmodat, fstatat, futimens, makedev, mknodat, utimensat, FchmodatFlags, Mode, SFlag, UtimensatFlags,
};
use nix::sys::time::TimeSpec;
use nix::unistd::{fchown, fchownat, linkat, symlinkat, Gid, Uid};
use sha2::{Digest, Sha256};

use crate::error::IoContext;
use crate::Error;

mod gzip;
mod tree;

use tree::{open_at, Tree, Unreachable};

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
    let result = Writeback::open(&tmp).and_then(|writeback| {
        unpack_file(blob, compression, diff_id, &tmp, options, Some(&writeback))?;
        writeback.sync()
    });
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

/// The file system layers are written to, made durable with one syncfs(2) instead of an fsync
/// per file (whatever is renamed into place afterwards must not survive a crash that loses its
/// contents). Opened before anything is written: syncfs reports a write-back error to each
/// descriptor opened before the error, so none that happens meanwhile goes unnoticed.
pub(crate) struct Writeback {
    dir: File,
    path: PathBuf,
}

impl Writeback {
    pub(crate) fn open(dir: &Path) -> Result<Writeback, Error> {
        let file = File::open(dir).context(|| format!("opening {}", dir.display()))?;
        Ok(Writeback { dir: file, path: dir.to_path_buf() })
    }

    /// Syncs every file of the file system.
    pub(crate) fn sync(&self) -> Result<(), Error> {
        nix::unistd::syncfs(self.dir.as_raw_fd())
            .map_err(|e| Error::io(format!("syncing the file system of {}", self.path.display()), e.into()))
    }
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
    let started = std::time::Instant::now();
    let staged = (|| {
        let writeback = Writeback::open(&tmp)?;
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
        let unpacked =
            unpack_stream(&mut input, layer.compression, layer.diff_id, &tmp, layer.options, &what, Some(&writeback));
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
        let unpacked = started.elapsed();
        writeback.sync()?;
        tracing::debug!(
            layer = layer.diff_id,
            unpack_ms = unpacked.as_millis(),
            final_sync_ms = (started.elapsed() - unpacked).as_millis(),
            "layer unpacked and synced"
        );
        Ok(())
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
    unpack_file(blob, compression, diff_id, root, options, None)
}

/// [`unpack_into_with`], syncing `writeback` in the background as the layer is written.
fn unpack_file(
    blob: &Path,
    compression: Compression,
    diff_id: &str,
    root: &Path,
    options: &UnpackOptions,
    writeback: Option<&Writeback>,
) -> Result<(), Error> {
    let file = File::open(blob).context(|| format!("opening layer blob {}", blob.display()))?;
    let mut input = BufReader::with_capacity(256 << 10, file);
    unpack_stream(&mut input, compression, diff_id, root, options, &blob.display().to_string(), writeback)
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
    unpack_stream(&mut input, compression, diff_id, &tmp, options, what, None)?;
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
/// data (the caller decides what they mean). `what` names the blob in messages. With
/// `writeback`, its file system is synced in the background as the layer is written, so that
/// the caller's own sync, before the layer is committed, has only the last part left to write.
fn unpack_stream<R: BufRead + Send>(
    input: &mut R,
    compression: Compression,
    diff_id: &str,
    root: &Path,
    options: &UnpackOptions,
    what: &str,
    writeback: Option<&Writeback>,
) -> Result<(), Error> {
    if compression == Compression::None {
        return extract_verified(input, Some(diff_id), diff_id, root, options, what, writeback);
    }
    // Three threads, each about a third of the work, so a layer takes about the longest of them
    // instead of their sum: one inflates (and, reading the input, hashes and stores the
    // compressed stream), one hashes the result for the diff_id, one parses the tar and writes
    // files. Which is the longest depends on the layer (inflating, for large files; writing, for
    // many small ones), so no one of them also hashes.
    std::thread::scope(|scope| {
        let (to_hasher, from_inflater) = std::sync::mpsc::sync_channel::<io::Result<Vec<u8>>>(DECOMPRESSED_IN_FLIGHT);
        let (to_extractor, from_hasher) = std::sync::mpsc::sync_channel::<io::Result<Vec<u8>>>(DECOMPRESSED_IN_FLIGHT);
        // Chunks the extractor is done with, filled again rather than allocated (and cleared).
        let (recycle, recycled) = std::sync::mpsc::channel::<Vec<u8>>();
        let inflater = scope.spawn(move || -> Result<(), Error> {
            let mut decompressed: Box<dyn Read + '_> = match compression {
                Compression::Zstd => Box::new(
                    zstd::stream::read::Decoder::with_buffer(input)
                        .context(|| format!("starting zstd decoder for {what}"))?,
                ),
                _ => gzip::decoder(input),
            };
            loop {
                let mut buf = recycled.try_recv().unwrap_or_default();
                buf.resize(DECOMPRESSED_CHUNK, 0);
                match decompressed.read(&mut buf) {
                    Ok(0) => return Ok(()),
                    Ok(n) => {
                        buf.truncate(n);
                        // The extractor stopped (an error, a limit): it reports why.
                        if to_hasher.send(Ok(buf)).is_err() {
                            return Ok(());
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        let _ = to_hasher.send(Err(io::Error::new(e.kind(), e.to_string())));
                        return Ok(());
                    }
                }
            }
        });
        // The diff_id, if the stream ended without an error (the inflater finished, or failed
        // before it sent anything: its own result says which).
        let hasher = scope.spawn(move || -> Option<String> {
            let mut hasher = Sha256::new();
            for chunk in from_inflater {
                let failed = chunk.is_err();
                if let Ok(data) = &chunk {
                    hasher.update(data);
                }
                if to_extractor.send(chunk).is_err() || failed {
                    return None;
                }
            }
            Some(format!("sha256:{}", hex::encode(hasher.finalize())))
        });
        let reader = ChannelReader { rx: from_hasher, recycle, current: Vec::new(), pos: 0 };
        // A thread of its own, which can have a umask of its own.
        let extractor = scope.spawn(move || {
            tree::clear_umask();
            extract_verified(reader, None, diff_id, root, options, what, writeback)
        });
        // The receiver is gone with the reader: a still-running hasher stops at its next send,
        // and the inflater at its own.
        let panicked = || Error::Unpack { layer: diff_id.to_string(), reason: "an unpacking thread panicked".into() };
        let result = extractor.join().unwrap_or_else(|_| Err(panicked()));
        let hashed = hasher.join().map_err(|_| panicked());
        let inflated = inflater.join().unwrap_or_else(|_| Err(panicked()));
        result?;
        inflated?;
        // The extractor read the stream to its end, so the hasher saw all of it.
        match hashed? {
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

/// Decompressed bytes handed from the inflating thread to the hashing one, then to the
/// extracting one.
const DECOMPRESSED_CHUNK: usize = 128 << 10;
/// At most this many chunks wait between two of them (2 MiB, 4 MiB in all): also how far
/// decompression can run past the size limit before the extractor notices.
const DECOMPRESSED_IN_FLIGHT: usize = 16;

/// The extracting side of [`unpack_stream`]'s threads.
struct ChannelReader {
    rx: std::sync::mpsc::Receiver<io::Result<Vec<u8>>>,
    /// Where chunks read to their end go back.
    recycle: std::sync::mpsc::Sender<Vec<u8>>,
    current: Vec<u8>,
    pos: usize,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.current.len() {
            match self.rx.recv() {
                Ok(Ok(chunk)) => {
                    let _ = self.recycle.send(std::mem::replace(&mut self.current, chunk));
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
/// hashes it). `diff_id` names the layer in messages. `writeback`: see [`unpack_stream`].
fn extract_verified(
    input: impl Read,
    check: Option<&str>,
    diff_id: &str,
    root: &Path,
    options: &UnpackOptions,
    what: &str,
    writeback: Option<&Writeback>,
) -> Result<(), Error> {
    let meter = Meter::new(options.max_unpacked_bytes);
    let mut metered = MeteredReader { inner: input, hasher: check.map(|_| Sha256::new()), meter: &meter };
    let stop_err = |stop: Stop| match stop {
        Stop::Invalid(reason) => Error::Unpack { layer: diff_id.to_string(), reason: elide(reason) },
        Stop::TooLarge(what) => {
            Error::LayerTooLarge { layer: diff_id.to_string(), limit: options.max_unpacked_bytes, what: elide(what) }
        }
    };

    let (extracted, synced) =
        with_writeback(writeback, |flush| extract(&mut tar::Archive::new(&mut metered), root, &meter, flush));
    extracted.map_err(stop_err)?;
    synced?;
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

/// Runs `extract` beside a thread that syncs `writeback`'s file system whenever `extract` calls
/// the `flush` it is given (one sync at a time: calls meanwhile are merged into the next). Returns
/// what `extract` returned, and whether every sync succeeded.
fn with_writeback<T>(writeback: Option<&Writeback>, extract: impl FnOnce(&dyn Fn()) -> T) -> (T, Result<(), Error>) {
    let Some(writeback) = writeback else {
        return (extract(&|| {}), Ok(()));
    };
    std::thread::scope(|scope| {
        let (nudge, nudged) = std::sync::mpsc::sync_channel::<()>(1);
        let syncer = scope.spawn(move || nudged.iter().try_for_each(|()| writeback.sync()));
        // The sender goes with the closure: the syncer stops once the last sync asked for is done.
        let extracted = extract(&move || {
            let _ = nudge.try_send(());
        });
        let synced = syncer.join().unwrap_or_else(|_| {
            Err(Error::io("syncing a layer as it is written", io::Error::other("the syncing thread panicked")))
        });
        (extracted, synced)
    })
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

/// File contents are copied through a buffer this large, filled before each write: most files
/// of a layer take one write(2).
const WRITE_CHUNK: usize = 256 << 10;

/// How much a layer writes between two background syncs (see [`unpack_stream`]).
const SYNC_EVERY: u64 = 16 << 20;

/// Extracts every entry; calls `flush` every [`SYNC_EVERY`] bytes written.
fn extract<R: Read>(archive: &mut tar::Archive<R>, root: &Path, meter: &Meter, flush: &dyn Fn()) -> Result<(), Stop> {
    let mut tree = Tree::open(root).map_err(Stop::Invalid)?;
    // Written since `flush` was last called: file data, and a block for each entry (its inode,
    // its name, the end of its data).
    let mut unsynced: u64 = 0;
    let mut buf = vec![0u8; WRITE_CHUNK];
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
        let name = || raw.display().to_string();

        let kind = entry.header().entry_type();
        if matches!(kind, tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse) {
            let size = sparse.as_ref().map_or_else(|| entry.size(), |s| s.real_size);
            file_bytes = file_bytes.saturating_add(size);
            if file_bytes > meter.limit {
                return Err(Stop::TooLarge(format!(
                    "entry {:?} declares {size} bytes, which brings its files over the limit",
                    name()
                )));
            }
        }
        extract_entry(&mut entry, &raw, &mut tree, &mut dir_times, sparse.as_ref(), &mut buf)
            .map_err(|e| meter.stop(format!("entry {:?}: {e}", name())))?;
        // Data the entry's kind does not use (a directory with a size, say) is skipped here, so
        // it counts as data, not as the next entry's headers.
        copy_data(&mut entry, &mut io::sink(), &mut buf)
            .map_err(|e| meter.stop(format!("entry {:?}: skipping its data: {e}", name())))?;
        unsynced = unsynced.saturating_add(entry.size()).saturating_add(4096);
        if unsynced >= SYNC_EVERY {
            flush();
            unsynced = 0;
        }
    }
    set_dir_times(&tree, &dir_times).map_err(Stop::Invalid)
}

fn extract_entry<R: Read>(
    entry: &mut tar::Entry<'_, R>,
    raw: &Path,
    tree: &mut Tree,
    dir_times: &mut DirTimes,
    sparse: Option<&PaxSparse>,
    buf: &mut [u8],
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
            apply_meta(&Node::Open(tree.root()), &meta, Made::default())?;
            tree.root_changed();
            dir_times.insert(Vec::new(), meta.mtime);
        }
        return Ok(());
    };
    let dir = tree.dir(parents)?;
    let at = dir.fd.as_raw_fd();
    // Who owns what we make in `dir`, if known: a chown to that owner can be skipped.
    let made_as = dir.new_owner.get();

    let last_str = last.to_string_lossy();
    if let Some(hidden) = last_str.strip_prefix(WHITEOUT_PREFIX) {
        if *last == OsStr::new(OPAQUE_MARKER) {
            let opened = open_at(at, OsStr::new("."), OFlag::O_RDONLY | OFlag::O_DIRECTORY, Mode::empty());
            return opened
                .map_err(io::Error::from)
                .and_then(|d| set_xattr(&Node::Open(d.as_raw_fd()), OVERLAY_OPAQUE_XATTR, b"y"))
                .map_err(|e| format!("marking {:?} opaque: {e}", tree::display(parents)));
        }
        if hidden.starts_with(WHITEOUT_PREFIX) {
            // Other ".wh..wh." names are AUFS bookkeeping (hard link dirs): nothing to unpack.
            tracing::debug!(path = %raw.display(), "skipping AUFS metadata entry");
            return Ok(());
        }
        if hidden.is_empty() || hidden == "." || hidden == ".." {
            return Err(format!("whiteout names nothing (hidden name {hidden:?})"));
        }
        let target = OsStr::from_bytes(&last.as_bytes()[WHITEOUT_PREFIX.len()..]);
        return tree.replace(&dir.fd, parents, target, "creating whiteout device", || {
            mknodat(Some(at), target, SFlag::S_IFCHR, Mode::empty(), makedev(0, 0))
        });
    }

    use tar::EntryType as T;
    // Pre-POSIX tars mark directories only by a trailing slash on a regular-file entry.
    let old_style_dir = kind == T::Regular && raw.as_os_str().as_bytes().ends_with(b"/");
    match kind {
        _ if old_style_dir || kind == T::Directory => {
            let made = tree.make_dir(&dir.fd, parents, last)?;
            let made = Made { owner: made_as.filter(|_| made), mode: None };
            apply_meta(&Node::at(tree, at, &components, false), &meta, made)?;
            dir_times.insert(components.clone(), meta.mtime);
        }
        T::Regular | T::Continuous | T::GNUSparse => {
            // O_EXCL + O_NOFOLLOW: we only ever write a file we just created. With its final
            // mode when that is exact and survives a chown (no setuid, setgid or sticky bit):
            // then no chmod.
            let made_mode = (tree.exact_modes() && meta.mode & 0o7000 == 0).then_some(meta.mode);
            let mode = Mode::from_bits_truncate(made_mode.unwrap_or(0o600));
            let flags = OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW;
            let fd = tree.replace(&dir.fd, parents, last, "creating file", || open_at(at, last, flags, mode))?;
            let mut file = File::from(fd);
            let size = sparse.map_or_else(|| entry.size(), |s| s.real_size);
            let written = match sparse {
                Some(s) => write_pax_sparse(entry, &mut file, s),
                None if kind == T::GNUSparse => write_sparse(entry, &mut file),
                None => copy_data(entry, &mut file, buf),
            }
            .map_err(|e| format!("writing file contents: {e}"))?;
            if written != size {
                return Err(format!("the layer stream ends inside this entry, after {written} of its {size} bytes"));
            }
            // On the file we hold, not by name: no lookup at all.
            let node = Node::Open(file.as_raw_fd());
            apply_meta(&node, &meta, Made { owner: made_as, mode: made_mode })?;
            set_mtime(&node, meta.mtime)?;
        }
        T::Symlink => {
            let target = entry
                .link_name()
                .map_err(|e| format!("unreadable symlink target: {e}"))?
                .ok_or("symlink without a target")?;
            // The target is data interpreted inside the container, never by us.
            tree.replace(&dir.fd, parents, last, "creating symlink", || {
                symlinkat(target.as_ref(), Some(at), last.as_os_str())
            })?;
            let node = Node::at(tree, at, &components, true);
            apply_meta(&node, &meta, Made { owner: made_as, mode: None })?;
            set_mtime(&node, meta.mtime)?;
        }
        T::Link => {
            let target = entry
                .link_name()
                .map_err(|e| format!("unreadable hardlink target: {e}"))?
                .ok_or("hardlink without a target")?;
            let refused = |why: String| format!("hardlink target {:?}: {why}", target.display());
            let target_components = sanitize(&target).map_err(refused)?;
            let Some((source_name, source_parents)) = target_components.split_last() else {
                return Err(refused("it is the layer root".into()));
            };
            // It must already be extracted in this layer, reached through real directories
            // only, and must not be a directory.
            let not_extracted = || refused("it has not been extracted (earlier in this layer)".into());
            let source_dir = match source_parents {
                [] => None,
                _ => Some(tree.existing_dir(source_parents).map_err(|e| match e {
                    Unreachable::Missing => not_extracted(),
                    Unreachable::NotDir { at, .. } => {
                        refused(format!("{:?} is not a real directory", tree::display(&source_parents[..=at])))
                    }
                    Unreachable::Failed { at, errno } => {
                        refused(format!("opening {:?}: {errno}", tree::display(&source_parents[..=at])))
                    }
                })?),
            };
            let source_at = source_dir.as_ref().map_or(tree.root(), AsRawFd::as_raw_fd);
            match fstatat(Some(source_at), source_name.as_os_str(), AtFlags::AT_SYMLINK_NOFOLLOW) {
                Ok(s) if s.st_mode & SFlag::S_IFMT.bits() == SFlag::S_IFDIR.bits() => {
                    return Err(refused("it is a directory".into()))
                }
                Ok(_) => {}
                Err(Errno::ENOENT) => return Err(not_extracted()),
                Err(e) => return Err(refused(e.to_string())),
            }
            if target_components == components {
                return Ok(());
            }
            // link(2) does not follow a symlink source: the link shares the symlink's inode.
            tree.replace(&dir.fd, parents, last, "creating hardlink", || {
                linkat(Some(source_at), source_name.as_os_str(), Some(at), last.as_os_str(), AtFlags::empty())
            })?;
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
            let dev = makedev(u64::from(major), u64::from(minor));
            tree.replace(&dir.fd, parents, last, "creating device node", || {
                mknodat(Some(at), last.as_os_str(), sflag, Mode::from_bits_truncate(0o600), dev)
            })?;
            let node = Node::at(tree, at, &components, false);
            apply_meta(&node, &meta, Made { owner: made_as, mode: None })?;
            set_mtime(&node, meta.mtime)?;
        }
        T::XGlobalHeader => {}
        other => {
            tracing::warn!(path = %raw.display(), kind = ?other, "skipping unsupported tar entry type");
        }
    }
    Ok(())
}

/// Copies an entry's data to `out` through `buf`, filling it before each write. Returns the
/// bytes copied. (`io::copy` would clear a buffer of its own at every call, once per entry.)
fn copy_data(entry: &mut impl Read, out: &mut impl Write, buf: &mut [u8]) -> io::Result<u64> {
    let mut total: u64 = 0;
    loop {
        let mut filled = 0;
        while filled < buf.len() {
            match entry.read(&mut buf[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        out.write_all(&buf[..filled])?;
        total += filled as u64;
        if filled < buf.len() {
            return Ok(total);
        }
    }
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
/// it is never needed in a well-formed layer and only serves to escape. As a path in the
/// container, it must fit in `PATH_MAX`: entries are created one directory at a time, which
/// would otherwise make paths no program could use.
pub(crate) fn sanitize(path: &Path) -> Result<Vec<OsString>, String> {
    let mut out = Vec::new();
    let mut len = 0;
    for c in path.components() {
        match c {
            Component::Normal(n) => {
                len += 1 + n.len();
                out.push(n.to_os_string())
            }
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
    if len >= MAX_PATH {
        return Err(format!(
            "{}: the path is {len} bytes long in the container, at most {} are accepted",
            Errno::ENAMETOOLONG.desc(),
            MAX_PATH - 1
        ));
    }
    Ok(out)
}

/// `PATH_MAX`, the terminating NUL included.
const MAX_PATH: usize = libc::PATH_MAX as usize;

/// Sets the recorded directory mtimes. A later entry may have replaced a directory, or one of its
/// parents, with a symlink or a file: each is opened again through real directories only, and
/// what is no longer a directory is skipped, so no time is ever set outside the root.
fn set_dir_times(tree: &Tree, dir_times: &DirTimes) -> Result<(), String> {
    for (components, mtime) in dir_times {
        if components.is_empty() {
            set_mtime(&Node::Open(tree.root()), *mtime)?;
            continue;
        }
        match tree.open_beneath(components, OFlag::O_RDONLY | OFlag::O_DIRECTORY) {
            Ok(dir) => set_mtime(&Node::Open(dir.as_raw_fd()), *mtime)?,
            Err(Errno::ENOENT | Errno::ENOTDIR | Errno::ELOOP) => {}
            Err(e) => return Err(format!("opening directory {:?} to set its mtime: {e}", tree::display(components))),
        }
    }
    Ok(())
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

/// Where an entry's metadata goes.
enum Node<'a> {
    /// A descriptor of the entry itself: a regular file we just wrote, a directory.
    Open(RawFd),
    /// The entry's name in its parent directory `dir`, never followed. Its path (`components`
    /// beneath the root) is only used for xattrs, which only a path reaches on a symlink or a
    /// device node.
    At { dir: RawFd, name: &'a OsStr, symlink: bool, tree: &'a Tree, components: &'a [OsString] },
}

impl<'a> Node<'a> {
    /// The entry `components` (not empty), in `dir`, its parent.
    fn at(tree: &'a Tree, dir: RawFd, components: &'a [OsString], symlink: bool) -> Node<'a> {
        let name = components.last().map_or(OsStr::new(""), |c| c.as_os_str());
        Node::At { dir, name, symlink, tree, components }
    }
}

/// What a node we just made already has, when we know it: no chown or chmod is needed when it
/// is what the layer wants.
#[derive(Clone, Copy, Default)]
struct Made {
    owner: Option<(u32, u32)>,
    mode: Option<u32>,
}

/// Owner first, then mode (chown clears setuid/setgid), then xattrs (chown also clears
/// `security.capability`).
fn apply_meta(node: &Node<'_>, meta: &Meta, made: Made) -> Result<(), String> {
    let uid = u32::try_from(meta.uid).map_err(|_| format!("uid {} out of range", meta.uid))?;
    let gid = u32::try_from(meta.gid).map_err(|_| format!("gid {} out of range", meta.gid))?;
    let (owner, group) = (Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid)));
    match node {
        _ if made.owner == Some((uid, gid)) => Ok(()),
        Node::Open(fd) => fchown(*fd, owner, group),
        Node::At { dir, name, .. } => fchownat(Some(*dir), *name, owner, group, AtFlags::AT_SYMLINK_NOFOLLOW),
    }
    .map_err(|e| format!("chown {uid}:{gid}: {e}"))?;
    let mode = Mode::from_bits_truncate(meta.mode);
    match node {
        _ if made.mode == Some(meta.mode) => Ok(()),
        Node::Open(fd) => fchmod(*fd, mode),
        Node::At { symlink: true, .. } => Ok(()),
        // Just created by us, or checked to be a real directory: nothing to follow.
        Node::At { dir, name, .. } => fchmodat(Some(*dir), *name, mode, FchmodatFlags::FollowSymlink),
    }
    .map_err(|e| format!("chmod {:o}: {e}", meta.mode))?;
    for (name, value) in &meta.xattrs {
        if name.starts_with(OVERLAY_XATTR_PREFIX) {
            tracing::warn!(xattr = %name, "ignoring overlay xattr from layer");
            continue;
        }
        set_xattr(node, name, value).map_err(|e| format!("setting xattr {name}: {e}"))?;
    }
    Ok(())
}

fn set_mtime(node: &Node<'_>, mtime: Mtime) -> Result<(), String> {
    let t = TimeSpec::new(mtime.secs, i64::from(mtime.nanos));
    match node {
        Node::Open(fd) => futimens(*fd, &t, &t),
        Node::At { dir, name, .. } => utimensat(Some(*dir), *name, &t, &t, UtimensatFlags::NoFollowSymlink),
    }
    .map_err(|e| format!("setting mtime: {e}"))
}

/// fsetxattr(2) on a descriptor, lsetxattr(2) on a path: never follows a symlink.
fn set_xattr(node: &Node<'_>, name: &str, value: &[u8]) -> io::Result<()> {
    let c_name =
        CString::new(name).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "xattr name contains NUL"))?;
    let rc = match node {
        // SAFETY: `c_name` is a NUL-terminated CString that outlives the call, and `value` is a
        // valid slice whose pointer and length are passed together.
        Node::Open(fd) => unsafe { libc::fsetxattr(*fd, c_name.as_ptr(), value.as_ptr().cast(), value.len(), 0) },
        Node::At { tree, components, .. } => {
            let path = tree.path_of(components);
            let c_path = CString::new(path.as_os_str().as_bytes())
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))?;
            // SAFETY: both strings are NUL-terminated CStrings that outlive the call, and `value`
            // is a valid slice whose pointer and length are passed together.
            unsafe { libc::lsetxattr(c_path.as_ptr(), c_name.as_ptr(), value.as_ptr().cast(), value.len(), 0) }
        }
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
#[path = "unpack_tests.rs"]
mod tests;
