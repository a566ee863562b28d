//! `Idempotency-Key` on `/run`, turns and the SDK routes (issue 13 item 2): a repeat gets
//! the first answer without a second run (counted by the stub's records, audit rows and the
//! usage ledger), 409 `busy` while the first runs, 422 for another body, 400 for a bad key,
//! per token, for 24 h, released when the first request ends without an answer.

use serde_json::{json, Value};

use crate::harness::{
    db_rw, eventually, keyed, keyed_answer, open_session, patch, records, sse_events, usage_ledger,
    TestServer,
};

#[tokio::test]
async fn a_repeat_gets_the_first_answer_and_runs_once() {
    let s = TestServer::start().await;
    let (id, t) = s.mint("app").await;
    let b = json!({"prompt": "count me", "timeout_secs": 30});
    let (st, replayed, first) = keyed_answer(keyed(&s, &t, "/run", b"order-42", &b)).await;
    assert_eq!((st, replayed), (200, false), "{first}");
    // The same body in another order and spacing is the same request.
    let same = keyed(&s, &t, "/run", b"order-42", &b)
        .body("{ \"timeout_secs\": 30, \"prompt\": \"count me\" }");
    let (st, replayed, again) = keyed_answer(same).await;
    assert_eq!((st, replayed), (200, true));
    assert_eq!(again, first, "byte for byte");
    let v: Value = serde_json::from_str(&first).unwrap();
    assert_eq!(v["result"], "echo: count me");

    assert_eq!(records(&s.record_dir).len(), 1, "one spawn");
    assert_eq!(s.audit_rows("run").len(), 1, "no audit row for the replay");
    assert_eq!(usage_ledger(&s, &id), (1, 1), "metered once");

    // Another body with the key: 422, nothing runs.
    let other = json!({"prompt": "something else"});
    let (st, _, text) = keyed_answer(keyed(&s, &t, "/run", b"order-42", &other)).await;
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        (st, v["ok"].clone(), v["code"].clone()),
        (422, json!(false), json!("idempotency_mismatch")),
        "{v}"
    );
    // Another token's key of the same name is its own.
    let (_, other_token) = s.mint("other").await;
    let (st, replayed, _) = keyed_answer(keyed(&s, &other_token, "/run", b"order-42", &b)).await;
    assert_eq!((st, replayed), (200, false));
    assert_eq!(records(&s.record_dir).len(), 2);
}

#[tokio::test]
async fn malformed_keys_are_400_in_each_routes_format() {
    let s = TestServer::start().await;
    let (_, t) = s.mint("app").await;
    let long = vec![b'k'; 256];
    let bad: [&[u8]; 4] = [b"", &long, b"caf\xc3\xa9", b"two words"];
    for key in bad {
        let (st, _, text) = keyed_answer(keyed(&s, &t, "/run", key, &json!({"prompt": "x"}))).await;
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!((st, v["code"].as_str()), (400, Some("bad_request")), "{v}");
        assert!(
            v["error"].as_str().unwrap().contains("Idempotency-Key"),
            "{v}"
        );
    }
    let chat = json!({"model": "sonnet", "messages": [{"role": "user", "content": "x"}]});
    let (st, _, text) = keyed_answer(keyed(&s, &t, "/v1/chat/completions", b"", &chat)).await;
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(st, 400);
    assert_eq!(
        (v["error"]["type"].as_str(), v["error"]["code"].as_str()),
        (Some("invalid_request_error"), Some("bad_request")),
        "{v}"
    );
    let msg =
        json!({"model": "sonnet", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]});
    let (st, _, text) = keyed_answer(keyed(&s, &t, "/v1/messages", &long, &msg)).await;
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(st, 400);
    assert_eq!(
        (v["type"].as_str(), v["error"]["type"].as_str()),
        (Some("error"), Some("invalid_request_error")),
        "{v}"
    );
    assert!(records(&s.record_dir).is_empty(), "nothing ran");
}

