//! `POST /run`'s `tools`, `json_schema` and `images` against the stub `claude`: the flags
//! they become, the token's `allowed_tools`, and the edge checks.

use serde_json::{json, Value};

use crate::harness::{b64, patch, records, run, TestServer, PNG};

/// A valid 1×1 PNG (the real CLI reads the header to size images).
fn argv(rec: &Value) -> Vec<String> {
    serde_json::from_value(rec["argv"].clone()).unwrap()
}

#[tokio::test]
async fn tools_map_to_flags_and_the_token_bounds_them() {
    let s = TestServer::start().await;
    let (id, t) = s.mint("app").await;
    let (st, v) = run(&s, &t, json!({"prompt": "a", "tools": "none"})).await;
    assert_eq!(st, 200, "{v}");
    assert!(argv(&records(&s.record_dir).pop().unwrap()).contains(&"--tools=".to_string()));
    let (st, _) = run(&s, &t, json!({"prompt": "b", "tools": ["Read", "Grep"]})).await;
    assert_eq!(st, 200);
    assert!(argv(&records(&s.record_dir).pop().unwrap()).contains(&"--tools=Grep,Read".into()));
    let (st, _) = run(&s, &t, json!({"prompt": "c"})).await;
    assert_eq!(st, 200);
    let a = argv(&records(&s.record_dir).pop().unwrap());
    assert!(!a.iter().any(|x| x.starts_with("--tools")), "{a:?}");

    for bad in [json!("some"), json!(["--evil"]), json!(3)] {
        let (st, v) = run(&s, &t, json!({"prompt": "x", "tools": bad})).await;
        assert_eq!((st, v["code"].as_str()), (400, Some("bad_request")), "{v}");
    }

    // The policy field: PATCH semantics, shown in the listing, bounds and defaults runs.
    let (st, v) = patch(&s, &id, json!({"allowed_tools": ["Read"]})).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["allowed_tools"], json!(["Read"]));
    let (st, v) = run(&s, &t, json!({"prompt": "d", "tools": ["Read", "Bash"]})).await;
    assert_eq!((st, v["code"].as_str()), (403, Some("forbidden")), "{v}");
    let (st, _) = run(&s, &t, json!({"prompt": "d", "tools": "default"})).await;
    assert_eq!(st, 403);
    let (st, _) = run(&s, &t, json!({"prompt": "e", "tools": "none"})).await;
    assert_eq!(st, 200);
    let (st, _) = run(&s, &t, json!({"prompt": "f"})).await;
    assert_eq!(st, 200);
    assert!(argv(&records(&s.record_dir).pop().unwrap()).contains(&"--tools=Read".into()));
    let (st, v) = patch(&s, &id, json!({"max_concurrent": 3})).await;
    assert_eq!(
        (st, &v["allowed_tools"]),
        (200, &json!(["Read"])),
        "omitted keeps"
    );
    let (st, v) = patch(&s, &id, json!({"allowed_tools": "sometimes"})).await;
    assert_eq!(st, 400, "{v}");
    let (st, v) = patch(&s, &id, json!({"allowed_tools": null})).await;
    assert_eq!((st, &v["allowed_tools"]), (200, &Value::Null));
    let (st, _) = run(&s, &t, json!({"prompt": "g", "tools": ["Bash"]})).await;
    assert_eq!(st, 200);
    let rows = s.audit_rows("run");
    assert_eq!(rows.iter().filter(|r| r["outcome"] == "ok").count(), 6);
}

#[tokio::test]
async fn json_schema_answers_the_structured_output() {
    let s = TestServer::start().await;
    let (_, t) = s.mint("app").await;
    let schema = json!({"type": "object", "properties": {"n": {"type": "integer"}}});
    let (st, v) = run(
        &s,
        &t,
        json!({"prompt": "@stub:structured={\"n\": 4}", "json_schema": schema}),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["result"], json!({"n": 4}));
    assert_eq!(
        v["stop_reason"], "end_turn",
        "the CLI's tool_use is not the client's"
    );
    let a = argv(&records(&s.record_dir).pop().unwrap());
    assert!(a.contains(&format!("--json-schema={schema}")), "{a:?}");

    // A plain-text answer to a schema run is the upstream's failure, recorded as such.
    let (st, v) = run(
        &s,
        &t,
        json!({"prompt": "@stub:no-structured", "json_schema": schema}),
    )
    .await;
    assert_eq!(
        (st, v["code"].as_str()),
        (502, Some("upstream_error")),
        "{v}"
    );
    assert_eq!(s.audit_rows("run").last().unwrap()["outcome"], "error");

    let (st, _) = run(&s, &t, json!({"prompt": "x", "json_schema": "object"})).await;
    assert_eq!(st, 400);
}

