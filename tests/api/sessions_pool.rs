//! Pooled sessions (`CLAWDFORGE_SESSION_POOL`), the warm-agent limit
//! (`CLAWDFORGE_MAX_WARM_AGENTS`) and the acpx clients started ahead of turns: with the stub
//! `acpx` for who gets what, and with the
//! real stack for what only real agents show (an agent started without an upstream
//! request, an evicted agent resuming its session with context).

use std::path::Path;
use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};

use crate::fake_upstream::{conversation_text, FakeUpstream, Reply};
use crate::harness::{alive, eventually, eventually_within, no_agent_left, TestServer};
use crate::harness::{call, create, open_session, real_server, turn};
use crate::harness::{client_pids, home, owner_pids, request_for};

/// Starting a real agent takes 5–15 s on a loaded 2-core machine.
const AGENT_START: Duration = Duration::from_secs(90);

/// Pooled sessions ready to be taken, as `/healthz` counts them.
fn pooled_count(s: &TestServer) -> usize {
    s.state.sessions.warm_stats().pooled
}

fn pooled_ids(s: &TestServer) -> Vec<String> {
    let db = s.db();
    let mut stmt = db
        .prepare("SELECT id FROM sessions WHERE status = 'pooled' ORDER BY created_at")
        .unwrap();
    let rows = stmt.query_map([], |r| r.get(0)).unwrap();
    rows.map(Result::unwrap).collect()
}

