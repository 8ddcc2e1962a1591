//! The HTTP API under `/v1`: validates requests, turns them into changes of desired state,
//! asks the supervisor to converge, and maps every failure to a status and a message.

mod deploys;

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

pub mod openapi;
pub mod remote;
pub mod stats;
mod stop_timeout;
mod tokens;

use crate::apps::{self, format_bytes, parse_bytes, App, AppSpec, MAX_INSTANCES};
use crate::events::Kind;
use crate::supervisor::{CheckView, InstanceView, Restarts, Supervisor, SupervisorError};

mod exec;

pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError { status, message: message.into() }
    }
    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(json!({"error": self.message}))).into_response()
    }
}

impl From<SupervisorError> for ApiError {
    fn from(e: SupervisorError) -> Self {
        use deliverous_images::Error as I;
        let status = match &e {
            SupervisorError::NotFound(_) => StatusCode::NOT_FOUND,
            SupervisorError::Image(I::NotFound { .. }) => StatusCode::NOT_FOUND,
            SupervisorError::Image(I::Unreachable { .. }) => StatusCode::BAD_GATEWAY,
            SupervisorError::Image(i) if i.is_user_error() => StatusCode::BAD_REQUEST,
            SupervisorError::Image(I::Registry { .. }) | SupervisorError::Image(I::DigestMismatch { .. }) => {
                StatusCode::BAD_GATEWAY
            }
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError::new(status, e.to_string())
    }
}

impl From<apps::store::StoreError> for ApiError {
    fn from(e: apps::store::StoreError) -> Self {
        SupervisorError::from(e).into()
    }
}

type ApiResult<T> = Result<Json<T>, ApiError>;

/// A JSON body whose syntax or shape errors become a 400 with serde's explanation.
fn body<T>(payload: Result<Json<T>, JsonRejection>) -> Result<T, ApiError> {
    payload.map(|Json(v)| v).map_err(|e| ApiError::bad_request(format!("invalid request body: {}", e.body_text())))
}

/// A size given as bytes (`134217728`) or text (`"128M"`).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Size {
    Bytes(u64),
    Text(String),
}

