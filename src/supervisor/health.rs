//! The supervisor's own health checks: whether a new instance is ready to join rotation during
//! a deploy, and a probe loop per running instance that replaces one that stays unhealthy. It
//! never reads the proxy's view of health (the proxy runs its own checks, in its own process).

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use deliverous_images::{HealthTest, Healthcheck};
use serde::Serialize;
use tokio::net::TcpStream;

use super::{lock, State, Supervisor};
use crate::apps::{AppSpec, Routing};
use crate::events::Kind;
use crate::proxy::HealthCheck;

/// How an instance is checked.
#[derive(Debug, Clone, PartialEq)]
pub enum Probe {
    /// `GET path` answered by a 2xx or 3xx status.
    Http { path: String },
    /// A TCP connection opens.
    Tcp,
    /// The image's `HEALTHCHECK` command, run inside the instance: exit 0 is healthy.
    Cmd { argv: Vec<String> },
}

impl Probe {
    pub fn of(check: &HealthCheck) -> Probe {
        match &check.path {
            Some(path) => Probe::Http { path: path.clone() },
            None => Probe::Tcp,
        }
    }

    /// One network check of the instance at `addr`, given at most `timeout`. A `Cmd` probe
    /// runs inside the instance: see [`Supervisor::run_check`].
    pub async fn run(&self, addr: SocketAddr, timeout: Duration) -> Result<(), String> {
        let attempt = async {
            let mut stream = TcpStream::connect(addr).await.map_err(|e| format!("connect {addr}: {e}"))?;
            match self {
                Probe::Tcp => Ok(()),
                Probe::Http { path } => {
                    crate::proxy::health::http_get_ok(&mut stream, addr, path, "deliverous-supervisor").await
                }
                Probe::Cmd { .. } => Err("a command check runs inside the instance".to_string()),
            }
        };
        match tokio::time::timeout(timeout, attempt).await {
            Ok(result) => result,
            Err(_) => Err(format!("no answer within {} ms", timeout.as_millis())),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Probe::Http { path } => format!("GET {path}"),
            Probe::Tcp => "TCP connect".into(),
            Probe::Cmd { argv } => match argv.as_slice() {
                [sh, c, command] if sh == "/bin/sh" && c == "-c" => format!("CMD-SHELL {command}"),
                _ => format!("CMD {}", argv.join(" ")),
            },
        }
    }
}

/// Where the check in force comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// The app's own `--health`.
    App,
    /// The image's `HEALTHCHECK`.
    Image,
}

/// Docker's defaults for an image `HEALTHCHECK` that leaves a value out.
const IMAGE_INTERVAL: Duration = Duration::from_secs(30);
const IMAGE_TIMEOUT: Duration = Duration::from_secs(30);
const IMAGE_RETRIES: u32 = 3;
/// Docker's default time between checks during the start period.
const IMAGE_START_INTERVAL: Duration = Duration::from_secs(5);

/// The health check in force for an instance: the app's own, else its image's `HEALTHCHECK`,
/// unless the app says `--health none`.
#[derive(Debug, Clone, PartialEq)]
pub struct Check {
    pub probe: Probe,
    pub interval: Duration,
    pub timeout: Duration,
    /// Passes in a row that make an instance healthy (an image check: 1, as Docker).
    pub rise: u32,
    /// Failures in a row that make it unhealthy (an image check: its `Retries`).
    pub fall: u32,
    /// Failures during this time after the start do not count (an image's `StartPeriod`).
    pub start_period: Duration,
    /// Time between checks until the instance is first healthy or the start period ends.
    pub start_interval: Duration,
    pub source: Source,
}

impl Check {
    /// Pure: the check in force given the app's routing settings and its image's healthcheck.
    pub fn in_force(routing: &Routing, image: Option<&Healthcheck>) -> Option<Check> {
        if let Some(c) = &routing.health {
            return Some(Check::app(c));
        }
        if routing.health_none {
            return None;
        }
        image.and_then(Check::image)
    }

    pub fn app(c: &HealthCheck) -> Check {
        let interval = Duration::from_millis(c.interval_ms.max(100));
        Check {
            probe: Probe::of(c),
            interval,
            timeout: Duration::from_millis(c.timeout_ms),
            rise: c.rise.max(1),
            fall: c.fall.max(1),
            start_period: Duration::ZERO,
            start_interval: interval,
            source: Source::App,
        }
    }

