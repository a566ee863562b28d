//! Extractors: the calling app token, the admin bearer, the client address, and JSON /
//! query / path wrappers whose rejections become the API's error envelope instead of
//! axum's plain-text answers.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{header, HeaderValue, StatusCode};
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::app::AppState;
use crate::auth::tokens::{self, looks_like_app_token, TokenRecord};
use crate::auth::{hash_token, AllowList};
use crate::error::ApiError;
use crate::util::now_ms;

/// The client address the allowlist middleware computed (see `auth::net`).
#[derive(Debug, Clone, Copy)]
pub struct ClientIp(pub IpAddr);

fn bearer(parts: &Parts) -> Option<&str> {
    bearer_from_header(parts.headers.get(header::AUTHORIZATION)?)
}

/// The credentials of an `Authorization: Bearer <credentials>` value (scheme matched
/// without regard to case, surrounding whitespace removed); `None` for another scheme, an
/// empty credential or a value that is not visible ASCII.
pub fn bearer_from_header(value: &HeaderValue) -> Option<&str> {
    let (scheme, token) = value.to_str().ok()?.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let token = token.trim();
    (!token.is_empty()).then_some(token)
}

fn client_ip(parts: &Parts) -> Result<IpAddr, ApiError> {
    parts
        .extensions
        .get::<ClientIp>()
        .map(|c| c.0)
        .ok_or_else(|| ApiError::internal("client address missing"))
}

/// Batched `last_used_at` stamps: extractors note use in memory, a background task writes
/// them every few seconds in one transaction, so no request waits on a write.
#[derive(Default, Clone)]
pub struct LastUsed(Arc<Mutex<HashMap<String, i64>>>);

impl LastUsed {
    pub fn note(&self, token_id: &str) {
        if let Ok(mut m) = self.0.lock() {
            m.insert(token_id.to_string(), now_ms());
        }
    }

    pub fn take(&self) -> Vec<(String, i64)> {
        self.0
            .lock()
            .map(|mut m| m.drain().collect())
            .unwrap_or_default()
    }
}

/// An authenticated app: a valid, unrevoked, unexpired `cf_` bearer used from an address
/// its own `ip_cidrs` (if any) allow.
#[derive(Debug, Clone)]
pub struct AppCaller {
    pub token: TokenRecord,
    pub ip: IpAddr,
}

impl FromRequestParts<Arc<AppState>> for AppCaller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, ApiError> {
        // Authenticated already by a layer (`http::idempotency`).
        if let Some(caller) = parts.extensions.get::<AppCaller>() {
            return Ok(caller.clone());
        }
        let ip = client_ip(parts)?;
        authenticate(state, ip, bearer(parts)).await
    }
}

/// The SDK routes' caller: the app token as `Authorization: Bearer` (OpenAI SDKs, and the
/// `anthropic` Python SDK 2.10.0) or `x-api-key` (other Anthropic clients).
pub async fn sdk_caller(state: &AppState, parts: &Parts) -> Result<AppCaller, ApiError> {
    if let Some(caller) = parts.extensions.get::<AppCaller>() {
        return Ok(caller.clone());
    }
    let ip = client_ip(parts)?;
    let key = bearer(parts).or_else(|| {
        parts
            .headers
            .get("x-api-key")
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    });
    authenticate(state, ip, key).await
}

/// Checks an app token presented from `ip`: known, usable, and allowed from there.
async fn authenticate(
    state: &AppState,
    ip: IpAddr,
    presented: Option<&str>,
) -> Result<AppCaller, ApiError> {
    {
        let Some(bearer) = presented.filter(|b| looks_like_app_token(b)) else {
            return Err(ApiError::Unauthorized);
        };
        let hash = hash_token(bearer);
        let token = state
            .db
            .read(move |c| tokens::find_by_hash(c, &hash))
            .await?
            .filter(usable)
            .ok_or(ApiError::Unauthorized)?;
        tracing::Span::current().record("token_id", token.id.as_str());
        if !token.policy.ip_cidrs.is_empty() {
            let nets = AllowList(
                token
                    .policy
                    .ip_cidrs
                    .iter()
                    .filter_map(|c| c.parse().ok())
                    .collect(),
            );
            if !nets.contains(ip) {
                return Err(ApiError::Forbidden(
                    "this token may not be used from your address".into(),
                ));
            }
        }
        state.last_used.note(&token.id);
        Ok(AppCaller { token, ip })
    }
}

