//! A fake Anthropic Messages API for integration tests.
//!
//! clawdforge drives the real `claude` CLI (directly, and through `acpx` and the ACP
//! adapter). Those programs talk to Anthropic over HTTP; pointing `ANTHROPIC_BASE_URL` at
//! this server lets tests run the real programs end to end with no network, deterministic
//! answers, and a record of exactly what the CLI sent upstream (model, system prompt,
//! conversation history).
//!
//! What it serves (see `docs/cli-behaviour.md` for what the pinned CLIs actually call):
//! - `POST /v1/messages` (Claude Code adds `?beta=true`): with `"stream": true` an
//!   Anthropic SSE event sequence, otherwise one JSON `Message` object.
//! - `POST /v1/messages/count_tokens`: `{"input_tokens": N}`.
//! - anything else: `200 {}` and the path is remembered in [`FakeUpstream::other_paths`],
//!   so a test (or a human) can see which side endpoints the CLI touches.
//!
//! The answer to a messages request is chosen by its newest prompt text (see
//! [`prompt_text`]: the last text block of the last user message): the first rule added
//! with [`FakeUpstream::reply_when`] whose needle occurs in that text wins; otherwise the
//! default reply ([`DEFAULT_REPLY_TEXT`] unless changed).
//!
//! Side requests are not matched against the rules: Claude Code (as started by the ACP
//! adapter) asks for a session title after each turn with a request that has no `tools`
//! and wants JSON (`output_config.format.type == "json_schema"`), and that request quotes
//! the user's prompt. The fake answers it with JSON made up from the schema (e.g.
//! `{"title":"Fake session title"}`), so a `Hang` or error rule meant for the turn does not
//! also hit the title request.
//!
//! Usage numbers are fixed and non-zero (see [`FakeUpstream::set_usage`]) so that cost and
//! token accounting can be asserted exactly.
//!
//! The server runs on its own tokio task and stops when the `FakeUpstream` is dropped
//! (including streams left hanging by [`Reply::Hang`]).

// Each integration test binary uses a different subset of this module.
#![allow(dead_code)]
// Test support: a failure to bind or build a response should stop the test loudly.
#![allow(clippy::expect_used)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use futures_util::stream::{self, Stream, StreamExt};
use serde_json::{json, Value};
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;

/// What the fake answers when no rule matches.
pub const DEFAULT_REPLY_TEXT: &str = "Hello from the fake upstream.";

/// The API key the children are given. Anything non-empty works against the fake; the
/// `sk-ant-` prefix keeps it looking like a real key to the CLI.
pub const FAKE_API_KEY: &str = "sk-ant-test-fake";

/// A scripted answer to one `POST /v1/messages`.
#[derive(Clone, Debug)]
pub enum Reply {
    /// A normal assistant text answer, `stop_reason: "end_turn"`. Streamed as a few
    /// `text_delta`s.
    Text(String),
    /// Like `Text`, but each chunk is its own `text_delta`, sent `gap` apart. For tests that
    /// need to see partial output arrive before the turn ends.
    Chunks { chunks: Vec<String>, gap: Duration },
    /// An Anthropic-style error answer with this HTTP status and message:
    /// `{"type":"error","error":{"type":"invalid_request_error","message":...}}` (the error
    /// type follows the status as the real API does).
    Status(u16, String),
    /// Fully custom answer: status, extra headers, raw body (sent as `application/json`).
    /// E.g. a 429 with `retry-after` or `anthropic-ratelimit-unified-*` headers.
    Raw {
        status: u16,
        headers: Vec<(String, String)>,
        body: String,
    },
    /// Starts the SSE stream normally, then sends an `event: error` (e.g. overloaded) and
    /// ends it. Non-streaming requests get a 529 instead.
    StreamError(String),
    /// Waits this long, then answers with the inner reply. Only this request waits: every
    /// request is served on its own task.
    Delayed(Duration, Box<Reply>),
    /// Sends the response head and `message_start` (streaming) and then never finishes,
    /// until the `FakeUpstream` is dropped. For timeout and cancel tests.
    Hang,
    /// The assistant calls a tool: a `tool_use` block with this name and input,
    /// `stop_reason: "tool_use"`. The CLI will run the tool (subject to its permission
    /// mode) and send a follow-up request whose last user message holds the
    /// `tool_result`; that request is matched against the rules like any other.
    ToolUse { name: String, input: Value },
}

