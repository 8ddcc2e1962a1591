//! Image references: parsing the names operators type (`busybox`, `ghcr.io/o/r@sha256:…`) into
//! their fully qualified Docker form, and deciding how a registry host is reached.

use std::fmt;
use std::net::IpAddr;

use crate::Error;

/// The registry Docker assumes when a name has no host part.
pub const DEFAULT_REGISTRY: &str = "docker.io";
const DEFAULT_TAG: &str = "latest";
/// Docker's limit on the length of `registry/repository`.
const MAX_NAME_LEN: usize = 255;

/// A fully qualified image reference: `registry/repository[:tag][@digest]`.
///
/// Parsing applies Docker's normalisation, so `busybox` and `docker.io/library/busybox:latest`
/// are the same reference. A reference always has a tag or a digest (or both).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Reference {
    registry: String,
    repository: String,
    tag: Option<String>,
    digest: Option<String>,
}

impl Reference {
    /// Parses and normalises `s`. Errors say which part is wrong.
    pub fn parse(s: &str) -> Result<Reference, Error> {
        let invalid = |reason: String| Error::InvalidReference { input: s.to_string(), reason };
        if s.is_empty() {
            return Err(invalid("it is empty; expected e.g. \"busybox\" or \"ghcr.io/owner/app:1.0\"".into()));
        }
        if s.trim() != s {
            return Err(invalid("it has leading or trailing whitespace".into()));
        }

        let (name_and_tag, digest) = match s.split_once('@') {
            Some((n, d)) => (n, Some(parse_digest(d).map_err(invalid)?)),
            None => (s, None),
        };

        // A ':' after the last '/' starts the tag; one before it belongs to a host:port.
        let last_slash = name_and_tag.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match name_and_tag[last_slash..].rfind(':') {
            Some(i) => {
                let at = last_slash + i;
                let tag = &name_and_tag[at + 1..];
                check_tag(tag).map_err(invalid)?;
                (&name_and_tag[..at], Some(tag.to_string()))
            }
            None => (name_and_tag, None),
        };
        if name.is_empty() {
            return Err(invalid("the repository name is empty".into()));
        }

        // Docker's rule: the first component is a registry host if it looks like one.
        let (registry, repository) = match name.split_once('/') {
            Some((first, rest)) if first.contains('.') || first.contains(':') || first == "localhost" => {
                check_registry(first).map_err(invalid)?;
                let registry = if first == "index.docker.io" || first == "registry-1.docker.io" {
                    DEFAULT_REGISTRY
                } else {
                    first
                };
                (registry.to_string(), rest.to_string())
            }
            _ => (DEFAULT_REGISTRY.to_string(), name.to_string()),
        };
        let repository = if registry == DEFAULT_REGISTRY && !repository.contains('/') {
            format!("library/{repository}")
        } else {
            repository
        };
        check_repository(&repository).map_err(invalid)?;
        if registry.len() + 1 + repository.len() > MAX_NAME_LEN {
            return Err(invalid(format!("the name is longer than {MAX_NAME_LEN} characters")));
        }

        let tag = match (tag, &digest) {
            (None, None) => Some(DEFAULT_TAG.to_string()),
            (tag, _) => tag,
        };
        Ok(Reference { registry, repository, tag, digest })
    }

    /// Registry host, with port if any (`docker.io`, `127.0.0.1:5000`).
    pub fn registry(&self) -> &str {
        &self.registry
    }

    /// Repository path inside the registry (`library/busybox`).
    pub fn repository(&self) -> &str {
        &self.repository
    }