/// Neither revoked nor past its `expires_at`: a token that authenticates.
fn usable(t: &TokenRecord) -> bool {
    t.revoked_at.is_none() && !t.policy.expired(now_ms())
}

/// The operator, holding `ADMIN_BOOTSTRAP_TOKEN` (or signed in to the console with it).
#[derive(Debug, Clone, Copy)]
pub struct AdminCaller;

/// SHA-256 of the admin bearer, so comparison is constant-time and length-independent.
pub fn admin_digest(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

impl FromRequestParts<Arc<AppState>> for AdminCaller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, ApiError> {
        let Some(expected) = state.admin_digest else {
            return Err(ApiError::Forbidden(
                "the admin API is disabled (ADMIN_BOOTSTRAP_TOKEN is not set)".into(),
            ));
        };
        let Some(given) = bearer(parts) else {
            // No bearer: the operator console's session cookie (with its CSRF token for
            // a state change) stands in for it.
            crate::http::console_auth::admin_by_cookie(parts)?;
            tracing::Span::current().record("token_id", "admin");
            return Ok(AdminCaller);
        };
        if bool::from(admin_digest(given).ct_eq(&expected)) {
            tracing::Span::current().record("token_id", "admin");
            return Ok(AdminCaller);
        }
        // A working app token is authenticated, just not allowed here.
        if looks_like_app_token(given) {
            let hash = hash_token(given);
            let found = state
                .db
                .read(move |c| tokens::find_by_hash(c, &hash))
                .await?;
            if found.is_some_and(|t| usable(&t)) {
                return Err(ApiError::Forbidden(
                    "app tokens may not use the admin API".into(),
                ));
            }
        }
        Err(ApiError::Unauthorized)
    }
}

/// `Json<T>` whose rejections are envelopes: 400 for syntax, types, unknown fields and a
/// missing content type; 413 for a body over the limit.
pub struct ApiJson<T>(pub T);

impl<T, S> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(ApiJson(v)),
            Err(rejection) => Err(json_rejection(rejection)),
        }
    }
}

fn json_rejection(r: JsonRejection) -> ApiError {
    if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
        return ApiError::TooLarge("request body too large".into());
    }
    match r {
        JsonRejection::JsonDataError(e) => ApiError::BadRequest(format!(
            "invalid request body: {}",
            e.body_text()
                .trim_start_matches("Failed to deserialize the JSON body into the target type: ")
        )),
        JsonRejection::JsonSyntaxError(_) => {
            ApiError::bad_request("malformed JSON in request body")
        }
        JsonRejection::MissingJsonContentType(_) => {
            ApiError::bad_request("expected a JSON body with Content-Type: application/json")
        }
        other => ApiError::BadRequest(other.body_text()),
    }
}

/// `Query<T>` with envelope rejections.
pub struct ApiQuery<T>(pub T);

impl<T, S> FromRequestParts<S> for ApiQuery<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|q| ApiQuery(q.0))
            .map_err(|e: QueryRejection| {
                ApiError::BadRequest(format!("invalid query: {}", e.body_text()))
            })
    }
}

/// `Path<T>` with envelope rejections.
pub struct ApiPath<T>(pub T);

impl<T, S> FromRequestParts<S> for ApiPath<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|p| ApiPath(p.0))
            .map_err(|e: PathRejection| {
                ApiError::BadRequest(format!("invalid path: {}", e.body_text()))
            })
    }
}
