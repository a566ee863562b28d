//! `Idempotency-Key` on `POST /run`, `POST /sessions/{id}/turn`, `POST /v1/chat/completions`
//! and `POST /v1/messages`: one layer on those four routes (`http::router`), so runs, turns
//! and the SDK routes share it rather than each copying it. The rules and the table are
//! `governance::idempotency`'s; this is the HTTP side: the key and the caller read from the
//! request, the answer recorded as it leaves and replayed byte for byte.
//!
//! A JSON answer is kept whole (it is bounded by `CLAWDFORGE_MAX_OUTPUT_BYTES`). A stream is
//! recorded event by event and kept once its closing event has been sent — before that
//! event leaves, so a client that repeats the request on seeing it is already answered from
//! the store: the whole stream up to [`STREAM_CAP`], else its first event and its last
//! [`STREAM_TAIL`] (which hold the `result`/`error` event of a run or turn, and the closing
//! chunks of an SDK stream). A replay answers with the kept bytes and
//! `Idempotent-Replayed: true`; it runs nothing, meters nothing and writes no audit row.

use std::collections::VecDeque;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, FromRequestParts, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use serde_json::Value;

use crate::app::AppState;
use crate::error::ApiError;
use crate::governance::idempotency::{
    self, spends_key, Claim, Holder, IdempotencyKey, StoredAnswer,
};
use crate::http::extract::{sdk_caller, AppCaller};
use crate::http::params;
use crate::http::v1::{self, Flavor};
use crate::store::Db;
use crate::util::{new_id, now_ms};

pub const KEY_HEADER: &str = "idempotency-key";
/// Set on an answer that is a replay of the first one.
pub const REPLAYED_HEADER: &str = "idempotent-replayed";
/// A stream up to this size is kept whole.
pub const STREAM_CAP: usize = 1 << 20;
/// Events kept from the end of a longer stream.
pub const STREAM_TAIL: usize = 4;

/// The wire format a route answers errors in.
#[derive(Debug, Clone, Copy)]
pub enum Wire {
    /// `/run` and turns: the envelope.
    Envelope,
    /// The SDK routes: that API's error shape.
    Sdk(Flavor),
}

impl Wire {
    fn error(self, e: ApiError) -> Response {
        match self {
            Wire::Envelope => e.into_response(),
            Wire::Sdk(flavor) => v1::error_response(flavor, &e.into()),
        }
    }
}

/// The layer's state: the app's, and the route's wire format.
pub type Layer = (Arc<AppState>, Wire);

/// The middleware. Without the header the request goes straight through; a caller who
/// does not authenticate goes through too, for the route to refuse in its own way.
pub async fn idempotent(State((state, wire)): State<Layer>, req: Request, next: Next) -> Response {
    let mut keys = req.headers().get_all(KEY_HEADER).iter();
    let Some(raw) = keys.next() else {
        return next.run(req).await;
    };
    let key = match (IdempotencyKey::parse(raw.as_bytes()), keys.next()) {
        (Ok(key), None) => key,
        (Err(why), _) => return wire.error(ApiError::bad_request(why)),
        (Ok(_), Some(_)) => {
            return wire.error(ApiError::bad_request(
                "send one Idempotency-Key header, not several",
            ))
        }
    };
    let (mut parts, body) = req.into_parts();
    let caller = match wire {
        Wire::Envelope => AppCaller::from_request_parts(&mut parts, &state).await,
        Wire::Sdk(_) => sdk_caller(&state, &parts).await,
    };
    let Ok(caller) = caller else {
        return next.run(Request::from_parts(parts, body)).await;
    };
    // The route's body limit applies (the layer sits inside it).
    let bytes = match Bytes::from_request(Request::from_parts(parts.clone(), body), &()).await {
        Ok(b) => b,
        Err(r) if r.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            return wire.error(ApiError::TooLarge("request body too large".into()))
        }
        Err(r) => return wire.error(ApiError::BadRequest(r.body_text())),
    };
    let holder = Holder {
        token_id: caller.token.id.clone(),
        key_hash: key.hash(),
        claim: new_id("idem_"),
    };
    let request_hash = idempotency::request_hash(
        parts.uri.path(),
        // Whether `Accept` asks for a stream (a body's `stream` is in the body).
        params::wants_stream(None, &parts.headers),
        &bytes,
    );
    let claimed = {
        let holder = holder.clone();
        state
            .db
            .write(move |c| idempotency::claim(c, &holder, &request_hash, now_ms()))
            .await
    };
    match claimed {
        Err(e) => wire.error(e.into()),
        Ok(Claim::Running) => wire.error(ApiError::IdempotencyBusy),
        Ok(Claim::Mismatch) => wire.error(ApiError::IdempotencyMismatch),
        Ok(Claim::Answered(answer)) => {
            tracing::info!(token_id = %holder.token_id, "answered a repeat from its Idempotency-Key");
            replay(answer)
        }
        Ok(Claim::Taken) => {
            // The route authenticates again from this, without another database read.
            parts.extensions.insert(caller);
            let claim = Claimed {
                db: state.db.clone(),
                holder,
                settled: false,
            };
            let res = next
                .run(Request::from_parts(parts, Body::from(bytes)))
                .await;
            record(claim, res).await
        }
    }
}

