//! The app model: what an operator declares (`AppSpec`), the immutable revisions a deploy moves
//! between, and the validation rules for names and values. Persistence is in `store`.

pub mod rollout;
pub mod store;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::proxy::{Balance, HealthCheck, RouteOptions, TcpPort};

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
    /// Extra host names routed to the app, besides `<name>.<domain suffix>`: `example.com`,
    /// `*.example.com`, optionally with a path prefix (`example.com/api`).
    #[serde(default)]
    pub domains: Vec<String>,
    /// How the proxy treats the app's traffic.
    #[serde(default, skip_serializing_if = "Routing::is_default")]
    pub routing: Routing,
    /// Whether an instance that exits on its own is replaced.
    #[serde(default, skip_serializing_if = "RestartPolicy::is_default")]
    pub restart: RestartPolicy,
    /// How deploys replace instances and when an unhealthy instance is replaced.
    #[serde(default, skip_serializing_if = "rollout::Rollout::is_default")]
    pub rollout: rollout::Rollout,
    /// Instances run in a user namespace of their own: container root is an unprivileged host
    /// id of a range kept for the app (daemon flag `--userns-range`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub userns: bool,
}

/// What happens to an instance's slot when the instance exits without being asked to, as
/// Docker's `--restart`. An instance stopped by the operator (stop, scale down, deploy) is never
/// replaced whatever the policy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    /// Always replaced, with backoff.
    #[default]
    Always,
    /// Replaced if it failed: a non-zero exit code, a signal, the OOM killer.
    OnFailure,
    /// Never replaced: the slot stays empty until `app start`, `app scale` or a config change.
    Never,
}

impl RestartPolicy {
    pub fn is_default(&self) -> bool {
        *self == RestartPolicy::Always
    }

    pub fn as_str(self) -> &'static str {
        match self {
            RestartPolicy::Always => "always",
            RestartPolicy::OnFailure => "on-failure",
            RestartPolicy::Never => "never",
        }
    }
}

impl std::str::FromStr for RestartPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().replace('_', "-").as_str() {
            "always" => Ok(RestartPolicy::Always),
            "on-failure" => Ok(RestartPolicy::OnFailure),
            "never" | "no" => Ok(RestartPolicy::Never),
            _ => Err(format!("invalid restart policy {s:?}: expected always, on-failure or never")),
        }
    }
}

impl std::fmt::Display for RestartPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Proxy settings of an app; each `None` is the proxy's default.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Routing {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health: Option<HealthCheck>,
    /// `--health none`: no check at all, not even the image's `HEALTHCHECK` (which is used
    /// whenever the app sets no check of its own).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub health_none: bool,
    pub balance: Balance,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connect_timeout_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub read_timeout_ms: Option<u64>,
    /// 0 = no limit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub total_timeout_ms: Option<u64>,
    /// Largest request body, in bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_body: Option<u64>,
    pub strip_prefix: bool,
    /// Replay a POST/PATCH whose instance died before answering, even if the app may have read
    /// it (off by default: it may then run twice).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub retry_non_idempotent: bool,
    /// How long a leaving instance may finish its requests before it is signalled.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drain_timeout_ms: Option<u64>,
    /// Raw TCP ports published by the app.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tcp: Vec<TcpPort>,
}

/// A leaving instance finishes its requests for at most this long unless its app says otherwise.
pub const DEFAULT_DRAIN_TIMEOUT_MS: u64 = 30_000;
/// Timeouts above a day are typos.
const MAX_TIMEOUT_MS: u64 = 24 * 3600 * 1000;

impl Routing {
    pub fn is_default(&self) -> bool {
        self == &Routing::default()
    }

    /// The proxy's options for the app.
    pub fn options(&self) -> RouteOptions {
        let d = RouteOptions::default();
        RouteOptions {
            balance: self.balance,
            connect_timeout_ms: self.connect_timeout_ms.unwrap_or(d.connect_timeout_ms),
            read_timeout_ms: self.read_timeout_ms.unwrap_or(d.read_timeout_ms),
            total_timeout_ms: self.total_timeout_ms.unwrap_or(d.total_timeout_ms),
            max_body: self.max_body,
            retries: d.retries,
            strip_prefix: self.strip_prefix,
            retry_non_idempotent: self.retry_non_idempotent,
            health: self.health.clone(),
        }
    }

    pub fn drain_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.drain_timeout_ms.unwrap_or(DEFAULT_DRAIN_TIMEOUT_MS))
    }

    pub fn validate(&self) -> Result<(), String> {
        let timeouts = [
            ("connect timeout", self.connect_timeout_ms),
            ("read timeout", self.read_timeout_ms),
            ("total timeout", self.total_timeout_ms),
            ("drain timeout", self.drain_timeout_ms),
        ];
        for (what, t) in timeouts {
            if t.is_some_and(|t| t > MAX_TIMEOUT_MS) {
                return Err(format!("invalid {what}: at most 24h"));
            }
        }
        if self.connect_timeout_ms == Some(0) || self.read_timeout_ms == Some(0) {
            return Err("connect and read timeouts must be above 0".into());
        }
        if let Some(h) = &self.health {
            if let Some(p) = &h.path {
                if !p.starts_with('/') || p.len() > 1024 || p.bytes().any(|b| b.is_ascii_control() || b == b' ') {
                    return Err(format!("invalid health check path {p:?}: expected an absolute path such as /healthz"));
                }
            }
            if !(100..=3_600_000).contains(&h.interval_ms) || !(10..=600_000).contains(&h.timeout_ms) {
                return Err("invalid health check timing: interval 100ms to 1h, timeout 10ms to 10m".into());
            }
            if !(1..=100).contains(&h.rise) || !(1..=100).contains(&h.fall) {
                return Err("invalid health check thresholds: 1 to 100".into());
            }
        }
        let mut seen = Vec::new();
        for p in &self.tcp {
            if p.listen == 0 || p.target == 0 {
                return Err("invalid TCP port 0".into());
            }
            if seen.contains(&p.listen) {
                return Err(format!("TCP port {} is published twice", p.listen));
            }
            seen.push(p.listen);
        }
        Ok(())
    }
}

