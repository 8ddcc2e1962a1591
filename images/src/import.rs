//! Reading image archives for hosts without registry access: `docker save` tarballs (the classic
//! `manifest.json` layout, and Docker 25's OCI layout inside the tar), OCI image layout
//! directories and OCI archives (a layout in a tar). This module finds the images, their names,
//! manifests and configs, checking every digest the format has; the store then unpacks the layers
//! it lists ([`crate::ImageStore::import`]).
//!
//! A tar is never extracted by its member names: it is indexed once (name → offset and size) and
//! members are read in place, so a hostile member name (`../x`, `/etc/x`) cannot write anything;
//! such names, and symlinks between members that leave the archive, are refused outright.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Component, Path, PathBuf};

use oci_client::manifest::{ImageIndexEntry, OciImageIndex, OciImageManifest};
use oci_spec::image::ImageConfiguration;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::error::IoContext;
use crate::registry::{host_platform, select_platform};
use crate::unpack::{digest_hex, Compression, ExpectedBlob};
use crate::{Error, Reference};

/// Manifests, indexes and configs are a few KiB; anything this large is not one.
const MAX_JSON_SIZE: u64 = 16 << 20;
/// Symlinks followed from one archive member to another before giving up (a loop).
const MAX_LINK_HOPS: usize = 16;
/// Indexes nested in indexes followed before giving up.
const MAX_INDEX_DEPTH: usize = 4;

/// containerd's (and Docker 25's) annotation with an image's full name.
const CONTAINERD_NAME: &str = "io.containerd.image.name";
/// OCI's annotation naming a manifest in a layout: a tag, or a full reference.
const OCI_REF_NAME: &str = "org.opencontainers.image.ref.name";

/// An archive opened for import: a directory or an indexed tar.
#[derive(Debug)]
pub(crate) struct Archive {
    source: Source,
    /// The path as given, for messages.
    display: String,
}

#[derive(Debug)]
enum Source {
    Dir(PathBuf),
    Tar { file: PathBuf, members: HashMap<String, Member> },
}

#[derive(Debug, Clone)]
enum Member {
    File {
        offset: u64,
        size: u64,
    },
    /// A symlink or hardlink to another member, by its normalised name.
    Link(String),
}

/// One image found in an archive, verified up to (not including) its layers.
#[derive(Debug)]
pub(crate) struct PlannedImage {
    /// Names to record it under (at least one).
    pub(crate) references: Vec<Reference>,
    /// Manifest digest; for a classic `docker save` archive, which has no manifest, the config
    /// digest (Docker's image ID).
    pub(crate) digest: String,
    pub(crate) config_digest: String,
    pub(crate) config_bytes: Vec<u8>,
    pub(crate) config: ImageConfiguration,
    /// Bottom first.
    pub(crate) layers: Vec<PlannedLayer>,
    /// Sum of the layer blobs' sizes.
    pub(crate) size: u64,
}

/// A layer to unpack: which member holds it and what it must hash to.
#[derive(Debug, Clone)]
pub(crate) struct PlannedLayer {
    pub(crate) member: String,
    pub(crate) blob: Option<ExpectedBlob>,
    /// `None`: sniffed from the first bytes (`docker save` layers have no media type).
    pub(crate) compression: Option<Compression>,
    pub(crate) diff_id: String,
}

/// A name an archive gives an image.
#[derive(Debug, Clone)]
enum Name {
    Full(Reference),
    /// Only a tag (an OCI layout's `ref.name` is often just `latest`): no repository to record.
    Tag(String),
}

/// An image found, with the names the archive gives it, before names are settled.
struct Candidate {
    names: Vec<Name>,
    image: PlannedImage,
}

/// One entry of a classic `docker save` `manifest.json`.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerManifestEntry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

impl Archive {
    /// Opens `path`: a directory is read as it is, a file is indexed as a tar.
    pub(crate) fn open(path: &Path) -> Result<Archive, Error> {
        let display = path.display().to_string();
        let meta = std::fs::metadata(path).context(|| format!("opening image archive {display}"))?;
        let source = if meta.is_dir() {
            Source::Dir(path.to_path_buf())
        } else {
            let members = index_tar(path, meta.len(), &display)?;
            Source::Tar { file: path.to_path_buf(), members }
        };
        Ok(Archive { source, display })
    }