impl Size {
    /// `None` for `0` / `"none"`: no limit.
    fn bytes(&self) -> Result<Option<u64>, ApiError> {
        let n = match self {
            Size::Bytes(n) => *n,
            Size::Text(t) if t.eq_ignore_ascii_case("none") => 0,
            Size::Text(t) => parse_bytes(t).map_err(ApiError::bad_request)?,
        };
        Ok((n > 0).then_some(n))
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateApp {
    pub name: String,
    pub image: String,
    pub port: u16,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub memory: Option<Size>,
    #[serde(default)]
    pub cpus: Option<f64>,
    #[serde(default)]
    pub cpu_weight: Option<u32>,
    #[serde(default)]
    pub pids: Option<u32>,
    /// `0`, `"default"` or `null`: the daemon's default.
    #[serde(default, deserialize_with = "stop_timeout::field")]
    pub stop_timeout: Option<Option<u32>>,
    #[serde(default)]
    pub volumes: Vec<String>,
    #[serde(default)]
    pub cap_add: Vec<String>,
    #[serde(default)]
    pub cap_drop: Vec<String>,
    #[serde(default)]
    pub domains: Vec<String>,
    #[serde(default)]
    pub instances: Option<i64>,
    #[serde(default)]
    pub routing: RoutingPatch,
    /// `always` (the default), `on-failure` or `never`.
    #[serde(default)]
    pub restart: Option<String>,
    #[serde(default)]
    pub rollout: deploys::RolloutPatch,
    /// Run instances in a user namespace of their own.
    #[serde(default)]
    pub userns: bool,
}

/// Proxy settings in a create or config request; only the fields present change.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoutingPatch {
    /// `/path` (HTTP check), `tcp` (connect check), `image` (the image's `HEALTHCHECK`, the
    /// default) or `none` (no check, not even the image's).
    pub health: Option<String>,
    pub health_interval_ms: Option<u64>,
    pub health_timeout_ms: Option<u64>,
    pub health_rise: Option<u32>,
    pub health_fall: Option<u32>,
    pub balance: Option<crate::proxy::Balance>,
    pub connect_timeout_ms: Option<u64>,
    pub read_timeout_ms: Option<u64>,
    pub total_timeout_ms: Option<u64>,
    /// `0` / `"none"` removes the limit.
    pub max_body: Option<Size>,
    pub strip_prefix: Option<bool>,
    /// Replay a non-idempotent request whose instance died before answering (it may run twice).
    pub retry_non_idempotent: Option<bool>,
    pub drain_timeout_ms: Option<u64>,
    /// Replaces the published TCP ports (`["6379", "16379:6379"]`; `[]` clears them).
    pub tcp: Option<Vec<String>>,
}

impl RoutingPatch {
    fn apply(self, r: &mut apps::Routing) -> Result<(), ApiError> {
        match self.health.as_deref() {
            Some("none" | "") => {
                r.health = None;
                r.health_none = true;
            }
            Some("image") => {
                r.health = None;
                r.health_none = false;
            }
            Some(kind) => {
                r.health_none = false;
                let mut check = r.health.clone().unwrap_or_else(|| crate::proxy::HealthCheck::http("/"));
                check.path = match kind {
                    "tcp" => None,
                    path if path.starts_with('/') => Some(path.to_string()),
                    other => {
                        return Err(ApiError::bad_request(format!(
                            "invalid health check {other:?}: expected a path such as /healthz, \"tcp\", \"image\" or \"none\""
                        )))
                    }
                };
                r.health = Some(check);
            }
            None => {}
        }
        let timing_given = self.health_interval_ms.is_some() || self.health_timeout_ms.is_some();
        if timing_given || self.health_rise.is_some() || self.health_fall.is_some() {
            let Some(check) = r.health.as_mut() else {
                return Err(ApiError::bad_request("health check timing given without a health check (set health)"));
            };
            check.interval_ms = self.health_interval_ms.unwrap_or(check.interval_ms);
            check.timeout_ms = self.health_timeout_ms.unwrap_or(check.timeout_ms);
            check.rise = self.health_rise.unwrap_or(check.rise);
            check.fall = self.health_fall.unwrap_or(check.fall);
        }
        if let Some(b) = self.balance {
            r.balance = b;
        }
        for (given, field) in [
            (self.connect_timeout_ms, &mut r.connect_timeout_ms),
            (self.read_timeout_ms, &mut r.read_timeout_ms),
            (self.total_timeout_ms, &mut r.total_timeout_ms),
            (self.drain_timeout_ms, &mut r.drain_timeout_ms),
        ] {
            if given.is_some() {
                *field = given;
            }
        }
        if let Some(m) = &self.max_body {
            r.max_body = m.bytes()?;
        }
        if let Some(s) = self.strip_prefix {
            r.strip_prefix = s;
        }
        if let Some(r2) = self.retry_non_idempotent {
            r.retry_non_idempotent = r2;
        }
        if let Some(ports) = self.tcp {
            r.tcp = ports
                .iter()
                .map(|p| apps::parse_tcp_port(p))
                .collect::<Result<_, _>>()
                .map_err(ApiError::bad_request)?;
        }
        Ok(())
    }
}

/// A change of configuration: only the fields present change. `env` values of `null` unset the
/// variable; `memory` `0`/`"none"` and `cpus` `0` remove the limit, `pids` `0` restores the default,
/// `stop_timeout` `0`/`"default"`/`null` too.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigPatch {
    pub image: Option<String>,
    pub port: Option<u16>,
    #[serde(default)]
    pub env: BTreeMap<String, Option<String>>,
    pub memory: Option<Size>,
    pub cpus: Option<f64>,
    pub pids: Option<u32>,
    pub cpu_weight: Option<u32>,
    /// `0`, `"default"` or `null` go back to the daemon's default; absent leaves it.
    #[serde(default, deserialize_with = "stop_timeout::field")]
    pub stop_timeout: Option<Option<u32>>,
    /// Replaces the list of volumes (`[]` clears it).
    pub volumes: Option<Vec<String>>,
    /// Replaces the list of added capabilities (`[]` clears it).
    pub cap_add: Option<Vec<String>>,
    /// Replaces the list of dropped capabilities (`[]` clears it).
    pub cap_drop: Option<Vec<String>>,
    #[serde(default)]
    pub add_domains: Vec<String>,
    #[serde(default)]
    pub remove_domains: Vec<String>,
    #[serde(default)]
    pub routing: RoutingPatch,
    /// `always`, `on-failure` or `never`; changing it alone starts no new revision.
    pub restart: Option<String>,
    #[serde(default)]
    pub rollout: deploys::RolloutPatch,
    /// Run instances in a user namespace of their own (or not): a new revision.
    pub userns: Option<bool>,
}

