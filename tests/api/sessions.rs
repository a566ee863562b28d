//! `/sessions/*` against the stub `acpx`: creating, turning, streaming, busy, cancel,
//! timeouts, closing, revocation, the sweeper, crash recovery and process leaks.

use std::path::{Path, PathBuf};
use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};

use crate::harness::*;

/// Starts a streamed turn and reads until its first message chunk: the agent is at work.
async fn streaming_turn(s: &TestServer, token: &str, id: &str, prompt: &str) -> reqwest::Response {
    let mut res = s
        .app(token, Method::POST, &format!("/sessions/{id}/turn"))
        .json(&json!({"prompt": prompt, "stream": true}))
        .send()
        .await
        .unwrap();
    let head = read_until(&mut res, "agent_message_chunk").await;
    assert!(head.contains("event: acp"), "{head}");
    res
}

/// A read-write connection, for ageing rows the way time would.
fn rw(s: &TestServer) -> rusqlite::Connection {
    let c = rusqlite::Connection::open(s.data_dir().join("clawdforge.db")).unwrap();
    c.busy_timeout(Duration::from_secs(5)).unwrap();
    c
}

/// Reads an SSE response until `needle` has arrived; returns what was read.
async fn read_until(res: &mut reqwest::Response, needle: &str) -> String {
    let mut text = String::new();
    while !text.contains(needle) {
        let chunk = tokio::time::timeout(Duration::from_secs(15), res.chunk())
            .await
            .expect("stream stalled")
            .unwrap()
            .unwrap_or_else(|| panic!("stream ended before {needle:?}: {text}"));
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    text
}

fn session_row(s: &TestServer, id: &str) -> Value {
    s.db()
        .query_row(
            "SELECT token_id, agent, model, system_prompt, acpx_record_id, cwd, status, turn_count
             FROM sessions WHERE id = ?1",
            [id],
            |r| {
                Ok(json!({
                    "token_id": r.get::<_, String>(0)?, "agent": r.get::<_, String>(1)?,
                    "model": r.get::<_, String>(2)?, "system_prompt": r.get::<_, Option<String>>(3)?,
                    "acpx_record_id": r.get::<_, Option<String>>(4)?, "cwd": r.get::<_, String>(5)?,
                    "status": r.get::<_, String>(6)?, "turn_count": r.get::<_, i64>(7)?,
                }))
            },
        )
        .unwrap()
}

fn invocations(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("invocations.log")).unwrap_or_default()
}

