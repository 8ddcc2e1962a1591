//! Declarative apps: `deliverous apply -f FILE` reads a TOML file of `[apps.NAME]` tables,
//! compares it with what the daemon has, prints the changes and makes them through the ordinary
//! API; `deliverous app export` writes such a file back from the daemon's state.
//!
//! Both sides are turned into the same [`Declared`] shape and put in a canonical form (defaults
//! spelled the way the daemon shows them), so a file that matches the daemon plans no change.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::ops::Range;
use std::process::ExitCode;

use clap::Args;
use hyper::Method;
use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{json, Map, Value};

use super::client::{call, CallError, Host};
use crate::apps::rollout::{self, Rollout};
use crate::apps::{
    self, format_bytes, parse_bytes, parse_duration_ms, parse_tcp_port, AppSpec, RestartPolicy, Routing,
    DEFAULT_DRAIN_TIMEOUT_MS, DEFAULT_PIDS, MAX_INSTANCES,
};
use crate::proxy::{Balance, HealthCheck, RouteOptions, TcpPort};

/// The CPU weight the daemon shows for an app that sets none (the kernel's default).
const DEFAULT_CPU_WEIGHT: u32 = 100;

#[derive(Debug, Args)]
pub struct ApplyArgs {
    /// The TOML file declaring the apps ("-" reads standard input).
    #[arg(short = 'f', long = "file", value_name = "FILE")]
    file: String,
    /// Print the changes, make none.
    #[arg(long)]
    dry_run: bool,
    /// Also remove the apps the daemon has and the file does not declare.
    #[arg(long)]
    prune: bool,
    /// Print the plan as JSON instead of lines.
    #[arg(long)]
    json: bool,
}

// ---------------------------------------------------------------------------------------------
// The file

/// One `[apps.NAME]` table. What is left out is the default, as with `app create`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct AppFile {
    image: String,
    port: u16,
    #[serde(default = "one")]
    instances: u32,
    /// `false`: declared but stopped.
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    running: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    memory: Option<Size>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cpus: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cpu_weight: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pids: Option<u32>,
    /// Seconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    stop_timeout: Option<u32>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    domains: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    volumes: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    cap_add: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    cap_drop: Vec<String>,
    /// `always` (the default), `on-failure` or `never`.
    #[serde(default, skip_serializing_if = "RestartPolicy::is_default")]
    restart: RestartPolicy,
    /// Instances in a user namespace of their own.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    userns: bool,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    env: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    health: Option<HealthFile>,
    #[serde(skip_serializing_if = "Option::is_none")]
    proxy: Option<ProxyFile>,
    #[serde(skip_serializing_if = "Option::is_none")]
    rollout: Option<RolloutFile>,
}

/// `[apps.NAME.rollout]`: how deploys replace instances, when an unhealthy one is replaced.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RolloutFile {
    #[serde(skip_serializing_if = "Option::is_none")]
    surge: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_unavailable: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    deploy_timeout: Option<Millis>,
    #[serde(skip_serializing_if = "Option::is_none")]
    unhealthy_timeout: Option<Millis>,
}

/// `[apps.NAME.health]`: `path = "/healthz"` or `tcp = true`, and optional timing; or
/// `none = true` (no check at all, not even the image's `HEALTHCHECK`, which applies when the
/// table is absent).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct HealthFile {
    #[serde(skip_serializing_if = "Option::is_none")]
    path: Option<String>,
    #[serde(default, skip_serializing_if = "is_false")]
    tcp: bool,
    #[serde(default, skip_serializing_if = "is_false")]
    none: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    interval: Option<Millis>,
    #[serde(skip_serializing_if = "Option::is_none")]
    timeout: Option<Millis>,
    #[serde(skip_serializing_if = "Option::is_none")]
    rise: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    fall: Option<u32>,
}

/// `[apps.NAME.proxy]`: how the proxy treats the app's traffic.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProxyFile {
    #[serde(skip_serializing_if = "Option::is_none")]
    balance: Option<Balance>,
    #[serde(skip_serializing_if = "Option::is_none")]
    connect_timeout: Option<Millis>,
    #[serde(skip_serializing_if = "Option::is_none")]
    read_timeout: Option<Millis>,
    #[serde(skip_serializing_if = "Option::is_none")]
    total_timeout: Option<Millis>,
    #[serde(skip_serializing_if = "Option::is_none")]
    drain_timeout: Option<Millis>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_body: Option<Size>,
    #[serde(default, skip_serializing_if = "is_false")]
    strip_prefix: bool,
    #[serde(default, skip_serializing_if = "is_false")]
    retry_non_idempotent: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    tcp: Vec<Port>,
}

fn one() -> u32 {
    1
}
fn yes() -> bool {
    true
}
fn is_true(b: &bool) -> bool {
    *b
}
fn is_false(b: &bool) -> bool {
    !*b
}

/// A size: `"128M"`, `"1G"` or a number of bytes; read with the daemon's own parser.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Size(u64);

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Size;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a size such as \"128M\" or a number of bytes")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Size, E> {
                parse_bytes(v).map(Size).map_err(E::custom)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Size, E> {
                u64::try_from(v).map(Size).map_err(|_| E::custom(format!("invalid size {v}: expected 0 or more bytes")))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Size, E> {
                Ok(Size(v))
            }
        }
        d.deserialize_any(V)
    }
}

impl Serialize for Size {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let text = format_bytes(self.0);
        // `1.5K` is exact, `976.6K` is not: an odd size is written in bytes.
        if parse_bytes(&text) == Ok(self.0) {
            s.serialize_str(&text)
        } else {
            s.serialize_u64(self.0)
        }
    }
}

/// A duration: `"500ms"`, `"5s"`, `"2m"` or a number of seconds; read with the daemon's parser.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Millis(u64);

impl<'de> Deserialize<'de> for Millis {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Millis;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a duration such as \"500ms\", \"5s\" or \"2m\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Millis, E> {
                parse_duration_ms(v).map(Millis).map_err(E::custom)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Millis, E> {
                self.visit_str(&v.to_string())
            }
        }
        d.deserialize_any(V)
    }
}

impl Serialize for Millis {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&duration_text(self.0))
    }
}

/// A published TCP port: `6379`, `"6379"` or `"16379:6379"`.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Port(TcpPort);

impl<'de> Deserialize<'de> for Port {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Port;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a port such as 6379 or \"16379:6379\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Port, E> {
                parse_tcp_port(v).map(Port).map_err(E::custom)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Port, E> {
                self.visit_str(&v.to_string())
            }
        }
        d.deserialize_any(V)
    }
}

impl Serialize for Port {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&port_text(&self.0))
    }
}

fn duration_text(ms: u64) -> String {
    match ms {
        0 => "0s".into(),
        ms if ms % 3_600_000 == 0 => format!("{}h", ms / 3_600_000),
        ms if ms % 60_000 == 0 => format!("{}m", ms / 60_000),
        ms if ms % 1000 == 0 => format!("{}s", ms / 1000),
        ms => format!("{ms}ms"),
    }
}

fn port_text(p: &TcpPort) -> String {
    if p.listen == p.target {
        p.listen.to_string()
    } else {
        format!("{}:{}", p.listen, p.target)
    }
}

/// An app as both sides are compared: its configuration, instance count and whether it runs.
#[derive(Debug, Clone, PartialEq)]
struct Declared {
    spec: AppSpec,
    instances: u32,
    running: bool,
}