/// `always`, `on-failure`, `never`, or a 400 that says so.
fn restart_policy(text: &str) -> Result<apps::RestartPolicy, ApiError> {
    text.parse().map_err(ApiError::bad_request)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scale {
    pub instances: i64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pull {
    pub reference: String,
}

#[derive(Debug, Serialize)]
pub struct RevisionView {
    pub number: u32,
    pub image: String,
    pub digest: String,
    pub created_at: String,
}

#[derive(Debug, Serialize)]
pub struct AppView {
    pub name: String,
    pub state: &'static str,
    pub image: String,
    pub port: u16,
    pub env: BTreeMap<String, String>,
    pub memory: Option<String>,
    pub cpus: Option<f64>,
    pub pids: u32,
    pub cpu_weight: u32,
    pub stop_timeout: Option<u32>,
    pub volumes: Vec<String>,
    pub cap_add: Vec<String>,
    pub cap_drop: Vec<String>,
    pub domains: Vec<String>,
    pub hosts: Vec<String>,
    pub routing: apps::Routing,
    pub restart: apps::RestartPolicy,
    pub rollout: apps::rollout::Rollout,
    pub userns: bool,
    /// The latest deploy or rollback and how it ended.
    pub last_deploy: Option<apps::store::Deploy>,
    pub instances_desired: u32,
    pub revision: Option<RevisionView>,
    pub instances: Vec<InstanceView>,
    /// The health check in force: the app's own, the image's HEALTHCHECK, or none.
    pub health_check: CheckView,
    pub restarts: Restarts,
    pub created_at: String,
    pub updated_at: String,
}

fn view(sup: &Supervisor, app: &App) -> Result<AppView, ApiError> {
    let revision = match app.revision {
        Some(n) => sup.store().revision(&app.name, n)?.map(|r| RevisionView {
            number: r.number,
            image: r.image,
            digest: r.digest,
            created_at: r.created_at,
        }),
        None => None,
    };
    Ok(AppView {
        name: app.name.clone(),
        state: if app.running { "running" } else { "stopped" },
        image: app.spec.image.clone(),
        port: app.spec.port,
        env: app.spec.env.clone(),
        memory: app.spec.memory.map(format_bytes),
        cpus: app.spec.cpus,
        pids: app.spec.pids.unwrap_or(apps::DEFAULT_PIDS),
        cpu_weight: app.spec.cpu_weight.unwrap_or(100),
        stop_timeout: app.spec.stop_timeout,
        volumes: app.spec.volumes.clone(),
        cap_add: app.spec.cap_add.clone(),
        cap_drop: app.spec.cap_drop.clone(),
        domains: app.spec.domains.clone(),
        hosts: sup.hosts_of(app),
        routing: app.spec.routing.clone(),
        restart: app.spec.restart,
        rollout: app.spec.rollout.clone(),
        userns: app.spec.userns,
        last_deploy: sup.store().deploys(&app.name)?.pop(),
        instances_desired: app.instances,
        revision,
        instances: sup.instances_of(&app.name),
        health_check: sup.check_view(app),
        restarts: sup.restarts_of(&app.name),
        created_at: app.created_at.clone(),
        updated_at: app.updated_at.clone(),
    })
}

/// `env, memory` — the top-level settings that differ, for the `app_changed` event.
fn changed_fields(a: &AppSpec, b: &AppSpec) -> String {
    let (Ok(serde_json::Value::Object(a)), Ok(serde_json::Value::Object(b))) =
        (serde_json::to_value(a), serde_json::to_value(b))
    else {
        return "configuration".into();
    };
    let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.dedup();
    let changed: Vec<&str> = keys.into_iter().filter(|k| a.get(*k) != b.get(*k)).map(String::as_str).collect();
    if changed.is_empty() {
        "configuration".into()
    } else {
        changed.join(", ")
    }
}

/// A raw TCP port belongs to one app, and is not the proxy's own.
fn check_tcp_ports(sup: &Supervisor, name: &str, spec: &AppSpec) -> Result<(), ApiError> {
    for port in &spec.routing.tcp {
        if sup.settings().proxy_ports.contains(&port.listen) {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                format!("TCP port {} is the proxy's own HTTP(S) port", port.listen),
            ));
        }
        for other in sup.store().apps()? {
            if other.name != name && other.spec.routing.tcp.iter().any(|p| p.listen == port.listen) {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    format!("TCP port {} is already published by app {}", port.listen, other.name),
                ));
            }
        }
    }
    Ok(())
}

/// `net_admin` → `CAP_NET_ADMIN`, without duplicates; unknown names are a 400.
fn normalize_caps(caps: Vec<String>) -> Result<Vec<String>, ApiError> {
    let mut out: Vec<String> = Vec::new();
    for c in caps {
        let c = deliverous_runtime::spec::normalize_capability(&c).map_err(ApiError::bad_request)?;
        if !out.contains(&c) {
            out.push(c);
        }
    }
    Ok(out)
}

fn find(sup: &Supervisor, name: &str) -> Result<App, ApiError> {
    sup.store()
        .app(name)?
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("no app named {name:?}: see `deliverous app ls`")))
}

fn check_count(n: i64) -> Result<u32, ApiError> {
    if (0..=MAX_INSTANCES).contains(&n) {
        Ok(n as u32)
    } else {
        Err(ApiError::bad_request(format!(
            "invalid instance count {n}: expected a whole number from 0 to {MAX_INSTANCES}"
        )))
    }
}

