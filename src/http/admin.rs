//! `/admin/*`: minting, listing and revoking app tokens, and paging the audit log.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use ipnetwork::IpNetwork;
use serde::{Deserialize, Serialize};

use crate::app::AppState;
use crate::audit::{self, AuditRow};
use crate::auth::tokens::{self, TokenRecord};
use crate::error::{ApiError, ApiResult};
use crate::http::extract::{AdminCaller, ApiJson, ApiPath, ApiQuery};
use crate::http::ok;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MintRequest {
    pub name: String,
    #[serde(default)]
    pub ip_cidrs: Vec<String>,
}

/// Parses and normalises CIDRs ("10.0.0.1/8" stays as written, but must parse).
pub fn parse_cidrs(cidrs: &[String]) -> ApiResult<Vec<String>> {
    cidrs
        .iter()
        .map(|c| {
            c.trim()
                .parse::<IpNetwork>()
                .map(|n| n.to_string())
                .map_err(|_| ApiError::BadRequest(format!("ip_cidrs: '{c}' is not a CIDR")))
        })
        .collect()
}

pub fn parse_name(name: &str) -> ApiResult<String> {
    let name = name.trim();
    if name.is_empty() || name.chars().count() > 200 || name.chars().any(char::is_control) {
        return Err(ApiError::bad_request(
            "name must be 1 to 200 printable characters",
        ));
    }
    Ok(name.to_string())
}

#[derive(Debug, Serialize)]
pub struct Minted {
    #[serde(flatten)]
    pub record: TokenRecord,
    pub token: String,
}

pub async fn mint(
    _: AdminCaller,
    State(state): State<Arc<AppState>>,
    ApiJson(req): ApiJson<MintRequest>,
) -> ApiResult<impl IntoResponse> {
    let name = parse_name(&req.name)?;
    let cidrs = parse_cidrs(&req.ip_cidrs)?;
    let (record, token) = state
        .db
        .write(move |c| tokens::mint(c, &name, &cidrs, "admin"))
        .await?;
    Ok((StatusCode::CREATED, ok(Minted { record, token })))
}

#[derive(Debug, Serialize)]
pub struct TokenList {
    pub tokens: Vec<TokenRecord>,
}

pub async fn list(
    _: AdminCaller,
    State(state): State<Arc<AppState>>,
) -> ApiResult<impl IntoResponse> {
    let tokens = state.db.read(tokens::list).await?;
    Ok(ok(TokenList { tokens }))
}

#[derive(Debug, Serialize)]
pub struct Revoked {
    pub id: String,
    pub revoked: bool,
}

pub async fn revoke(
    _: AdminCaller,
    State(state): State<Arc<AppState>>,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<impl IntoResponse> {
    let lookup = id.clone();
    let record = state
        .db
        .write(move |c| tokens::revoke(c, &lookup, "admin"))
        .await?
        .ok_or_else(|| ApiError::not_found("token"))?;
    state.on_token_revoked(&record.id).await;
    Ok(ok(Revoked { id, revoked: true }))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    pub token_id: Option<String>,
    pub limit: Option<u32>,
    pub before: Option<i64>,
}

#[derive(Debug, Serialize)]
pub struct AuditPage {
    pub rows: Vec<AuditRow>,
    pub next_before: Option<i64>,
}

const AUDIT_PAGE_MAX: u32 = 500;

pub async fn audit(
    _: AdminCaller,
    State(state): State<Arc<AppState>>,
    ApiQuery(q): ApiQuery<AuditQuery>,
) -> ApiResult<impl IntoResponse> {
    let limit = q.limit.unwrap_or(100);
    if !(1..=AUDIT_PAGE_MAX).contains(&limit) {
        return Err(ApiError::BadRequest(format!(
            "limit must be 1..{AUDIT_PAGE_MAX}"
        )));
    }
    let rows = state
        .db
        .read(move |c| audit::page(c, q.token_id.as_deref(), q.before, limit))
        .await?;
    // A full page may have more behind it; a short one is the end.
    let next_before = if rows.len() as u32 == limit {
        rows.last().map(|r| r.id)
    } else {
        None
    };
    Ok(ok(AuditPage { rows, next_before }))
}
