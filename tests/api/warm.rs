//! The warm pool: pre-started `claude` processes serve matching runs, are replaced after use,
//! after their idle life and when the CLI changes, never count against the concurrency cap
//! while idle, and never are handed out dead.

use reqwest::Method;
use serde_json::json;

use crate::harness::records;
use crate::harness::{alive, body, eventually, TestServer};

fn warm_rows(s: &TestServer) -> Vec<Option<i64>> {
    let db = s.db();
    let mut stmt = db
        .prepare("SELECT warm FROM audit WHERE kind = 'run' ORDER BY id")
        .unwrap();
    stmt.query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

async fn pool_ready(s: &TestServer, n: usize) {
    let state = s.state.clone();
    eventually("warm pool filled", move || {
        state.warm.idle_pids().len() >= n
    })
    .await;
}

#[tokio::test]
async fn matching_runs_take_warm_processes_and_others_start_cold() {
    let s = TestServer::start_with(|c| {
        c.settings.warm_pool = 2;
        c.settings.max_concurrent = 1;
    })
    .await;
    let (_, t) = s.mint("app").await;
    // With no other demand, the whole pool serves the default combination.
    pool_ready(&s, 2).await;
    let idle = s.state.warm.idle_pids();
    // Idle processes hold no admission slot.
    assert_eq!(s.state.slots.running(), 0);

    let (st, v) = body(
        s.app(&t, Method::POST, "/run")
            .json(&json!({"prompt": "hello"}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["result"], "echo: hello");
    let rec = records(&s.record_dir).pop().unwrap();
    assert!(
        idle.contains(&(rec["pid"].as_i64().unwrap() as i32)),
        "served by an idle process"
    );
    let argv: Vec<String> = serde_json::from_value(rec["argv"].clone()).unwrap();
    assert!(
        argv.windows(2)
            .any(|w| w == ["--input-format", "stream-json"]),
        "{argv:?}"
    );

    // Another model misses, runs cold, and becomes a combination the pool keeps.
    let (st, v) = body(
        s.app(&t, Method::POST, "/run")
            .json(&json!({"prompt": "hi", "model": "opus"}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((st, v["model"].as_str()), (200, Some("opus")));
    pool_ready(&s, 2).await;
    let (st, _) = body(
        s.app(&t, Method::POST, "/run")
            .json(&json!({"prompt": "again", "model": "opus"}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(st, 200);
    assert_eq!(warm_rows(&s), [Some(1), Some(0), Some(1)]);

    let (_, h) = body(s.req(Method::GET, "/healthz").send().await.unwrap()).await;
    assert_eq!(h["warm_pool"]["size"], 2);
    assert_eq!(h["warm_pool"]["hits"], 2);
    assert_eq!(h["warm_pool"]["misses"], 1);

    // A used process is gone (one process serves one run).
    let pid = rec["pid"].as_i64().unwrap() as i32;
    eventually("used process exits", || !alive(pid)).await;
}

#[tokio::test]
async fn a_process_that_died_idle_is_never_handed_out() {
    let s = TestServer::start_with(|c| c.settings.warm_pool = 1).await;
    let (_, t) = s.mint("app").await;
    pool_ready(&s, 1).await;
    let dead = s.state.warm.idle_pids()[0];
    nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(dead),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    eventually("killed", || !alive(dead)).await;
    let (st, v) = body(
        s.app(&t, Method::POST, "/run")
            .json(&json!({"prompt": "still fine"}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    assert_ne!(
        records(&s.record_dir).pop().unwrap()["pid"]
            .as_i64()
            .unwrap() as i32,
        dead
    );
}

#[tokio::test]
async fn idle_processes_are_recycled_and_killed_on_shutdown() {
    let s = TestServer::start_with(|c| {
        c.settings.warm_pool = 1;
        c.settings.warm_max_idle_secs = 1;
    })
    .await;
    pool_ready(&s, 1).await;
    let first = s.state.warm.idle_pids()[0];
    let state = s.state.clone();
    eventually("replaced after its idle life", move || {
        let now = state.warm.idle_pids();
        !now.is_empty() && !now.contains(&first)
    })
    .await;
    eventually("the old one is killed", || !alive(first)).await;
    let current = s.state.warm.idle_pids();
    s.stop().await;
    for pid in current {
        assert!(!alive(pid), "idle warm process {pid} outlived shutdown");
    }
}

#[tokio::test]
async fn a_cli_upgrade_replaces_idle_processes() {
    let version_file = tempfile::NamedTempFile::new().unwrap();
    let path = version_file.path().to_path_buf();
    std::fs::remove_file(&path).unwrap();
    let vf = path.display().to_string();
    let s = TestServer::start_with(move |c| {
        c.settings.warm_pool = 1;
        c.child_env_overrides
            .push(("CLAUDE_STUB_VERSION_FILE".into(), vf));
    })
    .await;
    pool_ready(&s, 1).await;
    let before = s.state.warm.idle_pids()[0];
    std::fs::write(&path, "2.2.0 (Claude Code)").unwrap();
    s.state.probes.refresh(&s.state.config).await;
    let state = s.state.clone();
    eventually("replaced after the upgrade", move || {
        let now = state.warm.idle_pids();
        !now.is_empty() && !now.contains(&before)
    })
    .await;
    eventually("old one killed", || !alive(before)).await;
    let (_, h) = body(s.req(Method::GET, "/healthz").send().await.unwrap()).await;
    assert_eq!(h["claude_version"], "2.2.0 (Claude Code)");
}
