//! `/sessions/*`: multi-turn sessions, each owned by the token that created it (another
//! token's session answers 404, like a missing one).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use crate::app::AppState;
use crate::error::{ApiError, ApiResult};
use crate::http::extract::{ApiJson, ApiPath, ApiQuery, AppCaller};
use crate::http::runs::stream_answer;
use crate::http::{ok, params};
use crate::sessions::store::SessionRecord;
use crate::sessions::{self, CreateInput, TurnInput};

#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateBody {
    pub agent: Option<String>,
    pub model: Option<String>,
    pub system: Option<String>,
}

/// A new session as `POST /sessions` answers it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Created {
    pub session_id: String,
    pub agent: String,
    pub model: String,
    pub status: String,
    #[serde(serialize_with = "crate::util::ser_rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub created_at: i64,
}

/// Every field is optional, so an empty body is `{}`.
pub async fn create(
    caller: AppCaller,
    State(state): State<Arc<AppState>>,
    raw: Bytes,
) -> ApiResult<impl IntoResponse> {
    let body: CreateBody = if raw.iter().all(u8::is_ascii_whitespace) {
        CreateBody::default()
    } else {
        serde_json::from_slice(&raw)
            .map_err(|e| ApiError::BadRequest(format!("invalid request body: {e}")))?
    };
    let input = CreateInput {
        agent: body.agent.unwrap_or_else(|| sessions::DEFAULT_AGENT.into()),
        model: params::model(&state, &caller.token, body.model)?,
        system: params::system(body.system)?,
    };
    let s = sessions::create(&state.sessions, &caller.token, input).await?;
    Ok((
        StatusCode::CREATED,
        ok(Created {
            session_id: s.session_id,
            agent: s.agent,
            model: s.model,
            status: s.status,
            created_at: s.created_at,
        }),
    ))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    pub status: Option<String>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct SessionList {
    pub sessions: Vec<SessionRecord>,
}

pub async fn list(
    caller: AppCaller,
    State(state): State<Arc<AppState>>,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> ApiResult<impl IntoResponse> {
    let status = params::session_status(q.status)?;
    let sessions = sessions::list(&state.sessions, &caller.token.id, status).await?;
    Ok(ok(SessionList { sessions }))
}

pub async fn get(
    caller: AppCaller,
    State(state): State<Arc<AppState>>,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<impl IntoResponse> {
    Ok(ok(
        sessions::get(&state.sessions, &caller.token.id, &id).await?
    ))
}

pub async fn close(
    caller: AppCaller,
    State(state): State<Arc<AppState>>,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<impl IntoResponse> {
    Ok(ok(sessions::close_for(
        &state.sessions,
        &caller.token.id,
        &id,
    )
    .await?))
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Cancelled {
    pub cancelled: bool,
}

/// Answers once the running turn has ended, so the next turn is never `busy`.
pub async fn cancel(
    caller: AppCaller,
    State(state): State<Arc<AppState>>,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<impl IntoResponse> {
    let cancelled = sessions::cancel(&state.sessions, &caller.token.id, &id).await?;
    Ok(ok(Cancelled { cancelled }))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TurnBody {
    pub prompt: String,
    pub files: Option<Vec<String>>,
    /// Seconds, 1..CLAWDFORGE_MAX_TIMEOUT_SECS (the served document states the maximum in
    /// force); default 120.
    #[schema(minimum = 1)]
    pub timeout_secs: Option<u64>,
    pub stream: Option<bool>,
}

pub async fn turn(
    caller: AppCaller,
    State(state): State<Arc<AppState>>,
    ApiPath(id): ApiPath<String>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<TurnBody>,
) -> ApiResult<Response> {
    let input = TurnInput {
        prompt: params::prompt(&state, body.prompt)?,
        files: params::files(body.files)?,
        timeout: params::timeout(&state, body.timeout_secs)?,
    };
    let streaming = params::wants_stream(body.stream, &headers);
    let prepared = sessions::prepare_turn(&state.sessions, &caller.token, &id, input).await?;
    if streaming {
        return Ok(stream_answer("acp", move |sink| {
            sessions::execute_turn(prepared, Some(sink), Default::default())
        }));
    }
    Ok(ok(sessions::run_turn(prepared).await?).into_response())
}