    /// `None` for an image without a usable check, or with `HEALTHCHECK NONE`.
    pub fn image(h: &Healthcheck) -> Option<Check> {
        let Some(HealthTest::Command(argv)) = h.command() else { return None };
        let or = |ns: u64, default: Duration| if ns == 0 { default } else { Duration::from_nanos(ns) };
        let interval = or(h.interval_ns, IMAGE_INTERVAL).max(Duration::from_millis(100));
        Some(Check {
            probe: Probe::Cmd { argv },
            interval,
            timeout: or(h.timeout_ns, IMAGE_TIMEOUT),
            rise: 1,
            fall: if h.retries == 0 { IMAGE_RETRIES } else { h.retries },
            start_period: Duration::from_nanos(h.start_period_ns),
            start_interval: or(h.start_interval_ns, IMAGE_START_INTERVAL.min(interval)),
            source: Source::Image,
        })
    }

    /// `CMD-SHELL wget … (image HEALTHCHECK; every 30s, timeout 30s, 3 retries, start period 0s)`.
    pub fn describe(&self) -> String {
        let source = match self.source {
            Source::App => "app check",
            Source::Image => "image HEALTHCHECK",
        };
        let mut text = format!(
            "{} ({source}; every {}, timeout {}, unhealthy after {} failure{}",
            self.probe.describe(),
            super::human(self.interval),
            super::human(self.timeout),
            self.fall,
            if self.fall == 1 { "" } else { "s" }
        );
        if self.rise > 1 {
            text.push_str(&format!(", healthy after {} passes", self.rise));
        }
        if !self.start_period.is_zero() {
            text.push_str(&format!(", start period {}", super::human(self.start_period)));
        }
        text.push(')');
        text
    }

    /// A command check: the proxy cannot run it, so the supervisor takes an instance it finds
    /// unhealthy out of the published routes.
    pub fn routed_by_supervisor(&self) -> bool {
        matches!(self.probe, Probe::Cmd { .. })
    }
}

/// The check in force for an app, as `app show` prints it.
#[derive(Debug, Clone, Serialize)]
pub struct CheckView {
    /// `app`, `image` or `none`.
    pub source: &'static str,
    /// What runs, with its timing; why there is none otherwise.
    pub description: String,
}

impl CheckView {
    pub fn of(routing: &Routing, image: Option<&Healthcheck>) -> CheckView {
        match Check::in_force(routing, image) {
            Some(c) => CheckView {
                source: match c.source {
                    Source::App => "app",
                    Source::Image => "image",
                },
                description: c.describe(),
            },
            None => {
                let disabled_by_image = image.and_then(Healthcheck::command).is_some_and(|t| t == HealthTest::Disabled);
                let why = if routing.health_none && image.and_then(Healthcheck::command).is_some() {
                    "none (--health none; the image's HEALTHCHECK is not used)"
                } else if routing.health_none {
                    "none (--health none)"
                } else if disabled_by_image {
                    "none (the image says HEALTHCHECK NONE)"
                } else {
                    "none (the port accepting connections is enough)"
                };
                CheckView { source: "none", description: why.into() }
            }
        }
    }
}

/// The result of one check: passed or not, and what it printed (a command's output, cut at
/// 4 KiB, or why a network check failed).
#[derive(Debug, Clone)]
pub struct CheckResult {
    pub ok: bool,
    pub output: String,
}

/// The end of a check's output on one line, for an event.
fn tail(output: &str) -> String {
    let line = output.split_whitespace().collect::<Vec<_>>().join(" ");
    let chars: Vec<char> = line.chars().collect();
    if chars.len() > 200 {
        format!("…{}", chars[chars.len() - 200..].iter().collect::<String>())
    } else {
        line
    }
}

/// Whether a starting instance is ready to join rotation: its port accepted a connection, then
/// (with a check) `rise` checks passed in a row. Pure: the readiness loop feeds it.
#[derive(Debug, Clone)]
pub struct Readiness {
    accepting: bool,
    checked: bool,
    rise: u32,
    passes: u32,
}

impl Readiness {
    pub fn new(check: Option<&Check>) -> Readiness {
        Readiness { accepting: false, checked: check.is_some(), rise: check.map_or(1, |c| c.rise.max(1)), passes: 0 }
    }

    pub fn accepting(&self) -> bool {
        self.accepting
    }

    /// A connection attempt to the port; true when that makes the instance ready.
    pub fn port(&mut self, ok: bool) -> bool {
        self.accepting |= ok;
        self.accepting && !self.checked
    }