fn replay(answer: StoredAnswer) -> Response {
    let mut res = (
        StatusCode::from_u16(answer.status).unwrap_or(StatusCode::OK),
        answer.body,
    )
        .into_response();
    if let Ok(ct) = HeaderValue::from_str(&answer.content_type) {
        res.headers_mut().insert(header::CONTENT_TYPE, ct);
    }
    res.headers_mut()
        .insert(REPLAYED_HEADER, HeaderValue::from_static("true"));
    res
}

/// A key this request holds: kept with its answer, or released — on drop at the latest
/// (a client that hung up drops the request before it has answered).
struct Claimed {
    db: Db,
    holder: Holder,
    settled: bool,
}

impl Claimed {
    async fn keep(&mut self, answer: StoredAnswer) {
        self.settled = true;
        let holder = self.holder.clone();
        if let Err(e) = self
            .db
            .write(move |c| idempotency::keep(c, &holder, &answer))
            .await
        {
            tracing::warn!(error = %e, "could not keep an answer for its Idempotency-Key");
        }
    }

    /// Keeps the answer if it spends the key, else releases the key.
    async fn settle(&mut self, answer: StoredAnswer, spent: bool) {
        if spent {
            self.keep(answer).await;
        } else {
            self.release().await;
        }
    }

    async fn release(&mut self) {
        self.settled = true;
        let holder = self.holder.clone();
        if let Err(e) = self
            .db
            .write(move |c| idempotency::release(c, &holder))
            .await
        {
            tracing::warn!(error = %e, "could not release an Idempotency-Key");
        }
    }
}

impl Drop for Claimed {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        let (db, holder) = (self.db.clone(), self.holder.clone());
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let _ = db.write(move |c| idempotency::release(c, &holder)).await;
            });
        }
    }
}

/// The `code` of an error answer in any of the routes' shapes: the envelope's `code`, or
/// `error.code` (OpenAI and Anthropic errors carry the stable code there).
fn error_code(v: &Value) -> Option<&str> {
    v.get("code")
        .or_else(|| v.pointer("/error/code"))
        .and_then(Value::as_str)
}

/// Keeps or releases the key by the answer, passing the answer on.
async fn record(mut claim: Claimed, res: Response) -> Response {
    let status = res.status();
    let content_type = res
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    if content_type.starts_with("text/event-stream") {
        return record_stream(claim, res, content_type);
    }
    let (parts, body) = res.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, usize::MAX).await else {
        claim.release().await;
        return ApiError::internal("an answer's body failed").into_response();
    };
    let code = serde_json::from_slice::<Value>(&bytes).ok();
    let spent = spends_key(status.is_success(), code.as_ref().and_then(error_code));
    let answer = StoredAnswer {
        status: status.as_u16(),
        content_type,
        body: bytes.to_vec(),
    };
    claim.settle(answer, spent).await;
    Response::from_parts(parts, Body::from(bytes))
}

