//! Deploys, rollbacks and the revision history of an app: `POST /v1/apps/{name}/deploy`,
//! `POST /v1/apps/{name}/rollback`, `GET /v1/apps/{name}/revisions`.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::{body, find, patched, view, ApiError, ConfigPatch};
use crate::apps::rollout::Rollout;
use crate::apps::store::{Deploy, DeployState};
use crate::apps::{AppSpec, Revision};
use crate::supervisor::{DeployError, Supervisor, SupervisorError};

/// Rollout settings in a create or config request; only the fields present change.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolloutPatch {
    pub surge: Option<u32>,
    pub max_unavailable: Option<u32>,
    pub deploy_timeout_ms: Option<u64>,
    pub unhealthy_timeout_ms: Option<u64>,
}

impl RolloutPatch {
    pub fn apply(&self, r: &mut Rollout) {
        for (given, field) in [(self.surge, &mut r.surge), (self.max_unavailable, &mut r.max_unavailable)] {
            if given.is_some() {
                *field = given;
            }
        }
        for (given, field) in [
            (self.deploy_timeout_ms, &mut r.deploy_timeout_ms),
            (self.unhealthy_timeout_ms, &mut r.unhealthy_timeout_ms),
        ] {
            if given.is_some() {
                *field = given;
            }
        }
    }
}

impl From<DeployError> for ApiError {
    fn from(e: DeployError) -> Self {
        match e {
            // The request was fine; the revision it asked for is not: 422 with the reason.
            failed @ DeployError::Failed { .. } => ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, failed.to_string()),
            DeployError::Supervisor(e) => e.into(),
        }
    }
}

/// A tag may have moved since it was last pulled: a deploy pulls it again (a reference by
/// digest is used as it is). An image that cannot be pulled but is here already (imported on
/// an air-gapped host) is used as it is.
async fn fresh_image(sup: &Supervisor, reference: &str) -> Result<deliverous_images::Image, ApiError> {
    let r = deliverous_images::Reference::parse(reference).map_err(SupervisorError::from)?;
    if reference.contains("@sha256:") {
        return Ok(sup.resolve_image(reference).await?);
    }
    match sup.images().pull(&r, &sup.pull_options()).await {
        Ok(image) => Ok(image),
        Err(e) => match sup.images().get(&r).map_err(SupervisorError::from)? {
            Some(local) => {
                tracing::warn!("cannot pull {reference} again ({e}); deploying the local copy");
                Ok(local)
            }
            None => Err(SupervisorError::from(e).into()),
        },
    }
}

/// `app deploy`: a change of configuration (possibly none) that always rolls out, and answers
/// once every instance runs the new revision, or with the reason it was rolled back.
pub async fn deploy_app(
    State(sup): State<Arc<Supervisor>>,
    Path(name): Path<String>,
    payload: Result<Json<ConfigPatch>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let patch = body(payload)?;
    let _guard = sup.lock_app(&name).await;
    let app = find(&sup, &name)?;
    let spec = patched(&sup, &name, &app.spec, patch)?;
    let image = fresh_image(&sup, &spec.image).await?;
    let rev = sup.store().revision_for(&name, &image.reference, &image.digest, &spec)?;
    let previous = app.revision;
    let on_it = app.running
        && app.revision == Some(rev.number)
        && sup.instances_of(&name).iter().filter(|i| i.revision == rev.number).count() == app.instances as usize;
    let (app, outcome) =
        if on_it { (app, "unchanged") } else { (sup.deploy_revision(app, &rev, "deploy").await?, "deployed") };
    Ok(Json(json!({
        "outcome": outcome,
        "revision": rev.number,
        "previous": previous,
        "app": view(&sup, &app)?,
    })))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RollbackRequest {
    /// The kept revision to go back to; the one deployed before the current one if absent.
    pub to: Option<u32>,
}

/// `app rollback`: a deploy of an earlier kept revision (the revision number is reused).
pub async fn rollback_app(
    State(sup): State<Arc<Supervisor>>,
    Path(name): Path<String>,
    payload: axum::body::Bytes,
) -> Result<Json<Value>, ApiError> {
    let req: RollbackRequest = if payload.iter().all(u8::is_ascii_whitespace) {
        RollbackRequest::default()
    } else {
        serde_json::from_slice(&payload).map_err(|e| ApiError::bad_request(format!("invalid request body: {e}")))?
    };
    let _guard = sup.lock_app(&name).await;
    let app = find(&sup, &name)?;
    let current = app.revision;
    let number = match req.to {
        Some(n) => n,
        None => previous_revision(&sup, &name, current)?.ok_or_else(|| {
            ApiError::new(StatusCode::CONFLICT, format!("app {name} has no earlier revision to roll back to"))
        })?,
    };
    let rev = sup.store().revision(&name, number)?.ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            format!("app {name} has no revision {number} (any more): see `deliverous app history {name}`"),
        )
    })?;
    if current == Some(number) && app.running {
        return Err(ApiError::new(StatusCode::CONFLICT, format!("app {name} already runs revision {number}")));
    }
    sup.settings().check_host_paths(&rev.spec).map_err(ApiError::bad_request)?;
    let app = sup.deploy_revision(app, &rev, "rollback").await?;
    Ok(Json(json!({
        "outcome": "deployed",
        "revision": number,
        "previous": current,
        "app": view(&sup, &app)?,
    })))
}

