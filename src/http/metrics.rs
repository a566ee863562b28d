//! `GET /metrics` (Prometheus, admin bearer unless `CLAWDFORGE_METRICS_OPEN=true`) and the
//! middleware that counts every answer by route template.

use std::sync::Arc;

use axum::extract::{FromRequestParts, MatchedPath, Request, State};
use axum::http::header::{ACCEPT, CONTENT_TYPE};
use axum::http::request::Parts;
use axum::http::HeaderMap;
use axum::http::Method;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::app::AppState;
use crate::error::{ApiError, ApiResult};
use crate::governance::usage;
use crate::http::extract::AdminCaller;

/// Whoever may scrape: anyone (past the IP allowlist) with `CLAWDFORGE_METRICS_OPEN=true`,
/// else the admin bearer (an app token gets 403, a wrong or missing bearer 401).
pub struct Scraper;

impl FromRequestParts<Arc<AppState>> for Scraper {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, ApiError> {
        if state.config.settings.metrics_open {
            return Ok(Scraper);
        }
        AdminCaller::from_request_parts(parts, state)
            .await
            .map(|_| Scraper)
    }
}

/// OpenMetrics when `Accept` names it (as Prometheus and the official client libraries
/// send it), the classic text format otherwise.
pub async fn metrics(
    _: Scraper,
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let per_token = state.db.read(usage::per_token).await?;
    let text = state
        .metrics
        .render(per_token)
        .map_err(ApiError::internal)?;
    let openmetrics = headers
        .get_all(ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"));
    Ok(if openmetrics {
        ([(CONTENT_TYPE, crate::metrics::OPENMETRICS)], text).into_response()
    } else {
        (
            [(CONTENT_TYPE, crate::metrics::PROMETHEUS_TEXT)],
            crate::metrics::to_prometheus_text(&text),
        )
            .into_response()
    })
}

/// The route template a request matched, carried on its response to [`count`], which runs
/// outside routing and so cannot see `MatchedPath` itself.
#[derive(Clone)]
struct RouteTemplate(String);

/// A route layer: notes the matched template (`/admin/tokens/{id}`) on the response.
pub async fn tag_route(req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| RouteTemplate(m.as_str().to_string()));
    let mut res = next.run(req).await;
    if let Some(route) = route {
        res.extensions_mut().insert(route);
    }
    res
}

/// Counts every answer by route template, method and status. Unmatched paths (404s, and
/// requests the allowlist refused before routing) share the label `unmatched`, and unusual
/// methods `other`, so clients cannot grow the label set.
pub async fn count(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let method = match *req.method() {
        Method::GET
        | Method::POST
        | Method::PUT
        | Method::PATCH
        | Method::DELETE
        | Method::HEAD
        | Method::OPTIONS => req.method().as_str().to_string(),
        _ => "other".to_string(),
    };
    let res = next.run(req).await;
    let route = res
        .extensions()
        .get::<RouteTemplate>()
        .map_or("unmatched", |r| r.0.as_str());
    state
        .metrics
        .http_request(route, &method, res.status().as_u16());
    res
}