impl AppFile {
    /// The app this table declares, checked with the daemon's own rules.
    fn declared(&self) -> Result<Declared, String> {
        let caps = |list: &[String]| -> Result<Vec<String>, String> {
            let mut out: Vec<String> = Vec::new();
            for c in list {
                let c = deliverous_runtime::spec::normalize_capability(c)?;
                if !out.contains(&c) {
                    out.push(c);
                }
            }
            Ok(out)
        };
        let mut domains: Vec<String> = Vec::new();
        for d in &self.domains {
            let d = d.to_ascii_lowercase();
            if !domains.contains(&d) {
                domains.push(d);
            }
        }
        let spec = AppSpec {
            env: self.env.clone(),
            memory: self.memory.map(|m| m.0).filter(|m| *m > 0),
            cpus: self.cpus.filter(|c| *c != 0.0),
            cpu_weight: self.cpu_weight.filter(|w| *w != 0),
            pids: self.pids.filter(|p| *p != 0),
            // 0 is the daemon's default, as on the command line.
            stop_timeout: self.stop_timeout.filter(|t| *t != 0),
            volumes: self.volumes.clone(),
            cap_add: caps(&self.cap_add)?,
            cap_drop: caps(&self.cap_drop)?,
            domains,
            routing: self.routing()?,
            restart: self.restart,
            userns: self.userns,
            rollout: self.rollout.as_ref().map_or_else(Rollout::default, |r| Rollout {
                surge: r.surge,
                max_unavailable: r.max_unavailable,
                deploy_timeout_ms: r.deploy_timeout.map(|m| m.0),
                unhealthy_timeout_ms: r.unhealthy_timeout.map(|m| m.0),
            }),
            ..AppSpec::new(self.image.clone(), self.port)
        };
        spec.validate()?;
        if i64::from(self.instances) > MAX_INSTANCES {
            return Err(format!("invalid instances {}: expected 0 to {MAX_INSTANCES}", self.instances));
        }
        Ok(Declared { spec, instances: self.instances, running: self.running })
    }

    fn routing(&self) -> Result<Routing, String> {
        let health_none = self.health.as_ref().is_some_and(|h| h.none);
        let health = match &self.health {
            None => None,
            Some(h) if h.none => {
                let timing = h.interval.is_some() || h.timeout.is_some() || h.rise.is_some() || h.fall.is_some();
                if h.path.is_some() || h.tcp || timing {
                    return Err("health: none = true takes no path, tcp or timing".into());
                }
                None
            }
            Some(h) => {
                let path = match (&h.path, h.tcp) {
                    (Some(p), false) => Some(p.clone()),
                    (None, true) => None,
                    _ => return Err("health: give either path = \"/healthz\", tcp = true or none = true".into()),
                };
                let d = HealthCheck::http("/");
                Some(HealthCheck {
                    path,
                    interval_ms: h.interval.map_or(d.interval_ms, |m| m.0),
                    timeout_ms: h.timeout.map_or(d.timeout_ms, |m| m.0),
                    rise: h.rise.unwrap_or(d.rise),
                    fall: h.fall.unwrap_or(d.fall),
                })
            }
        };
        let p = self.proxy.clone().unwrap_or_default();
        Ok(Routing {
            health,
            health_none,
            balance: p.balance.unwrap_or_default(),
            connect_timeout_ms: p.connect_timeout.map(|m| m.0),
            read_timeout_ms: p.read_timeout.map(|m| m.0),
            total_timeout_ms: p.total_timeout.map(|m| m.0),
            max_body: p.max_body.map(|s| s.0).filter(|b| *b > 0),
            strip_prefix: p.strip_prefix,
            retry_non_idempotent: p.retry_non_idempotent,
            drain_timeout_ms: p.drain_timeout.map(|m| m.0),
            tcp: p.tcp.iter().map(|p| p.0).collect(),
        })
    }

    /// The table that declares `d` (in canonical form: defaults left out).
    fn of(d: &Declared) -> AppFile {
        let s = canonical(&d.spec);
        let defaults = HealthCheck::http("/");
        let none =
            HealthFile { path: None, tcp: false, none: true, interval: None, timeout: None, rise: None, fall: None };
        let health = s.routing.health.as_ref().map(|h| HealthFile {
            path: h.path.clone(),
            tcp: h.path.is_none(),
            none: false,
            interval: (h.interval_ms != defaults.interval_ms).then_some(Millis(h.interval_ms)),
            timeout: (h.timeout_ms != defaults.timeout_ms).then_some(Millis(h.timeout_ms)),
            rise: (h.rise != defaults.rise).then_some(h.rise),
            fall: (h.fall != defaults.fall).then_some(h.fall),
        });
        let health = health.or(s.routing.health_none.then_some(none));
        let r = &s.routing;
        let proxy = ProxyFile {
            balance: (r.balance != Balance::default()).then_some(r.balance),
            connect_timeout: r.connect_timeout_ms.map(Millis),
            read_timeout: r.read_timeout_ms.map(Millis),
            total_timeout: r.total_timeout_ms.map(Millis),
            drain_timeout: r.drain_timeout_ms.map(Millis),
            max_body: r.max_body.map(Size),
            strip_prefix: r.strip_prefix,
            retry_non_idempotent: r.retry_non_idempotent,
            tcp: r.tcp.iter().copied().map(Port).collect(),
        };
        AppFile {
            image: s.image.clone(),
            port: s.port,
            instances: d.instances,
            running: d.running,
            memory: s.memory.map(Size),
            cpus: s.cpus,
            cpu_weight: s.cpu_weight,
            pids: s.pids,
            stop_timeout: s.stop_timeout,
            domains: s.domains.clone(),
            volumes: s.volumes.clone(),
            cap_add: s.cap_add.clone(),
            cap_drop: s.cap_drop.clone(),
            restart: s.restart,
            userns: s.userns,
            env: s.env.clone(),
            health,
            proxy: (proxy != ProxyFile::default()).then_some(proxy),
            rollout: (!s.rollout.is_default()).then(|| RolloutFile {
                surge: s.rollout.surge,
                max_unavailable: s.rollout.max_unavailable,
                deploy_timeout: s.rollout.deploy_timeout_ms.map(Millis),
                unhealthy_timeout: s.rollout.unhealthy_timeout_ms.map(Millis),
            }),
        }
    }
}

/// A mistake in the file, with where it is.
#[derive(Debug, Clone, PartialEq)]
struct FileError {
    app: Option<String>,
    span: Option<Range<usize>>,
    message: String,
}

impl FileError {
    /// `deliverous.toml:4:1: app web: unknown field ...`, then the line with the spot marked.
    fn render(&self, label: &str, text: &str) -> String {
        let app = self.app.as_ref().map(|a| format!("app {a}: ")).unwrap_or_default();
        let Some(span) = self.span.clone().filter(|s| s.start <= text.len()) else {
            return format!("{label}: {app}{}", self.message);
        };
        let line_start = text[..span.start].rfind('\n').map_or(0, |i| i + 1);
        let line_end = text[span.start..].find('\n').map_or(text.len(), |i| span.start + i);
        let line_no = text[..span.start].matches('\n').count() + 1;
        let column = text[line_start..span.start].chars().count() + 1;
        let source = &text[line_start..line_end];
        let width = text[span.start..span.end.clamp(span.start, line_end)].chars().count().max(1);
        let gutter = " ".repeat(line_no.to_string().len());
        format!(
            "{label}:{line_no}:{column}: {app}{}\n{gutter} |\n{line_no} | {source}\n{gutter} | {}{}",
            self.message,
            " ".repeat(column - 1),
            "^".repeat(width)
        )
    }
}