/// The revision the app ran before `current`: the target of the latest successful deploy that
/// is not `current` and is still kept; else the highest kept number below it.
fn previous_revision(sup: &Supervisor, name: &str, current: Option<u32>) -> Result<Option<u32>, ApiError> {
    let kept: Vec<u32> = sup.store().revisions(name)?.iter().map(|r| r.number).collect();
    let deploys = sup.store().deploys(name)?;
    let from_history = deploys
        .iter()
        .rev()
        .filter(|d| d.state == DeployState::Deployed)
        .flat_map(|d| [Some(d.to_revision), d.from_revision.filter(|_| d.from_running)])
        .flatten()
        .find(|n| Some(*n) != current && kept.contains(n));
    Ok(from_history.or_else(|| kept.iter().rev().copied().find(|n| current.is_none_or(|c| *n < c))))
}

#[derive(Debug, Serialize)]
pub struct RevisionEntry {
    pub number: u32,
    pub image: String,
    pub digest: String,
    pub created_at: String,
    pub current: bool,
    /// `deployed`, `failed` (never became ready; the app went back), `rolled back` (an
    /// operator's rollback moved away from it), `deploying`, or `null` (never rolled out).
    pub outcome: Option<&'static str>,
    /// Why it failed.
    pub reason: Option<String>,
    /// What differs from the revision before it.
    pub changes: Vec<String>,
}

/// `app history`: the kept revisions, newest first.
pub async fn revisions(State(sup): State<Arc<Supervisor>>, Path(name): Path<String>) -> Result<Json<Value>, ApiError> {
    let app = find(&sup, &name)?;
    let revisions = sup.store().revisions(&name)?;
    let deploys = sup.store().deploys(&name)?;
    let outcomes = outcomes(&deploys, app.revision.filter(|_| app.running));
    let mut entries = Vec::new();
    let mut before: Option<&Revision> = None;
    for r in &revisions {
        let (outcome, reason) = outcomes.get(&r.number).cloned().unwrap_or((None, None));
        entries.push(RevisionEntry {
            number: r.number,
            image: r.image.clone(),
            digest: r.digest.clone(),
            created_at: r.created_at.clone(),
            current: app.revision == Some(r.number),
            outcome,
            reason,
            changes: before.map_or_else(Vec::new, |b| changes(b, r)),
        });
        before = Some(r);
    }
    entries.reverse();
    Ok(Json(json!(entries)))
}