    /// The path as given, for messages.
    pub(crate) fn display(&self) -> &str {
        &self.display
    }

    pub(crate) fn invalid(&self, reason: impl Into<String>) -> Error {
        Error::InvalidArchive { archive: self.display.clone(), reason: reason.into() }
    }

    /// Rewords an error about the archive's content (a layer that does not unpack or does not
    /// hash to its digest) as the archive's fault; others (our disk) pass unchanged.
    pub(crate) fn content_error(&self, e: Error) -> Error {
        match e {
            Error::Unpack { layer, reason } => self.invalid(format!("layer {layer}: {reason}")),
            Error::DigestMismatch { what, expected, actual } => self.invalid(format!(
                "{what}: expected digest {expected}, found {actual}; the archive is corrupt or was altered"
            )),
            other => other,
        }
    }

    fn exists(&self, name: &str) -> bool {
        match &self.source {
            Source::Dir(root) => root.join(name).is_file(),
            Source::Tar { members, .. } => self.resolve(members, name).is_ok(),
        }
    }

    /// Follows links from member `name` to a file member: (offset, size).
    fn resolve(&self, members: &HashMap<String, Member>, name: &str) -> Result<(u64, u64), Error> {
        let mut current = name.to_string();
        for _ in 0..MAX_LINK_HOPS {
            match members.get(&current) {
                None => return Err(self.invalid(format!("{name:?} is missing from the archive"))),
                Some(Member::File { offset, size }) => return Ok((*offset, *size)),
                Some(Member::Link(target)) => current = target.clone(),
            }
        }
        Err(self.invalid(format!("{name:?} is a link that does not lead to a file within {MAX_LINK_HOPS} hops")))
    }

    /// Opens member `name` (already normalised): its reader and its size.
    pub(crate) fn open_member(&self, name: &str) -> Result<(Box<dyn Read + Send>, u64), Error> {
        match &self.source {
            Source::Dir(root) => {
                let path = root.join(name);
                let file = File::open(&path).map_err(|e| match e.kind() {
                    io::ErrorKind::NotFound => self.invalid(format!("{name:?} is missing from the layout")),
                    _ => Error::io(format!("opening {}", path.display()), e),
                })?;
                let meta = file.metadata().context(|| format!("inspecting {}", path.display()))?;
                if !meta.is_file() {
                    return Err(self.invalid(format!("{name:?} is not a regular file")));
                }
                Ok((Box::new(file), meta.len()))
            }
            Source::Tar { file, members } => {
                let (offset, size) = self.resolve(members, name)?;
                let mut f = File::open(file).context(|| format!("opening {}", file.display()))?;
                f.seek(SeekFrom::Start(offset)).context(|| format!("reading {}", file.display()))?;
                Ok((Box::new(f.take(size)), size))
            }
        }
    }

    /// Reads a small member (JSON) whole, refusing anything over [`MAX_JSON_SIZE`].
    fn read_small(&self, name: &str) -> Result<Vec<u8>, Error> {
        let (reader, size) = self.open_member(name)?;
        if size > MAX_JSON_SIZE {
            return Err(
                self.invalid(format!("{name:?} is {size} bytes; expected a JSON document of at most {MAX_JSON_SIZE}"))
            );
        }
        let mut buf = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
        reader.take(MAX_JSON_SIZE).read_to_end(&mut buf).context(|| format!("reading {name} in {}", self.display))?;
        if (buf.len() as u64) < size {
            return Err(self.invalid(format!("{name:?} is truncated: {} of its {size} bytes are there", buf.len())));
        }
        Ok(buf)
    }