#[tokio::test]
async fn a_session_is_created_turned_listed_and_closed() {
    let count_dir = tempfile::tempdir().unwrap();
    let count = count_dir.path().display().to_string();
    let s = TestServer::start_with(|c| {
        c.child_env_overrides
            .push(("CLAUDE_STUB_COUNT_DIR".into(), count));
    })
    .await;
    let (a_id, a) = s.mint("a").await;
    let (_, b) = s.mint("b").await;

    // Creation: model and system prompt go to `sessions ensure`.
    let (st, v) = create(&s, &a, json!({"model": "haiku", "system": "Be brief."})).await;
    assert_eq!(st, 201, "{v}");
    let id = v["session_id"].as_str().unwrap().to_string();
    assert!(id.starts_with("ses_"));
    assert_eq!(
        (&v["agent"], &v["model"], &v["status"]),
        (&json!("claude"), &json!("haiku"), &json!("open"))
    );
    assert!(clawdforge::util::parse_rfc3339(v["created_at"].as_str().unwrap()).is_some());
    let row = session_row(&s, &id);
    assert_eq!(row["token_id"], a_id.as_str());
    assert_eq!(row["system_prompt"], "Be brief.");
    assert!(row["acpx_record_id"].is_string(), "{row}");
    let cwd = PathBuf::from(row["cwd"].as_str().unwrap());
    assert!(cwd.is_dir());
    assert_eq!(
        cwd,
        std::fs::canonicalize(s.state.config.sessions_dir.join(&id)).unwrap()
    );
    let ensure = invocations(count_dir.path());
    assert!(
        ensure.contains("--model=haiku")
            && ensure.contains("--system-prompt=Be brief.")
            && ensure.contains(&format!("claude sessions ensure --name {id}")),
        "{ensure}"
    );

    // An empty body is `{}`; unknown agents and fields are refused.
    let res = s.app(&a, Method::POST, "/sessions").send().await.unwrap();
    let (st, v) = body(res).await;
    assert_eq!((st, &v["model"]), (201, &json!("sonnet")), "{v}");
    let older = id.clone();
    let newer = v["session_id"].as_str().unwrap().to_string();
    for bad in [
        json!({"agent": "codex"}),
        json!({"bogus": 1}),
        json!({"model": "-x"}),
    ] {
        let (st, v) = create(&s, &a, bad.clone()).await;
        assert_eq!(
            (st, v["code"].as_str()),
            (400, Some("bad_request")),
            "{bad}"
        );
    }

    // Two turns: prompt on stdin, context carried, cost per turn (ACP reports a total).
    let (st, v) = turn(&s, &a, &id, json!({"prompt": "hello"})).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["session_id"], id.as_str());
    assert_eq!(v["turn_index"], 1);
    assert_eq!(v["text"], "echo[turn 1]: hello");
    assert_eq!(v["stop_reason"], "end_turn");
    assert!(v["duration_ms"].is_u64());
    assert_eq!(v["usage"]["cost_usd"], 0.0012);
    assert_eq!(v["usage"]["input_tokens"], 2);
    let events = v["events"].as_array().unwrap();
    assert!(events
        .iter()
        .any(|e| e["method"] == "session/prompt" && e["id"] == 2));
    assert!(
        !v["events"]
            .to_string()
            .contains("available_commands_update"),
        "command lists are left out"
    );
    let rec = records(&s.record_dir).pop().unwrap();
    let argv: Vec<String> = serde_json::from_value(rec["argv"].clone()).unwrap();
    for flag in [
        "--approve-reads",
        "--non-interactive-permissions=deny",
        "--ttl=3600",
        "--model=haiku",
        "-f",
        "-",
    ] {
        assert!(argv.contains(&flag.to_string()), "{flag} not in {argv:?}");
    }
    assert!(!argv.iter().any(|a| a.contains("hello")), "{argv:?}");
    assert_eq!(rec["prompt"], "hello");
    assert_eq!(rec["acpx_cwd"], cwd.display().to_string());

    let (st, v) = turn(&s, &a, &id, json!({"prompt": "again @stub:context"})).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["turn_index"], 2);
    assert!(
        v["text"].as_str().unwrap().ends_with("context: hello"),
        "{v}"
    );
    assert_eq!(v["usage"]["cost_usd"], 0.0012);
    let audit = s.audit_rows("turn");
    assert_eq!(audit.len(), 2);
    for row in &audit {
        assert_eq!(row["subject"], id.as_str());
        assert_eq!(row["outcome"], "ok");
        assert_eq!(row["model"], "haiku");
        assert_eq!(row["cost_usd"], 0.0012);
        assert!(row["input_tokens"].is_i64() && row["output_tokens"].is_i64());
    }
    assert_eq!(audit[0]["prompt"], "hello");

    // Reading it.
    let (st, v) = call(&s, &a, Method::GET, &format!("/sessions/{id}")).await;
    assert_eq!(st, 200);
    let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
    for k in [
        "ok",
        "session_id",
        "agent",
        "model",
        "status",
        "created_at",
        "last_used_at",
        "closed_at",
        "turn_count",
        "busy",
    ] {
        assert!(keys.contains(&k), "{k} missing: {v}");
    }
    assert_eq!((&v["turn_count"], &v["busy"]), (&json!(2), &json!(false)));
    assert_eq!(v["closed_at"], Value::Null);
    let listed = |v: &Value| -> Vec<String> {
        v["sessions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["session_id"].as_str().unwrap().to_string())
            .collect()
    };
    let (_, v) = call(&s, &a, Method::GET, "/sessions").await;
    assert_eq!(
        listed(&v),
        vec![newer.clone(), older.clone()],
        "newest first"
    );
    let (_, v) = call(&s, &b, Method::GET, "/sessions").await;
    assert!(listed(&v).is_empty(), "only the caller's");

    // Another token's session looks like no session.
    for (method, path) in [
        (Method::GET, format!("/sessions/{id}")),
        (Method::POST, format!("/sessions/{id}/cancel")),
        (Method::DELETE, format!("/sessions/{id}")),
    ] {
        let (st, v) = call(&s, &b, method, &path).await;
        assert_eq!((st, v["code"].as_str()), (404, Some("not_found")), "{path}");
    }
    let (st, _) = turn(&s, &b, &id, json!({"prompt": "x"})).await;
    assert_eq!(st, 404);

    // Closing: acpx close, dir gone, still readable, no more turns.
    let (st, v) = call(&s, &a, Method::DELETE, &format!("/sessions/{id}")).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["status"], "closed");
    assert!(v["closed_at"].is_string());
    assert!(!cwd.exists());
    assert!(invocations(count_dir.path()).contains(&format!("claude sessions close {id}")));
    let (st, v) = turn(&s, &a, &id, json!({"prompt": "x"})).await;
    assert_eq!((st, v["code"].as_str()), (409, Some("session_closed")));
    let (st, v) = call(&s, &a, Method::DELETE, &format!("/sessions/{id}")).await;
    assert_eq!((st, &v["status"]), (200, &json!("closed")), "idempotent");
    let (_, v) = call(&s, &a, Method::GET, "/sessions?status=open").await;
    assert_eq!(listed(&v), vec![newer.clone()]);
    let (_, v) = call(&s, &a, Method::GET, "/sessions?status=closed").await;
    assert_eq!(listed(&v), vec![older.clone()]);
    let (st, _) = call(&s, &a, Method::GET, "/sessions?status=gone").await;
    assert_eq!(st, 400);
    let (st, v) = call(&s, &a, Method::GET, "/sessions/ses_nosuchsession").await;
    assert_eq!((st, v["code"].as_str()), (404, Some("not_found")));
}

