//! `POST /run`: one-shot prompts, answered as JSON or as an SSE stream.

use std::convert::Infallible;
use std::sync::Arc;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::Stream;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::app::AppState;
use crate::error::ApiResult;
use crate::http::extract::{ApiJson, AppCaller};
use crate::http::{ok, params};
use crate::runner::{self, RunInput};

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
}

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
    let prepared = runner::prepare(&state, &caller.token, input).await?;
    if !streaming {
        // Not spawned: if the client hangs up, this future is dropped and the run's guards
        // kill the process group, remove the dir and mark the audit row abandoned.
        let answer = runner::execute(prepared, None, CancellationToken::new()).await?;
        return Ok(ok(answer).into_response());
    }
    Ok(stream_answer("claude", move |tx| {
        runner::execute(prepared, Some(tx), CancellationToken::new())
    }))
}

/// Answers as SSE: one `event: <event>` per JSON line `work` sends, then `event: result`
/// carrying what the JSON answer would have been, or `event: error` with the error
/// envelope.
pub fn stream_answer<T, F, Fut>(event: &'static str, work: F) -> Response
where
    T: Serialize + Send + 'static,
    F: FnOnce(mpsc::Sender<Value>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ApiResult<T>> + Send + 'static,
{
    let (out_tx, out_rx) = mpsc::channel::<Event>(64);
    tokio::spawn(async move {
        let result = stream_with(&out_tx, event, work).await;
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
        let _ = out_tx.send(last).await;
    });
    sse_response(out_rx).into_response()
}

/// Runs `work` with a sink of JSON lines, forwarding each as an SSE event named `event`.
/// When the client goes away (the SSE body is dropped), the sink closes, which is how
/// `work` learns to stop its process.
pub async fn stream_with<T, F, Fut>(out: &mpsc::Sender<Event>, event: &'static str, work: F) -> T
where
    F: FnOnce(mpsc::Sender<Value>) -> Fut,
    Fut: std::future::Future<Output = T>,
{
    let (tx, mut rx) = mpsc::channel::<Value>(64);
    let forward = async {
        loop {
            tokio::select! {
                v = rx.recv() => match v {
                    Some(v) => if out.send(sse(event, &v)).await.is_err() { break },
                    None => break,
                },
                _ = out.closed() => break,
            }
        }
        // Dropping the receiver closes the sink `work` holds.
        drop(rx);
    };
    let (result, ()) = tokio::join!(work(tx), forward);
    result
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
