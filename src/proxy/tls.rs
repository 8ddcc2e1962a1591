//! Certificates for TLS termination: read from one directory, chosen per handshake by the client's
//! SNI, and reloaded in place (on demand or by a polling thread) without restarting a listener.
//!
//! # Directory layout
//!
//! - `NAME.crt` + `NAME.key`: the chain (the server's own certificate first, then intermediates)
//!   and its private key.
//! - `NAME.pem`: chain and key in one file; a `NAME.key` beside it, if any, supplies the key instead.
//! - `NAME/fullchain.pem` + `NAME/privkey.pem`: certbot's layout, so that `/etc/letsencrypt/live`
//!   can be used as it is (its symbolic links are followed).
//!
//! Names starting with `.` are skipped, and so are other files (certbot's `README`) and
//! subdirectories holding neither file. `NAME` (`NAME/` for a subdirectory) only labels the source in
//! logs and reports: the host names a certificate serves are the DNS names of its subjectAltName,
//! wildcards (`*.example.com`) included; its subject CN is ignored, as browsers ignore it. Private
//! keys are PEM, unencrypted: PKCS#8 (`PRIVATE KEY`), PKCS#1 (`RSA PRIVATE KEY`) or SEC1
//! (`EC PRIVATE KEY`). A key file open to others than its owner and group (beyond 0640) is used, with
//! a warning.
//!
//! # Which certificate a handshake gets
//!
//! 1. One naming the SNI host exactly.
//! 2. Else a wildcard covering it, one label deep as browsers match: `*.example.com` covers
//!    `a.example.com`, neither `example.com` nor `a.b.example.com`.
//! 3. Else (no SNI, or a name nothing covers) the default certificate, as nginx answers with its
//!    default server: the source named `default` (`default.pem`, `default.crt` + `default.key` or
//!    `default/`) if there is one, otherwise the first source in name order (the directory's before
//!    those [`CertStore::insert`]ed). The client's name check then fails, which says more than a
//!    refused handshake. With no certificate loaded at all, handshakes are refused.
//!
//! Where several certificates name one host (an RSA and an ECDSA one, an old and a renewed one), the
//! one expiring last among those the client can verify the signature of is served.
//!
//! # Reloading
//!
//! [`CertStore::reload`] reads the whole directory again and swaps the new set in at once: a handshake
//! in progress keeps the certificate it was given. A source that fails to load (a half-written
//! renewal, a corrupt file, a key that does not match) keeps serving what it served before, and is
//! listed in the report; a source whose files are gone is dropped. An expired certificate is still
//! served, with a warning.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use arc_swap::ArcSwap;
use chrono::{DateTime, Utc};
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{InconsistentKeys, ServerConfig, SignatureScheme};
use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Larger than any certificate chain or key; bounds what a stray file makes us read.
const MAX_PEM_BYTES: u64 = 1 << 20;
/// The source whose certificate answers handshakes that nothing else matches.
const DEFAULT_SOURCE: &str = "default";
/// The watch thread never polls faster than this, whatever it is asked.
const MIN_WATCH_INTERVAL: Duration = Duration::from_millis(10);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read the certificate directory {}: {err}; check the path and its permissions", dir.display())]
    Dir {
        dir: PathBuf,
        #[source]
        err: io::Error,
    },
    #[error("certificate from {origin}: {reason}")]
    #[allow(dead_code)] // returned by `insert`
    Certificate { origin: String, reason: String },
}

/// What one `load` or `reload` did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReloadReport {
    /// Sources read successfully in this pass, in name order.
    pub loaded: Vec<LoadedCert>,
    /// Sources that could not be used, in name order.
    pub failed: Vec<FailedCert>,
    /// Sources served before whose files are gone.
    pub removed: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadedCert {
    /// `NAME` for `NAME.crt`/`NAME.pem`, `NAME/` for a certbot directory.
    pub source: String,
    /// The DNS names of its subjectAltName, lower case.
    pub names: Vec<String>,
    /// Its notAfter; `None` if the date could not be read (the handshake's verifier still checks it).
    pub not_after: Option<DateTime<Utc>>,
    pub expired: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailedCert {
    pub source: String,
    pub error: String,
    /// The certificate this source served before the failed attempt is still served.
    pub kept_previous: bool,
}

impl fmt::Display for ReloadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let loaded: Vec<String> =
            self.loaded.iter().map(|c| format!("{} ({})", c.source, c.names.join(", "))).collect();
        write!(f, "{} loaded", self.loaded.len())?;
        if !loaded.is_empty() {
            write!(f, ": {}", loaded.join("; "))?;
        }
        for failed in &self.failed {
            let kept = if failed.kept_previous { ", previous certificate kept" } else { "" };
            write!(f, "; {} failed{kept}: {}", failed.source, failed.error)?;
        }
        if !self.removed.is_empty() {
            write!(f, "; removed: {}", self.removed.join(", "))?;
        }
        Ok(())
    }
}

/// Certificates for TLS termination, by server name, read from a directory and reloaded in place.
pub struct CertStore {
    dir: PathBuf,
    provider: Arc<CryptoProvider>,
    /// What handshakes read, lock-free; rebuilt whole and swapped by whoever holds `state`.
    index: ArcSwap<Index>,
    /// Reloads, inserts and the watch thread take turns here; handshakes never wait on it.
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    from_dir: BTreeMap<String, Arc<Served>>,
    inserted: BTreeMap<String, Arc<Served>>,
    /// The directory as the last reload found it; the watch thread compares against it.
    seen: Option<Fingerprint>,
    /// The watch thread's last problem, so that a lasting one is logged once, not at every poll.
    watch_error: Option<String>,
}

/// One certificate chain with its key, as one source supplied it.
struct Served {
    source: String,
    key: Arc<CertifiedKey>,
    names: Vec<String>,
    not_after: Option<DateTime<Utc>>,
}

impl Served {
    fn expired(&self) -> bool {
        self.not_after.is_some_and(|t| t < Utc::now())
    }

    fn report(&self) -> LoadedCert {
        LoadedCert {
            source: self.source.clone(),
            names: self.names.clone(),
            not_after: self.not_after,
            expired: self.expired(),
        }
    }
}

/// Host name → candidates, best first.
#[derive(Default)]
struct Index {
    exact: HashMap<String, Vec<Arc<Served>>>,
    /// `example.com` for `*.example.com`.
    wildcard: HashMap<String, Vec<Arc<Served>>>,
    default: Option<Arc<Served>>,
}

impl Index {
    fn build(state: &State) -> Index {
        let mut index = Index::default();
        for served in state.from_dir.values().chain(state.inserted.values()) {
            for name in &served.names {
                let map = match name.strip_prefix("*.") {
                    Some(parent) => index.wildcard.entry(parent.to_string()),
                    None => index.exact.entry(name.clone()),
                };
                map.or_default().push(served.clone());
            }
        }
        // Latest expiry first; the sort is stable, so ties keep source order.
        for candidates in index.exact.values_mut().chain(index.wildcard.values_mut()) {
            candidates.sort_by_key(|c| std::cmp::Reverse(c.not_after));
        }
        index.default = state
            .from_dir
            .get(DEFAULT_SOURCE)
            .or_else(|| state.inserted.get(DEFAULT_SOURCE))
            .or_else(|| state.from_dir.values().next())
            .or_else(|| state.inserted.values().next())
            .cloned();
        index
    }