    /// Reads blob `digest` from `blobs/sha256/`, checking its digest and (if declared) size.
    fn read_blob(&self, digest: &str, size: Option<i64>, what: &str) -> Result<Vec<u8>, Error> {
        let name = blob_member(digest).ok_or_else(|| {
            self.invalid(format!("{what} digest {digest:?} is not \"sha256:\" followed by 64 lowercase hex digits"))
        })?;
        let bytes = self.read_small(&name)?;
        if let Some(size) = size.filter(|s| u64::try_from(*s).ok() != Some(bytes.len() as u64)) {
            return Err(
                self.invalid(format!("{what} {digest} is {} bytes but its descriptor declares {size}", bytes.len()))
            );
        }
        let actual = sha256(&bytes);
        if actual != digest {
            return Err(self.invalid(format!(
                "{what}: expected digest {digest}, found {actual}; the archive is corrupt or was altered"
            )));
        }
        Ok(bytes)
    }

    fn parse_json<T: serde::de::DeserializeOwned>(&self, bytes: &[u8], what: &str) -> Result<T, Error> {
        serde_json::from_slice(bytes).map_err(|e| self.invalid(format!("{what} is not valid: {e}")))
    }

    /// Finds the images to import and their names: the archive's own, or `name` (which needs an
    /// archive holding a single image).
    pub(crate) fn plan(&self, name: Option<&Reference>) -> Result<Vec<PlannedImage>, Error> {
        let candidates = if self.exists("index.json") {
            self.oci_candidates()?
        } else if self.exists("manifest.json") {
            self.docker_candidates()?
        } else {
            return Err(self.invalid(
                "it has neither index.json (OCI image layout or archive) nor manifest.json (`docker save`) at its \
                 top level; expected a `docker save` tarball, an OCI image layout directory or an OCI archive",
            ));
        };
        self.settle_names(candidates, name)
    }

    fn settle_names(&self, candidates: Vec<Candidate>, name: Option<&Reference>) -> Result<Vec<PlannedImage>, Error> {
        if candidates.is_empty() {
            return Err(self.invalid("it lists no image"));
        }
        if let Some(name) = name {
            if candidates.len() > 1 {
                let digests: Vec<&str> = candidates.iter().map(|c| c.image.digest.as_str()).collect();
                return Err(self.invalid(format!(
                    "it holds {} images ({}); a name can only be given to an archive holding one image. Import it \
                     without a name to use the names it gives its images",
                    candidates.len(),
                    digests.join(", ")
                )));
            }
            return Ok(candidates
                .into_iter()
                .map(|mut c| {
                    c.image.references = vec![name.clone()];
                    c.image
                })
                .collect());
        }
        let total = candidates.len();
        let mut out = Vec::new();
        let mut unnamed = Vec::new();
        for mut c in candidates {
            let mut references: Vec<Reference> = Vec::new();
            let mut tags = Vec::new();
            for n in c.names {
                match n {
                    Name::Full(r) if !references.contains(&r) => references.push(r),
                    Name::Full(_) => {}
                    Name::Tag(t) => tags.push(t),
                }
            }
            if references.is_empty() {
                unnamed.push((c.image.digest.clone(), tags));
                continue;
            }
            c.image.references = references;
            out.push(c.image);
        }
        if out.is_empty() {
            let (digest, tags) = &unnamed[0];
            let hint = if tags.is_empty() {
                "it gives the image no name (no RepoTags, no org.opencontainers.image.ref.name)".to_string()
            } else {
                format!("it names the image only by tag ({}), without a repository", tags.join(", "))
            };
            let what = if total == 1 { format!("image {digest}") } else { format!("{total} images") };
            return Err(self.invalid(format!("{hint}; give a name to import {what} under (e.g. myapp:1.0)")));
        }
        for (digest, _) in unnamed {
            tracing::warn!(archive = %self.display, %digest, "skipping an image the archive gives no name");
        }
        Ok(out)
    }

