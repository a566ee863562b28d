//! The real pinned `claude` (installed by scripts/install-agents.sh) against the fake
//! Anthropic Messages API on loopback: what the broker does with a real CLI's output.

use reqwest::Method;
use serde_json::json;

use crate::fake_upstream::{FakeUpstream, Reply};
use crate::harness::*;

#[tokio::test]
async fn real_claude_answers_are_parsed() {
    let fake = FakeUpstream::start().await;
    fake.reply_when("give json", Reply::text(r#"{"servings": 4, "ok": true}"#));
    fake.reply_when(
        "give fenced",
        Reply::text("```json\n{\"fenced\": [1, 2, 3]}\n```"),
    );
    fake.reply_when("give prose", Reply::text("Simmer for ten minutes."));
    let s = real_server(&fake, |_| {}).await;
    let (_, t) = s.mint("real").await;

    let (st, v) = run(&s, &t, json!({"prompt": "give json"})).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["result"], json!({"servings": 4, "ok": true}));
    assert!(v["usage"]["input_tokens"].as_i64().unwrap() > 0);
    assert!(v["cost_usd"].as_f64().unwrap() > 0.0);
    let (st, v) = run(&s, &t, json!({"prompt": "give fenced"})).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["result"], json!({"fenced": [1, 2, 3]}));
    let (_, v) = run(&s, &t, json!({"prompt": "give prose"})).await;
    assert_eq!(v["result"], "Simmer for ten minutes.");

    // Model and system prompt reach the upstream; the prompt arrives intact.
    let (st, v) = run(
        &s,
        &t,
        json!({"prompt": "give prose --help", "model": "opus", "system": "You are a chef."}),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["model"], "opus");
    let last = fake.conversation_requests().pop().unwrap();
    assert!(
        last["model"].as_str().unwrap().contains("opus"),
        "{}",
        last["model"]
    );
    assert!(crate::fake_upstream::system_text(&last).contains("You are a chef."));
    assert!(crate::fake_upstream::prompt_text(&last).contains("give prose --help"));
    let rows = s.audit_rows("run");
    assert_eq!(rows.len(), 4);
    assert!(rows
        .iter()
        .all(|r| r["outcome"] == "ok" && r["cost_usd"].as_f64().unwrap() > 0.0));
}

#[tokio::test]
async fn real_claude_upstream_400_is_a_502() {
    let fake = FakeUpstream::start().await;
    fake.reply_when(
        "break",
        Reply::Status(400, "messages: unexpected field".into()),
    );
    let s = real_server(&fake, |_| {}).await;
    let (_, t) = s.mint("real").await;
    let (st, v) = run(&s, &t, json!({"prompt": "break please"})).await;
    assert_eq!(
        (st, v["code"].as_str()),
        (502, Some("upstream_error")),
        "{v}"
    );
    assert!(v["error"].as_str().unwrap().contains("400"), "{v}");
    assert_eq!(s.audit_rows("run")[0]["outcome"], "error");
}

#[tokio::test]
async fn real_claude_streams_end_to_end() {
    let fake = FakeUpstream::start().await;
    fake.reply_when(
        "stream me",
        Reply::text("```json\n{\"streamed\": true}\n```"),
    );
    let s = real_server(&fake, |_| {}).await;
    let (_, t) = s.mint("real").await;
    let res = s
        .app(&t, Method::POST, "/run")
        .json(&json!({"prompt": "stream me", "stream": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let events = sse_events(res).await;
    let (last, data) = events.last().unwrap();
    assert_eq!(last, "result", "{events:?}");
    assert_eq!(data["result"], json!({"streamed": true}));
    let kinds: Vec<&str> = events
        .iter()
        .filter(|(e, _)| e == "claude")
        .filter_map(|(_, v)| v["type"].as_str())
        .collect();
    assert!(
        kinds.contains(&"system") && kinds.contains(&"assistant") && kinds.contains(&"result"),
        "{kinds:?}"
    );
}

#[tokio::test]
async fn real_claude_sees_attached_file_names_in_the_prompt() {
    let fake = FakeUpstream::start().await;
    let s = real_server(&fake, |_| {}).await;
    let (_, t) = s.mint("real").await;
    let form = reqwest::multipart::Form::new().part(
        "file",
        reqwest::multipart::Part::bytes(b"2 eggs, 1 cup flour".to_vec())
            .file_name("recipe notes.txt"),
    );
    let (st, v) = body(
        s.app(&t, Method::POST, "/files")
            .multipart(form)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(st, 201, "{v}");
    let ft = v["file_token"].as_str().unwrap().to_string();
    let (st, v) = run(
        &s,
        &t,
        json!({"prompt": "Summarise the attachment.", "files": [ft]}),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    let prompt = crate::fake_upstream::prompt_text(&fake.conversation_requests().pop().unwrap());
    assert!(prompt.contains("Summarise the attachment."), "{prompt}");
    assert!(
        prompt.contains("Attached files: recipe notes.txt"),
        "{prompt}"
    );
}