/// Passes a stream on, recording its events; settles the key when the closing event comes
/// (before sending it), or when the stream ends without one.
fn record_stream(claim: Claimed, res: Response, content_type: String) -> Response {
    let (parts, body) = res.into_parts();
    let state = (body.into_data_stream(), Recording::default(), claim);
    let stream = futures_util::stream::unfold(Some(state), move |state| {
        let content_type = content_type.clone();
        async move {
            let (mut inner, mut rec, mut claim) = state?;
            match inner.next().await {
                Some(Ok(chunk)) => {
                    if !claim.settled {
                        if let Some(spent) = rec.feed(&chunk) {
                            claim.settle(rec.answer(content_type), spent).await;
                        }
                    }
                    Some((Ok(chunk), Some((inner, rec, claim))))
                }
                // A broken stream is no answer: the claim is released as it drops.
                Some(Err(e)) => Some((Err(e), None)),
                None => {
                    if !claim.settled {
                        let spent = rec.last_spends();
                        claim.settle(rec.answer(content_type), spent).await;
                    }
                    None
                }
            }
        }
    });
    Response::from_parts(parts, Body::from_stream(stream))
}

/// The events of a stream as they pass: all of them up to [`STREAM_CAP`], else the first
/// and the last [`STREAM_TAIL`].
#[derive(Default)]
struct Recording {
    /// Bytes of an event not yet complete.
    pending: Vec<u8>,
    events: VecDeque<Vec<u8>>,
    bytes: usize,
    trimmed: bool,
}

impl Recording {
    /// Takes a chunk in; `Some(spends)` once the stream's closing event is complete.
    fn feed(&mut self, chunk: &[u8]) -> Option<bool> {
        self.pending.extend_from_slice(chunk);
        let mut closing = None;
        while let Some(end) = find(&self.pending, b"\n\n") {
            let event: Vec<u8> = self.pending.drain(..end + 2).collect();
            let Some((name, data)) = parse_event(&event) else {
                // A keep-alive comment.
                continue;
            };
            self.push(event);
            if closes_stream(name.as_deref(), &data) {
                closing = Some(data_spends(&data));
            }
        }
        closing
    }

    fn push(&mut self, event: Vec<u8>) {
        self.bytes += event.len();
        self.events.push_back(event);
        if self.bytes > STREAM_CAP {
            self.trimmed = true;
        }
        while self.trimmed && self.events.len() > 1 + STREAM_TAIL {
            if let Some(dropped) = self.events.remove(1) {
                self.bytes -= dropped.len();
            }
        }
    }

    /// Whether the last event, for a stream that ended without a closing one, spends the
    /// key: only if it is an error of the work itself (no event at all: no answer).
    fn last_spends(&self) -> bool {
        self.events
            .back()
            .and_then(|e| parse_event(e))
            .is_some_and(|(_, data)| {
                serde_json::from_str::<Value>(&data)
                    .ok()
                    .as_ref()
                    .and_then(error_code)
                    .is_some_and(|code| spends_key(false, Some(code)))
            })
    }

