//! HTTP: the router (every route and layer in one place), the allowlist middleware, request
//! ids and request logging, and the envelope for answers axum would otherwise give itself.

pub mod admin;
pub mod conn;
pub mod console;
pub mod console_auth;
pub mod extract;
pub mod files;
pub mod health;
pub mod idempotency;
pub mod metrics;
pub mod openapi;
pub mod operator;
pub mod params;
pub mod runs;
pub mod serve;
pub mod sessions;
pub mod usage;
pub mod v1;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, DefaultBodyLimit, Request, State};
use axum::http::{HeaderName, HeaderValue, Response};
use axum::middleware::{self, Next};
use axum::response::IntoResponse;
use axum::routing::{delete, get, post};
use axum::Router;
use serde::Serialize;
use tower_http::request_id::{
    MakeRequestId, PropagateRequestIdLayer, RequestId, SetRequestIdLayer,
};
use tower_http::trace::TraceLayer;
use tracing::Span;

use crate::app::AppState;
use crate::auth::{client_ip, ip_allowed};
use crate::error::ApiError;
use extract::ClientIp;

/// Success bodies: `{"ok": true, ...fields of T}`.
#[derive(Debug, Serialize)]
pub struct Envelope<T: Serialize> {
    pub ok: bool,
    #[serde(flatten)]
    pub body: T,
}

pub fn ok<T: Serialize>(body: T) -> axum::Json<Envelope<T>> {
    axum::Json(Envelope { ok: true, body })
}

static REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Request ids: random, short, and echoed back in `x-request-id`.
#[derive(Clone, Default)]
struct MakeId;

impl MakeRequestId for MakeId {
    fn make_request_id<B>(&mut self, _: &axum::http::Request<B>) -> Option<RequestId> {
        HeaderValue::from_str(&crate::util::new_id("req_"))
            .ok()
            .map(RequestId::new)
    }
}

/// The router with every route and layer.
pub fn router(state: Arc<AppState>) -> Router {
    let json_limit = state.json_body_limit();
    let image_limit = json_limit.saturating_add(crate::runner::invocation::IMAGES_BODY_ALLOWANCE);
    let trace = TraceLayer::new_for_http()
        .make_span_with(|req: &axum::http::Request<_>| {
            let id = req
                .headers()
                .get(&REQUEST_ID)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-");
            // Only the path: query strings are the client's business, and the bearer is
            // never part of the span.
            tracing::info_span!("request", id, method = %req.method(), path = %req.uri().path(),
                                token_id = tracing::field::Empty)
        })
        .on_request(())
        .on_response(|res: &Response<_>, latency: Duration, _span: &Span| {
            tracing::info!(
                status = res.status().as_u16(),
                latency_ms = latency.as_millis() as u64,
                "answered"
            );
        })
        .on_failure(());

    let console_sessions = console_auth::ConsoleSessions::default();
    let console = if state.config.settings.console {
        console::routes()
    } else {
        Router::new()
    };
    Router::new()
        .route("/healthz", get(health::healthz))
        .route("/admin/tokens", post(admin::mint).get(admin::list))
        .route(
            "/admin/tokens/{id}",
            delete(admin::revoke).patch(admin::patch),
        )
        .route("/admin/tokens/{id}/rotate", post(admin::rotate))
        .route("/admin/audit", get(admin::audit))
        .route("/admin/usage", get(admin::usage))
        .route("/admin/status", get(operator::status))
        .route("/admin/sessions", get(operator::sessions))
        .route("/admin/sessions/{id}", delete(operator::close_session))
        .merge(app_routes(&state, image_limit))
        .route("/metrics", get(metrics::metrics))
        .route("/openapi.json", get(openapi::openapi_json))
        .merge(console)
        .route_layer(middleware::from_fn(metrics::tag_route))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(json_limit))
        .layer(axum::Extension(console_sessions))
        .layer(middleware::from_fn_with_state(state.clone(), allowlist))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            metrics::count,
        ))
        .layer(PropagateRequestIdLayer::new(REQUEST_ID.clone()))
        .layer(trace)
        .layer(SetRequestIdLayer::new(REQUEST_ID.clone(), MakeId))
        .with_state(state)
}

