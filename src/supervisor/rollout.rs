//! Deploys: moving a running app to another revision a batch of slots at a time (surge, max
//! unavailable), each new instance put in rotation only once it is ready (accepting on its
//! port and passing the app's health check `rise` times), an old one drained and stopped only
//! after that; and the automatic rollback of a revision that never becomes ready.
//!
//! Crash consistency: the deploy (with the revision and spec to return to) and the app's new
//! desired revision are recorded before the first instance starts. A daemon that dies during
//! the rollout finds the deploy `in_progress` at its next start and runs the rollout again
//! towards the recorded revision: slots already moved are kept, the others move, and if the
//! revision still does not become ready the app rolls back as it would have.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use deliverous_images::Image;

use super::health::{Check, Readiness, Tracker};
use super::{lock, State, Supervisor, SupervisorError};
use crate::apps::rollout::batches;
use crate::apps::store::{Deploy, DeployState};
use crate::apps::{App, Revision};
use crate::events::Kind;

/// Why a deploy did not complete.
#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    /// The new revision never became ready; the app is back on `back_to` (or stopped if it had
    /// never run), unless the rollback failed too.
    #[error("{}", failure_text(.revision, .reason, .back_to, .rollback_error))]
    Failed { revision: u32, reason: String, back_to: Option<u32>, rollback_error: Option<String> },
    #[error(transparent)]
    Supervisor(#[from] SupervisorError),
}

fn failure_text(revision: &u32, reason: &str, back_to: &Option<u32>, rollback_error: &Option<String>) -> String {
    let back = match back_to {
        Some(n) => format!("rolled back to revision {n}"),
        None => "its instances were stopped".to_string(),
    };
    match rollback_error {
        None => format!("deploy of revision {revision} failed: {reason}; {back}"),
        Some(e) => format!("deploy of revision {revision} failed: {reason}; the rollback failed too: {e}"),
    }
}

impl From<crate::apps::store::StoreError> for DeployError {
    fn from(e: crate::apps::store::StoreError) -> Self {
        DeployError::Supervisor(e.into())
    }
}

impl Supervisor {
    /// Moves `app` (as stored now) to revision `target` and waits for the outcome; on failure
    /// the app goes back to where it was. `kind` is `deploy` or `rollback`. The caller holds
    /// the app's lock.
    pub async fn deploy_revision(
        self: &Arc<Self>,
        app: App,
        target: &Revision,
        kind: &str,
    ) -> Result<App, DeployError> {
        let id = self.store.begin_deploy(&app.name, kind, (app.revision, &app.spec, app.running), target.number)?;
        let deploy = Deploy {
            id,
            app: app.name.clone(),
            kind: kind.to_string(),
            from_revision: app.revision,
            from_spec: app.spec.clone(),
            from_running: app.running,
            to_revision: target.number,
            state: DeployState::InProgress,
            reason: None,
            started_at: String::new(),
            finished_at: None,
        };
        let mut moved = app;
        moved.spec = target.spec.clone();
        moved.revision = Some(target.number);
        if moved.instances == 0 && !deploy.from_running {
            moved.instances = 1;
        }
        moved.running = true;
        self.store.update_app(&moved)?;
        self.run_deploy(moved, target, &deploy).await
    }

    async fn run_deploy(self: &Arc<Self>, app: App, target: &Revision, deploy: &Deploy) -> Result<App, DeployError> {
        let r = &target.spec.rollout;
        let from = deploy.from_revision.map_or("nothing".to_string(), |n| format!("revision {n}"));
        self.events.emit(
            Kind::DeployStarted,
            &app.name,
            None,
            format!(
                "{} of revision {} ({}) over {from}: {} instances, surge {}, max unavailable {}",
                deploy.kind,
                target.number,
                target.image,
                app.instances,
                r.surge(),
                r.max_unavailable()
            ),
        );
        match self.roll_out(&app, target).await {
            Ok(()) => {
                self.store.finish_deploy(deploy.id, DeployState::Deployed, None)?;
                self.events.emit(
                    Kind::DeployDone,
                    &app.name,
                    None,
                    format!("revision {} runs on {} instances", target.number, app.instances),
                );
                self.collect_garbage(&app.name, Vec::new());
                Ok(app)
            }
            Err(reason) => {
                tracing::warn!(app = %app.name, "deploy of revision {} failed: {reason}", target.number);
                self.events.emit(
                    Kind::DeployFailed,
                    &app.name,
                    None,
                    format!("revision {} failed: {reason}", target.number),
                );
                let rollback_error = self.roll_back(&app, deploy).await.err();
                self.store.finish_deploy(deploy.id, DeployState::Failed, Some(&reason))?;
                Err(DeployError::Failed {
                    revision: target.number,
                    reason,
                    back_to: deploy.from_revision.filter(|_| deploy.from_running),
                    rollback_error,
                })
            }
        }
    }