    /// A health check; true when the instance is ready.
    pub fn check(&mut self, ok: bool) -> bool {
        self.passes = if ok { self.passes + 1 } else { 0 };
        self.accepting && self.passes >= self.rise
    }
}

/// What the supervisor knows of an instance's health, as `app show` prints it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Health {
    /// No check configured, or not enough probes yet.
    Unknown,
    Healthy,
    Unhealthy,
}

impl Health {
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Unknown => "unknown",
            Health::Healthy => "healthy",
            Health::Unhealthy => "unhealthy",
        }
    }
}

/// Consecutive results of one instance's probes, and what they mean. Pure: the loop feeds it.
#[derive(Debug, Clone)]
pub struct Tracker {
    pub health: Health,
    passes: u32,
    fails: u32,
    /// When the instance became unhealthy.
    pub unhealthy_since: Option<Instant>,
    /// What the last check printed (a command's output, or why a network check failed), and
    /// when it ran (RFC 3339), as `docker inspect` keeps it.
    pub last_output: Option<(String, String)>,
    /// Left out of the published routes while unhealthy (a command check, which the proxy
    /// cannot run itself).
    pub routed_out: bool,
}

/// What a probe result changed.
#[derive(Debug, PartialEq)]
pub enum Change {
    None,
    BecameHealthy,
    BecameUnhealthy,
}

impl Default for Tracker {
    fn default() -> Self {
        Tracker {
            health: Health::Unknown,
            passes: 0,
            fails: 0,
            unhealthy_since: None,
            last_output: None,
            routed_out: false,
        }
    }
}

impl Tracker {
    /// An instance that just passed its readiness checks.
    pub fn healthy() -> Tracker {
        Tracker { health: Health::Healthy, ..Tracker::default() }
    }

    pub fn record(&mut self, ok: bool, rise: u32, fall: u32, now: Instant) -> Change {
        if ok {
            self.fails = 0;
            self.passes = self.passes.saturating_add(1);
            if self.health != Health::Healthy && self.passes >= rise.max(1) {
                let was_unhealthy = self.health == Health::Unhealthy;
                self.health = Health::Healthy;
                self.unhealthy_since = None;
                if was_unhealthy {
                    return Change::BecameHealthy;
                }
            }
        } else {
            self.passes = 0;
            self.fails = self.fails.saturating_add(1);
            if self.health != Health::Unhealthy && self.fails >= fall.max(1) {
                self.health = Health::Unhealthy;
                self.unhealthy_since = Some(now);
                return Change::BecameUnhealthy;
            }
        }
        Change::None
    }

    /// Unhealthy for at least `grace`.
    pub fn due_for_replacement(&self, grace: Duration, now: Instant) -> bool {
        self.unhealthy_since.is_some_and(|since| now.duration_since(since) >= grace)
    }
}

/// The supervisor's health state of every instance it probes, by uid.
#[derive(Default)]
pub struct HealthBook {
    pub(super) trackers: HashMap<String, Tracker>,
    /// The image `HEALTHCHECK` of each (app, revision) looked up so far: revisions never
    /// change, and the probe loops would otherwise read the image index every interval.
    image_checks: HashMap<(String, u32), Option<Healthcheck>>,
}

impl Supervisor {
    /// Starts the probe loop of a ready instance (once; it ends when the instance does).
    pub(super) fn watch_health(self: &Arc<Self>, uid: &str) {
        self.watch_health_from(uid, Tracker::default());
    }

    pub(super) fn watch_health_from(self: &Arc<Self>, uid: &str, start: Tracker) {
        {
            let mut book = lock(&self.health);
            if book.trackers.contains_key(uid) {
                return;
            }
            book.trackers.insert(uid.to_string(), start);
        }
        let me = self.clone();
        let uid = uid.to_string();
        tokio::spawn(async move {
            me.health_loop(&uid).await;
            lock(&me.health).trackers.remove(&uid);
        });
    }