impl Reply {
    /// Shorthand for `Reply::Text`.
    pub fn text(s: impl Into<String>) -> Reply {
        Reply::Text(s.into())
    }

    /// Shorthand for `Reply::Delayed`.
    pub fn delayed(delay: Duration, inner: Reply) -> Reply {
        Reply::Delayed(delay, Box::new(inner))
    }
}

/// One HTTP request the fake received, whatever its path.
#[derive(Clone, Debug)]
pub struct Received {
    pub method: String,
    pub path: String,
    /// The raw query string, without `?` (Claude Code sends `beta=true`).
    pub query: Option<String>,
    /// Header names are lower case. `x-api-key` is kept: it is the fake key.
    pub headers: Vec<(String, String)>,
    /// The body parsed as JSON; `Value::Null` if empty, a JSON string if it was not JSON.
    pub body: Value,
}

impl Received {
    /// The value of a header (first occurrence), by lower-case name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Token counts reported in every answer (`message_start`, `message_delta`, JSON message).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Usage {
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cache_creation_input_tokens: u64,
    pub cache_read_input_tokens: u64,
}

impl Default for Usage {
    fn default() -> Self {
        // Non-zero and distinct so that a test can tell input from output in the CLI's
        // cost/usage report.
        Usage {
            input_tokens: 25,
            output_tokens: 10,
            cache_creation_input_tokens: 0,
            cache_read_input_tokens: 0,
        }
    }
}

/// Mutable state shared by the handlers and the test.
struct Inner {
    received: Vec<Received>,
    rules: Vec<(String, Reply)>,
    default_reply: Reply,
    usage: Usage,
    next_id: u64,
}