pub fn router(sup: Arc<Supervisor>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/v1/apps", post(create_app).get(list_apps))
        .route("/v1/apps/{name}", get(show_app).patch(config_app).delete(remove_app))
        .route("/v1/apps/{name}/start", post(start_app))
        .route("/v1/apps/{name}/stop", post(stop_app))
        .route("/v1/apps/{name}/scale", put(scale_app))
        .route("/v1/apps/{name}/logs", get(app_logs))
        .route("/v1/apps/{name}/deploy", post(deploys::deploy_app))
        .route("/v1/apps/{name}/rollback", post(deploys::rollback_app))
        .route("/v1/apps/{name}/revisions", get(deploys::revisions))
        .route("/v1/apps/{name}/run", post(exec::run))
        .route("/v1/exec", post(exec::exec))
        .route("/v1/events", get(events))
        .route("/v1/images", get(list_images))
        .route("/v1/images/pull", post(pull_image))
        .route("/v1/images/rm", post(remove_image))
        .route("/v1/images/import", post(import_image))
        .route("/v1/images/prune", post(prune_images))
        .route("/v1/volumes", get(list_volumes))
        .route("/v1/volumes/{name}", delete(remove_volume))
        .route("/v1/stats", get(stats::stats))
        .route("/v1/tokens", post(tokens::create).get(tokens::list))
        .route("/v1/tokens/{name}", delete(tokens::remove))
        .route("/v1/openapi.json", get(openapi::document))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such endpoint: see /v1/apps and /v1/images") })
        .layer(axum::middleware::from_fn_with_state(sup.clone(), routes_in_effect))
        .with_state(sup)
}

/// A change answered is a change in effect: requests that change something are answered once
/// the proxy process has the route table they led to (at most 5 s later; it is pushed in the
/// background).
async fn routes_in_effect(
    State(sup): State<Arc<Supervisor>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let changes = request.method() != axum::http::Method::GET && request.method() != axum::http::Method::HEAD;
    let response = next.run(request).await;
    if changes && !sup.routes().synced(std::time::Duration::from_secs(5)).await {
        tracing::warn!("the proxy has not taken the new route table yet");
    }
    response
}

/// The proxy's counters and histograms (asked of the proxy process), then every instance's
/// resource usage, in the Prometheus text format.
async fn metrics(State(sup): State<Arc<Supervisor>>) -> impl axum::response::IntoResponse {
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], metrics_text(&sup).await)
}

/// What `/metrics` serves, on the API socket and on `--metrics-listen`.
pub async fn metrics_text(sup: &Arc<Supervisor>) -> String {
    let mut text = sup.routes().metrics().await;
    text.push_str(&crate::stats::render(&crate::stats::collect(sup, None, crate::stats::Rates::Skip).await));
    text
}

async fn create_app(
    State(sup): State<Arc<Supervisor>>,
    payload: Result<Json<CreateApp>, JsonRejection>,
) -> Result<(StatusCode, Json<AppView>), ApiError> {
    let req = body(payload)?;
    apps::validate_name(&req.name).map_err(ApiError::bad_request)?;
    let spec = AppSpec {
        env: req.env,
        memory: match &req.memory {
            Some(m) => m.bytes()?,
            None => None,
        },
        cpus: req.cpus.filter(|c| *c != 0.0),
        pids: req.pids.filter(|p| *p != 0),
        cpu_weight: req.cpu_weight.filter(|w| *w != 0),
        stop_timeout: req.stop_timeout.flatten(),
        volumes: req.volumes,
        cap_add: normalize_caps(req.cap_add)?,
        cap_drop: normalize_caps(req.cap_drop)?,
        domains: req.domains.iter().map(|d| d.to_ascii_lowercase()).collect(),
        restart: req.restart.as_deref().map(restart_policy).transpose()?.unwrap_or_default(),
        userns: req.userns,
        ..AppSpec::new(req.image, req.port)
    };
    let mut spec = spec;
    req.routing.apply(&mut spec.routing)?;
    req.rollout.apply(&mut spec.rollout);
    spec.validate().map_err(ApiError::bad_request)?;
    sup.settings().check_host_paths(&spec).map_err(ApiError::bad_request)?;
    check_tcp_ports(&sup, &req.name, &spec)?;
    let instances = check_count(req.instances.unwrap_or(1))?;
    if !sup.store().create_app(&req.name, &spec, instances)? {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!(
                "an app named {:?} already exists: pick another name, or change it with `deliverous app config`",
                req.name
            ),
        ));
    }
    let app = find(&sup, &req.name)?;
    sup.forget_app(&app.name);
    sup.events().emit(
        Kind::AppCreated,
        &app.name,
        None,
        format!("created from {} (port {}, {} instances, restart {})", spec.image, spec.port, instances, spec.restart),
    );
    sup.publish_routes();
    Ok((StatusCode::CREATED, Json(view(&sup, &app)?)))
}

async fn list_apps(State(sup): State<Arc<Supervisor>>) -> ApiResult<Vec<AppView>> {
    let apps = sup.store().apps()?;
    Ok(Json(apps.iter().map(|a| view(&sup, a)).collect::<Result<_, _>>()?))
}

async fn show_app(State(sup): State<Arc<Supervisor>>, Path(name): Path<String>) -> ApiResult<AppView> {
    Ok(Json(view(&sup, &find(&sup, &name)?)?))
}