    async fn health_loop(self: &Arc<Self>, uid: &str) {
        let mut replacing: Option<tokio::task::JoinHandle<()>> = None;
        loop {
            let Some((app, slot, ip)) = self.live_instance(uid) else { return };
            let (spec, check) = match self.check_of(uid) {
                Ok(Some(found)) => found,
                Ok(None) => return,
                Err(e) => {
                    tracing::warn!(%app, "health loop: {e}");
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    continue;
                }
            };
            let Some(check) = check else {
                // No check (now): nothing to know; look again later, the app may get one.
                let was_out = {
                    let mut book = lock(&self.health);
                    book.trackers.insert(uid.to_string(), Tracker::default()).is_some_and(|t| t.routed_out)
                };
                if was_out {
                    self.publish_routes();
                }
                tokio::time::sleep(Duration::from_secs(2)).await;
                continue;
            };
            let (starting, in_start_period) = {
                let started = lock(&self.live).get(uid).map(|l| l.started.elapsed()).unwrap_or_default();
                let in_start_period = started < check.start_period;
                let unknown = lock(&self.health).trackers.get(uid).is_none_or(|t| t.health == Health::Unknown);
                (unknown && in_start_period, in_start_period)
            };
            tokio::time::sleep(if starting { check.start_interval } else { check.interval }).await;
            if self.live_instance(uid).is_none() {
                return;
            }
            let result = self.run_check(uid, &check, SocketAddr::from((ip, spec.port))).await;
            let now = Instant::now();
            let instance = format!("{app}.{slot}");
            let (change, due, route_change) = {
                let mut book = lock(&self.health);
                let t = book.trackers.entry(uid.to_string()).or_default();
                t.last_output = Some((result.output.clone(), crate::apps::now()));
                // Docker: failures during the start period do not count; a pass ends it.
                let change = if !result.ok && in_start_period {
                    Change::None
                } else {
                    t.record(result.ok, check.rise, check.fall, now)
                };
                let routed_out = check.routed_by_supervisor() && t.health == Health::Unhealthy;
                let route_change = routed_out != t.routed_out;
                t.routed_out = routed_out;
                (change, t.due_for_replacement(spec.rollout.unhealthy_timeout(), now), route_change)
            };
            if route_change {
                self.publish_routes();
            }
            match change {
                Change::BecameUnhealthy => {
                    let why = if result.output.trim().is_empty() { "no output".into() } else { tail(&result.output) };
                    tracing::warn!(%app, "instance {instance} ({uid}, {ip}) is unhealthy: {why}");
                    let out = if check.routed_by_supervisor() { "out of rotation; " } else { "" };
                    self.events.emit(
                        Kind::InstanceUnhealthy,
                        &app,
                        Some(&instance),
                        format!(
                            "{} failed {} times in a row ({why}); {out}replaced if still unhealthy in {} s",
                            check.probe.describe(),
                            check.fall,
                            spec.rollout.unhealthy_timeout().as_secs()
                        ),
                    );
                }
                Change::BecameHealthy => {
                    let back = if check.routed_by_supervisor() { "; back in rotation" } else { "" };
                    self.events.emit(Kind::InstanceHealthy, &app, Some(&instance), format!("healthy again{back}"));
                }
                Change::None => {}
            }
            if due && replacing.as_ref().is_none_or(|h| h.is_finished()) {
                let me = self.clone();
                let uid = uid.to_string();
                replacing = Some(tokio::spawn(async move { me.replace_unhealthy(&uid).await }));
            }
        }
    }

    /// The app's spec (as stored now) and the check in force for instance `uid`: the app's
    /// own, else the `HEALTHCHECK` of the image its revision runs. `None` when the instance or
    /// its app is gone.
    pub(super) fn check_of(&self, uid: &str) -> Result<Option<(AppSpec, Option<Check>)>, String> {
        let Some((app, revision)) = lock(&self.live).get(uid).map(|l| (l.row.app.clone(), l.row.revision)) else {
            return Ok(None);
        };
        let Some(spec) = self.store.app(&app).map_err(|e| e.to_string())?.map(|a| a.spec) else {
            return Ok(None);
        };
        let image_check = if spec.routing.health.is_none() && !spec.routing.health_none {
            self.image_healthcheck(&app, revision)?
        } else {
            None
        };
        let check = Check::in_force(&spec.routing, image_check.as_ref());
        Ok(Some((spec, check)))
    }

    /// The `HEALTHCHECK` of the image revision `revision` of `app` runs.
    pub(super) fn image_healthcheck(&self, app: &str, revision: u32) -> Result<Option<Healthcheck>, String> {
        let key = (app.to_string(), revision);
        if let Some(known) = lock(&self.health).image_checks.get(&key) {
            return Ok(known.clone());
        }
        let Some(rev) = self.store.revision(app, revision).map_err(|e| e.to_string())? else {
            return Ok(None);
        };
        let check = self.image_for(&rev).map_err(|e| e.to_string())?.config.healthcheck;
        let mut book = lock(&self.health);
        // Bounded: a daemon that ran through thousands of revisions starts over.
        if book.image_checks.len() > 1024 {
            book.image_checks.clear();
        }
        book.image_checks.insert(key, check.clone());
        Ok(check)
    }