    /// Returns the app to where `deploy` found it. Whatever of the failed revision is running
    /// is replaced slot by slot by the previous revision (whose instances were never stopped
    /// beyond max unavailable), the same way a deploy goes.
    async fn roll_back(self: &Arc<Self>, app: &App, deploy: &Deploy) -> Result<(), String> {
        let mut back = app.clone();
        back.spec = deploy.from_spec.clone();
        back.revision = deploy.from_revision;
        back.running = deploy.from_running;
        self.store.update_app(&back).map_err(|e| e.to_string())?;
        let previous = match deploy.from_revision.filter(|_| deploy.from_running) {
            Some(n) => self.store.revision(&app.name, n).map_err(|e| e.to_string())?,
            None => None,
        };
        let result = match &previous {
            Some(rev) => self.roll_out(&back, rev).await,
            None => Ok(()),
        };
        // Leftovers (extra slots, a stopped app's instances) go the ordinary way.
        if let Err(e) = self.converge(&app.name).await {
            tracing::warn!(app = %app.name, "after the rollback: {e}");
        }
        match (&result, previous) {
            (Ok(()), Some(rev)) => self.events.emit(
                Kind::RolledBack,
                &app.name,
                None,
                format!("back to revision {} after revision {} failed", rev.number, deploy.to_revision),
            ),
            (Ok(()), None) => self.events.emit(
                Kind::RolledBack,
                &app.name,
                None,
                format!("revision {} failed; the app is stopped as before", deploy.to_revision),
            ),
            (Err(e), _) => {
                tracing::error!(app = %app.name, "rollback failed: {e}");
            }
        }
        result
    }

    /// At start-up: finishes a deploy a previous daemon left half done (see the module
    /// comment), else converges the app as usual.
    pub(super) async fn resume_or_converge(self: &Arc<Self>, name: &str) {
        let _guard = self.lock_app(name).await;
        let open = match self.store.deploy_in_progress(name) {
            Ok(open) => open,
            Err(e) => {
                tracing::warn!(app = name, "reading deploys: {e}");
                None
            }
        };
        let resumed = async {
            let Some(deploy) = open else { return Ok(false) };
            let Some(app) = self.store.app(name)? else { return Ok(false) };
            let Some(target) = self.store.revision(name, deploy.to_revision)? else { return Ok(false) };
            tracing::info!(app = name, "resuming the interrupted deploy of revision {}", target.number);
            self.events.emit(
                Kind::DeployProgress,
                name,
                None,
                format!("resuming the deploy of revision {} interrupted by a daemon restart", target.number),
            );
            match self.run_deploy(app, &target, &deploy).await {
                Ok(_) => Ok(true),
                Err(DeployError::Failed { .. }) => Ok(true),
                Err(DeployError::Supervisor(e)) => Err(e),
            }
        };
        match resumed.await {
            Ok(true) => {}
            Ok(false) => {
                if let Err(e) = self.converge(name).await {
                    tracing::warn!(app = name, "converge: {e}");
                }
            }
            Err(e) => tracing::warn!(app = name, "resuming a deploy: {e}"),
        }
    }