    /// Classic `docker save`: `manifest.json` lists each image's config and layer tars.
    fn docker_candidates(&self) -> Result<Vec<Candidate>, Error> {
        let entries: Vec<DockerManifestEntry> = self.parse_json(&self.read_small("manifest.json")?, "manifest.json")?;
        let mut out = Vec::new();
        for entry in entries {
            let config_member = normalize(Path::new(&entry.config))
                .map_err(|e| self.invalid(format!("manifest.json names config {:?}: {e}", entry.config)))?;
            let config_bytes = self.read_small(&config_member)?;
            let config_digest = sha256(&config_bytes);
            // Docker names the config by its digest (`<hex>.json`, or `blobs/sha256/<hex>`).
            if let Some(claimed) = hex_in_name(&config_member) {
                if config_digest[7..] != *claimed {
                    return Err(self.invalid(format!(
                        "config {config_member:?}: expected digest sha256:{claimed}, found {config_digest}; the \
                         archive is corrupt or was altered"
                    )));
                }
            }
            let config: ImageConfiguration = self.parse_json(&config_bytes, &format!("config {config_member:?}"))?;
            let diff_ids = config.rootfs().diff_ids().clone();
            if diff_ids.len() != entry.layers.len() {
                return Err(self.invalid(format!(
                    "manifest.json lists {} layers for config {config_member:?}, which lists {} diff_ids",
                    entry.layers.len(),
                    diff_ids.len()
                )));
            }
            let mut layers = Vec::new();
            let mut size: u64 = 0;
            for (member, diff_id) in entry.layers.iter().zip(diff_ids) {
                let member = normalize(Path::new(member))
                    .map_err(|e| self.invalid(format!("manifest.json names layer {member:?}: {e}")))?;
                check_diff_id(self, &diff_id)?;
                let (_, len) = self.open_member(&member)?;
                size = size.saturating_add(len);
                // Docker 25 names layers by blob digest; older versions by a v1 id (no digest).
                let blob = blob_digest_of_member(&member).map(|digest| ExpectedBlob { digest, size: Some(len) });
                layers.push(PlannedLayer { member, blob, compression: None, diff_id });
            }
            let names = entry
                .repo_tags
                .unwrap_or_default()
                .iter()
                .map(|t| {
                    Reference::parse(t)
                        .map(Name::Full)
                        .map_err(|e| self.invalid(format!("manifest.json tags an image {t:?}: {e}")))
                })
                .collect::<Result<Vec<_>, _>>()?;
            out.push(Candidate {
                names,
                image: PlannedImage {
                    references: Vec::new(),
                    digest: config_digest.clone(),
                    config_digest,
                    config_bytes,
                    config,
                    layers,
                    size,
                },
            });
        }
        Ok(out)
    }

    /// OCI layout (a directory, an OCI archive, or Docker 25's `docker save`): `index.json` lists
    /// manifests or indexes, named by annotations. Entries with the same name are one image in
    /// several platforms.
    fn oci_candidates(&self) -> Result<Vec<Candidate>, Error> {
        let index: OciImageIndex = self.parse_json(&self.read_small("index.json")?, "index.json")?;
        // Docker 25 also writes manifest.json: its RepoTags name images its index.json may not.
        let docker_tags = self.docker_tags_by_config();
        let mut groups: BTreeMap<Option<String>, Vec<ImageIndexEntry>> = BTreeMap::new();
        for entry in index.manifests {
            groups.entry(annotated_name(&entry)).or_default().push(entry);
        }
        let mut out: Vec<Candidate> = Vec::new();
        for (raw_name, entries) in groups {
            let label = raw_name.clone().unwrap_or_else(|| self.display.clone());
            let (digest, manifest) = self.resolve_entries(&entries, &label, 0, true)?;
            let mut names = Vec::new();
            if let Some(raw) = &raw_name {
                names.push(
                    parse_name(raw).map_err(|e| self.invalid(format!("index.json names an image {raw:?}: {e}")))?,
                );
            }
            if let Some(tags) = docker_tags.get(&manifest.config.digest) {
                names.extend(tags.iter().filter_map(|t| Reference::parse(t).ok()).map(Name::Full));
            }
            if let Some(c) = out.iter_mut().find(|c| c.image.digest == digest) {
                c.names.extend(names);
                continue;
            }
            let image = self.oci_image(digest, &manifest)?;
            out.push(Candidate { names, image });
        }
        Ok(out)
    }

    /// `RepoTags` of a Docker 25 `manifest.json`, by config digest; empty when there is none or
    /// it cannot be read (index.json is what counts).
    fn docker_tags_by_config(&self) -> HashMap<String, Vec<String>> {
        let Ok(bytes) = self.read_small("manifest.json") else {
            return HashMap::new();
        };
        let Ok(entries) = serde_json::from_slice::<Vec<DockerManifestEntry>>(&bytes) else {
            return HashMap::new();
        };
        entries
            .into_iter()
            .filter_map(|e| {
                let digest = blob_digest_of_member(&normalize(Path::new(&e.config)).ok()?)?;
                Some((digest, e.repo_tags.unwrap_or_default()))
            })
            .collect()
    }

