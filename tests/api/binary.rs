//! The `clawdforge` binary itself: settings and their errors, the `tokens` subcommands with
//! and without a running server, logging, and SIGTERM.

use std::process::Command;
use std::time::Duration;

use reqwest::Method;
use serde_json::Value;

use crate::harness::*;

/// Every setting of API.md, by env name.
const SETTINGS: &[&str] = &[
    "CLAWDFORGE_LISTEN",
    "CLAWDFORGE_DATA_DIR",
    "ADMIN_BOOTSTRAP_TOKEN",
    "ALLOW_CIDRS",
    "CLAUDE_BIN",
    "ACPX_BIN",
    "RUNS_DIR",
    "ACPX_SESSIONS_CWD",
    "CLAWDFORGE_DEFAULT_MODEL",
    "CLAWDFORGE_MAX_CONCURRENT",
    "CLAWDFORGE_MAX_QUEUE",
    "CLAWDFORGE_QUEUE_TIMEOUT_SECS",
    "CLAWDFORGE_MAX_TIMEOUT_SECS",
    "CLAWDFORGE_MAX_UPLOAD_BYTES",
    "CLAWDFORGE_MAX_PROMPT_BYTES",
    "CLAWDFORGE_MAX_OUTPUT_BYTES",
    "CLAWDFORGE_SWEEP_INTERVAL_SECS",
    "CLAWDFORGE_SESSION_TTL_SECS",
    "CLAWDFORGE_SESSION_HARD_TTL_SECS",
    "CLAWDFORGE_AUDIT_PROMPTS",
    "CLAWDFORGE_AUDIT_RETENTION_DAYS",
    "CLAWDFORGE_TRUSTED_PROXIES",
    "CLAWDFORGE_CHILD_ENV",
    "CLAWDFORGE_AGENTS",
    "CLAWDFORGE_SESSION_PERMISSIONS",
    "CLAWDFORGE_METRICS_OPEN",
    "CLAWDFORGE_WARM_POOL",
    "CLAWDFORGE_WARM_MAX_IDLE_SECS",
    "CLAWDFORGE_SESSION_POOL",
    "CLAWDFORGE_MAX_WARM_AGENTS",
    "CLAWDFORGE_HEADER_TIMEOUT_SECS",
    "CLAWDFORGE_BODY_TIMEOUT_SECS",
    "CLAWDFORGE_MAX_CONNECTIONS",
    "CLAWDFORGE_CONSOLE",
    "CLAWDFORGE_CORS_ORIGINS",
];

#[test]
fn help_lists_every_setting_by_env_name() {
    for args in [&["--help"][..], &["serve", "--help"][..]] {
        let out = bin().args(args).output().unwrap();
        assert!(out.status.success());
        let help = String::from_utf8(out.stdout).unwrap();
        for name in SETTINGS {
            assert!(
                help.contains(&format!("env: {name}")),
                "{args:?} does not list {name}"
            );
        }
        assert!(
            !help.contains("env: ADMIN_BOOTSTRAP_TOKEN="),
            "secret values are hidden"
        );
    }
}