/// `6379` or `16379:6379` (host port : instance port).
pub fn parse_tcp_port(text: &str) -> Result<TcpPort, String> {
    let bad = || format!("invalid TCP port {text:?}: expected PORT or LISTEN:TARGET, e.g. 6379 or 16379:6379");
    let port = |p: &str| p.trim().parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(bad);
    match text.split_once(':') {
        Some((listen, target)) => Ok(TcpPort { listen: port(listen)?, target: port(target)? }),
        None => port(text).map(|p| TcpPort { listen: p, target: p }),
    }
}

/// `500ms`, `5s`, `2m`, `1h`, or a bare number of seconds.
pub fn parse_duration_ms(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let mult = match unit {
        "ms" => 1.0,
        "" | "s" => 1000.0,
        "m" => 60_000.0,
        "h" => 3_600_000.0,
        _ => return Err(format!("invalid duration {text:?}: expected e.g. 500ms, 5s, 2m or 1h")),
    };
    let value: f64 = num.parse().map_err(|_| format!("invalid duration {text:?}: expected e.g. 500ms, 5s, 2m"))?;
    let ms = value * mult;
    if !ms.is_finite() || !(0.0..=MAX_TIMEOUT_MS as f64).contains(&ms) {
        return Err(format!("invalid duration {text:?}: 0 to 24h"));
    }
    Ok(ms.round() as u64)
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
            routing: Routing::default(),
            restart: RestartPolicy::default(),
            rollout: rollout::Rollout::default(),
            userns: false,
        }
    }

    /// The two specs differ only in how the proxy routes to the app or in what the supervisor
    /// does after an exit (the restart policy): nothing inside the instances changes, so no new
    /// instances are needed.
    pub fn same_but_routing(&self, other: &AppSpec) -> bool {
        let mut a = self.clone();
        a.routing = other.routing.clone();
        a.domains = other.domains.clone();
        a.restart = other.restart;
        a.rollout = other.rollout.clone();
        &a == other
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

/// `example.com`, `*.example.com`, `example.com/api`.
pub fn validate_domain(entry: &str) -> Result<(), String> {
    let (host, prefix) = crate::proxy::routes::split_host_prefix(entry);
    let domain = host.strip_prefix("*.").unwrap_or(host);
    if !prefix.is_empty()
        && (prefix.len() > 512
            || prefix.contains("//")
            || prefix.bytes().any(|b| !b.is_ascii_graphic() || b == b'?' || b == b'#'))
    {
        return Err(format!("invalid path prefix {prefix:?} in {entry:?}: expected e.g. example.com/api"));
    }
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
        Err(format!(
            "invalid domain {entry:?}: expected a host name such as app.example.com, *.example.com or example.com/api"
        ))
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
        self.rollout.validate()?;
        self.routing.validate()
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
    fn domains_ports_and_durations() {
        for good in ["example.com", "*.example.com", "example.com/api", "*.a.example.com/v1/"] {
            assert!(validate_domain(good).is_ok(), "{good}");
        }
        for bad in ["", "*.", "exa mple.com", "a..b", "example.com/a b", "example.com/a?b", "**.example.com"] {
            assert!(validate_domain(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_tcp_port("6379"), Ok(TcpPort { listen: 6379, target: 6379 }));
        assert_eq!(parse_tcp_port("16379:6379"), Ok(TcpPort { listen: 16379, target: 6379 }));
        assert!(parse_tcp_port("0").is_err());
        assert!(parse_tcp_port("70000").is_err());
        assert_eq!(parse_duration_ms("500ms"), Ok(500));
        assert_eq!(parse_duration_ms("5"), Ok(5000));
        assert_eq!(parse_duration_ms("1.5s"), Ok(1500));
        assert_eq!(parse_duration_ms("2m"), Ok(120_000));
        assert!(parse_duration_ms("5x").is_err());
        assert!(parse_duration_ms("48h").is_err());
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

    #[test]
    fn restart_policies() {
        assert_eq!("on-failure".parse(), Ok(RestartPolicy::OnFailure));
        assert_eq!("On_Failure".parse(), Ok(RestartPolicy::OnFailure));
        assert_eq!("no".parse(), Ok(RestartPolicy::Never));
        assert!("sometimes".parse::<RestartPolicy>().is_err());
        let a = AppSpec::new("r/x:1", 80);
        let b = AppSpec { restart: RestartPolicy::Never, ..a.clone() };
        assert!(a.same_but_routing(&b), "a restart policy change needs no new instances");
        // Specs stored before restart policies existed read as `always`, and equal.
        let old: AppSpec = serde_json::from_str(r#"{"image":"r/x:1","port":80}"#).expect("parse");
        assert_eq!(old, a);
        assert!(!serde_json::to_string(&a).expect("json").contains("restart"));
    }
}