    fn candidates(&self, host: &str) -> Option<&[Arc<Served>]> {
        if let Some(exact) = self.exact.get(host) {
            return Some(exact);
        }
        let (first, parent) = host.split_once('.')?;
        if first.is_empty() || first == "*" {
            return None;
        }
        self.wildcard.get(parent).map(Vec::as_slice)
    }

    fn choose(&self, server_name: Option<&str>, schemes: &[SignatureScheme]) -> Option<&Arc<Served>> {
        let host = server_name.map(|n| n.trim_end_matches('.').to_ascii_lowercase());
        match host.as_deref().and_then(|h| self.candidates(h)) {
            Some([only]) => Some(only),
            Some(candidates) => {
                candidates.iter().find(|c| c.key.key.choose_scheme(schemes).is_some()).or_else(|| candidates.first())
            }
            None => self.default.as_ref(),
        }
    }

    fn is_empty(&self) -> bool {
        self.default.is_none()
    }
}

impl CertStore {
    /// Reads every certificate in `dir`. Errors on an unreadable dir; a bad pair is logged
    /// (tracing::warn) and skipped, listed in the report of [`CertStore::load_with_report`].
    pub fn load(dir: &Path) -> Result<Arc<CertStore>, TlsError> {
        Self::load_with_report(dir).map(|(store, _)| store)
    }

    /// [`CertStore::load`], also returning what was loaded and what failed.
    pub fn load_with_report(dir: &Path) -> Result<(Arc<CertStore>, ReloadReport), TlsError> {
        let store = Arc::new(CertStore {
            dir: dir.to_path_buf(),
            provider: Arc::new(rustls::crypto::aws_lc_rs::default_provider()),
            index: ArcSwap::from_pointee(Index::default()),
            state: Mutex::new(State::default()),
        });
        let report = store.reload()?;
        if store.index.load().is_empty() {
            tracing::warn!(
                "no certificate could be loaded from {}: TLS handshakes are refused until one is (see the module's layout: NAME.crt + NAME.key, NAME.pem, NAME/fullchain.pem + NAME/privkey.pem)",
                dir.display()
            );
        }
        Ok((store, report))
    }

    /// Re-reads the directory and swaps the new set in atomically (arc-swap); handshakes in
    /// progress are unaffected. A pair that fails to load keeps serving the previous certificate
    /// for its names (if any) and is reported, never a panic or an empty store because of one bad
    /// file. An unreadable directory is an error, and then nothing changes.
    pub fn reload(&self) -> Result<ReloadReport, TlsError> {
        let mut state = self.state();
        self.reload_locked(&mut state)
    }

    /// A rustls ServerConfig using this store (ALPN: h2, http/1.1), TLS 1.2 and 1.3.
    pub fn server_config(self: &Arc<Self>) -> Arc<ServerConfig> {
        let builder = ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            // Only fails for a provider without cipher suites for these versions; aws-lc-rs's
            // default provider has both (a unit test builds this config).
            .expect("the aws-lc-rs provider supports TLS 1.2 and 1.3");
        let mut config = builder.with_no_client_auth().with_cert_resolver(self.clone());
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Arc::new(config)
    }

    /// Polls the directory every `interval` (10 ms at least) on its own thread, "dlv-certs", and
    /// reloads when the set of files or any file's mtime, size or inode changed. Stops when the
    /// returned handle is dropped.
    pub fn watch(self: &Arc<Self>, interval: Duration) -> CertWatch {
        let interval = interval.max(MIN_WATCH_INTERVAL);
        let (stop, stopped) = mpsc::channel::<()>();
        // Weak: the thread must not keep a store alive that nothing else uses.
        let store = Arc::downgrade(self);
        let spawned = std::thread::Builder::new().name("dlv-certs".into()).spawn(move || loop {
            match stopped.recv_timeout(interval) {
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => return,
            }
            let Some(store) = store.upgrade() else { return };
            store.reload_if_changed();
        });
        match spawned {
            Ok(thread) => CertWatch { stop: Some(stop), thread: Some(thread) },
            Err(e) => {
                tracing::error!(
                    "cannot start the certificate watch thread: {e}; {} is not watched, certificates change only on reload",
                    self.dir.display()
                );
                CertWatch { stop: None, thread: None }
            }
        }
    }

    /// Names currently served (for logs / `deliverous` status output), sorted.
    pub fn names(&self) -> Vec<String> {
        let index = self.index.load();
        let mut names: Vec<String> =
            index.exact.keys().cloned().chain(index.wildcard.keys().map(|parent| format!("*.{parent}"))).collect();
        names.sort();
        names
    }

    /// Adds or replaces a certificate supplied by another source (a later ACME client plugs in
    /// here): it is served for the names the certificate itself declares, and survives reloads.
    #[allow(dead_code)] // the ACME client of a later issue plugs in here
    pub fn insert(&self, source: &str, key: Arc<CertifiedKey>) -> Result<(), TlsError> {
        let served =
            served(source, key).map_err(|reason| TlsError::Certificate { origin: source.to_string(), reason })?;
        if served.expired() {
            warn_expired(&served);
        }
        let mut state = self.state();
        state.inserted.insert(source.to_string(), Arc::new(served));
        self.publish(&state);
        Ok(())
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // Nothing panics while holding it; if something did, the state is still a valid set.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn publish(&self, state: &State) {
        self.index.store(Arc::new(Index::build(state)));
    }

    fn reload_locked(&self, state: &mut State) -> Result<ReloadReport, TlsError> {
        // Taken before reading: a file changed while we read shows as a change at the next poll.
        let seen = fingerprint(&self.dir).ok();
        let sources = scan(&self.dir).map_err(|err| TlsError::Dir { dir: self.dir.clone(), err })?;
        let mut report = ReloadReport::default();
        let mut from_dir = BTreeMap::new();
        for (source, files) in sources {
            match files.and_then(|files| load_files(&source, &files, &self.provider)) {
                Ok(served) => {
                    if served.expired() {
                        warn_expired(&served);
                    }
                    report.loaded.push(served.report());
                    from_dir.insert(source, Arc::new(served));
                }
                Err(error) => {
                    let previous = state.from_dir.get(&source).cloned();
                    let kept_previous = previous.is_some();
                    if kept_previous {
                        tracing::warn!("certificate {source}: {error}; still serving the one loaded before");
                    } else {
                        tracing::warn!("certificate {source}: {error}; skipped");
                    }
                    report.failed.push(FailedCert { source: source.clone(), error, kept_previous });
                    if let Some(previous) = previous {
                        from_dir.insert(source, previous);
                    }
                }
            }
        }
        report.removed = state.from_dir.keys().filter(|s| !from_dir.contains_key(*s)).cloned().collect();
        state.from_dir = from_dir;
        state.seen = seen;
        self.publish(state);
        Ok(report)
    }

    /// One poll of the watch thread.
    fn reload_if_changed(&self) {
        let mut state = self.state();
        let outcome = match fingerprint(&self.dir) {
            Ok(now) if state.seen.as_ref() == Some(&now) => return,
            Ok(_) => self.reload_locked(&mut state).map_err(|e| e.to_string()),
            Err(e) => Err(TlsError::Dir { dir: self.dir.clone(), err: e }.to_string()),
        };
        match outcome {
            Ok(report) => {
                tracing::info!("certificates reloaded from {}: {report}", self.dir.display());
                state.watch_error = None;
            }
            Err(error) => {
                if state.watch_error.as_ref() != Some(&error) {
                    tracing::warn!("{error}; the certificates loaded before are still served");
                    state.watch_error = Some(error);
                }
            }
        }
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let index = self.index.load();
        match index.choose(hello.server_name(), hello.signature_schemes()) {
            Some(served) => Some(served.key.clone()),
            None => {
                tracing::debug!(sni = ?hello.server_name(), "no certificate loaded: TLS handshake refused");
                None
            }
        }
    }
}

