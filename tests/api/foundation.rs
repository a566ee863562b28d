//! The foundation: envelope, admin token routes, auth, allowlists, healthz, audit paging,
//! persistence across restarts.

use std::net::SocketAddr;

use axum::extract::ConnectInfo;
use reqwest::Method;
use serde_json::{json, Value};
use tower::ServiceExt;

use crate::harness::{body, TestServer, ADMIN};

#[tokio::test]
async fn envelope_on_everything_axum_would_answer_itself() {
    let s = TestServer::start().await;
    let (st, v) = body(s.req(Method::GET, "/nope").send().await.unwrap()).await;
    assert_eq!((st, v["code"].as_str()), (404, Some("not_found")));
    let (st, v) = body(s.req(Method::PUT, "/healthz").send().await.unwrap()).await;
    assert_eq!((st, v["code"].as_str()), (405, Some("method_not_allowed")));

    let mint = |b: reqwest::RequestBuilder| async move { body(b.send().await.unwrap()).await };
    let (st, v) = mint(
        s.admin(Method::POST, "/admin/tokens")
            .header("content-type", "application/json")
            .body("{not json"),
    )
    .await;
    assert_eq!((st, v["code"].as_str()), (400, Some("bad_request")));
    let (st, v) = mint(
        s.admin(Method::POST, "/admin/tokens")
            .json(&json!({"name": 5})),
    )
    .await;
    assert_eq!((st, v["code"].as_str()), (400, Some("bad_request")), "{v}");
    let (st, v) = mint(
        s.admin(Method::POST, "/admin/tokens")
            .json(&json!({"name": "a", "colour": "red"})),
    )
    .await;
    assert_eq!(st, 400);
    assert!(v["error"].as_str().unwrap().contains("colour"), "{v}");
    let (st, _) = mint(
        s.admin(Method::POST, "/admin/tokens")
            .body("{\"name\":\"x\"}"),
    )
    .await;
    assert_eq!(st, 400, "missing content type");
    let (st, _) = mint(
        s.admin(Method::POST, "/admin/tokens")
            .json(&json!({"name": "a", "ip_cidrs": ["10.0.0.0/33"]})),
    )
    .await;
    assert_eq!(st, 400);

    let huge = "x".repeat(s.state.json_body_limit() + 1);
    let (st, v) = mint(
        s.admin(Method::POST, "/admin/tokens")
            .json(&json!({ "name": huge })),
    )
    .await;
    assert_eq!((st, v["code"].as_str()), (413, Some("too_large")));
}