#[tokio::test]
async fn agents_are_limited_to_the_configured_list() {
    let s = TestServer::start_with(|c| {
        c.settings.agents = vec!["claude".into(), "codex".into()];
        c.child_env_overrides
            .push(("CLAUDE_STUB_AGENTS".into(), "claude,codex".into()));
    })
    .await;
    let (_, t) = s.mint("a").await;
    let (st, v) = create(&s, &t, json!({"agent": "codex"})).await;
    assert_eq!((st, &v["agent"]), (201, &json!("codex")), "{v}");
    let id = v["session_id"].as_str().unwrap();
    let (st, v) = turn(&s, &t, id, json!({"prompt": "hi"})).await;
    assert_eq!(st, 200, "{v}");
    let (st, _) = create(&s, &t, json!({"agent": "gemini"})).await;
    assert_eq!(st, 400);
}

#[tokio::test]
async fn session_permissions_reach_acpx() {
    let s = TestServer::start_with(|c| {
        c.settings.session_permissions = clawdforge::config::SessionPermissions::DenyAll;
    })
    .await;
    let (_, t) = s.mint("a").await;
    let id = open_session(&s, &t).await;
    let (st, v) = turn(&s, &t, &id, json!({"prompt": "@stub:argv"})).await;
    assert_eq!(st, 200, "{v}");
    let argv: Vec<String> = serde_json::from_str(v["text"].as_str().unwrap()).unwrap();
    assert!(argv.contains(&"--deny-all".to_string()), "{argv:?}");
    assert!(!argv.contains(&"--approve-reads".to_string()), "{argv:?}");
    assert!(argv.contains(&"--non-interactive-permissions=deny".to_string()));
}

