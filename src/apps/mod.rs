//! The app model: what an operator declares (`AppSpec`), the immutable revisions a deploy moves
//! between, and the validation rules for names and values. Persistence is in `store`.

pub mod store;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Process (and thread) limit of an instance unless its app sets one, as Docker's `--pids-limit`
/// commonly is in production; a fork bomb stops there.
pub const DEFAULT_PIDS: u32 = 4096;
/// Fewer than this and a shell or a runtime can hardly start.
const MIN_PIDS: u32 = 8;
/// An hour: longer than any sane shutdown, short enough that a typo does not wedge a deploy.
const MAX_STOP_TIMEOUT: u32 = 3600;
/// The kernel's own ceiling (`pid_max` cannot exceed 2^22).
const MAX_PIDS: u32 = 1 << 22;

/// What an operator declares about an app; a revision freezes one of these with an image digest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AppSpec {
    pub image: String,
    pub port: u16,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Memory limit per instance, in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<u64>,
    /// CPU time per instance, in CPUs (0.5 = half a core).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<f64>,
    /// Relative CPU weight under contention: 1 to 10000, 100 being the default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_weight: Option<u32>,
    /// Most processes (and threads) an instance may have; `None` is the default, [`DEFAULT_PIDS`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids: Option<u32>,
    /// Seconds between the stop signal and SIGKILL; `None` is the daemon's `--stop-timeout`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_timeout: Option<u32>,
    /// `NAME:/path[:ro]` named volumes and `/host/path:/path` read-only host paths.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<String>,
    /// Capabilities added to Docker's default set (`NET_ADMIN`, `CAP_SYS_PTRACE`, `ALL`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cap_add: Vec<String>,
    /// Capabilities removed from Docker's default set (`ALL` drops every one).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cap_drop: Vec<String>,
    /// Extra host names routed to the app, besides `<name>.<domain suffix>`.
    #[serde(default)]
    pub domains: Vec<String>,
}

impl AppSpec {
    /// An app running `image`, listening on `port`, with every setting at its default.
    pub fn new(image: impl Into<String>, port: u16) -> AppSpec {
        AppSpec {
            image: image.into(),
            port,
            env: BTreeMap::new(),
            memory: None,
            cpus: None,
            pids: None,
            cpu_weight: None,
            stop_timeout: None,
            volumes: Vec::new(),
            cap_add: Vec::new(),
            cap_drop: Vec::new(),
            domains: Vec::new(),
        }
    }
}

/// An app as stored: its current spec, the desired instance count and whether it should run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct App {
    pub name: String,
    pub spec: AppSpec,
    pub instances: u32,
    pub running: bool,
    /// The revision instances should run, once the app has been started.
    pub revision: Option<u32>,
    pub created_at: String,
    pub updated_at: String,
}

/// An immutable snapshot of an app's image digest and configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Revision {
    pub number: u32,
    pub image: String,
    pub digest: String,
    pub spec: AppSpec,
    pub created_at: String,
}

/// Upper bound on instances per app: a typo (`scale web 70000`) must not exhaust the host.
pub const MAX_INSTANCES: i64 = 1000;

/// App names are DNS labels: they become host names (`web.localhost`) and instance names.
pub fn validate_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 40
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && !name.ends_with('-')
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid app name {name:?}: use 1 to 40 lowercase letters, digits and '-', starting with a letter and not ending with '-'"
        ))
    }
}

pub fn validate_env_key(key: &str) -> Result<(), String> {
    let ok = !key.is_empty()
        && !key.starts_with(|c: char| c.is_ascii_digit())
        && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid environment variable name {key:?}: use letters, digits and '_', not starting with a digit"
        ))
    }
}

pub fn validate_domain(domain: &str) -> Result<(), String> {
    let labels_ok = domain.split('.').all(|l| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
    });
    if !domain.is_empty() && domain.len() <= 253 && labels_ok {
        Ok(())
    } else {
        Err(format!("invalid domain {domain:?}: expected a host name such as app.example.com"))
    }
}