#[test]
fn bad_values_stop_start_up_naming_the_variable() {
    let dir = tempfile::tempdir().unwrap();
    for (name, value) in [
        ("ALLOW_CIDRS", "10.0.0.0/33"),
        ("CLAWDFORGE_LISTEN", "nope"),
        ("CLAWDFORGE_MAX_CONCURRENT", "0"),
        ("CLAWDFORGE_AUDIT_PROMPTS", "maybe"),
        ("CLAWDFORGE_SESSION_PERMISSIONS", "approve-everything"),
        ("CLAWDFORGE_TRUSTED_PROXIES", "10.0.0.1/8,nonsense"),
    ] {
        let out = bin()
            .env("CLAWDFORGE_DATA_DIR", dir.path())
            .env(name, value)
            .arg("serve")
            .output()
            .unwrap();
        assert!(!out.status.success(), "{name}={value} was accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(name), "{name}: {err}");
    }
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test]
async fn tokens_subcommands_work_offline_and_a_running_server_honours_them() {
    let s = TestServer::start().await;
    let data = s.data_dir();
    let data = data.as_path();
    // Minted while the server runs (same database, another process).
    let minted: Value =
        serde_json::from_str(&run_ok(bin().env("CLAWDFORGE_DATA_DIR", data).args([
            "tokens",
            "mint",
            "--name",
            "cli-app",
            "--cidr",
            "127.0.0.0/8",
            "--json",
        ])))
        .unwrap();
    let token = minted["token"].as_str().unwrap();
    let id = minted["id"].as_str().unwrap();
    assert_eq!(
        body(s.app(token, Method::GET, "/sessions").send().await.unwrap())
            .await
            .0,
        200
    );

    let list = run_ok(
        bin()
            .env("CLAWDFORGE_DATA_DIR", data)
            .args(["tokens", "list"]),
    );
    assert!(
        list.contains(id) && list.contains("cli-app") && !list.contains(token),
        "{list}"
    );
    let json_list: Value = serde_json::from_str(&run_ok(
        bin()
            .env("CLAWDFORGE_DATA_DIR", data)
            .args(["tokens", "list", "--json"]),
    ))
    .unwrap();
    assert_eq!(json_list[0]["ip_cidrs"][0], "127.0.0.0/8");

    run_ok(
        bin()
            .env("CLAWDFORGE_DATA_DIR", data)
            .args(["tokens", "revoke", id]),
    );
    assert_eq!(
        body(s.app(token, Method::GET, "/sessions").send().await.unwrap())
            .await
            .0,
        401
    );
    let out = bin()
        .env("CLAWDFORGE_DATA_DIR", data)
        .args(["tokens", "revoke", "tok_missing"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let kinds: Vec<String> = s
        .audit_rows("token_revoke")
        .iter()
        .map(|r| r["subject"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(kinds, vec![id.to_string()]);
}

#[test]
fn tokens_mint_creates_the_database() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("fresh/data");
    let token = run_ok(
        bin()
            .env("CLAWDFORGE_DATA_DIR", &data)
            .args(["tokens", "mint", "--name", "first"]),
    );
    assert!(token.trim().starts_with("cf_"));
    assert!(data.join("clawdforge.db").exists());
}

#[tokio::test]
async fn logs_carry_request_ids_and_token_ids_never_tokens_and_sigterm_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let admin = "admin-secret-for-the-log-test-0123456789";
    let mut served = serve(
        dir.path(),
        &[
            ("ADMIN_BOOTSTRAP_TOKEN", admin),
            ("CLAWDFORGE_LOG_FORMAT", "json"),
        ],
    );
    let client = reqwest::Client::new();
    let res = client
        .post(format!("{}/admin/tokens", served.url))
        .bearer_auth(admin)
        .json(&serde_json::json!({"name": "logged"}))
        .send()
        .await
        .unwrap();
    let request_id = res.headers()["x-request-id"].to_str().unwrap().to_string();
    let (_, minted) = body(res).await;
    let token = minted["token"].as_str().unwrap().to_string();
    let res = client
        .get(format!("{}/sessions", served.url))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let res = client
        .get(format!("{}/sessions", served.url))
        .bearer_auth("cf_wrongwrongwrongwrongwrongwrongwrongwrong")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);

    let status = served.terminate(Duration::from_secs(15));
    assert!(status.success(), "exit status {status:?}");
    let lines = served.collect_lines();
    let all = lines.join("\n");
    assert!(
        !all.contains(&token) && !all.contains(admin),
        "a secret reached the log:\n{all}"
    );
    assert!(!all.contains("wrongwrong"));
    let answered: Vec<Value> = lines
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["fields"]["message"] == "answered")
        .collect();
    assert_eq!(answered.len(), 3, "{all}");
    assert!(
        answered
            .iter()
            .any(|v| v["span"]["id"] == request_id.as_str()),
        "{all}"
    );
    let app = &answered[1];
    assert_eq!(app["span"]["token_id"], minted["id"], "{app}");
    assert_eq!(app["fields"]["status"], 200);
    assert!(app["fields"]["latency_ms"].is_u64());
}

async fn mint_via(url: &str, admin: &str) -> String {
    let res = reqwest::Client::new()
        .post(format!("{url}/admin/tokens"))
        .bearer_auth(admin)
        .json(&serde_json::json!({"name": "bin"}))
        .send()
        .await
        .unwrap();
    body(res).await.1["token"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn children_get_an_allowlisted_environment() {
    let dir = tempfile::tempdir().unwrap();
    let admin = "admin-secret-never-in-a-child-0123456789";
    let served = serve(
        dir.path(),
        &[
            ("ADMIN_BOOTSTRAP_TOKEN", admin),
            ("SOME_SERVICE_PASSWORD", "hunter2"),
            ("CLAWDFORGE_CHILD_ENV", "HTTPS_PROXY_FOR_AGENTS"),
            ("HTTPS_PROXY_FOR_AGENTS", "http://proxy.lan:3128"),
            ("ANTHROPIC_API_KEY", "sk-ant-passed-through"),
        ],
    );
    let token = mint_via(&served.url, admin).await;
    let res = reqwest::Client::new()
        .post(format!("{}/run", served.url))
        .bearer_auth(&token)
        .json(&serde_json::json!({"prompt": "@stub:env"}))
        .send()
        .await
        .unwrap();
    let (st, v) = body(res).await;
    assert_eq!(st, 200, "{v}");
    let env: Value = serde_json::from_str(
        v["result"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| v["result"].to_string())
            .as_str(),
    )
    .unwrap();
    let env = env.as_object().unwrap();
    let dump = serde_json::to_string(env).unwrap();
    assert!(
        !dump.contains(admin) && !dump.contains(&token),
        "a secret reached the child: {dump}"
    );
    assert!(
        !env.contains_key("ADMIN_BOOTSTRAP_TOKEN") && !env.contains_key("SOME_SERVICE_PASSWORD")
    );
    assert!(!env.keys().any(|k| k.starts_with("CLAWDFORGE_")), "{dump}");
    assert_eq!(env["HTTPS_PROXY_FOR_AGENTS"], "http://proxy.lan:3128");
    assert_eq!(env["ANTHROPIC_API_KEY"], "sk-ant-passed-through");
    assert!(env.contains_key("PATH"));
}

#[tokio::test]
async fn a_sigkilled_server_leaves_nothing_after_restart() {
    use crate::harness::{alive, eventually};
    let dir = tempfile::tempdir().unwrap();
    let records = dir.path().join("records");
    std::fs::create_dir_all(&records).unwrap();
    let admin = "admin-secret-for-the-kill-test-0123456789";
    let rec = records.display().to_string();
    let extra = [
        ("ADMIN_BOOTSTRAP_TOKEN", admin),
        ("CLAUDE_STUB_RECORD_DIR", rec.as_str()),
    ];
    let mut served = serve(&dir.path().join("data"), &extra);
    let token = mint_via(&served.url, admin).await;
    let url = served.url.clone();
    let pending = tokio::spawn(async move {
        reqwest::Client::new()
            .post(format!("{url}/run"))
            .bearer_auth(&token)
            .json(&serde_json::json!({"prompt": "@stub:grandchild\n@stub:hang"}))
            .send()
            .await
    });
    let rec_dir = records.clone();
    eventually("stub started its grandchild", move || {
        !crate::harness::grandchildren(&rec_dir).is_empty()
    })
    .await;
    let pid = crate::harness::records(&records)[0]["pid"]
        .as_i64()
        .unwrap() as i32;
    let grandchild = crate::harness::grandchildren(&records)[0];
    let record = crate::harness::records(&records)[0].clone();
    assert!(!crate::harness::dir_gone(&record));

    served.child.kill().unwrap();
    served.child.wait().unwrap();
    {
        let db = rusqlite::Connection::open(dir.path().join("data/clawdforge.db")).unwrap();
        let n: String = db
            .query_row(
                "SELECT pgid || ' ' || start_ticks FROM live_processes",
                [],
                |r| r.get(0),
            )
            .unwrap();
        let st = std::fs::read_to_string(format!("/proc/{grandchild}/stat")).unwrap();
        eprintln!("DEBUG rows={n} pid={pid} gc stat={st}");
    }
    assert!(
        pending.await.unwrap().is_err(),
        "the connection died with the server"
    );
    // PR_SET_PDEATHSIG: the direct child follows its parent within moments.
    eventually("child dies with the server", || !alive(pid)).await;

    // The restart kills what survived (the grandchild), removes the run dir, and marks
    // the run abandoned.
    let served = serve(&dir.path().join("data"), &extra);
    assert!(
        !alive(grandchild),
        "start-up left a survivor: {:?}",
        served.collect_lines()
    );
    assert!(crate::harness::dir_gone(&record));
    let db = rusqlite::Connection::open(dir.path().join("data/clawdforge.db")).unwrap();
    let outcome: String = db
        .query_row("SELECT outcome FROM audit WHERE kind='run'", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert_eq!(outcome, "abandoned");
    drop(served);
}
