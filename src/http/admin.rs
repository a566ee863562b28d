//! `/admin/*`: minting, listing, patching, rotating and revoking app tokens, paging the
//! audit log, and reading the usage ledger.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::app::AppState;
use crate::audit::{self, AuditRow};
use crate::auth::tokens::{self, Rotation, TokenRecord};
use crate::error::{ApiError, ApiResult};
use crate::governance::policy::{Policy, PolicyPatch};
use crate::governance::usage::{self, LedgerRow, Totals};
use crate::http::extract::{AdminCaller, ApiJson, ApiPath, ApiQuery};
use crate::http::ok;

/// A mint body: `name` plus any policy field (`governance::policy::PolicyPatch`); a policy
/// field that is `null` or omitted is unset. Split by hand because serde cannot combine
/// `flatten` with `deny_unknown_fields`, and unknown fields must be refused.
pub fn parse_mint(body: Value) -> ApiResult<(String, Policy)> {
    let Value::Object(mut fields) = body else {
        return Err(ApiError::bad_request("expected a JSON object"));
    };
    let name = match fields.remove("name") {
        Some(Value::String(name)) => tokens::parse_name(&name)?,
        Some(_) => return Err(ApiError::bad_request("name must be a string")),
        None => return Err(ApiError::bad_request("name is required")),
    };
    let mut policy = Policy::default();
    parse_patch(Value::Object(fields))?
        .apply(&mut policy)
        .map_err(ApiError::BadRequest)?;
    Ok((name, policy))
}

fn parse_patch(body: Value) -> ApiResult<PolicyPatch> {
    serde_json::from_value(body)
        .map_err(|e| ApiError::BadRequest(format!("invalid request body: {e}")))
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Minted {
    #[serde(flatten)]
    pub record: TokenRecord,
    pub token: String,
}

pub async fn mint(
    _: AdminCaller,
    State(state): State<Arc<AppState>>,
    ApiJson(body): ApiJson<Value>,
) -> ApiResult<impl IntoResponse> {
    let (name, policy) = parse_mint(body)?;
    let (record, token) = state
        .db
        .write(move |c| tokens::mint(c, &name, &policy, "admin"))
        .await?;
    Ok((StatusCode::CREATED, ok(Minted { record, token })))
}

/// `PATCH /admin/tokens/{id}`: omitted fields keep their value, `null` clears, unknown
/// fields are refused. Answers the token as it now is.
pub async fn patch(
    _: AdminCaller,
    State(state): State<Arc<AppState>>,
    ApiPath(id): ApiPath<String>,
    ApiJson(body): ApiJson<Value>,
) -> ApiResult<impl IntoResponse> {
    if !body.is_object() {
        return Err(ApiError::bad_request("expected a JSON object"));
    }
    let patch = parse_patch(body)?;
    let record = state
        .db
        .write(move |c| tokens::update_policy(c, &id, patch, "admin"))
        .await?
        .ok_or_else(|| ApiError::not_found("token"))?
        .map_err(ApiError::BadRequest)?;
    Ok(ok(record))
}

/// `POST /admin/tokens/{id}/rotate`: a new secret for the same token. 200, not 201: nothing
/// new is created (same id, policy, usage, sessions and history); the old secret stops
/// working with this answer.
pub async fn rotate(
    _: AdminCaller,
    State(state): State<Arc<AppState>>,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<impl IntoResponse> {
    match state
        .db
        .write(move |c| tokens::rotate(c, &id, "admin"))
        .await?
    {
        Rotation::Rotated(record, token) => Ok(ok(Minted {
            record: *record,
            token,
        })),
        Rotation::Revoked => Err(ApiError::bad_request(
            "the token is revoked; mint a new one instead",
        )),
        Rotation::Missing => Err(ApiError::not_found("token")),
    }
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
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

#[derive(Debug, Serialize, utoipa::ToSchema)]
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
    pub kind: Option<String>,
    pub outcome: Option<String>,
    pub limit: Option<u32>,
    pub before: Option<i64>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
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
    // An empty filter value (a cleared form field) means no filter.
    let given = |v: Option<String>| v.filter(|v| !v.is_empty());
    let filter = audit::PageFilter {
        token_id: given(q.token_id),
        kind: given(q.kind),
        outcome: given(q.outcome),
    };
    let rows = state
        .db
        .read(move |c| audit::page(c, &filter, q.before, limit))
        .await?;
    // A full page may have more behind it; a short one is the end.
    let next_before = if rows.len() as u32 == limit {
        rows.last().map(|r| r.id)
    } else {
        None
    };
    Ok(ok(AuditPage { rows, next_before }))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsageQuery {
    pub token_id: Option<String>,
    pub from: Option<String>,
    pub to: Option<String>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct UsageReport {
    pub from: String,
    pub to: String,
    pub rows: Vec<LedgerRow>,
    pub totals: Totals,
}

/// Longest range one `/admin/usage` call may cover, to bound the answer.
const USAGE_RANGE_MAX_DAYS: i64 = 366;

/// `GET /admin/usage?token_id&from&to`: ledger rows by day, token and model over
/// `from..=to` (UTC days, `YYYY-MM-DD`; default: this month so far).
pub async fn usage(
    _: AdminCaller,
    State(state): State<Arc<AppState>>,
    ApiQuery(q): ApiQuery<UsageQuery>,
) -> ApiResult<impl IntoResponse> {
    let today = usage::day_of(crate::util::now_ms());
    let day = |name: &str, v: Option<String>, default: String| -> ApiResult<String> {
        let v = v.unwrap_or(default);
        usage::parse_day(&v)
            .map(usage::format_day)
            .ok_or_else(|| ApiError::BadRequest(format!("{name} must be a day as YYYY-MM-DD")))
    };
    let from = day("from", q.from, usage::month_start(&today))?;
    let to = day("to", q.to, today)?;
    let span = usage::parse_day(&to)
        .zip(usage::parse_day(&from))
        .map(|(t, f)| (t - f).whole_days())
        .unwrap_or(-1);
    if !(0..USAGE_RANGE_MAX_DAYS).contains(&span) {
        return Err(ApiError::BadRequest(format!(
            "from must not be after to, and the range at most {USAGE_RANGE_MAX_DAYS} days"
        )));
    }
    let (f, t) = (from.clone(), to.clone());
    let rows = state
        .db
        .read(move |c| usage::rows(c, q.token_id.as_deref(), &f, &t))
        .await?;
    let totals = rows.iter().map(|r| &r.totals).sum();
    Ok(ok(UsageReport {
        from,
        to,
        rows,
        totals,
    }))
}
