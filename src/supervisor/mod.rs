//! The supervisor reconciles each app's desired state (running or not, instance count,
//! revision) with the instances that actually run, starts and stops instances through their
//! shims, replaces crashed ones with backoff, and publishes the proxy's route table.

mod exec;
mod health;
mod instance;
mod restart;
mod rollout;
mod run;
pub mod userns;

pub use exec::{ExecOptions, Outcome, Session, SessionIo, DAEMON_ERROR};
pub use health::{CheckView, Health};
use restart::SlotHistory;
pub use restart::{ExitReason, ExitedSlot, SlotExit};
pub use rollout::DeployError;

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use deliverous_images::{Image, ImageStore, PullOptions, Reference};
use deliverous_runtime::network::HostNetwork;
use deliverous_runtime::shim::protocol::ExitStatus;
use deliverous_runtime::volume;
use serde::Serialize;
use tokio::sync::{watch, OwnedMutexGuard};

use crate::apps::store::{InstanceRow, Store, StoreError};
use crate::apps::{App, AppSpec, Revision};
use crate::events::{Events, Kind};
use crate::proxy::link::ProxyLink;
use crate::proxy::{AppRoute, BackendSpec, RouteConfig};

/// Where everything the daemon creates lives, and the names of its kernel objects.
#[derive(Debug, Clone)]
pub struct Settings {
    pub data_dir: PathBuf,
    pub run_dir: PathBuf,
    pub cgroup_parent: String,
    pub domain_suffix: String,
    pub insecure_registries: Vec<String>,
    pub stop_timeout: Duration,
    pub log_max_bytes: u64,
    pub log_keep: u32,
    /// How long a new instance may take to accept connections on its port.
    pub ready_timeout: Duration,
    /// Host paths (and what is below them) apps may mount read-only.
    pub allow_binds: Vec<PathBuf>,
    /// Revisions kept per app for rollback; older ones, and images only they used, are
    /// collected.
    pub keep_revisions: u32,
    /// The longest wait before replacing an instance that keeps crashing.
    pub restart_max_delay: Duration,
    /// The proxy's own listening ports (an app cannot publish them as TCP ports).
    pub proxy_ports: Vec<u16>,
    /// Host ids `--userns` apps' ranges are taken from.
    pub userns_range: userns::UsernsRange,
}

impl Settings {
    /// Where named volume `name` keeps its data.
    pub fn volume_dir(&self, name: &str) -> PathBuf {
        self.data_dir.join("volumes").join(name)
    }

    /// Refuses host paths outside `--allow-bind` (resolved, so a symlink cannot lead out).
    pub fn check_host_paths(&self, spec: &AppSpec) -> Result<(), String> {
        for v in &spec.volumes {
            let volume = volume::parse(v)?;
            let volume::Source::Host(path) = &volume.source else { continue };
            let real = path.canonicalize().map_err(|e| format!("host path {}: {e}", path.display()))?;
            let allowed = self.allow_binds.iter().any(|a| a.canonicalize().is_ok_and(|a| real.starts_with(a)));
            if !allowed {
                return Err(format!(
                    "host path {} is not one the operator allows to mount (daemon flag --allow-bind)",
                    path.display()
                ));
            }
        }
        Ok(())
    }

