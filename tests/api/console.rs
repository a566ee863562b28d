//! The operator console's server side: its page and security headers, sign-in with the
//! session cookie and CSRF token, the sign-in limit, the admin routes it reads
//! (`/admin/status`, `/admin/sessions`, audit filters), and CORS for the app routes.

use reqwest::header::{HeaderMap, SET_COOKIE};
use reqwest::Method;
use serde_json::{json, Value};

use crate::harness::open_session;
use crate::harness::{body, TestServer, ADMIN};

/// Signs in; returns the cookie pair (`cf_console=…`), the raw `Set-Cookie` and the CSRF token.
async fn sign_in(s: &TestServer, headers: HeaderMap) -> (String, String, String) {
    let res = s
        .req(Method::POST, "/console/sign-in")
        .headers(headers)
        .json(&json!({ "token": ADMIN }))
        .send()
        .await
        .unwrap();
    let set_cookie = res
        .headers()
        .get(SET_COOKIE)
        .expect("a Set-Cookie")
        .to_str()
        .unwrap()
        .to_string();
    let (status, v) = body(res).await;
    assert_eq!(status, 200, "{v}");
    let pair = set_cookie.split(';').next().unwrap().trim().to_string();
    (
        pair,
        set_cookie,
        v["csrf_token"].as_str().unwrap().to_string(),
    )
}

fn attributes(set_cookie: &str) -> Vec<String> {
    set_cookie
        .split(';')
        .skip(1)
        .map(|a| a.trim().to_ascii_lowercase())
        .collect()
}

#[tokio::test]
async fn the_console_page_is_served_with_a_strict_policy() {
    let s = TestServer::start().await;
    let res = s.req(Method::GET, "/").send().await.unwrap();
    assert_eq!(res.status(), 200);
    let csp = res.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(csp.contains("script-src 'self'"), "{csp}");
    assert!(
        !csp.contains("unsafe-inline") && !csp.contains("unsafe-eval"),
        "{csp}"
    );
    assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
    assert_eq!(res.headers()["x-frame-options"], "DENY");
    let html = res.text().await.unwrap();
    assert!(html.contains("Admin token") && html.contains("Sign in"));
    // Nothing from another host, and no inline script.
    assert!(
        !html.contains("http://") && !html.contains("https://"),
        "{html}"
    );
    assert!(!html.contains("<script>"), "inline script in the page");
    for path in ["/console/app.js", "/console/app.css"] {
        let res = s.req(Method::GET, path).send().await.unwrap();
        assert_eq!(res.status(), 200, "{path}");
        assert_eq!(res.headers()["x-frame-options"], "DENY");
        // The SVG namespace is a name, not an address anything is loaded from.
        let text = res
            .text()
            .await
            .unwrap()
            .replace("\"http://www.w3.org/2000/svg\"", "");
        assert!(
            !text.contains("https://") && !text.contains("http://"),
            "{path} names another host"
        );
    }
}

#[tokio::test]
async fn with_the_console_off_nothing_is_served_at_the_root() {
    let s = TestServer::start_with(|c| c.settings.console = false).await;
    for (method, path) in [(Method::GET, "/"), (Method::POST, "/console/sign-in")] {
        let (status, v) = body(s.req(method, path).send().await.unwrap()).await;
        assert_eq!(status, 404, "{path}: {v}");
        assert_eq!(v["code"], "not_found");
    }
}