#[tokio::test]
async fn json_schema_counts_toward_the_prompt_limit() {
    let s = TestServer::start_with(|c| c.settings.max_prompt_bytes = 100).await;
    let (_, t) = s.mint("app").await;
    let schema = json!({"type": "object", "description": "x".repeat(40)});
    let room = 100 - schema.to_string().len();
    let (st, v) = run(
        &s,
        &t,
        json!({"prompt": "y".repeat(room + 1), "json_schema": schema}),
    )
    .await;
    assert_eq!((st, v["code"].as_str()), (413, Some("too_large")), "{v}");
    // Exactly at the limit together is accepted.
    let (st, v) = run(
        &s,
        &t,
        json!({"prompt": "y".repeat(room), "json_schema": schema}),
    )
    .await;
    assert_eq!(st, 200, "{v}");
}

#[tokio::test]
async fn images_go_as_blocks_and_are_checked() {
    let s = TestServer::start().await;
    let (_, t) = s.mint("app").await;
    let img = json!({"media_type": "image/png", "data": b64(PNG)});
    let (st, v) = run(
        &s,
        &t,
        json!({"prompt": "what is this?", "images": [img, img]}),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["result"], "echo: what is this?");
    let rec = records(&s.record_dir).pop().unwrap();
    let types: Vec<&str> = rec["blocks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["type"].as_str().unwrap())
        .collect();
    assert_eq!(types, ["image", "image", "text"]);
    assert_eq!(rec["blocks"][0]["media_type"], "image/png");
    assert!(argv(&rec)
        .windows(2)
        .any(|w| w == ["--input-format", "stream-json"]));

    let nine: Vec<Value> = (0..9).map(|_| img.clone()).collect();
    // 5 MiB decoded is accepted (the body limit grows for it); one byte more is not.
    let exact = [PNG, &vec![0u8; 5 * 1024 * 1024 - PNG.len()]].concat();
    let over = [&exact[..], b"!"].concat();
    for (bad, why) in [
        (json!(nine), "nine images"),
        (
            json!([{"media_type": "image/bmp", "data": b64(PNG)}]),
            "bmp",
        ),
        (
            json!([{"media_type": "image/png", "data": "%%%"}]),
            "not base64",
        ),
        (
            json!([{"media_type": "image/jpeg", "data": b64(PNG)}]),
            "not a jpeg",
        ),
        (
            json!([{"media_type": "image/png", "data": b64(&over)}]),
            "over 5 MiB",
        ),
        (json!([{"media_type": "image/png"}]), "no data"),
    ] {
        let (st, v) = run(&s, &t, json!({"prompt": "x", "images": bad})).await;
        assert_eq!(
            (st, v["code"].as_str()),
            (400, Some("bad_request")),
            "{why}: {v}"
        );
    }
    let eight: Vec<Value> = (0..8)
        .map(|_| json!({"media_type": "image/png", "data": b64(&exact)}))
        .collect();
    let (st, v) = run(
        &s,
        &t,
        json!({"prompt": "eight at the limit", "images": eight}),
    )
    .await;
    assert_eq!(st, 200, "{v}");
}

/// The real CLI against the fake upstream: what reaches the model for each field.
#[tokio::test]
async fn real_claude_takes_tools_schema_and_images() {
    use crate::fake_upstream::{system_text, FakeUpstream, Reply};
    let fake = FakeUpstream::start().await;
    fake.reply_when(
        "give structure",
        Reply::ToolUse {
            name: "StructuredOutput".into(),
            input: json!({"herbs": ["basil", "thyme"]}),
        },
    );
    let s = crate::harness::real_server(&fake, |_| {}).await;
    let (_, t) = s.mint("real").await;

    let (st, v) = run(
        &s,
        &t,
        json!({"prompt": "plain and small", "tools": "none", "system": "Be brief."}),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    let req = fake.conversation_requests().pop().unwrap();
    assert!(
        req["tools"].as_array().is_none_or(|t| t.is_empty()),
        "{}",
        req["tools"]
    );
    assert!(system_text(&req).contains("Be brief."));
    assert!(
        req.to_string().len() < 8000,
        "{} bytes upstream",
        req.to_string().len()
    );

    let schema = json!({"type": "object", "properties": {"herbs": {"type": "array", "items": {"type": "string"}}}, "required": ["herbs"]});
    let (st, v) = run(
        &s,
        &t,
        json!({"prompt": "give structure", "tools": "none", "json_schema": schema}),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["result"], json!({"herbs": ["basil", "thyme"]}));
    assert_eq!(v["stop_reason"], "end_turn");
    let req = fake.conversation_requests().pop().unwrap();
    let tools: Vec<&str> = req["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(tools, ["StructuredOutput"]);

    let (st, v) = run(
        &s,
        &t,
        json!({"prompt": "describe the picture", "tools": "none",
               "images": [{"media_type": "image/png", "data": b64(PNG)}]}),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    let req = fake.conversation_requests().pop().unwrap();
    let last = req["messages"].as_array().unwrap().last().unwrap().clone();
    let image = last["content"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["type"] == "image")
        .unwrap_or_else(|| panic!("no image block: {last}"))
        .clone();
    assert_eq!(image["source"]["media_type"], "image/png");
    assert_eq!(image["source"]["data"], b64(PNG));
}