/// Moves a running app to a new revision of `spec`; on failure, back to the old one.
async fn deploy(sup: &Arc<Supervisor>, mut app: App, spec: AppSpec) -> Result<App, ApiError> {
    let image = sup.resolve_image(&spec.image).await?;
    let rev = sup.store().revision_for(&app.name, &image.reference, &image.digest, &spec)?;
    if app.running && app.revision != Some(rev.number) {
        // A running app moves instance by instance, each ready before an old one goes.
        return sup.deploy_revision(app, &rev, "deploy").await.map_err(ApiError::from);
    }
    let previous = (app.spec.clone(), app.revision, app.running);
    app.spec = spec;
    app.revision = Some(rev.number);
    app.running = true;
    if app.instances == 0 && !previous.2 {
        app.instances = 1;
    }
    sup.store().update_app(&app)?;
    if let Err(e) = sup.converge(&app.name).await {
        (app.spec, app.revision, app.running) = previous;
        sup.store().update_app(&app)?;
        if let Err(again) = sup.converge(&app.name).await {
            tracing::error!(app = %app.name, "rolling back after a failed deploy: {again}");
        }
        return Err(e.into());
    }
    sup.collect_garbage(&app.name, Vec::new());
    Ok(app)
}

async fn start_app(State(sup): State<Arc<Supervisor>>, Path(name): Path<String>) -> ApiResult<AppView> {
    let _guard = sup.lock_app(&name).await;
    let app = find(&sup, &name)?;
    let was_running = app.running;
    let spec = app.spec.clone();
    // Starting is the operator's "now": slots left empty or backing off are filled at once.
    sup.release_slots(&name, true);
    let app = deploy(&sup, app, spec).await?;
    let how = if was_running { "already running; empty slots filled" } else { "started" };
    sup.events().emit(
        Kind::AppStarted,
        &name,
        None,
        format!("{how}: {} instances, revision {}", app.instances, app.revision.unwrap_or(0)),
    );
    Ok(Json(view(&sup, &app)?))
}

async fn stop_app(State(sup): State<Arc<Supervisor>>, Path(name): Path<String>) -> ApiResult<AppView> {
    let _guard = sup.lock_app(&name).await;
    let mut app = find(&sup, &name)?;
    app.running = false;
    sup.store().update_app(&app)?;
    sup.converge(&name).await?;
    sup.events().emit(Kind::AppStopped, &name, None, "stopped: every instance stopped");
    Ok(Json(view(&sup, &app)?))
}

async fn config_app(
    State(sup): State<Arc<Supervisor>>,
    Path(name): Path<String>,
    payload: Result<Json<ConfigPatch>, JsonRejection>,
) -> ApiResult<AppView> {
    let patch = body(payload)?;
    let _guard = sup.lock_app(&name).await;
    let mut app = find(&sup, &name)?;
    let spec = patched(&sup, &name, &app.spec, patch)?;
    if spec == app.spec {
        return Ok(Json(view(&sup, &app)?));
    }
    let what = changed_fields(&app.spec, &spec);
    // A config change brings back slots the restart policy kept empty.
    sup.release_slots(&name, false);
    // Routing, the restart policy or the rollout settings alone change nothing inside the
    // instances: no new revision, no restart.
    let app = if app.running && !spec.same_but_routing(&app.spec) {
        deploy(&sup, app, spec).await?
    } else {
        app.spec = spec;
        sup.store().update_app(&app)?;
        if app.running {
            sup.converge(&name).await?;
        } else {
            sup.publish_routes();
        }
        app
    };
    let revision = app.revision.map(|r| format!(", revision {r}")).unwrap_or_default();
    sup.events().emit(Kind::AppChanged, &name, None, format!("changed {what}{revision}"));
    Ok(Json(view(&sup, &app)?))
}

/// `base` with `patch` applied, validated.
fn patched(sup: &Supervisor, name: &str, base: &AppSpec, patch: ConfigPatch) -> Result<AppSpec, ApiError> {
    let mut spec = base.clone();
    if let Some(image) = patch.image {
        spec.image = image;
    }
    if let Some(port) = patch.port {
        spec.port = port;
    }
    for (k, v) in patch.env {
        match v {
            Some(v) => spec.env.insert(k, v),
            None => spec.env.remove(&k),
        };
    }
    if let Some(m) = &patch.memory {
        spec.memory = m.bytes()?;
    }
    if let Some(c) = patch.cpus {
        spec.cpus = (c != 0.0).then_some(c);
    }
    if let Some(p) = patch.pids {
        spec.pids = (p != 0).then_some(p);
    }
    if let Some(w) = patch.cpu_weight {
        spec.cpu_weight = (w != 0).then_some(w);
    }
    if let Some(t) = patch.stop_timeout {
        spec.stop_timeout = t;
    }
    if let Some(volumes) = patch.volumes {
        spec.volumes = volumes;
    }
    if let Some(caps) = patch.cap_add {
        spec.cap_add = normalize_caps(caps)?;
    }
    if let Some(caps) = patch.cap_drop {
        spec.cap_drop = normalize_caps(caps)?;
    }
    for d in patch.add_domains {
        let d = d.to_ascii_lowercase();
        if !spec.domains.contains(&d) {
            spec.domains.push(d);
        }
    }
    spec.domains.retain(|d| !patch.remove_domains.iter().any(|r| r.eq_ignore_ascii_case(d)));
    patch.routing.apply(&mut spec.routing)?;
    if let Some(r) = &patch.restart {
        spec.restart = restart_policy(r)?;
    }
    if let Some(u) = patch.userns {
        spec.userns = u;
    }
    patch.rollout.apply(&mut spec.rollout);
    spec.validate().map_err(ApiError::bad_request)?;
    sup.settings().check_host_paths(&spec).map_err(ApiError::bad_request)?;
    check_tcp_ports(sup, name, &spec)?;
    Ok(spec)
}