    /// Tag, if the reference has one.
    pub fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }

    /// Manifest digest (`sha256:…`), if the reference pins one.
    pub fn digest(&self) -> Option<&str> {
        self.digest.as_deref()
    }

    /// The same repository pinned to `digest` (tag kept for display).
    pub fn with_digest(&self, digest: &str) -> Reference {
        Reference { digest: Some(digest.to_string()), ..self.clone() }
    }

    /// True when the registry is reached over plain HTTP: loopback hosts always (a local test
    /// registry has no certificate), and any host listed in `insecure`.
    pub fn is_plain_http(&self, insecure: &[String]) -> bool {
        is_loopback_host(&self.registry) || insecure.iter().any(|h| h == &self.registry)
    }

    pub(crate) fn to_oci(&self) -> oci_client::Reference {
        match (&self.tag, &self.digest) {
            (Some(t), Some(d)) => oci_client::Reference::with_tag_and_digest(
                self.registry.clone(),
                self.repository.clone(),
                t.clone(),
                d.clone(),
            ),
            (None, Some(d)) => {
                oci_client::Reference::with_digest(self.registry.clone(), self.repository.clone(), d.clone())
            }
            (Some(t), None) => {
                oci_client::Reference::with_tag(self.registry.clone(), self.repository.clone(), t.clone())
            }
            (None, None) => {
                oci_client::Reference::with_tag(self.registry.clone(), self.repository.clone(), DEFAULT_TAG.to_string())
            }
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for Reference {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        Reference::parse(s)
    }
}

/// `localhost`, `127.x.x.x` and `[::1]`, with or without a port.
pub fn is_loopback_host(registry: &str) -> bool {
    let host = if let Some(rest) = registry.strip_prefix('[') {
        rest.split(']').next().unwrap_or(rest)
    } else {
        registry.split(':').next().unwrap_or(registry)
    };
    host == "localhost" || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

fn parse_digest(d: &str) -> Result<String, String> {
    let Some((algo, hex)) = d.split_once(':') else {
        return Err(format!("digest {d:?} has no algorithm; expected \"sha256:<64 hex digits>\""));
    };
    let want = match algo {
        "sha256" => 64,
        "sha512" => 128,
        _ => return Err(format!("digest algorithm {algo:?} is not supported; expected sha256 or sha512")),
    };
    if hex.len() != want || !hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        return Err(format!("digest {d:?} is malformed; expected {algo}: followed by {want} lowercase hex digits"));
    }
    Ok(d.to_string())
}

fn check_tag(tag: &str) -> Result<(), String> {
    let ok_first = tag.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_');
    let ok_rest = tag.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-');
    if !ok_first || !ok_rest || tag.len() > 128 {
        return Err(format!(
            "tag {tag:?} is invalid; a tag is 1-128 letters, digits, '_', '.' or '-' and does not start with '.' or '-'"
        ));
    }
    Ok(())
}

fn check_registry(host: &str) -> Result<(), String> {
    let (name, port) = if let Some(rest) = host.strip_prefix('[') {
        // IPv6 literal: "[::1]:5000"
        let Some((addr, after)) = rest.split_once(']') else {
            return Err(format!("registry {host:?} has an unclosed '['"));
        };
        if addr.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(format!("registry {host:?} is not a valid IPv6 address"));
        }
        match after {
            "" => return Ok(()),
            p => match p.strip_prefix(':') {
                Some(port) => ("", Some(port)),
                None => return Err(format!("registry {host:?}: expected ':port' after ']'")),
            },
        }
    } else {
        match host.split_once(':') {
            Some((n, p)) => (n, Some(p)),
            None => (host, None),
        }
    };
    if let Some(port) = port {
        if port.parse::<u16>().map_or(true, |p| p == 0) {
            return Err(format!("registry {host:?} has an invalid port {port:?}; expected a number 1-65535"));
        }
    }
    if !name.is_empty() || !host.starts_with('[') {
        let label_ok = |l: &str| {
            !l.is_empty()
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        };
        if !name.split('.').all(label_ok) {
            return Err(format!("registry host {name:?} is invalid; expected a host name or IP address"));
        }
    }
    Ok(())
}

fn check_repository(repo: &str) -> Result<(), String> {
    for component in repo.split('/') {
        if component.is_empty() {
            return Err(format!("repository {repo:?} has an empty path component"));
        }
        if component.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(format!("repository {repo:?} must be lowercase"));
        }
        if !component_ok(component) {
            return Err(format!(
                "repository component {component:?} is invalid; expected lowercase letters and \
                 digits, separated by '.', '_', '__' or dashes"
            ));
        }
    }
    Ok(())
}

