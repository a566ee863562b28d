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
    /// Session agents alive between turns, pooled sessions ready, pre-started clients.
    pub warm_sessions: crate::sessions::warm::WarmStats,
    /// `failing` while the data dir cannot be written or the database file was deleted or
    /// replaced under the server; the status stays 200 (this is liveness).
    pub storage: Storage,
}

#[derive(Debug, Clone, Copy, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Storage {
    Ok,
    Failing,
}

pub async fn healthz(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    ok(health(&state).await)
}

/// What `/healthz` reports (also part of `/admin/status`).
pub async fn health(state: &AppState) -> Health {
    let snap = state.probes.snapshot();
    let (db, dir) = (state.db.clone(), state.config.settings.data_dir.clone());
    // A stat and a file creation: cheap, but file system calls, so off the async threads.
    let sound = tokio::task::spawn_blocking(move || db.storage_sound(&dir))
        .await
        .unwrap_or(false);
    Health {
        version: env!("CARGO_PKG_VERSION"),
        claude_present: snap.claude_version.is_some(),
        claude_version: snap.claude_version,
        acpx_present: snap.acpx_version.is_some(),
        acpx_version: snap.acpx_version,
        uptime_secs: state.started_at.elapsed().as_secs(),
        warm_pool: state.warm.stats(),
        warm_sessions: state.sessions.warm_stats(),
        storage: if sound { Storage::Ok } else { Storage::Failing },
    }
}