/// Reads a whole file: every app, or every mistake (all of them, in the order of the file).
fn parse_file(text: &str) -> Result<BTreeMap<String, Declared>, Vec<FileError>> {
    use toml::de::{DeTable, DeValue, ValueDeserializer};
    let root = DeTable::parse(text)
        .map_err(|e| vec![FileError { app: None, span: e.span(), message: e.message().to_string() }])?;
    let mut errors = Vec::new();
    let mut apps = BTreeMap::new();
    for (key, value) in root.get_ref().iter() {
        if key.get_ref() != "apps" {
            errors.push(FileError {
                app: None,
                span: Some(key.span()),
                message: format!("unknown key `{}`: apps are declared as [apps.NAME] tables", key.get_ref()),
            });
            continue;
        }
        let DeValue::Table(table) = value.get_ref() else {
            errors.push(FileError {
                app: None,
                span: Some(value.span()),
                message: "`apps` must be a table of apps: [apps.NAME]".into(),
            });
            continue;
        };
        for (name, app) in table.iter() {
            let here = |message: String, span| FileError { app: Some(name.get_ref().to_string()), span, message };
            if let Err(m) = apps::validate_name(name.get_ref()) {
                errors.push(FileError { app: None, span: Some(name.span()), message: m });
                continue;
            }
            match AppFile::deserialize(ValueDeserializer::from(app.clone())) {
                Err(e) => errors.push(here(e.message().to_string(), e.span())),
                Ok(file) => match file.declared() {
                    Ok(d) => {
                        apps.insert(name.get_ref().to_string(), d);
                    }
                    Err(m) => errors.push(here(m, Some(name.span()))),
                },
            }
        }
    }
    if apps.is_empty() && errors.is_empty() {
        errors.push(FileError {
            app: None,
            span: None,
            message: "no app declared: add an [apps.NAME] table with at least image and port".into(),
        });
    }
    errors.sort_by_key(|e| e.span.as_ref().map_or(0, |s| s.start));
    if errors.is_empty() {
        Ok(apps)
    } else {
        Err(errors)
    }
}

// ---------------------------------------------------------------------------------------------
// The daemon's side

/// The fields of the daemon's app view (`GET /v1/apps`) that a file declares.
#[derive(Debug, Deserialize)]
struct View {
    name: String,
    state: String,
    image: String,
    port: u16,
    #[serde(default)]
    env: BTreeMap<String, String>,
    memory: Option<String>,
    cpus: Option<f64>,
    pids: u32,
    cpu_weight: u32,
    stop_timeout: Option<u32>,
    #[serde(default)]
    volumes: Vec<String>,
    #[serde(default)]
    cap_add: Vec<String>,
    #[serde(default)]
    cap_drop: Vec<String>,
    #[serde(default)]
    domains: Vec<String>,
    #[serde(default)]
    routing: Routing,
    #[serde(default)]
    restart: RestartPolicy,
    rollout: Rollout,
    #[serde(default)]
    userns: bool,
    instances_desired: u32,
}

impl View {
    fn declared(&self) -> Declared {
        let spec = AppSpec {
            env: self.env.clone(),
            memory: self.memory.as_deref().and_then(|m| parse_bytes(m).ok()),
            cpus: self.cpus,
            pids: Some(self.pids),
            cpu_weight: Some(self.cpu_weight),
            // 0 is the daemon's default, as on the command line.
            stop_timeout: self.stop_timeout.filter(|t| *t != 0),
            volumes: self.volumes.clone(),
            cap_add: self.cap_add.clone(),
            cap_drop: self.cap_drop.clone(),
            domains: self.domains.clone(),
            routing: self.routing.clone(),
            restart: self.restart,
            rollout: self.rollout.clone(),
            userns: self.userns,
            ..AppSpec::new(self.image.clone(), self.port)
        };
        Declared { spec, instances: self.instances_desired, running: self.state == "running" }
    }
}

fn unexpected(e: serde_json::Error) -> CallError {
    CallError::Api {
        status: hyper::StatusCode::BAD_GATEWAY,
        message: format!("unexpected answer from the daemon ({e}): is it the same version as this CLI?"),
    }
}

async fn current_apps(host: &Host) -> Result<BTreeMap<String, Declared>, CallError> {
    let list = call(host, Method::GET, "/v1/apps", None).await?;
    let views: Vec<View> = serde_json::from_value(list).map_err(unexpected)?;
    Ok(views.into_iter().map(|v| (v.name.clone(), v.declared())).collect())
}

// ---------------------------------------------------------------------------------------------
// The plan

/// The form two equal configurations share: defaults left out, values as the daemon shows them.
fn canonical(spec: &AppSpec) -> AppSpec {
    let mut s = spec.clone();
    // The daemon shows memory rounded (`976.6K`): compare at that precision.
    s.memory = s.memory.filter(|m| *m > 0).map(|m| parse_bytes(&format_bytes(m)).unwrap_or(m));
    s.cpus = s.cpus.filter(|c| *c != 0.0);
    s.pids = s.pids.filter(|p| *p != 0 && *p != DEFAULT_PIDS);
    s.cpu_weight = s.cpu_weight.filter(|w| *w != 0 && *w != DEFAULT_CPU_WEIGHT);
    s.domains = s.domains.iter().map(|d| d.to_ascii_lowercase()).collect::<BTreeSet<_>>().into_iter().collect();
    let d = RouteOptions::default();
    let r = &mut s.routing;
    r.connect_timeout_ms = r.connect_timeout_ms.filter(|t| *t != d.connect_timeout_ms);
    r.read_timeout_ms = r.read_timeout_ms.filter(|t| *t != d.read_timeout_ms);
    r.total_timeout_ms = r.total_timeout_ms.filter(|t| *t != d.total_timeout_ms);
    r.drain_timeout_ms = r.drain_timeout_ms.filter(|t| *t != DEFAULT_DRAIN_TIMEOUT_MS);
    r.max_body = r.max_body.filter(|b| *b > 0);
    let o = &mut s.rollout;
    o.surge = o.surge.filter(|n| *n != rollout::DEFAULT_SURGE);
    o.max_unavailable = o.max_unavailable.filter(|n| *n != rollout::DEFAULT_MAX_UNAVAILABLE);
    o.deploy_timeout_ms = o.deploy_timeout_ms.filter(|t| *t != rollout::DEFAULT_DEPLOY_TIMEOUT_MS);
    o.unhealthy_timeout_ms = o.unhealthy_timeout_ms.filter(|t| *t != rollout::DEFAULT_UNHEALTHY_TIMEOUT_MS);
    s
}

/// The `rollout` object of a create or config request: what differs from `a` in `b`, defaults
/// given explicitly (the API cannot unset a field; the default behaves the same).
fn rollout_patch(a: &Rollout, b: &Rollout) -> Map<String, Value> {
    let mut p = Map::new();
    if a.surge() != b.surge() {
        p.insert("surge".into(), json!(b.surge()));
    }
    if a.max_unavailable() != b.max_unavailable() {
        p.insert("max_unavailable".into(), json!(b.max_unavailable()));
    }
    if a.deploy_timeout() != b.deploy_timeout() {
        p.insert("deploy_timeout_ms".into(), json!(b.deploy_timeout().as_millis() as u64));
    }
    if a.unhealthy_timeout() != b.unhealthy_timeout() {
        p.insert("unhealthy_timeout_ms".into(), json!(b.unhealthy_timeout().as_millis() as u64));
    }
    p
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "lowercase")]
enum ChangeKind {
    Set,
    Add,
    Remove,
    Start,
    Stop,
}

/// One line of the plan: `memory 128M → 256M`, `+ domain example.com`, `start`.
#[derive(Debug, Clone, PartialEq, Serialize)]
struct Change {
    kind: ChangeKind,
    field: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    from: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    to: Option<String>,
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        let (from, to) = (self.from.as_deref().unwrap_or(""), self.to.as_deref().unwrap_or(""));
        match self.kind {
            // `env GREETING: hello → bonjour`, `memory 128M → 256M`
            ChangeKind::Set if self.from.is_some() => {
                let colon = if self.field.contains(' ') { ":" } else { "" };
                write!(f, "{}{colon} {from} → {to}", self.field)
            }
            ChangeKind::Set => write!(f, "{} {to}", self.field),
            ChangeKind::Add => write!(f, "+ {} {to}", self.field),
            ChangeKind::Remove => write!(f, "- {} {from}", self.field),
            ChangeKind::Start => f.write_str("start"),
            ChangeKind::Stop => f.write_str("stop"),
        }
    }
}