#[tokio::test]
async fn busy_cancel_and_timeout_leave_the_session_usable() {
    let s = TestServer::start().await;
    let (_, t) = s.mint("a").await;
    let id = open_session(&s, &t).await;

    // A streamed turn that sleeps after its first chunk.
    let res = streaming_turn(&s, &t, &id, "@stub:sleep=30").await;
    let (_, v) = call(&s, &t, Method::GET, &format!("/sessions/{id}")).await;
    assert_eq!(v["busy"], true);
    let (st, v) = turn(&s, &t, &id, json!({"prompt": "me too"})).await;
    assert_eq!((st, v["code"].as_str()), (409, Some("busy")));

    let (st, v) = call(&s, &t, Method::POST, &format!("/sessions/{id}/cancel")).await;
    assert_eq!((st, &v["cancelled"]), (200, &json!(true)), "{v}");
    let events = sse_events(res).await;
    let (name, last) = events.last().unwrap();
    assert_eq!(name, "result", "{events:?}");
    assert_eq!(last["stop_reason"], "cancelled");
    assert_eq!(last["turn_index"], 1);
    let (_, v) = call(&s, &t, Method::GET, &format!("/sessions/{id}")).await;
    assert_eq!(v["busy"], false);
    let (st, v) = call(&s, &t, Method::POST, &format!("/sessions/{id}/cancel")).await;
    assert_eq!((st, &v["cancelled"]), (200, &json!(false)));

    // The same without streaming: the cancelled turn answers 200.
    let pending = spawn_turn(&s, &t, &id, "@stub:hang");
    let rec_dir = s.record_dir.clone();
    eventually("the hanging turn started", || records(&rec_dir).len() == 2).await;
    let (_, v) = call(&s, &t, Method::POST, &format!("/sessions/{id}/cancel")).await;
    assert_eq!(v["cancelled"], true);
    let (st, v) = pending.await.unwrap();
    assert_eq!((st, &v["stop_reason"]), (200, &json!("cancelled")), "{v}");
    assert_eq!(v["turn_index"], 2);

    // A turn past its timeout: 504, its process group killed.
    let (st, v) = turn(
        &s,
        &t,
        &id,
        json!({"prompt": "@stub:hang\n@stub:ignore-term", "timeout_secs": 1}),
    )
    .await;
    assert_eq!((st, v["code"].as_str()), (504, Some("timeout")), "{v}");
    let pid = records(&s.record_dir).pop().unwrap()["pid"]
        .as_i64()
        .unwrap() as i32;
    eventually("the timed-out turn is killed", || !alive(pid)).await;

    let (st, v) = turn(&s, &t, &id, json!({"prompt": "still here?"})).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["turn_index"], 4);
    let outcomes: Vec<String> = s
        .audit_rows("turn")
        .iter()
        .map(|r| r["outcome"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(outcomes, ["cancelled", "cancelled", "timeout", "ok"]);
}

#[tokio::test]
async fn streaming_turns_send_acp_events_then_the_json_answer() {
    let s = TestServer::start().await;
    let (_, t) = s.mint("a").await;
    let id = open_session(&s, &t).await;
    let res = s
        .app(&t, Method::POST, &format!("/sessions/{id}/turn"))
        .json(&json!({"prompt": "stream me", "stream": true}))
        .send()
        .await
        .unwrap();
    assert!(res.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let events = sse_events(res).await;
    let (last_name, result) = events.last().unwrap().clone();
    assert_eq!(last_name, "result");
    let acp: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|(name, v)| {
            assert_eq!(name, "acp");
            v.clone()
        })
        .collect();
    assert_eq!(result["ok"], true);
    assert_eq!(result["text"], "echo[turn 1]: stream me");
    assert_eq!(result["events"], Value::Array(acp), "the same lines");
    let (_, plain) = turn(&s, &t, &id, json!({"prompt": "plain"})).await;
    let keys = |v: &Value| {
        let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
        k.sort();
        k
    };
    assert_eq!(
        keys(&result),
        keys(&plain),
        "same body as without streaming"
    );

    // `Accept: text/event-stream` asks for the same; a failed turn ends with `event: error`.
    let res = s
        .app(&t, Method::POST, &format!("/sessions/{id}/turn"))
        .header("accept", "text/event-stream")
        .json(&json!({"prompt": "@stub:crash"}))
        .send()
        .await
        .unwrap();
    let events = sse_events(res).await;
    let (name, err) = events.last().unwrap();
    assert_eq!(name, "error", "{events:?}");
    assert_eq!(err["code"], "upstream_error");

    // Validation errors come before the stream, as plain JSON.
    for (path, b, status) in [
        (
            "/sessions/ses_missing/turn".to_string(),
            json!({"prompt": "x", "stream": true}),
            404,
        ),
        (
            format!("/sessions/{id}/turn"),
            json!({"prompt": "  ", "stream": true}),
            400,
        ),
        (
            format!("/sessions/{id}/turn"),
            json!({"prompt": "x", "stream": true, "model": "haiku"}),
            400,
        ),
    ] {
        let res = s
            .app(&t, Method::POST, &path)
            .json(&b)
            .send()
            .await
            .unwrap();
        assert!(res.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/json"));
        assert_eq!(body(res).await.0, status, "{b}");
    }
}

#[tokio::test]
async fn a_client_leaving_mid_stream_kills_the_turn() {
    let s = TestServer::start().await;
    let (_, t) = s.mint("a").await;
    let id = open_session(&s, &t).await;
    let res = streaming_turn(&s, &t, &id, "@stub:sleep=60").await;
    let pid = records(&s.record_dir)[0]["pid"].as_i64().unwrap() as i32;
    drop(res);
    eventually("the turn is killed", || !alive(pid)).await;
    eventually("the turn is recorded as abandoned", || {
        s.audit_rows("turn")
            .first()
            .is_some_and(|r| r["outcome"] == "abandoned")
    })
    .await;
    let (st, v) = turn(&s, &t, &id, json!({"prompt": "next"})).await;
    assert_eq!((st, &v["turn_index"]), (200, &json!(2)), "{v}");
}

#[tokio::test]
async fn acpx_failures_map_to_api_errors() {
    let s = TestServer::start_with(|c| c.settings.max_output_bytes = 200_000).await;
    let (_, t) = s.mint("a").await;
    let id = open_session(&s, &t).await;
    for (prompt, status, code) in [
        ("@stub:error=the model is tired", 502, "upstream_error"),
        ("@stub:fail=NO_SESSION", 502, "upstream_error"),
        ("@stub:garbage", 502, "upstream_error"),
        ("@stub:flood=500000", 502, "output_too_large"),
    ] {
        let (st, v) = turn(&s, &t, &id, json!({ "prompt": prompt })).await;
        assert_eq!(
            (st, v["code"].as_str()),
            (status, Some(code)),
            "{prompt}: {v}"
        );
        if prompt.contains("tired") {
            assert!(v["error"].as_str().unwrap().contains("the model is tired"));
        }
    }
    let (st, v) = turn(&s, &t, &id, json!({"prompt": "@stub:stop=max_tokens"})).await;
    assert_eq!((st, &v["stop_reason"]), (200, &json!("max_tokens")), "{v}");
    let outcomes: Vec<String> = s
        .audit_rows("turn")
        .iter()
        .map(|r| r["outcome"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(outcomes, ["error", "error", "error", "error", "ok"]);
}

#[tokio::test]
async fn attachments_are_staged_into_the_session_dir() {
    let s = TestServer::start().await;
    let (_, t) = s.mint("a").await;
    let id = open_session(&s, &t).await;
    let ft = crate::harness::upload(&s, &t, "recipe.txt", b"flour, water").await;
    let (st, v) = turn(
        &s,
        &t,
        &id,
        json!({"prompt": "read it @stub:cwd", "files": [ft]}),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    let files: Value = serde_json::from_str(v["text"].as_str().unwrap()).unwrap();
    assert_eq!(files["recipe.txt"], "flour, water");
    let rec = records(&s.record_dir).pop().unwrap();
    assert!(rec["prompt"]
        .as_str()
        .unwrap()
        .ends_with("\n\nAttached files: recipe.txt"));
    let (st, _) = turn(
        &s,
        &t,
        &id,
        json!({"prompt": "x", "files": ["ff_someoneelses"]}),
    )
    .await;
    assert_eq!(st, 404);
}

#[tokio::test]
async fn revoking_a_token_closes_its_sessions() {
    let s = TestServer::start().await;
    let (tok, t) = s.mint("a").await;
    let idle = open_session(&s, &t).await;
    let running = open_session(&s, &t).await;
    let pending = spawn_turn(&s, &t, &running, "@stub:hang");
    let rec_dir = s.record_dir.clone();
    eventually("the turn started", || records(&rec_dir).len() == 1).await;
    let pid = records(&s.record_dir)[0]["pid"].as_i64().unwrap() as i32;

    let res = s
        .admin(Method::DELETE, &format!("/admin/tokens/{tok}"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let (st, v) = pending.await.unwrap();
    assert_eq!(
        (st, v["code"].as_str()),
        (409, Some("session_closed")),
        "{v}"
    );
    assert!(!alive(pid), "the running turn was stopped");
    for id in [&idle, &running] {
        let row = session_row(&s, id);
        assert_eq!(row["status"], "closed");
        assert!(!Path::new(row["cwd"].as_str().unwrap()).exists());
    }
}

#[tokio::test]
async fn the_sweeper_closes_idle_sessions_and_deletes_what_expired() {
    let s = TestServer::start_with(|c| c.settings.sweep_interval_secs = 3600).await;
    let (tok, t) = s.mint("a").await;
    let idle = open_session(&s, &t).await;
    let fresh = open_session(&s, &t).await;
    let (st, _) = turn(&s, &t, &idle, json!({"prompt": "once"})).await;
    assert_eq!(st, 200);
    let now = clawdforge::util::now_ms();
    let hour = 3_600_000;
    let db = rw(&s);
    // A token revoked in the database alone (`clawdforge tokens revoke`): its sessions go.
    let (other_tok, other) = s.mint("revoked offline").await;
    let orphaned = open_session(&s, &other).await;
    db.execute(
        "UPDATE tokens SET revoked_at = ?2 WHERE id = ?1",
        rusqlite::params![other_tok, now],
    )
    .unwrap();
    db.execute(
        "UPDATE sessions SET last_used_at = ?2 WHERE id = ?1",
        rusqlite::params![idle, now - hour - 1000],
    )
    .unwrap();
    // Reading a session is not use.
    call(&s, &t, Method::GET, &format!("/sessions/{idle}")).await;

    // Orphans: a session dir and an old run dir nothing owns; a young run dir is kept.
    let sessions_dir = &s.state.config.sessions_dir;
    let runs_dir = &s.state.config.runs_dir;
    std::fs::create_dir_all(sessions_dir.join("ses_orphan")).unwrap();
    std::fs::create_dir_all(runs_dir.join("run_old")).unwrap();
    std::fs::create_dir_all(runs_dir.join("run_young")).unwrap();
    let old = std::time::SystemTime::now() - Duration::from_secs(3600);
    std::fs::File::open(runs_dir.join("run_old"))
        .unwrap()
        .set_modified(old)
        .unwrap();
    // An expired upload, and an audit row past the retention.
    let uploads = &s.state.config.uploads_dir;
    std::fs::write(uploads.join("ff_expired00001"), "old").unwrap();
    db.execute(
        "INSERT INTO files (file_token, token_id, filename, stored_name, size, sha256,
                            created_at, expires_at)
         VALUES ('ff_expired00001', ?1, 'a', 'a', 3, 'x', 0, ?2)",
        rusqlite::params![tok, now - 1000],
    )
    .unwrap();
    db.execute(
        "INSERT INTO audit (at, kind, outcome) VALUES (?1, 'run', 'ok')",
        [now - 91 * 86_400_000],
    )
    .unwrap();

    let report = clawdforge::sweeper::sweep_once(&s.state.sweep).await;
    assert_eq!(
        report,
        clawdforge::sweeper::SweepReport {
            sessions_closed: 2,
            sessions_deleted: 0,
            uploads_deleted: 1,
            run_dirs_removed: 1,
            session_dirs_removed: 1,
            audit_rows_deleted: 1,
            idempotency_keys_deleted: 0,
        }
    );
    assert_eq!(session_row(&s, &idle)["status"], "closed");
    assert_eq!(session_row(&s, &orphaned)["status"], "closed");
    assert_eq!(session_row(&s, &fresh)["status"], "open");
    assert!(!sessions_dir.join("ses_orphan").exists());
    assert!(sessions_dir.join(&fresh).exists());
    assert!(!runs_dir.join("run_old").exists() && runs_dir.join("run_young").exists());
    assert!(!uploads.join("ff_expired00001").exists());

    // Closed past the hard TTL: gone, row and all.
    db.execute(
        "UPDATE sessions SET closed_at = ?2 WHERE id = ?1",
        rusqlite::params![idle, now - 86_400_000 - 1000],
    )
    .unwrap();
    let report = clawdforge::sweeper::sweep_once(&s.state.sweep).await;
    assert_eq!((report.sessions_deleted, report.sessions_closed), (1, 0));
    let (st, _) = call(&s, &t, Method::GET, &format!("/sessions/{idle}")).await;
    assert_eq!(st, 404);
    assert_eq!(session_row(&s, &fresh)["status"], "open");
}

#[tokio::test]
async fn twenty_sessions_leave_no_processes_behind() {
    let s = TestServer::start_with(|c| {
        c.settings.sweep_interval_secs = 3600;
        // Counts every process under the test's HOME: /run's warm pool (on in the second
        // pass of the test command) refills in the background and would be counted too.
        c.settings.warm_pool = 0;
        c.child_env_overrides
            .push(("CLAUDE_STUB_QUEUE_OWNER".into(), "1".into()));
    })
    .await;
    let home = home(&s);
    let before = agent_processes(&home).len();
    let (_, t) = s.mint("a").await;
    let mut ids = Vec::new();
    for i in 0..20 {
        let id = open_session(&s, &t).await;
        let (st, v) = turn(&s, &t, &id, json!({ "prompt": format!("turn {i}") })).await;
        assert_eq!(st, 200, "{v}");
        ids.push(id);
    }
    let owners = agent_processes(&home).len() - before;
    assert_eq!(
        owners, 20,
        "one queue owner per session while they are open"
    );
    // Half closed by their clients, half by the sweeper once idle.
    for id in &ids[..10] {
        let (st, _) = call(&s, &t, Method::DELETE, &format!("/sessions/{id}")).await;
        assert_eq!(st, 200);
    }
    rw(&s)
        .execute(
            "UPDATE sessions SET last_used_at = 0 WHERE status = 'open'",
            [],
        )
        .unwrap();
    let report = clawdforge::sweeper::sweep_once(&s.state.sweep).await;
    assert_eq!(report.sessions_closed, 10);
    eventually("every queue owner is gone", || {
        agent_processes(&home).len() == before
    })
    .await;
    assert_eq!(
        std::fs::read_dir(&s.state.config.sessions_dir)
            .unwrap()
            .count(),
        0
    );
}

#[tokio::test]
async fn a_sigkilled_server_mid_turn_leaves_a_usable_session() {
    use crate::harness::serve;
    let dir = tempfile::tempdir().unwrap();
    let records_dir = dir.path().join("records");
    let home = dir.path().join("home");
    std::fs::create_dir_all(&records_dir).unwrap();
    std::fs::create_dir_all(&home).unwrap();
    let admin = "admin-secret-for-the-session-kill-test-0123";
    let (rec, home_s) = (
        records_dir.display().to_string(),
        home.display().to_string(),
    );
    let extra = [
        ("ADMIN_BOOTSTRAP_TOKEN", admin),
        ("CLAUDE_STUB_RECORD_DIR", rec.as_str()),
        ("HOME", home_s.as_str()),
    ];
    let data = dir.path().join("data");
    let mut served = serve(&data, &extra);
    let client = reqwest::Client::new();
    let (token, id) = served_session(&served.url, admin).await;
    let pending = spawn_served_turn(&served.url, &token, &id, "@stub:grandchild\n@stub:sleep=30");
    eventually("the turn started its grandchild", || {
        !crate::harness::grandchildren(&records_dir).is_empty()
    })
    .await;
    let grandchild = crate::harness::grandchildren(&records_dir)[0];
    let pid = records(&records_dir)[0]["pid"].as_i64().unwrap() as i32;

    served.child.kill().unwrap();
    served.child.wait().unwrap();
    assert!(pending.await.unwrap().is_err());
    eventually("acpx dies with the server", || !alive(pid)).await;
    assert!(alive(grandchild), "the grandchild outlives the server");
    // A queue-owner lock as real acpx leaves it when its owner dies with the rest: stale.
    let record_id: String = rusqlite::Connection::open(data.join("clawdforge.db"))
        .unwrap()
        .query_row(
            "SELECT acpx_record_id FROM sessions WHERE id = ?1",
            [&id],
            |r| r.get(0),
        )
        .unwrap();
    let key = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(record_id.as_bytes()));
    let lock = home.join(format!(".acpx/queues/{}.lock", &key[..24]));
    std::fs::create_dir_all(lock.parent().unwrap()).unwrap();
    std::fs::write(
        &lock,
        json!({"pid": pid, "sessionId": record_id, "socketPath": "/nonexistent.sock",
               "processIdentity": {"kind": "linux-proc", "startTicks": "1"}})
        .to_string(),
    )
    .unwrap();

    let served = serve(&data, &extra);
    assert!(!alive(grandchild), "start-up killed the survivor");
    assert!(!lock.exists(), "start-up cleared the stale lock");
    let db = rusqlite::Connection::open(data.join("clawdforge.db")).unwrap();
    let outcome: String = db
        .query_row("SELECT outcome FROM audit WHERE kind = 'turn'", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert_eq!(outcome, "abandoned");
    let res = client
        .get(format!("{}/sessions/{id}", served.url))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    let (_, v) = body(res).await;
    assert_eq!((&v["status"], &v["busy"]), (&json!("open"), &json!(false)));
    let res = client
        .post(format!("{}/sessions/{id}/turn", served.url))
        .bearer_auth(&token)
        .json(&json!({"prompt": "after the crash @stub:context"}))
        .send()
        .await
        .unwrap();
    let (st, v) = body(res).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["turn_index"], 2);
    assert!(v["text"]
        .as_str()
        .unwrap()
        .contains("context: @stub:grandchild"));
}