    /// Replaces every instance of `app` that does not run `target` (and fills empty slots),
    /// batch by batch; `Err` with the reason at the first new instance that is not ready.
    /// Instances of `target` that already run are kept (checked ready first).
    pub(super) async fn roll_out(self: &Arc<Self>, app: &App, target: &Revision) -> Result<(), String> {
        let desired = if app.running { app.instances } else { 0 };
        let current: Vec<(String, u32, u32)> = lock(&self.live)
            .values()
            .filter(|l| l.row.app == app.name && !l.stop_requested)
            .map(|l| (l.row.uid.clone(), l.row.slot, l.row.revision))
            .collect();
        // Extra slots first: scaling down during a deploy frees their resources.
        let extra: Vec<&String> = current.iter().filter(|c| c.1 > desired).map(|c| &c.0).collect();
        futures_util::future::join_all(extra.into_iter().map(|uid| self.stop_instance(uid))).await;

        let r = &target.spec.rollout;
        let mut work = Vec::new();
        for slot in 1..=desired {
            let in_slot: Vec<&(String, u32, u32)> = current.iter().filter(|c| c.1 == slot).collect();
            let has_new = in_slot.iter().any(|c| c.2 == target.number);
            let olds = in_slot.iter().any(|c| c.2 != target.number);
            if !has_new || olds {
                work.push(slot);
            } else if let Some(c) = in_slot.first() {
                // Already on the target (a resumed deploy): it still has to prove ready.
                let ready = lock(&self.live).get(&c.0).is_some_and(|l| l.state == State::Ready);
                if !ready {
                    work.push(slot);
                }
            }
        }
        if work.is_empty() {
            self.publish_routes();
            return Ok(());
        }
        let image = self.image_for(target).map_err(|e| e.to_string())?;
        let plan = batches(&work, r.surge(), r.max_unavailable());
        let total = plan.len();
        let mut moved = 0usize;
        for (i, batch) in plan.into_iter().enumerate() {
            let names: Vec<String> = batch.iter().map(|s| format!("{}.{s}", app.name)).collect();
            self.events.emit(
                Kind::DeployProgress,
                &app.name,
                None,
                format!("batch {}/{total}: starting {} on revision {}", i + 1, names.join(", "), target.number),
            );
            // Up to max unavailable old instances of the batch may go before their replacements
            // are ready (a full host, or an app that cannot run twice).
            let early: Vec<String> = batch
                .iter()
                .take(r.max_unavailable() as usize)
                .flat_map(|slot| self.old_instances(app, *slot, target.number))
                .collect();
            futures_util::future::join_all(early.iter().map(|uid| self.stop_instance(uid))).await;

            let starts = batch.iter().map(|slot| self.new_in_slot(app, target, &image, *slot));
            let results = futures_util::future::join_all(starts).await;
            let mut failure = None;
            for (slot, result) in batch.iter().zip(results) {
                match result {
                    Ok(uid) => {
                        moved += 1;
                        self.events.emit(
                            Kind::DeployProgress,
                            &app.name,
                            Some(&format!("{}.{slot}", app.name)),
                            format!("{uid} ready on revision {} ({moved}/{})", target.number, work.len()),
                        );
                    }
                    Err(e) if failure.is_none() => failure = Some(format!("instance {}.{slot}: {e}", app.name)),
                    Err(_) => {}
                }
            }
            if let Some(reason) = failure {
                return Err(reason);
            }
            let old: Vec<String> =
                batch.iter().flat_map(|slot| self.old_instances(app, *slot, target.number)).collect();
            futures_util::future::join_all(old.iter().map(|uid| self.stop_instance(uid))).await;
        }
        self.publish_routes();
        Ok(())
    }

    /// Instances in `slot` of `app` not on `revision` that nobody is stopping yet.
    fn old_instances(&self, app: &App, slot: u32, revision: u32) -> Vec<String> {
        lock(&self.live)
            .values()
            .filter(|l| l.row.app == app.name && l.row.slot == slot && l.row.revision != revision && !l.stop_requested)
            .map(|l| l.row.uid.clone())
            .collect()
    }

    /// The slot's instance of `target`, ready: the one already there, or a new one.
    async fn new_in_slot(
        self: &Arc<Self>,
        app: &App,
        target: &Revision,
        image: &Image,
        slot: u32,
    ) -> Result<String, String> {
        let existing = lock(&self.live)
            .values()
            .find(|l| {
                l.row.app == app.name && l.row.slot == slot && l.row.revision == target.number && !l.stop_requested
            })
            .map(|l| l.row.uid.clone());
        match existing {
            Some(uid) => {
                self.until_ready(&uid, target).await?;
                Ok(uid)
            }
            None => self.start_ready(app, target, image, slot).await,
        }
    }