    fn answer(&self, content_type: String) -> StoredAnswer {
        StoredAnswer {
            status: StatusCode::OK.as_u16(),
            content_type,
            body: self.events.iter().flatten().copied().collect(),
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// An SSE event's name and data (`data:` lines joined); `None` for a comment.
fn parse_event(event: &[u8]) -> Option<(Option<String>, String)> {
    let text = String::from_utf8_lossy(event);
    let (mut name, mut data, mut any) = (None, Vec::new(), false);
    for line in text.lines() {
        if let Some(v) = line.strip_prefix("event:") {
            name = Some(v.trim_start().to_string());
            any = true;
        } else if let Some(v) = line.strip_prefix("data:") {
            data.push(v.strip_prefix(' ').unwrap_or(v).to_string());
            any = true;
        }
    }
    any.then(|| (name, data.join("\n")))
}

/// The event after which a stream sends nothing more: `result`/`error` (runs, turns,
/// Anthropic errors), `message_stop` (Anthropic), `[DONE]` or an `{"error": …}` chunk
/// (OpenAI).
fn closes_stream(name: Option<&str>, data: &str) -> bool {
    match name {
        Some("result" | "error" | "message_stop") => true,
        Some(_) => false,
        None => {
            data == "[DONE]"
                || serde_json::from_str::<Value>(data)
                    .is_ok_and(|v| v.get("error").is_some_and(Value::is_object))
        }
    }
}

/// Whether a closing event spends the key: yes unless it is an error of the kind that
/// releases one (see `governance::idempotency`).
fn data_spends(data: &str) -> bool {
    let v = serde_json::from_str::<Value>(data).ok();
    let is_error = v.as_ref().is_some_and(|v| {
        v.get("ok") == Some(&Value::Bool(false)) || v.get("error").is_some_and(Value::is_object)
    });
    spends_key(!is_error, v.as_ref().and_then(error_code))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(name: &str, data: &str) -> Vec<u8> {
        format!("event: {name}\ndata: {data}\n\n").into_bytes()
    }

    #[test]
    fn a_stream_is_kept_until_its_closing_event() {
        let mut rec = Recording::default();
        assert_eq!(rec.feed(&event("claude", r#"{"type":"system"}"#)), None);
        assert_eq!(rec.feed(b": keep-alive\n\n"), None);
        // An event split across chunks.
        let result = event("result", r#"{"ok":true,"run_id":"run_x"}"#);
        assert_eq!(rec.feed(&result[..10]), None);
        assert_eq!(rec.feed(&result[10..]), Some(true));
        let kept = rec.answer("text/event-stream".into()).body;
        assert_eq!(
            String::from_utf8(kept).unwrap(),
            format!(
                "event: claude\ndata: {{\"type\":\"system\"}}\n\n{}",
                String::from_utf8(result).unwrap()
            )
        );
    }

    #[test]
    fn closing_errors_spend_the_key_only_when_the_work_ran() {
        let mut rec = Recording::default();
        let e = r#"{"ok":false,"error":"x","code":"timeout"}"#;
        assert_eq!(rec.feed(&event("error", e)), Some(true));
        let mut rec = Recording::default();
        let e = r#"{"ok":false,"error":"x","code":"unavailable"}"#;
        assert_eq!(rec.feed(&event("error", e)), Some(false));
        // OpenAI: `[DONE]` closes; an error chunk closes with its code.
        let mut rec = Recording::default();
        assert_eq!(rec.feed(b"data: {\"choices\":[]}\n\n"), None);
        assert_eq!(rec.feed(b"data: [DONE]\n\n"), Some(true));
        let mut rec = Recording::default();
        let e = br#"data: {"error":{"message":"x","type":"server_error","code":"overloaded"}}"#;
        assert_eq!(rec.feed(&[&e[..], b"\n\n"].concat()), Some(false));
        // Anthropic.
        let mut rec = Recording::default();
        assert_eq!(
            rec.feed(&event("message_stop", r#"{"type":"message_stop"}"#)),
            Some(true)
        );
    }

    #[test]
    fn a_long_stream_keeps_its_first_and_last_events() {
        let mut rec = Recording::default();
        let big = "x".repeat(STREAM_CAP / 8);
        rec.feed(&event("claude", "first"));
        for i in 0..20 {
            rec.feed(&event("claude", &format!("{i}{big}")));
        }
        assert_eq!(rec.feed(&event("result", "{}")), Some(true));
        let names: Vec<String> = rec
            .events
            .iter()
            .map(|e| parse_event(e).unwrap().1.chars().take(5).collect())
            .collect();
        assert_eq!(names, ["first", "17xxx", "18xxx", "19xxx", "{}"]);
    }
}
