//! Registry credentials: finding the ones for a registry host in our `auth.json` and Docker's
//! `config.json` (the first file with an entry wins), writing ours, and checking a user name and
//! secret against a registry before they are stored.
//!
//! Both files use Docker's format, `{"auths": {"HOST": {"auth": base64("user:secret")}}}`; an entry
//! may instead carry `username` and `password`, or an `identitytoken` (an OAuth2 refresh token).
//! Keys are matched by host: a scheme or a path is ignored (`https://ghcr.io/v2/` is `ghcr.io`),
//! and Docker Hub's historical names all mean `docker.io`. Credential helpers (`credsStore`,
//! `credHelpers`) are not run: their entries carry no secret and are skipped.

use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine;
use serde_json::{Map, Value};

use crate::lock::FileLock;
use crate::registry::chain;
use crate::unpack::{sync_dir, unique_suffix};
use crate::{is_loopback_host, Error, DEFAULT_REGISTRY};

/// Our credentials file, written by [`store_credentials`] (`deliverous registry login`).
pub const DEFAULT_AUTH_FILE: &str = "/etc/deliverous/auth.json";

/// Names under which Docker and its tools have stored Docker Hub's credentials.
const DOCKER_HUB_ALIASES: &[&str] =
    &["docker.io", "index.docker.io", "registry-1.docker.io", "registry.hub.docker.com"];

/// Where Docker Hub's registry API answers (`docker.io` itself is the website).
const DOCKER_HUB_API: &str = "registry-1.docker.io";

/// The user name Docker writes next to an identity token when it has none.
const TOKEN_USER: &str = "<token>";

/// Bounds for a login check: a registry that does not answer in this time is unreachable.
const LOGIN_TIMEOUT: Duration = Duration::from_secs(30);

/// What proves the user's identity to the registry.
#[derive(Clone, PartialEq, Eq)]
pub enum Secret {
    /// A password or a personal access token, sent with HTTP basic authentication.
    Password(String),
    /// An OAuth2 refresh token (`identitytoken`), exchanged at the registry's token service for
    /// an access token.
    IdentityToken(String),
}

impl fmt::Debug for Secret {
    // Never print a secret, even in a debug log.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Secret::Password(_) => "Password(<redacted>)",
            Secret::IdentityToken(_) => "IdentityToken(<redacted>)",
        })
    }
}

/// Credentials for one registry, and where they were found.
#[derive(Clone, PartialEq, Eq)]
pub struct Credential {
    /// User name (`<token>` for an identity token stored without one).
    pub username: String,
    /// Password, access token or identity token.
    pub secret: Secret,
    /// The file they were read from, for error messages.
    pub file: PathBuf,
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credential")
            .field("username", &self.username)
            .field("secret", &self.secret)
            .field("file", &self.file)
            .finish()
    }
}

/// The credentials files to read, in order; the first one with an entry for a host wins.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CredentialFiles {
    files: Vec<PathBuf>,
}

impl Default for CredentialFiles {
    /// [`DEFAULT_AUTH_FILE`], then Docker's `config.json` (in `$DOCKER_CONFIG`, else in
    /// `$HOME/.docker`).
    fn default() -> Self {
        let mut files = vec![PathBuf::from(DEFAULT_AUTH_FILE)];
        files.extend(docker_config_file());
        CredentialFiles { files }
    }
}

/// Docker's client configuration file, as the `docker` command finds it.
pub fn docker_config_file() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("DOCKER_CONFIG").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(dir).join("config.json"));
    }
    std::env::var_os("HOME").filter(|h| !h.is_empty()).map(|h| PathBuf::from(h).join(".docker").join("config.json"))
}

impl CredentialFiles {
    /// Reads exactly these files, in this order.
    pub fn new(files: impl IntoIterator<Item = PathBuf>) -> Self {
        CredentialFiles { files: files.into_iter().collect() }
    }

    /// No files: every pull is anonymous.
    pub fn none() -> Self {
        CredentialFiles { files: Vec::new() }
    }

    /// The files read, in order.
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    /// The credentials for `registry` (a host as written in references, e.g. `ghcr.io` or
    /// `127.0.0.1:5000`), or `None` when no file has an entry with a secret. Missing files are
    /// skipped; a file that exists but cannot be read or parsed is an error naming it, and so is
    /// a malformed entry for this host (entries for other hosts are not looked at).
    pub fn lookup(&self, registry: &str) -> Result<Option<Credential>, Error> {
        let host = normalize_host(registry);
        for file in &self.files {
            let Some(document) = read_document(file)? else { continue };
            let auths = auths_of(&document, file)?;
            let mut entries: Vec<(&String, &Value)> = auths.iter().filter(|(k, _)| normalize_host(k) == host).collect();
            // The key spelled exactly as the host first, then the others in a stable order.
            entries.sort_by_key(|(k, _)| (k.as_str() != host, k.as_str()));
            for (key, entry) in entries {
                if let Some(credential) = parse_entry(key, entry, file)? {
                    return Ok(Some(credential));
                }
            }
        }
        Ok(None)
    }
}

/// The registry host a credentials key stands for: scheme and path dropped, lowercased, Docker
/// Hub's names folded into `docker.io`.
pub fn normalize_host(key: &str) -> String {
    let key = key.trim();
    let rest = key.split_once("://").map_or(key, |(_, rest)| rest);
    let host = rest.split('/').next().unwrap_or(rest).to_ascii_lowercase();
    if DOCKER_HUB_ALIASES.contains(&host.as_str()) {
        DEFAULT_REGISTRY.to_string()
    } else {
        host
    }
}