    /// Picks the entry for this host among `entries` (one image in several platforms) and follows
    /// nested indexes down to an image manifest, as a pull does. At the top of a layout a lone
    /// entry is taken as it is (layouts rarely annotate platforms there).
    fn resolve_entries(
        &self,
        entries: &[ImageIndexEntry],
        label: &str,
        depth: usize,
        top: bool,
    ) -> Result<(String, OciImageManifest), Error> {
        if depth > MAX_INDEX_DEPTH {
            return Err(self.invalid(format!("{label}: indexes nested more than {MAX_INDEX_DEPTH} deep")));
        }
        let chosen = match entries {
            [] => return Err(self.invalid(format!("{label}: an index lists no manifest"))),
            [only] if top => only,
            _ => {
                if entries.iter().all(|e| e.platform.is_none()) {
                    return Err(self.invalid(format!(
                        "{label}: {} manifests without platform or name; cannot tell which one to import",
                        entries.len()
                    )));
                }
                let (arch, variant) = host_platform();
                let digest =
                    select_platform(entries, arch, variant).map_err(|available| Error::NoMatchingPlatform {
                        reference: label.to_string(),
                        wanted: match variant {
                            Some(v) => format!("linux/{arch}/{v}"),
                            None => format!("linux/{arch}"),
                        },
                        available,
                    })?;
                entries.iter().find(|e| e.digest == digest).unwrap_or(&entries[0])
            }
        };
        let bytes = self.read_blob(&chosen.digest, Some(chosen.size), "manifest")?;
        let value: serde_json::Value = self.parse_json(&bytes, &format!("manifest {}", chosen.digest))?;
        if value.get("manifests").is_some() {
            let index: OciImageIndex = self.parse_json(&bytes, &format!("index {}", chosen.digest))?;
            return self.resolve_entries(&index.manifests, label, depth + 1, false);
        }
        let manifest: OciImageManifest = self.parse_json(&bytes, &format!("manifest {}", chosen.digest))?;
        Ok((chosen.digest.clone(), manifest))
    }

    fn oci_image(&self, digest: String, manifest: &OciImageManifest) -> Result<PlannedImage, Error> {
        let config_digest = manifest.config.digest.clone();
        let config_bytes = self.read_blob(&config_digest, Some(manifest.config.size), "config")?;
        let config: ImageConfiguration = self.parse_json(&config_bytes, &format!("config {config_digest}"))?;
        let diff_ids = config.rootfs().diff_ids().clone();
        if diff_ids.len() != manifest.layers.len() {
            return Err(self.invalid(format!(
                "manifest {digest} lists {} layers but its config lists {} diff_ids",
                manifest.layers.len(),
                diff_ids.len()
            )));
        }
        let mut layers = Vec::new();
        let mut size: u64 = 0;
        for (desc, diff_id) in manifest.layers.iter().zip(diff_ids) {
            check_diff_id(self, &diff_id)?;
            let compression = Compression::from_media_type(&desc.media_type).ok_or_else(|| {
                self.invalid(format!(
                    "layer {} has media type {:?}; expected a tar, tar+gzip or tar+zstd layer",
                    desc.digest, desc.media_type
                ))
            })?;
            let member = blob_member(&desc.digest).ok_or_else(|| {
                self.invalid(format!(
                    "layer digest {:?} is not \"sha256:\" followed by 64 lowercase hex digits",
                    desc.digest
                ))
            })?;
            let declared = u64::try_from(desc.size)
                .map_err(|_| self.invalid(format!("layer {} declares a negative size", desc.digest)))?;
            size = size.saturating_add(declared);
            layers.push(PlannedLayer {
                member,
                blob: Some(ExpectedBlob { digest: desc.digest.clone(), size: Some(declared) }),
                compression: Some(compression),
                diff_id,
            });
        }
        Ok(PlannedImage { references: Vec::new(), digest, config_digest, config_bytes, config, layers, size })
    }
}

fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

fn check_diff_id(archive: &Archive, diff_id: &str) -> Result<(), Error> {
    match digest_hex(diff_id) {
        Some(_) => Ok(()),
        None => {
            Err(archive.invalid(format!("diff_id {diff_id:?} is not \"sha256:\" followed by 64 lowercase hex digits")))
        }
    }
}

/// `blobs/sha256/<hex>` for a well-formed sha256 digest.
fn blob_member(digest: &str) -> Option<String> {
    digest_hex(digest).map(|hex| format!("blobs/sha256/{hex}"))
}

/// `sha256:<hex>` when a member is named `blobs/sha256/<hex>`.
fn blob_digest_of_member(member: &str) -> Option<String> {
    let hex = member.strip_prefix("blobs/sha256/")?;
    let digest = format!("sha256:{hex}");
    digest_hex(&digest).is_some().then_some(digest)
}

/// The 64-hex digest a `docker save` config's name carries (`<hex>.json`, `blobs/sha256/<hex>`).
fn hex_in_name(member: &str) -> Option<&str> {
    let file = member.rsplit('/').next()?;
    let hex = file.strip_suffix(".json").unwrap_or(file);
    digest_hex(&format!("sha256:{hex}")).is_some().then_some(hex)
}

/// The name an index entry gives its image: containerd's full name first, then OCI's ref.name.
fn annotated_name(entry: &ImageIndexEntry) -> Option<String> {
    let annotations = entry.annotations.as_ref()?;
    annotations.get(CONTAINERD_NAME).or_else(|| annotations.get(OCI_REF_NAME)).filter(|n| !n.is_empty()).cloned()
}

/// A ref.name is a full reference when it has a repository part (`/`), a tag after a name (`:`)
/// or a digest (`@`); otherwise it is only a tag, as skopeo and Docker write it (`latest`).
fn parse_name(raw: &str) -> Result<Name, Error> {
    if raw.contains(['/', ':', '@']) {
        Reference::parse(raw).map(Name::Full)
    } else {
        Ok(Name::Tag(raw.to_string()))
    }
}

/// A member name as a path relative to the archive root (`./a/b` → `a/b`). `..` and absolute
/// names are refused: no legitimate image archive has them, and they only serve to escape.
pub(crate) fn normalize(path: &Path) -> Result<String, String> {
    let mut out: Vec<&str> = Vec::new();
    for c in path.components() {
        match c {
            Component::Normal(n) => out.push(n.to_str().ok_or("the name is not UTF-8")?),
            Component::CurDir => {}
            Component::ParentDir => {
                return Err("it contains \"..\"; archive members must stay inside the archive".into())
            }
            Component::RootDir | Component::Prefix(_) => {
                return Err("it is absolute; archive members are named relative to the archive".into())
            }
        }
    }
    Ok(out.join("/"))
}

/// Where a symlink member at `member` with target `target` points, as a member name; `..` may
/// climb within the archive but not out of it.
fn link_target(member: &str, target: &Path) -> Result<String, String> {
    let mut out: Vec<String> = member.split('/').map(str::to_string).collect();
    out.pop();
    for c in target.components() {
        match c {
            Component::Normal(n) => out.push(n.to_str().ok_or("the target is not UTF-8")?.to_string()),
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop().ok_or("its target leaves the archive")?;
            }
            Component::RootDir | Component::Prefix(_) => return Err("its target is absolute".into()),
        }
    }
    Ok(out.join("/"))
}

