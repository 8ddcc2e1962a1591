//! `GET /v1/stats`: every instance's CPU, memory, pids, restarts and requests, with rates.

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::Json;
use serde::Deserialize;

use super::{find, ApiError};
use crate::stats::InstanceStats;
use crate::supervisor::Supervisor;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatsQuery {
    /// Only this app's instances.
    pub app: Option<String>,
}

pub(super) async fn stats(
    State(sup): State<Arc<Supervisor>>,
    query: Result<Query<StatsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Vec<InstanceStats>>, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    if let Some(app) = &q.app {
        find(&sup, app)?;
    }
    Ok(Json(crate::stats::collect(&sup, q.app.as_deref(), crate::stats::Rates::Wait).await))
}

/// Serves `GET /metrics` (the proxy's figures and the instances') alone on `listener`, for
/// `--metrics-listen`.
pub async fn serve_metrics(listener: tokio::net::TcpListener, sup: Arc<Supervisor>) {
    let app = axum::Router::new().route("/metrics", axum::routing::get(super::metrics)).with_state(sup);
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!("metrics listener: {e}");
    }
}
