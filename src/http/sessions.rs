//! `/sessions/*`: multi-turn sessions, each owned by the token that created it.

use std::sync::Arc;

use axum::extract::State;
use axum::response::IntoResponse;
use serde::{Deserialize, Serialize};

use crate::app::AppState;
use crate::error::{ApiError, ApiResult};
use crate::http::extract::{ApiQuery, AppCaller};
use crate::http::ok;
use crate::sessions::store::{self, SessionRecord};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    pub status: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct SessionList {
    pub sessions: Vec<SessionRecord>,
}

pub async fn list(
    caller: AppCaller,
    State(state): State<Arc<AppState>>,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> ApiResult<impl IntoResponse> {
    let status = match q.status.as_deref() {
        None => None,
        Some(s @ ("open" | "closed")) => Some(s.to_string()),
        Some(_) => return Err(ApiError::bad_request("status must be open or closed")),
    };
    let token_id = caller.token.id.clone();
    let sessions = state
        .db
        .read(move |c| store::list_for(c, &token_id, status.as_deref()))
        .await?;
    Ok(ok(SessionList { sessions }))
}