/// Collects the changes between two canonical configurations; a new app has no "from".
struct Changes {
    creating: bool,
    list: Vec<Change>,
}

impl Changes {
    fn set(&mut self, field: &str, from: String, to: String) {
        if from != to {
            let from = (!self.creating).then_some(from);
            self.list.push(Change { kind: ChangeKind::Set, field: field.into(), from, to: Some(to) });
        }
    }

    fn items(&mut self, field: &str, from: &[String], to: &[String]) {
        for x in to.iter().filter(|x| !from.contains(x)) {
            self.list.push(Change { kind: ChangeKind::Add, field: field.into(), from: None, to: Some(x.clone()) });
        }
        for x in from.iter().filter(|x| !to.contains(x)) {
            self.list.push(Change { kind: ChangeKind::Remove, field: field.into(), from: Some(x.clone()), to: None });
        }
        let same_items = from.len() == to.len() && from.iter().all(|x| to.contains(x));
        if same_items && from != to {
            self.set(&format!("{field} order"), from.join(", "), to.join(", "));
        }
    }
}

fn size_or_none(v: Option<u64>) -> String {
    v.map_or("none".into(), format_bytes)
}

/// `/healthz`, `tcp`, `image` (the image's HEALTHCHECK, if any) or `none`.
fn health_text(r: &Routing) -> String {
    match (&r.health, r.health_none) {
        (None, true) => "none".into(),
        (None, false) => "image".into(),
        (h, _) => health_kind(h),
    }
}

fn health_kind(h: &Option<HealthCheck>) -> String {
    match h {
        None => "none".into(),
        Some(HealthCheck { path: None, .. }) => "tcp".into(),
        Some(HealthCheck { path: Some(p), .. }) => p.clone(),
    }
}

/// What changes from `current` (none: the app is new) to `desired`, a line each.
fn changes(current: Option<&Declared>, desired: &Declared) -> Vec<Change> {
    let base = match current {
        Some(c) => canonical(&c.spec),
        None => canonical(&AppSpec::new("", 0)),
    };
    let (a, b) = (&base, &canonical(&desired.spec));
    let mut out = Changes { creating: current.is_none(), list: Vec::new() };
    out.set("image", a.image.clone(), b.image.clone());
    out.set("port", a.port.to_string(), b.port.to_string());
    for (k, v) in &b.env {
        match a.env.get(k) {
            None => out.list.push(Change {
                kind: ChangeKind::Add,
                field: "env".into(),
                from: None,
                to: Some(format!("{k}={v}")),
            }),
            Some(old) => out.set(&format!("env {k}"), old.clone(), v.clone()),
        }
    }
    for k in a.env.keys().filter(|k| !b.env.contains_key(*k)) {
        out.list.push(Change { kind: ChangeKind::Remove, field: "env".into(), from: Some(k.clone()), to: None });
    }
    out.set("memory", size_or_none(a.memory), size_or_none(b.memory));
    let cpus = |c: Option<f64>| c.map_or("none".into(), |c| c.to_string());
    out.set("cpus", cpus(a.cpus), cpus(b.cpus));
    out.set(
        "cpu_weight",
        a.cpu_weight.unwrap_or(DEFAULT_CPU_WEIGHT).to_string(),
        b.cpu_weight.unwrap_or(DEFAULT_CPU_WEIGHT).to_string(),
    );
    out.set("pids", a.pids.unwrap_or(DEFAULT_PIDS).to_string(), b.pids.unwrap_or(DEFAULT_PIDS).to_string());
    let stop_timeout = |t: Option<u32>| t.filter(|t| *t != 0).map_or("default".into(), |t| format!("{t}s"));
    out.set("stop_timeout", stop_timeout(a.stop_timeout), stop_timeout(b.stop_timeout));
    out.set("restart", a.restart.to_string(), b.restart.to_string());
    out.set("userns", a.userns.to_string(), b.userns.to_string());
    out.items("volume", &a.volumes, &b.volumes);
    out.items("cap_add", &a.cap_add, &b.cap_add);
    out.items("cap_drop", &a.cap_drop, &b.cap_drop);
    out.items("domain", &a.domains, &b.domains);
    let (ra, rb) = (&a.routing, &b.routing);
    out.set("health", health_text(ra), health_text(rb));
    if let Some(hb) = &rb.health {
        let ha = ra.health.clone().unwrap_or_else(|| HealthCheck::http("/"));
        out.set("health interval", duration_text(ha.interval_ms), duration_text(hb.interval_ms));
        out.set("health timeout", duration_text(ha.timeout_ms), duration_text(hb.timeout_ms));
        out.set("health rise", ha.rise.to_string(), hb.rise.to_string());
        out.set("health fall", ha.fall.to_string(), hb.fall.to_string());
    }
    let balance = |b: Balance| serde_json::to_value(b).ok().and_then(|v| v.as_str().map(str::to_string));
    out.set("proxy balance", balance(ra.balance).unwrap_or_default(), balance(rb.balance).unwrap_or_default());
    let d = RouteOptions::default();
    for (field, x, y, default) in [
        ("proxy connect_timeout", ra.connect_timeout_ms, rb.connect_timeout_ms, d.connect_timeout_ms),
        ("proxy read_timeout", ra.read_timeout_ms, rb.read_timeout_ms, d.read_timeout_ms),
        ("proxy total_timeout", ra.total_timeout_ms, rb.total_timeout_ms, d.total_timeout_ms),
        ("proxy drain_timeout", ra.drain_timeout_ms, rb.drain_timeout_ms, DEFAULT_DRAIN_TIMEOUT_MS),
    ] {
        out.set(field, duration_text(x.unwrap_or(default)), duration_text(y.unwrap_or(default)));
    }
    out.set("proxy max_body", size_or_none(ra.max_body), size_or_none(rb.max_body));
    out.set("proxy strip_prefix", ra.strip_prefix.to_string(), rb.strip_prefix.to_string());
    out.set("proxy retry_non_idempotent", ra.retry_non_idempotent.to_string(), rb.retry_non_idempotent.to_string());
    let ports = |r: &Routing| r.tcp.iter().map(port_text).collect::<Vec<_>>();
    out.items("proxy tcp", &ports(ra), &ports(rb));
    let (oa, ob) = (&a.rollout, &b.rollout);
    out.set("rollout surge", oa.surge().to_string(), ob.surge().to_string());
    out.set("rollout max_unavailable", oa.max_unavailable().to_string(), ob.max_unavailable().to_string());
    let ms = |d: std::time::Duration| duration_text(d.as_millis() as u64);
    out.set("rollout deploy_timeout", ms(oa.deploy_timeout()), ms(ob.deploy_timeout()));
    out.set("rollout unhealthy_timeout", ms(oa.unhealthy_timeout()), ms(ob.unhealthy_timeout()));
    match current {
        Some(c) => {
            out.set("instances", c.instances.to_string(), desired.instances.to_string());
            if c.running != desired.running {
                let kind = if desired.running { ChangeKind::Start } else { ChangeKind::Stop };
                out.list.push(Change { kind, field: "state".into(), from: None, to: None });
            }
        }
        None => {
            out.list.push(Change {
                kind: ChangeKind::Set,
                field: "instances".into(),
                from: None,
                to: Some(desired.instances.to_string()),
            });
            if desired.running {
                out.list.push(Change { kind: ChangeKind::Start, field: "state".into(), from: None, to: None });
            }
        }
    }
    out.list
}

