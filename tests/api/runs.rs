//! `POST /run` against the stub `claude`: argv and stdin, staged dirs, result parsing,
//! process-group kills, output caps, admission control, streaming and the audit row.

use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};

use crate::harness::*;

/// Whether every run the stub answered has had its working dir removed.
fn all_dirs_gone(s: &TestServer) -> bool {
    records(&s.record_dir).iter().all(dir_gone)
}

#[tokio::test]
async fn prompt_travels_on_stdin_and_flags_map() {
    let s = TestServer::start().await;
    let (_, t) = s.mint("app").await;
    let (st, v) = run(&s, &t, json!({"prompt": "--version"})).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["result"], "echo: --version");
    assert!(v["run_id"].as_str().unwrap().starts_with("run_"));
    assert_eq!(v["model"], "sonnet");
    assert_eq!(v["stop_reason"], "end_turn");
    assert!(v["usage"]["input_tokens"].is_i64() && v["usage"]["output_tokens"].is_i64());
    assert!(v["cost_usd"].as_f64().unwrap() > 0.0);
    assert!(v["duration_ms"].is_u64());
    let rec = records(&s.record_dir).pop().unwrap();
    let argv: Vec<String> = serde_json::from_value(rec["argv"].clone()).unwrap();
    assert_eq!(argv[0], "-p");
    // Cold runs use json output; warm ones stream-json in and out (same answer).
    assert!(
        argv.windows(2)
            .any(|w| w == ["--output-format", "json"] || w == ["--output-format", "stream-json"]),
        "{argv:?}"
    );
    assert!(argv.contains(&"--model=sonnet".to_string()), "{argv:?}");
    assert!(
        !argv.iter().any(|a| a.contains("--version")),
        "prompt leaked into argv: {argv:?}"
    );
    assert_eq!(rec["prompt"], "--version");

    let (st, v) = run(
        &s,
        &t,
        json!({"prompt": "hi", "model": "opus", "system": "--be terse"}),
    )
    .await;
    assert_eq!((st, v["model"].as_str()), (200, Some("opus")));
    let argv: Vec<String> =
        serde_json::from_value(records(&s.record_dir).pop().unwrap()["argv"].clone()).unwrap();
    assert!(
        argv.contains(&"--model=opus".to_string())
            && argv.contains(&"--system-prompt=--be terse".to_string()),
        "{argv:?}"
    );

    // 300 KB is more than one argv string may hold on Linux: it only works through stdin.
    let big = "a".repeat(300 * 1024);
    let (st, v) = run(&s, &t, json!({ "prompt": big })).await;
    assert_eq!(st, 200);
    assert_eq!(
        v["result"].as_str().unwrap().len(),
        "echo: ".len() + 300 * 1024
    );

    for (bad, code) in [
        (json!({"prompt": ""}), 400),
        (
            json!({"prompt": "x", "model": "--dangerously-skip-permissions"}),
            400,
        ),
        (json!({"prompt": "x", "timeout_secs": 0}), 400),
        (json!({"prompt": "x", "timeout_secs": 901}), 400),
        (json!({"prompt": "x", "timeout_secs": -1}), 400),
        (json!({"prompt": "x", "stream": "yes"}), 400),
        (json!({"prompt": "x", "files": ["ff_doesnotexist"]}), 404),
        (json!({"prompt": "x", "extra": 1}), 400),
        (json!({"model": "sonnet"}), 400),
    ] {
        let (st, v) = run(&s, &t, bad.clone()).await;
        assert_eq!(st, code, "{bad} -> {v}");
    }
    assert!(all_dirs_gone(&s));
}

#[tokio::test]
async fn prompt_size_limit_is_inclusive() {
    let s = TestServer::start_with(|c| c.settings.max_prompt_bytes = 1000).await;
    let (_, t) = s.mint("app").await;
    assert_eq!(
        run(&s, &t, json!({"prompt": "é".repeat(500)})).await.0,
        200,
        "exactly at the limit"
    );
    let (st, v) = run(&s, &t, json!({"prompt": "a".repeat(1001)})).await;
    assert_eq!((st, v["code"].as_str()), (413, Some("too_large")));
}