#[derive(Clone)]
struct Shared {
    inner: Arc<Mutex<Inner>>,
    /// Woken whenever a request is recorded, for [`FakeUpstream::wait_for_requests`].
    arrived: Arc<Notify>,
    /// Flips to `true` (or its sender is dropped) when the fake shuts down; hanging
    /// streams watch it so that their connections end too.
    shutdown: watch::Receiver<bool>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panicking test thread may poison the lock; the data is still fine for us.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The fake Anthropic API. Start one per test; drop it to stop it.
pub struct FakeUpstream {
    addr: SocketAddr,
    shared: Shared,
    shutdown_tx: watch::Sender<bool>,
    server: JoinHandle<()>,
}

impl FakeUpstream {
    /// Binds `127.0.0.1:0` and serves on a background tokio task.
    pub async fn start() -> FakeUpstream {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("fake upstream: bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("fake upstream: local_addr");
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let shared = Shared {
            inner: Arc::new(Mutex::new(Inner {
                received: Vec::new(),
                rules: Vec::new(),
                default_reply: Reply::Text(DEFAULT_REPLY_TEXT.to_string()),
                usage: Usage::default(),
                next_id: 1,
            })),
            arrived: Arc::new(Notify::new()),
            shutdown: shutdown_rx.clone(),
        };
        let app = Router::new()
            .route("/v1/messages", post(messages))
            .route("/v1/messages/count_tokens", post(count_tokens))
            .fallback(other)
            .with_state(shared.clone());
        let mut stop = shutdown_rx;
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    // Ends on `true` or when the sender is dropped.
                    let _ = stop.wait_for(|v| *v).await;
                })
                .await;
        });
        FakeUpstream {
            addr,
            shared,
            shutdown_tx,
            server,
        }
    }

    /// `http://127.0.0.1:PORT` (no trailing slash), for `ANTHROPIC_BASE_URL`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The environment a child `claude` / `acpx` / `claude-agent-acp` needs to use this
    /// fake and nothing else. `config_dir` becomes `CLAUDE_CONFIG_DIR` (Claude Code's
    /// `~/.claude/` and `.claude.json`); use a fresh temp dir per test. The caller should
    /// also set `HOME` to a temp dir (acpx keeps its session store in `$HOME/.acpx`) and
    /// should start the child from a cleared environment plus `PATH`.
    pub fn child_env(&self, config_dir: &Path) -> Vec<(String, String)> {
        let pairs: [(&str, String); 9] = [
            ("ANTHROPIC_BASE_URL", self.base_url()),
            ("ANTHROPIC_API_KEY", FAKE_API_KEY.to_string()),
            ("CLAUDE_CONFIG_DIR", config_dir.display().to_string()),
            // No telemetry, error reporting, auto-update or other calls to real hosts.
            ("DISABLE_TELEMETRY", "1".to_string()),
            ("DISABLE_ERROR_REPORTING", "1".to_string()),
            ("DISABLE_AUTOUPDATER", "1".to_string()),
            ("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1".to_string()),
            // An error status from the fake must surface at once, not after retries with
            // back-off.
            ("CLAUDE_CODE_MAX_RETRIES", "0".to_string()),
            // Tests run as root. Claude Code refuses --dangerously-skip-permissions (and
            // --allow-dangerously-skip-permissions) under root unless IS_SANDBOX is set.
            // Neither `claude -p` nor the pinned ACP adapter (0.76.0, which drops the flag
            // itself under root) needs it, but it keeps tests working with adapters that
            // always pass the flag. See docs/cli-behaviour.md.
            ("IS_SANDBOX", "1".to_string()),
        ];
        pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
    }

    /// [`Self::child_env`] for a child started from a cleared environment: `HOME` is
    /// `home` (with Claude Code's config dir inside it) and `PATH` starts with `bin` (acpx
    /// looks for the ACP adapter on it).
    pub fn agent_env(&self, home: &Path, bin: &Path) -> Vec<(String, String)> {
        let mut env = self.child_env(&home.join("claude-config"));
        env.push(("HOME".into(), home.display().to_string()));
        let path = std::env::var("PATH").unwrap_or_default();
        env.push(("PATH".into(), format!("{}:{path}", bin.display())));
        env
    }

    /// Answer `reply` when the newest prompt of a messages request ([`prompt_text`])
    /// contains `needle`. Rules are checked in the order added; they stay in force (they are
    /// not used up). Side requests ([`is_side_request`]) never match.
    pub fn reply_when(&self, needle: &str, reply: Reply) {
        self.shared.lock().rules.push((needle.to_string(), reply));
    }

    /// The reply used when no rule matches.
    pub fn set_default_reply(&self, reply: Reply) {
        self.shared.lock().default_reply = reply;
    }

    /// Removes every `reply_when` rule.
    pub fn clear_rules(&self) {
        self.shared.lock().rules.clear();
    }

    /// The token counts reported from now on.
    pub fn set_usage(&self, usage: Usage) {
        self.shared.lock().usage = usage;
    }

    /// Every request received, any path, in arrival order.
    pub fn received(&self) -> Vec<Received> {
        self.shared.lock().received.clone()
    }

    /// The body of every `POST /v1/messages`, in arrival order. This includes the CLI's
    /// side requests (see [`FakeUpstream::conversation_requests`]).
    pub fn requests(&self) -> Vec<Value> {
        self.shared
            .lock()
            .received
            .iter()
            .filter(|r| r.method == "POST" && r.path == "/v1/messages")
            .map(|r| r.body.clone())
            .collect()
    }

    /// Messages requests that carry the conversation, i.e. every messages request that is
    /// not a side request (see [`is_side_request`]).
    pub fn conversation_requests(&self) -> Vec<Value> {
        self.requests()
            .into_iter()
            .filter(|b| !is_side_request(b))
            .collect()
    }

    /// The text of the last user message of each conversation request (see
    /// [`last_user_text`]).
    pub fn last_user_texts(&self) -> Vec<String> {
        self.conversation_requests()
            .iter()
            .map(last_user_text)
            .collect()
    }

    /// The newest prompt of each conversation request (see [`prompt_text`]): what the
    /// rules were matched against.
    pub fn prompts(&self) -> Vec<String> {
        self.conversation_requests()
            .iter()
            .map(prompt_text)
            .collect()
    }

    /// The whole `system` of each conversation request (see [`system_text`]).
    pub fn systems(&self) -> Vec<String> {
        self.conversation_requests()
            .iter()
            .map(system_text)
            .collect()
    }

    /// The `model` of each messages request.
    pub fn models(&self) -> Vec<String> {
        self.requests()
            .iter()
            .map(|b| {
                b.get("model")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string()
            })
            .collect()
    }

    /// `METHOD /path?query` of every request that was not a messages or count_tokens call.
    pub fn other_paths(&self) -> Vec<String> {
        self.shared
            .lock()
            .received
            .iter()
            .filter(|r| !(r.method == "POST" && r.path.starts_with("/v1/messages")))
            .map(|r| match &r.query {
                Some(q) => format!("{} {}?{}", r.method, r.path, q),
                None => format!("{} {}", r.method, r.path),
            })
            .collect()
    }

    /// Waits until at least `n` messages requests have arrived; false on timeout. Useful
    /// before cancelling: it proves the turn reached the upstream.
    pub async fn wait_for_requests(&self, n: usize, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            // Register interest before checking, so a request arriving in between is not
            // missed.
            let notified = self.shared.arrived.notified();
            if self.requests().len() >= n {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.requests().len() >= n;
            }
        }
    }
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        // Stops accepting, and ends `Hang` streams so their connections close.
        let _ = self.shutdown_tx.send(true);
        self.server.abort();
    }
}

