//! Request fields shared by runs and turns, parsed once at the edge: past here nothing
//! re-checks them.

use std::time::Duration;

use crate::app::AppState;
use crate::auth::tokens::TokenRecord;
use crate::error::{ApiError, ApiResult};
use crate::governance::policy::{valid_model, MODEL_RULE};
use crate::runner::invocation::{Image, Tools};

/// Default `timeout_secs` of a run or turn.
pub const DEFAULT_TIMEOUT_SECS: u64 = 120;
/// A system prompt travels in argv, where Linux caps one string at 128 KiB.
const SYSTEM_MAX_BYTES: usize = 100_000;

/// Non-empty, at most `CLAWDFORGE_MAX_PROMPT_BYTES` bytes (exactly at the limit is fine).
pub fn prompt(state: &AppState, prompt: String) -> ApiResult<String> {
    if prompt.trim().is_empty() {
        return Err(ApiError::bad_request("prompt must not be empty"));
    }
    let max = state.config.settings.max_prompt_bytes;
    if prompt.len() > max {
        return Err(ApiError::TooLarge(format!(
            "prompt is {} bytes; the limit is {max}",
            prompt.len()
        )));
    }
    Ok(prompt)
}

/// A model name or alias as the CLI takes it (`sonnet`, `claude-sonnet-4-5-20250929`,
/// `us.anthropic.claude...:0`); when absent, the token's `default_model`, else the server's.
/// Whether the token may use it is `governance::admit`'s question.
pub fn model(state: &AppState, token: &TokenRecord, model: Option<String>) -> ApiResult<String> {
    let Some(model) = model else {
        return Ok(token
            .policy
            .default_model
            .clone()
            .unwrap_or_else(|| state.config.settings.default_model.clone()));
    };
    if !valid_model(&model) {
        return Err(ApiError::bad_request(MODEL_RULE));
    }
    Ok(model)
}

pub fn system(system: Option<String>) -> ApiResult<Option<String>> {
    match system {
        Some(s) if s.len() > SYSTEM_MAX_BYTES => Err(ApiError::TooLarge(format!(
            "system is {} bytes; the limit is {SYSTEM_MAX_BYTES}",
            s.len()
        ))),
        Some(s) if s.contains('\0') => Err(ApiError::bad_request("system must not contain NUL")),
        Some(s) if s.trim().is_empty() => Ok(None),
        other => Ok(other),
    }
}

/// 1..=`CLAWDFORGE_MAX_TIMEOUT_SECS`, default 120 (capped by the maximum).
pub fn timeout(state: &AppState, secs: Option<u64>) -> ApiResult<Duration> {
    let max = state.config.settings.max_timeout_secs;
    match secs {
        None => Ok(Duration::from_secs(DEFAULT_TIMEOUT_SECS.min(max))),
        Some(s) if (1..=max).contains(&s) => Ok(Duration::from_secs(s)),
        Some(_) => Err(ApiError::BadRequest(format!(
            "timeout_secs must be 1..{max}"
        ))),
    }
}

/// File tokens to attach: at most 100, each shaped like one.
pub fn files(files: Option<Vec<String>>) -> ApiResult<Vec<String>> {
    let files = files.unwrap_or_default();
    if files.len() > 100 {
        return Err(ApiError::bad_request("at most 100 files may be attached"));
    }
    for f in &files {
        if !f.starts_with("ff_")
            || f.len() > 64
            || !f.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        {
            return Err(ApiError::NotFound(format!(
                "no such file: {}",
                f.chars().take(64).collect::<String>()
            )));
        }
    }
    Ok(files)
}

/// Whether the client asked for SSE, by body flag or `Accept`.
pub fn wants_stream(flag: Option<bool>, headers: &axum::http::HeaderMap) -> bool {
    flag.unwrap_or_else(|| {
        headers
            .get_all(axum::http::header::ACCEPT)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| v.contains("text/event-stream"))
    })
}

/// A session list's `status` filter: `open` or `closed`; absent or empty (a cleared form
/// field) means both.
pub fn session_status(status: Option<String>) -> ApiResult<Option<String>> {
    match status.as_deref() {
        None | Some("") => Ok(None),
        Some("open" | "closed") => Ok(status),
        Some(_) => Err(ApiError::bad_request("status must be open or closed")),
    }
}

/// The tools a run gets: those asked for, else the token's `allowed_tools`, else the
/// built-in set; asking for more than the token allows is 403.
pub fn tools(token: &TokenRecord, asked: Option<Tools>) -> ApiResult<Tools> {
    let allowed = token.policy.allowed_tools.clone();
    let Some(asked) = asked.map(Tools::normalised) else {
        return Ok(allowed.unwrap_or(Tools::DEFAULT));
    };
    match &allowed {
        Some(allowed) if !asked.within(allowed) => Err(ApiError::Forbidden(
            "this token may not use the tools asked for (see its allowed_tools)".into(),
        )),
        _ => Ok(asked),
    }
}

/// A JSON Schema is an object; it travels in argv, and it counts toward the prompt limit
/// together with the prompt's `prompt_bytes`.
pub fn json_schema(
    state: &AppState,
    schema: Option<serde_json::Value>,
    prompt_bytes: usize,
) -> ApiResult<Option<serde_json::Value>> {
    let Some(schema) = schema else {
        return Ok(None);
    };
    if !schema.is_object() {
        return Err(ApiError::bad_request("json_schema must be a JSON object"));
    }
    let len = schema.to_string().len();
    if len > SYSTEM_MAX_BYTES {
        return Err(ApiError::TooLarge(format!(
            "json_schema is {len} bytes; the limit is {SYSTEM_MAX_BYTES}"
        )));
    }
    let max = state.config.settings.max_prompt_bytes;
    if len + prompt_bytes > max {
        return Err(ApiError::TooLarge(format!(
            "prompt and json_schema are {} bytes together; the limit is {max}",
            len + prompt_bytes
        )));
    }
    Ok(Some(schema))
}

/// Images as (media type, base64) pairs: at most 8, each checked by [`Image::parse`].
pub fn images<'a>(
    images: impl ExactSizeIterator<Item = (&'a str, &'a str)>,
) -> ApiResult<Vec<Image>> {
    Image::check_count(images.len())?;
    images.map(|(t, d)| Image::parse(t, d)).collect()
}