async fn scale_app(
    State(sup): State<Arc<Supervisor>>,
    Path(name): Path<String>,
    payload: Result<Json<Scale>, JsonRejection>,
) -> ApiResult<AppView> {
    let n = check_count(body(payload)?.instances)?;
    let _guard = sup.lock_app(&name).await;
    let mut app = find(&sup, &name)?;
    let before = app.instances;
    app.instances = n;
    sup.store().update_app(&app)?;
    sup.release_slots(&name, false);
    if app.running {
        sup.converge(&name).await?;
    }
    sup.events().emit(Kind::Scaled, &name, None, format!("scaled from {before} to {n} instances"));
    Ok(Json(view(&sup, &app)?))
}

async fn remove_app(State(sup): State<Arc<Supervisor>>, Path(name): Path<String>) -> Result<StatusCode, ApiError> {
    let _guard = sup.lock_app(&name).await;
    let mut app = find(&sup, &name)?;
    app.running = false;
    sup.store().update_app(&app)?;
    sup.converge(&name).await?;
    sup.stop_runs(&name).await;
    let digests = sup.store().app_digests(&name)?;
    sup.store().delete_app(&name)?;
    sup.forget_app(&name);
    sup.events().emit(Kind::AppRemoved, &name, None, "removed");
    sup.publish_routes();
    sup.collect_garbage(&name, digests);
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Serialize)]
pub struct VolumeView {
    pub name: String,
    pub path: String,
    pub size: u64,
    /// Apps whose configuration mounts it.
    pub used_by: Vec<String>,
}

/// Apps whose current configuration mounts named volume `name`.
fn volume_users(sup: &Supervisor, name: &str) -> Result<Vec<String>, ApiError> {
    let apps = sup.store().apps()?;
    Ok(apps
        .into_iter()
        .filter(|a| {
            a.spec.volumes.iter().any(|v| {
                deliverous_runtime::volume::parse(v)
                    .is_ok_and(|v| v.source == deliverous_runtime::volume::Source::Named(name.to_string()))
            })
        })
        .map(|a| a.name)
        .collect())
}

async fn list_volumes(State(sup): State<Arc<Supervisor>>) -> ApiResult<Vec<VolumeView>> {
    let dir = sup.settings().data_dir.join("volumes");
    let mut views = Vec::new();
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Json(views)),
        Err(e) => return Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("{}: {e}", dir.display()))),
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(".tmp-") {
            continue;
        }
        let path = entry.path();
        let size = tokio::task::spawn_blocking({
            let path = path.clone();
            move || deliverous_runtime::volume::disk_usage(&path)
        })
        .await
        .unwrap_or(0);
        views.push(VolumeView { used_by: volume_users(&sup, &name)?, name, path: path.display().to_string(), size });
    }
    views.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(Json(views))
}

async fn remove_volume(State(sup): State<Arc<Supervisor>>, Path(name): Path<String>) -> Result<StatusCode, ApiError> {
    deliverous_runtime::volume::check_name(&name).map_err(ApiError::bad_request)?;
    let users = volume_users(&sup, &name)?;
    if !users.is_empty() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("volume {name} is used by {}: remove it from their configuration first", users.join(", ")),
        ));
    }
    let dir = sup.settings().volume_dir(&name);
    if !dir.exists() {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no volume named {name:?}: see `deliverous volume ls`"),
        ));
    }
    let result = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(&dir)).await;
    match result {
        Ok(Ok(())) => Ok(StatusCode::NO_CONTENT),
        Ok(Err(e)) => Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("removing volume {name}: {e}"))),
        Err(e) => Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("removing volume {name}: {e}"))),
    }
}

async fn list_images(State(sup): State<Arc<Supervisor>>) -> Result<Json<Value>, ApiError> {
    let images = sup.images().list().map_err(SupervisorError::from)?;
    let in_use = sup.store().digests_in_use()?;
    let mut out = Vec::new();
    for image in images {
        let used_by = in_use.get(&image.digest).cloned().unwrap_or_default();
        let mut v =
            serde_json::to_value(image).map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
        v["used_by"] = json!(used_by);
        out.push(v);
    }
    Ok(Json(Value::Array(out)))
}