/// All text in a message's content: a plain string, or the `text` of its text blocks and
/// the text inside `tool_result` blocks, joined by newlines. Claude Code adds
/// `<system-reminder>` text blocks to user messages, so match with `contains`, not `==`.
pub fn user_text(message: &Value) -> String {
    fn collect(content: &Value, out: &mut Vec<String>) {
        match content {
            Value::String(s) => out.push(s.clone()),
            Value::Array(blocks) => {
                for b in blocks {
                    match b.get("type").and_then(Value::as_str) {
                        Some("text") => {
                            if let Some(t) = b.get("text").and_then(Value::as_str) {
                                out.push(t.to_string());
                            }
                        }
                        Some("tool_result") => {
                            if let Some(c) = b.get("content") {
                                collect(c, out);
                            }
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    let mut out = Vec::new();
    if let Some(c) = message.get("content") {
        collect(c, &mut out);
    }
    out.join("\n")
}

fn last_user_message(body: &Value) -> Option<&Value> {
    // Claude Code also sends `role: "system"` messages inside `messages` (after the user
    // message), so look for the last *user* message, not the last message.
    body.get("messages")
        .and_then(Value::as_array)
        .and_then(|msgs| msgs.iter().rev().find(|m| m["role"] == "user"))
}

/// The text of the last `role: "user"` message in a messages request body (all its text
/// blocks, including Claude Code's `<system-reminder>` blocks).
pub fn last_user_text(body: &Value) -> String {
    last_user_message(body).map(user_text).unwrap_or_default()
}

/// The newest prompt in a request: the last block of the last user message that carries
/// text (a `text` block, or a `tool_result`'s text). Rules are matched against this, not
/// against the whole message, because Claude Code merges consecutive user messages: after
/// a turn that failed upstream, the next turn's user message still holds the failed
/// prompt as an earlier block, and an error rule would otherwise match again.
pub fn prompt_text(body: &Value) -> String {
    let Some(msg) = last_user_message(body) else {
        return String::new();
    };
    match msg.get("content") {
        Some(Value::Array(blocks)) => blocks
            .iter()
            .rev()
            .map(|b| user_text(&json!({"content": [b]})))
            .find(|t| !t.is_empty())
            .unwrap_or_default(),
        _ => user_text(msg),
    }
}

/// A request Claude Code makes on the side of the conversation: no tools offered and a
/// JSON answer wanted (`output_config.format.type == "json_schema"`). The session-title
/// request sent after each ACP turn is one.
pub fn is_side_request(body: &Value) -> bool {
    let no_tools = body
        .get("tools")
        .and_then(Value::as_array)
        .is_none_or(|t| t.is_empty());
    let wants_json = body
        .pointer("/output_config/format/type")
        .and_then(Value::as_str)
        .is_some_and(|t| t == "json_schema");
    no_tools && wants_json
}

/// A JSON value matching a (simple) JSON schema, for side requests: every property of an
/// object is filled in; strings are `"Fake <name>"`-ish, numbers 1, booleans true.
fn value_for_schema(schema: &Value, name: &str) -> Value {
    match schema.get("type").and_then(Value::as_str) {
        Some("object") => {
            let mut out = serde_json::Map::new();
            if let Some(props) = schema.get("properties").and_then(Value::as_object) {
                for (k, v) in props {
                    out.insert(k.clone(), value_for_schema(v, k));
                }
            }
            Value::Object(out)
        }
        Some("array") => json!([]),
        Some("integer") | Some("number") => json!(1),
        Some("boolean") => json!(true),
        Some("null") => Value::Null,
        _ if name == "title" => json!("Fake session title"),
        _ => json!(format!("fake {name}")),
    }
}

/// The whole `system` of a request as one string (it may be a string or an array of text
/// blocks; Claude Code sends blocks, the first being its billing/identity header).
pub fn system_text(body: &Value) -> String {
    match body.get("system") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(blocks)) => blocks
            .iter()
            .filter_map(|b| b.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join("\n"),
        _ => String::new(),
    }
}

/// All conversation text of a request (every message, both roles), for assertions such
/// as "turn 2's request contains turn 1's exchange".
pub fn conversation_text(body: &Value) -> String {
    body.get("messages")
        .and_then(Value::as_array)
        .map(|msgs| msgs.iter().map(user_text).collect::<Vec<_>>().join("\n"))
        .unwrap_or_default()
}

fn record(
    shared: &Shared,
    method: &Method,
    uri: &Uri,
    query: Option<String>,
    headers: &HeaderMap,
    body: &Bytes,
) -> Value {
    let body_json = if body.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(body)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(body).into_owned()))
    };
    let rec = Received {
        method: method.to_string(),
        path: uri.path().to_string(),
        query,
        headers: headers
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
        body: body_json.clone(),
    };
    shared.lock().received.push(rec);
    shared.arrived.notify_waiters();
    body_json
}

async fn other(
    State(shared): State<Shared>,
    method: Method,
    uri: Uri,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    record(&shared, &method, &uri, query, &headers, &body);
    // An empty object is the least surprising answer for an unknown side endpoint; the
    // path is logged so tests can learn what was called.
    json_response(StatusCode::OK, &json!({}))
}

async fn count_tokens(
    State(shared): State<Shared>,
    method: Method,
    uri: Uri,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    record(&shared, &method, &uri, query, &headers, &body);
    // Roughly 4 bytes a token, never zero.
    let n = (body.len() / 4).max(1);
    json_response(StatusCode::OK, &json!({ "input_tokens": n }))
}

async fn messages(
    State(shared): State<Shared>,
    method: Method,
    uri: Uri,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let req = record(&shared, &method, &uri, query, &headers, &body);
    let model = req
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or("claude-fake")
        .to_string();
    let streaming = req.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let text = prompt_text(&req);

    let (mut reply, usage, id) = {
        let mut inner = shared.lock();
        let reply = if is_side_request(&req) {
            // Answer with JSON of the wanted shape; never with a test's scripted reply.
            let schema = req
                .pointer("/output_config/format/schema")
                .cloned()
                .unwrap_or(Value::Null);
            Reply::Text(value_for_schema(&schema, "value").to_string())
        } else {
            inner
                .rules
                .iter()
                .find(|(needle, _)| text.contains(needle.as_str()))
                .map(|(_, r)| r.clone())
                .unwrap_or_else(|| inner.default_reply.clone())
        };
        let id = inner.next_id;
        inner.next_id += 1;
        (reply, inner.usage, id)
    };

    // Unwrap any delays first; sleeping here only holds up this request's own task.
    while let Reply::Delayed(d, inner) = reply {
        tokio::time::sleep(d).await;
        reply = *inner;
    }

    let msg_id = format!("msg_fake_{id:04}");
    match reply {
        Reply::Status(status, message) => error_response(status, &message),
        Reply::Raw {
            status,
            headers,
            body,
        } => {
            let mut b = Response::builder()
                .status(StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
                .header("content-type", "application/json")
                .header("request-id", format!("req_fake_{id:04}"));
            for (k, v) in headers {
                b = b.header(k, v);
            }
            b.body(Body::from(body))
                .expect("fake upstream: raw response")
        }
        Reply::StreamError(message) if !streaming => error_response(529, &message),
        Reply::Hang if !streaming => {
            // Never answer; end when the fake is dropped.
            let mut stop = shared.shutdown.clone();
            let _ = stop.wait_for(|v| *v).await;
            error_response(529, "fake upstream shut down")
        }
        r if !streaming => json_response(
            StatusCode::OK,
            &json_message(&msg_id, &model, &r, usage, id),
        ),
        r => sse_response(
            sse_frames(&msg_id, &model, &r, usage, id),
            matches!(r, Reply::Hang),
            shared.shutdown.clone(),
        ),
    }
}

/// Content blocks and stop reason for a (non-error) reply.
fn blocks_of(reply: &Reply, id: u64) -> (Vec<Value>, &'static str) {
    match reply {
        Reply::Text(t) => (vec![json!({"type": "text", "text": t})], "end_turn"),
        Reply::Chunks { chunks, .. } => (
            vec![json!({"type": "text", "text": chunks.concat()})],
            "end_turn",
        ),
        Reply::ToolUse { name, input } => (
            vec![
                json!({"type": "tool_use", "id": format!("toolu_fake_{id:04}"), "name": name, "input": input}),
            ],
            "tool_use",
        ),
        _ => (Vec::new(), "end_turn"),
    }
}

fn usage_json(u: Usage) -> Value {
    json!({
        "input_tokens": u.input_tokens,
        "output_tokens": u.output_tokens,
        "cache_creation_input_tokens": u.cache_creation_input_tokens,
        "cache_read_input_tokens": u.cache_read_input_tokens,
    })
}

fn json_message(msg_id: &str, model: &str, reply: &Reply, usage: Usage, id: u64) -> Value {
    let (content, stop) = blocks_of(reply, id);
    json!({
        "id": msg_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop,
        "stop_sequence": null,
        "usage": usage_json(usage),
    })
}

/// Splits text into up to three pieces on char boundaries, so the CLI sees several deltas.
fn split_text(t: &str) -> Vec<String> {
    let chars: Vec<char> = t.chars().collect();
    if chars.len() < 3 {
        return vec![t.to_string()];
    }
    let step = chars.len().div_ceil(3);
    chars.chunks(step).map(|c| c.iter().collect()).collect()
}

/// One SSE frame to send, after waiting `delay`.
type Frame = (Duration, String);

fn frame(event: &str, data: &Value) -> String {
    format!("event: {event}\ndata: {data}\n\n")
}

fn sse_frames(msg_id: &str, model: &str, reply: &Reply, usage: Usage, id: u64) -> Vec<Frame> {
    let now = Duration::ZERO;
    let mut start_usage = usage_json(usage);
    // The real API reports a placeholder output count at the start and the total at the end.
    start_usage["output_tokens"] = json!(1);
    let mut frames = vec![
        (
            now,
            frame(
                "message_start",
                &json!({
                    "type": "message_start",
                    "message": {
                        "id": msg_id, "type": "message", "role": "assistant", "model": model,
                        "content": [], "stop_reason": null, "stop_sequence": null, "usage": start_usage,
                    }
                }),
            ),
        ),
        (now, frame("ping", &json!({"type": "ping"}))),
    ];
    let delta_frames = |pieces: Vec<(Duration, Value)>, frames: &mut Vec<Frame>| {
        for (gap, delta) in pieces {
            frames.push((
                gap,
                frame(
                    "content_block_delta",
                    &json!({
                        "type": "content_block_delta", "index": 0, "delta": delta,
                    }),
                ),
            ));
        }
    };
    let stop_reason = match reply {
        Reply::Hang => return frames,
        Reply::StreamError(message) => {
            frames.push((
                now,
                frame(
                    "error",
                    &json!({
                        "type": "error", "error": {"type": "overloaded_error", "message": message},
                    }),
                ),
            ));
            return frames;
        }
        Reply::Text(t) => {
            frames.push((now, frame("content_block_start", &json!({
                "type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""},
            }))));
            let pieces = split_text(t)
                .into_iter()
                .map(|p| (now, json!({"type": "text_delta", "text": p})))
                .collect();
            delta_frames(pieces, &mut frames);
            "end_turn"
        }
        Reply::Chunks { chunks, gap } => {
            frames.push((now, frame("content_block_start", &json!({
                "type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""},
            }))));
            let pieces = chunks
                .iter()
                .map(|p| (*gap, json!({"type": "text_delta", "text": p})))
                .collect();
            delta_frames(pieces, &mut frames);
            "end_turn"
        }
        Reply::ToolUse { name, input } => {
            frames.push((now, frame("content_block_start", &json!({
                "type": "content_block_start", "index": 0,
                "content_block": {"type": "tool_use", "id": format!("toolu_fake_{id:04}"), "name": name, "input": {}},
            }))));
            // The input arrives as JSON text in pieces, like the real API.
            let pieces = split_text(&input.to_string())
                .into_iter()
                .map(|p| (now, json!({"type": "input_json_delta", "partial_json": p})))
                .collect();
            delta_frames(pieces, &mut frames);
            "tool_use"
        }
        // Status/Raw/Delayed never get here (handled or unwrapped by the caller).
        Reply::Status(..) | Reply::Raw { .. } | Reply::Delayed(..) => "end_turn",
    };
    frames.push((
        now,
        frame(
            "content_block_stop",
            &json!({"type": "content_block_stop", "index": 0}),
        ),
    ));
    frames.push((
        now,
        frame(
            "message_delta",
            &json!({
                "type": "message_delta",
                "delta": {"stop_reason": stop_reason, "stop_sequence": null},
                "usage": usage_json(usage),
            }),
        ),
    ));
    frames.push((now, frame("message_stop", &json!({"type": "message_stop"}))));
    frames
}

fn sse_response(frames: Vec<Frame>, hang: bool, shutdown: watch::Receiver<bool>) -> Response {
    let body = stream::iter(frames).then(|(delay, text)| async move {
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        Ok::<Bytes, Infallible>(Bytes::from(text))
    });
    let tail: std::pin::Pin<Box<dyn Stream<Item = Result<Bytes, Infallible>> + Send>> = if hang {
        // Keep the response open (yielding nothing) until the fake shuts down.
        let mut stop = shutdown;
        Box::pin(
            stream::once(async move {
                let _ = stop.wait_for(|v| *v).await;
            })
            .filter_map(|()| async { None }),
        )
    } else {
        Box::pin(stream::empty())
    };
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "text/event-stream; charset=utf-8")
        .header("cache-control", "no-cache")
        .body(Body::from_stream(body.chain(tail)))
        .expect("fake upstream: SSE response")
}

fn json_response(status: StatusCode, v: &Value) -> Response {
    (
        status,
        [("content-type", "application/json")],
        v.to_string(),
    )
        .into_response()
}

/// An Anthropic error body, its `error.type` following the status like the real API.
fn error_response(status: u16, message: &str) -> Response {
    let kind = match status {
        400 => "invalid_request_error",
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        529 => "overloaded_error",
        _ => "api_error",
    };
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let body = json!({"type": "error", "error": {"type": kind, "message": message}});
    let mut resp = json_response(code, &body);
    if let Ok(v) = "req_fake_error".parse() {
        resp.headers_mut().insert("request-id", v);
    }
    resp
}