impl fmt::Debug for CertStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertStore").field("dir", &self.dir).field("names", &self.names()).finish()
    }
}

/// Stops the certificate watch thread when dropped.
#[derive(Debug)]
#[must_use = "the directory is watched only while this handle lives"]
pub struct CertWatch {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for CertWatch {
    fn drop(&mut self) {
        // Dropping the sender wakes the thread at once; joining waits at most for a reload.
        self.stop.take();
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::error!("the certificate watch thread panicked");
            }
        }
    }
}

fn warn_expired(served: &Served) {
    if let Some(not_after) = served.not_after {
        tracing::warn!(
            "certificate {} ({}) expired on {}: still served, but clients will refuse it; renew it",
            served.source,
            served.names.join(", "),
            not_after.format("%Y-%m-%d %H:%M:%S UTC")
        );
    }
}

/// Where one source's chain and key are (the same file for a `NAME.pem` holding both).
#[derive(Debug)]
struct Files {
    chain: PathBuf,
    key: PathBuf,
}

/// The directory's sources in name order, each with its files or why they cannot be used.
fn scan(dir: &Path) -> io::Result<Vec<(String, Result<Files, String>)>> {
    #[derive(Default)]
    struct Stem {
        crt: Option<PathBuf>,
        pem: Option<PathBuf>,
        key: Option<PathBuf>,
    }
    let mut stems: BTreeMap<String, Stem> = BTreeMap::new();
    let mut sources = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        let Some(name) = entry.file_name().to_str().map(str::to_string) else {
            tracing::warn!("skipping {}: its name is not UTF-8", path.display());
            continue;
        };
        if name.starts_with('.') {
            continue;
        }
        // metadata, not symlink_metadata: certbot's live/ directory is made of links.
        if fs::metadata(&path).is_ok_and(|m| m.is_dir()) {
            let (chain, key) = (path.join("fullchain.pem"), path.join("privkey.pem"));
            let (has_chain, has_key) = (present(&chain), present(&key));
            let files = match (has_chain, has_key) {
                (true, true) => Ok(Files { chain, key }),
                (true, false) => Err(format!("{} has fullchain.pem but no privkey.pem", path.display())),
                (false, true) => Err(format!("{} has privkey.pem but no fullchain.pem", path.display())),
                (false, false) => continue,
            };
            sources.push((format!("{name}/"), files));
            continue;
        }
        let Some((stem, extension)) = name.rsplit_once('.') else { continue };
        if !matches!(extension, "crt" | "pem" | "key") {
            continue;
        }
        let found = stems.entry(stem.to_string()).or_default();
        let slot = match extension {
            "crt" => &mut found.crt,
            "pem" => &mut found.pem,
            _ => &mut found.key,
        };
        *slot = Some(path);
    }
    for (stem, found) in stems {
        let files = match (found.crt, found.pem, found.key) {
            (Some(_), Some(_), _) => Err(format!("both {stem}.crt and {stem}.pem exist: keep one")),
            (Some(chain), None, Some(key)) => Ok(Files { chain, key }),
            (Some(_), None, None) => Err(format!("{stem}.crt has no {stem}.key beside it")),
            (None, Some(pem), key) => Ok(Files { key: key.unwrap_or_else(|| pem.clone()), chain: pem }),
            (None, None, Some(_)) => Err(format!("{stem}.key has no {stem}.crt or {stem}.pem beside it")),
            (None, None, None) => continue,
        };
        sources.push((stem, files));
    }
    sources.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(sources)
}

/// Present as a name, even a dangling link: loading it then says what is wrong.
fn present(path: &Path) -> bool {
    fs::symlink_metadata(path).is_ok()
}

fn load_files(source: &str, files: &Files, provider: &CryptoProvider) -> Result<Served, String> {
    let chain_pem = read_pem_file(&files.chain)?;
    let chain = CertificateDer::pem_slice_iter(&chain_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: not valid PEM: {e}", files.chain.display()))?;
    if chain.is_empty() {
        return Err(format!("{}: no CERTIFICATE block", files.chain.display()));
    }
    let key_pem = if files.key == files.chain { chain_pem } else { read_pem_file(&files.key)? };
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| match e {
        pem::Error::NoItemsFound => format!(
            "{}: no private key (expected PEM \"PRIVATE KEY\", \"RSA PRIVATE KEY\" or \"EC PRIVATE KEY\"; encrypted keys are not supported)",
            files.key.display()
        ),
        e => format!("{}: not valid PEM: {e}", files.key.display()),
    })?;
    if let Ok(meta) = fs::metadata(&files.key) {
        let mode = meta.permissions().mode() & 0o7777;
        if key_mode_too_open(mode) {
            tracing::warn!(
                "private key {} has mode {mode:04o}, open to other users: chmod 600 it",
                files.key.display()
            );
        }
    }
    let signing_key = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| format!("{}: unusable private key: {e}", files.key.display()))?;
    served(source, Arc::new(CertifiedKey::new(chain, signing_key)))
        .map_err(|e| format!("{} with {}: {e}", files.chain.display(), files.key.display()))
}

fn read_pem_file(path: &Path) -> Result<Vec<u8>, String> {
    let cannot = |e: io::Error| format!("cannot read {}: {e}", path.display());
    // A FIFO or device named like a certificate would block or never end: regular files only.
    if !fs::metadata(path).map_err(cannot)?.is_file() {
        return Err(format!("{} is not a regular file", path.display()));
    }
    let mut bytes = Vec::new();
    fs::File::open(path).map_err(cannot)?.take(MAX_PEM_BYTES + 1).read_to_end(&mut bytes).map_err(cannot)?;
    if bytes.len() as u64 > MAX_PEM_BYTES {
        return Err(format!("{} is larger than {MAX_PEM_BYTES} bytes: not a certificate or key", path.display()));
    }
    Ok(bytes)
}

/// Group write or any access by others: more than the 0600 or 0640 a private key should have.
fn key_mode_too_open(mode: u32) -> bool {
    mode & 0o037 != 0
}

/// Checks a chain and key belong together and finds the names the certificate serves.
fn served(source: &str, key: Arc<CertifiedKey>) -> Result<Served, String> {
    let Ok(end_entity) = key.end_entity_cert() else {
        return Err("the certificate chain is empty".into());
    };
    let summary = x509::summarize(end_entity.as_ref()).map_err(|e| format!("the certificate cannot be read: {e}"))?;
    match key.keys_match() {
        // Unknown: the key cannot tell its public half; rustls's own from_der accepts that too.
        Ok(()) | Err(rustls::Error::InconsistentKeys(InconsistentKeys::Unknown)) => {}
        Err(rustls::Error::InconsistentKeys(InconsistentKeys::KeyMismatch)) => {
            return Err("the private key does not belong to the certificate (their public keys differ): check that both come from the same issuance and that the server's own certificate is first in the chain".into());
        }
        Err(e) => return Err(format!("the certificate cannot be read: {e}")),
    }
    if summary.dns_names.is_empty() {
        return Err("the certificate names no host: it has no subjectAltName DNS name (the subject CN is ignored, as browsers ignore it); reissue it with one".into());
    }
    Ok(Served { source: source.to_string(), key, names: summary.dns_names, not_after: summary.not_after })
}

