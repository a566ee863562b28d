//! `/admin/status` and `/admin/sessions`: what the operator console (and an operator's
//! scripts) need beyond tokens, audit and usage — the doctor's readiness checks with the
//! live health figures, and every app's sessions with a way to close one.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::State;
use axum::response::IntoResponse;
use serde::{Deserialize, Serialize};

use crate::app::AppState;
use crate::audit::{self, AuditEntry};
use crate::auth::tokens;
use crate::doctor;
use crate::error::{ApiError, ApiResult};
use crate::http::extract::{AdminCaller, ApiPath, ApiQuery};
use crate::http::health::{health, Health};
use crate::http::ok;
use crate::sessions::{self, store::SessionRecord};

/// One of the doctor's checks.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct StatusCheck {
    pub name: &'static str,
    /// `true` for `ok` and `warn`.
    pub ok: bool,
    /// `ok`, `warn`, `fail` or `skip` (not checked: a check it depends on failed).
    pub status: &'static str,
    pub detail: String,
    /// What to try, for a problem.
    pub fix: Option<String>,
}

/// `GET /admin/status`: the doctor's checks, whether they all pass, what `/healthz`
/// reports, and the admission figures.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Status {
    /// No check failed (warnings allowed), as `clawdforge doctor` exits 0.
    pub ready: bool,
    pub checks: Vec<StatusCheck>,
    #[serde(flatten)]
    pub health: Health,
    /// Agent processes (runs and turns) running now.
    pub processes_running: usize,
    /// Requests waiting for a slot now.
    pub queue_depth: usize,
    /// `CLAWDFORGE_MAX_CONCURRENT`.
    pub max_concurrent: u32,
}

fn status_name(s: doctor::Status) -> &'static str {
    match s {
        doctor::Status::Ok => "ok",
        doctor::Status::Warn => "warn",
        doctor::Status::Fail => "fail",
        doctor::Status::Skip => "skip",
    }
}

/// Runs the doctor's checks (they spawn the CLIs' `--version` and `claude auth status`,
/// each bounded by the probe timeout), so this is for people and scripts, not a tight
/// health loop: `/healthz` is the cheap one.
pub async fn status(
    _: AdminCaller,
    State(state): State<Arc<AppState>>,
) -> ApiResult<impl IntoResponse> {
    let report = doctor::diagnose(&state.config).await;
    let checks = report
        .checks
        .into_iter()
        .map(|c| StatusCheck {
            name: c.name,
            ok: matches!(c.status, doctor::Status::Ok | doctor::Status::Warn),
            status: status_name(c.status),
            detail: c.detail,
            fix: c.fix,
        })
        .collect();
    Ok(ok(Status {
        ready: report.ok,
        checks,
        health: health(&state),
        processes_running: state.slots.running(),
        queue_depth: state.slots.queued(),
        max_concurrent: state.config.settings.max_concurrent,
    }))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionsQuery {
    pub status: Option<String>,
    pub token_id: Option<String>,
}

/// A session as `GET /sessions` shows it, with the token that owns it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct OwnedSession {
    #[serde(flatten)]
    pub session: SessionRecord,
    pub token_id: String,
    /// `null` when the token row is gone.
    pub token_name: Option<String>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct OwnedSessionList {
    pub sessions: Vec<OwnedSession>,
}

/// `GET /admin/sessions?status=&token_id=`: every app's sessions, newest first.
pub async fn sessions(
    _: AdminCaller,
    State(state): State<Arc<AppState>>,
    ApiQuery(q): ApiQuery<SessionsQuery>,
) -> ApiResult<impl IntoResponse> {
    let status = match q.status.as_deref() {
        None | Some("") => None,
        Some(s @ ("open" | "closed")) => Some(s.to_string()),
        Some(_) => return Err(ApiError::bad_request("status must be open or closed")),
    };
    let token_id = q.token_id.filter(|t| !t.is_empty());
    let list = sessions::list_all(&state.sessions, token_id, status).await?;
    let names: HashMap<String, String> = state
        .db
        .read(tokens::list)
        .await?
        .into_iter()
        .map(|t| (t.id, t.name))
        .collect();
    let sessions = list
        .into_iter()
        .map(|s| OwnedSession {
            token_id: s.token_id.clone(),
            token_name: names.get(&s.token_id).cloned(),
            session: s,
        })
        .collect();
    Ok(ok(OwnedSessionList { sessions }))
}

/// `DELETE /admin/sessions/{id}`: closes any app's session as its owner's `DELETE` would
/// (idempotent), records `session_close` in the audit log under the owner's token when it
/// was open, and
/// answers the session as it now is.
pub async fn close_session(
    _: AdminCaller,
    State(state): State<Arc<AppState>>,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<impl IntoResponse> {
    let (session, was_open) = sessions::close_any(&state.sessions, &id).await?;
    let token_id = session.token_id.clone();
    let token_name = state
        .db
        .write(move |c| {
            if was_open {
                let mut entry = AuditEntry::admin("session_close", "admin", &id, None);
                entry.token_id = Some(token_id.clone());
                audit::insert(c, &entry)?;
            }
            tokens::get(c, &token_id).map(|t| t.map(|t| t.name))
        })
        .await?;
    Ok(ok(OwnedSession {
        token_id: session.token_id.clone(),
        token_name,
        session,
    }))
}