/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`
fn component_ok(c: &str) -> bool {
    let b = c.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    let mut i = 0;
    loop {
        let start = i;
        while i < b.len() && alnum(b[i]) {
            i += 1;
        }
        if i == start {
            return false;
        }
        if i == b.len() {
            return true;
        }
        // separator
        match b[i] {
            b'.' => i += 1,
            b'_' => {
                i += 1;
                if i < b.len() && b[i] == b'_' {
                    i += 1;
                }
            }
            b'-' => {
                while i < b.len() && b[i] == b'-' {
                    i += 1;
                }
            }
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn normalises_docker_names() {
        let table: &[(&str, &str)] = &[
            ("busybox", "docker.io/library/busybox:latest"),
            ("busybox:1.36", "docker.io/library/busybox:1.36"),
            ("user/app:tag", "docker.io/user/app:tag"),
            ("docker.io/busybox", "docker.io/library/busybox:latest"),
            ("index.docker.io/library/busybox", "docker.io/library/busybox:latest"),
            ("ghcr.io/o/r:v1", "ghcr.io/o/r:v1"),
            ("ghcr.io/o/r", "ghcr.io/o/r:latest"),
            ("127.0.0.1:5000/demo/httpd:1", "127.0.0.1:5000/demo/httpd:1"),
            ("localhost/app", "localhost/app:latest"),
            ("localhost:5000/app", "localhost:5000/app:latest"),
            ("[::1]:5000/a/b:c", "[::1]:5000/a/b:c"),
            ("a.b-c.example:443/x/y/z", "a.b-c.example:443/x/y/z:latest"),
            ("my_app__x/y-z--w.v:T_a.g-1", "docker.io/my_app__x/y-z--w.v:T_a.g-1"),
        ];
        for (input, want) in table {
            let r = Reference::parse(input).unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(r.to_string(), *want, "input {input}");
        }
    }

    #[test]
    fn digests() {
        let r = Reference::parse(&format!("ghcr.io/o/r@{D}")).unwrap();
        assert_eq!(r.registry(), "ghcr.io");
        assert_eq!(r.repository(), "o/r");
        assert_eq!(r.tag(), None);
        assert_eq!(r.digest(), Some(D));
        assert_eq!(r.to_string(), format!("ghcr.io/o/r@{D}"));

        let r = Reference::parse(&format!("host:5000/path/x:tag@{D}")).unwrap();
        assert_eq!(r.registry(), "host:5000");
        assert_eq!(r.repository(), "path/x");
        assert_eq!(r.tag(), Some("tag"));
        assert_eq!(r.digest(), Some(D));
    }

    #[test]
    fn rejects_invalid() {
        let table: &[(&str, &str)] = &[
            ("", "empty"),
            (" busybox", "whitespace"),
            ("Busybox", "lowercase"),
            ("busybox:", "tag"),
            ("busybox:-x", "tag"),
            ("busybox:a/b", "port"), // "busybox:a" reads as a host with a bad port
            ("busybox@sha256:abc", "malformed"),
            ("busybox@md5:abc", "not supported"),
            ("busybox@abc", "no algorithm"),
            ("ghcr.io//x", "empty path"),
            ("ghcr.io/x/", "empty path"),
            ("host:99999/x", "port"),
            ("host:0/x", "port"),
            ("-bad.io/x", "host"),
            ("a/b$c", "invalid"),
            ("a/.b", "invalid"),
            ("a/b-", "invalid"),
            (":tag", "empty"),
        ];
        for (input, needle) in table {
            match Reference::parse(input) {
                Err(e @ Error::InvalidReference { .. }) => {
                    assert!(e.is_user_error());
                    let msg = e.to_string();
                    assert!(msg.contains(needle), "{input:?}: message {msg:?} lacks {needle:?}");
                }
                other => panic!("{input:?}: expected InvalidReference, got {other:?}"),
            }
        }
        let long = format!("ghcr.io/{}", "a".repeat(300));
        assert!(Reference::parse(&long).is_err());
    }

    #[test]
    fn plain_http_hosts() {
        let insecure = vec!["reg.lan:5000".to_string()];
        for (r, want) in [
            ("127.0.0.1:5000/a", true),
            ("127.3.2.1/a", true),
            ("localhost:5000/a", true),
            ("[::1]:5000/a", true),
            ("reg.lan:5000/a", true),
            ("reg.lan/a", false),
            ("ghcr.io/a", false),
            ("busybox", false),
        ] {
            assert_eq!(Reference::parse(r).unwrap().is_plain_http(&insecure), want, "{r}");
        }
    }
}
