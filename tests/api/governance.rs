//! Governance (issue #7): token policy through the admin API and the CLI, the usage ledger
//! and `/usage`, enforcement before spawning (budget, rate, concurrency, models, expiry,
//! the CLI's usage limit), rotation, `/metrics` and `/openapi.json`.

use std::collections::BTreeMap;

use reqwest::Method;
use serde_json::{json, Value};

use crate::harness::{body, eventually, TestServer};
use crate::harness::{patch, records, run};

/// `POST /run`, answered as the raw response (for its headers).
async fn post_run(s: &TestServer, token: &str, b: Value) -> reqwest::Response {
    s.app(token, Method::POST, "/run")
        .json(&b)
        .send()
        .await
        .unwrap()
}

async fn get(s: &TestServer, bearer: &str, path: &str) -> (u16, Value) {
    body(s.app(bearer, Method::GET, path).send().await.unwrap()).await
}

fn listed(list: &Value, id: &str) -> Value {
    list["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["id"] == id)
        .cloned()
        .unwrap()
}

fn retry_after(res: &reqwest::Response) -> u64 {
    res.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap()
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[tokio::test]
async fn policy_is_set_at_mint_patched_and_listed() {
    let s = TestServer::start().await;
    let res = s
        .admin(Method::POST, "/admin/tokens")
        .json(&json!({
            "name": "governed", "ip_cidrs": ["127.0.0.0/8"],
            "budget_usd_per_day": 1.5, "budget_usd_per_month": 20,
            "max_concurrent": 2, "rate_per_min": 30,
            "allowed_models": ["haiku", "sonnet"], "default_model": "haiku",
            "session_permissions": "deny-all", "expires_at": "2099-01-02T03:04:05Z"
        }))
        .send()
        .await
        .unwrap();
    let (st, minted) = body(res).await;
    assert_eq!(st, 201, "{minted}");
    let id = minted["id"].as_str().unwrap().to_string();
    let expected = json!({
        "ip_cidrs": ["127.0.0.0/8"], "budget_usd_per_day": 1.5, "budget_usd_per_month": 20.0,
        "max_concurrent": 2, "rate_per_min": 30, "allowed_models": ["haiku", "sonnet"],
        "default_model": "haiku", "session_permissions": "deny-all",
        "expires_at": "2099-01-02T03:04:05Z"
    });
    for (k, v) in expected.as_object().unwrap() {
        assert_eq!(&minted[k], v, "mint answer: {k}");
    }
    let (_, list) = get(&s, crate::harness::ADMIN, "/admin/tokens").await;
    let row = listed(&list, &id);
    for (k, v) in expected.as_object().unwrap() {
        assert_eq!(&row[k], v, "list: {k}");
    }
    assert!(row.get("hash").is_none() && row.get("token").is_none());

    // Omitted keeps, null clears, a value replaces.
    let (st, v) = patch(
        &s,
        &id,
        json!({"budget_usd_per_day": null, "rate_per_min": 5, "ip_cidrs": null}),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["budget_usd_per_day"], Value::Null);
    assert_eq!(v["rate_per_min"], 5);
    assert_eq!(v["ip_cidrs"], json!([]));
    assert_eq!(
        v["budget_usd_per_month"], 20.0,
        "omitted fields keep their value"
    );
    assert_eq!(v["default_model"], "haiku");
    let (_, list) = get(&s, crate::harness::ADMIN, "/admin/tokens").await;
    assert_eq!(listed(&list, &id)["rate_per_min"], 5);

    for bad in [
        json!({"budget": 1}),
        json!({"name": "renamed"}),
        json!({"budget_usd_per_day": -1}),
        json!({"budget_usd_per_day": "1"}),
        json!({"max_concurrent": 0}),
        json!({"rate_per_min": 1.5}),
        json!({"allowed_models": []}),
        json!({"allowed_models": ["opus"]}),
        json!({"default_model": "--help"}),
        json!({"session_permissions": "approve-most"}),
        json!({"expires_at": "next week"}),
        json!({"ip_cidrs": ["300.0.0.0/8"]}),
        json!([1, 2]),
    ] {
        let (st, v) = patch(&s, &id, bad.clone()).await;
        assert_eq!(
            (st, v["code"].as_str()),
            (400, Some("bad_request")),
            "{bad}: {v}"
        );
    }
    let (_, list) = get(&s, crate::harness::ADMIN, "/admin/tokens").await;
    assert_eq!(
        listed(&list, &id)["allowed_models"],
        json!(["haiku", "sonnet"])
    );
    let (st, _) = patch(&s, "tok_nosuchtoken", json!({"rate_per_min": 1})).await;
    assert_eq!(st, 404);
    let (_, app) = s.mint("app").await;
    let res = s
        .app(&app, Method::PATCH, &format!("/admin/tokens/{id}"))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 403);

    // Mint refuses what PATCH refuses, and unknown fields.
    for bad in [
        json!({"name": "x", "rate_per_min": 0}),
        json!({"name": "x", "colour": "blue"}),
        json!({"rate_per_min": 3}),
        json!({"name": "x", "allowed_models": ["haiku"], "default_model": "opus"}),
    ] {
        let res = s
            .admin(Method::POST, "/admin/tokens")
            .json(&bad)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 400, "{bad}");
    }
    let updates: i64 = s
        .db()
        .query_row(
            "SELECT count(*) FROM audit WHERE kind = 'token_update' AND subject = ?1",
            [&id],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(updates, 1, "one audit row per applied patch");
}

#[tokio::test]
async fn usage_is_metered_per_token_day_and_model() {
    let s = TestServer::start().await;
    let (id, t) = s.mint("metered").await;
    let (_, other) = s.mint("other").await;
    let mut cost = 0.0;
    let mut tokens_in = 0;
    for (prompt, model) in [("one", "sonnet"), ("two two", "sonnet"), ("three", "haiku")] {
        let (st, v) = run(&s, &t, json!({"prompt": prompt, "model": model})).await;
        assert_eq!(st, 200, "{v}");
        cost += v["cost_usd"].as_f64().unwrap();
        tokens_in += v["usage"]["input_tokens"].as_i64().unwrap();
    }
    // A failed run counts as a request at the cost the CLI reported (zero here).
    let (st, _) = run(&s, &t, json!({"prompt": "@stub:error=nope"})).await;
    assert_eq!(st, 502);
    assert_eq!(run(&s, &other, json!({"prompt": "not mine"})).await.0, 200);

    let (st, u) = get(&s, &t, "/usage").await;
    assert_eq!(st, 200, "{u}");
    let today = u["today"]["day"].as_str().unwrap().to_string();
    assert_eq!(today.len(), 10);
    assert_eq!(u["token_id"], id.as_str());
    assert_eq!(u["today"]["requests"], 4);
    assert_eq!(u["today"]["input_tokens"], tokens_in);
    assert!(
        (u["today"]["cost_usd"].as_f64().unwrap() - cost).abs() < 1e-9,
        "{u}"
    );
    assert_eq!(u["month"]["month"], &today[..7]);
    assert_eq!(u["month"]["requests"], 4);
    assert_eq!(u["by_day"], json!([u["today"].clone()]));
    let by_model: BTreeMap<String, i64> = u["by_model"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["model"].as_str().unwrap().to_string(),
                m["requests"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        by_model,
        BTreeMap::from([("haiku".into(), 1), ("sonnet".into(), 3)])
    );
    assert_eq!(u["budget"]["usd_per_day"], Value::Null);

    // The ledger agrees with the audit rows it was added up from.
    let audit_cost: f64 = s
        .db()
        .query_row(
            "SELECT sum(cost_usd) FROM audit WHERE kind = 'run' AND token_id = ?1",
            [&id],
            |r| r.get(0),
        )
        .unwrap();
    assert!((audit_cost - cost).abs() < 1e-9);

    let (st, a) = get(
        &s,
        crate::harness::ADMIN,
        &format!("/admin/usage?token_id={id}&from={today}&to={today}"),
    )
    .await;
    assert_eq!(st, 200, "{a}");
    let rows = a["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 2, "{a}");
    assert!(rows
        .iter()
        .all(|r| r["token_id"] == id.as_str() && r["token_name"] == "metered"));
    assert_eq!(a["totals"]["requests"], 4);
    let (_, all) = get(&s, crate::harness::ADMIN, "/admin/usage").await;
    assert_eq!(
        all["totals"]["requests"], 5,
        "default range: this month, every token"
    );
    assert_eq!(all["to"], today.as_str());
    let (_, none) = get(
        &s,
        crate::harness::ADMIN,
        "/admin/usage?from=2001-01-01&to=2001-01-31",
    )
    .await;
    assert_eq!(none["rows"], json!([]));
    for bad in [
        "from=2025-13-01",
        "to=yesterday",
        "from=2025-02-30",
        "from=2025-06-02&to=2025-06-01",
        "from=2020-01-01&to=2025-01-01",
        "colour=blue",
    ] {
        let (st, v) = get(&s, crate::harness::ADMIN, &format!("/admin/usage?{bad}")).await;
        assert_eq!(
            (st, v["code"].as_str()),
            (400, Some("bad_request")),
            "{bad}"
        );
    }
    assert_eq!(get(&s, &t, "/admin/usage").await.0, 403);
    assert_eq!(get(&s, crate::harness::ADMIN, "/usage").await.0, 401);
}

#[tokio::test]
async fn spent_budget_is_402_before_spawning() {
    let s = TestServer::start().await;
    let (id, t) = s
        .mint_with(json!({"name": "thrifty", "budget_usd_per_day": 0.000001}))
        .await;
    // Under budget (nothing spent yet): admitted, and it overspends by its own cost only.
    assert_eq!(run(&s, &t, json!({"prompt": "first"})).await.0, 200);
    let spawned = records(&s.record_dir).len();
    let (st, v) = run(&s, &t, json!({"prompt": "second"})).await;
    assert_eq!(
        (st, v["code"].as_str()),
        (402, Some("budget_exhausted")),
        "{v}"
    );
    assert_eq!(records(&s.record_dir).len(), spawned, "nothing was spawned");
    let (_, u) = get(&s, &t, "/usage").await;
    assert_eq!(u["budget"]["remaining_today"], 0.0);

    // Clearing the daily budget lifts it; a spent monthly budget refuses the same way.
    assert_eq!(
        patch(&s, &id, json!({"budget_usd_per_day": null})).await.0,
        200
    );
    assert_eq!(run(&s, &t, json!({"prompt": "third"})).await.0, 200);
    assert_eq!(
        patch(&s, &id, json!({"budget_usd_per_month": 0})).await.0,
        200
    );
    let (st, v) = run(&s, &t, json!({"prompt": "fourth"})).await;
    assert_eq!((st, v["code"].as_str()), (402, Some("budget_exhausted")));
    assert!(v["error"].as_str().unwrap().contains("monthly"), "{v}");
    assert_eq!(
        s.audit_rows("run").len(),
        2,
        "refused runs open no audit row"
    );
}

/// The overspend bound: a run that waited in the queue while the budget was spent is
/// refused once it gets its slot, before spawning; only work already running overspends.
#[tokio::test]
async fn queued_runs_recheck_the_budget_after_the_wait() {
    let s = TestServer::start_with(|c| c.settings.max_concurrent = 1).await;
    let (_, t) = s
        .mint_with(json!({"name": "queued", "budget_usd_per_day": 0.000001}))
        .await;
    let send = |prompt: &str| {
        let req = s
            .app(&t, Method::POST, "/run")
            .json(&json!({ "prompt": prompt }));
        tokio::spawn(async move { body(req.send().await.unwrap()).await })
    };
    let first = send("@stub:sleep=1");
    let slots = s.state.slots.clone();
    eventually("the first run holds the only slot", || slots.running() == 1).await;
    let second = send("second");
    let slots = s.state.slots.clone();
    eventually("the second run waits in line", || slots.queued() == 1).await;
    assert_eq!(first.await.unwrap().0, 200);
    let (st, v) = second.await.unwrap();
    assert_eq!(
        (st, v["code"].as_str()),
        (402, Some("budget_exhausted")),
        "{v}"
    );
    assert_eq!(
        records(&s.record_dir).len(),
        1,
        "the second run never spawned"
    );
}

#[tokio::test]
async fn rate_limit_is_429_with_retry_after() {
    let s = TestServer::start().await;
    let (_, t) = s
        .mint_with(json!({"name": "chatty", "rate_per_min": 2}))
        .await;
    let (_, other) = s.mint("quiet").await;
    for _ in 0..2 {
        assert_eq!(run(&s, &t, json!({"prompt": "hi"})).await.0, 200);
    }
    let res = post_run(&s, &t, json!({"prompt": "hi"})).await;
    let retry = retry_after(&res);
    assert!((1..=60).contains(&retry), "{retry}");
    let (st, v) = body(res).await;
    assert_eq!((st, v["code"].as_str()), (429, Some("rate_limited")));
    assert_eq!(
        run(&s, &other, json!({"prompt": "hi"})).await.0,
        200,
        "per token"
    );
}

#[tokio::test]
async fn token_concurrency_is_429_overloaded() {
    let s = TestServer::start().await;
    let (id, t) = s
        .mint_with(json!({"name": "one-at-a-time", "max_concurrent": 1}))
        .await;
    let hanging = {
        let req = s
            .app(&t, Method::POST, "/run")
            .json(&json!({"prompt": "@stub:hang"}));
        tokio::spawn(async move { req.send().await })
    };
    let state = s.state.clone();
    let id2 = id.clone();
    eventually("the first run is in flight", || {
        state.governor.in_flight(&id2) == 1
    })
    .await;
    let res = post_run(&s, &t, json!({"prompt": "second"})).await;
    assert_eq!(retry_after(&res), 1);
    let (st, v) = body(res).await;
    assert_eq!((st, v["code"].as_str()), (429, Some("overloaded")), "{v}");
    // The client hanging up ends the first run and frees the token's place.
    hanging.abort();
    let state = s.state.clone();
    eventually("the first run is gone", || {
        state.governor.in_flight(&id) == 0
    })
    .await;
    assert_eq!(run(&s, &t, json!({"prompt": "third"})).await.0, 200);
}

#[tokio::test]
async fn models_are_checked_and_default_model_applies() {
    let s = TestServer::start().await;
    let (_, t) = s
        .mint_with(json!({"name": "haiku-only", "allowed_models": ["haiku"],
                          "default_model": "haiku"}))
        .await;
    let (st, v) = run(&s, &t, json!({"prompt": "no model named"})).await;
    assert_eq!((st, v["model"].as_str()), (200, Some("haiku")), "{v}");
    let argv = records(&s.record_dir).pop().unwrap()["argv"].clone();
    assert!(
        argv.as_array().unwrap().contains(&json!("--model=haiku")),
        "{argv}"
    );
    let spawned = records(&s.record_dir).len();
    let (st, v) = run(&s, &t, json!({"prompt": "x", "model": "opus"})).await;
    assert_eq!((st, v["code"].as_str()), (403, Some("forbidden")), "{v}");
    assert_eq!(records(&s.record_dir).len(), spawned);
    // Without a token default the server's applies, and is checked like any other.
    let (_, t2) = s
        .mint_with(json!({"name": "opus-only", "allowed_models": ["opus"]}))
        .await;
    assert_eq!(run(&s, &t2, json!({"prompt": "x"})).await.0, 403);
    assert_eq!(
        run(&s, &t2, json!({"prompt": "x", "model": "opus"}))
            .await
            .0,
        200
    );
}

#[tokio::test]
async fn expired_tokens_are_401() {
    let s = TestServer::start().await;
    let (id, t) = s
        .mint_with(json!({"name": "old", "expires_at": "2001-01-01T00:00:00Z"}))
        .await;
    let res = s.app(&t, Method::GET, "/usage").send().await.unwrap();
    assert_eq!(res.status(), 401);
    assert_eq!(res.headers()["www-authenticate"], "Bearer");
    assert_eq!(run(&s, &t, json!({"prompt": "x"})).await.0, 401);
    assert_eq!(
        get(&s, &t, "/admin/tokens").await.0,
        401,
        "not even a 403 any more"
    );
    assert_eq!(
        patch(&s, &id, json!({"expires_at": "2099-01-01T00:00:00+02:00"}))
            .await
            .0,
        200
    );
    assert_eq!(run(&s, &t, json!({"prompt": "x"})).await.0, 200);
}

#[tokio::test]
async fn rotate_replaces_the_secret_and_keeps_the_rest() {
    let s = TestServer::start().await;
    let (id, old) = s
        .mint_with(json!({"name": "rotating", "rate_per_min": 100}))
        .await;
    assert_eq!(run(&s, &old, json!({"prompt": "before"})).await.0, 200);
    let res = s
        .admin(Method::POST, &format!("/admin/tokens/{id}/rotate"))
        .send()
        .await
        .unwrap();
    let (st, v) = body(res).await;
    assert_eq!(st, 200, "{v}");
    let new = v["token"].as_str().unwrap().to_string();
    assert!(new.starts_with("cf_") && new != old);
    assert_eq!(
        (v["id"].as_str(), v["rate_per_min"].as_i64()),
        (Some(id.as_str()), Some(100))
    );
    assert_eq!(
        run(&s, &old, json!({"prompt": "x"})).await.0,
        401,
        "old secret dead"
    );
    assert_eq!(run(&s, &new, json!({"prompt": "after"})).await.0, 200);
    let (_, u) = get(&s, &new, "/usage").await;
    assert_eq!(u["today"]["requests"], 2, "usage history kept");
    let kinds: Vec<String> = s
        .db()
        .prepare("SELECT kind FROM audit WHERE subject = ?1 ORDER BY id")
        .unwrap()
        .query_map([&id], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(kinds, ["token_mint", "token_rotate"]);

    let res = s
        .admin(Method::POST, "/admin/tokens/tok_nosuchtoken/rotate")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 404);
    s.admin(Method::DELETE, &format!("/admin/tokens/{id}"))
        .send()
        .await
        .unwrap();
    let res = s
        .admin(Method::POST, &format!("/admin/tokens/{id}/rotate"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400, "a revoked token stays revoked");
    assert_eq!(run(&s, &new, json!({"prompt": "x"})).await.0, 401);
}

#[tokio::test]
async fn usage_limit_blocks_runs_until_reset_without_spawning() {
    let s = TestServer::start().await;
    let (_, t) = s.mint("first").await;
    let (_, other) = s.mint("second").await;
    let reset = unix_now() + 600;
    let (st, v) = run(
        &s,
        &t,
        json!({"prompt": format!("@stub:usage-limit={reset}")}),
    )
    .await;
    assert_eq!((st, v["code"].as_str()), (429, Some("usage_limit")));
    let spawned = records(&s.record_dir).len();
    for token in [&t, &other] {
        let res = post_run(&s, token, json!({"prompt": "hello"})).await;
        let retry = retry_after(&res);
        assert!((590..=600).contains(&retry), "{retry}");
        let (st, v) = body(res).await;
        assert_eq!((st, v["code"].as_str()), (429, Some("usage_limit")));
    }
    assert_eq!(records(&s.record_dir).len(), spawned, "nothing was spawned");
    assert_eq!(s.audit_rows("run").len(), 1);
}

#[tokio::test]
async fn cli_mint_takes_policy_flags_and_rotates() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let out = crate::harness::bin()
        .env("CLAWDFORGE_DATA_DIR", &data)
        .args([
            "tokens",
            "mint",
            "--name",
            "cli",
            "--json",
            "--budget-usd-per-day",
            "2.5",
            "--token-max-concurrent",
            "3",
            "--allowed-model",
            "haiku",
            "--allowed-model",
            "sonnet",
            "--token-default-model",
            "sonnet",
            "--token-session-permissions",
            "approve-all",
            "--expires-at",
            "2099-05-06T07:08:09Z",
            "--rate-per-min",
            "9",
            "--budget-usd-per-month",
            "40",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["budget_usd_per_day"], 2.5);
    assert_eq!(v["allowed_models"], json!(["haiku", "sonnet"]));
    assert_eq!(v["session_permissions"], "approve-all");
    assert_eq!(
        (v["max_concurrent"].as_i64(), v["default_model"].as_str()),
        (Some(3), Some("sonnet"))
    );
    assert_eq!(v["expires_at"], "2099-05-06T07:08:09Z");
    let id = v["id"].as_str().unwrap();
    let out = crate::harness::bin()
        .env("CLAWDFORGE_DATA_DIR", &data)
        .args(["tokens", "rotate", id])
        .output()
        .unwrap();
    assert!(out.status.success());
    let new = String::from_utf8(out.stdout).unwrap();
    assert!(new.trim().starts_with("cf_") && new.trim() != v["token"].as_str().unwrap());
    let bad = crate::harness::bin()
        .env("CLAWDFORGE_DATA_DIR", &data)
        .args([
            "tokens",
            "mint",
            "--name",
            "x",
            "--token-max-concurrent",
            "0",
        ])
        .output()
        .unwrap();
    assert!(!bad.status.success());
}

/// One sample of an exposition.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// A strict reader of the OpenMetrics text format: every line must be a known comment, a
/// sample of a declared family with a suffix its type allows, and `# EOF` must end it.
fn parse_exposition(text: &str) -> Vec<Sample> {
    let mut types: BTreeMap<String, String> = BTreeMap::new();
    let mut samples = Vec::new();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines.last(),
        Some(&"# EOF"),
        "exposition must end with # EOF"
    );
    for line in &lines[..lines.len() - 1] {
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            let (kind, name) = (parts.next().unwrap(), parts.next().unwrap());
            let arg = parts
                .next()
                .unwrap_or_else(|| panic!("bare comment: {line}"));
            match kind {
                "TYPE" => {
                    assert!(
                        ["counter", "gauge", "histogram", "info", "unknown"].contains(&arg),
                        "{line}"
                    );
                    assert!(
                        types.insert(name.into(), arg.into()).is_none(),
                        "twice: {line}"
                    );
                }
                "HELP" | "UNIT" => {}
                _ => panic!("unknown comment: {line}"),
            }
            continue;
        }
        let (name, rest) = match line.find(['{', ' ']) {
            Some(i) => line.split_at(i),
            None => panic!("no value: {line}"),
        };
        let (labels, rest) = match rest.strip_prefix('{') {
            Some(l) => parse_labels(l, line),
            None => (BTreeMap::new(), rest),
        };
        let value = rest.strip_prefix(' ').unwrap_or_else(|| panic!("{line}"));
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().unwrap_or_else(|_| panic!("value: {line}")),
        };
        let family = types
            .iter()
            .filter(|(f, _)| name.starts_with(f.as_str()))
            .max_by_key(|(f, _)| f.len())
            .unwrap_or_else(|| panic!("sample of no declared family: {line}"));
        let suffix = &name[family.0.len()..];
        let allowed: &[&str] = match family.1.as_str() {
            "counter" => &["_total", "_created"],
            "histogram" => &["_bucket", "_sum", "_count", "_created"],
            "info" => &["_info"],
            _ => &[""],
        };
        assert!(
            allowed.contains(&suffix),
            "{suffix} on a {}: {line}",
            family.1
        );
        samples.push(Sample {
            name: name.to_string(),
            labels,
            value,
        });
    }
    samples
}

/// `key="value",...}` (after the `{`): the labels, and what follows the `}`.
fn parse_labels<'a>(l: &'a str, line: &str) -> (BTreeMap<String, String>, &'a str) {
    let mut labels = BTreeMap::new();
    let mut i = 0;
    loop {
        let eq = l[i..]
            .find("=\"")
            .unwrap_or_else(|| panic!("label: {line}"))
            + i;
        let key = &l[i..eq];
        assert!(
            !key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "label name {key:?}: {line}"
        );
        let mut value = String::new();
        let mut chars = l[eq + 2..].char_indices();
        let end = loop {
            match chars.next() {
                Some((_, '\\')) => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, c @ ('\\' | '"'))) => value.push(c),
                    other => panic!("bad escape {other:?}: {line}"),
                },
                Some((j, '"')) => break eq + 2 + j + 1,
                Some((_, c)) => value.push(c),
                None => panic!("unterminated label value: {line}"),
            }
        };
        assert!(labels.insert(key.to_string(), value).is_none(), "{line}");
        match l.as_bytes().get(end) {
            Some(b',') => i = end + 1,
            Some(b'}') => return (labels, &l[end + 1..]),
            other => panic!("after a label {other:?}: {line}"),
        }
    }
}

