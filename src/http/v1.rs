//! The drop-in routes for the official SDKs: `POST /v1/chat/completions` (OpenAI),
//! `POST /v1/messages` (Anthropic), `GET /v1/models[/{id}]`. Thin: `compat` maps the wire
//! formats; every request runs through the same `runner::prepare`/`execute` as `/run`
//! (admission, token policy, audit kind `chat`, warm pool, supervision, hang-up).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::Event;
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::app::AppState;
use crate::compat::{
    self, anthropic, openai, Chat, CompatError, CompatResult, Frame, StreamFormat,
};
use crate::error::ApiError;
use crate::http::extract::{sdk_caller, AppCaller};
use crate::http::params;
use crate::http::runs::{forward_lines, sse_response};
use crate::runner::invocation::{text_delta, Tools};
use crate::runner::{self, RunAnswer, RunInput};
use crate::supervise::{self, SINK_CAPACITY, STALL_GRACE};

/// Which API's shapes an answer takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    OpenAi,
    Anthropic,
}

/// An error in the flavor's shape, with `Retry-After` and `WWW-Authenticate` as `/run`'s.
pub fn error_response(flavor: Flavor, e: &CompatError) -> Response {
    if let ApiError::Internal(cause) = &e.error {
        tracing::error!(%cause, "internal error");
    }
    let body = match flavor {
        Flavor::OpenAi => openai::error_body(&e.error, e.param.as_deref()),
        Flavor::Anthropic => anthropic::error_body(&e.error),
    };
    let mut res = (e.error.status(), axum::Json(body)).into_response();
    if let Some(secs) = e.error.retry_after() {
        res.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    if matches!(e.error, ApiError::Unauthorized) {
        res.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    res
}

fn body_of<T: DeserializeOwned>(body: Result<Bytes, BytesRejection>) -> CompatResult<T> {
    let bytes = body.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::TooLarge("request body too large".into())
        } else {
            ApiError::BadRequest(r.body_text())
        }
    })?;
    serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::BadRequest(format!("invalid request body: {e}")).into())
}

pub async fn chat_completions(
    State(state): State<Arc<AppState>>,
    parts: Parts,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let flavor = Flavor::OpenAi;
    let answer = async {
        let caller = sdk_caller(&state, &parts).await?;
        let chat = openai::parse(body_of(body)?)?;
        serve(&state, &caller, chat, flavor).await
    };
    answer.await.unwrap_or_else(|e| error_response(flavor, &e))
}

pub async fn messages(
    State(state): State<Arc<AppState>>,
    parts: Parts,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let flavor = Flavor::Anthropic;
    let answer = async {
        let caller = sdk_caller(&state, &parts).await?;
        let chat = anthropic::parse(body_of(body)?)?;
        serve(&state, &caller, chat, flavor).await
    };
    answer.await.unwrap_or_else(|e| error_response(flavor, &e))
}

/// The run a chat becomes: tools off and Claude Code's system prompt replaced, unless the
/// `clawdforge` extension asks for tools (which the token's `allowed_tools` bounds).
fn run_input(state: &AppState, caller: &AppCaller, chat: &mut Chat) -> CompatResult<RunInput> {
    let model = match chat.model.as_str() {
        "default" => None,
        m => Some(m.to_string()),
    };
    let prompt =
        params::prompt(state, compat::render_prompt(&chat.turns)?).map_err(|e| CompatError {
            error: e,
            param: Some("messages".into()),
        })?;
    let json_schema = params::json_schema(state, chat.json_schema.take(), prompt.len())?;
    let tools = params::tools(
        &caller.token,
        Some(chat.extension.tools.take().unwrap_or(Tools::NONE)),
    )?;
    Ok(RunInput {
        model: params::model(state, &caller.token, model).map_err(|e| CompatError {
            error: e,
            param: Some("model".into()),
        })?,
        system: Some(params::system(Some(std::mem::take(&mut chat.system)))?.unwrap_or_default()),
        files: Vec::new(),
        timeout: params::timeout(state, chat.extension.timeout_secs)?,
        tools,
        json_schema,
        images: std::mem::take(&mut chat.images),
        prompt,
        kind: "chat",
    })
}