/// `image rm`: refused while a revision (current or kept for rollback) uses the image.
async fn remove_image(
    State(sup): State<Arc<Supervisor>>,
    payload: Result<Json<Pull>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let req = body(payload)?;
    let reference = deliverous_images::Reference::parse(&req.reference).map_err(SupervisorError::from)?;
    let Some(image) = sup.images().get(&reference).map_err(SupervisorError::from)? else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no local image {reference}: see `deliverous image ls`"),
        ));
    };
    if let Some(apps) = sup.store().digests_in_use()?.get(&image.digest) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!(
                "image {} is used by {} (current or kept revisions): remove those apps first",
                image.reference,
                apps.join(", ")
            ),
        ));
    }
    let recorded = deliverous_images::Reference::parse(&image.reference).map_err(SupervisorError::from)?;
    sup.images().remove(&recorded).map_err(SupervisorError::from)?;
    let report = sup.images().prune().await.map_err(SupervisorError::from)?;
    Ok(Json(json!({"removed": image.reference, "pruned": report})))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Import {
    /// Absolute path, on the daemon's host, of the archive or layout directory.
    pub path: std::path::PathBuf,
    pub reference: Option<String>,
}

/// `image import`: a `docker save` tarball, an OCI archive or layout on this host.
async fn import_image(
    State(sup): State<Arc<Supervisor>>,
    payload: Result<Json<Import>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let req = body(payload)?;
    if !req.path.is_absolute() {
        return Err(ApiError::bad_request(format!("the path {} must be absolute", req.path.display())));
    }
    // What is not there is the caller's mistake, not the daemon's; a device or a FIFO would be
    // read forever.
    match std::fs::metadata(&req.path) {
        Ok(m) if m.is_file() || m.is_dir() => {}
        Ok(_) => {
            return Err(ApiError::bad_request(format!(
                "{} is neither a file nor a directory: give an image archive or an OCI layout directory",
                req.path.display()
            )))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                format!("no file or directory {} on the daemon's host", req.path.display()),
            ))
        }
        Err(e) => return Err(ApiError::bad_request(format!("{}: {e}", req.path.display()))),
    }
    let reference = match &req.reference {
        Some(r) => Some(deliverous_images::Reference::parse(r).map_err(SupervisorError::from)?),
        None => None,
    };
    let opts = deliverous_images::ImportOptions { reference };
    let images = sup.images().import(&req.path, &opts).await.map_err(SupervisorError::from)?;
    Ok(Json(serde_json::to_value(images).map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogQuery {
    /// Only the last N lines (of all instances together).
    pub tail: Option<usize>,
    /// Only lines from then on: `10m`, `2h`, `1d` ago or an RFC 3339 time.
    pub since: Option<String>,
    /// Only this instance (`web.2`).
    pub instance: Option<String>,
    /// Keep the stream open and send new lines as they are written.
    #[serde(default)]
    pub follow: bool,
}

/// An app's logs as JSON lines (`{"ts","instance","stream","text"}`), all instances merged in
/// time order; with `follow`, the stream goes on with new lines, through log rotations, and
/// picks up instances as they start.
async fn app_logs(
    State(sup): State<Arc<Supervisor>>,
    Path(name): Path<String>,
    query: Result<axum::extract::Query<LogQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let axum::extract::Query(q) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    find(&sup, &name)?;
    let since = match &q.since {
        Some(s) => Some(
            crate::logs::parse_since(s, chrono::Utc::now())
                .map_err(ApiError::bad_request)?
                .to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        ),
        None => None,
    };
    if let Some(i) = &q.instance {
        if i.strip_prefix(&format!("{name}.")).is_none_or(|slot| slot.parse::<u32>().is_err()) {
            return Err(ApiError::bad_request(format!("invalid instance {i:?}: expected {name}.N, e.g. {name}.1")));
        }
    }
    let (tx, response) = json_lines()?;
    tokio::spawn(async move {
        let sources = sup.log_sources(&name, q.instance.as_deref());
        // Positioned before the history is read: a line written meanwhile may come twice, but
        // none is lost.
        let mut follower = crate::logs::Follower::default();
        if q.follow {
            follower.start_at_end(&sources);
        }
        let (tail, since2, sources2) = (q.tail, since.clone(), sources.clone());
        let past = tokio::task::spawn_blocking(move || crate::logs::history(&sources2, since2.as_deref(), tail)).await;
        for l in past.unwrap_or_default() {
            if !tx.send(&l) {
                return;
            }
        }
        if !q.follow {
            return;
        }
        loop {
            tokio::select! {
                _ = tx.closed() => return,
                _ = tokio::time::sleep(std::time::Duration::from_millis(200)) => {}
            }
            let sources = sup.log_sources(&name, q.instance.as_deref());
            let polled = tokio::task::spawn_blocking(move || {
                let lines = follower.poll(&sources);
                (follower, lines)
            })
            .await;
            let Ok((back, lines)) = polled else { return };
            follower = back;
            for l in lines {
                if !tx.send(&l) {
                    return;
                }
            }
        }
    });
    Ok(response)
}

/// `image prune`: layers and blobs no image uses.
async fn prune_images(State(sup): State<Arc<Supervisor>>) -> Result<Json<Value>, ApiError> {
    let report = sup.images().prune().await.map_err(SupervisorError::from)?;
    Ok(Json(json!(report)))
}

/// Pulls an image. With `Accept: application/x-ndjson` the answer is a stream of JSON lines as
/// the pull goes: the `layers`, `progress` and `done` events of [`deliverous_images::PullEvent`],
/// then `{"event":"pulled","image":{..}}` or `{"event":"error","error":".."}`.
async fn pull_image(
    State(sup): State<Arc<Supervisor>>,
    headers: axum::http::HeaderMap,
    payload: Result<Json<Pull>, JsonRejection>,
) -> Result<Response, ApiError> {
    let req = body(payload)?;
    let reference = deliverous_images::Reference::parse(&req.reference).map_err(SupervisorError::from)?;
    let streaming = headers
        .get(axum::http::header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("application/x-ndjson"));
    if !streaming {
        let image = sup.images().pull(&reference, &sup.pull_options()).await.map_err(SupervisorError::from)?;
        let value =
            serde_json::to_value(image).map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
        return Ok(Json(value).into_response());
    }
    let (tx, response) = json_lines()?;
    let events = tx.clone();
    let mut opts = sup.pull_options();
    opts.progress = Some(deliverous_images::Progress::new(move |event| {
        events.send(&event);
    }));
    tokio::spawn(async move {
        let last = match sup.images().pull(&reference, &opts).await {
            Ok(image) => json!({"event": "pulled", "image": image}),
            Err(e) => json!({"event": "error", "error": e.to_string()}),
        };
        drop(opts);
        tx.send(&last);
    });
    // Ends when the pull task and its progress callback have dropped their senders.
    Ok(response)
}

/// The sending side of a streamed answer of JSON lines (`application/x-ndjson`).
#[derive(Clone)]
struct JsonLines(tokio::sync::mpsc::UnboundedSender<bytes::Bytes>);

impl JsonLines {
    /// Sends one line; false once the client has gone away.
    fn send(&self, value: &impl Serialize) -> bool {
        let mut line = serde_json::to_vec(value).unwrap_or_default();
        line.push(b'\n');
        self.0.send(bytes::Bytes::from(line)).is_ok()
    }

    /// Resolves when the client has gone away.
    async fn closed(&self) {
        self.0.closed().await
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventQuery {
    /// Only this app's events.
    pub app: Option<String>,
    /// Only the last N events.
    pub tail: Option<usize>,
    /// Only events from then on: `10m`, `2h`, `1d` ago or an RFC 3339 time.
    pub since: Option<String>,
    /// Keep the stream open and send new events as they happen.
    #[serde(default)]
    pub follow: bool,
}

/// Events as JSON lines (`{"id","time","kind","app","instance","message"}`), oldest first.
async fn events(
    State(sup): State<Arc<Supervisor>>,
    query: Result<axum::extract::Query<EventQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let axum::extract::Query(q) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let since = match &q.since {
        Some(s) => Some(
            crate::logs::parse_since(s, chrono::Utc::now())
                .map_err(ApiError::bad_request)?
                .to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        ),
        None => None,
    };
    let wanted = move |e: &crate::events::Event| {
        q.app.as_ref().is_none_or(|a| &e.app == a) && since.as_ref().is_none_or(|s| e.time.as_str() >= s.as_str())
    };
    let (past, mut rx) = sup.events().follow();
    let mut past: Vec<_> = past.into_iter().filter(|e| wanted(e)).collect();
    if let Some(n) = q.tail {
        past.drain(..past.len().saturating_sub(n));
    }
    let (tx, response) = json_lines()?;
    for e in &past {
        tx.send(e);
    }
    if q.follow {
        tokio::spawn(async move {
            loop {
                let event = tokio::select! {
                    _ = tx.closed() => return,
                    e = rx.recv() => e,
                };
                match event {
                    Ok(e) if wanted(&e) => {
                        if !tx.send(&e) {
                            return;
                        }
                    }
                    Ok(_) => {}
                    // A follower too slow for 1024 events misses some; say so rather than stop.
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!("an events follower missed {n} events");
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
            }
        });
    }
    Ok(response)
}

/// A response streaming what is sent through the returned [`JsonLines`]; it ends when every
/// clone of it is dropped.
fn json_lines() -> Result<(JsonLines, Response), ApiError> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<bytes::Bytes>();
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, std::convert::Infallible>(b), rx))
    });
    let response = Response::builder()
        .header(axum::http::header::CONTENT_TYPE, "application/x-ndjson")
        .body(axum::body::Body::from_stream(stream))
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    Ok((JsonLines(tx), response))
}
