//! The supervisor reconciles each app's desired state (running or not, instance count,
//! revision) with the instances that actually run, starts and stops instances through their
//! shims, replaces crashed ones with backoff, and publishes the proxy's route table.

mod instance;

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use deliverous_images::{Image, ImageStore, PullOptions, Reference};
use deliverous_runtime::network::HostNetwork;
use deliverous_runtime::volume;
use serde::Serialize;
use tokio::sync::{watch, OwnedMutexGuard};

use crate::apps::store::{InstanceRow, Store, StoreError};
use crate::apps::{App, AppSpec, Revision};
use crate::events::{Events, Kind};
use crate::proxy::{AppRoute, BackendSpec, RouteConfig, RouteTable};

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
    /// The proxy's own listening ports (an app cannot publish them as TCP ports).
    pub proxy_ports: Vec<u16>,
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
}

/// What the supervisor remembers of an app's crashes.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Restarts {
    pub count: u32,
    pub last_exit: Option<String>,
    pub last_exit_at: Option<String>,
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
    routes: Arc<RouteTable>,
    events: Arc<Events>,
    live: Mutex<HashMap<String, Live>>,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    restarts: Mutex<HashMap<String, Restarts>>,
    /// Consecutive quick crashes per app slot, for the restart backoff.
    backoff: Mutex<HashMap<(String, u32), (u32, Instant)>>,
    /// Unexpected exits per app slot (`web.2`) since the daemon started, for metrics.
    slot_restarts: Mutex<HashMap<(String, u32), u64>>,
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
        routes: Arc<RouteTable>,
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
            restarts: Mutex::new(HashMap::new()),
            backoff: Mutex::new(HashMap::new()),
            slot_restarts: Mutex::new(HashMap::new()),
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

    pub fn routes(&self) -> &RouteTable {
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
            })
            .collect();
        v.sort_by(|a, b| (a.slot, &a.started_at).cmp(&(b.slot, &b.started_at)));
        v
    }

    pub fn restarts_of(&self, app: &str) -> Restarts {
        lock(&self.restarts).get(app).cloned().unwrap_or_default()
    }

    /// Unexpected exits of instance `app.slot` since the daemon started.
    pub fn slot_restarts(&self, app: &str, slot: u32) -> u64 {
        lock(&self.slot_restarts).get(&(app.to_string(), slot)).copied().unwrap_or(0)
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
        let live = lock(&self.live);
        let mut config = RouteConfig::default();
        for app in &apps {
            let mut backends: Vec<(u32, &str, BackendSpec)> = live
                .values()
                .filter(|l| l.row.app == app.name && l.state == State::Ready)
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
                fresh.push(slot);
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

    /// Converges an app after taking its lock; for background triggers.
    pub async fn converge_locked(self: &Arc<Self>, name: &str) {
        let _guard = self.lock_app(name).await;
        if let Err(e) = self.converge(name).await {
            tracing::warn!(app = name, "converge: {e}");
        }
    }

    /// Called when an instance is gone (exited, killed or stopped) and its resources are freed.
    fn after_exit(self: &Arc<Self>, row: &InstanceRow, exit_reason: Option<String>, requested: bool) {
        self.publish_routes();
        if requested {
            return;
        }
        let reason = exit_reason.unwrap_or_else(|| "shim lost".to_string());
        tracing::warn!(app = %row.app, slot = row.slot, "instance {}.{} exited unexpectedly: {reason}", row.app, row.slot);
        self.events.emit(
            Kind::InstanceExited,
            &row.app,
            Some(&format!("{}.{}", row.app, row.slot)),
            format!("exited unexpectedly: {reason}"),
        );
        {
            let mut r = lock(&self.restarts);
            let entry = r.entry(row.app.clone()).or_default();
            entry.count += 1;
            entry.last_exit = Some(reason);
            entry.last_exit_at = Some(crate::apps::now());
        }
        *lock(&self.slot_restarts).entry((row.app.clone(), row.slot)).or_default() += 1;
        let delay = {
            let mut b = lock(&self.backoff);
            let e = b.entry((row.app.clone(), row.slot)).or_insert((0, Instant::now()));
            // A stable run resets the backoff.
            if e.1.elapsed() > Duration::from_secs(30) {
                e.0 = 0;
            }
            let d = restart_delay(e.0);
            e.0 += 1;
            e.1 = Instant::now();
            d
        };
        let instance = format!("{}.{}", row.app, row.slot);
        self.events.emit(Kind::InstanceRestarting, &row.app, Some(&instance), format!("replaced in {delay:?}"));
        let me = self.clone();
        let app = row.app.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            me.converge_locked(&app).await;
        });
    }
}

/// 100 ms, doubling per consecutive crash, capped at 30 s.
pub fn restart_delay(consecutive: u32) -> Duration {
    Duration::from_millis(100u64.saturating_mul(1u64 << consecutive.min(9))).min(Duration::from_secs(30))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        assert_eq!(restart_delay(0), Duration::from_millis(100));
        assert_eq!(restart_delay(3), Duration::from_millis(800));
        assert_eq!(restart_delay(50), Duration::from_secs(30));
    }
}