fn file_error(file: &Path, reason: impl Into<String>) -> Error {
    Error::CredentialsFile { file: file.display().to_string(), reason: reason.into() }
}

/// The file's top-level object; `None` when the file does not exist or is blank.
fn read_document(file: &Path) -> Result<Option<Map<String, Value>>, Error> {
    let text = match fs::read_to_string(file) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(file_error(file, format!("cannot read it: {e}"))),
    };
    if text.trim().is_empty() {
        return Ok(None);
    }
    match serde_json::from_str::<Value>(&text) {
        Ok(Value::Object(map)) => Ok(Some(map)),
        Ok(_) => Err(file_error(file, "expected a JSON object like {\"auths\": {\"HOST\": {\"auth\": \"...\"}}}")),
        Err(e) => Err(file_error(file, format!("it is not valid JSON ({e})"))),
    }
}

fn auths_of<'d>(document: &'d Map<String, Value>, file: &Path) -> Result<&'d Map<String, Value>, Error> {
    static EMPTY: std::sync::OnceLock<Map<String, Value>> = std::sync::OnceLock::new();
    match document.get("auths") {
        None | Some(Value::Null) => Ok(EMPTY.get_or_init(Map::new)),
        Some(Value::Object(auths)) => Ok(auths),
        Some(_) => Err(file_error(file, "\"auths\" is not an object of registry hosts")),
    }
}

/// Base64 as Docker writes it (standard alphabet), padding optional.
fn base64_engine() -> base64::engine::GeneralPurpose {
    use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
    GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
    )
}

/// One `auths` entry. `None` for an entry without a secret (Docker writes `{}` when a credential
/// helper holds the secret). Error messages never quote the secret.
fn parse_entry(key: &str, entry: &Value, file: &Path) -> Result<Option<Credential>, Error> {
    let Value::Object(fields) = entry else {
        return Err(file_error(file, format!("the entry for {key:?} is not an object")));
    };
    let field = |name: &str| -> Result<Option<String>, Error> {
        match fields.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) if s.is_empty() => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(file_error(file, format!("\"{name}\" of the entry for {key:?} is not a string"))),
        }
    };
    let mut username = field("username")?;
    let mut password = field("password")?;
    if let Some(auth) = field("auth")? {
        let expected = "expected base64 of \"user:password\"";
        let bytes = base64_engine().decode(auth.trim()).map_err(|e| {
            file_error(file, format!("\"auth\" of the entry for {key:?} is not valid base64 ({e}); {expected}"))
        })?;
        let text = String::from_utf8(bytes).map_err(|_| {
            file_error(
                file,
                format!("\"auth\" of the entry for {key:?} decodes to bytes that are not text; {expected}"),
            )
        })?;
        let Some((user, pass)) = text.split_once(':') else {
            return Err(file_error(
                file,
                format!("\"auth\" of the entry for {key:?} decodes to text without a colon; {expected}"),
            ));
        };
        username = Some(user.to_string()).filter(|u| !u.is_empty());
        password = Some(pass.to_string()).filter(|p| !p.is_empty());
    }
    if let Some(token) = field("identitytoken")? {
        return Ok(Some(Credential {
            username: username.unwrap_or_else(|| TOKEN_USER.to_string()),
            secret: Secret::IdentityToken(token),
            file: file.to_path_buf(),
        }));
    }
    match (username, password) {
        (Some(username), Some(password)) => {
            Ok(Some(Credential { username, secret: Secret::Password(password), file: file.to_path_buf() }))
        }
        (None, None) => Ok(None),
        (Some(_), None) => Err(file_error(file, format!("the entry for {key:?} has a user name but no password"))),
        (None, Some(_)) => Err(file_error(file, format!("the entry for {key:?} has a password but no user name"))),
    }
}

/// Checks what [`store_credentials`] and [`check_login`] are given; returns the normalised host.
fn validate(host: &str, username: &str, secret: &str) -> Result<String, Error> {
    let invalid = |reason: String| Error::InvalidCredentials { reason };
    let normalized = normalize_host(host);
    if normalized.is_empty() || normalized.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(invalid(format!("registry host {host:?} is not a host name; expected e.g. \"ghcr.io\"")));
    }
    if username.is_empty() {
        return Err(invalid("the user name is empty".into()));
    }
    if username.contains(':') {
        return Err(invalid(format!(
            "user name {username:?} contains a colon, which HTTP basic authentication cannot carry"
        )));
    }
    if username.chars().any(char::is_control) {
        return Err(invalid("the user name contains control characters".into()));
    }
    if secret.is_empty() {
        return Err(invalid("the password or token is empty".into()));
    }
    Ok(normalized)
}

/// Writes (or replaces) the credentials for `host` in `file`, in Docker's format, keeping every
/// other entry and key. The file is replaced atomically (a new file, mode 0600 from its creation,
/// renamed over the old one), its directory is created mode 0700 if missing, and concurrent
/// writers (other processes too) take turns. Entries that name the same host differently
/// (`https://HOST`, Docker Hub's aliases) are removed, so the new one is the one used.
///
/// A file that exists but is not valid JSON is left untouched and is an error: fix or remove it.
pub fn store_credentials(file: &Path, host: &str, username: &str, secret: &str) -> Result<(), Error> {
    let host = validate(host, username, secret)?;
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{username}:{secret}"));
    update_file(file, |auths| {
        auths.retain(|key, _| normalize_host(key) != host);
        auths.insert(host.clone(), serde_json::json!({ "auth": auth }));
        true
    })
}