/// The directory as seen through `stat`: every entry (one level into subdirectories), with its
/// mtime, size and inode, links followed. Equal fingerprints mean nothing to reload.
#[derive(Debug, PartialEq, Eq)]
struct Fingerprint(Vec<(PathBuf, Option<Stamp>)>);

/// mtime (seconds, nanoseconds), size, inode, device.
type Stamp = (i64, i64, u64, u64, u64);

fn fingerprint(dir: &Path) -> io::Result<Fingerprint> {
    fn stamp(path: &Path) -> Option<Stamp> {
        let m = fs::metadata(path).ok()?;
        Some((m.mtime(), m.mtime_nsec(), m.size(), m.ino(), m.dev()))
    }
    let visible = |entry: &fs::DirEntry| !entry.file_name().as_encoded_bytes().starts_with(b".");
    let mut seen = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if !visible(&entry) {
            continue;
        }
        let path = entry.path();
        if fs::metadata(&path).is_ok_and(|m| m.is_dir()) {
            // A subdirectory that cannot be listed shows as empty; loading it reports why.
            for sub in fs::read_dir(&path).into_iter().flatten().flatten() {
                if visible(&sub) {
                    let sub_path = sub.path();
                    seen.push((sub_path.clone(), stamp(&sub_path)));
                }
            }
        }
        seen.push((path.clone(), stamp(&path)));
    }
    seen.sort();
    Ok(Fingerprint(seen))
}

/// Just enough X.509 (RFC 5280) to read a certificate's subjectAltName DNS names and notAfter: a
/// bounded DER walk that fails on anything it does not expect, never reading past its input.
/// Signatures and the rest are checked by rustls/webpki (`keys_match` parses the whole certificate).
mod x509 {
    use chrono::{DateTime, NaiveDate, Utc};

    const SEQUENCE: u8 = 0x30;
    const INTEGER: u8 = 0x02;
    const BOOLEAN: u8 = 0x01;
    const OCTET_STRING: u8 = 0x04;
    const OID: u8 = 0x06;
    const UTC_TIME: u8 = 0x17;
    const GENERALIZED_TIME: u8 = 0x18;
    /// `[0] EXPLICIT Version`.
    const VERSION: u8 = 0xa0;
    /// `[3] EXPLICIT Extensions`.
    const EXTENSIONS: u8 = 0xa3;
    /// `dNSName [2] IA5String` inside GeneralNames.
    const DNS_NAME: u8 = 0x82;
    /// id-ce-subjectAltName, 2.5.29.17.
    const SUBJECT_ALT_NAME: &[u8] = &[0x55, 0x1d, 0x11];

    pub(super) struct Summary {
        pub dns_names: Vec<String>,
        pub not_after: Option<DateTime<Utc>>,
    }