    /// An app's stop grace period: its own, or the daemon's default.
    pub fn grace(&self, spec: &AppSpec) -> Duration {
        spec.stop_timeout.map_or(self.stop_timeout, |t| Duration::from_secs(u64::from(t)))
    }
    pub fn instance_dir(&self, uid: &str) -> PathBuf {
        self.data_dir.join("instances").join(uid)
    }
    pub fn netns_path(&self, uid: &str) -> PathBuf {
        self.run_dir.join("netns").join(uid)
    }
    pub fn shim_socket(&self, uid: &str) -> PathBuf {
        self.run_dir.join("shims").join(format!("{uid}.sock"))
    }
    pub fn container_root(&self) -> PathBuf {
        self.run_dir.join("containers")
    }
    pub fn cgroups_path(&self, uid: &str) -> String {
        format!("/{}/{uid}", self.cgroup_parent)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Image(#[from] deliverous_images::Error),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Instance(String),
}

/// An instance as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct InstanceView {
    pub name: String,
    pub id: String,
    pub slot: u32,
    pub revision: u32,
    pub ip: Ipv4Addr,
    pub state: &'static str,
    pub pid: Option<i32>,
    pub started_at: String,
    /// Replacements made so far for this instance's slot.
    pub restarts: u32,
    /// How the slot's previous instance ended, if one did on its own.
    pub last_exit: Option<SlotExit>,
    /// What the supervisor's own health checks say: healthy, unhealthy or unknown.
    pub health: &'static str,
    /// What the last health check printed, and when it ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health_output: Option<HealthOutput>,
    /// In the route table the supervisor publishes (ready, and not failing a command check).
    pub in_rotation: bool,
}

/// The last health check's output, as `docker inspect` keeps it.
#[derive(Debug, Clone, Serialize)]
pub struct HealthOutput {
    /// A command's stdout and stderr (at most 4 KiB), or why a network check failed.
    pub output: String,
    pub at: String,
}

/// What the supervisor knows of an app's exits (kept across daemon restarts).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Restarts {
    /// Instances replaced after an exit nobody asked for.
    pub count: u32,
    /// `exit 1`, `signal 9`, `oom`, `shim lost`.
    pub last_exit: Option<String>,
    /// The same as data: `{"code":1}`, `{"signal":"SIGKILL"}`, `{"oom":true}`.
    pub last_exit_reason: Option<ExitReason>,
    /// `exited with code 1`, `killed by SIGKILL`.
    pub last_exit_message: Option<String>,
    pub last_exit_at: Option<String>,
    /// Some slot crashed quickly several times in a row and is backing off.
    pub crash_loop: bool,
    /// Slots without an instance after an exit: backing off, or kept empty by the restart policy.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub exited: Vec<ExitedSlot>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum State {
    Starting,
    Ready,
    Stopping,
}

struct Live {
    row: InstanceRow,
    state: State,
    pid: Option<i32>,
    stop_requested: bool,
    /// When this daemon started (or re-attached to) it: a crash after a long run is not part of
    /// a crash loop.
    started: Instant,
    stop_signal: i32,
    /// How long the stop signal has before SIGKILL.
    stop_grace: Duration,
    done: watch::Receiver<bool>,
}