/// The registries `file` holds credentials for, each with its user name (never the secret),
/// sorted by host (`deliverous registry ls`). A missing file holds none; entries without a
/// secret (a credential helper's) are left out.
pub fn list_credentials(file: &Path) -> Result<Vec<(String, String)>, Error> {
    let Some(document) = read_document(file)? else { return Ok(Vec::new()) };
    let mut out = Vec::new();
    for (key, entry) in auths_of(&document, file)? {
        if let Some(credential) = parse_entry(key, entry, file)? {
            out.push((normalize_host(key), credential.username));
        }
    }
    out.sort();
    out.dedup_by(|a, b| a.0 == b.0);
    Ok(out)
}

/// Removes every entry for `host` from `file` (`deliverous registry logout`). Returns whether
/// there was one; the file is only rewritten then.
pub fn remove_credentials(file: &Path, host: &str) -> Result<bool, Error> {
    let host = normalize_host(host);
    let mut removed = false;
    update_file(file, |auths| {
        let before = auths.len();
        auths.retain(|key, _| normalize_host(key) != host);
        removed = auths.len() != before;
        removed
    })?;
    Ok(removed)
}

/// Read-modify-write of a credentials file under its lock. `change` edits the `auths` object and
/// says whether anything changed.
fn update_file(file: &Path, change: impl FnOnce(&mut Map<String, Value>) -> bool) -> Result<(), Error> {
    let io_error = |what: &str, e: io::Error| Error::io(format!("{what} {}", file.display()), e);
    let dir = match file.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = file
        .file_name()
        .ok_or_else(|| Error::InvalidCredentials { reason: format!("{} is not a file path", file.display()) })?
        .to_string_lossy()
        .into_owned();
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .map_err(|e| io_error("creating the directory of", e))?;
    let _lock = FileLock::acquire(&dir.join(format!(".{name}.lock")))?;

    let mut document = read_document(file)?.unwrap_or_default();
    let mut auths = auths_of(&document, file)?.clone();
    if !change(&mut auths) {
        return Ok(());
    }
    document.insert("auths".into(), Value::Object(auths));
    let mut text = serde_json::to_vec_pretty(&Value::Object(document))
        .map_err(|e| io_error("serialising", io::Error::other(e)))?;
    text.push(b'\n');

    let tmp = dir.join(format!(".{name}.tmp-{}", unique_suffix()));
    let written = (|| {
        let mut f = fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
        f.write_all(&text)?;
        f.sync_all()?;
        fs::rename(&tmp, file)
    })();
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(io_error("writing", e));
    }
    sync_dir(&dir)
}

/// What a login check found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoginCheck {
    /// The registry (or its token service) accepted the user name and secret.
    Accepted,
    /// The registry lets anyone in: the credentials were not checked, and pulls need none.
    NotRequired,
}

/// Checks `username` and `secret` against the registry at `host`, as `docker login` does: `GET
/// /v2/`; on a basic challenge, the same with the credentials; on a bearer challenge, a token
/// request to its realm with the credentials. Plain HTTP is used when `insecure` is set or the
/// host is a loopback address.
///
/// Wrong credentials are [`Error::LoginFailed`] (a user error); a registry that cannot be reached
/// is [`Error::Unreachable`]; anything else the registry answers is [`Error::Registry`].
pub async fn check_login(host: &str, username: &str, secret: &str, insecure: bool) -> Result<LoginCheck, Error> {
    let registry = validate(host, username, secret)?;
    let plain_http = insecure || is_loopback_host(&registry);
    let api_host = if registry == DEFAULT_REGISTRY { DOCKER_HUB_API } else { registry.as_str() };
    let url = format!("{}://{api_host}/v2/", if plain_http { "http" } else { "https" });
    let http = http_client(&registry)?;
    let registry_error = |message: String| Error::Registry { registry: registry.clone(), message };
    let unreachable = |e: reqwest::Error| Error::Unreachable { registry: registry.clone(), reason: chain(&e) };
    let rejected =
        |reason: String| Error::LoginFailed { registry: registry.clone(), username: username.to_string(), reason };

    let first = http.get(&url).send().await.map_err(unreachable)?;
    let status = first.status();
    if status.is_success() {
        return Ok(LoginCheck::NotRequired);
    }
    if status != reqwest::StatusCode::UNAUTHORIZED {
        return Err(registry_error(format!("GET {url} answered {status}; expected 401 or 200 from a registry")));
    }
    let Some(bearer) = bearer_challenge(&first) else {
        // A basic challenge (or none): the registry checks the credentials itself.
        let second = http.get(&url).basic_auth(username, Some(secret)).send().await.map_err(unreachable)?;
        let status = second.status();
        return match status {
            s if s.is_success() => Ok(LoginCheck::Accepted),
            reqwest::StatusCode::UNAUTHORIZED | reqwest::StatusCode::FORBIDDEN => {
                Err(rejected(format!("GET {url} with these credentials answered {status}")))
            }
            s => Err(registry_error(format!("GET {url} with credentials answered {s}"))),
        };
    };
    let realm = token_realm(&bearer, plain_http).map_err(registry_error)?;
    let mut query = vec![("account", username), ("client_id", "deliverous"), ("offline_token", "true")];
    if let Some(service) = bearer.param("service") {
        query.push(("service", service));
    }
    let answer =
        http.get(realm.clone()).query(&query).basic_auth(username, Some(secret)).send().await.map_err(unreachable)?;
    let status = answer.status();
    let body = answer.text().await.unwrap_or_default();
    match status {
        s if s.is_success() => {
            let token: Option<TokenAnswer> = serde_json::from_str(&body).ok();
            if token.is_some_and(|t| t.token().is_some()) {
                Ok(LoginCheck::Accepted)
            } else {
                Err(registry_error(format!("token service {realm} answered {status} without a token")))
            }
        }
        reqwest::StatusCode::UNAUTHORIZED | reqwest::StatusCode::FORBIDDEN => {
            Err(rejected(format!("token service {realm} answered {status}{}", excerpt(&body))))
        }
        s => Err(registry_error(format!("token service {realm} answered {s}{}", excerpt(&body)))),
    }
}

