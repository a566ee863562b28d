//! `/files`: uploads (multipart, streamed to disk) and their metadata, each visible only to
//! the token that uploaded it.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::IntoResponse;
use serde::Serialize;

use crate::app::AppState;
use crate::error::{ApiError, ApiResult};
use crate::files::{self, upload};
use crate::http::extract::{ApiPath, AppCaller};
use crate::http::ok;

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct UploadAnswer {
    pub file_token: String,
    pub ttl_secs: u64,
    pub size: u64,
    pub sha256: String,
    pub filename: String,
}

#[derive(Debug, Serialize)]
pub struct Empty {}

pub async fn upload(
    caller: AppCaller,
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<impl IntoResponse> {
    let boundary = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|ct| multer::parse_boundary(ct).ok())
        .ok_or_else(|| {
            ApiError::bad_request("expected a multipart/form-data body (with a boundary)")
        })?;
    let mut max_bytes = state.config.settings.max_upload_bytes;
    if let Some(quota) = caller.token.policy.max_upload_bytes_stored {
        // What is left of the token's quota bounds this upload like the global limit does
        // (exactly at it is fine). Two uploads racing may both fit the same remainder.
        let stored = crate::files::stored_bytes(&state.db, &caller.token.id).await?;
        let left = quota.saturating_sub(stored);
        if left == 0 {
            return Err(ApiError::TooLarge(format!(
                "this token's unexpired uploads already take {stored} bytes of its \
                 max_upload_bytes_stored ({quota}); delete some first"
            )));
        }
        max_bytes = max_bytes.min(left);
    }
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    upload::check_declared_length(declared, max_bytes)?;
    let up = upload::receive(
        &state.db,
        &state.config.uploads_dir,
        max_bytes,
        &caller.token.id,
        boundary,
        body.into_data_stream(),
    )
    .await?;
    Ok((
        StatusCode::CREATED,
        ok(UploadAnswer {
            file_token: up.record.file_token,
            ttl_secs: up.ttl.get(),
            size: up.record.size,
            sha256: up.record.sha256,
            filename: up.record.filename,
        }),
    ))
}

pub async fn show(
    caller: AppCaller,
    State(state): State<Arc<AppState>>,
    ApiPath(file_token): ApiPath<String>,
) -> ApiResult<impl IntoResponse> {
    let record = files::find(&state.db, &caller.token.id, &file_token).await?;
    Ok(ok(record))
}

pub async fn delete(
    caller: AppCaller,
    State(state): State<Arc<AppState>>,
    ApiPath(file_token): ApiPath<String>,
) -> ApiResult<impl IntoResponse> {
    files::delete(
        &state.db,
        &state.config.uploads_dir,
        &caller.token.id,
        &file_token,
    )
    .await?;
    Ok(ok(Empty {}))
}