fn find<'a>(samples: &'a [Sample], name: &str, labels: &[(&str, &str)]) -> Option<&'a Sample> {
    samples.iter().find(|s| {
        s.name == name
            && labels
                .iter()
                .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(v))
    })
}

#[tokio::test]
async fn metrics_expose_the_series_and_need_the_admin_bearer() {
    let s = TestServer::start().await;
    let (id, t) = s.mint("scraped app").await;
    let (_, v) = run(&s, &t, json!({"prompt": "hello"})).await;
    let cost = v["cost_usd"].as_f64().unwrap();
    assert_eq!(run(&s, &t, json!({"prompt": "@stub:crash"})).await.0, 502);
    assert_eq!(get(&s, &t, &format!("/nope/{id}")).await.0, 404);
    s.state.metrics.sweeper_action("file_expired", 2);

    assert_eq!(
        get(&s, &t, "/metrics").await.0,
        403,
        "app tokens may not scrape"
    );
    assert_eq!(
        s.req(Method::GET, "/metrics")
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
    let res = s
        .admin(Method::GET, "/metrics")
        .header("accept", "application/openmetrics-text; version=1.0.0")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert!(res.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/openmetrics-text"));
    let samples = parse_exposition(&res.text().await.unwrap());

    let runs = find(
        &samples,
        "clawdforge_http_requests_total",
        &[("route", "/run"), ("method", "POST"), ("status", "200")],
    )
    .expect("requests by route template");
    assert_eq!(runs.value, 1.0);
    assert!(find(
        &samples,
        "clawdforge_http_requests_total",
        &[("status", "502")]
    )
    .is_some());
    assert!(
        find(
            &samples,
            "clawdforge_http_requests_total",
            &[("route", "unmatched"), ("status", "404")]
        )
        .is_some(),
        "unknown paths share one label"
    );
    assert!(samples
        .iter()
        .all(|s| !s.labels.get("route").is_some_and(|r| r.contains("tok_"))));
    let count = find(
        &samples,
        "clawdforge_run_duration_seconds_count",
        &[("outcome", "ok")],
    )
    .unwrap();
    assert_eq!(count.value, 1.0);
    assert!(find(
        &samples,
        "clawdforge_run_duration_seconds_bucket",
        &[("outcome", "error"), ("le", "+Inf")]
    )
    .is_some());
    assert_eq!(
        find(&samples, "clawdforge_processes_running", &[])
            .unwrap()
            .value,
        0.0
    );
    assert_eq!(
        find(&samples, "clawdforge_queue_depth", &[]).unwrap().value,
        0.0
    );
    assert_eq!(
        find(&samples, "clawdforge_cli_present", &[("cli", "claude")])
            .unwrap()
            .value,
        1.0
    );
    assert_eq!(
        find(&samples, "clawdforge_cli_logged_in", &[("cli", "claude")])
            .unwrap()
            .value,
        1.0
    );
    assert_eq!(
        find(
            &samples,
            "clawdforge_sweeper_actions_total",
            &[("action", "file_expired")]
        )
        .unwrap()
        .value,
        2.0
    );
    let spent = find(
        &samples,
        "clawdforge_cost_usd_total",
        &[("token_name", "scraped app"), ("token_id", &id)],
    )
    .unwrap();
    assert!((spent.value - cost).abs() < 1e-9);
    assert_eq!(
        find(
            &samples,
            "clawdforge_agent_requests_total",
            &[("token_id", &id)]
        )
        .unwrap()
        .value,
        2.0
    );
    assert!(
        find(
            &samples,
            "clawdforge_llm_tokens_total",
            &[("token_id", &id), ("direction", "output")]
        )
        .unwrap()
        .value
            > 0.0
    );

    let open = TestServer::start_with(|c| c.settings.metrics_open = true).await;
    let res = open.req(Method::GET, "/metrics").send().await.unwrap();
    assert_eq!(res.status(), 200, "open metrics need no bearer");
}

/// Every route of `shared/API.md`, as (method, path template).
const API_ROUTES: &[(&str, &str)] = &[
    ("get", "/healthz"),
    ("post", "/run"),
    ("post", "/runs/{run_id}/cancel"),
    ("post", "/files"),
    ("get", "/files/{file_token}"),
    ("delete", "/files/{file_token}"),
    ("post", "/sessions"),
    ("get", "/sessions"),
    ("get", "/sessions/{id}"),
    ("delete", "/sessions/{id}"),
    ("post", "/sessions/{id}/turn"),
    ("post", "/sessions/{id}/cancel"),
    ("post", "/admin/tokens"),
    ("get", "/admin/tokens"),
    ("patch", "/admin/tokens/{id}"),
    ("delete", "/admin/tokens/{id}"),
    ("post", "/admin/tokens/{id}/rotate"),
    ("get", "/admin/audit"),
    ("get", "/admin/usage"),
    ("get", "/admin/status"),
    ("get", "/admin/sessions"),
    ("delete", "/admin/sessions/{id}"),
    ("post", "/console/sign-in"),
    ("get", "/console/session"),
    ("post", "/console/sign-out"),
    ("get", "/usage"),
    ("get", "/metrics"),
    ("get", "/openapi.json"),
    ("post", "/v1/chat/completions"),
    ("post", "/v1/messages"),
    ("get", "/v1/models"),
    ("get", "/v1/models/{id}"),
];

/// Every error code of `shared/API.md`'s status table and the text beside it.
const API_CODES: &[&str] = &[
    "bad_request",
    "unauthorized",
    "budget_exhausted",
    "forbidden",
    "not_found",
    "method_not_allowed",
    "busy",
    "session_closed",
    "too_large",
    "overloaded",
    "rate_limited",
    "usage_limit",
    "upstream_error",
    "output_too_large",
    "timeout",
];

#[tokio::test]
async fn openapi_documents_every_route_and_code() {
    let s = TestServer::start().await;
    let res = s.req(Method::GET, "/openapi.json").send().await.unwrap();
    assert_eq!(res.status(), 200, "no token needed");
    let doc: Value = res.json().await.unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let paths = doc["paths"].as_object().unwrap();
    for (method, path) in API_ROUTES {
        let op = &paths
            .get(*path)
            .unwrap_or_else(|| panic!("{path} is missing from /openapi.json"))[*method];
        assert!(
            op.is_object(),
            "{} {path} is missing",
            method.to_uppercase()
        );
        let responses = op["responses"].as_object().unwrap();
        assert!(
            responses.keys().any(|k| k.starts_with('2')),
            "{method} {path}: no success answer"
        );
    }
    let codes = &doc["components"]["schemas"]["ErrorCode"]["enum"];
    for code in API_CODES {
        assert!(codes.as_array().unwrap().contains(&json!(code)), "{code}");
    }
    // Errors are documented with their envelope; successes with `ok` added to the body.
    let run = &paths["/run"]["post"]["responses"];
    for status in ["400", "401", "402", "403", "413", "429", "502", "504"] {
        assert_eq!(
            run[status]["content"]["application/json"]["schema"]["$ref"],
            "#/components/schemas/ErrorBody",
            "/run {status}"
        );
    }
    let ok = &run["200"]["content"]["application/json"]["schema"]["allOf"];
    assert_eq!(ok[0]["$ref"], "#/components/schemas/Envelope");
    assert_eq!(ok[1]["$ref"], "#/components/schemas/RunAnswer");
    assert!(run["200"]["content"]["text/event-stream"].is_object());
    let mint = &doc["components"]["schemas"]["MintBody"];
    assert_eq!(mint["required"], json!(["name"]));
    assert!(
        mint["properties"]["budget_usd_per_day"].is_object(),
        "{mint}"
    );
    let token = &doc["components"]["schemas"]["TokenRecord"]["allOf"];
    assert_eq!(token[0]["$ref"], "#/components/schemas/Policy", "{token}");
    let policy = &doc["components"]["schemas"]["Policy"]["properties"];
    for field in ["budget_usd_per_day", "session_permissions", "expires_at"] {
        assert!(policy[field].is_object(), "{field}");
    }
    assert!(doc["components"]["securitySchemes"]["admin"].is_object());
}
