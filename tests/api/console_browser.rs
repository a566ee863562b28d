//! The operator console in a real browser: seeds a live server (stub CLIs), runs
//! `tests/browser/console_test.py` (Playwright for Python driving Debian's chromium, both
//! installed by scripts/test.sh) with its URL and the admin token, and checks its exit
//! status and the rows its clicks left behind.
//!
//! Screenshots of every page go to a temp dir; with `CLAWDFORGE_UPDATE_SCREENSHOTS=1` to
//! `docs/console/` (committed, shown in the README).

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use serde_json::{json, Value};

use crate::harness::open_session;
use crate::harness::{eventually, repo_root, TestServer, ADMIN};

const CHROMIUM: &str = "/usr/bin/chromium";

fn venv_python() -> PathBuf {
    repo_root().join(".venv-tests/bin/python")
}

/// The UTC month before this one, `YYYY-MM`: it has every day the seed uses, whatever
/// today's date is.
fn previous_month() -> String {
    let now = time::OffsetDateTime::now_utc();
    let (y, m) = match now.month() as u8 {
        1 => (now.year() - 1, 12),
        m => (now.year(), m - 1),
    };
    format!("{y:04}-{m:02}")
}

#[tokio::test]
async fn the_console_works_in_a_real_browser() {
    assert!(
        std::path::Path::new(CHROMIUM).exists() && venv_python().exists(),
        "the browser test needs {CHROMIUM} and .venv-tests with Playwright: run scripts/test.sh (it installs both)"
    );
    let s = TestServer::start().await;
    let (recipes, recipes_token) = s
        .mint_with(json!({"name": "recipes", "budget_usd_per_day": 5, "budget_usd_per_month": 50}))
        .await;
    let (garden, garden_token) = s.mint("garden").await;
    let month = previous_month();
    let kept = open_session(&s, &recipes_token).await;
    let other = open_session(&s, &recipes_token).await;
    // A turn that runs until cancelled, so the Sessions page has a busy session to mark.
    let busy = open_session(&s, &garden_token).await;
    let turn = {
        let req = s
            .app(
                &garden_token,
                reqwest::Method::POST,
                &format!("/sessions/{busy}/turn"),
            )
            .json(&json!({"prompt": "@stub:hang", "timeout_secs": 300}));
        tokio::spawn(async move { req.send().await.map(|r| r.status().as_u16()) })
    };
    let state = s.state.clone();
    let busy_id = busy.clone();
    eventually("the garden turn is running", move || {
        state.sessions.busy(&busy_id)
    })
    .await;
    {
        let db = rusqlite::Connection::open(s.data_dir().join("clawdforge.db")).unwrap();
        db.busy_timeout(Duration::from_secs(5)).unwrap();
        for (token, day, model, cost) in [
            (&recipes, "03", "sonnet", 1.50),
            (&recipes, "07", "haiku", 0.25),
            (&recipes, "15", "sonnet", 2.00),
            (&garden, "07", "haiku", 0.75),
        ] {
            db.execute(
                "INSERT INTO usage_daily (token_id, day, model, requests, input_tokens, output_tokens, cost_usd)
                 VALUES (?1, ?2, ?3, 1, 100, 20, ?4)",
                rusqlite::params![token, format!("{month}-{day}"), model, cost],
            )
            .unwrap();
        }
        // Uploads as the audit log records them: 15 failed ones of recipes, 5 of garden.
        for (token, outcome, n) in [(&recipes, "error", 15), (&garden, "ok", 5)] {
            for i in 0..n {
                db.execute(
                    "INSERT INTO audit (at, token_id, kind, outcome, subject, detail)
                     VALUES (?1, ?2, 'upload', ?3, ?4, 'size 12')",
                    rusqlite::params![
                        time::OffsetDateTime::now_utc().unix_timestamp() * 1000,
                        token,
                        outcome,
                        format!("ff_seed{i}")
                    ],
                )
                .unwrap();
            }
        }
    }

    let update = std::env::var("CLAWDFORGE_UPDATE_SCREENSHOTS").is_ok_and(|v| v == "1");
    let shots = if update {
        repo_root().join("docs/console")
    } else {
        s.dir.path().join("screenshots")
    };
    std::fs::create_dir_all(&shots).unwrap();
    let run = tokio::process::Command::new(venv_python())
        .arg(repo_root().join("tests/browser/console_test.py"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", s.dir.path())
        .env("CONSOLE_URL", &s.url)
        .env("ADMIN_BOOTSTRAP_TOKEN", ADMIN)
        .env("SEEDED_MONTH", &month)
        .env("BUSY_SESSION", &busy)
        .env("SCREENSHOT_DIR", &shots)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(300), run)
        .await
        .expect("the browser test hung")
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "console_test.py exited {:?}\nstdout: {stdout}\nstderr: {stderr}",
        out.status.code()
    );
    let (status, v) = crate::harness::body(
        s.app(
            &garden_token,
            reqwest::Method::POST,
            &format!("/sessions/{busy}/cancel"),
        )
        .send()
        .await
        .unwrap(),
    )
    .await;
    assert_eq!((status, v["cancelled"].as_bool()), (200, Some(true)), "{v}");
    assert_eq!(
        turn.await.unwrap().unwrap(),
        200,
        "the cancelled turn answers 200"
    );
    let report: Value = serde_json::from_str(stdout.trim().lines().last().unwrap_or(""))
        .unwrap_or_else(|_| panic!("no JSON report: {stdout}"));

    for page in [
        "sign-in",
        "overview",
        "apps",
        "usage",
        "sessions",
        "audit",
        "apps-375px",
    ] {
        let len = std::fs::metadata(shots.join(format!("{page}.png")))
            .map(|m| m.len())
            .unwrap_or(0);
        assert!(len > 1000, "no screenshot of {page}");
    }

    // What the clicks left behind.
    let db = s.db();
    let minted = report["minted_id"].as_str().unwrap();
    let (day, rate, month_budget, revoked): (f64, Option<i64>, f64, Option<i64>) = db
        .query_row(
            "SELECT budget_usd_per_day, rate_per_min, budget_usd_per_month, revoked_at FROM tokens WHERE id = ?1",
            [minted],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )
        .unwrap();
    assert_eq!((day, rate, month_budget), (3.0, None, 20.0));
    assert!(
        revoked.is_some(),
        "the console's Revoke left the token usable"
    );
    let kinds: Vec<String> = db
        .prepare("SELECT kind FROM audit WHERE subject = ?1 ORDER BY id")
        .unwrap()
        .query_map([minted], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(
        kinds,
        ["token_mint", "token_update", "token_rotate", "token_revoke"],
        "one row per action (declined confirmations did nothing)"
    );
    let forged: i64 = db
        .query_row(
            "SELECT count(*) FROM tokens WHERE name = 'csrf-probe'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(forged, 0, "a request without the CSRF token minted a token");

    let closed = report["closed_session"].as_str().unwrap();
    assert!(closed == kept || closed == other, "{closed}");
    let status = |id: &str| -> String {
        db.query_row("SELECT status FROM sessions WHERE id = ?1", [id], |r| {
            r.get(0)
        })
        .unwrap()
    };
    assert_eq!(status(closed), "closed");
    let still_open = if closed == kept { &other } else { &kept };
    assert_eq!(status(still_open), "open");
    let rows = s.audit_rows("session_close");
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["token_id"].as_str(), Some(recipes.as_str()));
}