fn row(s: &TestServer, id: &str) -> (String, String, i64) {
    s.db()
        .query_row(
            "SELECT token_id, status, created_at FROM sessions WHERE id = ?1",
            [id],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap()
}

async fn warm_sessions(s: &TestServer) -> Value {
    s.get_json("/healthz").await["warm_sessions"].clone()
}

#[tokio::test]
async fn a_plain_create_takes_the_pooled_session_and_nobody_sees_the_pool() {
    let s = TestServer::start_with(|c| c.settings.session_pool = 1).await;
    eventually("a session is pooled", || pooled_count(&s) == 1).await;
    let pooled = pooled_ids(&s).remove(0);
    let pooled_dir = s.data_dir().join("acpx-cwds").join(&pooled);
    assert!(pooled_dir.is_dir());
    let (a_id, a) = s.mint("a").await;
    let (_, b) = s.mint("b").await;

    // Not listed to anyone, not readable by id.
    let (st, v) = call(&s, &a, Method::GET, "/sessions").await;
    assert_eq!((st, &v["sessions"]), (200, &json!([])), "{v}");
    let (st, _) = call(&s, &a, Method::GET, &format!("/sessions/{pooled}")).await;
    assert_eq!(st, 404);
    let res = s
        .admin(Method::GET, "/admin/sessions")
        .send()
        .await
        .unwrap();
    let (st, v) = crate::harness::body(res).await;
    assert_eq!(st, 200, "{v}");
    assert!(
        !v.to_string().contains(&pooled),
        "the operator does not see it: {v}"
    );
    let ws = warm_sessions(&s).await;
    assert_eq!(
        (&ws["pooled"], &ws["limit"]),
        (&json!(1), &json!(4)),
        "{ws}"
    );

    // Asking for something else (a system prompt) does not take it.
    let (st, v) = create(&s, &a, json!({"system": "be terse"})).await;
    assert_eq!(st, 201, "{v}");
    assert_ne!(v["session_id"], json!(pooled));
    assert_eq!(pooled_ids(&s), vec![pooled.clone()]);

    let before = clawdforge_now_ms();
    let (st, v) = create(&s, &a, json!({})).await;
    assert_eq!(st, 201, "{v}");
    assert_eq!(v["session_id"], json!(pooled), "{v}");
    let (owner, status, created_at) = row(&s, &pooled);
    assert_eq!((owner.as_str(), status.as_str()), (a_id.as_str(), "open"));
    assert!(created_at >= before, "created_at is when it was taken");
    let (st, v) = call(&s, &a, Method::GET, "/sessions").await;
    assert_eq!(st, 200);
    assert_eq!(v["sessions"].as_array().unwrap().len(), 2, "{v}");
    let (st, _) = call(&s, &b, Method::GET, &format!("/sessions/{pooled}")).await;
    assert_eq!(st, 404, "another token's");
    let (st, v) = turn(&s, &a, &pooled, json!({"prompt": "hello"})).await;
    assert_eq!((st, &v["turn_index"]), (200, &json!(1)), "{v}");

    // A replacement follows in the background.
    eventually("a replacement is pooled", || pooled_count(&s) == 1).await;
    eventually("a replacement is pooled", || {
        pooled_ids(&s).iter().any(|p| *p != pooled)
    })
    .await;
    let replacement = pooled_ids(&s).remove(0);
    let replacement_dir = s.data_dir().join("acpx-cwds").join(&replacement);
    assert!(replacement_dir.is_dir());

    // A pooled session is not kept past shutdown: no row, no dir.
    let dir = s.stop().await;
    let db = rusqlite::Connection::open(dir.path().join("data/clawdforge.db")).unwrap();
    let left: i64 = db
        .query_row(
            "SELECT count(*) FROM sessions WHERE status = 'pooled'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(left, 0);
    assert!(!replacement_dir.exists());
    assert!(pooled_dir.is_dir(), "the taken one is the caller's");
}

fn clawdforge_now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// The messages requests the fake has seen (the agent's turns and title requests).
fn message_posts(fake: &FakeUpstream) -> usize {
    fake.received()
        .iter()
        .filter(|r| r.method == "POST" && r.path.starts_with("/v1/messages"))
        .count()
}

/// A close that comes right after a turn leaves no client waiting for a turn of a closed
/// session, even when the warm-agent keeper notes that turn only after the close began:
/// the keeper works under the session's claim and skips a session that is closing. Here
/// the keeper is held up by design (with one warm agent allowed, B's ended turn makes it
/// stop A's agent, which ignores SIGTERM and so takes the kill grace), C's turn ends and
/// C's close begins meanwhile, and that close keeps the row open for seconds (its `acpx
/// sessions close` is slow). Without the claim the keeper's late note of C's turn started
/// a client for C that waited forever.
#[tokio::test]
async fn a_close_begun_before_the_keeper_notes_the_turn_leaves_no_client() {
    let s = TestServer::start_with(|c| {
        c.settings.warm_pool = 0;
        c.settings.sweep_interval_secs = 3600;
        c.settings.max_warm_agents = 1;
        for (k, v) in [
            ("CLAUDE_STUB_QUEUE_OWNER", "1"),
            ("CLAUDE_STUB_QUEUE_LOCK", "1"),
            ("CLAUDE_STUB_OWNER_IGNORES_TERM", "1"),
            ("CLAUDE_STUB_CLOSE_DELAY_SECS", "5"),
        ] {
            c.child_env_overrides.push((k.into(), v.into()));
        }
    })
    .await;
    let home = home(&s);
    let (_, t) = s.mint("a").await;
    let (a, b, c) = (
        open_session(&s, &t).await,
        open_session(&s, &t).await,
        open_session(&s, &t).await,
    );
    let (st, v) = turn(&s, &t, &a, json!({"prompt": "one"})).await;
    assert_eq!(st, 200, "{v}");
    // The stub's owner writes acpx's lock, so A's agent counts as warm and gets a client.
    eventually("A's next client is started", || {
        s.state.sessions.warm_stats().clients == 1
    })
    .await;

    let (st, v) = turn(&s, &t, &b, json!({"prompt": "two"})).await;
    assert_eq!(st, 200, "{v}");
    let (st, v) = turn(&s, &t, &c, json!({"prompt": "three"})).await;
    assert_eq!(st, 200, "{v}");
    let (st, v) = call(&s, &t, Method::DELETE, &format!("/sessions/{c}")).await;
    assert_eq!((st, &v["status"]), (200, &json!("closed")), "{v}");
    // C's own turn client exits with its turn; nothing else may wait for C.
    eventually("no acpx client of the closed session is left", || {
        client_pids(&home, &c).is_empty()
    })
    .await;

    for id in [&a, &b] {
        let (st, _) = call(&s, &t, Method::DELETE, &format!("/sessions/{id}")).await;
        assert_eq!(st, 200);
    }
    assert_eq!(warm_sessions(&s).await["clients"], 0);
    no_agent_left(&home).await;
}

#[tokio::test]
async fn real_acpx_a_pooled_session_answers_its_first_turn_from_a_running_agent() {
    let fake = FakeUpstream::start().await;
    fake.reply_when("POOLFIRST", Reply::text("Pooled and warm."));
    let s = real_server(&fake, |c| {
        c.settings.warm_pool = 0;
        c.settings.sweep_interval_secs = 3600;
        c.settings.session_pool = 1;
    })
    .await;
    let home = home(&s);
    eventually_within("a session is pooled", AGENT_START, || pooled_count(&s) == 1).await;
    let owners = owner_pids(&home);
    assert_eq!(owners.len(), 1, "the pooled session's agent is running");
    assert_eq!(message_posts(&fake), 0, "warming spent nothing upstream");
    assert_eq!(warm_sessions(&s).await["agents"], 1);

    let (_, t) = s.mint("pool").await;
    let (st, v) = create(&s, &t, json!({})).await;
    assert_eq!(st, 201, "{v}");
    let id = v["session_id"].as_str().unwrap().to_string();
    let (st, v) = turn(&s, &t, &id, json!({"prompt": "hi POOLFIRST"})).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["text"], "Pooled and warm.");
    assert!(
        owners.iter().all(|p| owner_pids(&home).contains(p)),
        "the agent started by the pool answered"
    );
    let req = request_for(&fake, "POOLFIRST");
    assert!(conversation_text(&req).contains("hi POOLFIRST"));

    // The replacement's agent starts in the background; closing the taken session and
    // shutting down leave no agent process behind (the pool is discarded).
    eventually_within("a replacement is pooled", AGENT_START, || {
        pooled_count(&s) == 1 && owner_pids(&home).len() == 2
    })
    .await;
    let (st, _) = call(&s, &t, Method::DELETE, &format!("/sessions/{id}")).await;
    assert_eq!(st, 200);
    let replacement_owner: Vec<i32> = owner_pids(&home)
        .into_iter()
        .filter(|p| !owners.contains(p))
        .collect();
    let _dir = s.stop().await;
    assert!(replacement_owner.iter().all(|p| !alive(*p)));
    no_agent_left(&home).await;
}

fn owner_of(home: &Path, s: &TestServer, id: &str) -> Option<i32> {
    let record: String = s
        .db()
        .query_row(
            "SELECT acpx_record_id FROM sessions WHERE id = ?1",
            [id],
            |r| r.get(0),
        )
        .unwrap();
    let dir = home.join(".acpx/queues");
    std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .filter_map(|t| serde_json::from_str::<Value>(&t).ok())
        .find(|v| v["sessionId"] == json!(record))
        .and_then(|v| v["pid"].as_i64())
        .map(|p| p as i32)
        .filter(|p| alive(*p))
}

#[tokio::test]
async fn real_acpx_beyond_the_warm_limit_the_idle_agent_stops_and_its_session_resumes() {
    let fake = FakeUpstream::start().await;
    fake.reply_when("EVICTONE", Reply::text("Noted, kiwi."));
    let s = real_server(&fake, |c| {
        c.settings.warm_pool = 0;
        c.settings.sweep_interval_secs = 3600;
        c.settings.max_warm_agents = 1;
    })
    .await;
    let home = home(&s);
    let (_, t) = s.mint("warm").await;
    let open = |v: (u16, Value)| {
        assert_eq!(v.0, 201, "{}", v.1);
        v.1["session_id"].as_str().unwrap().to_string()
    };
    let a = open(create(&s, &t, json!({})).await);
    let b = open(create(&s, &t, json!({})).await);
    let (st, v) = turn(&s, &t, &a, json!({"prompt": "remember EVICTONE kiwi"})).await;
    assert_eq!(st, 200, "{v}");
    let a_owner = owner_of(&home, &s, &a).expect("a's agent is warm");

    let (st, v) = turn(&s, &t, &b, json!({"prompt": "hi EVICTB"})).await;
    assert_eq!(st, 200, "{v}");
    eventually("a's idle agent is stopped", || !alive(a_owner)).await;
    eventually("and the client waiting for a's next turn", || {
        client_pids(&home, &a).is_empty()
    })
    .await;
    assert!(owner_of(&home, &s, &b).is_some(), "b's agent stays warm");
    assert_eq!(warm_sessions(&s).await["agents"], 1);
    let (st, v) = call(&s, &t, Method::GET, &format!("/sessions/{a}")).await;
    assert_eq!((st, &v["status"]), (200, &json!("open")));

    // A's next turn starts its agent again and resumes the conversation.
    let b_owner = owner_of(&home, &s, &b).unwrap();
    let (st, v) = turn(&s, &t, &a, json!({"prompt": "which fruit EVICTTWO"})).await;
    assert_eq!((st, &v["turn_index"]), (200, &json!(2)), "{v}");
    let convo = conversation_text(&request_for(&fake, "EVICTTWO"));
    assert!(
        convo.contains("remember EVICTONE kiwi") && convo.contains("Noted, kiwi."),
        "context kept: {convo}"
    );
    eventually("now b's agent is the one stopped", || !alive(b_owner)).await;

    for id in [&a, &b] {
        let (st, _) = call(&s, &t, Method::DELETE, &format!("/sessions/{id}")).await;
        assert_eq!(st, 200);
    }
    no_agent_left(&home).await;
}

/// The `warm` column of session `id`'s turn audit rows, oldest first.
fn turn_warm(s: &TestServer, id: &str) -> Vec<Option<bool>> {
    let db = s.db();
    let mut stmt = db
        .prepare("SELECT warm FROM audit WHERE kind = 'turn' AND subject = ?1 ORDER BY id")
        .unwrap();
    let rows = stmt.query_map([id], |r| r.get(0)).unwrap();
    rows.map(Result::unwrap).collect()
}

/// Waits until session `id` has one acpx client waiting and the server holds it (the
/// process shows in /proc a moment before the server has put it in its map); its pid.
async fn waiting_client(s: &TestServer, home: &Path, id: &str, what: &str) -> i32 {
    eventually_within(what, AGENT_START, || {
        client_pids(home, id).len() == 1 && s.state.sessions.warm_stats().clients == 1
    })
    .await;
    client_pids(home, id)[0]
}

#[tokio::test]
async fn real_acpx_the_next_turn_takes_the_client_started_for_it_unless_it_no_longer_fits() {
    let fake = FakeUpstream::start().await;
    fake.reply_when("PREONE", Reply::text("Noted, plum."));
    fake.reply_when("PRETWO", Reply::text("It was plum."));
    fake.reply_when("PRETHREE", Reply::text("Still plum."));
    let s = real_server(&fake, |c| {
        c.settings.warm_pool = 0;
        c.settings.sweep_interval_secs = 3600;
    })
    .await;
    let home = home(&s);
    let (token_id, t) = s.mint("pre").await;
    let (st, v) = create(&s, &t, json!({})).await;
    assert_eq!(st, 201, "{v}");
    let id = v["session_id"].as_str().unwrap().to_string();
    let (st, v) = turn(&s, &t, &id, json!({"prompt": "remember PREONE plum"})).await;
    assert_eq!(st, 200, "{v}");

    // Started ahead once the turn ended, waiting on stdin.
    let first = waiting_client(&s, &home, &id, "the next turn's client is started").await;
    assert_eq!(warm_sessions(&s).await["clients"], 1);
    let (st, v) = turn(&s, &t, &id, json!({"prompt": "which fruit PRETWO"})).await;
    assert_eq!((st, &v["text"]), (200, &json!("It was plum.")), "{v}");
    assert_eq!(v["turn_index"], 2);
    assert!(
        !alive(first),
        "the pre-started client ran the turn and exited"
    );
    assert_eq!(turn_warm(&s, &id), [Some(false), Some(true)]);
    let convo = conversation_text(&request_for(&fake, "PRETWO"));
    assert!(
        convo.contains("remember PREONE plum"),
        "context kept: {convo}"
    );

    // The token's permission mode changes: the client started with the old one is
    // stopped, never used, and the turn runs its own.
    let second = waiting_client(&s, &home, &id, "another client is started").await;
    assert_ne!(second, first);
    let (st, v) =
        crate::harness::patch(&s, &token_id, json!({"session_permissions": "deny-all"})).await;
    assert_eq!(st, 200, "{v}");
    let (st, v) = turn(&s, &t, &id, json!({"prompt": "again PRETHREE"})).await;
    assert_eq!((st, &v["text"]), (200, &json!("Still plum.")), "{v}");
    assert!(!alive(second));
    assert_eq!(turn_warm(&s, &id), [Some(false), Some(true), Some(false)]);

    // Closing stops the client waiting for a turn that will not come.
    let third = waiting_client(&s, &home, &id, "a client for the new mode is started").await;
    let (st, _) = call(&s, &t, Method::DELETE, &format!("/sessions/{id}")).await;
    assert_eq!(st, 200);
    eventually("the waiting client is stopped", || !alive(third)).await;
    assert_eq!(warm_sessions(&s).await["clients"], 0);
    no_agent_left(&home).await;
}

#[tokio::test]
async fn real_acpx_a_sigkilled_server_leaves_no_pooled_agent_or_waiting_client_after_restart() {
    use crate::harness::{real_served_env, serve, served_close, served_session, served_turn};
    let fake = FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let admin = "admin-secret-for-the-pool-kill-test-0123456";
    let (home, env) = real_served_env(
        &fake,
        dir.path(),
        admin,
        &[("CLAWDFORGE_SESSION_POOL", "1")],
    );
    let extra: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let data = dir.path().join("data");
    let mut served = serve(&data, &extra);
    let db = rusqlite::Connection::open(data.join("clawdforge.db")).unwrap();
    let pooled_now = || -> Option<String> {
        db.query_row("SELECT id FROM sessions WHERE status = 'pooled'", [], |r| {
            r.get(0)
        })
        .ok()
    };
    // Wait for the pooled session (and its pre-started client) before taking it.
    eventually_within("a pooled session with its client", AGENT_START, || {
        pooled_now().is_some_and(|p| client_pids(&home, &p).len() == 1)
    })
    .await;
    let (token, id) = served_session(&served.url, admin).await;
    let (st, v) = served_turn(&served.url, &token, &id, "hello KILLPOOL").await;
    assert_eq!(st, 200, "{v}");
    // The replacement pooled session, and both sessions' waiting clients.
    eventually_within("the replacement and both clients", AGENT_START, || {
        pooled_now().is_some_and(|p| p != id && client_pids(&home, &p).len() == 1)
            && client_pids(&home, &id).len() == 1
    })
    .await;
    let pooled = pooled_now().unwrap();
    let waiting: Vec<i32> = [&id, &pooled]
        .iter()
        .flat_map(|s| client_pids(&home, s))
        .collect();
    assert_eq!(waiting.len(), 2);
    let owners_before = owner_pids(&home);
    assert_eq!(
        owners_before.len(),
        2,
        "the taken and the pooled session's agents"
    );

    served.child.kill().unwrap();
    served.child.wait().unwrap();
    // The clients die with the server (they are its children, with a death signal).
    eventually("the waiting clients died with the server", || {
        waiting.iter().all(|p| !alive(*p))
    })
    .await;

    let served = serve(&data, &extra);
    // Start-up discarded the old pooled session: row, dir and agent.
    let left: i64 = db
        .query_row(
            "SELECT count(*) FROM sessions WHERE id = ?1",
            [&pooled],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(left, 0);
    assert!(!data.join("acpx-cwds").join(&pooled).exists());
    eventually("the old pooled agent is stopped", || {
        owner_pids(&home)
            .iter()
            .filter(|p| owners_before.contains(p) && alive(**p))
            .count()
            <= 1
    })
    .await;
    // The taken session is open and still answers.
    let (st, v) = served_turn(&served.url, &token, &id, "after KILLPOOL").await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(served_close(&served.url, &token, &id).await, 200);
    // A graceful stop discards the new pool: nothing is left but the server itself.
    let server = served.child.id() as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(server),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let mut served = served;
    served.child.wait().unwrap();
    no_agent_left(&home).await;
}
