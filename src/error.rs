//! The HTTP boundary's one error type: every failure a client can see, each with its status
//! and stable `code`, rendered as the API's envelope `{"ok":false,"error","code"}`. 5xx
//! answers carry a generic sentence; their cause is logged, never sent.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;

use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("missing, malformed, unknown or revoked bearer token")]
    Unauthorized,
    #[error("{0}")]
    BudgetExhausted(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("a turn is already running in this session")]
    Busy,
    #[error("the session is closed")]
    SessionClosed,
    /// The first request with this `Idempotency-Key` has not answered yet.
    #[error("a request with this Idempotency-Key is still running; repeat it once that one has answered")]
    IdempotencyBusy,
    /// This `Idempotency-Key` came with a different request.
    #[error("this Idempotency-Key was used with a different request (route or body); use a new key for a new request")]
    IdempotencyMismatch,
    #[error("{0}")]
    TooLarge(String),
    #[error("the server is busy; try again later")]
    Overloaded { retry_after_secs: u64 },
    /// The token's own `max_concurrent` is reached (the server may have room).
    #[error("this token already has {limit} runs or turns in flight; try again when one ends")]
    TokenOverloaded { limit: u32 },
    /// The token's own `max_open_sessions` is reached.
    #[error("this token already has {limit} open sessions; close one first")]
    TooManySessions { limit: u32 },
    #[error("this token's rate limit is reached; try again later")]
    RateLimited { retry_after_secs: u64 },
    #[error("{message}")]
    UsageLimit {
        message: String,
        retry_after_secs: u64,
    },
    #[error("{0}")]
    Upstream(String),
    /// The CLI is not logged in (its own message); answered like any upstream failure,
    /// and a sign that processes started under the old login are no good either.
    #[error("{0}")]
    NotLoggedIn(String),
    #[error("the agent printed more than the output limit and was stopped")]
    OutputTooLarge,
    #[error("the request passed its timeout_secs and was stopped")]
    Timeout,
    /// The request body delivered nothing for `CLAWDFORGE_BODY_TIMEOUT_SECS`.
    #[error("the request body stalled for longer than the server waits (CLAWDFORGE_BODY_TIMEOUT_SECS); nothing was kept")]
    BodyTimeout,
    #[error("the server is out of disk space")]
    InsufficientStorage,
    /// The work was stopped before it could answer (server shutting down).
    #[error("{0}")]
    Unavailable(String),
    /// Something went wrong inside the server. The cause is logged, never answered.
    #[error("internal error: {0}")]
    Internal(String),
}

/// Every `code` an error answer can carry (see `ApiError::code`).
#[derive(Debug, Clone, Copy, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadRequest,
    Unauthorized,
    BudgetExhausted,
    Forbidden,
    NotFound,
    MethodNotAllowed,
    Busy,
    SessionClosed,
    IdempotencyMismatch,
    TooLarge,
    Overloaded,
    RateLimited,
    UsageLimit,
    UpstreamError,
    OutputTooLarge,
    Timeout,
    InsufficientStorage,
    Unavailable,
    InternalError,
}

/// The error envelope, as sent.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// Always `false`.
    pub ok: bool,
    /// A sentence for people; never internal details.
    pub error: String,
    /// What clients switch on.
    #[schema(value_type = ErrorCode)]
    pub code: &'static str,
}

impl ApiError {
    pub fn internal(cause: impl std::fmt::Display) -> ApiError {
        ApiError::Internal(cause.to_string())
    }

    pub fn bad_request(msg: impl Into<String>) -> ApiError {
        ApiError::BadRequest(msg.into())
    }

    pub fn not_found(what: &str) -> ApiError {
        ApiError::NotFound(format!("no such {what}"))
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::BudgetExhausted(_) => StatusCode::PAYMENT_REQUIRED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Busy | ApiError::SessionClosed | ApiError::IdempotencyBusy => {
                StatusCode::CONFLICT
            }
            ApiError::IdempotencyMismatch => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Overloaded { .. }
            | ApiError::TokenOverloaded { .. }
            | ApiError::TooManySessions { .. }
            | ApiError::RateLimited { .. }
            | ApiError::UsageLimit { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Upstream(_) | ApiError::NotLoggedIn(_) | ApiError::OutputTooLarge => {
                StatusCode::BAD_GATEWAY
            }
            ApiError::Timeout => StatusCode::GATEWAY_TIMEOUT,
            ApiError::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            ApiError::InsufficientStorage => StatusCode::INSUFFICIENT_STORAGE,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The stable code clients switch on.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::BadRequest(_) => "bad_request",
            ApiError::Unauthorized => "unauthorized",
            ApiError::BudgetExhausted(_) => "budget_exhausted",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::NotFound(_) => "not_found",
            ApiError::MethodNotAllowed => "method_not_allowed",
            ApiError::Busy | ApiError::IdempotencyBusy => "busy",
            ApiError::IdempotencyMismatch => "idempotency_mismatch",
            ApiError::SessionClosed => "session_closed",
            ApiError::TooLarge(_) => "too_large",
            ApiError::Overloaded { .. }
            | ApiError::TokenOverloaded { .. }
            | ApiError::TooManySessions { .. } => "overloaded",
            ApiError::RateLimited { .. } => "rate_limited",
            ApiError::UsageLimit { .. } => "usage_limit",
            ApiError::Upstream(_) | ApiError::NotLoggedIn(_) => "upstream_error",
            ApiError::OutputTooLarge => "output_too_large",
            ApiError::Timeout | ApiError::BodyTimeout => "timeout",
            ApiError::InsufficientStorage => "insufficient_storage",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::Internal(_) => "internal_error",
        }
    }

    /// Seconds for `Retry-After`, when the answer carries one.
    pub fn retry_after(&self) -> Option<u64> {
        match self {
            ApiError::Overloaded { retry_after_secs }
            | ApiError::RateLimited { retry_after_secs }
            | ApiError::UsageLimit {
                retry_after_secs, ..
            } => Some((*retry_after_secs).max(1)),
            // Nothing says when one of the token's runs will end; a second is a fair poll.
            ApiError::TokenOverloaded { .. } | ApiError::IdempotencyBusy => Some(1),
            // Sessions end when their owner closes them or they idle out; a minute is a
            // fair poll.
            ApiError::TooManySessions { .. } => Some(60),
            _ => None,
        }
    }

    /// The sentence sent to the client: the variant's own for 4xx and upstream errors
    /// (which quote the CLI, never the server), a generic one for internal failures.
    pub fn public_message(&self) -> String {
        match self {
            ApiError::Internal(_) => "internal server error".to_string(),
            other => other.to_string(),
        }
    }

    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            ok: false,
            error: self.public_message(),
            code: self.code(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let ApiError::Internal(cause) = &self {
            tracing::error!(%cause, "internal error");
        }
        let mut res = (self.status(), Json(self.body())).into_response();
        if let Some(secs) = self.retry_after() {
            res.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if matches!(self, ApiError::Unauthorized) {
            res.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        res
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        if let StoreError::Sqlite(rusqlite::Error::SqliteFailure(f, _)) = &e {
            if f.code == rusqlite::ErrorCode::DiskFull {
                return ApiError::InsufficientStorage;
            }
        }
        ApiError::internal(e)
    }
}

impl From<std::io::Error> for ApiError {
    fn from(e: std::io::Error) -> Self {
        if e.raw_os_error() == Some(nix::libc::ENOSPC) {
            return ApiError::InsufficientStorage;
        }
        ApiError::internal(e)
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