/// What the file asks and the API cannot do; said, not silently skipped. (Nothing at the
/// moment: a stop timeout, once the one exception, goes back to the default with `"default"`.)
fn warnings(_current: &Declared, _desired: &Declared) -> Vec<String> {
    Vec::new()
}

/// The `routing` object of a create or config request: what differs from `a` in `b`.
fn routing_patch(a: &Routing, b: &Routing) -> Map<String, Value> {
    let mut p = Map::new();
    if a.health != b.health || a.health_none != b.health_none {
        p.insert("health".into(), json!(health_text(b)));
        if let Some(h) = &b.health {
            p.insert("health_interval_ms".into(), json!(h.interval_ms));
            p.insert("health_timeout_ms".into(), json!(h.timeout_ms));
            p.insert("health_rise".into(), json!(h.rise));
            p.insert("health_fall".into(), json!(h.fall));
        }
    }
    if a.balance != b.balance {
        p.insert("balance".into(), json!(b.balance));
    }
    let d = RouteOptions::default();
    for (key, x, y, default) in [
        ("connect_timeout_ms", a.connect_timeout_ms, b.connect_timeout_ms, d.connect_timeout_ms),
        ("read_timeout_ms", a.read_timeout_ms, b.read_timeout_ms, d.read_timeout_ms),
        ("total_timeout_ms", a.total_timeout_ms, b.total_timeout_ms, d.total_timeout_ms),
        ("drain_timeout_ms", a.drain_timeout_ms, b.drain_timeout_ms, DEFAULT_DRAIN_TIMEOUT_MS),
    ] {
        // No way to unset one: the default, given explicitly, behaves the same.
        if x != y {
            p.insert(key.into(), json!(y.unwrap_or(default)));
        }
    }
    if a.max_body != b.max_body {
        p.insert("max_body".into(), b.max_body.map_or(json!("none"), |m| json!(m)));
    }
    if a.strip_prefix != b.strip_prefix {
        p.insert("strip_prefix".into(), json!(b.strip_prefix));
    }
    if a.retry_non_idempotent != b.retry_non_idempotent {
        p.insert("retry_non_idempotent".into(), json!(b.retry_non_idempotent));
    }
    if a.tcp != b.tcp {
        p.insert("tcp".into(), json!(b.tcp.iter().map(port_text).collect::<Vec<_>>()));
    }
    p
}

/// The `PATCH /v1/apps/NAME` body that turns `current` into `desired`; `None` when equal.
fn config_patch(current: &AppSpec, desired: &AppSpec) -> Option<Value> {
    let (a, b) = (canonical(current), canonical(desired));
    let mut p = Map::new();
    if a.image != b.image {
        p.insert("image".into(), json!(b.image));
    }
    if a.port != b.port {
        p.insert("port".into(), json!(b.port));
    }
    let mut env = Map::new();
    for (k, v) in &b.env {
        if a.env.get(k) != Some(v) {
            env.insert(k.clone(), json!(v));
        }
    }
    for k in a.env.keys().filter(|k| !b.env.contains_key(*k)) {
        env.insert(k.clone(), Value::Null);
    }
    if !env.is_empty() {
        p.insert("env".into(), Value::Object(env));
    }
    if a.memory != b.memory {
        // The exact size asked for, not the rounded one compared.
        p.insert("memory".into(), desired.memory.filter(|m| *m > 0).map_or(json!("none"), |m| json!(m)));
    }
    if a.cpus != b.cpus {
        p.insert("cpus".into(), json!(b.cpus.unwrap_or(0.0)));
    }
    if a.cpu_weight != b.cpu_weight {
        p.insert("cpu_weight".into(), json!(b.cpu_weight.unwrap_or(0)));
    }
    if a.pids != b.pids {
        p.insert("pids".into(), json!(b.pids.unwrap_or(0)));
    }
    if a.stop_timeout.filter(|t| *t != 0) != b.stop_timeout.filter(|t| *t != 0) {
        p.insert("stop_timeout".into(), b.stop_timeout.filter(|t| *t != 0).map_or(json!("default"), |t| json!(t)));
    }
    if a.restart != b.restart {
        p.insert("restart".into(), json!(b.restart));
    }
    if a.userns != b.userns {
        p.insert("userns".into(), json!(b.userns));
    }
    for (key, x, y) in [
        ("volumes", &a.volumes, &b.volumes),
        ("cap_add", &a.cap_add, &b.cap_add),
        ("cap_drop", &a.cap_drop, &b.cap_drop),
    ] {
        if x != y {
            p.insert(key.into(), json!(y));
        }
    }
    let added: Vec<&String> = b.domains.iter().filter(|d| !a.domains.contains(d)).collect();
    let removed: Vec<&String> = a.domains.iter().filter(|d| !b.domains.contains(d)).collect();
    if !added.is_empty() {
        p.insert("add_domains".into(), json!(added));
    }
    if !removed.is_empty() {
        p.insert("remove_domains".into(), json!(removed));
    }
    let routing = routing_patch(&a.routing, &b.routing);
    if !routing.is_empty() {
        p.insert("routing".into(), Value::Object(routing));
    }
    let rollout = rollout_patch(&a.rollout, &b.rollout);
    if !rollout.is_empty() {
        p.insert("rollout".into(), Value::Object(rollout));
    }
    (!p.is_empty()).then_some(Value::Object(p))
}

/// The `POST /v1/apps` body for a new app.
fn create_body(name: &str, d: &Declared) -> Value {
    let s = &d.spec;
    let mut body = json!({
        "name": name,
        "image": s.image,
        "port": s.port,
        "env": s.env,
        "volumes": s.volumes,
        "cap_add": s.cap_add,
        "cap_drop": s.cap_drop,
        "domains": s.domains,
        "instances": d.instances,
    });
    for (key, v) in [
        ("memory", s.memory.map(|m| json!(m))),
        ("cpus", s.cpus.map(|c| json!(c))),
        ("cpu_weight", s.cpu_weight.map(|w| json!(w))),
        ("pids", s.pids.map(|p| json!(p))),
        ("stop_timeout", s.stop_timeout.map(|t| json!(t))),
        ("restart", (!s.restart.is_default()).then(|| json!(s.restart))),
        ("userns", s.userns.then_some(json!(true))),
    ] {
        if let Some(v) = v {
            body[key] = v;
        }
    }
    let routing = routing_patch(&Routing::default(), &canonical(s).routing);
    if !routing.is_empty() {
        body["routing"] = Value::Object(routing);
    }
    let rollout = rollout_patch(&Rollout::default(), &s.rollout);
    if !rollout.is_empty() {
        body["rollout"] = Value::Object(rollout);
    }
    body
}