#[tokio::test]
async fn admin_tokens_mint_list_revoke() {
    let s = TestServer::start().await;
    let (st, v) = body(
        s.admin(Method::POST, "/admin/tokens")
            .json(&json!({"name": "recipes", "ip_cidrs": ["192.168.1.0/24", "fd00::/8"]}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(st, 201);
    let token = v["token"].as_str().unwrap().to_string();
    let id = v["id"].as_str().unwrap().to_string();
    assert!(token.starts_with("cf_") && token.len() >= 3 + 32, "{token}");
    assert!(id.starts_with("tok_"));
    assert_eq!(v["name"], "recipes");
    assert_eq!(v["ip_cidrs"], json!(["192.168.1.0/24", "fd00::/8"]));
    assert!(v["created_at"].as_str().unwrap().ends_with('Z'));

    let (st, v) = body(s.admin(Method::GET, "/admin/tokens").send().await.unwrap()).await;
    assert_eq!(st, 200);
    let listed = &v["tokens"][0];
    assert_eq!(listed["id"], id.as_str());
    assert!(
        listed.get("token").is_none() && listed.get("hash").is_none(),
        "{listed}"
    );
    assert!(!v.to_string().contains(&token));
    for key in [
        "name",
        "ip_cidrs",
        "created_at",
        "last_used_at",
        "revoked_at",
    ] {
        assert!(listed.get(key).is_some(), "{key} missing: {listed}");
    }

    // Only the hash is stored: the plaintext appears in no file of the data dir (db + WAL).
    for entry in std::fs::read_dir(s.data_dir()).unwrap().flatten() {
        if entry.file_type().unwrap().is_file() {
            let bytes = std::fs::read(entry.path()).unwrap();
            assert!(
                !bytes.windows(token.len()).any(|w| w == token.as_bytes()),
                "plaintext found in {:?}",
                entry.path()
            );
        }
    }

    // App tokens are refused on the admin API; unknown bearers are 401.
    let (st, v) = body(
        s.app(&token, Method::GET, "/admin/tokens")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((st, v["code"].as_str()), (403, Some("forbidden")));
    let res = s
        .req(Method::GET, "/admin/tokens")
        .bearer_auth("wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(res.headers()["www-authenticate"], "Bearer");
    assert_eq!(body(res).await.0, 401);
    assert_eq!(
        body(s.req(Method::GET, "/admin/tokens").send().await.unwrap())
            .await
            .0,
        401
    );

    let (st, _) = body(
        s.admin(Method::DELETE, &format!("/admin/tokens/{id}"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(st, 200);
    let (st, v) = body(
        s.admin(Method::DELETE, "/admin/tokens/tok_nope")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((st, v["code"].as_str()), (404, Some("not_found")));
    // Revoked: now just an unknown bearer on the admin API.
    assert_eq!(
        body(
            s.app(&token, Method::GET, "/admin/tokens")
                .send()
                .await
                .unwrap()
        )
        .await
        .0,
        401
    );
    let (_, v) = body(s.admin(Method::GET, "/admin/tokens").send().await.unwrap()).await;
    assert!(v["tokens"][0]["revoked_at"].is_string());

    // Mint and revoke are audited, and the audit log pages newest first.
    let (_, v) = body(
        s.admin(Method::GET, "/admin/audit?limit=1")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(v["rows"][0]["kind"], "token_revoke");
    let before = v["next_before"].as_i64().unwrap();
    let (_, v) = body(
        s.admin(
            Method::GET,
            &format!("/admin/audit?limit=1&before={before}"),
        )
        .send()
        .await
        .unwrap(),
    )
    .await;
    assert_eq!(v["rows"][0]["kind"], "token_mint");
    assert_eq!(v["rows"][0]["subject"], id.as_str());
    let (_, v) = body(
        s.admin(
            Method::GET,
            &format!("/admin/audit?before={}", v["rows"][0]["id"]),
        )
        .send()
        .await
        .unwrap(),
    )
    .await;
    assert_eq!(v["rows"], json!([]));
    assert_eq!(v["next_before"], Value::Null);
    let (st, _) = body(
        s.admin(Method::GET, "/admin/audit?limit=0")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(st, 400);
    assert!(!serde_json::to_string(&s.audit_rows("token_mint"))
        .unwrap()
        .contains(&token));
}

#[tokio::test]
async fn admin_api_forbidden_without_bootstrap_token() {
    let s = TestServer::start_with(|c| c.settings.admin_bootstrap_token = None).await;
    let (st, v) = body(s.admin(Method::GET, "/admin/tokens").send().await.unwrap()).await;
    assert_eq!((st, v["code"].as_str()), (403, Some("forbidden")));
    let (st, _) = body(s.req(Method::GET, "/admin/audit").send().await.unwrap()).await;
    assert_eq!(st, 403);
}

#[tokio::test]
async fn tokens_and_audit_survive_a_restart() {
    let s = TestServer::start().await;
    let (id, _token) = s.mint("persist").await;
    let dir = s.stop().await;
    let s = TestServer::start_in(dir, |_| {}).await;
    let (_, v) = body(s.admin(Method::GET, "/admin/tokens").send().await.unwrap()).await;
    assert_eq!(v["tokens"][0]["id"], id.as_str());
    assert_eq!(s.audit_rows("token_mint").len(), 1);
}

#[tokio::test]
async fn healthz_reports_cached_probes_without_spawning() {
    let counts = tempfile::tempdir().unwrap();
    let counts_path = counts.path().to_path_buf();
    let s = TestServer::start_with(move |c| {
        c.child_env_overrides.push((
            "CLAUDE_STUB_COUNT_DIR".into(),
            counts_path.display().to_string(),
        ));
    })
    .await;
    let log = counts.path().join("invocations.log");
    // Version probes only: warm-pool processes are counted too, and are not probes.
    let probes = || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.ends_with("--version") || l.ends_with("auth status"))
            .count()
    };
    let probes_at_start = probes();
    assert_eq!(
        probes_at_start, 3,
        "claude --version, acpx --version and claude auth status before listening"
    );
    for _ in 0..20 {
        let (st, v) = body(s.req(Method::GET, "/healthz").send().await.unwrap()).await;
        assert_eq!(st, 200);
        assert_eq!(v["claude_present"], true);
        assert_eq!(v["claude_version"], "2.1.197 (Claude Code)");
        assert_eq!(v["acpx_present"], true);
        assert_eq!(v["acpx_version"], "0.19.1");
        assert!(v["version"].is_string() && v["uptime_secs"].is_u64());
    }
    assert_eq!(probes(), probes_at_start);
}

#[tokio::test]
async fn healthz_answers_with_missing_clis() {
    let s = TestServer::start_with(|c| {
        c.settings.claude_bin = "/nonexistent/claude".into();
        c.settings.acpx_bin = "/nonexistent/acpx".into();
    })
    .await;
    let (st, v) = body(s.req(Method::GET, "/healthz").send().await.unwrap()).await;
    assert_eq!(st, 200);
    assert_eq!(v["claude_present"], false);
    assert_eq!(v["claude_version"], Value::Null);
    assert_eq!(v["acpx_present"], false);
}

/// Drives the router directly with an injected peer address.
async fn call_from(
    router: &axum::Router,
    peer: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, Value) {
    let mut req = axum::http::Request::builder().uri(path);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let mut req = req.body(axum::body::Body::empty()).unwrap();
    let peer: SocketAddr = peer.parse().unwrap();
    req.extensions_mut().insert(ConnectInfo(peer));
    let res = router.clone().oneshot(req).await.unwrap();
    let status = res.status().as_u16();
    let bytes = axum::body::to_bytes(res.into_body(), 1 << 20)
        .await
        .unwrap();
    (status, serde_json::from_slice(&bytes).unwrap())
}

#[tokio::test]
async fn allowlists_on_the_router_with_injected_peers() {
    let s = TestServer::start_with(|c| {
        c.settings.allow_cidrs = vec![
            "192.168.1.0/24".parse().unwrap(),
            "fd00::/8".parse().unwrap(),
        ];
        c.settings.trusted_proxies = vec!["127.0.0.1/32".parse().unwrap()];
    })
    .await;
    let (_, token) = s
        .mint_with(json!({"name": "narrow", "ip_cidrs": ["192.168.1.7/32"]}))
        .await;
    let (_, wide) = s.mint("wide").await;
    let router = clawdforge::http::router(s.state.clone());

    for (peer, want) in [
        ("127.0.0.1:5000", 200),
        ("[::1]:5000", 200),
        ("192.168.1.20:5000", 200),
        ("[::ffff:192.168.1.20]:5000", 200),
        ("[fd00::5]:5000", 200),
        ("10.0.0.1:5000", 403),
        ("[::ffff:10.0.0.1]:5000", 403),
        ("[2001:db8::1]:5000", 403),
    ] {
        let (st, v) = call_from(&router, peer, "/healthz", &[]).await;
        assert_eq!(st, want, "{peer}: {v}");
        if st == 403 {
            assert_eq!(v["code"], "forbidden");
        }
    }
    // Unknown routes are refused before they are looked up.
    assert_eq!(call_from(&router, "10.0.0.1:1", "/nope", &[]).await.0, 403);

    // X-Forwarded-For counts only from a trusted proxy, and a loopback proxy forwarding
    // for an outside client does not make that client loopback.
    let (st, _) = call_from(
        &router,
        "127.0.0.1:1",
        "/healthz",
        &[("x-forwarded-for", "203.0.113.7")],
    )
    .await;
    assert_eq!(st, 403);
    let (st, _) = call_from(
        &router,
        "127.0.0.1:1",
        "/healthz",
        &[("x-forwarded-for", "192.168.1.9")],
    )
    .await;
    assert_eq!(st, 200);
    let (st, _) = call_from(
        &router,
        "192.168.1.9:1",
        "/healthz",
        &[("x-forwarded-for", "10.9.9.9")],
    )
    .await;
    assert_eq!(st, 200, "an untrusted peer's header is ignored");

    // Per-token CIDRs on top of the global list (an app route: GET /sessions).
    let auth = format!("Bearer {token}");
    let (st, v) = call_from(
        &router,
        "192.168.1.20:1",
        "/sessions",
        &[("authorization", &auth)],
    )
    .await;
    assert_eq!((st, v["code"].as_str()), (403, Some("forbidden")));
    let (st, _) = call_from(
        &router,
        "192.168.1.7:1",
        "/sessions",
        &[("authorization", &auth)],
    )
    .await;
    assert_eq!(st, 200);
    let auth = format!("Bearer {wide}");
    let (st, _) = call_from(
        &router,
        "192.168.1.20:1",
        "/sessions",
        &[("authorization", &auth)],
    )
    .await;
    assert_eq!(st, 200);
}

#[tokio::test]
async fn app_routes_want_an_app_token() {
    let s = TestServer::start().await;
    let (id, token) = s.mint("app").await;
    let (st, _) = body(
        s.app(&token, Method::GET, "/sessions")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(st, 200);
    for bad in [
        ADMIN,
        "cf_",
        "cf_0123456789012345678901234567890123456789abc",
        "nonsense",
    ] {
        let res = s.app(bad, Method::GET, "/sessions").send().await.unwrap();
        assert_eq!(res.headers()["www-authenticate"], "Bearer");
        let (st, v) = body(res).await;
        assert_eq!(
            (st, v["code"].as_str()),
            (401, Some("unauthorized")),
            "{bad}"
        );
    }
    assert_eq!(
        body(s.req(Method::GET, "/sessions").send().await.unwrap())
            .await
            .0,
        401
    );

    // last_used_at is written in batches; a graceful stop flushes it.
    let dir = s.stop().await;
    let s = TestServer::start_in(dir, |_| {}).await;
    let (_, v) = body(s.admin(Method::GET, "/admin/tokens").send().await.unwrap()).await;
    assert!(v["tokens"][0]["last_used_at"].is_string(), "{v}");

    // Revocation takes effect on the very next request.
    body(
        s.admin(Method::DELETE, &format!("/admin/tokens/{id}"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        body(
            s.app(&token, Method::GET, "/sessions")
                .send()
                .await
                .unwrap()
        )
        .await
        .0,
        401
    );
}
