//! The drop-in routes driven by the official `openai` and `anthropic` Python SDKs (pinned
//! in tests/sdk/requirements.txt, installed into .venv-tests by
//! scripts/install-sdk-tests.sh): each test starts a server, runs one case of
//! tests/sdk/*_cases.py against it, and checks its exit and what the server left behind.
//! Stub `claude` for the mapping, errors and governance; the real one against the fake
//! upstream for token deltas, structured output and images.

use reqwest::Method;
use serde_json::{json, Value};

use crate::fake_upstream::{prompt_text, system_text, FakeUpstream, Reply};
use crate::harness::{alive, eventually, repo_root, stdout_of, venv_bin, TestServer};
use crate::harness::{b64, records, PNG};

/// Runs `tests/sdk/<script>_cases.py <case>`; panics with its output unless it exits 0.
async fn sdk_case(
    s: &TestServer,
    token: &str,
    script: &str,
    case: &str,
    env: &[(&str, &str)],
) -> String {
    let mut cmd = tokio::process::Command::new(venv_bin("python"));
    cmd.arg(repo_root().join(format!("tests/sdk/{script}_cases.py")))
        .arg(case)
        .env("CF_BASE_URL", &s.url)
        .env("CF_TOKEN", token)
        .env("CF_RECORD_DIR", &s.record_dir)
        .envs(env.iter().copied());
    stdout_of(cmd).await
}

#[tokio::test]
async fn openai_sdk_maps_history_streams_and_lists_models() {
    let s = TestServer::start().await;
    let (id, t) = s.mint("sdk").await;
    let out = sdk_case(&s, &t, "openai", "chat_history", &[]).await;
    let rows = s.audit_rows("chat");
    assert_eq!(rows.len(), 1);
    let row = &rows[0];
    assert_eq!(
        (row["outcome"].as_str(), row["token_id"].as_str()),
        (Some("ok"), Some(id.as_str()))
    );
    assert!(row["input_tokens"].as_i64().unwrap() > 0 && row["cost_usd"].as_f64().unwrap() > 0.0);
    // The answer's id names the run the row records.
    let subject = row["subject"].as_str().unwrap();
    assert_eq!(
        out.trim(),
        format!("chatcmpl-{}", subject.trim_start_matches("run_"))
    );
    // Tools off, Claude Code's system prompt replaced by the request's.
    let argv: Vec<String> =
        serde_json::from_value(records(&s.record_dir).pop().unwrap()["argv"].clone()).unwrap();
    assert!(
        argv.contains(&"--tools=".into()) && argv.contains(&"--system-prompt=Be brief.".into()),
        "{argv:?}"
    );

    sdk_case(&s, &t, "openai", "stream", &[]).await;
    sdk_case(
        &s,
        &t,
        "openai",
        "models",
        &[("CF_MODELS", "sonnet,opus,haiku")],
    )
    .await;
    let rows = s.audit_rows("chat");
    assert_eq!(rows.len(), 2);
    assert!(rows.iter().all(|r| r["outcome"] == "ok"));
    // Metered on /usage like any run.
    let usage: Value = s
        .app(&t, Method::GET, "/usage")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(usage["today"]["requests"], 2, "{usage}");
}

#[tokio::test]
async fn openai_sdk_raises_its_typed_errors() {
    let s = TestServer::start().await;
    let (_, t) = s
        .mint_with(json!({"name": "sdk", "allowed_models": ["sonnet", "haiku"]}))
        .await;
    sdk_case(&s, &t, "openai", "errors", &[]).await;
    sdk_case(&s, &t, "openai", "models", &[("CF_MODELS", "sonnet,haiku")]).await;
    let rows = s.audit_rows("chat");
    assert_eq!(rows.len(), 1, "only the 502 reached the CLI: {rows:?}");
    assert_eq!(rows[0]["outcome"], "error");

    let (_, broke) = s
        .mint_with(json!({"name": "broke", "budget_usd_per_day": 0}))
        .await;
    sdk_case(&s, &broke, "openai", "budget", &[]).await;
    sdk_case(&s, &broke, "anthropic", "budget", &[]).await;
    assert!(
        s.audit_rows("chat").len() == 1,
        "a spent budget spawns nothing"
    );
}