#[tokio::test]
async fn a_repeat_while_the_first_runs_is_busy() {
    let s = TestServer::start().await;
    let (id, t) = s.mint("app").await;
    let release = s.dir.path().join("release");
    let b = json!({"prompt": format!("@stub:wait-file={}", release.display())});
    let first = tokio::spawn(keyed_answer(keyed(&s, &t, "/run", b"k1", &b)));
    let record_dir = s.record_dir.clone();
    eventually("the first run started", || !records(&record_dir).is_empty()).await;

    let res = keyed(&s, &t, "/run", b"k1", &b).send().await.unwrap();
    assert_eq!(res.status(), 409);
    assert_eq!(res.headers()["retry-after"], "1");
    let v: Value = res.json().await.unwrap();
    assert_eq!(v["code"], "busy", "{v}");

    std::fs::write(&release, "").unwrap();
    let (st, replayed, answer) = first.await.unwrap();
    assert_eq!((st, replayed), (200, false), "{answer}");
    let (st, replayed, again) = keyed_answer(keyed(&s, &t, "/run", b"k1", &b)).await;
    assert_eq!((st, replayed, again), (200, true, answer));
    assert_eq!(records(&s.record_dir).len(), 1);
    assert_eq!(usage_ledger(&s, &id), (1, 1));
}

#[tokio::test]
async fn a_refused_request_releases_its_key() {
    let s = TestServer::start().await;
    let (id, t) = s
        .mint_with(json!({"name": "broke", "budget_usd_per_day": 0}))
        .await;
    let b = json!({"prompt": "after the top-up"});
    let (st, _, text) = keyed_answer(keyed(&s, &t, "/run", b"pay-1", &b)).await;
    assert_eq!(st, 402, "{text}");
    let (st, v) = patch(&s, &id, json!({"budget_usd_per_day": null})).await;
    assert_eq!(st, 200, "{v}");
    // The key was not spent by a refusal: the retry runs.
    let (st, replayed, text) = keyed_answer(keyed(&s, &t, "/run", b"pay-1", &b)).await;
    assert_eq!((st, replayed), (200, false), "{text}");
    assert_eq!(records(&s.record_dir).len(), 1);
    // A failure of the agent itself is an answer, and is kept.
    let b = json!({"prompt": "@stub:error=the model fell over"});
    let (st, _, first) = keyed_answer(keyed(&s, &t, "/run", b"fails", &b)).await;
    assert_eq!(st, 502, "{first}");
    let (st, replayed, again) = keyed_answer(keyed(&s, &t, "/run", b"fails", &b)).await;
    assert_eq!((st, replayed, again), (502, true, first));
    assert_eq!(records(&s.record_dir).len(), 2);
}

#[tokio::test]
async fn keys_run_again_once_a_day_old_and_swept() {
    let s = TestServer::start().await;
    let (_, t) = s.mint("app").await;
    let b = json!({"prompt": "daily"});
    assert_eq!(keyed_answer(keyed(&s, &t, "/run", b"d", &b)).await.0, 200);
    assert!(keyed_answer(keyed(&s, &t, "/run", b"d", &b)).await.1);
    let aged = db_rw(&s)
        .execute(
            "UPDATE idempotency_keys SET created_at = created_at - 86400001",
            [],
        )
        .unwrap();
    assert_eq!(aged, 1);
    let report = clawdforge::sweeper::sweep_once(&s.state.sweep).await;
    assert_eq!(report.idempotency_keys_deleted, 1, "{report:?}");
    let left: i64 = s
        .db()
        .query_row("SELECT COUNT(*) FROM idempotency_keys", [], |r| r.get(0))
        .unwrap();
    assert_eq!(left, 0);
    let (st, replayed, _) = keyed_answer(keyed(&s, &t, "/run", b"d", &b)).await;
    assert_eq!((st, replayed), (200, false));
    assert_eq!(records(&s.record_dir).len(), 2);
}

