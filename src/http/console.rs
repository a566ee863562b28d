//! The operator console at `/`: its page, script and style sheet (files under `console/`,
//! embedded in the binary, so the appliance serves them offline and nothing is fetched from
//! another host), and its sign-in, session and sign-out routes.
//!
//! The page is plain HTML, CSS and JavaScript with no build step; the script reads the same
//! JSON routes the API documents. Every console answer carries a Content-Security-Policy
//! that allows only the appliance's own script and style (no inline script), and
//! `X-Frame-Options: DENY`.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Router};
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

use crate::app::AppState;
use crate::auth::hash_token;
use crate::auth::tokens::{self, looks_like_app_token};
use crate::error::{ApiError, ApiResult};
use crate::http::console_auth::{self, ConsoleSessions};
use crate::http::extract::{admin_digest, ApiJson, ClientIp};
use crate::http::ok;

const INDEX_HTML: &str = include_str!("../../console/index.html");
const APP_JS: &str = include_str!("../../console/app.js");
const APP_CSS: &str = include_str!("../../console/app.css");

/// Only the appliance's own files; `data:` images for nothing but the page's icon.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

/// The console's routes, mounted by `http::router` when `CLAWDFORGE_CONSOLE` is on.
pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/", get(index))
        .route("/console/app.js", get(script))
        .route("/console/app.css", get(style))
        .route("/console/sign-in", post(sign_in))
        .route("/console/session", get(session))
        .route("/console/sign-out", post(sign_out))
}

/// The headers every console answer carries.
fn harden(mut res: Response) -> Response {
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    res
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    harden(([(header::CONTENT_TYPE, content_type)], body).into_response())
}

async fn index() -> Response {
    asset("text/html; charset=utf-8", INDEX_HTML)
}

async fn script() -> Response {
    asset("text/javascript; charset=utf-8", APP_JS)
}

async fn style() -> Response {
    asset("text/css; charset=utf-8", APP_CSS)
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SignInBody {
    /// `ADMIN_BOOTSTRAP_TOKEN`.
    pub token: String,
}

/// A console session as its script sees it: the CSRF token to send as `X-CSRF-Token` on
/// every state change, and when the session ends.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ConsoleSession {
    pub csrf_token: String,
    #[serde(serialize_with = "crate::util::ser_rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub expires_at: i64,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct SignedOut {
    pub signed_out: bool,
}

/// Whether the browser reached us over TLS: only a trusted proxy's `X-Forwarded-Proto`
/// is believed (the appliance itself speaks plain HTTP).
fn over_tls(state: &AppState, peer: SocketAddr, headers: &HeaderMap) -> bool {
    state.trusted_proxies.contains(peer.ip())
        && headers
            .get("x-forwarded-proto")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("https"))
}

/// `POST /console/sign-in` `{"token": ADMIN_BOOTSTRAP_TOKEN}`: a session cookie and its
/// CSRF token. Five failures from one address within a minute: 429 for a minute.
async fn sign_in(
    State(state): State<Arc<AppState>>,
    Extension(sessions): Extension<ConsoleSessions>,
    Extension(ClientIp(ip)): Extension<ClientIp>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<SignInBody>,
) -> ApiResult<Response> {
    let Some(expected) = state.admin_digest else {
        return Err(ApiError::Forbidden(
            "the admin API is disabled (ADMIN_BOOTSTRAP_TOKEN is not set)".into(),
        ));
    };
    if let Some(retry_after_secs) = sessions.blocked(ip) {
        return Err(ApiError::RateLimited { retry_after_secs });
    }
    let given = body.token.trim();
    if !bool::from(admin_digest(given).ct_eq(&expected)) {
        sessions.note_failure(ip);
        if looks_like_app_token(given) {
            let hash = hash_token(given);
            if state
                .db
                .read(move |c| tokens::find_by_hash(c, &hash))
                .await?
                .is_some()
            {
                return Err(ApiError::Forbidden(
                    "app tokens cannot sign in to the console; use the admin token".into(),
                ));
            }
        }
        return Err(ApiError::Unauthorized);
    }
    let new = sessions.create();
    let secure = over_tls(&state, peer, &headers);
    tracing::info!("console sign-in");
    let mut res = ok(ConsoleSession {
        csrf_token: new.csrf,
        expires_at: new.expires_at_ms,
    })
    .into_response();
    res.headers_mut().insert(
        header::SET_COOKIE,
        console_auth::set_cookie(&new.id, secure),
    );
    Ok(harden(res))
}

/// `GET /console/session`: whether the cookie names a live session, and its CSRF token.
async fn session(
    Extension(sessions): Extension<ConsoleSessions>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let info = console_auth::session_cookie(&headers)
        .and_then(|id| sessions.get(id))
        .ok_or(ApiError::Unauthorized)?;
    Ok(harden(
        ok(ConsoleSession {
            csrf_token: info.csrf,
            expires_at: info.expires_at_ms,
        })
        .into_response(),
    ))
}

/// `POST /console/sign-out` (with the CSRF token): ends the session and clears the cookie.
async fn sign_out(
    State(state): State<Arc<AppState>>,
    Extension(sessions): Extension<ConsoleSessions>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let id = console_auth::session_cookie(&headers).ok_or(ApiError::Unauthorized)?;
    let info = sessions.get(id).ok_or(ApiError::Unauthorized)?;
    console_auth::check_csrf(&headers, &info)?;
    sessions.remove(id);
    let secure = over_tls(&state, peer, &headers);
    let mut res = (StatusCode::OK, ok(SignedOut { signed_out: true })).into_response();
    res.headers_mut()
        .insert(header::SET_COOKIE, console_auth::clear_cookie(secure));
    Ok(harden(res))
}
