//! `GET /healthz`: liveness and the cached CLI probes. Never spawns a process.

use std::sync::Arc;

use axum::extract::State;
use axum::response::IntoResponse;
use serde::Serialize;

use crate::app::AppState;
use crate::http::ok;

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Health {
    #[schema(value_type = String)]
    pub version: &'static str,
    pub claude_present: bool,
    pub claude_version: Option<String>,
    pub acpx_present: bool,
    pub acpx_version: Option<String>,
    pub uptime_secs: u64,
    pub warm_pool: crate::runner::warm::PoolStats,
}

pub async fn healthz(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    ok(health(&state))
}

/// What `/healthz` reports (also part of `/admin/status`).
pub fn health(state: &AppState) -> Health {
    let snap = state.probes.snapshot();
    Health {
        version: env!("CARGO_PKG_VERSION"),
        claude_present: snap.claude_version.is_some(),
        claude_version: snap.claude_version,
        acpx_present: snap.acpx_version.is_some(),
        acpx_version: snap.acpx_version,
        uptime_secs: state.started_at.elapsed().as_secs(),
        warm_pool: state.warm.stats(),
    }
}