#[tokio::test]
async fn openai_sdk_retries_honour_retry_after() {
    let s = TestServer::start().await;
    let (_, t) = s
        .mint_with(json!({"name": "one-at-a-time", "max_concurrent": 1}))
        .await;
    let out = sdk_case(&s, &t, "openai", "retry_after", &[]).await;
    assert!(out.contains("retried for"), "{out}");
    let rows = s.audit_rows("chat");
    assert_eq!(rows.len(), 2, "the slow one and the retried one: {rows:?}");
    assert!(rows.iter().all(|r| r["outcome"] == "ok"));
}

#[tokio::test]
async fn anthropic_sdk_maps_history_streams_lists_models_and_errors() {
    let s = TestServer::start_with(|c| {
        c.settings.models = vec![
            "claude-haiku-4-5".parse().unwrap(),
            "haiku".parse().unwrap(),
        ]
    })
    .await;
    let (_, t) = s
        .mint_with(json!({"name": "sdk", "allowed_models": ["sonnet", "haiku"]}))
        .await;
    sdk_case(&s, &t, "anthropic", "history", &[]).await;
    let argv: Vec<String> =
        serde_json::from_value(records(&s.record_dir).pop().unwrap()["argv"].clone()).unwrap();
    assert!(
        argv.contains(&"--system-prompt=Be brief.".into()),
        "{argv:?}"
    );
    sdk_case(&s, &t, "anthropic", "stream", &[]).await;
    sdk_case(&s, &t, "anthropic", "errors", &[]).await;
    // The token's allowed_models, not CLAWDFORGE_MODELS.
    sdk_case(
        &s,
        &t,
        "anthropic",
        "models",
        &[("CF_MODELS", "sonnet,haiku")],
    )
    .await;
    let (_, any) = s.mint("any").await;
    sdk_case(
        &s,
        &any,
        "anthropic",
        "models",
        &[("CF_MODELS", "claude-haiku-4-5,haiku")],
    )
    .await;
    let rows = s.audit_rows("chat");
    assert_eq!(
        rows.iter()
            .map(|r| r["outcome"].as_str().unwrap())
            .collect::<Vec<_>>(),
        ["ok", "ok", "error"]
    );

    // x-api-key works as well as a bearer; errors are Anthropic's shape.
    let res = s
        .req(Method::POST, "/v1/messages")
        .header("x-api-key", &t)
        .json(&json!({"model": "haiku", "max_tokens": 5, "messages": [{"role": "user", "content": "key"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let v: Value = res.json().await.unwrap();
    assert_eq!(v["content"][0]["text"], "echo: key");
    let res = s
        .req(Method::POST, "/v1/messages")
        .header("x-api-key", "cf_nope")
        .json(&json!({"model": "haiku", "max_tokens": 5, "messages": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
    let v: Value = res.json().await.unwrap();
    assert_eq!(
        v,
        json!({"type": "error", "error": {"type": "authentication_error",
        "message": "missing, malformed, unknown or revoked bearer token", "code": "unauthorized"}})
    );
}

#[tokio::test]
async fn anthropic_sdk_sees_rate_limits() {
    let s = TestServer::start().await;
    let (_, t) = s
        .mint_with(json!({"name": "slow", "rate_per_min": 1}))
        .await;
    sdk_case(&s, &t, "anthropic", "history", &[]).await;
    sdk_case(&s, &t, "anthropic", "rate_limited", &[]).await;
}

/// The client closes the stream mid-answer: the process is stopped, the row abandoned.
#[tokio::test]
async fn hanging_up_mid_stream_stops_the_run() {
    let s = TestServer::start().await;
    let (_, t) = s.mint("sdk").await;
    for script in ["openai", "anthropic"] {
        let before = records(&s.record_dir).len();
        sdk_case(&s, &t, script, "hangup", &[("CF_PROMPT", "@stub:hang")]).await;
        let record_dir = s.record_dir.clone();
        eventually("the stub started", || records(&record_dir).len() > before).await;
        let pid = records(&s.record_dir).pop().unwrap()["pid"]
            .as_i64()
            .unwrap() as i32;
        eventually("the process is gone", || !alive(pid)).await;
        eventually("the row is abandoned", || {
            s.audit_rows("chat")
                .last()
                .is_some_and(|r| r["outcome"] == "abandoned")
        })
        .await;
    }
}

/// A client that hangs up on a non-streaming request with a stalled upstream.
#[tokio::test]
async fn hanging_up_without_streaming_stops_the_run() {
    let s = TestServer::start().await;
    let (_, t) = s.mint("sdk").await;
    let req = s
        .app(&t, Method::POST, "/v1/chat/completions")
        .json(&json!({"model": "sonnet", "messages": [{"role": "user", "content": "@stub:hang"}]}))
        .send();
    let record_dir = s.record_dir.clone();
    let pending = tokio::spawn(req);
    eventually("the stub started", || !records(&record_dir).is_empty()).await;
    pending.abort();
    let pid = records(&s.record_dir)[0]["pid"].as_i64().unwrap() as i32;
    eventually("the process is gone", || !alive(pid)).await;
    eventually("the row is abandoned", || {
        s.audit_rows("chat")
            .first()
            .is_some_and(|r| r["outcome"] == "abandoned")
    })
    .await;
}

/// The real CLI against the fake upstream: real token deltas, structured output, images,
/// and a request upstream without tools or Claude Code's own system prompt.
#[tokio::test]
async fn real_claude_through_both_sdks() {
    let fake = FakeUpstream::start().await;
    let pieces = ["Basil, ", "thyme ", "and ", "sage."];
    fake.reply_when(
        "herbs in pieces",
        Reply::Chunks {
            chunks: pieces.iter().map(|p| p.to_string()).collect(),
            gap: std::time::Duration::from_millis(30),
        },
    );
    fake.reply_when(
        "herbs as json",
        Reply::ToolUse {
            name: "StructuredOutput".into(),
            input: json!({"herbs": ["basil", "thyme"]}),
        },
    );
    fake.reply_when("describe the picture", Reply::text("A single pixel."));
    let s = crate::harness::real_server(&fake, |_| {}).await;
    let (_, t) = s.mint("real").await;
    let want = pieces.concat();
    let env = [
        ("CF_PROMPT", "herbs in pieces"),
        ("CF_WANT", want.as_str()),
        ("CF_MIN_PIECES", "4"),
    ];
    sdk_case(&s, &t, "openai", "stream", &env).await;
    let req = fake.conversation_requests().pop().unwrap();
    assert!(
        req["tools"].as_array().is_none_or(|t| t.is_empty()),
        "tools went upstream"
    );
    assert!(
        !system_text(&req).contains("Claude Code"),
        "{}",
        system_text(&req)
    );
    assert!(
        req.to_string().len() < 4000,
        "{} bytes upstream",
        req.to_string().len()
    );
    sdk_case(&s, &t, "anthropic", "stream", &env).await;
    sdk_case(
        &s,
        &t,
        "openai",
        "structured",
        &[
            ("CF_PROMPT", "herbs as json"),
            ("CF_WANT", r#"{"herbs":["basil","thyme"]}"#),
        ],
    )
    .await;
    let png = b64(PNG);
    sdk_case(&s, &t, "openai", "image", &[("CF_PNG_B64", &png)]).await;
    sdk_case(&s, &t, "anthropic", "image", &[("CF_PNG_B64", &png)]).await;
    let req = fake.conversation_requests().pop().unwrap();
    assert!(prompt_text(&req).contains("describe the picture"));
    assert!(
        req.to_string().contains(&png),
        "the image reached the upstream"
    );
    let rows = s.audit_rows("chat");
    assert!(
        rows.len() >= 6 && rows.iter().all(|r| r["outcome"] == "ok"),
        "{rows:?}"
    );
}

/// `Idempotency-Key` through both SDKs against the real CLI: each case sends one request
/// twice and one streamed request three times with its key; each ran once.
#[tokio::test]
async fn real_claude_sdk_repeats_with_a_key_run_once() {
    let fake = FakeUpstream::start().await;
    fake.reply_when("say it once", Reply::text("Said once."));
    let s = crate::harness::real_server(&fake, |_| {}).await;
    let (id, t) = s.mint("real").await;
    let env = [("CF_PROMPT", "say it once"), ("CF_WANT", "Said once.")];
    sdk_case(&s, &t, "openai", "idempotent", &env).await;
    sdk_case(&s, &t, "anthropic", "idempotent", &env).await;
    let rows = s.audit_rows("chat");
    assert_eq!(rows.len(), 4, "two requests per SDK ran: {rows:?}");
    assert!(rows.iter().all(|r| r["outcome"] == "ok"), "{rows:?}");
    let asked = fake
        .conversation_requests()
        .iter()
        .filter(|r| prompt_text(r).contains("say it once"))
        .count();
    assert_eq!(asked, 4, "the upstream saw each request once");
    assert_eq!(crate::harness::usage_ledger(&s, &id).1, 4);
}