/// Exchanges an identity token (OAuth2 refresh token) for an access token good for pulling
/// `repository`, as Docker does: the registry's bearer challenge names the token service.
pub(crate) async fn access_token(
    registry: &str,
    repository: &str,
    identity_token: &str,
    plain_http: bool,
) -> Result<String, Error> {
    let api_host = if registry == DEFAULT_REGISTRY { DOCKER_HUB_API } else { registry };
    let url = format!("{}://{api_host}/v2/", if plain_http { "http" } else { "https" });
    let http = http_client(registry)?;
    let registry_error = |message: String| Error::Registry { registry: registry.to_string(), message };
    let unreachable = |e: reqwest::Error| Error::Unreachable { registry: registry.to_string(), reason: chain(&e) };
    let first = http.get(&url).send().await.map_err(unreachable)?;
    let Some(bearer) = bearer_challenge(&first) else {
        return Err(registry_error(format!(
            "GET {url} answered {} without a bearer challenge; an identity token needs a registry with a token \
             service: log in with a password or access token instead",
            first.status()
        )));
    };
    let realm = token_realm(&bearer, plain_http).map_err(registry_error)?;
    let scope = format!("repository:{repository}:pull");
    let mut form = vec![
        ("grant_type", "refresh_token"),
        ("refresh_token", identity_token),
        ("client_id", "deliverous"),
        ("scope", scope.as_str()),
    ];
    if let Some(service) = bearer.param("service") {
        form.push(("service", service));
    }
    let answer = http.post(realm.clone()).form(&form).send().await.map_err(unreachable)?;
    let status = answer.status();
    let body = answer.text().await.unwrap_or_default();
    if status == reqwest::StatusCode::UNAUTHORIZED || status == reqwest::StatusCode::FORBIDDEN {
        return Err(Error::Unauthorized {
            reference: format!("{registry}/{repository}"),
            registry: registry.to_string(),
            reason: format!("token service {realm} refused the identity token ({status}){}", excerpt(&body)),
        });
    }
    if !status.is_success() {
        return Err(registry_error(format!("token service {realm} answered {status}{}", excerpt(&body))));
    }
    serde_json::from_str::<TokenAnswer>(&body)
        .ok()
        .and_then(|t| t.token().map(str::to_string))
        .ok_or_else(|| registry_error(format!("token service {realm} answered {status} without an access token")))
}

fn http_client(registry: &str) -> Result<reqwest::Client, Error> {
    reqwest::Client::builder().connect_timeout(Duration::from_secs(15)).timeout(LOGIN_TIMEOUT).build().map_err(|e| {
        Error::Registry { registry: registry.to_string(), message: format!("cannot build an HTTP client: {e}") }
    })
}

/// The `Bearer` challenge of a response's `WWW-Authenticate` headers, if it has one.
fn bearer_challenge(response: &reqwest::Response) -> Option<Challenge> {
    response
        .headers()
        .get_all(reqwest::header::WWW_AUTHENTICATE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(parse_challenges)
        .find(|c| c.scheme.eq_ignore_ascii_case("bearer"))
}

/// The realm of a bearer challenge, refusing to send credentials to a plain-HTTP token service
/// unless the registry itself is plain HTTP.
fn token_realm(bearer: &Challenge, plain_http: bool) -> Result<reqwest::Url, String> {
    let realm = bearer.param("realm").ok_or("the registry's bearer challenge names no realm (token service)")?;
    let url = reqwest::Url::parse(realm).map_err(|e| format!("token service {realm:?} is not a URL: {e}"))?;
    match url.scheme() {
        "https" => Ok(url),
        "http" if plain_http => Ok(url),
        _ => Err(format!("token service {realm} is not HTTPS; refusing to send credentials to it")),
    }
}

/// A token service's answer: Docker's `token`, OAuth2's `access_token`, or both.
#[derive(serde::Deserialize)]
struct TokenAnswer {
    token: Option<String>,
    access_token: Option<String>,
}

impl TokenAnswer {
    fn token(&self) -> Option<&str> {
        self.token.as_deref().or(self.access_token.as_deref()).filter(|t| !t.is_empty())
    }
}

/// The start of an error body, for messages.
fn excerpt(body: &str) -> String {
    let body = body.trim();
    if body.is_empty() {
        return String::new();
    }
    let end = (0..=body.len().min(200)).rev().find(|&i| body.is_char_boundary(i)).unwrap_or(0);
    format!(": {}", &body[..end])
}

/// One challenge of a `WWW-Authenticate` header.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Challenge {
    pub(crate) scheme: String,
    pub(crate) params: Vec<(String, String)>,
}