pub struct Supervisor {
    settings: Settings,
    store: Store,
    images: Arc<ImageStore>,
    net: Arc<HostNetwork>,
    routes: Arc<ProxyLink>,
    events: Arc<Events>,
    live: Mutex<HashMap<String, Live>>,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Exits, backoff and restart-policy holds per app slot.
    slots: Mutex<HashMap<(String, u32), SlotHistory>>,
    /// The supervisor's health checks of running instances.
    health: Mutex<health::HealthBook>,
    /// The previous look at each instance's counters, for rates (CPU %, requests/s).
    sampler: crate::stats::Sampler,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Supervisor {
    pub fn new(
        settings: Settings,
        store: Store,
        images: Arc<ImageStore>,
        net: Arc<HostNetwork>,
        routes: Arc<ProxyLink>,
        events: Arc<Events>,
    ) -> Arc<Self> {
        Arc::new(Supervisor {
            settings,
            store,
            images,
            net,
            routes,
            events,
            live: Mutex::new(HashMap::new()),
            locks: Mutex::new(HashMap::new()),
            slots: Mutex::new(HashMap::new()),
            health: Mutex::new(health::HealthBook::default()),
            sampler: crate::stats::Sampler::default(),
        })
    }

    /// Garbage collection after `app` moved to a new revision (or was removed: `removed`
    /// holds the image digests its revisions used): old revisions beyond `keep_revisions` are
    /// forgotten, the images that only they used are removed, then unreferenced layers and
    /// blobs. Images never used by a revision (pulled ahead) are left alone. Runs in the
    /// background; failures are logged.
    pub fn collect_garbage(self: &Arc<Self>, app: &str, removed: Vec<String>) {
        let me = self.clone();
        let app = app.to_string();
        tokio::spawn(async move {
            if let Err(e) = me.collect_garbage_now(&app, removed).await {
                tracing::warn!(%app, "image garbage collection: {e}");
            }
        });
    }

    async fn collect_garbage_now(&self, app: &str, mut candidates: Vec<String>) -> Result<(), SupervisorError> {
        candidates.extend(self.store.prune_revisions(app, self.settings.keep_revisions.max(1))?);
        if candidates.is_empty() {
            return Ok(());
        }
        let in_use = self.store.digests_in_use()?;
        let mut removed = 0;
        for image in self.images.list()? {
            if candidates.contains(&image.digest) && !in_use.contains_key(&image.digest) {
                if let Ok(reference) = deliverous_images::Reference::parse(&image.reference) {
                    if self.images.remove(&reference)?.is_some() {
                        tracing::info!(%app, image = %image.reference, "removed an image no revision uses any more");
                        removed += 1;
                    }
                }
            }
        }
        if removed > 0 {
            let report = self.images.prune().await?;
            tracing::info!(%app, layers = report.layers, blobs = report.blobs, bytes = report.bytes, "pruned image data");
        }
        Ok(())
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    pub fn routes(&self) -> &Arc<ProxyLink> {
        &self.routes
    }

    pub fn events(&self) -> &Events {
        &self.events
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn images(&self) -> &Arc<ImageStore> {
        &self.images
    }

    /// Serialises every change to one app.
    pub async fn lock_app(&self, name: &str) -> OwnedMutexGuard<()> {
        let m = lock(&self.locks).entry(name.to_string()).or_default().clone();
        m.lock_owned().await
    }

    pub fn pull_options(&self) -> PullOptions {
        PullOptions { insecure_registries: self.settings.insecure_registries.clone(), progress: None }
    }

    /// The image for `reference`: the local one if present, else pulled.
    pub async fn resolve_image(&self, reference: &str) -> Result<Image, SupervisorError> {
        let r = Reference::parse(reference)?;
        if let Some(image) = self.images.get(&r)? {
            return Ok(image);
        }
        Ok(self.images.pull(&r, &self.pull_options()).await?)
    }

    /// The image a revision was made from, by digest.
    fn image_for(&self, rev: &Revision) -> Result<Image, SupervisorError> {
        let r = Reference::parse(&rev.image)?;
        if let Some(image) = self.images.get(&r)?.filter(|i| i.digest == rev.digest) {
            return Ok(image);
        }
        self.images.list()?.into_iter().find(|i| i.digest == rev.digest).ok_or_else(|| {
            SupervisorError::Instance(format!(
                "image {}@{} of revision {} is no longer in the local store: pull it again",
                rev.image, rev.digest, rev.number
            ))
        })
    }

    /// The log files of `app`'s instances (only `instance`, e.g. `web.2`, if given).
    pub fn log_sources(&self, app: &str, instance: Option<&str>) -> Vec<crate::logs::Source> {
        lock(&self.live)
            .values()
            .filter(|l| l.row.app == app)
            .map(|l| crate::logs::Source {
                instance: format!("{}.{}", l.row.app, l.row.slot),
                path: self.settings.instance_dir(&l.row.uid).join("log"),
            })
            .filter(|s| instance.is_none_or(|i| s.instance == i))
            .collect()
    }

    pub fn instances_of(&self, app: &str) -> Vec<InstanceView> {
        let slots = lock(&self.slots).clone();
        let history = |slot: u32| slots.get(&(app.to_string(), slot));
        let health = lock(&self.health).trackers.clone();
        let mut v: Vec<InstanceView> = lock(&self.live)
            .values()
            .filter(|l| l.row.app == app)
            .map(|l| InstanceView {
                name: format!("{}.{}", l.row.app, l.row.slot),
                id: l.row.uid.clone(),
                slot: l.row.slot,
                revision: l.row.revision,
                ip: l.row.ip,
                state: match l.state {
                    State::Starting => "starting",
                    State::Ready => "running",
                    State::Stopping => "stopping",
                },
                pid: l.pid,
                started_at: l.row.created_at.clone(),
                restarts: history(l.row.slot).map_or(0, |h| h.restarts),
                last_exit: history(l.row.slot).and_then(|h| h.last_exit.clone()),
                health: health.get(&l.row.uid).map_or(Health::Unknown, |t| t.health).as_str(),
                health_output: health
                    .get(&l.row.uid)
                    .and_then(|t| t.last_output.clone())
                    .map(|(output, at)| HealthOutput { output, at }),
                in_rotation: l.state == State::Ready && !health.get(&l.row.uid).is_some_and(|t| t.routed_out),
            })
            .collect();
        v.sort_by(|a, b| (a.slot, &a.started_at).cmp(&(b.slot, &b.started_at)));
        v
    }

    /// The app's exits: totals, the last one, and the slots left without an instance. A slot
    /// is in a crash loop from its [`restart::CRASH_LOOP_AFTER`]th quick crash in a row until
    /// its instance has run [`restart::STABLE_AFTER`].
    pub fn restarts_of(&self, app: &str) -> Restarts {
        let desired = self.store.app(app).ok().flatten().filter(|a| a.running).map_or(0, |a| a.instances);
        let live = lock(&self.live);
        let slots = lock(&self.slots);
        let mut r = Restarts::default();
        let mut exited = Vec::new();
        let mut last: Option<&SlotExit> = None;
        for ((name, slot), h) in slots.iter().filter(|((name, _), _)| name == app) {
            r.count += h.restarts;
            if let Some(e) = &h.last_exit {
                if last.is_none_or(|l| e.at > l.at) {
                    last = Some(e);
                }
            }
            if *slot > desired {
                continue;
            }
            let mut in_slot = live.values().filter(|l| l.row.app == *name && l.row.slot == *slot && !l.stop_requested);
            let stable = in_slot.clone().any(|l| l.started.elapsed() >= restart::STABLE_AFTER);
            let crash_loop = h.crash_looping() && !stable;
            r.crash_loop |= crash_loop;
            if in_slot.next().is_none() {
                exited.push(ExitedSlot {
                    name: format!("{name}.{slot}"),
                    slot: *slot,
                    state: if h.held { "exited" } else { "restarting" },
                    restarts: h.restarts,
                    crash_loop,
                    last_exit: h.last_exit.clone(),
                });
            }
        }
        if let Some(e) = last {
            r.last_exit = Some(e.reason.short());
            r.last_exit_reason = Some(e.reason.clone());
            r.last_exit_message = Some(e.message.clone());
            r.last_exit_at = Some(e.at.clone());
        }
        exited.sort_by_key(|e| e.slot);
        r.exited = exited;
        r
    }

    /// Keeps a slot's history in the state database (best effort: it is also in memory).
    fn save_slot(&self, app: &str, slot: u32, history: &SlotHistory) {
        let saved = serde_json::to_string(history)
            .map_err(|e| e.to_string())
            .and_then(|json| self.store.save_slot(app, slot, &json).map_err(|e| e.to_string()));
        if let Err(e) = saved {
            tracing::warn!(app, slot, "cannot record the exit history of {app}.{slot}: {e}");
        }
    }

    /// At start-up: the slot histories a previous daemon recorded.
    fn load_slots(&self) -> Result<(), SupervisorError> {
        let mut slots = lock(&self.slots);
        for (app, slot, json) in self.store.slots()? {
            match serde_json::from_str::<SlotHistory>(&json) {
                Ok(h) => {
                    slots.insert((app, slot), h);
                }
                Err(e) => tracing::warn!(app, slot, "ignoring an unreadable exit history of {app}.{slot}: {e}"),
            }
        }
        Ok(())
    }

    /// An operator brought the app back (`app start`, `scale`, a config change): slots the
    /// restart policy kept empty are filled again; with `now`, slots backing off too.
    pub fn release_slots(&self, app: &str, now: bool) {
        let mut released = Vec::new();
        for ((name, slot), h) in lock(&self.slots).iter_mut() {
            if name == app {
                if h.held {
                    h.held = false;
                    released.push((*slot, h.clone()));
                }
                if now {
                    h.not_before = None;
                }
            }
        }
        for (slot, h) in released {
            self.save_slot(app, slot, &h);
        }
    }

    /// The app is gone: so is its history (a new app of the same name starts afresh; the
    /// database drops it with the app).
    pub fn forget_app(&self, app: &str) {
        lock(&self.slots).retain(|(name, _), _| name != app);
        self.forget_image_checks(app);
    }

    /// Whether converging must leave `slot` empty for now (backing off, or held by the
    /// restart policy).
    fn slot_waiting(&self, app: &str, slot: u32) -> bool {
        lock(&self.slots).get(&(app.to_string(), slot)).is_some_and(|h| h.waiting(Instant::now()))
    }

    /// Replacements of instance `app.slot` after exits nobody asked for (kept across daemon
    /// restarts).
    pub fn slot_restarts(&self, app: &str, slot: u32) -> u64 {
        lock(&self.slots).get(&(app.to_string(), slot)).map_or(0, |h| u64::from(h.restarts))
    }

    pub fn sampler(&self) -> &crate::stats::Sampler {
        &self.sampler
    }

    pub fn live_count(&self) -> usize {
        lock(&self.live).len()
    }

    /// Host names routed to an app.
    pub fn hosts_of(&self, app: &App) -> Vec<String> {
        let mut hosts = vec![format!("{}.{}", app.name, self.settings.domain_suffix)];
        hosts.extend(app.spec.domains.iter().map(|d| d.to_ascii_lowercase()));
        hosts
    }

    /// Rebuilds the route table from the apps and their ready instances, and swaps it in.
    pub fn publish_routes(&self) {
        let apps = match self.store.apps() {
            Ok(apps) => apps,
            Err(e) => {
                tracing::error!("cannot rebuild routes: {e}");
                return;
            }
        };
        // Read before `live` is locked: the health loops take the two locks the other way.
        let routed_out = self.routed_out();
        let live = lock(&self.live);
        let mut config = RouteConfig::default();
        for app in &apps {
            let mut backends: Vec<(u32, &str, BackendSpec)> = live
                .values()
                .filter(|l| l.row.app == app.name && l.state == State::Ready && !routed_out.contains(&l.row.uid))
                .map(|l| {
                    let spec = BackendSpec {
                        instance: format!("{}.{}", app.name, l.row.slot),
                        addr: SocketAddr::from((l.row.ip, app.spec.port)),
                    };
                    (l.row.slot, l.row.uid.as_str(), spec)
                })
                .collect();
            backends.sort_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
            config.apps.push(AppRoute {
                app: app.name.clone(),
                hosts: self.hosts_of(app),
                backends: backends.into_iter().map(|b| b.2).collect(),
                options: app.spec.routing.options(),
                tcp: app.spec.routing.tcp.clone(),
            });
        }
        drop(live);
        self.routes.publish(config);
    }

    /// Brings the app's instances to its desired state. The caller holds the app's lock.
    pub async fn converge(self: &Arc<Self>, name: &str) -> Result<(), SupervisorError> {
        let app = self.store.app(name)?;
        let (desired, revision) = match &app {
            Some(a) if a.running => (a.instances, a.revision),
            _ => (0, None),
        };
        let current: Vec<(String, u32, u32, bool)> = lock(&self.live)
            .values()
            .filter(|l| l.row.app == name && !l.stop_requested)
            .map(|l| (l.row.uid.clone(), l.row.slot, l.row.revision, l.state == State::Stopping))
            .collect();

        // Extra slots go first, freeing their resources for what starts next.
        let extra: Vec<String> = current.iter().filter(|c| c.1 > desired).map(|c| c.0.clone()).collect();
        futures_util::future::join_all(extra.iter().map(|uid| self.stop_instance(uid))).await;

        let Some(revision) = revision.filter(|_| desired > 0) else {
            self.publish_routes();
            return Ok(());
        };
        let rev = self
            .store
            .revision(name, revision)?
            .ok_or_else(|| SupervisorError::Instance(format!("revision {revision} of app {name} is missing")))?;
        let mut fresh = Vec::new();
        let mut replace = Vec::new();
        for slot in 1..=desired {
            let in_slot: Vec<&(String, u32, u32, bool)> = current.iter().filter(|c| c.1 == slot).collect();
            if in_slot.iter().any(|c| c.2 == revision) {
                // Older duplicates in a slot that already runs the revision: a replace that was
                // interrupted. Finish it.
                for c in in_slot.iter().filter(|c| c.2 != revision) {
                    replace.push((slot, Some(c.0.clone()), false));
                }
            } else if in_slot.is_empty() {
                if !self.slot_waiting(name, slot) {
                    fresh.push(slot);
                }
            } else {
                for c in in_slot {
                    replace.push((slot, Some(c.0.clone()), true));
                }
            }
        }
        let mut errors = Vec::new();
        let app = app.as_ref().ok_or_else(|| SupervisorError::NotFound(format!("app {name} is gone")))?;
        // Read once: every instance this round starts from the same image.
        let image = if fresh.is_empty() && !replace.iter().any(|r| r.2) { None } else { Some(self.image_for(&rev)?) };
        if let Some(image) = image.as_ref().filter(|_| !fresh.is_empty()) {
            let results =
                futures_util::future::join_all(fresh.iter().map(|slot| self.start_instance(app, &rev, image, *slot)))
                    .await;
            errors.extend(results.into_iter().filter_map(Result::err));
        }
        // Rolling replacement, one slot at a time: the new instance is ready before the old
        // one leaves rotation.
        for (slot, old, start_new) in replace {
            if let (true, Some(image)) = (start_new, image.as_ref()) {
                if let Err(e) = self.start_instance(app, &rev, image, slot).await {
                    errors.push(e);
                    continue;
                }
            }
            if let Some(old) = old {
                self.stop_instance(&old).await;
            }
        }
        self.publish_routes();
        match errors.into_iter().next() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Called when an instance is gone (exited, killed or stopped) and its resources are freed:
    /// records how it ended and, for an exit nobody asked for, has the slot refilled after the
    /// backoff if the restart policy wants it.
    fn after_exit(self: &Arc<Self>, row: &InstanceRow, status: Option<ExitStatus>, requested: bool, uptime: Duration) {
        self.publish_routes();
        let instance = format!("{}.{}", row.app, row.slot);
        let reason = ExitReason::of(status.as_ref());
        if requested {
            let how = if status.is_some() { reason.describe() } else { "gone".to_string() };
            self.events.emit(Kind::InstanceStopped, &row.app, Some(&instance), format!("stopped ({how})"));
            return;
        }
        tracing::warn!(app = %row.app, slot = row.slot, "instance {instance} exited unexpectedly: {}", reason.short());
        let app = self.store.app(&row.app).ok().flatten();
        let policy = app.as_ref().map(|a| a.spec.restart).unwrap_or_default();
        // The slot is still wanted: the app runs and was not scaled below it meanwhile.
        let wanted = app.as_ref().is_some_and(|a| a.running && row.slot <= a.instances);
        let replace = wanted && restart::wants_replacement(policy, &reason);
        let exit = SlotExit { reason: reason.clone(), message: reason.describe(), at: crate::apps::now() };
        let (consecutive, delay, history) = {
            let mut slots = lock(&self.slots);
            let h = slots.entry((row.app.clone(), row.slot)).or_default();
            h.last_exit = Some(exit.clone());
            let (consecutive, delay) = restart::next_backoff(h.consecutive, uptime, self.settings.restart_max_delay);
            if replace {
                h.consecutive = consecutive;
                h.restarts += 1;
                h.held = false;
                h.not_before = Some(Instant::now() + delay);
            } else {
                h.held = wanted;
            }
            (consecutive, delay, h.clone())
        };
        if app.is_some() {
            self.save_slot(&row.app, row.slot, &history);
        }
        let restarts = history.restarts;
        let mut message = format!("exited unexpectedly: {} after {}", exit.message, human(uptime));
        if wanted && !replace {
            message.push_str(&format!("; not replaced (restart policy {policy})"));
        }
        self.events.emit(Kind::InstanceExited, &row.app, Some(&instance), message);
        if !replace {
            return;
        }
        if consecutive == restart::CRASH_LOOP_AFTER {
            self.events.emit(
                Kind::CrashLoop,
                &row.app,
                Some(&instance),
                format!(
                    "crashed {consecutive} times in a row, each within {}; backing off",
                    human(restart::STABLE_AFTER)
                ),
            );
        }
        self.events.emit(
            Kind::InstanceRestarting,
            &row.app,
            Some(&instance),
            format!("replaced in {} (restart {restarts}, {consecutive} quick crashes in a row)", human(delay)),
        );
        let me = self.clone();
        let (app, slot) = (row.app.clone(), row.slot);
        tokio::spawn(async move {
            let mut delay = delay;
            loop {
                tokio::time::sleep(delay).await;
                let result = {
                    let _guard = me.lock_app(&app).await;
                    me.converge(&app).await
                };
                let Err(e) = result else { return };
                tracing::warn!(app = %app, "replacing {app}.{slot}: {e}");
                // The replacement could not start (image gone, no address left…): the slot
                // stays in the backoff, and is tried again later.
                match me.retry_delay(&app, slot) {
                    Some(d) => {
                        me.events.emit(
                            Kind::InstanceRestarting,
                            &app,
                            Some(&format!("{app}.{slot}")),
                            format!("could not start ({e}); next try in {}", human(d)),
                        );
                        delay = d;
                    }
                    None => return,
                }
            }
        });
    }

    /// After a failed replacement of `slot`: the wait before the next try, if the slot is still
    /// wanted and still empty.
    fn retry_delay(&self, app: &str, slot: u32) -> Option<Duration> {
        let wanted = self.store.app(app).ok().flatten().is_some_and(|a| a.running && slot <= a.instances);
        let filled = lock(&self.live).values().any(|l| l.row.app == app && l.row.slot == slot && !l.stop_requested);
        if !wanted || filled {
            return None;
        }
        let mut slots = lock(&self.slots);
        let h = slots.get_mut(&(app.to_string(), slot)).filter(|h| !h.held)?;
        let (consecutive, delay) =
            restart::next_backoff(h.consecutive, Duration::ZERO, self.settings.restart_max_delay);
        h.consecutive = consecutive;
        h.not_before = Some(Instant::now() + delay);
        Some(delay)
    }
}

/// `100ms`, `1.6s`, `30s`, `2m5s`.
fn human(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        format!("{ms}ms")
    } else if ms < 60_000 {
        let s = format!("{:.1}", ms as f64 / 1000.0);
        format!("{}s", s.trim_end_matches(".0"))
    } else {
        format!("{}m{}s", ms / 60_000, (ms % 60_000) / 1000)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_for_people() {
        assert_eq!(human(Duration::from_millis(100)), "100ms");
        assert_eq!(human(Duration::from_millis(1600)), "1.6s");
        assert_eq!(human(Duration::from_secs(30)), "30s");
        assert_eq!(human(Duration::from_secs(125)), "2m5s");
    }
}