/// Reads the tar's headers once: every file member's data offset and size, and links between
/// members. Refuses hostile names, links that leave the archive, and members the file is too
/// short to hold (a truncated archive).
fn index_tar(path: &Path, len: u64, display: &str) -> Result<HashMap<String, Member>, Error> {
    let invalid = |reason: String| Error::InvalidArchive { archive: display.to_string(), reason };
    let mut file = File::open(path).context(|| format!("opening image archive {display}"))?;
    let mut magic = [0u8; 6];
    let n = read_up_to(&mut file, &mut magic).context(|| format!("reading {display}"))?;
    let compressed = match &magic[..n] {
        [0x1f, 0x8b, ..] => Some("gzip"),
        [0x28, 0xb5, 0x2f, 0xfd, ..] => Some("zstd"),
        [0xfd, b'7', b'z', b'X', b'Z', 0] => Some("xz"),
        [b'B', b'Z', b'h', ..] => Some("bzip2"),
        _ => None,
    };
    if let Some(kind) = compressed {
        return Err(invalid(format!(
            "it is {kind}-compressed; decompress it first (e.g. `{} {display}`) and import the plain tar",
            match kind {
                "gzip" => "gunzip -k",
                "zstd" => "zstd -d",
                "xz" => "xz -dk",
                _ => "bunzip2 -k",
            }
        )));
    }
    file.seek(SeekFrom::Start(0)).context(|| format!("reading {display}"))?;
    let mut archive = tar::Archive::new(file);
    let mut members = HashMap::new();
    let entries = archive.entries_with_seek().map_err(|e| invalid(format!("it is not a tar archive: {e}")))?;
    for entry in entries {
        let entry = entry.map_err(|e| invalid(format!("it is not a valid tar archive (or is truncated): {e}")))?;
        let raw = entry.path().map_err(|e| invalid(format!("a member has an unreadable name: {e}")))?.into_owned();
        let name = normalize(&raw).map_err(|e| invalid(format!("member {:?}: {e}", raw.display())))?;
        use tar::EntryType as T;
        let kind = entry.header().entry_type();
        let member = match kind {
            T::Regular | T::Continuous => {
                let offset = entry.raw_file_position();
                let size = entry.size();
                if offset.checked_add(size).is_none_or(|end| end > len) {
                    return Err(invalid(format!(
                        "it is truncated: member {name:?} needs {size} bytes from offset {offset}, but the file has {len}"
                    )));
                }
                Member::File { offset, size }
            }
            T::Symlink | T::Link => {
                let target = entry
                    .link_name()
                    .map_err(|e| invalid(format!("member {name:?}: unreadable link target: {e}")))?
                    .ok_or_else(|| invalid(format!("member {name:?}: link without a target")))?;
                let resolved = if kind == T::Symlink { link_target(&name, &target) } else { normalize(&target) }
                    .map_err(|e| invalid(format!("member {name:?} links to {:?}: {e}", target.display())))?;
                Member::Link(resolved)
            }
            _ => continue,
        };
        if name.is_empty() {
            return Err(invalid("a member names the archive root itself as a file".into()));
        }
        members.insert(name, member);
    }
    Ok(members)
}

fn read_up_to(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn member_names() {
        assert_eq!(normalize(Path::new("./a/./b")).unwrap(), "a/b");
        assert!(normalize(Path::new("../x")).is_err());
        assert!(normalize(Path::new("a/../../x")).is_err());
        assert!(normalize(Path::new("/etc/passwd")).is_err());
        assert_eq!(link_target("abc/layer.tar", Path::new("../def/layer.tar")).unwrap(), "def/layer.tar");
        assert!(link_target("abc/layer.tar", Path::new("../../x")).is_err());
        assert!(link_target("abc/layer.tar", Path::new("/x")).is_err());
    }

    #[test]
    fn ref_names() {
        assert!(matches!(parse_name("latest").unwrap(), Name::Tag(t) if t == "latest"));
        match parse_name("busybox:1").unwrap() {
            Name::Full(r) => assert_eq!(r.to_string(), "docker.io/library/busybox:1"),
            Name::Tag(t) => panic!("tag {t}"),
        }
        assert!(parse_name("Bad Name:1").is_err());
        let hex = "a".repeat(64);
        assert_eq!(hex_in_name(&format!("{hex}.json")), Some(hex.as_str()));
        assert_eq!(hex_in_name(&format!("blobs/sha256/{hex}")), Some(hex.as_str()));
        assert_eq!(hex_in_name("config.json"), None);
        assert_eq!(blob_digest_of_member(&format!("blobs/sha256/{hex}")), Some(format!("sha256:{hex}")));
        assert_eq!(blob_digest_of_member("abc/layer.tar"), None);
    }
}