async fn serve(
    state: &Arc<AppState>,
    caller: &AppCaller,
    mut chat: Chat,
    flavor: Flavor,
) -> CompatResult<Response> {
    let input = run_input(state, caller, &mut chat)?;
    // The answer names the model as the request did (an SDK may compare them).
    let model = chat.model.clone();
    let prepared = state.runner.prepare(&caller.token, input).await?;
    if !chat.stream {
        // Not spawned: a client hanging up drops this future, and the run's guards stop
        // the process, remove the dir and mark the audit row abandoned.
        let answer = supervise::detached(move |gone| runner::execute(prepared, None, gone)).await?;
        let body = match flavor {
            Flavor::OpenAi => openai::completion(&answer, &model, compat::unix_now()),
            Flavor::Anthropic => anthropic::message(&answer, &model),
        };
        return Ok(axum::Json(body).into_response());
    }
    let format: Box<dyn StreamFormat> = match flavor {
        Flavor::OpenAi => Box::new(openai::Stream::new(&chat, &prepared.run_id, &model)),
        Flavor::Anthropic => Box::new(anthropic::Stream::new(&chat, &prepared.run_id, &model)),
    };
    let (out_tx, out_rx) = mpsc::channel::<Event>(SINK_CAPACITY);
    tokio::spawn(stream(prepared, format, out_tx));
    Ok(sse_response(out_rx).into_response())
}

fn event(f: Frame) -> Event {
    let e = Event::default().data(f.data);
    match f.event {
        Some(name) => e.event(name),
        None => e,
    }
}

/// Feeds the SSE body: the format's opening events, a delta event per token delta the CLI
/// prints, then the ending (or the error). A dropped body closes `out`, which stops the run.
async fn stream(
    prepared: runner::Prepared,
    mut format: Box<dyn StreamFormat>,
    out: mpsc::Sender<Event>,
) {
    for f in format.start() {
        if out.send(event(f)).await.is_err() {
            return;
        }
    }
    let result: Result<RunAnswer, ApiError> = forward_lines(
        &out,
        |line: Value| match text_delta(&line) {
            Some(t) => format.delta(t).into_iter().map(event).collect(),
            None => Vec::new(),
        },
        |sink| runner::execute(prepared, Some(sink), CancellationToken::new()),
    )
    .await;
    let last = match result {
        Ok(answer) => format.finish(&answer),
        Err(e) => format.error(&e),
    };
    for f in last {
        let sent = tokio::time::timeout(STALL_GRACE, out.send(event(f)));
        if !matches!(sent.await, Ok(Ok(()))) {
            return;
        }
    }
}

/// The models a token may use: its `allowed_models`, else `CLAWDFORGE_MODELS`.
fn models_of(state: &AppState, caller: &AppCaller) -> Vec<String> {
    caller
        .token
        .policy
        .allowed_models
        .clone()
        .unwrap_or_else(|| {
            state
                .config
                .settings
                .models
                .iter()
                .map(|m| m.0.clone())
                .collect()
        })
}

fn flavor_of(headers: &HeaderMap) -> Flavor {
    if headers.contains_key("anthropic-version") {
        Flavor::Anthropic
    } else {
        Flavor::OpenAi
    }
}

fn model_entry(flavor: Flavor, id: &str) -> Value {
    match flavor {
        Flavor::OpenAi => {
            json!({"id": id, "object": "model", "created": 0, "owned_by": "anthropic"})
        }
        Flavor::Anthropic => json!({"type": "model", "id": id, "display_name": id,
                                    "created_at": "1970-01-01T00:00:00Z"}),
    }
}

pub async fn list_models(State(state): State<Arc<AppState>>, parts: Parts) -> Response {
    let flavor = flavor_of(&parts.headers);
    let caller = match sdk_caller(&state, &parts).await {
        Ok(c) => c,
        Err(e) => return error_response(flavor, &e.into()),
    };
    let ids = models_of(&state, &caller);
    let data: Vec<Value> = ids.iter().map(|m| model_entry(flavor, m)).collect();
    let body = match flavor {
        Flavor::OpenAi => json!({"object": "list", "data": data}),
        Flavor::Anthropic => json!({"data": data, "has_more": false,
            "first_id": ids.first(), "last_id": ids.last()}),
    };
    axum::Json(body).into_response()
}

pub async fn get_model(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    parts: Parts,
) -> Response {
    let flavor = flavor_of(&parts.headers);
    let found = async {
        let caller = sdk_caller(&state, &parts).await?;
        if !models_of(&state, &caller).contains(&id) {
            return Err(ApiError::NotFound(format!(
                "no such model: {}",
                id.chars().take(128).collect::<String>()
            )));
        }
        Ok(model_entry(flavor, &id))
    };
    match found.await {
        Ok(v) => axum::Json(v).into_response(),
        Err(e) => error_response(flavor, &e.into()),
    }
}
