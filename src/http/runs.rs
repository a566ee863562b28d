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
use crate::runner::{self, RunInput};
use crate::supervise::{self, Sink, SINK_CAPACITY, STALL_GRACE};

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RunBody {
    pub prompt: String,
    pub model: Option<String>,
    pub system: Option<String>,
    pub files: Option<Vec<String>>,
    pub timeout_secs: Option<u64>,
    pub stream: Option<bool>,
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
    let input = RunInput {
        prompt: params::prompt(&state, body.prompt)?,
        model: params::model(&state, &caller.token, body.model)?,
        system: params::system(body.system)?,
        files: params::files(body.files)?,
        timeout: params::timeout(&state, body.timeout_secs)?,
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
        let (sink, mut lines) = Sink::channel();
        let work = tokio::spawn(work(sink));
        loop {
            tokio::select! {
                v = lines.recv() => match v {
                    Some(v) => {
                        let sent = tokio::time::timeout(STALL_GRACE, out_tx.send(sse(event, &v)));
                        if !matches!(sent.await, Ok(Ok(()))) {
                            break;
                        }
                    }
                    None => break,
                },
                _ = out_tx.closed() => break,
            }
        }
        // Dropping the receiver closes the sink the work holds.
        drop(lines);
        let last = match work.await {
            Ok(Ok(answer)) => sse(
                "result",
                &serde_json::to_value(ok(answer).0).unwrap_or(Value::Null),
            ),
            Ok(Err(e)) => sse(
                "error",
                &serde_json::to_value(e.body()).unwrap_or(Value::Null),
            ),
            Err(e) => sse(
                "error",
                &serde_json::to_value(ApiError::internal(format!("work task failed: {e}")).body())
                    .unwrap_or(Value::Null),
            ),
        };
        let _ = tokio::time::timeout(STALL_GRACE, out_tx.send(last)).await;
    });
    sse_response(out_rx).into_response()
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