#[tokio::test]
async fn a_console_session_stands_in_for_the_bearer_with_csrf_on_changes() {
    let s = TestServer::start().await;
    let (cookie, set_cookie, csrf) = sign_in(&s, HeaderMap::new()).await;
    let attrs = attributes(&set_cookie);
    for want in ["httponly", "samesite=strict", "path=/", "max-age=43200"] {
        assert!(
            attrs.iter().any(|a| a == want),
            "{want} missing: {set_cookie}"
        );
    }
    assert!(
        !attrs.iter().any(|a| a == "secure"),
        "Secure over plain HTTP: {set_cookie}"
    );

    // The session's script learns the CSRF token from /console/session.
    let (status, v) = body(
        s.req(Method::GET, "/console/session")
            .header("cookie", &cookie)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status, v["csrf_token"].as_str()),
        (200, Some(csrf.as_str()))
    );

    // Reads need only the cookie.
    let (status, _) = body(
        s.req(Method::GET, "/admin/tokens")
            .header("cookie", &cookie)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 200);

    // A change without (or with a wrong) CSRF token is refused and changes nothing.
    for csrf_header in [None, Some("wrong")] {
        let mut req = s
            .req(Method::POST, "/admin/tokens")
            .header("cookie", &cookie)
            .json(&json!({"name": "forged"}));
        if let Some(h) = csrf_header {
            req = req.header("x-csrf-token", h);
        }
        let (status, v) = body(req.send().await.unwrap()).await;
        assert_eq!(
            (status, v["code"].as_str()),
            (403, Some("forbidden")),
            "{v}"
        );
    }
    let forged: i64 = s
        .db()
        .query_row(
            "SELECT count(*) FROM tokens WHERE name = 'forged'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(forged, 0);

    let (status, v) = body(
        s.req(Method::POST, "/admin/tokens")
            .header("cookie", &cookie)
            .header("x-csrf-token", &csrf)
            .json(&json!({"name": "from-console"}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 201, "{v}");
    let detail: String = s
        .db()
        .query_row(
            "SELECT detail FROM audit WHERE kind = 'token_mint' AND subject = ?1",
            [v["id"].as_str().unwrap()],
            |r| r.get(0),
        )
        .unwrap();
    assert!(detail.starts_with("by admin"), "{detail}");

    // Sign-out needs the CSRF token too, then the cookie is worthless.
    let (status, _) = body(
        s.req(Method::POST, "/console/sign-out")
            .header("cookie", &cookie)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 403);
    let res = s
        .req(Method::POST, "/console/sign-out")
        .header("cookie", &cookie)
        .header("x-csrf-token", &csrf)
        .send()
        .await
        .unwrap();
    let cleared = res.headers()[SET_COOKIE].to_str().unwrap().to_string();
    assert!(
        cleared.starts_with("cf_console=;") && cleared.contains("Max-Age=0"),
        "{cleared}"
    );
    assert_eq!(body(res).await.0, 200);
    for (method, path) in [
        (Method::GET, "/admin/tokens"),
        (Method::GET, "/console/session"),
    ] {
        let (status, _) = body(
            s.req(method, path)
                .header("cookie", &cookie)
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(status, 401, "{path} after sign-out");
    }
}

#[tokio::test]
async fn app_tokens_and_wrong_tokens_cannot_sign_in_and_failures_are_limited() {
    let s = TestServer::start().await;
    let (_, app) = s.mint("app").await;
    let attempt = |token: String| {
        let req = s
            .req(Method::POST, "/console/sign-in")
            .json(&json!({ "token": token }));
        async move { req.send().await.unwrap() }
    };
    let (status, v) = body(attempt(app.clone()).await).await;
    assert_eq!(
        (status, v["code"].as_str()),
        (403, Some("forbidden")),
        "{v}"
    );
    for _ in 0..4 {
        let res = attempt("not-the-admin-token".into()).await;
        assert!(res.headers().get(SET_COOKIE).is_none());
        assert_eq!(body(res).await.0, 401);
    }
    // That was five failures within the minute: even the right token is now refused.
    let res = attempt(ADMIN.into()).await;
    let retry: u64 = res.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    let (status, v) = body(res).await;
    assert_eq!((status, v["code"].as_str()), (429, Some("rate_limited")));
    // Unknown fields and bad bodies are 400, as everywhere.
    let (status, _) = body(
        s.req(Method::POST, "/console/sign-in")
            .json(&json!({"token": ADMIN, "remember": true}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 400);
}

#[tokio::test]
async fn the_cookie_is_secure_only_behind_a_trusted_tls_proxy() {
    let s = TestServer::start_with(|c| {
        c.settings.trusted_proxies = vec!["127.0.0.1/32".parse().unwrap()]
    })
    .await;
    let mut tls = HeaderMap::new();
    tls.insert("x-forwarded-proto", "https".parse().unwrap());
    let (_, set_cookie, _) = sign_in(&s, tls.clone()).await;
    assert!(
        attributes(&set_cookie).contains(&"secure".into()),
        "{set_cookie}"
    );
    let (_, set_cookie, _) = sign_in(&s, HeaderMap::new()).await;
    assert!(
        !attributes(&set_cookie).contains(&"secure".into()),
        "{set_cookie}"
    );

    // From a peer that is no trusted proxy the header is the client's word: ignored.
    let s = TestServer::start().await;
    let (_, set_cookie, _) = sign_in(&s, tls).await;
    assert!(
        !attributes(&set_cookie).contains(&"secure".into()),
        "{set_cookie}"
    );
}

#[tokio::test]
async fn admin_status_has_the_doctors_checks_and_the_health_figures() {
    let s = TestServer::start().await;
    let (status, v) = body(s.admin(Method::GET, "/admin/status").send().await.unwrap()).await;
    assert_eq!(status, 200, "{v}");
    let checks = v["checks"].as_array().unwrap();
    let check = |name: &str| {
        checks
            .iter()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("no {name} check in {v}"))
            .clone()
    };
    assert_eq!(check("claude")["ok"], true);
    assert!(check("claude")["detail"]
        .as_str()
        .unwrap()
        .contains("2.1.197"));
    assert_eq!(check("login")["ok"], true);
    assert_eq!(check("login")["status"], "ok");
    assert!(check("disk")["detail"].is_string());
    for c in checks {
        assert!(
            c["ok"].is_boolean() && c["detail"].is_string() && c.get("fix").is_some(),
            "{c}"
        );
    }
    assert_eq!(v["claude_present"], true);
    assert!(v["claude_version"].as_str().unwrap().contains("2.1.197"));
    assert!(v["warm_pool"].is_object() && v["uptime_secs"].is_u64());
    assert_eq!(v["processes_running"], 0);
    assert_eq!(v["queue_depth"], 0);

    // A logged-out CLI is a failed check with the doctor's fix.
    let s = TestServer::start_with(|c| {
        c.child_env_overrides
            .push(("CLAUDE_STUB_LOGGED_OUT".into(), "1".into()))
    })
    .await;
    let (_, v) = body(s.admin(Method::GET, "/admin/status").send().await.unwrap()).await;
    let login = v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "login")
        .unwrap()
        .clone();
    assert_eq!(
        (login["ok"].as_bool(), v["ready"].as_bool()),
        (Some(false), Some(false))
    );
    assert!(login["fix"].as_str().unwrap().contains("/login"), "{login}");

    let (_, app) = s.mint("app").await;
    let (status, _) = body(
        s.app(&app, Method::GET, "/admin/status")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 403);
    let (status, _) = body(s.req(Method::GET, "/admin/status").send().await.unwrap()).await;
    assert_eq!(status, 401);
}

#[tokio::test]
async fn admin_sessions_lists_every_app_and_closes_any() {
    let s = TestServer::start().await;
    let (a_id, a) = s.mint("alpha").await;
    let (b_id, b) = s.mint("beta").await;
    let sa = open_session(&s, &a).await;
    let sb = open_session(&s, &b).await;

    let list = |q: &'static str| {
        let req = s.admin(Method::GET, &format!("/admin/sessions{q}"));
        async move { body(req.send().await.unwrap()).await }
    };
    let (status, v) = list("").await;
    assert_eq!(status, 200, "{v}");
    let ids: Vec<(&str, &str, &str)> = v["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["session_id"].as_str().unwrap(),
                s["token_id"].as_str().unwrap(),
                s["token_name"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        ids,
        [
            (sb.as_str(), b_id.as_str(), "beta"),
            (sa.as_str(), a_id.as_str(), "alpha")
        ],
        "newest first"
    );
    assert_eq!(v["sessions"][0]["busy"], false);
    assert_eq!(v["sessions"][0]["status"], "open");

    let (status, v) = body(
        s.admin(Method::DELETE, &format!("/admin/sessions/{sa}"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        (v["status"].as_str(), v["token_name"].as_str()),
        (Some("closed"), Some("alpha"))
    );
    // The owner sees it closed, as after its own DELETE; its dir is gone.
    let (_, mine) = body(
        s.app(&a, Method::GET, &format!("/sessions/{sa}"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(mine["status"], "closed");
    let rows = s.audit_rows("session_close");
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(
        (rows[0]["subject"].as_str(), rows[0]["token_id"].as_str()),
        (Some(sa.as_str()), Some(a_id.as_str()))
    );
    // Again: idempotent, and no second audit row.
    let (status, _) = body(
        s.admin(Method::DELETE, &format!("/admin/sessions/{sa}"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(s.audit_rows("session_close").len(), 1);

    let q_open = format!("?status=open&token_id={b_id}");
    let (_, v) = body(
        s.admin(Method::GET, &format!("/admin/sessions{q_open}"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(v["sessions"].as_array().unwrap().len(), 1);
    let (_, v) = list("?status=closed").await;
    assert_eq!(v["sessions"][0]["session_id"].as_str(), Some(sa.as_str()));
    let (status, _) = list("?status=maybe").await;
    assert_eq!(status, 400);
    let (status, _) = body(
        s.admin(Method::DELETE, "/admin/sessions/ses_nope")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 404);
    let (status, _) = body(
        s.app(&a, Method::GET, "/admin/sessions")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 403);
}

#[tokio::test]
async fn the_audit_log_filters_by_kind_and_outcome() {
    let s = TestServer::start().await;
    let (id, _) = s.mint("one").await;
    s.mint("two").await;
    let (status, _) = body(
        s.admin(Method::PATCH, &format!("/admin/tokens/{id}"))
            .json(&json!({"rate_per_min": 5}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 200);
    let kinds = |q: &str| {
        let req = s.admin(Method::GET, &format!("/admin/audit?{q}"));
        async move {
            let (status, v) = body(req.send().await.unwrap()).await;
            assert_eq!(status, 200, "{v}");
            v["rows"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r["kind"].as_str().unwrap().to_string())
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(kinds("kind=token_mint").await, ["token_mint", "token_mint"]);
    assert_eq!(
        kinds("kind=token_update&outcome=ok").await,
        ["token_update"]
    );
    assert!(kinds("outcome=error").await.is_empty());
    assert_eq!(
        kinds("kind=&outcome=").await.len(),
        3,
        "empty filters mean none"
    );
}

fn preflight(s: &TestServer, path: &str, origin: &str) -> reqwest::RequestBuilder {
    s.req(Method::OPTIONS, path)
        .header("origin", origin)
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "authorization,content-type",
        )
}

#[tokio::test]
async fn listed_origins_may_call_the_app_routes_without_credentials() {
    const LAN_APP: &str = "http://192.168.1.20:3000";
    let s = TestServer::start_with(|c| c.settings.cors_origins = vec![LAN_APP.into()]).await;
    let res = preflight(&s, "/run", LAN_APP).send().await.unwrap();
    assert!(res.status().is_success(), "{}", res.status());
    let h = res.headers();
    assert_eq!(h["access-control-allow-origin"], LAN_APP);
    let methods = h["access-control-allow-methods"].to_str().unwrap();
    assert!(methods.contains("POST"), "{methods}");
    let allowed = h["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .to_ascii_lowercase();
    assert!(
        allowed.contains("authorization") && allowed.contains("content-type"),
        "{allowed}"
    );
    assert!(h.get("access-control-allow-credentials").is_none());

    // The real request gets the header too, so the page can read the answer.
    let (_, token) = s.mint("web").await;
    let res = s
        .app(&token, Method::GET, "/usage")
        .header("origin", LAN_APP)
        .send()
        .await
        .unwrap();
    assert_eq!(res.headers()["access-control-allow-origin"], LAN_APP);
    assert!(res
        .headers()
        .get("access-control-allow-credentials")
        .is_none());
    assert_eq!(body(res).await.0, 200);

    // Another origin, and the admin routes, get no CORS answer at all.
    let res = preflight(&s, "/run", "http://evil.example")
        .send()
        .await
        .unwrap();
    assert!(res.headers().get("access-control-allow-origin").is_none());
    let res = preflight(&s, "/admin/tokens", LAN_APP)
        .send()
        .await
        .unwrap();
    assert!(res.headers().get("access-control-allow-origin").is_none());
    let res = s
        .admin(Method::GET, "/admin/tokens")
        .header("origin", LAN_APP)
        .send()
        .await
        .unwrap();
    assert!(res.headers().get("access-control-allow-origin").is_none());
}

#[tokio::test]
async fn without_listed_origins_there_is_no_cors() {
    let s = TestServer::start().await;
    let res = preflight(&s, "/run", "http://192.168.1.20:3000")
        .send()
        .await
        .unwrap();
    assert!(res.headers().get("access-control-allow-origin").is_none());
    let v: Value = res.json().await.unwrap();
    assert_eq!(v["ok"], false);
}
