//! `POST /run`: one-shot prompts, answered as JSON or as an SSE stream.

use std::convert::Infallible;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::Stream;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::app::AppState;
use crate::error::{ApiError, ApiResult};
use crate::http::extract::{ApiJson, ApiPath, AppCaller};
use crate::http::{ok, params};
use crate::runner::invocation::Tools;
use crate::runner::{self, RunInput};
use crate::supervise::{self, Sink, SINK_CAPACITY, STALL_GRACE};

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RunBody {
    pub prompt: String,
    pub model: Option<String>,
    pub system: Option<String>,
    pub files: Option<Vec<String>>,
    /// Seconds, 1..CLAWDFORGE_MAX_TIMEOUT_SECS (the served document states the maximum in
    /// force); default 120.
    #[schema(minimum = 1)]
    pub timeout_secs: Option<u64>,
    pub stream: Option<bool>,
    /// `"none"`, `"default"` or built-in tool names; none named: the token's
    /// `allowed_tools` (else `"default"`).
    pub tools: Option<Tools>,
    /// A JSON Schema object: `result` is then the structured output (an object).
    #[schema(value_type = Option<Object>)]
    pub json_schema: Option<Value>,
    /// At most 8 images, each at most 5 MiB decoded.
    pub images: Option<Vec<ImageBody>>,
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ImageBody {
    /// image/png, image/jpeg, image/gif or image/webp.
    pub media_type: String,
    /// The image's bytes in base64.
    pub data: String,
}

/// The header naming a run's id, so a streaming client can cancel it before its answer
/// ends (`POST /runs/{run_id}/cancel`).
pub const RUN_ID_HEADER: &str = "x-run-id";

pub async fn run(
    caller: AppCaller,
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<RunBody>,
) -> ApiResult<Response> {
    let prompt = params::prompt(&state, body.prompt)?;
    let json_schema = params::json_schema(&state, body.json_schema, prompt.len())?;
    let images = body.images.unwrap_or_default();
    let input = RunInput {
        model: params::model(&state, &caller.token, body.model)?,
        system: params::system(body.system)?,
        files: params::files(body.files)?,
        timeout: params::timeout(&state, body.timeout_secs)?,
        tools: params::tools(&caller.token, body.tools)?,
        images: params::images(
            images
                .iter()
                .map(|i| (i.media_type.as_str(), i.data.as_str())),
        )?,
        json_schema,
        prompt,
        kind: "run",
    };
    let streaming = params::wants_stream(body.stream, &headers);
    let prepared = state.runner.prepare(&caller.token, input).await?;
    let run_id = HeaderValue::from_str(&prepared.run_id).ok();
    let mut res = if streaming {
        stream_answer("claude", move |sink| {
            runner::execute(prepared, Some(sink), CancellationToken::new())
        })
    } else {
        let answer = supervise::detached(move |gone| runner::execute(prepared, None, gone)).await?;
        ok(answer).into_response()
    };
    if let Some(id) = run_id {
        res.headers_mut().insert(RUN_ID_HEADER, id);
    }
    Ok(res)
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct RunCancelled {
    /// Whether the run was still running (it then answers `stop_reason: "cancelled"`).
    pub cancelled: bool,
}

/// `POST /runs/{run_id}/cancel`: answers once the run has ended. Another token's run, or
/// an unknown id, is 404; a run of this token that already ended answers `false`.
pub async fn cancel(
    caller: AppCaller,
    State(state): State<Arc<AppState>>,
    ApiPath(run_id): ApiPath<String>,
) -> ApiResult<impl IntoResponse> {
    let cancelled = state.runner.cancel(&run_id, &caller.token.id).await?;
    Ok(ok(RunCancelled { cancelled }))
}

/// Answers as SSE: one `event: <event>` per JSON line `work` sends into its sink, then
/// `event: result` carrying what the JSON answer would have been, or `event: error` with
/// the error envelope. The work runs on its own task; a client that hangs up, or stops
/// reading for longer than `STALL_GRACE`, ends the forwarding, which closes the sink and
/// tells the work to stop.
pub fn stream_answer<T, F, Fut>(event: &'static str, work: F) -> Response
where
    T: Serialize + Send + 'static,
    F: FnOnce(Sink) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ApiResult<T>> + Send + 'static,
{
    let (out_tx, out_rx) = mpsc::channel::<Event>(SINK_CAPACITY);
    tokio::spawn(async move {
        let result = forward_lines(&out_tx, |v| vec![sse(event, &v)], work).await;
        let last = match result {
            Ok(answer) => sse(
                "result",
                &serde_json::to_value(ok(answer).0).unwrap_or(Value::Null),
            ),
            Err(e) => sse(
                "error",
                &serde_json::to_value(e.body()).unwrap_or(Value::Null),
            ),
        };
        let _ = tokio::time::timeout(STALL_GRACE, out_tx.send(last)).await;
    });
    sse_response(out_rx).into_response()
}

/// Runs `work` on its own task with a sink of JSON lines, sending the events `map` makes
/// of each line (none, one or more) to `out`, and returns the work's result. A client that
/// hangs up, or stops reading for longer than `STALL_GRACE`, ends the forwarding, which
/// closes the sink and tells the work to stop.
pub async fn forward_lines<T, F, Fut>(
    out: &mpsc::Sender<Event>,
    mut map: impl FnMut(Value) -> Vec<Event>,
    work: F,
) -> ApiResult<T>
where
    T: Send + 'static,
    F: FnOnce(Sink) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ApiResult<T>> + Send + 'static,
{
    let (sink, mut lines) = Sink::channel();
    let work = tokio::spawn(work(sink));
    'lines: loop {
        tokio::select! {
            v = lines.recv() => match v {
                Some(v) => for e in map(v) {
                    let sent = tokio::time::timeout(STALL_GRACE, out.send(e));
                    if !matches!(sent.await, Ok(Ok(()))) {
                        break 'lines;
                    }
                },
                None => break,
            },
            _ = out.closed() => break,
        }
    }
    // Dropping the receiver closes the sink the work holds.
    drop(lines);
    match work.await {
        Ok(result) => result,
        Err(e) => Err(ApiError::internal(format!("work task failed: {e}"))),
    }
}

pub fn sse(event: &str, data: &Value) -> Event {
    Event::default().event(event).data(data.to_string())
}

pub fn sse_response(
    rx: mpsc::Receiver<Event>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
    let stream = futures_util::StreamExt::map(stream, Ok::<Event, Infallible>);
    Sse::new(stream).keep_alive(KeepAlive::default())
}