/// The routes apps call with their tokens: the only ones browser pages from
/// `CLAWDFORGE_CORS_ORIGINS` may reach (preflights answered, credentials never allowed).
/// The four that start agent work take `Idempotency-Key` (one layer, inside each route's
/// body limit, which it reads the body under).
fn app_routes(state: &Arc<AppState>, image_limit: usize) -> Router<Arc<AppState>> {
    use idempotency::{idempotent, Wire};
    let keyed = |wire: Wire| middleware::from_fn_with_state((state.clone(), wire), idempotent);
    let openai = Wire::Sdk(v1::Flavor::OpenAi);
    let anthropic = Wire::Sdk(v1::Flavor::Anthropic);
    let routes = Router::new()
        // Routes taking images: the JSON limit grows by what 8 images at their limit need.
        .route(
            "/run",
            post(runs::run)
                .layer::<_, Infallible>(keyed(Wire::Envelope))
                .layer(DefaultBodyLimit::max(image_limit)),
        )
        .route("/runs/{run_id}/cancel", post(runs::cancel))
        .route(
            "/v1/chat/completions",
            post(v1::chat_completions)
                .layer::<_, Infallible>(keyed(openai))
                .layer(DefaultBodyLimit::max(image_limit)),
        )
        .route(
            "/v1/messages",
            post(v1::messages)
                .layer::<_, Infallible>(keyed(anthropic))
                .layer(DefaultBodyLimit::max(image_limit)),
        )
        .route("/v1/models", get(v1::list_models))
        .route("/v1/models/{id}", get(v1::get_model))
        .route("/sessions", get(sessions::list).post(sessions::create))
        .route("/sessions/{id}", get(sessions::get).delete(sessions::close))
        .route(
            "/sessions/{id}/turn",
            post(sessions::turn).layer(keyed(Wire::Envelope)),
        )
        .route("/sessions/{id}/cancel", post(sessions::cancel))
        // Uploads are streamed to disk and count their own bytes against
        // CLAWDFORGE_MAX_UPLOAD_BYTES; the JSON body limit does not apply to them.
        .route(
            "/files",
            post(files::upload).layer(DefaultBodyLimit::disable()),
        )
        .route(
            "/files/{file_token}",
            get(files::show).delete(files::delete),
        )
        .route("/usage", get(usage::usage));
    let cors_origins = &state.config.settings.cors_origins;
    if cors_origins.is_empty() {
        return routes;
    }
    // The 405 fallback is set before the layer, so a preflight (OPTIONS, which no route
    // serves) reaches the CORS layer rather than the router's plain 405.
    routes
        .method_not_allowed_fallback(method_not_allowed)
        .layer(cors(cors_origins))
}

/// tower-http's CORS layer for the listed origins. Bearer tokens travel in headers the
/// page sets itself, so credentials (cookies) are never allowed.
fn cors(origins: &[String]) -> tower_http::cors::CorsLayer {
    use axum::http::{header, Method};
    let origins: Vec<HeaderValue> = origins
        .iter()
        .filter_map(|o| HeaderValue::from_str(o).ok())
        .collect();
    tower_http::cors::CorsLayer::new()
        .allow_origin(origins)
        .allow_methods([Method::GET, Method::POST, Method::DELETE])
        .allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            header::ACCEPT,
            HeaderName::from_static("idempotency-key"),
            HeaderName::from_static("x-api-key"),
            HeaderName::from_static("anthropic-version"),
        ])
        .expose_headers([
            REQUEST_ID.clone(),
            header::RETRY_AFTER,
            HeaderName::from_static(idempotency::REPLAYED_HEADER),
        ])
        .allow_credentials(false)
        .max_age(Duration::from_secs(600))
}

async fn not_found() -> ApiError {
    ApiError::NotFound("no such route".into())
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

/// Works out the client address and refuses anyone outside the global allowlist, before
/// any route (or 404) is considered.
async fn allowlist(
    State(state): State<Arc<AppState>>,
    mut req: Request,
    next: Next,
) -> axum::response::Response {
    let Some(ConnectInfo(peer)) = req.extensions().get::<ConnectInfo<SocketAddr>>().copied() else {
        // Without a peer address nothing can be checked: refuse rather than guess.
        return ApiError::Forbidden("client address unknown".into()).into_response();
    };
    let ip = match client_ip(peer.ip(), req.headers(), &state.trusted_proxies) {
        Ok(ip) => ip,
        Err(e) => {
            tracing::warn!(proxy = %peer.ip(), error = %e, "refused: unreadable X-Forwarded-For from a trusted proxy");
            return ApiError::Forbidden(
                "the forwarded client address cannot be read; refusing rather than guessing".into(),
            )
            .into_response();
        }
    };
    if !ip_allowed(ip, &state.allow_cidrs) {
        return ApiError::Forbidden("your address is not allowed to use this server".into())
            .into_response();
    }
    req.extensions_mut().insert(ClientIp(ip));
    next.run(req).await
}