    struct Der<'a> {
        rest: &'a [u8],
    }

    impl<'a> Der<'a> {
        fn new(bytes: &'a [u8]) -> Der<'a> {
            Der { rest: bytes }
        }

        fn is_empty(&self) -> bool {
            self.rest.is_empty()
        }

        fn peek_tag(&self) -> Option<u8> {
            self.rest.first().copied()
        }

        /// The next element's tag and contents.
        fn any(&mut self) -> Result<(u8, &'a [u8]), String> {
            let bytes: &'a [u8] = self.rest;
            let [tag, first, after @ ..] = bytes else {
                return Err("truncated DER element".into());
            };
            let (tag, first) = (*tag, *first);
            if tag & 0x1f == 0x1f {
                return Err(format!("unexpected multi-byte DER tag 0x{tag:02x}"));
            }
            let (len, after) = if first < 0x80 {
                (usize::from(first), after)
            } else {
                let count = usize::from(first & 0x7f);
                // Indefinite lengths are not DER; four bytes of length is far beyond any certificate.
                if count == 0 || count > 4 {
                    return Err(format!("unsupported DER length form 0x{first:02x}"));
                }
                let Some((len_bytes, after)) = after.split_at_checked(count) else {
                    return Err("truncated DER length".into());
                };
                (len_bytes.iter().fold(0usize, |acc, &b| (acc << 8) | usize::from(b)), after)
            };
            let Some((contents, rest)) = after.split_at_checked(len) else {
                return Err(format!("DER element of {len} bytes overruns its container"));
            };
            self.rest = rest;
            Ok((tag, contents))
        }

        fn expect(&mut self, want: u8, what: &str) -> Result<&'a [u8], String> {
            match self.any()? {
                (tag, contents) if tag == want => Ok(contents),
                (tag, _) => Err(format!("expected {what} (tag 0x{want:02x}), found tag 0x{tag:02x}")),
            }
        }
    }

    pub(super) fn summarize(der: &[u8]) -> Result<Summary, String> {
        let certificate = Der::new(der).expect(SEQUENCE, "Certificate")?;
        let mut tbs = Der::new(Der::new(certificate).expect(SEQUENCE, "TBSCertificate")?);
        if tbs.peek_tag() == Some(VERSION) {
            tbs.any()?;
        }
        tbs.expect(INTEGER, "serialNumber")?;
        tbs.expect(SEQUENCE, "signature")?;
        tbs.expect(SEQUENCE, "issuer")?;
        let mut validity = Der::new(tbs.expect(SEQUENCE, "validity")?);
        validity.any()?;
        let not_after = match validity.any()? {
            (UTC_TIME, text) => time(text, false),
            (GENERALIZED_TIME, text) => time(text, true),
            _ => None,
        };
        tbs.expect(SEQUENCE, "subject")?;
        tbs.expect(SEQUENCE, "subjectPublicKeyInfo")?;
        let mut dns_names = Vec::new();
        while !tbs.is_empty() {
            let (tag, contents) = tbs.any()?;
            if tag != EXTENSIONS {
                continue;
            }
            let mut extensions = Der::new(Der::new(contents).expect(SEQUENCE, "Extensions")?);
            while !extensions.is_empty() {
                let mut extension = Der::new(extensions.expect(SEQUENCE, "Extension")?);
                let id = extension.expect(OID, "extnID")?;
                if extension.peek_tag() == Some(BOOLEAN) {
                    extension.any()?;
                }
                let value = extension.expect(OCTET_STRING, "extnValue")?;
                if id == SUBJECT_ALT_NAME {
                    let mut names = Der::new(Der::new(value).expect(SEQUENCE, "GeneralNames")?);
                    while !names.is_empty() {
                        if let (DNS_NAME, name) = names.any()? {
                            if let Some(name) = dns_name(name) {
                                if !dns_names.contains(&name) {
                                    dns_names.push(name);
                                }
                            }
                        }
                    }
                }
            }
        }
        Ok(Summary { dns_names, not_after })
    }

    /// A host name a handshake can ask for, lower case: letters, digits, `-`, `_` and dots, with an
    /// optional `*.` in front. Anything else (a partial wildcard `w*.example.com`, a bare `*`, an
    /// empty label) cannot match an SNI name the way browsers match, and is left out.
    fn dns_name(raw: &[u8]) -> Option<String> {
        let text = std::str::from_utf8(raw).ok()?.to_ascii_lowercase();
        let host = text.strip_prefix("*.").unwrap_or(&text);
        let label_ok = |l: &str| {
            !l.is_empty() && l.len() <= 63 && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        };
        (host.len() <= 253 && host.split('.').all(label_ok)).then_some(text)
    }

    /// `YYMMDDHHMMSSZ` (UTCTime, 1950–2049) or `YYYYMMDDHHMMSSZ` (GeneralizedTime), as RFC 5280
    /// requires them; anything else is unknown.
    fn time(text: &[u8], generalized: bool) -> Option<DateTime<Utc>> {
        let digits = text.strip_suffix(b"Z")?;
        if digits.len() != if generalized { 14 } else { 12 } || !digits.iter().all(u8::is_ascii_digit) {
            return None;
        }
        let number = |range: std::ops::Range<usize>| {
            digits.get(range).map(|d| d.iter().fold(0u32, |acc, &b| acc * 10 + u32::from(b - b'0')))
        };
        let (year, rest) = if generalized {
            (i32::try_from(number(0..4)?).ok()?, 4)
        } else {
            let yy = i32::try_from(number(0..2)?).ok()?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, 2)
        };
        let field = |i: usize| number(rest + 2 * i..rest + 2 * i + 2);
        NaiveDate::from_ymd_opt(year, field(0)?, field(1)?)?
            .and_hms_opt(field(2)?, field(3)?, field(4)?)
            .map(|t| t.and_utc())
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn times() {
            let t = |s: &str, g| time(s.as_bytes(), g).map(|t| t.to_rfc3339());
            assert_eq!(t("491231235959Z", false).as_deref(), Some("2049-12-31T23:59:59+00:00"));
            assert_eq!(t("500101000000Z", false).as_deref(), Some("1950-01-01T00:00:00+00:00"));
            assert_eq!(t("99991231235959Z", true).as_deref(), Some("9999-12-31T23:59:59+00:00"));
            for bad in ["4912312359Z", "491231235959", "491331235959Z", "49123123595aZ", "+91231235959Z"] {
                assert_eq!(t(bad, false), None, "{bad}");
            }
        }

        #[test]
        fn dns_names() {
            let n = |s: &str| dns_name(s.as_bytes());
            assert_eq!(n("A.Example.Test").as_deref(), Some("a.example.test"));
            assert_eq!(n("*.example.test").as_deref(), Some("*.example.test"));
            for bad in ["w*.example.test", "*", "*.", "a..b", ".a", "a.*.b", "a b", "é.test"] {
                assert_eq!(n(bad), None, "{bad}");
            }
        }

        #[test]
        fn garbage_is_an_error() {
            for bad in
                [&b""[..], b"\x30", b"\x30\x80", b"\x30\x85\x01\x00\x00\x00\x00", b"\x30\x05\x30\x03", b"\x1f\x00"]
            {
                assert!(summarize(bad).is_err(), "{bad:?}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;
    use std::sync::atomic::{AtomicU32, Ordering};

    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::client::WebPkiServerVerifier;
    use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore};
    use rustls_pki_types::{ServerName, UnixTime};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio_rustls::{TlsAcceptor, TlsConnector};

    fn openssl(dir: &Path, args: &[&str]) {
        let out = Command::new("/usr/bin/openssl").args(args).current_dir(dir).output().expect("run openssl");
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }

    #[derive(Clone, Copy)]
    enum KeyKind {
        EcPkcs8,
        EcSec1,
        RsaPkcs1,
    }

    #[derive(Clone, Copy, PartialEq)]
    enum Validity {
        Current,
        Expired,
    }

    struct Issued {
        cert_pem: Vec<u8>,
        key_pem: Vec<u8>,
        der: Vec<u8>,
    }

    impl Issued {
        fn combined(&self) -> Vec<u8> {
            [&self.cert_pem[..], &self.key_pem[..]].concat()
        }
    }

    /// A throwaway CA, in a temporary directory of its own.
    struct Pki {
        work: tempfile::TempDir,
        ca_pem: Vec<u8>,
        ca_der: Vec<u8>,
        serial: AtomicU32,
    }

    impl Pki {
        fn new() -> Pki {
            let work = tempfile::tempdir().expect("tempdir");
            let dir = work.path();
            fs::write(
                dir.join("ca_ext.cnf"),
                "basicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\n",
            )
            .expect("write");
            openssl(dir, &["ecparam", "-genkey", "-name", "prime256v1", "-noout", "-out", "ca.key"]);
            openssl(dir, &["req", "-new", "-key", "ca.key", "-subj", "/CN=deliverous test CA", "-out", "ca.csr"]);
            openssl(
                dir,
                &[
                    "x509",
                    "-req",
                    "-in",
                    "ca.csr",
                    "-key",
                    "ca.key",
                    "-days",
                    "30",
                    "-extfile",
                    "ca_ext.cnf",
                    "-out",
                    "ca.crt",
                ],
            );
            fs::write(dir.join("index.txt"), "").expect("write");
            fs::write(dir.join("serial"), "01\n").expect("write");
            fs::write(
                dir.join("ca.cnf"),
                "[ca]\ndefault_ca = test\n[test]\ndatabase = index.txt\nnew_certs_dir = .\nserial = serial\n\
                 default_md = sha256\npolicy = any\nunique_subject = no\n[any]\ncommonName = supplied\n",
            )
            .expect("write");
            let ca_pem = fs::read(dir.join("ca.crt")).expect("read");
            let ca_der = CertificateDer::from_pem_slice(&ca_pem).expect("ca pem").to_vec();
            Pki { work, ca_pem, ca_der, serial: AtomicU32::new(0) }
        }

        /// A certificate for `sans` (`DNS:` is implied unless an entry says `IP:`...).
        fn issue(&self, sans: &[&str], kind: KeyKind, validity: Validity) -> Issued {
            let dir = self.work.path();
            let n = self.serial.fetch_add(1, Ordering::Relaxed);
            let (key, csr, ext, crt) = (format!("{n}.key"), format!("{n}.csr"), format!("{n}.cnf"), format!("{n}.crt"));
            match kind {
                KeyKind::EcPkcs8 => {
                    openssl(dir, &["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", &key])
                }
                KeyKind::EcSec1 => openssl(dir, &["ecparam", "-genkey", "-name", "prime256v1", "-noout", "-out", &key]),
                KeyKind::RsaPkcs1 => openssl(dir, &["genrsa", "-traditional", "-out", &key, "2048"]),
            }
            let subject = format!("/CN={}", sans.first().copied().unwrap_or("no-san").replace('*', "star"));
            openssl(dir, &["req", "-new", "-key", &key, "-subj", &subject, "-out", &csr]);
            let mut extensions = String::from("basicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n");
            if !sans.is_empty() {
                let list: Vec<String> =
                    sans.iter().map(|s| if s.contains(':') { s.to_string() } else { format!("DNS:{s}") }).collect();
                extensions.push_str(&format!("subjectAltName={}\n", list.join(",")));
            }
            fs::write(dir.join(&ext), extensions).expect("write");
            let mut args =
                vec!["ca", "-batch", "-notext", "-config", "ca.cnf", "-cert", "ca.crt", "-keyfile", "ca.key"];
            args.extend(["-in", &csr, "-out", &crt, "-extfile", &ext]);
            match validity {
                Validity::Current => args.extend(["-days", "30"]),
                Validity::Expired => args.extend(["-startdate", "20200101000000Z", "-enddate", "20200201000000Z"]),
            }
            openssl(dir, &args);
            let cert_pem = fs::read(dir.join(&crt)).expect("read");
            let der = CertificateDer::from_pem_slice(&cert_pem).expect("pem").to_vec();
            Issued { cert_pem, key_pem: fs::read(dir.join(&key)).expect("read"), der }
        }

        fn certified_key(&self, issued: &Issued, key_from: &Issued) -> Arc<CertifiedKey> {
            let provider = rustls::crypto::aws_lc_rs::default_provider();
            let key = PrivateKeyDer::from_pem_slice(&key_from.key_pem).expect("key");
            let signing = provider.key_provider.load_private_key(key).expect("signing key");
            Arc::new(CertifiedKey::new(vec![CertificateDer::from(issued.der.clone())], signing))
        }
    }

    /// Writes `bytes` to `dir/name` the way an operator's tools would: keys 0600.
    fn put(dir: &Path, name: &str, bytes: &[u8]) {
        let path = dir.join(name);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).expect("mkdir");
        }
        fs::write(&path, bytes).expect("write");
        if name.ends_with(".key") || name.ends_with("privkey.pem") {
            fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).expect("chmod");
        }
    }

    fn put_pair(dir: &Path, stem: &str, issued: &Issued) {
        put(dir, &format!("{stem}.crt"), &issued.cert_pem);
        put(dir, &format!("{stem}.key"), &issued.key_pem);
    }

    /// A TLS server on 127.0.0.1 answering every connection with "hello"; stops when dropped.
    struct TlsServer {
        addr: std::net::SocketAddr,
        task: tokio::task::JoinHandle<()>,
    }

    impl Drop for TlsServer {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    async fn tls_server(config: Arc<ServerConfig>) -> TlsServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let acceptor = TlsAcceptor::from(config);
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    if let Ok(mut tls) = acceptor.accept(tcp).await {
                        let _ = tls.write_all(b"hello").await;
                        let _ = tls.shutdown().await;
                    }
                });
            }
        });
        TlsServer { addr, task }
    }

    /// Verifies as a browser would (chain to the test CA, name, dates), remembering the certificate
    /// the server presented; `strict: false` accepts it whatever the verdict.
    #[derive(Debug)]
    struct Recording {
        inner: Arc<WebPkiServerVerifier>,
        strict: bool,
        presented: Mutex<Option<Vec<u8>>>,
    }

    impl ServerCertVerifier for Recording {
        fn verify_server_cert(
            &self,
            end_entity: &CertificateDer<'_>,
            intermediates: &[CertificateDer<'_>],
            server_name: &ServerName<'_>,
            ocsp_response: &[u8],
            now: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            *self.presented.lock().expect("lock") = Some(end_entity.to_vec());
            let verdict = self.inner.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now);
            if self.strict {
                verdict
            } else {
                Ok(ServerCertVerified::assertion())
            }
        }

        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            self.inner.verify_tls12_signature(message, cert, dss)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            self.inner.verify_tls13_signature(message, cert, dss)
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.inner.supported_verify_schemes()
        }
    }

    struct Hello<'a> {
        name: &'a str,
        send_sni: bool,
        alpn: &'a [&'a [u8]],
        tls12_only: bool,
        strict: bool,
    }

    impl Hello<'_> {
        fn to(name: &str) -> Hello<'_> {
            Hello { name, send_sni: true, alpn: &[], tls12_only: false, strict: true }
        }
    }

    #[derive(Debug)]
    struct Outcome {
        /// The certificate the server presented, if it got that far.
        presented: Option<Vec<u8>>,
        /// The negotiated ALPN protocol, or the handshake's error.
        result: Result<Option<Vec<u8>>, String>,
    }

    async fn handshake(server: &TlsServer, pki: &Pki, hello: Hello<'_>) -> Outcome {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut roots = RootCertStore::empty();
        roots.add(CertificateDer::from(pki.ca_der.clone())).expect("root");
        let inner =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone()).build().expect("verifier");
        let verifier = Arc::new(Recording { inner, strict: hello.strict, presented: Mutex::new(None) });
        let versions: &[&rustls::SupportedProtocolVersion] = if hello.tls12_only {
            &[&rustls::version::TLS12]
        } else {
            &[&rustls::version::TLS13, &rustls::version::TLS12]
        };
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)
            .expect("versions")
            .dangerous()
            .with_custom_certificate_verifier(verifier.clone())
            .with_no_client_auth();
        config.alpn_protocols = hello.alpn.iter().map(|p| p.to_vec()).collect();
        config.enable_sni = hello.send_sni;
        let name = ServerName::try_from(hello.name.to_string()).expect("server name");
        let tcp = TcpStream::connect(server.addr).await.expect("connect");
        let result = match TlsConnector::from(Arc::new(config)).connect(name, tcp).await {
            Ok(mut tls) => {
                let alpn = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
                let mut greeting = Vec::new();
                tls.read_to_end(&mut greeting).await.expect("read");
                assert_eq!(greeting, b"hello");
                Ok(alpn)
            }
            Err(e) => Err(format!("{e:?}")),
        };
        let presented = verifier.presented.lock().expect("lock").take();
        Outcome { presented, result }
    }

    /// The certificate `name` gets, checked by a strict client.
    async fn served_to(server: &TlsServer, pki: &Pki, name: &str) -> Vec<u8> {
        let outcome = handshake(server, pki, Hello::to(name)).await;
        assert!(outcome.result.is_ok(), "{name}: {:?}", outcome.result);
        outcome.presented.expect("a certificate")
    }

    /// One of each layout and key format: `a.example.test` (PKCS#8, .crt + .key), `wild`
    /// (`*.wild.example.test`, PKCS#1 RSA, one .pem) and `c.example.test/` (SEC1, certbot).
    struct Layout {
        certs: tempfile::TempDir,
        a: Issued,
        wild: Issued,
        c: Issued,
    }

    fn layout(pki: &Pki) -> Layout {
        let certs = tempfile::tempdir().expect("tempdir");
        let a = pki.issue(&["a.example.test"], KeyKind::EcPkcs8, Validity::Current);
        let wild = pki.issue(&["*.wild.example.test"], KeyKind::RsaPkcs1, Validity::Current);
        let c = pki.issue(&["c.example.test", "www.c.example.test"], KeyKind::EcSec1, Validity::Current);
        assert!(a.key_pem.starts_with(b"-----BEGIN PRIVATE KEY-----"));
        assert!(wild.key_pem.starts_with(b"-----BEGIN RSA PRIVATE KEY-----"));
        assert!(c.key_pem.starts_with(b"-----BEGIN EC PRIVATE KEY-----"));
        let dir = certs.path();
        put_pair(dir, "a.example.test", &a);
        put(dir, "wild.pem", &wild.combined());
        put(dir, "c.example.test/fullchain.pem", &[&c.cert_pem[..], &pki.ca_pem[..]].concat());
        put(dir, "c.example.test/privkey.pem", &c.key_pem);
        put(dir, "c.example.test/README", b"certbot leaves this here");
        put(dir, "README", b"not a certificate");
        put(dir, ".hidden.crt", b"ignored");
        Layout { certs, a, wild, c }
    }

    fn sources(report: &ReloadReport) -> Vec<&str> {
        report.loaded.iter().map(|c| c.source.as_str()).collect()
    }

    #[tokio::test]
    async fn each_name_gets_its_certificate() {
        let pki = Pki::new();
        let l = layout(&pki);
        let (store, report) = CertStore::load_with_report(l.certs.path()).expect("load");
        assert_eq!(report.failed, vec![]);
        assert_eq!(sources(&report), ["a.example.test", "c.example.test/", "wild"]);
        assert_eq!(store.names(), ["*.wild.example.test", "a.example.test", "c.example.test", "www.c.example.test"]);
        let server = tls_server(store.server_config()).await;
        for (name, expected) in [
            ("a.example.test", &l.a.der),
            ("A.Example.Test", &l.a.der),
            ("x.wild.example.test", &l.wild.der),
            ("c.example.test", &l.c.der),
            ("www.c.example.test", &l.c.der),
        ] {
            assert_eq!(&served_to(&server, &pki, name).await, expected, "{name}");
            let tls12 = handshake(&server, &pki, Hello { tls12_only: true, ..Hello::to(name) }).await;
            assert!(tls12.result.is_ok(), "{name} over TLS 1.2: {:?}", tls12.result);
            assert_eq!(tls12.presented.as_ref(), Some(expected), "{name} over TLS 1.2");
        }
    }

    #[tokio::test]
    async fn alpn_prefers_h2() {
        let pki = Pki::new();
        let l = layout(&pki);
        let store = CertStore::load(l.certs.path()).expect("load");
        let server = tls_server(store.server_config()).await;
        let alpn = |offer: &'static [&'static [u8]], tls12_only| {
            let (server, pki) = (&server, &pki);
            async move {
                handshake(server, pki, Hello { alpn: offer, tls12_only, ..Hello::to("a.example.test") })
                    .await
                    .result
                    .expect("handshake")
            }
        };
        assert_eq!(alpn(&[b"http/1.1", b"h2"], false).await.as_deref(), Some(&b"h2"[..]));
        assert_eq!(alpn(&[b"h2", b"http/1.1"], true).await.as_deref(), Some(&b"h2"[..]));
        assert_eq!(alpn(&[b"http/1.1"], false).await.as_deref(), Some(&b"http/1.1"[..]));
        assert_eq!(alpn(&[], false).await, None);
    }

    #[tokio::test]
    async fn unmatched_names_get_the_default_certificate() {
        let pki = Pki::new();
        let l = layout(&pki);
        let store = CertStore::load(l.certs.path()).expect("load");
        let server = tls_server(store.server_config()).await;
        // No `default` source: the first in name order, a.example.test.
        let no_sni = handshake(&server, &pki, Hello { send_sni: false, ..Hello::to("a.example.test") }).await;
        assert!(no_sni.result.is_ok(), "{:?}", no_sni.result);
        assert_eq!(no_sni.presented.as_ref(), Some(&l.a.der));
        // Names nothing covers, the wildcard's own parent and two labels under it among them: the
        // default is presented, and the client's name check refuses it.
        for name in ["unknown.example.test", "wild.example.test", "a.b.wild.example.test"] {
            let outcome = handshake(&server, &pki, Hello::to(name)).await;
            assert_eq!(outcome.presented.as_ref(), Some(&l.a.der), "{name}");
            let error = outcome.result.expect_err("name mismatch");
            assert!(error.contains("NotValidForName"), "{name}: {error}");
        }
        // A source named `default` takes over.
        let fallback = pki.issue(&["fallback.example.test"], KeyKind::EcSec1, Validity::Current);
        put(l.certs.path(), "default.pem", &fallback.combined());
        store.reload().expect("reload");
        let no_sni = handshake(&server, &pki, Hello { send_sni: false, ..Hello::to("fallback.example.test") }).await;
        assert_eq!(no_sni.presented.as_ref(), Some(&fallback.der));
        assert!(no_sni.result.is_ok(), "{:?}", no_sni.result);
    }

    #[tokio::test]
    async fn reload_replaces_certificates_in_place() {
        let pki = Pki::new();
        let l = layout(&pki);
        let dir = l.certs.path();
        let store = CertStore::load(dir).expect("load");
        let server = tls_server(store.server_config()).await;
        assert_eq!(served_to(&server, &pki, "a.example.test").await, l.a.der);

        // Renewed, with a new key: served from the next handshake on.
        let renewed = pki.issue(&["a.example.test"], KeyKind::EcSec1, Validity::Current);
        put_pair(dir, "a.example.test", &renewed);
        let report = store.reload().expect("reload");
        assert_eq!(report.failed, vec![]);
        assert_eq!(served_to(&server, &pki, "a.example.test").await, renewed.der);

        // A corrupt replacement: the renewed certificate stays.
        put(dir, "a.example.test.crt", b"-----BEGIN CERTIFICATE-----\nnot base64 at all!\n-----END CERTIFICATE-----\n");
        let report = store.reload().expect("reload");
        assert_eq!(report.failed.len(), 1, "{report}");
        let failed = &report.failed[0];
        assert_eq!(failed.source, "a.example.test");
        assert!(failed.kept_previous);
        assert!(failed.error.contains("a.example.test.crt: not valid PEM"), "{}", failed.error);
        assert_eq!(sources(&report), ["c.example.test/", "wild"]);
        assert_eq!(served_to(&server, &pki, "a.example.test").await, renewed.der);

        // Half a renewal (new certificate, old key) is refused the same way.
        let next = pki.issue(&["a.example.test"], KeyKind::EcSec1, Validity::Current);
        put(dir, "a.example.test.crt", &next.cert_pem);
        let report = store.reload().expect("reload");
        assert!(report.failed[0].error.contains("does not belong to the certificate"), "{report}");
        assert_eq!(served_to(&server, &pki, "a.example.test").await, renewed.der);
        put(dir, "a.example.test.key", &next.key_pem);
        assert_eq!(store.reload().expect("reload").failed, vec![]);
        assert_eq!(served_to(&server, &pki, "a.example.test").await, next.der);

        // Files gone: the source is dropped.
        fs::remove_file(dir.join("a.example.test.crt")).expect("rm");
        fs::remove_file(dir.join("a.example.test.key")).expect("rm");
        let report = store.reload().expect("reload");
        assert_eq!(report.removed, ["a.example.test"]);
        assert!(!store.names().contains(&"a.example.test".to_string()));

        // The directory gone: an error, and everything loaded stays.
        let names = store.names();
        let moved = pki.work.path().join("moved");
        fs::rename(dir, &moved).expect("mv");
        assert!(matches!(store.reload(), Err(TlsError::Dir { .. })));
        assert_eq!(store.names(), names);
        assert_eq!(served_to(&server, &pki, "c.example.test").await, l.c.der);
        fs::rename(&moved, dir).expect("mv back");
    }

    #[tokio::test]
    async fn mismatched_and_incomplete_sources_are_reported() {
        let pki = Pki::new();
        let dir = tempfile::tempdir().expect("tempdir");
        let b = pki.issue(&["b.example.test"], KeyKind::EcPkcs8, Validity::Current);
        let other = pki.issue(&["other.example.test"], KeyKind::EcPkcs8, Validity::Current);
        let no_san = pki.issue(&[], KeyKind::EcSec1, Validity::Current);
        let good = pki.issue(&["good.example.test"], KeyKind::EcSec1, Validity::Current);
        put(dir.path(), "b.crt", &b.cert_pem);
        put(dir.path(), "b.key", &other.key_pem);
        put(dir.path(), "lonely.crt", &b.cert_pem);
        put(dir.path(), "orphan.key", &b.key_pem);
        put(dir.path(), "twice.crt", &good.cert_pem);
        put(dir.path(), "twice.pem", &good.combined());
        put(dir.path(), "ca.pem", &pki.ca_pem);
        put(dir.path(), "nosan.pem", &no_san.combined());
        put(dir.path(), "half/fullchain.pem", &good.cert_pem);
        put(dir.path(), "empty/notes.txt", b"a subdirectory without certbot files is not a source");
        put_pair(dir.path(), "good", &good);
        let (store, report) = CertStore::load_with_report(dir.path()).expect("load");
        assert_eq!(sources(&report), ["good"]);
        assert_eq!(store.names(), ["good.example.test"]);
        let errors: BTreeMap<&str, &str> =
            report.failed.iter().map(|f| (f.source.as_str(), f.error.as_str())).collect();
        let expected = [
            ("b", "does not belong to the certificate"),
            ("ca", "no private key"),
            ("half/", "no privkey.pem"),
            ("lonely", "lonely.crt has no lonely.key beside it"),
            ("nosan", "no subjectAltName DNS name"),
            ("orphan", "orphan.key has no orphan.crt or orphan.pem beside it"),
            ("twice", "both twice.crt and twice.pem exist"),
        ];
        assert_eq!(errors.keys().copied().collect::<Vec<_>>(), expected.iter().map(|e| e.0).collect::<Vec<_>>());
        for (source, message) in expected {
            assert!(errors[source].contains(message), "{source}: {}", errors[source]);
        }
        assert!(report.failed.iter().all(|f| !f.kept_previous));
        let line = report.to_string();
        assert!(line.starts_with("1 loaded: good (good.example.test); b failed: "), "{line}");
    }

    #[tokio::test]
    async fn watch_reloads_changed_files() {
        let pki = Pki::new();
        let l = layout(&pki);
        let store = CertStore::load(l.certs.path()).expect("load");
        let server = tls_server(store.server_config()).await;
        let watch = store.watch(Duration::from_millis(20));
        let renewed = pki.issue(&["c.example.test"], KeyKind::EcPkcs8, Validity::Current);
        // As certbot renews: new files, the live names pointing at them.
        let archive = pki.work.path().join("archive");
        put(&archive, "fullchain2.pem", &renewed.cert_pem);
        put(&archive, "privkey2.pem", &renewed.key_pem);
        let live = l.certs.path().join("c.example.test");
        for (link, target) in [("privkey.pem", "privkey2.pem"), ("fullchain.pem", "fullchain2.pem")] {
            let staged = live.join(format!(".{link}.new"));
            std::os::unix::fs::symlink(archive.join(target), &staged).expect("symlink");
            fs::rename(&staged, live.join(link)).expect("rename");
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while served_to(&server, &pki, "c.example.test").await != renewed.der {
            assert!(std::time::Instant::now() < deadline, "the watch did not pick up the renewal");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Dropping the handle stops (and joins) the thread: later changes are not picked up.
        drop(watch);
        put_pair(l.certs.path(), "late", &pki.issue(&["late.example.test"], KeyKind::EcSec1, Validity::Current));
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!store.names().contains(&"late.example.test".to_string()));
    }

    #[tokio::test]
    async fn inserted_certificates_are_served_and_survive_reloads() {
        let pki = Pki::new();
        let l = layout(&pki);
        let store = CertStore::load(l.certs.path()).expect("load");
        let server = tls_server(store.server_config()).await;
        let d = pki.issue(&["d.example.test", "*.d.example.test"], KeyKind::EcPkcs8, Validity::Current);
        store.insert("acme", pki.certified_key(&d, &d)).expect("insert");
        assert!(store.names().contains(&"*.d.example.test".to_string()));
        assert_eq!(served_to(&server, &pki, "d.example.test").await, d.der);
        assert_eq!(served_to(&server, &pki, "x.d.example.test").await, d.der);
        store.reload().expect("reload");
        assert_eq!(served_to(&server, &pki, "d.example.test").await, d.der);
        let mismatched = store.insert("acme", pki.certified_key(&d, &l.a));
        assert!(
            matches!(mismatched, Err(TlsError::Certificate { ref reason, .. }) if reason.contains("does not belong"))
        );
        assert_eq!(served_to(&server, &pki, "d.example.test").await, d.der, "a refused insert changes nothing");
    }

    #[tokio::test]
    async fn expired_certificates_are_served_and_reported() {
        let pki = Pki::new();
        let dir = tempfile::tempdir().expect("tempdir");
        let old = pki.issue(&["old.example.test"], KeyKind::EcSec1, Validity::Expired);
        put_pair(dir.path(), "old", &old);
        let (store, report) = CertStore::load_with_report(dir.path()).expect("load");
        assert_eq!(report.loaded.len(), 1);
        assert!(report.loaded[0].expired);
        assert_eq!(report.loaded[0].not_after.map(|t| t.to_rfc3339()).as_deref(), Some("2020-02-01T00:00:00+00:00"));
        let server = tls_server(store.server_config()).await;
        let outcome = handshake(&server, &pki, Hello::to("old.example.test")).await;
        assert_eq!(outcome.presented.as_ref(), Some(&old.der));
        assert!(outcome.result.expect_err("expired").contains("Expired"));
    }

    #[tokio::test]
    async fn an_empty_store_refuses_handshakes() {
        let pki = Pki::new();
        let dir = tempfile::tempdir().expect("tempdir");
        let store = CertStore::load(dir.path()).expect("load");
        assert_eq!(store.names(), Vec::<String>::new());
        let server = tls_server(store.server_config()).await;
        let outcome = handshake(&server, &pki, Hello::to("a.example.test")).await;
        assert_eq!(outcome.presented, None);
        assert!(outcome.result.is_err());
    }

    #[test]
    fn an_unreadable_directory_is_an_error() {
        let missing = Path::new("/nonexistent/deliverous-certs");
        let error = CertStore::load(missing).expect_err("must fail");
        assert!(error.to_string().contains("/nonexistent/deliverous-certs"), "{error}");
    }

    #[test]
    fn names_come_from_the_subject_alt_name() {
        let pki = Pki::new();
        let issued = pki.issue(
            &["A.Example.Test", "IP:127.0.0.1", "*.b.example.test", "a.example.test"],
            KeyKind::EcSec1,
            Validity::Current,
        );
        let summary = x509::summarize(&issued.der).expect("summary");
        assert_eq!(summary.dns_names, ["a.example.test", "*.b.example.test"]);
        let days = (summary.not_after.expect("not after") - Utc::now()).num_days();
        assert!((29..=30).contains(&days), "{days}");
        // No input makes it panic or read out of bounds: every prefix, every byte flipped.
        for len in 0..issued.der.len() {
            let _ = x509::summarize(&issued.der[..len]);
        }
        let mut bytes = issued.der.clone();
        for i in 0..bytes.len() {
            for flip in [0x01, 0x80, 0xff] {
                bytes[i] ^= flip;
                let _ = x509::summarize(&bytes);
                bytes[i] ^= flip;
            }
        }
    }

    #[test]
    fn key_modes() {
        for ok in [0o600, 0o640, 0o400, 0o440, 0o700] {
            assert!(!key_mode_too_open(ok), "{ok:o}");
        }
        for open in [0o644, 0o660, 0o604, 0o666, 0o601] {
            assert!(key_mode_too_open(open), "{open:o}");
        }
    }
}