#[tokio::test]
async fn a_key_left_running_by_a_crash_is_released_at_start_up() {
    let s = TestServer::start().await;
    let (_, t) = s.mint("app").await;
    let dir = s.stop().await;
    let token_id: String = {
        let c = rusqlite::Connection::open(dir.path().join("data/clawdforge.db")).unwrap();
        let id: String = c
            .query_row("SELECT id FROM tokens", [], |r| r.get(0))
            .unwrap();
        c.execute(
            "INSERT INTO idempotency_keys (token_id, key_hash, request_hash, claim, state, created_at)
             VALUES (?1, x'00', x'00', 'idem_crashed', 'running', 0)",
            [&id],
        )
        .unwrap();
        id
    };
    let s = TestServer::start_in(dir, |_| {}).await;
    let left: i64 = s
        .db()
        .query_row(
            "SELECT COUNT(*) FROM idempotency_keys WHERE token_id = ?1",
            [&token_id],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(left, 0);
    assert_eq!(
        keyed_answer(keyed(&s, &t, "/run", b"k", &json!({"prompt": "x"})))
            .await
            .0,
        200
    );
}

#[tokio::test]
async fn a_turn_repeat_gets_the_first_answer() {
    let s = TestServer::start().await;
    let (id, t) = s.mint("app").await;
    let ses = open_session(&s, &t).await;
    let path = format!("/sessions/{ses}/turn");
    let b = json!({"prompt": "first turn"});
    let (st, replayed, first) = keyed_answer(keyed(&s, &t, &path, b"turn-1", &b)).await;
    assert_eq!((st, replayed), (200, false), "{first}");
    let (st, replayed, again) = keyed_answer(keyed(&s, &t, &path, b"turn-1", &b)).await;
    assert_eq!((st, replayed, again), (200, true, first));
    assert_eq!(s.audit_rows("turn").len(), 1);
    assert_eq!(usage_ledger(&s, &id).1, 1);
    // The next turn (a new key) is turn 2: the replay was not a turn.
    let (st, _, next) = keyed_answer(keyed(&s, &t, &path, b"turn-2", &b)).await;
    assert_eq!(st, 200);
    assert!(next.contains("echo[turn 2]"), "{next}");
    // The session is part of the request: the key on another session is another body.
    let other = open_session(&s, &t).await;
    let (st, _, text) = keyed_answer(keyed(
        &s,
        &t,
        &format!("/sessions/{other}/turn"),
        b"turn-1",
        &b,
    ))
    .await;
    assert_eq!(st, 422, "{text}");
}

#[tokio::test]
async fn a_streamed_run_repeat_replays_the_stream() {
    let s = TestServer::start().await;
    let (id, t) = s.mint("app").await;
    let b = json!({"prompt": "stream me", "stream": true});
    let res = keyed(&s, &t, "/run", b"s1", &b).send().await.unwrap();
    assert!(res.headers().get("idempotent-replayed").is_none());
    let first = sse_events(res).await;
    assert_eq!(first.last().unwrap().0, "result", "{first:?}");
    assert_eq!(first.last().unwrap().1["result"], "echo: stream me");
    // An EventSource-style client re-POSTs when the stream ends: it gets the stream again.
    let res = keyed(&s, &t, "/run", b"s1", &b).send().await.unwrap();
    assert_eq!(res.headers()["idempotent-replayed"], "true");
    assert!(res.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    assert_eq!(sse_events(res).await, first);
    assert_eq!(records(&s.record_dir).len(), 1);
    assert_eq!(usage_ledger(&s, &id), (1, 1));
    // Asking for the stream by `Accept` makes another request of the same body.
    let plain = json!({"prompt": "plain"});
    assert_eq!(
        keyed_answer(keyed(&s, &t, "/run", b"s2", &plain)).await.0,
        200
    );
    let res = keyed(&s, &t, "/run", b"s2", &plain)
        .header("accept", "text/event-stream")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 422);
}

#[tokio::test]
async fn openapi_documents_the_header_and_its_answers() {
    let s = TestServer::start().await;
    let doc = s.get_json("/openapi.json").await;
    for path in [
        "/run",
        "/sessions/{id}/turn",
        "/v1/chat/completions",
        "/v1/messages",
    ] {
        let op = &doc["paths"][path]["post"];
        let param = op["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == "Idempotency-Key")
            .unwrap_or_else(|| panic!("{path}: no Idempotency-Key"));
        assert_eq!(param["in"], "header");
        assert_eq!(
            (
                param["schema"]["minLength"].clone(),
                param["schema"]["maxLength"].clone()
            ),
            (json!(1), json!(255))
        );
        for status in ["409", "422"] {
            assert!(op["responses"][status].is_object(), "{path} {status}");
        }
        assert!(
            op["responses"]["200"]["headers"]["Idempotent-Replayed"].is_object(),
            "{path}"
        );
    }
}

#[tokio::test]
async fn a_client_that_hangs_up_before_its_answer_releases_the_key() {
    let s = TestServer::start().await;
    let (_, t) = s.mint("app").await;
    let release = s.dir.path().join("release");
    let b = json!({"prompt": format!("@stub:wait-file={}", release.display()), "stream": true});
    let mut res = keyed(&s, &t, "/run", b"gone", &b).send().await.unwrap();
    assert_eq!(res.status(), 200);
    // The first event (the CLI's init line) has arrived: the run is under way.
    assert!(res.chunk().await.unwrap().is_some());
    let record_dir = s.record_dir.clone();
    eventually("the run started", || !records(&record_dir).is_empty()).await;
    drop(res);
    let db = s.db();
    eventually("the key is released", || {
        db.query_row("SELECT COUNT(*) FROM idempotency_keys", [], |r| {
            r.get::<_, i64>(0)
        })
        .unwrap()
            == 0
    })
    .await;
    eventually("the run is abandoned", || {
        s.audit_rows("run")
            .first()
            .is_some_and(|r| r["outcome"] == "abandoned")
    })
    .await;
    // The retry runs for real.
    std::fs::write(&release, "").unwrap();
    let res = keyed(&s, &t, "/run", b"gone", &b).send().await.unwrap();
    assert!(res.headers().get("idempotent-replayed").is_none());
    let events = crate::harness::sse_events(res).await;
    assert_eq!(events.last().unwrap().0, "result", "{events:?}");
    assert_eq!(records(&s.record_dir).len(), 2);
}

#[tokio::test]
async fn a_stream_over_the_cap_replays_its_first_and_last_events() {
    let s = TestServer::start().await;
    let (_, t) = s.mint("app").await;
    let b = json!({"prompt": "@stub:flood-lines=1500000", "stream": true});
    let first = sse_events(keyed(&s, &t, "/run", b"big", &b).send().await.unwrap()).await;
    assert!(first.len() > 100, "{} events", first.len());
    assert_eq!(first.last().unwrap().0, "result");
    let res = keyed(&s, &t, "/run", b"big", &b).send().await.unwrap();
    assert_eq!(res.headers()["idempotent-replayed"], "true");
    let again = sse_events(res).await;
    let mut kept = vec![first[0].clone()];
    kept.extend_from_slice(&first[first.len() - 4..]);
    assert_eq!(again, kept);
    assert_eq!(records(&s.record_dir).len(), 1);
}

#[tokio::test]
async fn concurrent_first_requests_with_one_key_run_once() {
    let s = TestServer::start().await;
    let (id, t) = s.mint("app").await;
    let release = s.dir.path().join("release");
    let b = json!({"prompt": format!("@stub:wait-file={}", release.display())});
    let sent: Vec<_> = (0..5)
        .map(|_| tokio::spawn(keyed_answer(keyed(&s, &t, "/run", b"race", &b))))
        .collect();
    // Four answer at once (busy); the one holding the key waits for the release.
    eventually("four of five answered", || {
        sent.iter().filter(|h| h.is_finished()).count() == 4
    })
    .await;
    std::fs::write(&release, "").unwrap();
    let mut statuses = Vec::new();
    for h in sent {
        statuses.push(h.await.unwrap().0);
    }
    statuses.sort();
    assert_eq!(statuses, [200, 409, 409, 409, 409]);
    assert_eq!(records(&s.record_dir).len(), 1);
    assert_eq!(usage_ledger(&s, &id), (1, 1));
}