/// One API call of the plan.
#[derive(Debug, Clone, PartialEq)]
enum Step {
    Create(Value),
    Patch(Value),
    Scale(u32),
    /// Then scale to this count if starting changed it (starting an app of 0 instances runs 1).
    Start(u32),
    Stop,
    Remove,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
enum Action {
    Create,
    Update,
    Remove,
    UpToDate,
}

#[derive(Debug, Clone)]
struct AppPlan {
    name: String,
    action: Action,
    changes: Vec<Change>,
    warnings: Vec<String>,
    steps: Vec<Step>,
}

/// The calls that bring an existing app from `c` to `d`, in an order that avoids needless work:
/// stop before reconfiguring, scale down before a rollout and up after it, start last.
fn update_steps(c: &Declared, d: &Declared) -> Vec<Step> {
    let mut steps = Vec::new();
    if c.running && !d.running {
        steps.push(Step::Stop);
    }
    let mut count = c.instances;
    if c.running && d.running && d.instances < count {
        steps.push(Step::Scale(d.instances));
        count = d.instances;
    }
    if let Some(p) = config_patch(&c.spec, &d.spec) {
        steps.push(Step::Patch(p));
    }
    if count != d.instances {
        steps.push(Step::Scale(d.instances));
    }
    if !c.running && d.running {
        steps.push(Step::Start(d.instances));
    }
    steps
}

/// The whole plan: the file's apps in name order, then the ones `--prune` removes.
fn plan(declared: &BTreeMap<String, Declared>, current: &BTreeMap<String, Declared>, prune: bool) -> Vec<AppPlan> {
    let mut out = Vec::new();
    for (name, d) in declared {
        let p = match current.get(name) {
            None => {
                let mut steps = vec![Step::Create(create_body(name, d))];
                if d.running {
                    steps.push(Step::Start(d.instances));
                }
                AppPlan {
                    name: name.clone(),
                    action: Action::Create,
                    changes: changes(None, d),
                    warnings: vec![],
                    steps,
                }
            }
            Some(c) => {
                let list = changes(Some(c), d);
                let steps = update_steps(c, d);
                let action = if steps.is_empty() { Action::UpToDate } else { Action::Update };
                AppPlan { name: name.clone(), action, changes: list, warnings: warnings(c, d), steps }
            }
        };
        out.push(p);
    }
    if prune {
        for name in current.keys().filter(|n| !declared.contains_key(*n)) {
            out.push(AppPlan {
                name: name.clone(),
                action: Action::Remove,
                changes: vec![],
                warnings: vec![],
                steps: vec![Step::Remove],
            });
        }
    }
    out
}

fn plan_lines(plan: &[AppPlan]) -> Vec<String> {
    let mut lines = Vec::new();
    for p in plan {
        match p.action {
            Action::UpToDate => lines.push(format!("{}: up to date", p.name)),
            Action::Remove => lines.push(format!("- app {}", p.name)),
            Action::Create => lines.push(format!("+ app {}", p.name)),
            Action::Update => {}
        }
        lines.extend(p.changes.iter().map(|c| format!("{}: {c}", p.name)));
    }
    lines
}

fn plan_json(plan: &[AppPlan], dry_run: bool) -> Value {
    let apps: Vec<Value> = plan
        .iter()
        .map(|p| {
            let changes: Vec<Value> = p
                .changes
                .iter()
                .map(|c| {
                    let mut v = json!(c);
                    v["text"] = json!(c.to_string());
                    v
                })
                .collect();
            json!({"name": p.name, "action": p.action, "changes": changes, "warnings": p.warnings})
        })
        .collect();
    json!({"dry_run": dry_run, "apps": apps})
}

// ---------------------------------------------------------------------------------------------
// The commands

/// The file's text and the name errors call it by (`-` is standard input).
fn read_source(file: &str) -> Result<(String, String), String> {
    if file == "-" {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
            .map_err(|e| format!("cannot read standard input: {e}"))?;
        Ok(("<stdin>".into(), text))
    } else {
        let text = std::fs::read_to_string(file).map_err(|e| format!("cannot read {file}: {e}"))?;
        Ok((file.to_string(), text))
    }
}

/// `deliverous apply`. Exit codes: 0 done (or nothing to do), 1 the daemon refused a change,
/// 2 a bad file (nothing is changed then), 3 the daemon cannot be reached.
pub async fn run_apply(host: &Host, args: ApplyArgs) -> ExitCode {
    let (label, text) = match read_source(&args.file) {
        Ok(t) => t,
        Err(m) => return super::usage(m),
    };
    let declared = match parse_file(&text) {
        Ok(d) => d,
        Err(errors) => {
            for e in errors {
                eprintln!("error: {}", e.render(&label, &text));
            }
            return ExitCode::from(2);
        }
    };
    let current = match current_apps(host).await {
        Ok(c) => c,
        Err(e) => return super::fail(e),
    };
    let plan = plan(&declared, &current, args.prune);
    for p in &plan {
        for w in &p.warnings {
            eprintln!("warning: {}: {w}", p.name);
        }
    }
    if args.json {
        super::print_json(&plan_json(&plan, args.dry_run));
    } else {
        for line in plan_lines(&plan) {
            println!("{line}");
        }
    }
    if args.dry_run {
        if !args.json {
            println!("dry run: nothing changed");
        }
        return ExitCode::SUCCESS;
    }
    let mut refused = false;
    for p in plan.iter().filter(|p| !p.steps.is_empty()) {
        match run_steps(host, p).await {
            Ok(view) if !args.json => match view {
                Some(v) => super::summary(&v),
                None => println!("removed app {}", p.name),
            },
            Ok(_) => {}
            Err(CallError::Api { status, message }) => {
                eprintln!("error: {}: {message} ({})", p.name, status.as_u16());
                refused = true;
            }
            Err(e) => return super::fail(e),
        }
    }
    if refused {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

/// Makes one app's calls; the app's last view, `None` once removed.
async fn run_steps(host: &Host, p: &AppPlan) -> Result<Option<Value>, CallError> {
    let path = format!("/v1/apps/{}", p.name);
    let scale_path = format!("{path}/scale");
    let scale = |n: u32| call(host, Method::PUT, &scale_path, Some(json!({"instances": n})));
    let mut last = None;
    for step in &p.steps {
        last = match step {
            Step::Create(body) => Some(call(host, Method::POST, "/v1/apps", Some(body.clone())).await?),
            Step::Patch(body) => Some(call(host, Method::PATCH, &path, Some(body.clone())).await?),
            Step::Scale(n) => Some(scale(*n).await?),
            Step::Start(n) => {
                let view = call(host, Method::POST, &format!("{path}/start"), None).await?;
                if view["instances_desired"].as_u64() == Some(u64::from(*n)) {
                    Some(view)
                } else {
                    Some(scale(*n).await?)
                }
            }
            Step::Stop => Some(call(host, Method::POST, &format!("{path}/stop"), None).await?),
            Step::Remove => {
                call(host, Method::DELETE, &path, None).await?;
                None
            }
        };
    }
    Ok(last)
}

/// `deliverous app export NAME... | --all`: a file `apply` takes back as "up to date".
pub async fn run_export(host: &Host, names: Vec<String>, all: bool, json: bool) -> ExitCode {
    let views = if all {
        call(host, Method::GET, "/v1/apps", None).await.and_then(|v| serde_json::from_value(v).map_err(unexpected))
    } else {
        let mut views: Vec<View> = Vec::new();
        for name in &names {
            match call(host, Method::GET, &format!("/v1/apps/{name}"), None).await {
                Ok(v) => match serde_json::from_value(v) {
                    Ok(v) => views.push(v),
                    Err(e) => return super::fail(unexpected(e)),
                },
                Err(e) => return super::fail(e),
            }
        }
        Ok(views)
    };
    let views: Vec<View> = match views {
        Ok(v) => v,
        Err(e) => return super::fail(e),
    };
    if json {
        super::print_json(&json!({"apps": export_apps(&views)}));
        return ExitCode::SUCCESS;
    }
    match export_text(&views) {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: cannot write the apps as TOML: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Each app as its `[apps.NAME]` table of the apply file.
fn export_apps(views: &[View]) -> BTreeMap<String, AppFile> {
    views.iter().map(|v| (v.name.clone(), AppFile::of(&v.declared()))).collect()
}

fn export_text(views: &[View]) -> Result<String, toml::ser::Error> {
    #[derive(Serialize)]
    struct File {
        apps: BTreeMap<String, AppFile>,
    }
    let body = toml::to_string(&File { apps: export_apps(views) })?;
    Ok(format!("# Written by `deliverous app export`; apply with `deliverous apply -f FILE`.\n\n{body}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const WEB: &str = r#"
[apps.web]
image = "registry.example.com/acme/web:1.4"
port = 8080
instances = 3
memory = "128M"
domains = ["www.example.com", "Example.com/api"]

[apps.web.env]
GREETING = "hello"

[apps.web.health]
path = "/healthz"
interval = "5s"

[apps.web.proxy]
read_timeout = "2m"
tcp = [6379, "16379:6380"]
"#;

    fn parse(text: &str) -> BTreeMap<String, Declared> {
        parse_file(text).unwrap_or_else(|e| panic!("{e:?}"))
    }

    fn errors(text: &str) -> Vec<String> {
        parse_file(text).expect_err("a bad file").iter().map(|e| e.render("f.toml", text)).collect()
    }

    /// What the daemon would store and show after creating `d` from `create_body`.
    fn as_daemon_shows(d: &Declared) -> Declared {
        let mut spec = d.spec.clone();
        spec.pids = Some(spec.pids.unwrap_or(DEFAULT_PIDS));
        spec.cpu_weight = Some(spec.cpu_weight.unwrap_or(DEFAULT_CPU_WEIGHT));
        spec.memory = spec.memory.and_then(|m| parse_bytes(&format_bytes(m)).ok());
        Declared { spec, ..d.clone() }
    }

    fn lines(current: &Declared, desired: &Declared) -> Vec<String> {
        changes(Some(current), desired).iter().map(|c| c.to_string()).collect()
    }

    #[test]
    fn a_file_reads_into_specs() {
        let apps = parse(WEB);
        let web = &apps["web"];
        assert_eq!(web.instances, 3);
        assert!(web.running);
        assert_eq!(web.spec.memory, Some(128 << 20));
        assert_eq!(web.spec.domains, ["www.example.com", "example.com/api"]);
        let h = web.spec.routing.health.as_ref().expect("health");
        assert_eq!((h.path.as_deref(), h.interval_ms, h.timeout_ms), (Some("/healthz"), 5000, 1000));
        assert_eq!(web.spec.routing.read_timeout_ms, Some(120_000));
        assert_eq!(
            web.spec.routing.tcp,
            [TcpPort { listen: 6379, target: 6379 }, TcpPort { listen: 16379, target: 6380 }]
        );
    }

    #[test]
    fn mistakes_name_the_app_the_key_and_the_place() {
        let text = "[apps.web]\nimage = \"x:1\"\nport = 80\ncolour = \"blue\"\n";
        let e = errors(text);
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(e[0].starts_with("f.toml:4:1: app web: unknown field `colour`"), "{}", e[0]);
        assert!(e[0].contains("4 | colour = \"blue\"\n  | ^^^^^^"), "{}", e[0]);

        let e = errors("[apps.web]\nimage = \"x:1\"\nport = 80\nmemory = \"12X\"\n");
        assert!(e[0].starts_with("f.toml:4:10: app web: invalid size \"12X\""), "{}", e[0]);

        let e = errors("[apps.web]\nimage = \"x:1\"\nport = 80\nrestart = \"sometimes\"\n");
        assert!(e[0].contains("f.toml:4:11: app web: unknown variant `sometimes`"), "{}", e[0]);

        let e = errors("[apps.web]\nimage = \"x:1\nport = 80\n");
        assert!(e[0].starts_with("f.toml:2:"), "{}", e[0]);

        let e = errors("[apps.Web]\nimage = \"x:1\"\nport = 80\n");
        assert!(e[0].contains("f.toml:1:7: invalid app name \"Web\""), "{}", e[0]);

        let e = errors("[apps.web.proxy]\nread_timeout = \"5x\"\n[apps.web]\nimage = \"x:1\"\nport = 80\n");
        assert!(e[0].contains("app web: invalid duration \"5x\""), "{}", e[0]);

        // Checked with the daemon's own rules after reading: all mistakes, in file order.
        let text = "[apps.b]\nimage = \"x:1\"\nport = 80\nmemory = \"1M\"\n[apps.a]\nport = 80\n";
        let e = errors(text);
        assert_eq!(e.len(), 2, "{e:?}");
        assert!(e[0].contains("app b: memory limit"), "{}", e[0]);
        assert!(e[1].contains("app a: missing field `image`"), "{}", e[1]);

        assert!(errors("")[0].contains("no app declared"));
        assert!(errors("[app.web]\nimage = \"x\"\n")[0].contains("unknown key `app`"));
        let both = "[apps.web]\nimage = \"x:1\"\nport = 80\n[apps.web.health]\npath = \"/\"\ntcp = true\n";
        assert!(errors(both)[0].contains("either path"));
    }

    #[test]
    fn the_same_app_plans_no_change() {
        for d in parse(WEB).values() {
            let shown = as_daemon_shows(d);
            assert_eq!(lines(&shown, d), Vec::<String>::new());
            assert_eq!(update_steps(&shown, d), vec![]);
        }
    }

    #[test]
    fn changes_are_shown_field_by_field_and_sent_as_one_patch() {
        let before = as_daemon_shows(&parse(WEB)["web"]);
        let text = WEB
            .replace("GREETING = \"hello\"", "GREETING = \"bonjour\"\nMODE = \"prod\"")
            .replace("\"128M\"", "\"256M\"")
            .replace("instances = 3", "instances = 5")
            .replace("\"www.example.com\", ", "");
        let after = &parse(&text)["web"];
        assert_eq!(
            lines(&before, after),
            [
                "env GREETING: hello → bonjour",
                "+ env MODE=prod",
                "memory 128M → 256M",
                "- domain www.example.com",
                "instances 3 → 5",
            ]
        );
        let patch = json!({
            "env": {"GREETING": "bonjour", "MODE": "prod"},
            "memory": 256 << 20,
            "remove_domains": ["www.example.com"],
        });
        assert_eq!(update_steps(&before, after), [Step::Patch(patch), Step::Scale(5)]);
    }

    #[test]
    fn defaults_are_restored_explicitly() {
        let before = as_daemon_shows(&parse(WEB)["web"]);
        let bare = "[apps.web]\nimage = \"registry.example.com/acme/web:1.4\"\nport = 8080\ninstances = 3\n";
        let after = &parse(bare)["web"];
        let patch = config_patch(&before.spec, &after.spec).expect("a patch");
        assert_eq!(patch["memory"], "none");
        assert_eq!(patch["env"], json!({"GREETING": null}));
        // Back to the default: the image's HEALTHCHECK, if it has one (`none` would disable it).
        assert_eq!(patch["routing"]["health"], "image");
        assert_eq!(patch["routing"]["read_timeout_ms"], 60_000);
        assert_eq!(patch["routing"]["tcp"], json!([]));
        assert!(lines(&before, after).contains(&"proxy read_timeout: 2m → 1m".to_string()));
        // A stop timeout too: back to the daemon's default.
        let timed = Declared { spec: AppSpec { stop_timeout: Some(30), ..after.spec.clone() }, ..after.clone() };
        assert!(warnings(&as_daemon_shows(&timed), after).is_empty());
        let patch = config_patch(&as_daemon_shows(&timed).spec, &after.spec).expect("a patch");
        assert_eq!(patch["stop_timeout"], "default");
        let said = lines(&as_daemon_shows(&timed), after);
        assert!(
            said.iter().any(|l| l.contains("stop_timeout") && l.contains("30s") && l.contains("default")),
            "{said:?}"
        );
        // 0 in the file is the default as well: nothing to change.
        let zero = Declared { spec: AppSpec { stop_timeout: Some(0), ..after.spec.clone() }, ..after.clone() };
        assert!(config_patch(&after.spec, &zero.spec).is_none_or(|p| p.get("stop_timeout").is_none()));
    }

    #[test]
    fn the_readme_example_is_a_valid_file() {
        let readme = include_str!("../../README.md");
        let section = readme.split("## Declarative apps").nth(1).expect("a Declarative apps section");
        let example = section.split("```toml\n").nth(1).and_then(|s| s.split("```").next()).expect("a toml block");
        let apps = parse(example);
        assert_eq!(apps["web"].instances, 3);
        assert_eq!(apps["web"].spec.routing.tcp, [TcpPort { listen: 16379, target: 6379 }]);
    }

    #[test]
    fn start_stop_and_scaling_are_ordered() {
        let web = parse(WEB)["web"].clone();
        let stopped = Declared { running: false, instances: 1, ..as_daemon_shows(&web) };
        assert_eq!(update_steps(&stopped, &web), [Step::Scale(3), Step::Start(3)]);
        assert_eq!(lines(&stopped, &web), ["instances 1 → 3", "start"]);
        let running = as_daemon_shows(&web);
        let down = Declared { running: false, ..web.clone() };
        assert_eq!(update_steps(&running, &down), [Step::Stop]);
        let mut smaller = Declared { instances: 1, ..web.clone() };
        smaller.spec.image = "registry.example.com/acme/web:1.5".into();
        let steps = update_steps(&running, &smaller);
        assert_eq!(steps[0], Step::Scale(1), "scale down before rolling out: {steps:?}");
        assert!(matches!(steps[1], Step::Patch(_)) && steps.len() == 2, "{steps:?}");
    }

    #[test]
    fn a_new_app_is_created_whole_and_prune_is_opt_in() {
        let declared = parse(WEB);
        let other = Declared { running: false, ..declared["web"].clone() };
        let current = BTreeMap::from([("old".to_string(), other)]);
        let p = plan(&declared, &current, false);
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].action, Action::Create);
        let Step::Create(body) = &p[0].steps[0] else { panic!("{:?}", p[0].steps) };
        assert_eq!(body["memory"], 128 << 20);
        assert_eq!(body["routing"]["health"], "/healthz");
        assert_eq!(body["routing"]["tcp"], json!(["6379", "16379:6380"]));
        assert_eq!(p[0].steps[1], Step::Start(3));
        let text = plan_lines(&p);
        assert_eq!(text[0], "+ app web");
        assert!(text.contains(&"web: memory 128M".to_string()), "{text:?}");
        assert!(text.contains(&"web: start".to_string()), "{text:?}");
        let pruned = plan(&declared, &current, true);
        assert_eq!(plan_lines(&pruned).last().map(String::as_str), Some("- app old"));
        assert_eq!(pruned[1].steps, [Step::Remove]);
    }

    #[test]
    fn export_reads_back_as_up_to_date() {
        let mut web = as_daemon_shows(&parse(WEB)["web"]);
        web.spec.memory = Some(100_000_000);
        web.spec.routing.max_body = Some(1_000_001);
        web.spec.routing.balance = Balance::RoundRobin;
        web.spec.stop_timeout = Some(45);
        web.spec.cap_add = vec!["CAP_NET_ADMIN".into()];
        web.spec.restart = RestartPolicy::OnFailure;
        web.running = false;
        let file = AppFile::of(&web);
        let text = toml::to_string(&BTreeMap::from([("apps", BTreeMap::from([("web", file)]))])).expect("toml");
        let back = parse(&text);
        assert_eq!(lines(&web, &back["web"]), Vec::<String>::new(), "{text}");
        assert!(text.contains("memory = \"95.4M\"") && text.contains("max_body = 1000001"), "{text}");
        assert!(text.contains("running = false") && text.contains("[apps.web.env]"), "{text}");
        assert!(text.contains("restart = \"on-failure\""), "{text}");
        // Back to the default: said in the plan, sent in the patch.
        let mut always = web.clone();
        always.spec.restart = RestartPolicy::Always;
        assert!(
            lines(&web, &always).contains(&"restart on-failure → always".to_string()),
            "{:?}",
            lines(&web, &always)
        );
        assert_eq!(config_patch(&web.spec, &always.spec), Some(json!({"restart": "always"})));
    }

    #[test]
    fn rollout_settings_plan_patch_and_export() {
        let with = |extra: &str| parse(&format!("{WEB}\n[apps.web.rollout]\n{extra}\n"));
        let current = as_daemon_shows(&parse(WEB)["web"]);
        let desired = with("surge = 2\ndeploy_timeout = \"90s\"")["web"].clone();
        assert_eq!(lines(&current, &desired), ["rollout surge: 1 → 2", "rollout deploy_timeout: 1m → 90s"]);
        let patch = config_patch(&current.spec, &desired.spec).expect("a patch");
        assert_eq!(patch["rollout"], json!({"surge": 2, "deploy_timeout_ms": 90_000}));
        assert_eq!(create_body("web", &desired)["rollout"], json!({"surge": 2, "deploy_timeout_ms": 90_000}));
        let back = config_patch(&desired.spec, &current.spec).expect("back to defaults");
        assert_eq!(back["rollout"], json!({"surge": 1, "deploy_timeout_ms": 60_000}));
        // Defaults given explicitly are no change.
        assert!(lines(&current, &with("surge = 1\nmax_unavailable = 0")["web"]).is_empty());
        let text = toml::to_string(&BTreeMap::from([("apps", BTreeMap::from([("web", AppFile::of(&desired))]))]))
            .expect("toml");
        assert!(text.contains("[apps.web.rollout]") && text.contains("deploy_timeout = \"90s\""), "{text}");
        assert!(lines(&desired, &parse(&text)["web"]).is_empty(), "{text}");
        assert!(errors(&format!("{WEB}\n[apps.web.rollout]\nsurge = 0\n")).iter().any(|e| e.contains("surge")));
    }

    #[test]
    fn health_none_plans_patches_and_exports() {
        let no_check = format!("{}\n[apps.api.health]\nnone = true\n", "[apps.api]\nimage = \"x:1\"\nport = 80");
        let desired = parse(&no_check)["api"].clone();
        assert!(desired.spec.routing.health_none && desired.spec.routing.health.is_none());
        let current = as_daemon_shows(&parse("[apps.api]\nimage = \"x:1\"\nport = 80\n")["api"]);
        assert_eq!(lines(&current, &desired), ["health image → none"]);
        let patch = config_patch(&current.spec, &desired.spec).expect("a patch");
        assert_eq!(patch["routing"], json!({"health": "none"}));
        assert_eq!(config_patch(&desired.spec, &current.spec).expect("back")["routing"], json!({"health": "image"}));
        let text = toml::to_string(&BTreeMap::from([("apps", BTreeMap::from([("api", AppFile::of(&desired))]))]))
            .expect("toml");
        assert!(text.contains("[apps.api.health]") && text.contains("none = true"), "{text}");
        assert!(lines(&desired, &parse(&text)["api"]).is_empty(), "{text}");
        let both = format!("{no_check}path = \"/\"\n");
        assert!(errors(&both)[0].contains("none = true takes no path"), "{:?}", errors(&both));
    }

    #[test]
    fn userns_plans_patches_creates_and_exports() {
        let current = as_daemon_shows(&parse(WEB)["web"]);
        let text = WEB.replacen("port = 8080\n", "port = 8080\nuserns = true\n", 1);
        assert_ne!(text, WEB, "the sample has the port line");
        let desired = parse(&text)["web"].clone();
        assert!(desired.spec.userns);
        assert_eq!(lines(&current, &desired), ["userns false → true"]);
        assert_eq!(config_patch(&current.spec, &desired.spec), Some(json!({"userns": true})));
        assert_eq!(config_patch(&desired.spec, &current.spec), Some(json!({"userns": false})));
        assert_eq!(create_body("web", &desired)["userns"], true);
        assert!(create_body("web", &current).get("userns").is_none());
        let exported = toml::to_string(&BTreeMap::from([("apps", BTreeMap::from([("web", AppFile::of(&desired))]))]))
            .expect("toml");
        assert!(exported.contains("userns = true"), "{exported}");
        assert!(lines(&desired, &parse(&exported)["web"]).is_empty(), "{exported}");
    }
}