impl Challenge {
    pub(crate) fn param(&self, name: &str) -> Option<&str> {
        self.params.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// Parses `Bearer realm="https://auth/token",service="reg",scope="…", Basic realm="x"` (RFC 9110
/// challenges with auth-params; a token68 is kept as a parameter with an empty name).
pub(crate) fn parse_challenges(header: &str) -> Vec<Challenge> {
    let bytes = header.as_bytes();
    let mut pos = 0;
    let is_token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    let skip = |pos: &mut usize, set: &[u8]| {
        while *pos < bytes.len() && set.contains(&bytes[*pos]) {
            *pos += 1;
        }
    };
    let token = |pos: &mut usize| {
        let start = *pos;
        while *pos < bytes.len() && is_token(bytes[*pos]) {
            *pos += 1;
        }
        header[start..*pos].to_string()
    };
    let mut out: Vec<Challenge> = Vec::new();
    loop {
        skip(&mut pos, b" \t,");
        let scheme = token(&mut pos);
        if scheme.is_empty() {
            break;
        }
        let mut challenge = Challenge { scheme, params: Vec::new() };
        loop {
            skip(&mut pos, b" \t");
            let start = pos;
            let name = token(&mut pos);
            skip(&mut pos, b" \t");
            if name.is_empty() || pos >= bytes.len() || bytes[pos] != b'=' {
                // Not a parameter: the next challenge's scheme (or the end).
                pos = start;
                break;
            }
            pos += 1;
            if pos < bytes.len() && bytes[pos] == b'=' {
                // token68 padding (`abc==`): keep it whole, it is no parameter of ours.
                skip(&mut pos, b"=");
                challenge.params.push((String::new(), name));
            } else {
                skip(&mut pos, b" \t");
                let value = if pos < bytes.len() && bytes[pos] == b'"' {
                    pos += 1;
                    let mut value = Vec::new();
                    while pos < bytes.len() && bytes[pos] != b'"' {
                        if bytes[pos] == b'\\' && pos + 1 < bytes.len() {
                            pos += 1;
                        }
                        value.push(bytes[pos]);
                        pos += 1;
                    }
                    pos += 1;
                    String::from_utf8_lossy(&value).into_owned()
                } else {
                    // Leniently up to the next separator: servers leave URLs unquoted too.
                    let start = pos;
                    while pos < bytes.len() && !b" \t,".contains(&bytes[pos]) {
                        pos += 1;
                    }
                    header[start..pos].to_string()
                };
                challenge.params.push((name, value));
            }
            skip(&mut pos, b" \t");
            if pos < bytes.len() && bytes[pos] == b',' {
                pos += 1;
            } else {
                break;
            }
        }
        out.push(challenge);
        if pos >= bytes.len() {
            break;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn b64(s: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(s)
    }

    struct Files {
        dir: tempfile::TempDir,
    }

    impl Files {
        fn new() -> Self {
            Files { dir: tempfile::tempdir().unwrap() }
        }
        fn write(&self, name: &str, text: &str) -> PathBuf {
            let p = self.dir.path().join(name);
            fs::write(&p, text).unwrap();
            p
        }
        fn path(&self, name: &str) -> PathBuf {
            self.dir.path().join(name)
        }
    }

    fn password(c: &Credential) -> &str {
        match &c.secret {
            Secret::Password(p) => p,
            Secret::IdentityToken(_) => panic!("expected a password, got {c:?}"),
        }
    }

    #[test]
    fn normalizes_hosts() {
        for (key, host) in [
            ("https://index.docker.io/v1/", "docker.io"),
            ("index.docker.io", "docker.io"),
            ("docker.io", "docker.io"),
            ("registry-1.docker.io", "docker.io"),
            ("http://registry-1.docker.io/v2/", "docker.io"),
            ("https://ghcr.io", "ghcr.io"),
            ("ghcr.io/owner", "ghcr.io"),
            ("GHCR.IO", "ghcr.io"),
            ("127.0.0.1:5000", "127.0.0.1:5000"),
            ("http://127.0.0.1:5000/v2/", "127.0.0.1:5000"),
            ("[::1]:5000", "[::1]:5000"),
            (" quay.io ", "quay.io"),
        ] {
            assert_eq!(normalize_host(key), host, "{key}");
        }
    }

    #[test]
    fn every_docker_hub_spelling_matches_docker_io() {
        for key in ["https://index.docker.io/v1/", "index.docker.io", "docker.io", "registry-1.docker.io"] {
            let f = Files::new();
            let file = f.write("config.json", &format!(r#"{{"auths": {{"{key}": {{"auth": "{}"}}}}}}"#, b64("u:p")));
            let files = CredentialFiles::new([file.clone()]);
            for asked in ["docker.io", "index.docker.io", "registry-1.docker.io"] {
                let c = files.lookup(asked).unwrap().unwrap_or_else(|| panic!("{key} not found for {asked}"));
                assert_eq!((c.username.as_str(), password(&c), c.file.as_path()), ("u", "p", file.as_path()));
            }
            assert_eq!(files.lookup("ghcr.io").unwrap(), None);
        }
    }

    #[test]
    fn entry_forms() {
        let f = Files::new();
        let file = f.write(
            "config.json",
            &format!(
                r#"{{
                "auths": {{
                    "https://ghcr.io": {{"auth": "{}"}},
                    "quay.io": {{"username": "bob", "password": "pw"}},
                    "acr.example": {{"auth": "{}", "identitytoken": "refresh"}},
                    "solo.example": {{"identitytoken": "refresh2"}},
                    "colon.example": {{"auth": "{}"}},
                    "helper.example": {{}},
                    "nopad.example": {{"auth": "{}"}}
                }},
                "credsStore": "desktop",
                "psFormat": "table"
            }}"#,
                b64("alice:s3cret"),
                b64("00000000-0000-0000-0000-000000000000:"),
                b64("u:pa:ss"),
                b64("ab:c").trim_end_matches('='),
            ),
        );
        let files = CredentialFiles::new([file]);
        let c = files.lookup("ghcr.io").unwrap().unwrap();
        assert_eq!((c.username.as_str(), password(&c)), ("alice", "s3cret"));
        let c = files.lookup("quay.io").unwrap().unwrap();
        assert_eq!((c.username.as_str(), password(&c)), ("bob", "pw"));
        let c = files.lookup("acr.example").unwrap().unwrap();
        assert_eq!(c.username, "00000000-0000-0000-0000-000000000000");
        assert_eq!(c.secret, Secret::IdentityToken("refresh".into()));
        let c = files.lookup("solo.example").unwrap().unwrap();
        assert_eq!((c.username.as_str(), &c.secret), ("<token>", &Secret::IdentityToken("refresh2".into())));
        // The password is everything after the first colon.
        assert_eq!(password(&files.lookup("colon.example").unwrap().unwrap()), "pa:ss");
        assert_eq!(password(&files.lookup("nopad.example").unwrap().unwrap()), "c");
        // An entry a credential helper owns carries no secret: anonymous.
        assert_eq!(files.lookup("helper.example").unwrap(), None);
        // The secret never shows in debug output.
        let debug = format!("{:?}", files.lookup("ghcr.io").unwrap().unwrap());
        assert!(!debug.contains("s3cret") && debug.contains("alice"), "{debug}");
    }

    #[test]
    fn first_file_wins_and_missing_files_are_fine() {
        let f = Files::new();
        let ours = f.write("auth.json", &format!(r#"{{"auths": {{"ghcr.io": {{"auth": "{}"}}}}}}"#, b64("ours:1")));
        let docker = f.write(
            "config.json",
            &format!(
                r#"{{"auths": {{"https://ghcr.io": {{"auth": "{}"}}, "quay.io": {{"auth": "{}"}}}}}}"#,
                b64("docker:2"),
                b64("docker:3")
            ),
        );
        let files = CredentialFiles::new([f.path("missing.json"), ours.clone(), docker.clone()]);
        let c = files.lookup("ghcr.io").unwrap().unwrap();
        assert_eq!((c.username.as_str(), c.file.as_path()), ("ours", ours.as_path()));
        let c = files.lookup("quay.io").unwrap().unwrap();
        assert_eq!((c.username.as_str(), c.file.as_path()), ("docker", docker.as_path()));
        assert_eq!(files.lookup("127.0.0.1:5000").unwrap(), None);
        assert_eq!(CredentialFiles::new([f.path("a"), f.path("b")]).lookup("ghcr.io").unwrap(), None);
        assert_eq!(CredentialFiles::none().lookup("ghcr.io").unwrap(), None);
        // Blank files and files without "auths" are empty, not errors.
        let blank = f.write("blank.json", "  \n");
        let other = f.write("other.json", r#"{"credsStore": "pass"}"#);
        assert_eq!(CredentialFiles::new([blank, other]).lookup("ghcr.io").unwrap(), None);
    }

    #[test]
    fn exact_key_wins_over_alias_in_one_file() {
        let f = Files::new();
        let file = f.write(
            "config.json",
            &format!(
                r#"{{"auths": {{"https://index.docker.io/v1/": {{"auth": "{}"}}, "docker.io": {{"auth": "{}"}}}}}}"#,
                b64("old:1"),
                b64("new:2")
            ),
        );
        assert_eq!(CredentialFiles::new([file]).lookup("docker.io").unwrap().unwrap().username, "new");
    }

    fn file_error_text(files: &CredentialFiles, host: &str) -> String {
        match files.lookup(host) {
            Err(e @ Error::CredentialsFile { .. }) => {
                assert!(!e.is_user_error());
                e.to_string()
            }
            other => panic!("expected a credentials file error, got {other:?}"),
        }
    }

    #[test]
    fn bad_entries_are_clear_errors_that_name_the_file() {
        let f = Files::new();
        let cases = [
            (r#"{"auths": {"ghcr.io": {"auth": "%%%not base64"}}}"#.to_string(), "is not valid base64"),
            (format!(r#"{{"auths": {{"ghcr.io": {{"auth": "{}"}}}}}}"#, b64("nocolon")), "without a colon"),
            (r#"{"auths": {"ghcr.io": {"auth": "/w=="}}}"#.to_string(), "not text"),
            (r#"{"auths": {"ghcr.io": {"username": "u"}}}"#.to_string(), "no password"),
            (r#"{"auths": {"ghcr.io": {"auth": 12}}}"#.to_string(), "is not a string"),
            (r#"{"auths": {"ghcr.io": "x"}}"#.to_string(), "is not an object"),
            (r#"{"auths": ["ghcr.io"]}"#.to_string(), "\"auths\" is not an object"),
            (r#"["auths"]"#.to_string(), "expected a JSON object"),
            (r#"{"auths": {"ghcr.io": {"auth": "#.to_string(), "not valid JSON"),
        ];
        for (text, want) in cases {
            let file = f.write("config.json", &text);
            let msg = file_error_text(&CredentialFiles::new([file.clone()]), "https://ghcr.io/");
            assert!(msg.contains(want), "{text}: {msg}");
            assert!(msg.contains(&file.display().to_string()), "{msg}");
            assert!(!msg.contains("nocolon"), "the secret leaked: {msg}");
        }
        // A bad entry for another host does not stop this one.
        let file = f.write(
            "mixed.json",
            &format!(r#"{{"auths": {{"bad.example": {{"auth": "%%"}}, "ghcr.io": {{"auth": "{}"}}}}}}"#, b64("a:b")),
        );
        assert_eq!(CredentialFiles::new([file]).lookup("ghcr.io").unwrap().unwrap().username, "a");
    }

    #[test]
    fn unreadable_file_is_an_error() {
        let f = Files::new();
        // A directory where a file should be: reading fails (even as root).
        fs::create_dir(f.path("auth.json")).unwrap();
        let msg = file_error_text(&CredentialFiles::new([f.path("auth.json")]), "ghcr.io");
        assert!(msg.contains("cannot read it"), "{msg}");
    }

    #[test]
    fn store_creates_updates_and_keeps_other_entries() {
        let f = Files::new();
        let file = f.path("etc/deliverous/auth.json");
        store_credentials(&file, "https://ghcr.io/", "alice", "one").unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&file), 0o600);
        assert_eq!(mode(&f.path("etc/deliverous")), 0o700);
        let files = CredentialFiles::new([file.clone()]);
        let c = files.lookup("ghcr.io").unwrap().unwrap();
        assert_eq!((c.username.as_str(), password(&c)), ("alice", "one"));

        // Another host, an alias of Docker Hub, unknown keys: all kept, the alias replaced.
        let text = format!(
            r#"{{"auths": {{"ghcr.io": {{"auth": "{}"}}, "https://index.docker.io/v1/": {{"auth": "{}"}}}}, "x": 1}}"#,
            b64("alice:one"),
            b64("old:hub")
        );
        fs::write(&file, text).unwrap();
        fs::set_permissions(&file, fs::Permissions::from_mode(0o644)).unwrap();
        store_credentials(&file, "docker.io", "bob", "two").unwrap();
        assert_eq!(mode(&file), 0o600);
        let c = files.lookup("index.docker.io").unwrap().unwrap();
        assert_eq!((c.username.as_str(), password(&c)), ("bob", "two"));
        assert_eq!(files.lookup("ghcr.io").unwrap().unwrap().username, "alice");
        let doc: Value = serde_json::from_slice(&fs::read(&file).unwrap()).unwrap();
        assert_eq!(doc["x"], 1);
        assert_eq!(doc["auths"].as_object().unwrap().len(), 2, "{doc}");

        assert!(remove_credentials(&file, "https://ghcr.io").unwrap());
        assert!(!remove_credentials(&file, "ghcr.io").unwrap());
        assert_eq!(files.lookup("ghcr.io").unwrap(), None);
        assert!(files.lookup("docker.io").unwrap().is_some());
        let leftovers: Vec<_> = fs::read_dir(f.path("etc/deliverous"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(leftovers, vec!["auth.json".to_string()]);
    }

    #[test]
    fn store_refuses_bad_input_and_keeps_a_malformed_file() {
        let f = Files::new();
        let file = f.path("auth.json");
        for (host, user, secret) in
            [("ghcr.io", "", "p"), ("ghcr.io", "a:b", "p"), ("ghcr.io", "u", ""), ("", "u", "p")]
        {
            let e = store_credentials(&file, host, user, secret).unwrap_err();
            assert!(matches!(e, Error::InvalidCredentials { .. }) && e.is_user_error(), "{e}");
        }
        assert!(!file.exists());
        fs::write(&file, "{not json").unwrap();
        let e = store_credentials(&file, "ghcr.io", "u", "p").unwrap_err();
        assert!(e.to_string().contains("not valid JSON"), "{e}");
        assert_eq!(fs::read_to_string(&file).unwrap(), "{not json");
    }

    #[test]
    fn concurrent_stores_lose_nothing() {
        let f = Files::new();
        let file = f.path("auth.json");
        let threads: Vec<_> = (0..8)
            .map(|i| {
                let file = file.clone();
                std::thread::spawn(move || store_credentials(&file, &format!("r{i}.example"), "u", "p").unwrap())
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let files = CredentialFiles::new([file]);
        for i in 0..8 {
            assert!(files.lookup(&format!("r{i}.example")).unwrap().is_some(), "r{i} lost");
        }
    }

    #[test]
    fn parses_challenges() {
        let c = parse_challenges(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/busybox:pull""#,
        );
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].scheme, "Bearer");
        assert_eq!(c[0].param("realm"), Some("https://auth.docker.io/token"));
        assert_eq!(c[0].param("service"), Some("registry.docker.io"));
        assert_eq!(c[0].param("scope"), Some("repository:library/busybox:pull"));

        let c = parse_challenges(r#"Basic realm="Registry Realm""#);
        assert_eq!((c[0].scheme.as_str(), c[0].param("realm")), ("Basic", Some("Registry Realm")));

        let c = parse_challenges(r#"Basic realm="a, \"b\"", Bearer realm=https://t/x , service = s"#);
        assert_eq!(c.len(), 2, "{c:?}");
        assert_eq!(c[0].param("realm"), Some(r#"a, "b""#));
        assert_eq!(c[1].param("realm"), Some("https://t/x"));
        assert_eq!(c[1].param("service"), Some("s"));

        let c = parse_challenges("Negotiate abc==, Bearer realm=\"r\"");
        assert_eq!(c.len(), 2, "{c:?}");
        assert_eq!(c[1].param("realm"), Some("r"));
        assert!(parse_challenges("").is_empty());
        // Unterminated quotes end at the end of the header, without panicking.
        assert_eq!(parse_challenges("Bearer realm=\"x")[0].param("realm"), Some("x"));
    }

    #[test]
    fn token_realm_must_be_https_unless_the_registry_is_plain_http() {
        let bearer = |realm: &str| Challenge { scheme: "Bearer".into(), params: vec![("realm".into(), realm.into())] };
        assert!(token_realm(&bearer("https://auth/token"), false).is_ok());
        assert!(token_realm(&bearer("http://auth/token"), false).unwrap_err().contains("not HTTPS"));
        assert!(token_realm(&bearer("http://auth/token"), true).is_ok());
        assert!(token_realm(&bearer("file:///etc/passwd"), true).is_err());
        let none = Challenge { scheme: "Bearer".into(), params: vec![] };
        assert!(token_realm(&none, false).unwrap_err().contains("no realm"));
    }

    /// A registry whose `/v2/` sends clients to a token service (both on one loopback port), as
    /// Docker Hub, GHCR or Harbor do. Knows user `alice` with password `pw`, and the refresh
    /// token `refresh-ok`. Keeps every request's first line and body.
    struct TokenRegistry {
        addr: String,
        requests: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
        stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
        thread: Option<std::thread::JoinHandle<()>>,
    }

    impl TokenRegistry {
        fn start() -> TokenRegistry {
            use std::io::{BufRead, BufReader, Read};
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = listener.local_addr().unwrap().to_string();
            let requests = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
            let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let (log, halt, realm) = (requests.clone(), stop.clone(), format!("http://{addr}/token"));
            let thread = std::thread::spawn(move || {
                for conn in listener.incoming() {
                    if halt.load(std::sync::atomic::Ordering::SeqCst) {
                        return;
                    }
                    let Ok(mut conn) = conn else { continue };
                    let mut reader = BufReader::new(conn.try_clone().unwrap());
                    let mut first = String::new();
                    reader.read_line(&mut first).unwrap();
                    let (mut auth, mut length) = (String::new(), 0usize);
                    loop {
                        let mut line = String::new();
                        reader.read_line(&mut line).unwrap();
                        let line = line.trim_end();
                        if line.is_empty() {
                            break;
                        }
                        let (name, value) = line.split_once(':').unwrap();
                        match name.to_ascii_lowercase().as_str() {
                            "authorization" => auth = value.trim().to_string(),
                            "content-length" => length = value.trim().parse().unwrap(),
                            _ => {}
                        }
                    }
                    let mut body = vec![0; length];
                    reader.read_exact(&mut body).unwrap();
                    let body = String::from_utf8(body).unwrap();
                    log.lock().unwrap().push(format!("{} {body}", first.trim_end()));
                    let good_basic = format!("Basic {}", b64("alice:pw"));
                    let (status, extra, answer) = if first.starts_with("GET /v2/ ") {
                        let challenge = format!("WWW-Authenticate: Bearer realm=\"{realm}\",service=\"fake\"\r\n");
                        ("401 Unauthorized", challenge, String::from("{}"))
                    } else if first.starts_with("GET /token?") && auth == good_basic {
                        ("200 OK", String::new(), String::from(r#"{"token": "t1"}"#))
                    } else if first.starts_with("POST /token ") && body.contains("refresh_token=refresh-ok") {
                        ("200 OK", String::new(), String::from(r#"{"access_token": "a1"}"#))
                    } else {
                        ("401 Unauthorized", String::new(), String::from(r#"{"details": "bad credentials"}"#))
                    };
                    let _ = write!(
                        conn,
                        "HTTP/1.1 {status}\r\n{extra}Content-Type: application/json\r\nContent-Length: {}\r\n\
                         Connection: close\r\n\r\n{answer}",
                        answer.len()
                    );
                }
            });
            TokenRegistry { addr, requests, stop, thread: Some(thread) }
        }

        fn requests(&self) -> Vec<String> {
            self.requests.lock().unwrap().clone()
        }
    }

    impl Drop for TokenRegistry {
        fn drop(&mut self) {
            self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
            // Wake the accept loop so it sees the flag.
            let _ = std::net::TcpStream::connect(&self.addr);
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
    }

    #[tokio::test]
    async fn login_through_a_token_service() {
        let registry = TokenRegistry::start();
        assert_eq!(check_login(&registry.addr, "alice", "pw", false).await.unwrap(), LoginCheck::Accepted);
        let token_request = registry.requests().into_iter().find(|r| r.starts_with("GET /token?")).unwrap();
        assert!(token_request.contains("service=fake") && token_request.contains("account=alice"), "{token_request}");

        let e = check_login(&registry.addr, "alice", "wrong", false).await.unwrap_err();
        assert!(matches!(e, Error::LoginFailed { .. }) && e.is_user_error(), "{e}");
        assert!(e.to_string().contains("bad credentials"), "{e}");
    }

    #[tokio::test]
    async fn identity_token_is_exchanged_for_an_access_token() {
        let registry = TokenRegistry::start();
        let token = access_token(&registry.addr, "team/app", "refresh-ok", true).await.unwrap();
        assert_eq!(token, "a1");
        let post = registry.requests().into_iter().find(|r| r.starts_with("POST /token ")).unwrap();
        for part in ["grant_type=refresh_token", "scope=repository%3Ateam%2Fapp%3Apull", "service=fake"] {
            assert!(post.contains(part), "{part} missing from {post}");
        }
        let e = access_token(&registry.addr, "team/app", "expired", true).await.unwrap_err();
        assert!(matches!(e, Error::Unauthorized { .. }), "{e}");
    }

    #[tokio::test]
    async fn login_to_nothing_is_unreachable() {
        // A port nobody listens on: bind one, then close it.
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let e = check_login(&format!("127.0.0.1:{port}"), "u", "p", false).await.unwrap_err();
        assert!(matches!(e, Error::Unreachable { .. }) && !e.is_user_error(), "{e}");
        let e = check_login("127.0.0.1:1", "a:b", "p", false).await.unwrap_err();
        assert!(matches!(e, Error::InvalidCredentials { .. }), "{e}");
    }
}