impl AppSpec {
    /// Checks every field; the message names the field and what was expected.
    pub fn validate(&self) -> Result<(), String> {
        deliverous_images::Reference::parse(&self.image).map_err(|e| e.to_string())?;
        if self.port == 0 {
            return Err("invalid port 0: expected the TCP port the app listens on, 1 to 65535".into());
        }
        for (k, v) in &self.env {
            validate_env_key(k)?;
            if v.contains('\0') {
                return Err(format!("environment variable {k} contains a NUL byte"));
            }
        }
        if let Some(m) = self.memory {
            if m < 6 << 20 {
                return Err(format!("memory limit {m} bytes is too small: give at least 6M"));
            }
        }
        if let Some(c) = self.cpus {
            if !(c.is_finite() && c > 0.0 && c <= 1024.0) {
                return Err(format!("invalid cpus {c}: expected a positive number such as 0.5 or 2"));
            }
        }
        if let Some(w) = self.cpu_weight {
            if !(1..=10_000).contains(&w) {
                return Err(format!("invalid cpu weight {w}: expected 1 to 10000 (100 is the default)"));
            }
        }
        if let Some(p) = self.pids {
            if !(MIN_PIDS..=MAX_PIDS).contains(&p) {
                return Err(format!("invalid pids limit {p}: expected {MIN_PIDS} to {MAX_PIDS}"));
            }
        }
        if let Some(t) = self.stop_timeout {
            if t > MAX_STOP_TIMEOUT {
                return Err(format!("invalid stop timeout {t}s: expected 0 to {MAX_STOP_TIMEOUT} seconds"));
            }
        }
        deliverous_runtime::spec::capabilities(&self.cap_add, &self.cap_drop)?;
        let mut targets = Vec::new();
        for v in &self.volumes {
            let volume = deliverous_runtime::volume::parse(v)?;
            if targets.contains(&volume.target) {
                return Err(format!("two volumes are mounted at {}", volume.target));
            }
            targets.push(volume.target);
        }
        for d in &self.domains {
            validate_domain(d)?;
        }
        Ok(())
    }
}

/// Parses `128M`, `1G`, `512k`, `1.5g` or a plain byte count.
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "ki" | "kib" => 1 << 10,
        "m" | "mb" | "mi" | "mib" => 1 << 20,
        "g" | "gb" | "gi" | "gib" => 1 << 30,
        "t" | "tb" | "ti" | "tib" => 1 << 40,
        _ => return Err(format!("invalid size {text:?}: expected a number with an optional unit, such as 128M or 1G")),
    };
    let value: f64 = num.parse().map_err(|_| format!("invalid size {text:?}: expected a number such as 128M"))?;
    let bytes = value * mult as f64;
    if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 {
        return Err(format!("invalid size {text:?}"));
    }
    Ok(bytes as u64)
}

/// `134217728` → `128M`, for display.
pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [(u64, &str); 4] = [(1 << 40, "T"), (1 << 30, "G"), (1 << 20, "M"), (1 << 10, "K")];
    for (size, unit) in UNITS {
        if bytes >= size && bytes % size == 0 {
            return format!("{}{unit}", bytes / size);
        }
    }
    for (size, unit) in UNITS {
        if bytes >= size {
            return format!("{:.1}{unit}", bytes as f64 / size as f64);
        }
    }
    format!("{bytes}B")
}

pub fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for good in ["web", "a", "my-app2"] {
            assert!(validate_name(good).is_ok(), "{good}");
        }
        for bad in ["", "Web", "2web", "web-", "we_b", "web.1", &"a".repeat(41)] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_bytes("128M"), Ok(128 << 20));
        assert_eq!(parse_bytes("1g"), Ok(1 << 30));
        assert_eq!(parse_bytes("1.5G"), Ok(3 << 29));
        assert_eq!(parse_bytes("4096"), Ok(4096));
        assert!(parse_bytes("12X").is_err());
        assert!(parse_bytes("-1M").is_err());
        assert!(parse_bytes("").is_err());
        assert_eq!(format_bytes(128 << 20), "128M");
        assert_eq!(format_bytes(1536), "1.5K");
    }

    #[test]
    fn spec_validation() {
        let mut s = AppSpec {
            memory: Some(128 << 20),
            cpus: Some(0.5),
            domains: vec!["example.com".into()],
            ..AppSpec::new("127.0.0.1:5000/demo/httpd:1", 80)
        };
        assert!(s.validate().is_ok());
        s.env.insert("1BAD".into(), "x".into());
        assert!(s.validate().is_err());
        s.env.clear();
        s.cpus = Some(-1.0);
        assert!(s.validate().is_err());
        s.cpus = None;
        s.image = "UPPER/Case::".into();
        assert!(s.validate().is_err());
    }
}