#[tokio::test]
async fn results_are_unfenced_and_parsed() {
    let s = TestServer::start().await;
    let (_, t) = s.mint("app").await;
    for (prompt, want) in [
        (
            r#"@stub:result=```json\n{"a": [1, 2]}\n```"#,
            json!({"a": [1, 2]}),
        ),
        (r#"@stub:result=```\n[true]\n```"#, json!([true])),
        (
            r#"@stub:result={"plain": "json"}"#,
            json!({"plain": "json"}),
        ),
        ("@stub:result=Just prose.", json!("Just prose.")),
    ] {
        let (st, v) = run(&s, &t, json!({ "prompt": prompt })).await;
        assert_eq!(st, 200, "{v}");
        assert_eq!(v["result"], want, "{prompt}");
    }
}

#[tokio::test]
async fn cli_failures_map_to_upstream_errors() {
    let s = TestServer::start().await;
    let (_, t) = s.mint("app").await;
    let (st, v) = run(
        &s,
        &t,
        json!({"prompt": "@stub:error=Not logged in · Please run /login"}),
    )
    .await;
    assert_eq!((st, v["code"].as_str()), (502, Some("upstream_error")));
    assert_eq!(v["error"], "Not logged in · Please run /login");
    let (st, v) = run(&s, &t, json!({"prompt": "@stub:api400"})).await;
    assert_eq!(st, 502);
    assert!(
        v["error"].as_str().unwrap().starts_with("API Error: 400"),
        "{v}"
    );
    let (st, v) = run(&s, &t, json!({"prompt": "@stub:max-turns"})).await;
    assert_eq!((st, v["error"].as_str()), (502, Some("Reached max turns")));
    let (st, v) = run(&s, &t, json!({"prompt": "@stub:crash"})).await;
    assert_eq!(
        (st, v["code"].as_str()),
        (502, Some("upstream_error")),
        "{v}"
    );
    let (st, v) = run(&s, &t, json!({"prompt": "@stub:garbage"})).await;
    assert_eq!(
        (st, v["code"].as_str()),
        (502, Some("upstream_error")),
        "{v}"
    );

    let reset = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    let res = s
        .app(&t, Method::POST, "/run")
        .json(&json!({"prompt": format!("@stub:usage-limit={reset}")}))
        .send()
        .await
        .unwrap();
    let retry: u64 = res.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((3590..=3600).contains(&retry), "{retry}");
    let (st, v) = body(res).await;
    assert_eq!((st, v["code"].as_str()), (429, Some("usage_limit")));

    let rows = s.audit_rows("run");
    assert_eq!(rows.len(), 6);
    assert!(rows.iter().all(|r| r["outcome"] == "error"), "{rows:?}");
    assert_eq!(rows[0]["exit_code"], 1);
    assert!(all_dirs_gone(&s));
}

#[tokio::test]
async fn timeout_kills_the_whole_group_even_when_sigterm_is_ignored() {
    let s = TestServer::start().await;
    let (_, t) = s.mint("app").await;
    let (st, v) = run(&s, &t, json!({"prompt": "@stub:ignore-term\n@stub:grandchild=hold-stdout\n@stub:hang", "timeout_secs": 1})).await;
    assert_eq!((st, v["code"].as_str()), (504, Some("timeout")));
    let rec = records(&s.record_dir).pop().unwrap();
    let pid = rec["pid"].as_i64().unwrap() as i32;
    let gc = grandchildren(&s.record_dir);
    assert_eq!(gc.len(), 1);
    // The answer waits for the group to be killed.
    assert!(!alive(pid), "the stub survived");
    eventually("grandchild gone", || !alive(gc[0])).await;
    assert!(all_dirs_gone(&s));
    assert_eq!(s.audit_rows("run")[0]["outcome"], "timeout");
}

#[tokio::test]
async fn output_over_the_cap_is_killed() {
    let s = TestServer::start_with(|c| c.settings.max_output_bytes = 1 << 20).await;
    let (_, t) = s.mint("app").await;
    for prompt in ["@stub:flood=50000000", "@stub:flood-lines=50000000"] {
        let (st, v) = run(&s, &t, json!({ "prompt": prompt })).await;
        assert_eq!(
            (st, v["code"].as_str()),
            (502, Some("output_too_large")),
            "{prompt}"
        );
    }
    // Just under the cap is fine: the result line still follows.
    let (st, _) = run(&s, &t, json!({"prompt": "@stub:flood=900000"})).await;
    assert_eq!(st, 200);
    assert!(all_dirs_gone(&s));
}

#[tokio::test]
async fn client_hangup_kills_the_run_and_removes_its_dir() {
    let s = TestServer::start().await;
    let (_, t) = s.mint("app").await;
    let req = s
        .app(&t, Method::POST, "/run")
        .json(&json!({"prompt": "@stub:grandchild\n@stub:hang"}))
        .send();
    let pending = tokio::spawn(req);
    let record_dir = s.record_dir.clone();
    // The stub writes its record before it starts the grandchild: wait for both.
    eventually("stub started its grandchild", || {
        !grandchildren(&record_dir).is_empty()
    })
    .await;
    let pid = records(&s.record_dir)[0]["pid"].as_i64().unwrap() as i32;
    assert!(!dir_gone(&records(&s.record_dir)[0]));
    pending.abort();
    eventually("stub killed after hangup", || !alive(pid)).await;
    let gc = grandchildren(&s.record_dir)[0];
    eventually("grandchild killed", || !alive(gc)).await;
    eventually("run dir removed", || all_dirs_gone(&s)).await;
    crate::harness::run_outcome_becomes(&s, "abandoned").await;
}

#[tokio::test]
async fn shutdown_kills_running_children() {
    let s = TestServer::start().await;
    let (_, t) = s.mint("app").await;
    let pending = tokio::spawn(
        s.app(&t, Method::POST, "/run")
            .json(&json!({"prompt": "@stub:ignore-term\n@stub:hang"}))
            .send(),
    );
    let record_dir = s.record_dir.clone();
    eventually("stub started", || !records(&record_dir).is_empty()).await;
    let pid = records(&s.record_dir)[0]["pid"].as_i64().unwrap() as i32;
    let dir = s.stop().await;
    assert!(!alive(pid));
    let res = pending.await.unwrap().unwrap();
    assert_eq!(res.status(), 503);
    assert!(records(&dir.path().join("records")).iter().all(dir_gone));
}

#[tokio::test]
async fn admission_caps_processes_and_queues_fifo() {
    let s = TestServer::start_with(|c| {
        c.settings.max_concurrent = 2;
        c.settings.max_queue = 64;
    })
    .await;
    let (_, t) = s.mint("app").await;
    let sampling = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let peak = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let sampler = {
        let (sampling, peak, state) = (sampling.clone(), peak.clone(), s.state.clone());
        tokio::spawn(async move {
            while sampling.load(std::sync::atomic::Ordering::SeqCst) {
                let n = state.slots.running();
                peak.fetch_max(n, std::sync::atomic::Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let mut all = Vec::new();
    for i in 0..6 {
        let req = s
            .app(&t, Method::POST, "/run")
            .json(&json!({"prompt": format!("n{i}\n@stub:sleep=0.3")}));
        all.push(tokio::spawn(async move {
            body(req.send().await.unwrap()).await
        }));
    }
    for h in all {
        assert_eq!(h.await.unwrap().0, 200);
    }
    sampling.store(false, std::sync::atomic::Ordering::SeqCst);
    sampler.await.unwrap();
    let peak = peak.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        (1..=2).contains(&peak),
        "peak {peak} processes with a cap of 2"
    );
}

#[tokio::test]
async fn full_queue_and_queue_timeout_answer_429() {
    let s = TestServer::start_with(|c| {
        c.settings.max_concurrent = 1;
        c.settings.max_queue = 1;
        c.settings.queue_timeout_secs = 1;
    })
    .await;
    let (_, t) = s.mint("app").await;
    let busy = tokio::spawn(
        s.app(&t, Method::POST, "/run")
            .json(&json!({"prompt": "@stub:hang", "timeout_secs": 30}))
            .send(),
    );
    let state = s.state.clone();
    eventually("first run holds the slot", || state.slots.running() == 1).await;
    let waiting = tokio::spawn(
        s.app(&t, Method::POST, "/run")
            .json(&json!({"prompt": "queued"}))
            .send(),
    );
    eventually("second run queued", || state.slots.queued() == 1).await;
    let res = s
        .app(&t, Method::POST, "/run")
        .json(&json!({"prompt": "no room"}))
        .send()
        .await
        .unwrap();
    assert!(res.headers().contains_key("retry-after"));
    let (st, v) = body(res).await;
    assert_eq!((st, v["code"].as_str()), (429, Some("overloaded")));
    let res = waiting.await.unwrap().unwrap();
    assert!(res.headers().contains_key("retry-after"));
    assert_eq!(body(res).await.0, 429, "queue timeout");
    busy.abort();
}

#[tokio::test]
async fn streaming_forwards_lines_then_the_same_result() {
    let s = TestServer::start().await;
    let (_, t) = s.mint("app").await;
    let res = stream_run(
        &s,
        &t,
        json!({"prompt": "@stub:result={\"x\":1}", "stream": true}),
    )
    .await;
    assert_eq!(res.status(), 200);
    assert!(res.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let events = sse_events(res).await;
    let names: Vec<&str> = events.iter().map(|(e, _)| e.as_str()).collect();
    // init, three token deltas (`--include-partial-messages`), assistant, result line.
    assert_eq!(
        names,
        [&["claude"; 6][..], &["result"]].concat(),
        "{events:?}"
    );
    assert_eq!(events[0].1["type"], "system");
    let deltas: String = events[1..4]
        .iter()
        .map(|(_, v)| v["event"]["delta"]["text"].as_str().unwrap())
        .collect();
    assert_eq!(deltas, r#"{"x":1}"#);
    assert_eq!(events[5].1["type"], "result");
    let streamed = &events[6].1;
    let (_, plain) = run(&s, &t, json!({"prompt": "@stub:result={\"x\":1}"})).await;
    let keys = |v: &Value| v.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
    assert_eq!(keys(streamed), keys(&plain));
    assert_eq!(streamed["result"], json!({"x": 1}));
    assert_eq!(streamed["ok"], true);

    // Accept: text/event-stream works too, and errors end the stream with `event: error`.
    let res = s
        .app(&t, Method::POST, "/run")
        .header("accept", "text/event-stream")
        .json(&json!({"prompt": "@stub:error=nope"}))
        .send()
        .await
        .unwrap();
    let events = sse_events(res).await;
    let (name, data) = events.last().unwrap();
    assert_eq!(name, "error");
    assert_eq!(data["code"], "upstream_error");
    assert_eq!(data["ok"], false);

    // Validation errors are plain JSON before any stream starts.
    let res = stream_run(&s, &t, json!({"prompt": "", "stream": true})).await;
    assert!(res.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/json"));
    assert_eq!(body(res).await.0, 400);
}

#[tokio::test]
async fn disconnecting_mid_stream_kills_the_run() {
    let s = TestServer::start().await;
    let (_, t) = s.mint("app").await;
    let mut res = stream_run(&s, &t, json!({"prompt": "@stub:sleep=60", "stream": true})).await;
    // The first event (system/init) proves the child runs.
    let first = res.chunk().await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&first).contains("event: claude"));
    let record_dir = s.record_dir.clone();
    eventually("stub recorded", || !records(&record_dir).is_empty()).await;
    let pid = records(&s.record_dir)[0]["pid"].as_i64().unwrap() as i32;
    drop(res);
    eventually("stub killed after the stream was dropped", || !alive(pid)).await;
    eventually("run dir removed", || all_dirs_gone(&s)).await;
}

#[tokio::test]
async fn audit_rows_record_runs_and_respect_prompt_privacy() {
    let s = TestServer::start().await;
    let (id, t) = s.mint("app").await;
    run(&s, &t, json!({"prompt": "remember me"})).await;
    let row = &s.audit_rows("run")[0];
    assert_eq!(row["token_id"], id.as_str());
    assert_eq!(row["prompt"], "remember me");
    assert_eq!(row["prompt_chars"], 11);
    assert_eq!(row["response_chars"], "echo: remember me".len());
    assert_eq!(row["outcome"], "ok");
    assert_eq!(row["exit_code"], 0);
    assert_eq!(row["model"], "sonnet");
    assert!(
        row["input_tokens"].is_i64() && row["output_tokens"].is_i64() && row["cost_usd"].is_f64()
    );
    assert!(row["subject"].as_str().unwrap().starts_with("run_"));
    assert!(!row.to_string().contains(&t));

    let s = TestServer::start_with(|c| c.settings.audit_prompts = false).await;
    let (_, t) = s.mint("app").await;
    run(&s, &t, json!({"prompt": "secret recipe"})).await;
    let row = &s.audit_rows("run")[0];
    assert_eq!(row["prompt"], Value::Null);
    assert_eq!(row["prompt_chars"], 13);
}

/// The audit row of the only run: (outcome, detail, duration_ms, cost_usd).
fn run_ending(s: &TestServer) -> (String, Option<String>, Option<i64>, Option<f64>) {
    s.db()
        .query_row(
            "SELECT outcome, detail, duration_ms, cost_usd FROM audit WHERE kind = 'run'
             ORDER BY id DESC LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )
        .unwrap()
}

/// Waits until the newest run row has left `running`, then returns it.
async fn settled_run(s: &TestServer) -> (String, Option<String>, Option<i64>, Option<f64>) {
    eventually("the run's audit row is closed", || {
        run_ending(s).0 != "running"
    })
    .await;
    run_ending(s)
}

#[tokio::test]
async fn a_hang_up_gives_the_same_audit_row_streamed_or_not() {
    let mut rows = Vec::new();
    for stream in [false, true] {
        let s = TestServer::start().await;
        let (_, t) = s.mint("app").await;
        let req = s
            .app(&t, Method::POST, "/run")
            .json(&json!({"prompt": "@stub:hang", "stream": stream}));
        let pending = tokio::spawn(async move {
            // Streamed: hold the open stream (never read it) until aborted.
            let res = req.send().await.unwrap();
            std::future::pending::<()>().await;
            drop(res);
        });
        let record_dir = s.record_dir.clone();
        eventually("stub started", || !records(&record_dir).is_empty()).await;
        let pid = records(&s.record_dir)[0]["pid"].as_i64().unwrap() as i32;
        pending.abort();
        eventually("stub killed after the hang-up", || !alive(pid)).await;
        let (outcome, detail, duration, _) = settled_run(&s).await;
        assert!(duration.is_some(), "a hang-up records how long the run ran");
        rows.push((outcome, detail));
    }
    assert_eq!(
        rows[0],
        ("abandoned".to_string(), Some("client_gone".into()))
    );
    assert_eq!(rows[0], rows[1], "streamed and plain hang-ups differ");
}

#[tokio::test]
async fn runs_are_cancellable_by_id_by_their_owner_only() {
    let s = TestServer::start().await;
    let (_, t) = s.mint("app").await;
    let (_, other) = s.mint("other").await;
    let res = stream_run(&s, &t, json!({"prompt": "@stub:hang", "stream": true})).await;
    let run_id = res.headers()["x-run-id"].to_str().unwrap().to_string();
    assert!(run_id.starts_with("run_"), "{run_id}");
    let record_dir = s.record_dir.clone();
    eventually("stub started", || !records(&record_dir).is_empty()).await;
    let pid = records(&s.record_dir)[0]["pid"].as_i64().unwrap() as i32;
    // Another token's run looks like a missing one.
    let (st, v) = cancel_run(&s, &other, &run_id).await;
    assert_eq!((st, v["code"].as_str()), (404, Some("not_found")), "{v}");
    let (st, _) = cancel_run(&s, &t, "run_nosuchrun").await;
    assert_eq!(st, 404);
    assert!(alive(pid), "a refused cancel stopped the run");

    let (st, v) = cancel_run(&s, &t, &run_id).await;
    assert_eq!((st, &v), (200, &json!({"ok": true, "cancelled": true})));
    assert!(!alive(pid), "the cancel answered before the run ended");
    let events = sse_events(res).await;
    let (name, answer) = events.last().unwrap();
    assert_eq!(name, "result", "{events:?}");
    assert_eq!(answer["ok"], true);
    assert_eq!(answer["stop_reason"], "cancelled");
    assert_eq!(answer["run_id"], run_id.as_str());
    let (outcome, detail, duration, _) = settled_run(&s).await;
    assert_eq!((outcome.as_str(), detail), ("cancelled", None));
    assert!(duration.is_some());
    assert!(all_dirs_gone(&s));
    // Ended: nothing left to cancel, still the caller's run.
    let (st, v) = cancel_run(&s, &t, &run_id).await;
    assert_eq!((st, &v), (200, &json!({"ok": true, "cancelled": false})));
    let (st, _) = cancel_run(&s, &other, &run_id).await;
    assert_eq!(st, 404);
}

async fn cancel_run(s: &TestServer, token: &str, run_id: &str) -> (u16, Value) {
    s.post_json(token, &format!("/runs/{run_id}/cancel"), &json!({}))
        .await
}

/// The cost the stub reports, whatever the ending.
const REPORTED: f64 = 0.25;

#[tokio::test]
async fn the_reported_cost_is_metered_on_every_ending() {
    let s = TestServer::start().await;
    let (_, t) = s.mint("app").await;
    // Answered.
    let (st, v) = run(&s, &t, json!({"prompt": "@stub:cost=0.25"})).await;
    assert_eq!((st, v["cost_usd"].as_f64()), (200, Some(REPORTED)));
    assert_eq!(settled_run(&s).await.3, Some(REPORTED), "answered");
    // Failed: `is_error` with a cost.
    let (st, _) = run(
        &s,
        &t,
        json!({"prompt": "@stub:error=boom\n@stub:cost=0.25"}),
    )
    .await;
    assert_eq!(st, 502);
    let (outcome, _, _, cost) = settled_run(&s).await;
    assert_eq!(
        (outcome.as_str(), cost),
        ("error", Some(REPORTED)),
        "failed"
    );
    // Timed out after the result line: a grandchild keeps the output open.
    let held = "@stub:cost=0.25\n@stub:grandchild=hold-stdout";
    let (st, _) = run(&s, &t, json!({"prompt": held, "timeout_secs": 1})).await;
    assert_eq!(st, 504);
    let (outcome, _, _, cost) = settled_run(&s).await;
    assert_eq!(
        (outcome.as_str(), cost),
        ("timeout", Some(REPORTED)),
        "timed out"
    );
    // Cancelled after the result line.
    let mut res = stream_run(&s, &t, json!({"prompt": held, "stream": true})).await;
    let run_id = res.headers()["x-run-id"].to_str().unwrap().to_string();
    read_until_result_line(&mut res).await;
    let (st, _) = cancel_run(&s, &t, &run_id).await;
    assert_eq!(st, 200);
    let (outcome, _, _, cost) = settled_run(&s).await;
    assert_eq!(
        (outcome.as_str(), cost),
        ("cancelled", Some(REPORTED)),
        "cancelled"
    );
    drop(res);
    // Abandoned after the result line was forwarded.
    let mut res = stream_run(&s, &t, json!({"prompt": held, "stream": true})).await;
    read_until_result_line(&mut res).await;
    drop(res);
    let (outcome, detail, _, cost) = settled_run(&s).await;
    assert_eq!(
        (outcome.as_str(), detail.as_deref(), cost),
        ("abandoned", Some("client_gone"), Some(REPORTED)),
        "abandoned"
    );
    let (st, usage) = body(s.app(&t, Method::GET, "/usage").send().await.unwrap()).await;
    assert_eq!(st, 200);
    let total = usage["today"]["cost_usd"].as_f64().unwrap();
    assert!((total - 5.0 * REPORTED).abs() < 1e-9, "{usage}");
}

#[tokio::test]
async fn hanging_up_after_the_result_still_spends_the_budget() {
    let s = TestServer::start().await;
    let (_, t) = s
        .mint_with(json!({"name": "tiny", "budget_usd_per_day": 0.0001}))
        .await;
    let mut res = stream_run(
        &s,
        &t,
        json!({"prompt": "@stub:cost=0.25\n@stub:grandchild=hold-stdout", "stream": true}),
    )
    .await;
    read_until_result_line(&mut res).await;
    drop(res);
    assert_eq!(settled_run(&s).await.0, "abandoned");
    let (st, v) = run(&s, &t, json!({"prompt": "again"})).await;
    assert_eq!(
        (st, v["code"].as_str()),
        (402, Some("budget_exhausted")),
        "{v}"
    );
}

/// Reads a streamed run until the CLI's `result` line has been forwarded.
async fn read_until_result_line(res: &mut reqwest::Response) {
    let mut seen = String::new();
    while !seen.contains(r#""type":"result""#) {
        let chunk = res.chunk().await.unwrap().expect("the stream ended early");
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
}

#[tokio::test]
async fn a_client_that_stops_reading_cannot_delay_the_deadline() {
    let s = TestServer::start_with(|c| c.settings.max_output_bytes = 1 << 30).await;
    let (_, t) = s.mint("app").await;
    let body = json!({"prompt": "@stub:flood-lines=200000000\n@stub:sleep=600",
                      "stream": true, "timeout_secs": 2})
    .to_string();
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut conn = socket.connect(s.addr).await.unwrap();
    let head = format!(
        "POST /run HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {t}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        s.addr,
        body.len()
    );
    tokio::io::AsyncWriteExt::write_all(&mut conn, format!("{head}{body}").as_bytes())
        .await
        .unwrap();
    // Never read from `conn` again.
    let record_dir = s.record_dir.clone();
    eventually("stub started", || !records(&record_dir).is_empty()).await;
    let pid = records(&s.record_dir)[0]["pid"].as_i64().unwrap() as i32;
    let (outcome, detail, _, _) = settled_run(&s).await;
    assert_eq!(
        (outcome.as_str(), detail.as_deref()),
        ("timeout", Some("timeout"))
    );
    eventually("the stub's group is gone", || !alive(pid)).await;
    drop(conn);
}

/// A stream that is quiet (the model thinks for a long time) still sends an SSE comment
/// line at least every 15 s, so a proxy or client read timeout does not take it for dead;
/// the run's result has not come, so the comment is the keep-alive and nothing else.
#[tokio::test]
async fn a_quiet_stream_sends_a_comment_line_before_its_result() {
    let s = TestServer::start().await;
    let (_, t) = s.mint("app").await;
    let mut res = stream_run(
        &s,
        &t,
        json!({"prompt": "@stub:sleep=120", "stream": true, "timeout_secs": 120}),
    )
    .await;
    assert_eq!(res.status(), 200);
    let mut text = String::new();
    while !text.split('\n').any(|l| l.starts_with(':')) {
        let chunk = tokio::time::timeout(Duration::from_secs(60), res.chunk())
            .await
            .expect("a keep-alive comment within a minute")
            .unwrap()
            .expect("the stream is still open");
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(!text.contains("event: result"), "{text}");
    drop(res);
    run_outcome_becomes(&s, "abandoned").await;
}