type Outcome = (Option<&'static str>, Option<String>);

/// Each revision's outcome from the deploy records (oldest first).
fn outcomes(deploys: &[Deploy], running: Option<u32>) -> BTreeMap<u32, Outcome> {
    let mut out: BTreeMap<u32, Outcome> = BTreeMap::new();
    for d in deploys {
        if let Some(from) = d.from_revision.filter(|_| d.from_running) {
            // It ran before this deploy: at least deployed.
            out.entry(from).or_insert((Some("deployed"), None));
        }
        let entry = match d.state {
            DeployState::InProgress => (Some("deploying"), None),
            DeployState::Deployed => (Some("deployed"), None),
            DeployState::Failed => (Some("failed"), d.reason.clone()),
        };
        out.insert(d.to_revision, entry);
        if d.kind == "rollback" && d.state == DeployState::Deployed {
            if let Some(from) = d.from_revision {
                out.insert(from, (Some("rolled back"), None));
            }
        }
    }
    if let Some(n) = running {
        out.entry(n).or_insert((Some("deployed"), None));
    }
    out
}

/// What changed from `a` to `b`, one short line per field (`env MODE: dev → prod`).
fn changes(a: &Revision, b: &Revision) -> Vec<String> {
    let mut out = Vec::new();
    if a.image != b.image {
        out.push(format!("image {} → {}", a.image, b.image));
    } else if a.digest != b.digest {
        out.push(format!("image {} rebuilt ({} → {})", b.image, short(&a.digest), short(&b.digest)));
    }
    for (k, v) in &b.spec.env {
        match a.spec.env.get(k) {
            None => out.push(format!("env +{k}={v}")),
            Some(old) if old != v => out.push(format!("env {k}: {old} → {v}")),
            _ => {}
        }
    }
    for k in a.spec.env.keys().filter(|k| !b.spec.env.contains_key(*k)) {
        out.push(format!("env -{k}"));
    }
    let (va, vb) = (fields(&a.spec), fields(&b.spec));
    for (k, v) in &vb {
        let old = va.get(k).cloned().unwrap_or(Value::Null);
        if &old != v {
            out.push(format!("{k}: {} → {}", text(&old), text(v)));
        }
    }
    for k in va.keys().filter(|k| !vb.contains_key(*k)) {
        out.push(format!("{k}: {} → -", text(&va[k])));
    }
    out
}

/// The spec's fields other than image and env, as JSON.
fn fields(spec: &AppSpec) -> serde_json::Map<String, Value> {
    let mut v = match serde_json::to_value(spec) {
        Ok(Value::Object(m)) => m,
        _ => serde_json::Map::new(),
    };
    v.remove("image");
    v.remove("env");
    v
}

fn text(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn short(digest: &str) -> &str {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    hex.get(..12).unwrap_or(hex)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rev(number: u32, digest: &str, env: &[(&str, &str)]) -> Revision {
        let mut spec = AppSpec::new("r/x:1", 80);
        spec.env = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Revision { number, image: "r/x:1".into(), digest: digest.into(), spec, created_at: String::new() }
    }

    #[test]
    fn changes_name_each_field() {
        let a = rev(1, "sha256:aaaaaaaaaaaaaaaa", &[("A", "1"), ("B", "x")]);
        let mut b = rev(2, "sha256:bbbbbbbbbbbbbbbb", &[("A", "2"), ("C", "y")]);
        b.spec.memory = Some(128 << 20);
        let c = changes(&a, &b);
        assert_eq!(
            c,
            [
                "image r/x:1 rebuilt (aaaaaaaaaaaa → bbbbbbbbbbbb)",
                "env A: 1 → 2",
                "env +C=y",
                "env -B",
                "memory: - → 134217728"
            ]
        );
    }

    fn deploy(kind: &str, from: Option<u32>, to: u32, state: DeployState) -> Deploy {
        Deploy {
            id: 0,
            app: "web".into(),
            kind: kind.into(),
            from_revision: from,
            from_spec: AppSpec::new("r/x:1", 80),
            from_running: true,
            to_revision: to,
            state,
            reason: (state == DeployState::Failed).then(|| "never ready".to_string()),
            started_at: String::new(),
            finished_at: None,
        }
    }

    #[test]
    fn outcomes_follow_the_deploys() {
        let d = [
            deploy("deploy", Some(1), 2, DeployState::Deployed),
            deploy("deploy", Some(2), 3, DeployState::Failed),
            deploy("rollback", Some(2), 1, DeployState::Deployed),
        ];
        let o = outcomes(&d, Some(1));
        assert_eq!(o[&1].0, Some("deployed"));
        assert_eq!(o[&2].0, Some("rolled back"));
        assert_eq!(o[&3], (Some("failed"), Some("never ready".to_string())));
    }
}
