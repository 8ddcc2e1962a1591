//! The supervisor's own health checks: whether a new instance is ready to join rotation during
//! a deploy, and a probe loop per running instance that replaces one that stays unhealthy. It
//! never reads the proxy's view of health (the proxy runs its own checks, in its own process).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{lock, State, Supervisor};
use crate::events::Kind;
use crate::proxy::HealthCheck;

/// How an instance is checked. An image's `HEALTHCHECK CMD …` would become a third kind,
/// `Cmd(argv)`, run inside the instance; that needs exec into an instance, which the
/// supervisor cannot do yet, so such images are checked by the app-level check only. Adding
/// it means a variant here and its arm in [`Probe::run`]; the loops below do not change.
#[derive(Debug, Clone, PartialEq)]
pub enum Probe {
    /// `GET path` answered by a 2xx or 3xx status.
    Http { path: String },
    /// A TCP connection opens.
    Tcp,
}

impl Probe {
    pub fn of(check: &HealthCheck) -> Probe {
        match &check.path {
            Some(path) => Probe::Http { path: path.clone() },
            None => Probe::Tcp,
        }
    }

    /// One check of the instance at `addr`, given at most `timeout`.
    pub async fn run(&self, addr: SocketAddr, timeout: Duration) -> Result<(), String> {
        let attempt = async {
            let mut stream = TcpStream::connect(addr).await.map_err(|e| format!("connect {addr}: {e}"))?;
            match self {
                Probe::Tcp => Ok(()),
                Probe::Http { path } => http_status(&mut stream, addr, path).await,
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
        }
    }
}

async fn http_status(stream: &mut TcpStream, addr: SocketAddr, path: &str) -> Result<(), String> {
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: deliverous-supervisor\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.map_err(|e| format!("send: {e}"))?;
    let mut head = Vec::with_capacity(64);
    let mut buf = [0u8; 256];
    while !head.contains(&b'\n') && head.len() < 1024 {
        let n = stream.read(&mut buf).await.map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&head);
    match line.split_whitespace().nth(1).and_then(|s| s.parse::<u16>().ok()) {
        Some(200..=399) => Ok(()),
        Some(code) => Err(format!("GET {path}: status {code}")),
        None => Err(format!("GET {path}: not an HTTP answer: {:?}", line.lines().next().unwrap_or(""))),
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
    pub fn new(check: Option<&HealthCheck>) -> Readiness {
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
        Tracker { health: Health::Unknown, passes: 0, fails: 0, unhealthy_since: None }
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
            let spec = match self.store.app(&app) {
                Ok(Some(a)) => a.spec,
                Ok(None) => return,
                Err(e) => {
                    tracing::warn!(%app, "health loop: {e}");
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    continue;
                }
            };
            let Some(check) = spec.routing.health.clone() else {
                // No check (now): nothing to know; look again later, the app may get one.
                lock(&self.health).trackers.insert(uid.to_string(), Tracker::default());
                tokio::time::sleep(Duration::from_secs(2)).await;
                continue;
            };
            tokio::time::sleep(Duration::from_millis(check.interval_ms.max(100))).await;
            let Some((_, _, ip2)) = self.live_instance(uid) else { return };
            let probe = Probe::of(&check);
            let result = probe.run(SocketAddr::from((ip2, spec.port)), Duration::from_millis(check.timeout_ms)).await;
            let now = Instant::now();
            let instance = format!("{app}.{slot}");
            let (change, due) = {
                let mut book = lock(&self.health);
                let t = book.trackers.entry(uid.to_string()).or_default();
                let change = t.record(result.is_ok(), check.rise, check.fall, now);
                (change, t.due_for_replacement(spec.rollout.unhealthy_timeout(), now))
            };
            match change {
                Change::BecameUnhealthy => {
                    let why = result.as_ref().err().cloned().unwrap_or_default();
                    tracing::warn!(%app, "instance {instance} ({uid}, {ip}) is unhealthy: {why}");
                    self.events.emit(
                        Kind::InstanceUnhealthy,
                        &app,
                        Some(&instance),
                        format!(
                            "{} failed {} times in a row ({why}); replaced if still unhealthy in {} s",
                            probe.describe(),
                            check.fall,
                            spec.rollout.unhealthy_timeout().as_secs()
                        ),
                    );
                }
                Change::BecameHealthy => {
                    self.events.emit(Kind::InstanceHealthy, &app, Some(&instance), "healthy again".to_string());
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
        let mut checked = Readiness::new(Some(&HealthCheck { rise: 2, ..HealthCheck::http("/health") }));
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
}