    /// Starts an instance of `rev` in `slot` and puts it in rotation once ready; if it is not
    /// ready within the deploy timeout (or exits first) it is stopped and the reason returned.
    pub(super) async fn start_ready(
        self: &Arc<Self>,
        app: &App,
        rev: &Revision,
        image: &Image,
        slot: u32,
    ) -> Result<String, String> {
        let uid = self.launch_instance(app, rev, image, slot).await.map_err(|e| e.to_string())?;
        match self.until_ready(&uid, rev).await {
            Ok(()) => Ok(uid),
            Err(reason) => {
                self.stop_instance(&uid).await;
                Err(reason)
            }
        }
    }

    /// Waits until instance `uid` accepts on its port and passes `rev`'s health check `rise`
    /// times in a row, then puts it in rotation. Fails when it exits, or at the deploy timeout.
    async fn until_ready(self: &Arc<Self>, uid: &str, rev: &Revision) -> Result<(), String> {
        let timeout = rev.spec.rollout.deploy_timeout();
        let deadline = tokio::time::Instant::now() + timeout;
        let Some((app, ip, mut done)) =
            lock(&self.live).get(uid).map(|l| (l.row.app.clone(), l.row.ip, l.done.clone()))
        else {
            return Err("it is gone".into());
        };
        let addr = SocketAddr::from((ip, rev.spec.port));
        let image_check = match (&rev.spec.routing.health, rev.spec.routing.health_none) {
            (None, false) => self.image_for(rev).map_err(|e| e.to_string())?.config.healthcheck,
            _ => None,
        };
        let check = Check::in_force(&rev.spec.routing, image_check.as_ref());
        let mut readiness = Readiness::new(check.as_ref());
        // Until it is first ready: the check's start interval (its interval for an app check).
        let interval = check.as_ref().map_or(Duration::from_millis(200), |c| c.start_interval);
        let mut last_error = String::from("never probed");
        let mut delay = Duration::from_millis(5);
        loop {
            if *done.borrow() || self.live_instance(uid).is_none() {
                let last = self.restarts_of(&app).last_exit;
                return Err(match last {
                    Some(exit) => format!("exited before it became ready ({exit})"),
                    None => "exited before it became ready".to_string(),
                });
            }
            let mut wait = delay;
            if !readiness.accepting() {
                let attempt = tokio::time::timeout(Duration::from_millis(500), tokio::net::TcpStream::connect(addr));
                let ok = match attempt.await {
                    Ok(Ok(_)) => true,
                    Ok(Err(e)) => {
                        last_error = format!("port {}: {e}", rev.spec.port);
                        false
                    }
                    Err(_) => {
                        last_error = format!("port {}: no answer to connect", rev.spec.port);
                        false
                    }
                };
                if readiness.port(ok) {
                    break;
                }
            }
            if let Some(c) = check.as_ref().filter(|_| readiness.accepting()) {
                // Checked as soon as the port opens, then every interval.
                let result = self.run_check(uid, c, addr).await;
                let passed = result.ok;
                if !passed {
                    last_error = format!("health check {} failed: {}", c.probe.describe(), result.output.trim());
                }
                if readiness.check(passed) {
                    break;
                }
            }
            if readiness.accepting() {
                wait = interval;
            } else {
                delay = (delay * 2).min(Duration::from_millis(200));
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Err(format!("not ready within {} s: {last_error}", timeout.as_secs()));
            }
            // The last probe comes at the deadline, not one interval before it.
            tokio::select! {
                _ = tokio::time::sleep(wait.min(deadline - now)) => {}
                _ = done.wait_for(|d| *d) => {}
            }
        }
        let in_rotation = {
            let mut live = lock(&self.live);
            match live.get_mut(uid).filter(|l| !l.stop_requested) {
                Some(l) => {
                    l.state = State::Ready;
                    true
                }
                None => false,
            }
        };
        if !in_rotation {
            return Err("exited before it became ready".into());
        }
        self.publish_routes();
        if check.is_some() {
            self.watch_health_from(uid, Tracker::healthy());
        } else {
            self.watch_health(uid);
        }
        Ok(())
    }
}