    /// The check in force for `app` as `app show` describes it.
    pub fn check_view(&self, app: &crate::apps::App) -> CheckView {
        let image = match (app.revision, &app.spec.routing) {
            (_, r) if r.health.is_some() => None,
            (Some(n), _) => self.image_healthcheck(&app.name, n).ok().flatten(),
            // Never started: the image it names, if it is here already (never pulled for this).
            (None, _) => deliverous_images::Reference::parse(&app.spec.image)
                .ok()
                .and_then(|r| self.images.get(&r).ok().flatten())
                .and_then(|i| i.config.healthcheck),
        };
        CheckView::of(&app.spec.routing, image.as_ref())
    }

    /// Runs `check` once against instance `uid` (at `addr` for a network check).
    pub(super) async fn run_check(&self, uid: &str, check: &Check, addr: SocketAddr) -> CheckResult {
        match &check.probe {
            Probe::Cmd { argv } => match self.exec_capture(uid, argv, check.timeout).await {
                Ok((0, out)) => CheckResult { ok: true, output: String::from_utf8_lossy(&out).into_owned() },
                Ok((code, out)) => {
                    let out = String::from_utf8_lossy(&out);
                    let output =
                        if out.trim().is_empty() { format!("exit {code}") } else { format!("exit {code}: {out}") };
                    CheckResult { ok: false, output }
                }
                Err(e) => CheckResult { ok: false, output: e },
            },
            network => match network.run(addr, check.timeout).await {
                Ok(()) => CheckResult { ok: true, output: String::new() },
                Err(e) => CheckResult { ok: false, output: e },
            },
        }
    }

    /// An app is removed: a new one of the same name numbers its revisions from 1 again.
    pub(super) fn forget_image_checks(&self, app: &str) {
        lock(&self.health).image_checks.retain(|(name, _), _| name != app);
    }

    /// Instances a command check found unhealthy: the route table leaves them out.
    pub(super) fn routed_out(&self) -> HashSet<String> {
        lock(&self.health).trackers.iter().filter(|(_, t)| t.routed_out).map(|(uid, _)| uid.clone()).collect()
    }

    /// (app, slot, ip) of an instance that runs and nobody is stopping.
    pub(super) fn live_instance(&self, uid: &str) -> Option<(String, u32, std::net::Ipv4Addr)> {
        lock(&self.live)
            .get(uid)
            .filter(|l| !l.stop_requested && l.state != State::Stopping)
            .map(|l| (l.row.app.clone(), l.row.slot, l.row.ip))
    }

    /// Starts a new instance in the slot of unhealthy `uid`, waits until it is ready, then
    /// drains and stops `uid`. If the new one does not become ready, it goes and `uid` stays:
    /// the next attempt comes after another grace period.
    async fn replace_unhealthy(self: &Arc<Self>, uid: &str) {
        let Some((app_name, slot, _)) = self.live_instance(uid) else { return };
        let _guard = self.lock_app(&app_name).await;
        let still_unhealthy = lock(&self.health).trackers.get(uid).is_some_and(|t| t.health == Health::Unhealthy);
        if !still_unhealthy || self.live_instance(uid).is_none() {
            return;
        }
        let instance = format!("{app_name}.{slot}");
        let result = self.replace_in_slot(&app_name, slot).await;
        match result {
            Ok(new_uid) => {
                self.stop_instance(uid).await;
                self.events.emit(
                    Kind::InstanceRestarting,
                    &app_name,
                    Some(&instance),
                    format!("replaced unhealthy instance {uid} with {new_uid}"),
                );
            }
            Err(reason) => {
                tracing::warn!(app = %app_name, "replacing unhealthy instance {instance} ({uid}) failed: {reason}");
                self.events.emit(
                    Kind::InstanceUnhealthy,
                    &app_name,
                    Some(&instance),
                    format!("its replacement did not become ready ({reason}); kept, tried again later"),
                );
                if let Some(t) = lock(&self.health).trackers.get_mut(uid) {
                    t.unhealthy_since = Some(Instant::now());
                }
            }
        }
    }

    /// One new instance of the app's current revision in `slot`, ready (health-gated) or gone.
    async fn replace_in_slot(self: &Arc<Self>, app_name: &str, slot: u32) -> Result<String, String> {
        let app = self.store.app(app_name).map_err(|e| e.to_string())?.ok_or("the app is gone")?;
        let number = app.revision.filter(|_| app.running).ok_or("the app is not running")?;
        let rev = self
            .store
            .revision(app_name, number)
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("revision {number} is missing"))?;
        let image = self.image_for(&rev).map_err(|e| e.to_string())?;
        self.start_ready(&app, &rev, &image, slot).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fall_failures_make_unhealthy_and_rise_passes_bring_back() {
        let t0 = Instant::now();
        let mut t = Tracker::healthy();
        assert_eq!(t.record(false, 2, 3, t0), Change::None);
        assert_eq!(t.record(false, 2, 3, t0), Change::None);
        assert_eq!(t.record(false, 2, 3, t0), Change::BecameUnhealthy);
        assert_eq!(t.record(false, 2, 3, t0), Change::None, "reported once");
        assert!(!t.due_for_replacement(Duration::from_secs(30), t0 + Duration::from_secs(29)));
        assert!(t.due_for_replacement(Duration::from_secs(30), t0 + Duration::from_secs(30)));
        assert_eq!(t.record(true, 2, 3, t0), Change::None);
        assert_eq!(t.record(true, 2, 3, t0), Change::BecameHealthy);
        assert!(!t.due_for_replacement(Duration::ZERO, t0), "healthy again: no replacement");
    }

    #[test]
    fn ready_takes_the_port_then_rise_passes_in_a_row() {
        let mut plain = Readiness::new(None);
        assert!(!plain.port(false));
        assert!(plain.port(true), "no check: the open port is enough");
        let mut checked = Readiness::new(Some(&Check::app(&HealthCheck { rise: 2, ..HealthCheck::http("/health") })));
        assert!(!checked.port(true), "the port alone is not enough");
        assert!(!checked.check(true));
        assert!(!checked.check(false), "a failure resets the count");
        assert!(!checked.check(true));
        assert!(checked.check(true));
    }

    #[test]
    fn an_unknown_instance_becomes_healthy_quietly() {
        let mut t = Tracker::default();
        assert_eq!(t.record(true, 1, 3, Instant::now()), Change::None);
        assert_eq!(t.health, Health::Healthy);
        assert_eq!(t.record(false, 1, 1, Instant::now()), Change::BecameUnhealthy);
    }

    #[test]
    fn the_apps_check_wins_then_the_images_unless_none() {
        let image = Healthcheck {
            test: vec!["CMD-SHELL".into(), "curl -f localhost".into()],
            start_period_ns: 2_000_000_000,
            ..Healthcheck::default()
        };
        let mut routing = Routing::default();
        let c = Check::in_force(&routing, Some(&image)).expect("the image's check");
        assert_eq!(c.source, Source::Image);
        assert_eq!(c.probe, Probe::Cmd { argv: vec!["/bin/sh".into(), "-c".into(), "curl -f localhost".into()] });
        assert_eq!((c.interval, c.timeout, c.fall, c.rise), (IMAGE_INTERVAL, IMAGE_TIMEOUT, IMAGE_RETRIES, 1));
        assert_eq!((c.start_period, c.start_interval), (Duration::from_secs(2), IMAGE_START_INTERVAL));
        assert!(c.routed_by_supervisor());
        assert!(
            c.describe().starts_with("CMD-SHELL curl -f localhost (image HEALTHCHECK; every 30s"),
            "{}",
            c.describe()
        );

        routing.health = Some(HealthCheck::http("/up"));
        let c = Check::in_force(&routing, Some(&image)).expect("the app's check");
        assert_eq!((c.source, c.probe.clone()), (Source::App, Probe::Http { path: "/up".into() }));
        assert!(!c.routed_by_supervisor(), "the proxy runs HTTP checks itself");

        routing.health = None;
        routing.health_none = true;
        assert_eq!(Check::in_force(&routing, Some(&image)), None);
        assert_eq!(CheckView::of(&routing, Some(&image)).source, "none");

        let disabled = Healthcheck { test: vec!["NONE".into()], ..Healthcheck::default() };
        let view = CheckView::of(&Routing::default(), Some(&disabled));
        assert_eq!(view.source, "none");
        assert!(view.description.contains("HEALTHCHECK NONE"));
        assert_eq!(CheckView::of(&Routing::default(), None).source, "none");
    }
}
